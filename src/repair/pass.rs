//! One check run over an open image (QEMU's `qcow2_co_check_locked`): read
//! and check the snapshot table, count every reference into an in-memory
//! refcount array, compare it with the on-disk refcounts (repairing or
//! rebuilding them), check the COPIED flags, rewrite a broken snapshot table.
//!
//! A `Pass` borrows the image's metadata state ([`Meta`]) for its whole
//! duration: every repair write goes through [`WriteGate::write`](crate::meta::WriteGate::write), and the
//! in-memory L1 table, refcount table and header it changes stay those of
//! the open image, so a second ("double check") pass sees the repaired state.

use super::findings::{CheckCounts, Finding};
use super::imrt::RefArray;
use super::snapshots::SnapTable;
use super::{CheckEvent, Sink};
use crate::error::{Error, IoOp, Limit, Result};
use crate::format::consts::*;
use crate::format::entry::EntryFormat;
use crate::meta::{FileReader, Meta};
use crate::types::Geometry;
use std::collections::HashSet;

/// What a pass may repair (QEMU's `BdrvCheckMode` bits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fix {
    /// `BDRV_FIX_LEAKS`: lower refcounts that are too high.
    pub leaks: bool,
    /// `BDRV_FIX_ERRORS`: everything else, including rebuilding refcounts.
    pub errors: bool,
}

impl Fix {
    /// Whether anything may be repaired (the image is open read-write).
    pub fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// Largest number of host clusters the checker handles (QEMU refuses more
/// than `INT_MAX` with EFBIG).
pub(crate) const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;

/// The state of one check run.
pub(crate) struct Pass<'a, 's> {
    /// The image's metadata state: header, L1 and refcount tables, caches,
    /// the overlap map, the write gate.
    pub meta: &'a mut Meta,
    /// The image file (reads bypass the caches).
    pub file: FileReader,
    /// Shifts and masks of the image.
    pub geom: Geometry,
    /// How L2 entries decode.
    pub efmt: EntryFormat,
    /// What this pass may repair.
    pub fix: Fix,
    /// The image is open read-write (corruption events are then fatal).
    pub writable: bool,
    /// The image has an external data file.
    pub data_file: bool,
    /// Current length of the image file.
    pub file_len: u64,
    /// The snapshot table as this pass read it.
    pub snaps: SnapTable,
    /// Where findings and events go.
    pub sink: &'a mut Sink<'s>,
    /// On-disk refcounts of clusters `[0, disk.len())`, loaded by the last
    /// comparison and kept up to date by its repairs.
    pub disk: RefArray,
    /// Refcount table indices whose block offset is unaligned: their
    /// refcounts cannot be read.
    pub bad_blocks: HashSet<u64>,
    /// A corruption event was already reported.
    pub signaled_corruption: bool,
    /// Snapshot L1 tables registered with the overlap checker (offset, bytes).
    pub registered_l1: Vec<(u64, u64)>,
    /// Buffer reused for batches of tables.
    pub batch_buf: Vec<u8>,
}

impl<'a, 's> Pass<'a, 's> {
    /// A pass over the image whose metadata is `meta`.
    pub fn new(meta: &'a mut Meta, sink: &'a mut Sink<'s>, fix: Fix, writable: bool) -> Self {
        let file = meta.gate.reader();
        let geom = meta.geom;
        let efmt = meta.efmt;
        let data_file = efmt.external_data;
        let order = meta.rgeom.refcount_order;
        Pass {
            meta,
            file,
            geom,
            efmt,
            fix,
            writable,
            data_file,
            file_len: 0,
            snaps: SnapTable::default(),
            sink,
            disk: RefArray::new(order, 0),
            bad_blocks: HashSet::new(),
            signaled_corruption: false,
            registered_l1: Vec::new(),
            batch_buf: Vec::new(),
        }
    }

    /// Reports a finding.
    pub fn report(&mut self, f: Finding) {
        self.sink.push(f);
    }

    /// Reports progress.
    pub fn progress(&mut self, phase: &'static str, done: u64, total: u64) {
        self.sink.event(CheckEvent::Progress { phase, done, total });
    }

    /// Re-reads the length of the image file.
    pub fn refresh_file_len(&mut self) -> Result<u64> {
        self.file_len = self.file.len()?;
        Ok(self.file_len)
    }

    /// Number of host clusters covering the file.
    pub fn file_clusters(&self) -> u64 {
        self.file_len.div_ceil(self.geom.cluster_size)
    }

    /// [`Pass::inc_refcounts`] for one whole cluster at `offset`, with a
    /// fast path for the common case of a cluster inside the file.
    #[inline(always)]
    pub fn inc_cluster(
        &mut self,
        res: &mut CheckCounts,
        imrt: &mut RefArray,
        offset: u64,
    ) -> Result<()> {
        let c = offset >> self.geom.cluster_bits;
        if self.geom.is_aligned(offset) && offset < self.file_len && (c as usize) < imrt.len() {
            if !imrt.inc(c as usize) {
                self.report(Finding::RefcountOverflow { offset });
                res.corruptions += 1;
            }
            return Ok(());
        }
        self.inc_refcounts(res, imrt, offset, self.geom.cluster_size)
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: counts one reference to every
    /// cluster touched by `[offset, offset + size)`, growing the array for
    /// ranges that end less than a cluster past the end of the file and
    /// reporting (not counting) ranges that go further.
    pub fn inc_refcounts(
        &mut self,
        res: &mut CheckCounts,
        imrt: &mut RefArray,
        offset: u64,
        size: u64,
    ) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let cs = self.geom.cluster_size;
        let end = u128::from(offset) + u128::from(size);
        if end >= u128::from(self.file_len) + u128::from(cs) {
            self.report(Finding::ExceedsEof { offset, size });
            res.corruptions += 1;
            return Ok(());
        }
        // end < file_len + cs, so this cannot overflow.
        let first = offset >> self.geom.cluster_bits;
        let last = (offset + size - 1) >> self.geom.cluster_bits;
        if last as usize >= imrt.len() {
            if last >= MAX_CHECK_CLUSTERS {
                res.check_errors += 1;
                return Err(Error::TooLarge(Limit::CheckedClusters));
            }
            imrt.resize(last as usize + 1);
        }
        for c in first..=last {
            if !imrt.inc(c as usize) {
                self.report(Finding::RefcountOverflow {
                    offset: c << self.geom.cluster_bits,
                });
                res.corruptions += 1;
            }
        }
        Ok(())
    }

    /// Writes metadata of `kind` (or anything new with `None`) through the
    /// image's write gate; see [`Pass::gate_check`].
    pub fn gate_write(
        &mut self,
        buf: &[u8],
        offset: u64,
        kind: Option<crate::types::MetadataKind>,
    ) -> Result<()> {
        self.gate_check(offset, buf.len() as u64, kind.map_or(0, |k| k.bit()))?;
        self.meta.gate.write(buf, offset, kind)
    }

    /// The write gate's overlap check; a write that would hit metadata other
    /// than `exempt` is refused and reported as QEMU's corruption event.
    pub fn gate_check(&mut self, offset: u64, len: u64, exempt: u16) -> Result<()> {
        let r = self.meta.gate.check(offset, len, exempt);
        if let Err(Error::OverlapPrevented { kind, .. }) = &r {
            self.signal_corruption(format!(
                "Preventing invalid write on metadata (overlaps with {})",
                kind.qemu_name()
            ));
        }
        r
    }

    /// Reads `buf.len()` bytes at `offset` (zeroes past the end of the file).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_at(buf, offset)
            .map_err(|e| Error::io(IoOp::Read, offset, e))
    }

    /// Reports a corruption event the way QEMU's `qcow2_signal_corruption`
    /// does: once, fatal (the corrupt bit is set) on a writable image.
    pub fn signal_corruption(&mut self, message: String) {
        if self.signaled_corruption {
            return;
        }
        let fatal = self.writable;
        self.report(Finding::CorruptionEvent { message, fatal });
        if fatal && self.meta.header.incompatible_features & INCOMPAT_CORRUPT == 0 {
            self.meta.header.incompatible_features |= INCOMPAT_CORRUPT;
            // Best effort, as in QEMU: the check goes on either way.
            let _ = self.meta.write_incompatible_features_for_repair();
        }
        self.signaled_corruption = true;
    }
}
