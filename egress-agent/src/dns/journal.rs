//! Keeps `LEARNED_NAMES` (see `egress-common`) in step with the learner's (address, name)
//! pairs, so that a restarted agent and `status` know which names each learned address came
//! from. The learner reports each change as it makes it: a flush costs what changed since
//! the last one, not a pass over every pair, and the agent keeps no copy of the map.
use egress_common::{Addr, LearnedName, LearnedNameKey};

use super::slot_bits::SlotBits;

/// An expiry that moved by less than this is not rewritten: names refreshed by a stream of
/// answers would otherwise cost a map write each per flush. A restored record may so end up
/// to this much early; the kernel's own entry keeps the address allowed until its own
/// expiry, and the next answer records the name again.
const EXPIRY_SLACK_NS: u64 = 30 * 1_000_000_000;

/// What `written` holds for a pair whose record is not written.
pub const UNWRITTEN: u64 = 0;

/// Whether a pair expiring at `expires` needs its record (last written with `written`)
/// rewritten.
pub fn stale(written: u64, expires: u64) -> bool {
    written == UNWRITTEN || expires.abs_diff(written) >= EXPIRY_SLACK_NS
}

/// What is still to be written and deleted.
#[derive(Default)]
pub struct NameJournal {
    /// Slots holding a pair whose record is stale, each listed once (`listed`).
    dirty: Vec<u32>,
    listed: SlotBits,
    /// Records of pairs that went.
    gone: Vec<LearnedNameKey>,
}

/// Records to write and records to delete (deletes first: a pair that went and came back
/// is in both), and whether that is all (see [`NameJournal::pop_dirty`]).
pub struct Changes {
    pub put: Vec<(LearnedNameKey, LearnedName)>,
    pub delete: Vec<LearnedNameKey>,
    pub complete: bool,
}

impl NameJournal {
    /// A pair in slot `s` has a stale record.
    pub fn touched(&mut self, s: u32) {
        if self.listed.insert(s) {
            self.dirty.push(s);
        }
    }

    /// The pair (`addr`, `name`) went; its record, if written, goes too.
    pub fn forgotten(&mut self, addr: Addr, name: &str, written: u64) {
        if written != UNWRITTEN {
            self.gone.push(LearnedNameKey::new(addr, name));
        }
    }

    /// A record to delete whatever the learner holds (a previous agent's that is not taken
    /// over).
    pub fn delete(&mut self, key: LearnedNameKey) {
        self.gone.push(key);
    }

    /// The records that went since the last call.
    pub fn take_gone(&mut self) -> Vec<LearnedNameKey> {
        std::mem::take(&mut self.gone)
    }

    /// A slot to write the stale records of; `None` once all are written.
    pub fn pop_dirty(&mut self) -> Option<u32> {
        let s = self.dirty.pop();
        match s {
            Some(s) => self.listed.remove(s),
            // A burst's list is not kept at its peak size.
            None => self.dirty.shrink_to_fit(),
        }
        s
    }

    pub fn is_behind(&self) -> bool {
        !self.dirty.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_record_is_stale_until_written_and_again_once_its_expiry_moved_past_the_slack() {
        assert!(stale(UNWRITTEN, 100 * SEC));
        assert!(!stale(100 * SEC, 100 * SEC));
        assert!(!stale(100 * SEC, 129 * SEC));
        assert!(stale(100 * SEC, 130 * SEC));
    }

    #[test]
    fn a_slot_is_listed_once_until_popped_and_only_written_records_are_deleted() {
        let mut journal = NameJournal::default();
        journal.touched(4);
        journal.touched(9);
        journal.touched(4);
        assert!(journal.is_behind());
        let mut popped = vec![journal.pop_dirty(), journal.pop_dirty()];
        popped.sort();
        assert_eq!(popped, vec![Some(4), Some(9)]);
        assert_eq!(journal.pop_dirty(), None);
        journal.touched(4);
        assert_eq!(journal.pop_dirty(), Some(4), "listed again once popped");
        journal.forgotten([1; 16], "x.example.com", UNWRITTEN);
        journal.forgotten([2; 16], "y.example.com", 7 * SEC);
        assert_eq!(
            journal.take_gone(),
            vec![LearnedNameKey::new([2; 16], "y.example.com")]
        );
        assert!(journal.take_gone().is_empty());
    }
}
