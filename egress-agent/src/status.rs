//! `egress-agent status`: what the pinned state enforces, read from bpffs alone, so it works
//! the same while an agent runs and while none does. `--rules` adds every entry the policy
//! maps hold, with the policy entries it comes from, and what passes whatever the policy
//! says; `--json` prints the same as one JSON object.
use std::{fmt::Write as _, path::Path};

use anyhow::bail;
use egress_common::{Addr, MODE_ENFORCE, addr::display_addr};
use serde::Serialize;

use crate::kubeconfig::KubeletApiServer;
use crate::plural::counted;
use crate::{
    cgroup::{CgroupNames, cgroup2_mount},
    loader::Stats,
    origins::{self, ImplicitAllow},
    pin::{LinkPin, PinRoot},
    pinned::{PinnedMaps, set_ports},
    policy::{self, Policy, Ports},
    record,
    sys::boot_time_ns,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_root: String,
    pub agent_running: bool,
    pub attached: Vec<String>,
    /// `None` when the pin root holds no maps of this agent's layout (see `other_layouts`).
    pub maps: Option<Maps>,
    pub other_layouts: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Maps {
    pub mode: &'static str,
    pub cidr_entries: usize,
    pub name_entries: usize,
    pub port_sets: usize,
    pub trusted_resolvers: Vec<String>,
    pub counters: Stats,
    pub learned: Vec<Learned>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<Rules>,
}

#[derive(Debug, Serialize)]
pub struct Learned {
    pub addr: String,
    pub ttl_secs: u64,
    /// Empty until the agent's once-a-second record of names has caught up.
    pub names: Vec<String>,
}

/// What the policy maps hold, entry by entry (`--rules`).
#[derive(Debug, Serialize)]
pub struct Rules {
    /// The policy file recorded when it was applied; `None` if no agent of this release
    /// recorded one.
    pub policy: Option<String>,
    /// Why the recorded policy cannot be read back, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_error: Option<String>,
    /// The recorded policy's hash, as `/metrics` gives the running one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Lists of the policy whose files are not the ones applied, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed_lists: Vec<String>,
    pub cidrs: Vec<Entry>,
    pub names: Vec<Entry>,
    pub implicit: Vec<ImplicitAllow>,
}

/// One map entry: its target, the ports it allows, and where it comes from.
#[derive(Debug, Serialize)]
pub struct Entry {
    pub target: String,
    pub ports: String,
    pub from: origins::Origins,
}

/// Ports as `check` prints them; a set the maps do not hold is `none`.
fn ports_text(ports: &Ports) -> String {
    match ports {
        Ports::Some(ranges) if ranges.is_empty() => "none".to_owned(),
        other => other.to_string(),
    }
}

/// Where a link pin is attached, in words.
fn attach_point(link: &LinkPin, cgroups: &mut Option<CgroupNames>) -> String {
    let mut parts = link.point.splitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("cgroup"), Some(inode), Some(direction)) => {
            let path = inode
                .parse()
                .ok()
                .and_then(|id| cgroups.as_mut()?.path_of(id).map(Path::to_path_buf));
            match path {
                Some(path) => format!("cgroup {} ({direction})", path.display()),
                None => format!("cgroup with inode {inode} ({direction})"),
            }
        }
        _ => link.point.clone(),
    }
}

/// Reads the pinned state; `rules` adds every policy entry.
/// `kubelet`: the API server name the agent narrowed the presets to, for attributing the
/// recorded policy's entries as the agent compiled them.
pub fn collect(
    pins: &PinRoot,
    rules: bool,
    kubelet: Option<&KubeletApiServer>,
) -> anyhow::Result<Status> {
    if !pins.exists() {
        bail!(
            "nothing is pinned under {} (no agent ran with this --pin-root, or it was \
             uninstalled)",
            pins.root().display()
        );
    }
    let mut cgroups = cgroup2_mount().ok().map(CgroupNames::new);
    let attached = pins
        .links()?
        .iter()
        .map(|link| attach_point(link, &mut cgroups))
        .collect();
    let maps = match PinnedMaps::open(pins)? {
        Some(maps) => Some(read_maps(pins, &maps, rules, kubelet)?),
        None => None,
    };
    let other_layouts = if maps.is_none() {
        pins.versions()?
            .iter()
            .map(|v| v.display().to_string())
            .collect()
    } else {
        Vec::new()
    };
    Ok(Status {
        pin_root: pins.dir().display().to_string(),
        agent_running: pins.held()?,
        attached,
        maps,
        other_layouts,
    })
}

fn read_maps(
    pins: &PinRoot,
    maps: &PinnedMaps,
    rules: bool,
    kubelet: Option<&KubeletApiServer>,
) -> anyhow::Result<Maps> {
    let now = boot_time_ns();
    let mut names = maps.learned_names();
    let learned = maps
        .live_learned(now)
        .into_iter()
        .map(|(addr, value): (Addr, _)| Learned {
            addr: display_addr(&addr).to_string(),
            ttl_secs: (value.expires_ns - now).div_ceil(NS_PER_SEC),
            names: names
                .remove(&addr)
                .unwrap_or_default()
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
        })
        .collect();
    let cidrs = maps.cidr_entries()?;
    let name_entries = maps.name_entries()?;
    let sets = maps.port_sets()?;
    let resolvers = maps.resolvers()?;
    let rules = if rules {
        let recorded = recorded_policy(pins, kubelet)?;
        let policy = recorded.policy;
        let changed = &recorded.changed;
        let from =
            |f: &dyn Fn(&Policy) -> origins::Origins| policy.as_ref().map(f).unwrap_or_default();
        Some(Rules {
            policy: recorded.path,
            policy_error: recorded.error,
            sha256: recorded.sha256,
            changed_lists: changed
                .iter()
                .map(|list| format!("{list}: {}", recorded.why_changed))
                .collect(),
            cidrs: cidrs
                .iter()
                .map(|c| Entry {
                    target: origins::cidr_of(c),
                    ports: ports_text(&set_ports(&sets, c.port_set)),
                    from: from(&|p| origins::of_cidr(p, changed, c)),
                })
                .collect(),
            names: name_entries
                .iter()
                .map(|n| Entry {
                    target: n.pattern.to_string(),
                    ports: ports_text(&set_ports(&sets, n.port_set)),
                    from: from(&|p| origins::of_name(p, &n.pattern)),
                })
                .collect(),
            implicit: origins::implicit_allows(
                &resolvers,
                &origins::resolver_source(policy.as_ref()),
            ),
        })
    } else {
        None
    };
    Ok(Maps {
        mode: if maps.settings().mode == MODE_ENFORCE {
            "enforce"
        } else {
            "audit"
        },
        cidr_entries: cidrs.len(),
        name_entries: name_entries.len(),
        port_sets: sets.len(),
        trusted_resolvers: resolvers.iter().map(ToString::to_string).collect(),
        counters: *maps.stats(),
        learned,
        rules,
    })
}

/// The recorded policy, as origins are named by.
#[derive(Debug, Default)]
pub struct Recorded {
    /// The policy file's path; `None` if no agent of this release recorded one.
    pub path: Option<String>,
    /// The applied policy's hash (`policy::policy_sha256`), if its lists' were recorded.
    pub sha256: Option<String>,
    /// The policy parsed again, its list files read as they are now, without those in
    /// `changed`.
    pub policy: Option<Policy>,
    /// Why the policy cannot be parsed again, if it cannot.
    pub error: Option<String>,
    /// The lists whose files are not the ones applied (`origins::of_list`): their prefixes
    /// are not named from the files as they are now.
    pub changed: Vec<String>,
    /// Why those are left out.
    pub why_changed: &'static str,
}

/// The recorded policy: its path, the policy, and why it could not be read if it could not.
/// A list file read back is compared with the hash recorded for it; one that changed is
/// left out, and named in `changed`.
pub fn recorded_policy(
    pins: &PinRoot,
    kubelet: Option<&KubeletApiServer>,
) -> anyhow::Result<Recorded> {
    let Some(rec) = record::read(pins)? else {
        return Ok(Recorded::default());
    };
    let mut out = Recorded {
        path: Some(rec.path.clone()),
        sha256: rec
            .lists
            .as_ref()
            .map(|manifest| policy::sha256_hex(&policy::policy_sha256(&rec.bytes, manifest))),
        why_changed: match rec.lists {
            Some(_) => "its file changed since the policy was applied; not read",
            None => "its hash was not recorded (an earlier release applied it); not read",
        },
        ..Recorded::default()
    };
    let mut parsed = match policy::parse_bytes(&rec.bytes, &rec.path, kubelet) {
        Ok(p) => p,
        Err(e) => {
            out.error = Some(e.to_string());
            return Ok(out);
        }
    };
    // The recorded manifest's line for a list is as long as the one for its file now: the
    // name is the same, from the same policy bytes, and the hash is 64 digits.
    let mut recorded = rec.lists.as_deref();
    parsed.lists.retain(|list| {
        let now = policy::manifest(std::slice::from_ref(list));
        let same = recorded.and_then(|m| m.get(..now.len())) == Some(now.as_slice());
        recorded = recorded.and_then(|m| m.get(now.len()..));
        if !same {
            out.changed.push(origins::of_list(list));
        }
        same
    });
    out.policy = Some(parsed);
    Ok(out)
}

/// The report, as `status` prints it.
pub fn text(status: &Status) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(out, "pin root   {}", status.pin_root)?;
    writeln!(
        out,
        "agent      {}",
        if status.agent_running {
            "running"
        } else {
            "not running: the pinned programs go on enforcing"
        }
    )?;
    if status.attached.is_empty() {
        writeln!(out, "attached   nothing")?;
    }
    for point in &status.attached {
        writeln!(out, "attached   {point}")?;
    }
    let Some(maps) = &status.maps else {
        writeln!(
            out,
            "maps       none of this agent's layout under {} (another version's: {})",
            status.pin_root,
            status.other_layouts.join(", ")
        )?;
        return Ok(out);
    };
    writeln!(out, "mode       {}", maps.mode)?;
    writeln!(
        out,
        "rules      {}, {}, {}, trusted resolvers: {}",
        counted(maps.cidr_entries, "CIDR entry", "CIDR entries"),
        counted(maps.name_entries, "name entry", "name entries"),
        counted(maps.port_sets, "port set", "port sets"),
        if maps.trusted_resolvers.is_empty() {
            "none".to_owned()
        } else {
            maps.trusted_resolvers.join(" ")
        }
    )?;
    let c = &maps.counters;
    writeln!(
        out,
        "counters   allowed {} dropped {} audited {} events lost {}; dns answers {} learned {}",
        c.allowed, c.dropped, c.audited, c.events_lost, c.dns_answers, c.dns_learned
    )?;
    writeln!(out, "learned    {} addresses", maps.learned.len())?;
    for l in &maps.learned {
        writeln!(
            out,
            "  {:<40} {:>6}s  {}",
            l.addr,
            l.ttl_secs,
            if l.names.is_empty() {
                "(names not recorded yet)".to_owned()
            } else {
                l.names.join(", ")
            }
        )?;
    }
    if let Some(rules) = &maps.rules {
        rules_text(rules, &mut out)?;
    }
    Ok(out)
}

fn rules_text(rules: &Rules, out: &mut String) -> anyhow::Result<()> {
    match (&rules.policy, &rules.policy_error) {
        (Some(path), None) => writeln!(out, "policy     {path} (as recorded when applied)")?,
        (Some(path), Some(e)) => writeln!(out, "policy     {path}: cannot be read back: {e}")?,
        (None, _) => writeln!(
            out,
            "policy     not recorded (filled by an earlier release): origins unknown"
        )?,
    }
    if let Some(sha256) = &rules.sha256 {
        writeln!(out, "sha256     {sha256}")?;
    }
    for list in &rules.changed_lists {
        writeln!(out, "list       {list}")?;
    }
    let entries: Vec<(&str, &Entry)> = rules
        .cidrs
        .iter()
        .map(|e| ("cidr", e))
        .chain(rules.names.iter().map(|e| ("name", e)))
        .collect();
    let target_width = entries.iter().map(|(_, e)| e.target.len()).max();
    let ports_width = entries.iter().map(|(_, e)| e.ports.len()).max();
    for (kind, e) in &entries {
        writeln!(
            out,
            "  {kind} {:tw$}  {:pw$}  # {}",
            e.target,
            e.ports,
            e.from.text(),
            tw = target_width.unwrap_or_default(),
            pw = ports_width.unwrap_or_default()
        )?;
    }
    for i in &rules.implicit {
        writeln!(out, "  implicit {}  # {}", i.what, i.why)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::loader::ByProto;

    fn status(maps: Option<Maps>) -> Status {
        Status {
            pin_root: "/sys/fs/bpf/egress".into(),
            agent_running: false,
            attached: Vec::new(),
            maps,
            other_layouts: vec!["v1".into()],
        }
    }

    #[test]
    fn a_pin_root_without_this_layout_names_the_others() {
        let out = text(&status(None)).expect("formats");
        assert_eq!(
            out,
            "pin root   /sys/fs/bpf/egress\n\
             agent      not running: the pinned programs go on enforcing\n\
             attached   nothing\n\
             maps       none of this agent's layout under /sys/fs/bpf/egress (another version's: v1)\n"
        );
    }

    #[test]
    fn learned_addresses_show_their_names_once_recorded() {
        let maps = Maps {
            mode: "enforce",
            cidr_entries: 1,
            name_entries: 2,
            port_sets: 1,
            trusted_resolvers: Vec::new(),
            counters: Stats {
                allowed: ByProto {
                    tcp: 3,
                    ..ByProto::default()
                },
                ..Stats::default()
            },
            learned: vec![
                Learned {
                    addr: "203.0.113.7".into(),
                    ttl_secs: 30,
                    names: vec!["example.org".into()],
                },
                Learned {
                    addr: "2001:db8::7".into(),
                    ttl_secs: 5,
                    names: Vec::new(),
                },
            ],
            rules: None,
        };
        let out = text(&status(Some(maps))).expect("formats");
        let lines: Vec<&str> = out.lines().skip(3).collect();
        assert_eq!(lines[0], "mode       enforce");
        assert_eq!(
            lines[1],
            "rules      1 CIDR entry, 2 name entries, 1 port set, trusted resolvers: none"
        );
        assert!(
            lines[2].starts_with("counters   allowed 3 (tcp 3 "),
            "{}",
            lines[2]
        );
        assert_eq!(lines[3], "learned    2 addresses");
        assert!(lines[4].ends_with("30s  example.org"), "{}", lines[4]);
        assert!(
            lines[5].ends_with("5s  (names not recorded yet)"),
            "{}",
            lines[5]
        );
    }

    #[test]
    fn attach_points_are_told_in_words() {
        let pin = |point: &str| LinkPin {
            path: PathBuf::from("/sys/fs/bpf/egress/links").join(point),
            point: point.into(),
        };
        assert_eq!(
            attach_point(&pin("cgroup-4242-egress"), &mut None),
            "cgroup with inode 4242 (egress)"
        );
        assert_eq!(
            attach_point(&pin("tc-eth0-ingress"), &mut None),
            "tc-eth0-ingress"
        );
        assert_eq!(ports_text(&Ports::Some(Vec::new())), "none");
    }
}
