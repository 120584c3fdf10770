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
