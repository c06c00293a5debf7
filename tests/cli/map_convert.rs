//! `qcow2-img map`, `convert`, `resize` and `bench` against qemu-img 10
//! (cli.md §4, §5, §6, §11).

// Helpers outside #[test] functions panic on purpose when a tool misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The map scenarios of cli.md §4 and a few more, built with qemu-img/qemu-io.
fn make_map_images(d: &Path) {
    let img = |args: &[&str]| {
        qemu_ok(d, "qemu-img", args);
    };
    let io = |file: &str, cmds: &[&str]| {
        let mut a = Vec::new();
        for c in cmds {
            a.push("-c");
            a.push(c);
        }
        a.push(file);
        qemu_ok(d, "qemu-io", &a);
    };
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io("base.qcow2", &["write -P 1 0 128k", "write -P 2 1M 64k"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    io(
        "top.qcow2",
        &[
            "write -P 3 64k 64k",
            "write -z 2M 128k",
            "write -P 4 3M 64k",
        ],
    );
    img(&["create", "-q", "-f", "qcow2", "z.qcow2", "1M"]);
    io(
        "z.qcow2",
        &[
            "write -P 7 0 64k",
            "write -z 64k 64k",
            "write -z -u 128k 64k",
            "write -P 8 192k 64k",
            "write -z 192k 64k",
        ],
    );
    img(&["convert", "-c", "-O", "qcow2", "base.qcow2", "comp.qcow2"]);
    // A 3-deep chain, the top one larger than its backing file.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        "t3.qcow2",
        "8M",
    ]);
    io(
        "t3.qcow2",
        &["write -P 9 512k 192k", "write -z 0 64k", "write -P 5 6M 4k"],
    );
    // Metadata preallocation: data clusters that are holes read as zero.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "pre.qcow2",
        "1M",
    ]);
    io("pre.qcow2", &["write -P 5 64k 4k"]);
    // External data file.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=dfm.data",
        "dfm.qcow2",
        "1M",
    ]);
    io("dfm.qcow2", &["write -P 5 64k 4k"]);
    // Extended L2 entries: unallocated subclusters of allocated clusters.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "xl.qcow2",
        "1M",
    ]);
    io("xl.qcow2", &["write -P 5 4k 4k", "write -z 64k 32k"]);
    // A v2 image with a raw backing file.
    std::fs::write(d.join("rb.raw"), vec![3u8; 300 * 1024]).unwrap();
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "rb.raw",
        "-F",
        "raw",
        "v2r.qcow2",
        "1M",
    ]);
    io("v2r.qcow2", &["write -P 1 64k 64k"]);
}

const MAP_IMAGES: [&str; 8] = [
    "top.qcow2",
    "z.qcow2",
    "comp.qcow2",
    "t3.qcow2",
    "pre.qcow2",
    "dfm.qcow2",
    "xl.qcow2",
    "v2r.qcow2",
];

#[test]
fn map_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    make_map_images(d);
    for img in MAP_IMAGES {
        for args in [
            &["map", img][..],
            &["map", "--output", "json", img],
            &["map", "--output=json", "-f", "qcow2", img],
        ] {
            twins(d, d, "qemu-img", &[], args);
        }
    }
    // The cli.md §4.2 example, literally.
    let o = ours(d, &["map", "top.qcow2"]);
    assert_eq!(
        o.out,
        "Offset          Length          Mapped to       File\n\
         0               0x10000         0x50000         base.qcow2\n\
         0x10000         0x10000         0x50000         top.qcow2\n\
         0x100000        0x10000         0x70000         base.qcow2\n\
         0x300000        0x10000         0x60000         top.qcow2\n"
    );
    let o = ours(d, &["map", "comp.qcow2"]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.err,
        "qcow2-img: File contains external, encrypted or compressed clusters.\n"
    );
    for args in [
        &["map", "nosuch.qcow2"][..],
        &["map", "--output", "xml", "z.qcow2"],
        &["map"],
    ] {
        twins(d, d, "qemu-img", &[], args);
    }
}

/// Allocated bytes of a file.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn convert_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    make_map_images(d);
    for img in MAP_IMAGES {
        let q = qemu(d, "qemu-img", &["convert", "-O", "raw", img, "q.raw"]);
        assert_eq!(q.code, 0, "{q:?}");
        let o = ours(d, &["convert", "-f", "qcow2", "-O", "raw", img, "o.raw"]);
        assert_eq!(
            (o.code, o.out.as_str(), o.err.as_str()),
            (0, "", ""),
            "{img}"
        );
        let (a, b) = (
            std::fs::read(d.join("q.raw")).unwrap(),
            std::fs::read(d.join("o.raw")).unwrap(),
        );
        assert!(a == b, "{img}: raw output differs from qemu-img's");
        assert!(
            allocated(&d.join("o.raw")) <= allocated(&d.join("q.raw")) + 64 * 1024,
            "{img}: raw output not sparse"
        );
        let o = ours(
            d,
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                img,
                "o.qcow2",
            ],
        );
        assert_eq!(
            (o.code, o.out.as_str(), o.err.as_str()),
            (0, "", ""),
            "{img}"
        );
        let c = qemu(d, "qemu-img", &["compare", img, "o.qcow2"]);
        assert_eq!(c.out, "Images are identical.\n", "{img}");
        let c = qemu(d, "qemu-img", &["check", "o.qcow2"]);
        assert_eq!(c.code, 0, "{img}: {c:?}");
    }
    for args in [
        &["convert", "-O", "qcow2", "nosuch.qcow2", "x.qcow2"][..],
        &[
            "convert", "-O", "qcow2", "-o", "bogus=1", "z.qcow2", "x.qcow2",
        ],
        &["convert", "-c", "-O", "raw", "z.qcow2", "x.raw"],
        &["convert", "z.qcow2"],
        &["convert", "-O", "vdi2", "z.qcow2", "x"],
    ] {
        twins(d, d, "qemu-img", &[], args);
    }
    // Compressed output: the same content, clean (tests/cli/compress.rs
    // compares the layout with qemu-img's).
    let _ = std::fs::remove_file(d.join("c.qcow2"));
    let o = ours(d, &["convert", "-c", "-O", "qcow2", "z.qcow2", "c.qcow2"]);
    assert_eq!((o.code, o.err.as_str()), (0, ""), "{o:?}");
    let c = qemu(d, "qemu-img", &["compare", "z.qcow2", "c.qcow2"]);
    assert_eq!(c.out, "Images are identical.\n");
    let c = qemu(d, "qemu-img", &["check", "c.qcow2"]);
    assert_eq!(c.code, 0, "{c:?}");
}

#[test]
fn convert_of_a_sparse_terabyte_is_quick() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    qemu_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "big.qcow2", "1T"],
    );
    qemu_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 500G 1M",
            "-c",
            "write -P 3 1023G 4k",
            "big.qcow2",
        ],
    );
    let t = Instant::now();
    let o = ours(d, &["convert", "-O", "raw", "big.qcow2", "big.raw"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let raw = d.join("big.raw");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 40);
    assert!(allocated(&raw) < 8 << 20, "allocated {}", allocated(&raw));
    // Spot-check the data through the converted file.
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&raw).unwrap();
    for (off, byte) in [
        (0u64, 1u8),
        (500 << 30, 2),
        ((500 << 30) + (1 << 20) - 1, 2),
        (1023 << 30, 3),
        (4 << 30, 0),
    ] {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        assert_eq!(b[0], byte, "at {off}");
    }
}

#[test]
fn resize_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        qemu_create(d, "rs.qcow2", "4M");
        qemu_ok(d, "qemu-io", &["-c", "write -P 1 1M 64k", "rs.qcow2"]);
    });
    for args in [
        &["resize", "rs.qcow2", "8M"][..],
        &["resize", "rs.qcow2", "+1M"],
        &["resize", "rs.qcow2", "4M"],
        &["resize", "rs.qcow2", "-1M"],
        &["resize", "rs.qcow2", "--", "-1M"],
        &["resize", "--preallocation=bogus", "rs.qcow2", "+1M"],
        &["resize", "rs.qcow2", "10X"],
        &["resize", "rs.qcow2"],
        &["resize", "nosuch.qcow2", "1M"],
        &["resize", "-q", "rs.qcow2", "1G"],
        &["resize", "-f", "qcow2", "rs.qcow2", "+512"],
    ] {
        twins(qd.path(), od.path(), "qemu-img", &[], args);
    }
    let q = qemu(
        qd.path(),
        "qemu-img",
        &["info", "--output", "json", "rs.qcow2"],
    );
    let o = qemu(
        od.path(),
        "qemu-img",
        &["info", "--output", "json", "rs.qcow2"],
    );
    assert_eq!(json(&o.out)["virtual-size"], json(&q.out)["virtual-size"]);
    let c = qemu(od.path(), "qemu-img", &["check", "rs.qcow2"]);
    assert_eq!(c.code, 0, "{c:?}");
    let c = qemu(
        od.path(),
        "qemu-io",
        &["-c", "read -P 1 1M 64k", "rs.qcow2"],
    );
    assert_eq!(c.code, 0, "{c:?}");
    // Shrinking and preallocated growth: same output and the same bytes.
    for args in [
        &["resize", "--shrink", "rs.qcow2", "-1M"][..],
        &["resize", "--preallocation=metadata", "rs.qcow2", "2G"],
        &["resize", "--preallocation=falloc", "rs.qcow2", "+1M"],
    ] {
        twins(qd.path(), od.path(), "qemu-img", &[], args);
        let a = std::fs::read(od.path().join("rs.qcow2")).unwrap();
        let b = std::fs::read(qd.path().join("rs.qcow2")).unwrap();
        assert!(a == b, "{args:?}: the images differ");
    }
}

#[test]
fn bench_prints_qemus_lines() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    qemu_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "64M"],
    );
    let cases: &[(&[&str], &str)] = &[
        (
            &["bench", "-c", "1000", "-s", "4k", "b.qcow2"],
            "Sending 1000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)\n",
        ),
        (
            &["bench", "-w", "-c", "1000", "-s", "4k", "-d", "2", "-f", "qcow2", "b.qcow2"],
            "Sending 1000 write requests, 4096 bytes each, 2 in parallel (starting at offset 0, step size 4096)\n",
        ),
        (
            &["bench", "-c", "100", "-o", "4096", "-S", "8192", "--pattern=0xab", "-w", "b.qcow2"],
            "Sending 100 write requests, 4096 bytes each, 64 in parallel (starting at offset 4096, step size 8192)\n",
        ),
        (
            &["bench", "-c", "10", "-d", "1", "--flush-interval=5", "-w", "b.qcow2"],
            "Sending 10 write requests, 4096 bytes each, 1 in parallel (starting at offset 0, step size 4096)\nSending flush every 5 requests\n",
        ),
    ];
    for (args, head) in cases {
        let o = ours(d, args);
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
        let (first, last) = o.out.split_at(head.len());
        assert_eq!(first, *head);
        let secs = last
            .strip_prefix("Run completed in ")
            .and_then(|s| s.strip_suffix(" seconds.\n"))
            .unwrap_or_else(|| panic!("last line: {last:?}"));
        let (_, frac) = secs.split_once('.').unwrap();
        assert_eq!(frac.len(), 3, "{secs}");
    }
    // The pattern write landed (request 5 of the third run, past the fourth run's range).
    let r = qemu(
        d,
        "qemu-io",
        &["-c", "read -q -P 0xab 45056 4096", "b.qcow2"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(qemu(d, "qemu-img", &["check", "b.qcow2"]).code, 0);
    for args in [
        &["bench", "-c", "10", "--flush-interval=5", "-w", "b.qcow2"][..],
        &["bench", "-c", "x", "b.qcow2"],
        &["bench", "--flush-interval=3", "b.qcow2"],
        &["bench", "-w", "--pattern=300", "b.qcow2"],
    ] {
        twins(d, d, "qemu-img", &[], args);
    }
}
