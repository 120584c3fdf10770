//! `egress-agent suggest`: from audit (or deny) events to a policy that would have allowed
//! every flow in them.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs::File,
    io::BufReader,
    net::IpAddr,
    path::PathBuf,
};

use anyhow::Context as _;

use crate::{
    plural::counted,
    policy::{self, Policy, Ports, Proto, Rule, Target, presets::Params},
};

pub mod read;
pub mod wildcard;

pub use read::{Flow, Input};

/// Where a flow went: a name the workload resolved, or an address it reached without one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Name(String),
    Addr(IpAddr),
}

/// What the flows to one destination have in common.
#[derive(Debug, Default, Clone)]
struct Seen {
    ports: BTreeSet<(Proto, u16)>,
    workloads: BTreeSet<String>,
    flows: usize,
    first: String,
    last: String,
}

impl Seen {
    fn add(&mut self, flow: &Flow) {
        self.ports.insert((flow.proto, flow.port));
        self.workloads.insert(flow.workload.clone());
        self.flows += 1;
        if self.first.is_empty() || flow.time < self.first {
            self.first.clone_from(&flow.time);
        }
        if flow.time > self.last {
            self.last.clone_from(&flow.time);
        }
    }

    fn merge(&mut self, other: &Seen) {
        self.ports.extend(other.ports.iter().copied());
        self.workloads.extend(other.workloads.iter().cloned());
        self.flows += other.flows;
        if self.first.is_empty() || (!other.first.is_empty() && other.first < self.first) {
            self.first.clone_from(&other.first);
        }
        if other.last > self.last {
            self.last.clone_from(&other.last);
        }
    }

    fn comment(&self) -> String {
        const SHOWN: usize = 5;
        let mut who: Vec<&str> = self
            .workloads
            .iter()
            .map(String::as_str)
            .take(SHOWN)
            .collect();
        let more = self.workloads.len().saturating_sub(SHOWN);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        who.sort_unstable();
        format!(
            "{}{more}; {}; {} .. {}",
            who.join(", "),
            counted(self.flows, "flow", "flows"),
            self.first,
            self.last
        )
    }

    fn ports(&self) -> String {
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|&(proto, port)| match proto {
                Proto::Icmp => "ICMP".to_owned(),
                _ => format!("{proto}:{port}"),
            })
            .collect();
        format!("[{}]", ports.join(", "))
    }
}

/// What already allows some flows: a policy given with `--policy`, or presets.
pub struct Covered {
    /// How the suggested policy refers to it: a comment, or a `presets:` block.
    pub label: String,
    pub policy: Policy,
    /// The `presets:` entries to write into the suggestion, when the presets cover.
    pub presets_yaml: Option<String>,
}

/// What `suggest` was asked.
pub struct Options {
    /// Sibling names under one zone that make a wildcard; 0: none.
    pub wildcard_min: usize,
    pub covered: Option<Covered>,
}

/// The suggested policy (YAML) and the summary for standard error.
pub struct Suggestion {
    pub policy: String,
    pub summary: String,
    /// Rules written.
    pub rules: usize,
}

fn allows(rule: &Rule, flow: &Flow, name: Option<&str>) -> bool {
    let target = match (&rule.target, name) {
        (Target::Name(pattern), Some(name)) => pattern.matches(name),
        (Target::Cidr(net), _) => net.contains(&flow.dst),
        (Target::Name(_), None) => false,
    };
    target
        && match &rule.ports {
            Ports::All => true,
            Ports::Some(ranges) => ranges.iter().any(|r| {
                r.proto == flow.proto
                    && (flow.proto == Proto::Icmp || (r.first..=r.last).contains(&flow.port))
            }),
        }
}

/// Whether `policy` already allows `flow`, by one of its names or its address.
fn covers(policy: &Policy, flow: &Flow) -> bool {
    policy.rules.iter().any(|rule| {
        allows(rule, flow, None) || flow.names.iter().any(|n| allows(rule, flow, Some(n)))
    })
}

pub fn suggest(input: &Input, options: &Options) -> Suggestion {
    let mut seen: BTreeMap<Dest, Seen> = BTreeMap::new();
    let mut covered = Seen::default();
    for flow in &input.flows {
        if let Some(c) = &options.covered
            && covers(&c.policy, flow)
        {
            covered.add(flow);
            continue;
        }
        if flow.names.is_empty() {
            seen.entry(Dest::Addr(flow.dst)).or_default().add(flow);
        }
        for name in &flow.names {
            seen.entry(Dest::Name(name.clone())).or_default().add(flow);
        }
    }
    let names = seen.keys().filter_map(|d| match d {
        Dest::Name(n) => Some(n.as_str()),
        Dest::Addr(_) => None,
    });
    let groups = wildcard::groups(names, options.wildcard_min);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Suggested by `egress-agent suggest` from {}. Review every rule before enforcing.",
        counted(input.flows.len(), "flow", "flows")
    );
    let _ = writeln!(out, "mode: audit");
    if let Some(c) = &options.covered {
        let _ = writeln!(
            out,
            "# {} left out: {} already allows them ({}).",
            counted(covered.flows, "flow", "flows"),
            c.label,
            if covered.flows > 0 {
                covered.comment()
            } else {
                "none".into()
            }
        );
        if let Some(presets) = &c.presets_yaml {
            out.push_str(presets);
        }
    }
    let mut rules = 0;
    let mut body = String::new();
    for (zone, siblings) in &groups {
        let mut all = Seen::default();
        for name in siblings {
            all.merge(&seen[&Dest::Name(name.clone())]);
        }
        let _ = writeln!(
            body,
            "  # {}; {} names seen: {}",
            all.comment(),
            siblings.len(),
            siblings.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(body, "  - fqdn: \"*.{zone}\"\n    ports: {}", all.ports());
        rules += 1;
    }
    let grouped: BTreeSet<&String> = groups.values().flatten().collect();
    for (dest, s) in &seen {
        let target = match dest {
            Dest::Name(name) if grouped.contains(name) => continue,
            Dest::Name(name) => format!("fqdn: {name}"),
            Dest::Addr(addr @ IpAddr::V4(_)) => format!("cidr: {addr}/32"),
            Dest::Addr(addr @ IpAddr::V6(_)) => format!("cidr: {addr}/128"),
        };
        let _ = writeln!(body, "  # {}", s.comment());
        let _ = writeln!(body, "  - {target}\n    ports: {}", s.ports());
        rules += 1;
    }
    if rules > 0 {
        out.push_str("allow:\n");
        out.push_str(&body);
    } else if options
        .covered
        .as_ref()
        .is_none_or(|c| c.presets_yaml.is_none())
    {
        // `check` refuses a policy without rules: say why there are none.
        out.push_str("# No flow needs a rule: nothing to allow (check refuses an empty policy).\n");
    }
    let lost = input.events_lost();
    let summary = format!(
        "suggest: {} read ({} covered already, {} of other protocols left out), {} \
         written ({}), {} skipped; events lost in the input: {lost}{}",
        counted(input.flows.len(), "flow", "flows"),
        covered.flows,
        input.unsupported,
        counted(rules, "rule", "rules"),
        counted(groups.len(), "wildcard", "wildcards"),
        counted(input.other_lines as usize, "other line", "other lines"),
        if lost > 0 {
            " (the agents did not print every flow: audit longer, or look at \
             egress_events_lost_total)"
        } else {
            ""
        }
    );
    Suggestion {
        policy: out,
        summary,
        rules,
    }
}

/// `egress-agent suggest`: reads the logs, prints the policy on stdout and the summary on
/// standard error.
pub fn command(
    events: &[PathBuf],
    wildcard_min: usize,
    with_presets: Option<String>,
    location: Option<String>,
    policy: Option<PathBuf>,
) -> anyhow::Result<()> {
    let covered = match (with_presets, policy) {
        (Some(name), _) => {
            let mut yaml = format!("presets:\n  - name: {name}\n");
            if let Some(l) = &location {
                let _ = writeln!(yaml, "    location: {l}");
            }
            let policy = policy::preset_rules(&name, Params { location }, None, None)?;
            Some(Covered {
                label: format!("preset {name}"),
                policy,
                presets_yaml: Some(yaml),
            })
        }
        (None, Some(path)) => Some(Covered {
            label: path.display().to_string(),
            policy: policy::load(&path, None)?,
            presets_yaml: None,
        }),
        (None, None) => None,
    };
    let mut input = Input::default();
    for path in events {
        if path.as_os_str() == "-" {
            input.read("-", std::io::stdin().lock())?;
        } else {
            let file = File::open(path).with_context(|| format!("--events {}", path.display()))?;
            input.read(&path.display().to_string(), BufReader::new(file))?;
        }
    }
    let s = suggest(
        &input,
        &Options {
            wildcard_min,
            covered,
        },
    );
    print!("{}", s.policy);
    eprintln!("{}", s.summary);
    Ok(())
}

#[cfg(test)]
mod tests;
