//! The in-flight table: guest cluster ranges with an allocating write
//! between its reservation and its link (see `Image`'s module docs). Another
//! request that would change or read through those clusters' mappings waits
//! until the range is removed, then translates again.
//!
//! A handful of entries at a time (one per allocating request in flight), so
//! a vector with a linear scan beats a hash set: no hashing, no allocation
//! once it has grown to the queue depth.

/// Guest cluster ranges `first..=last`, one per allocating request in flight.
#[derive(Debug, Default)]
pub struct InFlight {
    ranges: Vec<(u64, u64)>,
}

impl InFlight {
    /// Records an allocation in flight on clusters `first..=last`.
    pub fn insert(&mut self, first: u64, last: u64) {
        self.ranges.push((first, last));
    }

    /// Removes one record of `first..=last` (made by [`InFlight::insert`]).
    pub fn remove(&mut self, first: u64, last: u64) {
        if let Some(i) = self.ranges.iter().position(|&r| r == (first, last)) {
            self.ranges.swap_remove(i);
        }
    }

    /// Whether any cluster of `first..=last` has an allocation in flight.
    pub fn overlaps(&self, first: u64, last: u64) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= last && first <= b)
    }
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    #[test]
    fn ranges_overlap_and_leave_one_at_a_time() {
        let mut f = InFlight::default();
        assert!(!f.overlaps(0, u64::MAX));
        f.insert(4, 7);
        f.insert(4, 7);
        f.insert(10, 10);
        assert!(f.overlaps(7, 9));
        assert!(f.overlaps(0, 4));
        assert!(!f.overlaps(8, 9));
        assert!(f.overlaps(10, 10));
        f.remove(4, 7);
        assert!(f.overlaps(5, 5), "the second record of 4..=7 stays");
        f.remove(4, 7);
        assert!(!f.overlaps(0, 9));
        f.remove(10, 10);
        assert!(!f.overlaps(0, u64::MAX));
    }
}
