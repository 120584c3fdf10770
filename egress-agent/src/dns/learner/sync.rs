//! Keeping `LEARNED` what the bookkeeping says: writing an address's entry, taking back
//! what nothing justifies, and reading entries back after lost answers (the recheck).
use egress_common::{ALL_PORTS, Addr, LearnedValue, NO_PORT_SET, PortKey};

use super::{EXPIRY_SLACK_NS, LearnedStore, Learner};
use crate::policy::Ports;

impl Learner {
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
    pub(super) fn sync(
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
    pub(super) fn sync_slot(
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
