//! Internal snapshots: create, apply (QEMU's "goto"), delete and list, in
//! the crash-safe order of QEMU's `qcow2_snapshot_create`, `_goto` and
//! `_delete`. The table and refcount work lives in `meta/snapshots.rs`.
//!
//! # Crash safety
//! Each operation has one commit point, a single synced write: the header's
//! snapshot table pointer (create, delete) or the active L1 table (apply).
//! Everything the new state needs is durable before it (refcounts raised
//! before anything points at their clusters); references are dropped only
//! after it. A crash before the commit point leaves the old state with
//! refcounts that may be too high (leaks); after it, the new state with
//! the same. In the window where a raised refcount is durable and a COPIED
//! flag not yet cleared (or the other way round for drops), `qemu-img check`
//! also reports the COPIED mismatch of a leaked cluster; repairing the leaks
//! (`check -r leaks`) clears both, as with QEMU's own snapshots.

use super::*;
use crate::format::snapshot::{SnapshotEntry, SNAPSHOT_KNOWN_EXTRA_DATA};
use crate::meta::snapshots::{find_by_id_or_name, next_snapshot_id};
use crate::types::ClusterCount;

impl Image {
    /// The snapshot whose ID is `id_or_name`, else the first whose name is
    /// (the lookup of `qemu-img snapshot -a` and `-l`).
    pub fn find_snapshot(&self, id_or_name: &str) -> Option<SnapshotEntry> {
        let snaps = self.snapshots();
        find_by_id_or_name(&snaps, id_or_name).map(|i| snaps[i].clone())
    }

    /// Runs a snapshot operation with no allocation in flight and no data
    /// I/O running, failing the handle as any write does on an error.
    fn snapshot_op<T>(&self, op: impl FnOnce(&Self, &mut Meta) -> Result<T>) -> Result<T> {
        self.writable()?;
        let mut meta = self.lock_idle()?;
        let r = (|| {
            if meta.efmt.external_data {
                return Err(Error::Unsupported(
                    crate::error::Unsupported::SnapshotWithDataFile,
                ));
            }
            // Clusters freed here may be reused at once: no data I/O that
            // translated earlier may still run.
            let _barrier = self
                .io_barrier
                .write()
                .map_err(|_| Error::PreviousIoFailed)?;
            self.before_first_write(&mut meta)?;
            // Start from a durable state with no queued reference drops.
            meta.flush_all(true)?;
            op(self, &mut meta)
        })();
        r.map_err(|e| self.fail(&mut meta, e, IoOp::Write))
    }

    /// Creates an internal snapshot of the current content named `name`
    /// (`qemu-img snapshot -c`), with the next free ID (highest + 1), the
    /// current time, VM clock and VM state size 0, the current disk size
    /// and icount 0, as `qemu-img` writes them. Names need not be unique.
    /// Returns the new entry.
    ///
    /// Later writes to the image copy-on-write whatever the snapshot shares.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.write_at(b"before", 0)?;
    /// let snap = img.snapshot_create("base")?;
    /// assert_eq!((snap.id.as_str(), snap.name.as_str()), ("1", "base"));
    /// img.write_at(b"after!", 0)?;
    /// img.snapshot_apply("base")?; // or by ID: "1"
    /// let mut buf = [0u8; 6];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf, b"before");
    /// img.snapshot_delete("base")?;
    /// assert!(img.snapshots().is_empty());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::RefcountOverflow` when a refcount would exceed its width
    /// (with `refcount_bits=1` no snapshot of allocated data can be taken,
    /// with 2 bits at most two share a cluster): nothing changes (at most
    /// the snapshot's new L1 table leaks after a crash).
    /// `Error::TooLarge` beyond 65536 snapshots or a 64 MiB table,
    /// `Error::Unsupported` with an external data file, `Error::ReadOnly`,
    /// I/O errors.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotEntry> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.snapshot_op(|_, meta| {
            if meta.snapshots.len() >= MAX_SNAPSHOTS as usize {
                return Err(Error::TooLarge(crate::error::Limit::SnapshotTable {
                    count: meta.header.nb_snapshots,
                }));
            }
            let cb = meta.geom.cluster_bits;
            let l1 = meta.l2.l1().to_vec();
            let l1_bytes = l1.len() as u64 * 8;
            // The copy of the active L1 table, as it is (COPIED flags of
            // inactive tables mean nothing).
            let l1_off = if l1_bytes > 0 {
                meta.alloc_clusters(ClusterCount(meta.geom.clusters_for(l1_bytes)))?
                    .0
            } else {
                0
            };
            let release_copy = |meta: &mut Meta| {
                if l1_off != 0 {
                    let n = meta.geom.clusters_for(l1_bytes);
                    let _ = meta.update_refcount(l1_off >> cb, n, -1, DiscardType::Never);
                }
            };
            if l1_off != 0 {
                let mut buf = vec![0u8; l1_bytes as usize];
                for (i, e) in l1.iter().enumerate() {
                    put_be_u64_at(&mut buf, i * 8, *e);
                }
                meta.gate.check(l1_off, l1_bytes, 0)?;
                meta.meta_write(&buf, l1_off, MetadataKind::InactiveL1)?;
            }
            // Everything the L1 table references gains a reference; all or
            // nothing (small refcount widths overflow).
            if let Err(e) = meta.raise_refs(&l1) {
                release_copy(meta);
                return Err(e);
            }
            // Shared now: no COPIED flag may stay set in the active tables.
            meta.fix_active_copied()?;
            // Refcounts, then L2 tables, then the L1 table, all synced.
            meta.flush_all(false)?;
            meta.flush_refcounts()?;
            let entry = SnapshotEntry {
                l1_table_offset: l1_off,
                l1_size: meta.header.l1_size,
                id: next_snapshot_id(&meta.snapshots),
                name: name.to_owned(),
                date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
                date_nsec: now.subsec_micros() * 1000,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                disk_size: Some(meta.header.size),
                icount: Some(0),
                extra_data_size: SNAPSHOT_KNOWN_EXTRA_DATA,
                unknown_extra: Vec::new(),
            };
            let mut table = meta.snapshots.clone();
            table.push(entry.clone());
            // The commit point: the header switches to the new table.
            meta.write_snapshot_table(table)?;
            meta.protect_snapshot(&entry, &l1);
            Ok(entry)
        })
    }

    /// Makes the content of snapshot `id_or_name` (looked up by ID first,
    /// then by name, as `qemu-img snapshot -a` does) the current content:
    /// the active L1 table becomes a copy of the snapshot's, refcounts are
    /// adjusted both ways and the disk size becomes the snapshot's. The
    /// snapshot itself stays.
    ///
    /// # Errors
    /// `Error::SnapshotNotFound`; `Error::Format` for an invalid snapshot L1
    /// table pointer; `Error::RefcountOverflow` (nothing changes);
    /// `Error::InvalidArgument` for a v2 image whose snapshot has another
    /// disk size (QEMU cannot resize those); `Error::Unsupported` with an
    /// external data file; `Error::Bitmap` ([`BitmapError::SnapshotApply`])
    /// when the image has persistent bitmaps, as QEMU refuses; I/O errors.
    ///
    /// [`BitmapError::SnapshotApply`]: crate::error::BitmapError::SnapshotApply
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        // QEMU's bdrv_snapshot_goto refuses any bitmap (enabled or not)
        // before it looks at the snapshot; checked again under the lock.
        let refuse = || Err(Error::Bitmap(crate::error::BitmapError::SnapshotApply));
        if self.writable().is_ok() && self.lock()?.has_bitmaps() {
            return refuse();
        }
        self.snapshot_op(|_, meta| {
            if meta.has_bitmaps() {
                return refuse();
            }
            let i = find_by_id_or_name(&meta.snapshots, id_or_name)
                .ok_or_else(|| Error::SnapshotNotFound(id_or_name.to_owned()))?;
            let sn = meta.snapshots[i].clone();
            let sn_l1 = meta.read_snapshot_l1(&sn)?;
            let size = sn.disk_size.unwrap_or(meta.header.size);
            if size != meta.header.size && meta.header.version < 3 {
                return Err(Error::InvalidArgument(
                    "Can't resize a v2 image which has snapshots".into(),
                ));
            }
            // The active L1 table must hold the snapshot's (padded with
            // zeroes) and cover its disk size.
            let need = u64::from(sn.l1_size).max(meta.geom.l1_entries_for(size));
            meta.grow_l1(need)?;
            let mut new_l1 = sn_l1.clone();
            new_l1.resize(meta.l2.l1().len(), 0);
            // What the snapshot references gains the active table's
            // reference first (all or nothing), and its L2 tables lose
            // the COPIED flags (now shared).
            meta.raise_refs(&new_l1)?;
            let new_l1 = meta.fix_copied(&new_l1)?;
            meta.flush_all(false)?;
            meta.flush_refcounts()?;
            // The commit point: the active L1 table, in one synced write.
            let old_l1 = meta.l2.l1().to_vec();
            meta.replace_active_l1(&new_l1)?;
            if size != meta.header.size {
                meta.write_size(size)?;
            }
            // The old content's references go; COPIED where a refcount
            // dropped to 1.
            meta.drop_refs(&old_l1)?;
            meta.fix_active_copied()?;
            meta.flush_tables_then_refcounts()
        })
    }

    /// Deletes the first snapshot named `name` (`qemu-img snapshot -d`
    /// looks snapshots up by name only): it leaves the snapshot table, then
    /// its references are dropped and what nobody else uses is freed
    /// (discarded in the file when `pass-discard-snapshot` is on, the
    /// default).
    ///
    /// # Errors
    /// `Error::SnapshotNotFound`; `Error::Format` for an invalid snapshot L1
    /// table pointer; `Error::Unsupported` with an external data file; I/O
    /// errors (after the table was rewritten, a failure leaks clusters).
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.snapshot_op(|_, meta| {
            let i = meta
                .snapshots
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| Error::SnapshotNotFound(name.to_owned()))?;
            meta.delete_snapshot_at(i)
        })
    }

    /// Deletes the snapshot with ID `id` (QEMU's `snapshot-delete` by ID).
    ///
    /// # Errors
    /// As for [`Image::snapshot_delete`].
    pub fn snapshot_delete_by_id(&self, id: &str) -> Result<()> {
        self.snapshot_op(|_, meta| {
            let i = meta
                .snapshots
                .iter()
                .position(|s| s.id == id)
                .ok_or_else(|| Error::SnapshotNotFound(id.to_owned()))?;
            meta.delete_snapshot_at(i)
        })
    }
}

/// Puts `v` big-endian at `pos` of `buf`.
fn put_be_u64_at(buf: &mut [u8], pos: usize, v: u64) {
    crate::format::put_be_u64(buf, pos, v);
}
