//! The maps, sized and typed as documented in `egress_common::maps`.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
};
use egress_common::{
    Addr, CIDRS_MAX_ENTRIES, CidrKey, CidrValue, DNS_EVENTS_BYTES, DNS_QUERIES_MAX_ENTRIES,
    DnsEvent, EVENTS_BYTES, FLOWS_MAX_ENTRIES, FRAGS_MAX_ENTRIES, FlowKey, FlowValue, FragKey,
    HOSTS_MAX_ENTRIES, LEARNED_MAX_ENTRIES, LearnedValue, NAME_MAX_LABELS, NAMES_MAX_ENTRIES,
    NameKey, PORTS_MAX_ENTRIES, PortKey, QueryKey, QueryValue, RESOLVERS_MAX_ENTRIES, RateState,
    STATS_LEN, Settings,
};

#[map]
pub static CIDRS: LpmTrie<CidrKey, CidrValue> = LpmTrie::with_max_entries(CIDRS_MAX_ENTRIES, 0);

/// `BPF_F_NO_PREALLOC`: see `egress_common::HOSTS_MAX_ENTRIES`.
#[map]
pub static HOSTS: aya_ebpf::maps::HashMap<Addr, CidrValue> =
    aya_ebpf::maps::HashMap::with_max_entries(HOSTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
pub static PORTS: aya_ebpf::maps::HashMap<PortKey, u8> =
    aya_ebpf::maps::HashMap::with_max_entries(PORTS_MAX_ENTRIES, 0);

#[map]
pub static LEARNED: LruHashMap<Addr, LearnedValue> =
    LruHashMap::with_max_entries(LEARNED_MAX_ENTRIES, 0);

#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);

#[map]
pub static FRAGS: LruHashMap<FragKey, u8> = LruHashMap::with_max_entries(FRAGS_MAX_ENTRIES, 0);

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static RATE: PerCpuArray<RateState> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[map]
pub static RESOLVERS: aya_ebpf::maps::HashMap<Addr, u8> =
    aya_ebpf::maps::HashMap::with_max_entries(RESOLVERS_MAX_ENTRIES, 0);

#[map]
pub static NAMES: LpmTrie<NameKey, CidrValue> = LpmTrie::with_max_entries(NAMES_MAX_ENTRIES, 0);

#[map]
pub static DNS_QUERIES: LruHashMap<QueryKey, QueryValue> =
    LruHashMap::with_max_entries(DNS_QUERIES_MAX_ENTRIES, 0);

#[map]
pub static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(DNS_EVENTS_BYTES, 0);

/// Per-CPU room for one DNS answer (too large for the 512-byte stack); it is filled in
/// place and then copied into `DNS_EVENTS`. The ingress programs' own: see `DNS_QUERY`.
#[map]
pub static DNS_SCRATCH: PerCpuArray<DnsEvent> = PerCpuArray::with_max_entries(1, 0);

/// What the question walk finds out about a name (see `dns::question`).
#[repr(C)]
pub struct NameWork {
    /// Offsets of the name's last labels (a ring indexed by label number).
    pub starts: [u16; NAME_MAX_LABELS],
    /// How many labels the name has, and the offset of its root label.
    pub labels: u32,
    pub end: u32,
    pub hash: u64,
}

/// Working memory of the answer parser, too large for the 512-byte stack next to everything
/// else. Kernel-only: the agent never reads it.
#[repr(C)]
pub struct DnsWork {
    pub name: NameWork,
    /// The key `NAMES` is probed with, built label by label (see `dns::reversed_name`).
    pub key: Key<NameKey>,
    /// Labels of the name not yet copied, those of them still to copy, bytes left of the
    /// label being copied, where they are, and the key bytes written.
    pub label: u32,
    pub kept: u32,
    pub left: u32,
    pub from: u32,
    pub written: u32,
    /// The answer's (resolver, client, port, proto) and id: the query it must match.
    pub query: QueryKey,
    /// The answer walk: records walked and the offset reached.
    pub records: u32,
    pub pos: u32,
    /// A new `LEARNED` entry.
    pub value: LearnedValue,
}

#[map]
pub static DNS_WORK: PerCpuArray<DnsWork> = PerCpuArray::with_max_entries(1, 0);

/// Bytes of a query the egress programs read: the header and the longest name fit.
pub const QUERY_BYTES: usize = 512;

/// A query being parsed. Apart from the answer's scratch maps: a packet received on this
/// CPU (softirq) can interrupt a program parsing a query that a process sends.
#[repr(C)]
pub struct QueryWork {
    pub name: NameWork,
    pub len: u32,
    pub _pad: u32,
    pub msg: [u8; QUERY_BYTES],
}

#[map]
pub static DNS_QUERY: PerCpuArray<QueryWork> = PerCpuArray::with_max_entries(1, 0);
