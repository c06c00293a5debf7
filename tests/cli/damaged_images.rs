//! Truncated images stay inspectable, as in QEMU: tables that run past the
//! end of the file read as zeroes there, so `info`, `map`, `convert` and
//! `check` print what qemu-img prints on the same file; a write that would
//! need the missing refcounts is refused instead of corrupting the image.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use crate::support::*;
use std::path::Path;

const CLUSTER: u64 = 0x10000;

/// `base.qcow2` (64 MiB, QEMU's default layout: reftable at 0x10000, its
/// block at 0x20000, L1 at 0x30000, L2 at 0x40000, data from 0x50000) with
/// two patterns, and damaged copies of it:
/// * `l1cut.qcow2`: cut 4 bytes into the L1 table,
/// * `rtcut.qcow2`: cut 4 bytes into the refcount table,
/// * `rbcut.qcow2`: the refcount block moved to the end of the file and cut
///   after the refcounts of clusters 0..4, so the data clusters read as free.
fn make_images(d: &Path) {
    qemu_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
    );
    qemu_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 32M 64k",
            "base.qcow2",
        ],
    );
    let base = std::fs::read(d.join("base.qcow2")).unwrap();
    assert_eq!(get_u64(&d.join("base.qcow2"), 40), 0x30000, "L1 offset");
    assert_eq!(
        get_u64(&d.join("base.qcow2"), 48),
        0x10000,
        "reftable offset"
    );
    std::fs::write(d.join("l1cut.qcow2"), &base[..0x30004]).unwrap();
    std::fs::write(d.join("rtcut.qcow2"), &base[..0x10004]).unwrap();
    let end = base.len() as u64;
    assert_eq!(end % CLUSTER, 0);
    let mut rb = base.clone();
    rb.extend_from_slice(&base[0x20000..0x30000]);
    rb[0x10000..0x10008].copy_from_slice(&end.to_be_bytes());
    rb.truncate(end as usize + 10);
    std::fs::write(d.join("rbcut.qcow2"), &rb).unwrap();
}

const DAMAGED: [&str; 3] = ["l1cut.qcow2", "rtcut.qcow2", "rbcut.qcow2"];

/// Human `info` with the `disk size` lines reduced to their shape.
fn info_shape(s: &str) -> String {
    s.lines()
        .map(|l| match l.find("disk size: ") {
            Some(p) => format!("{}disk size: N", &l[..p]),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn truncated_images_inspect_as_in_qemu() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    make_images(d);
    for img in DAMAGED {
        // Read-only commands: both tools run on the very same file.
        for args in [
            &["map", img][..],
            &["map", "--output", "json", img],
            &["check", img],
            &["check", "--output", "json", img],
        ] {
            assert_eq!(ours(d, args), qemu(d, "qemu-img", args), "{args:?}");
        }
        let (o, q) = (ours(d, &["info", img]), qemu(d, "qemu-img", &["info", img]));
        assert_eq!((o.code, &o.err), (q.code, &q.err), "info {img}");
        assert_eq!(info_shape(&o.out), info_shape(&q.out), "info {img}");
        let args = ["info", "--output", "json", img];
        let (o, q) = (ours(d, &args), qemu(d, "qemu-img", &args));
        assert_eq!((o.code, &o.err), (q.code, &q.err), "{args:?}");
        let (mut oj, mut qj) = (json(&o.out), json(&q.out));
        strip_actual_size(&mut oj);
        strip_actual_size(&mut qj);
        assert_eq!(oj, qj, "{args:?}");

        let q = qemu(d, "qemu-img", &["convert", "-O", "raw", img, "q.raw"]);
        let o = ours(d, &["convert", "-O", "raw", img, "o.raw"]);
        assert_eq!(o, q, "convert {img}");
        assert_eq!(o.code, 0, "convert {img}: {o:?}");
        assert!(
            std::fs::read(d.join("o.raw")).unwrap() == std::fs::read(d.join("q.raw")).unwrap(),
            "convert {img}: guest data differs"
        );
    }
    // Guest reads through the damaged tables: a cut L1 loses the mapping,
    // a cut refcount structure does not.
    for (img, pattern) in [
        ("l1cut.qcow2", "0"),
        ("rtcut.qcow2", "0"),
        ("rbcut.qcow2", "0xab"),
    ] {
        let read = format!("read -P {pattern} 0 64k");
        let args = ["io", "-r", "-c", &read, img];
        let q = qemu(d, "qemu-io", &["-r", "-c", &read, img]);
        let o = ours(d, &args);
        assert_eq!((o.code, untime(&o.out)), (q.code, untime(&q.out)), "{img}");
        assert_eq!(o.code, 0, "{img}: {o:?}");
    }
}

/// The corrupt bit (incompatible feature bit 1).
fn corrupt_bit(path: &Path) -> bool {
    get_u64(path, 72) & 2 != 0
}

#[test]
fn writes_needing_missing_refcounts_are_refused() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    make_images(d);
    let write = ["-c", "write -P 0x22 40M 64k"];

    // A cut refcount table: QEMU's allocation runs into the refcount table
    // and the overlap check marks the image corrupt; ours refuses the
    // allocation up front with the same outcome.
    for img in ["rtcut.qcow2", "rbcut.qcow2"] {
        let (qi, oi) = (format!("q_{img}"), format!("o_{img}"));
        std::fs::copy(d.join(img), d.join(&qi)).unwrap();
        std::fs::copy(d.join(img), d.join(&oi)).unwrap();
        let before = std::fs::read(d.join(&oi)).unwrap();
        let o = ours(d, &["io", write[0], write[1], &oi]);
        assert_eq!(o.code, 1, "{img}: {o:?}");
        assert_eq!(o.out, "write failed: Input/output error\n", "{img}");
        assert!(
            o.err
                .contains("Marking image as corrupt: Preventing allocation: refcount"),
            "{img}: {}",
            o.err
        );
        // Only the corrupt bit changed.
        let after = std::fs::read(d.join(&oi)).unwrap();
        assert_eq!(after.len(), before.len(), "{img}: file length");
        let changed: Vec<usize> = (0..after.len())
            .filter(|&i| after[i] != before[i])
            .collect();
        assert_eq!(changed, vec![79], "{img}: only the corrupt bit may change");
        assert!(corrupt_bit(&d.join(&oi)));
        // The guest data is intact (rtcut.qcow2 lost its L1 table: zeroes).
        let pattern = if img == "rbcut.qcow2" { "0xab" } else { "0" };
        let read = format!("read -P {pattern} 0 1M");
        let r = ours(d, &["io", "-r", "-c", &read, &oi]);
        assert_eq!(r.code, 0, "{img}: {r:?}");
        assert!(!r.out.contains("verification failed"), "{img}: {}", r.out);

        let q = qemu(d, "qemu-io", &[write[0], write[1], &qi]);
        if img == "rtcut.qcow2" {
            assert_eq!((o.code, &o.out), (q.code, &q.out), "{img}");
            assert!(corrupt_bit(&d.join(&qi)));
        }
        // On rbcut.qcow2 QEMU hands out the cluster of guest offset 0 (its
        // refcount reads as 0) and overwrites it: the write "succeeds".
    }

    // A cut L1 table with intact refcounts: the write allocates new
    // clusters after everything in use; the lost mapping only leaks.
    std::fs::copy(d.join("l1cut.qcow2"), d.join("w.qcow2")).unwrap();
    let o = ours(d, &["io", write[0], write[1], "w.qcow2"]);
    assert_eq!(o.code, 0, "{o:?}");
    let c = qemu(d, "qemu-img", &["check", "w.qcow2"]);
    assert_eq!(c.code, 3, "only leaks: {c:?}");
    let r = qemu(
        d,
        "qemu-io",
        &["-r", "-c", "read -P 0x22 40M 64k", "w.qcow2"],
    );
    assert!(!r.out.contains("verification failed"), "{}", r.out);
}
