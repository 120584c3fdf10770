//! Compiles a policy into the contents of the kernel maps (`CIDRS`, `HOSTS`, `PORTS`).
//!
//! All the work that can be done once happens here, so the kernel does two lookups: the
//! host's exact entry or else the trie's longest matching prefix, and because every prefix
//! carries the union of the ports of all rules that contain it, that one answer is complete.
//! Single addresses go to `HOSTS` only after that union is built.
use std::collections::HashSet;

use egress_common::{
    CIDRS_MAX_ENTRIES, CidrKey, HOSTS_MAX_ENTRIES, MODE_AUDIT, MODE_ENFORCE, NAMES_MAX_ENTRIES,
    PORTS_MAX_ENTRIES, Settings, V4_MAPPED_PREFIX, v4_mapped,
};
use ipnet::IpNet;

use crate::{
    dns::names::{NameError, NameTable},
    policy::{DnsSettings, Mode, Policy},
    port_sets::PortSets,
};

mod cidrs;

pub use cidrs::single_addresses;

/// One `CIDRS` or `HOSTS` entry: prefix length over the 128-bit key (128 in `HOSTS`), the
/// key, and its port set id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrEntry {
    pub prefix_len: u32,
    pub key: CidrKey,
    pub port_set: u32,
}

/// Everything the kernel maps hold for a policy: CIDR rules, names, and their port sets.
#[derive(Debug, Default)]
pub struct Compiled {
    /// The `CIDRS` entries: every prefix but single addresses.
    pub cidrs: Vec<CidrEntry>,
    /// The `HOSTS` entries: IPv4 /32s (IPv4-mapped /128s) and IPv6 /128s.
    pub hosts: Vec<CidrEntry>,
    pub names: NameTable,
    pub port_sets: PortSets,
}

impl Compiled {
    /// Every CIDR rule entry, `CIDRS`'s then `HOSTS`'s.
    pub fn cidr_entries(&self) -> impl Iterator<Item = &CidrEntry> {
        self.cidrs.iter().chain(&self.hosts)
    }

    /// The port sets the policy's own entries refer to.
    pub fn sets_in_use(&self) -> Result<HashSet<u32>, NameError> {
        let names = self.names.entries()?;
        Ok(self
            .cidr_entries()
            .map(|e| e.port_set)
            .chain(names.iter().map(|e| e.port_set))
            .collect())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("the policy needs {needed} CIDR entries; the kernel map holds {max}")]
    TooManyCidrs { needed: usize, max: u32 },
    #[error("the policy needs {needed} single-address entries; the kernel map holds {max}")]
    TooManyHosts { needed: usize, max: u32 },
    #[error(
        "the policy's ports expand to {needed} (set, protocol, port) entries; the kernel map holds {max}"
    )]
    TooManyPorts { needed: usize, max: u32 },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("the policy has {needed} names and zones; the kernel map holds {max}")]
    TooManyNames { needed: usize, max: u32 },
}

/// Events each CPU may emit per second, and in a burst: enough to see every distinct
/// would-drop during a rollout, bounded so that a flood cannot starve the agent.
const EVENTS_PER_SEC: u32 = 200;
const EVENTS_BURST: u32 = 1000;
/// A TCP flow idle this long is decided afresh (like conntrack, but shorter: a decided
/// flow outlives the DNS answer that allowed it only while it is in use).
pub(crate) const TCP_IDLE_NS: u64 = 3600 * NS_PER_SEC;
pub(crate) const OTHER_IDLE_NS: u64 = 120 * NS_PER_SEC;
const NS_PER_SEC: u64 = 1_000_000_000;

/// The kernel's `SETTINGS` for a mode and the policy's DNS limits.
pub fn settings(mode: Mode, dns: &DnsSettings) -> Settings {
    Settings {
        mode: match mode {
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        },
        _pad: [0; 3],
        events_per_sec: EVENTS_PER_SEC,
        events_burst: EVENTS_BURST,
        _pad2: 0,
        tcp_idle_ns: TCP_IDLE_NS,
        other_idle_ns: OTHER_IDLE_NS,
        dns_min_ttl: dns.min_ttl,
        dns_max_ttl: dns.max_ttl,
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

/// The prefix length of a single address over the 128-bit key: a `HOSTS` entry.
pub const HOST_PREFIX: u32 = 128;

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
    (out.cidrs, out.hosts) = cidrs::cidr_entries(policy, &mut out.port_sets);
    if out.cidrs.len() > CIDRS_MAX_ENTRIES as usize {
        return Err(CompileError::TooManyCidrs {
            needed: out.cidrs.len(),
            max: CIDRS_MAX_ENTRIES,
        });
    }
    if out.hosts.len() > HOSTS_MAX_ENTRIES as usize {
        return Err(CompileError::TooManyHosts {
            needed: out.hosts.len(),
            max: HOSTS_MAX_ENTRIES,
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

    use egress_common::{ALL_PORTS, proto};

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
        c.cidr_entries()
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
    fn single_addresses_go_to_hosts_with_the_ports_of_their_containers() {
        let c = compiled(
            "allow:\n  - cidr: 203.0.113.0/24\n    ports: [TCP:443]\n  - cidr: 203.0.113.7/32\n    ports: [UDP:123]\n  - cidr: 203.0.113.8/31\n  - cidr: 2001:db8::/64\n    ports: [TCP:80]\n  - cidr: 2001:db8::5/128\n    ports: [TCP:22]\n  - cidr: 2001:db8::6/127\n",
        );
        let prefixes = |entries: &[CidrEntry]| {
            let mut v: Vec<String> = entries
                .iter()
                .map(|e| format!("{}/{}", Ipv6Addr::from(e.key.addr), e.prefix_len))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            prefixes(&c.hosts),
            vec!["2001:db8::5/128", "::ffff:203.0.113.7/128"]
        );
        assert_eq!(
            prefixes(&c.cidrs),
            vec![
                "2001:db8::/64",
                "2001:db8::6/127",
                "::ffff:203.0.113.0/120",
                "::ffff:203.0.113.8/127"
            ]
        );
        let v4 = lookup(&c, "203.0.113.7".parse().expect("literal")).expect("match");
        assert_eq!(ports_of(&c, v4), vec![(proto::TCP, 443), (proto::UDP, 123)]);
        let v6 = lookup(&c, "2001:db8::5".parse().expect("literal")).expect("match");
        assert_eq!(ports_of(&c, v6), vec![(proto::TCP, 22), (proto::TCP, 80)]);
        assert_eq!(c.cidr_entries().count(), 6);
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
        assert_eq!((c.cidrs.len(), c.hosts.len()), (1, 3));
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
