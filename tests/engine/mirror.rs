//! The mirror job on in-memory images: a live mirror with writer threads
//! (the target equals the source byte for byte afterwards and the drive
//! reads from the target), sync modes, granularity, cancel, `on-error`
//! with injected target faults, the rate limit's accounting, and crash
//! replay of the target's writes (the source is never written).

use crate::jobs::{chain, expected, job_opts, sink, Files, MIB, SIZE};
use crate::support::testing::{replay, Fault, FaultKind, FaultOp, FaultyStorage};
use crate::support::Rng;
use qcow2kit::check::{CheckOptions, Checker, Repair};
use qcow2kit::error::IoOp;
use qcow2kit::job::{
    mirror, Drive, DriveNode, JobOptions, JobOutcome, JobStatus, JobType, MirrorOptions,
    MirrorSync, MirrorTarget,
};
use qcow2kit::options::{CreateOptions, ErrorAction, ErrorPolicy};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{Error, Event, Image, OpenOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

fn new_target(size: u64) -> (Arc<FaultyStorage<MemStorage>>, Arc<Image>) {
    let st = Arc::new(FaultyStorage::new(MemStorage::new()));
    qcow2kit::create::create_on(st.clone(), &CreateOptions::new(), size).unwrap();
    let img = Image::open_storage(st.clone(), &OpenOptions::new()).unwrap();
    (st, Arc::new(img))
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn all_layers() -> Vec<u8> {
    expected(&[(0x11, 0), (0x22, MIB), (0x33, 2 * MIB)])
}

/// Writer threads keep writing random data through the drive while a full
/// mirror of a 3-deep chain runs (before and after it is ready); once it is
/// completed the drive reads from the target, which equals the source byte
/// for byte and checks clean.
#[test]
fn live_mirror_with_writers_ends_on_an_identical_target() {
    for (seed, granularity) in [(1u64, 0u64), (2, 4096), (3, 1 << 20)] {
        let c = chain();
        let source = c.device();
        let drive = Drive::new(source.clone());
        let (tst, target) = new_target(SIZE);
        let stop = Arc::new(AtomicBool::new(false));
        // The guest's view: each write and its model update happen under
        // one lock, so the model is what the drive must read at any time.
        let model = Arc::new(Mutex::new(all_layers()));
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                let (drive, stop, model) = (drive.clone(), stop.clone(), model.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed * 10 + t);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) || n < 32 {
                        let len = 512 * (1 + rng.below(64));
                        let off = rng.below((SIZE - len) / 512) * 512;
                        let mut buf = vec![0u8; len as usize];
                        rng.fill(&mut buf);
                        let mut m = model.lock().unwrap();
                        let range = off as usize..(off + len) as usize;
                        match rng.below(8) {
                            0 => drive.write_zeroes(off, len, false).unwrap(),
                            1 => drive.discard(off, len).unwrap(),
                            _ => drive.write_at(&buf, off).unwrap(),
                        }
                        // Read back what the guest sees now (discard may
                        // expose zeroes or the backing file).
                        drive.read_at(&mut buf, off).unwrap();
                        m[range].copy_from_slice(&buf);
                        drop(m);
                        n += 1;
                        // A guest, not a flood: a mirror in background mode
                        // converges only when it copies faster than the
                        // guest dirties (as QEMU's).
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        let (events, seen) = sink();
        let job = mirror(
            drive.clone(),
            MirrorTarget::Image(target.clone()),
            MirrorOptions {
                job: job_opts(events, 0),
                granularity,
                buf_size: 256 << 10,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(job.wait_ready(), JobStatus::Ready);
        // Writes go to both while ready.
        std::thread::sleep(Duration::from_millis(50));
        job.complete().unwrap();
        // Writers still running: they wait for the switch, then write to the
        // target.
        assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
        assert!(
            Arc::ptr_eq(&drive.image().unwrap(), &target),
            "the drive switched"
        );
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        // The target, which the drive reads now, holds every write the
        // guest made, before, during and after the switch.
        let got = read_all(&target);
        let want = model.lock().unwrap().clone();
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            got == want,
            "seed {seed}: first difference at {first_diff:?}"
        );
        let evs = seen.lock().unwrap();
        assert!(
            matches!(
                evs.as_slice(),
                [
                    Event::BlockJobReady {
                        job_type: JobType::Mirror,
                        ..
                    },
                    Event::BlockJobCompleted {
                        job_type: JobType::Mirror,
                        error: None,
                        ..
                    }
                ]
            ),
            "{evs:?}"
        );
        drop(evs);
        target.flush().unwrap();
        let r = Checker::open_storage(tst.clone(), Repair::None)
            .unwrap()
            .run(CheckOptions::default())
            .unwrap();
        assert_eq!(
            (r.counts.corruptions, r.counts.leaks),
            (0, 0),
            "seed {seed}"
        );
    }
}

/// The byte-for-byte check at the moment of the switch: writers stop just
/// before completion is requested and resume after, so the source's final
/// content is known and must be the target's at the switch.
#[test]
fn at_completion_the_target_equals_the_source() {
    for seed in 1..=3u64 {
        let c = chain();
        let source = c.device();
        let drive = Drive::new(source.clone());
        let (_tst, target) = new_target(SIZE);
        let phase = Arc::new(Mutex::new(0u8)); // 0: before ready, 1: ready, 2: stop
        let writer = {
            let (drive, phase) = (drive.clone(), phase.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed);
                loop {
                    let p = *phase.lock().unwrap();
                    if p == 2 {
                        break;
                    }
                    let len = 512 * (1 + rng.below(64));
                    let off = rng.below((SIZE - len) / 512) * 512;
                    let mut buf = vec![0u8; len as usize];
                    rng.fill(&mut buf);
                    drive.write_at(&buf, off).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let job = mirror(
            drive.clone(),
            MirrorTarget::Image(target.clone()),
            MirrorOptions {
                job: job_opts(None, 0),
                granularity: 64 << 10,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(job.wait_ready(), JobStatus::Ready);
        *phase.lock().unwrap() = 1;
        std::thread::sleep(Duration::from_millis(30));
        *phase.lock().unwrap() = 2;
        writer.join().unwrap();
        let want = read_all(&source);
        job.complete().unwrap();
        assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
        assert!(Arc::ptr_eq(&drive.image().unwrap(), &target));
        let got = read_all(&target);
        assert!(
            got == want,
            "seed {seed}: the target differs from the source"
        );
        let mut buf = vec![0u8; 4096];
        drive.read_at(&mut buf, 2 * MIB).unwrap();
        assert_eq!(buf, want[2 * MIB as usize..2 * MIB as usize + 4096]);
    }
}

#[test]
fn sync_top_and_none_copy_what_they_should() {
    // top: only top's data; a target sharing the source's backing reads
    // the same as the source.
    let c = chain();
    let drive = Drive::new(c.device());
    let (_, target) = new_target(SIZE);
    let job = mirror(
        drive.clone(),
        MirrorTarget::Image(target.clone()),
        MirrorOptions {
            job: job_opts(None, 0),
            sync: MirrorSync::Top,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    job.complete().unwrap();
    job.wait().unwrap();
    let got = read_all(&target);
    let want = expected(&[(0x33, 2 * MIB)]);
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(got == want, "sync=top: first difference at {first_diff:?}");

    // none: only what is written while the job runs.
    let c = chain();
    let drive = Drive::new(c.device());
    let (_, target) = new_target(SIZE);
    let job = mirror(
        drive.clone(),
        MirrorTarget::Image(target.clone()),
        MirrorOptions {
            job: job_opts(None, 0),
            sync: MirrorSync::None,
            ..Default::default()
        },
    )
    .unwrap();
    drive.write_at(&[0x77; 4096], MIB).unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    drive.write_at(&[0x78; 512], 3 * MIB).unwrap();
    job.complete().unwrap();
    job.wait().unwrap();
    // The dirty granules (64 KiB: the target's clusters) are copied whole
    // from the source: the writes and mid's data around the first one --
    // unless the job got ready before the first write, which then went
    // through to the target alone (the rest of its granule stays zero).
    let got = read_all(&target);
    let through = got[MIB as usize + 4096] == 0;
    let mut want = vec![0u8; SIZE as usize];
    if !through {
        want[MIB as usize..MIB as usize + (64 << 10)].fill(0x22);
    }
    want[MIB as usize..MIB as usize + 4096].fill(0x77);
    want[3 * MIB as usize..3 * MIB as usize + 512].fill(0x78);
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(got == want, "sync=none: first difference at {first_diff:?}");
}

#[test]
fn argument_errors_and_cancel() {
    let c = chain();
    let drive = Drive::new(c.device());
    let (_, small) = new_target(MIB);
    let e = mirror(
        drive.clone(),
        MirrorTarget::Image(small),
        MirrorOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let (_, target) = new_target(SIZE);
    let bad = MirrorOptions {
        granularity: 3000,
        ..Default::default()
    };
    let e = mirror(drive.clone(), MirrorTarget::Image(target.clone()), bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Granularity must be a power of 2 between 512 and 64M"
    );

    // Cancelled while slow: the drive stays on the source, which reads as
    // before; a second mirror can start afterwards.
    let (events, seen) = sink();
    let job = mirror(
        drive.clone(),
        MirrorTarget::Image(target.clone()),
        MirrorOptions {
            job: job_opts(events, 64 << 10),
            ..Default::default()
        },
    )
    .unwrap();
    let e = mirror(
        drive.clone(),
        MirrorTarget::Image(target.clone()),
        MirrorOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");
    job.cancel();
    assert_eq!(job.wait().unwrap(), JobOutcome::Cancelled);
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [Event::BlockJobCancelled {
            job_type: JobType::Mirror,
            ..
        }]
    ));
    assert!(!Arc::ptr_eq(&drive.image().unwrap(), &target));
    assert!(read_all(&drive.image().unwrap()) == all_layers());
    let job = mirror(
        drive.clone(),
        MirrorTarget::Image(target.clone()),
        MirrorOptions::default(),
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    job.cancel();
    assert_eq!(job.wait().unwrap(), JobOutcome::Cancelled);
}

#[test]
fn on_error_stop_pauses_on_an_eio_and_report_ends_the_job() {
    // A source read error (on-source-error): a failed read fails that
    // request only, so the retry after resume can succeed. (A failed
    // metadata write on the target would poison its handle until reopened,
    // as any image's.)
    let c = chain();
    let drive = Drive::new(c.device());
    let (_, target) = new_target(SIZE);
    let (tx, rx) = mpsc::channel::<Event>();
    let tx = Mutex::new(tx);
    let events: qcow2kit::events::EventSink = Arc::new(move |e: &Event| {
        let _ = tx.lock().unwrap().send(e.clone());
    });
    let mid = c.faulty["mid"].clone();
    mid.set_fault(Some(Fault {
        op: FaultOp::Read,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: true,
    }));
    let job = mirror(
        drive.clone(),
        MirrorTarget::Image(target.clone()),
        MirrorOptions {
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
            operation: IoOp::Read,
            action: ErrorAction::Stop,
        }
    );
    while job.info().status != JobStatus::Paused {
        std::thread::sleep(Duration::from_millis(5));
    }
    mid.set_fault(None);
    job.resume();
    // The retried copy goes through (a failed data write fails that request
    // only); the job then gets ready and completes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = job.info().status;
        assert!(
            std::time::Instant::now() < deadline,
            "stuck in {st:?}: {:?}",
            rx.try_iter().collect::<Vec<_>>()
        );
        match st {
            JobStatus::Ready => break,
            JobStatus::Concluded => panic!("ended: {:?}", rx.try_iter().collect::<Vec<_>>()),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert!(read_all(&target) == all_layers());

    // report: the error ends the job and is in BLOCK_JOB_COMPLETED.
    let c = chain();
    let drive = Drive::new(c.device());
    let (tst, target) = new_target(SIZE);
    let (events, seen) = sink();
    tst.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Enospc,
        persistent: true,
    }));
    let job = mirror(
        drive.clone(),
        MirrorTarget::Image(target),
        MirrorOptions {
            job: job_opts(events, 0),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(job.wait().unwrap_err().is_nospace());
    let evs = seen.lock().unwrap();
    assert!(
        matches!(
            evs.as_slice(),
            [
                Event::BlockJobError { operation: IoOp::Write, action: ErrorAction::Report, .. },
                Event::BlockJobCompleted { job_type: JobType::Mirror, error: Some(m), .. }
            ] if m == "No space left on device"
        ),
        "{evs:?}"
    );
    // The drive stayed on the source, and keeps working without the mirror.
    drive.write_at(&[1; 512], 0).unwrap();
    assert_eq!(read_all(&drive.image().unwrap())[..512], [1; 512]);
}

/// A raw in-memory target of `size` bytes behind fault injection.
fn raw_target(size: u64) -> Arc<FaultyStorage<MemStorage>> {
    let st = Arc::new(FaultyStorage::new(MemStorage::new()));
    st.set_len(size).unwrap();
    st
}

/// Waits (up to a minute) until `job` is in `want`; panics if it concludes.
fn wait_status(job: &qcow2kit::job::Job, want: JobStatus) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = job.info().status;
        assert!(std::time::Instant::now() < deadline, "stuck in {st:?}");
        if st == want {
            return;
        }
        assert_ne!(st, JobStatus::Concluded, "ended while waiting for {want:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `on-source-error` and `on-target-error` are separate policies: a source
/// read error under `stop` pauses the job (BLOCK_JOB_ERROR `read`/`stop`)
/// while the target's policy is `report`; a target write error under
/// `report` ends the job with the error in BLOCK_JOB_COMPLETED (`write`/
/// `report`) while the source's is `stop`; under `ignore` the job goes on
/// and the target ends equal to the source.
#[test]
fn on_source_error_and_on_target_error_are_separate_policies() {
    // Source read EIO, on-source-error=stop, on-target-error=report.
    let c = chain();
    let drive = Drive::new(c.device());
    let target = raw_target(SIZE);
    let (events, seen) = sink();
    let mid = c.faulty["mid"].clone();
    mid.set_fault(Some(Fault {
        op: FaultOp::Read,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: true,
    }));
    let job = mirror(
        drive.clone(),
        MirrorTarget::Raw(target.clone()),
        MirrorOptions {
            job: job_opts(events, 0),
            on_source_error: Some(ErrorPolicy::Stop),
            on_target_error: Some(ErrorPolicy::Report),
            ..Default::default()
        },
    )
    .unwrap();
    wait_status(&job, JobStatus::Paused);
    assert_eq!(
        seen.lock().unwrap().first(),
        Some(&Event::BlockJobError {
            device: "drive0".into(),
            operation: IoOp::Read,
            action: ErrorAction::Stop,
        })
    );
    mid.set_fault(None);
    job.resume();
    wait_status(&job, JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    let mut got = vec![0u8; SIZE as usize];
    target.read_at(&mut got, 0).unwrap();
    assert!(got == all_layers());

    // Target write EIO, on-target-error=report, on-source-error=stop.
    let c = chain();
    let drive = Drive::new(c.device());
    let target = raw_target(SIZE);
    let (events, seen) = sink();
    target.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: true,
    }));
    let job = mirror(
        drive.clone(),
        MirrorTarget::Raw(target.clone()),
        MirrorOptions {
            job: job_opts(events, 0),
            on_source_error: Some(ErrorPolicy::Stop),
            on_target_error: Some(ErrorPolicy::Report),
            ..Default::default()
        },
    )
    .unwrap();
    let e = job.wait().unwrap_err();
    let evs = seen.lock().unwrap();
    assert!(
        matches!(
            evs.as_slice(),
            [
                Event::BlockJobError { operation: IoOp::Write, action: ErrorAction::Report, .. },
                Event::BlockJobCompleted { job_type: JobType::Mirror, error: Some(m), .. }
            ] if *m == e.to_string() || m.contains("Input/output error")
        ),
        "{e}: {evs:?}"
    );
    drop(evs);

    // Target write EIO once, on-target-error=ignore (on-error says report):
    // the job goes on, retries the copy and completes.
    let c = chain();
    let drive = Drive::new(c.device());
    let target = raw_target(SIZE);
    let (events, seen) = sink();
    target.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: false,
    }));
    let job = mirror(
        drive.clone(),
        MirrorTarget::Raw(target.clone()),
        MirrorOptions {
            job: job_opts(events, 0),
            on_target_error: Some(ErrorPolicy::Ignore),
            ..Default::default()
        },
    )
    .unwrap();
    wait_status(&job, JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert!(matches!(
        seen.lock().unwrap().first(),
        Some(Event::BlockJobError {
            operation: IoOp::Write,
            action: ErrorAction::Ignore,
            ..
        })
    ));
    let mut got = vec![0u8; SIZE as usize];
    target.read_at(&mut got, 0).unwrap();
    assert!(got == all_layers());
}

/// A mirror to a raw target switches the drive to the raw file on
/// completion: the drive's reads and writes go to it, and it holds the
/// source's content.
#[test]
fn mirror_to_a_raw_target_switches_the_drive() {
    let c = chain();
    let source = c.device();
    let drive = Drive::new(source.clone());
    let target = raw_target(SIZE);
    let job = mirror(
        drive.clone(),
        MirrorTarget::Raw(target.clone()),
        MirrorOptions {
            job: job_opts(None, 0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    drive.write_at(&[0x44; 4096], 3 * MIB).unwrap();
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert!(drive.image().is_none(), "the drive is on the raw file");
    assert!(matches!(drive.node(), DriveNode::Raw(_)));
    assert_eq!(drive.size().unwrap(), SIZE);
    let mut want = all_layers();
    want[3 * MIB as usize..3 * MIB as usize + 4096].fill(0x44);
    let mut file = vec![0u8; SIZE as usize];
    target.read_at(&mut file, 0).unwrap();
    assert!(file == want, "the raw file holds the source's content");
    assert!(
        read_all(&source) == want,
        "the source as the guest wrote it"
    );
    // Writes now hit the raw file only; reads come from it.
    drive.write_at(&[0x55; 512], 0).unwrap();
    drive.flush().unwrap();
    let mut b = [0u8; 512];
    target.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x55; 512]);
    let mut b = [0u8; 512];
    source.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x11; 512], "the source is no longer written");
    let mut all = vec![0u8; SIZE as usize];
    drive.read_at(&mut all, 0).unwrap();
    want[..512].fill(0x55);
    assert!(all == want);
    // A drive on a raw file cannot be mirrored (the job reads block status).
    let e = mirror(
        drive.clone(),
        MirrorTarget::Raw(raw_target(SIZE)),
        MirrorOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn mirror_rate_limit_accounts_the_bytes_copied() {
    let c = chain();
    let drive = Drive::new(c.device());
    let (_, target) = new_target(SIZE);
    let job = mirror(
        drive,
        MirrorTarget::Image(target),
        MirrorOptions {
            job: job_opts(None, 8 * MIB),
            buf_size: 512 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    let info = job.info();
    job.complete().unwrap();
    job.wait().unwrap();
    // 3 MiB of data, the zero MiB past it written as zeroes (also counted).
    assert!(info.throttled_bytes >= 3 * MIB, "{info:?}");
    assert!(info.throttle_waits >= 1, "{info:?}");
    assert_eq!(info.offset, info.len);
}

/// Crash replay of a mirror's target: every prefix of the writes the target
/// file received opens with no corruption (leaks allowed); the whole log
/// reads as the source; the source's files receive no write.
#[test]
fn a_crash_anywhere_in_a_mirror_leaves_the_target_consistent() {
    let c = chain();
    for f in c.faulty.values() {
        f.start_recording();
    }
    let drive = Drive::new(c.device());
    let (tst, target) = new_target(SIZE);
    let before = tst.inner().to_vec();
    tst.start_recording();
    let job = mirror(
        drive.clone(),
        MirrorTarget::Image(target.clone()),
        MirrorOptions {
            job: job_opts(None, 0),
            granularity: 256 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    job.complete().unwrap();
    job.wait().unwrap();
    drop(drive);
    Arc::try_unwrap(target).ok().unwrap().close().unwrap();
    for (n, f) in &c.faulty {
        assert!(
            f.take_log()
                .iter()
                .all(|op| !matches!(op, qcow2kit::storage::RecordedOp::Write { .. })),
            "{n} was written"
        );
    }
    let log = tst.take_log();
    assert!(log.len() > 3);
    let files = Arc::new(Files(Default::default()));
    let opts = OpenOptions::new().file_resolver(files).read_only(true);
    for k in 0..=log.len() {
        let bytes = replay(&before, &log[..k]);
        let st: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes.clone()));
        let r = Checker::open_storage_with(st.clone(), None, Repair::None, &opts)
            .unwrap()
            .run(CheckOptions::default())
            .unwrap();
        assert_eq!(
            r.counts.corruptions,
            0,
            "after {k} of {} writes: {r:?}",
            log.len()
        );
        let img = Image::open_storage(st, &opts).unwrap();
        read_all(&img);
        if k == log.len() {
            assert!(read_all(&img) == all_layers());
        }
    }
}
