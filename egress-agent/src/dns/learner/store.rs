//! What the learner needs of the kernel maps.
use egress_common::{Addr, LearnedValue, PortKey};

/// What the learner needs of the kernel maps (a trait, so the logic is tested without BPF).
pub trait LearnedStore {
    fn get(&self, addr: &Addr) -> Option<LearnedValue>;
    fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()>;
    fn remove(&mut self, addr: &Addr) -> anyhow::Result<()>;
    fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()>;
    fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()>;
}

/// The kernel maps in memory, for the tests of the learner and of its callers.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::{HashMap, HashSet};

    use egress_common::{Addr, LearnedNameKey, LearnedValue, PortKey};

    use super::LearnedStore;
    use crate::dns::learner::Learner;

    /// The kernel maps, in memory.
    #[derive(Default)]
    pub(crate) struct FakeStore {
        pub(crate) learned: HashMap<Addr, LearnedValue>,
        pub(crate) ports: HashSet<PortKey>,
        /// `LEARNED_NAMES`, which the agent's control task writes.
        pub(crate) names: HashMap<LearnedNameKey, u64>,
    }

    impl FakeStore {
        /// Writes the journal's changes as the control task does; returns whether that was
        /// all of them.
        pub(crate) fn flush(&mut self, l: &mut Learner, budget: usize) -> bool {
            let changes = l.journal_changes(budget);
            for key in &changes.delete {
                self.names.remove(key);
            }
            for (key, record) in &changes.put {
                self.names.insert(*key, record.expires_ns);
            }
            changes.complete
        }
    }

    impl LearnedStore for FakeStore {
        fn get(&self, addr: &Addr) -> Option<LearnedValue> {
            self.learned.get(addr).copied()
        }
        fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()> {
            self.learned.insert(*addr, *value);
            Ok(())
        }
        fn remove(&mut self, addr: &Addr) -> anyhow::Result<()> {
            self.learned.remove(addr);
            Ok(())
        }
        fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
            self.ports.extend(keys);
            Ok(())
        }
        fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
            for k in keys {
                self.ports.remove(k);
            }
            Ok(())
        }
    }
}
