//! Block jobs on in-memory chains (a resolver hands out the files): the
//! commit job's ready → complete handshake, intermediate commits, pause,
//! resume, cancel, `set_speed` and the rate limit's accounting, `on-error`
//! policies with injected faults, and the events with QEMU's names.

use crate::support::testing::{replay, Fault, FaultKind, FaultOp, FaultyStorage};
use qcow2kit::error::IoOp;
use qcow2kit::image::{FileResolver, FileRole};
use qcow2kit::job::{commit, CommitOptions, JobError, JobOptions, JobOutcome, JobStatus, JobType};
use qcow2kit::options::{CreateOptions, ErrorAction, ErrorPolicy};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{Error, Event, Image, OpenOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const SIZE: u64 = 4 * MIB;

#[derive(Debug)]
pub(crate) struct Files(pub(crate) HashMap<String, Arc<dyn Storage>>);

impl FileResolver for Files {
    fn open(&self, _role: FileRole, name: &str, _w: bool) -> qcow2kit::Result<Arc<dyn Storage>> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("no file {name}")))
    }
}

pub(crate) struct Chain {
    pub(crate) files: Arc<Files>,
    pub(crate) faulty: HashMap<&'static str, Arc<FaultyStorage<MemStorage>>>,
    pub(crate) faulty_base: Arc<FaultyStorage<MemStorage>>,
}

/// base (0x11 in [0, 1M)) <- mid (0x22 in [1M, 2M)) <- top (0x33 in [2M, 3M)).
pub(crate) fn chain() -> Chain {
    let faulty: HashMap<&'static str, Arc<FaultyStorage<MemStorage>>> = ["base", "mid", "top"]
        .into_iter()
        .map(|n| (n, Arc::new(FaultyStorage::new(MemStorage::new()))))
        .collect();
    let st = |n: &str| -> Arc<dyn Storage> { faulty[n].clone() };
    qcow2kit::create::create_on(st("base"), &CreateOptions::new(), SIZE).unwrap();
    let o = |b: &str| CreateOptions::new().backing_file(b).backing_fmt("qcow2");
    qcow2kit::create::create_on(st("mid"), &o("base"), SIZE).unwrap();
    qcow2kit::create::create_on(st("top"), &o("mid"), SIZE).unwrap();
    let files = Arc::new(Files(
        ["base", "mid", "top"]
            .into_iter()
            .map(|n| (n.to_string(), st(n)))
            .collect(),
    ));
    for (name, byte, at) in [
        ("base", 0x11u8, 0),
        ("mid", 0x22, MIB),
        ("top", 0x33, 2 * MIB),
    ] {
        let opts = OpenOptions::new().file_resolver(files.clone());
        let img = Image::open_storage(files.0[name].clone(), &opts).unwrap();
        img.write_at(&vec![byte; MIB as usize], at).unwrap();
        img.close().unwrap();
    }
    let faulty_base = faulty["base"].clone();
    Chain {
        files,
        faulty,
        faulty_base,
    }
}

impl Chain {
    pub(crate) fn opts(&self) -> OpenOptions {
        OpenOptions::new().file_resolver(self.files.clone())
    }
    pub(crate) fn device(&self) -> Arc<Image> {
        let top = self.files.0["top"].clone();
        Arc::new(Image::open_storage(top, &self.opts().with_filename("top".into())).unwrap())
    }
    /// `name` read on its own, through its own chain.
    pub(crate) fn read(&self, name: &str) -> Vec<u8> {
        let img = Image::open_storage(self.files.0[name].clone(), &self.opts()).unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        img.read_at(&mut buf, 0).unwrap();
        buf
    }
}

pub(crate) fn expected(layers: &[(u8, u64)]) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    for &(b, at) in layers {
        v[at as usize..(at + MIB) as usize].fill(b);
    }
    v
}

pub(crate) fn sink() -> (Option<qcow2kit::events::EventSink>, Arc<Mutex<Vec<Event>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let f: qcow2kit::events::EventSink =
        Arc::new(move |e: &Event| s.lock().unwrap().push(e.clone()));
    (Some(f), seen)
}

pub(crate) fn job_opts(events: Option<qcow2kit::events::EventSink>, speed: u64) -> JobOptions {
    JobOptions {
        id: "drive0".into(),
        speed,
        on_error: ErrorPolicy::Report,
        events,
    }
}

#[test]
fn active_commit_waits_ready_until_completed() {
    let c = chain();
    let device = c.device();
    let (events, seen) = sink();
    let job = commit(
        device.clone(),
        CommitOptions {
            job: job_opts(events, 0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    let info = job.info();
    assert_eq!(
        (info.status, info.offset, info.len),
        (JobStatus::Ready, SIZE, SIZE)
    );
    // Written while ready: carried over when the job completes.
    device.write_at(&[0x44; 4096], 3 * MIB).unwrap();
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [Event::BlockJobReady {
            job_type: JobType::Commit,
            device: "drive0".into(),
            len: SIZE,
            offset: SIZE,
            speed: 0,
        }]
    );
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    let mut want = expected(&[(0x11, 0), (0x22, MIB), (0x33, 2 * MIB)]);
    want[3 * MIB as usize..3 * MIB as usize + 4096].fill(0x44);
    assert_eq!(c.read("base"), want);
    let evs = seen.lock().unwrap();
    assert_eq!(evs.len(), 2);
    assert!(matches!(
        &evs[1],
        Event::BlockJobCompleted { job_type: JobType::Commit, error: None, len, offset, .. }
            if len == offset && *len == 2 * SIZE
    ));
    let json = serde_json::to_value(&evs[0]).unwrap();
    assert_eq!(json["event"], "BLOCK_JOB_READY");
    assert_eq!(json["data"]["type"], "commit");
    assert_eq!(json["data"]["device"], "drive0");
}

#[test]
fn complete_before_ready_is_refused() {
    let c = chain();
    let job = commit(
        c.device(),
        CommitOptions {
            job: job_opts(None, 64 << 10),
            ..Default::default()
        },
    )
    .unwrap();
    job.pause();
    let e = job.complete().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Job(JobError::BadState {
                verb: "complete",
                ..
            })
        ),
        "{e}"
    );
    job.cancel();
    assert_eq!(job.wait().unwrap(), JobOutcome::Cancelled);
}

#[test]
fn intermediate_commit_finishes_and_rewrites_the_overlay() {
    let c = chain();
    let device = c.device();
    let (events, seen) = sink();
    let job = commit(
        device.clone(),
        CommitOptions {
            job: job_opts(events, 0),
            top: Some(PathBuf::from("mid")),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [Event::BlockJobCompleted { error: None, .. }]
    ));
    assert_eq!(c.read("base"), expected(&[(0x11, 0), (0x22, MIB)]));
    let top = Image::open_storage(c.files.0["top"].clone(), &c.opts()).unwrap();
    assert_eq!(top.header().backing_file_name(), Some("base"));
    assert_eq!(top.header().backing_format(), Some("qcow2"));
    let mut buf = vec![0u8; SIZE as usize];
    top.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, expected(&[(0x11, 0), (0x22, MIB), (0x33, 2 * MIB)]));
}

#[test]
fn argument_errors_have_qemu_texts() {
    let c = chain();
    let d = c.device();
    let run = |o: CommitOptions| commit(d.clone(), o).unwrap_err().to_string();
    assert_eq!(
        run(CommitOptions {
            backing_file: Some("x".into()),
            ..Default::default()
        }),
        "'backing-file' specified, but 'top' is the active layer"
    );
    assert_eq!(
        run(CommitOptions {
            base: Some("nosuch".into()),
            ..Default::default()
        }),
        "Base 'nosuch' not found"
    );
    assert_eq!(
        run(CommitOptions {
            top: Some("nosuch".into()),
            ..Default::default()
        }),
        "Top image file nosuch not found"
    );
    assert_eq!(
        run(CommitOptions {
            top: Some("base".into()),
            ..Default::default()
        }),
        "Image does not have a backing file"
    );
}

#[test]
fn pause_resume_cancel_and_set_speed() {
    let c = chain();
    let device = c.device();
    let (events, seen) = sink();
    // 64 KiB/s: far slower than the test, until set_speed lifts it.
    let job = commit(
        device.clone(),
        CommitOptions {
            job: job_opts(events, 64 << 10),
            top: Some(PathBuf::from("mid")),
            ..Default::default()
        },
    )
    .unwrap();
    job.pause();
    while job.info().status != JobStatus::Paused {
        std::thread::sleep(Duration::from_millis(5));
    }
    let at = job.info().offset;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(job.info().offset, at, "a paused job makes no progress");
    assert!(at < SIZE);
    job.resume();
    job.set_speed(0);
    assert_eq!(job.info().speed, 0);
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [Event::BlockJobCompleted {
            speed: 0,
            offset: SIZE,
            len: SIZE,
            ..
        }]
    ));

    // Cancelled midway: the device reads as before.
    let c = chain();
    let device = c.device();
    let (events, seen) = sink();
    let job = commit(
        device.clone(),
        CommitOptions {
            job: job_opts(events, 64 << 10),
            ..Default::default()
        },
    )
    .unwrap();
    job.cancel();
    assert_eq!(job.wait().unwrap(), JobOutcome::Cancelled);
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [Event::BlockJobCancelled {
            job_type: JobType::Commit,
            speed: 65536,
            ..
        }]
    ));
    let mut buf = vec![0u8; SIZE as usize];
    device.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, expected(&[(0x11, 0), (0x22, MIB), (0x33, 2 * MIB)]));
}

#[test]
fn rate_limit_accounts_the_bytes_copied() {
    let c = chain();
    // 1 MiB to copy (mid's) at 4 MiB/s: 0.4 MiB per 100 ms slice, so the
    // second 512 KiB request waits for the first slice to end (QEMU's
    // accounting lets the last request of a slice through at once).
    let start = std::time::Instant::now();
    let job = commit(
        c.device(),
        CommitOptions {
            job: job_opts(None, 4 * MIB),
            top: Some(PathBuf::from("mid")),
            ..Default::default()
        },
    )
    .unwrap();
    let info = {
        while job.info().status != JobStatus::Concluded {
            std::thread::sleep(Duration::from_millis(5));
        }
        job.info()
    };
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    // Only copied bytes count: mid and top hold 1 MiB each, but the commit
    // of mid copies mid's only.
    assert_eq!(info.throttled_bytes, MIB);
    assert!(info.throttle_waits >= 1, "{info:?}");
    assert!(info.throttle_delay >= Duration::from_millis(50), "{info:?}");
    assert!(start.elapsed() >= Duration::from_millis(50));
}

#[test]
fn on_error_stop_pauses_and_resume_retries() {
    let c = chain();
    let device = c.device();
    let (tx, rx) = mpsc::channel::<Event>();
    let tx = Mutex::new(tx);
    let events: qcow2kit::events::EventSink = Arc::new(move |e: &Event| {
        let _ = tx.lock().unwrap().send(e.clone());
    });
    c.faulty_base.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: true,
    }));
    let job = commit(
        device,
        CommitOptions {
            job: JobOptions {
                on_error: ErrorPolicy::Stop,
                ..job_opts(Some(events), 0)
            },
            top: Some(PathBuf::from("mid")),
            ..Default::default()
        },
    )
    .unwrap();
    let ev = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(
        ev,
        Event::BlockJobError {
            device: "drive0".into(),
            operation: IoOp::Write,
            action: ErrorAction::Stop,
        }
    );
    while job.info().status != JobStatus::Paused {
        std::thread::sleep(Duration::from_millis(5));
    }
    c.faulty_base.set_fault(None);
    job.resume();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert_eq!(c.read("base"), expected(&[(0x11, 0), (0x22, MIB)]));
}

#[test]
fn on_error_report_ends_the_job_with_the_error() {
    let c = chain();
    let (events, seen) = sink();
    c.faulty_base.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Enospc,
        persistent: true,
    }));
    let job = commit(
        c.device(),
        CommitOptions {
            job: job_opts(events, 0),
            top: Some(PathBuf::from("mid")),
            ..Default::default()
        },
    )
    .unwrap();
    let e = job.wait().unwrap_err();
    assert!(e.is_nospace(), "{e:?}");
    let evs = seen.lock().unwrap();
    assert!(matches!(
        &evs[0],
        Event::BlockJobError {
            operation: IoOp::Write,
            action: ErrorAction::Report,
            ..
        }
    ));
    assert!(
        matches!(
            &evs[1],
            Event::BlockJobCompleted { error: Some(msg), .. } if msg == "No space left on device"
        ),
        "{evs:?}"
    );
}

#[test]
fn on_error_ignore_retries_and_enospc_stops_only_on_enospc() {
    // ignore: the failed write is retried (a one-off fault), the job completes.
    let c = chain();
    let (events, seen) = sink();
    c.faulty_base.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: false,
    }));
    let job = commit(
        c.device(),
        CommitOptions {
            job: JobOptions {
                on_error: ErrorPolicy::Ignore,
                ..job_opts(events, 0)
            },
            top: Some(PathBuf::from("mid")),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [
            Event::BlockJobError {
                action: ErrorAction::Ignore,
                ..
            },
            Event::BlockJobCompleted { error: None, .. }
        ]
    ));
    assert_eq!(c.read("base"), expected(&[(0x11, 0), (0x22, MIB)]));

    // enospc: EIO is reported, ending the job.
    let c = chain();
    let (events, seen) = sink();
    c.faulty_base.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: true,
    }));
    let job = commit(
        c.device(),
        CommitOptions {
            job: JobOptions {
                on_error: ErrorPolicy::Enospc,
                ..job_opts(events, 0)
            },
            top: Some(PathBuf::from("mid")),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(job.wait().is_err());
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [
            Event::BlockJobError {
                action: ErrorAction::Report,
                ..
            },
            Event::BlockJobCompleted { error: Some(_), .. }
        ]
    ));
}

/// The view through `top` of a chain whose files hold these bytes.
pub(crate) fn view(base: Vec<u8>, mid: Vec<u8>, top: Vec<u8>) -> Vec<u8> {
    view_with(
        &[("base", base), ("mid", mid), ("top", top)],
        &OpenOptions::new(),
    )
}

/// The view through the file `top` of a chain of memory files with these
/// names and bytes, opened with `opts` (and a resolver over the files).
pub(crate) fn view_with(files: &[(&str, Vec<u8>)], opts: &OpenOptions) -> Vec<u8> {
    let files = Arc::new(Files(
        files
            .iter()
            .map(|(n, b)| {
                let st: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(b.clone()));
                (n.to_string(), st)
            })
            .collect(),
    ));
    let opts = opts.clone().file_resolver(files.clone()).read_only(true);
    let img = Image::open_storage(files.0["top"].clone(), &opts).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// Runs an offline commit (`opts`, the device quiesced, then emptied as
/// `qcow2-img commit` does) over `faulty`'s chain with every write recorded,
/// and asserts that a crash at any point leaves a chain reading as `want`:
/// every prefix of the base's writes, then of the top's after all of the
/// base's, replayed onto the bytes from before ("mid" is never written;
/// prefixes only: unflushed writes are not reordered here). Returns the
/// base's bytes after all its writes.
pub(crate) fn assert_commit_crash_safe(
    faulty: &HashMap<&'static str, Arc<FaultyStorage<MemStorage>>>,
    device: impl FnOnce() -> Arc<Image>,
    opts: CommitOptions,
    want: &[u8],
) -> Vec<u8> {
    let before: HashMap<&str, Vec<u8>> = faulty
        .iter()
        .map(|(n, f)| (*n, f.inner().to_vec()))
        .collect();
    for f in faulty.values() {
        f.start_recording();
    }
    let device = device();
    let job = commit(
        device.clone(),
        CommitOptions {
            device_quiesced: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    device.make_empty().unwrap();
    drop(device);
    let base_log = faulty["base"].take_log();
    let top_log = faulty["top"].take_log();
    assert!(faulty["mid"].take_log().is_empty());
    assert!(!base_log.is_empty() && !top_log.is_empty());
    for k in 0..=base_log.len() {
        let base = replay(&before["base"], &base_log[..k]);
        let got = view(base, before["mid"].clone(), before["top"].clone());
        assert!(got == want, "crash after {k} writes to the base");
    }
    let base = replay(&before["base"], &base_log);
    for k in 0..=top_log.len() {
        let top = replay(&before["top"], &top_log[..k]);
        let got = view(base.clone(), before["mid"].clone(), top);
        assert!(got == want, "crash after {k} writes to the top");
    }
    base
}

/// A crash at any point of `qcow2-img commit`'s work (the copy into the
/// base, then emptying the top) leaves a chain that reads as before.
#[test]
fn a_crash_anywhere_in_a_commit_keeps_the_chain_readable() {
    let c = chain();
    let want = expected(&[(0x11, 0), (0x22, MIB), (0x33, 2 * MIB)]);
    let opts = CommitOptions {
        job: job_opts(None, 0),
        ..Default::default()
    };
    assert_commit_crash_safe(&c.faulty, || c.device(), opts, &want);
}

/// With image locking on files: the job writes the base while the device's
/// read-only handle of it is open, and that handle takes its lock back
/// when the job ends (a second writer is refused again).
#[test]
fn commit_on_locked_files_shares_the_base_only_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    qcow2kit::create::create(&base, &CreateOptions::new(), SIZE).unwrap();
    let o = CreateOptions::new()
        .backing_file("base.qcow2")
        .backing_fmt("qcow2");
    qcow2kit::create::create(&top, &o, SIZE).unwrap();
    let device = Arc::new(Image::open(&top, &OpenOptions::new()).unwrap());
    device.write_at(&[5; 4096], MIB).unwrap();
    assert!(Image::open_without_backing(&base, &OpenOptions::new()).is_err());
    let job = commit(device.clone(), CommitOptions::default()).unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    let e = Image::open_without_backing(&base, &OpenOptions::new()).unwrap_err();
    assert!(matches!(e.inner(), Error::Lock(_)), "{e:?}");
    drop(device);
    let b = Image::open_without_backing(&base, &OpenOptions::new()).unwrap();
    let mut buf = [0u8; 4096];
    b.read_at(&mut buf, MIB).unwrap();
    assert_eq!(buf, [5; 4096]);
}
