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
    Snapshot,
    /// Anything else: COW, table relocation (`pass-discard-other`).
    Other,
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
    pub discard: DiscardPolicy,
    /// Guest data was written to new clusters since the last sync.
    pub data_unsynced: bool,
    /// A metadata write failed: the in-memory state may be ahead of the file.
    pub poisoned: bool,
    /// Reusable buffer for COW and table I/O (no allocation per request).
    pub scratch: Vec<u8>,
    /// The internal snapshots.
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
    fn meta_write(&mut self, buf: &[u8], offset: u64, kind: MetadataKind) -> Result<()> {
        let r = self.gate_write(buf, offset, Some(kind));
        if matches!(r, Err(Error::Io { .. })) {
            self.poisoned = true;
        }
        r
    }

    /// Syncs the image file.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::io(IoOp::Flush, 0, e))?;
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

    fn set_refcount_in_block(&mut self, block: u64, bi: usize, value: u64) {
        let order = self.geom.refcount_order;
        if let Some(t) = self.rc_cache.get_mut(block) {
            refcount::set(&mut t.data, order, bi, value);
            t.dirty = true;
        }
    }

    /// Finds `n` contiguous clusters with refcount 0, scanning from the free
    /// hint, without changing refcounts (QEMU's `alloc_clusters_noref`).
    /// Leaves the hint just past the run.
    fn alloc_noref(&mut self, n: u64) -> Result<u64> {
        let max = MAX_HOST_OFFSET >> self.geom.cluster_bits;
        let mut run = 0;
        loop {
            let c = self.free_hint;
            if c >= max {
                return Err(Error::TooLarge(
                    "image file would exceed the largest host offset".into(),
                ));
            }
            self.free_hint += 1;
            if self.refcount(c)? == 0 {
                run += 1;
                if run == n {
                    return Ok(self.free_hint - n);
                }
            } else {
                run = 0;
            }
        }
    }

    /// Makes sure the refcount block covering `cluster` exists. Allocating one
    /// returns [`Update::Again`], as it may have taken space the caller chose.
    fn ensure_refblock(&mut self, cluster: u64) -> Result<Update> {
        let (ri, _) = self.geom.refcount_position(cluster);
        if self.refblock_offset(ri)? != 0 {
            return Ok(Update::Done);
        }
        let new_cluster = self.alloc_noref(1)?;
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
        while self.rc_cache.is_full() {
            let Some((victim, dirty)) = self.rc_cache.lru_victim() else {
                break;
            };
            if dirty {
                self.write_refblock(victim)?;
            }
            self.rc_cache.remove(victim);
        }
        self.rc_cache.insert(new_block, buf, false);
        let idx = usize::try_from(ri).map_err(|_| Error::TooLarge("refcount table".into()))?;
        if idx < self.reftable.len() && idx < self.on_disk_reftable_entries() {
            self.reftable[idx] = new_block;
            let off = self.header.refcount_table_offset + ri * 8;
            self.meta_write(&new_block.to_be_bytes(), off, MetadataKind::RefcountTable)?;
            self.sync()?;
        } else {
            self.grow_reftable(idx, new_block)?;
        }
        Ok(Update::Again)
    }

    fn on_disk_reftable_entries(&self) -> usize {
        (u64::from(self.header.refcount_table_clusters) << (self.geom.cluster_bits - 3)) as usize
    }

    /// Adds `addend` to the refcounts of `count` clusters from `start`.
    /// On [`Update::Again`] nothing was changed.
    pub fn update_refcount(
        &mut self,
        start: u64,
        count: u64,
        addend: i64,
        dtype: DiscardType,
    ) -> Result<Update> {
        let max = refcount::max_value(self.geom.refcount_order);
        for i in 0..count {
            let c = start + i;
            if self.ensure_refblock(c)? == Update::Again {
                // Undo what was done so far (QEMU does the same).
                for j in 0..i {
                    let cur = self.refcount(start + j)?;
                    let v = if addend > 0 {
                        cur - addend as u64
                    } else {
                        cur + addend.unsigned_abs()
                    };
                    self.store_refcount(start + j, v)?;
                    if v == 0 {
                        self.free_hint = self.free_hint.min(start + j);
                    }
                }
                return Ok(Update::Again);
            }
            let cur = self.refcount(c)?;
            let new = if addend >= 0 {
                match cur.checked_add(addend as u64) {
                    Some(v) if v <= max => v,
                    _ => return Err(Error::RefcountOverflow { cluster: c, max }),
                }
            } else {
                match cur.checked_sub(addend.unsigned_abs()) {
                    Some(v) => v,
                    None => {
                        return Err(Error::Corrupt {
                            what: "refcount block",
                            offset: c << self.geom.cluster_bits,
                            msg: format!("Refcount of cluster {c:#x} would drop below zero"),
                        })
                    }
                }
            };
            self.store_refcount(c, new)?;
            if new == 0 {
                self.cluster_freed(c, dtype)?;
            }
        }
        Ok(Update::Done)
    }

    fn store_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let (ri, bi) = self.geom.refcount_position(cluster);
        let block = self.refblock_offset(ri)?;
        self.load_refblock(block)?;
        self.set_refcount_in_block(block, bi, value);
        Ok(())
    }

    /// Bookkeeping when a cluster's refcount reaches 0.
    fn cluster_freed(&mut self, c: u64, dtype: DiscardType) -> Result<()> {
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
        };
        if pass {
            // Advisory: a failed discard loses nothing.
            let _ = self.file.discard(off, self.geom.cluster_size);
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the host
    /// offset of the first.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        loop {
            let start = self.alloc_noref(n)?;
            if self.update_refcount(start, n, 1, DiscardType::Never)? == Update::Done {
                return Ok(start << self.geom.cluster_bits);
            }
        }
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

    /// Grows the refcount table so that index `need` exists, placing the new
    /// table (and any refcount blocks it needs) in a self-describing area at
    /// the end of the file, then switching the header to it with one write.
    /// `new_block` is a freshly written block for index `need`.
    fn grow_reftable(&mut self, need: usize, new_block: u64) -> Result<()> {
        let cb = self.geom.cluster_bits;
        let per_cluster = (self.geom.cluster_size / 8) as usize;
        let want = (need + 1).max(self.reftable.len()).saturating_mul(3) / 2;
        let entries = want.div_ceil(per_cluster) * per_cluster;
        if (entries as u64) * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge("Reference count table too large".into()));
        }
        let mut table = self.reftable.clone();
        table.resize(entries, 0);
        table[need] = new_block;
        let table_clusters = (entries / per_cluster) as u64;
        // The area starts past everything in use.
        let mut area = self
            .file_end
            .div_ceil(self.geom.cluster_size)
            .max(self.free_hint);
        let rb_bits = self.geom.refcount_block_bits;
        let (blocks, area) = loop {
            // Ranges of the area that have no block yet get new blocks at its start.
            let mut nb = 0u64;
            loop {
                let end = area + nb + table_clusters;
                let missing = (area >> rb_bits..=(end - 1) >> rb_bits)
                    .filter(|r| table.get(*r as usize).is_none_or(|e| *e == 0))
                    .count() as u64;
                if missing == nb {
                    break;
                }
                nb = missing;
            }
            // Clusters of the area in ranges with an existing block must be free.
            let mut busy = None;
            for c in area..area + nb + table_clusters {
                if table.get((c >> rb_bits) as usize).is_some_and(|e| *e != 0)
                    && self.refcount(c)? != 0
                {
                    busy = Some(c);
                }
            }
            match busy {
                Some(c) => area = c + 1,
                None => break (nb, area),
            }
        };
        let end = area + blocks + table_clusters;
        if (end >> rb_bits) as usize >= entries {
            return Err(Error::TooLarge("Reference count table too large".into()));
        }
        // Build the new blocks.
        let cs = self.geom.cluster_size as usize;
        let order = self.geom.refcount_order;
        let mut new_blocks: Vec<(u64, Box<[u8]>)> = Vec::new();
        let mut next = area;
        for r in area >> rb_bits..=(end - 1) >> rb_bits {
            if table[r as usize] == 0 {
                let off = next << cb;
                table[r as usize] = off;
                new_blocks.push((off, vec![0u8; cs].into_boxed_slice()));
                next += 1;
            }
        }
        for c in area..end {
            let (ri, bi) = self.geom.refcount_position(c);
            let block = table[ri as usize];
            if let Some((_, buf)) = new_blocks.iter_mut().find(|(o, _)| *o == block) {
                refcount::set(buf, order, bi, 1);
            } else {
                self.load_refblock(block)?;
                self.set_refcount_in_block(block, bi, 1);
            }
        }
        for (off, buf) in &new_blocks {
            self.checker.add_refcount_block(*off);
            self.meta_write(buf, *off, MetadataKind::RefcountBlock)?;
        }
        self.flush_refcounts()?;
        let table_off = (area + blocks) << cb;
        let mut bytes = vec![0u8; entries * 8];
        for (i, e) in table.iter().enumerate() {
            put_be_u64(&mut bytes, i * 8, *e);
        }
        self.meta_write(&bytes, table_off, MetadataKind::RefcountTable)?;
        self.sync()?;
        // Switch the header: offset (8 bytes) and cluster count (4 bytes) in one write.
        let mut sw = [0u8; 12];
        sw[..8].copy_from_slice(&table_off.to_be_bytes());
        sw[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.write_header_field(48, &sw)?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.checker
            .set_refcount_table(table_off, entries as u64 * 8);
        self.reftable = table;
        self.reftable_dirty.clear();
        self.free_hint = self.free_hint.max(end);
        for i in 0..old_clusters {
            self.queue_free(old_off + (i << cb), DiscardType::Other);
        }
        Ok(())
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
        if self.rc_cache.has_dirty() || !self.reftable_dirty.is_empty() {
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
            for (c, dtype) in frees {
                match self.update_refcount(c, 1, -1, dtype)? {
                    Update::Done => {}
                    Update::Again => {
                        // Cannot happen for a cluster that has a refcount; keep it queued.
                        self.pending_frees.push((c, dtype));
                    }
                }
            }
            self.flush_refcounts()?;
        }
        Ok(())
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
        if old_off != 0 {
            for i in 0..old_clusters {
                self.queue_free(old_off + (i << self.geom.cluster_bits), DiscardType::Other);
            }
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
