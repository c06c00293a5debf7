//! Crash replay of repairs: the writes of a repair are recorded with
//! `FaultyStorage` and every prefix is replayed onto the damaged image. Each
//! prefix must check no worse with qemu-img than the damaged original (no
//! more corruptions, no more check errors), and the finished repair clean.
//! Also: an I/O error in the middle of a repair is an `Err`, not a panic,
//! and leaves an image no worse than before.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use crate::support::testing::{replay, Fault, FaultKind, FaultOp, FaultyStorage, RecordedOp};
use crate::support::*;
use qcow2kit::check::{check_storage, CheckOptions, Repair};
use qcow2kit::storage::MemStorage;
use std::sync::Arc;

fn qemu_counts(dir: &std::path::Path, bytes: &[u8]) -> (i32, (u64, u64, u64)) {
    let img = Img {
        dir: dir.to_path_buf(),
    };
    std::fs::write(img.path(), bytes).unwrap();
    let r = img.qemu_check(&["--output", "json"]);
    if r.out.trim().is_empty() {
        return (r.code, (u64::MAX, u64::MAX, u64::MAX));
    }
    (r.code, counts(&json(&r.out)))
}

/// Repairs `damaged` in memory while recording, then replays every prefix.
fn replay_every_prefix(damaged: &[u8], repair: Repair) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let (_, orig) = qemu_counts(dir.path(), damaged);
    let store = Arc::new(FaultyStorage::new(MemStorage::from_bytes(damaged.to_vec())));
    store.start_recording();
    let report = check_storage(store.clone(), repair, CheckOptions::default()).unwrap();
    let ops = store.take_log();
    assert!(report.double_checked, "something was repaired");
    let writes = ops
        .iter()
        .filter(|o| !matches!(o, RecordedOp::Flush))
        .count();
    assert!(writes > 0);
    for k in 0..=ops.len() {
        // Only prefixes that end right after a mutating call are new states.
        if k > 0 && matches!(ops[k - 1], RecordedOp::Flush) {
            continue;
        }
        let image = replay(damaged, &ops[..k]);
        let (code, c) = qemu_counts(dir.path(), &image);
        assert!(
            c.0 <= orig.0 && c.2 <= orig.2,
            "prefix {k}/{} of the repair is worse than the damaged image: {c:?} vs {orig:?} \
             (exit {code}); ops so far: {:?}",
            ops.len(),
            ops[..k]
                .iter()
                .map(|o| match o {
                    RecordedOp::Write { offset, data } => format!("W {offset:#x}+{}", data.len()),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
        );
    }
    eprintln!("{} ops, {} writes, orig {orig:?}", ops.len(), writes);
    let done = replay(damaged, &ops);
    let (code, c) = qemu_counts(dir.path(), &done);
    assert_eq!(
        (code, c),
        (0, (0, 0, 0)),
        "the finished repair checks clean"
    );
    ops.len()
}

fn damaged(setup: impl Fn(&Img)) -> Vec<u8> {
    let t = Twin::create(&["-o", "cluster_size=4k"], "32M");
    t.img().io(&[
        "write -P 1 0 1M",
        "write -P 2 8M 256k",
        "write -P 3 20M 64k",
    ]);
    let r = t.img().qemu_img(&["snapshot", "-c", "s", NAME]);
    assert_eq!(r.code, 0, "{}", r.err);
    t.img().io(&["write -P 4 0 64k"]);
    setup(t.img());
    t.img().bytes()
}

#[test]
fn rebuild_is_crash_safe() {
    if !have_qemu() {
        return;
    }
    // Refcounts of two data clusters zeroed, a leak, a wrong COPIED flag.
    let image = damaged(|img| {
        let c = img.host_of(2050) >> 12;
        img.set_refcount(c, 0);
        let c = img.host_of(5120) >> 12;
        img.set_refcount(c, 0);
        img.set_refcount(0, 3);
        let e = img.l2_entry(300);
        img.set_l2_entry(300, e & !(1 << 63));
    });
    let n = replay_every_prefix(&image, Repair::All);
    assert!(n >= 5, "{n} ops");
}

#[test]
fn leak_repair_is_crash_safe() {
    if !have_qemu() {
        return;
    }
    let image = damaged(|img| {
        for g in [3u64, 2049, 5121] {
            img.set_l2_entry(g, 0);
        }
        img.set_refcount(1, 2);
    });
    replay_every_prefix(&image, Repair::Leaks);
    replay_every_prefix(&image, Repair::All);
}

#[test]
fn copied_and_snapshot_table_repairs_are_crash_safe() {
    if !have_qemu() {
        return;
    }
    let image = damaged(|img| {
        let l1 = img.l1_entry(0);
        img.set_l1_entry(0, l1 | (1 << 63));
        let e = img.l2_entry(1);
        img.set_l2_entry(1, e & !(1 << 63));
        // An incomplete snapshot table entry (extra data 24 -> 8).
        let st = img.snapshots_offset();
        img.set_u32(st + 36, 8);
    });
    replay_every_prefix(&image, Repair::All);
}

#[test]
fn io_errors_during_a_repair_are_errors() {
    if !have_qemu() {
        return;
    }
    let image = damaged(|img| {
        let c = img.host_of(2050) >> 12;
        img.set_refcount(c, 0);
        img.set_refcount(0, 3);
    });
    let dir = tempfile::tempdir().unwrap();
    let (_, orig) = qemu_counts(dir.path(), &image);
    for op in [FaultOp::Write, FaultOp::Flush, FaultOp::Read] {
        for nth in [0u64, 1, 2, 3, 5, 8] {
            let store = Arc::new(FaultyStorage::new(MemStorage::from_bytes(image.clone())));
            store.set_fault(Some(Fault {
                op,
                nth,
                kind: FaultKind::Eio,
                persistent: true,
            }));
            let r = check_storage(store.clone(), Repair::All, CheckOptions::default());
            let after = store.inner().to_vec();
            let (_, c) = qemu_counts(dir.path(), &after);
            assert!(
                c.0 <= orig.0,
                "{op:?} #{nth}: {c:?} vs {orig:?} ({:?})",
                r.as_ref().map(|r| r.counts)
            );
        }
    }
}
