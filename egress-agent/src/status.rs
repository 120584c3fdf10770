//! `egress-agent status`: what the pinned state enforces, read from bpffs alone, so it works
//! the same while an agent runs and while none does.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData};
use egress_common::{
    Addr, CIDRS, CidrKey, CidrValue, LEARNED, LEARNED_NAMES, LearnedName, LearnedNameKey,
    LearnedValue, MODE_ENFORCE, NAMES, NameKey, PORTS, PortKey, RESOLVERS, SETTINGS, STATS,
    Settings,
};

use crate::{
    cgroup::{CgroupNames, cgroup2_mount},
    control::boot_time_ns,
    events::display_addr,
    loader::read_stats,
    pin::{LinkPin, PinRoot},
};

const NS_PER_SEC: u64 = 1_000_000_000;

fn open(pins: &PinRoot, name: &str) -> anyhow::Result<MapData> {
    let path = pins.map_path(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

fn hash<K: aya::Pod, V: aya::Pod>(
    pins: &PinRoot,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    Ok(HashMap::try_from(Map::HashMap(open(pins, name)?))?)
}

fn trie_len<K: aya::Pod>(pins: &PinRoot, name: &str) -> anyhow::Result<usize> {
    let trie: LpmTrie<MapData, K, CidrValue> = LpmTrie::try_from(Map::LpmTrie(open(pins, name)?))?;
    Ok(trie.keys().filter(Result::is_ok).count())
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

/// The report, as `status` prints it.
pub fn report(pins: &PinRoot) -> anyhow::Result<String> {
    if !pins.exists() {
        bail!(
            "nothing is pinned under {} (no agent ran with this --pin-root, or it was \
             uninstalled)",
            pins.root().display()
        );
    }
    let mut out = String::new();
    let running = pins.held()?;
    writeln!(out, "pin root   {}", pins.dir().display())?;
    writeln!(
        out,
        "agent      {}",
        if running {
            "running"
        } else {
            "not running: the pinned programs go on enforcing"
        }
    )?;
    let links = pins.links()?;
    let mut cgroups = cgroup2_mount().ok().map(CgroupNames::new);
    if links.is_empty() {
        writeln!(out, "attached   nothing")?;
    }
    for link in &links {
        writeln!(out, "attached   {}", attach_point(link, &mut cgroups))?;
    }
    if !pins.map_path(SETTINGS).exists() {
        writeln!(
            out,
            "maps       none of this agent's layout under {} (another version's: {})",
            pins.dir().display(),
            pins.versions()?
                .iter()
                .map(|v| v.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        return Ok(out);
    }
    let settings: Array<MapData, Settings> = Array::try_from(Map::Array(open(pins, SETTINGS)?))?;
    let settings = settings.get(&0, 0).context("reading SETTINGS")?;
    writeln!(
        out,
        "mode       {}",
        if settings.mode == MODE_ENFORCE {
            "enforce"
        } else {
            "audit"
        }
    )?;
    let port_sets: BTreeSet<u32> = hash::<PortKey, u8>(pins, PORTS)?
        .keys()
        .filter_map(Result::ok)
        .map(|k| k.port_set)
        .collect();
    let resolvers: Vec<String> = hash::<Addr, u8>(pins, RESOLVERS)?
        .keys()
        .filter_map(Result::ok)
        .map(|a| display_addr(&a).to_string())
        .collect();
    writeln!(
        out,
        "rules      {} CIDR entries, {} name entries, {} port sets, trusted resolvers: {}",
        trie_len::<CidrKey>(pins, CIDRS)?,
        trie_len::<NameKey>(pins, NAMES)?,
        port_sets.len(),
        if resolvers.is_empty() {
            "none".to_owned()
        } else {
            resolvers.join(" ")
        }
    )?;
    let stats = read_stats(&Map::PerCpuArray(open(pins, STATS)?))?;
    writeln!(
        out,
        "counters   allowed {} dropped {} audited {} events lost {}; dns answers {} learned {}",
        stats.allowed,
        stats.dropped,
        stats.audited,
        stats.events_lost,
        stats.dns_answers,
        stats.dns_learned
    )?;
    learned(pins, &mut out)?;
    Ok(out)
}

/// The learned addresses, each with its remaining TTL and the names it was learned through.
fn learned(pins: &PinRoot, out: &mut String) -> anyhow::Result<()> {
    let now = boot_time_ns();
    let mut names: BTreeMap<Addr, Vec<String>> = BTreeMap::new();
    if pins.map_path(LEARNED_NAMES).exists() {
        for (key, value) in hash::<LearnedNameKey, LearnedName>(pins, LEARNED_NAMES)?
            .iter()
            .filter_map(Result::ok)
        {
            names
                .entry(key.addr)
                .or_default()
                .push(String::from_utf8_lossy(value.name_bytes()).into_owned());
        }
    }
    let mut live: Vec<(Addr, LearnedValue)> = hash::<Addr, LearnedValue>(pins, LEARNED)?
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| v.expires_ns > now)
        .collect();
    live.sort_by_key(|(a, _)| *a);
    writeln!(out, "learned    {} addresses", live.len())?;
    for (addr, value) in live {
        let mut of = names.remove(&addr).unwrap_or_default();
        of.sort();
        writeln!(
            out,
            "  {:<40} {:>6}s  {}",
            display_addr(&addr).to_string(),
            (value.expires_ns - now).div_ceil(NS_PER_SEC),
            if of.is_empty() {
                "(names not recorded yet)".to_owned()
            } else {
                of.join(", ")
            }
        )?;
    }
    Ok(())
}
