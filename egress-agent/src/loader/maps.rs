//! Reading and writing the maps the agent keeps: settings, resolvers, `LEARNED`, `PORTS`,
//! `LEARNED_NAMES`, and what the policy maps already hold.
use std::{collections::HashSet, net::IpAddr};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, LpmTrie, MapData},
};
use egress_common::{
    Addr, CIDRS, CidrValue, HOSTS, LEARNED, LearnedName, LearnedNameKey, LearnedValue, NAMES,
    PORTS, PortKey, RESOLVERS, SETTINGS, Settings,
    addr::{display_addr, to_key},
};

use super::{Enforcer, LoadError, cidr_write::Entries, map_err};
use crate::dns::learner::LearnedStore;

/// The agent's DNS learner reads and writes `LEARNED` and `PORTS` through the enforcer.
impl LearnedStore for Enforcer {
    fn get(&self, addr: &Addr) -> Option<LearnedValue> {
        let map = self.ebpf.map(LEARNED)?;
        let learned: HashMap<&MapData, Addr, LearnedValue> = HashMap::try_from(map).ok()?;
        learned.get(addr, 0).ok()
    }

    fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()> {
        Ok(self
            .hash::<Addr, LearnedValue>(LEARNED)?
            .insert(addr, value, 0)?)
    }

    fn remove(&mut self, addr: &Addr) -> anyhow::Result<()> {
        Ok(remove_if_present(
            self.hash::<Addr, LearnedValue>(LEARNED)?.remove(addr),
        )?)
    }

    fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
        let mut ports = self.hash::<PortKey, u8>(PORTS)?;
        for k in keys {
            ports.insert(k, 1, 0)?;
        }
        Ok(())
    }

    fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
        let mut ports = self.hash::<PortKey, u8>(PORTS)?;
        for k in keys {
            remove_if_present(ports.remove(k))?;
        }
        Ok(())
    }
}

impl Enforcer {
    pub fn write_settings(&mut self, settings: &Settings) -> Result<(), LoadError> {
        let map = self
            .ebpf
            .map_mut(SETTINGS)
            .ok_or(LoadError::MissingMap(SETTINGS))?;
        let mut array: Array<&mut MapData, Settings> =
            Array::try_from(map).map_err(map_err(SETTINGS))?;
        array
            .set(0, settings, 0)
            .map_err(map_err("writing SETTINGS"))
    }

    /// The trusted resolvers: DNS to them passes, and only their answers teach addresses.
    pub fn write_resolvers(&mut self, resolvers: &[IpAddr]) -> Result<(), LoadError> {
        let new: HashSet<Addr> = resolvers.iter().map(|r| to_key(*r)).collect();
        let old = std::mem::take(&mut self.written.resolvers);
        let mut map = self.hash::<Addr, u8>(RESOLVERS)?;
        for r in &new {
            map.insert(r, 1, 0)
                .map_err(map_err(format!("writing RESOLVERS ({})", display_addr(r))))?;
        }
        for r in old.difference(&new) {
            remove_if_present(map.remove(r)).map_err(map_err("deleting from RESOLVERS"))?;
        }
        self.written.resolvers = new;
        Ok(())
    }

    /// What the policy maps hold already (a previous agent's policy, when adopting), so that
    /// writing a policy replaces it entry by entry.
    pub(super) fn read_written(&mut self) -> Result<(), LoadError> {
        fn trie_keys<K: Pod + Eq + std::hash::Hash>(
            ebpf: &Ebpf,
            name: &'static str,
        ) -> Result<HashSet<(u32, K)>, LoadError> {
            let map = ebpf.map(name).ok_or(LoadError::MissingMap(name))?;
            let trie: LpmTrie<&MapData, K, CidrValue> =
                LpmTrie::try_from(map).map_err(map_err(name))?;
            trie.keys()
                .map(|k| k.map(|k| (k.prefix_len(), k.data())))
                .collect::<Result<_, _>>()
                .map_err(map_err(format!("reading {name}")))
        }
        let cidrs = self.ebpf.map(CIDRS).ok_or(LoadError::MissingMap(CIDRS))?;
        let hosts = self.ebpf.map(HOSTS).ok_or(LoadError::MissingMap(HOSTS))?;
        self.written.cidrs = Entries::read(cidrs, hosts)?;
        self.written.names = trie_keys(&self.ebpf, NAMES)?;
        self.written.resolvers = self
            .hash_ref::<Addr, u8>(RESOLVERS)?
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("reading RESOLVERS"))?;
        Ok(())
    }

    /// Every key in `PORTS`: a previous agent's port sets, when adopting.
    pub fn port_keys(&self) -> Result<Vec<PortKey>, LoadError> {
        self.hash_ref::<PortKey, u8>(PORTS)?
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("reading PORTS"))
    }

    /// Every entry of `LEARNED`.
    pub fn learned_entries(&self) -> Result<Vec<(Addr, LearnedValue)>, LoadError> {
        self.hash_ref::<Addr, LearnedValue>(LEARNED)?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("reading LEARNED"))
    }

    /// The pinned (address, name) records and their expiry; empty without a pin root.
    pub fn learned_names(&self) -> Result<Vec<(LearnedNameKey, LearnedName)>, LoadError> {
        let Some(pinned) = &self.pinned else {
            return Ok(Vec::new());
        };
        pinned
            .learned_names
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("reading LEARNED_NAMES"))
    }

    /// Deletes (address, name) records, then writes others (a pair that went and came
    /// back is in both); nothing without a pin root.
    pub fn update_learned_names(
        &mut self,
        delete: &[LearnedNameKey],
        put: &[(LearnedNameKey, LearnedName)],
    ) -> Result<(), LoadError> {
        let Some(pinned) = &mut self.pinned else {
            return Ok(());
        };
        for key in delete {
            remove_if_present(pinned.learned_names.remove(key))
                .map_err(map_err("deleting from LEARNED_NAMES"))?;
        }
        for (key, value) in put {
            pinned
                .learned_names
                .insert(key, value, 0)
                .map_err(map_err("writing LEARNED_NAMES"))?;
        }
        Ok(())
    }
}

/// A delete of a key that is already gone (an LRU eviction, a race) is not an error.
pub(super) fn remove_if_present(
    r: Result<(), aya::maps::MapError>,
) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
