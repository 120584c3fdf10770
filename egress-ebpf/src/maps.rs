//! The maps, sized and typed as documented in `egress_common::maps`.
use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use egress_common::{
    Addr, CIDRS_MAX_ENTRIES, CidrKey, CidrValue, EVENTS_BYTES, FLOWS_MAX_ENTRIES, FlowKey,
    FlowValue, LEARNED_MAX_ENTRIES, LearnedValue, PORTS_MAX_ENTRIES, PortKey, RateState, STATS_LEN,
    Settings,
};

#[map]
pub static CIDRS: LpmTrie<CidrKey, CidrValue> = LpmTrie::with_max_entries(CIDRS_MAX_ENTRIES, 0);

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
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static RATE: PerCpuArray<RateState> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);
