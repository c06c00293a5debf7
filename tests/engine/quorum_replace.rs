//! A mirror with `replaces` rebuilds a quorum child: a qcow2 image on a
//! quorum of three files (vote-threshold 2), one of them damaged (bytes
//! flipped) or lost (recreated empty), is mirrored into a fresh file that
//! replaces the bad child. Writers keep writing through the drive while the
//! job runs, readers check that no read ever returns bad data, and at the
//! end the three children are byte-identical.

use qcow2kit::job::{mirror, Drive, DriveNode, JobOptions, JobOutcome, JobStatus, MirrorOptions};
use qcow2kit::storage::{open_from_options, BackendSpec, FileStorage};
use qcow2kit::{CreateOptions, Error, Image, OpenOptions};
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
    let job = mirror(drive.clone(), fresh(d, "D.img"), opts("replica-c")).unwrap();
    // One writer (its writes are the model's, in order) and one reader of
    // the whole disk, which must always see the model where no write is
    // in flight: the writer holds the model lock across each write.
    let writer = {
        let (drive, model, stop) = (drive.clone(), model.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 8 {
                let off = (n * 1_234_567) % (SIZE - 65536);
                let data = vec![(n % 251) as u8 + 1; 65536];
                let mut m = model.lock().unwrap();
                drive.write_at(&data, off).unwrap();
                m[off as usize..off as usize + data.len()].copy_from_slice(&data);
                n += 1;
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
    // A write after ready (racing the completion) reaches the new child.
    drive.write_at(&[0xee; 4096], 7 * MIB).unwrap();
    model.lock().unwrap()[7 * MIB as usize..7 * MIB as usize + 4096].fill(0xee);
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
