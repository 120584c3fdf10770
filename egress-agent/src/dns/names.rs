//! The policy's names, as the kernel's `NAMES` map holds them and as the agent matches them.
use std::collections::HashMap;

use egress_common::{NAME_EXACT, NAME_KEY_LEN, NAME_MAX_WIRE, NAME_WILDCARD, NameKey};

use crate::{
    compile::PortSets,
    policy::{NamePattern, Policy, Ports, Target},
};

/// Labels of a wildcard zone the kernel can match (it tracks the last 16 labels of a name,
/// and a name under the zone has at least one more).
const MAX_ZONE_LABELS: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{0}: longer than the {NAME_MAX_WIRE} bytes (in DNS wire form) the kernel can match")]
    TooLong(String),
    #[error("*.{0}: a wildcard zone may have at most {MAX_ZONE_LABELS} labels")]
    TooDeep(String),
}

/// The `NAMES` key for a lowercase, dot-separated name without a trailing dot.
pub fn name_key(kind: u8, name: &str) -> Result<NameKey, NameError> {
    let mut bytes = [0u8; NAME_KEY_LEN];
    bytes[0] = kind;
    let mut at = 1;
    for label in name.split('.') {
        let end = at + 1 + label.len();
        if end > NAME_KEY_LEN {
            return Err(NameError::TooLong(name.to_owned()));
        }
        bytes[at] = label.len() as u8;
        bytes[at + 1..end].copy_from_slice(label.as_bytes());
        at = end;
    }
    Ok(NameKey { bytes })
}

/// The allowed names and zones, each with the union of its own ports and those of every
/// wildcard zone that contains it: the most specific match answers alone, in the kernel and
/// here alike.
#[derive(Debug, Default)]
pub struct NameTable {
    exact: HashMap<String, (Ports, u32)>,
    zones: HashMap<String, (Ports, u32)>,
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
            let (table, name) = match pattern {
                NamePattern::Exact(n) => (&mut exact, n),
                NamePattern::Wildcard(z) => {
                    if z.split('.').count() > MAX_ZONE_LABELS {
                        return Err(NameError::TooDeep(z.clone()));
                    }
                    (&mut zones, z)
                }
            };
            name_key(NAME_EXACT, name)?;
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
        }
        Ok(table)
    }

    /// The `NAMES` map's entries.
    pub fn entries(&self) -> Result<Vec<(NameKey, u32)>, NameError> {
        let exact = self
            .exact
            .iter()
            .map(|(n, (_, id))| Ok((name_key(NAME_EXACT, n)?, *id)));
        let zones = self
            .zones
            .iter()
            .map(|(z, (_, id))| Ok((name_key(NAME_WILDCARD, z)?, *id)));
        exact.chain(zones).collect()
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
    fn keys_are_wire_format_with_a_kind_byte() {
        let k = name_key(NAME_WILDCARD, "hcp.eastus.azmk8s.io").expect("short name");
        assert_eq!(k.bytes[0], NAME_WILDCARD);
        assert_eq!(&k.bytes[1..22], b"\x03hcp\x06eastus\x06azmk8s\x02io");
        assert!(k.bytes[22..].iter().all(|b| *b == 0));
    }

    #[test]
    fn names_longer_than_the_kernel_key_are_refused() {
        let long = ["a".repeat(60), "b".repeat(60), "c".repeat(10)].join(".");
        assert!(matches!(
            name_key(NAME_EXACT, &long),
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

    #[test]
    fn entries_cover_every_name_once() {
        let (t, _) = table(
            "allow:\n  - fqdn: a.example.org\n  - fqdn: \"*.example.net\"\n    ports: [UDP:53]\n",
        );
        let entries = t.entries().expect("keys");
        assert_eq!(entries.len(), 2);
        assert!(
            entries
                .iter()
                .any(|(k, _)| k.bytes[0] == NAME_EXACT && k.bytes[1] == 1)
        );
    }

    #[test]
    fn zones_deeper_than_the_kernel_tracks_are_refused() {
        let deep = (0..16).map(|_| "a").collect::<Vec<_>>().join(".");
        let policy =
            parse(&format!("allow:\n  - fqdn: \"*.{deep}\"\n"), "deep.yaml").expect("valid");
        assert!(matches!(
            NameTable::new(&policy, &mut PortSets::default()),
            Err(NameError::TooDeep(_))
        ));
    }
}
