//! Expiry and the bounds: per name (`dns.max_ips_per_name`) and in total (`dns.max_ips`).
use egress_common::Addr;

use super::{LearnedStore, Learner};

impl Learner {
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
    pub(super) fn bound_name(
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
    pub(super) fn bound_total(
        &mut self,
        store: &mut impl LearnedStore,
        now: u64,
    ) -> anyhow::Result<()> {
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
