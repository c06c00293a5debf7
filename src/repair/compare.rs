//! Comparing the counted references with the on-disk refcounts (QEMU's
//! `compare_refcounts`), repairing them in place, and the refcount part of a
//! check run (`qcow2_check_refcounts`).
//!
//! The on-disk refcounts are read one refcount block at a time, in table
//! order, into an array of the same shape as the counted one: no per-cluster
//! cache lookups. A repaired block is written back in one write once its
//! range is done, then everything is synced at the end.
//!
//! Rebuilding the refcount structures is in `rebuild.rs`.

use super::findings::{hash_x, CheckCounts, Finding, RefcountVerdict};
use super::imrt::RefArray;
use super::pass::{Fix, Pass, MAX_CHECK_CLUSTERS};
use crate::error::{Error, Limit, Result};
use crate::format::consts::*;
use crate::format::Structure;
use crate::types::MetadataKind;

impl Pass<'_, '_> {
    /// QEMU's `qcow2_check_refcounts`.
    pub(crate) fn check_refcounts(&mut self, res: &mut CheckCounts) -> Result<bool> {
        let cs = self.geom.cluster_size;
        self.refresh_file_len()?;
        let nb = self.file_clusters();
        if nb > MAX_CHECK_CLUSTERS {
            res.check_errors += 1;
            return Err(Error::TooLarge(Limit::CheckedClusters));
        }
        let sectors_bytes = self.meta.header.size / 512 * 512;
        res.total_clusters = sectors_bytes.div_ceil(cs);

        let order = self.meta.rgeom.refcount_order;
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
                    what: Structure::RefcountTable,
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
        let order = self.meta.rgeom.refcount_order;
        let rb_bits = self.meta.rgeom.refcount_block_bits;
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
            let off = self.meta.rc.table().get(r).copied().unwrap_or(0) & REFT_OFFSET_MASK;
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
            // The highest cluster in use counts the refcounts before repair.
            let top = self
                .disk
                .last_nonzero(start, end)
                .max(imrt.last_nonzero(start, end));
            if let Some(t) = top {
                *highest = t as u64;
            }
            let mut next = start;
            while let Some(c) = self.disk.first_diff(imrt, next, end) {
                next = c + 1;
                let r1 = self.disk.get(c);
                let r2 = imrt.get(c);
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
            if r % 8 == 7 || end == nb {
                self.progress(super::PHASES[1], end as u64, nb as u64);
            }
        }
        if wrote {
            self.meta.sync()?;
            // QEMU discards clusters whose refcount dropped to 0 (DISCARD_ALWAYS).
            for c in freed {
                let off = c << self.geom.cluster_bits;
                // Best effort, and refused over metadata.
                let _ = self.meta.gate.discard(off, cs as u64);
            }
        }
        Ok(())
    }

    /// Writes a whole refcount block that the comparison repaired, and
    /// drops any cached copy of it.
    fn write_refblock_direct(&mut self, block: &[u8], off: u64) -> Result<()> {
        self.meta.rc.cache_mut().remove(off);
        self.gate_write(block, off, Some(MetadataKind::RefcountBlock))
    }

    /// The on-disk refcount of host cluster `c` as the last comparison saw it
    /// (after its repairs); clusters past the compared range are read from
    /// their refcount block. `None` if it cannot be read (unaligned block).
    #[inline(always)]
    pub(crate) fn disk_refcount(&self, c: u64) -> Option<u64> {
        let r = c >> self.meta.rgeom.refcount_block_bits;
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
            .and_then(|i| self.meta.rc.table().get(i))
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
        let bi = (c & (self.meta.rgeom.refcount_block_entries() - 1)) as usize;
        crate::format::refcount::get(&block, self.meta.rgeom.refcount_order, bi)
    }
}
