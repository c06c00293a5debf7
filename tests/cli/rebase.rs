//! `qcow2-img rebase` against `qemu-img rebase` on twin 3-deep chains with
//! mixed cluster sizes, a new qcow2 backing file larger than the old one
//! and a raw one (cli.md §10 and §16): the same messages and exit codes,
//! then every image reads the same in both directories (`qemu-img
//! compare`), FILE's allocation is the same (`qemu-img map`, host offsets
//! left out), `info` names the same backing file and format, and our
//! images check clean.

use crate::support::*;
use std::path::Path;

/// base.qcow2 (4 MiB, 64 KiB clusters, 2 MiB of 0x01) <- mid.qcow2 (4 KiB
/// clusters, 0x02 in [1M, 2M)) <- top.qcow2 (6 MiB, 128 KiB clusters, 0x03
/// in [2M, 2.5M), a zeroed cluster at 512k). nb.qcow2 (6 MiB, 32 KiB
/// clusters) matches the chain in [0, 1M), differs in [1M, 2M) and holds
/// 0x07 past the old chain's end ([4M, 6M)); nb.raw is a 5 MiB raw file.
/// lone.qcow2 has no backing file.
fn setup(dir: &Path) {
    let img = |args: &[&str]| qemu_ok(dir, "qemu-img", args);
    let io = |cmd: &str, f: &str| qemu_ok(dir, "qemu-io", &["-c", cmd, f]);
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io("write -P 1 0 2M", "base.qcow2");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
    ]);
    io("write -P 2 1M 1M", "mid.qcow2");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=128k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "6M",
    ]);
    io("write -P 3 2M 512k", "top.qcow2");
    io("write -z 512k 128k", "top.qcow2");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=32k",
        "nb.qcow2",
        "6M",
    ]);
    qemu_ok(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 9 1M 1M",
            "-c",
            "write -P 7 4M 2M",
            "nb.qcow2",
        ],
    );
    img(&["create", "-q", "-f", "raw", "nb.raw", "5M"]);
    qemu_ok(
        dir,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 5 512k 3M", "nb.raw"],
    );
    img(&["create", "-q", "-f", "qcow2", "lone.qcow2", "4M"]);
}

/// Every qcow2 image of the twins reads the same, is named the same
/// backing file and format, and ours check clean; FILE maps the same.
#[track_caller]
fn assert_twins_agree(qd: &Path, od: &Path, file: &str, what: &str) {
    for f in [
        "base.qcow2",
        "mid.qcow2",
        "top.qcow2",
        "nb.qcow2",
        "lone.qcow2",
    ] {
        let c = qemu(
            od,
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                &abs(qd, f),
                &abs(od, f),
            ],
        );
        assert_eq!(c.code, 0, "{what}: {f} differs: {c:?}");
        let k = qemu(od, "qemu-img", &["check", f]);
        assert_eq!(k.code, 0, "{what}: {f}: {k:?}");
        assert_eq!(
            qemu_backing(qd, f),
            qemu_backing(od, f),
            "{what}: backing of {f}"
        );
    }
    assert_eq!(
        qemu_map_no_offsets(qd, &[file]),
        qemu_map_no_offsets(od, &[file]),
        "{what}: map of {file}"
    );
}

#[test]
fn rebase_matches_qemu_img_on_twin_chains() {
    if !have_qemu() {
        return;
    }
    let cases: &[&[&str]] = &[
        // Onto an image of its own chain (mid's data is pulled in).
        &["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
        // Onto another image, larger than the old chain: zeroes are
        // written past the old end where the new one holds data.
        &["-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"],
        &["-b", "nb.raw", "-F", "raw", "top.qcow2"],
        // -F as given, even if it does not match the file.
        &["-b", "nb.qcow2", "-F", "raw", "top.qcow2"],
        // No backing file afterwards: everything is pulled in.
        &["-b", "", "top.qcow2"],
        &["-q", "-b", "", "-F", "qcow2", "top.qcow2"],
        // An intermediate image.
        &["-b", "nb.qcow2", "-F", "qcow2", "mid.qcow2"],
        // An image without a backing file gets one (differences with the
        // zeroes it read are copied in).
        &["-b", "nb.qcow2", "-F", "qcow2", "lone.qcow2"],
        // Unsafe mode only rewrites the header.
        &["-u", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"],
        &["-u", "-b", "nosuch.qcow2", "-F", "qcow2", "top.qcow2"],
        &["-u", "top.qcow2"],
        &["-u", "-F", "qcow2", "top.qcow2"],
        &["-u", "lone.qcow2"],
        &[
            "-f",
            "qcow2",
            "-U",
            "-b",
            "nb.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ];
    for args in cases {
        let (qd, od) = twin_dirs(setup);
        let (qd, od) = (qd.path(), od.path());
        let mut a = vec!["rebase"];
        a.extend_from_slice(args);
        let (_, o) = twins(qd, od, "qemu-img", &[], &a);
        assert_eq!((o.code, o.out.as_str()), (0, ""), "{args:?}");
        if args.contains(&"nosuch.qcow2") {
            // The chain no longer opens: only the header can be compared.
            assert_eq!(
                qemu_backing(qd, "top.qcow2"),
                qemu_backing(od, "top.qcow2"),
                "{args:?}"
            );
            continue;
        }
        assert_twins_agree(qd, od, args[args.len() - 1], &format!("{args:?}"));
    }
}

#[test]
fn rebase_errors_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(setup);
    let (qd, od) = (qd.path(), od.path());
    let cases: &[&[&str]] = &[
        &["-b", "nosuch.qcow2", "-F", "qcow2", "top.qcow2"],
        &["-u", "-b", "base.qcow2", "top.qcow2"],
        &["top.qcow2"],
        &["-F", "qcow2", "lone.qcow2"],
        &["-b", "nb.qcow2", "-F", "bogus", "top.qcow2"],
        &["-b", "nb.raw", "-F", "qcow2", "top.qcow2"],
        &["-b", "nb.qcow2", "-F", "qcow2", "nosuch.qcow2"],
        &["-b", "nb.qcow2", "-F", "qcow2", "top.qcow2", "lone.qcow2"],
        &[],
        &["-b"],
        &["--bogus", "top.qcow2"],
    ];
    for args in cases {
        let mut a = vec!["rebase"];
        a.extend_from_slice(args);
        let (_, o) = twins(qd, od, "qemu-img", &[], &a);
        assert_eq!(o.code, 1, "{args:?}");
    }
    // Nothing changed.
    for f in ["mid.qcow2", "top.qcow2", "lone.qcow2"] {
        assert_eq!(
            qemu_map_no_offsets(qd, &[f]),
            qemu_map_no_offsets(od, &[f]),
            "{f}"
        );
        assert_eq!(qemu_backing(qd, f), qemu_backing(od, f), "{f}");
    }
}

/// Safe mode without `-F`: qemu-img copies, then fails to write the header;
/// ours fails the same way before copying anything (cli.md §16 allows it).
/// Both leave the header naming the old backing file and the guest view
/// unchanged.
#[test]
fn rebase_without_format_fails_before_copying() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(setup);
    let (qd, od) = (qd.path(), od.path());
    let before = qemu_map_no_offsets(od, &["top.qcow2"]);
    let raw_before = std::fs::read(od.join("top.qcow2")).unwrap();
    let a = ["rebase", "-b", "nb.qcow2", "top.qcow2"];
    let q = qemu(qd, "qemu-img", &a);
    let o = ours(od, &a);
    assert_eq!((o.code, &o.err, &o.out), (q.code, &q.err, &q.out));
    assert_eq!(
        o.err,
        "qcow2-img: Could not change the backing file to 'nb.qcow2': backing format must be specified\n"
    );
    assert_eq!(qemu_map_no_offsets(od, &["top.qcow2"]), before);
    assert_eq!(std::fs::read(od.join("top.qcow2")).unwrap(), raw_before);
    assert_eq!(qemu_backing(qd, "top.qcow2"), qemu_backing(od, "top.qcow2"));
    let c = qemu(
        od,
        "qemu-img",
        &["compare", &abs(qd, "top.qcow2"), &abs(od, "top.qcow2")],
    );
    assert_eq!(c.code, 0, "{c:?}");
}

#[test]
fn rebase_progress_has_qemu_img_shape() {
    if !have_qemu() {
        return;
    }
    for args in [
        &["-p", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &["-p", "-b", "", "top.qcow2"],
        &["-p", "-u", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"],
    ] {
        let (qd, od) = twin_dirs(setup);
        let (qd, od) = (qd.path(), od.path());
        let mut a = vec!["rebase"];
        a.extend_from_slice(args);
        let q = qemu(qd, "qemu-img", &a);
        let o = ours(od, &a);
        assert_eq!((o.code, &o.err), (q.code, &q.err), "{args:?}");
        for r in [&q, &o] {
            assert!(r.out.starts_with("    (0.00/100%)\r"), "{:?}", r.out);
            assert!(r.out.ends_with("    (100.00/100%)\r\n"), "{:?}", r.out);
        }
        // The intermediate values too (no timing in them).
        assert_eq!(o.out, q.out, "{args:?}");
        assert_twins_agree(qd, od, "top.qcow2", &format!("{args:?}"));
    }
    // -q silences the indicator.
    let (qd, od) = twin_dirs(setup);
    twins(
        qd.path(),
        od.path(),
        "qemu-img",
        &[],
        &["rebase", "-p", "-q", "-b", "", "top.qcow2"],
    );
}

/// `rebase -p` prints qemu-img's intermediate values: each 2 MiB request
/// compared (not those FILE allocates) adds `100 / (size / 2 MiB)` percent
/// (integer division, C `float` sums capped at 100, printed when they moved
/// by more than 2), then 100 once the header is written. Sizes that do not
/// divide evenly, allocations that cut the requests, a disk under 2 MiB.
#[test]
fn rebase_progress_values_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    for (size, writes) in [
        ("20M", &["write -P 2 4M 2M"][..]),
        ("3M", &["write -P 2 512k 1M"]),
        ("7M", &["write -P 2 512k 1M"]),
        ("25M", &["write -P 2 512k 1M", "write -P 3 9M 64k"]),
        ("1M", &[]),
        ("64M", &["write -P 2 1M 100k", "write -z 20M 3M"]),
    ] {
        let setup = |d: &Path| {
            let img = |args: &[&str]| qemu_ok(d, "qemu-img", args);
            img(&["create", "-q", "-f", "qcow2", "b.qcow2", size]);
            qemu_ok(
                d,
                "qemu-io",
                &["-c", &format!("write -P 1 0 {size}"), "b.qcow2"],
            );
            img(&[
                "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2",
            ]);
            for w in writes {
                qemu_ok(d, "qemu-io", &["-c", w, "t.qcow2"]);
            }
            img(&["create", "-q", "-f", "qcow2", "n.qcow2", size]);
        };
        let (qd, od) = twin_dirs(setup);
        let (qd, od) = (qd.path(), od.path());
        let a = ["rebase", "-p", "-b", "n.qcow2", "-F", "qcow2", "t.qcow2"];
        let q = qemu(qd, "qemu-img", &a);
        let o = ours(od, &a);
        assert_eq!((o.code, &o.err, &o.out), (q.code, &q.err, &q.out), "{size}");
        assert!(q.out.matches('\r').count() >= 2, "{size}: {:?}", q.out);
        let c = qemu(
            od,
            "qemu-img",
            &["compare", &abs(qd, "t.qcow2"), &abs(od, "t.qcow2")],
        );
        assert_eq!(c.code, 0, "{size}: {c:?}");
    }
}
