//! Crash consistency of persistent dirty bitmaps: a session writes to an
//! image with bitmaps made by `qemu-img bitmap`, flushes and closes (which
//! stores the bitmaps) on a recording `FaultyStorage`; every prefix of the
//! recorded writes, and the durable prefix plus a random subset of the
//! unflushed writes, is replayed. Each bitmap must be either as before the
//! session, flagged `in_use`, or exactly as stored by the completed close
//! (never silently wrong); the disabled bitmap's bits never change; guest data
//! flushed before the store reads back; the image opens read-write here
//! and `qemu-img check` finds no corruption (sampled cuts).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use crate::support::testing::{replay, FaultyStorage, RecordedOp};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{Image, OpenOptions};
use std::sync::Arc;
use support::bitmaps::{granules, stored_bitmaps, StoredBitmap};
use support::{qemu_img, qemu_io, Rng};

const SIZE: u64 = 4 << 20;

#[test]
fn bitmap_store_crash_replay() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = dir.path().join("b.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    qemu_img(&["bitmap", "--add", "-g", "65536", ps, "b64k"]);
    qemu_img(&["bitmap", "--add", ps, "bdis"]);
    qemu_io(&p, &["write -P 7 1M 192k".into()]);
    qemu_img(&["bitmap", "--disable", ps, "bdis"]);
    qemu_img(&["bitmap", "--add", "-g", "512", ps, "b512"]);
    let base = std::fs::read(&p).unwrap();
    let old = stored_bitmaps(&base).unwrap();

    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
    fs.start_recording();
    let img = Image::open_storage(fs.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    img.read_at(&mut model, 0).unwrap();
    let mut rng = Rng::new(18);
    let mut touched = Vec::new();
    for _ in 0..24 {
        let off = rng.below(SIZE - 1);
        let len = (1 + rng.below(100_000)).min(SIZE - off);
        match rng.below(4) {
            0 => {
                img.write_zeroes(off, len, rng.chance(50)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                // Only whole clusters read back as zeroes; keep the model
                // exact by discarding cluster-aligned ranges.
                let a = off / 65536 * 65536;
                let l = len.div_ceil(65536) * 65536;
                let l = l.min(SIZE - a);
                img.discard(a, l).unwrap();
                model[a as usize..(a + l) as usize].fill(0);
                touched.push((a, l));
                continue;
            }
            _ => {
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                img.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
        }
        touched.push((off, len));
    }
    img.flush().unwrap();
    let mut log = fs.take_log();
    let flushed_at = log.len();
    fs.start_recording();
    img.close().unwrap();
    log.extend(fs.take_log());
    let done = replay(&base, &log);
    let new = stored_bitmaps(&done).unwrap();

    // The completed store is exact.
    for (name, g) in [("b64k", 16u8), ("b512", 9)] {
        let mut want = old
            .iter()
            .find(|b| b.name == name)
            .unwrap()
            .dirty
            .clone()
            .unwrap();
        want.extend(touched.iter().flat_map(|&(o, l)| granules(g, o, l)));
        let got = new.iter().find(|b| b.name == name).unwrap();
        assert_eq!(got.dirty.as_ref(), Some(&want), "{name} after close");
    }
    assert_eq!(
        new.iter().find(|b| b.name == "bdis"),
        old.iter().find(|b| b.name == "bdis")
    );

    // How often b64k was seen as before, flagged in_use, and as stored.
    let seen = std::cell::Cell::new([0usize; 3]);
    let check_bitmaps = |bytes: &[u8], what: &str, cut: usize| {
        let Some(now) = stored_bitmaps(bytes) else {
            // The autoclear bit is clear only inside the in_use update
            // before the first write: QEMU drops the bitmaps, never uses them.
            assert!(cut < flushed_at, "{what}: bitmaps dropped during the store");
            return;
        };
        assert_eq!(now.len(), old.len(), "{what}");
        for b in &now {
            let was: &StoredBitmap = old.iter().find(|o| o.name == b.name).unwrap();
            let will = new.iter().find(|o| o.name == b.name).unwrap();
            // Every consistent bitmap, the disabled one too, is flagged
            // in_use before the first write (as QEMU's read-write open does).
            let flagged = b.dirty.is_none();
            assert!(
                b == was || b == will || flagged,
                "{what}: bitmap {} silently wrong: {b:?}",
                b.name
            );
            if b.name == "b64k" {
                let mut s = seen.get();
                s[if b == was {
                    0
                } else if flagged {
                    1
                } else {
                    2
                }] += 1;
                seen.set(s);
            }
        }
    };
    let mut crng = Rng::new(1818);
    let sample = (log.len() / 12).max(1);
    for cut in 0..=log.len() {
        let durable = log[..cut]
            .iter()
            .rposition(|o| *o == RecordedOp::Flush)
            .map_or(0, |i| i + 1);
        let prefix = replay(&base, &log[..cut]);
        let kept: Vec<RecordedOp> = log[durable..cut]
            .iter()
            .filter(|_| crng.chance(50))
            .cloned()
            .collect();
        let subset = replay(&replay(&base, &log[..durable]), &kept);
        for (bytes, kind) in [(prefix, "prefix"), (subset, "subset")] {
            let what = format!("cut {cut}/{} ({kind})", log.len());
            check_bitmaps(&bytes, &what, cut);
            if durable >= flushed_at {
                let mem = Arc::new(MemStorage::from_bytes(bytes.clone()));
                let img = Image::open_storage(mem.clone() as Arc<dyn Storage>, &OpenOptions::new())
                    .unwrap_or_else(|e| panic!("{what}: read-write open failed: {e}"));
                let mut back = vec![0u8; SIZE as usize];
                img.read_at(&mut back, 0).unwrap();
                assert!(back == model, "{what}: flushed guest data differs");
                drop(img);
            }
            if cut % sample == 0 || cut == log.len() {
                let f = dir.path().join("crash.qcow2");
                std::fs::write(&f, &bytes).unwrap();
                support::assert_no_corruption(&f, &what);
            }
        }
    }
    let [before, flagged, stored] = seen.get();
    assert!(
        before > 0 && flagged > 0 && stored > 0,
        "states seen: {:?}",
        seen.get()
    );
}

/// A write failing at each point of the store: `close` reports it (no
/// panic), and the file left behind has the bitmap flagged `in_use` or
/// exactly stored, with the guest data intact.
#[test]
fn failed_store_never_leaves_a_wrong_bitmap() {
    use crate::support::testing::{Fault, FaultKind, FaultOp};
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = dir.path().join("f.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    qemu_img(&["bitmap", "--add", "-g", "4096", ps, "b4k"]);
    let base = std::fs::read(&p).unwrap();
    let want: std::collections::BTreeSet<u64> = granules(12, 70_000, 200_000)
        .chain(granules(12, 3 << 20, 5))
        .collect();
    let mut failed = 0;
    for nth in 0.. {
        let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
        let img = Image::open_storage(fs.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
        img.write_at(&[7; 200_000], 70_000).unwrap();
        img.write_zeroes(3 << 20, 5, false).unwrap();
        img.flush().unwrap();
        fs.set_fault(Some(Fault {
            op: FaultOp::Write,
            nth,
            kind: FaultKind::Eio,
            persistent: true,
        }));
        let r = img.close();
        fs.set_fault(None);
        let bytes = fs.inner().to_vec();
        let b = stored_bitmaps(&bytes).expect("bitmaps kept")[0].clone();
        assert!(
            b.dirty.is_none() || b.dirty.as_ref() == Some(&want),
            "write {nth} failing: silently wrong bitmap {b:?}"
        );
        let mem = Arc::new(MemStorage::from_bytes(bytes));
        let back = Image::open_storage(mem as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
        let mut buf = vec![0u8; 200_000];
        back.read_at(&mut buf, 70_000).unwrap();
        assert!(
            buf.iter().all(|&x| x == 7),
            "write {nth} failing: data lost"
        );
        if r.is_ok() {
            assert_eq!(b.dirty, Some(want), "clean close");
            break;
        }
        failed += 1;
    }
    assert!(failed > 3, "the store made only {failed} writes");
}

/// Runs `session` (which ends by closing the image) on a recording storage
/// over `base`; returns the recorded operations and how many of them came
/// before the close.
fn record(base: &[u8], session: impl FnOnce(&Image)) -> (Vec<RecordedOp>, usize) {
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.to_vec())));
    fs.start_recording();
    let img = Image::open_storage(fs.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    session(&img);
    let mut log = fs.take_log();
    let before_close = log.len();
    fs.start_recording();
    img.close().unwrap();
    log.extend(fs.take_log());
    (log, before_close)
}

/// Every prefix of `log` replayed over `base`, and for each the durable
/// part plus a random subset of the writes since the last flush: `check`
/// gets the bytes, a description and the cut; the images must open
/// read-write, and a sample passes `qemu-img check` without corruption.
fn each_crash(
    base: &[u8],
    log: &[RecordedOp],
    seed: u64,
    mut check: impl FnMut(&[u8], &str, usize),
) {
    let dir = support::scratch();
    let mut rng = Rng::new(seed);
    let sample = (log.len() / 10).max(1);
    for cut in 0..=log.len() {
        let durable = log[..cut]
            .iter()
            .rposition(|o| *o == RecordedOp::Flush)
            .map_or(0, |i| i + 1);
        let prefix = replay(base, &log[..cut]);
        let kept: Vec<RecordedOp> = log[durable..cut]
            .iter()
            .filter(|_| rng.chance(50))
            .cloned()
            .collect();
        let subset = replay(&replay(base, &log[..durable]), &kept);
        for (bytes, kind) in [(prefix, "prefix"), (subset, "subset")] {
            let what = format!("cut {cut}/{} ({kind})", log.len());
            check(&bytes, &what, cut);
            let mem = Arc::new(MemStorage::from_bytes(bytes.clone()));
            Image::open_storage(mem as Arc<dyn Storage>, &OpenOptions::new())
                .unwrap_or_else(|e| panic!("{what}: read-write open failed: {e}"))
                .close()
                .unwrap();
            if cut % sample == 0 || cut == log.len() {
                let f = dir.path().join("crash.qcow2");
                std::fs::write(&f, &bytes).unwrap();
                support::assert_no_corruption(&f, &what);
            }
        }
    }
}

fn by_name<'a>(bms: &'a [StoredBitmap], name: &str) -> Option<&'a StoredBitmap> {
    bms.iter().find(|b| b.name == name)
}

/// A store that adds, removes, clears and merges (a new directory of another
/// size: the extension's payload is the commit point): at every crash each
/// bitmap is as before the session, flagged in_use, or exactly as the
/// completed store left it; the added one absent or exact; the removed one
/// present (old or flagged) or gone; never silently wrong.
#[test]
fn management_store_crash_replay() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = dir.path().join("m.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    qemu_img(&["bitmap", "--add", ps, "keep"]);
    qemu_img(&["bitmap", "--add", ps, "gone"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", ps, "clr"]);
    qemu_io(&p, &["write 1M 100k".into()]);
    qemu_img(&["bitmap", "--disable", ps, "gone"]);
    let base = std::fs::read(&p).unwrap();
    let old = stored_bitmaps(&base).unwrap();
    let g =
        |b: u8, o: u64, l: u64| -> std::collections::BTreeSet<u64> { granules(b, o, l).collect() };
    let (w1, w2, w3) = (
        (100_000u64, 5000u64),
        (2 << 20, 70_000u64),
        (3 << 20, 4096u64),
    );
    let (log, before_close) = record(&base, |img| {
        img.write_at(&[1; 5000], w1.0).unwrap();
        img.add_bitmap("new", Some(512)).unwrap();
        img.write_zeroes(w2.0, w2.1, false).unwrap();
        img.remove_bitmap("gone").unwrap();
        img.clear_bitmap("clr").unwrap();
        img.merge_bitmap("new", "keep").unwrap();
        img.write_at(&[3; 4096], w3.0).unwrap();
    });
    let done = replay(&base, &log);
    let new = stored_bitmaps(&done).unwrap();
    // The completed store, exactly.
    let mut keep = by_name(&old, "keep").unwrap().dirty.clone().unwrap();
    for (o, l) in [w1, w2, w3] {
        keep.extend(granules(16, o, l));
    }
    let mut newbits = g(9, w2.0, w2.1);
    for &b in &keep {
        if b << 16 < 3 << 20 || b << 16 >= (3 << 20) + 65536 {
            newbits.extend(granules(9, b << 16, 1 << 16));
        }
    }
    newbits.extend(g(9, w3.0, w3.1));
    assert_eq!(by_name(&new, "keep").unwrap().dirty.as_ref(), Some(&keep));
    assert_eq!(
        by_name(&new, "clr").unwrap().dirty.as_ref(),
        Some(&g(12, w3.0, w3.1))
    );
    assert_eq!(by_name(&new, "new").unwrap().dirty.as_ref(), Some(&newbits));
    assert!(by_name(&new, "gone").is_none());
    let names: Vec<&str> = new.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["keep", "clr", "new"]);

    let mut seen_commit = [false; 2];
    each_crash(&base, &log, 1919, |bytes, what, cut| {
        let Some(now) = stored_bitmaps(bytes) else {
            // Only inside the in_use update before the first write.
            assert!(
                cut < before_close,
                "{what}: bitmaps dropped during the store"
            );
            return;
        };
        let committed = by_name(&now, "new").is_some();
        seen_commit[usize::from(committed)] = true;
        assert_eq!(by_name(&now, "gone").is_none(), committed, "{what}");
        for b in &now {
            let was = by_name(&old, &b.name);
            let will = by_name(&new, &b.name);
            let ok = Some(b) == was || Some(b) == will || (b.dirty.is_none() && was.is_some());
            assert!(ok, "{what}: bitmap {} silently wrong: {b:?}", b.name);
        }
    });
    assert_eq!(seen_commit, [true, true]);
}

/// The first bitmap of an image (the header gains the extension in one
/// write) and the last one removed (the header loses it): a crash leaves
/// the image as before or exactly as after, nothing in between.
#[test]
fn header_extension_add_and_remove_crash_replay() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = dir.path().join("h.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    let base = std::fs::read(&p).unwrap();
    let (log, _) = record(&base, |img| {
        img.add_bitmap("first", Some(4096)).unwrap();
        img.write_at(&[9; 10_000], 123_456).unwrap();
    });
    let added = stored_bitmaps(&replay(&base, &log)).unwrap();
    let want: std::collections::BTreeSet<u64> = granules(12, 123_456, 10_000).collect();
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].dirty.as_ref(), Some(&want));
    let mut states = [0usize; 2];
    each_crash(&base, &log, 2020, |bytes, what, _| {
        match stored_bitmaps(bytes) {
            None => states[0] += 1,
            Some(b) => {
                assert_eq!(b, added, "{what}");
                states[1] += 1;
            }
        }
    });
    assert!(states[0] > 0 && states[1] > 0, "{states:?}");

    // Now remove it again.
    let base = replay(&base, &log);
    let (log, _) = record(&base, |img| img.remove_bitmap("first").unwrap());
    assert_eq!(stored_bitmaps(&replay(&base, &log)), None);
    let mut states = [0usize; 2];
    each_crash(&base, &log, 2121, |bytes, what, _| {
        match stored_bitmaps(bytes) {
            None => states[0] += 1,
            Some(b) => {
                assert_eq!(b, added, "{what}");
                states[1] += 1;
            }
        }
    });
    assert!(states[0] > 0 && states[1] > 0, "{states:?}");
    let f = dir.path().join("removed.qcow2");
    std::fs::write(&f, replay(&base, &log)).unwrap();
    support::assert_check_clean(&f, "after removing the last bitmap");
}
