//! Keeps `LEARNED_NAMES` (see `egress-common`) in step with the learner's bookkeeping,
//! writing only what changed since the last flush, so that a restarted agent and `status`
//! know which names each learned address came from.
use std::collections::HashMap;

use egress_common::{Addr, LearnedName, LearnedNameKey};

/// An expiry that moved by less than this is not rewritten: names refreshed by a stream of
/// answers would otherwise cost a map write each per flush. A restored record may so end up
/// to this much early; the kernel's own entry keeps the address allowed until its own
/// expiry, and the next answer records the name again.
const EXPIRY_SLACK_NS: u64 = 30 * 1_000_000_000;

/// What was last written (40 bytes per (address, name) pair), each with the flush that last
/// saw it, so a flush needs no second table to find what went.
#[derive(Debug, Default)]
pub struct NameJournal {
    written: HashMap<LearnedNameKey, (u64, u32)>,
    flush: u32,
}

/// Records to write and records to delete.
pub type Changes = (Vec<(LearnedNameKey, LearnedName)>, Vec<LearnedNameKey>);

impl NameJournal {
    /// Starts from what the map holds (a previous agent's records).
    pub fn from_pinned(pinned: &[(LearnedNameKey, LearnedName)]) -> Self {
        Self {
            written: pinned
                .iter()
                .map(|(k, v)| (*k, (v.expires_ns, 0)))
                .collect(),
            flush: 0,
        }
    }

    /// The changes that make the map hold `learned`, (address, name, expiry) triples. A
    /// name too long for the record (never a valid DNS name) is left out.
    pub fn changes<'a>(
        &mut self,
        learned: impl Iterator<Item = (&'a Addr, &'a str, u64)>,
    ) -> Changes {
        self.flush = self.flush.wrapping_add(1);
        let flush = self.flush;
        let mut put = Vec::new();
        for (addr, name, expires) in learned {
            let key = LearnedNameKey::new(*addr, name);
            match self.written.get_mut(&key) {
                Some((at, seen)) if at.abs_diff(expires) < EXPIRY_SLACK_NS => *seen = flush,
                _ => {
                    if let Some(value) = LearnedName::new(name, expires) {
                        put.push((key, value));
                        self.written.insert(key, (expires, flush));
                    }
                }
            }
        }
        let mut delete = Vec::new();
        self.written.retain(|key, (_, seen)| {
            let keep = *seen == flush;
            if !keep {
                delete.push(*key);
            }
            keep
        });
        (put, delete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn only_what_changed_is_written_and_what_went_is_deleted() {
        let (a, b) = ([1; 16], [2; 16]);
        let key = LearnedNameKey::new;
        let value = |name, at| LearnedName::new(name, at).unwrap();
        let mut journal = NameJournal::from_pinned(&[(
            key(a, "x.example.com"),
            value("x.example.com", 100 * SEC),
        )]);
        let (put, delete) = journal.changes(
            [
                (&a, "x.example.com", 100 * SEC),
                (&b, "y.example.com", 70 * SEC),
            ]
            .into_iter(),
        );
        assert_eq!(
            put,
            vec![(key(b, "y.example.com"), value("y.example.com", 70 * SEC))]
        );
        assert!(delete.is_empty());
        // A refresh within the slack writes nothing; past it, the record is rewritten.
        let (put, delete) = journal.changes([(&b, "y.example.com", 99 * SEC)].into_iter());
        assert!(put.is_empty());
        assert_eq!(delete, vec![key(a, "x.example.com")]);
        let (put, _) = journal.changes([(&b, "y.example.com", 100 * SEC)].into_iter());
        assert_eq!(
            put,
            vec![(key(b, "y.example.com"), value("y.example.com", 100 * SEC))]
        );
        let (put, delete) = journal.changes([(&b, "y.example.com", 100 * SEC)].into_iter());
        assert!(put.is_empty() && delete.is_empty());
    }
}
