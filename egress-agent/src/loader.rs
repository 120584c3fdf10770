//! Loads the kernel object, fills its maps and attaches its programs.
//!
//! The `Ebpf` value owns every program and link: dropping the [`Enforcer`] detaches them all,
//! so nothing stays in the kernel after the agent exits.
use std::{fs::File, net::IpAddr, path::Path, time::Instant};

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions, TestRunResult,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program, SchedClassifier, TcAttachType,
        tc,
    },
};
use egress_common::{
    Addr, CIDRS, CidrKey, CidrValue, DNS_EVENTS, EVENTS, LEARNED, LearnedValue, NAMES, NameKey,
    PORTS, PortKey, RESOLVERS, SETTINGS, STAT_ALLOWED, STAT_AUDITED, STAT_DNS_ANSWERS,
    STAT_DNS_EVENTS_LOST, STAT_DNS_LEARNED, STAT_DNS_MALFORMED, STAT_DNS_UNMATCHED,
    STAT_DNS_UNSOLICITED, STAT_DNS_UNTRUSTED, STAT_DROPPED, STAT_EVENTS_LOST, STATS, Settings,
};

use crate::{
    compile::Compiled,
    dns::{
        learner::{LearnedStore, to_key},
        names::NameError,
    },
};

/// The kernel object built by `build.rs` from the `egress-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// Program names in the object (the functions in `egress-ebpf/src/main.rs`).
pub const EGRESS_CGROUP: &str = "egress_cgroup";
pub const INGRESS_CGROUP: &str = "ingress_cgroup";
pub const EGRESS_TC: &str = "egress_tc";
pub const INGRESS_TC: &str = "ingress_tc";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the BPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("BPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the policy's names: {0}")]
    Name(#[source] NameError),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The kernel's counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub allowed: u64,
    pub dropped: u64,
    pub audited: u64,
    pub events_lost: u64,
    pub dns_answers: u64,
    pub dns_learned: u64,
    pub dns_untrusted: u64,
    pub dns_unsolicited: u64,
    pub dns_unmatched: u64,
    pub dns_malformed: u64,
    pub dns_events_lost: u64,
}

/// `LEARNED` and `PORTS`, owned by the DNS learner.
pub struct KernelLearned {
    learned: HashMap<MapData, Addr, LearnedValue>,
    ports: HashMap<MapData, PortKey, u8>,
}

impl LearnedStore for KernelLearned {
    fn get(&self, addr: &Addr) -> Option<LearnedValue> {
        self.learned.get(addr, 0).ok()
    }

    fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()> {
        Ok(self.learned.insert(addr, value, 0)?)
    }

    fn remove(&mut self, addr: &Addr) -> anyhow::Result<()> {
        match self.learned.remove(addr) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
        for k in keys {
            self.ports.insert(k, 1, 0)?;
        }
        Ok(())
    }
}

pub struct Enforcer {
    ebpf: Ebpf,
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> LoadError {
    let what = what.into();
    move |source| LoadError::Map { what, source }
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> LoadError {
    let what = what.into();
    move |source| LoadError::Program { what, source }
}

/// A program of the object, as its concrete type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(prog_err(name))
}

impl Enforcer {
    /// Loads the object and its cgroup programs (so verifier errors surface before anything
    /// is attached) and writes the settings; nothing is attached yet. The TC programs are
    /// loaded by the first `attach_interface`: verifying them costs start-up time (about a
    /// second for the DNS parser) that a cgroup-only agent need not pay.
    /// `max_learned` sizes `LEARNED` (the policy's `dns.max_ips`).
    pub fn load(settings: &Settings, max_learned: u32) -> Result<Self, LoadError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(LEARNED, max_learned)
            .load(OBJECT)?;
        for name in [EGRESS_CGROUP, INGRESS_CGROUP] {
            let started = Instant::now();
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(format!("loading {name}")))?;
            log::debug!("{name} verified and loaded in {:?}", started.elapsed());
        }
        let mut enforcer = Self { ebpf };
        enforcer.write_settings(settings)?;
        Ok(enforcer)
    }

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

    /// Fills `CIDRS`, `NAMES` and `PORTS` with a compiled policy.
    pub fn write_policy(&mut self, compiled: &Compiled) -> Result<(), LoadError> {
        {
            let map = self
                .ebpf
                .map_mut(NAMES)
                .ok_or(LoadError::MissingMap(NAMES))?;
            let mut names: LpmTrie<&mut MapData, NameKey, CidrValue> =
                LpmTrie::try_from(map).map_err(map_err(NAMES))?;
            let entries = compiled.names.entries().map_err(LoadError::Name)?;
            for e in &entries {
                let value = CidrValue {
                    port_set: e.port_set,
                };
                names
                    .insert(&Key::new(e.prefix_len, e.key), value, 0)
                    .map_err(map_err("writing NAMES"))?;
            }
        }
        {
            let map = self
                .ebpf
                .map_mut(PORTS)
                .ok_or(LoadError::MissingMap(PORTS))?;
            let mut ports: HashMap<&mut MapData, PortKey, u8> =
                HashMap::try_from(map).map_err(map_err(PORTS))?;
            for key in compiled.port_sets.entries() {
                ports.insert(key, 1, 0).map_err(map_err("writing PORTS"))?;
            }
        }
        let map = self
            .ebpf
            .map_mut(CIDRS)
            .ok_or(LoadError::MissingMap(CIDRS))?;
        let mut cidrs: LpmTrie<&mut MapData, CidrKey, CidrValue> =
            LpmTrie::try_from(map).map_err(map_err(CIDRS))?;
        for e in &compiled.cidrs {
            let value = CidrValue {
                port_set: e.port_set,
            };
            cidrs
                .insert(&Key::new(e.prefix_len, e.key), value, 0)
                .map_err(map_err("writing CIDRS"))?;
        }
        Ok(())
    }

    /// Attaches the egress verdict and the ingress flow recorder to a cgroup v2 directory:
    /// every socket of every process below it is covered, whatever its network namespace.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<(), LoadError> {
        let cgroup = File::open(path).map_err(|source| LoadError::Cgroup {
            path: path.display().to_string(),
            source,
        })?;
        for (name, attach_type) in [
            (INGRESS_CGROUP, CgroupSkbAttachType::Ingress),
            (EGRESS_CGROUP, CgroupSkbAttachType::Egress),
        ] {
            let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
            // Links (kernel >= 5.7) are always multi-attach; `Single` is the only mode the
            // kernel accepts for them and leaves other programs on the cgroup alone.
            prog.attach(&cgroup, attach_type, CgroupAttachMode::Single)
                .map_err(prog_err(format!("attaching {name} to {}", path.display())))?;
        }
        Ok(())
    }

    /// Loads the TC programs, once.
    pub fn load_tc(&mut self) -> Result<(), LoadError> {
        for name in [EGRESS_TC, INGRESS_TC] {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            if prog.fd().is_err() {
                let started = Instant::now();
                prog.load().map_err(prog_err(format!("loading {name}")))?;
                log::debug!("{name} verified and loaded in {:?}", started.elapsed());
            }
        }
        Ok(())
    }

    /// Attaches the TC programs to an interface: TCX on kernels >= 6.6, a clsact qdisc with
    /// netlink filters before that (the qdisc is created if missing and left in place).
    pub fn attach_interface(&mut self, interface: &str) -> Result<(), LoadError> {
        self.load_tc()?;
        if let Err(e) = tc::qdisc_add_clsact(interface) {
            log::debug!(
                "clsact qdisc on {interface}: {e} (TCX needs none; an existing one is reused)"
            );
        }
        for (name, attach_type) in [
            (INGRESS_TC, TcAttachType::Ingress),
            (EGRESS_TC, TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            prog.attach(interface, attach_type)
                .map_err(prog_err(format!("attaching {name} to {interface}")))?;
        }
        Ok(())
    }

    /// The trusted resolvers: DNS to them passes, and only their answers teach addresses.
    pub fn write_resolvers(&mut self, resolvers: &[IpAddr]) -> Result<(), LoadError> {
        let map = self
            .ebpf
            .map_mut(RESOLVERS)
            .ok_or(LoadError::MissingMap(RESOLVERS))?;
        let mut map: HashMap<&mut MapData, Addr, u8> =
            HashMap::try_from(map).map_err(map_err(RESOLVERS))?;
        for r in resolvers {
            map.insert(to_key(*r), 1, 0)
                .map_err(map_err(format!("writing RESOLVERS ({r})")))?;
        }
        Ok(())
    }

    /// Takes `LEARNED` and `PORTS` for the DNS learner (after `write_policy`).
    pub fn take_learned_store(&mut self) -> Result<KernelLearned, LoadError> {
        let learned = self
            .ebpf
            .take_map(LEARNED)
            .ok_or(LoadError::MissingMap(LEARNED))?;
        let ports = self
            .ebpf
            .take_map(PORTS)
            .ok_or(LoadError::MissingMap(PORTS))?;
        Ok(KernelLearned {
            learned: HashMap::try_from(learned).map_err(map_err(LEARNED))?,
            ports: HashMap::try_from(ports).map_err(map_err(PORTS))?,
        })
    }

    /// Takes the ring buffer of answers the kernel learned from.
    pub fn take_dns_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(DNS_EVENTS)
            .ok_or(LoadError::MissingMap(DNS_EVENTS))?;
        RingBuf::try_from(map).map_err(map_err(DNS_EVENTS))
    }

    /// Runs a program once per `repeat` on a crafted packet (`BPF_PROG_TEST_RUN`): how the
    /// tests check the verdict and how the benchmarks measure its cost. `frame` starts with
    /// an Ethernet header even for the cgroup programs: the kernel strips it for them.
    pub fn test_run(
        &self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, LoadError> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        };
        match self.ebpf.program(name) {
            Some(Program::CgroupSkb(p)) => p.test_run(opts),
            Some(Program::SchedClassifier(p)) => p.test_run(opts),
            _ => return Err(LoadError::MissingProgram(name)),
        }
        .map_err(prog_err(format!("test run of {name}")))
    }

    /// Takes the event ring buffer, for the task that reads it.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(EVENTS)
            .ok_or(LoadError::MissingMap(EVENTS))?;
        RingBuf::try_from(map).map_err(map_err(EVENTS))
    }

    pub fn stats(&self) -> Result<Stats, LoadError> {
        let map = self.ebpf.map(STATS).ok_or(LoadError::MissingMap(STATS))?;
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err(STATS))?;
        let sum = |i: u32| -> Result<u64, LoadError> {
            Ok(stats
                .get(&i, 0)
                .map_err(map_err("reading STATS"))?
                .iter()
                .sum())
        };
        Ok(Stats {
            allowed: sum(STAT_ALLOWED)?,
            dropped: sum(STAT_DROPPED)?,
            audited: sum(STAT_AUDITED)?,
            events_lost: sum(STAT_EVENTS_LOST)?,
            dns_answers: sum(STAT_DNS_ANSWERS)?,
            dns_learned: sum(STAT_DNS_LEARNED)?,
            dns_untrusted: sum(STAT_DNS_UNTRUSTED)?,
            dns_unsolicited: sum(STAT_DNS_UNSOLICITED)?,
            dns_unmatched: sum(STAT_DNS_UNMATCHED)?,
            dns_malformed: sum(STAT_DNS_MALFORMED)?,
            dns_events_lost: sum(STAT_DNS_EVENTS_LOST)?,
        })
    }
}
