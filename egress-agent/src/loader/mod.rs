//! Loads the kernel object, fills its maps and attaches its programs.
//!
//! Without a pin root (tests, benchmarks) the `Ebpf` value owns every program and link, and
//! dropping the [`Enforcer`] detaches them all. With one, the shared maps and every link are
//! pinned (see [`crate::pin`]): a new enforcer reuses the pinned maps whose layout matches,
//! replaces the others (carrying their entries over where they are state), attaches its own
//! programs beside its predecessor's and only then removes the old links, so the cgroup is
//! never without a program. Programs on one cgroup all have to pass a packet, and both sets
//! read the same maps, so the overlap changes no verdict.
use std::{collections::HashSet, path::PathBuf};

mod attach;
mod cidr_write;
mod interface;
mod load;
mod maps;
mod memlock;
mod pins;
mod policy;
mod rings;
mod state;
mod stats;

pub use interface::LinkSide;
pub use state::KernelState;
pub use stats::{ByProto, PolicyEntries, Stats, read_stats};

use aya::{
    Ebpf, Pod,
    maps::{HashMap, LpmTrie, MapData},
    programs::{links::PinnedLink, tc},
};
use egress_common::{
    Addr, CIDRS, CidrValue, DNS_EVENTS, DNS_QUERIES, EVENTS, FLOWS, HOSTS, LEARNED, LearnedName,
    LearnedNameKey, NAMES, NameKey, PORTS, RATE, RESOLVERS, SETTINGS, STATS,
};

use crate::{
    dns::names::NameError,
    pin::{self, PinRoot},
};

/// The maps a pin root shares between successive agents: all the policy and state the
/// programs read and write. The per-CPU scratch maps of the DNS parser are left out, and
/// `FRAGS` (a datagram's fragments follow its first within milliseconds): each program set
/// may have its own.
pub const PINNED_MAPS: [&str; 13] = [
    CIDRS,
    HOSTS,
    PORTS,
    NAMES,
    RESOLVERS,
    SETTINGS,
    LEARNED,
    FLOWS,
    DNS_QUERIES,
    STATS,
    RATE,
    EVENTS,
    DNS_EVENTS,
];

/// `BPF_F_NO_PREALLOC`: entries are allocated as they are inserted.
const NO_PREALLOC: u32 = 1;

/// Program names in the object (the functions in `egress-ebpf/src/main.rs`).
pub const EGRESS_CGROUP: &str = "egress_cgroup";
pub const INGRESS_CGROUP: &str = "ingress_cgroup";
pub const EGRESS_TC: &str = "egress_tc";
pub const INGRESS_TC: &str = "ingress_tc";
pub const FROM_WORKLOAD_TC: &str = "from_workload_tc";

/// The messages leave out their sources' text: `{:#}` prints the chain, each once.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the BPF object")]
    Object(#[from] aya::EbpfError),
    #[error("BPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("{what}")]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{what}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the policy's names")]
    Name(#[source] NameError),
    #[error("opening cgroup {path}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the BPF object's map definitions")]
    Parse(#[from] aya_obj::ParseError),
    #[error("pinning {what}")]
    Pin {
        what: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error(transparent)]
    PinRoot(#[from] pin::PinError),
    #[error("no network interface other than loopback to run test packets on")]
    NoTestInterface,
    #[error("{what}")]
    Link {
        what: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
}

/// What the policy maps hold, so that a new policy replaces it entry by entry.
#[derive(Default)]
struct Written {
    cidrs: cidr_write::Entries,
    names: HashSet<(u32, NameKey)>,
    resolvers: HashSet<Addr>,
}

pub struct Enforcer {
    ebpf: Ebpf,
    written: Written,
    pinned: Option<Pinned>,
}

/// A pinned map of another layout that a new one replaced: why, and how many of its
/// entries the new one carried over.
pub struct Replacement {
    pub map: &'static str,
    pub why: String,
    pub carried: usize,
}

/// What an enforcer with a pin root found there and added to it.
struct Pinned {
    root: PinRoot,
    /// Shared maps whose pinned copy had another layout: this enforcer made new ones, which
    /// replace the pins once its programs are attached.
    replaced: Vec<&'static str>,
    /// Handles on the replacements among them that were taken out of the object (the ring
    /// buffers, which their reading tasks own), for pinning them.
    taken: Vec<(&'static str, MapData)>,
    /// The links this enforcer attached and pinned, with their pins' paths.
    links: Vec<(PathBuf, PinnedLink)>,
    /// TC programs attached as netlink filters (no TCX before kernel 6.6), by interface:
    /// they are no BPF links and cannot be pinned, so they are held here and removed with
    /// the enforcer (a filter outlives the process that added it).
    netlink_filters: Vec<(String, tc::SchedClassifierLink)>,
    learned_names: HashMap<MapData, LearnedNameKey, LearnedName>,
    /// Whether the maps were pinned already (an agent ran before and left its state).
    adopted: bool,
    /// The pinned maps of another layout this enforcer replaced, and what it carried over.
    replacements: Vec<Replacement>,
    /// The predecessor's `DNS_EVENTS`, when it had another size (another release): the
    /// answers its programs learned from while no agent read them are queued there.
    old_dns_events: Option<MapData>,
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
    fn lpm<K: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, CidrValue>, LoadError> {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
        LpmTrie::try_from(map).map_err(map_err(name))
    }

    fn hash_ref<K: Pod, V: Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>, LoadError> {
        let map = self.ebpf.map(name).ok_or(LoadError::MissingMap(name))?;
        HashMap::try_from(map).map_err(map_err(name))
    }

    fn hash<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, LoadError> {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
        HashMap::try_from(map).map_err(map_err(name))
    }

    pub fn policy_entries(&self) -> PolicyEntries {
        PolicyEntries {
            cidrs: self.written.cidrs.len(),
            names: self.written.names.len(),
            resolvers: self.written.resolvers.len(),
        }
    }

    /// Whether the pin root held a previous agent's maps, which this enforcer took over.
    pub fn adopted(&self) -> bool {
        self.pinned.as_ref().is_some_and(|p| p.adopted)
    }

    /// The pinned maps of another layout that this enforcer replaced.
    pub fn replacements(&self) -> &[Replacement] {
        self.pinned.as_ref().map_or(&[], |p| &p.replacements)
    }
}
