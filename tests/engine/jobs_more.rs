//! The stream job on in-memory chains (the `jobs` module's chain: base
//! 0x11 in [0, 1M) <- mid 0x22 in [1M, 2M) <- top 0x33 in [2M, 3M)):
//! guest writes during the stream are never overwritten, `on-error`
//! policies with injected faults, pause/cancel, crash replay; and the
//! issue's rate-limit bound for commit and stream (64 MiB at 32 MiB/s
//! takes at least 1.5 s: a lower bound only).

use crate::jobs::{chain, expected, job_opts, sink, view, Files, MIB, SIZE};
use crate::support::testing::{replay, Fault, FaultKind, FaultOp};
use crate::support::Rng;
use qcow2kit::check::{CheckOptions, Checker, Repair};
use qcow2kit::error::IoOp;
use qcow2kit::job::{
    commit, stream, CommitOptions, JobError, JobOptions, JobOutcome, JobStatus, JobType,
    StreamOptions,
};
use qcow2kit::options::{CreateOptions, ErrorAction, ErrorPolicy};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{Error, Event, Image, OpenOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

fn all_layers() -> Vec<u8> {
    expected(&[(0x11, 0), (0x22, MIB), (0x33, 2 * MIB)])
}

/// `top`'s bytes read on their own (through the chain their header names).
fn reopen_top(c: &crate::jobs::Chain) -> (Vec<u8>, Option<String>, Option<String>) {
    let img = Image::open_storage(c.files.0["top"].clone(), &c.opts().read_only(true)).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    let h = img.header();
    (
        buf,
        h.backing_file_name().map(str::to_owned),
        h.backing_format().map(str::to_owned),
    )
}

fn no_corruption(bytes: Vec<u8>, opts: &OpenOptions, what: &str) {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
    let r = Checker::open_storage_with(st, None, Repair::None, opts)
        .unwrap()
        .run(CheckOptions::default())
        .unwrap();
    assert_eq!(r.counts.corruptions, 0, "{what}: {r:?}");
}

#[test]
fn stream_whole_chain_and_down_to_a_base() {
    let c = chain();
    let (events, seen) = sink();
    let job = stream(
        c.device(),
        StreamOptions {
            job: job_opts(events, 0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert_eq!(reopen_top(&c), (all_layers(), None, None));
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [Event::BlockJobCompleted {
            job_type: JobType::Stream,
            error: None,
            len: SIZE,
            offset: SIZE,
            ..
        }]
    ));

    let c = chain();
    let job = stream(
        c.device(),
        StreamOptions {
            job: job_opts(None, 0),
            base: Some(PathBuf::from("base")),
            backing_file: Some("base-renamed".into()),
        },
    )
    .unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    // mid's data is in top now; base's is not (it stays the backing file,
    // under the name given).
    let mut m = c.files.0.clone();
    m.insert("base-renamed".into(), c.files.0["base"].clone());
    let opts = OpenOptions::new()
        .file_resolver(Arc::new(Files(m)))
        .read_only(true);
    let top = Image::open_storage(c.files.0["top"].clone(), &opts).unwrap();
    assert_eq!(top.header().backing_file_name(), Some("base-renamed"));
    assert_eq!(top.header().backing_format(), Some("qcow2"));
    let mut buf = vec![0u8; SIZE as usize];
    top.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, all_layers());
    let st = |off| top.block_status(off, MIB).unwrap().extent;
    assert_eq!(st(0), qcow2kit::Extent::Unallocated);
    assert_ne!(st(MIB), qcow2kit::Extent::Unallocated);
}

#[test]
fn stream_argument_errors_have_qemu_texts() {
    let c = chain();
    let d = c.device();
    let run = |o: StreamOptions| stream(d.clone(), o).unwrap_err().to_string();
    assert_eq!(
        run(StreamOptions {
            backing_file: Some("x".into()),
            ..Default::default()
        }),
        "backing file specified, but streaming the entire chain"
    );
    assert_eq!(
        run(StreamOptions {
            base: Some("nosuch".into()),
            ..Default::default()
        }),
        "Can't find 'nosuch' in the backing chain"
    );
    let ro =
        Arc::new(Image::open_storage(c.files.0["top"].clone(), &c.opts().read_only(true)).unwrap());
    assert!(matches!(
        stream(ro, StreamOptions::default()),
        Err(Error::ReadOnly)
    ));
    assert!(matches!(
        stream(
            d.clone(),
            StreamOptions {
                base: Some("top".into()),
                ..Default::default()
            }
        ),
        Err(Error::Job(JobError::BaseNotInChain(_)))
    ));
}

/// A writer thread keeps writing while the stream copies: no guest write
/// is overwritten by the older backing data, and the result reads as the
/// chain overlaid with the writes, on the handle and reopened.
#[test]
fn guest_writes_during_a_stream_are_kept() {
    for seed in 1..=3u64 {
        let c = chain();
        let device = c.device();
        let model = Arc::new(Mutex::new(all_layers()));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (device, model, stop) = (device.clone(), model.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 64 {
                    let len = 512 * (1 + rng.below(64));
                    let off = rng.below((SIZE - len) / 512) * 512;
                    let byte = 0x40 + (n % 64) as u8;
                    let buf = vec![byte; len as usize];
                    device.write_at(&buf, off).unwrap();
                    model.lock().unwrap()[off as usize..(off + len) as usize].fill(byte);
                    n += 1;
                }
            })
        };
        // Slow enough for the writer to interleave.
        let job = stream(
            device.clone(),
            StreamOptions {
                job: job_opts(None, 8 * MIB),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let want = model.lock().unwrap().clone();
        let mut buf = vec![0u8; SIZE as usize];
        device.read_at(&mut buf, 0).unwrap();
        assert!(buf == want, "seed {seed}: the handle reads otherwise");
        device.shutdown().unwrap();
        let (got, backing, _) = reopen_top(&c);
        assert_eq!(backing, None);
        assert!(got == want, "seed {seed}: reopened, top reads otherwise");
    }
}

#[test]
fn stream_on_error_stop_pauses_and_report_ends_the_job() {
    let c = chain();
    let (tx, rx) = mpsc::channel::<Event>();
    let tx = Mutex::new(tx);
    let events: qcow2kit::events::EventSink = Arc::new(move |e: &Event| {
        let _ = tx.lock().unwrap().send(e.clone());
    });
    let top = c.faulty["top"].clone();
    top.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: true,
    }));
    let job = stream(
        c.device(),
        StreamOptions {
            job: JobOptions {
                on_error: ErrorPolicy::Stop,
                ..job_opts(Some(events), 0)
            },
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
    top.set_fault(None);
    job.resume();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    // The failed write poisoned nothing the job needed after resuming.
    assert_eq!(reopen_top(&c).0, all_layers());

    // report: the job ends, the error in BLOCK_JOB_COMPLETED.
    let c = chain();
    let (events, seen) = sink();
    let device = c.device();
    c.faulty["mid"].set_fault(Some(Fault {
        op: FaultOp::Read,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: true,
    }));
    let job = stream(
        device,
        StreamOptions {
            job: job_opts(events, 0),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(job.wait().is_err());
    let evs = seen.lock().unwrap();
    assert!(
        matches!(
            evs.as_slice(),
            [
                Event::BlockJobError {
                    operation: IoOp::Read,
                    action: ErrorAction::Report,
                    ..
                },
                Event::BlockJobCompleted {
                    job_type: JobType::Stream,
                    error: Some(_),
                    ..
                }
            ]
        ),
        "{evs:?}"
    );
    c.faulty["mid"].set_fault(None);
    // The header was not changed: top still reads through its chain.
    let (got, backing, _) = reopen_top(&c);
    assert_eq!((got, backing.as_deref()), (all_layers(), Some("mid")));
}

#[test]
fn stream_pause_and_cancel_leave_the_chain_readable() {
    let c = chain();
    let device = c.device();
    let job = stream(
        device.clone(),
        StreamOptions {
            job: job_opts(None, 256 << 10),
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
    assert_eq!(job.info().offset, at);
    job.cancel();
    assert_eq!(job.wait().unwrap(), JobOutcome::Cancelled);
    let mut buf = vec![0u8; SIZE as usize];
    device.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, all_layers());
    drop(device);
    let (got, backing, _) = reopen_top(&c);
    assert_eq!((got, backing.as_deref()), (all_layers(), Some("mid")));
}

/// A crash after any prefix of the writes a stream makes to the top
/// (copied clusters, then the header) leaves a top that reads as the chain
/// did, with no corruption.
#[test]
fn a_crash_anywhere_in_a_stream_keeps_the_chain_readable() {
    for base in [None, Some("base")] {
        let c = chain();
        let before: HashMap<&str, Vec<u8>> = c
            .faulty
            .iter()
            .map(|(n, f)| (*n, f.inner().to_vec()))
            .collect();
        for f in c.faulty.values() {
            f.start_recording();
        }
        let device = c.device();
        let job = stream(
            device.clone(),
            StreamOptions {
                job: job_opts(None, 0),
                base: base.map(PathBuf::from),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
        device.shutdown().unwrap();
        drop(device);
        let log = c.faulty["top"].take_log();
        assert!(c.faulty["mid"].take_log().is_empty());
        assert!(c.faulty["base"].take_log().is_empty());
        assert!(log.len() > 2, "{base:?}: {}", log.len());
        let want = all_layers();
        let files = Arc::new(Files(
            before
                .iter()
                .map(|(n, b)| {
                    (
                        n.to_string(),
                        Arc::new(MemStorage::from_bytes(b.clone())) as Arc<dyn Storage>,
                    )
                })
                .collect(),
        ));
        let opts = OpenOptions::new().file_resolver(files).read_only(true);
        for k in 0..=log.len() {
            let top = replay(&before["top"], &log[..k]);
            let got = view(before["base"].clone(), before["mid"].clone(), top.clone());
            assert!(
                got == want,
                "{base:?}: crash after {k} of {} writes",
                log.len()
            );
            no_corruption(top, &opts, &format!("{base:?} after {k} writes"));
        }
    }
}

/// A chain of 64 MiB of data above the base, in memory.
fn big_chain() -> (Arc<Files>, Arc<Image>) {
    let size = 64 * MIB;
    let st: HashMap<String, Arc<dyn Storage>> = ["base", "top"]
        .into_iter()
        .map(|n| {
            (
                n.to_string(),
                Arc::new(MemStorage::new()) as Arc<dyn Storage>,
            )
        })
        .collect();
    qcow2kit::create::create_on(st["base"].clone(), &CreateOptions::new(), size).unwrap();
    let o = CreateOptions::new()
        .backing_file("base")
        .backing_fmt("qcow2");
    qcow2kit::create::create_on(st["top"].clone(), &o, size).unwrap();
    let files = Arc::new(Files(st));
    let opts = OpenOptions::new().file_resolver(files.clone());
    let base = Image::open_storage(files.0["base"].clone(), &opts).unwrap();
    let chunk = vec![0x5au8; 4 * MIB as usize];
    for i in 0..16 {
        base.write_at(&chunk, i * 4 * MIB).unwrap();
    }
    base.close().unwrap();
    let top =
        Image::open_storage(files.0["top"].clone(), &opts.with_filename("top".into())).unwrap();
    for i in 0..16 {
        top.write_at(&chunk, i * 4 * MIB).unwrap();
    }
    (files, Arc::new(top))
}

/// The bound: 64 MiB at 32 MiB/s cannot take less than 1.5 s (the
/// first slice's quota goes at once, so 2 s minus a slice or so). A lower
/// bound on the limit being honoured, not a timing assertion on speed.
#[test]
fn rate_limit_64_mib_at_32_mib_per_s_takes_at_least_1_5_s() {
    // Commit: top's 64 MiB into the base.
    let (_files, device) = big_chain();
    let start = Instant::now();
    let job = commit(
        device.clone(),
        CommitOptions {
            job: job_opts(None, 32 * MIB),
            device_quiesced: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    let took = start.elapsed();
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert!(took >= Duration::from_millis(1500), "commit took {took:?}");

    // Stream: the base's 64 MiB into a top that holds nothing.
    let (files, _) = big_chain();
    let opts = OpenOptions::new().file_resolver(files.clone());
    let top = Image::open_storage(files.0["top"].clone(), &opts).unwrap();
    top.make_empty().unwrap();
    drop(top);
    let device = Arc::new(
        Image::open_storage(files.0["top"].clone(), &opts.with_filename("top".into())).unwrap(),
    );
    let start = Instant::now();
    let job = stream(
        device,
        StreamOptions {
            job: job_opts(None, 32 * MIB),
            ..Default::default()
        },
    )
    .unwrap();
    let info = {
        while job.info().status != JobStatus::Concluded {
            std::thread::sleep(Duration::from_millis(10));
        }
        job.info()
    };
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    let took = start.elapsed();
    assert_eq!(info.throttled_bytes, 64 * MIB);
    assert!(took >= Duration::from_millis(1500), "stream took {took:?}");
}
