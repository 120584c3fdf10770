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
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use egress_common::{
    ALL_PORTS, Addr, DNS_MAX_LEARNED, LearnedName, LearnedNameKey, LearnedValue, NO_PORT_SET,
    PortKey, addr::to_key,
};
use serde::Serialize;

use super::answer::DnsAnswer;
use super::{
    journal::{self, Changes, NameJournal, UNWRITTEN},
    names::NameTable,
    slot_bits::SlotBits,
    wire::{CLASS_IN, Name, Response},
};
use crate::{
    policy::{DnsSettings, Ports},
    port_sets::PortSets,
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// CNAME links followed from the question name; longer chains are cut (and counted).
const MAX_CHAIN: usize = 16;
/// An entry whose ports are right is not rewritten only to end at most this much later:
/// the kernel counted the answer's TTL from when it saw the answer, a moment before the
/// agent, and a caching resolver's TTLs count down in whole seconds.
const EXPIRY_SLACK_NS: u64 = NS_PER_SEC;
/// Marks an unused [`Held`].
const NO_NAME: u32 = u32::MAX;
/// An address is looked for in the list of the name it comes with, when that has at most
/// this many, before the index: a refresh then touches adjacent slots, not a hash table.
const SCAN_LIMIT: usize = 32;

/// What the learner needs of the kernel maps (a trait, so the logic is tested without BPF).
pub trait LearnedStore {
    fn get(&self, addr: &Addr) -> Option<LearnedValue>;
    fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()>;
    fn remove(&mut self, addr: &Addr) -> anyhow::Result<()>;
    fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()>;
    fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()>;
}

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

/// One (name, address) pair, kept with the address.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// The name's id in [`NameIds`].
    name: u32,
    /// Where the address sits in the name's list of addresses.
    at: u32,
    /// When the pair expires, boot-time ns.
    expires: u64,
    /// The expiry its `LEARNED_NAMES` record was last written with (`UNWRITTEN`).
    written: u64,
}

const UNUSED: Held = Held {
    name: NO_NAME,
    at: 0,
    expires: 0,
    written: UNWRITTEN,
};

/// One tracked address.
struct Slot {
    addr: Addr,
    /// The first name it was learned through (`UNUSED` in a free slot); `more` holds the
    /// others, which few addresses have.
    first: Held,
    #[expect(
        clippy::box_collection,
        reason = "a thin pointer: 8 bytes in every slot where a Vec takes 24"
    )]
    more: Option<Box<Vec<Held>>>,
    /// `LEARNED`'s port sets for the address as the agent last wrote or read them
    /// (`port_set` is `NO_PORT_SET` until then: no entry ever holds that).
    port_set: u32,
    extra_set: u32,
}

impl Slot {
    fn new(addr: Addr) -> Self {
        Self {
            addr,
            first: UNUSED,
            more: None,
            port_set: NO_PORT_SET,
            extra_set: NO_PORT_SET,
        }
    }

    fn names(&self) -> impl Iterator<Item = &Held> {
        (self.first.name != NO_NAME)
            .then_some(&self.first)
            .into_iter()
            .chain(self.more.iter().flat_map(|m| m.iter()))
    }

    fn names_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        (self.first.name != NO_NAME)
            .then_some(&mut self.first)
            .into_iter()
            .chain(self.more.iter_mut().flat_map(|m| m.iter_mut()))
    }

    fn is_empty(&self) -> bool {
        self.first.name == NO_NAME
    }

    /// A name whose pair has expired at `now`, if any.
    fn expired_name(&self, now: u64) -> Option<u32> {
        self.names().find(|h| h.expires <= now).map(|h| h.name)
    }

    fn held_mut(&mut self, name: u32) -> Option<&mut Held> {
        if self.first.name == name {
            return Some(&mut self.first);
        }
        self.more.as_mut()?.iter_mut().find(|h| h.name == name)
    }

    fn add(&mut self, held: Held) {
        if self.is_empty() {
            self.first = held;
        } else {
            self.more.get_or_insert_default().push(held);
        }
    }

    /// Removes the pair with `name`, keeping `first` in use while any pair is left.
    fn take(&mut self, name: u32) -> Option<Held> {
        let more = self.more.as_mut();
        let held = if self.first.name == name {
            let replacement = more.and_then(|m| m.pop()).unwrap_or(UNUSED);
            std::mem::replace(&mut self.first, replacement)
        } else {
            let more = more?;
            let i = more.iter().position(|h| h.name == name)?;
            more.swap_remove(i)
        };
        if self.more.as_ref().is_some_and(|m| m.is_empty()) {
            self.more = None;
        }
        Some(held)
    }
}

/// A question name addresses were learned through.
struct NameSlot {
    name: Arc<str>,
    /// Its port set in the policy (its `NAMES` entry's).
    set: u32,
    /// The slots of the addresses learned through it.
    addrs: Vec<u32>,
}

/// Interned question names: ids are reused once a name holds no address.
#[derive(Default)]
struct NameIds {
    ids: HashMap<Arc<str>, u32>,
    slots: Vec<Option<NameSlot>>,
    free: Vec<u32>,
}

impl NameIds {
    fn intern(&mut self, name: &str, set: u32) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let name: Arc<str> = name.into();
        let slot = NameSlot {
            name: name.clone(),
            set,
            addrs: Vec::new(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u32
            }
        };
        self.ids.insert(name, id);
        id
    }

    fn get(&self, id: u32) -> &NameSlot {
        self.slots[id as usize].as_ref().expect("a live name id")
    }

    fn get_mut(&mut self, id: u32) -> &mut NameSlot {
        self.slots[id as usize].as_mut().expect("a live name id")
    }

    fn release(&mut self, id: u32) {
        if let Some(slot) = self.slots[id as usize].take() {
            self.ids.remove(&slot.name);
            self.free.push(id);
        }
    }

    fn live(&self) -> Vec<u32> {
        self.ids.values().copied().collect()
    }
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
        }
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

    /// Starts reading back every tracked address's entry, after the kernel lost answers to
    /// a full ring: a lost answer may have left a second port set the learner never saw, and
    /// a refresh the kernel's write explains (see `sync`) would never look at it, so another
    /// name's answers could keep it open for good. Seen, the set goes at the first write
    /// after the ring is next found empty (see `extra_pending`). The pass goes on in
    /// [`Self::recheck_some`]; does nothing while one is under way.
    pub fn start_recheck(&mut self) {
        self.recheck_at.get_or_insert(0);
    }

    /// Whether a pass started by [`Self::start_recheck`] is under way.
    pub fn rechecking(&self) -> bool {
        self.recheck_at.is_some()
    }

    /// Goes on with the pass, at most `budget` slots: a pass reads every entry, and one
    /// taken at once would hold up the answers queued meanwhile, when answers are already
    /// being lost.
    pub fn recheck_some(
        &mut self,
        store: &mut impl LearnedStore,
        now: u64,
        budget: usize,
    ) -> anyhow::Result<()> {
        let Some(from) = self.recheck_at else {
            return Ok(());
        };
        let to = self.slots.len().min(from.saturating_add(budget));
        for s in from..to {
            if !self.slots[s].is_empty() {
                self.sync_slot(store, s as u32, now, false, None)?;
            }
        }
        self.recheck_at = (to < self.slots.len()).then_some(to);
        Ok(())
    }

    /// The ring of answers was found empty: every answer handed over from now on was
    /// handled by the kernel after the agent's writes so far.
    pub fn drained(&mut self) {
        self.unsettled.clear();
        self.extra_seen.clear();
    }

    fn expiry(&self, ttl: u32, now: u64) -> u64 {
        let secs = ttl.max(self.limits.min_ttl).min(self.limits.max_ttl);
        now + u64::from(secs) * NS_PER_SEC
    }

    /// Handles one answer the kernel learned from. Every address the kernel wrote that this
    /// answer does not justify (off the CNAME chain, or in an answer the agent cannot parse)
    /// is taken back, unless another answer justifies it.
    pub fn answer(
        &mut self,
        store: &mut impl LearnedStore,
        answer: &DnsAnswer<'_>,
        now: u64,
    ) -> anyhow::Result<()> {
        self.justify(store, answer, now)?;
        for addr in answer.learned {
            if !self.justified.iter().any(|(a, _)| a == addr) {
                // Rewrites a tracked address without this answer's ports; removes the rest.
                self.sync(store, addr, now, true, None)?;
            }
        }
        Ok(())
    }

    /// Learns what the answer justifies, into `self.justified`.
    fn justify(
        &mut self,
        store: &mut impl LearnedStore,
        answer: &DnsAnswer<'_>,
        now: u64,
    ) -> anyhow::Result<()> {
        self.justified.clear();
        self.kernel_wrote.clear();
        let Ok(msg) = Response::parse(answer.message) else {
            self.counters.malformed += 1;
            return Ok(());
        };
        // A label holding a dot (`x\.zone`) is one label to DNS but would split into two
        // here; the kernel never matches such a name, and neither does the agent.
        let allowed = (msg.question().policy_key(&mut self.qname))
            .then(|| self.names.lookup(&self.qname))
            .flatten();
        let Some((_, set)) = allowed else {
            self.counters.unmatched += 1;
            return Ok(());
        };
        let set = *set;
        self.counters.answers += 1;
        self.model_kernel(&msg, answer.learned, now);
        cname_chain(&msg, &mut self.chain);
        // Checked once: with debug on for any module, `log::debug!` alone would still build
        // each record's JSON before the logger drops it.
        let debug = log::log_enabled!(log::Level::Debug);
        let mut name = None;
        for record in msg.answers() {
            let Some(addr) = record.addr() else {
                continue;
            };
            if !on_chain(&msg, &self.chain, &record.owner) {
                self.counters.off_chain += 1;
                continue;
            }
            let key = to_key(addr);
            let expires = self.expiry(record.ttl, now);
            let id = *name.get_or_insert_with(|| self.name_ids.intern(&self.qname, set));
            let s = self.hold(id, key, expires, UNWRITTEN);
            self.counters.learned += 1;
            if !self.justified.iter().any(|(a, _)| *a == key) {
                self.justified.push((key, s));
            }
            if debug {
                log::debug!(
                    "{}",
                    serde_json::json!({
                        "event": "learned",
                        "name": self.qname,
                        "addr": addr.to_string(),
                        "ttl": record.ttl,
                        "ports": self.names.lookup(&self.qname).map(|(p, _)| p.to_string()),
                    })
                );
            }
        }
        if let Some(id) = name {
            self.bound_name(store, id, now)?;
        }
        self.bound_total(store, now)?;
        for i in 0..self.justified.len() {
            let (addr, s) = self.justified[i];
            // Not tracked any more: a bound just evicted it, and took it back.
            if self.slots[s as usize].is_empty() {
                continue;
            }
            let kernel_wrote = (self.kernel_wrote.iter())
                .find(|(a, _)| *a == addr)
                .map(|(_, until)| (set, *until));
            self.sync_slot(store, s, now, false, kernel_wrote)?;
        }
        Ok(())
    }

    /// What the kernel wrote from this answer: it walks the first `DNS_MAX_LEARNED` answer
    /// records and writes every class IN A/AAAA address (whatever its owner) with the
    /// question name's port set, until the TTL runs out. Filled into `self.kernel_wrote`
    /// (with the expiry counted from `now`) only when that agrees address for address with
    /// the list the kernel handed over; otherwise nothing is assumed.
    fn model_kernel(&mut self, msg: &Response<'_>, kernel: &[Addr], now: u64) {
        let mut n = 0;
        for record in msg.answers().take(DNS_MAX_LEARNED) {
            let Some(addr) = record.addr().filter(|_| record.class == CLASS_IN) else {
                continue;
            };
            let addr = to_key(addr);
            if kernel.get(n) != Some(&addr) {
                self.kernel_wrote.clear();
                return;
            }
            n += 1;
            let until = self.expiry(record.ttl, now);
            match self.kernel_wrote.iter_mut().find(|(a, _)| *a == addr) {
                Some((_, u)) => *u = (*u).max(until),
                None => self.kernel_wrote.push((addr, until)),
            }
        }
        if n != kernel.len() {
            self.kernel_wrote.clear();
        }
    }

    /// Records that `addr` was learned through `name` until `expires` (or later, if it
    /// already was); returns its slot. `written`: the expiry of the pair's record in
    /// `LEARNED_NAMES`, if a new pair has one.
    fn hold(&mut self, name: u32, addr: Addr, expires: u64, written: u64) -> u32 {
        let list = &self.name_ids.get(name).addrs;
        let listed = (list.len() <= SCAN_LIMIT)
            .then(|| (list.iter()).find(|s| self.slots[**s as usize].addr == addr))
            .flatten();
        let s = match listed.or_else(|| self.index.get(&addr)) {
            Some(s) => *s,
            None => {
                let s = match self.free_slots.pop() {
                    Some(s) => {
                        self.slots[s as usize] = Slot::new(addr);
                        s
                    }
                    None => {
                        self.slots.push(Slot::new(addr));
                        (self.slots.len() - 1) as u32
                    }
                };
                self.index.insert(addr, s);
                s
            }
        };
        let slot = &mut self.slots[s as usize];
        if let Some(held) = slot.held_mut(name) {
            held.expires = held.expires.max(expires);
            if journal::stale(held.written, held.expires) {
                self.journal.touched(s);
            }
            return s;
        }
        let addrs = &mut self.name_ids.get_mut(name).addrs;
        slot.add(Held {
            name,
            at: addrs.len() as u32,
            expires,
            written,
        });
        addrs.push(s);
        self.next_due = self.next_due.min(expires);
        if journal::stale(written, expires) {
            self.journal.touched(s);
        }
        s
    }

    /// Forgets one (name, address) pair, and the name once it holds no address.
    fn forget(&mut self, name: u32, s: u32) {
        let slot = &mut self.slots[s as usize];
        let Some(held) = slot.take(name) else {
            return;
        };
        let name_slot = self.name_ids.get_mut(name);
        (self.journal).forgotten(slot.addr, &name_slot.name, held.written);
        let addrs = &mut name_slot.addrs;
        addrs.swap_remove(held.at as usize);
        if let Some(moved) = addrs.get(held.at as usize) {
            if let Some(h) = self.slots[*moved as usize].held_mut(name) {
                h.at = held.at;
            }
        } else if addrs.is_empty() {
            self.name_ids.release(name);
        }
    }

    /// Drops (name, address) pairs whose TTL has run out.
    pub fn expire(&mut self, store: &mut impl LearnedStore, now: u64) -> anyhow::Result<()> {
        if now < self.next_due {
            return Ok(());
        }
        let mut next = u64::MAX;
        let mut due = Vec::new();
        for (addr, s) in &self.index {
            let mut is_due = false;
            for held in self.slots[*s as usize].names() {
                if held.expires <= now {
                    is_due = true;
                } else {
                    next = next.min(held.expires);
                }
            }
            if is_due {
                due.push(*addr);
            }
        }
        for addr in due {
            self.sync(store, &addr, now, false, None)?;
        }
        self.next_due = next;
        Ok(())
    }

    /// At most `max_ips_per_name` addresses per name: the ones expiring first go.
    fn bound_name(
        &mut self,
        store: &mut impl LearnedStore,
        name: u32,
        now: u64,
    ) -> anyhow::Result<()> {
        let limit = self.limits.max_ips_per_name as usize;
        let held = self.name_ids.get(name);
        if held.addrs.len() <= limit {
            return Ok(());
        }
        let ranked: Vec<(u64, Addr, u32)> = (held.addrs.iter())
            .map(|s| {
                let slot = &self.slots[*s as usize];
                let expires = slot
                    .names()
                    .find(|h| h.name == name)
                    .map_or(0, |h| h.expires);
                (expires, slot.addr, *s)
            })
            .collect();
        let victims = first_expiring(ranked, limit);
        log::warn!(
            "{}: more than {limit} addresses (dns.max_ips_per_name); evicting the {} expiring first",
            held.name,
            victims.len()
        );
        for (_, addr, s) in victims {
            self.forget(name, s);
            self.counters.evicted += 1;
            self.sync(store, &addr, now, true, None)?;
        }
        Ok(())
    }

    /// At most `max_ips` addresses in all: the ones expiring first go.
    fn bound_total(&mut self, store: &mut impl LearnedStore, now: u64) -> anyhow::Result<()> {
        let limit = self.limits.max_ips as usize;
        if self.index.len() <= limit {
            return Ok(());
        }
        let ranked: Vec<(u64, Addr, u32)> = (self.index.iter())
            .map(|(addr, s)| {
                let slot = &self.slots[*s as usize];
                let expires = slot.names().map(|h| h.expires).max().unwrap_or(0);
                (expires, *addr, *s)
            })
            .collect();
        let victims = first_expiring(ranked, limit);
        log::warn!(
            "more than {limit} learned addresses (dns.max_ips); evicting the {} expiring first",
            victims.len()
        );
        for (_, addr, s) in victims {
            while !self.slots[s as usize].is_empty() {
                self.forget(self.slots[s as usize].first.name, s);
            }
            self.counters.evicted += 1;
            self.sync(store, &addr, now, true, None)?;
        }
        Ok(())
    }

    /// Makes the kernel's entry for `addr` what the bookkeeping says: the union of the ports
    /// of every name it is still valid for, until the last of them expires. Otherwise a
    /// later expiry and a second port set written by the kernel (from an answer still queued
    /// for the agent, see `extra_pending`) are kept; `evicting` (taking something back) drops them, and removes
    /// the entry outright when no name is left.
    ///
    /// `kernel_wrote`: the port set and expiry the kernel wrote the address with from the
    /// answer being handled. When the entry held that port set alone as the agent last saw
    /// it, the agent has not written it since the kernel handled the answer, and the agent
    /// wants exactly that, the kernel's write stands: whatever the entry held before, it
    /// now holds that set until that expiry, plus what answers still queued added.
    fn sync(
        &mut self,
        store: &mut impl LearnedStore,
        addr: &Addr,
        now: u64,
        evicting: bool,
        kernel_wrote: Option<(u32, u64)>,
    ) -> anyhow::Result<()> {
        match self.index.get(addr) {
            Some(s) => self.sync_slot(store, *s, now, evicting, kernel_wrote),
            None => take_back(store, addr, now, evicting),
        }
    }

    /// [`Self::sync`] for the address in slot `s`.
    fn sync_slot(
        &mut self,
        store: &mut impl LearnedStore,
        s: u32,
        now: u64,
        evicting: bool,
        kernel_wrote: Option<(u32, u64)>,
    ) -> anyhow::Result<()> {
        let addr = self.slots[s as usize].addr;
        while let Some(name) = self.slots[s as usize].expired_name(now) {
            self.forget(name, s);
            self.counters.expired += 1;
        }
        if self.slots[s as usize].is_empty() {
            self.index.remove(&addr);
            self.free_slots.push(s);
            return take_back(store, &addr, now, evicting);
        }
        let port_set = self.live_port_set(store, s)?;
        let slot = &self.slots[s as usize];
        let expires_ns = slot.names().map(|h| h.expires).max().unwrap_or(now);
        if !evicting
            && let Some((set, until)) = kernel_wrote
            && !self.unsettled.contains(s)
            && port_set == set
            && slot.port_set == set
            && slot.extra_set == NO_PORT_SET
            && expires_ns <= until.saturating_add(EXPIRY_SLACK_NS)
        {
            return Ok(());
        }
        let current = store.get(&addr);
        let mut value = LearnedValue {
            port_set,
            extra_set: NO_PORT_SET,
            expires_ns,
        };
        // When taking something back, what the kernel wrote is exactly what must go.
        let live = current.filter(|v| v.expires_ns > now && !evicting);
        if let Some(cur) = live {
            value.expires_ns = value.expires_ns.max(cur.expires_ns);
            if self.extra_pending(s, cur.extra_set, port_set) {
                value.extra_set = cur.extra_set;
            }
        }
        let holds = current == Some(value)
            || live.is_some_and(|cur| {
                cur.port_set == value.port_set
                    && cur.extra_set == value.extra_set
                    && value.expires_ns - cur.expires_ns <= EXPIRY_SLACK_NS
            });
        if !holds {
            store.put(&addr, &value)?;
            self.unsettled.insert(s);
        }
        let slot = &mut self.slots[s as usize];
        slot.port_set = value.port_set;
        slot.extra_set = value.extra_set;
        Ok(())
    }

    /// Whether `extra`, the second port set the kernel's entry for slot `s` holds, must be
    /// kept next to `port_set`, the union of the slot's names' ports: only while it may
    /// come from an answer the agent has not handled yet. Kept forever, it would let the
    /// address keep a name's ports after that name expired, as long as another name
    /// refreshed it: an allowlist admitting more than it says.
    ///
    /// It goes when the ports are already in `port_set` (the name it came from is one the
    /// slot holds), and when it was already there before the ring of answers was last found
    /// empty: every answer the kernel had handled by then has been handled here, so nothing
    /// justifies it any more (its answer was lost to a full ring, or it is a previous
    /// agent's set).
    fn extra_pending(&mut self, s: u32, extra: u32, port_set: u32) -> bool {
        let slot = &self.slots[s as usize];
        let covered = extra == NO_PORT_SET
            || extra == port_set
            || port_set == ALL_PORTS
            || slot.names().any(|h| self.name_ids.get(h.name).set == extra);
        if covered || (extra == slot.extra_set && !self.extra_seen.contains(s)) {
            return false;
        }
        self.extra_seen.insert(s);
        true
    }

    /// The port set of the union of the ports of the names `slot` holds, written to the
    /// kernel the first time.
    fn live_port_set(&mut self, store: &mut impl LearnedStore, s: u32) -> anyhow::Result<u32> {
        let slot = &self.slots[s as usize];
        let first = self.name_ids.get(slot.first.name).set;
        let id = if slot.names().all(|h| self.name_ids.get(h.name).set == first) {
            first
        } else {
            let ports = (slot.names())
                .filter_map(|h| {
                    let name = &self.name_ids.get(h.name).name;
                    self.names.lookup(name).map(|(p, _)| p.clone())
                })
                .reduce(|a, b| a.union(&b))
                .unwrap_or(Ports::Some(Vec::new()));
            self.port_sets.intern(&ports)
        };
        if self.written_sets.insert(id) {
            let keys: Vec<PortKey> = self.port_sets.entries_of(id).copied().collect();
            store.add_ports(&keys)?;
        }
        Ok(id)
    }
}

/// Takes back an address the learner no longer tracks: removes its entry, unless (when not
/// `evicting`) the kernel holds a later expiry from an answer still queued.
fn take_back(
    store: &mut impl LearnedStore,
    addr: &Addr,
    now: u64,
    evicting: bool,
) -> anyhow::Result<()> {
    if !evicting && store.get(addr).is_some_and(|v| v.expires_ns > now) {
        return Ok(());
    }
    store.remove(addr)
}

/// The entries of `ranked` (expiry, address, slot) beyond the `keep` expiring last,
/// expiring first first.
fn first_expiring(mut ranked: Vec<(u64, Addr, u32)>, keep: usize) -> Vec<(u64, Addr, u32)> {
    let surplus = ranked.len().saturating_sub(keep);
    if surplus == 0 {
        return Vec::new();
    }
    ranked.select_nth_unstable(surplus - 1);
    ranked.truncate(surplus);
    ranked.sort_unstable();
    ranked
}

/// The question name and every name a CNAME chain from it reaches, into `chain` (as offsets
/// in the message; names compare without regard to case).
pub(crate) fn cname_chain(msg: &Response<'_>, chain: &mut Vec<usize>) {
    chain.clear();
    chain.push(msg.question().offset());
    if !msg.has_cname() {
        return;
    }
    for _ in 0..MAX_CHAIN {
        let before = chain.len();
        for r in msg.answers() {
            if let Some(target) = r.cname()
                && on_chain(msg, chain, &r.owner)
                && !on_chain(msg, chain, &target)
            {
                chain.push(target.offset());
            }
        }
        if chain.len() == before {
            break;
        }
    }
}

pub(crate) fn on_chain(msg: &Response<'_>, chain: &[usize], name: &Name<'_>) -> bool {
    chain.iter().any(|at| msg.name_at(*at).eq_ignore_case(name))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use egress_common::{DNS_MAX_LEARNED, DNS_MAX_PAYLOAD, DnsEvent};
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{
            DNSClass, Name, RData, RecordType,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;
    use crate::{compile::compile, policy::parse};

    /// The kernel maps, in memory.
    #[derive(Default)]
    struct FakeStore {
        learned: HashMap<Addr, LearnedValue>,
        ports: HashSet<PortKey>,
        /// `LEARNED_NAMES`, which the agent's control task writes.
        names: HashMap<LearnedNameKey, u64>,
    }

    impl FakeStore {
        /// Writes the journal's changes as the control task does; returns whether that was
        /// all of them.
        fn flush(&mut self, l: &mut Learner, budget: usize) -> bool {
            let changes = l.journal_changes(budget);
            for key in &changes.delete {
                self.names.remove(key);
            }
            for (key, record) in &changes.put {
                self.names.insert(*key, record.expires_ns);
            }
            changes.complete
        }
    }

    impl LearnedStore for FakeStore {
        fn get(&self, addr: &Addr) -> Option<LearnedValue> {
            self.learned.get(addr).copied()
        }
        fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()> {
            self.learned.insert(*addr, *value);
            Ok(())
        }
        fn remove(&mut self, addr: &Addr) -> anyhow::Result<()> {
            self.learned.remove(addr);
            Ok(())
        }
        fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
            self.ports.extend(keys);
            Ok(())
        }
        fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
            for k in keys {
                self.ports.remove(k);
            }
            Ok(())
        }
    }

    const POLICY: &str = "
allow:
  - fqdn: mcr.microsoft.com
    ports: [HTTPS:443]
  - fqdn: \"*.hcp.eastus.azmk8s.io\"
    ports: [HTTPS:443, TCP:9000]
  - fqdn: ntp.example.org
    ports: [UDP:123]
dns:
  min_ttl: 10
  max_ttl: 600
  max_ips_per_name: 3
  max_ips: 5
";
    const T0: u64 = 1_000 * NS_PER_SEC;

    /// Hands `event` to the learner as the control task hands it a record of the ring.
    fn feed(
        l: &mut Learner,
        store: &mut impl LearnedStore,
        event: &DnsEvent,
        now: u64,
    ) -> anyhow::Result<()> {
        l.answer(store, &event.into(), now)
    }

    fn learner() -> Learner {
        let policy = parse(POLICY, "learn.yaml").expect("policy");
        let compiled = compile(&policy).expect("compiles");
        Learner::new(compiled.names, compiled.port_sets, policy.dns)
    }

    fn name(s: &str) -> Name {
        Name::from_str(s).expect("name")
    }

    fn answer(qname: &str, records: Vec<Record>) -> DnsEvent {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name(qname), RecordType::A));
        m.add_answers(records);
        event(&m.to_vec().expect("encodes"))
    }

    fn event(bytes: &[u8]) -> DnsEvent {
        let mut payload = [0u8; DNS_MAX_PAYLOAD];
        payload[..bytes.len()].copy_from_slice(bytes);
        DnsEvent {
            resolver: [0; 16],
            client: [0; 16],
            len: bytes.len() as u16,
            learned: 0,
            _pad: 0,
            addrs: [[0; 16]; DNS_MAX_LEARNED],
            payload,
        }
    }

    fn a(owner: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A::from_str(ip).expect("ipv4")))
    }

    fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(
            name(owner),
            ttl,
            RData::AAAA(AAAA::from_str(ip).expect("ipv6")),
        )
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
    }

    fn key(ip: &str) -> Addr {
        to_key(ip.parse().expect("address"))
    }

    use hickory_proto::rr::Record;

    #[test]
    fn a_restore_relearns_what_the_policy_still_allows_and_takes_back_the_rest() {
        let mut l = learner();
        let mut store = FakeStore::default();
        // What a previous agent left: entries with its own port set ids.
        let old = LearnedValue {
            port_set: 40,
            extra_set: NO_PORT_SET,
            expires_ns: T0 + 500 * NS_PER_SEC,
        };
        for ip in ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"] {
            store.learned.insert(key(ip), old);
        }
        let until = T0 + 300 * NS_PER_SEC;
        let record = |ip, name, expires| {
            let key = LearnedNameKey::new(key(ip), name);
            (key, LearnedName::new(name, expires).expect("fits"))
        };
        let mut unreadable = record("203.0.113.5", "mcr.microsoft.com", until);
        unreadable.1.name[0] = 0xff;
        let pinned = [
            record("203.0.113.1", "mcr.microsoft.com", until),
            record("203.0.113.1", "ntp.example.org", until + 1),
            // A name the policy no longer has.
            record("203.0.113.2", "gone.example.com", until),
            // Expired already.
            record("203.0.113.3", "mcr.microsoft.com", T0 - 1),
            unreadable,
        ];
        l.restore(&mut store, &pinned, T0).expect("restores");
        // What is taken over is not rewritten; what is not goes.
        let changes = l.journal_changes(usize::MAX);
        assert!(changes.put.is_empty() && changes.complete);
        let mut deleted = changes.delete;
        deleted.sort();
        let mut not_taken: Vec<_> = pinned[2..].iter().map(|(k, _)| *k).collect();
        not_taken.sort();
        assert_eq!(deleted, not_taken);
        let kept = store.learned[&key("203.0.113.1")];
        assert_ne!(kept.port_set, 40, "repainted with this agent's set");
        // The kernel's later expiry stands: it may come from an answer still queued.
        assert_eq!(kept.expires_ns, old.expires_ns);
        let ports: HashSet<(u8, u16)> = store
            .ports
            .iter()
            .filter(|k| k.port_set == kept.port_set)
            .map(|k| (k.proto, k.port))
            .collect();
        assert_eq!(ports, HashSet::from([(6, 443), (17, 123)]), "the union");
        assert!(!store.learned.contains_key(&key("203.0.113.2")));
        assert!(!store.learned.contains_key(&key("203.0.113.3")));
        // No record: left to its own expiry (its answer may still be queued).
        assert_eq!(store.learned[&key("203.0.113.4")], old);
        let names: Vec<(String, u64)> = l
            .learned()
            .flat_map(|(_, names)| names.map(|(n, e)| (n.to_owned(), e)))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_cname_chain_is_followed_to_its_addresses() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let ev = answer(
            "mcr.microsoft.com.",
            vec![
                cname("mcr.microsoft.com.", "mcr.trafficmanager.example."),
                cname("mcr.trafficmanager.example.", "edge.example."),
                a("edge.example.", 60, "203.0.113.7"),
                aaaa("edge.example.", 60, "2001:db8::7"),
            ],
        );
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        assert_eq!(l.counters.learned, 2);
        let v = store.learned[&key("203.0.113.7")];
        assert_eq!(v.expires_ns, T0 + 60 * NS_PER_SEC);
        assert_eq!(v.extra_set, NO_PORT_SET);
        assert!(store.learned.contains_key(&key("2001:db8::7")));
        assert!(
            store
                .ports
                .iter()
                .any(|k| k.port_set == v.port_set && k.port == 443)
        );
    }

    /// What the kernel did with an answer: wrote each of `addrs` for the question's name.
    fn kernel_wrote(store: &mut FakeStore, event: &mut DnsEvent, addrs: &[&str]) {
        for (i, ip) in addrs.iter().enumerate() {
            let k = key(ip);
            store.learned.insert(
                k,
                LearnedValue {
                    port_set: 0,
                    extra_set: NO_PORT_SET,
                    expires_ns: T0 + 86_400 * NS_PER_SEC,
                },
            );
            event.addrs[i] = k;
        }
        event.learned = addrs.len() as u16;
    }

    #[test]
    fn records_off_the_chain_are_taken_back() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let mut ev = answer(
            "mcr.microsoft.com.",
            vec![
                a("mcr.microsoft.com.", 60, "203.0.113.7"),
                a("evil.example.", 60, "198.51.100.66"),
            ],
        );
        // The kernel attributes every A record of the answer to the question's name.
        kernel_wrote(&mut store, &mut ev, &["203.0.113.7", "198.51.100.66"]);
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        assert_eq!(l.counters.off_chain, 1);
        assert!(!store.learned.contains_key(&key("198.51.100.66")));
        assert!(store.learned.contains_key(&key("203.0.113.7")));
    }

    #[test]
    fn what_the_kernel_learned_from_an_answer_the_agent_cannot_parse_is_taken_back() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let good = answer(
            "mcr.microsoft.com.",
            vec![a("mcr.microsoft.com.", 60, "203.0.113.7")],
        );
        // A broken record after the good ones: the kernel learned, hickory refuses.
        let mut bytes = good.payload[..usize::from(good.len)].to_vec();
        bytes[11] = 1; // arcount 1, and no additional record follows
        let mut ev = event(&bytes);
        kernel_wrote(&mut store, &mut ev, &["203.0.113.7"]);
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        assert_eq!(l.counters.malformed, 1);
        assert!(store.learned.is_empty());
    }

    #[test]
    fn a_label_holding_a_dot_never_matches_a_zone() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let name = Name::from_labels(vec![
            b"x.hcp".to_vec(),
            b"eastus".to_vec(),
            b"azmk8s".to_vec(),
            b"io".to_vec(),
        ])
        .expect("name");
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            name,
            60,
            RData::A(A::from_str("203.0.113.9").expect("ipv4")),
        ));
        let mut ev = event(&m.to_vec().expect("encodes"));
        kernel_wrote(&mut store, &mut ev, &["203.0.113.9"]);
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        assert_eq!(l.counters.unmatched, 1);
        assert!(store.learned.is_empty());
    }

    #[test]
    fn ttls_are_floored_and_capped() {
        let mut store = FakeStore::default();
        let mut l = learner();
        feed(
            &mut l,
            &mut store,
            &answer(
                "x.hcp.eastus.azmk8s.io.",
                vec![a("x.hcp.eastus.azmk8s.io.", 0, "203.0.113.1")],
            ),
            T0,
        )
        .expect("answer");
        feed(
            &mut l,
            &mut store,
            &answer(
                "y.hcp.eastus.azmk8s.io.",
                vec![a("y.hcp.eastus.azmk8s.io.", 999_999, "203.0.113.2")],
            ),
            T0,
        )
        .expect("answer");
        assert_eq!(
            store.learned[&key("203.0.113.1")].expires_ns,
            T0 + 10 * NS_PER_SEC
        );
        assert_eq!(
            store.learned[&key("203.0.113.2")].expires_ns,
            T0 + 600 * NS_PER_SEC
        );
    }

    #[test]
    fn an_address_of_two_names_gets_the_union_of_their_ports_until_each_expires() {
        let mut store = FakeStore::default();
        let mut l = learner();
        feed(
            &mut l,
            &mut store,
            &answer(
                "mcr.microsoft.com.",
                vec![a("mcr.microsoft.com.", 30, "203.0.113.9")],
            ),
            T0,
        )
        .expect("answer");
        feed(
            &mut l,
            &mut store,
            &answer(
                "ntp.example.org.",
                vec![a("ntp.example.org.", 100, "203.0.113.9")],
            ),
            T0,
        )
        .expect("answer");
        let both = store.learned[&key("203.0.113.9")].port_set;
        let members: HashSet<(u8, u16)> = store
            .ports
            .iter()
            .filter(|k| k.port_set == both)
            .map(|k| (k.proto, k.port))
            .collect();
        assert_eq!(members, HashSet::from([(6, 443), (17, 123)]));
        // mcr's 30 s run out: only NTP's port is left.
        l.expire(&mut store, T0 + 31 * NS_PER_SEC).expect("expire");
        let left = store.learned[&key("203.0.113.9")].port_set;
        assert_ne!(left, both);
        assert!(store.ports.contains(&PortKey::new(left, 17, 123)));
        // NTP's 100 s run out: the address is gone.
        l.expire(&mut store, T0 + 101 * NS_PER_SEC).expect("expire");
        assert!(!store.learned.contains_key(&key("203.0.113.9")));
        assert_eq!(l.counters.expired, 2);
    }

    #[test]
    fn per_name_and_total_bounds_evict_what_expires_first() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let records = (1..=4)
            .map(|i| a("mcr.microsoft.com.", 10 * i, &format!("203.0.113.{i}")))
            .collect();
        feed(
            &mut l,
            &mut store,
            &answer("mcr.microsoft.com.", records),
            T0,
        )
        .expect("answer");
        assert_eq!(l.counters.evicted, 1, "max_ips_per_name is 3");
        assert!(!store.learned.contains_key(&key("203.0.113.1")));
        let more = (5..=7)
            .map(|i| {
                a(
                    &format!("h{i}.hcp.eastus.azmk8s.io."),
                    100,
                    &format!("203.0.113.{i}"),
                )
            })
            .collect::<Vec<_>>();
        for r in more {
            let owner = r.name.to_ascii();
            feed(&mut l, &mut store, &answer(&owner, vec![r]), T0).expect("answer");
        }
        assert_eq!(l.learned().count(), 5, "max_ips is 5");
        assert!(
            !store.learned.contains_key(&key("203.0.113.2")),
            "expired first"
        );
    }

    #[test]
    fn hostile_answers_never_panic_and_never_learn() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let good = answer(
            "mcr.microsoft.com.",
            vec![a("mcr.microsoft.com.", 60, "203.0.113.7")],
        );
        let bytes = &good.payload[..usize::from(good.len)];
        // Every truncation, and a compression pointer loop in the question.
        for cut in 0..bytes.len() {
            feed(&mut l, &mut store, &event(&bytes[..cut]), T0).expect("no error");
        }
        let mut looped = bytes.to_vec();
        looped[12] = 0xc0;
        looped[13] = 12;
        feed(&mut l, &mut store, &event(&looped), T0).expect("no error");
        let mut wrong_len = event(bytes);
        wrong_len.len = u16::MAX;
        feed(&mut l, &mut store, &wrong_len, T0).expect("no error");
        assert!(l.counters.malformed > 0);
        assert_eq!(
            l.counters.learned, 1,
            "only the whole answer (len clamped) teaches"
        );
    }

    #[test]
    fn a_reload_takes_back_names_no_longer_allowed_and_repaints_the_rest() {
        let mut store = FakeStore::default();
        let mut l = learner();
        for (name, ip) in [
            ("mcr.microsoft.com.", "203.0.113.1"),
            ("ntp.example.org.", "203.0.113.2"),
        ] {
            feed(
                &mut l,
                &mut store,
                &answer(name, vec![a(name, 300, ip)]),
                T0,
            )
            .expect("answer");
        }
        let old_mcr_set = store.learned[&key("203.0.113.1")].port_set;
        // mcr now on 8443 only; NTP gone.
        let policy = parse(
            "allow:\n  - fqdn: mcr.microsoft.com\n    ports: [TCP:8443]\n",
            "reload.yaml",
        )
        .expect("policy");
        let compiled =
            crate::compile::compile_with(&policy, l.port_sets().clone()).expect("compiles");
        let sets = compiled.sets_in_use().expect("names");
        l.reload(
            &mut store,
            compiled.names,
            compiled.port_sets,
            policy.dns,
            &sets,
            T0 + NS_PER_SEC,
        )
        .expect("reload");
        assert!(
            !store.learned.contains_key(&key("203.0.113.2")),
            "NTP taken back"
        );
        let mcr = store.learned[&key("203.0.113.1")];
        assert_ne!(mcr.port_set, old_mcr_set);
        assert!(store.ports.contains(&PortKey::new(mcr.port_set, 6, 8443)));
        assert!(
            !store.ports.iter().any(|k| k.port == 123),
            "the NTP set is referenced by nothing and left the kernel"
        );
    }

    #[test]
    fn answers_for_names_no_rule_allows_teach_nothing() {
        let mut store = FakeStore::default();
        let mut l = learner();
        feed(
            &mut l,
            &mut store,
            &answer(
                "hcp.eastus.azmk8s.io.",
                vec![a("hcp.eastus.azmk8s.io.", 60, "203.0.113.8")],
            ),
            T0,
        )
        .expect("answer");
        feed(
            &mut l,
            &mut store,
            &answer("evil.example.", vec![a("evil.example.", 60, "203.0.113.9")]),
            T0,
        )
        .expect("answer");
        assert_eq!(l.counters.unmatched, 2);
        assert!(store.learned.is_empty());
    }

    /// The kernel maps, counting the learner's lookups and writes.
    #[derive(Default)]
    struct Counting {
        maps: FakeStore,
        gets: std::cell::Cell<usize>,
        puts: usize,
    }

    impl LearnedStore for Counting {
        fn get(&self, addr: &Addr) -> Option<LearnedValue> {
            self.gets.set(self.gets.get() + 1);
            self.maps.get(addr)
        }
        fn put(&mut self, addr: &Addr, value: &LearnedValue) -> anyhow::Result<()> {
            self.puts += 1;
            self.maps.put(addr, value)
        }
        fn remove(&mut self, addr: &Addr) -> anyhow::Result<()> {
            self.maps.remove(addr)
        }
        fn add_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
            self.maps.add_ports(keys)
        }
        fn remove_ports(&mut self, keys: &[PortKey]) -> anyhow::Result<()> {
            self.maps.remove_ports(keys)
        }
    }

    /// What the kernel does with an answer before the agent sees it (`egress-ebpf/src/dns.rs`):
    /// every class IN A/AAAA address among the first records goes into `LEARNED` with the
    /// question name's port set (a second set next to another name's), until its TTL runs
    /// out (or later, if it already was). `None` when no rule allows the question.
    fn kernel_handles(
        l: &Learner,
        maps: &mut FakeStore,
        m: &Message,
        now: u64,
    ) -> Option<DnsEvent> {
        let text = m.queries[0].name.to_lowercase().to_ascii();
        let q = text.strip_suffix('.').unwrap_or(&text);
        if q.contains('\\') {
            return None;
        }
        let set = l.names.lookup(q)?.1;
        let mut ev = event(&m.to_vec().expect("encodes"));
        for r in m.answers.iter().take(DNS_MAX_LEARNED) {
            let addr = match &r.data {
                RData::A(a) => to_key(a.0.into()),
                RData::AAAA(a) => to_key(a.0.into()),
                _ => continue,
            };
            let secs = r.ttl.max(l.limits.min_ttl).min(l.limits.max_ttl);
            let expires_ns = now + u64::from(secs) * NS_PER_SEC;
            (maps.learned.entry(addr))
                .and_modify(|v| v.teach(set, expires_ns, now))
                .or_insert(LearnedValue::new(set, expires_ns));
            ev.addrs[usize::from(ev.learned)] = addr;
            ev.learned += 1;
        }
        Some(ev)
    }

    /// An answer of one A record for `qname` itself.
    fn single(qname: &str, ttl: u32, ip: &str) -> Message {
        message(qname, vec![a(qname, ttl, ip)])
    }

    fn message(qname: &str, records: Vec<Record>) -> Message {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name(qname), RecordType::A));
        m.add_answers(records);
        m
    }

    #[test]
    fn a_refreshed_address_costs_no_map_call_and_a_new_one_a_lookup() {
        let mut store = Counting::default();
        let mut l = learner();
        let records = |ttl| {
            (1..=3)
                .map(|i| a("x.hcp.eastus.azmk8s.io.", ttl, &format!("203.0.113.{i}")))
                .collect()
        };
        let m = message("x.hcp.eastus.azmk8s.io.", records(60));
        let ev = kernel_handles(&l, &mut store.maps, &m, T0).expect("allowed");
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        l.drained();
        assert_eq!(
            (store.gets.get(), store.puts),
            (3, 0),
            "what the kernel wrote stands"
        );
        // The same answer later, with a longer TTL: the kernel's write stands again.
        let t1 = T0 + 30 * NS_PER_SEC;
        let m = message("x.hcp.eastus.azmk8s.io.", records(300));
        let ev = kernel_handles(&l, &mut store.maps, &m, t1).expect("allowed");
        feed(&mut l, &mut store, &ev, t1).expect("answer");
        assert_eq!((store.gets.get(), store.puts), (3, 0), "no map call");
        assert_eq!(
            store.maps.learned[&key("203.0.113.2")].expires_ns,
            t1 + 300 * NS_PER_SEC
        );
        assert_eq!(l.learned().count(), 3);
    }

    #[test]
    fn an_answer_queued_behind_a_write_of_the_agent_is_not_taken_as_standing() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let mcr = |ttl| {
            message(
                "mcr.microsoft.com.",
                vec![a("mcr.microsoft.com.", ttl, "203.0.113.7")],
            )
        };
        let ev = kernel_handles(&l, &mut store, &mcr(60), T0).expect("allowed");
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        l.drained();
        // The kernel handles two answers before the agent reads either: NTP's, where the
        // address is off the chain, then a refresh of mcr's with a longer TTL.
        let t1 = T0 + NS_PER_SEC;
        let ntp = message(
            "ntp.example.org.",
            vec![a("elsewhere.example.", 60, "203.0.113.7")],
        );
        let taken_back = kernel_handles(&l, &mut store, &ntp, t1).expect("allowed");
        let refresh = kernel_handles(&l, &mut store, &mcr(600), t1).expect("allowed");
        // Taking NTP's ports back rewrites the entry with mcr's first expiry, replacing the
        // kernel's write for the refresh; the refresh must then be written again.
        feed(&mut l, &mut store, &taken_back, t1).expect("answer");
        feed(&mut l, &mut store, &refresh, t1).expect("answer");
        let v = store.learned[&key("203.0.113.7")];
        assert_eq!(v.extra_set, NO_PORT_SET, "NTP's ports taken back");
        assert_eq!(v.expires_ns, t1 + 600 * NS_PER_SEC, "the refresh's expiry");
    }

    #[test]
    fn a_lost_answer_s_second_port_set_goes_after_a_recheck_while_another_name_refreshes() {
        let mut store = FakeStore::default();
        let mut l = learner();
        store.ports.extend(l.port_sets.entries().copied());
        let mcr = single("mcr.microsoft.com.", 60, "203.0.113.7");
        let ev = kernel_handles(&l, &mut store, &mcr, T0).expect("allowed");
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        l.drained();
        // NTP's answer reaches the kernel, but its event is lost (a full ring).
        let ntp = single("ntp.example.org.", 30, "203.0.113.7");
        kernel_handles(&l, &mut store, &ntp, T0).expect("allowed");
        let refresh = |l: &mut Learner, store: &mut FakeStore, at: u64| {
            let ev = kernel_handles(l, store, &mcr, at).expect("allowed");
            feed(l, store, &ev, at).expect("answer");
            l.drained();
        };
        // Each refresh of mcr's name is explained by the kernel's own write: nothing reads
        // the entry, and NTP's port stays open long after NTP's TTL.
        let mut now = T0;
        for _ in 0..5 {
            now += 20 * NS_PER_SEC;
            refresh(&mut l, &mut store, now);
            l.expire(&mut store, now).expect("expire");
        }
        assert_eq!(
            open_ports(&store, "203.0.113.7"),
            HashSet::from([(6, 443), (17, 123)])
        );
        // Once the loss is known, the entries are read back, a few at a time; the next
        // write drops the set.
        l.start_recheck();
        while l.rechecking() {
            l.recheck_some(&mut store, now, 1).expect("recheck");
        }
        l.drained();
        refresh(&mut l, &mut store, now + NS_PER_SEC);
        assert_eq!(open_ports(&store, "203.0.113.7"), HashSet::from([(6, 443)]));
    }

    /// The ports `LEARNED` lets through to `ip`, as (protocol, port) pairs.
    fn open_ports(store: &FakeStore, ip: &str) -> HashSet<(u8, u16)> {
        let v = store.learned[&key(ip)];
        (store.ports.iter())
            .filter(|k| k.port_set == v.port_set || k.port_set == v.extra_set)
            .map(|k| (k.proto, k.port))
            .collect()
    }

    #[test]
    fn a_name_s_ports_end_with_it_while_another_name_refreshes_the_address() {
        let mut store = FakeStore::default();
        let mut l = learner();
        store.ports.extend(l.port_sets.entries().copied());
        let mcr = |ttl| {
            message(
                "mcr.microsoft.com.",
                vec![a("mcr.microsoft.com.", ttl, "203.0.113.7")],
            )
        };
        let ntp = single("ntp.example.org.", 30, "203.0.113.7");
        for m in [mcr(60), ntp] {
            let ev = kernel_handles(&l, &mut store, &m, T0).expect("allowed");
            feed(&mut l, &mut store, &ev, T0).expect("answer");
        }
        l.drained();
        assert_eq!(
            open_ports(&store, "203.0.113.7"),
            HashSet::from([(6, 443), (17, 123)])
        );
        // NTP's 30 s run out; mcr's name is then refreshed again and again.
        let mut now = T0 + 31 * NS_PER_SEC;
        l.expire(&mut store, now).expect("expire");
        for _ in 0..3 {
            assert_eq!(open_ports(&store, "203.0.113.7"), HashSet::from([(6, 443)]));
            now += 20 * NS_PER_SEC;
            let ev = kernel_handles(&l, &mut store, &mcr(60), now).expect("allowed");
            feed(&mut l, &mut store, &ev, now).expect("answer");
            l.drained();
            l.expire(&mut store, now).expect("expire");
        }
        assert_eq!(open_ports(&store, "203.0.113.7"), HashSet::from([(6, 443)]));
    }

    #[test]
    fn a_second_port_set_no_handled_answer_explains_goes_at_the_next_write() {
        let mut store = FakeStore::default();
        let mut l = learner();
        store.ports.extend(l.port_sets.entries().copied());
        let mcr = single("mcr.microsoft.com.", 60, "203.0.113.7");
        let hcp = message(
            "x.hcp.eastus.azmk8s.io.",
            vec![a("x.hcp.eastus.azmk8s.io.", 30, "203.0.113.7")],
        );
        for m in [&mcr, &hcp] {
            let ev = kernel_handles(&l, &mut store, m, T0).expect("allowed");
            feed(&mut l, &mut store, &ev, T0).expect("answer");
        }
        l.drained();
        // NTP's answer reaches the kernel, but its event is lost (a full ring).
        let ntp = single("ntp.example.org.", 30, "203.0.113.7");
        kernel_handles(&l, &mut store, &ntp, T0).expect("allowed");
        // The hcp name expires: the rewrite keeps NTP's set, which may belong to an answer
        // still queued.
        let t1 = T0 + 31 * NS_PER_SEC;
        l.expire(&mut store, t1).expect("expire");
        assert_eq!(
            open_ports(&store, "203.0.113.7"),
            HashSet::from([(6, 443), (17, 123)])
        );
        // The ring is then found empty, so no answer explains the set: the next write,
        // for a refresh of mcr's name, drops it.
        l.drained();
        let t2 = t1 + NS_PER_SEC;
        let ev = kernel_handles(&l, &mut store, &mcr, t2).expect("allowed");
        feed(&mut l, &mut store, &ev, t2).expect("answer");
        assert_eq!(open_ports(&store, "203.0.113.7"), HashSet::from([(6, 443)]));
    }

    #[test]
    fn a_kernel_list_that_disagrees_with_the_answer_is_checked_address_by_address() {
        let mut store = Counting::default();
        let mut l = learner();
        let m = single("mcr.microsoft.com.", 60, "203.0.113.7");
        let mut ev = kernel_handles(&l, &mut store.maps, &m, T0).expect("allowed");
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        l.drained();
        let gets = store.gets.get();
        // A list naming another address: nothing is assumed about what the kernel wrote.
        ev.addrs[0] = key("198.51.100.1");
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        assert!(store.gets.get() > gets, "looked up");
        assert!(store.maps.learned.contains_key(&key("203.0.113.7")));
        assert!(!store.maps.learned.contains_key(&key("198.51.100.1")));
    }

    #[test]
    fn a_cname_chain_is_followed_whatever_the_case_of_its_names() {
        let mut store = FakeStore::default();
        let mut l = learner();
        let ev = answer(
            "MCR.microsoft.com.",
            vec![
                cname("mcr.Microsoft.com.", "Edge.Example."),
                a("eDGE.example.", 60, "203.0.113.7"),
                a("edge.example.org.", 60, "203.0.113.8"),
            ],
        );
        feed(&mut l, &mut store, &ev, T0).expect("answer");
        assert_eq!((l.counters.learned, l.counters.off_chain), (1, 1));
        assert!(store.learned.contains_key(&key("203.0.113.7")));
    }

    /// xorshift64: a fixed sequence of pseudo-random numbers.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// A random answer: a name of the policy (or not), maybe a CNAME, addresses from a
    /// small pool (so that names share them), some off the chain, various TTLs.
    fn random_answer(rng: &mut Rng) -> Message {
        const QUESTIONS: [&str; 8] = [
            "mcr.microsoft.com.",
            "MCR.microsoft.com.",
            "a.hcp.eastus.azmk8s.io.",
            "b.HCP.eastus.azmk8s.io.",
            "ntp.example.org.",
            "hcp.eastus.azmk8s.io.",
            "evil.example.",
            "c.d.hcp.eastus.azmk8s.io.",
        ];
        const TTLS: [u32; 6] = [0, 5, 30, 60, 300, 3600];
        let q = QUESTIONS[rng.below(QUESTIONS.len())];
        let mut records = Vec::new();
        let mut owner = q;
        if rng.below(3) == 0 {
            records.push(cname(q, "Edge.example."));
            owner = "edge.EXAMPLE.";
        }
        for _ in 0..=rng.below(5) {
            let owner = if rng.below(6) == 0 {
                "other.example."
            } else {
                owner
            };
            let ttl = TTLS[rng.below(TTLS.len())];
            let i = 1 + rng.below(8);
            records.push(if rng.below(4) == 0 {
                aaaa(owner, ttl, &format!("2001:db8::{i}"))
            } else {
                a(owner, ttl, &format!("203.0.113.{i}"))
            });
        }
        message(q, records)
    }

    /// The learner's reading of an answer before `dns::wire`, kept as the reference: hickory
    /// decodes the message, and the question's key, the CNAME chain and the model of the
    /// kernel's writes are computed from its records as the learner computed them.
    mod before {
        use egress_common::{Addr, DNS_MAX_LEARNED};
        use hickory_proto::{
            op::{Message, MessageType},
            rr::{DNSClass, Name, RData},
        };

        use super::super::{MAX_CHAIN, to_key};
        use crate::dns::wire::policy_key_of;

        pub struct Reading {
            /// The question's key; `None` when a label is one no rule can match.
            pub key: Option<String>,
            /// The A/AAAA records on the chain: address and TTL.
            pub learned: Vec<(Addr, u32)>,
            pub off_chain: u64,
            /// The class IN A/AAAA records among the first `DNS_MAX_LEARNED`.
            pub kernel: Vec<(Addr, u32)>,
        }

        /// `None` when the learner counted the answer malformed.
        pub fn read(bytes: &[u8]) -> Option<Reading> {
            let msg = Message::from_vec(bytes).ok()?;
            let [query] = msg.queries.as_slice() else {
                return None;
            };
            if msg.metadata.message_type != MessageType::Response {
                return None;
            }
            let mut key = String::new();
            let key = policy_key_of(query.name.iter(), &mut key).then_some(key);
            let chain = cname_chain(&msg, &query.name);
            let (mut learned, mut off_chain) = (Vec::new(), 0);
            for record in &msg.answers {
                let addr = match &record.data {
                    RData::A(a) => to_key(a.0.into()),
                    RData::AAAA(a) => to_key(a.0.into()),
                    _ => continue,
                };
                if chain.contains(&&record.name) {
                    learned.push((addr, record.ttl));
                } else {
                    off_chain += 1;
                }
            }
            let kernel = (msg.answers.iter().take(DNS_MAX_LEARNED))
                .filter_map(|record| match (&record.data, record.dns_class) {
                    (RData::A(a), DNSClass::IN) => Some((to_key(a.0.into()), record.ttl)),
                    (RData::AAAA(a), DNSClass::IN) => Some((to_key(a.0.into()), record.ttl)),
                    _ => None,
                })
                .collect();
            Some(Reading {
                key,
                learned,
                off_chain,
                kernel,
            })
        }

        fn cname_chain<'m>(msg: &'m Message, qname: &'m Name) -> Vec<&'m Name> {
            let mut chain = vec![qname];
            for _ in 0..MAX_CHAIN {
                let before = chain.len();
                for r in &msg.answers {
                    if let RData::CNAME(target) = &r.data
                        && chain.contains(&&r.name)
                        && !chain.contains(&&target.0)
                    {
                        chain.push(&target.0);
                    }
                }
                if chain.len() == before {
                    break;
                }
            }
            chain
        }
    }

    /// An answer with a CNAME chain of up to 20 links (past `MAX_CHAIN`), its records in any
    /// order (following it takes up to one pass per link), sometimes looping back, with
    /// addresses on the chain and off it, in classes other than IN too.
    fn chained_answer(rng: &mut Rng) -> Message {
        const Q: [&str; 4] = [
            "mcr.microsoft.com.",
            "a.HCP.eastus.azmk8s.io.",
            "ntp.example.org.",
            "evil.example.",
        ];
        let q = Q[rng.below(Q.len())];
        let links = rng.below(21);
        let link = |i: usize| {
            if i == 0 {
                q.to_owned()
            } else {
                format!("c{i}.Example.")
            }
        };
        let mut records = Vec::new();
        for i in 0..links {
            records.push(cname(&link(i), &link(i + 1).to_lowercase()));
        }
        if links > 0 && rng.below(4) == 0 {
            records.push(cname(&link(links), &link(rng.below(links))));
        }
        for _ in 0..rng.below(8) {
            let owner = if rng.below(5) == 0 {
                "off.example.".to_owned()
            } else {
                link(rng.below(links + 1)).to_uppercase()
            };
            let i = 1 + rng.below(20);
            let mut r = if rng.below(3) == 0 {
                aaaa(&owner, 60 * i as u32, &format!("2001:db8::{i}"))
            } else {
                a(&owner, 60 * i as u32, &format!("203.0.113.{i}"))
            };
            if rng.below(6) == 0 {
                r.dns_class = [DNSClass::CH, DNSClass::ANY, DNSClass::NONE][rng.below(3)];
            }
            records.push(r);
        }
        match rng.below(4) {
            // Each pass over the records then follows one link.
            0 => records.reverse(),
            1 => {}
            _ => {
                for i in (1..records.len()).rev() {
                    records.swap(i, rng.below(i + 1));
                }
            }
        }
        message(q, records)
    }

    #[test]
    fn the_learner_reads_answers_as_it_did_with_hickory() {
        let policy = parse(
            &POLICY.replace(
                "max_ips_per_name: 3\n  max_ips: 5",
                "max_ips_per_name: 100\n  max_ips: 100",
            ),
            "learn.yaml",
        )
        .expect("policy");
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let (mut malformed, mut unmatched, mut answered, mut agreed) = (0, 0, 0, 0);
        for i in 0..6_000 {
            let m = if i % 2 == 0 {
                random_answer(&mut rng)
            } else {
                chained_answer(&mut rng)
            };
            let mut bytes = m.to_vec().expect("encodes");
            for _ in 0..[0, 0, 1, 2][rng.below(4)] {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.below(bytes.len());
                match rng.below(4) {
                    0 => bytes[at] ^= 1 << rng.below(8),
                    1 => bytes[at] = [0, 0xc0, 12, 0x3f][rng.below(4)],
                    2 => bytes.truncate(at),
                    _ => bytes[at] = rng.below(256) as u8,
                }
            }
            let reading = before::read(&bytes);
            let mut ev = event(&bytes);
            // The kernel's list: what the reading says it wrote, or something else.
            let mut kernel: Vec<Addr> = (reading.iter().flat_map(|r| &r.kernel))
                .map(|(a, _)| *a)
                .collect();
            match rng.below(6) {
                0 => drop(kernel.pop()),
                1 => kernel.push(key("198.51.100.1")),
                _ => {}
            }
            for (slot, addr) in ev.addrs.iter_mut().zip(&kernel) {
                *slot = *addr;
            }
            ev.learned = kernel.len().min(DNS_MAX_LEARNED) as u16;

            let compiled = compile(&policy).expect("compiles");
            let mut l = Learner::new(compiled.names, compiled.port_sets, policy.dns.clone());
            let mut store = FakeStore::default();
            feed(&mut l, &mut store, &ev, T0).expect("answer");
            let at = format!("message {i}: {bytes:02x?}");
            let Some(reading) = reading else {
                malformed += 1;
                let want = LearnerCounters {
                    malformed: 1,
                    ..Default::default()
                };
                assert_eq!(l.counters, want, "{at}");
                continue;
            };
            if reading
                .key
                .as_ref()
                .and_then(|k| l.names.lookup(k))
                .is_none()
            {
                unmatched += 1;
                let want = LearnerCounters {
                    unmatched: 1,
                    ..Default::default()
                };
                assert_eq!(l.counters, want, "{at}");
                continue;
            }
            answered += 1;
            let c = l.counters;
            assert_eq!(
                (c.answers, c.learned, c.off_chain, c.malformed, c.unmatched),
                (1, reading.learned.len() as u64, reading.off_chain, 0, 0),
                "{at}"
            );
            let mut want: HashMap<Addr, u64> = HashMap::new();
            for (addr, ttl) in &reading.learned {
                let e = want.entry(*addr).or_default();
                *e = (*e).max(l.expiry(*ttl, T0));
            }
            let got: HashMap<Addr, u64> = (l.learned())
                .map(|(addr, mut names)| {
                    let (name, expires) = names.next().expect("a name");
                    assert_eq!(Some(name), reading.key.as_deref(), "{at}");
                    (*addr, expires)
                })
                .collect();
            assert_eq!(got, want, "{at}");
            // The model of the kernel's writes: only when its list agrees with the answer.
            let mut model: Vec<(Addr, u64)> = Vec::new();
            if (reading.kernel.iter().map(|(a, _)| a)).eq(&ev.addrs[..usize::from(ev.learned)]) {
                agreed += 1;
                for (addr, ttl) in &reading.kernel {
                    let until = l.expiry(*ttl, T0);
                    match model.iter_mut().find(|(a, _)| a == addr) {
                        Some((_, u)) => *u = (*u).max(until),
                        None => model.push((*addr, until)),
                    }
                }
            }
            assert_eq!(l.kernel_wrote, model, "{at}");
        }
        assert!(
            malformed > 500 && unmatched > 500 && answered > 2_000 && agreed > 1_000,
            "{malformed} malformed, {unmatched} unmatched, {answered} answered ({agreed} with the kernel's list)"
        );
    }

    /// What must hold whenever the agent has caught up with the kernel: `LEARNED` holds
    /// every tracked address with the port set the learner keeps for it and no second one,
    /// that set is the union of its names' ports, and each name's list and each address's
    /// names agree.
    /// `now`: an expiry pass has just run at this time (`None`: none has).
    fn check_view(l: &Learner, store: &FakeStore, now: Option<u64>, at: &str) {
        for (addr, s) in &l.index {
            let slot = &l.slots[*s as usize];
            let v = store
                .learned
                .get(addr)
                .unwrap_or_else(|| panic!("{at}: {addr:?} missing"));
            assert_eq!(
                (v.port_set, v.extra_set),
                (slot.port_set, NO_PORT_SET),
                "{at}: entry of {addr:?} (every answer handled: no second port set is left)"
            );
            assert_eq!(slot.extra_set, NO_PORT_SET, "{at}: view of {addr:?}");
            let want = (slot.names())
                .map(|h| {
                    l.names
                        .lookup(&l.name_ids.get(h.name).name)
                        .expect("allowed")
                        .0
                        .clone()
                })
                .reduce(|a, b| a.union(&b))
                .expect("a name");
            let mut registry = l.port_sets.clone();
            assert_eq!(
                registry.intern(&want),
                v.port_set,
                "{at}: ports of {addr:?}"
            );
            for h in slot.names() {
                let expired = now.is_some_and(|now| h.expires <= now);
                assert!(!expired, "{at}: {addr:?} kept past its expiry");
                assert_eq!(
                    l.name_ids.get(h.name).addrs[h.at as usize],
                    *s,
                    "{at}: list of {}",
                    h.name
                );
            }
        }
        for id in l.name_ids.live() {
            for (at, s) in l.name_ids.get(id).addrs.iter().enumerate() {
                let held = l.slots[*s as usize].names().find(|h| h.name == id);
                assert_eq!(held.map(|h| h.at as usize), Some(at), "{at}: name {id}");
            }
        }
    }

    /// What must hold once every journal change is written: `LEARNED_NAMES` holds a record
    /// of each (address, name) pair and no other, each at most the slack early.
    fn check_journal(l: &mut Learner, store: &mut FakeStore, rng: &mut Rng, at: &str) {
        while !store.flush(l, 1 + rng.below(4)) {}
        let pairs: HashMap<LearnedNameKey, u64> = (l.learned())
            .flat_map(|(addr, names)| names.map(|(n, e)| (LearnedNameKey::new(*addr, n), e)))
            .collect();
        let mut recorded: Vec<_> = store.names.keys().collect();
        let mut held: Vec<_> = pairs.keys().collect();
        recorded.sort();
        held.sort();
        assert_eq!(recorded, held, "{at}: the records are the pairs");
        for (key, expires) in &pairs {
            let written = store.names[key];
            assert!(
                written <= *expires && !journal::stale(written, *expires),
                "{at}: record of {key:?} written with {written}, the pair expires at {expires}"
            );
        }
    }

    #[test]
    fn the_view_of_learned_stays_what_the_store_holds() {
        for seed in 1..=24u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut store = FakeStore::default();
            let mut l = learner();
            store.ports.extend(l.port_sets.entries().copied());
            let mut queue = std::collections::VecDeque::new();
            let mut now = T0;
            for step in 0..300 {
                let at = format!("seed {seed} step {step}");
                for _ in 0..=rng.below(3) {
                    now += rng.below(100) as u64 * 1_000_000;
                    if let Some(ev) = kernel_handles(&l, &mut store, &random_answer(&mut rng), now)
                    {
                        queue.push_back(ev);
                    }
                }
                // The agent reads the ring a moment later, and not always all of it.
                now += rng.below(100) as u64 * 1_000_000;
                let keep = if rng.below(3) == 0 { rng.below(3) } else { 0 };
                while queue.len() > keep {
                    let ev = queue.pop_front().expect("queued");
                    feed(&mut l, &mut store, &ev, now).expect("answer");
                }
                if rng.below(2) == 0 {
                    store.flush(&mut l, 1 + rng.below(4));
                }
                if !queue.is_empty() {
                    continue;
                }
                l.drained();
                check_view(&l, &store, None, &at);
                if rng.below(4) == 0 {
                    check_journal(&mut l, &mut store, &mut rng, &at);
                }
                if rng.below(4) == 0 {
                    now += rng.below(40) as u64 * NS_PER_SEC;
                }
                l.expire(&mut store, now).expect("expire");
                check_view(&l, &store, Some(now), &at);
                if step == 150 {
                    let policy = parse(
                        "allow:\n  - fqdn: mcr.microsoft.com\n    ports: [TCP:8443]\n  - fqdn: \"*.hcp.eastus.azmk8s.io\"\n    ports: [HTTPS:443]\ndns:\n  min_ttl: 10\n  max_ttl: 600\n  max_ips_per_name: 2\n  max_ips: 4\n",
                        "reload.yaml",
                    )
                    .expect("policy");
                    let compiled = crate::compile::compile_with(&policy, l.port_sets().clone())
                        .expect("compiles");
                    let sets = compiled.sets_in_use().expect("names");
                    store.ports.extend(compiled.port_sets.entries().copied());
                    l.reload(
                        &mut store,
                        compiled.names,
                        compiled.port_sets,
                        policy.dns,
                        &sets,
                        now,
                    )
                    .expect("reload");
                    check_view(&l, &store, Some(now), &at);
                    check_journal(&mut l, &mut store, &mut rng, &at);
                }
            }
        }
    }
}
