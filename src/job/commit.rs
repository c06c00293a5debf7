//! The commit job (QAPI `block-commit`): copies what the layers from `top`
//! down to (not including) `base` hold into `base`.
//!
//! * Committing the active layer (`top` is the device itself, the default)
//!   copies, then waits in the ready state (`BLOCK_JOB_READY`) until the
//!   embedder calls [`Job::complete`]; completing copies once more what the
//!   active layer holds (writes the embedder made meanwhile), unless the
//!   device was declared quiesced ([`CommitOptions::device_quiesced`]).
//!   The base then reads as the device did; the embedder switches to it.
//! * Committing an intermediate image finishes on its own and writes
//!   `backing-file` (default: the base's path) into the overlay of `top`.
//! * The base may be the raw file that ends the chain (the default base
//!   then): the data goes into the file, and what reads as zeroes in the
//!   layers above (zero clusters, layers ending early) becomes, as QEMU
//!   leaves it, a punched hole in an active commit (QEMU's mirror with
//!   `unmap`; written zeroes where the file system cannot punch) and
//!   written zeroes in an intermediate one (QEMU's commit job). The
//!   overlay of an intermediate `top` then names the base with the format
//!   `raw`.
//!
//! The device's open chain holds its backing images read-only, so the job
//! opens its own writable handles of the base (and of the overlay of an
//! intermediate `top`) with the device's options: through the device's
//! [`crate::image::FileResolver`] when it has one, else by path. QEMU
//! updates the permissions of the chain's nodes for the job; here the
//! device's read-only handles of those images first relax their locks to
//! share write (other processes still cannot take write: the job's handle
//! does not share it), and take their read-only locks back when the job
//! ends.

use super::mirror::DriveNode;
use super::{Job, JobCtx, JobOptions, JobType, Stop};
use crate::error::{IoOp, Result};
use crate::image::{Backing, FileRole};
use crate::job::JobError;
use crate::storage::{FileStorage, LockRequest, Permissions, Storage};
use crate::{Error, Extent, Image};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes copied per request (QEMU's `COMMIT_BUFFER_SIZE`).
const CHUNK: u64 = 512 << 10;

/// Arguments of a commit (QAPI `block-commit`).
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Id, speed, `on-error` and the event sink.
    pub job: JobOptions,
    /// The image whose data is committed (matched against the paths of the
    /// device's chain by file identity); default: the device itself.
    pub top: Option<PathBuf>,
    /// The image receiving the data; default: the deepest backing image.
    pub base: Option<PathBuf>,
    /// For an intermediate `top`: the backing string written into the
    /// overlay of `top` (not validated); default: the base's path. An error
    /// when `top` is the active layer.
    pub backing_file: Option<String>,
    /// The embedder does not write to the device while the job runs (as
    /// `qemu-img commit`): completing an active commit then copies nothing
    /// more.
    pub device_quiesced: bool,
}

/// The qcow2 images of `device`'s chain, the device first, and whether a raw
/// file ends it.
pub(super) fn layers(device: &Image) -> (Vec<&Image>, bool) {
    let mut v = vec![device];
    let mut cur = device;
    loop {
        match cur.backing() {
            Some(Backing::Qcow2(b)) => {
                v.push(b);
                cur = b;
            }
            Some(Backing::Raw { .. }) => return (v, true),
            None => return (v, false),
        }
    }
}

/// Whether `layer` is the file `name` names: same device and inode when
/// both exist, else the same path.
pub(super) fn is_file(layer: &Image, name: &Path) -> bool {
    layer.path().is_some_and(|path| same_path(path, name))
}

/// The device's read-only handle of an image the job writes, with its lock
/// relaxed to share everything while the job's writable handle exists;
/// dropping it takes the read-only lock back (best effort: a conflict then
/// leaves it relaxed).
struct SharedWrite {
    storage: Arc<dyn Storage>,
    restore: LockRequest,
}

impl SharedWrite {
    fn new(layer: &Image) -> Result<SharedWrite> {
        let o = layer.options();
        let locking = o.get_locking();
        layer.storage().lock(&LockRequest {
            perm: Permissions::CONSISTENT_READ,
            shared: Permissions::ALL,
            locking,
        })?;
        Ok(SharedWrite {
            storage: layer.storage().clone(),
            restore: LockRequest::image_file(true, o.get_force_share(), locking),
        })
    }
}

impl Drop for SharedWrite {
    fn drop(&mut self) {
        let _ = self.storage.lock(&self.restore);
    }
}

/// A writable handle of `layer` (an image of `device`'s chain), opened
/// with the device's options and without a backing file.
fn open_writable(device: &Image, layer: &Image) -> Result<Arc<Image>> {
    let opts = device.options().clone().read_only(false).force_share(false);
    let path = layer.path().ok_or_else(|| {
        Error::InvalidArgument("the image to write has no name to reopen it by".into())
    })?;
    let img = match opts.get_file_resolver() {
        Some(resolver) => {
            let name = path.to_string_lossy();
            let storage = resolver.open(FileRole::Backing, &name, true)?;
            Image::open_storage(storage, &opts.with_filename(path.to_path_buf()))?
        }
        None => Image::open_without_backing(path, &opts)?,
    };
    Ok(Arc::new(img))
}

/// Whether the path `a` names the file `b` names (by identity when both
/// exist).
fn same_path(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

/// A writable handle of the raw file ending `device`'s chain (opened by
/// the device's resolver when it has one, else by path), locked for write
/// (the device's own read-only handle of it shares everything).
fn open_raw_writable(device: &Image, path: &Path) -> Result<DriveNode> {
    let o = device.options();
    let storage: Arc<dyn Storage> = match o.get_file_resolver() {
        Some(resolver) => resolver.open(FileRole::Backing, &path.to_string_lossy(), true)?,
        None => Arc::new(FileStorage::open(path, true).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?),
    };
    storage.lock(&LockRequest::image_file(false, false, o.get_locking()))?;
    Ok(DriveNode::Raw(storage))
}

/// Starts a commit of `device`'s chain (QAPI `block-commit`).
///
/// ```
/// use qcow2kit::job::{commit, CommitOptions, JobOutcome, JobStatus};
/// use qcow2kit::{CreateOptions, Image, OpenOptions};
/// use std::sync::Arc;
///
/// # fn main() -> qcow2kit::Result<()> {
/// let dir = tempfile::tempdir().map_err(|e| qcow2kit::Error::InvalidArgument(e.to_string()))?;
/// let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
/// qcow2kit::create::create(&base, &CreateOptions::new(), 4 << 20)?;
/// let o = CreateOptions::new().backing_file("base.qcow2").backing_fmt("qcow2");
/// qcow2kit::create::create(&top, &o, 4 << 20)?;
/// // Image locking on (the default): the job's writable handle of the base
/// // coexists with the device's read-only one.
/// let opts = OpenOptions::new();
/// let device = Arc::new(Image::open(&top, &opts)?);
/// device.write_at(&[7; 65536], 0)?;
///
/// let job = commit(device.clone(), CommitOptions::default())?;
/// assert_eq!(job.wait_ready(), JobStatus::Ready); // an active commit waits
/// job.complete()?;
/// assert_eq!(job.wait()?, JobOutcome::Completed);
///
/// let b = Image::open_without_backing(&base, &OpenOptions::new().read_only(true))?;
/// let mut buf = [0u8; 4];
/// b.read_at(&mut buf, 0)?;
/// assert_eq!(buf, [7; 4]);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`JobError`] for arguments that do not fit the chain (QEMU's texts);
/// the errors of opening the base (or the overlay) writable.
pub fn commit(device: Arc<Image>, opts: CommitOptions) -> Result<Job> {
    let (chain, raw_tail) = layers(&device);
    let top = match &opts.top {
        None => 0,
        Some(t) => chain
            .iter()
            .position(|l| is_file(l, t))
            .ok_or_else(|| JobError::TopNotFound(t.display().to_string()))?,
    };
    if top + 1 >= chain.len() && !raw_tail {
        return Err(JobError::NoBacking.into());
    }
    // The raw file ending the chain, if any: index `chain.len()` as a base.
    let raw_base = chain.last().and_then(|l| match l.backing() {
        Some(Backing::Raw { path, .. }) => Some(path.clone()),
        _ => None,
    });
    let base = match &opts.base {
        None if raw_tail => chain.len(),
        None => chain.len() - 1,
        Some(b) => {
            if chain.get(top).is_some_and(|l| is_file(l, b)) {
                return Err(JobError::IntoItself.into());
            }
            chain
                .iter()
                .enumerate()
                .skip(top + 1)
                .find(|(_, l)| is_file(l, b))
                .map(|(i, _)| i)
                .or_else(|| {
                    raw_base
                        .as_ref()
                        .filter(|p| same_path(p, b))
                        .map(|_| chain.len())
                })
                .ok_or_else(|| JobError::BaseNotFound(b.display().to_string()))?
        }
    };
    if top == 0 && opts.backing_file.is_some() {
        return Err(JobError::BackingFileForActive.into());
    }
    // Declared before the writable handles, so dropped after them.
    let mut shared = Vec::new();
    let (base_node, base_fmt, base_path) = match (chain.get(base), &raw_base) {
        (Some(layer), _) => {
            shared.push(SharedWrite::new(layer)?);
            let img = open_writable(&device, layer)?;
            let path = layer.path().map(Path::to_path_buf);
            (DriveNode::Image(img), "qcow2", path)
        }
        // The device's handle of a raw backing file shares everything.
        (None, Some(path)) => (open_raw_writable(&device, path)?, "raw", Some(path.clone())),
        (None, None) => {
            return Err(Error::Internal("commit base out of the chain".into()));
        }
    };
    let overlay = match top {
        0 => None,
        1 if !device.is_read_only() => Some(device.clone()),
        t => {
            shared.push(SharedWrite::new(chain[t - 1])?);
            Some(open_writable(&device, chain[t - 1])?)
        }
    };
    let backing_string = opts.backing_file.clone().unwrap_or_else(|| {
        base_path
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    drop(chain);
    let quiesced = opts.device_quiesced;
    let job_opts = opts.job.or_device_sink(&device);
    Job::spawn(JobType::Commit, job_opts, move |ctx| {
        let r = run(
            ctx,
            &device,
            (top, base),
            &base_node,
            overlay,
            (&backing_string, base_fmt),
            quiesced,
        );
        // The writable handles go (flushed and closed) before the device's
        // read-only handles take their locks back.
        let closed = match &base_node {
            DriveNode::Image(i) => i.shutdown(),
            DriveNode::Raw(_) => base_node.flush(),
        };
        drop(base_node);
        drop(shared);
        r.and(closed.map_err(Stop::Failed))
    })
}

/// The job's work, on the job thread: `layers` are the indices of `top`
/// and `base` in the device's chain (`base` one past the qcow2 layers for
/// a raw base); `backing` the string and format written into `overlay`.
fn run(
    ctx: &JobCtx,
    device: &Image,
    (top, base): (usize, usize),
    base_img: &DriveNode,
    overlay: Option<Arc<Image>>,
    (backing_string, backing_fmt): (&str, &str),
    quiesced: bool,
) -> std::result::Result<(), Stop> {
    let (chain, _) = layers(device);
    let (Some(top_img), Some(above)) = (chain.get(top), chain.get(top..base)) else {
        return Err(Stop::Failed(Error::Internal(
            "commit layers out of the chain".into(),
        )));
    };
    let len = top_img.size();
    ctx.set_len(len);
    // QEMU grows a smaller base to the size of top.
    if base_img.size()? < len {
        base_img.grow(len)?;
    }
    let unmap = overlay.is_none();
    copy_pass(ctx, top_img, above, (base_img, unmap), len)?;
    base_img.flush()?;
    match overlay {
        None => {
            ctx.ready()?;
            if !quiesced {
                // What the embedder wrote since: the active layer only.
                ctx.add_len(len);
                copy_pass(ctx, top_img, &chain[..1], (base_img, true), len)?;
                base_img.flush()?;
            }
        }
        Some(ov) => {
            ov.change_backing_file(backing_string, Some(backing_fmt))?;
        }
    }
    Ok(())
}

/// What the layers above the base hold at a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Above {
    /// Nothing: the base shows through.
    Unallocated,
    /// Zeroes (a zero cluster, or a layer that ends before the range).
    Zero,
    /// Data (possibly compressed).
    Data,
}

/// What `[off, off + want)` is in `layers` (the images above the base):
/// `(what, n)` for the first `n` bytes, from the first layer that
/// allocates it. A layer that ends before `off` counts as zero (it reads
/// zeroes over what is below), as in QEMU's `bdrv_is_allocated_above`.
fn allocated_above(layers: &[&Image], off: u64, want: u64) -> Result<(Above, u64)> {
    let mut n = want;
    for l in layers {
        let size = l.size();
        if off >= size {
            return Ok((Above::Zero, n));
        }
        let st = l.block_status(off, n.min(size - off))?;
        n = n.min(st.len);
        match st.extent {
            Extent::Unallocated => {}
            Extent::Zero { .. } => return Ok((Above::Zero, n)),
            Extent::Data { .. } | Extent::Compressed { .. } => return Ok((Above::Data, n)),
        }
    }
    Ok((Above::Unallocated, n))
}

/// Copies every range allocated in `layers` from `top`'s view into `base`,
/// `len` bytes of progress. A qcow2 base gets zero writes for chunks that
/// read as zeroes. A raw base gets the data as it is and zeroes where the
/// layers hold zeroes: as holes when `unmap` (an active commit: QEMU's
/// mirror with unmap), as written zeroes otherwise (an intermediate
/// commit: QEMU's commit job writes zeroes without unmap).
fn copy_pass(
    ctx: &JobCtx,
    top: &Image,
    layers: &[&Image],
    (base, unmap): (&DriveNode, bool),
    len: u64,
) -> std::result::Result<(), Stop> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    let raw = matches!(base, DriveNode::Raw(_));
    while off < len {
        ctx.checkpoint()?;
        let want = CHUNK.min(len - off);
        let (above, n) = match allocated_above(layers, off, want) {
            Ok(r) => r,
            Err(e) => {
                ctx.handle_error(IoOp::Read, e)?;
                continue;
            }
        };
        if n == 0 {
            return Err(Stop::Failed(Error::Internal(format!(
                "no progress committing at {off:#x}"
            ))));
        }
        let w = match above {
            Above::Unallocated => None,
            Above::Zero if raw && unmap => Some(base.zero_range(off, n)),
            Above::Zero if raw => Some(base.write_zeroes(off, n, false)),
            Above::Zero | Above::Data => {
                let chunk = buf.get_mut(..n as usize).ok_or_else(|| {
                    Stop::Failed(Error::Internal(
                        "commit request larger than its buffer".into(),
                    ))
                })?;
                if let Err(e) = top.read_at(chunk, off) {
                    ctx.handle_error(IoOp::Read, e)?;
                    continue;
                }
                Some(if !raw && chunk.iter().all(|&b| b == 0) {
                    base.write_zeroes(off, n, false)
                } else {
                    base.write(chunk, off)
                })
            }
        };
        if let Some(w) = w {
            if let Err(e) = w {
                ctx.handle_error(IoOp::Write, e)?;
                continue;
            }
            ctx.processed(n);
        }
        ctx.progress(n);
        off += n;
    }
    Ok(())
}
