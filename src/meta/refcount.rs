//! Refcounts: loading refcount blocks, the allocator (QEMU 10's algorithm,
//! worked a refcount block at a time), refcount updates with undo, queued
//! reference drops and discards, and `refcount_area` for refcount-table
//! growth and preallocation.

use super::{conv, DiscardType, Meta};
use crate::error::{Error, Limit, Result};
use crate::format::consts::*;
use crate::format::header::field;
use crate::format::Structure;
use crate::format::{put_be_u64, refcount};
use crate::storage::BlkdebugEvent;
use crate::types::{ClusterCount, ClusterIndex, HostOffset, MetadataKind};

/// Result of a refcount update that may have had to allocate metadata first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Update {
    Done,
    /// New refcount metadata was allocated, possibly where the caller wanted
    /// to allocate: search for free space again (QEMU's `-EAGAIN`).
    Again,
}

impl Meta {
    // ------------------------------------------------------------------
    // Refcounts.
    // ------------------------------------------------------------------

    /// Loads the refcount block at host offset `block` into the cache.
    pub(super) fn load_refblock(&mut self, block: u64) -> Result<()> {
        // QEMU's `load_refcount_block` reports the event on cache hits too.
        self.event(BlkdebugEvent::RefblockLoad);
        if self.rc.cache.get(block).is_some() {
            return Ok(());
        }
        while self.rc.cache.is_full() {
            let Some((victim, dirty)) = self.rc.cache.lru_victim() else {
                break;
            };
            if dirty {
                self.write_refblock(victim)?;
            }
            self.rc.cache.remove(victim);
        }
        let mut buf = vec![0u8; conv::cluster_bytes(&self.geom)].into_boxed_slice();
        self.gate.read(&mut buf, block)?;
        self.rc.cache.insert(block, buf, false);
        Ok(())
    }

    /// The refcount block covering reftable index `ri`, validated; 0 if none.
    pub(super) fn refblock_offset(&self, ri: u64) -> Result<u64> {
        let Some(&raw) = usize::try_from(ri).ok().and_then(|i| self.rc.table.get(i)) else {
            return Ok(0);
        };
        let off = raw & REFT_OFFSET_MASK;
        if !self.geom.is_aligned(off) {
            return Err(Error::Corrupt {
                what: Structure::RefcountTable,
                offset: off,
                msg: format!("Refblock offset {off:#x} unaligned (reftable index: {ri:#x})"),
            });
        }
        Ok(off)
    }

    /// Refuses to allocate when refcount metadata lay past the end of the
    /// file at open: its zeroes would hand out clusters that are in use.
    pub(crate) fn check_allocatable(&self) -> Result<()> {
        match self.rc.past_eof {
            None => Ok(()),
            Some((what, offset)) => Err(Error::Corrupt {
                what,
                offset,
                msg: format!(
                    "Preventing allocation: {what} at offset {offset:#x} lies beyond the end of the file"
                ),
            }),
        }
    }

    /// The refcount of host cluster `cluster` (0 where no block exists).
    pub fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let (ri, bi) = self.rgeom.refcount_position(cluster);
        let block = self.refblock_offset(ri)?;
        if block == 0 {
            return Ok(0);
        }
        self.load_refblock(block)?;
        let order = self.rgeom.refcount_order;
        Ok(self
            .rc
            .cache
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
    pub(super) fn alloc_noref(&mut self, n: u64) -> Result<u64> {
        self.check_allocatable()?;
        // Freed clusters must not be discarded after they are reused.
        self.process_discards();
        let max = MAX_HOST_OFFSET >> self.geom.cluster_bits;
        let rb_bits = self.rgeom.refcount_block_bits;
        let order = self.rgeom.refcount_order;
        let too_large = || Error::TooLarge(Limit::HostOffset);
        let mut run = 0u64;
        loop {
            let c = self.rc.free_hint;
            if c >= max {
                return Err(too_large());
            }
            let ri = c >> rb_bits;
            let range_end = (ri + 1) << rb_bits;
            let block = self.refblock_offset(ri)?;
            if block == 0 {
                let take = (range_end - c).min(n - run);
                self.rc.free_hint += take;
                run += take;
            } else {
                self.load_refblock(block)?;
                let Some(t) = self.rc.cache.peek(block) else {
                    return Err(Error::Internal("refcount block not cached".into()));
                };
                let mut i = conv::usize_of(c - (ri << rb_bits))?;
                let entries = 1usize << rb_bits;
                while i < entries && run < n {
                    if refcount::get(&t.data, order, i).unwrap_or(0) == 0 {
                        run += 1;
                    } else {
                        run = 0;
                    }
                    i += 1;
                }
                self.rc.free_hint = (ri << rb_bits) + i as u64;
            }
            if run == n {
                if self.rc.free_hint > max {
                    return Err(too_large());
                }
                return Ok(self.rc.free_hint - n);
            }
        }
    }

    /// Makes sure the refcount block covering `cluster` exists. Allocating one
    /// returns [`Update::Again`], as it may have taken space the caller chose
    /// (QEMU's `alloc_refcount_block`).
    fn ensure_refblock(&mut self, cluster: u64) -> Result<Update> {
        let (ri, _) = self.rgeom.refcount_position(cluster);
        // QEMU's `alloc_refcount_block` reports the event on every call,
        // also when the block exists.
        self.event(BlkdebugEvent::RefblockAlloc);
        if self.refblock_offset(ri)? != 0 {
            return Ok(Update::Done);
        }
        let new_cluster = self.alloc_noref(1)?;
        if new_cluster == 0 {
            return Err(Error::Corrupt {
                what: Structure::RefcountBlock,
                offset: 0,
                msg: "Preventing invalid allocation of refcount block at offset 0".into(),
            });
        }
        let new_block = new_cluster << self.geom.cluster_bits;
        let cs = conv::cluster_bytes(&self.geom);
        let mut buf = vec![0u8; cs].into_boxed_slice();
        let (own_ri, own_bi) = self.rgeom.refcount_position(new_cluster);
        if own_ri == ri {
            // The block describes itself.
            refcount::set(&mut buf, self.rgeom.refcount_order, own_bi, 1);
        } else {
            // Described by another block, which may need allocating first.
            if self.update_refcount(new_cluster, 1, 1, DiscardType::Never)? == Update::Again {
                return Ok(Update::Again);
            }
            self.flush_refcounts()?;
        }
        self.gate.checker_mut().add_refcount_block(new_block);
        self.event(BlkdebugEvent::RefblockAllocWrite);
        if let Err(e) = self.meta_write(&buf, new_block, MetadataKind::RefcountBlock) {
            self.gate.checker_mut().remove_refcount_block(new_block);
            return Err(e);
        }
        self.sync()?;
        self.make_room_rc()?;
        self.rc.cache.insert(new_block, buf, false);
        let idx = usize::try_from(ri).map_err(|_| {
            Error::TooLarge(Limit::Memory {
                what: Structure::RefcountTable,
                bytes: ri.saturating_mul(8),
            })
        })?;
        if idx < self.rc.table.len() && idx < self.on_disk_reftable_entries() {
            *conv::get_mut(&mut self.rc.table, idx, "refcount table")? = new_block;
            let off = self.header.refcount_table_offset + ri * 8;
            self.event(BlkdebugEvent::RefblockAllocHookup);
            self.meta_write(&new_block.to_be_bytes(), off, MetadataKind::RefcountTable)?;
            self.sync()?;
        } else {
            // Grow the table: a self-describing area starting at the first
            // cluster not covered by any existing refcount block slot.
            self.event(BlkdebugEvent::ReftableGrow);
            let per_block = self.rgeom.refcount_block_entries();
            let blocks_used = (cluster + 1).max(new_cluster + 1).div_ceil(per_block);
            let area = (blocks_used * per_block) << self.geom.cluster_bits;
            self.refcount_area(area, 0, false, Some((idx, new_block)))?;
        }
        Ok(Update::Again)
    }

    /// Entries of the refcount table's clusters on disk (saturating: only
    /// compared with in-memory indices).
    fn on_disk_reftable_entries(&self) -> usize {
        let n = u64::from(self.header.refcount_table_clusters) << (self.geom.cluster_bits - 3);
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Makes room in the refcount block cache, writing back a dirty victim.
    fn make_room_rc(&mut self) -> Result<()> {
        while self.rc.cache.is_full() {
            let Some((victim, dirty)) = self.rc.cache.lru_victim() else {
                break;
            };
            if dirty {
                self.write_refblock(victim)?;
            }
            self.rc.cache.remove(victim);
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
                    self.rc.free_hint = self.rc.free_hint.min(start);
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
        let rb_bits = self.rgeom.refcount_block_bits;
        let order = self.rgeom.refcount_order;
        let max = refcount::max_value(order);
        let (ri, bi) = self.rgeom.refcount_position(c);
        let seg_end = end.min((ri + 1) << rb_bits);
        let n = conv::usize_of(seg_end - c)?;
        let block = self.refblock_offset(ri)?;
        self.load_refblock(block)?;
        let cb = self.geom.cluster_bits;
        let mut zeroed: Vec<(u64, u64)> = Vec::new();
        {
            let Some(t) = self.rc.cache.get_mut(block) else {
                return Err(Error::Internal("refcount block not cached".into()));
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
                            what: Structure::RefcountBlock,
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
        let order = self.rgeom.refcount_order;
        let rb_bits = self.rgeom.refcount_block_bits;
        let mut c = start;
        while c < upto {
            let (ri, bi) = self.rgeom.refcount_position(c);
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
            if let Some(t) = self.rc.cache.get_mut(block) {
                #[expect(
                    clippy::cast_possible_truncation,
                    reason = "a segment within one refcount block: at most 2^24 entries"
                )]
                let len = (seg_end - c) as usize;
                for k in 0..len {
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
                self.rc.free_hint = self.rc.free_hint.min(z);
            }
            c = seg_end;
        }
    }

    /// Bookkeeping when a cluster's refcount reaches 0.
    fn cluster_freed(&mut self, c: u64, dtype: DiscardType) {
        let off = c << self.geom.cluster_bits;
        self.rc.free_hint = self.rc.free_hint.min(c);
        // Compressed data is never packed into a cluster that may be reused.
        if self.free_byte_offset >> self.geom.cluster_bits == c {
            self.free_byte_offset = 0;
        }
        // A freed L2 table must not stay cached under this offset.
        self.l2
            .cache
            .forget_range(off, off + self.geom.cluster_size);
        // A table the active L1 table still points at (its refcount was
        // wrong) stays protected, as QEMU's L1-based check keeps it. The
        // check first, so only L2 tables pay for the L1 scan.
        let active_l2 = self
            .gate
            .checker()
            .check(off, self.geom.cluster_size, !MetadataKind::ActiveL2.bit())
            .is_some();
        if active_l2 && !self.l1_references(off) {
            self.gate.checker_mut().remove_active_l2(off);
        }
        let pass = match dtype {
            DiscardType::Never => false,
            DiscardType::Request => self.rc.policy.request,
            DiscardType::Snapshot => self.rc.policy.snapshot,
            DiscardType::Other => self.rc.policy.other,
            DiscardType::Always => true,
        };
        if pass {
            let len = self.geom.cluster_size;
            match self.rc.discards.last_mut() {
                Some((s, l)) if *s + *l == off => *l += len,
                _ => self.rc.discards.push((off, len)),
            }
        }
    }

    /// Passes the queued discards of freed clusters down to the file
    /// (adjacent clusters merged into one request). Advisory: a failed
    /// discard loses nothing.
    pub fn process_discards(&mut self) {
        for (off, len) in std::mem::take(&mut self.rc.discards) {
            let _ = self.gate.discard(off, len);
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the host
    /// offset of the first (QEMU's `qcow2_alloc_clusters`).
    pub fn alloc_clusters(&mut self, n: ClusterCount) -> Result<HostOffset> {
        let ClusterCount(n) = n;
        self.event(BlkdebugEvent::ClusterAlloc);
        loop {
            let start = self.alloc_noref(n)?;
            if self.update_refcount(start, n, 1, DiscardType::Never)? == Update::Done {
                return Ok(ClusterIndex(start).offset(self.geom.cluster_bits));
            }
        }
    }

    /// Allocates as many of the `n` clusters starting at host cluster
    /// `cluster` as are free in a row, and returns how many
    /// (QEMU's `qcow2_alloc_clusters_at`). The free hint is not moved.
    pub fn alloc_clusters_at(
        &mut self,
        cluster: ClusterIndex,
        n: ClusterCount,
    ) -> Result<ClusterCount> {
        let (ClusterIndex(cluster), ClusterCount(n)) = (cluster, n);
        if n == 0 {
            return Ok(ClusterCount(0));
        }
        self.check_allocatable()?;
        self.process_discards();
        loop {
            let free = self.count_free(cluster, n)?;
            if self.update_refcount(cluster, free, 1, DiscardType::Never)? == Update::Done {
                return Ok(ClusterCount(free));
            }
        }
    }

    /// How many of the `n` clusters from `cluster` have refcount 0 in a row.
    fn count_free(&mut self, cluster: u64, n: u64) -> Result<u64> {
        let rb_bits = self.rgeom.refcount_block_bits;
        let order = self.rgeom.refcount_order;
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
            let Some(t) = self.rc.cache.peek(block) else {
                return Err(Error::Internal("refcount block not cached".into()));
            };
            let bi = conv::usize_of(c - (ri << rb_bits))?;
            for k in 0..conv::usize_of(seg)? {
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
    pub fn queue_free(&mut self, offset: HostOffset, dtype: DiscardType) {
        let ClusterIndex(cluster) = offset.cluster(self.geom.cluster_bits);
        self.rc.pending_frees.push((cluster, dtype));
    }

    /// Queues the reference drops of a compressed cluster (every host cluster
    /// its byte range touches).
    pub fn queue_free_compressed(&mut self, offset: u64, len: u64, dtype: DiscardType) {
        let first = offset >> self.geom.cluster_bits;
        let last = (offset + len.max(1) - 1) >> self.geom.cluster_bits;
        for c in first..=last {
            self.rc.pending_frees.push((c, dtype));
        }
    }

    /// The highest reftable index with a refcount block (0 if none), QEMU's
    /// `max_refcount_table_index`.
    fn max_reftable_index(&self) -> usize {
        self.rc.table.iter().rposition(|e| *e != 0).unwrap_or(0)
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
        self.check_allocatable()?;
        let g = self.geom;
        let rg = self.rgeom;
        let cs = g.cluster_size;
        let cb = g.cluster_bits;
        let too_large = || Error::TooLarge(Limit::RefcountTable);
        let (total_blocks, _) =
            refcount_metadata_size((start >> cb) + additional, cs, rg.refcount_order, !exact);
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
        // At most 8 MiB / 8 entries (checked just above), so these fit.
        let table_size = usize::try_from(table_size).map_err(|_| too_large())?;
        let total_blocks = usize::try_from(total_blocks).map_err(|_| too_large())?;
        let table_clusters = (table_size as u64) / per_table_cluster;
        let table_clusters_u32 = u32::try_from(table_clusters).map_err(|_| too_large())?;
        let area_ri =
            usize::try_from((start >> cb) >> rg.refcount_block_bits).map_err(|_| too_large())?;

        let mut table = vec![0u64; table_size];
        let max_idx = self.max_reftable_index();
        let copy = if table_size > max_idx {
            (max_idx + 1).min(self.rc.table.len())
        } else {
            table_size
        };
        for (to, from) in table.iter_mut().zip(&self.rc.table).take(copy) {
            *to = *from;
        }
        if let Some((idx, off)) = new_block {
            if idx >= total_blocks {
                return Err(too_large());
            }
            *table.get_mut(idx).ok_or_else(too_large)? = off;
        }
        let new_count = table
            .iter()
            .take(total_blocks)
            .skip(area_ri)
            .filter(|e| **e == 0)
            .count() as u64;
        let table_off = start + new_count * cs;
        let end = table_off + table_clusters * cs;

        // Fill the refcount blocks, creating the missing ones from `start`.
        let order = rg.refcount_order;
        let per_block = rg.refcount_block_entries();
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
                self.gate.checker_mut().add_refcount_block(b);
                self.make_room_rc()?;
                self.rc.cache.insert(
                    b,
                    vec![0u8; conv::cluster_bytes(&g)].into_boxed_slice(),
                    true,
                );
                b
            };
            let first = (i as u64 * per_block) << cb;
            if first < end {
                // Both within one refcount block's entries.
                let from = if first < start {
                    conv::usize_of((start - first) >> cb)?
                } else {
                    0
                };
                let to = conv::usize_of(((end - first) >> cb).min(per_block))?;
                let Some(t) = self.rc.cache.get_mut(block) else {
                    return Err(Error::Internal("refcount block not cached".into()));
                };
                for j in from..to {
                    if refcount::get(&t.data, order, j).unwrap_or(0) != 0 {
                        return Err(Error::Corrupt {
                            what: Structure::RefcountBlock,
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
        self.event(BlkdebugEvent::RefblockAllocWriteBlocks);
        self.flush_refcounts()?;
        self.sync()?;
        let mut bytes = vec![0u8; table_size * 8];
        for (i, e) in table.iter().enumerate() {
            put_be_u64(&mut bytes, i * 8, *e);
        }
        self.event(BlkdebugEvent::RefblockAllocWriteTable);
        self.meta_write(&bytes, table_off, MetadataKind::RefcountTable)?;
        self.sync()?;
        let mut sw = [0u8; 12];
        sw[..8].copy_from_slice(&table_off.to_be_bytes());
        sw[8..].copy_from_slice(&table_clusters_u32.to_be_bytes());
        self.event(BlkdebugEvent::RefblockAllocSwitchTable);
        self.write_header_field(field::REFCOUNT_TABLE_OFFSET, &sw)?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = table_clusters_u32;
        self.gate
            .checker_mut()
            .set_refcount_table(table_off, table_size as u64 * 8);
        // Blocks the new table dropped (only beyond the used space) are gone.
        for e in self.rc.table.iter().skip(table_size) {
            if *e != 0 {
                self.gate
                    .checker_mut()
                    .remove_refcount_block(*e & REFT_OFFSET_MASK);
            }
        }
        self.rc.table = table;
        self.rc.table_dirty.clear();
        // Nothing refers to the old table any more: free it now, as QEMU
        // does (later allocations may reuse its clusters).
        if old_clusters > 0 {
            // A decrement of counted clusters never allocates (never `Again`).
            self.event(BlkdebugEvent::ClusterFree);
            let _ = self.update_refcount(old_off >> cb, old_clusters, -1, DiscardType::Other)?;
        }
        Ok(end)
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
