//! Comparing the counted references with the on-disk refcounts (QEMU's
//! `compare_refcounts`), repairing them in place, rebuilding the refcount
//! structures from scratch, and the refcount part of a check run
//! (`qcow2_check_refcounts`).
//!
//! The on-disk refcounts are read one refcount block at a time, in table
//! order, into an array of the same shape as the counted one: no per-cluster
//! cache lookups. A repaired block is written back in one write once its
//! range is done, then everything is synced at the end.
//!
//! # Write order of a rebuild
//! The new refcount blocks and the new refcount table are written to an area
//! starting right after the last cluster in use (blocks in table order, then
//! the table: where QEMU's first-fit puts them when the image has no free
//! holes; QEMU would also fill holes, which only changes the end offset),
//! synced, and only then is the header switched to them with one 12-byte
//! write (`refcount_table_offset` + `refcount_table_clusters`). A crash
//! before the switch leaves the old structures in charge and the new area
//! unreferenced; after it, the old structures are merely leaked, and the
//! leak repair that follows frees them.
//!
//! Entries pointing a cluster or more past the end of the file are not
//! counted (QEMU reports them); if the new area grows the file over such a
//! cluster, the re-count finds it referenced, as QEMU's would.

use super::imrt::RefArray;
use super::pass::{Fix, Pass, MAX_CHECK_CLUSTERS};
use super::report::{hash_x, CheckCounts, Finding, RefcountVerdict};
use crate::error::{Error, Result};
use crate::format::consts::*;
use crate::format::put_be_u64;
use crate::types::MetadataKind;

/// Bytes written per request when writing a rebuilt structure.
const WRITE_CHUNK: usize = 8 << 20;

impl Pass<'_, '_> {
    /// QEMU's `qcow2_check_refcounts`.
    pub(crate) fn check_refcounts(&mut self, res: &mut CheckCounts) -> Result<bool> {
        let cs = self.geom.cluster_size;
        self.refresh_file_len()?;
        let nb = self.file_clusters();
        if nb > MAX_CHECK_CLUSTERS {
            res.check_errors += 1;
            return Err(Error::TooLarge("File too large".into()));
        }
        let sectors_bytes = self.meta.header.size / 512 * 512;
        res.total_clusters = sectors_bytes.div_ceil(cs);

        let order = self.geom.refcount_order;
        let mut imrt = RefArray::new(order, nb as usize);
        let mut rebuild = false;
        let mut rebuilt = false;
        self.calculate_refcounts(res, &mut imrt, self.fix.errors, &mut rebuild)?;

        let pre_compare = *res;
        let mut highest = 0u64;
        self.compare_refcounts(res, Fix::default(), &mut rebuild, &mut highest, &imrt)?;

        if rebuild && self.fix.errors {
            let old = *res;
            let mut fresh_leaks = 0;
            self.report(Finding::Rebuilding);
            self.rebuild_refcount_structure(&mut imrt)?;
            rebuilt = true;
            res.corruptions = 0;
            res.leaks = 0;
            rebuild = false;
            imrt.clear();
            self.calculate_refcounts(res, &mut imrt, false, &mut rebuild)?;
            if self.fix.leaks {
                let saved = *res;
                *res = CheckCounts::default();
                let leaks_only = Fix {
                    leaks: true,
                    errors: false,
                };
                self.compare_refcounts(res, leaks_only, &mut rebuild, &mut highest, &imrt)?;
                if rebuild {
                    self.report(Finding::RebuildStillBroken);
                }
                fresh_leaks = res.leaks;
                *res = saved;
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
        } else if self.fix.any() {
            if rebuild {
                self.report(Finding::NeedRebuild);
                res.check_errors += 1;
                return Err(Error::Corrupt {
                    what: "refcount table",
                    offset: self.meta.header.refcount_table_offset,
                    msg: "need to rebuild refcount structures".into(),
                });
            }
            if res.leaks != 0 || res.corruptions != 0 {
                *res = pre_compare;
                let fix = self.fix;
                self.compare_refcounts(res, fix, &mut rebuild, &mut highest, &imrt)?;
            }
        }

        self.check_oflag_copied(res)?;
        res.image_end_offset = (highest + 1) * cs;
        Ok(rebuilt)
    }

    /// QEMU's `compare_refcounts`: reports (and with `fix`, repairs) every
    /// cluster whose on-disk refcount differs from `imrt`. A refcount of 0
    /// for a referenced cluster, which cannot be repaired in place, sets
    /// `rebuild`. Leaves the on-disk refcounts in `self.disk`.
    pub(crate) fn compare_refcounts(
        &mut self,
        res: &mut CheckCounts,
        fix: Fix,
        rebuild: &mut bool,
        highest: &mut u64,
        imrt: &RefArray,
    ) -> Result<()> {
        let order = self.geom.refcount_order;
        let rb_bits = self.geom.refcount_block_bits;
        let per_block = 1usize << rb_bits;
        let cs = self.geom.cluster_size as usize;
        let nb = imrt.len();
        self.disk = RefArray::new(order, nb);
        self.bad_blocks.clear();
        *highest = 0;
        let mut block = vec![0u8; cs];
        let mut freed: Vec<u64> = Vec::new();
        let mut wrote = false;
        let blocks = nb.div_ceil(per_block);
        for r in 0..blocks {
            let start = r * per_block;
            let end = (start + per_block).min(nb);
            let off = self.meta.reftable.get(r).copied().unwrap_or(0) & REFT_OFFSET_MASK;
            let mut unreadable: Option<String> = None;
            if off == 0 {
                block.fill(0);
            } else if !self.geom.is_aligned(off) {
                self.signal_corruption(format!(
                    "Refblock offset {} unaligned (reftable index: {})",
                    hash_x(off),
                    hash_x(r as u64)
                ));
                self.bad_blocks.insert(r as u64);
                unreadable = Some("Input/output error".into());
            } else if let Err(e) = self.read(&mut block, off) {
                unreadable = Some(e.errno_text());
            }
            if let Some(reason) = unreadable {
                for c in start..end {
                    self.report(Finding::RefcountUnreadable {
                        cluster: c as u64,
                        reason: reason.clone(),
                    });
                    res.check_errors += 1;
                }
                continue;
            }
            self.disk.decode_block(order, start, end - start, &block);
            let mut dirty = false;
            for c in start..end {
                let r1 = self.disk.get(c);
                let r2 = imrt.get(c);
                if r1 == 0 && r2 == 0 {
                    continue;
                }
                *highest = c as u64;
                if r1 == r2 {
                    continue;
                }
                let fixable = if r1 == 0 {
                    *rebuild = true;
                    false
                } else {
                    (r1 > r2 && fix.leaks) || (r1 < r2 && fix.errors)
                };
                let verdict = if fixable {
                    RefcountVerdict::Repairing
                } else if r1 < r2 {
                    RefcountVerdict::Error
                } else {
                    RefcountVerdict::Leaked
                };
                self.report(Finding::Refcount {
                    verdict,
                    cluster: c as u64,
                    refcount: r1,
                    reference: r2,
                });
                if fixable {
                    crate::format::refcount::set(&mut block, order, c - start, r2);
                    self.disk.set(c, r2);
                    dirty = true;
                    if r1 > r2 {
                        res.leaks_fixed += 1;
                        if r2 == 0 {
                            freed.push(c as u64);
                        }
                    } else {
                        res.corruptions_fixed += 1;
                    }
                    continue;
                }
                if r1 < r2 {
                    res.corruptions += 1;
                } else {
                    res.leaks += 1;
                }
            }
            if dirty {
                self.write_refblock_direct(&block, off)?;
                wrote = true;
            }
            if r % 64 == 63 {
                self.progress(end as u64, nb as u64);
            }
        }
        if wrote {
            self.meta.sync()?;
            // QEMU discards clusters whose refcount dropped to 0 (DISCARD_ALWAYS).
            for c in freed {
                let off = c << self.geom.cluster_bits;
                if self.meta.gate_check(off, cs as u64, 0).is_ok() {
                    let _ = self.file.discard(off, cs as u64);
                }
            }
        }
        Ok(())
    }

    /// Writes a whole refcount block that the comparison repaired, and
    /// drops any cached copy of it.
    fn write_refblock_direct(&mut self, block: &[u8], off: u64) -> Result<()> {
        self.meta.rc_cache.remove(off);
        self.gate_write(block, off, Some(MetadataKind::RefcountBlock))
    }

    /// The on-disk refcount of host cluster `c` as the last comparison saw it
    /// (after its repairs); clusters past the compared range are read from
    /// their refcount block. `None` if it cannot be read (unaligned block).
    #[inline]
    pub(crate) fn disk_refcount(&self, c: u64) -> Option<u64> {
        let r = c >> self.geom.refcount_block_bits;
        if !self.bad_blocks.is_empty() && self.bad_blocks.contains(&r) {
            return None;
        }
        if (c as usize) < self.disk.len() {
            return Some(self.disk.get(c as usize));
        }
        self.disk_refcount_slow(r, c)
    }

    /// [`Pass::disk_refcount`] past the compared range: read the block.
    fn disk_refcount_slow(&self, r: u64, c: u64) -> Option<u64> {
        let raw = usize::try_from(r)
            .ok()
            .and_then(|i| self.meta.reftable.get(i))
            .copied()
            .unwrap_or(0);
        let off = raw & REFT_OFFSET_MASK;
        if off == 0 {
            return Some(0);
        }
        if !self.geom.is_aligned(off) {
            return None;
        }
        let mut block = vec![0u8; self.geom.cluster_size as usize];
        self.read(&mut block, off).ok()?;
        let bi = (c & (self.geom.refcount_block_entries() - 1)) as usize;
        crate::format::refcount::get(&block, self.geom.refcount_order, bi)
    }

    /// Builds a new refcount table and blocks holding exactly `imrt` (plus
    /// the new structures themselves), in an area past everything in use,
    /// and switches the header to it. See the module docs for the order.
    pub(crate) fn rebuild_refcount_structure(&mut self, imrt: &mut RefArray) -> Result<()> {
        let cb = self.geom.cluster_bits;
        let cs = self.geom.cluster_size;
        let rb_bits = self.geom.refcount_block_bits;
        let per_block = 1u64 << rb_bits;
        let order = self.geom.refcount_order;
        // Nothing cached may survive: every block is about to be replaced.
        if self.meta.rc_cache.has_dirty() {
            self.meta.flush_refcounts()?;
        }
        self.meta.rc_cache.drop_clean();

        let len = imrt.len() as u64;
        let used_blocks: Vec<u64> = (0..len.div_ceil(per_block))
            .filter(|&r| imrt.any_nonzero((r * per_block) as usize, ((r + 1) * per_block) as usize))
            .collect();
        let used_end = imrt
            .last_nonzero_below(imrt.len())
            .map_or(1, |i| i as u64 + 1);
        let mut area = used_end;
        let (nblocks, tclusters, blocks) = loop {
            let (nblocks, tclusters) = area_layout(&used_blocks, area, rb_bits, cs);
            let end = area + nblocks + tclusters;
            // Keep clear of refcount blocks the write gate still knows.
            let conflict = self
                .keep_clear
                .iter()
                .filter(|c| **c < end && **c >= area)
                .max()
                .copied();
            match conflict {
                Some(last) => area = last + 1,
                None => {
                    let first_r = area >> rb_bits;
                    let last_r = (end - 1) >> rb_bits;
                    let mut blocks: Vec<u64> = used_blocks.clone();
                    for r in first_r..=last_r {
                        if blocks.binary_search(&r).is_err() {
                            blocks.push(r);
                        }
                    }
                    blocks.sort_unstable();
                    break (nblocks, tclusters, blocks);
                }
            }
        };
        let end = area + nblocks + tclusters;
        if tclusters * cs > MAX_REFTABLE_BYTES || end >= MAX_CHECK_CLUSTERS {
            self.report(Finding::Message(
                "ERROR allocating reftable: File too large".into(),
            ));
            return Err(Error::TooLarge("Reference count table too large".into()));
        }
        // The new structures count once each.
        if end as usize > imrt.len() {
            imrt.resize(end as usize);
        }
        for c in area..end {
            imrt.set(c as usize, 1);
        }
        let entries = (tclusters * cs / 8) as usize;
        let mut table = vec![0u64; entries];
        for (k, r) in blocks.iter().enumerate() {
            table[*r as usize] = (area + k as u64) << cb;
        }

        // Refcount blocks, in chunks of whole blocks.
        let per_chunk = (WRITE_CHUNK as u64 / cs).max(1) as usize;
        let mut buf = Vec::new();
        for (ci, chunk) in blocks.chunks(per_chunk).enumerate() {
            buf.clear();
            buf.resize(chunk.len() * cs as usize, 0);
            for (k, r) in chunk.iter().enumerate() {
                let out = &mut buf[k * cs as usize..(k + 1) * cs as usize];
                imrt.encode_block(order, (r * per_block) as usize, per_block as usize, out);
            }
            let off = (area + (ci * per_chunk) as u64) << cb;
            if let Err(e) = self.gate_write(&buf, off, None) {
                self.report(Finding::Message(format!(
                    "ERROR writing refblock: {}",
                    e.errno_text()
                )));
                return Err(e);
            }
        }
        // The refcount table right after them.
        let table_off = (area + nblocks) << cb;
        let mut bytes = vec![0u8; entries * 8];
        for (i, e) in table.iter().enumerate() {
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
        if let Err(e) = self.meta.write_header_field(48, &sw) {
            self.report(Finding::Message(format!(
                "ERROR setting reftable: {}",
                e.errno_text()
            )));
            return Err(e);
        }
        // The image now uses the new structures.
        let old_blocks: Vec<u64> = self
            .meta
            .reftable
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .filter(|o| *o != 0 && self.geom.is_aligned(*o))
            .collect();
        for o in old_blocks {
            self.meta.checker.remove_refcount_block(o);
        }
        for (k, _) in blocks.iter().enumerate() {
            self.meta
                .checker
                .add_refcount_block((area + k as u64) << cb);
        }
        self.meta
            .checker
            .set_refcount_table(table_off, entries as u64 * 8);
        self.meta.header.refcount_table_offset = table_off;
        self.meta.header.refcount_table_clusters = tclusters as u32;
        self.meta.reftable = table;
        self.meta.reftable_dirty.clear();
        self.meta.rc_cache.drop_clean();
        self.meta.free_hint = 0;
        self.refresh_file_len()?;
        Ok(())
    }
}

/// How many refcount blocks and refcount table clusters an area at cluster
/// `area` needs so that the blocks cover every used range (`used_blocks`,
/// sorted) and the area itself: QEMU sizes the table to a whole number of
/// clusters holding the highest block index.
fn area_layout(used_blocks: &[u64], area: u64, rb_bits: u32, cs: u64) -> (u64, u64) {
    let (mut nblocks, mut tclusters) = (0u64, 0u64);
    loop {
        let end = area + nblocks + tclusters;
        let first_r = area >> rb_bits;
        let last_r = (end.max(area + 1) - 1) >> rb_bits;
        let shared = used_blocks
            .iter()
            .filter(|r| **r >= first_r && **r <= last_r)
            .count() as u64;
        let count = used_blocks.len() as u64 + (last_r - first_r + 1) - shared;
        let max_r = used_blocks.last().copied().unwrap_or(0).max(last_r);
        let tc = ((max_r + 1) * 8).div_ceil(cs);
        if (count, tc) == (nblocks, tclusters) {
            return (nblocks, tclusters);
        }
        nblocks = count;
        tclusters = tc;
    }
}

#[cfg(test)]
mod tests {
    use super::area_layout;

    #[test]
    fn layout_covers_itself() {
        // 64 KiB clusters, 16-bit refcounts: 32768 clusters per block.
        assert_eq!(area_layout(&[0], 20, 15, 65536), (1, 1));
        // The area starts in a new block range.
        assert_eq!(area_layout(&[0], 32768, 15, 65536), (2, 1));
        // 512-byte clusters, 64-bit refcounts: 64 clusters per block, 64
        // table entries per cluster.
        let used: Vec<u64> = (0..64).collect();
        let (nb, tc) = area_layout(&used, 64 * 64, 6, 512);
        assert_eq!(tc, 2);
        assert!(nb >= 65);
    }
}
