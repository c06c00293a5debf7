//! The metadata map used by overlap checks (QEMU's `qcow2_check_metadata_overlap`).
//!
//! Single-cluster structures (L2 tables, refcount blocks) are kept in one
//! hash map of cluster index -> kinds, so a check costs one lookup per
//! cluster of the write (a guest data write: one); multi-cluster tables (L1, refcount table, snapshot table, snapshot
//! L1 tables, bitmap directory) are a handful of ranges, with the snapshot L1
//! tables in an ordered map.

use crate::types::MetadataKind;
use std::collections::{BTreeMap, HashMap};

/// Where every piece of metadata lives, and which kinds are checked.
#[derive(Debug, Clone, Default)]
pub struct OverlapChecker {
    enabled: u16,
    cluster_bits: u32,
    active_l1: Option<(u64, u64)>,
    refcount_table: Option<(u64, u64)>,
    snapshot_table: Option<(u64, u64)>,
    bitmap_directory: Option<(u64, u64)>,
    /// The LUKS header clusters of an encrypted image (checked with the
    /// main header).
    crypto_header: Option<(u64, u64)>,
    /// start -> end of each snapshot L1 table (refcounted by how many snapshots share it).
    inactive_l1: BTreeMap<u64, (u64, u32)>,
    /// Cluster index -> [`SINGLE_L2`] | [`SINGLE_REFBLOCK`]: the active L2
    /// tables and the refcount blocks, in one map so that a data write's
    /// check is one lookup, not one per kind.
    single: HashMap<u64, u8>,
    /// cluster index -> number of snapshot L1 tables referencing it.
    inactive_l2: HashMap<u64, u32>,
}

/// A prevented overlap: which structure a write would hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    /// The structure hit.
    pub kind: MetadataKind,
}

/// [`OverlapChecker::single`] bit of an active L2 table.
const SINGLE_L2: u8 = 1;
/// [`OverlapChecker::single`] bit of a refcount block.
const SINGLE_REFBLOCK: u8 = 2;

fn overlaps(a_start: u64, a_end: u64, r: Option<(u64, u64)>) -> bool {
    matches!(r, Some((s, e)) if a_start < e && s < a_end)
}

impl OverlapChecker {
    /// An empty map checking the kinds in `enabled` (a mask of [`MetadataKind::bit`]).
    pub fn new(enabled: u16, cluster_bits: u32) -> Self {
        Self {
            enabled,
            cluster_bits,
            ..Default::default()
        }
    }

    /// The enabled mask.
    pub fn enabled(&self) -> u16 {
        self.enabled
    }

    /// Sets the active L1 table range (`None` if empty).
    pub fn set_active_l1(&mut self, offset: u64, bytes: u64) {
        self.active_l1 = (bytes > 0).then(|| (offset, offset.saturating_add(bytes)));
    }

    /// Sets the refcount table range.
    pub fn set_refcount_table(&mut self, offset: u64, bytes: u64) {
        self.refcount_table = (bytes > 0).then(|| (offset, offset.saturating_add(bytes)));
    }

    /// Sets the snapshot table range.
    pub fn set_snapshot_table(&mut self, offset: u64, bytes: u64) {
        self.snapshot_table = (bytes > 0).then(|| (offset, offset.saturating_add(bytes)));
    }

    /// Sets the LUKS header range `(offset, length)` named by the full disk
    /// encryption header extension. QEMU's overlap check has no class for it
    /// (only its refcounts keep it from being reallocated); here a write
    /// into it is refused as one into the main header would be, since it
    /// would destroy the key slots and with them every byte of guest data.
    pub fn set_crypto_header(&mut self, range: Option<(u64, u64)>) {
        self.crypto_header = range
            .filter(|&(_, len)| len > 0)
            .map(|(o, len)| (o, o.saturating_add(len)));
    }

    /// Sets the bitmap directory range (QEMU checks it even when empty if the
    /// bitmaps autoclear bit is set; pass `Some((0, 0))` for that quirk).
    pub fn set_bitmap_directory(&mut self, range: Option<(u64, u64)>) {
        self.bitmap_directory = range.map(|(o, len)| (o, o.saturating_add(len.max(1))));
    }

    /// Adds a snapshot L1 table.
    pub fn add_inactive_l1(&mut self, offset: u64, bytes: u64) {
        if bytes > 0 {
            let e = self
                .inactive_l1
                .entry(offset)
                .or_insert((offset.saturating_add(bytes), 0));
            e.0 = e.0.max(offset.saturating_add(bytes));
            e.1 += 1;
        }
    }

    /// Removes a snapshot L1 table.
    pub fn remove_inactive_l1(&mut self, offset: u64) {
        if let Some(e) = self.inactive_l1.get_mut(&offset) {
            e.1 -= 1;
            if e.1 == 0 {
                self.inactive_l1.remove(&offset);
            }
        }
    }

    /// Adds an active L2 table at host offset `offset`.
    pub fn add_active_l2(&mut self, offset: u64) {
        self.add_single(offset, SINGLE_L2);
    }

    /// Removes an active L2 table.
    pub fn remove_active_l2(&mut self, offset: u64) {
        self.remove_single(offset, SINGLE_L2);
    }

    /// Adds a refcount block.
    pub fn add_refcount_block(&mut self, offset: u64) {
        self.add_single(offset, SINGLE_REFBLOCK);
    }

    /// Removes a refcount block.
    pub fn remove_refcount_block(&mut self, offset: u64) {
        self.remove_single(offset, SINGLE_REFBLOCK);
    }

    fn add_single(&mut self, offset: u64, bit: u8) {
        *self.single.entry(offset >> self.cluster_bits).or_insert(0) |= bit;
    }

    fn remove_single(&mut self, offset: u64, bit: u8) {
        let k = offset >> self.cluster_bits;
        if let Some(bits) = self.single.get_mut(&k) {
            *bits &= !bit;
            if *bits == 0 {
                self.single.remove(&k);
            }
        }
    }

    /// Adds an L2 table referenced by a snapshot L1 table.
    pub fn add_inactive_l2(&mut self, offset: u64) {
        *self
            .inactive_l2
            .entry(offset >> self.cluster_bits)
            .or_insert(0) += 1;
    }

    /// Removes one reference to an inactive L2 table.
    pub fn remove_inactive_l2(&mut self, offset: u64) {
        let k = offset >> self.cluster_bits;
        if let Some(n) = self.inactive_l2.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.inactive_l2.remove(&k);
            }
        }
    }

    /// Checks a write of `size` bytes at `offset`, ignoring the kinds in
    /// `ignore` (the structure being legitimately written). Returns the first
    /// structure hit, in QEMU's order.
    pub fn check(&self, offset: u64, size: u64, ignore: u16) -> Option<Overlap> {
        if size == 0 {
            return None;
        }
        let chk = self.enabled & !ignore;
        if chk == 0 {
            return None;
        }
        let cs = 1u64 << self.cluster_bits;
        let on = |k: MetadataKind| chk & k.bit() != 0;
        let hit = |kind| Some(Overlap { kind });
        if on(MetadataKind::MainHeader) && offset < cs {
            return hit(MetadataKind::MainHeader);
        }
        // Widen to whole clusters, as QEMU does.
        let start = offset & !(cs - 1);
        let end = offset.saturating_add(size).saturating_add(cs - 1) & !(cs - 1);
        if on(MetadataKind::MainHeader) && overlaps(start, end, self.crypto_header) {
            return hit(MetadataKind::MainHeader);
        }
        if on(MetadataKind::ActiveL1) && overlaps(start, end, self.active_l1) {
            return hit(MetadataKind::ActiveL1);
        }
        if on(MetadataKind::RefcountTable) && overlaps(start, end, self.refcount_table) {
            return hit(MetadataKind::RefcountTable);
        }
        if on(MetadataKind::SnapshotTable) && overlaps(start, end, self.snapshot_table) {
            return hit(MetadataKind::SnapshotTable);
        }
        if on(MetadataKind::InactiveL1) {
            // Any table starting before `end` whose end is after `start`.
            if self.inactive_l1.range(..end).any(|(_, (e, _))| *e > start) {
                return hit(MetadataKind::InactiveL1);
            }
        }
        let first = start >> self.cluster_bits;
        let last = end >> self.cluster_bits;
        // The kinds of single-cluster structure the range touches, every
        // cluster looked at once (active L2 is reported first, as QEMU's
        // order has it).
        let mut want = 0u8;
        if on(MetadataKind::ActiveL2) {
            want |= SINGLE_L2;
        }
        if on(MetadataKind::RefcountBlock) {
            want |= SINGLE_REFBLOCK;
        }
        if want != 0 && !self.single.is_empty() {
            let mut found = 0u8;
            if last - first > self.single.len() as u64 {
                for (c, bits) in &self.single {
                    if *c >= first && *c < last {
                        found |= bits & want;
                    }
                }
            } else {
                for c in first..last {
                    if let Some(bits) = self.single.get(&c) {
                        found |= bits & want;
                    }
                }
            }
            if found & SINGLE_L2 != 0 {
                return hit(MetadataKind::ActiveL2);
            }
            if found & SINGLE_REFBLOCK != 0 {
                return hit(MetadataKind::RefcountBlock);
            }
        }
        if on(MetadataKind::InactiveL2) && !self.inactive_l2.is_empty() {
            let found = if last - first > self.inactive_l2.len() as u64 {
                self.inactive_l2.keys().any(|c| *c >= first && *c < last)
            } else {
                (first..last).any(|c| self.inactive_l2.contains_key(&c))
            };
            if found {
                return hit(MetadataKind::InactiveL2);
            }
        }
        if on(MetadataKind::BitmapDirectory) && overlaps(start, end, self.bitmap_directory) {
            return hit(MetadataKind::BitmapDirectory);
        }
        None
    }

    /// When the cluster at `offset` holds metadata of a checked kind: the
    /// (cluster-aligned) end of the longest checked structure covering it,
    /// where a scan for unprotected clusters can resume; every cluster
    /// before it is protected too. `None` when the cluster is not protected.
    ///
    /// A scan that steps over a multi-cluster table this way costs one call
    /// per structure instead of one per cluster (a crafted snapshot L1 table
    /// can span tens of thousands of clusters).
    pub fn protected_until(&self, offset: u64) -> Option<u64> {
        let cs = 1u64 << self.cluster_bits;
        let start = offset & !(cs - 1);
        self.check(start, cs, 0)?;
        let next = start.saturating_add(cs);
        let chk = self.enabled;
        let on = |k: MetadataKind| chk & k.bit() != 0;
        let covering = |r: Option<(u64, u64)>| match r {
            Some((s, e)) if s < next && start < e => e.saturating_add(cs - 1) & !(cs - 1),
            _ => 0,
        };
        let mut until = next;
        for (kind, range) in [
            (MetadataKind::MainHeader, Some((0, cs))),
            (MetadataKind::MainHeader, self.crypto_header),
            (MetadataKind::ActiveL1, self.active_l1),
            (MetadataKind::RefcountTable, self.refcount_table),
            (MetadataKind::SnapshotTable, self.snapshot_table),
            (MetadataKind::BitmapDirectory, self.bitmap_directory),
        ] {
            if on(kind) {
                until = until.max(covering(range));
            }
        }
        if on(MetadataKind::InactiveL1) {
            for (s, (e, _)) in self.inactive_l1.range(..next) {
                until = until.max(covering(Some((*s, *e))));
            }
        }
        Some(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u16 = 0x1ff;

    #[test]
    fn each_kind_is_found() {
        let mut c = OverlapChecker::new(ALL, 16);
        c.set_refcount_table(0x10000, 0x10000);
        c.add_refcount_block(0x20000);
        c.set_active_l1(0x30000, 16);
        c.add_active_l2(0x40000);
        c.set_snapshot_table(0x70000, 72);
        c.add_inactive_l1(0x60000, 8);
        c.add_inactive_l2(0x80000);
        c.set_bitmap_directory(Some((0x90000, 100)));
        let k = |o| c.check(o, 512, 0).map(|h| h.kind);
        assert_eq!(k(0x100), Some(MetadataKind::MainHeader));
        assert_eq!(k(0x10200), Some(MetadataKind::RefcountTable));
        assert_eq!(k(0x2fe00), Some(MetadataKind::RefcountBlock));
        assert_eq!(
            k(0x3f000),
            Some(MetadataKind::ActiveL1),
            "widened to the whole cluster"
        );
        assert_eq!(k(0x40000), Some(MetadataKind::ActiveL2));
        assert_eq!(k(0x60000), Some(MetadataKind::InactiveL1));
        assert_eq!(k(0x70000), Some(MetadataKind::SnapshotTable));
        assert_eq!(k(0x80000), Some(MetadataKind::InactiveL2));
        assert_eq!(k(0x90000), Some(MetadataKind::BitmapDirectory));
        assert_eq!(k(0xa0000), None);
        assert_eq!(c.check(0x40000, 512, MetadataKind::ActiveL2.bit()), None);
        assert_eq!(c.check(0xa0000, 0x100000, 0).map(|h| h.kind), None);
        assert_eq!(
            c.check(0x30000, 0x100000, 0).map(|h| h.kind),
            Some(MetadataKind::ActiveL1)
        );
        c.remove_active_l2(0x40000);
        assert_eq!(c.check(0x40000, 512, 0).map(|h| h.kind), None);
        // The LUKS header clusters count as the main header.
        c.set_crypto_header(Some((0xb0000, 0x1f9000)));
        let k = |o| c.check(o, 512, 0).map(|h| h.kind);
        assert_eq!(k(0xb0000), Some(MetadataKind::MainHeader));
        assert_eq!(k(0x2a8e00), Some(MetadataKind::MainHeader));
        assert_eq!(k(0x2b0000), None);
        assert_eq!(c.protected_until(0xc0000), Some(0x2b0000));
    }

    #[test]
    fn protected_until_skips_whole_structures() {
        let mut c = OverlapChecker::new(ALL, 9);
        c.set_refcount_table(0x1000, 0x800);
        c.add_inactive_l1(0x1200, 0x2000); // overlaps the refcount table, ends later
        c.add_active_l2(0x3200);
        c.set_snapshot_table(0x5000, 10);
        assert_eq!(c.protected_until(0), Some(0x200), "main header");
        assert_eq!(c.protected_until(0x200), None);
        assert_eq!(c.protected_until(0x1000), Some(0x1800), "refcount table");
        assert_eq!(
            c.protected_until(0x1300),
            Some(0x3200),
            "longest cover wins"
        );
        assert_eq!(c.protected_until(0x3200), Some(0x3400), "one L2 cluster");
        assert_eq!(c.protected_until(0x3400), None);
        assert_eq!(c.protected_until(0x5004), Some(0x5200), "rounded up");
        // Every cluster before the returned end is protected.
        for start in (0..0x6000).step_by(0x200) {
            if let Some(end) = c.protected_until(start) {
                for o in (start..end).step_by(0x200) {
                    assert!(c.check(o, 0x200, 0).is_some(), "{o:#x} from {start:#x}");
                }
            }
        }
        let off = OverlapChecker::new(0, 9);
        assert_eq!(off.protected_until(0), None);
    }

    #[test]
    fn disabled_kinds_pass() {
        let mut c = OverlapChecker::new(0, 16);
        c.set_active_l1(0x30000, 16);
        assert_eq!(c.check(0x30000, 512, 0), None);
        assert_eq!(c.check(0, 512, 0), None);
    }
}
