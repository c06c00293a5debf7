//! The metadata state of an open image and every operation on it: table
//! lookups through the caches, the write gate, the refcount allocator and the
//! crash-safe flush order.
//!
//! All of it lives behind the image's metadata lock ([`crate::Image`] holds a
//! `Mutex<Meta>`). Guest data I/O is done by the caller outside the lock.
//!
//! # Write ordering
//! * A cluster's refcount increase reaches the file before any L2/L1 entry
//!   pointing at it: dirty refcount blocks are written and the file synced
//!   before dirty L2 slices are written ([`Meta::flush_l2_dependencies`]).
//! * Guest data of newly allocated clusters is synced before the L2 entry that
//!   points at it (the same sync).
//! * L1 entries are written after the L2 tables they point at (new L2 tables
//!   are written in full at allocation, L1 entries at flush time after a sync).
//! * An entry is removed before the refcount it held drops: decrements are
//!   queued ([`Meta::pending_frees`]) and applied only after the L2/L1 tables
//!   that dropped the references are durable, and only when no data I/O that
//!   translated before them is still in flight.
//! * New refcount blocks are written and synced before the refcount table
//!   entry that points at them; a new refcount table is written and synced
//!   before the header is switched to it with one write.

use crate::cache::TableCache;
use crate::error::{Error, IoOp, Result};
use crate::format::consts::*;
use crate::format::entry::{EntryError, EntryFormat, L1Entry, L2Entry, Subclusters};
use crate::format::header::Header;
use crate::format::{be_u64, put_be_u64, refcount};
use crate::overlap::OverlapChecker;
use crate::storage::Storage;
use crate::types::{Geometry, MetadataKind};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Why a refcount is being dropped (QEMU's discard types), deciding whether
/// the freed host range is discarded in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiscardType {
    /// Never pass the discard down.
    Never,
    /// A guest discard or write-zeroes with unmap (`pass-discard-request`).
    Request,
    /// Snapshot operations (`pass-discard-snapshot`).
    #[allow(dead_code)] // used once internal snapshots can be created and deleted
    Snapshot,
    /// Anything else: COW, table relocation (`pass-discard-other`).
    Other,
    /// Always passed down, whatever the options (QEMU's `QCOW2_DISCARD_ALWAYS`:
    /// clusters cut off by shrinking an image).
    Always,
}

/// Which kinds of freed ranges are discarded in the file.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DiscardPolicy {
    pub request: bool,
    pub snapshot: bool,
    pub other: bool,
}

/// One L2 entry as stored: the descriptor word and, with extended L2, the
/// subcluster bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawL2 {
    pub word: u64,
    pub bitmap: u64,
}

/// Where an L2 entry lives in the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct L2Slot {
    /// Host offset of the slice (cache key).
    pub slice: u64,
    /// Byte offset of the entry within the slice.
    pub pos: usize,
    /// Host offset of the L2 table.
    pub table: u64,
    /// Index of the entry in its table.
    pub index: u64,
}

/// Result of a refcount update that may have had to allocate metadata first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Update {
    Done,
    /// New refcount metadata was allocated, possibly where the caller wanted
    /// to allocate: search for free space again (QEMU's `-EAGAIN`).
    Again,
}

/// The metadata of an open image.
#[derive(Debug)]
pub(crate) struct Meta {
    pub file: Arc<dyn Storage>,
    pub header: Header,
    pub geom: Geometry,
    pub efmt: EntryFormat,
    pub l1: Vec<u64>,
    pub l1_dirty: BTreeSet<usize>,
    pub reftable: Vec<u64>,
    pub reftable_dirty: BTreeSet<usize>,
    pub l2_cache: TableCache,
    pub rc_cache: TableCache,
    pub checker: OverlapChecker,
    /// Lowest cluster index that may be free (QEMU's `free_cluster_index`).
    pub free_hint: u64,
    /// Host length of the image file as far as this handle knows.
    pub file_end: u64,
    /// Refcount decrements waiting until the references are durably gone.
    pub pending_frees: Vec<(u64, DiscardType)>,
    /// Host ranges of freed clusters still to be discarded in the file
    /// (adjacent ranges merged); passed down before any allocation.
    pub discards: Vec<(u64, u64)>,
    /// Skip syncs (image creation, like QEMU's `BDRV_O_NO_FLUSH`): the image
    /// is not valid before creation ends anyway; one sync at the end.
    pub no_flush: bool,
    pub discard: DiscardPolicy,
    /// Guest data was written to new clusters since the last sync.
    pub data_unsynced: bool,
    /// A metadata write failed: the in-memory state may be ahead of the file.
    pub poisoned: bool,
    /// Reusable buffer for COW and table I/O (no allocation per request).
    pub scratch: Vec<u8>,
    /// `cache-clean-interval` and when the current interval started.
    pub clean_interval: Option<(std::time::Duration, std::time::Instant)>,
    /// The image was dirty when opened (only a repair may clear the bit).
    pub dirty_at_open: bool,
    /// Lazy refcounts in effect: refcount writes are deferred behind the dirty bit.
    pub lazy_refcounts: bool,
    /// The internal snapshots.
    #[allow(dead_code)] // read by snapshot operations (apply/delete) when they land
    pub snapshots: Vec<crate::format::snapshot::SnapshotEntry>,
}

impl Meta {
    // ------------------------------------------------------------------
    // The write gate: every write to the image file goes through here.
    // ------------------------------------------------------------------

    /// Checks that writing `len` bytes at `offset` does not hit metadata other
    /// than the kinds in `exempt`.
    ///
    /// # Errors
    /// `Error::OverlapPrevented` naming the structure hit.
    pub fn gate_check(&self, offset: u64, len: u64, exempt: u16) -> Result<()> {
        match self.checker.check(offset, len, exempt) {
            Some(o) => Err(Error::OverlapPrevented {
                kind: o.kind,
                offset,
                size: len,
            }),
            None => Ok(()),
        }
    }

    /// Writes metadata of kind `kind` (or guest data with `None`) at `offset`
    /// after the overlap check.
    pub fn gate_write(
        &mut self,
        buf: &[u8],
        offset: u64,
        kind: Option<MetadataKind>,
    ) -> Result<()> {
        self.gate_check(offset, buf.len() as u64, kind.map_or(0, MetadataKind::bit))?;
        write_file(&*self.file, buf, offset)?;
        self.file_end = self.file_end.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Writes metadata; a failure poisons the handle (the in-memory state is
    /// ahead of the file).
    pub(crate) fn meta_write(&mut self, buf: &[u8], offset: u64, kind: MetadataKind) -> Result<()> {
        let r = self.gate_write(buf, offset, Some(kind));
        if matches!(r, Err(Error::Io { .. })) {
            self.poisoned = true;
        }
        r
    }

    /// Syncs the image file.
    pub fn sync(&mut self) -> Result<()> {
        if self.no_flush {
            self.data_unsynced = false;
            return Ok(());
        }
        if let Err(e) = self.file.flush() {
            // After a failed fsync nothing written since the last good one can
            // be trusted to be durable: stop using this handle.
            self.poisoned = true;
            return Err(Error::io(IoOp::Flush, 0, e));
        }
        self.data_unsynced = false;
        Ok(())
    }

    /// Writes one header field (`bytes` at header offset `pos`) and syncs.
    pub fn write_header_field(&mut self, pos: u64, bytes: &[u8]) -> Result<()> {
        self.meta_write(bytes, pos, MetadataKind::MainHeader)?;
        self.sync()
    }

    /// Persists `incompatible_features` (dirty/corrupt bits) with one write.
    pub fn write_incompatible_features(&mut self) -> Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        let v = self.header.incompatible_features.to_be_bytes();
        self.write_header_field(72, &v)
    }

    /// Persists `autoclear_features` with one write.
    pub fn write_autoclear_features(&mut self) -> Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        let v = self.header.autoclear_features.to_be_bytes();
        self.write_header_field(88, &v)
    }

    // ------------------------------------------------------------------
    // L1 / L2 lookups.
    // ------------------------------------------------------------------

    /// The L2 table offset for L1 index `l1i` (0 if none), validated.
    pub fn l2_table_offset(&self, l1i: u64) -> Result<(u64, bool)> {
        let Some(&raw) = usize::try_from(l1i).ok().and_then(|i| self.l1.get(i)) else {
            return Ok((0, false));
        };
        match L1Entry::decode(raw, self.geom.cluster_bits) {
            Ok(e) => Ok((e.l2_offset, e.copied)),
            Err(_) => Err(Error::Corrupt {
                what: "L1 table",
                offset: raw & L1E_OFFSET_MASK,
                msg: format!(
                    "L2 table offset {:#x} unaligned (L1 index: {:#x})",
                    raw & L1E_OFFSET_MASK,
                    l1i
                ),
            }),
        }
    }

    /// Locates the L2 entry for guest offset `guest` inside a table at `table`.
    pub fn l2_slot(&self, table: u64, guest: u64) -> L2Slot {
        let index = self.geom.l2_index(guest);
        let slice_bytes = self.l2_cache.entry_bytes() as u64;
        let byte = index * self.geom.l2_entry_bytes;
        let slice = table + byte / slice_bytes * slice_bytes;
        L2Slot {
            slice,
            pos: (byte % slice_bytes) as usize,
            table,
            index,
        }
    }

    /// Number of L2 entries in one cache slice.
    pub fn slice_entries(&self) -> u64 {
        self.l2_cache.entry_bytes() as u64 / self.geom.l2_entry_bytes
    }

    /// Makes sure the slice at `slice` is cached, loading it (and writing back
    /// a dirty victim in the right order) if needed.
    pub fn load_l2_slice(&mut self, slice: u64) -> Result<()> {
        if self.l2_cache.get(slice).is_some() {
            return Ok(());
        }
        self.make_room_l2()?;
        let n = self.l2_cache.entry_bytes();
        let mut buf = vec![0u8; n].into_boxed_slice();
        read_file(&*self.file, &mut buf, slice)?;
        self.l2_cache.insert(slice, buf, false);
        Ok(())
    }

    fn make_room_l2(&mut self) -> Result<()> {
        while self.l2_cache.is_full() {
            let Some((victim, dirty)) = self.l2_cache.lru_victim() else {
                break;
            };
            if dirty {
                self.flush_l2_dependencies()?;
                self.write_l2_slice(victim)?;
            }
            self.l2_cache.remove(victim);
        }
        Ok(())
    }

    /// Reads the raw L2 entry at `slot` (the slice must be cached).
    pub fn read_slot(&self, slot: &L2Slot) -> RawL2 {
        let Some(t) = self.l2_cache.peek(slot.slice) else {
            return RawL2 { word: 0, bitmap: 0 };
        };
        let word = be_u64(&t.data, slot.pos).unwrap_or(0);
        let bitmap = if self.geom.extended_l2 {
            be_u64(&t.data, slot.pos + 8).unwrap_or(0)
        } else {
            0
        };
        RawL2 { word, bitmap }
    }

    /// Updates the raw L2 entry at `slot` (the slice must be cached) and marks it dirty.
    pub fn write_slot(&mut self, slot: &L2Slot, raw: RawL2) {
        let ext = self.geom.extended_l2;
        if let Some(t) = self.l2_cache.get_mut(slot.slice) {
            put_be_u64(&mut t.data, slot.pos, raw.word);
            if ext {
                put_be_u64(&mut t.data, slot.pos + 8, raw.bitmap);
            }
            t.dirty = true;
        }
    }

    /// Decodes a raw L2 entry, turning format violations into corruption
    /// errors with QEMU's messages.
    pub fn decode_l2(&self, raw: RawL2, slot: &L2Slot) -> Result<(L2Entry, Subclusters)> {
        let corrupt = |msg: String| Error::Corrupt {
            what: "L2 table",
            offset: slot.table,
            msg,
        };
        let e = match L2Entry::decode(raw.word, &self.efmt) {
            Ok(e) => e,
            Err(EntryError::UnalignedData { offset }) => {
                return Err(corrupt(format!(
                    "Cluster allocation offset {:#x} unaligned (L2 offset: {:#x}, L2 index: {:#x})",
                    offset, slot.table, slot.index
                )))
            }
            Err(EntryError::ZeroInV2) => {
                return Err(corrupt(format!(
                    "Zero cluster entry found in pre-v3 image (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                )))
            }
            Err(EntryError::CompressedWithDataFile) => {
                return Err(corrupt(format!(
                    "Compressed cluster entry found in image with external data file (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                )))
            }
            Err(_) => {
                return Err(corrupt(format!(
                    "Invalid cluster entry found  (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                )))
            }
        };
        let bitmap = Subclusters(raw.bitmap);
        if self.geom.extended_l2 && bitmap.validate(e).is_err() {
            return Err(corrupt(format!(
                "Invalid cluster entry found  (L2 offset: {:#x}, L2 index: {:#x})",
                slot.table, slot.index
            )));
        }
        Ok((e, bitmap))
    }

    // ------------------------------------------------------------------
    // Refcounts.
    // ------------------------------------------------------------------

    /// Loads the refcount block at host offset `block` into the cache.
    fn load_refblock(&mut self, block: u64) -> Result<()> {
        if self.rc_cache.get(block).is_some() {
            return Ok(());
        }
        while self.rc_cache.is_full() {
            let Some((victim, dirty)) = self.rc_cache.lru_victim() else {
                break;
            };
            if dirty {
                self.write_refblock(victim)?;
            }
            self.rc_cache.remove(victim);
        }
        let mut buf = vec![0u8; self.geom.cluster_size as usize].into_boxed_slice();
        read_file(&*self.file, &mut buf, block)?;
        self.rc_cache.insert(block, buf, false);
        Ok(())
    }

    /// The refcount block covering reftable index `ri`, validated; 0 if none.
    fn refblock_offset(&self, ri: u64) -> Result<u64> {
        let Some(&raw) = usize::try_from(ri).ok().and_then(|i| self.reftable.get(i)) else {
            return Ok(0);
        };
        let off = raw & REFT_OFFSET_MASK;
        if !self.geom.is_aligned(off) {
            return Err(Error::Corrupt {
                what: "refcount table",
                offset: off,
                msg: format!("Refblock offset {off:#x} unaligned (reftable index: {ri:#x})"),
            });
        }
        Ok(off)
    }

    /// The refcount of host cluster `cluster` (0 where no block exists).
    pub fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let (ri, bi) = self.geom.refcount_position(cluster);
        let block = self.refblock_offset(ri)?;
        if block == 0 {
            return Ok(0);
        }
        self.load_refblock(block)?;
        let order = self.geom.refcount_order;
        Ok(self
            .rc_cache
            .peek(block)
            .and_then(|t| refcount::get(&t.data, order, bi))
            .unwrap_or(0))
    }

    /// Finds `n` contiguous clusters with refcount 0, scanning from the free
    /// hint, without changing refcounts (QEMU's `alloc_clusters_noref`).
    /// Leaves the hint just past the run.
    ///
    /// The scan works a refcount block at a time: a range without a block is
    /// free as a whole, a loaded block is scanned in place.
    fn alloc_noref(&mut self, n: u64) -> Result<u64> {
        // Freed clusters must not be discarded after they are reused.
        self.process_discards();
        let max = MAX_HOST_OFFSET >> self.geom.cluster_bits;
        let rb_bits = self.geom.refcount_block_bits;
        let order = self.geom.refcount_order;
        let too_large =
            || Error::TooLarge("image file would exceed the largest host offset".into());
        let mut run = 0u64;
        loop {
            let c = self.free_hint;
            if c >= max {
                return Err(too_large());
            }
            let ri = c >> rb_bits;
            let range_end = (ri + 1) << rb_bits;
            let block = self.refblock_offset(ri)?;
            if block == 0 {
                let take = (range_end - c).min(n - run);
                self.free_hint += take;
                run += take;
            } else {
                self.load_refblock(block)?;
                let Some(t) = self.rc_cache.peek(block) else {
                    return Err(Error::InvalidArgument("refcount block not cached".into()));
                };
                let mut i = (c - (ri << rb_bits)) as usize;
                let entries = 1usize << rb_bits;
                while i < entries && run < n {
                    if refcount::get(&t.data, order, i).unwrap_or(0) == 0 {
                        run += 1;
                    } else {
                        run = 0;
                    }
                    i += 1;
                }
                self.free_hint = (ri << rb_bits) + i as u64;
            }
            if run == n {
                if self.free_hint > max {
                    return Err(too_large());
                }
                return Ok(self.free_hint - n);
            }
        }
    }

    /// Makes sure the refcount block covering `cluster` exists. Allocating one
    /// returns [`Update::Again`], as it may have taken space the caller chose
    /// (QEMU's `alloc_refcount_block`).
    fn ensure_refblock(&mut self, cluster: u64) -> Result<Update> {
        let (ri, _) = self.geom.refcount_position(cluster);
        if self.refblock_offset(ri)? != 0 {
            return Ok(Update::Done);
        }
        let new_cluster = self.alloc_noref(1)?;
        if new_cluster == 0 {
            return Err(Error::Corrupt {
                what: "refcount block",
                offset: 0,
                msg: "Preventing invalid allocation of refcount block at offset 0".into(),
            });
        }
        let new_block = new_cluster << self.geom.cluster_bits;
        let cs = self.geom.cluster_size as usize;
        let mut buf = vec![0u8; cs].into_boxed_slice();
        let (own_ri, own_bi) = self.geom.refcount_position(new_cluster);
        if own_ri == ri {
            // The block describes itself.
            refcount::set(&mut buf, self.geom.refcount_order, own_bi, 1);
        } else {
            // Described by another block, which may need allocating first.
            if self.update_refcount(new_cluster, 1, 1, DiscardType::Never)? == Update::Again {
                return Ok(Update::Again);
            }
            self.flush_refcounts()?;
        }
        self.checker.add_refcount_block(new_block);
        if let Err(e) = self.meta_write(&buf, new_block, MetadataKind::RefcountBlock) {
            self.checker.remove_refcount_block(new_block);
            return Err(e);
        }
        self.sync()?;
        self.make_room_rc()?;
        self.rc_cache.insert(new_block, buf, false);
        let idx = usize::try_from(ri).map_err(|_| Error::TooLarge("refcount table".into()))?;
        if idx < self.reftable.len() && idx < self.on_disk_reftable_entries() {
            self.reftable[idx] = new_block;
            let off = self.header.refcount_table_offset + ri * 8;
            self.meta_write(&new_block.to_be_bytes(), off, MetadataKind::RefcountTable)?;
            self.sync()?;
        } else {
            // Grow the table: a self-describing area starting at the first
            // cluster not covered by any existing refcount block slot.
            let per_block = self.geom.refcount_block_entries();
            let blocks_used = (cluster + 1).max(new_cluster + 1).div_ceil(per_block);
            let area = (blocks_used * per_block) << self.geom.cluster_bits;
            self.refcount_area(area, 0, false, Some((idx, new_block)))?;
        }
        Ok(Update::Again)
    }

    fn on_disk_reftable_entries(&self) -> usize {
        (u64::from(self.header.refcount_table_clusters) << (self.geom.cluster_bits - 3)) as usize
    }

    /// Makes room in the refcount block cache, writing back a dirty victim.
    fn make_room_rc(&mut self) -> Result<()> {
        while self.rc_cache.is_full() {
            let Some((victim, dirty)) = self.rc_cache.lru_victim() else {
                break;
            };
            if dirty {
                self.write_refblock(victim)?;
            }
            self.rc_cache.remove(victim);
        }
        Ok(())
    }

    /// Adds `addend` to the refcounts of `count` clusters from `start`
    /// (QEMU's `update_refcount`). On [`Update::Again`] or an error nothing
    /// was changed; after `Again` the free hint is at most `start`, so the
    /// caller's next search tries the same clusters first (QEMU 10).
    ///
    /// The work is done a refcount block at a time, directly in the cached
    /// block, so a long run costs one cache lookup per block.
    pub fn update_refcount(
        &mut self,
        start: u64,
        count: u64,
        addend: i64,
        dtype: DiscardType,
    ) -> Result<Update> {
        let end = start + count;
        let mut c = start;
        while c < end {
            let step = match self.ensure_refblock(c) {
                Ok(Update::Done) => self.add_to_segment(c, end, addend, dtype),
                Ok(Update::Again) => {
                    self.undo_refcounts(start, c, addend);
                    self.free_hint = self.free_hint.min(start);
                    return Ok(Update::Again);
                }
                Err(e) => Err(e),
            };
            match step {
                Ok(next) => c = next,
                Err(e) => {
                    self.undo_refcounts(start, c, addend);
                    return Err(e);
                }
            }
        }
        Ok(Update::Done)
    }

    /// Adds `addend` to the refcounts of clusters `[c, min(end, end of c's
    /// refcount block range))`, whose block exists, and returns where the
    /// segment ended. Nothing is changed if any value would leave its range.
    fn add_to_segment(&mut self, c: u64, end: u64, addend: i64, dtype: DiscardType) -> Result<u64> {
        let rb_bits = self.geom.refcount_block_bits;
        let order = self.geom.refcount_order;
        let max = refcount::max_value(order);
        let (ri, bi) = self.geom.refcount_position(c);
        let seg_end = end.min((ri + 1) << rb_bits);
        let n = (seg_end - c) as usize;
        let block = self.refblock_offset(ri)?;
        self.load_refblock(block)?;
        let cb = self.geom.cluster_bits;
        let mut zeroed: Vec<(u64, u64)> = Vec::new();
        {
            let Some(t) = self.rc_cache.get_mut(block) else {
                return Err(Error::InvalidArgument("refcount block not cached".into()));
            };
            // Check the whole segment first so a failure changes nothing.
            for k in 0..n {
                let cur = refcount::get(&t.data, order, bi + k).unwrap_or(0);
                let ok = if addend >= 0 {
                    cur.checked_add(addend as u64).is_some_and(|v| v <= max)
                } else {
                    cur >= addend.unsigned_abs()
                };
                if !ok {
                    let cl = c + k as u64;
                    return Err(if addend >= 0 {
                        Error::RefcountOverflow { cluster: cl, max }
                    } else {
                        Error::Corrupt {
                            what: "refcount block",
                            offset: cl << cb,
                            msg: format!("Refcount of cluster {cl:#x} would drop below zero"),
                        }
                    });
                }
            }
            for k in 0..n {
                let cur = refcount::get(&t.data, order, bi + k).unwrap_or(0);
                let new = if addend >= 0 {
                    cur + addend as u64
                } else {
                    cur - addend.unsigned_abs()
                };
                refcount::set(&mut t.data, order, bi + k, new);
                if new == 0 {
                    let cl = c + k as u64;
                    match zeroed.last_mut() {
                        Some((s, l)) if *s + *l == cl => *l += 1,
                        _ => zeroed.push((cl, 1)),
                    }
                }
            }
            if n > 0 {
                t.dirty = true;
            }
        }
        for (s, l) in zeroed {
            for cl in s..s + l {
                self.cluster_freed(cl, dtype);
            }
        }
        Ok(seg_end)
    }

    /// Reverts `addend` on `[start, upto)` after a failed or restarted
    /// update (the blocks exist: the update went through them). Clusters
    /// that drop back to 0 only lower the free hint, as in QEMU.
    fn undo_refcounts(&mut self, start: u64, upto: u64, addend: i64) {
        let order = self.geom.refcount_order;
        let rb_bits = self.geom.refcount_block_bits;
        let mut c = start;
        while c < upto {
            let (ri, bi) = self.geom.refcount_position(c);
            let seg_end = upto.min((ri + 1) << rb_bits);
            let block = match self.refblock_offset(ri) {
                Ok(b) if b != 0 => b,
                _ => {
                    c = seg_end;
                    continue;
                }
            };
            if self.load_refblock(block).is_err() {
                c = seg_end;
                continue;
            }
            let mut lowest_zero = None;
            if let Some(t) = self.rc_cache.get_mut(block) {
                for k in 0..(seg_end - c) as usize {
                    let cur = refcount::get(&t.data, order, bi + k).unwrap_or(0);
                    let v = if addend > 0 {
                        cur.saturating_sub(addend as u64)
                    } else {
                        cur.saturating_add(addend.unsigned_abs())
                    };
                    refcount::set(&mut t.data, order, bi + k, v);
                    if v == 0 && lowest_zero.is_none() {
                        lowest_zero = Some(c + k as u64);
                    }
                }
                t.dirty = true;
            }
            if let Some(z) = lowest_zero {
                self.free_hint = self.free_hint.min(z);
            }
            c = seg_end;
        }
    }

    /// Bookkeeping when a cluster's refcount reaches 0.
    fn cluster_freed(&mut self, c: u64, dtype: DiscardType) {
        let off = c << self.geom.cluster_bits;
        self.free_hint = self.free_hint.min(c);
        // A freed L2 table must not stay cached under this offset.
        self.l2_cache
            .forget_range(off, off + self.geom.cluster_size);
        // A table the active L1 table still points at (its refcount was
        // wrong) stays protected, as QEMU's L1-based check keeps it. The
        // check first, so only L2 tables pay for the L1 scan.
        let active_l2 = self
            .checker
            .check(off, self.geom.cluster_size, !MetadataKind::ActiveL2.bit())
            .is_some();
        if active_l2 && !self.l1_references(off) {
            self.checker.remove_active_l2(off);
        }
        let pass = match dtype {
            DiscardType::Never => false,
            DiscardType::Request => self.discard.request,
            DiscardType::Snapshot => self.discard.snapshot,
            DiscardType::Other => self.discard.other,
            DiscardType::Always => true,
        };
        if pass {
            let len = self.geom.cluster_size;
            match self.discards.last_mut() {
                Some((s, l)) if *s + *l == off => *l += len,
                _ => self.discards.push((off, len)),
            }
        }
    }

    /// Passes the queued discards of freed clusters down to the file
    /// (adjacent clusters merged into one request). Advisory: a failed
    /// discard loses nothing.
    pub fn process_discards(&mut self) {
        for (off, len) in std::mem::take(&mut self.discards) {
            let _ = self.file.discard(off, len);
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the host
    /// offset of the first (QEMU's `qcow2_alloc_clusters`).
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        loop {
            let start = self.alloc_noref(n)?;
            if self.update_refcount(start, n, 1, DiscardType::Never)? == Update::Done {
                return Ok(start << self.geom.cluster_bits);
            }
        }
    }

    /// Allocates as many of the `n` clusters starting at host cluster
    /// `cluster` as are free in a row, and returns how many
    /// (QEMU's `qcow2_alloc_clusters_at`). The free hint is not moved.
    pub fn alloc_clusters_at(&mut self, cluster: u64, n: u64) -> Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        self.process_discards();
        loop {
            let free = self.count_free(cluster, n)?;
            if self.update_refcount(cluster, free, 1, DiscardType::Never)? == Update::Done {
                return Ok(free);
            }
        }
    }

    /// How many of the `n` clusters from `cluster` have refcount 0 in a row.
    fn count_free(&mut self, cluster: u64, n: u64) -> Result<u64> {
        let rb_bits = self.geom.refcount_block_bits;
        let order = self.geom.refcount_order;
        let mut done = 0u64;
        while done < n {
            let c = cluster + done;
            let ri = c >> rb_bits;
            let seg = (((ri + 1) << rb_bits) - c).min(n - done);
            let block = self.refblock_offset(ri)?;
            if block == 0 {
                done += seg;
                continue;
            }
            self.load_refblock(block)?;
            let Some(t) = self.rc_cache.peek(block) else {
                return Err(Error::InvalidArgument("refcount block not cached".into()));
            };
            let bi = (c - (ri << rb_bits)) as usize;
            for k in 0..seg as usize {
                if refcount::get(&t.data, order, bi + k).unwrap_or(0) != 0 {
                    return Ok(done + k as u64);
                }
            }
            done += seg;
        }
        Ok(done)
    }

    /// Queues one reference drop of host cluster at `offset`, applied after
    /// the references are durably gone (see the module docs).
    pub fn queue_free(&mut self, offset: u64, dtype: DiscardType) {
        self.pending_frees
            .push((offset >> self.geom.cluster_bits, dtype));
    }

    /// Queues the reference drops of a compressed cluster (every host cluster
    /// its byte range touches).
    pub fn queue_free_compressed(&mut self, offset: u64, len: u64, dtype: DiscardType) {
        let first = offset >> self.geom.cluster_bits;
        let last = (offset + len.max(1) - 1) >> self.geom.cluster_bits;
        for c in first..=last {
            self.pending_frees.push((c, dtype));
        }
    }

    /// The highest reftable index with a refcount block (0 if none), QEMU's
    /// `max_refcount_table_index`.
    fn max_reftable_index(&self) -> usize {
        self.reftable.iter().rposition(|e| *e != 0).unwrap_or(0)
    }

    /// Builds new self-covering refcount structures at host offset `start`
    /// (which must be at the end of the used space): the refcount blocks
    /// still missing for everything up to the new structures plus
    /// `additional` clusters beyond them, then a new refcount table right
    /// after those blocks (50 % larger than needed unless `exact`). The
    /// blocks and the table are written and synced, the header is switched
    /// to the new table with one write, and the old table's clusters are
    /// freed. `new_block` is a refcount block to enter at the given index.
    ///
    /// Returns the offset just past the new table, where the `additional`
    /// clusters may go (QEMU's `qcow2_refcount_area`).
    ///
    /// # Errors
    /// `Error::TooLarge` when the table would exceed 8 MiB, I/O errors.
    pub fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(usize, u64)>,
    ) -> Result<u64> {
        let g = self.geom;
        let cs = g.cluster_size;
        let cb = g.cluster_bits;
        let too_large = || Error::TooLarge("Reference count table too large".into());
        let (total_blocks, _) =
            refcount_metadata_size((start >> cb) + additional, cs, g.refcount_order, !exact);
        let per_table_cluster = cs / 8;
        let mut table_size = if exact {
            total_blocks
        } else {
            total_blocks + total_blocks.div_ceil(2)
        };
        table_size = table_size.div_ceil(per_table_cluster) * per_table_cluster;
        if table_size * 8 > MAX_REFTABLE_BYTES {
            return Err(too_large());
        }
        let table_size = table_size as usize;
        let total_blocks = total_blocks as usize;
        let table_clusters = (table_size as u64) / per_table_cluster;
        let area_ri = ((start >> cb) >> g.refcount_block_bits) as usize;

        let mut table = vec![0u64; table_size];
        let max_idx = self.max_reftable_index();
        let copy = if table_size > max_idx {
            (max_idx + 1).min(self.reftable.len())
        } else {
            table_size
        };
        table[..copy].copy_from_slice(&self.reftable[..copy]);
        if let Some((idx, off)) = new_block {
            if idx >= total_blocks {
                return Err(too_large());
            }
            table[idx] = off;
        }
        let new_count = (area_ri..total_blocks).filter(|i| table[*i] == 0).count() as u64;
        let table_off = start + new_count * cs;
        let end = table_off + table_clusters * cs;

        // Fill the refcount blocks, creating the missing ones from `start`.
        let order = g.refcount_order;
        let per_block = g.refcount_block_entries();
        let mut block_off = start;
        for (i, slot) in table
            .iter_mut()
            .enumerate()
            .take(total_blocks)
            .skip(area_ri)
        {
            let block = if *slot != 0 {
                let b = *slot & REFT_OFFSET_MASK;
                self.load_refblock(b)?;
                b
            } else {
                let b = block_off;
                block_off += cs;
                *slot = b;
                self.checker.add_refcount_block(b);
                self.make_room_rc()?;
                self.rc_cache
                    .insert(b, vec![0u8; cs as usize].into_boxed_slice(), true);
                b
            };
            let first = (i as u64 * per_block) << cb;
            if first < end {
                let from = if first < start {
                    ((start - first) >> cb) as usize
                } else {
                    0
                };
                let to = (((end - first) >> cb).min(per_block)) as usize;
                let Some(t) = self.rc_cache.get_mut(block) else {
                    return Err(Error::InvalidArgument("refcount block not cached".into()));
                };
                for j in from..to {
                    if refcount::get(&t.data, order, j).unwrap_or(0) != 0 {
                        return Err(Error::Corrupt {
                            what: "refcount block",
                            offset: block,
                            msg: format!(
                                "Cluster {:#x} of the new refcount area is already in use",
                                (first >> cb) + j as u64
                            ),
                        });
                    }
                    refcount::set(&mut t.data, order, j, 1);
                }
                t.dirty = true;
            }
        }
        // Blocks first (and synced), then the table (synced), then the header.
        self.flush_refcounts()?;
        self.sync()?;
        let mut bytes = vec![0u8; table_size * 8];
        for (i, e) in table.iter().enumerate() {
            put_be_u64(&mut bytes, i * 8, *e);
        }
        self.meta_write(&bytes, table_off, MetadataKind::RefcountTable)?;
        self.sync()?;
        let mut sw = [0u8; 12];
        sw[..8].copy_from_slice(&table_off.to_be_bytes());
        sw[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.write_header_field(48, &sw)?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.checker
            .set_refcount_table(table_off, table_size as u64 * 8);
        // Blocks the new table dropped (only beyond the used space) are gone.
        for e in self.reftable.iter().skip(table_size) {
            if *e != 0 {
                self.checker.remove_refcount_block(*e & REFT_OFFSET_MASK);
            }
        }
        self.reftable = table;
        self.reftable_dirty.clear();
        // Nothing refers to the old table any more: free it now, as QEMU
        // does (later allocations may reuse its clusters).
        if old_clusters > 0 {
            // A decrement of counted clusters never allocates (never `Again`).
            let _ = self.update_refcount(old_off >> cb, old_clusters, -1, DiscardType::Other)?;
        }
        Ok(end)
    }

    // ------------------------------------------------------------------
    // L2 table allocation.
    // ------------------------------------------------------------------

    /// Returns the offset of a writable (COPIED) L2 table for L1 index `l1i`,
    /// allocating a new table or copying a shared one.
    pub fn writable_l2_table(&mut self, l1i: u64) -> Result<u64> {
        let (old, copied) = self.l2_table_offset(l1i)?;
        if old != 0 && copied {
            return Ok(old);
        }
        let idx = usize::try_from(l1i)
            .ok()
            .filter(|i| *i < self.l1.len())
            .ok_or_else(|| Error::InvalidArgument(format!("L1 index {l1i} beyond the L1 table")))?;
        // The new table's refcount must be durable before the L1 entry: it is,
        // because L1 entries are only written after a refcount flush + sync.
        let new = self.alloc_clusters(1)?;
        if new == 0 {
            return Err(Error::Corrupt {
                what: "L2 table",
                offset: 0,
                msg: "Preventing invalid allocation of L2 table at offset 0".into(),
            });
        }
        let cs = self.geom.cluster_size as usize;
        let mut buf = vec![0u8; cs];
        if old != 0 {
            // Copy the shared table, taking the content from dirty cached slices too.
            read_file(&*self.file, &mut buf, old)?;
            let sb = self.l2_cache.entry_bytes();
            for s in 0..cs / sb {
                if let Some(t) = self.l2_cache.peek(old + (s * sb) as u64) {
                    buf[s * sb..(s + 1) * sb].copy_from_slice(&t.data);
                }
            }
        }
        self.checker.add_active_l2(new);
        self.meta_write(&buf, new, MetadataKind::ActiveL2)?;
        self.data_unsynced = true;
        self.l1[idx] = new | OFLAG_COPIED;
        self.l1_dirty.insert(idx);
        if old != 0 {
            // On a corrupt image another L1 entry may share the old table, or
            // the allocator may even have returned it (its refcount was 0):
            // it stays protected while the L1 table points at it.
            if !self.l1_references(old) {
                self.checker.remove_active_l2(old);
            }
            self.queue_free(old, DiscardType::Other);
        }
        Ok(new)
    }

    /// Whether an entry of the active L1 table points at the L2 table at `table`.
    fn l1_references(&self, table: u64) -> bool {
        self.l1.iter().any(|e| e & L1E_OFFSET_MASK == table)
    }

    // ------------------------------------------------------------------
    // Write-back and flush.
    // ------------------------------------------------------------------

    fn write_l2_slice(&mut self, slice: u64) -> Result<()> {
        let Some(t) = self.l2_cache.peek(slice) else {
            return Ok(());
        };
        if !t.dirty {
            return Ok(());
        }
        let data = std::mem::take(&mut self.scratch);
        let mut data = data;
        data.clear();
        data.extend_from_slice(&t.data);
        let r = self.meta_write(&data, slice, MetadataKind::ActiveL2);
        self.scratch = data;
        r?;
        if let Some(t) = self.l2_cache.get_mut(slice) {
            t.dirty = false;
        }
        Ok(())
    }

    fn write_refblock(&mut self, block: u64) -> Result<()> {
        let Some(t) = self.rc_cache.peek(block) else {
            return Ok(());
        };
        if !t.dirty {
            return Ok(());
        }
        let data = t.data.to_vec();
        self.meta_write(&data, block, MetadataKind::RefcountBlock)?;
        if let Some(t) = self.rc_cache.get_mut(block) {
            t.dirty = false;
        }
        Ok(())
    }

    /// Writes dirty refcount blocks and refcount table entries, then syncs
    /// (if anything was written).
    pub fn flush_refcounts(&mut self) -> Result<()> {
        let blocks = self.rc_cache.dirty_offsets();
        let entries: Vec<usize> = std::mem::take(&mut self.reftable_dirty)
            .into_iter()
            .collect();
        if blocks.is_empty() && entries.is_empty() {
            return Ok(());
        }
        for b in blocks {
            self.write_refblock(b)?;
        }
        for i in entries {
            let off = self.header.refcount_table_offset + i as u64 * 8;
            let v = self.reftable[i];
            self.meta_write(&v.to_be_bytes(), off, MetadataKind::RefcountTable)?;
        }
        self.sync()
    }

    /// What must be durable before a dirty L2 slice may be written: the
    /// refcounts of clusters it references and the data in them.
    pub fn flush_l2_dependencies(&mut self) -> Result<()> {
        let refcounts_dirty = self.rc_cache.has_dirty() || !self.reftable_dirty.is_empty();
        if refcounts_dirty && self.lazy_refcounts {
            // Lazy refcounts: instead of writing refcounts first, make sure
            // the image says its refcounts may be stale (dirty bit, synced).
            self.mark_dirty()?;
        }
        if refcounts_dirty && !self.lazy_refcounts {
            self.flush_refcounts()?;
        } else if self.data_unsynced {
            self.sync()?;
        }
        Ok(())
    }

    fn write_l1_entries(&mut self) -> Result<bool> {
        if self.l1_dirty.is_empty() {
            return Ok(false);
        }
        let dirty: Vec<usize> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
        // Coalesce runs of adjacent entries into one write each.
        let mut i = 0;
        while i < dirty.len() {
            let mut j = i + 1;
            while j < dirty.len() && dirty[j] == dirty[j - 1] + 1 {
                j += 1;
            }
            let (a, b) = (dirty[i], dirty[j - 1] + 1);
            let mut buf = vec![0u8; (b - a) * 8];
            for (k, idx) in (a..b).enumerate() {
                put_be_u64(&mut buf, k * 8, self.l1[idx]);
            }
            let off = self.header.l1_table_offset + a as u64 * 8;
            self.meta_write(&buf, off, MetadataKind::ActiveL1)?;
            i = j;
        }
        Ok(true)
    }

    /// Writes every dirty table in the crash-safe order, then applies queued
    /// refcount drops (if `apply_frees`), then syncs.
    pub fn flush_all(&mut self, apply_frees: bool) -> Result<()> {
        self.flush_l2_dependencies()?;
        let slices = self.l2_cache.dirty_offsets();
        let wrote_l2 = !slices.is_empty();
        for s in slices {
            self.write_l2_slice(s)?;
        }
        if wrote_l2 && !self.l1_dirty.is_empty() {
            // The L2 tables must be durable before L1 entries point at them.
            self.sync()?;
        }
        let wrote_l1 = self.write_l1_entries()?;
        if wrote_l2 || wrote_l1 || self.data_unsynced {
            self.sync()?;
        }
        if apply_frees && !self.pending_frees.is_empty() {
            let frees = std::mem::take(&mut self.pending_frees);
            // Runs of consecutive clusters (in queue order) go in one update.
            let mut i = 0;
            while i < frees.len() {
                let (c, dtype) = frees[i];
                let mut j = i + 1;
                while j < frees.len() && frees[j] == (c + (j - i) as u64, dtype) {
                    j += 1;
                }
                match self.update_refcount(c, (j - i) as u64, -1, dtype)? {
                    Update::Done => {}
                    Update::Again => {
                        // Cannot happen for clusters that have a refcount; keep them queued.
                        self.pending_frees.extend_from_slice(&frees[i..j]);
                    }
                }
                i = j;
            }
            self.process_discards();
            self.flush_refcounts()?;
        }
        if self.lazy_refcounts {
            // A flush makes every cache durable, refcounts included; the
            // dirty bit stays until the image is closed (as in QEMU).
            self.flush_refcounts()?;
        }
        Ok(())
    }

    /// Drops cache entries not used during the last `cache-clean-interval`.
    pub fn maybe_clean_caches(&mut self) {
        if let Some((every, since)) = self.clean_interval {
            if since.elapsed() >= every {
                self.l2_cache.clean_unused();
                self.rc_cache.clean_unused();
                self.clean_interval = Some((every, std::time::Instant::now()));
            }
        }
    }

    /// Sets the dirty bit (refcounts may be stale) and syncs it, once.
    pub fn mark_dirty(&mut self) -> Result<()> {
        if self.header.incompatible_features & INCOMPAT_DIRTY == 0 {
            self.header.incompatible_features |= INCOMPAT_DIRTY;
            if let Err(e) = self.write_incompatible_features() {
                self.header.incompatible_features &= !INCOMPAT_DIRTY;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes every cache and clears the dirty bit (clean close).
    pub fn mark_clean(&mut self) -> Result<()> {
        self.flush_all(true)?;
        self.flush_refcounts()?;
        // A dirty bit found at open (stale refcounts from a crash) is only
        // cleared by a repair, never by closing.
        if self.header.incompatible_features & INCOMPAT_DIRTY != 0 && !self.dirty_at_open {
            self.sync()?;
            self.header.incompatible_features &= !INCOMPAT_DIRTY;
            self.write_incompatible_features()?;
        }
        Ok(())
    }
}

/// How many refcount blocks and refcount table clusters it takes to count
/// `clusters` clusters plus the refcount structures themselves: the fixed
/// point QEMU's `qcow2_refcount_metadata_size` computes. With `generous`, the
/// table gets room for 50 % more blocks (folded in once, as QEMU does).
/// Returns `(blocks, table_clusters)`.
pub(crate) fn refcount_metadata_size(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
    generous: bool,
) -> (u64, u64) {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    let mut clusters = clusters;
    let mut generous = generous;
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
        }
        if n == last {
            return (blocks, table);
        }
    }
}

/// Reads from the image file, attaching the offset to errors.
pub(crate) fn read_file(file: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_at(buf, offset)
        .map_err(|e| Error::io(IoOp::Read, offset, e))
}

/// Writes to a file. Only the write gate and data paths that passed the
/// overlap check call this.
pub(crate) fn write_file(file: &dyn Storage, buf: &[u8], offset: u64) -> Result<()> {
    file.write_at(buf, offset)
        .map_err(|e| Error::io(IoOp::Write, offset, e))
}

impl Meta {
    /// Replaces the active L1 table by a larger one of exactly `entries`
    /// entries at a new place: the new table is written and synced, then the
    /// header switched (`l1_size` + `l1_table_offset` in one 12-byte write),
    /// then the old table's clusters are freed.
    pub fn grow_l1(&mut self, entries: u64) -> Result<()> {
        let old_len = self.l1.len() as u64;
        if entries <= old_len {
            return Ok(());
        }
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::TooLarge("Active L1 table too large".into()));
        }
        // Pending entries must land in the old table first? No: they are
        // copied into the new table from memory, so drop them.
        let bytes = entries * 8;
        let clusters = self.geom.clusters_for(bytes);
        let new_off = self.alloc_clusters(clusters)?;
        self.flush_refcounts()?;
        let mut new_l1 = self.l1.clone();
        new_l1.resize(entries as usize, 0);
        let mut buf = vec![0u8; bytes as usize];
        for (i, e) in new_l1.iter().enumerate() {
            put_be_u64(&mut buf, i * 8, *e);
        }
        // The new table is not active yet: exempt only the active-L1 check.
        self.meta_write(&buf, new_off, MetadataKind::ActiveL1)?;
        self.sync()?;
        let mut sw = [0u8; 12];
        sw[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        sw[4..].copy_from_slice(&new_off.to_be_bytes());
        self.write_header_field(36, &sw)?;
        let old_off = self.header.l1_table_offset;
        let old_clusters = self.geom.clusters_for(old_len * 8);
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = new_off;
        self.checker.set_active_l1(new_off, bytes);
        self.l1 = new_l1;
        self.l1_dirty.clear();
        if old_off != 0 && old_clusters > 0 {
            // The header switch is durable and the L1 table is only read from
            // memory: nothing uses the old table any more. Free it now, as
            // QEMU does, so the next allocations may reuse its clusters.
            let cb = self.geom.cluster_bits;
            let _ = self.update_refcount(old_off >> cb, old_clusters, -1, DiscardType::Other)?;
        }
        Ok(())
    }

    /// Writes the virtual size field of the header and syncs.
    pub fn write_size(&mut self, size: u64) -> Result<()> {
        self.write_header_field(24, &size.to_be_bytes())?;
        self.header.size = size;
        Ok(())
    }
}

impl Meta {
    /// Cuts the active L1 table down to its first `keep` entries the way
    /// QEMU's `qcow2_shrink_l1_table` does: the entries from `keep` on are
    /// zeroed on disk with one write (synced), then the L2 tables they
    /// pointed at are released (queued drops, always discarded). The table
    /// keeps its size (`l1_size` does not change).
    ///
    /// # Errors
    /// I/O errors, an overlap with other metadata.
    pub fn shrink_l1(&mut self, keep: u64) -> Result<()> {
        let len = self.l1.len() as u64;
        if keep >= len {
            return Ok(());
        }
        let zeros = vec![0u8; ((len - keep) * 8) as usize];
        let off = self.header.l1_table_offset + keep * 8;
        self.meta_write(&zeros, off, MetadataKind::ActiveL1)?;
        self.sync()?;
        let cs = self.geom.cluster_size;
        for i in (keep..len).rev() {
            let i = i as usize;
            self.l1_dirty.remove(&i);
            let table = self.l1[i] & L1E_OFFSET_MASK;
            self.l1[i] = 0;
            if table != 0 {
                self.checker.remove_active_l2(table);
                // Not active any more: its cached slices are not written back.
                self.l2_cache.forget_range(table, table + cs);
                self.queue_free(table, DiscardType::Always);
            }
        }
        Ok(())
    }

    /// Drops refcount blocks that count nothing but themselves (QEMU's
    /// `qcow2_shrink_reftable`): the refcount table is rewritten with their
    /// entries zeroed (one synced write), then each block's own reference is
    /// dropped in the block that counts it. Queued reference drops must have
    /// been applied first.
    ///
    /// # Errors
    /// `Error::Corrupt` for a block not counted exactly once, I/O errors.
    pub fn shrink_reftable(&mut self) -> Result<()> {
        let cb = self.geom.cluster_bits;
        let order = self.geom.refcount_order;
        let entries = 1usize << self.geom.refcount_block_bits;
        let mut unused = Vec::new();
        for i in 0..self.reftable.len() {
            let block = self.refblock_offset(i as u64)?;
            if block == 0 {
                continue;
            }
            self.load_refblock(block)?;
            let Some(t) = self.rc_cache.peek(block) else {
                continue;
            };
            let (own_ri, own_bi) = self.geom.refcount_position(block >> cb);
            let own = (own_ri == i as u64).then_some(own_bi);
            let empty = (0..entries)
                .all(|j| Some(j) == own || refcount::get(&t.data, order, j).unwrap_or(0) == 0);
            if empty {
                unused.push(i);
            }
        }
        if unused.is_empty() {
            return Ok(());
        }
        let mut bytes = vec![0u8; self.reftable.len() * 8];
        for (i, e) in self.reftable.iter().enumerate() {
            if unused.binary_search(&i).is_err() {
                put_be_u64(&mut bytes, i * 8, *e);
            }
        }
        let table_off = self.header.refcount_table_offset;
        self.meta_write(&bytes, table_off, MetadataKind::RefcountTable)?;
        self.sync()?;
        for i in unused {
            let block = self.reftable[i] & REFT_OFFSET_MASK;
            let (ri, bi) = self.geom.refcount_position(block >> cb);
            let cover = self.refblock_offset(ri)?;
            if cover == 0 {
                return Err(Error::Corrupt {
                    what: "refcount table",
                    offset: block,
                    msg: format!(
                        "Refblock at {block:#x} is not covered by the refcount structures"
                    ),
                });
            }
            self.load_refblock(cover)?;
            if let Some(t) = self.rc_cache.get_mut(cover) {
                let rc = refcount::get(&t.data, order, bi).unwrap_or(0);
                if rc != 1 {
                    return Err(Error::Corrupt {
                        what: "refcount block",
                        offset: cover,
                        msg: format!(
                            "Invalid refcount: refblock offset {cover:#x}, reftable index {ri}, block offset {block:#x}, refcount {rc:#x}"
                        ),
                    });
                }
                refcount::set(&mut t.data, order, bi, 0);
                t.dirty = true;
            }
            self.free_hint = self.free_hint.min(block >> cb);
            self.rc_cache.remove(block);
            self.checker.remove_refcount_block(block);
            self.reftable[i] = 0;
            let cs = self.geom.cluster_size;
            match self.discards.last_mut() {
                Some((s, l)) if *s + *l == block => *l += cs,
                _ => self.discards.push((block, cs)),
            }
        }
        self.process_discards();
        self.flush_refcounts()
    }

    /// The highest host cluster below `size` bytes with a nonzero refcount
    /// (QEMU's `qcow2_get_last_cluster`), scanning a refcount block at a time.
    ///
    /// # Errors
    /// I/O errors, corrupt refcount table entries.
    pub fn last_used_cluster(&mut self, size: u64) -> Result<Option<u64>> {
        let rb_bits = self.geom.refcount_block_bits;
        let order = self.geom.refcount_order;
        let mut end = self.geom.clusters_for(size);
        while end > 0 {
            let ri = (end - 1) >> rb_bits;
            let base = ri << rb_bits;
            let block = self.refblock_offset(ri)?;
            if block != 0 {
                self.load_refblock(block)?;
                if let Some(t) = self.rc_cache.peek(block) {
                    for k in (0..(end - base) as usize).rev() {
                        if refcount::get(&t.data, order, k).unwrap_or(0) != 0 {
                            return Ok(Some(base + k as u64));
                        }
                    }
                }
            }
            end = base;
        }
        Ok(None)
    }
}
