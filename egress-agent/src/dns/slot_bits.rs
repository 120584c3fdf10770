//! One bit per slot of the learner's table of addresses.

/// A set of slot numbers, dense: a bit each, so marking and testing cost no hashing.
#[derive(Default)]
pub struct SlotBits(Vec<u64>);

impl SlotBits {
    pub fn contains(&self, s: u32) -> bool {
        let word = self.0.get(s as usize / 64).copied().unwrap_or(0);
        word & (1 << (s % 64)) != 0
    }

    /// Adds `s`; returns whether it was not there yet.
    pub fn insert(&mut self, s: u32) -> bool {
        let i = s as usize / 64;
        if i >= self.0.len() {
            self.0.resize(i + 1, 0);
        }
        let bit = 1 << (s % 64);
        let new = self.0[i] & bit == 0;
        self.0[i] |= bit;
        new
    }

    pub fn remove(&mut self, s: u32) {
        if let Some(word) = self.0.get_mut(s as usize / 64) {
            *word &= !(1 << (s % 64));
        }
    }

    pub fn clear(&mut self) {
        self.0.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_set_tested_and_cleared_one_by_one_or_all_at_once() {
        let mut bits = SlotBits::default();
        assert!(!bits.contains(130));
        assert!(bits.insert(130));
        assert!(!bits.insert(130), "already there");
        assert!(bits.insert(3));
        assert!(bits.contains(130) && bits.contains(3) && !bits.contains(131));
        bits.remove(130);
        assert!(!bits.contains(130) && bits.contains(3));
        bits.remove(9999);
        bits.clear();
        assert!(!bits.contains(3));
    }
}
