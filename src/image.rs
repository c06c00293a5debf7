//! [`Image`]: an open qcow2 image, the public read/write API.
//!
//! # Concurrency
//! `Image` is `Send + Sync`. All metadata (L1 table, caches, allocator,
//! overlap map) sits behind one mutex. A request translates its guest range
//! under that mutex, then releases it and does guest data I/O outside it:
//! reads of allocated clusters, reads of backing files and overwrites of
//! clusters that are already allocated in place never hold the lock across
//! file I/O. Allocating writes (new clusters, copy-on-write) hold the lock
//! while they write, so two writers can never allocate the same guest cluster
//! twice.
//!
//! A host cluster that stops being referenced is not reused while a request
//! that translated to it may still be doing I/O: reference drops are queued
//! and applied only under the write side of an I/O barrier that every
//! outside-the-lock data transfer holds for reading.

use crate::cache::{CacheStats, TableCache};
use crate::error::{Error, IoOp, Result};
use crate::events::{Event, EventSink, IoOperation};
use crate::format::consts::*;
use crate::format::entry::{EntryFormat, L2Entry, Subclusters};
use crate::format::header::Header;
use crate::mapping::Extent;
use crate::meta::{read_file, write_file, DiscardPolicy, DiscardType, Meta, RawL2};
use crate::options::OpenOptions;
use crate::overlap::OverlapChecker;
use crate::storage::{FileStorage, Storage};
use crate::types::{Geometry, MetadataKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// The image a qcow2 image reads unallocated clusters from.
#[derive(Debug)]
pub enum Backing {
    /// A qcow2 backing image (opened read-only).
    Qcow2(Box<Image>),
    /// A raw backing file.
    Raw {
        /// The file.
        storage: Arc<dyn Storage>,
        /// Its length, which is its virtual size.
        size: u64,
        /// The path it was opened from.
        path: PathBuf,
    },
}

impl Backing {
    /// Virtual size of the backing image.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(i) => i.size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Reads `buf` at guest offset `offset`; bytes past the backing image's
    /// end read as zeroes.
    ///
    /// # Errors
    /// Errors of the backing image.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Qcow2(i) => i.read_at(head, offset),
            Backing::Raw { storage, .. } => read_file(&**storage, head, offset),
        }
    }
}

/// An open qcow2 image.
///
/// See the [module docs](self) for the concurrency model.
pub struct Image {
    path: Option<PathBuf>,
    pub(crate) file: Arc<dyn Storage>,
    /// Where guest data lives: the image file, or the external data file.
    pub(crate) data: Arc<dyn Storage>,
    data_file_path: Option<PathBuf>,
    pub(crate) backing: Option<Backing>,
    meta: Mutex<Meta>,
    pub(crate) io_barrier: RwLock<()>,
    read_only: bool,
    gone: AtomicBool,
    corruption_signalled: AtomicBool,
    events: RwLock<Option<EventSink>>,
    opts: OpenOptions,
    pub(crate) geom: Geometry,
    /// What the automatic repair of a dirty image fixed at open.
    dirty_repair: Option<crate::check::CheckReport>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("geometry", &self.geom)
            .finish_non_exhaustive()
    }
}

/// A guest range and what it maps to, as reported by [`Image::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length in bytes of the run.
    pub len: u64,
    /// What it maps to in this image.
    pub extent: Extent,
}

const MAX_HEADER_READ: u64 = 2 << 20;
/// Apply queued reference drops once this many are waiting.
const MAX_PENDING_FREES: usize = 4096;

impl Image {
    /// Opens the image at `path`.
    ///
    /// # Errors
    /// Open failures (`Error::Io` for the file, `Error::Format` for an
    /// invalid or unsupported header, `Error::ImageCorrupt` for a read-write
    /// open of an image marked corrupt, backing file errors).
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let file = FileStorage::open(path, !opts.get_read_only())
            .map_err(|e| Error::io(IoOp::Read, 0, e))?;
        Self::open_inner(
            Arc::new(file),
            Some(path.to_path_buf()),
            opts,
            OpenMode::default(),
            None,
        )
    }

    /// Opens the image at `path` without opening its backing file: clusters
    /// not allocated in this image read as zeroes. For inspecting an image
    /// whose backing chain is missing or untrusted (like `qemu-img info`).
    ///
    /// # Errors
    /// As for [`Image::open`].
    pub fn open_without_backing(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let file = FileStorage::open(path, !opts.get_read_only())
            .map_err(|e| Error::io(IoOp::Read, 0, e))?;
        let mode = OpenMode {
            skip_backing: true,
            ..Default::default()
        };
        Self::open_inner(Arc::new(file), Some(path.to_path_buf()), opts, mode, None)
    }

    /// Opens for checking or repair: corrupt and dirty images open read-write.
    pub(crate) fn open_with_mode(
        file: Arc<dyn Storage>,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        mode: OpenMode,
    ) -> Result<Image> {
        Self::open_inner(file, path, opts, mode, None)
    }

    /// Opens an image just created, read-write and without its backing
    /// file, with the external data file (if any) given as storage.
    pub(crate) fn open_created(
        file: Arc<dyn Storage>,
        data: Option<Arc<dyn Storage>>,
        path: Option<PathBuf>,
    ) -> Result<Image> {
        let mode = OpenMode {
            skip_backing: true,
            ..Default::default()
        };
        Self::open_inner(file, path, &OpenOptions::new(), mode, data)
    }

    /// Opens an image held in any [`Storage`] (for example [`crate::storage::MemStorage`]).
    /// Relative backing file names are resolved against the current directory.
    ///
    /// # Errors
    /// As for [`Image::open`].
    pub fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        Self::open_inner(storage, None, opts, OpenMode::default(), None)
    }

    fn open_inner(
        file: Arc<dyn Storage>,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        mode: OpenMode,
        data_override: Option<Arc<dyn Storage>>,
    ) -> Result<Image> {
        let read_only = opts.get_read_only();
        let file_len = file.len().map_err(|e| Error::io(IoOp::Read, 0, e))?;
        let mut head = vec![0u8; file_len.min(MAX_HEADER_READ) as usize];
        read_file(&*file, &mut head, 0)?;
        let header = if mode.check {
            Header::decode_for_check(&head)?
        } else {
            Header::decode(&head)?
        };
        drop(head);
        let repair = mode.repair || mode.check;
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only && !repair {
            return Err(Error::ImageCorrupt);
        }
        // A dirty image opened read-write is repaired before use (below).
        let repair_dirty =
            header.incompatible_features & INCOMPAT_DIRTY != 0 && !read_only && !repair;
        let geom = Geometry::new(
            header.cluster_bits,
            header.is_extended_l2(),
            header.refcount_order,
        );
        let external_data = header.incompatible_features & INCOMPAT_DATA_FILE != 0;
        let efmt = EntryFormat {
            cluster_bits: header.cluster_bits,
            version: header.version,
            extended_l2: geom.extended_l2,
            external_data,
        };
        // Tables must lie inside the file before anything is allocated for them.
        // In check mode they read as zeroes past the end, as QEMU reads them,
        // and the checker reports what is missing.
        let l1_bytes = u64::from(header.l1_size) * 8;
        if !mode.check && l1_bytes > 0 && header.l1_table_offset.saturating_add(l1_bytes) > file_len
        {
            return Err(crate::format::FormatError::invalid(
                crate::format::Structure::L1Table,
                Some(header.l1_table_offset),
                "Active L1 table lies beyond the end of the file",
            )
            .into());
        }
        let rt_bytes = u64::from(header.refcount_table_clusters) << geom.cluster_bits;
        if !mode.check && header.refcount_table_offset.saturating_add(rt_bytes) > file_len {
            return Err(crate::format::FormatError::invalid(
                crate::format::Structure::RefcountTable,
                Some(header.refcount_table_offset),
                "Reference count table lies beyond the end of the file",
            )
            .into());
        }
        let mut l1_raw = vec![0u8; l1_bytes as usize];
        read_file(&*file, &mut l1_raw, header.l1_table_offset)?;
        let l1: Vec<u64> = l1_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        drop(l1_raw);
        let mut rt_raw = vec![0u8; rt_bytes as usize];
        read_file(&*file, &mut rt_raw, header.refcount_table_offset)?;
        let reftable: Vec<u64> = rt_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        drop(rt_raw);

        opts.check_image_version(header.version)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let cache =
            crate::options::cache_config(opts, header.size, geom.cluster_size, geom.l2_entry_bytes)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut checker = OverlapChecker::new(opts.get_overlap_check().mask(), geom.cluster_bits);
        checker.set_active_l1(header.l1_table_offset, l1_bytes);
        checker.set_refcount_table(header.refcount_table_offset, rt_bytes);
        for e in &reftable {
            let off = e & REFT_OFFSET_MASK;
            if off != 0 && geom.is_aligned(off) {
                checker.add_refcount_block(off);
            }
        }
        for e in &l1 {
            let off = e & L1E_OFFSET_MASK;
            if off != 0 && geom.is_aligned(off) {
                checker.add_active_l2(off);
            }
        }
        // Check mode does not load the snapshot table (QEMU skips it with
        // BDRV_O_CHECK): the checker reads, validates and registers it.
        let snapshots = if mode.check {
            Vec::new()
        } else {
            let snapshots = crate::snapshot::load_snapshots(&*file, &header, file_len)?;
            crate::snapshot::register_snapshots(
                &*file,
                &header,
                &snapshots,
                &mut checker,
                file_len,
            )?;
            snapshots
        };
        if header.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            checker.set_bitmap_directory(Some(match header.bitmaps() {
                Some(b) => (b.bitmap_directory_offset, b.bitmap_directory_size),
                None => (0, 0),
            }));
        }

        let meta = Meta {
            file: file.clone(),
            geom,
            efmt,
            l1,
            l1_dirty: Default::default(),
            reftable,
            reftable_dirty: Default::default(),
            l2_cache: TableCache::new(cache.l2_slices, cache.l2_slice_bytes as usize),
            rc_cache: TableCache::new(cache.refcount_blocks, geom.cluster_size as usize),
            checker,
            free_hint: 0,
            file_end: file_len,
            pending_frees: Vec::new(),
            discards: Vec::new(),
            no_flush: false,
            discard: DiscardPolicy {
                request: opts.get_pass_discard_request(),
                snapshot: opts.get_pass_discard_snapshot(),
                other: opts.get_pass_discard_other(),
            },
            data_unsynced: false,
            poisoned: false,
            scratch: Vec::new(),
            clean_interval: (cache.clean_interval_secs > 0).then(|| {
                (
                    std::time::Duration::from_secs(cache.clean_interval_secs),
                    std::time::Instant::now(),
                )
            }),
            dirty_at_open: header.incompatible_features & INCOMPAT_DIRTY != 0,
            lazy_refcounts: !read_only
                && opts
                    .get_lazy_refcounts()
                    .unwrap_or(header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
            snapshots,
            header,
        };

        let base_dir = path
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let backing = if mode.skip_backing {
            None
        } else {
            Self::open_backing(&meta.header, base_dir.as_deref(), opts)?
        };
        let (data, data_file_path) = if let (true, Some(d)) = (external_data, data_override) {
            (d, None)
        } else if external_data {
            let name = opts
                .get_data_file()
                .map(Path::to_path_buf)
                .or_else(|| meta.header.data_file_name().map(PathBuf::from))
                .ok_or_else(|| {
                    Error::InvalidArgument("'data-file' is required for this image".into())
                })?;
            let resolved = resolve(base_dir.as_deref(), &name);
            if opts.get_data_file().is_none() && !opts.get_backing_policy().permits(&resolved) {
                return Err(Error::BackingNotPermitted { path: resolved });
            }
            let s = FileStorage::open(&resolved, !read_only).map_err(|e| Error::Backing {
                path: resolved.clone(),
                source: Box::new(Error::io(IoOp::Read, 0, e)),
            })?;
            (Arc::new(s) as Arc<dyn Storage>, Some(resolved))
        } else {
            // QEMU refuses the "raw external data" bit without a data file.
            if meta.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
                return Err(Error::InvalidArgument(
                    "data-file-raw requires a data file".into(),
                ));
            }
            (file.clone(), None)
        };

        let image = Image {
            path,
            file,
            data,
            data_file_path,
            backing,
            meta: Mutex::new(meta),
            io_barrier: RwLock::new(()),
            read_only,
            gone: AtomicBool::new(false),
            corruption_signalled: AtomicBool::new(false),
            events: RwLock::new(None),
            opts: opts.clone(),
            geom,
            dirty_repair: None,
        };
        if !repair_dirty {
            return Ok(image);
        }
        // QEMU repairs a dirty image on a read-write open (`check -r all`).
        let (mut image, report) = crate::check::Checker::repair_dirty(image)?;
        if report.counts.corruptions > 0 || report.counts.check_errors > 0 {
            return Err(Error::InvalidArgument(
                "Could not repair dirty image".into(),
            ));
        }
        image.dirty_repair = Some(report);
        Ok(image)
    }

    fn open_backing(
        header: &Header,
        base: Option<&Path>,
        opts: &OpenOptions,
    ) -> Result<Option<Backing>> {
        // QEMU keeps the name as a C string: it ends at the first NUL, and an
        // empty name (backing_file_size 0, or a leading NUL) means no backing file.
        let Some(name) = header
            .backing_file
            .as_deref()
            .map(|n| n.split('\0').next().unwrap_or(""))
            .filter(|n| !n.is_empty())
        else {
            return Ok(None);
        };
        let path = resolve(base, Path::new(name));
        if !opts.get_backing_policy().permits(&path) {
            return Err(Error::BackingNotPermitted { path });
        }
        let wrap = |e: Error| Error::Backing {
            path: path.clone(),
            source: Box::new(e),
        };
        let storage =
            FileStorage::open(&path, false).map_err(|e| wrap(Error::io(IoOp::Read, 0, e)))?;
        let fmt = header.backing_format().map(str::to_owned);
        let is_qcow2 = match fmt.as_deref() {
            Some("raw") => false,
            Some("qcow2") => true,
            Some(other) => {
                return Err(wrap(Error::Unsupported(format!(
                    "backing file format '{other}'"
                ))));
            }
            None => {
                let mut magic = [0u8; 4];
                storage
                    .read_at(&mut magic, 0)
                    .map_err(|e| wrap(Error::io(IoOp::Read, 0, e)))?;
                u32::from_be_bytes(magic) == QCOW2_MAGIC
            }
        };
        if is_qcow2 {
            let bopts = opts.clone().read_only(true);
            let img = Image::open_inner(
                Arc::new(storage),
                Some(path.clone()),
                &bopts,
                OpenMode::default(),
                None,
            )
            .map_err(wrap)?;
            Ok(Some(Backing::Qcow2(Box::new(img))))
        } else {
            // QEMU sizes a raw file in whole sectors (the tail reads as zero).
            let size = storage
                .len()
                .map_err(|e| wrap(Error::io(IoOp::Read, 0, e)))?
                .div_ceil(512)
                * 512;
            Ok(Some(Backing::Raw {
                storage: Arc::new(storage),
                size,
                path,
            }))
        }
    }

    // ------------------------------------------------------------------
    // Accessors.
    // ------------------------------------------------------------------

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.meta.lock().map(|m| m.header.size).unwrap_or(0)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geom.cluster_size
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta
            .lock()
            .map(|m| m.header.clone())
            .unwrap_or_else(|p| p.into_inner().header.clone())
    }

    /// The path the image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The report of the refcount repair that ran because the image was
    /// dirty (lazy refcounts, not closed cleanly) when it was opened
    /// read-write; `None` if no repair was needed.
    pub fn dirty_repair_report(&self) -> Option<&crate::check::CheckReport> {
        self.dirty_repair.as_ref()
    }

    /// The backing image, if one was opened.
    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    /// The external data file, if the image has one.
    pub fn data_file_path(&self) -> Option<&Path> {
        self.data_file_path.as_deref()
    }

    /// Whether the handle is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether a fatal corruption event disabled this handle.
    pub fn is_disabled(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// The image file's storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// Hit/miss counters of the L2 cache and the refcount cache.
    pub fn cache_stats(&self) -> (CacheStats, CacheStats) {
        match self.meta.lock() {
            Ok(m) => (m.l2_cache.stats(), m.rc_cache.stats()),
            Err(_) => Default::default(),
        }
    }

    /// The options the image was opened with.
    pub fn options(&self) -> &OpenOptions {
        &self.opts
    }

    /// The internal snapshots (the snapshot table as loaded at open).
    pub fn snapshots(&self) -> Vec<crate::format::snapshot::SnapshotEntry> {
        self.meta
            .lock()
            .map(|m| m.snapshots.clone())
            .unwrap_or_else(|p| p.into_inner().snapshots.clone())
    }

    /// QEMU's `qcow2_detect_metadata_preallocation`: whether clearly more
    /// host clusters have a non-zero refcount than the image file really
    /// occupies (`max(real * 10 / 9, real + 2)` clusters or more), which means
    /// data clusters were preallocated as holes. `map` then reports such
    /// data clusters whose host range is a hole as zero (see
    /// [`Image::data_is_hole`]).
    ///
    /// # Errors
    /// I/O errors and corruption of the refcount structures.
    pub fn detect_metadata_preallocation(&self) -> Result<bool> {
        let file_len = self.file.len().map_err(|e| Error::io(IoOp::Read, 0, e))?;
        let real = self
            .file
            .allocated_bytes()
            .map_err(|e| Error::io(IoOp::Read, 0, e))?
            / self.geom.cluster_size;
        let threshold = (real * 10 / 9).max(real + 2);
        let end_cluster = file_len.div_ceil(self.geom.cluster_size);
        let mut meta = self.lock()?;
        let mut count = 0u64;
        let mut i = 0u64;
        while i < end_cluster && count < threshold {
            if meta.refcount(i)? != 0 {
                count += 1;
            }
            i += 1;
        }
        Ok(count >= threshold)
    }

    /// Registers the callback that receives [`Event`]s (replacing any earlier one).
    pub fn on_event(&self, sink: impl Fn(&Event) + Send + Sync + 'static) {
        if let Ok(mut e) = self.events.write() {
            *e = Some(Arc::new(sink));
        }
    }

    // ------------------------------------------------------------------
    // Error handling: corruption and I/O error events.
    // ------------------------------------------------------------------

    fn emit(&self, ev: Event) {
        if let Ok(e) = self.events.read() {
            if let Some(sink) = e.as_ref() {
                sink(&ev);
            }
        }
    }

    /// The metadata state, locked (for the checker, which works on it
    /// directly).
    ///
    /// # Errors
    /// As for the internal lock: `Error::MediumGone` after a fatal corruption
    /// event, `Error::PreviousIoFailed` after a failed metadata write.
    pub(crate) fn lock_meta(&self) -> Result<MutexGuard<'_, Meta>> {
        self.lock()
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Meta>> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(Error::MediumGone);
        }
        let mut m = self.meta.lock().map_err(|_| Error::PreviousIoFailed)?;
        if m.poisoned {
            return Err(Error::PreviousIoFailed);
        }
        m.maybe_clean_caches();
        Ok(m)
    }

    /// Turns an internal error into what the caller sees, raising events:
    /// corruption is signalled as QEMU does, I/O errors raise `IoError`.
    pub(crate) fn fail(&self, meta: &mut Meta, e: Error, op: IoOperation) -> Error {
        match &e {
            Error::OverlapPrevented { kind, offset, size } => {
                let msg = format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    kind.qemu_name()
                );
                self.signal_corruption(meta, msg, Some(*offset), Some(*size), true);
            }
            Error::Corrupt { msg, .. } => {
                self.signal_corruption(meta, msg.clone(), None, None, true);
            }
            Error::Io { source, .. } => {
                let nospace = source.raw_os_error() == Some(libc::ENOSPC);
                let policy = match op {
                    IoOperation::Read => self.opts.get_rerror(),
                    IoOperation::Write => self.opts.get_werror(),
                };
                let action = policy.action_for(nospace);
                self.emit(Event::IoError {
                    node_name: self.opts.get_node_name().map(str::to_owned),
                    operation: op,
                    action,
                    nospace,
                    reason: e.errno_text(),
                });
            }
            _ => {}
        }
        e
    }

    fn signal_corruption(
        &self,
        meta: &mut Meta,
        msg: String,
        offset: Option<u64>,
        size: Option<u64>,
        fatal: bool,
    ) {
        let fatal = fatal && !self.read_only;
        let already = self.corruption_signalled.load(Ordering::SeqCst);
        if already && (!fatal || meta.header.incompatible_features & INCOMPAT_CORRUPT != 0) {
            if fatal {
                self.gone.store(true, Ordering::SeqCst);
            }
            return;
        }
        self.emit(Event::ImageCorrupted {
            node_name: self.opts.get_node_name().map(str::to_owned),
            msg,
            offset,
            size,
            fatal,
        });
        if fatal {
            meta.header.incompatible_features |= INCOMPAT_CORRUPT;
            // Best effort: the handle is disabled whether or not the bit sticks.
            let _ = meta.write_incompatible_features();
            self.gone.store(true, Ordering::SeqCst);
        }
        self.corruption_signalled.store(true, Ordering::SeqCst);
    }

    fn check_range(&self, size: u64, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    // ------------------------------------------------------------------
    // Reads.
    // ------------------------------------------------------------------

    /// Reads `buf.len()` bytes of the virtual disk at guest offset `offset`.
    ///
    /// # Errors
    /// `Error::OutOfRange` past the end of the disk; `Error::Corrupt` when the
    /// tables on the way are corrupt (the image is marked corrupt when it is
    /// writable, see [`Event::ImageCorrupted`]); I/O errors;
    /// `Error::MediumGone` after a fatal corruption event.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            let mut meta = self.lock()?;
            if done == 0 {
                self.check_range(meta.header.size, offset, buf.len() as u64)?;
            }
            let rem = (buf.len() - done) as u64;
            let (ext, len) = match meta.map_extent(g, rem) {
                Ok(x) => x,
                Err(e) => return Err(self.fail(&mut meta, e, IoOperation::Read)),
            };
            let chunk = &mut buf[done..done + len as usize];
            let r = match ext {
                Extent::Data { host } => {
                    let _io = self
                        .io_barrier
                        .read()
                        .map_err(|_| Error::PreviousIoFailed)?;
                    drop(meta);
                    read_file(&*self.data, chunk, host)
                }
                Extent::Zero { .. } => {
                    drop(meta);
                    chunk.fill(0);
                    Ok(())
                }
                Extent::Unallocated => {
                    drop(meta);
                    self.read_backing(chunk, g)
                }
                Extent::Compressed {
                    offset: coff,
                    len: clen,
                } => {
                    let _io = self
                        .io_barrier
                        .read()
                        .map_err(|_| Error::PreviousIoFailed)?;
                    let ctype = meta.header.compression_type;
                    drop(meta);
                    let in_cluster = (g & (self.geom.cluster_size - 1)) as usize;
                    self.read_compressed(ctype, coff, clen).map(|data| {
                        chunk.copy_from_slice(&data[in_cluster..in_cluster + chunk.len()]);
                    })
                }
            };
            if let Err(e) = r {
                let mut meta = self.meta.lock().map_err(|_| Error::PreviousIoFailed)?;
                return Err(self.fail(&mut meta, e, IoOperation::Read));
            }
            done += len as usize;
        }
        Ok(())
    }

    pub(crate) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read_at(buf, offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads and decompresses one compressed cluster of compression type
    /// `ctype`. Callers may hold the metadata lock: this does not take it.
    pub(crate) fn read_compressed(&self, ctype: u8, offset: u64, len: u64) -> Result<Vec<u8>> {
        let cs = self.geom.cluster_size as usize;
        let mut input = vec![0u8; len as usize];
        read_file(&*self.file, &mut input, offset)?;
        crate::compress::decompress(ctype, &input, cs)
            .map_err(|reason| Error::Decompress { offset, reason })
    }

    /// Describes the run of guest bytes starting at `offset` (at most `len`):
    /// what it maps to in this image (not looking into backing files).
    ///
    /// # Errors
    /// As for [`Image::read_at`].
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut meta = self.lock()?;
        self.check_range(meta.header.size, offset, len)?;
        match meta.map_extent(offset, len) {
            Ok((extent, len)) => Ok(BlockStatus { len, extent }),
            Err(e) => Err(self.fail(&mut meta, e, IoOperation::Read)),
        }
    }

    /// The host cluster that the L2 entry of guest offset `offset` points at,
    /// whatever the state of its (sub)clusters: with extended L2 entries a
    /// cluster can be allocated while some subclusters are not, and QEMU's
    /// `map` reports the host offset of such unallocated subclusters.
    /// `None` for unallocated clusters, zero clusters without allocation and
    /// compressed clusters.
    ///
    /// # Errors
    /// As for [`Image::block_status`].
    pub fn host_cluster(&self, offset: u64) -> Result<Option<u64>> {
        let mut meta = self.lock()?;
        self.check_range(meta.header.size, offset, 1)?;
        let r = (|| {
            let (table, _) = meta.l2_table_offset(self.geom.l1_index(offset))?;
            if table == 0 {
                return Ok(None);
            }
            let slot = meta.l2_slot(table, offset);
            meta.load_l2_slice(slot.slice)?;
            let (e, _) = meta.decode_l2(meta.read_slot(&slot), &slot)?;
            Ok(e.host_cluster())
        })();
        r.map_err(|e| self.fail(&mut meta, e, IoOperation::Read))
    }

    /// Whether the host range `[offset, offset+len)` of the data file is a hole
    /// (used by `map` for preallocated metadata).
    pub fn data_is_hole(&self, offset: u64, len: u64) -> bool {
        self.data.is_hole(offset, len).unwrap_or(false)
    }

    // ------------------------------------------------------------------
    // Writes.
    // ------------------------------------------------------------------

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Work done once before the first write of a handle: clear autoclear
    /// bits this crate does not maintain (bitmaps become inconsistent as
    /// soon as we write, so the bitmaps bit is cleared too).
    pub(crate) fn before_first_write(&self, meta: &mut Meta) -> Result<()> {
        let keep = AUTOCLEAR_DATA_FILE_RAW;
        if meta.header.autoclear_features & !keep != 0 {
            meta.header.autoclear_features &= keep;
            // The bitmap directory stays allocated and protected: only its
            // consistency bit is dropped.
            meta.write_autoclear_features()?;
        }
        Ok(())
    }

    /// Writes `buf` at guest offset `offset`.
    ///
    /// # Errors
    /// `Error::ReadOnly`, `Error::OutOfRange`, `Error::OverlapPrevented` when
    /// the write would overwrite metadata (the image is then marked corrupt and
    /// the handle disabled), `Error::Corrupt`, I/O errors.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            let mut meta = self.lock()?;
            if done == 0 {
                self.check_range(meta.header.size, offset, buf.len() as u64)?;
                if let Err(e) = self.before_first_write(&mut meta) {
                    return Err(self.fail(&mut meta, e, IoOperation::Write));
                }
            }
            let rest = &buf[done..];
            let step = match self.write_step(&mut meta, g, rest) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(&mut meta, e, IoOperation::Write)),
            };
            match step {
                WriteStep::InPlace { host, len } => {
                    let io = self
                        .io_barrier
                        .read()
                        .map_err(|_| Error::PreviousIoFailed)?;
                    drop(meta);
                    let r = write_file(&*self.data, &rest[..len as usize], host);
                    // Never wait for the metadata lock while holding the
                    // barrier: flush takes them in the other order.
                    drop(io);
                    if let Err(e) = r {
                        let mut meta = self.meta.lock().map_err(|_| Error::PreviousIoFailed)?;
                        return Err(self.fail(&mut meta, e, IoOperation::Write));
                    }
                    done += len as usize;
                }
                WriteStep::Done { len } => {
                    done += len as usize;
                    if meta.pending_frees.len() > MAX_PENDING_FREES {
                        if let Err(e) = self.flush_locked(&mut meta) {
                            return Err(self.fail(&mut meta, e, IoOperation::Write));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One step of a write: either an in-place run (done by the caller
    /// outside the lock) or an allocating write (done here, under the lock).
    fn write_step(&self, meta: &mut Meta, g: u64, data: &[u8]) -> Result<WriteStep> {
        let geom = self.geom;
        let cs = geom.cluster_size;
        let slice_entries = meta.slice_entries();
        let cluster = g >> geom.cluster_bits;
        let slice_end = ((cluster | (slice_entries - 1)) + 1) << geom.cluster_bits;
        let len = (data.len() as u64).min(slice_end - g);
        let l1i = geom.l1_index(g);

        // Fast path: the first cluster can be overwritten in place.
        let (table, table_copied) = meta.l2_table_offset(l1i)?;
        if table != 0 && table_copied {
            let mut run = 0u64;
            let mut host0 = 0u64;
            while run < len {
                let gg = g + run;
                let slot = meta.l2_slot(table, gg);
                meta.load_l2_slice(slot.slice)?;
                let (e, b) = meta.decode_l2(meta.read_slot(&slot), &slot)?;
                let in_c = gg & (cs - 1);
                let n = (cs - in_c).min(len - run);
                let host = match e {
                    L2Entry::Normal { host, copied: true }
                        if !geom.extended_l2 || subclusters_allocated(&geom, b, in_c, n) =>
                    {
                        host
                    }
                    _ => break,
                };
                if run == 0 {
                    host0 = host + in_c;
                } else if host + in_c != host0 + run {
                    break;
                }
                run += n;
            }
            if run > 0 {
                if !meta.efmt.external_data {
                    meta.gate_check(host0, run, 0)?;
                    // The write may extend the file (a cluster whose tail was
                    // never written): keep the known end an upper bound.
                    meta.file_end = meta.file_end.max(host0 + run);
                }
                return Ok(WriteStep::InPlace {
                    host: host0,
                    len: run,
                });
            }
        }
        let written = self.allocating_write(meta, g, &data[..len as usize])?;
        Ok(WriteStep::Done { len: written })
    }

    /// Allocates clusters for (a prefix of) `data` at guest offset `g`,
    /// copying the untouched parts of partially written clusters from their
    /// old content, writes the data and updates the L2 entries. Returns how
    /// many bytes were written.
    pub(crate) fn allocating_write(&self, meta: &mut Meta, g: u64, data: &[u8]) -> Result<u64> {
        let geom = self.geom;
        let cs = geom.cluster_size;
        let len = data.len() as u64;
        let table = meta.writable_l2_table(geom.l1_index(g))?;
        let c0 = g >> geom.cluster_bits;
        let c_last = (g + len - 1) >> geom.cluster_bits;

        // Classify clusters from c0: a run of clusters that all need a new host cluster.
        let mut plans: Vec<ClusterPlan> = Vec::new();
        for c in c0..=c_last {
            let cg = c << geom.cluster_bits;
            let slot = meta.l2_slot(table, cg);
            meta.load_l2_slice(slot.slice)?;
            let (e, b) = meta.decode_l2(meta.read_slot(&slot), &slot)?;
            let lo_w = g.max(cg) - cg;
            let hi_w = (g + len).min(cg + cs) - cg;
            let reuse = match e {
                L2Entry::Normal { host, copied: true } => Some(host),
                L2Entry::Zero {
                    host: Some(host),
                    copied: true,
                } => Some(host),
                _ => None,
            };
            if meta.efmt.external_data {
                // Data file clusters are mapped 1:1 and never refcounted.
                plans.push(ClusterPlan {
                    guest: cg,
                    old: e,
                    bitmap: b,
                    host: Some(cg),
                    lo_w,
                    hi_w,
                    slot,
                });
                continue;
            }
            if reuse.is_some() && c != c0 {
                break; // handled by a later step (in place or reuse)
            }
            plans.push(ClusterPlan {
                guest: cg,
                old: e,
                bitmap: b,
                host: reuse,
                lo_w,
                hi_w,
                slot,
            });
            if reuse.is_some() {
                break;
            }
        }
        // Allocate the clusters that need it, contiguously.
        let need = plans.iter().filter(|p| p.host.is_none()).count() as u64;
        if need > 0 {
            let first = meta.alloc_clusters(need)?;
            for (k, p) in plans.iter_mut().filter(|p| p.host.is_none()).enumerate() {
                p.host = Some(first + k as u64 * cs);
            }
        }
        // Write each cluster's range: [lo, hi) within the cluster.
        let mut written = 0u64;
        let mut buf = std::mem::take(&mut meta.scratch);
        for p in &plans {
            let host = p.host.unwrap_or(0);
            let (lo, hi) = self.cow_range(p);
            let src = &data[(p.guest + p.lo_w - g) as usize..(p.guest + p.hi_w - g) as usize];
            if !meta.efmt.external_data && host + lo >= meta.file_end && self.old_reads_zero(p, lo)
            {
                // Fast path: the untouched parts read as zero and the cluster
                // lies past the end of the file, where unwritten bytes read as
                // zero too: write only the guest data, straight from the caller.
                if let Err(e) = meta.gate_write(src, host + p.lo_w, None) {
                    meta.scratch = buf;
                    return Err(e);
                }
                meta.data_unsynced = true;
                if meta.lazy_refcounts {
                    meta.mark_dirty()?;
                }
                let new = self.new_entry(p, host, lo, hi);
                meta.write_slot(&p.slot, new);
                self.drop_old(meta, p);
                written += p.hi_w - p.lo_w;
                continue;
            }
            buf.clear();
            buf.resize((hi - lo) as usize, 0);
            // Old content for the parts outside the write.
            let r = self
                .fill_old(meta, p, lo, p.lo_w, &mut buf[..(p.lo_w - lo) as usize])
                .and_then(|_| {
                    let tail = (p.hi_w - lo) as usize;
                    self.fill_old(meta, p, p.hi_w, hi, &mut buf[tail..])
                });
            if let Err(e) = r {
                meta.scratch = buf;
                return Err(e);
            }
            buf[(p.lo_w - lo) as usize..(p.hi_w - lo) as usize].copy_from_slice(src);
            let (wlo, whi) = (lo, hi);
            let out = &buf[(wlo - lo) as usize..(whi - lo) as usize];
            let r = if meta.efmt.external_data {
                write_file(&*self.data, out, host + wlo)
            } else {
                meta.gate_write(out, host + wlo, None)
            };
            if let Err(e) = r {
                meta.scratch = buf;
                return Err(e);
            }
            meta.data_unsynced = true;
            // Update the entry.
            if meta.lazy_refcounts {
                // As QEMU: the image is marked dirty before the first entry
                // that relies on refcounts not yet written.
                meta.mark_dirty()?;
            }
            let new = self.new_entry(p, host, lo, hi);
            meta.write_slot(&p.slot, new);
            self.drop_old(meta, p);
            written += p.hi_w - p.lo_w;
        }
        meta.scratch = buf;
        Ok(written)
    }

    /// Drops the reference the cluster's old entry held (COW replaced it).
    fn drop_old(&self, meta: &mut Meta, p: &ClusterPlan) {
        let reused = matches!(
            p.old,
            L2Entry::Normal { copied: true, .. }
                | L2Entry::Zero {
                    host: Some(_),
                    copied: true
                }
        );
        if !reused {
            self.drop_reference(meta, p.old, DiscardType::Other);
        }
    }

    /// Whether the guest view of the cluster of `p` from `lo` on reads as
    /// zeroes, known from metadata alone (no I/O).
    fn old_reads_zero(&self, p: &ClusterPlan, lo: u64) -> bool {
        match p.old {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => match &self.backing {
                None => true,
                Some(b) => b.size() <= p.guest + lo,
            },
            _ => false,
        }
    }

    /// The byte range of the cluster to write: the whole cluster for standard
    /// L2 (so no stale bytes become visible), the touched subclusters with
    /// extended L2 when the cluster had no data to carry over.
    fn cow_range(&self, p: &ClusterPlan) -> (u64, u64) {
        let geom = self.geom;
        let cs = geom.cluster_size;
        if !geom.extended_l2 {
            return (0, cs);
        }
        let carries_data = match p.old {
            L2Entry::Compressed { .. } => true,
            L2Entry::Normal { copied, .. } => !copied,
            _ => false,
        };
        if carries_data {
            return (0, cs);
        }
        let scs = geom.subcluster_size();
        (p.lo_w & !(scs - 1), (p.hi_w + scs - 1) & !(scs - 1))
    }

    fn new_entry(&self, p: &ClusterPlan, host: u64, lo: u64, hi: u64) -> RawL2 {
        let geom = self.geom;
        let word = host | OFLAG_COPIED;
        if !geom.extended_l2 {
            return RawL2 { word, bitmap: 0 };
        }
        let scs = geom.subcluster_size();
        let touched = range_mask(lo / scs, hi.div_ceil(scs));
        let (alloc, zero) = match p.old {
            L2Entry::Compressed { .. } => (u32::MAX, 0),
            L2Entry::Normal { .. } => (p.bitmap.alloc() | touched, p.bitmap.zero() & !touched),
            _ => (touched, p.bitmap.zero() & !touched),
        };
        RawL2 {
            word,
            bitmap: Subclusters::from_parts(alloc, zero).0,
        }
    }

    /// Fills `out` with the current guest view of `[from, to)` within the
    /// cluster of plan `p` (old data, backing data or zeroes).
    fn fill_old(
        &self,
        meta: &mut Meta,
        p: &ClusterPlan,
        from: u64,
        to: u64,
        out: &mut [u8],
    ) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let geom = self.geom;
        match p.old {
            L2Entry::Compressed { .. } => {
                let (o, l) = p.old.compressed_range().unwrap_or((0, 0));
                let data = self.read_compressed(meta.header.compression_type, o, l)?;
                out.copy_from_slice(&data[from as usize..to as usize]);
                Ok(())
            }
            _ => {
                let unit = geom.subcluster_size();
                let mut pos = from;
                while pos < to {
                    let n = ((pos | (unit - 1)) + 1).min(to) - pos;
                    let dst = &mut out[(pos - from) as usize..(pos - from + n) as usize];
                    let sc = ((pos >> geom.subcluster_bits) & 31) as u32;
                    match crate::format::entry::subcluster_state(
                        p.old,
                        p.bitmap,
                        sc,
                        geom.extended_l2,
                        unit,
                    ) {
                        crate::format::entry::SubclusterState::Data(h) => {
                            read_file(&*self.data, dst, h + (pos & (unit - 1)))?
                        }
                        crate::format::entry::SubclusterState::Unallocated => {
                            self.read_backing(dst, p.guest + pos)?
                        }
                        _ => dst.fill(0),
                    }
                    pos += n;
                }
                Ok(())
            }
        }
    }

    /// Flushes every dirty table in the crash-safe order and syncs the file.
    ///
    /// # Errors
    /// I/O errors (the handle is then poisoned: reopen the image).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = self.lock()?;
        match self.flush_locked(&mut meta) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(&mut meta, e, IoOperation::Write)),
        }
    }

    fn flush_locked(&self, meta: &mut Meta) -> Result<()> {
        // Wait until no data I/O that translated earlier is in flight, so
        // freed clusters can be reused.
        let _barrier = self
            .io_barrier
            .write()
            .map_err(|_| Error::PreviousIoFailed)?;
        meta.flush_all(true)?;
        if !Arc::ptr_eq(&self.data, &self.file) {
            self.data
                .flush()
                .map_err(|e| Error::io(IoOp::Flush, 0, e))?;
        }
        Ok(())
    }

    /// Flushes and closes the image.
    ///
    /// # Errors
    /// As for [`Image::flush`].
    pub fn close(self) -> Result<()> {
        self.close_ref()
    }

    fn close_ref(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = self.lock()?;
        let r = (|| {
            let _barrier = self
                .io_barrier
                .write()
                .map_err(|_| Error::PreviousIoFailed)?;
            meta.mark_clean()?;
            if !Arc::ptr_eq(&self.data, &self.file) {
                self.data
                    .flush()
                    .map_err(|e| Error::io(IoOp::Flush, 0, e))?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(&mut meta, e, IoOperation::Write)),
        }
    }

    // ------------------------------------------------------------------
    // Discard and write-zeroes.
    // ------------------------------------------------------------------

    /// Discards guest range `[offset, offset+len)`: whole clusters only
    /// (partial clusters at the edges are ignored, except a partial last
    /// cluster of the disk). v3 images read zeroes afterwards; on v2 images
    /// the clusters are deallocated (reading zeroes), except that with a
    /// backing file the discard does nothing, as in QEMU: without the zero
    /// flag it would expose stale backing data.
    ///
    /// # Errors
    /// As for [`Image::write_at`].
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        let mut meta = self.lock()?;
        self.check_range(meta.header.size, offset, len)?;
        if meta.header.version < 3 && meta.header.backing_file.is_some() {
            // Without the zero flag a discard would expose stale backing
            // data; QEMU refuses (ENOTSUP), and discards are advisory.
            return Ok(());
        }
        let r = self
            .before_first_write(&mut meta)
            .and_then(|_| self.discard_locked(&mut meta, offset, len, false));
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(&mut meta, e, IoOperation::Write)),
        }
    }

    fn discard_locked(&self, meta: &mut Meta, offset: u64, len: u64, full: bool) -> Result<()> {
        let geom = self.geom;
        let cs = geom.cluster_size;
        let size = meta.header.size;
        let start = offset.div_ceil(cs) * cs;
        let mut end = (offset + len) & !(cs - 1);
        if offset + len == size && size & (cs - 1) != 0 && offset <= size & !(cs - 1) {
            end = size;
        }
        let v3 = meta.header.version >= 3;
        let no_unref = self.opts.get_discard_no_unref() && v3;
        let has_backing = meta.header.backing_file.is_some();
        let raw_data = meta.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
        let mut g = start;
        while g < end {
            let (table, _) = meta.l2_table_offset(geom.l1_index(g))?;
            // Without an L2 table everything is unallocated: nothing to do,
            // unless v3 must hide backing data behind zero entries.
            if table == 0 && (full || !v3 || !has_backing) {
                g = ((geom.l1_index(g) + 1) << (geom.cluster_bits + geom.l2_bits))
                    .min(end.max(g + cs));
                continue;
            }
            let (raw, e) = if table == 0 {
                (RawL2 { word: 0, bitmap: 0 }, L2Entry::Unallocated)
            } else {
                let slot = meta.l2_slot(table, g);
                meta.load_l2_slice(slot.slice)?;
                let raw = meta.read_slot(&slot);
                (raw, meta.decode_l2(raw, &slot)?.0)
            };
            let skip = !full
                && v3
                && match e {
                    L2Entry::Zero { host: None, .. } => !geom.extended_l2,
                    L2Entry::Unallocated => !has_backing && (!geom.extended_l2 || raw.bitmap == 0),
                    _ => false,
                };
            if !skip && !(e == L2Entry::Unallocated && raw.bitmap == 0 && (full || !v3)) {
                let table = meta.writable_l2_table(geom.l1_index(g))?;
                let slot = meta.l2_slot(table, g);
                meta.load_l2_slice(slot.slice)?;
                let new = if full || !v3 {
                    RawL2 { word: 0, bitmap: 0 }
                } else if no_unref && e.host_cluster().is_some() {
                    if geom.extended_l2 {
                        RawL2 {
                            word: raw.word,
                            bitmap: Subclusters::ALL_ZERO.0,
                        }
                    } else {
                        RawL2 {
                            word: raw.word | OFLAG_ZERO,
                            bitmap: 0,
                        }
                    }
                } else if geom.extended_l2 {
                    RawL2 {
                        word: 0,
                        bitmap: Subclusters::ALL_ZERO.0,
                    }
                } else {
                    RawL2 {
                        word: OFLAG_ZERO,
                        bitmap: 0,
                    }
                };
                meta.write_slot(&slot, new);
                if raw_data {
                    // Keep the raw data file equal to the guest view.
                    self.zero_data_file(g, (g + cs).min(size))?;
                }
                if no_unref && !full {
                    if let Some(h) = e.host_cluster() {
                        if meta.discard.request {
                            // Where the data lives: with an external data
                            // file `h` is an offset in that file.
                            let _ = self.data.discard(h, cs);
                        }
                    }
                } else {
                    self.drop_reference(meta, e, DiscardType::Request);
                }
            }
            g += cs;
        }
        if meta.pending_frees.len() > MAX_PENDING_FREES {
            self.flush_locked(meta)?;
        }
        Ok(())
    }

    fn drop_reference(&self, meta: &mut Meta, e: L2Entry, dtype: DiscardType) {
        if meta.efmt.external_data {
            return;
        }
        match e {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => meta.queue_free(host, dtype),
            L2Entry::Compressed { .. } => {
                if let Some((o, l)) = e.compressed_range() {
                    meta.queue_free_compressed(o, l, dtype);
                }
            }
            _ => {}
        }
    }

    /// Writes zeroes to `[offset, offset+len)`, encoding them as QEMU does
    /// (qcow2-format.md §11.3). On v3 images whole clusters (subclusters
    /// with extended L2) are zeroed in metadata only; with `unmap` their host
    /// clusters are released. On v2 images without a backing file whole
    /// clusters are deallocated (they then read as zeroes). A partial unit
    /// at either end is zeroed in metadata too when it is unallocated or
    /// zero in this image and the rest of it reads as zeroes; otherwise it
    /// is written as zero data, as is everything on v2 images with a backing
    /// file. With `data_file_raw` the external data file is zeroed too, so
    /// that it stays a valid raw image.
    ///
    /// # Errors
    /// As for [`Image::write_at`].
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.writable()?;
        let (size, v3, raw_data, has_backing) = {
            let m = self.lock()?;
            self.check_range(m.header.size, offset, len)?;
            (
                m.header.size,
                m.header.version >= 3,
                m.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0,
                m.header.backing_file.is_some(),
            )
        };
        if !v3 && has_backing {
            return self.write_zero_data(offset, len);
        }
        let geom = self.geom;
        let unit = if v3 {
            geom.subcluster_size()
        } else {
            geom.cluster_size
        };
        let end = offset + len;
        let mut a = offset.div_ceil(unit) * unit;
        let mut b = if end == size { end } else { end & !(unit - 1) };
        let head = offset & !(unit - 1);
        let head_whole = head < offset && self.unit_zeroable(head, unit, size, offset, end)?;
        if head_whole {
            a = head;
        }
        let tail = b;
        let tail_whole = b < end && self.unit_zeroable(tail, unit, size, offset.max(tail), end)?;
        if tail_whole {
            b = (tail + unit).min(size);
        }
        if a >= b {
            return self.write_zero_data(offset, len);
        }
        {
            let mut meta = self.lock()?;
            let r = (|| {
                // A write may have allocated a partial unit since it was
                // checked: check its state again under the lock (as QEMU
                // does) and write zero data into it instead if so. Its
                // content cannot have changed while its state did not.
                let mut still = |u: u64| -> Result<bool> {
                    let ulen = unit.min(size - u);
                    let (ext, n) = meta.map_extent(u, ulen)?;
                    Ok(n >= ulen && matches!(ext, Extent::Unallocated | Extent::Zero { .. }))
                };
                if head_whole && !still(head)? {
                    a = head + unit;
                }
                if tail_whole && !still(tail)? {
                    b = tail;
                }
                if a >= b {
                    return Ok(());
                }
                self.before_first_write(&mut meta)?;
                if raw_data {
                    // The data file must stay a valid raw image (QEMU
                    // zeroes it before updating the L2 entries).
                    self.zero_data_file(a, b)?;
                }
                if v3 {
                    // discard-no-unref keeps the host clusters here too.
                    let unmap = unmap && !self.opts.get_discard_no_unref();
                    self.zero_locked(&mut meta, a, b, unmap)
                } else {
                    self.discard_locked(&mut meta, a, b - a, false)
                }
            })();
            if let Err(e) = r {
                return Err(self.fail(&mut meta, e, IoOperation::Write));
            }
        }
        if a >= b {
            return self.write_zero_data(offset, len);
        }
        if offset < a {
            self.write_zero_data(offset, a - offset)?;
        }
        if b < end {
            self.write_zero_data(b, end - b)?;
        }
        Ok(())
    }

    /// Writes zeroes to `[start, end)` of the external data file (mapped 1:1).
    fn zero_data_file(&self, start: u64, end: u64) -> Result<()> {
        let zeros = vec![0u8; (end - start).min(1 << 20) as usize];
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            write_file(&*self.data, &zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Whether the unit at `start` (clipped to the disk) is unallocated or
    /// zero in this image and reads as zeroes outside `[keep_lo, keep_hi)`:
    /// then a partial zero write may zero it whole in metadata (QEMU's
    /// `is_zero` check in `qcow2_co_pwrite_zeroes`).
    fn unit_zeroable(
        &self,
        start: u64,
        unit: u64,
        size: u64,
        keep_lo: u64,
        keep_hi: u64,
    ) -> Result<bool> {
        let ulen = unit.min(size - start);
        let st = self.block_status(start, ulen)?;
        if st.len < ulen || !matches!(st.extent, Extent::Unallocated | Extent::Zero { .. }) {
            return Ok(false);
        }
        let keep_lo = keep_lo.clamp(start, start + ulen);
        let keep_hi = keep_hi.clamp(keep_lo, start + ulen);
        let mut buf = vec![0u8; ulen as usize];
        for (lo, hi) in [(start, keep_lo), (keep_hi, start + ulen)] {
            if lo < hi {
                let part = &mut buf[..(hi - lo) as usize];
                self.read_at(part, lo)?;
                if part.iter().any(|b| *b != 0) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Skip ranges that already read as zero.
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(buf.len() as u64) as usize;
            self.read_at(&mut buf[..n], pos)?;
            if buf[..n].iter().any(|b| *b != 0) {
                buf[..n].fill(0);
                self.write_at(&buf[..n], pos)?;
            }
            pos += n as u64;
        }
        Ok(())
    }

    pub(crate) fn zero_locked(
        &self,
        meta: &mut Meta,
        start: u64,
        end: u64,
        unmap: bool,
    ) -> Result<()> {
        let geom = self.geom;
        let cs = geom.cluster_size;
        let mut g = start;
        while g < end {
            let cg = g & !(cs - 1);
            let upto = (cg + cs).min(end);
            let table = meta.writable_l2_table(geom.l1_index(g))?;
            let slot = meta.l2_slot(table, g);
            meta.load_l2_slice(slot.slice)?;
            let raw = meta.read_slot(&slot);
            let (e, b) = meta.decode_l2(raw, &slot)?;
            if geom.extended_l2 {
                let scs = geom.subcluster_size();
                let mask = range_mask((g - cg) / scs, (upto - cg).div_ceil(scs));
                let whole = mask == u32::MAX;
                let drop_host = match e {
                    L2Entry::Compressed { .. } => true,
                    L2Entry::Normal { copied, .. } => whole && (unmap || !copied),
                    _ => false,
                };
                let new = if drop_host || matches!(e, L2Entry::Compressed { .. }) {
                    if !whole {
                        // Partial zeroing of a compressed/shared cluster: write zero data.
                        let mut z = vec![0u8; (upto - g) as usize];
                        z.fill(0);
                        self.allocating_write(meta, g, &z)?;
                        g = upto;
                        continue;
                    }
                    RawL2 {
                        word: 0,
                        bitmap: Subclusters::ALL_ZERO.0,
                    }
                } else {
                    let bm = Subclusters::from_parts(b.alloc() & !mask, b.zero() | mask);
                    RawL2 {
                        word: raw.word,
                        bitmap: bm.0,
                    }
                };
                if new != raw {
                    meta.write_slot(&slot, new);
                }
                if drop_host {
                    self.drop_reference(meta, e, DiscardType::Request);
                }
            } else {
                let shared = matches!(e, L2Entry::Compressed { .. })
                    || matches!(
                        e,
                        L2Entry::Normal { copied: false, .. }
                            | L2Entry::Zero {
                                copied: false,
                                host: Some(_)
                            }
                    );
                let new = if unmap || shared {
                    RawL2 {
                        word: OFLAG_ZERO,
                        bitmap: 0,
                    }
                } else {
                    match e {
                        L2Entry::Normal { .. } | L2Entry::Zero { .. } => RawL2 {
                            word: raw.word | OFLAG_ZERO,
                            bitmap: 0,
                        },
                        _ => RawL2 {
                            word: OFLAG_ZERO,
                            bitmap: 0,
                        },
                    }
                };
                if new != raw {
                    meta.write_slot(&slot, new);
                    if unmap || shared {
                        self.drop_reference(meta, e, DiscardType::Request);
                    }
                }
            }
            g = upto;
        }
        if meta.pending_frees.len() > MAX_PENDING_FREES {
            self.flush_locked(meta)?;
        }
        Ok(())
    }
}

impl Image {
    /// Turns lazy refcounts on or off, for this handle and in the header
    /// (compatible feature bit 0). Turning them off first writes every cache
    /// and clears the dirty bit.
    ///
    /// # Errors
    /// `Error::InvalidArgument` on a v2 image (QEMU's message), I/O errors.
    pub fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        self.writable()?;
        let mut meta = self.lock()?;
        let r = (|| {
            if on && meta.header.version < 3 {
                return Err(Error::InvalidArgument(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
                ));
            }
            if !on {
                let _barrier = self
                    .io_barrier
                    .write()
                    .map_err(|_| Error::PreviousIoFailed)?;
                meta.mark_clean()?;
            }
            meta.lazy_refcounts = on;
            if meta.header.version >= 3 {
                let bits = if on {
                    meta.header.compatible_features | COMPAT_LAZY_REFCOUNTS
                } else {
                    meta.header.compatible_features & !COMPAT_LAZY_REFCOUNTS
                };
                if bits != meta.header.compatible_features {
                    meta.write_header_field(80, &bits.to_be_bytes())?;
                    meta.header.compatible_features = bits;
                }
            }
            Ok(())
        })();
        r.map_err(|e| self.fail(&mut meta, e, IoOperation::Write))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.read_only && !self.gone.load(Ordering::SeqCst) {
            // Best effort; callers who care use close() or flush().
            let _ = self.close_ref();
        }
    }
}

/// How an image is opened beyond its options.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OpenMode {
    /// Check/repair mode: corrupt and dirty images open read-write.
    pub repair: bool,
    /// QEMU's `BDRV_O_CHECK` (implies `repair`): the header is decoded with
    /// [`Header::decode_for_check`], the L1 and refcount tables may lie
    /// (partly) beyond the end of the file and read as zeroes there, and the
    /// snapshot table is not loaded (the checker reads, validates and
    /// registers it itself).
    pub check: bool,
    /// Do not open the backing file.
    pub skip_backing: bool,
}

/// One guest cluster of an allocating write.
#[derive(Debug, Clone, Copy)]
struct ClusterPlan {
    guest: u64,
    old: L2Entry,
    bitmap: Subclusters,
    host: Option<u64>,
    /// Range written by the guest within the cluster.
    lo_w: u64,
    hi_w: u64,
    slot: crate::meta::L2Slot,
}

enum WriteStep {
    InPlace { host: u64, len: u64 },
    Done { len: u64 },
}

fn range_mask(lo: u64, hi: u64) -> u32 {
    let mut m = 0u32;
    for i in lo..hi.min(32) {
        m |= 1 << i;
    }
    m
}

fn subclusters_allocated(geom: &Geometry, b: Subclusters, in_c: u64, n: u64) -> bool {
    let scs = geom.subcluster_size();
    let mask = range_mask(in_c / scs, (in_c + n).div_ceil(scs));
    b.alloc() & mask == mask
}

/// Resolves a file name stored in an image against the image's directory.
pub(crate) fn resolve(base: Option<&Path>, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match base {
        Some(b) if !b.as_os_str().is_empty() => b.join(name),
        _ => name.to_path_buf(),
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Image>();
    let _ = MetadataKind::ALL;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn data_file_raw_without_data_file_is_refused() {
        let mem = Arc::new(MemStorage::new());
        crate::create::create_on(mem.clone(), &crate::CreateOptions::default(), 1 << 20).unwrap();
        let mut bytes = mem.to_vec();
        bytes[88 + 7] |= AUTOCLEAR_DATA_FILE_RAW as u8;
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
        let e = Image::open_storage(s, &OpenOptions::new()).unwrap_err();
        assert_eq!(e.qemu_message(), "data-file-raw requires a data file");
    }

    #[test]
    fn empty_backing_file_name_means_no_backing_file() {
        let mem = Arc::new(MemStorage::new());
        crate::create::create_on(mem.clone(), &crate::CreateOptions::default(), 1 << 20).unwrap();
        let mut bytes = mem.to_vec();
        // backing_file_offset 0x4000, backing_file_size 0.
        bytes[8..16].copy_from_slice(&0x4000u64.to_be_bytes());
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
        let img = Image::open_storage(s, &OpenOptions::new().read_only(true)).unwrap();
        assert!(img.backing().is_none());
    }

    #[test]
    fn backing_file_name_ends_at_nul() {
        let mem = Arc::new(MemStorage::new());
        crate::create::create_on(mem.clone(), &crate::CreateOptions::default(), 1 << 20).unwrap();
        let mut bytes = mem.to_vec();
        // backing_file_offset 0x4000, backing_file_size 1, name "\0".
        bytes[8..16].copy_from_slice(&0x4000u64.to_be_bytes());
        bytes[16..20].copy_from_slice(&1u32.to_be_bytes());
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
        let img = Image::open_storage(s, &OpenOptions::new().read_only(true)).unwrap();
        assert!(img.backing().is_none());
    }
}
