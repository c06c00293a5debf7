//! A repair never writes into metadata the image names, even when the
//! recorded size or alignment is invalid: such tables are protected by their
//! raw range, as QEMU's overlap check protects them (`qemu-img check -r all`
//! on a twin).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use crate::support::*;
use std::path::Path;

/// `s.qcow2`: 64 MiB, data, snapshot `s1`, then a write that unshares the
/// first cluster. Returns the snapshot table offset and the snapshot's L1
/// table offset.
fn make_image(d: &Path) -> (u64, u64) {
    qemu_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "s.qcow2", "64M"],
    );
    qemu_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0xab 0 128k",
            "-c",
            "write -P 0xcd 32M 64k",
            "s.qcow2",
        ],
    );
    qemu_ok(d, "qemu-img", &["snapshot", "-c", "s1", "s.qcow2"]);
    qemu_ok(d, "qemu-io", &["-c", "write -P 0xee 0 64k", "s.qcow2"]);
    let table = get_u64(&d.join("s.qcow2"), 64);
    let l1 = get_u64(&d.join("s.qcow2"), table);
    (table, l1)
}

/// Sets the first snapshot entry's L1 offset and size.
fn set_snapshot_l1(path: &Path, table: u64, offset: u64, size: u32) {
    use std::os::unix::fs::FileExt;
    put_u64(path, table, offset);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&size.to_be_bytes(), table + 8).unwrap();
}

#[test]
fn repair_does_not_write_into_an_oversized_snapshot_l1_table() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    let (table, l1) = make_image(d);
    // 16 Mi entries (128 MiB, above QEMU's 32 MiB cap): the check reports the
    // entry as corrupted and skips it, so the L2 tables it shares lose their
    // second reference and `-r all` wants to set their COPIED flags. They lie
    // inside the range the entry names, which QEMU protects.
    set_snapshot_l1(&d.join("s.qcow2"), table, l1, 0x0100_0000);
    let original = std::fs::read(d.join("s.qcow2")).unwrap();
    std::fs::write(d.join("q.qcow2"), &original).unwrap();
    std::fs::write(d.join("o.qcow2"), &original).unwrap();

    let q = qemu(d, "qemu-img", &["check", "-r", "all", "q.qcow2"]);
    let o = ours(d, &["check", "-r", "all", "o.qcow2"]);
    assert_eq!(o.code, q.code, "ours: {o:#?}\nqemu: {q:#?}");
    assert_eq!(o.out, q.out.replace("q.qcow2", "o.qcow2"));
    assert_eq!(o.err, q.err.replace("q.qcow2", "o.qcow2"));
    assert!(
        o.err.contains("overlaps with inactive L1 table"),
        "the write was prevented: {}",
        o.err
    );

    // Nothing from the snapshot's L1 offset on was written; the image is
    // marked corrupt, as QEMU's is.
    let after = std::fs::read(d.join("o.qcow2")).unwrap();
    assert_eq!(after.len(), original.len());
    assert!(
        after[l1 as usize..] == original[l1 as usize..],
        "the repair wrote into the protected range"
    );
    // (QEMU's file does change there: it punches a hole in the snapshot's
    // real L1 cluster when the leak repair drops its refcount to 0.)
    assert_eq!(get_u64(&d.join("o.qcow2"), 72) & 2, 2, "corrupt bit");
    assert_eq!(get_u64(&d.join("q.qcow2"), 72) & 2, 2, "corrupt bit (QEMU)");
}

#[test]
fn repair_does_not_write_into_an_unaligned_snapshot_l1_table() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    let (table, _) = make_image(d);
    // An unaligned L1 offset inside the refcount block (cluster 2): fixing
    // the leaks this entry causes means writing that refcount block, which
    // QEMU's overlap check refuses (it does so when it flushes its refcount
    // cache at close; ours writes refcount blocks as it repairs, so the
    // check stops there: the outputs differ, the protection does not).
    let rb = get_u64(&d.join("s.qcow2"), get_u64(&d.join("s.qcow2"), 48));
    set_snapshot_l1(&d.join("s.qcow2"), table, rb + 8, 1);
    let original = std::fs::read(d.join("s.qcow2")).unwrap();
    std::fs::write(d.join("q.qcow2"), &original).unwrap();
    std::fs::write(d.join("o.qcow2"), &original).unwrap();
    let q = qemu(d, "qemu-img", &["check", "-r", "all", "q.qcow2"]);
    let o = ours(d, &["check", "-r", "all", "o.qcow2"]);
    assert!(q.err.contains("overlaps with inactive L1 table"), "{q:#?}");
    assert!(o.err.contains("overlaps with inactive L1 table"), "{o:#?}");
    assert_ne!(o.code, 0, "{o:#?}");
    let cs = 1usize << 16;
    let after = std::fs::read(d.join("o.qcow2")).unwrap();
    let rb = rb as usize;
    assert!(
        after[rb..rb + cs] == original[rb..rb + cs],
        "the repair wrote the protected refcount block"
    );
    let q_after = std::fs::read(d.join("q.qcow2")).unwrap();
    assert!(q_after[rb..rb + cs] == original[rb..rb + cs]);
    assert_eq!(get_u64(&d.join("o.qcow2"), 72) & 2, 2, "corrupt bit");
    assert_eq!(get_u64(&d.join("q.qcow2"), 72) & 2, 2, "corrupt bit (QEMU)");
}

#[test]
fn an_unaligned_l2_table_is_protected_by_its_raw_range() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    qemu_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "u.qcow2", "1G"],
    );
    qemu_ok(d, "qemu-io", &["-c", "write -P 0xab 0 64k", "u.qcow2"]);
    // L1 entry 1 names an "L2 table" 512 bytes into the first free cluster
    // (the end of the file): QEMU protects [end + 512, end + 512 + 64k), so
    // the data cluster a new write would take there is refused.
    let path = d.join("u.qcow2");
    let end = std::fs::metadata(&path).unwrap().len();
    let l1 = get_u64(&path, 40);
    put_u64(&path, l1 + 8, (1 << 63) | (end + 512));
    let original = std::fs::read(&path).unwrap();
    std::fs::write(d.join("q.qcow2"), &original).unwrap();
    std::fs::write(d.join("o.qcow2"), &original).unwrap();
    let q = qemu(d, "qemu-io", &["-c", "write -P 0x22 1M 64k", "q.qcow2"]);
    let o = ours(d, &["io", "-c", "write -P 0x22 1M 64k", "o.qcow2"]);
    assert_eq!(
        (o.code, &o.out),
        (q.code, &q.out),
        "ours: {o:#?}\nqemu: {q:#?}"
    );
    assert_eq!(o.code, 1);
    assert!(o.err.contains("overlaps with active L2 table"), "{}", o.err);
    let after = std::fs::read(d.join("o.qcow2")).unwrap();
    assert_eq!(
        after.len(),
        original.len(),
        "nothing was written past the end"
    );
    assert_eq!(get_u64(&d.join("o.qcow2"), 72) & 2, 2, "corrupt bit");
    assert_eq!(get_u64(&d.join("q.qcow2"), 72) & 2, 2, "corrupt bit (QEMU)");
}
