//! Loads the kernel object, fills its maps and attaches its programs.
//!
//! The `Ebpf` value owns every program and link: dropping the [`Enforcer`] detaches them all,
//! so nothing stays in the kernel after the agent exits.
use std::{collections::HashSet, fs::File, net::IpAddr, path::Path, time::Instant};

use aya::{
    Ebpf, EbpfLoader, Pod, TestRun as _, TestRunOptions, TestRunResult,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program, SchedClassifier, TcAttachType,
        tc,
    },
};
use egress_common::{
    Addr, CIDRS, CidrKey, CidrValue, DNS_EVENTS, EVENTS, LEARNED, LearnedValue, NAMES, NameKey,
    PORTS, PortKey, RESOLVERS, SETTINGS, Settings,
};

use crate::{
    compile::Compiled,
    dns::{
        learner::{LearnedStore, to_key},
        names::NameError,
    },
    events::display_addr,
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
    /// Packets allowed, dropped (enforce mode) and audited (audit mode: passed, would have
    /// been dropped), by protocol. Each packet a program decides is in exactly one of them.
    pub allowed: ByProto,
    pub dropped: ByProto,
    pub audited: ByProto,
    pub events_lost: u64,
    pub dns_answers: u64,
    pub dns_learned: u64,
    pub dns_untrusted: u64,
    pub dns_unsolicited: u64,
    pub dns_unmatched: u64,
    pub dns_malformed: u64,
    pub dns_events_lost: u64,
}

/// One verdict's packets by protocol (`egress_common::STAT_PROTO_*`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ByProto {
    pub tcp: u64,
    pub udp: u64,
    /// ICMP and ICMPv6.
    pub icmp: u64,
    /// Other protocols, and packets whose headers could not be read.
    pub other: u64,
}

impl ByProto {
    pub fn total(&self) -> u64 {
        self.tcp + self.udp + self.icmp + self.other
    }

    /// `(protocol, packets)`, in the `STAT_PROTO_*` order, named as in `/metrics`.
    pub fn by_name(&self) -> [(&'static str, u64); 4] {
        [
            ("tcp", self.tcp),
            ("udp", self.udp),
            ("icmp", self.icmp),
            ("other", self.other),
        ]
    }
}

/// `total (tcp N udp N icmp N other N)`, for log lines.
impl std::fmt::Display for ByProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (tcp {} udp {} icmp {} other {})",
            self.total(),
            self.tcp,
            self.udp,
            self.icmp,
            self.other
        )
    }
}

/// What the policy maps hold, so that a new policy replaces it entry by entry.
#[derive(Default)]
struct Written {
    cidrs: HashSet<(u32, CidrKey)>,
    names: HashSet<(u32, NameKey)>,
    resolvers: HashSet<Addr>,
}

pub struct Enforcer {
    ebpf: Ebpf,
    written: Written,
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

/// A delete of a key that is already gone (an LRU eviction, a race) is not an error.
fn remove_if_present(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

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
        let mut enforcer = Self {
            ebpf,
            written: Written::default(),
        };
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

    /// Makes `CIDRS`, `NAMES` and `PORTS` hold a compiled policy. On a reload, each entry
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
        let previous = std::mem::take(&mut self.written.cidrs);
        let cidrs = {
            let trie = self.lpm::<CidrKey>(CIDRS)?;
            replace_entries(
                trie,
                CIDRS,
                compiled
                    .cidrs
                    .iter()
                    .map(|e| (e.prefix_len, e.key, e.port_set)),
                &previous,
            )?
        };
        self.written.cidrs = cidrs;
        Ok(())
    }

    fn lpm<K: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, CidrValue>, LoadError> {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
        LpmTrie::try_from(map).map_err(map_err(name))
    }

    fn hash<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, LoadError> {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
        HashMap::try_from(map).map_err(map_err(name))
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

    /// Every address in `LEARNED`.
    pub fn learned_addresses(&self) -> Result<Vec<Addr>, LoadError> {
        let map = self
            .ebpf
            .map(LEARNED)
            .ok_or(LoadError::MissingMap(LEARNED))?;
        let learned: HashMap<&MapData, Addr, LearnedValue> =
            HashMap::try_from(map).map_err(map_err(LEARNED))?;
        learned
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("reading LEARNED"))
    }

    pub fn stats(&self) -> Result<Stats, LoadError> {
        use egress_common::{
            STAT_ALLOWED_BASE, STAT_AUDITED_BASE, STAT_DNS_ANSWERS, STAT_DNS_EVENTS_LOST,
            STAT_DNS_LEARNED, STAT_DNS_MALFORMED, STAT_DNS_UNMATCHED, STAT_DNS_UNSOLICITED,
            STAT_DNS_UNTRUSTED, STAT_DROPPED_BASE, STAT_EVENTS_LOST, STAT_PROTO_ICMP,
            STAT_PROTO_OTHER, STAT_PROTO_TCP, STAT_PROTO_UDP, STATS,
        };
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
        let by_proto = |base: u32| -> Result<ByProto, LoadError> {
            Ok(ByProto {
                tcp: sum(base + STAT_PROTO_TCP)?,
                udp: sum(base + STAT_PROTO_UDP)?,
                icmp: sum(base + STAT_PROTO_ICMP)?,
                other: sum(base + STAT_PROTO_OTHER)?,
            })
        };
        Ok(Stats {
            allowed: by_proto(STAT_ALLOWED_BASE)?,
            dropped: by_proto(STAT_DROPPED_BASE)?,
            audited: by_proto(STAT_AUDITED_BASE)?,
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
