//! The agent's side of DNS learning: bookkeeping per (name, address), CNAME chains, port
//! unions, bounds and expiry. The kernel has usually written an answer's addresses already;
//! this makes `LEARNED` exactly what the answers justify.
//!
//! Answers come by the thousand per second and the kernel has almost always written what
//! the agent would write, so the agent keeps what `LEARNED` holds for each address it
//! tracks (its port sets, as last written or read) and touches the map only when that
//! differs from what the answer justifies: a refreshed address costs no system call, a new
//! one a lookup. An address's TTL thus counts from when the kernel saw the answer, a
//! moment before the agent. Names are interned (a 4-byte id per address, not a string),
//! and each address takes one slot of a dense table.
use std::collections::{HashMap, HashSet};

use egress_common::{Addr, LearnedName, LearnedNameKey};
use serde::Serialize;

use super::{
    journal::{self, Changes, NameJournal},
    names::NameTable,
    slot_bits::SlotBits,
};
use crate::{policy::DnsSettings, port_sets::PortSets};

mod answer;
mod bounds;
mod chain;
mod slots;
pub(crate) mod store;
mod sync;
#[cfg(test)]
mod tests;

pub(crate) use chain::{cname_chain, on_chain};
use slots::{NameIds, Slot};
pub use store::LearnedStore;

const NS_PER_SEC: u64 = 1_000_000_000;
/// An entry whose ports are right is not rewritten only to end at most this much later:
/// the kernel counted the answer's TTL from when it saw the answer, a moment before the
/// agent, and a caching resolver's TTLs count down in whole seconds.
const EXPIRY_SLACK_NS: u64 = NS_PER_SEC;
/// Marks an unused `Held`.
const NO_NAME: u32 = u32::MAX;
/// An address is looked for in the list of the name it comes with, when that has at most
/// this many, before the index: a refresh then touches adjacent slots, not a hash table.
const SCAN_LIMIT: usize = 32;

/// Counters of what the agent did with the answers it was handed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LearnerCounters {
    pub answers: u64,
    pub learned: u64,
    pub malformed: u64,
    pub unmatched: u64,
    /// A/AAAA records not on the question's CNAME chain (taken back if the kernel had
    /// written them).
    pub off_chain: u64,
    pub evicted: u64,
    pub expired: u64,
}

/// The bookkeeping; the kernel maps are passed to each call, so one owner (the agent's
/// control task) holds both them and this.
pub struct Learner {
    names: NameTable,
    port_sets: PortSets,
    written_sets: HashSet<u32>,
    limits: DnsSettings,
    name_ids: NameIds,
    /// address -> its slot in `slots`
    index: HashMap<Addr, u32>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// No pair expires before this (boot-time ns), so most expiry passes scan nothing.
    next_due: u64,
    /// Slots whose entry the agent wrote since the ring of answers was last found empty:
    /// such a write may have replaced what the kernel wrote for an answer still queued, so
    /// the kernel's write is not taken as standing (see `sync`).
    unsettled: SlotBits,
    /// Slots whose entry's second port set was first seen (and kept) since the ring of
    /// answers was last found empty (see `extra_pending`).
    extra_seen: SlotBits,
    /// The pairs whose `LEARNED_NAMES` records are to be written or deleted.
    journal: NameJournal,
    /// The next slot a recheck reads, while one is under way (see `start_recheck`).
    recheck_at: Option<usize>,
    pub counters: LearnerCounters,
    /// Buffers reused from answer to answer.
    qname: String,
    /// The addresses the answer justifies, with their slots.
    justified: Vec<(Addr, u32)>,
    kernel_wrote: Vec<(Addr, u64)>,
    /// The question's CNAME chain, as offsets of names in the answer.
    chain: Vec<usize>,
    /// Whether each address taken from an answer is printed as a `learned` event.
    announce: bool,
}

impl Learner {
    pub fn new(names: NameTable, port_sets: PortSets, limits: DnsSettings) -> Self {
        // Sized for the bound up front: growing by doubling would leave the outgrown
        // tables behind in the heap. Pages are only touched as addresses come.
        let room = limits.max_ips as usize;
        Self {
            names,
            port_sets,
            written_sets: HashSet::new(),
            limits,
            name_ids: NameIds::default(),
            index: HashMap::with_capacity(room),
            slots: Vec::with_capacity(room),
            free_slots: Vec::new(),
            next_due: u64::MAX,
            unsettled: SlotBits::default(),
            extra_seen: SlotBits::default(),
            journal: NameJournal::default(),
            recheck_at: None,
            counters: LearnerCounters::default(),
            qname: String::new(),
            justified: Vec::new(),
            kernel_wrote: Vec::new(),
            chain: Vec::new(),
            announce: false,
        }
    }

    /// Prints each address taken from an answer as a `learned` event on stdout (`run
    /// --learned-events`): an audit trail of what DNS opened, one line an address.
    pub fn announce_learned(&mut self, on: bool) {
        self.announce = on;
    }

    /// The port set registry, which a policy reload compiles into.
    pub fn port_sets(&self) -> &PortSets {
        &self.port_sets
    }

    /// Takes a reloaded policy's names, bounds and registry: addresses learned through names
    /// it no longer allows are taken back, the others get the new ports, and port sets
    /// nothing refers to any more leave the kernel.
    pub fn reload(
        &mut self,
        store: &mut impl LearnedStore,
        names: NameTable,
        port_sets: PortSets,
        limits: DnsSettings,
        policy_sets: &HashSet<u32>,
        now: u64,
    ) -> anyhow::Result<()> {
        self.names = names;
        self.port_sets = port_sets;
        self.limits = limits;
        let addrs: Vec<Addr> = self.index.keys().copied().collect();
        for id in self.name_ids.live() {
            let slot = self.name_ids.get_mut(id);
            match self.names.lookup(&slot.name) {
                Some((_, set)) => slot.set = *set,
                None => {
                    for s in std::mem::take(&mut slot.addrs) {
                        let slot_of_addr = &mut self.slots[s as usize];
                        if let Some(held) = slot_of_addr.take(id) {
                            (self.journal).forgotten(slot_of_addr.addr, &slot.name, held.written);
                        }
                    }
                    self.name_ids.release(id);
                }
            }
        }
        for addr in addrs {
            self.sync(store, &addr, now, true, None)?;
        }
        for id in self.name_ids.live() {
            self.bound_name(store, id, now)?;
        }
        self.bound_total(store, now)?;
        let mut keep: HashSet<u32> = self
            .index
            .values()
            .map(|s| self.slots[*s as usize].port_set)
            .collect();
        keep.extend(policy_sets);
        let dropped = self.port_sets.retain(&keep);
        self.written_sets.retain(|id| keep.contains(id));
        store.remove_ports(&dropped)
    }

    /// Takes over a previous agent's bookkeeping, its pinned `LEARNED_NAMES` records: what
    /// the policy still allows and has not expired is learned again and the kernel's entries
    /// get this agent's port sets; an address no record justifies any more is taken back.
    /// Records not taken over are deleted at the next journal flush.
    pub fn restore(
        &mut self,
        store: &mut impl LearnedStore,
        pinned: &[(LearnedNameKey, LearnedName)],
        now: u64,
    ) -> anyhow::Result<()> {
        let mut touched = HashSet::new();
        for (key, record) in pinned {
            touched.insert(key.addr);
            let name = std::str::from_utf8(record.name_bytes()).ok();
            let held = name
                .filter(|name| *key == LearnedNameKey::new(key.addr, name))
                .and_then(|name| Some((name, self.names.lookup(name)?.1)))
                .filter(|_| record.expires_ns > now);
            match held {
                Some((name, set)) => {
                    let id = self.name_ids.intern(name, set);
                    self.hold(id, key.addr, record.expires_ns, record.expires_ns);
                }
                None => self.journal.delete(*key),
            }
        }
        for id in self.name_ids.live() {
            self.bound_name(store, id, now)?;
        }
        self.bound_total(store, now)?;
        for addr in touched {
            // What the kernel learned after the records were written stays (its answer is
            // still queued for this agent), unless no allowed name justifies the address.
            let evicting = !self.index.contains_key(&addr);
            self.sync(store, &addr, now, evicting, None)?;
        }
        Ok(())
    }

    /// Addresses currently learned, each with the names it was learned through and when
    /// each expires, for `status` and tests.
    pub fn learned(
        &self,
    ) -> impl Iterator<Item = (&Addr, impl Iterator<Item = (&str, u64)> + '_)> + '_ {
        self.index.iter().map(|(addr, s)| {
            let names = self.slots[*s as usize]
                .names()
                .map(|h| (&*self.name_ids.get(h.name).name, h.expires));
            (addr, names)
        })
    }

    /// How many addresses are learned.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The `LEARNED_NAMES` records to write and delete since the last call, at most
    /// `budget` to write (about: a slot's pairs are written together): after a burst of new
    /// addresses the rest waits for the next call (`complete` is false), so that one flush
    /// never stalls the handling of answers. A name too long for the record (never a valid
    /// DNS name) is left out.
    pub fn journal_changes(&mut self, budget: usize) -> Changes {
        let delete = self.journal.take_gone();
        let mut put = Vec::new();
        while put.len() < budget
            && let Some(s) = self.journal.pop_dirty()
        {
            let slot = &mut self.slots[s as usize];
            let addr = slot.addr;
            for held in slot.names_mut() {
                if !journal::stale(held.written, held.expires) {
                    continue;
                }
                let name = &self.name_ids.get(held.name).name;
                if let Some(record) = LearnedName::new(name, held.expires) {
                    put.push((LearnedNameKey::new(addr, name), record));
                }
                held.written = held.expires;
            }
        }
        Changes {
            put,
            delete,
            complete: !self.journal.is_behind(),
        }
    }

    /// The ring of answers was found empty: every answer handed over from now on was
    /// handled by the kernel after the agent's writes so far.
    pub fn drained(&mut self) {
        self.unsettled.clear();
        self.extra_seen.clear();
    }
}
