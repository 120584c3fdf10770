//! The policy's names, as the kernel's `NAMES` map holds them and as the agent matches them.
use std::collections::HashMap;

use egress_common::{NAME_KEY_LEN, NAME_MAX_LABELS, NO_PORT_SET, NameKey};

use crate::{
    policy::{NamePattern, Policy, Ports, Target},
    port_sets::PortSets,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{0}: longer than the {NAME_KEY_LEN} bytes (in DNS wire form) the kernel can match")]
    TooLong(String),
    #[error(
        "{0}: the kernel matches names of at most {NAME_MAX_LABELS} labels exactly, and wildcard zones of at most {max_zone} labels",
        max_zone = NAME_MAX_LABELS - 1
    )]
    TooDeep(String),
}

/// One `NAMES` entry: prefix length in bits, key data, port set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameEntry {
    pub prefix_len: u32,
    pub key: NameKey,
    pub port_set: u32,
}

/// The `NAMES` key of a lowercase, dot-separated name without a trailing dot: its labels in
/// reverse order, each length-prefixed, and a terminating zero for an exact name (`whole`).
pub fn name_entry(name: &str, whole: bool, port_set: u32) -> Result<NameEntry, NameError> {
    let mut data = Vec::with_capacity(name.len() + 2);
    for label in name.rsplit('.') {
        data.push(label.len() as u8);
        data.extend_from_slice(label.as_bytes());
    }
    if whole {
        data.push(0);
    }
    if data.len() > NAME_KEY_LEN {
        return Err(NameError::TooLong(name.to_owned()));
    }
    let mut bytes = [0u8; NAME_KEY_LEN];
    bytes[..data.len()].copy_from_slice(&data);
    Ok(NameEntry {
        prefix_len: (data.len() * 8) as u32,
        key: NameKey { bytes },
        port_set,
    })
}

/// What a `NAMES` key of `prefix_len` bits stands for (the inverse of [`name_entry`]):
/// an exact name when it ends with the zero, else a wildcard zone. `None` for bytes that
/// are no such key.
pub fn pattern_of(key: &NameKey, prefix_len: u32) -> Option<NamePattern> {
    let data = key.bytes.get(..(prefix_len / 8) as usize)?;
    let mut labels = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len = usize::from(data[at]);
        if len == 0 {
            // The terminating zero of an exact name: the last byte.
            if at + 1 != data.len() || labels.is_empty() {
                return None;
            }
            labels.reverse();
            return Some(NamePattern::Exact(labels.join(".")));
        }
        let label = data.get(at + 1..at + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + len;
    }
    if labels.is_empty() {
        return None;
    }
    labels.reverse();
    Some(NamePattern::Wildcard(labels.join(".")))
}

/// The allowed names and zones, each with the union of its own ports and those of every
/// wildcard zone that contains it: the most specific match answers alone, in the kernel and
/// here alike.
#[derive(Debug, Default)]
pub struct NameTable {
    exact: HashMap<String, (Ports, u32)>,
    zones: HashMap<String, (Ports, u32)>,
    /// For each zone not also listed exactly: the port set its apex gets from the zones
    /// strictly containing it, or `NO_PORT_SET`.
    apexes: HashMap<String, u32>,
}

impl NameTable {
    /// Builds the table, interning each entry's ports in `port_sets`.
    pub fn new(policy: &Policy, port_sets: &mut PortSets) -> Result<Self, NameError> {
        let mut exact: HashMap<String, Ports> = HashMap::new();
        let mut zones: HashMap<String, Ports> = HashMap::new();
        for rule in &policy.rules {
            let Target::Name(pattern) = &rule.target else {
                continue;
            };
            let (table, name, max_labels) = match pattern {
                NamePattern::Exact(n) => (&mut exact, n, NAME_MAX_LABELS),
                NamePattern::Wildcard(z) => (&mut zones, z, NAME_MAX_LABELS - 1),
            };
            // Name the entry in the file, as the policy parser's messages do.
            let at = || {
                let origins: Vec<String> = rule.origins.iter().map(ToString::to_string).collect();
                format!("{} (fqdn {pattern})", origins.join(", "))
            };
            if name.split('.').count() > max_labels {
                return Err(NameError::TooDeep(at()));
            }
            name_entry(name, true, 0).map_err(|_| NameError::TooLong(at()))?;
            let merged = match table.get(name) {
                Some(p) => p.union(&rule.ports),
                None => rule.ports.clone(),
            };
            table.insert(name.clone(), merged);
        }
        let with_containing_zones = |name: &str, own: &Ports, proper_only: bool| {
            suffixes(name)
                .skip(usize::from(proper_only))
                .filter_map(|s| zones.get(s))
                .fold(own.clone(), |acc, p| acc.union(p))
        };
        let mut table = Self::default();
        for (name, ports) in &exact {
            // An exact name is also inside every zone it ends with (not its own apex).
            let all = with_containing_zones(name, ports, true);
            let id = port_sets.intern(&all);
            table.exact.insert(name.clone(), (all, id));
        }
        for (zone, ports) in &zones {
            let all = with_containing_zones(zone, ports, true);
            let id = port_sets.intern(&all);
            table.zones.insert(zone.clone(), (all, id));
            if !exact.contains_key(zone) {
                let outer = suffixes(zone)
                    .skip(1)
                    .filter_map(|s| zones.get(s))
                    .cloned()
                    .reduce(|a, b| a.union(&b));
                let apex = outer.map_or(NO_PORT_SET, |p| port_sets.intern(&p));
                table.apexes.insert(zone.clone(), apex);
            }
        }
        Ok(table)
    }

    /// The `NAMES` map's entries.
    pub fn entries(&self) -> Result<Vec<NameEntry>, NameError> {
        let exact = self
            .exact
            .iter()
            .map(|(n, (_, id))| name_entry(n, true, *id));
        let zones = self
            .zones
            .iter()
            .map(|(z, (_, id))| name_entry(z, false, *id));
        let apexes = self.apexes.iter().map(|(z, id)| name_entry(z, true, *id));
        exact.chain(zones).chain(apexes).collect()
    }

    /// The ports and port set of the most specific entry allowing `name` (lowercase, no
    /// trailing dot): the exact name, else the longest zone it is strictly inside.
    pub fn lookup(&self, name: &str) -> Option<&(Ports, u32)> {
        self.exact
            .get(name)
            .or_else(|| suffixes(name).skip(1).find_map(|s| self.zones.get(s)))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.zones.is_empty()
    }
}

/// `a.b.c`, `b.c`, `c`: the name and each shorter suffix at a label boundary.
fn suffixes(name: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(name), |s| s.split_once('.').map(|(_, rest)| rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    fn table(yaml: &str) -> (NameTable, PortSets) {
        let policy = parse(yaml, "names.yaml").expect("valid policy");
        let mut sets = PortSets::default();
        let t = NameTable::new(&policy, &mut sets).expect("names compile");
        (t, sets)
    }

    #[test]
    fn keys_decode_back_to_their_names_and_zones() {
        for (name, whole) in [
            ("mcr.microsoft.com", true),
            ("azmk8s.io", false),
            ("a", true),
        ] {
            let e = name_entry(name, whole, 0).expect("fits");
            let want = if whole {
                NamePattern::Exact(name.into())
            } else {
                NamePattern::Wildcard(name.into())
            };
            assert_eq!(pattern_of(&e.key, e.prefix_len), Some(want));
        }
        let empty = NameKey {
            bytes: [0; NAME_KEY_LEN],
        };
        assert_eq!(pattern_of(&empty, 8), None, "a zero alone");
        let mut cut = name_entry("example.com", true, 0).expect("fits");
        cut.key.bytes[0] = 200;
        assert_eq!(
            pattern_of(&cut.key, cut.prefix_len),
            None,
            "a label past the key"
        );
    }

    #[test]
    fn keys_are_reversed_labels_and_exact_names_end_in_zero() {
        let zone = name_entry("hcp.eastus.azmk8s.io", false, 3).expect("short name");
        assert_eq!(&zone.key.bytes[..21], b"\x02io\x06azmk8s\x06eastus\x03hcp");
        assert_eq!(zone.prefix_len, 21 * 8);
        let exact = name_entry("a.b", true, 4).expect("short name");
        assert_eq!(&exact.key.bytes[..5], b"\x01b\x01a\x00");
        assert_eq!(exact.prefix_len, 5 * 8);
        assert!(exact.key.bytes[5..].iter().all(|b| *b == 0));
    }

    #[test]
    fn names_longer_than_the_kernel_key_are_refused() {
        let long = ["a".repeat(60), "b".repeat(60), "c".repeat(10)].join(".");
        assert!(matches!(
            name_entry(&long, true, 0),
            Err(NameError::TooLong(_))
        ));
    }

    #[test]
    fn exact_names_and_zones_match_like_the_kernel() {
        let (t, _) = table(
            "allow:\n  - fqdn: mcr.microsoft.com\n    ports: [HTTPS:443]\n  - fqdn: \"*.hcp.eastus.azmk8s.io\"\n    ports: [TCP:9000]\n",
        );
        assert!(t.lookup("mcr.microsoft.com").is_some());
        assert!(t.lookup("x.mcr.microsoft.com").is_none());
        assert!(t.lookup("a.hcp.eastus.azmk8s.io").is_some());
        assert!(t.lookup("a.b.hcp.eastus.azmk8s.io").is_some());
        assert!(t.lookup("hcp.eastus.azmk8s.io").is_none(), "apex");
        assert!(
            t.lookup("a.hcp.westus.azmk8s.io").is_none(),
            "another region"
        );
        assert!(t.lookup("a.xhcp.eastus.azmk8s.io").is_none(), "look-alike");
    }

    #[test]
    fn a_name_inside_a_zone_gets_the_zones_ports_too() {
        let (t, _) = table(
            "allow:\n  - fqdn: \"*.example.org\"\n    ports: [TCP:80]\n  - fqdn: \"*.a.example.org\"\n    ports: [TCP:81]\n  - fqdn: b.example.org\n    ports: [TCP:82]\n",
        );
        let ports = |n: &str| t.lookup(n).expect("allowed").0.to_string();
        assert_eq!(ports("x.a.example.org"), "TCP:80-81");
        assert_eq!(ports("b.example.org"), "TCP:80 TCP:82");
        assert_eq!(ports("c.example.org"), "TCP:80");
    }

    /// The kernel's lookup: the longest entry whose prefix the reversed name starts with.
    fn kernel_lookup(t: &NameTable, name: &str) -> Option<u32> {
        let key = name_entry(name, true, 0).expect("short name");
        t.entries()
            .expect("keys")
            .into_iter()
            .filter(|e| {
                let n = (e.prefix_len / 8) as usize;
                e.prefix_len <= key.prefix_len && e.key.bytes[..n] == key.key.bytes[..n]
            })
            .max_by_key(|e| e.prefix_len)
            .map(|e| e.port_set)
            .filter(|set| *set != NO_PORT_SET)
    }

    #[test]
    fn the_kernels_single_lookup_agrees_with_the_agent() {
        let (t, _) = table(
            "allow:\n  - fqdn: \"*.example.org\"\n    ports: [TCP:80]\n  - fqdn: \"*.a.example.org\"\n    ports: [TCP:81]\n  - fqdn: b.example.org\n    ports: [TCP:82]\n  - fqdn: \"*.c.example.net\"\n  - fqdn: c.example.net\n    ports: [TCP:83]\n",
        );
        for name in [
            "example.org",
            "x.example.org",
            "a.example.org",
            "x.a.example.org",
            "y.x.a.example.org",
            "b.example.org",
            "x.b.example.org",
            "c.example.net",
            "x.c.example.net",
            "example.net",
            "xa.example.org.evil.test",
        ] {
            assert_eq!(
                kernel_lookup(&t, name),
                t.lookup(name).map(|(_, id)| *id),
                "{name}"
            );
        }
        assert!(
            kernel_lookup(&t, "example.org").is_none(),
            "apex of a wildcard"
        );
    }

    #[test]
    fn zones_deeper_than_the_kernel_tracks_are_refused() {
        let deep = (0..NAME_MAX_LABELS)
            .map(|_| "a")
            .collect::<Vec<_>>()
            .join(".");
        let policy =
            parse(&format!("allow:\n  - fqdn: \"*.{deep}\"\n"), "deep.yaml").expect("valid");
        assert!(matches!(
            NameTable::new(&policy, &mut PortSets::default()),
            Err(NameError::TooDeep(_))
        ));
    }
}
