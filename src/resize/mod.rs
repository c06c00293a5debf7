//! Resizing an image: growing, with or without preallocation, and shrinking,
//! with QEMU's layout (`qcow2_co_truncate`).
//!
//! Growing first grows the L1 table to the exact size needed, then:
//! * `metadata` replays QEMU's `preallocate_co`: guest range by guest range,
//!   L2 tables and data clusters are allocated through the normal allocator
//!   in QEMU's order (`qcow2_alloc_host_offset`: keep the clusters that can
//!   be written in place, allocate the rest contiguously, one L2 slice at a
//!   time), the entries become `NORMAL | COPIED`, and the file is extended to
//!   the end of the last data cluster without writing data;
//! * `falloc` / `full` follow QEMU's refcount-area path: new refcount
//!   structures covering the new data are built past the end of the used
//!   space (`qcow2_refcount_area` with an exact size), the data clusters are
//!   allocated right after them in one run, the file is grown over them
//!   (`fallocate`, or zeroes written), then the L2 entries are linked (new L2
//!   tables come from the allocator at that point).
//!
//! With an external data file, guest cluster N maps to data-file offset N and
//! the data file is extended (with the mode) instead.
//!
//! Bulk work is batched: new L2 tables are built in memory and written whole,
//! a batch at a time, after the refcounts they depend on are durable, and the
//! L1 entries pointing at them only after that (the write-ordering rules of
//! `ARCHITECTURE.md`). Refcounts are updated a refcount block at a time.
//!
//! Shrinking discards every cluster past the new end (entries cleared,
//! references dropped), releases the L2 tables past the new L1 size, drops
//! refcount blocks that count nothing but themselves and truncates the file
//! after the last used cluster.

use crate::error::{Error, IoOp, Limit, Result};
use crate::format::consts::*;
use crate::format::entry::L2Entry;
use crate::format::Structure;
use crate::image::Image;
use crate::meta::{DiscardType, Meta, RawL2};
use crate::options::Preallocation;
use crate::types::HostOffset;

mod prealloc;

/// Zeroes written per request when a data area is filled (`full`).
const ZERO_CHUNK: u64 = 1 << 20;
/// Pending reference drops applied while discarding a large range.
const DISCARD_FLUSH_FREES: usize = 1 << 20;

impl Image {
    /// Changes the virtual size to `new_size` bytes, as `qemu-img resize
    /// [--preallocation=MODE] [--shrink]` does.
    ///
    /// Growing preallocates the new range with `prealloc` (QEMU's layout, see
    /// the [module docs](crate::resize)); images with `data_file_raw` always
    /// get at least `metadata`. When a backing file reaches past the old
    /// end, the new range is made to read as zeroes (zero clusters), as
    /// QEMU does.
    ///
    /// Shrinking needs `shrink`: every cluster past the new end is discarded
    /// (its data is lost), L2 tables and refcount blocks that become unused
    /// are released and the file is truncated after its last used cluster;
    /// an external data file is truncated to the new size.
    ///
    /// ```
    /// use qcow2kit::options::Preallocation;
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.resize_with(16 << 20, Preallocation::Off, false)?;
    /// assert_eq!(img.size(), 16 << 20);
    /// // Shrinking must be asked for.
    /// assert!(img.resize_with(4 << 20, Preallocation::Off, false).is_err());
    /// img.resize_with(4 << 20, Preallocation::Off, true)?;
    /// assert_eq!(img.size(), 4 << 20);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::InvalidArgument` with QEMU's messages: "Preallocation can only
    /// be used for growing images", "Use the --shrink option to perform a
    /// shrink operation.", "The new size must be a multiple of 512",
    /// "Can't resize a v2 image which has snapshots"; `Error::TooLarge` when
    /// the L1 table would exceed 32 MiB; `Error::ReadOnly`; I/O errors.
    pub fn resize_with(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        self.writable()?;
        let old = self.lock()?.header.size;
        // qemu-img resize's own checks, in its order.
        if prealloc != Preallocation::Off && new_size <= old {
            return Err(Error::InvalidArgument(
                "Preallocation can only be used for growing images".into(),
            ));
        }
        if new_size < old && !shrink {
            return Err(Error::InvalidArgument(
                "Use the --shrink option to perform a shrink operation.".into(),
            ));
        }
        self.truncate(new_size, prealloc)
    }

    /// QEMU's `qcow2_co_truncate`: sets the size to `new_size`, shrinking or
    /// growing (with `prealloc`; to the same size too, where `falloc` and
    /// `full` still build a new refcount area, as QEMU's image creation does
    /// for a zero size).
    pub(crate) fn truncate(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.writable()?;
        let mut meta = self.lock_idle()?;
        let old = meta.header.size;
        if new_size < old && prealloc != Preallocation::Off {
            return Err(Error::InvalidArgument(
                "Preallocation can't be used for shrinking an image".into(),
            ));
        }
        if new_size > i64::MAX as u64 {
            return Err(Error::InvalidArgument(
                "Invalid image size specified. Must be between 0 and 9223372036854775807.".into(),
            ));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::InvalidArgument(
                "The new size must be a multiple of 512".into(),
            ));
        }
        if !meta.snapshots.is_empty() && meta.header.version < 3 {
            return Err(Error::InvalidArgument(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        // QEMU's `qcow2_truncate_bitmaps_check`: no inconsistent bitmap; the
        // others are flagged `in_use` on disk before the size changes and
        // resized with the disk (stored at close).
        if let Err(e) = meta.prepare_bitmaps_resize() {
            return Err(match e {
                Error::Bitmap(_) => e,
                e => self.fail(&mut meta, e, IoOp::Write),
            });
        }
        let need = self.geom.l1_entries_for(new_size);
        if need > MAX_L1_BYTES / 8 {
            return Err(Error::TooLarge(Limit::DiskSize { size: new_size }));
        }
        // No data I/O may be in flight: clusters are freed (and reused) as
        // soon as nothing refers to them, as in QEMU.
        let barrier = self
            .io_barrier
            .write()
            .map_err(|_| Error::PreviousIoFailed)?;
        let r = (|| {
            self.before_first_write(&mut meta)?;
            // Everything durable, queued reference drops applied: the
            // allocator state QEMU would have.
            meta.flush_all(true)?;
            if new_size < old {
                self.shrink_locked(&mut meta, old, new_size)?;
            } else {
                self.grow_locked(&mut meta, old, new_size, prealloc)?;
            }
            meta.flush_all(true)?;
            if let Some(d) = self.data.external() {
                d.flush()?;
            }
            meta.write_size(new_size)?;
            meta.resize_bitmaps(new_size);
            Ok(())
        })();
        drop(barrier);
        r.map_err(|e| self.fail(&mut meta, e, IoOp::Write))
    }

    /// Grows the virtual disk to `new_size` bytes without preallocation
    /// (`resize_with(new_size, Preallocation::Off, false)`).
    ///
    /// # Errors
    /// As for [`Image::resize_with`]; a smaller size is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_with(new_size, Preallocation::Off, false)
    }

    /// Skips (`true`) or does again syncs of the image file (image creation
    /// skips them, like QEMU's `BDRV_O_NO_FLUSH`, and syncs once at the end).
    pub(crate) fn set_no_flush(&self, on: bool) -> Result<()> {
        self.lock()?.no_flush = on;
        Ok(())
    }

    // ------------------------------------------------------------------
    // Growing.
    // ------------------------------------------------------------------

    fn grow_locked(
        &self,
        meta: &mut Meta,
        old: u64,
        new: u64,
        prealloc: Preallocation,
    ) -> Result<()> {
        meta.grow_l1(self.geom.l1_entries_for(new))?;
        let external = meta.efmt.external_data;
        let raw = meta.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
        let mode = if raw && prealloc == Preallocation::Off {
            Preallocation::Metadata
        } else {
            prealloc
        };
        // A backing file reaching past the old end must not show through.
        let mut zero_write = new > old && self.backing.as_ref().is_some_and(|b| b.size() > old);
        match mode {
            Preallocation::Off => {
                if let (true, Some(d)) = (external, self.data.external()) {
                    resize_data_file(d.storage(), new, Preallocation::Off)?;
                }
            }
            Preallocation::Metadata => self.preallocate_metadata(meta, old, new, mode)?,
            Preallocation::Falloc | Preallocation::Full => {
                if external {
                    self.preallocate_metadata(meta, old, new, mode)?;
                } else {
                    // The file layer zeroes a grown file: the new clusters
                    // read as zeroes once they are marked allocated.
                    self.preallocate_area(meta, old, new, mode, zero_write)?;
                    zero_write = false;
                }
            }
        }
        if zero_write {
            self.zero_new_range(meta, old, new)?;
        }
        Ok(())
    }

    /// Makes `[old, new)` read as zeroes (QEMU's `BDRV_REQ_ZERO_WRITE`
    /// handling in truncate): zero clusters from the first subcluster
    /// boundary, explicit zeroes before it.
    fn zero_new_range(&self, meta: &mut Meta, old: u64, new: u64) -> Result<()> {
        if meta.header.version < 3 {
            return Err(Error::InvalidArgument(
                "Failed to zero out new clusters: Operation not supported".into(),
            ));
        }
        let sc = self.geom.subcluster_size();
        let zero_start = old.div_ceil(sc) * sc;
        if new > zero_start {
            self.zero_locked(meta, zero_start, new, false)?;
        }
        if zero_start > old {
            let zeros = vec![0u8; (zero_start.min(new) - old) as usize];
            let mut done = 0usize;
            while done < zeros.len() {
                done += self.allocating_write(meta, old + done as u64, &zeros[done..])? as usize;
            }
        }
        Ok(())
    }

    /// Grows the image file to `end` with the mode: `fallocate` for
    /// `falloc`, zeroes written for `full`. The range is overlap-checked
    /// first.
    fn allocate_area(&self, meta: &mut Meta, end: u64, mode: Preallocation) -> Result<()> {
        let len = self.file.len()?;
        if end <= len {
            return Ok(());
        }
        match mode {
            Preallocation::Full => meta.gate.fill_zeroes(len, end, ZERO_CHUNK)?,
            _ => meta.gate.allocate(len, end - len)?,
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Shrinking.
    // ------------------------------------------------------------------

    fn shrink_locked(&self, meta: &mut Meta, old: u64, new: u64) -> Result<()> {
        let g = self.geom;
        let cs = g.cluster_size;
        let keep_l1 = g.l1_entries_for(new);
        self.full_discard(meta, new.div_ceil(cs) * cs, old, keep_l1)?;
        // The cleared entries are durable before the references drop.
        meta.flush_all(true)?;
        meta.shrink_l1(keep_l1)?;
        meta.flush_all(true)?;
        meta.shrink_reftable()?;
        let len = self.file.len()?;
        match meta.last_used_cluster(len)? {
            Some(last) => {
                let end = (last + 1) * cs;
                if end < len {
                    // Like QEMU: failing to cut the tail only wastes space.
                    let _ = meta.gate.set_len(end);
                }
            }
            None => {
                return Err(Error::Corrupt {
                    what: Structure::RefcountTable,
                    offset: meta.header.refcount_table_offset,
                    msg: "There are no references in the refcount table.".into(),
                })
            }
        }
        if let Some(d) = self.data.external() {
            resize_data_file(d.storage(), new, Preallocation::Off)?;
        }
        Ok(())
    }

    /// Full discard of `[start, end)` (QEMU's `qcow2_cluster_discard` with
    /// `full_discard`): every entry becomes 0 and its reference is dropped
    /// (always discarded in the file). Missing L2 tables are allocated for
    /// L1 indices below `keep_l1`, as QEMU does; the ones above would be
    /// released again at once and are skipped.
    fn full_discard(&self, meta: &mut Meta, start: u64, end: u64, keep_l1: u64) -> Result<()> {
        let g = self.geom;
        let cs = g.cluster_size;
        let external = meta.efmt.external_data;
        let mut guest = start;
        while guest < end {
            let l1i = g.l1_index(guest);
            let table_end = end.min((l1i + 1) << (g.cluster_bits + g.l2_bits));
            let (off, _) = meta.l2_table_offset(l1i)?;
            if off == 0 && l1i >= keep_l1 {
                guest = table_end;
                continue;
            }
            let table = meta.writable_l2_table(l1i)?;
            while guest < table_end {
                let slot = meta.l2_slot(table, guest);
                meta.load_l2_slice(slot.slice)?;
                let raw = meta.read_slot(&slot);
                if raw.word != 0 || raw.bitmap != 0 {
                    let (e, _) = meta.decode_l2(raw, &slot)?;
                    meta.write_slot(&slot, RawL2 { word: 0, bitmap: 0 });
                    if !external {
                        match e {
                            L2Entry::Compressed { .. } => {
                                if let Some((o, l)) = e.compressed_range() {
                                    meta.queue_free_compressed(o, l, DiscardType::Always);
                                }
                            }
                            _ => {
                                if let Some(h) = e.host_cluster() {
                                    meta.queue_free(HostOffset(h), DiscardType::Always);
                                }
                            }
                        }
                    }
                }
                guest += cs;
            }
            if meta.rc.pending_frees() > DISCARD_FLUSH_FREES {
                meta.flush_all(true)?;
            }
        }
        Ok(())
    }
}

/// Resizes an external data file the way QEMU's file layer does: growing
/// uses `fallocate` (`falloc`) or writes zeroes (`full`); a file grown from
/// length 0 gets its first block written (QEMU's `allocate_first_block`,
/// which `qemu-img map` then reports as data). Shrinking only truncates.
pub(crate) fn resize_data_file(
    data: &dyn crate::storage::Storage,
    new: u64,
    mode: Preallocation,
) -> Result<()> {
    let len = data.len().map_err(|e| Error::io(IoOp::Read, 0, e))?;
    if new <= len || mode == Preallocation::Off || mode == Preallocation::Metadata {
        data.set_len(new)
            .map_err(|e| Error::io(IoOp::Resize, new, e))?;
    }
    if new > len {
        match mode {
            Preallocation::Falloc => data
                .allocate(len, new - len)
                .map_err(|e| Error::io(IoOp::Resize, len, e))?,
            Preallocation::Full => fill_zeroes(data, len, new)?,
            _ => {}
        }
        if len == 0 && mode != Preallocation::Full {
            let n = if new < 4096 { 512.min(new) } else { 4096 };
            data.write_at(&vec![0u8; n as usize], 0)
                .map_err(|e| Error::io(IoOp::Write, 0, e))?;
        }
    }
    Ok(())
}

/// Writes zeroes to `[from, to)` of `file` in large requests.
fn fill_zeroes(file: &dyn crate::storage::Storage, from: u64, to: u64) -> Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(to.saturating_sub(from)) as usize];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(ZERO_CHUNK) as usize;
        file.write_at(&zeros[..n], pos)
            .map_err(|e| Error::io(IoOp::Write, pos, e))?;
        pos += n as u64;
    }
    Ok(())
}
