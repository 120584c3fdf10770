//! Writing a compiled policy into `CIDRS`, `HOSTS`, `NAMES` and `PORTS`.
use std::collections::HashSet;

use aya::{
    Pod,
    maps::{LpmTrie, MapData, lpm_trie::Key},
};
use egress_common::{CIDRS, CidrValue, HOSTS, NAMES, NameKey, PORTS, PortKey};

use super::{Enforcer, LoadError, map_err, maps::remove_if_present};
use crate::compile::Compiled;

impl Enforcer {
    /// Makes `CIDRS`, `HOSTS`, `NAMES` and `PORTS` hold a compiled policy. On a reload, each entry
    /// is replaced in place and entries the new policy lacks are deleted last, so a
    /// destination both policies allow is allowed throughout; what only the old policy
    /// allowed is allowed until its entry goes, never less. Port sets are only added here
    /// (the learner removes the ones nothing refers to).
    pub fn write_policy(&mut self, compiled: &Compiled) -> Result<(), LoadError> {
        {
            let mut ports = self.hash::<PortKey, u8>(PORTS)?;
            for key in compiled.port_sets.entries() {
                ports.insert(key, 1, 0).map_err(map_err("writing PORTS"))?;
            }
        }
        let previous = std::mem::take(&mut self.written.names);
        let names: HashSet<(u32, NameKey)> = {
            let entries = compiled.names.entries().map_err(LoadError::Name)?;
            let trie = self.lpm::<NameKey>(NAMES)?;
            replace_entries(
                trie,
                NAMES,
                entries.iter().map(|e| (e.prefix_len, e.key, e.port_set)),
                &previous,
            )?
        };
        self.written.names = names;
        let cidrs = self.ebpf.map(CIDRS).ok_or(LoadError::MissingMap(CIDRS))?;
        let hosts = self.ebpf.map(HOSTS).ok_or(LoadError::MissingMap(HOSTS))?;
        self.written.cidrs.replace(cidrs, hosts, compiled)
    }
}

/// Writes `(prefix, key, port set)` entries into a trie, then deletes the previously written
/// entries that are not among them; returns what the trie now holds.
fn replace_entries<K: Pod + Eq + std::hash::Hash>(
    mut trie: LpmTrie<&mut MapData, K, CidrValue>,
    name: &'static str,
    entries: impl Iterator<Item = (u32, K, u32)>,
    previous: &HashSet<(u32, K)>,
) -> Result<HashSet<(u32, K)>, LoadError> {
    let mut now = HashSet::new();
    for (prefix_len, key, port_set) in entries {
        trie.insert(&Key::new(prefix_len, key), CidrValue { port_set }, 0)
            .map_err(map_err(format!("writing {name}")))?;
        now.insert((prefix_len, key));
    }
    for (prefix_len, key) in previous.difference(&now) {
        remove_if_present(trie.remove(&Key::new(*prefix_len, *key)))
            .map_err(map_err(format!("deleting from {name}")))?;
    }
    Ok(now)
}
