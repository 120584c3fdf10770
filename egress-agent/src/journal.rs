//! Keeps `LEARNED_NAMES` (see `egress-common`) equal to the learner's bookkeeping, writing
//! only what changed since the last flush, so that a restarted agent and `status` know which
//! names each learned address came from.
use std::collections::HashMap;

use egress_common::{Addr, LearnedNameKey};

/// What was last written.
#[derive(Debug, Default)]
pub struct NameJournal {
    written: HashMap<LearnedNameKey, u64>,
}

/// Records to write and records to delete.
pub type Changes = (Vec<(LearnedNameKey, u64)>, Vec<LearnedNameKey>);

impl NameJournal {
    /// Starts from what the map holds (a previous agent's records).
    pub fn from_pinned(pinned: &[(LearnedNameKey, u64)]) -> Self {
        Self {
            written: pinned.iter().copied().collect(),
        }
    }

    /// The changes that make the map hold `learned`, (address, name, expiry) triples.
    /// A name too long for a key (never a valid DNS name) is left out.
    pub fn changes<'a>(
        &mut self,
        learned: impl Iterator<Item = (&'a Addr, &'a str, u64)>,
    ) -> Changes {
        let now: HashMap<LearnedNameKey, u64> = learned
            .filter_map(|(addr, name, expires)| Some((LearnedNameKey::new(*addr, name)?, expires)))
            .collect();
        let put = now
            .iter()
            .filter(|(k, v)| self.written.get(*k) != Some(*v))
            .map(|(k, v)| (*k, *v))
            .collect();
        let delete = self
            .written
            .keys()
            .filter(|k| !now.contains_key(*k))
            .copied()
            .collect();
        self.written = now;
        (put, delete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_changed_is_written_and_what_went_is_deleted() {
        let a = [1; 16];
        let b = [2; 16];
        let key = |addr, name| LearnedNameKey::new(addr, name).unwrap();
        let mut journal = NameJournal::from_pinned(&[(key(a, "x.example.com"), 5)]);
        let (put, delete) =
            journal.changes([(&a, "x.example.com", 5), (&b, "y.example.com", 7)].into_iter());
        assert_eq!(put, vec![(key(b, "y.example.com"), 7)]);
        assert!(delete.is_empty());
        let (put, delete) = journal.changes([(&b, "y.example.com", 9)].into_iter());
        assert_eq!(put, vec![(key(b, "y.example.com"), 9)]);
        assert_eq!(delete, vec![key(a, "x.example.com")]);
        let (put, delete) = journal.changes([(&b, "y.example.com", 9)].into_iter());
        assert!(put.is_empty() && delete.is_empty());
    }
}
