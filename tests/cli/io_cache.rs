//! `qcow2-img io` cache modes (`-t`, `-n`; cli.md §23) and flush/close
//! failures against qemu-io 10 on twin images: stdout (timing lines by
//! shape), stderr and exit codes must match.

// Helpers outside #[test] functions panic on purpose when a tool misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::*;
use std::path::Path;

const MODES: &[&[&str]] = &[
    &[],
    &["-t", "writethrough"],
    &["-t", "writeback"],
    &["-t", "none"],
    &["-t", "off"],
    &["-n"],
    &["-t", "directsync"],
    &["-t", "unsafe"],
    &["-n", "-t", "writeback"],
    &["-t", "unsafe", "-n"],
];

#[test]
fn io_cache_modes_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    for mode in MODES {
        for d in [q, o] {
            qemu_create(d, "c.qcow2", "1M");
        }
        // Unaligned requests too: with -n / none / directsync they go
        // through O_DIRECT.
        io_twin(
            q,
            o,
            mode,
            &[
                "write -P 0x11 0 64k",
                "write -P 0x22 1000 3000",
                "read -P 0x22 1000 3000",
                "read -P 0x11 4000 60k",
                "flush",
                "write -z 64k 64k",
                "discard 0 64k",
                "read -P 0 0 128k",
                "map",
            ],
            &["c.qcow2"],
        );
        // Both images hold the same guest data afterwards.
        let r = qemu(
            q,
            "qemu-img",
            &[
                "compare",
                "-q",
                "c.qcow2",
                o.join("c.qcow2").to_str().unwrap(),
            ],
        );
        assert_eq!(r.code, 0, "{mode:?}: {r:?}");
    }
}

#[test]
fn io_bad_cache_modes_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    for d in [q, o] {
        qemu_create(d, "c.qcow2", "1M");
    }
    let r = io_twin(q, o, &["-t", "bogus"], &["read 0 4k"], &["c.qcow2"]);
    assert_eq!(r.err, "qcow2-img: Invalid cache option: bogus\n");
    assert_eq!(r.code, 1);
    io_twin(q, o, &["-t", "Writeback"], &["read 0 4k"], &["c.qcow2"]);
    io_twin(q, o, &["-t", "bogus"], &[], &[]);
    // The open command has its own -t / -n (and its own default).
    let r = io_twin(q, o, &[], &["open -t bogus c.qcow2", "read -q 0 4k"], &[]);
    assert_eq!(
        r.err,
        "qcow2-img: Invalid cache option: bogus\nno file open, try 'help open'\n"
    );
    // Refused even with an image open (while parsing the options).
    let r = io_twin(q, o, &[], &["open -t bogus c.qcow2"], &["c.qcow2"]);
    assert_eq!(r.err, "qcow2-img: Invalid cache option: bogus\n");
    for mode in [
        "-t writeback",
        "-n",
        "-t directsync",
        "-t unsafe",
        "-n -t none",
    ] {
        let open = format!("open {mode} c.qcow2");
        io_twin(
            q,
            o,
            &[],
            &[&open, "write -q -P 3 0 4k", "read -P 3 0 4k", "flush"],
            &[],
        );
    }
}

/// A 1 MiB image with data in guest cluster 0 whose L1 entry 0 is then
/// pointed (COPIED) at the refcount table: L2 entry 0 is the refcount
/// table's first entry (a valid, shared data cluster), the others are zero.
/// A write to guest 320k allocates a cluster and dirties "L2 entry 5",
/// which is the refcount table: the overlap is found only when the L2
/// table is written back.
fn make_writeback_overlap_image(d: &Path, name: &str) {
    qemu_create(d, name, "1M");
    qemu_ok(d, "qemu-io", &["-c", "write -P 0x11 0 64k", name]);
    let p = d.join(name);
    let (l1, reftable) = (get_u64(&p, 40), get_u64(&p, 48));
    assert_eq!((l1, reftable), (0x30000, 0x10000));
    put_u64(&p, l1, reftable | 1 << 63);
}

#[test]
fn io_overlap_found_at_write_back_matches_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    let event = "qcow2: Marking image as corrupt: Preventing invalid write on metadata \
                 (overlaps with refcount table); further corruption events will be suppressed\n";
    for mode in MODES {
        for d in [q, o] {
            make_writeback_overlap_image(d, "w.qcow2");
        }
        let r = io_twin(
            q,
            o,
            mode,
            &["write -P 0x22 320k 4k", "read -P 0x22 320k 4k", "flush"],
            &["w.qcow2"],
        );
        // Whether the write fails (write-through) or the event comes at
        // close (write-back), the event is printed once.
        assert_eq!(r.err, event, "{mode:?}");
        let writethrough =
            mode.is_empty() || mode.contains(&"writethrough") || mode.contains(&"directsync");
        if writethrough {
            assert!(
                r.out.starts_with("write failed: Input/output error\n"),
                "{mode:?}: {r:?}"
            );
            assert_eq!(r.code, 1);
        }
        // The corrupt bit is on disk in both.
        for d in [q, o] {
            assert_eq!(get_u64(&d.join("w.qcow2"), 72) & 2, 2, "{mode:?}");
        }
    }
}

#[test]
fn bench_cache_modes_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    for d in [q, o] {
        qemu_create(d, "b.qcow2", "1M");
    }
    for mode in [
        "bogus",
        "writeback",
        "writethrough",
        "none",
        "directsync",
        "unsafe",
    ] {
        let args = [
            "-w", "-t", mode, "-c", "8", "-d", "1", "-s", "4k", "b.qcow2",
        ];
        let mut qargs = vec!["bench", "-i", "threads"];
        qargs.extend_from_slice(&args);
        let r = qemu(q, "qemu-img", &qargs);
        let mut oargs = vec!["bench"];
        oargs.extend_from_slice(&args);
        let s = ours(o, &oargs);
        assert_eq!(s.code, r.code, "{mode}: {s:?} vs {r:?}");
        assert_eq!(s.err, r.err, "{mode}");
        let first = |t: &str| t.lines().next().unwrap_or("").to_owned();
        assert_eq!(first(&s.out), first(&r.out), "{mode}");
    }
}

#[test]
fn convert_cache_modes_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    for d in [q, o] {
        qemu_create(d, "s.qcow2", "1M");
        qemu_ok(d, "qemu-io", &["-c", "write -q -P 5 1000 300k", "s.qcow2"]);
    }
    let cases: &[&[&str]] = &[
        &[],
        &["-t", "writeback"],
        &["-t", "none"],
        &["-t", "directsync"],
        &["-t", "writethrough"],
        &["-t", "unsafe"],
        &["-T", "none"],
        &["-T", "directsync", "-t", "off"],
        &["-t", "bogus"],
        &["-T", "bogus"],
    ];
    for fmt in ["raw", "qcow2"] {
        for (k, mode) in cases.iter().enumerate() {
            let out = format!("o{k}.{fmt}");
            let mut args = vec!["convert", "-O", fmt];
            args.extend_from_slice(mode);
            args.extend_from_slice(&["s.qcow2", &out]);
            let r = qemu(q, "qemu-img", &args);
            let s = ours(o, &args);
            assert_eq!(s.code, r.code, "{args:?}: {s:?} vs {r:?}");
            assert_eq!(s.err, r.err, "{args:?}");
            if r.code == 0 {
                let c = qemu(
                    q,
                    "qemu-img",
                    &["compare", "-q", &out, o.join(&out).to_str().unwrap()],
                );
                assert_eq!(c.code, 0, "{args:?}: {c:?}");
            }
        }
    }
    // No sources: that error comes first.
    let r = qemu(q, "qemu-img", &["convert", "-T", "bogus"]);
    let s = ours(o, &["convert", "-T", "bogus"]);
    assert_eq!((s.code, s.err), (r.code, r.err));
}
