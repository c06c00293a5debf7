//! The write side of the mapping API on its own: `reserve_write` → the
//! caller writes at the host offsets → `commit` reads back; `abort` (and
//! drop) leave the image clean; a crash between the caller's data write and
//! the commit leaves only leaks (every prefix of the recorded writes
//! replayed).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;
use crate::support::testing::{replay, FaultyStorage};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;

/// Writes `data` at `offset` through the mapping API, the data going
/// straight to `file` (the caller's own I/O); returns how many
/// reservations it took.
fn mapped_write(img: &Image, file: &dyn Storage, data: &[u8], offset: u64) -> usize {
    let mut done = 0usize;
    let mut steps = 0;
    while done < data.len() {
        let res = img
            .reserve_write(offset + done as u64, (data.len() - done) as u64)
            .unwrap();
        assert!(!res.is_empty());
        let mut pos = offset + done as u64;
        for e in res.extents() {
            assert_eq!(e.guest, pos, "extents tile the request");
            let at = (e.guest - offset) as usize;
            file.write_at(&data[at..at + e.len as usize], e.host)
                .unwrap();
            pos += e.len;
        }
        done += res.len() as usize;
        res.commit().unwrap();
        steps += 1;
    }
    steps
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Allocating (new clusters, partial clusters completed by copy-on-write,
/// runs across L2 slices) and in-place reservations, committed: the image
/// reads back as the model, and qemu-img agrees (check clean, same bytes).
#[test]
fn reserve_write_commit_reads_back() {
    for opts in ["cluster_size=4096", "cluster_size=65536,extended_l2=on"] {
        let o = CreateOptions::from_qemu_str(opts).unwrap();
        let size = 4u64 << 20;
        let mem = support::mem_create(&o, size);
        let img = support::mem_open(&mem, &OpenOptions::new()).unwrap();
        let mut model = vec![0u8; size as usize];
        let cases: [(u64, usize, u8); 6] = [
            (1000, 3000, 1),       // inside one cluster: COW head and tail
            (0, 200_000, 2),       // many clusters, over the first write
            (150_000, 10, 3),      // in place
            (1 << 20, 1 << 20, 4), // whole clusters
            (3 << 20, 123_457, 5), // unaligned end
            (100, 2_000_000, 6),   // over everything, in place and new
        ];
        for (off, len, seed) in cases {
            let data = pattern(len, seed);
            mapped_write(&img, &*mem, &data, off);
            model[off as usize..off as usize + len].copy_from_slice(&data);
            let mut back = vec![0u8; size as usize];
            img.read_at(&mut back, 0).unwrap();
            assert_eq!(
                support::first_diff(&back, &model),
                None,
                "{opts}: after writing {len} at {off}"
            );
        }
        img.close().unwrap();
        if support::have_qemu() {
            let dir = tempfile::tempdir().unwrap();
            let path = support::write_file(dir.path(), "m.qcow2", &mem.to_vec());
            support::assert_check_clean(&path, opts);
            let raw = dir.path().join("m.raw");
            let out = std::process::Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(&path)
                .arg(&raw)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            assert_eq!(
                std::fs::read(&raw).unwrap(),
                model,
                "{opts}: qemu-img's view"
            );
        }
    }
}

/// Aborted and dropped reservations (allocating, with copy-on-write, and in
/// place): nothing is linked, the old content reads back, later requests on
/// the same clusters proceed, and the closed image is clean (no leak).
#[test]
fn reserve_abort_leaves_the_image_clean() {
    let o = CreateOptions::from_qemu_str("cluster_size=4096").unwrap();
    let mem = support::mem_create(&o, 1 << 20);
    let img = support::mem_open(&mem, &OpenOptions::new()).unwrap();
    img.write_at(&[7; 6000], 2000).unwrap();
    let mut before = vec![0u8; 1 << 20];
    img.read_at(&mut before, 0).unwrap();
    for (off, len) in [(100u64, 50_000u64), (3000, 10), (200_000, 8192)] {
        for drop_it in [false, true] {
            let res = img.reserve_write(off, len).unwrap();
            for e in res.extents() {
                // Junk where an allocating run's data would go; an in-place
                // run is left alone (its bytes would stay written).
                if e.host >= mem.len().unwrap() || e.guest >= 8000 {
                    mem.write_at(&vec![0xee; e.len as usize], e.host).unwrap();
                }
            }
            if drop_it {
                drop(res);
            } else {
                res.abort();
            }
            let mut back = vec![0u8; 1 << 20];
            img.read_at(&mut back, 0).unwrap();
            assert_eq!(support::first_diff(&back, &before), None, "{off}+{len}");
        }
    }
    // The clusters are free again and the guest range writable.
    img.write_at(&[9; 4096], 200_000).unwrap();
    before[200_000..204_096].fill(9);
    let mut back = vec![0u8; 1 << 20];
    img.read_at(&mut back, 0).unwrap();
    assert_eq!(support::first_diff(&back, &before), None);
    img.close().unwrap();
    if support::have_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "a.qcow2", &mem.to_vec());
        support::assert_check_clean(&path, "after aborted reservations");
    }
}

/// A crash after the caller wrote the data of an allocating reservation
/// (and even after a flush made the reserved refcounts durable) but before
/// the commit: every prefix of the recorded writes opens, reads the old
/// content, and qemu-img check finds leaks at most; with the flush, the
/// reserved clusters are exactly the leaks.
#[test]
fn crash_between_data_write_and_commit_leaves_only_leaks() {
    let o = CreateOptions::from_qemu_str("cluster_size=4096").unwrap();
    let mem = support::mem_create(&o, 1 << 20);
    {
        let img = support::mem_open(&mem, &OpenOptions::new()).unwrap();
        img.write_at(&[5; 10_000], 1000).unwrap();
        img.close().unwrap();
    }
    let base = mem.to_vec();
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
    let img = Image::open_storage(fs.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    let mut old = vec![0u8; 1 << 20];
    img.read_at(&mut old, 0).unwrap();
    fs.start_recording();
    // New clusters after the written ones (the first partly covered).
    let res = img.reserve_write(14_000, 20_000).unwrap();
    assert_eq!(res.len(), 20_000);
    for e in res.extents() {
        fs.write_at(&vec![0xab; e.len as usize], e.host).unwrap();
    }
    // Make the reservation's refcounts durable; nothing links the clusters
    // (an allocating reservation holds no barrier ticket: flush proceeds).
    img.flush().unwrap();
    let log = fs.take_log();
    // The crash happened here; let the handle go (not part of the log).
    drop(res);
    drop(img);
    assert!(!log.is_empty());
    let qemu = support::have_qemu();
    let dir = tempfile::tempdir().unwrap();
    for p in 0..=log.len() {
        let bytes = replay(&base, &log[..p]);
        let m = Arc::new(MemStorage::from_bytes(bytes.clone()));
        let i2 = Image::open_storage(m as Arc<dyn Storage>, &OpenOptions::new().read_only(true))
            .unwrap_or_else(|e| panic!("prefix {p}: open: {e}"));
        let mut back = vec![0u8; 1 << 20];
        i2.read_at(&mut back, 0).unwrap();
        assert_eq!(support::first_diff(&back, &old), None, "prefix {p}");
        if qemu {
            let path = support::write_file(dir.path(), "c.qcow2", &bytes);
            support::assert_no_corruption(&path, &format!("prefix {p}"));
            if p == log.len() {
                let c = support::qemu_check(&path);
                // Clusters 3..=8 were reserved (guest 12288..36864).
                assert!(c.leaks >= 6, "the reserved clusters leak: {c:?}");
            }
        }
    }
}

/// A reservation whose own first file write fails (after a discard freed a
/// cluster inside the file, so the new cluster may have to be completed
/// around the guest range) returns the error and releases its clusters; one
/// whose caller's data write fails is aborted. Either way the image stays usable and closes clean.
#[test]
fn failed_writes_release_the_reservation() {
    use crate::support::testing::{Fault, FaultKind, FaultOp};
    let o = CreateOptions::from_qemu_str("cluster_size=4096").unwrap();
    let mem = support::mem_create(&o, 1 << 20);
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(mem.to_vec())));
    let img = Image::open_storage(fs.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    img.write_at(&[1; 4 * 4096], 0).unwrap();
    img.flush().unwrap();
    img.discard(4096, 4096).unwrap();
    img.flush().unwrap();
    let eio = Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: false,
    });
    // The first file write the reservation does fails.
    fs.set_fault(eio);
    let r = img.reserve_write(40_000, 100);
    assert!(matches!(r, Err(qcow2kit::Error::Io { .. })), "{r:?}");
    drop(r);
    fs.set_fault(None);
    // The caller's own write fails: it aborts.
    let res = img.reserve_write(80_000, 5000).unwrap();
    fs.set_fault(eio);
    let e = res.extents()[0];
    assert!(fs.write_at(&[2; 5000], e.host).is_err());
    fs.set_fault(None);
    res.abort();
    let mut back = vec![9u8; 100_000];
    img.read_at(&mut back, 0).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 1));
    assert!(back[16_384..].iter().all(|&b| b == 0), "nothing was linked");
    img.write_at(&[3; 100], 40_000).unwrap();
    img.close().unwrap();
    if support::have_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "f.qcow2", &fs.inner().to_vec());
        support::assert_check_clean(&path, "after failed reservations");
    }
}
