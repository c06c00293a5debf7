//! Arrays of refcounts, one per host cluster: the in-memory refcount table
//! the checker builds from the metadata (QEMU's "IMRT"), and the copy of the
//! on-disk refcounts it compares against.
//!
//! Values saturate at the image's `refcount_max`, as QEMU's array has the
//! image's refcount width: a cluster referenced more often than the width
//! can express is an overflow error, not a wrap-around. Storage is the
//! narrowest machine word that holds the width (one byte for 1..8 bits), so
//! memory is proportional to the number of host clusters.

use crate::format::refcount;

#[derive(Debug, Clone)]
enum Cells {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
}

/// A growable array of refcounts of one width.
#[derive(Debug, Clone)]
pub(crate) struct RefArray {
    cells: Cells,
    max: u64,
}

impl RefArray {
    /// `len` zero refcounts of width `1 << order` bits.
    pub fn new(order: u32, len: usize) -> Self {
        let cells = match order {
            0..=3 => Cells::U8(vec![0; len]),
            4 => Cells::U16(vec![0; len]),
            5 => Cells::U32(vec![0; len]),
            _ => Cells::U64(vec![0; len]),
        };
        RefArray {
            cells,
            max: refcount::max_value(order),
        }
    }

    /// The largest representable refcount.
    #[cfg(test)]
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Number of clusters covered.
    pub fn len(&self) -> usize {
        match &self.cells {
            Cells::U8(v) => v.len(),
            Cells::U16(v) => v.len(),
            Cells::U32(v) => v.len(),
            Cells::U64(v) => v.len(),
        }
    }

    /// Grows (with zeroes) or shrinks to `len` clusters.
    pub fn resize(&mut self, len: usize) {
        match &mut self.cells {
            Cells::U8(v) => v.resize(len, 0),
            Cells::U16(v) => v.resize(len, 0),
            Cells::U32(v) => v.resize(len, 0),
            Cells::U64(v) => v.resize(len, 0),
        }
    }

    /// Sets every refcount to 0, keeping the length.
    pub fn clear(&mut self) {
        match &mut self.cells {
            Cells::U8(v) => v.fill(0),
            Cells::U16(v) => v.fill(0),
            Cells::U32(v) => v.fill(0),
            Cells::U64(v) => v.fill(0),
        }
    }

    /// The refcount of cluster `i` (0 beyond the end).
    #[inline(always)]
    pub fn get(&self, i: usize) -> u64 {
        match &self.cells {
            Cells::U8(v) => v.get(i).map_or(0, |x| u64::from(*x)),
            Cells::U16(v) => v.get(i).map_or(0, |x| u64::from(*x)),
            Cells::U32(v) => v.get(i).map_or(0, |x| u64::from(*x)),
            Cells::U64(v) => v.get(i).copied().unwrap_or(0),
        }
    }

    /// Sets the refcount of cluster `i` (ignored beyond the end; the value
    /// is capped at the maximum).
    #[inline]
    pub fn set(&mut self, i: usize, value: u64) {
        let value = value.min(self.max);
        match &mut self.cells {
            Cells::U8(v) => {
                if let Some(x) = v.get_mut(i) {
                    *x = value as u8;
                }
            }
            Cells::U16(v) => {
                if let Some(x) = v.get_mut(i) {
                    *x = value as u16;
                }
            }
            Cells::U32(v) => {
                if let Some(x) = v.get_mut(i) {
                    *x = value as u32;
                }
            }
            Cells::U64(v) => {
                if let Some(x) = v.get_mut(i) {
                    *x = value;
                }
            }
        }
    }

    /// Adds one reference to cluster `i` (which must be in range). Returns
    /// `false`, changing nothing, if the refcount is already at the maximum.
    #[inline(always)]
    pub fn inc(&mut self, i: usize) -> bool {
        let max = self.max;
        macro_rules! bump {
            ($v:expr) => {
                match $v.get_mut(i) {
                    Some(x) if u64::from(*x) < max => {
                        *x += 1;
                        true
                    }
                    _ => false,
                }
            };
        }
        match &mut self.cells {
            Cells::U8(v) => bump!(v),
            Cells::U16(v) => bump!(v),
            Cells::U32(v) => bump!(v),
            Cells::U64(v) => match v.get_mut(i) {
                Some(x) if *x < max => {
                    *x += 1;
                    true
                }
                _ => false,
            },
        }
    }

    /// The first cluster in `[start, end)` whose refcount differs from
    /// `other`'s (arrays of the same width; `end` is capped at both lengths).
    pub fn first_diff(&self, other: &RefArray, start: usize, end: usize) -> Option<usize> {
        let end = end.min(self.len()).min(other.len());
        if start >= end {
            return None;
        }
        macro_rules! diff {
            ($a:expr, $b:expr) => {{
                let (a, b) = (&$a[start..end], &$b[start..end]);
                if a == b {
                    None
                } else {
                    a.iter().zip(b).position(|(x, y)| x != y).map(|p| start + p)
                }
            }};
        }
        match (&self.cells, &other.cells) {
            (Cells::U8(a), Cells::U8(b)) => diff!(a, b),
            (Cells::U16(a), Cells::U16(b)) => diff!(a, b),
            (Cells::U32(a), Cells::U32(b)) => diff!(a, b),
            (Cells::U64(a), Cells::U64(b)) => diff!(a, b),
            _ => (start..end).find(|&c| self.get(c) != other.get(c)),
        }
    }

    /// The last cluster in `[start, end)` with a non-zero refcount.
    pub fn last_nonzero(&self, start: usize, end: usize) -> Option<usize> {
        let end = end.min(self.len());
        if start >= end {
            return None;
        }
        macro_rules! last {
            ($a:expr) => {
                $a[start..end]
                    .iter()
                    .rposition(|x| *x != 0)
                    .map(|p| start + p)
            };
        }
        match &self.cells {
            Cells::U8(a) => last!(a),
            Cells::U16(a) => last!(a),
            Cells::U32(a) => last!(a),
            Cells::U64(a) => last!(a),
        }
    }

    /// Encodes the refcounts of clusters `[start, start + entries)` as one
    /// on-disk refcount block of width `1 << order` (clusters beyond the end
    /// are 0).
    pub fn encode_block(&self, order: u32, start: usize, entries: usize, out: &mut [u8]) {
        out.fill(0);
        let end = (start + entries).min(self.len());
        for c in start..end {
            let v = self.get(c);
            if v != 0 {
                refcount::set(out, order, c - start, v);
            }
        }
    }

    /// Decodes an on-disk refcount block into clusters `[start, start + n)`
    /// (cells beyond the array are ignored).
    pub fn decode_block(&mut self, order: u32, start: usize, n: usize, block: &[u8]) {
        let end = (start + n).min(self.len());
        match (&mut self.cells, order) {
            (Cells::U16(v), 4) => {
                for (dst, src) in v[start..end].iter_mut().zip(block.chunks_exact(2)) {
                    *dst = u16::from_be_bytes([src[0], src[1]]);
                }
            }
            (Cells::U8(v), 3) => {
                for (dst, src) in v[start..end].iter_mut().zip(block.iter()) {
                    *dst = *src;
                }
            }
            _ => {
                for c in start..end {
                    let val = refcount::get(block, order, c - start).unwrap_or(0);
                    self.set(c, val);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturates_at_width() {
        for order in 0..=6u32 {
            let mut a = RefArray::new(order, 4);
            let max = refcount::max_value(order);
            if max <= 300 {
                for _ in 0..max {
                    assert!(a.inc(1));
                }
                assert!(!a.inc(1), "order {order}");
                assert_eq!(a.get(1), max);
            } else {
                assert!(a.inc(1));
                assert_eq!(a.get(1), 1);
            }
            assert!(!a.inc(9));
        }
    }

    #[test]
    fn block_round_trip() {
        for order in 0..=6u32 {
            let mut a = RefArray::new(order, 100);
            for i in 0..100 {
                a.set(i, (i as u64 * 7) % (a.max().min(200) + 1));
            }
            let mut block = vec![0u8; 1024];
            let entries = (1024 * 8) >> order;
            a.encode_block(order, 0, entries, &mut block);
            let mut b = RefArray::new(order, 100);
            b.decode_block(order, 0, entries, &block);
            for i in 0..100 {
                assert_eq!(a.get(i), b.get(i), "order {order} cluster {i}");
            }
        }
    }
}
