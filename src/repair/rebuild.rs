//! Rebuilding the refcount table and blocks from the counted references
//! (QEMU's `rebuild_refcount_structure`).
//!
//! The layout is QEMU's: refcount blocks are allocated first-fit in the
//! counted array (so free holes are reused before the file grows), each in
//! its own range or later; the refcount table is allocated first-fit after
//! all blocks are placed, and the blocks covering it are written again,
//! until the table stops growing. Clusters the write gate protects (metadata
//! the image still points to but that was not counted, such as an L2 table
//! past the end of the file) are never chosen, where QEMU would fail the
//! overlap check.
//!
//! # Write order
//! Refcount blocks and the table are written to clusters nothing counted
//! references, synced, and only then is the header switched to them with one
//! 12-byte write (`refcount_table_offset` + `refcount_table_clusters`). A
//! crash before the switch leaves the old structures in charge (the new
//! clusters are at most leaked); after it, the old structures are merely
//! leaked, and the leak repair that follows frees them.

use super::findings::Finding;
use super::imrt::RefArray;
use super::pass::{Pass, MAX_CHECK_CLUSTERS};
use crate::error::{Error, Limit, Result};
use crate::format::consts::*;
use crate::format::header::field;
use crate::format::put_be_u64;

impl Pass<'_, '_> {
    /// When cluster `c` holds metadata the write gate protects: the first
    /// cluster after the protected structure(s) covering it.
    fn protected_until(&self, c: u64) -> Option<u64> {
        let cb = self.geom.cluster_bits;
        let end = self.meta.gate.checker().protected_until(c << cb)?;
        Some(end >> cb)
    }

    /// QEMU's `alloc_clusters_imrt`: finds `count` contiguous clusters with
    /// no references at or after `*first_free` (growing the array at the
    /// end if needed), marks them used and returns the first. `*first_free`
    /// is left at the first free cluster seen.
    fn alloc_clusters_imrt(
        &self,
        imrt: &mut RefArray,
        count: u64,
        first_free: &mut u64,
    ) -> Result<u64> {
        let mut cluster = *first_free;
        let mut contiguous = 0u64;
        let mut first_gap = true;
        while contiguous < count {
            if cluster >= MAX_CHECK_CLUSTERS {
                return Err(Error::TooLarge(Limit::CheckedClusters));
            }
            let in_array = (cluster as usize) < imrt.len();
            if in_array && imrt.get(cluster as usize) != 0 {
                contiguous = 0;
            } else if let Some(next) = self.protected_until(cluster) {
                // Not free either: step over the protected structure at once.
                contiguous = 0;
                cluster = next.max(cluster + 1);
                continue;
            } else {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            }
            cluster += 1;
        }
        let start = cluster - contiguous;
        if cluster as usize > imrt.len() {
            imrt.resize(cluster as usize);
        }
        for c in start..cluster {
            imrt.set(c as usize, 1);
        }
        Ok(start)
    }

    /// QEMU's `rebuild_refcounts_write_refblocks`: writes a refcount block
    /// (a slice of `imrt`) for every range of `[first, end)` holding a used
    /// cluster, allocating blocks that `reftable` does not have yet and
    /// growing `reftable` (to whole clusters) as needed. Returns whether the
    /// table grew.
    fn write_refblocks(
        &mut self,
        imrt: &mut RefArray,
        first: u64,
        mut end: u64,
        reftable: &mut Vec<u64>,
    ) -> Result<bool> {
        let cb = self.geom.cluster_bits;
        let cs = self.geom.cluster_size;
        let rb_bits = self.meta.rgeom.refcount_block_bits;
        let per_block = 1u64 << rb_bits;
        let order = self.meta.rgeom.refcount_order;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut buf = vec![0u8; cs as usize];
        let mut cluster = first;
        while cluster < end {
            if imrt.get(cluster as usize) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> rb_bits;
            let block_start = index << rb_bits;
            let existing = reftable.get(index as usize).copied().unwrap_or(0);
            let offset = if existing != 0 {
                existing
            } else {
                // Never inside a block that is already written.
                first_free = first_free.max(block_start);
                let c = match self.alloc_clusters_imrt(imrt, 1, &mut first_free) {
                    Ok(c) => c,
                    Err(e) => {
                        self.report(Finding::Message(format!(
                            "ERROR allocating refblock: {}",
                            e.errno_text()
                        )));
                        return Err(e);
                    }
                };
                // The block holding this block's own refcount must be written too.
                end = end.max(c + 1);
                if reftable.len() as u64 <= index {
                    let entries = ((index + 1) * 8).next_multiple_of(cs) / 8;
                    reftable.resize(entries as usize, 0);
                    grown = true;
                }
                reftable[index as usize] = c << cb;
                c << cb
            };
            imrt.encode_block(order, block_start as usize, per_block as usize, &mut buf);
            if let Err(e) = self.gate_write(&buf, offset, None) {
                self.report(Finding::Message(format!(
                    "ERROR writing refblock: {}",
                    e.errno_text()
                )));
                return Err(e);
            }
            cluster = block_start + per_block;
        }
        Ok(grown)
    }

    /// QEMU's `rebuild_refcount_structure`: a new refcount table and blocks
    /// holding exactly `imrt` (plus themselves), switched in by the header.
    /// See the module docs for the order.
    pub(crate) fn rebuild_refcount_structure(&mut self, imrt: &mut RefArray) -> Result<()> {
        let cb = self.geom.cluster_bits;
        let cs = self.geom.cluster_size;
        // Nothing cached may survive: every block is about to be replaced.
        if self.meta.rc.cache().has_dirty() {
            self.meta.flush_refcounts()?;
        }
        self.meta.rc.cache_mut().drop_clean();

        let mut reftable: Vec<u64> = Vec::new();
        let len = imrt.len() as u64;
        self.write_refblocks(imrt, 0, len, &mut reftable)?;
        let (table_off, tclusters) = loop {
            let mut first_free = 0u64;
            let tclusters = (reftable.len() as u64 * 8).div_ceil(cs);
            if tclusters * cs > MAX_REFTABLE_BYTES {
                self.report(Finding::Message(
                    "ERROR allocating reftable: File too large".into(),
                ));
                return Err(Error::TooLarge(Limit::RefcountTable));
            }
            let start = match self.alloc_clusters_imrt(imrt, tclusters, &mut first_free) {
                Ok(c) => c,
                Err(e) => {
                    self.report(Finding::Message(format!(
                        "ERROR allocating reftable: {}",
                        e.errno_text()
                    )));
                    return Err(e);
                }
            };
            // The table's clusters now count: rewrite the blocks covering them.
            if !self.write_refblocks(imrt, start, start + tclusters, &mut reftable)? {
                break (start << cb, tclusters);
            }
        };
        let mut bytes = vec![0u8; (tclusters * cs) as usize];
        for (i, e) in reftable.iter().enumerate() {
            put_be_u64(&mut bytes, i * 8, *e);
        }
        let r = self
            .gate_write(&bytes, table_off, None)
            .and_then(|()| self.meta.sync());
        if let Err(e) = r {
            self.report(Finding::Message(format!(
                "ERROR writing reftable: {}",
                e.errno_text()
            )));
            return Err(e);
        }
        // Switch the header with one write.
        let mut sw = [0u8; 12];
        sw[..8].copy_from_slice(&table_off.to_be_bytes());
        sw[8..].copy_from_slice(&(tclusters as u32).to_be_bytes());
        if let Err(e) = self
            .meta
            .write_header_field_for_repair(field::REFCOUNT_TABLE_OFFSET, &sw)
        {
            self.report(Finding::Message(format!(
                "ERROR setting reftable: {}",
                e.errno_text()
            )));
            return Err(e);
        }
        // The image now uses the new structures.
        let old_blocks: Vec<u64> = self
            .meta
            .rc
            .table()
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .filter(|o| *o != 0 && self.geom.is_aligned(*o))
            .collect();
        for o in old_blocks {
            self.meta.gate.checker_mut().remove_refcount_block(o);
        }
        for o in reftable.iter().filter(|o| **o != 0) {
            self.meta.gate.checker_mut().add_refcount_block(*o);
        }
        reftable.resize((tclusters * cs / 8) as usize, 0);
        self.meta
            .gate
            .checker_mut()
            .set_refcount_table(table_off, tclusters * cs);
        self.meta.header.refcount_table_offset = table_off;
        self.meta.header.refcount_table_clusters = tclusters as u32;
        self.meta.rc.replace_table(reftable);
        self.refresh_file_len()?;
        Ok(())
    }
}
