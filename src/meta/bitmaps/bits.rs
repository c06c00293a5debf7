//! The in-memory bits of one persistent dirty bitmap: one bit per granule
//! of the virtual disk, in atomic words so that requests set bits under the
//! shared metadata lock (several at once, no bit lost).

use super::super::conv;
use crate::error::{Error, Limit, Result};
use crate::format::Structure;
use std::sync::atomic::{AtomicU64, Ordering};

/// The bits of one bitmap: bit `i` covers guest bytes `[i << granularity_bits,
/// (i + 1) << granularity_bits)` of a `disk_size`-byte disk. Bits are set with
/// `fetch_or` (any number of threads at once); everything that reads all of
/// them, clears or replaces them runs under the exclusive metadata lock with
/// no request in flight.
#[derive(Debug)]
pub(crate) struct DirtyBitmap {
    granularity_bits: u8,
    /// The disk size the bits cover.
    disk_size: u64,
    /// Number of granules (bits) covering the disk.
    bits: u64,
    words: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// An all-clear bitmap of granularity `1 << granularity_bits` (9..=31)
    /// for a `disk_size`-byte disk. The callers bound the size (a bitmap
    /// that QEMU's constraints accept holds at most 512 MiB); the
    /// allocation may still fail, which is `Error::TooLarge`, not an abort.
    pub(crate) fn new(granularity_bits: u8, disk_size: u64) -> Result<Self> {
        let granule = 1u64
            .checked_shl(u32::from(granularity_bits))
            .filter(|_| granularity_bits < 64)
            .ok_or_else(|| Error::Internal("bitmap granularity out of range".into()))?;
        let bits = disk_size.div_ceil(granule);
        let nwords = conv::mem_len(Structure::BitmapDirectory, bits.div_ceil(64))?;
        let mut words = Vec::new();
        words.try_reserve_exact(nwords).map_err(|_| {
            Error::TooLarge(Limit::Memory {
                what: Structure::BitmapDirectory,
                bytes: bits.div_ceil(8),
            })
        })?;
        words.extend((0..nwords).map(|_| AtomicU64::new(0)));
        Ok(Self {
            granularity_bits,
            disk_size,
            bits,
            words: words.into_boxed_slice(),
        })
    }

    /// The disk size the bits cover.
    pub(crate) fn disk_size(&self) -> u64 {
        self.disk_size
    }

    fn word(&self, w: u64) -> Option<&AtomicU64> {
        usize::try_from(w).ok().and_then(|w| self.words.get(w))
    }

    /// Sets bits `[first, end)` (clamped to the disk).
    pub(crate) fn set_bits(&self, first: u64, end: u64) {
        let end = end.min(self.bits);
        let mut b = first;
        while b < end {
            let w = b / 64;
            let lo = b % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if let Some(word) = self.word(w) {
                word.fetch_or(mask, Ordering::Relaxed);
            }
            b = (w + 1) * 64;
        }
    }

    /// Sets every granule guest bytes `[offset, offset + len)` touch.
    pub(crate) fn set_range(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = offset.saturating_add(len - 1);
        let g = u32::from(self.granularity_bits);
        self.set_bits(offset >> g, (last >> g).saturating_add(1));
    }

    /// Clears every bit.
    pub(crate) fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Whether bit `b` is set.
    #[cfg(test)]
    fn get(&self, b: u64) -> bool {
        self.word(b / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (b % 64)) != 0)
    }

    /// The dirty guest extents `(offset, len)` within `[offset, offset +
    /// len)`, merged and clipped to the range, at most `max` of them.
    pub(crate) fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let Some(end) = offset.checked_add(len).filter(|_| len > 0) else {
            return out;
        };
        let g = u32::from(self.granularity_bits);
        let mut b = offset >> g;
        let last = ((end - 1) >> g).min(self.bits.saturating_sub(1));
        while b <= last && self.bits > 0 {
            let word = self.word(b / 64).map_or(0, |w| w.load(Ordering::Relaxed));
            let rest = word >> (b % 64);
            if rest == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += u64::from(rest.trailing_zeros());
            if b > last {
                break;
            }
            let start = (b << g).max(offset);
            let stop = b
                .saturating_add(1)
                .checked_shl(g)
                .unwrap_or(u64::MAX)
                .min(end);
            match out.last_mut() {
                Some((o, l)) if o.saturating_add(*l) == start => *l = stop - *o,
                _ => {
                    if out.len() >= max {
                        break;
                    }
                    out.push((start, stop - start));
                }
            }
            b += 1;
        }
        out
    }

    /// Calls `f` with every dirty extent of the whole disk, in order.
    fn for_each_extent(&self, mut f: impl FnMut(u64, u64)) {
        let mut pos = 0u64;
        while pos < self.disk_size {
            let chunk = self.extents(pos, self.disk_size - pos, 4096);
            let Some(&(o, l)) = chunk.last() else {
                return;
            };
            for &(o, l) in &chunk {
                f(o, l);
            }
            pos = o.saturating_add(l);
        }
    }

    /// ORs the bits of `src` into these (QEMU's `hbitmap_merge`): word by
    /// word for the same granularity, else every granule of `self` that a
    /// dirty extent of `src` touches. The disk sizes are equal (checked by
    /// the caller).
    pub(crate) fn merge_from(&self, src: &DirtyBitmap) {
        if src.granularity_bits == self.granularity_bits && src.bits == self.bits {
            for (d, s) in self.words.iter().zip(src.words.iter()) {
                d.fetch_or(s.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            return;
        }
        src.for_each_extent(|o, l| self.set_range(o, l));
    }

    /// A copy of these bits.
    pub(crate) fn try_clone(&self) -> Result<DirtyBitmap> {
        let c = DirtyBitmap::new(self.granularity_bits, self.disk_size)?;
        for (d, s) in c.words.iter().zip(self.words.iter()) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(c)
    }

    /// These bits for a disk resized to `disk_size` (QEMU's
    /// `hbitmap_truncate`): bits past the new end are dropped, new ones are
    /// clear.
    pub(crate) fn resized(&self, disk_size: u64) -> Result<DirtyBitmap> {
        let c = DirtyBitmap::new(self.granularity_bits, disk_size)?;
        for (w, (d, s)) in c.words.iter().zip(self.words.iter()).enumerate() {
            let mask = c.word_mask(w as u64);
            d.store(s.load(Ordering::Relaxed) & mask, Ordering::Relaxed);
        }
        Ok(c)
    }

    /// ORs serialized bitmap bytes (QEMU's layout: bit `i` is bit `i % 8`
    /// of byte `i / 8`) starting at serialized byte `at` into the words.
    /// `at` and `bytes.len()` are multiples of 8 (whole clusters).
    pub(crate) fn load_bytes(&self, at: u64, bytes: &[u8]) {
        let first = at / 8;
        for (k, chunk) in bytes.chunks_exact(8).enumerate() {
            let Some(w) = first.checked_add(k as u64) else {
                return;
            };
            let Some(word) = self.word(w) else {
                return;
            };
            let v = chunk
                .first_chunk::<8>()
                .map_or(0, |b| u64::from_le_bytes(*b));
            word.fetch_or(v & self.word_mask(w), Ordering::Relaxed);
        }
    }

    /// The bits of word `w` that lie on the disk.
    fn word_mask(&self, w: u64) -> u64 {
        let start = w.saturating_mul(64);
        match self.bits.saturating_sub(start) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    /// Serializes the words from serialized byte `at` into `out` (zeroes
    /// past the disk); returns whether any bit is set.
    pub(crate) fn store_bytes(&self, at: u64, out: &mut [u8]) -> bool {
        let first = at / 8;
        let mut any = false;
        for (k, chunk) in out.chunks_exact_mut(8).enumerate() {
            let v = first
                .checked_add(k as u64)
                .and_then(|w| self.word(w))
                .map_or(0, |w| w.load(Ordering::Relaxed));
            any |= v != 0;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        any
    }

    /// Bytes of the serialized bitmap (QEMU rounds up to whole bytes).
    pub(crate) fn serialized_len(&self) -> u64 {
        self.bits.div_ceil(8)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn set_range_covers_touched_granules_only() {
        let m = DirtyBitmap::new(16, 10 << 16).unwrap();
        m.set_range(65535, 2);
        assert!(m.get(0) && m.get(1) && !m.get(2));
        m.set_range(9 << 16, 1 << 20); // clamped to the disk
        assert!(m.get(9));
        let big = DirtyBitmap::new(9, 1 << 20).unwrap();
        big.set_range(512 * 3, 512 * 130);
        assert!(!big.get(2) && big.get(3) && big.get(132) && !big.get(133));
        big.clear();
        assert!(big.extents(0, 1 << 20, 10).is_empty());
    }

    #[test]
    fn extents_merge_and_clip() {
        let m = DirtyBitmap::new(12, 1 << 20).unwrap();
        m.set_range(4096, 8192); // granules 1, 2
        m.set_range(64 * 4096, 1); // granule 64 (next word)
        m.set_range((1 << 20) - 1, 1); // the last granule
        assert_eq!(
            m.extents(0, 1 << 20, 10),
            vec![(4096, 8192), (64 * 4096, 4096), ((1 << 20) - 4096, 4096)]
        );
        assert_eq!(m.extents(5000, 4000, 10), vec![(5000, 4000)]);
        assert_eq!(m.extents(0, 1 << 20, 1), vec![(4096, 8192)]);
        assert!(m.extents(3 * 4096, 60 * 4096, 10).is_empty());
    }

    #[test]
    fn serialization_round_trips_in_qemu_byte_order() {
        let m = DirtyBitmap::new(9, 512 * 100).unwrap();
        m.set_bits(0, 1);
        m.set_bits(9, 10);
        let mut out = [0u8; 16];
        assert!(m.store_bytes(0, &mut out));
        assert_eq!(out[0], 1);
        assert_eq!(out[1], 2);
        let n = DirtyBitmap::new(9, 512 * 100).unwrap();
        out[15] = 0xff; // past the disk's 100 bits: ignored
        n.load_bytes(0, &out);
        assert!(n.get(0) && n.get(9) && !n.get(1) && !n.get(120));
    }

    #[test]
    fn merges_across_granularities() {
        let fine = DirtyBitmap::new(9, 1 << 20).unwrap();
        fine.set_range(70_000, 10);
        fine.set_range(200_000, 100_000);
        let coarse = DirtyBitmap::new(16, 1 << 20).unwrap();
        coarse.merge_from(&fine);
        let want = vec![(65536, 65536), (3 * 65536, 2 * 65536)];
        assert_eq!(coarse.extents(0, 1 << 20, 10), want);
        let back = DirtyBitmap::new(9, 1 << 20).unwrap();
        back.merge_from(&coarse);
        assert_eq!(back.extents(0, 1 << 20, 10), want);
        let same = DirtyBitmap::new(9, 1 << 20).unwrap();
        same.merge_from(&fine);
        assert_eq!(same.extents(0, 1 << 20, 10), fine.extents(0, 1 << 20, 10));
    }

    #[test]
    fn resizing_drops_bits_past_the_end() {
        let m = DirtyBitmap::new(9, 1 << 20).unwrap();
        m.set_range(0, 512);
        m.set_range((1 << 19) - 512, 1024);
        let small = m.resized(1 << 19).unwrap();
        assert_eq!(
            small.extents(0, 1 << 19, 10),
            vec![(0, 512), ((1 << 19) - 512, 512)]
        );
        let big = small.resized(1 << 21).unwrap();
        assert_eq!(
            big.extents(0, 1 << 21, 10),
            vec![(0, 512), ((1 << 19) - 512, 512)]
        );
        // A size that is not a multiple of the granularity: the last
        // partial granule is a bit of its own.
        let odd = DirtyBitmap::new(16, 100_000).unwrap();
        odd.set_range(99_999, 1);
        assert_eq!(odd.extents(0, 100_000, 4), vec![(65536, 100_000 - 65536)]);
        let c = odd.try_clone().unwrap();
        assert!(c.get(1) && !c.get(0));
    }
}
