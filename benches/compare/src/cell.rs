//! One cell of the table, run in its own process: open the engine, run the
//! workload, print one `RESULT` line (ops, seconds, peak RSS, samples to verify).

use crate::null::NullStorage;
use crate::work::{Kind, Offsets, Workload, DISK};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Positioned I/O on one engine's view of an image.
pub trait Dev {
    fn read(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    fn write(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Flush metadata and `fdatasync` (what a guest flush asks for).
    fn flush(&self) -> io::Result<()>;
}

/// `pread`/`pwrite` on a raw file.
pub struct Raw(File);

impl Dev for Raw {
    fn read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, off)
    }
    fn write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_all_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// qcow2kit's `Image::read_at`/`write_at`.
pub struct Kit(qcow2kit::Image);

fn kit_err(e: qcow2kit::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl Dev for Kit {
    fn read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read_at(buf, off).map_err(kit_err)
    }
    fn write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_at(buf, off).map_err(kit_err)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(kit_err)
    }
}

/// imago 0.2.6 built with its native `sync` feature (no async runtime).
pub struct Imago(imago::FormatAccess<imago::file::File>);

impl Dev for Imago {
    fn read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read(buf, off)
    }
    fn write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()?;
        self.0.sync()
    }
}

/// qcow2-rs 0.1.6 on its synchronous I/O backend (`Qcow2IoSync`: plain
/// `pread`/`pwrite` inside `async fn`s). Its futures complete on their first
/// poll, so they are polled directly on the calling thread: no runtime, no
/// per-request executor cost.
pub struct Q2rs(qcow2_rs::dev::Qcow2Dev<qcow2_rs::sync_io::Qcow2IoSync>);

fn poll_now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

fn q2_err(e: qcow2_rs::error::Qcow2Error) -> io::Error {
    io::Error::other(format!("{e:?}"))
}

impl Dev for Q2rs {
    fn read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let n = poll_now(self.0.read_at(buf, off)).map_err(q2_err)?;
        if n != buf.len() {
            return Err(io::Error::other(format!("qcow2-rs short read {n}")));
        }
        Ok(())
    }
    fn write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        poll_now(self.0.write_at(buf, off)).map_err(q2_err)
    }
    fn flush(&self) -> io::Result<()> {
        poll_now(self.0.flush_meta()).map_err(q2_err)?;
        // qcow2-rs's only data flush is fsync(2) on the whole file.
        poll_now(self.0.fsync_range(0, DISK as usize)).map_err(q2_err)
    }
}

/// Parameters of one cell.
pub struct CellArgs {
    pub engine: String,
    pub workload: Workload,
    pub threads: usize,
    /// The image (raw file for `raw`) to read or overwrite; for allocating
    /// writes, the empty template copied afresh for every pass.
    pub image: PathBuf,
    /// Where the copies for allocating writes go (the last one is kept for
    /// verification).
    pub scratch: PathBuf,
    pub secs: f64,
    pub warm: f64,
    /// Fraction of a full pass for allocating sequential writes (1.0 = whole disk).
    pub alloc_frac: f64,
    pub pattern: u8,
}

struct Outcome {
    ops: u64,
    secs: f64,
    /// (offset, len) of requests whose data must read back as the pattern.
    samples: Vec<(u64, usize)>,
}

fn kit_opts(w: &Workload) -> qcow2kit::OpenOptions {
    let o = qcow2kit::OpenOptions::new();
    if w.small_l2 {
        o.l2_cache_size(64 << 10)
    } else {
        o
    }
}

fn open_raw(path: &Path, write: bool) -> io::Result<Raw> {
    Ok(Raw(File::options().read(true).write(write).open(path)?))
}

fn open_kit(path: &Path, w: &Workload) -> io::Result<Kit> {
    let ro = w.kind == Kind::Read;
    qcow2kit::Image::open(path, &kit_opts(w).read_only(ro))
        .map(Kit)
        .map_err(kit_err)
}

fn open_null(path: &Path, w: &Workload) -> io::Result<Kit> {
    let st = Arc::new(NullStorage::from_image(path)?);
    qcow2kit::Image::open_storage(st, &kit_opts(w))
        .map(Kit)
        .map_err(kit_err)
}

fn open_imago(path: &Path, w: &Workload) -> io::Result<Imago> {
    use imago::{FormatDriverBuilder, PermissiveImplicitOpenGate};
    // imago has no L2 cache size option: it keeps up to 128 whole L2 tables.
    let q = imago::qcow2::Qcow2::<imago::file::File>::builder_path(path)
        .write(w.kind != Kind::Read)
        .open(PermissiveImplicitOpenGate::default())?;
    Ok(Imago(imago::FormatAccess::new(q)))
}

fn open_q2rs(path: &Path, w: &Workload) -> io::Result<Q2rs> {
    use qcow2_rs::dev::Qcow2DevParams;
    // (slice bits, bytes): 4 KiB slices, 64 KiB of L2 cache for the strided
    // run, the library's default (4 KiB slices covering the disk) otherwise.
    let l2 = if w.small_l2 {
        Some((12u8, 64usize << 10))
    } else {
        None
    };
    let params = Qcow2DevParams::new(9, None, l2, w.kind == Kind::Read, false);
    let dev = qcow2_rs::utils::qcow2_setup_dev_sync(path, &params).map_err(q2_err)?;
    poll_now(dev.qcow2_prep_io()).map_err(q2_err)?;
    Ok(Q2rs(dev))
}

/// Moves a used image into `trash/` next to it instead of deleting it. On a
/// file system mounted with online discard (like this machine's ext4), freeing
/// the 16384 scattered 4 KiB extents of one random-allocation pass takes ~45 s
/// of synchronous discards; the harness deletes the trash once, at the end,
/// in the background.
pub fn to_trash(path: &Path) -> io::Result<()> {
    use std::sync::atomic::{AtomicU32, Ordering};
    if on_tmpfs(path) {
        // tmpfs frees memory, not extents: unlink now (keeping it would fill RAM).
        return std::fs::remove_file(path);
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = path.parent().unwrap_or(Path::new(".")).join("trash");
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::fs::rename(path, dir.join(format!("{name}.{}.{n}", std::process::id())))
}

/// Whether `path` lives on a tmpfs (longest mount-point prefix in /proc/self/mounts).
pub fn on_tmpfs(path: &Path) -> bool {
    let path =
        std::fs::canonicalize(path.parent().unwrap_or(path)).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mp, ty) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mp).then(|| (mp.len(), ty == "tmpfs"))
        })
        .max_by_key(|(n, _)| *n)
        .is_some_and(|(_, t)| t)
}

/// Peak resident set size of this process (VmHWM), KiB.
fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Runs the cell and prints `RESULT ops=... secs=... hwm_kib=... image=... samples=off:len,...`.
pub fn run(a: &CellArgs) -> io::Result<()> {
    let w = a.workload;
    let write = w.kind != Kind::Read;
    let fresh = |dst: &Path| -> io::Result<()> {
        // Never truncate or unlink a used copy here: see `to_trash`.
        if dst.exists() {
            to_trash(dst)?;
        }
        if a.engine == "raw" {
            // A fresh sparse file of the disk's size.
            let f = File::create(dst)?;
            f.set_len(DISK)?;
            f.sync_all()
        } else {
            std::fs::copy(&a.image, dst)?;
            File::open(dst)?.sync_all()
        }
    };
    let alloc_copy = a.scratch.clone();
    let out = match a.engine.as_str() {
        "raw" => drive(a, |p| open_raw(p, write), &fresh, &alloc_copy)?,
        "qcow2kit" => drive(a, |p| open_kit(p, &w), &fresh, &alloc_copy)?,
        "null" => drive(a, |p| open_null(p, &w), &|_: &Path| Ok(()), &a.image)?,
        "imago" => drive(a, |p| open_imago(p, &w), &fresh, &alloc_copy)?,
        "qcow2-rs" => drive_single(a, |p| open_q2rs(p, &w), &fresh, &alloc_copy)?,
        e => return Err(io::Error::other(format!("unknown engine {e}"))),
    };
    let image = if w.kind == Kind::Alloc && a.engine != "null" {
        &alloc_copy
    } else {
        &a.image
    };
    let samples: Vec<String> = out
        .samples
        .iter()
        .map(|(o, l)| format!("{o}:{l}"))
        .collect();
    println!(
        "RESULT ops={} secs={:.6} hwm_kib={} image={} samples={}",
        out.ops,
        out.secs,
        vm_hwm_kib(),
        image.display(),
        samples.join(",")
    );
    Ok(())
}

/// qcow2-rs's device is not `Sync` (its I/O backend holds a `RefCell`), so it
/// only runs single-threaded cells.
fn drive_single<D: Dev>(
    a: &CellArgs,
    open: impl Fn(&Path) -> io::Result<D>,
    fresh: &dyn Fn(&Path) -> io::Result<()>,
    alloc_copy: &Path,
) -> io::Result<Outcome> {
    if a.threads != 1 {
        return Err(io::Error::other(
            "engine cannot share one image between threads",
        ));
    }
    drive_impl(a, &open, fresh, alloc_copy, |dev, a, offs, stop| {
        one_stream(dev, a, &offs[0], stop)
    })
}

fn drive<D: Dev + Sync>(
    a: &CellArgs,
    open: impl Fn(&Path) -> io::Result<D>,
    fresh: &dyn Fn(&Path) -> io::Result<()>,
    alloc_copy: &Path,
) -> io::Result<Outcome> {
    drive_impl(a, &open, fresh, alloc_copy, |dev, a, offs, stop| {
        if offs.len() == 1 {
            return one_stream(dev, a, &offs[0], stop);
        }
        let barrier = Barrier::new(offs.len());
        let results: Vec<io::Result<u64>> = std::thread::scope(|s| {
            let hs: Vec<_> = offs
                .iter()
                .map(|o| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        one_stream(dev, a, o, stop)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("bench thread panicked"))
                .collect()
        });
        let mut total = 0;
        for r in results {
            total += r?;
        }
        Ok(total)
    })
}

/// When a stream stops.
#[derive(Clone, Copy)]
enum Stop {
    At(Instant),
    Count(usize),
}

/// Runs one request stream until `stop`; returns the number of requests.
fn one_stream<D: Dev>(dev: &D, a: &CellArgs, offs: &Offsets, stop: Stop) -> io::Result<u64> {
    let w = a.workload;
    let mut buf = vec![a.pattern; w.bs];
    let write = w.kind != Kind::Read;
    let mut k = 0usize;
    loop {
        match stop {
            Stop::Count(n) if k >= n => break,
            Stop::At(t) if k.is_multiple_of(64) && Instant::now() >= t => break,
            _ => {}
        }
        let off = offs.get(k);
        if write {
            dev.write(&buf, off)?;
        } else {
            dev.read(&mut buf, off)?;
        }
        k += 1;
    }
    if !write && k > 0 {
        // The full image holds 0x5a everywhere (zeroes through null storage).
        let want = if a.engine == "null" { 0 } else { 0x5a };
        if buf.iter().any(|&b| b != want) {
            return Err(io::Error::other(format!(
                "read back wrong data (want {want:#x})"
            )));
        }
    }
    Ok(k as u64)
}

fn drive_impl<D: Dev>(
    a: &CellArgs,
    open: &dyn Fn(&Path) -> io::Result<D>,
    fresh: &dyn Fn(&Path) -> io::Result<()>,
    alloc_copy: &Path,
    streams: impl Fn(&D, &CellArgs, &[Offsets], Stop) -> io::Result<u64>,
) -> io::Result<Outcome> {
    let w = a.workload;
    let offs: Vec<Offsets> = (0..a.threads)
        .map(|t| Offsets::new(&w, t, a.threads))
        .collect();
    let mut samples = Vec::new();
    if w.kind != Kind::Alloc {
        let dev = open(&a.image)?;
        // Warm-up, then a fixed-time run; writes end with a flush inside the timing.
        streams(
            &dev,
            a,
            &offs,
            Stop::At(Instant::now() + Duration::from_secs_f64(a.warm)),
        )?;
        if w.kind == Kind::Overwrite {
            dev.flush()?;
        }
        let start = Instant::now();
        let ops = streams(
            &dev,
            a,
            &offs,
            Stop::At(start + Duration::from_secs_f64(a.secs)),
        )?;
        if w.kind == Kind::Overwrite {
            dev.flush()?;
            // Every stream's first requests were overwritten with the pattern.
            for o in &offs {
                samples.extend((0..4).map(|k| (o.get(k), w.bs)));
            }
        }
        return Ok(Outcome {
            ops,
            secs: start.elapsed().as_secs_f64(),
            samples,
        });
    }
    // Allocating writes: a fixed number of requests per pass, each pass on a
    // fresh copy of the empty image; passes repeat until `secs` of timing.
    let per_stream = offs.iter().map(|o| o.pass_len(w.bs)).min().unwrap_or(0);
    let n = ((per_stream as f64 * a.alloc_frac) as usize).max(1);
    let (mut ops, mut secs) = (0u64, 0f64);
    let mut passes = 0;
    while passes == 0 || (secs < a.secs && passes < 16) {
        fresh(alloc_copy)?;
        let target = if a.engine == "null" {
            &a.image
        } else {
            alloc_copy
        };
        let dev = open(target)?;
        let start = Instant::now();
        ops += streams(&dev, a, &offs, Stop::Count(n))?;
        dev.flush()?;
        secs += start.elapsed().as_secs_f64();
        drop(dev);
        passes += 1;
    }
    for o in &offs {
        samples.extend([0, 1, n / 2, n - 1].iter().map(|&k| (o.get(k), w.bs)));
    }
    samples.sort_unstable();
    samples.dedup();
    Ok(Outcome { ops, secs, samples })
}
