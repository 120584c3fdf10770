//! Taking over what a previous agent left pinned: its port sets, which its learned addresses
//! still refer to, and its record of the names those addresses were learned through.
//!
//! A new agent numbers its own port sets after the old ones (see [`PortSets::after`]) and
//! repaints the policy and every address it has a record for with them. An address the
//! kernel learned while no agent ran has no record yet (its answer waits in the ring buffer)
//! and keeps its old set until its TTL ends; the old sets leave `PORTS` when nothing
//! refers to them any more.
use std::collections::{BTreeMap, HashMap};

use egress_common::{Addr, LearnedValue, PortKey};

use crate::port_sets::PortSets;

/// A previous agent's port sets that learned addresses still refer to, with the time the
/// last of those expires (boot-time ns).
#[derive(Debug, Default)]
pub struct LegacySets {
    sets: BTreeMap<u32, (Vec<PortKey>, u64)>,
}

impl LegacySets {
    /// Sorts the pinned `PORTS` keys into the sets `learned` entries still refer to (kept)
    /// and the rest (returned, to delete once the new policy is written). Returns the
    /// registry the new agent compiles into.
    pub fn new(
        ports: Vec<PortKey>,
        learned: &[(Addr, LearnedValue)],
        now: u64,
    ) -> (Self, PortSets, Vec<PortKey>) {
        let registry = PortSets::after(ports.iter().map(|k| k.port_set));
        let mut until: HashMap<u32, u64> = HashMap::new();
        for (_, v) in learned.iter().filter(|(_, v)| v.expires_ns > now) {
            for id in [v.port_set, v.extra_set] {
                let at = until.entry(id).or_default();
                *at = (*at).max(v.expires_ns);
            }
        }
        let mut sets: BTreeMap<u32, (Vec<PortKey>, u64)> = BTreeMap::new();
        let mut unused = Vec::new();
        for key in ports {
            match until.get(&key.port_set) {
                Some(expires) => sets
                    .entry(key.port_set)
                    .or_insert((Vec::new(), *expires))
                    .0
                    .push(key),
                None => unused.push(key),
            }
        }
        (Self { sets }, registry, unused)
    }

    /// The keys of the sets whose last referring address has expired by `now`.
    pub fn expire(&mut self, now: u64) -> Vec<PortKey> {
        let due: Vec<u32> = self
            .sets
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(id, _)| *id)
            .collect();
        due.into_iter()
            .flat_map(|id| {
                self.sets
                    .remove(&id)
                    .map(|(keys, _)| keys)
                    .unwrap_or_default()
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use egress_common::{NO_PORT_SET, proto};

    use super::*;

    fn learned(port_set: u32, extra_set: u32, expires_ns: u64) -> (Addr, LearnedValue) {
        (
            [0; 16],
            LearnedValue {
                port_set,
                extra_set,
                expires_ns,
            },
        )
    }

    #[test]
    fn sets_a_live_address_refers_to_stay_until_it_expires_and_the_rest_go_at_once() {
        let ports = vec![
            PortKey::new(0, proto::TCP, 443),
            PortKey::new(1, proto::TCP, 80),
            PortKey::new(1, proto::UDP, 53),
            PortKey::new(4, proto::TCP, 22),
            PortKey::new(7, proto::TCP, 8443),
        ];
        let entries = [
            learned(1, NO_PORT_SET, 500),
            learned(4, 7, 300),
            learned(0, NO_PORT_SET, 50), // expired: refers to nothing
        ];
        let (mut legacy, mut registry, unused) = LegacySets::new(ports, &entries, 100);
        assert_eq!(unused, vec![PortKey::new(0, proto::TCP, 443)]);
        assert_eq!(legacy.len(), 3);
        // New ids never collide with the old ones.
        assert_eq!(registry.intern(&crate::policy::Ports::Some(Vec::new())), 8);
        assert!(legacy.expire(299).is_empty());
        let mut gone = legacy.expire(300);
        gone.sort();
        assert_eq!(
            gone,
            vec![
                PortKey::new(4, proto::TCP, 22),
                PortKey::new(7, proto::TCP, 8443)
            ]
        );
        assert_eq!(legacy.expire(500).len(), 2);
        assert!(legacy.is_empty());
    }
}
