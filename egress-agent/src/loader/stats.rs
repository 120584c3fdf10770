//! The kernel's counters, and how many entries the policy maps hold.
use aya::maps::{Map, MapData, PerCpuArray};
use egress_common::{
    STAT_ALLOWED_BASE, STAT_AUDITED_BASE, STAT_DNS_ANSWERS, STAT_DNS_EVENTS_LOST, STAT_DNS_LEARNED,
    STAT_DNS_MALFORMED, STAT_DNS_UNMATCHED, STAT_DNS_UNSOLICITED, STAT_DNS_UNTRUSTED,
    STAT_DROPPED_BASE, STAT_EVENTS_LOST, STAT_PROTO_ICMP, STAT_PROTO_OTHER, STAT_PROTO_TCP,
    STAT_PROTO_UDP, STATS,
};

use super::{Enforcer, LoadError, map_err};

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

impl Enforcer {
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
