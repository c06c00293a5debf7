//! The COPIED flag check of the active L1 and L2 tables (QEMU's
//! `check_oflag_copied`): an entry's COPIED flag must be set exactly when the
//! cluster it points to has refcount 1.
//!
//! It runs after the refcounts were compared (and repaired), against the
//! on-disk refcounts that comparison left in memory; a repair therefore sets
//! flags from refcounts that are already right. L1 entries are written one
//! at a time (synchronously), an L2 table in one write once all its entries
//! are fixed.

use super::findings::{CheckCounts, Finding};
use super::pass::Pass;
use super::walk::{cluster_type, ClusterType};
use crate::error::Result;
use crate::format::consts::*;
use crate::format::{be_u64, put_be_u64};
use crate::types::MetadataKind;

impl Pass<'_, '_> {
    /// QEMU's `check_oflag_copied`.
    pub(crate) fn check_oflag_copied(&mut self, res: &mut CheckCounts) -> Result<()> {
        let repair = if self.fix.errors {
            true
        } else if self.fix.leaks {
            // Only safe when the refcounts are known to be right now.
            res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            false
        };
        let cb = self.geom.cluster_bits;
        let cs = self.geom.cluster_size as usize;
        let ext = self.geom.extended_l2;
        let esize = self.geom.l2_entry_bytes as usize;
        let entries = self.geom.l2_entries() as usize;
        let data_file = self.data_file;
        let l1_off = self.meta.header.l1_table_offset;
        let nonzero: Vec<usize> = (0..self.meta.l2.l1().len())
            .filter(|&i| self.meta.l2.l1()[i] & L1E_OFFSET_MASK != 0)
            .collect();
        let window = (1usize << 20).div_ceil(cs).max(1);
        let total = self.meta.l2.l1().len() as u64;
        let mut wrote = false;
        for chunk in nonzero.chunks(window) {
            let offsets: Vec<u64> = chunk
                .iter()
                .map(|&i| self.meta.l2.l1()[i] & L1E_OFFSET_MASK)
                .collect();
            let mut batch = self.read_tables(&offsets, cs);
            for (k, &i) in chunk.iter().enumerate() {
                let l1_entry = self.meta.l2.l1()[i];
                let l2_off = l1_entry & L1E_OFFSET_MASK;
                let Some(refcount) = self.disk_refcount(l2_off >> cb) else {
                    continue;
                };
                if (refcount == 1) != (l1_entry & OFLAG_COPIED != 0) {
                    res.corruptions += 1;
                    self.report(Finding::CopiedL1 {
                        index: i as u64,
                        entry: l1_entry,
                        refcount,
                        repairing: repair,
                    });
                    if repair {
                        let new = if refcount == 1 {
                            l1_entry | OFLAG_COPIED
                        } else {
                            l1_entry & !OFLAG_COPIED
                        };
                        let at = l1_off + i as u64 * 8;
                        let r = self
                            .gate_write(&new.to_be_bytes(), at, Some(MetadataKind::ActiveL1))
                            .and_then(|()| self.meta.sync());
                        if let Err(e) = r {
                            res.check_errors += 1;
                            return Err(e);
                        }
                        self.meta.l2.set_l1_written(i, new);
                        res.corruptions -= 1;
                        res.corruptions_fixed += 1;
                    }
                }
                let Some(p) = batch.pos[k] else {
                    let mut probe = vec![0u8; cs];
                    let e = match self.read(&mut probe, l2_off) {
                        Err(e) => e,
                        Ok(()) => crate::error::Error::io(
                            crate::error::IoOp::Read,
                            l2_off,
                            super::walk::eio(),
                        ),
                    };
                    self.report(Finding::Message(format!(
                        "ERROR: Could not read L2 table: {}",
                        e.errno_text()
                    )));
                    res.check_errors += 1;
                    return Err(e);
                };
                let table = &mut batch.data[p..p + cs];
                let mut dirty = 0u64;
                let fast = !ext && !data_file && self.bad_blocks.is_empty();
                for j in 0..entries {
                    let entry = be_u64(table, j * esize).unwrap_or(0);
                    if entry == 0 {
                        continue;
                    }
                    if fast && entry & (OFLAG_COMPRESSED | OFLAG_ZERO) == 0 {
                        // A plain data cluster whose refcount is in memory.
                        let c = ((entry & L2E_OFFSET_MASK) >> cb) as usize;
                        if c != 0 && c < self.disk.len() {
                            let rc = self.disk.get(c);
                            if (rc == 1) == (entry & OFLAG_COPIED != 0) {
                                continue;
                            }
                        }
                    }
                    let ty = cluster_type(entry, ext, data_file);
                    if ty != ClusterType::Normal && ty != ClusterType::ZeroAlloc {
                        continue;
                    }
                    let refcount = if data_file {
                        1
                    } else {
                        match self.disk_refcount((entry & L2E_OFFSET_MASK) >> cb) {
                            Some(r) => r,
                            None => continue,
                        }
                    };
                    if (refcount == 1) != (entry & OFLAG_COPIED != 0) {
                        res.corruptions += 1;
                        self.sink.push(Finding::CopiedL2 {
                            entry,
                            refcount,
                            repairing: repair,
                        });
                        if repair {
                            let new = if refcount == 1 {
                                entry | OFLAG_COPIED
                            } else {
                                entry & !OFLAG_COPIED
                            };
                            put_be_u64(table, j * esize, new);
                            dirty += 1;
                        }
                    }
                }
                if dirty > 0 {
                    if let Err(e) = self.gate_check(l2_off, cs as u64, MetadataKind::ActiveL2.bit())
                    {
                        self.report(Finding::Message(format!(
                            "ERROR: Could not write L2 table; metadata overlap check failed: {}",
                            e.errno_text()
                        )));
                        res.check_errors += 1;
                        return Err(e);
                    }
                    let bytes = table.to_vec();
                    if let Err(e) = self.gate_write(&bytes, l2_off, Some(MetadataKind::ActiveL2)) {
                        self.report(Finding::Message(format!(
                            "ERROR: Could not write L2 table: {}",
                            e.errno_text()
                        )));
                        res.check_errors += 1;
                        return Err(e);
                    }
                    self.meta
                        .l2
                        .cache_mut()
                        .forget_range(l2_off, l2_off + cs as u64);
                    wrote = true;
                    res.corruptions -= dirty;
                    res.corruptions_fixed += dirty;
                }
            }
            self.batch_buf = std::mem::take(&mut batch.data);
            let done = chunk.last().map_or(0, |&i| i as u64 + 1);
            self.progress(super::PHASES[2], done, total);
        }
        if wrote {
            self.meta.sync()?;
        }
        Ok(())
    }
}
