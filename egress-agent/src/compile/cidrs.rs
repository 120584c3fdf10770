//! The `CIDRS` and `HOSTS` entries of a policy: its inline CIDR rules and its lists, each
//! prefix with the union of its own ports and those of every prefix that contains it.
//!
//! Sorted vectors and binary searches rather than hash maps: a million prefixes cost 24
//! bytes each here, and the ports are looked up by list, not copied into each prefix.

use std::collections::{BTreeSet, HashMap};

use egress_common::CidrKey;

use super::{CidrEntry, HOST_PREFIX, PortSets};
use crate::policy::{Policy, Ports, Prefix, Target};

/// A prefix and the index of its ports in the policy's table of them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Item {
    prefix: Prefix,
    ports: u32,
}

/// How many single addresses the policy names (a prefix named twice counts twice): what
/// `HOSTS` is sized for at load, before the policy is compiled.
pub fn single_addresses(policy: &Policy) -> usize {
    let rules = policy.rules.iter().filter(|rule| {
        matches!(&rule.target, Target::Cidr(net) if u32::from(Prefix::of(net).len) == HOST_PREFIX)
    });
    let lists = policy.lists.iter().flat_map(|list| &list.prefixes);
    rules.count()
        + lists
            .filter(|prefix| u32::from(prefix.len) == HOST_PREFIX)
            .count()
}

/// The entries of `CIDRS` and those of `HOSTS` (single addresses), each sorted by prefix
/// length then address; port sets are interned in `port_sets`. Split as they are made: a
/// split afterwards would hold a million entries twice.
pub(super) fn cidr_entries(
    policy: &Policy,
    port_sets: &mut PortSets,
) -> (Vec<CidrEntry>, Vec<CidrEntry>) {
    let mut table: Vec<&Ports> = Vec::new();
    let mut items: Vec<Item> = Vec::new();
    for rule in &policy.rules {
        if let Target::Cidr(net) = &rule.target {
            items.push(Item {
                prefix: Prefix::of(net),
                ports: table.len() as u32,
            });
            table.push(&rule.ports);
        }
    }
    for list in &policy.lists {
        let ports = table.len() as u32;
        table.push(&list.ports);
        items.reserve(list.prefixes.len());
        items.extend(list.prefixes.iter().map(|&prefix| Item { prefix, ports }));
    }
    items.sort_unstable();
    let lengths: BTreeSet<u8> = items.iter().map(|i| i.prefix.len).collect();
    // The port set id of each combination of table entries: most prefixes have their own
    // ports only, and a million of them share a handful of sets.
    let mut ids: HashMap<Vec<u32>, u32> = HashMap::new();
    let hosts = items
        .iter()
        .filter(|i| u32::from(i.prefix.len) == HOST_PREFIX)
        .count();
    let mut out = Vec::with_capacity(items.len() - hosts);
    let mut host_out = Vec::with_capacity(hosts);
    let mut from: Vec<u32> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let prefix = items[i].prefix;
        from.clear();
        // A prefix given more than once (a preset's and a list's) gets all their ports.
        while i < items.len() && items[i].prefix == prefix {
            from.push(items[i].ports);
            i += 1;
        }
        for &len in lengths.range(..prefix.len) {
            let outer = prefix.truncated(len);
            let start = items.partition_point(|item| item.prefix < outer);
            from.extend(
                items[start..]
                    .iter()
                    .take_while(|item| item.prefix == outer)
                    .map(|item| item.ports),
            );
        }
        from.sort_unstable();
        from.dedup();
        let port_set = match ids.get(from.as_slice()) {
            Some(&id) => id,
            None => {
                let ports = from[1..]
                    .iter()
                    .fold(table[from[0] as usize].clone(), |acc, &k| {
                        acc.union(table[k as usize])
                    });
                let id = port_sets.intern(&ports);
                ids.insert(from.clone(), id);
                id
            }
        };
        let entry = CidrEntry {
            prefix_len: u32::from(prefix.len),
            key: CidrKey { addr: prefix.addr },
            port_set,
        };
        if entry.prefix_len == HOST_PREFIX {
            host_out.push(entry);
        } else {
            out.push(entry);
        }
    }
    (out, host_out)
}
