//! Loads the kernel object, fills its maps and attaches its programs.
//!
//! Without a pin root (tests, benchmarks) the `Ebpf` value owns every program and link, and
//! dropping the [`Enforcer`] detaches them all. With one, the shared maps and every link are
//! pinned (see [`crate::pin`]): a new enforcer reuses the pinned maps whose layout matches,
//! replaces the others (carrying their entries over where they are state), attaches its own
//! programs beside its predecessor's and only then removes the old links, so the cgroup is
//! never without a program. Programs on one cgroup all have to pass a packet, and both sets
//! read the same maps, so the overlap changes no verdict.
use std::{
    collections::HashSet,
    fs::File,
    net::IpAddr,
    os::fd::AsFd as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Instant,
};

mod interface;
mod memlock;

pub use interface::LinkSide;

use aya::{
    Ebpf, EbpfLoader, Pod, TestRun as _, TestRunOptions, TestRunResult,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapInfo, MapType, PerCpuArray, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program, ProgramError, ProgramInfo,
        links::{FdLink, PinnedLink},
        tc,
    },
    sys::SyscallError,
};
use egress_common::{
    Addr, CIDRS, CidrKey, CidrValue, DNS_EVENTS, DNS_QUERIES, EVENTS, FLOWS, FlowKey, FlowValue,
    LEARNED, LEARNED_NAMES, LearnedName, LearnedNameKey, LearnedValue, NAMES, NameKey, PORTS,
    PortKey, QueryKey, QueryValue, RATE, RESOLVERS, SETTINGS, STAT_ALLOWED_BASE, STAT_AUDITED_BASE,
    STAT_DNS_ANSWERS, STAT_DNS_EVENTS_LOST, STAT_DNS_LEARNED, STAT_DNS_MALFORMED,
    STAT_DNS_UNMATCHED, STAT_DNS_UNSOLICITED, STAT_DNS_UNTRUSTED, STAT_DROPPED_BASE,
    STAT_EVENTS_LOST, STAT_PROTO_ICMP, STAT_PROTO_OTHER, STAT_PROTO_TCP, STAT_PROTO_UDP, STATS,
    Settings,
};

use crate::{
    compile::Compiled,
    dns::{
        learner::{LearnedStore, to_key},
        names::NameError,
    },
    events::display_addr,
    pin::{self, PinRoot},
};

/// The kernel object built by `build.rs` from the `egress-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The maps a pin root shares between successive agents: all the policy and state the
/// programs read and write. The per-CPU scratch maps of the DNS parser are left out, and
/// `FRAGS` (a datagram's fragments follow its first within milliseconds): each program set
/// may have its own.
pub const PINNED_MAPS: [&str; 12] = [
    CIDRS,
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

/// How many entries the policy maps hold, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PolicyEntries {
    pub cidrs: usize,
    pub names: usize,
    pub resolvers: usize,
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
    pinned: Option<Pinned>,
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
    /// The predecessor's `DNS_EVENTS`, when it had another size (another release): the
    /// answers its programs learned from while no agent read them are queued there.
    old_dns_events: Option<MapData>,
}

/// Why a pinned map cannot serve this agent's programs, if it cannot.
fn layout_difference(
    pinned: &MapInfo,
    def: &aya_obj::Map,
    max_entries: u32,
) -> Result<Option<String>, LoadError> {
    let wanted = aya_obj::generated::bpf_map_type::try_from(def.map_type())
        .ok()
        .and_then(|t| MapType::try_from(t).ok());
    let have = pinned
        .map_type()
        .map_err(map_err("reading a pinned map's type"))?;
    Ok(if wanted != Some(have) {
        Some(format!("type {have:?}, wanted {wanted:?}"))
    } else if (pinned.key_size(), pinned.value_size()) != (def.key_size(), def.value_size()) {
        Some(format!(
            "key/value {}/{} bytes, wanted {}/{}",
            pinned.key_size(),
            pinned.value_size(),
            def.key_size(),
            def.value_size()
        ))
    } else if pinned.max_entries() != max_entries {
        Some(format!(
            "{} entries, wanted {max_entries}",
            pinned.max_entries()
        ))
    } else if pinned.map_flags() != def.map_flags() {
        Some(format!(
            "flags {:#x}, wanted {:#x}",
            pinned.map_flags(),
            def.map_flags()
        ))
    } else {
        None
    })
}

/// Copies the entries of a replaced state map into its successor; an LRU successor that is
/// smaller keeps the most recently copied.
fn carry_over<K: Pod, V: Pod>(
    from: MapData,
    to: &mut Map,
    name: &'static str,
) -> Result<usize, LoadError> {
    let info = from.info().map_err(map_err(name))?;
    if (info.key_size(), info.value_size()) != (size_of::<K>() as u32, size_of::<V>() as u32) {
        // Entries of another layout mean something else: start the replacement empty.
        log::warn!("{name}: pinned entries have another layout; not carried over");
        return Ok(0);
    }
    let old: HashMap<MapData, K, V> =
        HashMap::try_from(Map::HashMap(from)).map_err(map_err(name))?;
    let mut new: HashMap<&mut MapData, K, V> = HashMap::try_from(to).map_err(map_err(name))?;
    let mut copied = 0;
    for entry in old.iter() {
        let Ok((k, v)) = entry else { continue };
        new.insert(k, v, 0)
            .map_err(map_err(format!("carrying {name} over")))?;
        copied += 1;
    }
    Ok(copied)
}

/// The global that [`Enforcer::load_for_test_run`] sets (see `egress-ebpf/src/packet.rs`).
const TEST_RUN: &str = "TEST_RUN";

/// A `struct __sk_buff` for `BPF_PROG_TEST_RUN` that puts the packet on a real interface:
/// by default the kernel puts it on loopback, which the programs wave through. The first
/// non-loopback interface of this network namespace serves; nothing is sent on it.
fn test_run_context() -> Option<Vec<u8>> {
    let ifindex = std::fs::read_dir("/sys/class/net")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|dev| std::fs::read_to_string(dev.path().join("ifindex")).ok())
        .filter_map(|index| index.trim().parse::<u32>().ok())
        .filter(|index| *index > 1)
        .min()?;
    let mut ctx = vec![0; SK_BUFF_SIZE];
    ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    Some(ctx)
}

/// `struct __sk_buff` (UAPI, stable): its size in 6.x (a kernel with a smaller one takes a
/// zero tail) and the offset of `ifindex`, after len, pkt_type, mark, queue_mapping,
/// protocol, vlan_present, vlan_tci, vlan_proto, priority and ingress_ifindex.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_IFINDEX: usize = 40;

/// `FLOWS` values before they had an owner: last seen (8 bytes), state, padding.
type FlowValueV0 = [u8; 16];

/// Carries `FLOWS` over, from this release's layout or from the one before owners (see
/// `FlowValueV0`): those flows keep their state with owner 0, any socket, as they had.
fn carry_over_flows(from: MapData, to: &mut Map) -> Result<usize, LoadError> {
    let info = from.info().map_err(map_err(FLOWS))?;
    if info.value_size() as usize != size_of::<FlowValueV0>() {
        return carry_over::<FlowKey, FlowValue>(from, to, FLOWS);
    }
    let old: HashMap<MapData, FlowKey, FlowValueV0> =
        HashMap::try_from(Map::LruHashMap(from)).map_err(map_err(FLOWS))?;
    let mut new: HashMap<&mut MapData, FlowKey, FlowValue> =
        HashMap::try_from(to).map_err(map_err(FLOWS))?;
    let mut copied = 0;
    for entry in old.iter() {
        let Ok((key, v)) = entry else { continue };
        let mut last_seen = [0; 8];
        last_seen.copy_from_slice(&v[..8]);
        let value = FlowValue {
            last_seen_ns: u64::from_ne_bytes(last_seen),
            owner: 0,
            state: v[8],
            _pad: [0; 7],
        };
        new.insert(key, value, 0)
            .map_err(map_err("carrying FLOWS over"))?;
        copied += 1;
    }
    Ok(copied)
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

/// Logs (debug) a program's load time and how many instructions the verifier processed
/// (kernels >= 5.16 say): the figure to watch when changing the kernel side.
fn log_loaded(name: &str, started: Instant, info: Result<ProgramInfo, ProgramError>) {
    let processed = info
        .ok()
        .and_then(|i| i.verified_instruction_count())
        .map_or_else(|| "unknown".into(), |n| n.to_string());
    log::debug!(
        "{name} verified and loaded in {:?} ({processed} instructions processed)",
        started.elapsed()
    );
}

/// Loads the named cgroup programs, each on a thread of its own: verification is most of
/// the agent's start-up time, and the kernel verifies programs independently.
fn load_in_parallel(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), LoadError> {
    let programs: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| names.contains(name))
        .collect();
    if let Some(missing) = names
        .iter()
        .find(|name| !programs.iter().any(|(n, _)| n == *name))
    {
        return Err(LoadError::MissingProgram(missing));
    }
    std::thread::scope(|scope| {
        let loads: Vec<_> = programs
            .into_iter()
            .map(|(name, program)| {
                scope.spawn(move || -> Result<(), LoadError> {
                    let started = Instant::now();
                    let prog: &mut CgroupSkb = program
                        .try_into()
                        .map_err(prog_err(format!("{name} is no cgroup_skb program")))?;
                    prog.load().map_err(prog_err(format!("loading {name}")))?;
                    log_loaded(name, started, prog.info());
                    Ok(())
                })
            })
            .collect();
        loads
            .into_iter()
            .try_for_each(|load| load.join().expect("a program load panicked"))
    })
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

/// `LEARNED_NAMES`, pinned: the one a previous agent left if it has the size this one needs,
/// else a new one holding the old one's entries. Two records per learned address on average
/// (an address is usually learned through one or two names); entries are allocated as
/// written, so the size costs nothing until used.
fn learned_names_map(
    pins: &PinRoot,
    max_learned: u32,
) -> Result<HashMap<MapData, LearnedNameKey, LearnedName>, LoadError> {
    let path = pins.map_path(LEARNED_NAMES);
    let max_entries = max_learned.saturating_mul(2);
    let old = match MapData::from_pin(&path) {
        Ok(data) => {
            let info = data.info().map_err(map_err("reading LEARNED_NAMES"))?;
            let fits = (info.key_size(), info.value_size(), info.max_entries())
                == (
                    size_of::<LearnedNameKey>() as u32,
                    size_of::<LearnedName>() as u32,
                    max_entries,
                );
            if fits {
                return HashMap::try_from(Map::HashMap(data)).map_err(map_err(LEARNED_NAMES));
            }
            Some(data)
        }
        Err(_) => None,
    };
    let mut new: HashMap<MapData, LearnedNameKey, LearnedName> =
        HashMap::create(max_entries, NO_PREALLOC).map_err(map_err("creating LEARNED_NAMES"))?;
    if let Some(old) = old {
        if let Ok(old) =
            HashMap::<MapData, LearnedNameKey, LearnedName>::try_from(Map::HashMap(old))
        {
            for (k, v) in old.iter().flatten() {
                new.insert(k, v, 0)
                    .map_err(map_err("carrying LEARNED_NAMES over"))?;
            }
        }
        pin::remove_file(&path)?;
    }
    new.pin(&path).map_err(|source| LoadError::Pin {
        what: path.display().to_string(),
        source,
    })?;
    let data = MapData::from_pin(&path).map_err(map_err("opening LEARNED_NAMES"))?;
    HashMap::try_from(Map::HashMap(data)).map_err(map_err(LEARNED_NAMES))
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
    /// `max_learned` sizes `LEARNED` (the policy's `dns.max_ips`). With `pins` (prepared and
    /// locked), the shared maps are pinned there or taken over from a previous agent (see the
    /// module's doc).
    pub fn load(
        settings: &Settings,
        max_learned: u32,
        pins: Option<&PinRoot>,
    ) -> Result<Self, LoadError> {
        Self::load_object(settings, max_learned, pins, false)
    }

    /// Loads the object for [`Enforcer::test_run`] (the kernel tests and the benchmarks),
    /// never to attach. `BPF_PROG_TEST_RUN` gives each run a dummy socket of its own, so the
    /// programs are told (`TEST_RUN`) to see every packet as socketless, as the TC programs
    /// see forwarded packets: a query and its answer, or a flow's two directions, are then
    /// the same "socket" across runs.
    pub fn load_for_test_run(settings: &Settings, max_learned: u32) -> Result<Self, LoadError> {
        Self::load_object(settings, max_learned, None, true)
    }

    fn load_object(
        settings: &Settings,
        max_learned: u32,
        pins: Option<&PinRoot>,
        test_run: bool,
    ) -> Result<Self, LoadError> {
        memlock::lift_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(LEARNED, max_learned);
        if test_run {
            loader.override_global(TEST_RUN, &1u8, true);
        }
        crate::kernel_log::configure(&mut loader);
        let mut replaced: Vec<(&'static str, MapData)> = Vec::new();
        let mut adopted = false;
        if let Some(pins) = pins {
            let object = aya_obj::Object::parse(OBJECT)?;
            for name in PINNED_MAPS {
                let def = object.maps.get(name).ok_or(LoadError::MissingMap(name))?;
                let max_entries = if name == LEARNED {
                    max_learned
                } else {
                    def.max_entries()
                };
                let path = pins.map_path(name);
                if path.exists() {
                    adopted = true;
                    let data = MapData::from_pin(&path)
                        .map_err(map_err(format!("opening {}", path.display())))?;
                    let info = data.info().map_err(map_err(format!("reading {name}")))?;
                    if let Some(why) = layout_difference(&info, def, max_entries)? {
                        log::warn!("pinned map {name} differs ({why}): replacing it");
                        replaced.push((name, data));
                        continue;
                    }
                }
                loader.map_pin_path(name, path);
            }
        }
        let started = Instant::now();
        let mut ebpf = loader.load(OBJECT)?;
        log::debug!("maps created or opened in {:?}", started.elapsed());
        let mut replaced_names = Vec::new();
        let mut old_dns_events = None;
        for (name, old) in replaced {
            replaced_names.push(name);
            let new = ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
            let copied = match name {
                LEARNED => carry_over::<Addr, LearnedValue>(old, new, name)?,
                FLOWS => carry_over_flows(old, new)?,
                DNS_QUERIES => carry_over::<QueryKey, QueryValue>(old, new, name)?,
                DNS_EVENTS => {
                    old_dns_events = Some(old);
                    0
                }
                _ => 0,
            };
            if copied > 0 {
                log::info!("carried {copied} entries of {name} over to its replacement");
            }
        }
        load_in_parallel(&mut ebpf, &[EGRESS_CGROUP, INGRESS_CGROUP])?;
        crate::kernel_log::start(&mut ebpf);
        let pinned = match pins {
            Some(pins) => Some(Pinned {
                root: pins.clone(),
                replaced: replaced_names,
                taken: Vec::new(),
                links: Vec::new(),
                netlink_filters: Vec::new(),
                learned_names: learned_names_map(pins, max_learned)?,
                adopted,
                old_dns_events,
            }),
            None => None,
        };
        let mut enforcer = Self {
            ebpf,
            written: Written::default(),
            pinned,
        };
        enforcer.read_written()?;
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

    /// Attaches the egress verdict and the ingress flow recorder to a cgroup v2 directory:
    /// every socket of every process below it is covered, whatever its network namespace.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<(), LoadError> {
        let cgroup_err = |source| LoadError::Cgroup {
            path: path.display().to_string(),
            source,
        };
        let cgroup = File::open(path).map_err(cgroup_err)?;
        let inode = cgroup.metadata().map_err(cgroup_err)?.ino();
        for (name, attach_type, direction) in [
            (INGRESS_CGROUP, CgroupSkbAttachType::Ingress, "ingress"),
            (EGRESS_CGROUP, CgroupSkbAttachType::Egress, "egress"),
        ] {
            let what = || format!("attaching {name} to {}", path.display());
            let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
            // Links (kernel >= 5.7) are always multi-attach; `Single` is the only mode the
            // kernel accepts for them and leaves other programs on the cgroup alone.
            let id = prog
                .attach(&cgroup, attach_type, CgroupAttachMode::Single)
                .map_err(prog_err(what()))?;
            if self.pinned.is_some() {
                let link = prog.take_link(id).map_err(prog_err(what()))?;
                let link = FdLink::try_from(link).map_err(|source| LoadError::Link {
                    what: what(),
                    source,
                })?;
                self.pin_link(link, &format!("cgroup-{inode}-{direction}"))?;
            }
        }
        Ok(())
    }

    /// Pins a link this enforcer attached, beside any its predecessor left.
    fn pin_link(&mut self, link: FdLink, point: &str) -> Result<(), LoadError> {
        let Some(pinned) = &mut self.pinned else {
            return Ok(());
        };
        let id = link
            .info()
            .map_err(|source| LoadError::Link {
                what: format!("reading the link of {point}"),
                source,
            })?
            .id();
        let path = pinned.root.link_path(point, id);
        let link = link.pin(&path).map_err(|source| LoadError::Pin {
            what: path.display().to_string(),
            source,
        })?;
        pinned.links.push((path, link));
        Ok(())
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

    /// Once this enforcer's links are attached: removes every other link pin (detaching the
    /// predecessor's programs), other layout versions, and puts this enforcer's replacement
    /// maps where the old pins were. Returns the links and the version directories removed.
    pub fn retire_predecessors(&mut self) -> Result<(Vec<pin::LinkPin>, Vec<PathBuf>), LoadError> {
        let Some(pinned) = &mut self.pinned else {
            return Ok(Default::default());
        };
        let ours: HashSet<&Path> = pinned.links.iter().map(|(p, _)| p.as_path()).collect();
        let mut retired = Vec::new();
        for link in pinned.root.links()? {
            if !ours.contains(link.path.as_path()) {
                pin::remove_file(&link.path)?;
                retired.push(link);
            }
        }
        let versions = pinned.root.remove_other_versions()?;
        for name in std::mem::take(&mut pinned.replaced) {
            let path = pinned.root.map_path(name);
            pin::remove_file(&path)?;
            let pinning = |source| LoadError::Pin {
                what: path.display().to_string(),
                source,
            };
            match pinned.taken.iter().find(|(n, _)| *n == name) {
                Some((_, taken)) => taken.pin(&path).map_err(pinning)?,
                None => {
                    let map = self.ebpf.map(name).ok_or(LoadError::MissingMap(name))?;
                    map.pin(&path).map_err(pinning)?;
                }
            }
        }
        pinned.taken.clear();
        Ok((retired, versions))
    }

    /// Ends this enforcer. `keep` leaves every pin (and so every attachment) in place for the
    /// next agent; otherwise the links are unpinned, which detaches the programs, and the pin
    /// root is removed.
    pub fn release(mut self, keep: bool) -> Result<(), LoadError> {
        let Some(pinned) = self.pinned.take() else {
            return Ok(());
        };
        if keep {
            return Ok(());
        }
        for (path, link) in pinned.links {
            link.unpin()
                .map_err(|error| LoadError::PinRoot(pin::PinError::Io { path, error }))?;
        }
        pinned.root.remove_all().complete()?;
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
        self.take_ring(DNS_EVENTS)
    }

    /// Takes a ring buffer out of the object, for the task that reads it. If it replaces a
    /// pinned one, a second handle stays here: `retire_predecessors` pins it in the old
    /// one's place.
    fn take_ring(&mut self, name: &'static str) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(LoadError::MissingMap(name))?;
        let ring = RingBuf::try_from(map).map_err(map_err(name))?;
        if let Some(pinned) = &mut self.pinned
            && pinned.replaced.contains(&name)
        {
            let fd = ring
                .as_fd()
                .try_clone_to_owned()
                .map_err(|io_error| LoadError::Map {
                    what: format!("duplicating the fd of {name}"),
                    source: SyscallError {
                        call: "fcntl(F_DUPFD_CLOEXEC)",
                        io_error,
                    }
                    .into(),
                })?;
            let handle = MapData::from_fd(fd).map_err(map_err(name))?;
            pinned.taken.push((name, handle));
        }
        Ok(ring)
    }

    /// The predecessor's ring buffer of answers, when this enforcer replaced it (see
    /// `Pinned::old_dns_events`); to be drained once `retire_predecessors` has detached
    /// the programs that wrote to it.
    pub fn take_old_dns_events(&mut self) -> Result<Option<RingBuf<MapData>>, LoadError> {
        let Some(old) = self.pinned.as_mut().and_then(|p| p.old_dns_events.take()) else {
            return Ok(None);
        };
        RingBuf::try_from(Map::RingBuf(old))
            .map(Some)
            .map_err(map_err(DNS_EVENTS))
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
        static CONTEXT: OnceLock<Option<Vec<u8>>> = OnceLock::new();
        // Built once: reading sysfs between runs would also evict what a run finds cached.
        let ctx = CONTEXT
            .get_or_init(test_run_context)
            .as_deref()
            .ok_or(LoadError::NoTestInterface)?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(ctx),
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
        self.take_ring(EVENTS)
    }

    /// What the policy maps hold already (a previous agent's policy, when adopting), so that
    /// writing a policy replaces it entry by entry.
    fn read_written(&mut self) -> Result<(), LoadError> {
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
        self.written.cidrs = trie_keys(&self.ebpf, CIDRS)?;
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

    pub fn stats(&self) -> Result<Stats, LoadError> {
        read_stats(self.ebpf.map(STATS).ok_or(LoadError::MissingMap(STATS))?)
    }
}

/// The counters of a `STATS` map, this agent's or a pinned one.
pub fn read_stats(map: &Map) -> Result<Stats, LoadError> {
    let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(STATS))?;
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
