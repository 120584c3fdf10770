//! Compiles a policy into the contents of the kernel maps (`CIDRS`, `PORTS`).
//!
//! All the work that can be done once happens here, so the kernel does two lookups: the
//! trie returns the longest matching prefix, and because every prefix carries the union of
//! the ports of all rules that contain it, that one answer is complete.
use std::collections::{BTreeSet, HashMap, HashSet};

use egress_common::{
    ALL_PORTS, CIDRS_MAX_ENTRIES, CidrKey, NAMES_MAX_ENTRIES, PORTS_MAX_ENTRIES, PortKey,
    V4_MAPPED_PREFIX, proto, v4_mapped,
};
use ipnet::IpNet;

use crate::{
    dns::names::{NameError, NameTable},
    policy::{Policy, Ports, Proto},
};

mod cidrs;

/// One `CIDRS` entry: prefix length over the 128-bit key, the key, and its port set id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrEntry {
    pub prefix_len: u32,
    pub key: CidrKey,
    pub port_set: u32,
}

/// Everything the kernel maps hold for a policy: CIDR rules, names, and their port sets.
#[derive(Debug, Default)]
pub struct Compiled {
    pub cidrs: Vec<CidrEntry>,
    pub names: NameTable,
    pub port_sets: PortSets,
}

impl Compiled {
    /// The port sets the policy's own entries refer to.
    pub fn sets_in_use(&self) -> Result<HashSet<u32>, NameError> {
        let names = self.names.entries()?;
        Ok(self
            .cidrs
            .iter()
            .map(|e| e.port_set)
            .chain(names.iter().map(|e| e.port_set))
            .collect())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("the policy needs {needed} CIDR entries; the kernel map holds {max}")]
    TooManyCidrs { needed: usize, max: u32 },
    #[error(
        "the policy's ports expand to {needed} (set, protocol, port) entries; the kernel map holds {max}"
    )]
    TooManyPorts { needed: usize, max: u32 },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("the policy has {needed} names and zones; the kernel map holds {max}")]
    TooManyNames { needed: usize, max: u32 },
}

/// Interned port sets: equal sets share one id, so the `PORTS` map holds each set once.
///
/// Ids are never reused while the agent runs: learned addresses refer to them, so a policy
/// reload that keeps a set keeps its id, and a new set gets a new one.
#[derive(Debug, Default, Clone)]
pub struct PortSets {
    ids: HashMap<Ports, u32>,
    next: u32,
    entries: BTreeSet<PortKey>,
}

impl PortSets {
    /// An empty registry whose ids all come after `taken`: a previous agent's sets, which
    /// its learned addresses still refer to.
    pub fn after(taken: impl IntoIterator<Item = u32>) -> Self {
        Self {
            next: taken.into_iter().max().map_or(0, |id| id + 1),
            ..Self::default()
        }
    }

    /// The id of `ports` (`ALL_PORTS` for every port and protocol), adding it if new.
    pub fn intern(&mut self, ports: &Ports) -> u32 {
        let Ports::Some(ranges) = ports else {
            return ALL_PORTS;
        };
        if let Some(id) = self.ids.get(ports) {
            return *id;
        }
        let id = self.next;
        self.next += 1;
        for r in ranges {
            let proto = match r.proto {
                Proto::Tcp => proto::TCP,
                Proto::Udp => proto::UDP,
                Proto::Icmp => proto::ICMP,
            };
            if r.proto == Proto::Icmp || (r.first <= 1 && r.last == u16::MAX) {
                // Port 0 stands for every port of the protocol (see `PortKey`).
                self.entries.insert(PortKey::new(id, proto, 0));
            } else {
                for port in r.first..=r.last {
                    self.entries.insert(PortKey::new(id, proto, port));
                }
            }
        }
        self.ids.insert(ports.clone(), id);
        id
    }

    /// The `PORTS` map's keys.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = &PortKey> {
        self.entries.iter()
    }

    /// Forgets every set not in `keep`; returns the `PORTS` keys to delete.
    pub fn retain(&mut self, keep: &HashSet<u32>) -> Vec<PortKey> {
        self.ids.retain(|_, id| keep.contains(id));
        let (kept, dropped) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|k| keep.contains(&k.port_set));
        self.entries = kept;
        dropped.into_iter().collect()
    }

    /// The `PORTS` keys of one set.
    pub fn entries_of(&self, id: u32) -> impl Iterator<Item = &PortKey> {
        self.entries
            .range(PortKey::new(id, 0, 0)..=PortKey::new(id, u8::MAX, u16::MAX))
    }
}

/// A CIDR as (prefix length over 128 bits, address as a 128-bit integer).
pub fn to_key_space(net: &IpNet) -> (u32, u128) {
    match net {
        IpNet::V4(n) => (
            V4_MAPPED_PREFIX + u32::from(n.prefix_len()),
            u128::from_be_bytes(v4_mapped(n.network().octets())),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), u128::from(n.network())),
    }
}

/// Compiles a policy with a fresh port set registry.
pub fn compile(policy: &Policy) -> Result<Compiled, CompileError> {
    compile_with(policy, PortSets::default())
}

/// Compiles a policy, interning its port sets in `port_sets` (a running agent's registry,
/// so that sets the new policy shares with the old keep their ids).
pub fn compile_with(policy: &Policy, port_sets: PortSets) -> Result<Compiled, CompileError> {
    let mut out = Compiled {
        port_sets,
        ..Compiled::default()
    };
    out.cidrs = cidrs::cidr_entries(policy, &mut out.port_sets);
    if out.cidrs.len() > CIDRS_MAX_ENTRIES as usize {
        return Err(CompileError::TooManyCidrs {
            needed: out.cidrs.len(),
            max: CIDRS_MAX_ENTRIES,
        });
    }
    out.names = NameTable::new(policy, &mut out.port_sets)?;
    let names = out.names.entries()?.len();
    if names > NAMES_MAX_ENTRIES as usize {
        return Err(CompileError::TooManyNames {
            needed: names,
            max: NAMES_MAX_ENTRIES,
        });
    }
    let ports = out.port_sets.entries().len();
    if ports > PORTS_MAX_ENTRIES as usize {
        return Err(CompileError::TooManyPorts {
            needed: ports,
            max: PORTS_MAX_ENTRIES,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;
    use crate::policy::parse;

    fn mask(addr: u128, prefix_len: u32) -> u128 {
        match prefix_len {
            0 => 0,
            l => addr & (u128::MAX << (128 - l)),
        }
    }

    fn compiled(yaml: &str) -> Compiled {
        compile(&parse(yaml, "test.yaml").expect("valid policy")).expect("compiles")
    }

    /// The port set the kernel would find for `addr`: the longest matching prefix.
    fn lookup(c: &Compiled, addr: IpAddr) -> Option<u32> {
        let a = match addr {
            IpAddr::V4(v4) => u128::from_be_bytes(v4_mapped(v4.octets())),
            IpAddr::V6(v6) => u128::from(v6),
        };
        c.cidrs
            .iter()
            .filter(|e| mask(a, e.prefix_len) == u128::from_be_bytes(e.key.addr))
            .max_by_key(|e| e.prefix_len)
            .map(|e| e.port_set)
    }

    /// The (protocol, port) members of a set, sorted.
    fn ports_of(c: &Compiled, set: u32) -> Vec<(u8, u16)> {
        let mut v: Vec<_> = c
            .port_sets
            .entries()
            .filter(|k| k.port_set == set)
            .map(|k| (k.proto, k.port))
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn ipv4_keys_are_ipv4_mapped_with_prefix_plus_96() {
        let c = compiled("allow:\n  - cidr: 203.0.113.0/24\n");
        assert_eq!(c.cidrs.len(), 1);
        assert_eq!(c.cidrs[0].prefix_len, 120);
        assert_eq!(
            Ipv6Addr::from(c.cidrs[0].key.addr),
            "::ffff:203.0.113.0".parse::<Ipv6Addr>().expect("literal")
        );
        assert_eq!(c.cidrs[0].port_set, ALL_PORTS);
    }

    #[test]
    fn ipv6_keys_keep_their_prefix() {
        let c = compiled("allow:\n  - cidr: 2001:db8::/32\n    ports: [TCP:443]\n");
        assert_eq!(c.cidrs[0].prefix_len, 32);
        assert_eq!(c.cidrs[0].key.addr[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(ports_of(&c, c.cidrs[0].port_set), vec![(proto::TCP, 443)]);
    }

    #[test]
    fn a_nested_prefix_carries_the_ports_of_its_container() {
        let c = compiled(
            "allow:\n  - cidr: 203.0.113.0/24\n    ports: [TCP:443]\n  - cidr: 203.0.113.7\n    ports: [UDP:123]\n",
        );
        let inner = lookup(&c, "203.0.113.7".parse().expect("literal")).expect("match");
        assert_eq!(
            ports_of(&c, inner),
            vec![(proto::TCP, 443), (proto::UDP, 123)]
        );
        let outer = lookup(&c, "203.0.113.8".parse().expect("literal")).expect("match");
        assert_eq!(ports_of(&c, outer), vec![(proto::TCP, 443)]);
        assert_eq!(lookup(&c, "198.51.100.1".parse().expect("literal")), None);
    }

    #[test]
    fn a_container_allowing_everything_makes_its_nested_prefixes_allow_everything() {
        let c = compiled(
            "allow:\n  - cidr: 203.0.113.0/24\n  - cidr: 203.0.113.7\n    ports: [UDP:123]\n",
        );
        let inner = lookup(&c, "203.0.113.7".parse().expect("literal")).expect("match");
        assert_eq!(inner, ALL_PORTS);
    }

    #[test]
    fn equal_port_sets_are_stored_once_and_ranges_expand() {
        let c = compiled(
            "allow:\n  - cidr: 203.0.113.0/24\n    ports: [TCP:30000-30002]\n  - cidr: 198.51.100.0/24\n    ports: [TCP:30000-30002]\n",
        );
        assert_eq!(c.cidrs[0].port_set, c.cidrs[1].port_set);
        assert_eq!(
            ports_of(&c, c.cidrs[0].port_set),
            vec![
                (proto::TCP, 30000),
                (proto::TCP, 30001),
                (proto::TCP, 30002)
            ]
        );
    }

    #[test]
    fn icmp_and_whole_port_ranges_use_port_zero() {
        let c = compiled("allow:\n  - cidr: 203.0.113.0/24\n    ports: [ICMP, UDP:1-65535]\n");
        assert_eq!(
            ports_of(&c, c.cidrs[0].port_set),
            vec![(proto::ICMP, 0), (proto::UDP, 0)]
        );
    }

    #[test]
    fn a_recompile_keeps_the_ids_of_sets_it_shares_and_retain_drops_the_rest() {
        let first = compiled(
            "allow:\n  - cidr: 203.0.113.0/24\n    ports: [TCP:443]\n  - cidr: 198.51.100.0/24\n    ports: [TCP:80]\n",
        );
        let tcp443 = first.cidrs[1].port_set;
        let policy = parse(
            "allow:\n  - cidr: 203.0.113.0/24\n    ports: [TCP:443]\n  - cidr: 198.51.100.0/24\n    ports: [TCP:8080]\n",
            "second.yaml",
        )
        .expect("valid");
        let mut second = compile_with(&policy, first.port_sets.clone()).expect("compiles");
        let by_prefix = |c: &Compiled, first_byte: u8| {
            c.cidrs
                .iter()
                .find(|e| e.key.addr[12] == first_byte)
                .expect("entry")
                .port_set
        };
        assert_eq!(
            by_prefix(&second, 203),
            tcp443,
            "unchanged set keeps its id"
        );
        let new = by_prefix(&second, 198);
        assert!(new > tcp443, "a new set never reuses an id");
        let keep = second.sets_in_use().expect("names");
        let dropped = second.port_sets.retain(&keep);
        assert_eq!(
            dropped.iter().map(|k| k.port).collect::<Vec<_>>(),
            vec![80],
            "the set only the old policy used"
        );
    }

    #[test]
    fn name_rules_add_no_cidr_entries_but_a_port_set() {
        let c = compiled("allow:\n  - fqdn: mcr.microsoft.com\n    ports: [HTTPS:443]\n");
        assert!(c.cidrs.is_empty());
        let (_, set) = c.names.lookup("mcr.microsoft.com").expect("allowed name");
        assert_eq!(ports_of(&c, *set), vec![(proto::TCP, 443)]);
        assert_eq!(c.port_sets.entries_of(*set).count(), 1);
    }

    #[test]
    fn presets_api_server_and_cluster_cidrs_become_cidr_entries() {
        let c = compiled(
            "presets: [{name: aks-global, location: eastus}]\napi_server: 203.0.113.5\ncluster_cidrs: [10.224.0.0/16]\n",
        );
        // The preset's names add none; the two platform addresses, the API server and the
        // cluster CIDR do.
        assert_eq!(c.cidrs.len(), 4);
        let addr = |s: &str| s.parse::<IpAddr>().expect("literal");
        assert_eq!(lookup(&c, addr("168.63.129.16")), Some(ALL_PORTS));
        assert_eq!(lookup(&c, addr("10.224.3.4")), Some(ALL_PORTS));
        let imds = lookup(&c, addr("169.254.169.254")).expect("match");
        assert_eq!(ports_of(&c, imds), vec![(proto::TCP, 80)]);
        let api = lookup(&c, addr("203.0.113.5")).expect("match");
        assert_eq!(
            ports_of(&c, api),
            vec![
                (proto::TCP, 22),
                (proto::TCP, 443),
                (proto::TCP, 9000),
                (proto::UDP, 1194)
            ]
        );
    }
}
