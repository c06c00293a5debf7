//! The mirror job (QAPI `drive-mirror`): copies a live image to a target
//! while the embedder keeps using it, then switches the embedder's
//! [`Drive`] to the target.
//!
//! * The embedder does its I/O through a [`Drive`] (QEMU's
//!   `BlockBackend`): while a mirror runs, every write through it marks a
//!   dirty bitmap of `granularity`-sized chunks *after* it completes, and
//!   the job clears a chunk's bits *before* it reads the chunk from the
//!   source, so a write that races a copy is copied again.
//! * `sync`: [`MirrorSync::Full`] copies everything the source's chain
//!   allocates, [`MirrorSync::Top`] what the source image itself allocates
//!   (the target is expected to have the source's backing file),
//!   [`MirrorSync::None`] only what is written while the job runs.
//! * Once nothing is dirty the job emits `BLOCK_JOB_READY` and from then on
//!   every write through the drive goes to both (source first, then the
//!   target, in one order for all writers; discards mark the bitmap instead,
//!   since a discarded range may read differently on the two).
//! * [`Job::complete`] then drains the drive (its exclusive lock: no request
//!   in flight, new ones wait), copies whatever is still dirty, flushes the
//!   target and switches the drive to it (QEMU's `bdrv_replace_node`), a
//!   qcow2 image or a raw file ([`DriveNode`]). [`Job::cancel`] detaches the target and leaves the drive on
//!   the source.
//!
//! The source is only read: a crash at any point leaves it as the embedder
//! wrote it; the target is written with the engine's crash-safe ordering.
//!
//! With [`MirrorOptions::replaces`] the job rebuilds a quorum child instead
//! (`job/replace.rs`).

use super::commit::layers;
use super::{Job, JobCtx, JobOptions, JobType, Stop};
use crate::error::{IoOp, Result};
use crate::image::Backing;
use crate::options::ErrorPolicy;
use crate::storage::Storage;
use crate::{Error, Extent, Image};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Which data a mirror copies (QAPI `MirrorSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MirrorSync {
    /// Everything the source's backing chain holds.
    #[default]
    Full,
    /// What the source image itself holds (the target shares its backing).
    Top,
    /// Only what is written while the job runs.
    None,
}

/// What a [`Drive`] does its I/O on, and where a mirror writes
/// ([`MirrorTarget`] is this type): a qcow2 image or a raw file.
#[derive(Clone)]
#[non_exhaustive]
pub enum DriveNode {
    /// A qcow2 image (opened writable to be a mirror's target).
    Image(Arc<Image>),
    /// A raw file: its bytes are the guest disk.
    Raw(Arc<dyn Storage>),
}

/// Where a mirror writes; the drive switches to it on completion.
pub type MirrorTarget = DriveNode;

impl std::fmt::Debug for DriveNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriveNode::Image(_) => f.write_str("DriveNode::Image"),
            DriveNode::Raw(_) => f.write_str("DriveNode::Raw"),
        }
    }
}

impl DriveNode {
    /// Virtual disk size: the image's, or the raw file's length.
    pub(super) fn size(&self) -> Result<u64> {
        match self {
            DriveNode::Image(i) => Ok(i.size()),
            DriveNode::Raw(s) => s.len().map_err(|e| Error::io(IoOp::Read, 0, e)),
        }
    }

    pub(super) fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            DriveNode::Image(i) => i.read_at(buf, off),
            DriveNode::Raw(s) => s
                .read_at(buf, off)
                .map_err(|e| Error::io(IoOp::Read, off, e)),
        }
    }

    pub(super) fn write(&self, buf: &[u8], off: u64) -> Result<()> {
        match self {
            DriveNode::Image(i) => i.write_at(buf, off),
            DriveNode::Raw(s) => s
                .write_at(buf, off)
                .map_err(|e| Error::io(IoOp::Write, off, e)),
        }
    }

    pub(super) fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        match self {
            DriveNode::Image(i) => i.write_zeroes(off, len, unmap),
            DriveNode::Raw(_) => {
                let zero = vec![0u8; 1 << 16];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zero.len() as u64);
                    let chunk = zero.get(..n as usize).unwrap_or(&[]);
                    self.write(chunk, off + done)?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Grows the node to `len` bytes (a commit base smaller than its top).
    pub(super) fn grow(&self, len: u64) -> Result<()> {
        match self {
            DriveNode::Image(i) => i.resize(len),
            DriveNode::Raw(s) => s.set_len(len).map_err(|e| Error::io(IoOp::Resize, len, e)),
        }
    }

    /// Makes `[off, off + len)` read as zeroes, releasing the space where
    /// it can (QEMU's write-zeroes with `MAY_UNMAP`): a raw file gets a
    /// punched hole, checked, with zeroes written where no hole resulted
    /// (a file system without hole punching, partial blocks).
    pub(super) fn zero_range(&self, off: u64, len: u64) -> Result<()> {
        match self {
            DriveNode::Image(i) => i.write_zeroes(off, len, true),
            DriveNode::Raw(s) => {
                let end = off.saturating_add(len);
                let file_len = s.len().map_err(|e| Error::io(IoOp::Read, 0, e))?;
                // Past the end of the file reads as zeroes already.
                let inside = end.min(file_len).saturating_sub(off);
                if inside == 0 {
                    return Ok(());
                }
                s.discard(off, inside)
                    .map_err(|e| Error::io(IoOp::Write, off, e))?;
                match s.is_hole(off, inside) {
                    Ok(true) => Ok(()),
                    _ => self.write_zeroes(off, inside, false),
                }
            }
        }
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        match self {
            DriveNode::Image(i) => i.discard(off, len),
            DriveNode::Raw(s) => s
                .discard(off, len)
                .map_err(|e| Error::io(IoOp::Write, off, e)),
        }
    }

    pub(super) fn flush(&self) -> Result<()> {
        match self {
            DriveNode::Image(i) => i.flush(),
            DriveNode::Raw(s) => s.flush().map_err(|e| Error::io(IoOp::Flush, 0, e)),
        }
    }
}

/// Arguments of a mirror (QAPI `drive-mirror`).
#[derive(Debug, Clone, Default)]
pub struct MirrorOptions {
    /// Id, speed, `on-error` (the policy for source and target errors
    /// alike unless one of the two below is set) and the event sink.
    pub job: JobOptions,
    /// What an error reading the source does (QAPI `on-source-error`;
    /// `BLOCK_JOB_ERROR` with `operation: read`); none: `job.on_error`,
    /// whose default is QEMU's `report`.
    pub on_source_error: Option<ErrorPolicy>,
    /// What an error writing or flushing the target does (QAPI
    /// `on-target-error`; `BLOCK_JOB_ERROR` with `operation: write`); none:
    /// `job.on_error`.
    pub on_target_error: Option<ErrorPolicy>,
    /// What to copy.
    pub sync: MirrorSync,
    /// Bytes per dirty-bitmap bit: a power of two in 512..=64 MiB; 0: the
    /// target's cluster size (64 KiB for a raw target), as QEMU chooses.
    pub granularity: u64,
    /// Most bytes copied by one request; 0: QEMU's default, 16 MiB.
    pub buf_size: u64,
    /// QAPI `replaces`: the node name of a child of the quorum the drive's
    /// image file is on, which the target (a storage,
    /// [`DriveNode::Raw`]) replaces on completion; the drive stays on its
    /// image. The quorum's voted content is copied, not the guest view;
    /// `sync`, `granularity` and `buf_size` do not apply. See
    /// `job/replace.rs`'s docs.
    pub replaces: Option<String>,
}

/// A dirty bitmap of `granularity`-sized chunks.
#[derive(Debug)]
struct Dirty {
    granularity: u64,
    bits: Mutex<Vec<u64>>,
}

impl Dirty {
    fn new(size: u64, granularity: u64) -> Result<Dirty> {
        let chunks = size.div_ceil(granularity);
        let words = usize::try_from(chunks.div_ceil(64))
            .map_err(|_| Error::InvalidArgument("disk too large for a dirty bitmap".into()))?;
        Ok(Dirty {
            granularity,
            bits: Mutex::new(vec![0; words]),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.bits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the chunks `[off, off + len)` touches.
    fn mark(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (off / self.granularity, (off + len - 1) / self.granularity);
        let mut b = self.lock();
        for c in first..=last {
            if let Some(w) = usize::try_from(c / 64).ok().and_then(|i| b.get_mut(i)) {
                *w |= 1 << (c % 64);
            }
        }
    }

    /// Number of dirty chunks.
    fn count(&self) -> u64 {
        self.lock().iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first run of dirty chunks at or after chunk `from` (wrapping to
    /// the start), at most `max` chunks, cleared: `(first chunk, count)`.
    fn take_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut b = self.lock();
        let total = (b.len() as u64) * 64;
        let is_set = |b: &[u64], c: u64| {
            usize::try_from(c / 64)
                .ok()
                .and_then(|i| b.get(i))
                .is_some_and(|w| w & (1 << (c % 64)) != 0)
        };
        let start = (0..total)
            .map(|k| (from + k) % total.max(1))
            .find(|&c| is_set(&b, c))?;
        let mut n = 0;
        while n < max && start + n < total && is_set(&b, start + n) {
            let c = start + n;
            if let Some(w) = usize::try_from(c / 64).ok().and_then(|i| b.get_mut(i)) {
                *w &= !(1 << (c % 64));
            }
            n += 1;
        }
        Some((start, n))
    }
}

/// What a running mirror shares with the drive.
#[derive(Debug)]
struct MirrorState {
    dirty: Dirty,
    target: MirrorTarget,
    /// Writes go to both (the job is ready).
    write_through: AtomicBool,
    /// Orders the write-through pairs of concurrent writers, so that the
    /// target sees them in the source's order.
    order: Mutex<()>,
}

/// A mirror's error policies: source reads and target writes.
#[derive(Debug, Clone, Copy)]
struct Policies {
    source: ErrorPolicy,
    target: ErrorPolicy,
}

impl Policies {
    /// Applies the policy of `op`'s side to `err` (reads are the source's,
    /// writes and flushes the target's, as QEMU's `mirror_error_action`).
    fn handle(&self, ctx: &JobCtx, op: IoOp, err: Error) -> std::result::Result<(), Stop> {
        let policy = match op {
            IoOp::Read => self.source,
            _ => self.target,
        };
        ctx.handle_error_with(policy, op, err).map(|_| ())
    }
}

/// A request's copy for a ready mirror's target.
type WriteThrough<'a> = dyn Fn(&MirrorTarget) -> Result<()> + 'a;

/// The embedder's handle of a disk that a mirror can move: I/O goes to the
/// current node, a qcow2 image or a raw file (QEMU's `BlockBackend`). While
/// a mirror runs, writes are tracked for it (and, once it is ready, also
/// written to its target); on completion the drive switches to the target,
/// qcow2 or raw. Do all writes through the drive while a mirror of it runs:
/// writes made on the image directly are not seen by the job.
#[derive(Debug)]
pub struct Drive {
    node: RwLock<DriveNode>,
    mirror: RwLock<Option<Arc<MirrorState>>>,
}

impl Drive {
    /// A drive over `image`.
    pub fn new(image: Arc<Image>) -> Arc<Drive> {
        Arc::new(Drive {
            node: RwLock::new(DriveNode::Image(image)),
            mirror: RwLock::new(None),
        })
    }

    /// The node the drive's I/O goes to now.
    pub fn node(&self) -> DriveNode {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The qcow2 image the drive's I/O goes to now; none once a mirror
    /// switched it to a raw file.
    pub fn image(&self) -> Option<Arc<Image>> {
        match self.node() {
            DriveNode::Image(i) => Some(i),
            DriveNode::Raw(_) => None,
        }
    }

    fn mirror_state(&self) -> Option<Arc<MirrorState>> {
        self.mirror
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Virtual disk size in bytes (a raw file's length).
    ///
    /// # Errors
    /// The raw file's length could not be read.
    pub fn size(&self) -> Result<u64> {
        self.node().size()
    }

    /// Reads `buf` at guest `offset` ([`Image::read_at`], or the raw file's
    /// bytes).
    ///
    /// # Errors
    /// As for [`Image::read_at`]; a raw file's I/O error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let node = self.node.read().unwrap_or_else(|p| p.into_inner());
        node.read(buf, offset)
    }

    /// Writes `buf` at guest `offset` ([`Image::write_at`]).
    ///
    /// # Errors
    /// As for [`Image::write_at`]. A failed write-through to a mirror's
    /// target is not the caller's error: the range is marked for the job to
    /// copy again.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_op(
            offset,
            buf.len() as u64,
            |n| n.write(buf, offset),
            Some(&|t: &MirrorTarget| t.write(buf, offset)),
        )
    }

    /// Writes zeroes ([`Image::write_zeroes`]).
    ///
    /// # Errors
    /// As for [`Image::write_zeroes`].
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.write_op(
            offset,
            len,
            |n| n.write_zeroes(offset, len, unmap),
            Some(&|t: &MirrorTarget| t.write_zeroes(offset, len, unmap)),
        )
    }

    /// Discards ([`Image::discard`]); a running mirror copies the range
    /// again (it may read differently on source and target afterwards).
    ///
    /// # Errors
    /// As for [`Image::discard`].
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_op(offset, len, |n| n.discard(offset, len), None)
    }

    /// Flushes the current node (and a ready mirror's target).
    ///
    /// # Errors
    /// As for [`Image::flush`].
    pub fn flush(&self) -> Result<()> {
        let node = self.node.read().unwrap_or_else(|p| p.into_inner());
        node.flush()?;
        if let Some(m) = self.mirror_state() {
            if m.write_through.load(Ordering::Acquire) {
                // A failed target flush is the job's to retry at completion.
                let _ = m.target.flush();
            }
        }
        Ok(())
    }

    fn write_op(
        &self,
        offset: u64,
        len: u64,
        source: impl FnOnce(&DriveNode) -> Result<()>,
        through: Option<&WriteThrough<'_>>,
    ) -> Result<()> {
        // Held for the whole request: completing a mirror drains the drive
        // by taking this lock exclusively.
        let img = self.node.read().unwrap_or_else(|p| p.into_inner());
        let Some(m) = self.mirror_state() else {
            return source(&img);
        };
        match through {
            Some(through) if m.write_through.load(Ordering::Acquire) => {
                let _order = m.order.lock().unwrap_or_else(|p| p.into_inner());
                source(&img)?;
                if through(&m.target).is_err() {
                    m.dirty.mark(offset, len);
                }
                Ok(())
            }
            _ => {
                let r = source(&img);
                // After the write: a copy that cleared the bits before it
                // read sees this write or copies the chunk again.
                m.dirty.mark(offset, len);
                r
            }
        }
    }
}

/// Starts a mirror of `drive` to `target` (QAPI `drive-mirror`).
///
/// ```
/// use qcow2kit::job::{mirror, Drive, JobStatus, MirrorOptions, MirrorTarget};
/// use qcow2kit::storage::{MemStorage, Storage};
/// use qcow2kit::{CreateOptions, Image, OpenOptions};
/// use std::sync::Arc;
///
/// # fn main() -> qcow2kit::Result<()> {
/// let new = |size| -> qcow2kit::Result<Arc<Image>> {
///     let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
///     qcow2kit::create::create_on(st.clone(), &CreateOptions::new(), size)?;
///     Ok(Arc::new(Image::open_storage(st, &OpenOptions::new())?))
/// };
/// let drive = Drive::new(new(4 << 20)?);
/// drive.write_at(&[1; 65536], 0)?;
/// let target = new(4 << 20)?;
///
/// let job = mirror(drive.clone(), MirrorTarget::Image(target.clone()), MirrorOptions::default())?;
/// assert_eq!(job.wait_ready(), JobStatus::Ready);
/// drive.write_at(&[2; 512], 4096)?; // goes to both now
/// job.complete()?;
/// job.wait()?;
/// assert!(Arc::ptr_eq(&drive.image().unwrap(), &target)); // the drive switched
/// let mut buf = [0u8; 2];
/// target.read_at(&mut buf, 4095)?;
/// assert_eq!(buf, [1, 2]);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// `Error::InvalidArgument` for a drive on a raw file, a granularity that is not a power of two
/// in 512..=64 MiB, a target smaller than the source, or a drive another
/// mirror is running on. With `replaces`: QEMU's `Failed to find node with
/// node-name='NAME'` when the drive's image is not on a quorum with such a
/// child, `Error::InvalidArgument` for a qcow2 target.
pub fn mirror(drive: Arc<Drive>, target: MirrorTarget, opts: MirrorOptions) -> Result<Job> {
    if let Some(name) = opts.replaces.clone() {
        return super::replace::mirror_replacing(drive, target, &name, opts);
    }
    let Some(source) = drive.image() else {
        return Err(Error::InvalidArgument(
            "mirroring a drive on a raw file is not supported".into(),
        ));
    };
    let size = source.size();
    let granularity = match opts.granularity {
        0 => match &target {
            MirrorTarget::Image(i) => i.cluster_size(),
            MirrorTarget::Raw(_) => 64 << 10,
        },
        g => g,
    };
    if !granularity.is_power_of_two() || !(512..=(64 << 20)).contains(&granularity) {
        return Err(Error::InvalidArgument(
            "Granularity must be a power of 2 between 512 and 64M".into(),
        ));
    }
    let buf_size = match opts.buf_size {
        0 => 16 << 20,
        b => b.max(granularity),
    };
    let target_size = target.size()?;
    if target_size < size {
        return Err(Error::InvalidArgument(format!(
            "the target ({target_size} bytes) is smaller than the source ({size} bytes)"
        )));
    }
    let state = Arc::new(MirrorState {
        dirty: Dirty::new(size, granularity)?,
        target,
        write_through: AtomicBool::new(false),
        order: Mutex::new(()),
    });
    {
        let mut m = drive.mirror.write().unwrap_or_else(|p| p.into_inner());
        if m.is_some() {
            return Err(Error::InvalidArgument(
                "a mirror is already running on this drive".into(),
            ));
        }
        // From here on, writes are tracked.
        *m = Some(state.clone());
    }
    let policies = Policies {
        source: opts.on_source_error.unwrap_or(opts.job.on_error),
        target: opts.on_target_error.unwrap_or(opts.job.on_error),
    };
    let job_opts = opts.job.or_device_sink(&source);
    let sync = opts.sync;
    let r = Job::spawn(JobType::Mirror, job_opts, {
        let drive = drive.clone();
        move |ctx| {
            let r = run(ctx, &drive, &source, &state, policies, sync, buf_size);
            // Whatever happened, the drive stops feeding this mirror.
            *drive.mirror.write().unwrap_or_else(|p| p.into_inner()) = None;
            r
        }
    });
    if r.is_err() {
        *drive.mirror.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
    r
}

/// Whether `[off, off + want)` is allocated in `device`'s chain (all of it,
/// or the top only): `(allocated, n)` for the first `n` bytes.
fn allocated(device: &Image, top_only: bool, off: u64, want: u64) -> Result<(bool, u64)> {
    let (chain, raw_tail) = layers(device);
    let chain = if top_only { &chain[..1] } else { &chain[..] };
    let mut n = want;
    for l in chain {
        let size = l.size();
        if off >= size {
            return Ok((true, n));
        }
        let st = l.block_status(off, n.min(size - off))?;
        n = n.min(st.len);
        if st.extent != Extent::Unallocated {
            return Ok((true, n));
        }
    }
    let raw = raw_tail && !top_only;
    Ok((raw, n))
}

/// Whether `[off, off + want)` of `device` reads as zeroes by its
/// metadata (a zero cluster, or nothing allocated down the chain, or past a
/// layer's end), as QEMU's block status says: `(zero, n)` for the first
/// `n` bytes. Data that happens to be zero is not zero here.
fn zero_status(device: &Image, off: u64, want: u64) -> Result<(bool, u64)> {
    let (chain, raw_tail) = layers(device);
    let mut n = want;
    for l in &chain {
        let size = l.size();
        if off >= size {
            return Ok((true, n));
        }
        let st = l.block_status(off, n.min(size - off))?;
        n = n.min(st.len);
        match st.extent {
            Extent::Unallocated => {}
            Extent::Zero { .. } => return Ok((true, n)),
            _ => return Ok((false, n)),
        }
    }
    if !raw_tail {
        return Ok((true, n));
    }
    // A raw file: its holes read as zeroes (QEMU's file driver reports
    // them through SEEK_DATA/SEEK_HOLE).
    let last = chain.last().copied().unwrap_or(device);
    match last.backing() {
        Some(Backing::Raw { storage, size, .. }) => {
            if off >= *size {
                return Ok((true, n));
            }
            match storage.data_extent(off, n.min(size - off)) {
                Ok((data, k)) if k > 0 => Ok((!data, k.min(n))),
                _ => Ok((false, n)),
            }
        }
        _ => Ok((false, n)),
    }
}

/// The job's work, on the job thread.
fn run(
    ctx: &JobCtx,
    drive: &Drive,
    source: &Image,
    state: &MirrorState,
    policies: Policies,
    sync: MirrorSync,
    buf_size: u64,
) -> std::result::Result<(), Stop> {
    let size = source.size();
    let g = state.dirty.granularity;
    // The initial dirty bitmap: what sync asks to copy.
    if sync != MirrorSync::None {
        let mut off = 0u64;
        while off < size {
            ctx.checkpoint()?;
            let want = (size - off).min(buf_size);
            let (alloc, n) = match allocated(source, sync == MirrorSync::Top, off, want) {
                Ok(r) => r,
                Err(e) => {
                    policies.handle(ctx, IoOp::Read, e)?;
                    continue;
                }
            };
            if n == 0 {
                return Err(Stop::Failed(Error::Internal(format!(
                    "no progress scanning at {off:#x}"
                ))));
            }
            if alloc {
                state.dirty.mark(off, n);
            }
            off += n;
        }
    }
    ctx.set_len(state.dirty.count().saturating_mul(g).min(size));
    let mut buf = vec![0u8; usize::try_from(buf_size).unwrap_or(16 << 20)];
    copy_dirty(ctx, source, state, &mut buf, Some(policies))?;
    while let Err(e) = state.target.flush() {
        policies.handle(ctx, IoOp::Flush, e)?;
    }
    // In sync: writes go to both from here on; the writes that were in
    // flight as it turned marked the bitmap and are copied at completion.
    state.write_through.store(true, Ordering::Release);
    ctx.ready()?;
    // Completing: drain the drive, copy what is left, switch.
    let mut node = drive.node.write().unwrap_or_else(|p| p.into_inner());
    let left = state.dirty.count().saturating_mul(g).min(size);
    ctx.set_len(ctx.offset().saturating_add(left));
    copy_dirty(ctx, source, state, &mut buf, None)?;
    state.target.flush()?;
    *node = state.target.clone();
    // Detached before the drive is released: requests that waited for the
    // switch go to the target alone.
    *drive.mirror.write().unwrap_or_else(|p| p.into_inner()) = None;
    Ok(())
}

/// Copies dirty chunks from `source` to the target until none is left
/// (`policies`: with pause points, the rate limit and the error policies;
/// none while the drive is drained, where an error ends the job).
fn copy_dirty(
    ctx: &JobCtx,
    source: &Image,
    state: &MirrorState,
    buf: &mut [u8],
    policies: Option<Policies>,
) -> std::result::Result<(), Stop> {
    let pausable = policies.is_some();
    let size = source.size();
    let g = state.dirty.granularity;
    let max_chunks = (buf.len() as u64 / g).max(1);
    let mut cursor = 0u64;
    loop {
        if pausable {
            ctx.checkpoint()?;
        }
        let Some((first, count)) = state.dirty.take_run(cursor, max_chunks) else {
            return Ok(());
        };
        let off = first * g;
        if off >= size {
            cursor = 0;
            continue;
        }
        let n = (count * g).min(size - off);
        if let Err((op, e)) = copy_run(source, state, buf, off, n) {
            // Not copied: dirty again, for the retry after the policy.
            state.dirty.mark(off, n);
            if let Some(p) = policies {
                p.handle(ctx, op, e)?;
                continue;
            }
            return Err(Stop::Failed(e));
        }
        ctx.processed(n);
        ctx.progress(n);
        // QEMU's estimate: done plus what is dirty now.
        let left = state.dirty.count().saturating_mul(g).min(size);
        ctx.set_len(ctx.offset().saturating_add(left));
        cursor = first + count;
    }
}

/// Copies `[off, off + n)` from `source` to the target: ranges that read
/// as zeroes by the source's metadata become zero writes (QEMU's
/// `MIRROR_METHOD_ZERO`), the rest is read and written.
fn copy_run(
    source: &Image,
    state: &MirrorState,
    buf: &mut [u8],
    off: u64,
    n: u64,
) -> std::result::Result<(), (IoOp, Error)> {
    let mut done = 0u64;
    while done < n {
        let at = off + done;
        let (zero, k) = zero_status(source, at, n - done).map_err(|e| (IoOp::Read, e))?;
        if k == 0 {
            return Err((
                IoOp::Read,
                Error::Internal(format!("no progress mirroring at {at:#x}")),
            ));
        }
        // Zero writes cover whole granules only (QEMU's mirror zeroes a
        // chunk only when it is zero as a whole); a zero range's unaligned
        // head or a short one is copied as data.
        let g = state.dirty.granularity;
        let end = at + k;
        let (zero, k) = if !zero {
            (false, k)
        } else if !at.is_multiple_of(g) {
            (false, (at / g + 1).saturating_mul(g).min(end) - at)
        } else {
            let zend = if end == source.size() {
                end
            } else {
                end / g * g
            };
            if zend > at {
                (true, zend - at)
            } else {
                (false, k)
            }
        };
        if zero {
            state
                .target
                .write_zeroes(at, k, true)
                .map_err(|e| (IoOp::Write, e))?;
        } else {
            let chunk = buf.get_mut(..k as usize).ok_or_else(|| {
                (
                    IoOp::Read,
                    Error::Internal("mirror request larger than its buffer".into()),
                )
            })?;
            source.read_at(chunk, at).map_err(|e| (IoOp::Read, e))?;
            state
                .target
                .write(chunk, at)
                .map_err(|e| (IoOp::Write, e))?;
        }
        done += k;
    }
    Ok(())
}
