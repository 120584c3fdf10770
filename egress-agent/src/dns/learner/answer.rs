//! Handling one answer: which addresses it justifies (along its CNAME chain), and a model
//! of what the kernel wrote from it.
use egress_common::{Addr, DNS_MAX_LEARNED, addr::to_key};

use crate::{dns::journal::UNWRITTEN, lifecycle};

use super::{
    LearnedStore, Learner, NS_PER_SEC,
    chain::{cname_chain, on_chain},
};
use crate::dns::{
    answer::DnsAnswer,
    wire::{CLASS_IN, Response},
};

impl Learner {
    pub(super) fn expiry(&self, ttl: u32, now: u64) -> u64 {
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
            if self.announce {
                lifecycle::emit(
                    "learned",
                    serde_json::json!({
                        "name": self.qname,
                        "addr": addr.to_string(),
                        "ttl": record.ttl,
                        "ports": self.names.lookup(&self.qname).map(|(p, _)| p.to_string()),
                    }),
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
}
