//! Lazy refcounts: the dirty bit is set (and synced) before refcounts go
//! stale, and cleared by a clean close.

use crate::support::testing::{FaultyStorage, RecordedOp};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Error, Image, OpenOptions};
use std::sync::Arc;

fn incompat(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[72..80].try_into().unwrap())
}

fn new_image(opts: &str) -> Arc<FaultyStorage<MemStorage>> {
    let s = Arc::new(FaultyStorage::new(MemStorage::new()));
    qcow2kit::create::create_on(
        s.clone(),
        &CreateOptions::from_qemu_str(opts).unwrap(),
        64 << 20,
    )
    .unwrap();
    s
}

#[test]
fn create_sets_the_compatible_bit_and_v2_is_refused() {
    let s = new_image("lazy_refcounts=on");
    let b = s.inner().to_vec();
    assert_eq!(u64::from_be_bytes(b[80..88].try_into().unwrap()), 1);
    let v2 = CreateOptions::from_qemu_str("compat=0.10,lazy_refcounts=on").unwrap();
    let err = qcow2kit::create::create_on(Arc::new(MemStorage::new()), &v2, 1 << 20).unwrap_err();
    assert!(
        err.to_string()
            .contains("Lazy refcounts only supported with compatibility level 1.1"),
        "{err}"
    );
    let s = new_image("compat=0.10");
    let err = Image::open_storage(s, &OpenOptions::from_qemu_str("lazy-refcounts=on").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(
        err.to_string()
            .contains("Lazy refcounts require a qcow2 image with at least qemu 1.1"),
        "{err}"
    );
}

#[test]
fn dirty_bit_is_durable_before_an_l2_entry_and_cleared_on_close() {
    for (create, open) in [
        ("lazy_refcounts=on", ""),
        ("lazy_refcounts=off", "lazy-refcounts=on"),
    ] {
        let s = new_image(create);
        let opts = OpenOptions::from_qemu_str(open).unwrap();
        let img = Image::open_storage(s.clone(), &opts).unwrap();
        s.start_recording();
        img.write_at(&[7; 65536], 0).unwrap();
        img.flush().unwrap();
        let log = s.take_log();
        // The dirty bit (header offset 72) is written and flushed before any
        // L2 entry or L1 entry that references the new clusters.
        let pos = |f: &dyn Fn(&RecordedOp) -> bool| log.iter().position(f);
        let dirty =
            pos(&|op| matches!(op, RecordedOp::Write { offset: 72, data } if data[7] & 1 == 1))
                .expect("dirty bit written");
        let l2_entry = pos(&|op| {
            matches!(op, RecordedOp::Write { offset: 0x40000, data } if data.iter().any(|b| *b != 0))
        })
        .expect("L2 entry written");
        let l1_entry = pos(&|op| {
            matches!(
                op,
                RecordedOp::Write {
                    offset: 0x30000,
                    ..
                }
            )
        })
        .expect("L1 written");
        assert!(
            dirty < l2_entry && dirty < l1_entry,
            "dirty {dirty}, L2 {l2_entry}, L1 {l1_entry}"
        );
        assert_eq!(log[dirty + 1], RecordedOp::Flush);
        assert_eq!(incompat(&s.inner().to_vec()) & 1, 1, "dirty while open");
        img.close().unwrap();
        assert_eq!(incompat(&s.inner().to_vec()) & 1, 0, "clean after close");
        // And the image reads back.
        let img = Image::open_storage(s.clone(), &OpenOptions::new().read_only(true)).unwrap();
        let mut b = [0u8; 512];
        img.read_at(&mut b, 65024).unwrap();
        assert_eq!(b, [7; 512]);
    }
}

#[test]
fn without_lazy_refcounts_the_dirty_bit_is_never_set() {
    let s = new_image("lazy_refcounts=on");
    let img = Image::open_storage(
        s.clone(),
        &OpenOptions::from_qemu_str("lazy-refcounts=off").unwrap(),
    )
    .unwrap();
    img.write_at(&[7; 65536], 0).unwrap();
    img.flush().unwrap();
    assert_eq!(incompat(&s.inner().to_vec()) & 1, 0);
    img.close().unwrap();
    let _ = s.len();
}

fn qemu_check_json(bytes: &[u8]) -> Option<serde_json::Value> {
    let dir = tempfile::tempdir().ok()?;
    let p = dir.path().join("c.qcow2");
    std::fs::write(&p, bytes).ok()?;
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output", "json"])
        .arg(&p)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Crash replay in lazy mode: every prefix of the recorded writes, opened
/// read-write, is repaired on open; afterwards `qemu-img check` is clean
/// (no leaks, no corruptions) and data flushed before the cut is intact.
/// Read-only opens of the same prefixes read without error.
#[test]
fn lazy_crash_replay_is_repaired_on_open() {
    let base_store = new_image("lazy_refcounts=on,cluster_size=4096");
    let base = base_store.inner().to_vec();
    let s = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
    let img = Image::open_storage(s.clone(), &OpenOptions::new()).unwrap();
    s.start_recording();
    // Flushed checkpoints: (number of log entries at the flush, data so far).
    let mut model = vec![0u8; 4 << 20];
    let mut checkpoints: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut rec = Vec::new();
    for (i, (off, len)) in [
        (0u64, 8192usize),
        (1 << 20, 300_000),
        (5000, 100),
        (3 << 20, 70_000),
    ]
    .iter()
    .enumerate()
    {
        let data = vec![i as u8 + 1; *len];
        img.write_at(&data, *off).unwrap();
        model[*off as usize..*off as usize + len].copy_from_slice(&data);
        if i % 2 == 1 {
            img.flush().unwrap();
            rec.extend(s.take_log());
            s.start_recording();
            checkpoints.push((rec.len(), model.clone()));
        }
    }
    img.discard(1 << 20, 64 << 10).unwrap();
    img.flush().unwrap();
    rec.extend(s.take_log());
    model[1 << 20..(1 << 20) + (64 << 10)].fill(0);
    checkpoints.push((rec.len(), model.clone()));
    std::mem::forget(img); // a crash: no clean close
                           // For each checkpoint, the bytes written (or discarded) after it.
    let writes: [(usize, usize, usize); 5] = [
        (0, 0, 8192),
        (0, 1 << 20, 300_000),
        (1, 5000, 100),
        (1, 3 << 20, 70_000),
        (2, 1 << 20, 64 << 10),
    ];
    let touched_after: Vec<Vec<bool>> = (0..checkpoints.len())
        .map(|k| {
            let mut t = vec![false; 4 << 20];
            for (after, off, len) in writes {
                if after > k {
                    t[off..off + len].fill(true);
                }
            }
            t
        })
        .collect();
    let qemu = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok();
    let step = if std::env::var("QCOW2KIT_ALL_PREFIXES").is_ok() {
        1
    } else {
        (rec.len() / 40).max(1)
    };
    let mut cuts: Vec<usize> = (0..=rec.len()).step_by(step).collect();
    cuts.extend(checkpoints.iter().map(|c| c.0));
    cuts.push(rec.len());
    for cut in cuts {
        let bytes = crate::support::testing::replay(&base, &rec[..cut]);
        // Read-only: opens and reads without repair or writes.
        let ro = Arc::new(MemStorage::from_bytes(bytes.clone()));
        let img = Image::open_storage(ro.clone(), &OpenOptions::new().read_only(true)).unwrap();
        let mut buf = vec![0u8; 4 << 20];
        img.read_at(&mut buf, 0).unwrap();
        drop(img);
        assert_eq!(ro.to_vec(), bytes, "read-only open wrote nothing");
        // Read-write: repaired on open.
        let rw = Arc::new(MemStorage::from_bytes(bytes.clone()));
        let img = Image::open_storage(rw.clone(), &OpenOptions::new()).unwrap();
        let was_dirty = incompat(&bytes) & 1 == 1;
        assert_eq!(img.dirty_repair_report().is_some(), was_dirty, "cut {cut}");
        img.read_at(&mut buf, 0).unwrap();
        if let Some(k) = checkpoints.iter().rposition(|c| c.0 <= cut) {
            // Bytes not written again after the checkpoint must be as flushed
            // (later, unflushed writes may or may not have landed).
            let m = &checkpoints[k].1;
            let later = &touched_after[k];
            let bad = (0..buf.len()).find(|&i| !later[i] && buf[i] != m[i]);
            assert!(bad.is_none(), "cut {cut}: flushed byte {bad:?} changed");
        }
        img.close().unwrap();
        let after = rw.to_vec();
        assert_eq!(incompat(&after) & 1, 0, "clean after repair and close");
        if qemu {
            let v = qemu_check_json(&after).unwrap();
            assert_eq!(v.get("corruptions"), None, "cut {cut}: {v}");
            assert_eq!(v.get("leaks"), None, "cut {cut}: {v}");
        }
    }
}

/// An image left dirty by QEMU (`qemu-io` with lazy refcounts, then `abort`)
/// is repaired on a read-write open with the same result as
/// `qemu-img check -r all` on a twin.
#[test]
fn image_left_dirty_by_qemu_is_repaired_like_qemu() {
    use std::process::Command;
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("skipping: qemu-io missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on"])
        .arg(&a)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let _ = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 6 0 64k",
            "-c",
            "write -P 7 1M 128k",
            "-c",
            "abort",
        ])
        .arg(&a)
        .output()
        .unwrap();
    std::fs::copy(&a, &b).unwrap();
    assert_eq!(
        incompat(&std::fs::read(&a).unwrap()) & 1,
        1,
        "QEMU left the image dirty"
    );
    let img = Image::open(&a, &OpenOptions::new()).unwrap();
    assert!(img.dirty_repair_report().is_some());
    img.close().unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "-r", "all"])
        .arg(&b)
        .output()
        .unwrap();
    assert!(out.status.success());
    for p in [&a, &b] {
        let out = Command::new("qemu-img")
            .args(["check", "--output", "json"])
            .arg(p)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v.get("corruptions"), None, "{v}");
        assert_eq!(v.get("leaks"), None, "{v}");
        assert_eq!(incompat(&std::fs::read(p).unwrap()) & 1, 0);
    }
    let ra = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&a)
        .arg(dir.path().join("a.raw"))
        .status()
        .unwrap();
    let rb = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&b)
        .arg(dir.path().join("b.raw"))
        .status()
        .unwrap();
    assert!(ra.success() && rb.success());
    assert!(
        std::fs::read(dir.path().join("a.raw")).unwrap()
            == std::fs::read(dir.path().join("b.raw")).unwrap()
    );
}
