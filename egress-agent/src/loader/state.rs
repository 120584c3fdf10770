//! What the control task needs of the kernel state, as a trait: the enforcer is the one
//! implementation that runs, and the control task's logic is tested against one in memory.
use std::{net::IpAddr, path::Path};

use egress_common::{LearnedName, LearnedNameKey, Settings};

use super::{Enforcer, LoadError, PolicyEntries, Stats};
use crate::{compile::Compiled, dns::learner::LearnedStore, pin::PinRoot, record};

/// The maps the control task writes and reads (`LEARNED` and `PORTS` through
/// [`LearnedStore`]), and the pinned record of the policy they hold.
pub trait KernelState: LearnedStore {
    fn write_policy(&mut self, compiled: &Compiled) -> Result<(), LoadError>;
    fn write_resolvers(&mut self, resolvers: &[IpAddr]) -> Result<(), LoadError>;
    fn write_settings(&mut self, settings: &Settings) -> Result<(), LoadError>;
    fn update_learned_names(
        &mut self,
        delete: &[LearnedNameKey],
        put: &[(LearnedNameKey, LearnedName)],
    ) -> Result<(), LoadError>;
    /// Records the policy file's bytes beside the maps (see `record`).
    fn record_policy(&mut self, pins: &PinRoot, config: &Path, bytes: &[u8]) -> anyhow::Result<()>;
    fn policy_entries(&self) -> PolicyEntries;
    fn stats(&self) -> Result<Stats, LoadError>;
}

impl KernelState for Enforcer {
    fn write_policy(&mut self, compiled: &Compiled) -> Result<(), LoadError> {
        Enforcer::write_policy(self, compiled)
    }

    fn write_resolvers(&mut self, resolvers: &[IpAddr]) -> Result<(), LoadError> {
        Enforcer::write_resolvers(self, resolvers)
    }

    fn write_settings(&mut self, settings: &Settings) -> Result<(), LoadError> {
        Enforcer::write_settings(self, settings)
    }

    fn update_learned_names(
        &mut self,
        delete: &[LearnedNameKey],
        put: &[(LearnedNameKey, LearnedName)],
    ) -> Result<(), LoadError> {
        Enforcer::update_learned_names(self, delete, put)
    }

    fn record_policy(&mut self, pins: &PinRoot, config: &Path, bytes: &[u8]) -> anyhow::Result<()> {
        record::write(pins, config, bytes)
    }

    fn policy_entries(&self) -> PolicyEntries {
        Enforcer::policy_entries(self)
    }

    fn stats(&self) -> Result<Stats, LoadError> {
        Enforcer::stats(self)
    }
}
