//! `qcow2-img io` commands beyond read/write/discard (cli.md §23) against
//! qemu-io 10: `help`, `quit`, `length`, `info`, `alloc`, `truncate`,
//! `readv`, `writev`, `aio_*`. Each scenario runs on twin images; stdout
//! (timing lines by shape), stderr and exit codes must match.

// Helpers outside #[test] functions panic on purpose when a tool misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::*;
use std::path::Path;

/// Two scratch directories, each with `t.qcow2` of cli.md §23 (1 MiB:
/// data at 0, a zero cluster at 128k, data at 512k..640k) and its copies
/// `u.qcow2`, `v.qcow2`, `w.qcow2`.
fn io_dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    twin_dirs(|d| {
        qemu_create(d, "t.qcow2", "1M");
        qemu_ok(
            d,
            "qemu-io",
            &[
                "-c",
                "write -q -P 1 0 64k",
                "-c",
                "write -q -z 128k 64k",
                "-c",
                "write -q -P 2 512k 128k",
                "t.qcow2",
            ],
        );
        for n in ["u.qcow2", "v.qcow2", "w.qcow2"] {
            std::fs::copy(d.join("t.qcow2"), d.join(n)).unwrap();
        }
    })
}

const T: &[&str] = &["t.qcow2"];

#[test]
fn io_help_matches_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    // The full list: ours is qemu-io's without the commands we lack.
    let qh = qemu(q, "qemu-io", &["-c", "help", "t.qcow2"]);
    let oh = ours(o, &["io", "-c", "help", "t.qcow2"]);
    assert_eq!((oh.code, oh.err.as_str()), (0, ""));
    let qlines: Vec<&str> = qh.out.lines().collect();
    for l in oh.out.lines() {
        assert!(qlines.contains(&l), "help line not in qemu-io's: {l:?}");
    }
    let mut names: Vec<&str> = oh.out.lines().filter_map(|l| l.split(' ').next()).collect();
    names.retain(|n| !n.is_empty() && *n != "Use");
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "help lists commands by name");
    for must in [
        "help",
        "quit",
        "length",
        "info",
        "alloc",
        "truncate",
        "readv",
        "writev",
        "aio_read",
        "aio_write",
        "aio_flush",
        "map",
        "flush",
        "open",
        "close",
        "sleep",
    ] {
        assert!(names.contains(&must), "help lacks {must}");
    }
    assert!(oh
        .out
        .ends_with("\n\nUse 'help commandname' for extended help.\n"));
    // Without an image too.
    let r = ours(o, &["io", "-c", "help"]);
    assert_eq!((r.out.as_str(), r.code), (oh.out.as_str(), 0));

    // Per command, by name and by alias.
    for c in [
        "read",
        "write",
        "discard",
        "flush",
        "map",
        "open",
        "close",
        "sleep",
        "abort",
        "help",
        "quit",
        "length",
        "info",
        "alloc",
        "truncate",
        "readv",
        "writev",
        "aio_read",
        "aio_write",
        "aio_flush",
        "r",
        "w",
        "d",
        "f",
        "o",
        "c",
        "?",
        "q",
        "l",
        "i",
        "a",
        "t",
    ] {
        io_twin(q, o, &[], &[&format!("help {c}")], T);
    }
    // No `compare` in qemu-io; wrong argument count.
    let r = io_twin(q, o, &[], &["help compare"], T);
    assert_eq!((r.out.as_str(), r.code), ("command compare not found\n", 1));
    io_twin(q, o, &[], &["compare 0 4k"], T);
    io_twin(q, o, &[], &["help read x"], T);
    // quit: later commands do not run.
    let r = io_twin(q, o, &[], &["length", "quit", "length", "bogus"], T);
    assert_eq!((r.out.as_str(), r.code), ("1 MiB\n", 0));
    io_twin(q, o, &[], &["q", "read 0 x"], &[]);
}

#[test]
fn io_length_alloc_info_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    let r = io_twin(
        q,
        o,
        &["-r"],
        &[
            "alloc 0 64k",
            "alloc 64k 64k",
            "alloc 0 1M",
            "alloc 100",
            "alloc 60k 8k",
            "alloc 128k 64k",
            "alloc 512k",
            "alloc 1020k 8k",
            "alloc 2M 4k",
            "alloc 1 100",
            "a 0",
        ],
        T,
    );
    assert!(r.out.starts_with(
        "65536/65536 bytes allocated at offset 0 bytes\n\
         0/65536 bytes allocated at offset 64 KiB\n\
         262144/1048576 bytes allocated at offset 0 bytes\n"
    ));
    assert!(r.out.contains("0/0 bytes allocated at offset 2 MiB\n"));
    let r = io_twin(q, o, &["-r"], &["length", "l", "map"], T);
    assert!(r.out.starts_with("1 MiB\n1 MiB\n"));
    let r = io_twin(q, o, &["-r"], &["info", "i"], T);
    assert!(r.out.starts_with(
        "format name: qcow2\ncluster size: 64 KiB\nvm state offset: 512 MiB\n\
         Format specific information:\n    compat: 1.1\n"
    ));
    // Argument errors.
    for c in [
        "alloc",
        "alloc 0 1 2",
        "alloc x",
        "alloc 0 x",
        "length extra",
        "info extra",
    ] {
        let r = io_twin(q, o, &["-r"], &[c], T);
        assert_eq!(r.code, 1, "{c}");
    }
    // No image open.
    io_twin(q, o, &[], &["length", "info", "alloc 0"], &[]);

    // info on other kinds of images.
    for (name, opts, size) in [
        ("v2.qcow2", "compat=0.10", "100M"),
        (
            "e.qcow2",
            "extended_l2=on,cluster_size=16k,lazy_refcounts=on",
            "3G",
        ),
        ("b.qcow2", "compression_type=zstd,refcount_bits=1", "5T"),
        ("s.qcow2", "cluster_size=512", "1G"),
        ("z.qcow2", "cluster_size=2M", "0"),
    ] {
        for d in [q, o] {
            qemu_ok(
                d,
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", opts, name, size],
            );
        }
        io_twin(q, o, &["-r"], &["info", "length", "alloc 0 1G"], &[name]);
    }
}

#[test]
fn io_truncate_matches_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    let u = &["u.qcow2"];
    let r = io_twin(
        q,
        o,
        &[],
        &[
            "truncate 2M",
            "length",
            "truncate 1536k",
            "length",
            "truncate 1000000",
            "length",
        ],
        u,
    );
    assert_eq!(r.out, "2 MiB\n1.500 MiB\n1.500 MiB\n");
    assert_eq!(r.code, 1);
    let r = io_twin(q, o, &[], &["truncate 64k", "length", "map"], u);
    assert_eq!(
        r.out,
        "64 KiB\n64 KiB (0x10000) bytes     allocated at offset 0 bytes (0x0)\n"
    );
    let r = io_twin(q, o, &[], &["truncate -m full 1M", "length", "map"], u);
    assert_eq!(
        r.out,
        "1 MiB\n1 MiB (0x100000) bytes     allocated at offset 0 bytes (0x0)\n"
    );
    io_twin(
        q,
        o,
        &[],
        &[
            "truncate -m metadata 2M",
            "map",
            "t -m falloc 3M",
            "map",
            "truncate -m full 3M",
            "truncate -m metadata 512k",
            "truncate -m off 0",
            "length",
            "map",
            "truncate 3M 7",
            "truncate 4M -m full",
            "length",
            "map",
            "read -q -P 0 0 4M",
        ],
        u,
    );
    // Errors.
    for c in [
        "truncate",
        "truncate -m bogus 2M",
        "truncate -m full",
        "truncate -x 1M",
        "truncate -m full 0x",
        "truncate x",
        "truncate 1 2 3 4",
    ] {
        let r = io_twin(q, o, &[], &[c], u);
        assert_eq!(r.code, 1, "{c}");
    }
    io_twin(q, o, &["-r"], &["truncate 4M"], u);
    io_twin(q, o, &[], &["truncate 4M"], &[]);
    // A v2 image with a snapshot cannot be resized.
    for d in [q, o] {
        qemu_ok(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "1M",
            ],
        );
        qemu_ok(d, "qemu-img", &["snapshot", "-c", "s1", "v2.qcow2"]);
    }
    io_twin(q, o, &[], &["truncate 2M", "length"], &["v2.qcow2"]);
    // The result on disk is a valid image of the new size.
    io_twin(
        q,
        o,
        &[],
        &["truncate 3M", "write -q -P 9 2M 1M"],
        &["w.qcow2"],
    );
    let qc = qemu(q, "qemu-img", &["check", "w.qcow2"]);
    let oc = qemu(o, "qemu-img", &["check", "w.qcow2"]);
    assert_eq!((oc.code, oc.out), (qc.code, qc.out));
    io_twin(
        q,
        o,
        &["-r"],
        &["length", "map", "read -q -P 9 2M 1M"],
        &["w.qcow2"],
    );
}

#[test]
fn io_readv_writev_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    let v = &["v.qcow2"];
    let r = io_twin(
        q,
        o,
        &[],
        &[
            "writev -P 5 0 4k 4k",
            "readv -P 5 0 4k 4k",
            "readv -P 5 0 512 1k 2k",
        ],
        v,
    );
    assert!(r
        .out
        .starts_with("wrote 8192/8192 bytes at offset 0\n8 KiB, 1 ops; "));
    assert!(r
        .out
        .contains("read 3584/3584 bytes at offset 0\n3.500 KiB, 1 ops; "));
    let r = io_twin(q, o, &[], &["readv -v 0 16 16"], v);
    assert!(r.out.starts_with(
        "00000000:  05 05 05 05 05 05 05 05 05 05 05 05 05 05 05 05  ................\n"
    ));
    io_twin(
        q,
        o,
        &[],
        &[
            "writev 100 1k 3",
            "readv -P 0xcd 100 1027",
            "readv -v 98 10",
            "writev -q -P 0x41 64k 64k 64k",
            "readv -q -P 0x41 64k 128k",
            "readv -P 1 0 4k",
            "readv -q -P 7 0 4k",
            "readv 0 0",
            "map",
        ],
        v,
    );
    for c in [
        "readv 1M 4k 4k",
        "writev 1M 4k",
        "writev 1020k 4k 4k",
        "writev -P 5 0 4k x",
        "readv x 4k",
        "readv -P 5 0 4k -1",
        "readv -P 0x100 0 4k",
        "readv 0",
        "writev -z 0 4k",
    ] {
        let r = io_twin(q, o, &[], &[c], v);
        assert_eq!(r.code, 1, "{c}");
    }
    io_twin(q, o, &["-r"], &["writev 0 4k"], v);
    io_twin(q, o, &[], &["readv 0 4k", "writev 0 4k"], &[]);
}

#[test]
fn io_aio_matches_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    let w = &["w.qcow2"];
    // One request outstanding at a time, so that qemu-io's completion
    // order is the submission order.
    let r = io_twin(
        q,
        o,
        &[],
        &[
            "aio_write -P 8 0 4k",
            "aio_flush",
            "aio_write -P 9 64k 4k 4k",
            "aio_flush",
            "aio_read -P 8 0 4k",
            "aio_flush",
            "aio_read -P 9 64k 8k",
            "aio_flush",
        ],
        w,
    );
    assert!(r
        .out
        .starts_with("wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; "));
    // Failures of the request do not fail the command.
    for c in [
        "aio_read -P 7 0 4k",
        "aio_read 1M 4k",
        "aio_write 1M 4k",
        "aio_read -i 0 4k",
        "aio_write -i 0 4k",
        "aio_read -v 0 20",
        "aio_read -q -v 0 20",
    ] {
        let r = io_twin(q, o, &[], &[c, "aio_flush"], w);
        assert_eq!(r.code, 0, "{c}");
    }
    // A trailing request still prints.
    io_twin(q, o, &[], &["aio_read -P 8 0 4k"], w);
    // Zeroes (quiet: qemu-io's timing for them is garbage).
    io_twin(
        q,
        o,
        &[],
        &[
            "aio_write -q -z 64k 64k",
            "aio_flush",
            "aio_write -q -z -u 512k 64k",
            "aio_flush",
            "map",
            "read -q -P 0 64k 64k",
        ],
        w,
    );
    // Submission errors fail.
    for c in [
        "aio_write -u 0 4k",
        "aio_write -z 0 4k 4k",
        "aio_read 0 x",
        "aio_write x 4k",
        "aio_read 0",
        "aio_read -z 0 4k",
        "aio_flush 1",
    ] {
        let r = io_twin(q, o, &[], &[c], w);
        assert_eq!(r.code, 1, "{c}");
    }
    io_twin(q, o, &["-r"], &["aio_write 0 4k", "aio_flush"], w);
    io_twin(q, o, &[], &["aio_read 0 4k", "aio_flush"], &[]);
}

/// `ovl1.qcow2` of cli.md §12.6: guest cluster 0 mapped (COPIED) onto the
/// active L1 table, so that a write to it is a corruption event.
fn make_overlap_image(d: &Path, name: &str) {
    qemu_ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", name, "1M"]);
    qemu_ok(d, "qemu-io", &["-c", "write -q -P 0x11 0 64k", name]);
    let p = d.join(name);
    let l1_offset = get_u64(&p, 40);
    assert_eq!(l1_offset, 0x30000);
    let l2 = get_u64(&p, l1_offset) & 0x00ff_ffff_ffff_fe00;
    put_u64(&p, l2, 0x8000_0000_0003_0000);
}

#[test]
fn io_commands_after_corruption_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    let mut n = 0;
    for cmd in [
        "length",
        "alloc 0",
        "info",
        "truncate 2M",
        "readv 0 512",
        "writev 0 512",
        "aio_read 0 512",
        "aio_write 0 512",
    ] {
        n += 1;
        let name = format!("ovl{n}.qcow2");
        make_overlap_image(q, &name);
        make_overlap_image(o, &name);
        let r = io_twin(q, o, &[], &["write -q 0 4k", cmd, "aio_flush"], &[&name]);
        assert_eq!(r.code, 1, "{cmd}");
    }
}
