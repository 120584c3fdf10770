//! Interned port sets, shared by the compiled policy, the name table and the learner.
use std::collections::{BTreeSet, HashMap, HashSet};

use egress_common::{ALL_PORTS, PortKey, proto};

use crate::policy::{Ports, Proto};

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
