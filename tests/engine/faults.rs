//! Fault matrix: for every N over a scripted sequence of operations, fail the
//! Nth read, write, flush or set_len with EIO or ENOSPC (once, or from then
//! on). Nothing panics; the failing call returns a typed error and raises an
//! `IoError` event; data acknowledged by a successful `flush()` reads back
//! after reopening; `qemu-img check` finds no corruption (leaks allowed).
//!
//! The matrix is generated from a counting run of the script, so new
//! operations in the script are covered automatically.

use crate::support::kth_occurrence_config;
use crate::support::testing::{Fault, FaultKind, FaultOp, FaultyStorage};
use qcow2kit::options::CreateOptions;
use qcow2kit::storage::{BackendSpec, BlkdebugEvent, BlkdebugStorage, MemStorage, Storage};
use qcow2kit::{Error, Event, Image, OpenOptions};
use std::process::Command;
use std::sync::{Arc, Mutex};

const CLUSTER: u64 = 512;
const SIZE: u64 = 4 << 20;

fn create_opts() -> CreateOptions {
    CreateOptions::from_qemu_str("cluster_size=512,refcount_bits=64").expect("options")
}

/// What the guest may see after reopening: bytes acknowledged by the last
/// successful flush, and which bytes were touched after it (successful or
/// failed requests: those may read as old or new).
struct Model {
    acked: Vec<u8>,
    latest: Vec<u8>,
    dirty: Vec<bool>,
}

impl Model {
    fn new() -> Self {
        let n = (SIZE * 4) as usize;
        Model {
            acked: vec![0; n],
            latest: vec![0; n],
            dirty: vec![false; n],
        }
    }
    fn touch(&mut self, off: u64, data: &[u8]) {
        let (a, b) = (off as usize, off as usize + data.len());
        self.latest[a..b].copy_from_slice(data);
        self.dirty[a..b].fill(true);
    }
    fn flushed(&mut self) {
        self.acked.copy_from_slice(&self.latest);
        self.dirty.fill(false);
    }
}

fn write(img: &Image, m: &mut Model, off: u64, len: usize, byte: u8) -> Result<(), Error> {
    let data = vec![byte; len];
    m.touch(off, &data);
    img.write_at(&data, off)
}

/// The script: every kind of metadata change, with flushes in between.
fn script(img: &Image, m: &mut Model) -> Result<(), Error> {
    // Allocating writes spanning several L2 tables (one L2 table maps 32 KiB).
    write(img, m, 0, 96 << 10, 1)?;
    img.flush()?;
    m.flushed();
    // Enough data to need new refcount blocks and grow the refcount table.
    write(img, m, 1 << 20, 1 << 20, 2)?;
    // Unaligned overwrite and COW of a partially written cluster.
    write(img, m, 100, 3000, 3)?;
    write(img, m, (3 << 20) + 17, 5, 4)?;
    img.flush()?;
    m.flushed();
    m.touch(0, &[0; 32 << 10]);
    img.discard(0, 32 << 10)?;
    m.touch(64 << 10, &[0; 16 << 10]);
    img.write_zeroes(64 << 10, 16 << 10, true)?;
    img.flush()?;
    m.flushed();
    // Growth that moves the L1 table.
    img.resize(SIZE * 4)?;
    write(img, m, SIZE * 3, 8 << 10, 5)?;
    img.flush()?;
    m.flushed();
    Ok(())
}

fn base_image() -> Vec<u8> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(s.clone(), &create_opts(), SIZE).expect("create");
    let mut b = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut b, 0).unwrap();
    b
}

fn qemu_check(bytes: &[u8]) -> Option<serde_json::Value> {
    let dir = tempfile::tempdir().ok()?;
    let p = dir.path().join("f.qcow2");
    std::fs::write(&p, bytes).ok()?;
    let out = Command::new("qemu-img")
        .args(["check", "--output", "json"])
        .arg(&p)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn run_case(base: &[u8], fault: Fault, check_with_qemu: bool) {
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.to_vec())));
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut model = Model::new();
    let label = format!("{fault:?}");
    {
        let img = match Image::open_storage(fs.clone(), &OpenOptions::new()) {
            Ok(i) => i,
            Err(e) => panic!("{label}: open failed without fault: {e}"),
        };
        let ev = events.clone();
        img.on_event(move |e| ev.lock().unwrap().push(e.clone()));
        fs.set_fault(Some(fault));
        if let Err(e) = script(&img, &mut model) {
            // A typed error that carries the storage error (or the sticky one).
            assert!(
                matches!(e, Error::Io { .. } | Error::PreviousIoFailed),
                "{label}: unexpected error {e:?}"
            );
            if let Error::Io { .. } = e {
                assert_eq!(e.is_nospace(), fault.kind == FaultKind::Enospc, "{label}");
                let ev = events.lock().unwrap();
                assert!(
                    ev.iter().any(|x| matches!(x, Event::IoError { nospace, .. } if *nospace == (fault.kind == FaultKind::Enospc))),
                    "{label}: IoError event raised"
                );
            }
        }
        fs.set_fault(None);
    }
    // Reopen (the "restart"): acknowledged data reads back.
    let mem = Arc::new(MemStorage::from_bytes(fs.inner().to_vec()));
    let img = Image::open_storage(mem.clone(), &OpenOptions::new().read_only(true))
        .unwrap_or_else(|e| panic!("{label}: reopen failed: {e}"));
    let mut buf = vec![0u8; model.acked.len()];
    let size = img.size() as usize;
    img.read_at(&mut buf[..size], 0)
        .unwrap_or_else(|e| panic!("{label}: read back: {e}"));
    let bad = (0..size).find(|&i| !model.dirty[i] && buf[i] != model.acked[i]);
    if let Some(i) = bad {
        panic!(
            "{label}: acknowledged byte {i} changed: {} != {}",
            buf[i], model.acked[i]
        );
    }
    drop(img);
    if check_with_qemu {
        if let Some(v) = qemu_check(&mem.to_vec()) {
            assert_eq!(
                v.get("corruptions").and_then(|c| c.as_u64()).unwrap_or(0),
                0,
                "{label}: {v}"
            );
            assert_eq!(v["check-errors"].as_u64(), Some(0), "{label}: {v}");
        }
    }
}

#[test]
fn fault_matrix() {
    let base = base_image();
    // Counting run.
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
    let img = Image::open_storage(fs.clone(), &OpenOptions::new()).unwrap();
    fs.set_fault(None);
    script(&img, &mut Model::new()).expect("the script runs without faults");
    let counts = fs.counts();
    drop(img);
    let qemu = Command::new("qemu-img").arg("--version").output().is_ok();
    if !qemu {
        eprintln!("qemu-img missing: checking data only");
    }
    let all = std::env::var("QCOW2KIT_ALL_FAULTS").is_ok();
    let mut cases = 0;
    for (i, op) in [
        FaultOp::Read,
        FaultOp::Write,
        FaultOp::Flush,
        FaultOp::SetLen,
    ]
    .into_iter()
    .enumerate()
    {
        let n = counts[i];
        // Every call when there are few; otherwise an even sample (all with
        // QCOW2KIT_ALL_FAULTS=1), always including the first and last.
        let sample: Vec<u64> = if all || n <= 24 {
            (0..n).collect()
        } else {
            let mut v: Vec<u64> = (0..24).map(|k| k * (n - 1) / 23).collect();
            v.dedup();
            v
        };
        for nth in sample {
            for kind in [FaultKind::Eio, FaultKind::Enospc] {
                for persistent in [false, true] {
                    // qemu-img check on a deterministic sample keeps the run short.
                    let check = qemu && (all || (nth + persistent as u64).is_multiple_of(3));
                    run_case(
                        &base,
                        Fault {
                            op,
                            nth,
                            kind,
                            persistent,
                        },
                        check,
                    );
                    cases += 1;
                }
            }
        }
    }
    assert!(
        cases > 50,
        "the matrix covers the script ({cases} cases, counts {counts:?})"
    );
    let _ = CLUSTER;
}

/// Creating an image fails cleanly (a typed error, no panic) at every
/// injected fault.
#[test]
fn create_under_faults() {
    let counting = Arc::new(FaultyStorage::new(MemStorage::new()));
    qcow2kit::create::create_on(counting.clone(), &create_opts(), SIZE).unwrap();
    let counts = counting.counts();
    let mut failures = 0;
    for (i, op) in [
        FaultOp::Read,
        FaultOp::Write,
        FaultOp::Flush,
        FaultOp::SetLen,
    ]
    .into_iter()
    .enumerate()
    {
        for nth in 0..counts[i] {
            for kind in [FaultKind::Eio, FaultKind::Enospc] {
                let fs = Arc::new(FaultyStorage::new(MemStorage::new()));
                fs.set_fault(Some(Fault {
                    op,
                    nth,
                    kind,
                    persistent: true,
                }));
                let err = qcow2kit::create::create_on(fs.clone(), &create_opts(), SIZE)
                    .expect_err("an injected fault fails the create");
                assert!(
                    matches!(err, Error::Io { .. } | Error::PreviousIoFailed),
                    "{err:?}"
                );
                assert_eq!(
                    err.is_nospace(),
                    kind == FaultKind::Enospc && matches!(err, Error::Io { .. })
                );
                failures += 1;
            }
        }
    }
    assert!(failures >= 4, "{counts:?}");
}

/// The promise documented in the README: a failed data write leaves the
/// handle usable; a failed metadata write (or sync) poisons it until reopen,
/// and data flushed before stays intact.
#[test]
fn metadata_fault_poisons_the_handle_data_fault_does_not() {
    let base = base_image();
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base)));
    let img = Image::open_storage(fs.clone(), &OpenOptions::new()).unwrap();
    img.write_at(&[1; 4096], 0).unwrap();
    img.flush().unwrap();
    // A data write fault on an in-place overwrite: the handle keeps working.
    fs.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: false,
    }));
    assert!(matches!(img.write_at(&[2; 512], 0), Err(Error::Io { .. })));
    img.write_at(&[3; 512], 0)
        .expect("usable after a data fault");
    // A fault on the flush's metadata writes: poisoned.
    img.write_at(&[4; 4096], 1 << 20).unwrap(); // allocates: dirty metadata
    fs.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: false,
    }));
    assert!(matches!(img.flush(), Err(Error::Io { .. })));
    fs.set_fault(None);
    let mut b = [0u8; 512];
    assert!(matches!(
        img.read_at(&mut b, 0),
        Err(Error::PreviousIoFailed)
    ));
    assert!(matches!(img.flush(), Err(Error::PreviousIoFailed)));
    drop(img);
    // Reopen: what was flushed is there.
    let img = Image::open_storage(
        Arc::new(MemStorage::from_bytes(fs.inner().to_vec())),
        &OpenOptions::new(),
    )
    .unwrap();
    img.read_at(&mut b, 512).unwrap();
    assert_eq!(b, [1; 512]);
}

/// A full disk: writes that need new clusters fail with ENOSPC (`nospace`
/// in the event), overwrites of allocated clusters still succeed, and the
/// image stays consistent.
#[test]
fn full_disk() {
    let base = base_image();
    let limit = base.len() as u64 + 64 * 1024;
    let mem = Arc::new(MemStorage::with_limit(base, limit));
    let img = Image::open_storage(mem.clone(), &OpenOptions::new()).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    img.on_event(move |e| ev.lock().unwrap().push(e.clone()));
    img.write_at(&[7; 8192], 0).unwrap();
    img.flush().unwrap();
    // Fill the disk.
    let mut off = 1 << 20;
    let err = loop {
        match img.write_at(&[8; 4096], off) {
            Ok(()) => off += 4096,
            Err(e) => break e,
        }
        assert!(off < SIZE, "the limit must be reached");
    };
    assert!(err.is_nospace(), "{err:?}");
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, Event::IoError { nospace: true, .. })));
    // Overwrites of allocated clusters still work on the same handle (the
    // failing write was a data write: nothing is poisoned).
    img.write_at(&[9; 4096], 0)
        .expect("overwrite of an allocated cluster on a full disk");
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [9; 4096]);
    let _ = img.flush();
    drop(img);
    if let Some(v) = qemu_check(&mem.to_vec()) {
        assert_eq!(
            v.get("corruptions").and_then(|c| c.as_u64()).unwrap_or(0),
            0,
            "{v}"
        );
    }
}

/// `shutdown` through a shared handle returns the flush error that `close`
/// would (here: the sync fails), and the handle is closed either way.
#[test]
fn shutdown_reports_the_flush_error_through_arc() {
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base_image())));
    let img = Arc::new(Image::open_storage(fs.clone(), &OpenOptions::new()).unwrap());
    let writer = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(&[5; 4096], 0))
    };
    writer.join().unwrap().unwrap();
    fs.set_fault(Some(Fault {
        op: FaultOp::Flush,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: true,
    }));
    let e = img.shutdown().unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(
        img.shutdown().is_ok(),
        "a second shutdown has nothing to do"
    );
    let mut b = [0u8; 512];
    assert!(matches!(img.read_at(&mut b, 0), Err(Error::Closed)));
    assert!(matches!(img.write_at(&b, 0), Err(Error::Closed)));
    let writes = fs.counts();
    drop(img);
    assert_eq!(
        fs.counts(),
        writes,
        "dropping a shut-down image writes nothing"
    );
}

/// A directory for the blkdebug cases' files, in memory when there is one (the
/// script syncs five times per case).
fn fast_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir")
}

/// `F.qcow2` of `dir` behind a blkdebug node reading `rules.conf`, as
/// `file.driver=blkdebug,file.config=rules.conf,file.image.filename=F.qcow2`.
fn blkdebug_node(dir: &std::path::Path) -> Arc<BlkdebugStorage> {
    let spec = BackendSpec {
        driver: "blkdebug".into(),
        options: vec![
            (
                "config".into(),
                dir.join("rules.conf").display().to_string(),
            ),
            ("image.driver".into(), "file".into()),
            (
                "image.filename".into(),
                dir.join("F.qcow2").display().to_string(),
            ),
        ],
    };
    Arc::new(BlkdebugStorage::open(&spec, false).expect("blkdebug node"))
}

/// One case of the blkdebug matrix; whether the injected error reached the script.
fn run_blkdebug_case(base: &[u8], event: &str, k: u64, errno: i32, check: bool) -> bool {
    let label = format!("{event} #{k} errno {errno}");
    let dir = fast_dir();
    let path = dir.path().join("F.qcow2");
    std::fs::write(&path, base).unwrap();
    std::fs::write(
        dir.path().join("rules.conf"),
        kth_occurrence_config(event, k, errno),
    )
    .unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let opts = OpenOptions::new().on_event(move |e| ev.lock().unwrap().push(e.clone()));
    let mut model = Model::new();
    let failed = {
        let img = Image::open_storage(blkdebug_node(dir.path()), &opts)
            .unwrap_or_else(|e| panic!("{label}: open failed before the rule: {e}"));
        let r = script(&img, &mut model);
        if let Err(e) = &r {
            assert!(
                matches!(e, Error::Io { .. } | Error::PreviousIoFailed),
                "{label}: unexpected error {e:?}"
            );
            if let Error::Io { .. } = e {
                assert_eq!(e.is_nospace(), errno == libc::ENOSPC, "{label}: {e:?}");
                assert!(
                    events.lock().unwrap().iter().any(|x| matches!(
                        x,
                        Event::IoError { nospace, .. } if *nospace == (errno == libc::ENOSPC)
                    )),
                    "{label}: IoError event raised"
                );
            }
        }
        r.is_err()
    };
    // Reopen without blkdebug: acknowledged data reads back.
    let img = Image::open(&path, &OpenOptions::new().read_only(true))
        .unwrap_or_else(|e| panic!("{label}: reopen failed: {e}"));
    let size = img.size() as usize;
    let mut buf = vec![0u8; size];
    img.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("{label}: read back: {e}"));
    if let Some(i) = (0..size).find(|&i| !model.dirty[i] && buf[i] != model.acked[i]) {
        panic!(
            "{label}: acknowledged byte {i} changed: {} != {}",
            buf[i], model.acked[i]
        );
    }
    drop(img);
    if check {
        if let Some(v) = qemu_check(&std::fs::read(&path).unwrap()) {
            assert_eq!(
                v.get("corruptions").and_then(|c| c.as_u64()).unwrap_or(0),
                0,
                "{label}: {v}"
            );
            assert_eq!(v["check-errors"].as_u64(), Some(0), "{label}: {v}");
        }
    }
    failed
}

/// The fault matrix with its faults written as QEMU blkdebug config files: for
/// each event the engine and the blkdebug node report during the script
/// ([`BlkdebugEvent`]'s list), and a sample of its occurrences (all of them with
/// `QCOW2KIT_ALL_FAULTS=1`: the first, the middle and the last otherwise), a
/// config whose rule fails the request after that occurrence once with EIO, then
/// with ENOSPC. The image is opened through the `blkdebug` driver with the config
/// file. Same assertions as [`fault_matrix`].
#[test]
fn blkdebug_fault_matrix() {
    let base = base_image();
    let all = std::env::var("QCOW2KIT_ALL_FAULTS").is_ok();
    let qemu = Command::new("qemu-img").arg("--version").output().is_ok();
    // Counting run: no rules; occurrences while opening and after the script.
    let dir = fast_dir();
    std::fs::write(dir.path().join("F.qcow2"), &base).unwrap();
    std::fs::write(dir.path().join("rules.conf"), "# no rules\n").unwrap();
    let node = blkdebug_node(dir.path());
    let img = Image::open_storage(node.clone(), &OpenOptions::new()).unwrap();
    let at_open = node.event_counts();
    script(&img, &mut Model::new()).expect("the script runs without faults");
    let at_end = node.event_counts();
    drop(img);
    let opened = |e: BlkdebugEvent| at_open.iter().find(|(x, _)| *x == e).map_or(0, |&(_, n)| n);
    let (mut cases, mut failed) = (0u64, 0u64);
    for &(event, total) in &at_end {
        let first = opened(event) + 1;
        if total < first {
            continue;
        }
        let mut ks: Vec<u64> = if all {
            (first..=total).collect()
        } else {
            vec![first, first + (total - first) / 2, total]
        };
        ks.dedup();
        for k in ks {
            for errno in [libc::EIO, libc::ENOSPC] {
                let check = qemu && (all || cases.is_multiple_of(3));
                failed += u64::from(run_blkdebug_case(&base, event.name(), k, errno, check));
                cases += 1;
            }
        }
    }
    let fired: Vec<&str> = at_end.iter().map(|(e, _)| e.name()).collect();
    eprintln!("blkdebug matrix: {cases} cases, {failed} met the error; events {at_end:?}");
    // The engine's events are there, not only the storage-level ones.
    for e in [
        "l2_update",
        "l1_update",
        "refblock_alloc",
        "cluster_alloc",
        "flush_to_os",
    ] {
        assert!(fired.contains(&e), "{e} never fired: {fired:?}");
    }
    // Most rules meet a request of the script (the last occurrence of an event
    // may come after the last request).
    assert!(
        failed * 2 > cases,
        "{failed} of {cases} cases failed a request ({at_end:?})"
    );
}
