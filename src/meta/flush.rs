//! L2 table allocation and the crash-safe write-back: dirty L2 slices,
//! refcount blocks and L1 entries are written in the order the parent module's
//! docs list, and the dirty bit for lazy refcounts.

use super::conv;
use super::refcount::Update;
use super::{DiscardType, Meta};
use crate::error::{Error, Result};
use crate::format::consts::*;
use crate::format::put_be_u64;
use crate::format::Structure;
use crate::storage::BlkdebugEvent;
use crate::types::{ClusterCount, HostOffset, MetadataKind};

impl Meta {
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
            .filter(|i| *i < self.l2.l1.len())
            .ok_or_else(|| Error::Internal(format!("L1 index {l1i} beyond the L1 table")))?;
        // The new table's refcount must be durable before the L1 entry: it is,
        // because L1 entries are only written after a refcount flush + sync.
        let new = self.alloc_clusters(ClusterCount(1))?.0;
        if new == 0 {
            return Err(Error::Corrupt {
                what: Structure::L2Table,
                offset: 0,
                msg: "Preventing invalid allocation of L2 table at offset 0".into(),
            });
        }
        let cs = conv::cluster_bytes(&self.geom);
        let mut buf = vec![0u8; cs];
        if old != 0 {
            // Copy the shared table, taking the content from dirty cached slices too.
            self.event(BlkdebugEvent::L2AllocCowRead);
            self.gate.read(&mut buf, old)?;
            let sb = self.l2.cache.entry_bytes();
            for (s, slice) in buf.chunks_exact_mut(sb).enumerate() {
                if let Some(t) = self.l2.cache.peek(old + (s * sb) as u64) {
                    slice.copy_from_slice(&t.data);
                }
            }
        }
        self.gate.checker_mut().add_active_l2(new);
        self.event(BlkdebugEvent::L2AllocWrite);
        self.meta_write(&buf, new, MetadataKind::ActiveL2)?;
        self.data_unsynced = true;
        *conv::get_mut(&mut self.l2.l1, idx, "L1 table")? = new | OFLAG_COPIED;
        self.l2.l1_dirty.insert(idx);
        if old != 0 {
            // On a corrupt image another L1 entry may share the old table, or
            // the allocator may even have returned it (its refcount was 0):
            // it stays protected while the L1 table points at it.
            if !self.l1_references(old) {
                self.gate.checker_mut().remove_active_l2(old);
            }
            self.queue_free(HostOffset(old), DiscardType::Other);
        }
        Ok(new)
    }

    /// Whether an entry of the active L1 table points at the L2 table at `table`.
    pub(super) fn l1_references(&self, table: u64) -> bool {
        self.l2.l1.iter().any(|e| e & L1E_OFFSET_MASK == table)
    }

    // ------------------------------------------------------------------
    // Write-back and flush.
    // ------------------------------------------------------------------

    pub(super) fn write_l2_slice(&mut self, slice: u64) -> Result<()> {
        let Some(t) = self.l2.cache.peek(slice) else {
            return Ok(());
        };
        if !t.dirty {
            return Ok(());
        }
        let data = std::mem::take(&mut self.scratch);
        let mut data = data;
        data.clear();
        data.extend_from_slice(&t.data);
        // A cached L2 table may be shared with a snapshot (internal
        // snapshots): it is then an active and an inactive L2 table at once.
        self.event(BlkdebugEvent::L2Update);
        let r = self.gate.write_metadata_as(
            &[MetadataKind::ActiveL2, MetadataKind::InactiveL2],
            &data,
            slice,
        );
        self.scratch = data;
        r?;
        if let Some(t) = self.l2.cache.get_mut(slice) {
            t.dirty = false;
        }
        Ok(())
    }

    pub(super) fn write_refblock(&mut self, block: u64) -> Result<()> {
        let Some(t) = self.rc.cache.peek(block) else {
            return Ok(());
        };
        if !t.dirty {
            return Ok(());
        }
        let data = t.data.to_vec();
        self.event(BlkdebugEvent::RefblockUpdatePart);
        self.meta_write(&data, block, MetadataKind::RefcountBlock)?;
        if let Some(t) = self.rc.cache.get_mut(block) {
            t.dirty = false;
        }
        Ok(())
    }

    /// Writes dirty refcount blocks and refcount table entries, then syncs
    /// (if anything was written).
    pub fn flush_refcounts(&mut self) -> Result<()> {
        let blocks = self.rc.cache.dirty_offsets();
        let entries: Vec<usize> = std::mem::take(&mut self.rc.table_dirty)
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
            let v = conv::get(&self.rc.table, i, "refcount table")?;
            self.event(BlkdebugEvent::ReftableUpdate);
            self.meta_write(&v.to_be_bytes(), off, MetadataKind::RefcountTable)?;
        }
        self.sync()
    }

    /// What must be durable before a dirty L2 slice may be written: the
    /// refcounts of clusters it references and the data in them.
    pub fn flush_l2_dependencies(&mut self) -> Result<()> {
        let refcounts_dirty = self.rc.cache.has_dirty() || !self.rc.table_dirty.is_empty();
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

    pub(super) fn write_l1_entries(&mut self) -> Result<bool> {
        if self.l2.l1_dirty.is_empty() {
            return Ok(false);
        }
        // Coalesce runs of adjacent entries (the set is sorted) into one write each.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for idx in std::mem::take(&mut self.l2.l1_dirty) {
            match runs.last_mut() {
                Some((_, end)) if *end == idx => *end = idx + 1,
                _ => runs.push((idx, idx + 1)),
            }
        }
        for (a, b) in runs {
            let entries = self.l2.l1.get(a..b).ok_or_else(|| {
                Error::Internal(format!("dirty L1 entries {a}..{b} beyond the L1 table"))
            })?;
            let mut buf = vec![0u8; (b - a) * 8];
            for (k, e) in entries.iter().enumerate() {
                put_be_u64(&mut buf, k * 8, *e);
            }
            let off = self.header.l1_table_offset + a as u64 * 8;
            self.event(BlkdebugEvent::L1Update);
            self.meta_write(&buf, off, MetadataKind::ActiveL1)?;
        }
        Ok(true)
    }

    /// Writes every dirty table in the crash-safe order, then applies queued
    /// refcount drops (if `apply_frees`), then syncs.
    pub fn flush_all(&mut self, apply_frees: bool) -> Result<()> {
        self.flush_l2_dependencies()?;
        let slices = self.l2.cache.dirty_offsets();
        let wrote_l2 = !slices.is_empty();
        for s in slices {
            self.write_l2_slice(s)?;
        }
        if wrote_l2 && !self.l2.l1_dirty.is_empty() {
            // The L2 tables must be durable before L1 entries point at them.
            self.sync()?;
        }
        let wrote_l1 = self.write_l1_entries()?;
        // Anything changed in the image file since its last sync (tables
        // just written, guest data overwritten in place outside the lock,
        // discards, size changes) is made durable; nothing is synced when
        // nothing changed.
        if wrote_l2 || wrote_l1 || self.data_unsynced || self.gate.is_dirty() {
            self.sync()?;
        }
        if apply_frees && !self.rc.pending_frees.is_empty() {
            // Runs of consecutive clusters (in queue order) go in one update.
            let mut runs: Vec<(u64, u64, DiscardType)> = Vec::new();
            for (c, dtype) in std::mem::take(&mut self.rc.pending_frees) {
                match runs.last_mut() {
                    Some((start, n, d)) if *d == dtype && start.checked_add(*n) == Some(c) => {
                        *n += 1;
                    }
                    _ => runs.push((c, 1, dtype)),
                }
            }
            for (c, n, dtype) in runs {
                self.event(BlkdebugEvent::ClusterFree);
                match self.update_refcount(c, n, -1, dtype)? {
                    Update::Done => {}
                    Update::Again => {
                        // Cannot happen for clusters that have a refcount; keep them queued.
                        self.rc.pending_frees.extend((0..n).map(|k| (c + k, dtype)));
                    }
                }
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

    /// Whether `cache-clean-interval` has elapsed, so the next exclusive
    /// lock cleans the caches (the shared fast paths then defer to it).
    ///
    /// Read on every request: a coarse clock (the kernel tick), not a
    /// hardware clock read.
    pub fn clean_due(&self) -> bool {
        self.clean_interval
            .is_some_and(|(_, deadline)| crate::storage::sys::coarse_monotonic_ms() >= deadline)
    }

    /// Drops cache entries not used during the last `cache-clean-interval`.
    pub fn maybe_clean_caches(&mut self) {
        if let Some((every, deadline)) = self.clean_interval {
            let now = crate::storage::sys::coarse_monotonic_ms();
            if now >= deadline {
                self.l2.cache.clean_unused();
                self.rc.cache.clean_unused();
                self.clean_interval = Some((every, now.saturating_add(every)));
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
            // Everything is durable before the bit goes (already so when
            // nothing changed since the last sync).
            if self.gate.is_dirty() || self.data_unsynced {
                self.sync()?;
            }
            self.header.incompatible_features &= !INCOMPAT_DIRTY;
            self.write_incompatible_features()?;
        }
        Ok(())
    }
}
