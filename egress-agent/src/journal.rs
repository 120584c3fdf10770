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

/// Records to write and records to delete, and whether that is all (see `changes`).
pub struct Changes {
    pub put: Vec<(LearnedNameKey, LearnedName)>,
    pub delete: Vec<LearnedNameKey>,
    pub complete: bool,
}

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

    /// The changes that make the map hold `learned`, (address, name, expiry) triples, with
    /// at most `budget` records to write: after a burst of new addresses the rest waits for
    /// the next flush (`complete` is false), so that one flush never stalls the agent's
    /// handling of answers. A name too long for the record (never a valid DNS name) is left
    /// out.
    pub fn changes<'a>(
        &mut self,
        learned: impl Iterator<Item = (&'a Addr, &'a str, u64)>,
        budget: usize,
    ) -> Changes {
        self.flush = self.flush.wrapping_add(1);
        let flush = self.flush;
        let mut put = Vec::new();
        let mut complete = true;
        for (addr, name, expires) in learned {
            let key = LearnedNameKey::new(*addr, name);
            let written = self.written.get_mut(&key);
            if let Some((at, seen)) = written {
                // Kept either way: what is written stays until it is rewritten.
                *seen = flush;
                if at.abs_diff(expires) < EXPIRY_SLACK_NS {
                    continue;
                }
            }
            if put.len() == budget {
                complete = false;
                continue;
            }
            if let Some(value) = LearnedName::new(name, expires) {
                put.push((key, value));
                self.written.insert(key, (expires, flush));
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
        Changes {
            put,
            delete,
            complete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const BUDGET: usize = 100;

    #[test]
    fn only_what_changed_is_written_and_what_went_is_deleted() {
        let (a, b) = ([1; 16], [2; 16]);
        let key = LearnedNameKey::new;
        let value = |name, at| LearnedName::new(name, at).unwrap();
        let mut journal = NameJournal::from_pinned(&[(
            key(a, "x.example.com"),
            value("x.example.com", 100 * SEC),
        )]);
        let Changes { put, delete, .. } = journal.changes(
            [
                (&a, "x.example.com", 100 * SEC),
                (&b, "y.example.com", 70 * SEC),
            ]
            .into_iter(),
            BUDGET,
        );
        assert_eq!(
            put,
            vec![(key(b, "y.example.com"), value("y.example.com", 70 * SEC))]
        );
        assert!(delete.is_empty());
        // A refresh within the slack writes nothing; past it, the record is rewritten.
        let Changes { put, delete, .. } =
            journal.changes([(&b, "y.example.com", 99 * SEC)].into_iter(), BUDGET);
        assert!(put.is_empty());
        assert_eq!(delete, vec![key(a, "x.example.com")]);
        let Changes { put, .. } =
            journal.changes([(&b, "y.example.com", 100 * SEC)].into_iter(), BUDGET);
        assert_eq!(
            put,
            vec![(key(b, "y.example.com"), value("y.example.com", 100 * SEC))]
        );
        let Changes {
            put,
            delete,
            complete,
        } = journal.changes([(&b, "y.example.com", 100 * SEC)].into_iter(), BUDGET);
        assert!(put.is_empty() && delete.is_empty() && complete);
    }

    #[test]
    fn a_burst_is_written_over_several_flushes_and_nothing_is_lost_meanwhile() {
        let addrs: Vec<Addr> = (0..5u8).map(|i| [i; 16]).collect();
        let learned = || addrs.iter().map(|a| (a, "x.example.com", 100 * SEC));
        let mut journal = NameJournal::default();
        let mut written = Vec::new();
        for expect_complete in [false, false, true] {
            let changes = journal.changes(learned(), 2);
            assert!(changes.delete.is_empty());
            assert_eq!(changes.complete, expect_complete);
            written.extend(changes.put.into_iter().map(|(k, _)| k));
        }
        written.sort();
        let mut all: Vec<_> = addrs
            .iter()
            .map(|a| LearnedNameKey::new(*a, "x.example.com"))
            .collect();
        all.sort();
        assert_eq!(written, all);
        assert!(journal.changes(learned(), 2).put.is_empty());
    }
}
