//! `qcow2-img io` against qemu-io 10 (cli.md §12): each scenario runs on
//! twin images; stdout (timing lines by shape), stderr and exit codes must
//! match.

// Helpers outside #[test] functions panic on purpose when a tool misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::*;
use std::path::Path;

/// Twin directories holding `disk.qcow2` and `d.qcow2` (1 MiB) and a
/// 64 KiB `raw.img`.
fn io_dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    twin_dirs(|d| {
        qemu_create(d, "disk.qcow2", "1M");
        qemu_create(d, "d.qcow2", "1M");
        std::fs::write(d.join("raw.img"), vec![0u8; 65536]).unwrap();
    })
}

#[test]
fn io_requests_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    let disk = ["disk.qcow2"];
    let r = io_twin(q, o, &[], &["write -P 0xab 0 64k"], &disk);
    assert!(r
        .out
        .starts_with("wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; "));
    io_twin(q, o, &[], &["read -P 0xab 0 64k"], &disk);
    let r = io_twin(
        q,
        o,
        &[],
        &["write -q -P 0xcd 64k 4k", "read -q -P 0xcd 64k 4k"],
        &disk,
    );
    assert_eq!((r.out.as_str(), r.code), ("", 0));
    io_twin(q, o, &[], &["write -q -P 1 0 256k"], &["d.qcow2"]);
    let r = io_twin(
        q,
        o,
        &[],
        &[
            "discard 0 64k",
            "write -z 128k 64k",
            "write -z -u 192k 64k",
            "flush",
            "map",
        ],
        &["d.qcow2"],
    );
    assert!(r.out.ends_with(
        "256 KiB (0x40000) bytes     allocated at offset 0 bytes (0x0)\n\
         768 KiB (0xc0000) bytes not allocated at offset 256 KiB (0x40000)\n"
    ));
    io_twin(q, o, &[], &["write -q -P 0x41 128k 64k"], &disk);
    let r = io_twin(q, o, &[], &["read -v 0 48", "read -v 131070 20"], &disk);
    assert!(r.out.contains(
        "0001fffe:  00 00 41 41 41 41 41 41 41 41 41 41 41 41 41 41  ..AAAAAAAAAAAAAA\n\
         0002000e:  41 41 41 41  AAAA\n"
    ));
    io_twin(q, o, &["-r"], &["read -v 65530 12"], &disk);
    io_twin(
        q,
        o,
        &[],
        &["write -P 7 3 1000", "read -P 7 3 1000", "map"],
        &disk,
    );
    io_twin(
        q,
        o,
        &[],
        &[
            "write 1536 2k",
            "read -v 1530 40",
            "read -s 6 -l 2048 -P 0xcd 1530 2060",
        ],
        &disk,
    );
    io_twin(
        q,
        o,
        &[],
        &["r -q 0 4k", "w -q 0 4k", "d 0 64k", "f", "c"],
        &disk,
    );
}

#[test]
fn io_failures_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    let disk = ["disk.qcow2"];
    io_twin(q, o, &[], &["write -q -P 0xab 0 64k"], &disk);
    // Pattern failures (stdout), exit 1.
    let r = io_twin(q, o, &[], &["read -P 0xff 0 4k"], &disk);
    assert!(r
        .out
        .starts_with("Pattern verification failed at offset 0, 4096 bytes\nread 4096/4096"));
    assert_eq!(r.code, 1);
    io_twin(q, o, &[], &["read -P 0xab 60k 8k"], &disk);
    let r = io_twin(q, o, &[], &["read -q 0 4k", "read -q -P 0 0 4k"], &disk);
    assert_eq!(
        r.out,
        "Pattern verification failed at offset 0, 4096 bytes\n"
    );
    // Out of range: EIO on stdout.
    for cmd in [
        "read 1M 4k",
        "read 1020k 8k",
        "write 1M 512",
        "discard 1M 64k",
    ] {
        let r = io_twin(q, o, &[], &[cmd], &disk);
        assert_eq!(r.code, 1, "{cmd}");
    }
    let r = io_twin(q, o, &[], &["read 0 4k", "read 2M 4k", "read 0 4k"], &disk);
    assert_eq!(r.out.matches("read 4096/4096 bytes at offset 0").count(), 2);
    // Read-only handle.
    let r = io_twin(q, o, &["-r"], &["write 0 4k"], &["d.qcow2"]);
    assert_eq!(r.err, "qcow2-img: Block node is read-only\n");
    io_twin(
        q,
        o,
        &["-r"],
        &["discard 0 64k", "read -q 0 4k"],
        &["d.qcow2"],
    );
    // Command errors.
    for cmds in [
        &["bogus"][..],
        &["read 0"],
        &["read x 4k"],
        &["read 0 4k 5"],
        &["read -x 0 4k"],
        &["read -P"],
        &["read -P 300 0 4k"],
        &["read 0 3G"],
        &["read -l 5000 -P 0 0 4k"],
        &["write -z -P 1 0 4k"],
        &["write -u 0 4k"],
        &["write 0 1X"],
        &["map 1"],
        &["close", "read 0 4k"],
        &["open disk.qcow2"],
        &["flush 0"],
    ] {
        let r = io_twin(q, o, &[], cmds, &disk);
        assert_eq!(r.code, 1, "{cmds:?}");
    }
    // Open failures.
    io_twin(q, o, &[], &["read 0 4k"], &["nosuch.qcow2"]);
    io_twin(q, o, &["-f", "qcow2"], &["read 0 4k"], &["raw.img"]);
    io_twin(q, o, &[], &["read 0 4k"], &[]);
    let mut a = vec![
        "io",
        "-f",
        "qcow2",
        "-c",
        "read 0 4k",
        "disk.qcow2",
        "extra.qcow2",
    ];
    let r = ours(o, &a);
    assert_eq!(r.code, 1);
    assert!(r.out.starts_with("Usage: "), "{r:?}");
    a.truncate(1);
    assert_eq!(ours(o, &["io", "-o", "x", "disk.qcow2"]).code, 1);
}

#[test]
fn io_image_opts_and_open_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    io_twin(q, o, &[], &["write -q -P 0xab 0 64k"], &["disk.qcow2"]);
    let ok = [
        "driver=qcow2,file.filename=disk.qcow2,overlap-check=all,l2-cache-size=1M,lazy-refcounts=on",
        "file.filename=disk.qcow2",
        "driver=qcow2,file.filename=disk.qcow2,overlap-check.template=all,overlap-check.inactive-l2=off",
    ];
    for opts in ok {
        let r = io_twin(q, o, &["--image-opts"], &["read -q -P 0xab 0 4k"], &[opts]);
        assert_eq!(r.code, 0, "{opts}");
    }
    io_twin(
        q,
        o,
        &["--image-opts", "-r"],
        &["write 0 4k"],
        &["file.filename=disk.qcow2"],
    );
    let bad = [
        (
            &["--image-opts", "-f", "qcow2"][..],
            "driver=qcow2,file.filename=disk.qcow2",
        ),
        (
            &["--image-opts"],
            "driver=qcow2,file.filename=disk.qcow2,bogus=1",
        ),
        (
            &["--image-opts"],
            "driver=qcow2,file.filename=disk.qcow2,overlap-check=some",
        ),
        (&["--image-opts"], "driver=qcow2,file.filename=nosuch.qcow2"),
    ];
    for (pre, opts) in bad {
        let r = io_twin(q, o, pre, &["read 0 4k"], &[opts]);
        assert_eq!(r.code, 1, "{opts}");
    }
    let r = io_twin(
        q,
        o,
        &[],
        &[
            "open -o driver=qcow2,overlap-check=all,l2-cache-size=1M disk.qcow2",
            "read -q -P 0xab 0 4k",
        ],
        &[],
    );
    assert_eq!(r.code, 0);
    io_twin(q, o, &[], &["open -o bogus=1 disk.qcow2"], &[]);
    io_twin(
        q,
        o,
        &[],
        &["open -o file.filename=disk.qcow2", "read -q -P 0xab 0 1"],
        &[],
    );
    io_twin(
        q,
        o,
        &[],
        &[
            "open -r disk.qcow2",
            "write 0 4k",
            "close",
            "open disk.qcow2",
            "write -q 0 4k",
        ],
        &[],
    );
}

/// `-r` and `read-only=` as qemu-io 10 combines them: `-r` only sets the
/// default, an explicit `read-only=off` opens writable even with `-r`, an
/// explicit `read-only=on` without `-r` is refused at open, and
/// `force-share=on` (or `-U`) needs the result to be read-only. The same for
/// `open -r -o ...`. Every scenario compares stdout, stderr and exit code
/// with qemu-io's; the writes that succeed are read back with `-P`.
#[test]
fn io_read_only_flag_and_option_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    let opts = |extra: &str| format!("driver=qcow2,file.filename=d.qcow2{extra}");
    let io = |pre: &[&str], cmds: &[&str], extra: &str| {
        let arg = opts(extra);
        let mut p = vec!["--image-opts"];
        p.extend_from_slice(pre);
        io_twin(q, o, &p, cmds, &[arg.as_str()])
    };
    // -r alone, and with read-only=on: reads work, writes do not.
    let r = io(&["-r"], &["read -q 0 4k", "write 0 4k"], "");
    assert_eq!(
        (r.err.as_str(), r.code),
        (
            "qcow2-img: Block node is read-only
",
            1
        )
    );
    let r = io(&["-r"], &["read -q 0 4k", "write 0 4k"], ",read-only=on");
    assert_eq!(
        (r.err.as_str(), r.code),
        (
            "qcow2-img: Block node is read-only
",
            1
        )
    );
    // read-only=on without -r: refused at open.
    let r = io(&[], &["read -q 0 4k"], ",read-only=on");
    assert_eq!(
        (r.err.as_str(), r.code),
        (
            "qcow2-img: can't open: Block node is read-only
",
            1
        )
    );
    // read-only=off (in any of QEMU's boolean spellings) wins over -r.
    for (i, off) in ["off", "false", "no"].into_iter().enumerate() {
        let w = format!("write -q -P {} 0 4k", i + 1);
        let r = io(&["-r"], &[w.as_str()], &format!(",read-only={off}"));
        assert_eq!(
            (r.out.as_str(), r.err.as_str(), r.code),
            ("", "", 0),
            "{off}"
        );
        let p = format!("read -q -P {} 0 4k", i + 1);
        let r = io(&["-r"], &[p.as_str()], "");
        assert_eq!(r.code, 0, "{off}");
    }
    let r = io(
        &[],
        &["write -q -P 9 0 4k", "read -q -P 9 0 4k"],
        ",read-only=off",
    );
    assert_eq!(r.code, 0);
    // Bad values.
    for bad in [",read-only=bogus", ",read-only=", ",read-only=OFF"] {
        let r = io(&["-r"], &["read -q 0 4k"], bad);
        assert_eq!(r.code, 1, "{bad}");
    }
    // force-share needs a read-only result: -r with read-only=off is not.
    let r = io(&["-r"], &["read -q 0 4k"], ",read-only=off,force-share=on");
    assert_eq!(
        r.err,
        "qcow2-img: can't open: force-share=on can only be used with read-only images
"
    );
    io(&["-r", "-U"], &["read -q 0 4k"], ",read-only=off");
    let r = io(&["-r"], &["read -q 0 4k"], ",force-share=on");
    assert_eq!(r.code, 0);
    // file.read-only: the image file's node. `on` needs a read-only image
    // (refused at open otherwise), `off` leaves the image's mode alone.
    for (pre, extra, cmds, code) in [
        (&[][..], ",file.read-only=on", &["read -q 0 4k"][..], 1),
        (
            &["-r"],
            ",file.read-only=on",
            &["read -q 0 4k", "write 0 4k"],
            1,
        ),
        (
            &["-r"],
            ",file.read-only=on,read-only=off",
            &["read -q 0 4k"],
            1,
        ),
        (
            &["-r"],
            ",file.read-only=on,read-only=on",
            &["read -q 0 4k"],
            0,
        ),
        (
            &[],
            ",file.read-only=off",
            &["write -q -P 7 0 4k", "read -q -P 7 0 4k"],
            0,
        ),
        (
            &[],
            ",file.read-only=off,read-only=on",
            &["read -q 0 4k"],
            1,
        ),
        (
            &["-r"],
            ",file.read-only=off",
            &["read -q 0 4k", "write 0 4k"],
            1,
        ),
        (&["-r"], ",file.read-only=bogus", &["read -q 0 4k"], 1),
    ] {
        let r = io(pre, cmds, extra);
        assert_eq!(r.code, code, "{pre:?} {extra}: {}", r.err);
    }
    // The open command: -r is its default too.
    for cmds in [
        &[
            "open -r -o read-only=off d.qcow2",
            "write -q -P 5 0 4k",
            "read -q -P 5 0 4k",
        ][..],
        &["open -r -o read-only=on d.qcow2", "write 0 4k"],
        &["open -o read-only=on d.qcow2", "read -q 0 4k"],
        &["open -o read-only=off d.qcow2", "write -q 0 4k"],
        &["open -r -U -o read-only=off d.qcow2"],
        &["open -r -o read-only=off,force-share=on d.qcow2"],
        &[
            "open -o read-only=on,force-share=on d.qcow2",
            "read -q 0 4k",
        ],
    ] {
        io_twin(q, o, &[], cmds, &[]);
    }
    // -r on the command line leaves a later `open` writable.
    let r = io_twin(
        q,
        o,
        &["-r"],
        &["close", "open d.qcow2", "write -q 0 4k"],
        &["d.qcow2"],
    );
    assert_eq!(r.code, 0);
}

/// `ovl1.qcow2` of cli.md §12.6: 1 MiB, `write -P 0x11 0 64k`, then the L2
/// entry of guest cluster 0 pointed (COPIED) at the active L1 table.
fn make_overlap_image(d: &Path, name: &str) {
    qemu_ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", name, "1M"]);
    qemu_ok(d, "qemu-io", &["-c", "write -P 0x11 0 64k", name]);
    let p = d.join(name);
    let l1_offset = get_u64(&p, 40);
    assert_eq!(l1_offset, 0x30000);
    let l2 = get_u64(&p, l1_offset) & 0x00ff_ffff_ffff_fe00;
    put_u64(&p, l2, 0x8000_0000_0003_0000);
}

#[test]
fn io_overlap_corruption_matches_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
    for d in [q, o] {
        make_overlap_image(d, "ovl1.qcow2");
    }
    let r = io_twin(
        q,
        o,
        &[],
        &[
            "write -P 0x22 0 4k",
            "read 0 4k",
            "write 64k 4k",
            "flush",
            "map",
        ],
        &["ovl1.qcow2"],
    );
    assert_eq!(
        r.out,
        "write failed: Input/output error\nread failed: No medium found\nwrite failed: No medium found\n"
    );
    assert_eq!(
        r.err,
        "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with active L1 table); further corruption events will be suppressed\n\
         qcow2-img: Failed to query image length: No medium found\n"
    );
    assert_eq!(r.code, 1);
    // The corrupt bit is on disk, the L1 table intact.
    for d in [q, o] {
        let p = d.join("ovl1.qcow2");
        assert_eq!(get_u64(&p, 72) & 2, 2);
    }
    assert_eq!(
        std::fs::read(o.join("ovl1.qcow2")).unwrap()[0x30000..0x30008],
        std::fs::read(q.join("ovl1.qcow2")).unwrap()[0x30000..0x30008]
    );
    // Read-write reopen refused, -r works.
    let r = io_twin(q, o, &[], &["read -q 0 4k"], &["ovl1.qcow2"]);
    assert_eq!(
        r.err,
        "qcow2-img: can't open device ovl1.qcow2: qcow2: Image is corrupt; cannot be opened read/write\n"
    );
    let r = io_twin(
        q,
        o,
        &["-r"],
        &["read -q 0 4k", "read -q -P 0 64k 4k"],
        &["ovl1.qcow2"],
    );
    assert_eq!(r.code, 0);
    io_twin(q, o, &[], &["write -q 0 4k"], &["ovl1.qcow2"]);
    // info reports the bit.
    let i = ours(o, &["info", "--output", "json", "ovl1.qcow2"]);
    assert_eq!(json(&i.out)["format-specific"]["data"]["corrupt"], true);
}

/// `abort` dies with SIGABRT without closing. (qcow2kit does not implement
/// lazy refcounts yet, so unlike QEMU it leaves no dirty bit behind: its
/// refcounts are always up to date, and the image must check clean.)
#[test]
fn io_abort_dies_without_closing() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    qemu_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "dirty.qcow2",
            "64M",
        ],
    );
    let r = ours(
        d,
        &["io", "-c", "write -P 6 0 64k", "-c", "abort", "dirty.qcow2"],
    );
    assert_eq!(r.code, 134, "{r:?}");
    assert!(r.out.starts_with("wrote 65536/65536 bytes at offset 0\n"));
    let c = qemu(d, "qemu-img", &["check", "dirty.qcow2"]);
    assert_eq!(c.code, 0, "{c:?}");
}

/// Files that cannot be opened are named as QEMU names them: the image
/// itself, and an external data file (a child node, not a "backing file").
#[test]
fn io_open_errors_name_the_file_like_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = io_dirs();
    let (q, o) = (qd.path(), od.path());
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
                "data_file=d.data",
                "df.qcow2",
                "1M",
            ],
        );
        std::fs::remove_file(d.join("d.data")).unwrap();
    }
    let r = io_twin(q, o, &[], &["read 0 4k"], &["df.qcow2"]);
    assert!(r.err.contains("Could not open 'd.data'"), "{}", r.err);
    assert_eq!(r.code, 1);
    io_twin(q, o, &[], &["read 0 4k"], &["missing.qcow2"]);
    io_twin(q, o, &["-r"], &["read 0 4k"], &["missing.qcow2"]);
}
