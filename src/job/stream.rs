//! The stream job (QAPI `block-stream`): copies into the device (the active
//! image) what its backing chain holds above `base` (or all of it), then
//! writes `backing-file` as its backing file string with the base's format
//! (`raw` for a raw base), or removes the backing file when the whole
//! chain was streamed.
//!
//! Data is copied the way QEMU's copy-on-read does: read from the
//! device's backing chain, written only where the device still allocates
//! nothing, decided under the device's metadata lock, so guest writes made
//! while the job runs are never overwritten. The device keeps reading
//! through the chain it opened (which reads the same afterwards); the new
//! backing string takes effect when it is next opened. A crash at any
//! point leaves the device reading as before: the copied clusters hold what
//! the chain held there, and the header changes last, with one write.

use super::commit::{is_file, layers};
use super::{Job, JobCtx, JobError, JobOptions, JobType, Stop};
use crate::error::{IoOp, Result};
use crate::image::Backing;
use crate::{Error, Image};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes copied per request (QEMU's `STREAM_CHUNK`).
const CHUNK: u64 = 512 << 10;

/// Arguments of a stream (QAPI `block-stream`).
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// Id, speed, `on-error` and the event sink.
    pub job: JobOptions,
    /// The image of the device's backing chain that stays its backing file
    /// (matched against the chain's paths by file identity; the raw file
    /// ending a chain counts); default: none, the whole chain is streamed.
    pub base: Option<PathBuf>,
    /// The backing file string written into the device (not validated);
    /// default: the base's file name as the chain opened it (its overlay's
    /// backing name resolved against the overlay's directory), as QEMU 10
    /// writes it whatever spelling `base` used. An error without `base`
    /// (QEMU: "backing file specified, but streaming the entire chain").
    pub backing_file: Option<String>,
}

/// A layer below the device, down to (not including) the base.
enum Layer<'a> {
    Qcow2(&'a Image),
    /// A raw file: allocated everywhere up to its size.
    Raw(u64),
}

impl Layer<'_> {
    fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(i) => i.size(),
            Layer::Raw(s) => *s,
        }
    }
}

/// The layers of `device`'s chain below it, qcow2 then the raw tail, with
/// the raw tail's path.
fn below(device: &Image) -> (Vec<Layer<'_>>, Option<PathBuf>) {
    let (chain, _) = layers(device);
    let mut v: Vec<Layer<'_>> = chain.iter().skip(1).map(|i| Layer::Qcow2(i)).collect();
    let last = chain.last().copied().unwrap_or(device);
    let raw = match last.backing() {
        Some(Backing::Raw { size, path, .. }) => {
            v.push(Layer::Raw(*size));
            Some(path.clone())
        }
        _ => None,
    };
    (v, raw)
}

/// Starts a stream into `device` (QAPI `block-stream`).
///
/// ```
/// use qcow2kit::job::{stream, JobOutcome, StreamOptions};
/// use qcow2kit::{CreateOptions, Image, OpenOptions};
/// use std::sync::Arc;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
/// qcow2kit::create::create(&base, &CreateOptions::new(), 4 << 20)?;
/// Image::open(&base, &OpenOptions::new())?.write_at(&[7; 65536], 0)?;
/// let o = CreateOptions::new().backing_file("base.qcow2").backing_fmt("qcow2");
/// qcow2kit::create::create(&top, &o, 4 << 20)?;
///
/// let device = Arc::new(Image::open(&top, &OpenOptions::new())?);
/// let job = stream(device.clone(), StreamOptions::default())?;
/// assert_eq!(job.wait()?, JobOutcome::Completed);
/// drop(device);
///
/// // The data is in top now, and top has no backing file any more.
/// let t = Image::open(&top, &OpenOptions::new().read_only(true))?;
/// assert!(t.backing().is_none());
/// let mut buf = [0u8; 4];
/// t.read_at(&mut buf, 0)?;
/// assert_eq!(buf, [7; 4]);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// `Error::ReadOnly` for a read-only device; [`JobError::BaseNotInChain`]
/// and [`JobError::BackingFileWithoutBase`] (QEMU's texts).
pub fn stream(device: Arc<Image>, opts: StreamOptions) -> Result<Job> {
    if device.is_read_only() {
        return Err(Error::ReadOnly);
    }
    if opts.base.is_none() && opts.backing_file.is_some() {
        return Err(JobError::BackingFileWithoutBase.into());
    }
    let (chain, raw_path) = below(&device);
    // Index of the base in `chain` (the layers above it are streamed).
    let base = match &opts.base {
        None => chain.len(),
        Some(b) => chain
            .iter()
            .position(|l| match l {
                Layer::Qcow2(i) => is_file(i, b),
                Layer::Raw(_) => raw_path.as_deref().is_some_and(|p| same_file(p, b)),
            })
            .ok_or_else(|| JobError::BaseNotInChain(b.display().to_string()))?,
    };
    let base_format = match chain.get(base) {
        None => None,
        Some(Layer::Qcow2(_)) => Some("qcow2"),
        Some(Layer::Raw(_)) => Some("raw"),
    };
    // QEMU writes the base node's file name (the path it was opened by,
    // the overlay's backing name resolved against the overlay's directory),
    // whatever spelling `base` used.
    let backing_string = match (&opts.backing_file, chain.get(base)) {
        (Some(s), _) => s.clone(),
        (None, None) => String::new(),
        (None, Some(Layer::Qcow2(i))) => i
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        (None, Some(Layer::Raw(_))) => raw_path
            .as_deref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    drop(chain);
    let job_opts = opts.job.or_device_sink(&device);
    Job::spawn(JobType::Stream, job_opts, move |ctx| {
        run(ctx, &device, base, &backing_string, base_format)
    })
}

/// Whether `a` and `b` name the same file (by identity, else by name).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

/// The job's work, on the job thread.
fn run(
    ctx: &JobCtx,
    device: &Image,
    base: usize,
    backing_string: &str,
    base_format: Option<&str>,
) -> std::result::Result<(), Stop> {
    let (chain, _) = below(device);
    let above = chain.get(..base).unwrap_or(&[]);
    // Nothing between the device and the base: nothing to stream (QEMU
    // reports a length of 0 then).
    if let (Some(backing), false) = (device.backing(), above.is_empty()) {
        let len = device.size();
        ctx.set_len(len);
        copy(ctx, device, backing, above, len)?;
    }
    device.flush()?;
    device.change_backing_file(backing_string, base_format)?;
    Ok(())
}

/// Whether `[off, off + want)` is allocated in one of `layers` (QEMU's
/// `bdrv_is_allocated_above` from the device's backing file down to the
/// image above the base): `(allocated, n)` for the first `n` bytes; `n` is
/// 0 past the end of the device's backing file (nothing more to stream).
fn allocated_in(layers: &[Layer<'_>], off: u64, want: u64) -> Result<(bool, u64)> {
    let mut n = want;
    for (k, l) in layers.iter().enumerate() {
        let size = l.size();
        if off >= size {
            if k == 0 {
                return Ok((false, 0));
            }
            continue;
        }
        let avail = n.min(size - off);
        match l {
            Layer::Raw(_) => return Ok((true, avail)),
            Layer::Qcow2(i) => {
                let st = i.block_status(off, avail)?;
                if st.extent != crate::Extent::Unallocated {
                    return Ok((true, st.len.min(avail)));
                }
                if k == 0 || st.len < avail {
                    n = n.min(st.len);
                }
            }
        }
    }
    Ok((false, n))
}

/// Copies what `layers` allocate and `device` does not into `device`.
fn copy(
    ctx: &JobCtx,
    device: &Image,
    backing: &Backing,
    layers: &[Layer<'_>],
    len: u64,
) -> std::result::Result<(), Stop> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < len {
        ctx.checkpoint()?;
        let want = CHUNK.min(len - off);
        let top = match device.block_status(off, want) {
            Ok(st) => st,
            Err(e) => {
                ctx.handle_error(IoOp::Read, e)?;
                continue;
            }
        };
        let mut n = top.len.min(want);
        let mut copy = false;
        if top.extent == crate::Extent::Unallocated {
            match allocated_in(layers, off, n) {
                Ok((_, 0)) => {
                    // Past the end of the backing file: done.
                    ctx.progress(len - off);
                    break;
                }
                Ok((alloc, m)) => {
                    copy = alloc;
                    n = m;
                }
                Err(e) => {
                    ctx.handle_error(IoOp::Read, e)?;
                    continue;
                }
            }
        }
        if n == 0 {
            return Err(Stop::Failed(Error::Internal(format!(
                "no progress streaming at {off:#x}"
            ))));
        }
        if copy {
            let chunk = buf.get_mut(..n as usize).ok_or_else(|| {
                Stop::Failed(Error::Internal(
                    "stream request larger than its buffer".into(),
                ))
            })?;
            if let Err(e) = backing.read_at(chunk, off) {
                ctx.handle_error(IoOp::Read, e)?;
                continue;
            }
            let data = (!chunk.iter().all(|&b| b == 0)).then_some(&*chunk);
            if let Err(e) = device.write_unallocated(data, off, n) {
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
