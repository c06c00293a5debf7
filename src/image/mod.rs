//! [`Image`]: an open qcow2 image, the public read/write API.
//!
//! # Concurrency
//! `Image` is `Send + Sync`. All metadata (L1 table, caches, allocator,
//! overlap map) sits behind one `RwLock`. Reads ([`Image::map_read`], so
//! `read_at` and `read_vectored_at`) and in-place overwrites translate under
//! its shared side when the L2 slices they need are cached (the cache counts
//! and marks hits through `&self`), so such requests from several threads
//! translate at the same time; a cache miss, an error, or anything that
//! changes metadata takes the exclusive side. Neither side is held across
//! guest data I/O: reads of allocated clusters, reads of backing files and
//! overwrites of clusters that are already allocated in place happen with
//! no lock held.
//!
//! Allocating writes (new clusters, copy-on-write) from [`Image::write_at`]
//! work in three phases: under the lock they reserve their host clusters
//! (refcount raised, nothing points at them yet), read the old content that
//! copy-on-write keeps, get overlap-checked permits for their data writes
//! and record their guest clusters as in flight; they write the data with
//! no lock held; then, under the lock again, they point the L2 entries at
//! the new clusters (the entries reach the file only after the data is
//! synced, as before). A write that touches a guest cluster in flight waits
//! until it is linked and translates again, so a guest cluster is never
//! allocated twice; discard, write-zeroes, resize and close wait until no
//! allocation is in flight. A failed data write releases its reservation
//! through the deferred-free path (a crash before the next flush leaves a
//! leak, never a dangling entry). Write-zeroes and resize allocate under
//! the lock, as before.
//!
//! A host cluster that stops being referenced is not reused while a request
//! that translated to it may still be doing I/O: reference drops are queued
//! and applied only under the write side of an I/O barrier that every
//! outside-the-lock data transfer holds for reading.

use crate::error::{Error, IoOp, Result};
use crate::events::{Event, EventSink};
use crate::format::consts::*;
use crate::format::entry::{L2Entry, Subclusters};
use crate::format::header::field;
use crate::format::header::Header;
use crate::mapping::Extent;
use crate::meta::{read_file, DataTarget, DiscardType, FileReader, Meta, RawL2};
use crate::options::OpenOptions;
use crate::storage::{FileStorage, Storage, Tracked};
use crate::types::{Geometry, HostOffset, MetadataKind};
use crossbeam_utils::sync::ShardedLock;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub mod amend;
mod bitmaps;
mod chain;
mod compressed;
mod cor;
pub mod create;
mod crypt;
pub mod measure;
pub use compressed::CompressedCluster;
mod open;
mod read_map;
pub use read_map::{MappedExtent, ReadMapping, MAX_READ_EXTENTS};

/// Inline extents of the mapping `read_at` translates into per step: most
/// requests map to one run; a short array is cheaper to fill and move than
/// [`MAX_READ_EXTENTS`] (longer requests loop).
const READ_AT_EXTENTS: usize = 4;
mod reserve;
pub use reserve::{WriteExtent, WriteReservation};
mod resolver;
mod snapshot;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod sync_tests;
mod vectored;
mod write;
mod zero;

pub use crate::meta::bitmaps::BitmapStatus;
pub use crate::meta::cache::CacheStats;
pub use open::MAX_BACKING_DEPTH;
pub(crate) use open::{open_named, resolve, OpenMode};
pub(crate) use resolver::ResolverHandle;
pub use resolver::{FileResolver, FileRole};

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
    /// The image file as given (only for [`Image::storage`]: the crate
    /// reads through `file` and writes through the write gate).
    storage: Arc<dyn Storage>,
    /// The image file, read-only.
    pub(crate) file: FileReader,
    /// Where guest data lives: the image file, or the external data file.
    pub(crate) data: DataTarget,
    data_file_path: Option<PathBuf>,
    pub(crate) backing: Option<Backing>,
    /// The metadata: shared for cache-hit translations, exclusive for
    /// everything else (see the module docs).
    meta: RwLock<Meta>,
    /// The I/O barrier: data I/O outside the metadata lock holds its read
    /// side (a ticket), the application of queued frees its write side
    /// (see the module docs). Sharded: each thread's tickets touch only its
    /// own shard, so readers on several cores do not bounce one cache line;
    /// the rare write side locks every shard.
    pub(crate) io_barrier: ShardedLock<()>,
    /// Pairs with `in_flight_done` (a condvar cannot wait on an `RwLock`
    /// guard): taken by a waiter before it releases the exclusive metadata
    /// lock and by a notifier after it updated `Meta::in_flight` under it.
    in_flight_mx: Mutex<()>,
    /// Signalled when allocating writes leave `Meta::in_flight`.
    in_flight_done: Condvar,
    /// Requests waiting on `in_flight_done` (changed under the exclusive
    /// metadata lock on the way in), so that a notifier with nobody to wake
    /// skips the mutex and the wake-up system call.
    in_flight_waiters: AtomicUsize,
    read_only: bool,
    gone: AtomicBool,
    /// [`Image::shutdown`] ran: requests fail with [`Error::Closed`].
    closed: AtomicBool,
    corruption_signalled: AtomicBool,
    events: RwLock<Option<EventSink>>,
    opts: OpenOptions,
    pub(crate) geom: Geometry,
    /// What the automatic repair of a dirty image fixed at open.
    dirty_repair: Option<crate::repair::CheckReport>,
    /// The image is encrypted and no key was given (only an inspection
    /// open gets this far): every guest data request is refused.
    no_key: bool,
    /// The LUKS header of a LUKS image.
    luks: Option<Box<crate::format::luks::LuksHeader>>,
    /// Writes of an encrypted image: shared for whole-sector writes,
    /// exclusive for the read-modify-write of partial sectors (see
    /// `image/crypt.rs`).
    crypt_rmw: RwLock<()>,
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

/// The exclusive side of the metadata lock.
pub(crate) type MetaGuard<'a> = RwLockWriteGuard<'a, Meta>;
/// The shared side of the metadata lock.
pub(crate) type MetaRead<'a> = RwLockReadGuard<'a, Meta>;

/// Apply queued reference drops once this many are waiting.
pub(crate) const MAX_PENDING_FREES: usize = 4096;

impl Image {
    // ------------------------------------------------------------------
    // Accessors.
    // ------------------------------------------------------------------

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.meta.read().map(|m| m.header.size).unwrap_or(0)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geom.cluster_size
    }

    /// A copy of the current header.
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
    /// let h = img.header();
    /// assert_eq!(h.version, 3);
    /// assert_eq!(1u64 << h.cluster_bits, img.cluster_size());
    /// # Ok(())
    /// # }
    /// ```
    pub fn header(&self) -> Header {
        self.meta
            .read()
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
    pub fn dirty_repair_report(&self) -> Option<&crate::repair::CheckReport> {
        self.dirty_repair.as_ref()
    }

    /// The backing image, if one was opened.
    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    /// Whether the image is encrypted (`crypt_method` 1 or 2). Opened with
    /// its key ([`OpenOptions::key_secret`]) such a handle reads and writes
    /// plaintext; opened for inspection without one
    /// ([`Image::open_for_info`]) it refuses guest data requests with
    /// [`Error::EncryptionKeyRequired`] ([`Image::has_key`] tells which).
    pub fn is_encrypted(&self) -> bool {
        self.header().crypt_method != 0
    }

    /// Whether guest data can be read and written: the image is not
    /// encrypted, or it was opened with its key.
    pub fn has_key(&self) -> bool {
        !self.no_key
    }

    /// The validated LUKS header of a LUKS image (opened with its key or
    /// with [`Image::open_for_info`]); `None` otherwise.
    pub fn luks_header(&self) -> Option<&crate::format::luks::LuksHeader> {
        self.luks.as_deref()
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
    ///
    /// Writing through it bypasses the overlap check and the image's
    /// caches: use it to inspect the file (length, allocation).
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Hit/miss counters of the L2 cache and the refcount cache.
    pub fn cache_stats(&self) -> (CacheStats, CacheStats) {
        match self.meta.read() {
            Ok(m) => (m.l2.cache().stats(), m.rc.cache().stats()),
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
            .read()
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
        let file_len = self.file.len()?;
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
    ///
    /// ```
    /// use qcow2kit::Event;
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.on_event(|e| match e {
    ///     Event::ImageCorrupted { msg, fatal, .. } => eprintln!("corrupt ({fatal}): {msg}"),
    ///     Event::IoError { operation, reason, .. } => eprintln!("{operation:?} failed: {reason}"),
    ///     other => eprintln!("{other}"),
    /// });
    /// img.write_at(&[0; 512], 0)?; // a healthy image raises nothing
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// The image file's and the external data file's storages get it too
    /// ([`Storage::set_event_sink`]), so a quorum below reports its events here.
    pub fn on_event(&self, sink: impl Fn(&Event) + Send + Sync + 'static) {
        let sink: EventSink = Arc::new(sink);
        self.storage.set_event_sink(Some(sink.clone()));
        self.data.set_event_sink(Some(sink.clone()));
        if let Ok(mut e) = self.events.write() {
            *e = Some(sink);
        }
    }

    /// The registered event callback, if any.
    pub(crate) fn event_sink(&self) -> Option<EventSink> {
        self.events.read().ok().and_then(|e| e.clone())
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
    pub(crate) fn lock_meta(&self) -> Result<MetaGuard<'_>> {
        self.lock()
    }

    pub(crate) fn lock(&self) -> Result<MetaGuard<'_>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        // Without a key no guest data may be read or written: every data
        // path takes this lock first.
        if self.no_key {
            return Err(Error::EncryptionKeyRequired);
        }
        self.lock_open()
    }

    /// The shared side of the metadata lock, for the cache-hit fast paths
    /// (which give up and take [`Image::lock`] on a miss or an error): the
    /// same refusals as [`Image::lock`], no cache cleaning.
    pub(crate) fn lock_shared(&self) -> Result<MetaRead<'_>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        if self.no_key {
            return Err(Error::EncryptionKeyRequired);
        }
        if self.gone.load(Ordering::SeqCst) {
            return Err(Error::MediumGone);
        }
        let m = self.meta.read().map_err(|_| Error::PreviousIoFailed)?;
        if m.gate.is_poisoned() {
            return Err(Error::PreviousIoFailed);
        }
        Ok(m)
    }

    /// The shared lock for a fast path over `[offset, offset + len)`:
    /// `None` when the request is not inside the disk or the exclusive side
    /// has work due on the way (cleaning the caches); the exclusive path
    /// then does the request, and reports what is wrong with it.
    ///
    /// # Errors
    /// The refusals of [`Image::lock_shared`].
    #[inline]
    pub(crate) fn lock_shared_in_range(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<MetaRead<'_>>> {
        let meta = self.lock_shared()?;
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= meta.header.size);
        Ok((inside && !meta.clean_due()).then_some(meta))
    }

    /// Waits (releasing the lock) until no allocating write is in flight on
    /// guest clusters `first..=last`.
    pub(crate) fn wait_in_flight<'a>(
        &'a self,
        mut meta: MetaGuard<'a>,
        first: u64,
        last: u64,
    ) -> Result<MetaGuard<'a>> {
        while meta.in_flight_overlaps(first, last) {
            // Taken before the metadata lock is released, so the notifier
            // (which takes it after updating `in_flight`) cannot slip in
            // between the test and the wait.
            let signal = self
                .in_flight_mx
                .lock()
                .map_err(|_| Error::PreviousIoFailed)?;
            // Counted under the exclusive lock, so a notifier (which checks
            // the count under it too) cannot miss this waiter.
            self.in_flight_waiters.fetch_add(1, Ordering::SeqCst);
            drop(meta);
            let woken = self.in_flight_done.wait(signal);
            self.in_flight_waiters.fetch_sub(1, Ordering::SeqCst);
            drop(woken.map_err(|_| Error::PreviousIoFailed)?);
            meta = self.meta.write().map_err(|_| Error::PreviousIoFailed)?;
        }
        Ok(meta)
    }

    /// Wakes the requests waiting in [`Image::wait_in_flight`] (call with
    /// the exclusive metadata lock held, after changing `Meta::in_flight`).
    pub(crate) fn notify_in_flight(&self) {
        // Nobody waiting (the common case): no mutex, no futex wake-up.
        if self.in_flight_waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        let _signal = self.in_flight_mx.lock();
        self.in_flight_done.notify_all();
    }

    /// [`Image::lock`], then waits until no allocating write is in flight
    /// (for requests that change mappings wholesale: discard, write-zeroes,
    /// resize, close).
    pub(crate) fn lock_idle(&self) -> Result<MetaGuard<'_>> {
        let meta = self.lock()?;
        self.wait_in_flight(meta, 0, u64::MAX)
    }

    /// [`Image::lock`] without the "closed" and encryption checks (for the
    /// close itself).
    fn lock_open(&self) -> Result<MetaGuard<'_>> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(Error::MediumGone);
        }
        let mut m = self.meta.write().map_err(|_| Error::PreviousIoFailed)?;
        if m.gate.is_poisoned() {
            return Err(Error::PreviousIoFailed);
        }
        m.maybe_clean_caches();
        Ok(m)
    }

    /// Turns an internal error into what the caller sees, raising events:
    /// corruption is signalled as QEMU does, I/O errors raise `IoError`.
    pub(crate) fn fail(&self, meta: &mut Meta, e: Error, op: IoOp) -> Error {
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
                    IoOp::Read => self.opts.get_rerror(),
                    _ => self.opts.get_werror(),
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
            if meta.header.version >= 3 {
                let _ = meta
                    .gate
                    .write_corrupt_bit(meta.header.incompatible_features);
            }
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
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.write_at(b"boot sector", 0)?;
    /// let mut buf = [0u8; 11];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf, b"boot sector");
    /// // Unallocated clusters read as zeroes (or from the backing file).
    /// img.read_at(&mut buf, 4 << 20)?;
    /// assert_eq!(buf, [0; 11]);
    /// // Past the end of the disk is an error, not a short read.
    /// assert!(img.read_at(&mut buf, 8 << 20).is_err());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::OutOfRange` past the end of the disk; `Error::Corrupt` when the
    /// tables on the way are corrupt (the image is marked corrupt when it is
    /// writable, see [`Event::ImageCorrupted`]); I/O errors;
    /// `Error::MediumGone` after a fatal corruption event.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.data.is_encrypted() && !crypt::sector_aligned(offset, buf.len() as u64) {
            return self.read_unaligned_encrypted(buf, offset);
        }
        if let Some(r) = self.read_one_run(buf, offset) {
            return r;
        }
        // Built on the mapping API: translate (a prefix), then do the I/O
        // with the clusters held valid by the mapping.
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            let map = self.map_read_n::<READ_AT_EXTENTS>(g, (buf.len() - done) as u64)?;
            let mut r = Ok(());
            for e in map.extents() {
                let at = (e.guest - offset) as usize;
                let chunk = &mut buf[at..at + e.len as usize];
                r = match e.kind {
                    Extent::Data { host } => self.data.read_guest(chunk, host, Some(e.guest)),
                    Extent::Zero { .. } => {
                        chunk.fill(0);
                        Ok(())
                    }
                    Extent::Unallocated => self.read_backing(chunk, e.guest),
                    Extent::Compressed {
                        offset: coff,
                        len: clen,
                    } => {
                        let in_cluster = (e.guest & (self.geom.cluster_size - 1)) as usize;
                        self.read_compressed(map.compression_type(), coff, clen)
                            .and_then(|data| {
                                let src = data
                                    .get(in_cluster..in_cluster + chunk.len())
                                    .ok_or_else(|| {
                                        Error::InvalidArgument(
                                            "compressed extent past its cluster".into(),
                                        )
                                    })?;
                                chunk.copy_from_slice(src);
                                Ok(())
                            })
                    }
                };
                if r.is_err() {
                    break;
                }
            }
            let mapped = map.len() as usize;
            // Never wait for the metadata lock while holding the barrier.
            drop(map);
            if let Err(e) = r {
                let mut meta = self.meta.write().map_err(|_| Error::PreviousIoFailed)?;
                return Err(self.fail(&mut meta, e, IoOp::Read));
            }
            done += mapped;
        }
        Ok(())
    }

    /// The common case of [`Image::read_at`] on its own: the whole request
    /// is one run of data clusters found in the cached L2 slice. Translated
    /// under the shared lock, read under a barrier ticket, with no mapping
    /// to build. `None` when the request is anything else (the general path
    /// then does it, and reports any error).
    #[inline]
    fn read_one_run(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        let len = buf.len() as u64;
        if len == 0 {
            return None;
        }
        let meta = self.lock_shared_in_range(offset, len).ok()??;
        let (Extent::Data { host }, n) = meta.map_extent_cached(offset, len).ok()?? else {
            return None;
        };
        if n != len {
            return None;
        }
        // Taken before the shared lock is released: clusters freed after
        // this translation are not reused until the ticket is dropped.
        let ticket = self.io_barrier.read().ok()?;
        drop(meta);
        let r = self.data.read_guest(buf, host, Some(offset));
        // Never wait for the metadata lock while holding the barrier.
        drop(ticket);
        Some(r.or_else(|e| {
            let mut meta = self.meta.write().map_err(|_| Error::PreviousIoFailed)?;
            Err(self.fail(&mut meta, e, IoOp::Read))
        }))
    }

    /// Reads `buf` from the backing image. Corruption met inside the backing
    /// image is that image's (it raised its own event): it comes back as
    /// [`Error::BackingRead`] so that this image does not signal it as its
    /// own corruption (QEMU's top node sees only -EIO from its backing child).
    pub(crate) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) => {
                self.file
                    .debug_event(crate::storage::BlkdebugEvent::ReadBackingAio);
                b.read_at(buf, offset).map_err(|e| match e {
                    Error::Io { .. } | Error::BackingRead { .. } => e,
                    other => Error::BackingRead {
                        source: Box::new(other),
                    },
                })
            }
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
        self.file
            .debug_event(crate::storage::BlkdebugEvent::ReadCompressed);
        self.file.read(&mut input, offset)?;
        crate::compress::decompress(ctype, &input, cs)
            .map_err(|reason| Error::Decompress { offset, reason })
    }

    /// Describes the run of guest bytes starting at `offset` (at most `len`):
    /// what it maps to in this image (not looking into backing files).
    ///
    /// ```
    /// use qcow2kit::Extent;
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.write_at(&[7; 128 << 10], 0)?;
    /// let st = img.block_status(0, 8 << 20)?;
    /// assert!(matches!(st.extent, Extent::Data { .. }));
    /// assert_eq!(st.len, 128 << 10); // the two clusters are contiguous on the host
    /// let rest = img.block_status(st.len, (8 << 20) - st.len)?; // within the disk
    /// assert_eq!(rest.extent, Extent::Unallocated);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As for [`Image::read_at`].
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut meta = self.lock()?;
        self.check_range(meta.header.size, offset, len)?;
        match meta.map_extent(offset, len) {
            Ok((extent, len)) => Ok(BlockStatus { len, extent }),
            Err(e) => Err(self.fail(&mut meta, e, IoOp::Read)),
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
        r.map_err(|e| self.fail(&mut meta, e, IoOp::Read))
    }

    /// Whether the host range `[offset, offset+len)` of the data file is a hole
    /// (used by `map` for preallocated metadata).
    pub fn data_is_hole(&self, offset: u64, len: u64) -> bool {
        self.data.is_hole(offset, len)
    }

    /// The run of the data file at host offset `offset` (at most `max`
    /// bytes) that is all data or all hole: `(is_data, len)`, as the file
    /// system reports it ([`Storage::data_extent`]); "all data" when it
    /// cannot say, as QEMU assumes.
    pub fn data_extent(&self, offset: u64, max: u64) -> (bool, u64) {
        match self.data.data_extent(offset, max) {
            Ok((is_data, len)) if len > 0 => (is_data, len.min(max)),
            _ => (true, max),
        }
    }

    /// Flushes every dirty table in the crash-safe order and syncs the file.
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
    /// img.write_at(&[1; 4096], 0)?;
    /// img.flush()?; // the write and the tables that point at it are on stable storage
    /// # Ok(())
    /// # }
    /// ```
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
            Err(e) => Err(self.fail(&mut meta, e, IoOp::Write)),
        }
    }

    fn flush_locked(&self, meta: &mut Meta) -> Result<()> {
        // QEMU's `bdrv_co_flush` reports `flush_to_os` to the image file
        // before the format layer writes its caches.
        meta.event(crate::storage::BlkdebugEvent::FlushToOs);
        // Wait until no data I/O that translated earlier is in flight, so
        // freed clusters can be reused.
        let _barrier = self
            .io_barrier
            .write()
            .map_err(|_| Error::PreviousIoFailed)?;
        meta.flush_all(true)?;
        Self::sync_data_file(meta)
    }

    /// Syncs the external data file if anything changed in it since its last
    /// sync (guest data overwritten in place is written outside the lock).
    /// A failed sync poisons the handle, as for the image file: what was
    /// written since the last good sync may be lost.
    fn sync_data_file(meta: &mut Meta) -> Result<()> {
        meta.gate.sync_data_file()
    }

    /// Flushes and closes the image: every table is written in the crash-safe
    /// order, the file synced and (with lazy refcounts) the dirty bit cleared.
    /// Dropping an image does the same but cannot report a failure; call
    /// `close` (or [`Image::shutdown`] when the image is shared) to see it.
    ///
    /// # Errors
    /// As for [`Image::flush`].
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    /// Closes the image through a shared reference, for an image shared with
    /// [`Arc`] by several I/O threads: flushes as [`Image::close`] does and
    /// returns that result; from then on every request on this handle fails
    /// with [`Error::Closed`] (and dropping the last reference writes
    /// nothing more). Calling it again returns `Ok(())`.
    ///
    /// ```
    /// use qcow2kit::{CreateOptions, Error, Image, OpenOptions, storage::MemStorage};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 1 << 20)?;
    /// let img = Arc::new(Image::open_storage(file, &OpenOptions::new())?);
    /// let worker = {
    ///     let img = img.clone();
    ///     std::thread::spawn(move || img.write_at(&[1; 4096], 0))
    /// };
    /// worker.join().expect("worker")?;
    /// img.shutdown()?; // the flush error, if any, comes back here
    /// assert!(matches!(img.write_at(&[2; 512], 0), Err(Error::Closed)));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As for [`Image::flush`].
    pub fn shutdown(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.close_ref()
    }

    fn close_ref(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let meta = self.lock_open()?;
        let mut meta = self.wait_in_flight(meta, 0, u64::MAX)?;
        let r = (|| {
            let _barrier = self
                .io_barrier
                .write()
                .map_err(|_| Error::PreviousIoFailed)?;
            // Closing flushes the node (QEMU's `bdrv_close` -> `bdrv_flush`).
            meta.event(crate::storage::BlkdebugEvent::FlushToOs);
            if meta.bitmaps_store_due() {
                // Guest data and its tables are durable before the bitmaps
                // that describe them are stored.
                meta.flush_all(true)?;
                meta.store_bitmaps()?;
            }
            meta.mark_clean()?;
            Self::sync_data_file(&mut meta)
        })();
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(&mut meta, e, IoOp::Write)),
        }
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
        let mut meta = self.lock_idle()?;
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
                    meta.write_header_field(field::COMPATIBLE_FEATURES, &bits.to_be_bytes())?;
                    meta.header.compatible_features = bits;
                }
            }
            Ok(())
        })();
        r.map_err(|e| self.fail(&mut meta, e, IoOp::Write))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.read_only
            && !self.gone.load(Ordering::SeqCst)
            && !self.closed.load(Ordering::SeqCst)
        {
            // Best effort; callers who care use close() or shutdown().
            let _ = self.close_ref();
        }
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
