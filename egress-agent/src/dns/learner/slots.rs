//! The learner's tables: a dense slot per address holding the names it was learned
//! through, and the interned names with the slots of their addresses.
use std::{collections::HashMap, sync::Arc};

use egress_common::{Addr, NO_PORT_SET};

use super::{Learner, NO_NAME, SCAN_LIMIT};
use crate::dns::journal::{self, UNWRITTEN};

/// One (name, address) pair, kept with the address.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    /// The name's id in [`NameIds`].
    pub(super) name: u32,
    /// Where the address sits in the name's list of addresses.
    pub(super) at: u32,
    /// When the pair expires, boot-time ns.
    pub(super) expires: u64,
    /// The expiry its `LEARNED_NAMES` record was last written with (`UNWRITTEN`).
    pub(super) written: u64,
}

const UNUSED: Held = Held {
    name: NO_NAME,
    at: 0,
    expires: 0,
    written: UNWRITTEN,
};

/// One tracked address.
pub(super) struct Slot {
    pub(super) addr: Addr,
    /// The first name it was learned through (`UNUSED` in a free slot); `more` holds the
    /// others, which few addresses have.
    pub(super) first: Held,
    #[expect(
        clippy::box_collection,
        reason = "a thin pointer: 8 bytes in every slot where a Vec takes 24"
    )]
    pub(super) more: Option<Box<Vec<Held>>>,
    /// `LEARNED`'s port sets for the address as the agent last wrote or read them
    /// (`port_set` is `NO_PORT_SET` until then: no entry ever holds that).
    pub(super) port_set: u32,
    pub(super) extra_set: u32,
}

impl Slot {
    pub(super) fn new(addr: Addr) -> Self {
        Self {
            addr,
            first: UNUSED,
            more: None,
            port_set: NO_PORT_SET,
            extra_set: NO_PORT_SET,
        }
    }

    pub(super) fn names(&self) -> impl Iterator<Item = &Held> {
        (self.first.name != NO_NAME)
            .then_some(&self.first)
            .into_iter()
            .chain(self.more.iter().flat_map(|m| m.iter()))
    }

    pub(super) fn names_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        (self.first.name != NO_NAME)
            .then_some(&mut self.first)
            .into_iter()
            .chain(self.more.iter_mut().flat_map(|m| m.iter_mut()))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.first.name == NO_NAME
    }

    /// A name whose pair has expired at `now`, if any.
    pub(super) fn expired_name(&self, now: u64) -> Option<u32> {
        self.names().find(|h| h.expires <= now).map(|h| h.name)
    }

    pub(super) fn held_mut(&mut self, name: u32) -> Option<&mut Held> {
        if self.first.name == name {
            return Some(&mut self.first);
        }
        self.more.as_mut()?.iter_mut().find(|h| h.name == name)
    }

    pub(super) fn add(&mut self, held: Held) {
        if self.is_empty() {
            self.first = held;
        } else {
            self.more.get_or_insert_default().push(held);
        }
    }

    /// Removes the pair with `name`, keeping `first` in use while any pair is left.
    pub(super) fn take(&mut self, name: u32) -> Option<Held> {
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
pub(super) struct NameSlot {
    pub(super) name: Arc<str>,
    /// Its port set in the policy (its `NAMES` entry's).
    pub(super) set: u32,
    /// The slots of the addresses learned through it.
    pub(super) addrs: Vec<u32>,
}

/// Interned question names: ids are reused once a name holds no address.
#[derive(Default)]
pub(super) struct NameIds {
    pub(super) ids: HashMap<Arc<str>, u32>,
    pub(super) slots: Vec<Option<NameSlot>>,
    pub(super) free: Vec<u32>,
}

impl NameIds {
    pub(super) fn intern(&mut self, name: &str, set: u32) -> u32 {
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

    pub(super) fn get(&self, id: u32) -> &NameSlot {
        self.slots[id as usize].as_ref().expect("a live name id")
    }

    pub(super) fn get_mut(&mut self, id: u32) -> &mut NameSlot {
        self.slots[id as usize].as_mut().expect("a live name id")
    }

    pub(super) fn release(&mut self, id: u32) {
        if let Some(slot) = self.slots[id as usize].take() {
            self.ids.remove(&slot.name);
            self.free.push(id);
        }
    }

    pub(super) fn live(&self) -> Vec<u32> {
        self.ids.values().copied().collect()
    }
}

impl Learner {
    /// Records that `addr` was learned through `name` until `expires` (or later, if it
    /// already was); returns its slot. `written`: the expiry of the pair's record in
    /// `LEARNED_NAMES`, if a new pair has one.
    pub(super) fn hold(&mut self, name: u32, addr: Addr, expires: u64, written: u64) -> u32 {
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
    pub(super) fn forget(&mut self, name: u32, s: u32) {
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
}
