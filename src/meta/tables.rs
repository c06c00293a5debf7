//! Moving and resizing the tables themselves: growing and shrinking the
//! active L1 table, the virtual size field, dropping unused refcount blocks
//! and finding the last used cluster (for resizing).

use super::{conv, DiscardType, Meta};
use crate::error::{Error, Limit, Result};
use crate::format::consts::*;
use crate::format::header::field;
use crate::format::Structure;
use crate::format::{put_be_u64, refcount};
use crate::storage::BlkdebugEvent;
use crate::types::{ClusterCount, HostOffset, MetadataKind};

impl Meta {
    /// Replaces the active L1 table by a larger one of exactly `entries`
    /// entries at a new place: the new table is written and synced, then the
    /// header switched (`l1_size` + `l1_table_offset` in one 12-byte write),
    /// then the old table's clusters are freed.
    pub fn grow_l1(&mut self, entries: u64) -> Result<()> {
        let old_len = self.l2.l1.len() as u64;
        if entries <= old_len {
            return Ok(());
        }
        let too_large = || Error::TooLarge(Limit::ActiveL1Table { entries });
        let bytes = entries
            .checked_mul(8)
            .filter(|b| *b <= MAX_L1_BYTES)
            .ok_or_else(too_large)?;
        // At most 32 MiB / 8 entries (checked just above): fits u32 and usize.
        let l1_size = u32::try_from(entries).map_err(|_| too_large())?;
        // Pending entries must land in the old table first? No: they are
        // copied into the new table from memory, so drop them.
        let clusters = self.geom.clusters_for(bytes);
        self.event(BlkdebugEvent::L1GrowAllocTable);
        let new_off = self.alloc_clusters(ClusterCount(clusters))?.0;
        self.flush_refcounts()?;
        let mut new_l1 = self.l2.l1.clone();
        let len = conv::mem_len(Structure::L1Table, bytes)?;
        new_l1.resize(len / 8, 0);
        let mut buf = vec![0u8; len];
        for (i, e) in new_l1.iter().enumerate() {
            put_be_u64(&mut buf, i * 8, *e);
        }
        // The new table is not active yet: exempt only the active-L1 check.
        self.event(BlkdebugEvent::L1GrowWriteTable);
        self.meta_write(&buf, new_off, MetadataKind::ActiveL1)?;
        self.sync()?;
        let mut sw = [0u8; 12];
        sw[..4].copy_from_slice(&l1_size.to_be_bytes());
        sw[4..].copy_from_slice(&new_off.to_be_bytes());
        self.event(BlkdebugEvent::L1GrowActivateTable);
        self.write_header_field(field::L1_SIZE, &sw)?;
        let old_off = self.header.l1_table_offset;
        let old_clusters = self.geom.clusters_for(old_len * 8);
        self.header.l1_size = l1_size;
        self.header.l1_table_offset = new_off;
        self.gate.checker_mut().set_active_l1(new_off, bytes);
        self.l2.l1 = new_l1;
        self.l2.l1_dirty.clear();
        if old_off != 0 && old_clusters > 0 {
            // The header switch is durable and the L1 table is only read from
            // memory: nothing uses the old table any more. Free it now, as
            // QEMU does, so the next allocations may reuse its clusters.
            let cb = self.geom.cluster_bits;
            self.event(BlkdebugEvent::ClusterFree);
            let _ = self.update_refcount(old_off >> cb, old_clusters, -1, DiscardType::Other)?;
        }
        Ok(())
    }

    /// Writes the virtual size field of the header and syncs.
    pub fn write_size(&mut self, size: u64) -> Result<()> {
        self.write_header_field(field::SIZE, &size.to_be_bytes())?;
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
        let len = self.l2.l1.len();
        // A `keep` beyond the address space is beyond the table too.
        let Some(keep) = usize::try_from(keep).ok().filter(|k| *k < len) else {
            return Ok(());
        };
        let zeros = vec![0u8; (len - keep) * 8];
        let off = self.header.l1_table_offset + keep as u64 * 8;
        self.event(BlkdebugEvent::L1ShrinkWriteTable);
        self.meta_write(&zeros, off, MetadataKind::ActiveL1)?;
        self.sync()?;
        self.event(BlkdebugEvent::L1ShrinkFreeL2Clusters);
        let cs = self.geom.cluster_size;
        for i in (keep..len).rev() {
            self.l2.l1_dirty.remove(&i);
            let slot = conv::get_mut(&mut self.l2.l1, i, "L1 table")?;
            let table = *slot & L1E_OFFSET_MASK;
            *slot = 0;
            if table != 0 {
                self.gate.checker_mut().remove_active_l2(table);
                // Not active any more: its cached slices are not written back.
                self.l2.cache.forget_range(table, table + cs);
                self.queue_free(HostOffset(table), DiscardType::Always);
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
        let order = self.rgeom.refcount_order;
        let entries = 1usize << self.rgeom.refcount_block_bits;
        let mut unused = Vec::new();
        for i in 0..self.rc.table.len() {
            let block = self.refblock_offset(i as u64)?;
            if block == 0 {
                continue;
            }
            self.load_refblock(block)?;
            let Some(t) = self.rc.cache.peek(block) else {
                continue;
            };
            let (own_ri, own_bi) = self.rgeom.refcount_position(block >> cb);
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
        let mut bytes = vec![0u8; self.rc.table.len() * 8];
        for (i, e) in self.rc.table.iter().enumerate() {
            if unused.binary_search(&i).is_err() {
                put_be_u64(&mut bytes, i * 8, *e);
            }
        }
        let table_off = self.header.refcount_table_offset;
        self.meta_write(&bytes, table_off, MetadataKind::RefcountTable)?;
        self.sync()?;
        for i in unused {
            let block = conv::get(&self.rc.table, i, "refcount table")? & REFT_OFFSET_MASK;
            let (ri, bi) = self.rgeom.refcount_position(block >> cb);
            let cover = self.refblock_offset(ri)?;
            if cover == 0 {
                return Err(Error::Corrupt {
                    what: Structure::RefcountTable,
                    offset: block,
                    msg: format!(
                        "Refblock at {block:#x} is not covered by the refcount structures"
                    ),
                });
            }
            self.load_refblock(cover)?;
            if let Some(t) = self.rc.cache.get_mut(cover) {
                let rc = refcount::get(&t.data, order, bi).unwrap_or(0);
                if rc != 1 {
                    return Err(Error::Corrupt {
                        what: Structure::RefcountBlock,
                        offset: cover,
                        msg: format!(
                            "Invalid refcount: refblock offset {cover:#x}, reftable index {ri}, block offset {block:#x}, refcount {rc:#x}"
                        ),
                    });
                }
                refcount::set(&mut t.data, order, bi, 0);
                t.dirty = true;
            }
            self.rc.free_hint = self.rc.free_hint.min(block >> cb);
            self.rc.cache.remove(block);
            self.gate.checker_mut().remove_refcount_block(block);
            *conv::get_mut(&mut self.rc.table, i, "refcount table")? = 0;
            let cs = self.geom.cluster_size;
            match self.rc.discards.last_mut() {
                Some((s, l)) if *s + *l == block => *l += cs,
                _ => self.rc.discards.push((block, cs)),
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
        let rb_bits = self.rgeom.refcount_block_bits;
        let order = self.rgeom.refcount_order;
        let mut end = self.geom.clusters_for(size);
        while end > 0 {
            let ri = (end - 1) >> rb_bits;
            let base = ri << rb_bits;
            let block = self.refblock_offset(ri)?;
            if block != 0 {
                self.load_refblock(block)?;
                if let Some(t) = self.rc.cache.peek(block) {
                    // Below one refcount block's entries, which fit a usize.
                    for k in (0..conv::usize_of(end - base)?).rev() {
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
