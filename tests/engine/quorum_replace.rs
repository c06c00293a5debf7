//! A mirror with `replaces` rebuilds a quorum child: a qcow2 image on a
//! quorum of three files (vote-threshold 2), one of them damaged (bytes
//! flipped) or lost (recreated empty), is mirrored into a fresh file that
//! replaces the bad child. Writers keep writing through the drive while the
//! job runs, readers check that no read ever returns bad data, and at the
//! end the three children are byte-identical. Without a writer, the new
//! child is byte for byte what QEMU's `blockdev-mirror` with `replaces`
//! writes (qemu-storage-daemon, the quorum as its root node).

use crate::support::qsd::{have_qsd, Qsd};
use qcow2kit::job::{mirror, Drive, DriveNode, JobOptions, JobOutcome, JobStatus, MirrorOptions};
use qcow2kit::storage::{open_from_options, BackendSpec, FileStorage};
use qcow2kit::{CreateOptions, Error, Event, Image, OpenOptions};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// A.img, B.img, C.img: the same qcow2 image (6 MiB of patterned data).
fn replicas(d: &Path) {
    let a = d.join("A.img");
    qcow2kit::create::create(&a, &CreateOptions::new(), SIZE).unwrap();
    let img = Image::open(&a, &OpenOptions::new()).unwrap();
    for k in 0..6u64 {
        let v: Vec<u8> = (0..MIB).map(|i| (i as u8) ^ (k as u8 * 37)).collect();
        img.write_at(&v, k * MIB).unwrap();
    }
    img.close().unwrap();
    std::fs::copy(&a, d.join("B.img")).unwrap();
    std::fs::copy(&a, d.join("C.img")).unwrap();
}

fn spec(d: &Path) -> BackendSpec {
    let mut options: Vec<(String, String)> = vec![("vote-threshold".into(), "2".into())];
    for (i, f) in ["A.img", "B.img", "C.img"].iter().enumerate() {
        options.push((format!("children.{i}.driver"), "file".into()));
        let p = d.join(f).display().to_string();
        options.push((format!("children.{i}.filename"), p));
    }
    options.push(("children.2.node-name".into(), "replica-c".into()));
    BackendSpec {
        driver: "quorum".into(),
        options,
    }
}

/// The image on the quorum, as a drive.
fn open_drive(d: &Path) -> Arc<Drive> {
    let storage = open_from_options(&spec(d), false).unwrap();
    Drive::new(Arc::new(
        Image::open_storage(storage, &OpenOptions::new()).unwrap(),
    ))
}

/// A fresh (empty) file for the new child.
fn fresh(d: &Path, name: &str) -> DriveNode {
    DriveNode::Raw(Arc::new(FileStorage::create(&d.join(name), false).unwrap()))
}

fn opts(replaces: &str) -> MirrorOptions {
    MirrorOptions {
        job: JobOptions {
            id: "rebuild".into(),
            ..Default::default()
        },
        replaces: Some(replaces.into()),
        ..Default::default()
    }
}

/// Flips every byte of `[at, at + len)` of `f`.
fn flip(f: &Path, at: usize, len: usize) {
    let mut b = std::fs::read(f).unwrap();
    for x in &mut b[at..at + len] {
        *x = !*x;
    }
    std::fs::write(f, b).unwrap();
}

/// Runs the rebuild of replica-c into D.img with writers and readers
/// racing it; returns the guest content the drive should hold.
fn rebuild_under_load(d: &Path) -> Vec<u8> {
    let drive = open_drive(d);
    let mut model = vec![0u8; SIZE as usize];
    drive.image().unwrap().read_at(&mut model, 0).unwrap();
    let model = Arc::new(Mutex::new(model));
    let stop = Arc::new(AtomicBool::new(false));
    // A rate limit keeps the copy going for a while (about a second), so
    // that writes and reads race it.
    let mut o = opts("replica-c");
    o.job.speed = 4 << 20;
    let job = mirror(drive.clone(), fresh(d, "D.img"), o).unwrap();
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // One writer (its writes are the model's, in order) and one reader of
    // the whole disk, which must always see the model where no write is
    // in flight: the writer holds the model lock across each write.
    let writer = {
        let (drive, model, stop) = (drive.clone(), model.clone(), stop.clone());
        let writes = writes.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 8 {
                let off = (n * 1_234_567) % (SIZE - 65536);
                let data = vec![(n % 251) as u8 + 1; 65536];
                let mut m = model.lock().unwrap();
                drive.write_at(&data, off).unwrap();
                m[off as usize..off as usize + data.len()].copy_from_slice(&data);
                n += 1;
                writes.store(n, Ordering::Relaxed);
            }
            n
        })
    };
    let reader = {
        let (drive, model, stop) = (drive.clone(), model.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            let mut buf = vec![0u8; 2 * MIB as usize];
            while !stop.load(Ordering::Relaxed) || reads < 4 {
                let off = (reads as u64 % 4) * 2 * MIB;
                let m = model.lock().unwrap();
                drive.read_at(&mut buf, off).unwrap();
                assert!(
                    buf[..] == m[off as usize..off as usize + buf.len()],
                    "read {reads} at {off:#x} returned bad data"
                );
                drop(m);
                reads += 1;
            }
        })
    };
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    assert!(
        writes.load(Ordering::Relaxed) > 10,
        "the writer did not race the copy"
    );
    // A write after ready (racing the completion) reaches the new child.
    // (The model's lock is held across the write, as the writer does.)
    {
        let mut m = model.lock().unwrap();
        drive.write_at(&[0xee; 4096], 7 * MIB).unwrap();
        m[7 * MIB as usize..7 * MIB as usize + 4096].fill(0xee);
    }
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() >= 8);
    reader.join().unwrap();
    // Writes after the swap reach the new child too.
    drive.write_at(&[0xdd; 512], 0).unwrap();
    model.lock().unwrap()[..512].fill(0xdd);
    let mut buf = vec![0u8; SIZE as usize];
    drive.read_at(&mut buf, 0).unwrap();
    let model = model.lock().unwrap().clone();
    assert!(buf == model);
    let img = drive.image().unwrap();
    drop(drive);
    Arc::try_unwrap(img).unwrap().close().unwrap();
    model
}

/// The children of the quorum now: A, B and the new D are byte-identical,
/// and the image read from D alone holds the guest content.
fn assert_rebuilt(d: &Path, want: &[u8]) {
    let a = std::fs::read(d.join("A.img")).unwrap();
    assert!(
        a == std::fs::read(d.join("B.img")).unwrap(),
        "A and B differ"
    );
    assert!(
        a == std::fs::read(d.join("D.img")).unwrap(),
        "A and D differ"
    );
    let img = Image::open(d.join("D.img"), &OpenOptions::new().read_only(true)).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == want);
}

#[test]
fn mirror_replaces_a_damaged_quorum_child() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    replicas(d);
    // Damage C: 64 KiB in the middle of the data, and a bit of metadata.
    let len = std::fs::metadata(d.join("C.img")).unwrap().len() as usize;
    flip(&d.join("C.img"), len / 2, 65536);
    flip(&d.join("C.img"), 0x30000, 512);
    let want = rebuild_under_load(d);
    assert_rebuilt(d, &want);
    // C itself was left alone (no longer a child).
    assert!(std::fs::read(d.join("C.img")).unwrap() != std::fs::read(d.join("A.img")).unwrap());
}

#[test]
fn mirror_replaces_a_lost_quorum_child() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    replicas(d);
    std::fs::remove_file(d.join("C.img")).unwrap();
    std::fs::write(d.join("C.img"), b"").unwrap();
    let want = rebuild_under_load(d);
    assert_rebuilt(d, &want);
}

/// QEMU's error for a name that is no child of the quorum (or a drive not
/// on a quorum); a qcow2 target is refused; a cancelled rebuild changes
/// nothing and another can start.
#[test]
fn mirror_replaces_errors_and_cancel() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    replicas(d);
    let drive = open_drive(d);
    let e = mirror(drive.clone(), fresh(d, "D.img"), opts("nosuch")).unwrap_err();
    assert_eq!(e.to_string(), "Failed to find node with node-name='nosuch'");
    let plain = Drive::new(Arc::new(
        Image::open(
            d.join("B.img"),
            &OpenOptions::new().force_share(true).read_only(true),
        )
        .unwrap(),
    ));
    let e = mirror(plain, fresh(d, "D.img"), opts("replica-c")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to find node with node-name='replica-c'"
    );
    qcow2kit::create::create(&d.join("T.qcow2"), &CreateOptions::new(), SIZE).unwrap();
    let t = Image::open(d.join("T.qcow2"), &OpenOptions::new()).unwrap();
    let e = mirror(
        drive.clone(),
        DriveNode::Image(Arc::new(t)),
        opts("replica-c"),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");

    let before = std::fs::read(d.join("C.img")).unwrap();
    let job = mirror(drive.clone(), fresh(d, "D.img"), opts("replica-c")).unwrap();
    // Another replace of the same quorum is refused while this one runs.
    assert!(mirror(drive.clone(), fresh(d, "E.img"), opts("#quorum.children.0")).is_err());
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    job.cancel();
    assert_eq!(job.wait().unwrap(), JobOutcome::Cancelled);
    drive.write_at(&[0x5a; 4096], MIB).unwrap();
    drive.flush().unwrap();
    // C is still a child (it got the write), D is not.
    assert!(std::fs::read(d.join("C.img")).unwrap() != before);
    let d_img = std::fs::read(d.join("D.img")).unwrap();
    assert!(d_img != std::fs::read(d.join("A.img")).unwrap());
    let job = mirror(drive.clone(), fresh(d, "E.img"), opts("replica-c")).unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
}

/// The same rebuild as QEMU's: in a twin directory qemu-storage-daemon
/// runs `blockdev-mirror` of the quorum (its root node, children a, b, c)
/// into D.img with `replaces: c`; ours rebuilds replica-c of the image on
/// the same quorum. Both D.img are A.img byte for byte, and the job's
/// events carry the same length.
#[test]
fn mirror_replaces_matches_qemu_blockdev_mirror() {
    if !crate::support::have_qemu() || !have_qsd() {
        return;
    }
    let (qd, od) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (qd, od) = (qd.path(), od.path());
    for d in [qd, od] {
        replicas(d);
        let len = std::fs::metadata(d.join("C.img")).unwrap().len() as usize;
        flip(&d.join("C.img"), len / 2, 4096);
    }
    // QEMU: the target exists with the source's size.
    let a_len = std::fs::metadata(qd.join("A.img")).unwrap().len();
    std::fs::File::create(qd.join("D.img"))
        .unwrap()
        .set_len(a_len)
        .unwrap();
    let children: Vec<serde_json::Value> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            json!({"driver": "file", "node-name": n,
                   "filename": format!("{}.img", n.to_uppercase())})
        })
        .collect();
    let root = json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                      "children": children});
    let mut q = Qsd::start_blockdev(qd, &root.to_string());
    q.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "d", "filename": "D.img"}),
    )
    .unwrap();
    q.execute(
        "blockdev-mirror",
        json!({"job-id": "j", "device": "q", "target": "d", "sync": "full", "replaces": "c"}),
    )
    .unwrap();
    let ready = q.wait_event("BLOCK_JOB_READY");
    q.execute("job-complete", json!({"id": "j"})).unwrap();
    let done = q.wait_event("BLOCK_JOB_COMPLETED");
    assert!(done.get("error").is_none(), "{done}");
    // The unknown name: QEMU's message, which ours repeats.
    let e = q
        .execute(
            "blockdev-mirror",
            json!({"job-id": "k", "device": "q", "target": "d", "sync": "full",
                   "replaces": "nosuch"}),
        )
        .unwrap_err();
    q.quit();

    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let s = seen.clone();
    let drive = open_drive(od);
    let mut o = opts("replica-c");
    o.job.events = Some(Arc::new(move |e: &Event| s.lock().unwrap().push(e.clone())));
    let job = mirror(drive.clone(), fresh(od, "D.img"), o).unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    let ours = mirror(drive.clone(), fresh(od, "E.img"), opts("nosuch")).unwrap_err();
    assert_eq!(ours.to_string(), e);
    drop(drive);

    let qd_d = std::fs::read(qd.join("D.img")).unwrap();
    assert!(qd_d == std::fs::read(qd.join("A.img")).unwrap(), "QEMU's D");
    assert!(
        qd_d == std::fs::read(od.join("D.img")).unwrap(),
        "D differs from QEMU's"
    );
    let events = seen.lock().unwrap().clone();
    let json_of = |name: &str| {
        events
            .iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .find(|v| v["event"] == name)
            .unwrap_or_else(|| panic!("no {name} in {events:?}"))["data"]
            .clone()
    };
    for (ours, theirs) in [
        (json_of("BLOCK_JOB_READY"), ready),
        (json_of("BLOCK_JOB_COMPLETED"), done),
    ] {
        for k in ["type", "len", "offset", "speed"] {
            assert_eq!(ours[k], theirs[k], "{k}: {ours} vs {theirs}");
        }
    }
}
