//! Counting references (QEMU's `calculate_refcounts` and its helpers): the
//! header, the active and every snapshot L1/L2 tree, the snapshot table,
//! the refcount table and blocks, the LUKS header and the persistent bitmaps
//! all add one reference per host cluster they occupy; the L1/L2 entries
//! are checked on the way.
//!
//! L2 tables are read in batches: a window of L1 entries is gathered, its
//! tables are read in host-offset order with adjacent tables merged into one
//! read, then they are processed in L1 order (so findings come out in
//! QEMU's order).

use super::findings::{CheckCounts, Finding};
use super::imrt::RefArray;
use super::pass::{Pass, MAX_CHECK_CLUSTERS};
use crate::error::{Error, Limit, Result};
use crate::format::bitmap::{decode_bitmap_directory, decode_bitmap_table_entry};
use crate::format::consts::*;
use crate::format::header::HeaderExtension;
use crate::format::{be_u64, put_be_u64};
use crate::types::MetadataKind;

/// All subclusters allocated (low word of an extended L2 bitmap).
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// All subclusters zero (high word of an extended L2 bitmap).
const L2_BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Bytes of L2 tables read per batch at most.
const BATCH_BYTES: u64 = 1 << 20;

/// QEMU's cluster types of an L2 entry (`qcow2_get_cluster_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

/// Classifies an L2 entry as QEMU does.
#[inline]
pub(crate) fn cluster_type(entry: u64, extended_l2: bool, data_file: bool) -> ClusterType {
    if entry & OFLAG_COMPRESSED != 0 {
        ClusterType::Compressed
    } else if entry & OFLAG_ZERO != 0 && !extended_l2 {
        if entry & L2E_OFFSET_MASK != 0 {
            ClusterType::ZeroAlloc
        } else {
            ClusterType::ZeroPlain
        }
    } else if entry & L2E_OFFSET_MASK == 0 {
        if data_file && entry & OFLAG_COPIED != 0 {
            ClusterType::Normal
        } else {
            ClusterType::Unallocated
        }
    } else {
        ClusterType::Normal
    }
}

/// A set of tables read together: `data[pos[i]..pos[i] + bytes]` is table `i`.
pub(crate) struct Batch {
    pub data: Vec<u8>,
    /// Start of each table in `data`, or `None` if its read failed.
    pub pos: Vec<Option<usize>>,
}

impl Pass<'_, '_> {
    /// Reads tables of `bytes` bytes at `offsets`, merging tables that are
    /// adjacent on disk into single reads.
    pub(crate) fn read_tables(&mut self, offsets: &[u64], bytes: usize) -> Batch {
        let mut order: Vec<usize> = (0..offsets.len()).collect();
        order.sort_by_key(|&i| offsets[i]);
        let mut data: Vec<u8> = std::mem::take(&mut self.batch_buf);
        data.clear();
        let mut pos = vec![None; offsets.len()];
        let mut k = 0;
        while k < order.len() {
            // A run of tables that follow each other on disk (duplicates share).
            let start = offsets[order[k]];
            let mut end = start.saturating_add(bytes as u64);
            let mut j = k + 1;
            while j < order.len() {
                let o = offsets[order[j]];
                if o == end && end - start < BATCH_BYTES {
                    end = o.saturating_add(bytes as u64);
                } else if o.saturating_add(bytes as u64) <= end {
                    // Same table as one already in the run (or inside it).
                } else {
                    break;
                }
                j += 1;
            }
            let len = (end - start) as usize;
            let base = data.len();
            data.resize(base + len, 0);
            let ok = self.read(&mut data[base..], start).is_ok();
            for &i in &order[k..j] {
                if ok {
                    pos[i] = Some(base + (offsets[i] - start) as usize);
                }
            }
            k = j;
        }
        Batch { data, pos }
    }

    /// QEMU's `calculate_refcounts`. `rebuild` is set when the refcount
    /// structures themselves are broken.
    pub(crate) fn calculate_refcounts(
        &mut self,
        res: &mut CheckCounts,
        imrt: &mut RefArray,
        fix_errors: bool,
        rebuild: &mut bool,
    ) -> Result<()> {
        let cs = self.geom.cluster_size;
        // Header.
        self.inc_refcounts(res, imrt, 0, cs)?;
        // Active L1 table.
        let (l1_off, l1_size) = (self.meta.header.l1_table_offset, self.meta.header.l1_size);
        self.check_refcounts_l1(res, imrt, l1_off, l1_size, true, fix_errors)?;
        // Snapshots.
        let nb = self.snaps.entries.len() as u64;
        if self.data_file && nb != 0 {
            self.report(Finding::SnapshotsWithDataFile { count: nb });
            res.corruptions += 1;
        }
        for i in 0..self.snaps.entries.len() {
            let (off, size, id, name) = {
                let s = &self.snaps.entries[i];
                (s.l1_table_offset, s.l1_size, s.id.clone(), s.name.clone())
            };
            if !self.geom.is_aligned(off) {
                self.report(Finding::SnapshotL1Unaligned {
                    id,
                    name,
                    offset: off,
                });
                res.corruptions += 1;
                continue;
            }
            if u64::from(size) > MAX_L1_BYTES / 8 {
                self.report(Finding::SnapshotL1TooLarge {
                    id,
                    name,
                    l1_size: size,
                });
                res.corruptions += 1;
                continue;
            }
            if off >= 1 << 63 {
                // QEMU would try to allocate an array for this offset and fail.
                res.check_errors += 1;
                return Err(Error::TooLarge(Limit::CheckedClusters));
            }
            self.check_refcounts_l1(res, imrt, off, size, false, fix_errors)?;
        }
        let (soff, ssize) = (self.snaps.offset, self.snaps.size);
        self.inc_refcounts(res, imrt, soff, ssize)?;
        // Refcount table.
        let rt_off = self.meta.header.refcount_table_offset;
        let rt_bytes = self.meta.rc.table().len() as u64 * 8;
        self.inc_refcounts(res, imrt, rt_off, rt_bytes)?;
        // LUKS header.
        let crypto = self.meta.header.extensions.iter().find_map(|e| match e {
            HeaderExtension::Crypto { offset, length } if self.meta.header.crypt_method == 2 => {
                Some((*offset, *length))
            }
            _ => None,
        });
        if let Some((o, l)) = crypto {
            self.inc_refcounts(res, imrt, o, l)?;
        }
        // Bitmaps.
        self.check_bitmaps_refcounts(res, imrt)?;
        self.check_refblocks(res, imrt, rebuild, fix_errors)
    }

    /// QEMU's `check_refcounts_l1` for the L1 table at `l1_off` with
    /// `l1_size` entries (the active one with statistics, or a snapshot's).
    fn check_refcounts_l1(
        &mut self,
        res: &mut CheckCounts,
        imrt: &mut RefArray,
        l1_off: u64,
        l1_size: u32,
        active: bool,
        fix_errors: bool,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let l1_bytes = u64::from(l1_size) * 8;
        self.inc_refcounts(res, imrt, l1_off, l1_bytes)?;
        let mut raw = vec![0u8; l1_bytes as usize];
        if let Err(e) = self.read(&mut raw, l1_off) {
            self.report(Finding::Message(
                "ERROR: I/O error in check_refcounts_l1".into(),
            ));
            res.check_errors += 1;
            return Err(e);
        }
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| be_u64(c, 0).unwrap_or(0))
            .collect();
        drop(raw);
        let l2_bytes = self.geom.cluster_size as usize;
        let window = (BATCH_BYTES as usize / l2_bytes).max(1);
        let total = l1.len() as u64;
        let nonzero: Vec<usize> = (0..l1.len()).filter(|&i| l1[i] != 0).collect();
        for chunk in nonzero.chunks(window) {
            let offsets: Vec<u64> = chunk.iter().map(|&i| l1[i] & L1E_OFFSET_MASK).collect();
            let mut batch = self.read_tables(&offsets, l2_bytes);
            for (k, &i) in chunk.iter().enumerate() {
                let entry = l1[i];
                if entry & L1E_RESERVED_MASK != 0 {
                    self.report(Finding::L1ReservedBits { entry });
                    res.corruptions += 1;
                }
                let l2_off = entry & L1E_OFFSET_MASK;
                self.inc_refcounts(res, imrt, l2_off, self.geom.cluster_size)?;
                if !self.geom.is_aligned(l2_off) {
                    self.report(Finding::UnalignedL2 { offset: l2_off });
                    res.corruptions += 1;
                }
                let Some(p) = batch.pos[k] else {
                    self.report(Finding::Message(
                        "ERROR: I/O error in check_refcounts_l2".into(),
                    ));
                    res.check_errors += 1;
                    let mut probe = vec![0u8; l2_bytes];
                    return Err(self
                        .read(&mut probe, l2_off)
                        .err()
                        .unwrap_or_else(|| Error::io(crate::error::IoOp::Read, l2_off, eio())));
                };
                let table = &mut batch.data[p..p + l2_bytes];
                let r = self.check_refcounts_l2(res, imrt, l2_off, table, active, fix_errors);
                if r.is_err() {
                    self.batch_buf = std::mem::take(&mut batch.data);
                }
                r?;
            }
            self.batch_buf = std::mem::take(&mut batch.data);
            if active {
                let done = chunk.last().map_or(0, |&i| i as u64 + 1);
                self.progress(super::PHASES[0], done, total);
            }
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2` for the table read at `l2_off`.
    fn check_refcounts_l2(
        &mut self,
        res: &mut CheckCounts,
        imrt: &mut RefArray,
        l2_off: u64,
        table: &mut [u8],
        active: bool,
        fix_errors: bool,
    ) -> Result<()> {
        let ext = self.geom.extended_l2;
        let esize = self.geom.l2_entry_bytes as usize;
        let entries = self.geom.l2_entries() as usize;
        let cs = self.geom.cluster_size;
        let data_file = self.data_file;
        let mut next_contiguous: u64 = 0;
        // Entries needing more than "count one aligned cluster": compressed,
        // zero, reserved bits, unaligned offsets.
        let slow =
            OFLAG_COMPRESSED | OFLAG_ZERO | L2E_STD_RESERVED_MASK | ((cs - 1) & L2E_OFFSET_MASK);
        for i in 0..entries {
            let entry = be_u64(table, i * esize).unwrap_or(0);
            if !ext {
                if entry == 0 {
                    continue;
                }
                if entry & slow == 0 && entry & L2E_OFFSET_MASK != 0 {
                    let offset = entry & L2E_OFFSET_MASK;
                    if active {
                        res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + cs;
                    }
                    if !data_file {
                        self.inc_cluster(res, imrt, offset)?;
                    }
                    continue;
                }
            }
            let bitmap = if ext {
                be_u64(table, i * esize + 8).unwrap_or(0)
            } else {
                0
            };
            let ty = cluster_type(entry, ext, data_file);
            if ty != ClusterType::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                self.report(Finding::L2ReservedBits { entry });
                res.corruptions += 1;
            }
            match ty {
                ClusterType::Compressed => {
                    if entry & OFLAG_COPIED != 0 {
                        self.report(Finding::CompressedCopied {
                            coffset: entry & self.efmt.compressed_offset_mask(),
                        });
                        res.corruptions += 1;
                    }
                    if data_file {
                        self.report(Finding::CompressedWithDataFile {
                            index: i as u64,
                            entry,
                        });
                        res.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        self.report(Finding::CompressedWithBitmap {
                            index: i as u64,
                            entry,
                        });
                        res.corruptions += 1;
                        continue;
                    }
                    let coffset = entry & self.efmt.compressed_offset_mask();
                    let sectors = ((entry >> self.efmt.csize_shift()) & self.efmt.csize_mask()) + 1;
                    let csize = sectors * SECTOR_SIZE - (coffset & (SECTOR_SIZE - 1));
                    self.inc_refcounts(res, imrt, coffset, csize)?;
                    if active {
                        res.allocated_clusters += 1;
                        res.compressed_clusters += 1;
                        res.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let offset = entry & L2E_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        res.corruptions += 1;
                        self.report(Finding::CorruptSubclusterBitmap { offset });
                    }
                    if !self.geom.is_aligned(offset) {
                        res.corruptions += 1;
                        let contains_data = if ext {
                            bitmap & L2_BITMAP_ALL_ALLOC != 0
                        } else {
                            entry & OFLAG_ZERO == 0
                        };
                        if !contains_data {
                            self.report(Finding::UnalignedPreallocated {
                                offset,
                                repairing: fix_errors,
                            });
                            if fix_errors {
                                match self.fix_l2_entry_by_zero(res, l2_off, table, i, active) {
                                    Ok(()) => continue,
                                    Err(FixError::Overlap(e)) => return Err(e),
                                    Err(FixError::Failed) => {}
                                }
                            }
                        } else {
                            self.report(Finding::UnalignedData { offset });
                        }
                    }
                    if active {
                        res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(cs);
                    }
                    if !data_file {
                        self.inc_cluster(res, imrt, offset)?;
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                        res.corruptions += 1;
                        self.report(Finding::UnallocatedWithBitmap);
                    }
                }
            }
        }
        Ok(())
    }

    /// QEMU's `fix_l2_entry_by_zero`: turns entry `index` of the table at
    /// `l2_off` into a plain zero cluster (all its subclusters zero with
    /// extended L2) and writes that one entry, synchronously.
    fn fix_l2_entry_by_zero(
        &mut self,
        res: &mut CheckCounts,
        l2_off: u64,
        table: &mut [u8],
        index: usize,
        active: bool,
    ) -> std::result::Result<(), FixError> {
        let esize = self.geom.l2_entry_bytes as usize;
        let at = index * esize;
        if self.geom.extended_l2 {
            let mut bitmap = be_u64(table, at + 8).unwrap_or(0);
            bitmap |= bitmap << 32;
            bitmap &= L2_BITMAP_ALL_ZEROES;
            put_be_u64(table, at + 8, bitmap);
            put_be_u64(table, at, 0);
        } else {
            put_be_u64(table, at, OFLAG_ZERO);
        }
        let kind = if active {
            MetadataKind::ActiveL2
        } else {
            MetadataKind::InactiveL2
        };
        let entry_off = l2_off + at as u64;
        let bytes = table[at..at + esize].to_vec();
        if let Err(e) = self.gate_check(entry_off, esize as u64, kind.bit()) {
            self.report(Finding::Message("ERROR: Overlap check failed".into()));
            res.check_errors += 1;
            return Err(FixError::Overlap(e));
        }
        let r = self
            .gate_write(&bytes, entry_off, Some(kind))
            .and_then(|()| self.meta.sync());
        self.meta
            .l2
            .cache_mut()
            .forget_range(entry_off, entry_off + esize as u64);
        match r {
            Ok(()) => {
                res.corruptions -= 1;
                res.corruptions_fixed += 1;
                Ok(())
            }
            Err(e) => {
                self.report(Finding::Message(format!(
                    "ERROR: Failed to overwrite L2 table entry: {}",
                    e.errno_text()
                )));
                res.check_errors += 1;
                Err(FixError::Failed)
            }
        }
    }

    /// QEMU's `check_refblocks`: every refcount table entry must be a
    /// cluster-aligned block inside the image, referenced exactly once.
    fn check_refblocks(
        &mut self,
        res: &mut CheckCounts,
        imrt: &mut RefArray,
        rebuild: &mut bool,
        fix_errors: bool,
    ) -> Result<()> {
        let cs = self.geom.cluster_size;
        let n = self.meta.rc.table().len();
        for i in 0..n {
            let raw = self.meta.rc.table()[i];
            let offset = raw & REFT_OFFSET_MASK;
            let cluster = offset >> self.geom.cluster_bits;
            if raw & REFT_RESERVED_MASK != 0 {
                self.report(Finding::ReftableReservedBits { index: i as u64 });
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if !self.geom.is_aligned(offset) {
                self.report(Finding::RefblockUnaligned { index: i as u64 });
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= imrt.len() as u64 {
                res.corruptions += 1;
                let repairing = fix_errors;
                self.report(Finding::RefblockOutside {
                    index: i as u64,
                    repairing,
                });
                if repairing {
                    match self.extend_for_refblock(imrt, offset) {
                        Ok(()) => {
                            res.corruptions -= 1;
                            res.corruptions_fixed += 1;
                            self.inc_refcounts(res, imrt, offset, cs)?;
                        }
                        Err(reason) => {
                            *rebuild = true;
                            self.report(Finding::ResizeFailed { reason });
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc_refcounts(res, imrt, offset, cs)?;
                let rc = imrt.get(cluster as usize);
                if rc != 1 {
                    self.report(Finding::RefblockRefcount {
                        index: i as u64,
                        refcount: rc,
                    });
                    res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Extends the file so that the refcount block at `offset` lies inside
    /// it (QEMU truncates the file up to its end), and the array with it.
    fn extend_for_refblock(
        &mut self,
        imrt: &mut RefArray,
        offset: u64,
    ) -> std::result::Result<(), String> {
        let cs = self.geom.cluster_size;
        let new_len = offset
            .checked_add(cs)
            .filter(|l| *l <= i64::MAX as u64)
            .ok_or_else(|| "Invalid argument".to_string())?;
        let clusters = new_len.div_ceil(cs);
        if clusters > MAX_CHECK_CLUSTERS {
            return Err("File too large".into());
        }
        if new_len > self.file_len {
            self.meta.gate.set_len(new_len).map_err(|e| match e {
                Error::Io { source, .. } => {
                    crate::error::strerror(source.raw_os_error().unwrap_or(libc::EIO))
                }
                e => e.errno_text(),
            })?;
        }
        self.refresh_file_len().map_err(|e| e.errno_text())?;
        let clusters = self.file_clusters();
        if clusters as usize > imrt.len() {
            imrt.resize(clusters as usize);
        }
        if offset >> self.geom.cluster_bits >= imrt.len() as u64 {
            return Err("Invalid argument".into());
        }
        Ok(())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts` (when the bitmaps extension is
    /// valid: autoclear bit 0 set).
    fn check_bitmaps_refcounts(
        &mut self,
        res: &mut CheckCounts,
        imrt: &mut RefArray,
    ) -> Result<()> {
        if self.meta.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self.meta.header.bitmaps().copied() else {
            return Ok(());
        };
        if ext.nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc_refcounts(
            res,
            imrt,
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
        )?;
        let invalid = || Error::InvalidArgument("Invalid argument".into());
        let mut dir = vec![0u8; ext.bitmap_directory_size as usize];
        self.read(&mut dir, ext.bitmap_directory_offset)?;
        let list = decode_bitmap_directory(&dir, ext.nb_bitmaps, self.geom.cluster_bits)
            .ok()
            .filter(|l| {
                l.iter().all(|b| {
                    b.check_covers(self.meta.header.size, self.geom.cluster_bits)
                        .is_ok()
                })
            });
        let Some(list) = list else {
            res.corruptions += 1;
            return Err(invalid());
        };
        for bm in list {
            let tsize = u64::from(bm.bitmap_table_size) * 8;
            let toff = bm.bitmap_table_offset;
            self.inc_refcounts(res, imrt, toff, tsize)?;
            // QEMU's bitmap_table_load checks every entry before any is
            // counted; the table is streamed twice rather than held (it may
            // be up to 1 GiB).
            let mut chunk = vec![0u8; (BATCH_BYTES.min(tsize)) as usize];
            for counting in [false, true] {
                let mut pos = 0u64;
                while pos < tsize {
                    let n = (tsize - pos).min(chunk.len() as u64) as usize;
                    if self.read(&mut chunk[..n], toff + pos).is_err() {
                        res.corruptions += 1;
                        return Err(Error::io(crate::error::IoOp::Read, toff + pos, eio()));
                    }
                    for c in chunk[..n].chunks_exact(8) {
                        let e = be_u64(c, 0).unwrap_or(0);
                        if !counting {
                            if decode_bitmap_table_entry(e, self.geom.cluster_bits).is_err() {
                                res.corruptions += 1;
                                return Err(invalid());
                            }
                            continue;
                        }
                        let off = e & crate::format::bitmap::BME_TABLE_ENTRY_OFFSET_MASK;
                        if off != 0 {
                            self.inc_cluster(res, imrt, off)?;
                        }
                    }
                    pos += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Why an L2 entry could not be zeroed.
pub(crate) enum FixError {
    /// The write would have hit other metadata: stop checking this table.
    Overlap(Error),
    /// The write failed: go on checking.
    Failed,
}

/// An EIO error value.
pub(crate) fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}
