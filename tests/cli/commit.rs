//! `qcow2-img commit` against `qemu-img commit` on twin 3-deep chains with
//! mixed cluster sizes (cli.md §9 and §15): the same messages and exit
//! codes, then every image of the chain reads the same in both directories
//! (`qemu-img compare`), FILE's allocation is the same (`qemu-img map`,
//! host offsets left out) and our images check clean.

use crate::support::*;
use std::path::Path;

/// base.qcow2 (64 KiB clusters, 1 MiB of 0x01) <- mid.qcow2 (4 KiB
/// clusters, 1 MiB of 0x02 at 1M) <- top.qcow2 (128 KiB clusters, 1 MiB of
/// 0x03 at 2M and a zeroed cluster over the base's data); lone.qcow2 has
/// no backing file.
fn setup(dir: &Path) {
    let img = |args: &[&str]| qemu_ok(dir, "qemu-img", args);
    let io = |cmd: &str, f: &str| qemu_ok(dir, "qemu-io", &["-c", cmd, f]);
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io("write -P 1 0 1M", "base.qcow2");
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
    ]);
    io("write -P 3 2M 1M", "top.qcow2");
    io("write -z 512k 128k", "top.qcow2");
    img(&["create", "-q", "-f", "qcow2", "lone.qcow2", "4M"]);
}

#[test]
fn commit_matches_qemu_img_on_twin_chains() {
    if !have_qemu() {
        return;
    }
    let cases: &[&[&str]] = &[
        &[],
        &["-d"],
        &["-q"],
        &["-f", "qcow2", "-r", "64M"],
        &["-b", "base.qcow2"],
        &["-b", "mid.qcow2"],
        &["-b", "./base.qcow2"],
        &["-d", "-b", "base.qcow2", "-r", "0"],
    ];
    for args in cases {
        let (qd, od) = twin_dirs(setup);
        let (qd, od) = (qd.path(), od.path());
        let mut a = vec!["commit"];
        a.extend_from_slice(args);
        a.push("top.qcow2");
        twins(qd, od, "qemu-img", &[], &a);
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
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
            assert_eq!(c.code, 0, "{args:?}: {f} differs: {c:?}");
            let k = qemu(od, "qemu-img", &["check", f]);
            assert_eq!(k.code, 0, "{args:?}: {f}: {k:?}");
        }
        assert_eq!(
            qemu_map_no_offsets(qd, &["top.qcow2"]),
            qemu_map_no_offsets(od, &["top.qcow2"]),
            "{args:?}"
        );
        assert_eq!(
            qemu_map_no_offsets(qd, &["mid.qcow2"]),
            qemu_map_no_offsets(od, &["mid.qcow2"]),
            "{args:?}"
        );
    }
}

#[test]
fn commit_errors_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(setup);
    let (qd, od) = (qd.path(), od.path());
    let cases: &[&[&str]] = &[
        &["-b", "top.qcow2", "top.qcow2"],
        &["-b", "nosuch.qcow2", "top.qcow2"],
        &["-b", "base.qcow2", "lone.qcow2"],
        &["lone.qcow2"],
        &["-r", "abc", "top.qcow2"],
        &["-r", "10X", "top.qcow2"],
        &["-r", "-1", "top.qcow2"],
        &["nosuch.qcow2"],
        &["top.qcow2", "lone.qcow2"],
        &[],
    ];
    for args in cases {
        let mut a = vec!["commit"];
        a.extend_from_slice(args);
        twins(qd, od, "qemu-img", &[], &a);
    }
    // Nothing changed.
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        assert_eq!(
            qemu_map_no_offsets(qd, &[f]),
            qemu_map_no_offsets(od, &[f]),
            "{f}"
        );
    }
}

#[test]
fn commit_progress_has_qemu_img_shape() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(setup);
    let (qd, od) = (qd.path(), od.path());
    let q = qemu(qd, "qemu-img", &["commit", "-p", "top.qcow2"]);
    let o = ours(od, &["commit", "-p", "top.qcow2"]);
    assert_eq!((o.code, &o.err), (q.code, &q.err));
    for r in [&q, &o] {
        assert!(r.out.starts_with("    (0.00/100%)\r"), "{:?}", r.out);
        assert!(
            r.out.ends_with("    (100.00/100%)\r\nImage committed.\n"),
            "{:?}",
            r.out
        );
    }
    // -q silences the indicator too.
    let (qd, od) = twin_dirs(setup);
    twins(
        qd.path(),
        od.path(),
        "qemu-img",
        &[],
        &["commit", "-p", "-q", "top.qcow2"],
    );
}

/// `-r` holds the copy back: 3 MiB at 2 MiB/s owes at least 1.25 s of waits
/// under QEMU's slice accounting (the first request of each slice goes at
/// once); the bound asserted is generous. The result is still qemu-img's.
#[test]
fn commit_rate_limit_holds_the_copy_back() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        setup(d);
        qemu_ok(d, "qemu-io", &["-c", "write -P 4 0 3M", "top.qcow2"]);
    });
    let (qd, od) = (qd.path(), od.path());
    qemu_ok(qd, "qemu-img", &["commit", "-q", "top.qcow2"]);
    let start = std::time::Instant::now();
    let o = ours(od, &["commit", "-r", "2M", "top.qcow2"]);
    let took = start.elapsed();
    assert_eq!((o.code, o.out.as_str()), (0, "Image committed.\n"), "{o:?}");
    assert!(took >= std::time::Duration::from_millis(750), "{took:?}");
    let c = qemu(
        od,
        "qemu-img",
        &["compare", &abs(qd, "mid.qcow2"), &abs(od, "mid.qcow2")],
    );
    assert_eq!(c.code, 0, "{c:?}");
}

/// A base smaller than FILE grows to FILE's size, as qemu-img's does.
#[test]
fn commit_grows_a_smaller_base() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        qemu_ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
        );
        qemu_ok(d, "qemu-io", &["-c", "write -P 1 0 1M", "b.qcow2"]);
        qemu_ok(
            d,
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", "3M",
            ],
        );
        qemu_ok(d, "qemu-io", &["-c", "write -P 2 2M 512k", "t.qcow2"]);
    });
    let (qd, od) = (qd.path(), od.path());
    twins(qd, od, "qemu-img", &[], &["commit", "t.qcow2"]);
    let size = |d: &Path| {
        json(&qemu_ok(d, "qemu-img", &["info", "--output", "json", "b.qcow2"]).out)["virtual-size"]
            .clone()
    };
    assert_eq!(size(qd), size(od));
    let c = qemu(
        od,
        "qemu-img",
        &["compare", &abs(qd, "b.qcow2"), &abs(od, "b.qcow2")],
    );
    assert_eq!(c.code, 0, "{c:?}");
    assert_eq!(qemu(od, "qemu-img", &["check", "b.qcow2"]).code, 0);
}

/// base.raw (1 MiB of 0x01) <- mid.qcow2 (4 KiB clusters, 1 MiB of 0x02 at
/// 1M) <- top.qcow2 (128 KiB clusters, 1 MiB of 0x03 at 2M and a zeroed
/// cluster over the base's data); short.qcow2 sits directly on base.raw.
fn setup_raw(dir: &Path) {
    let img = |args: &[&str]| qemu_ok(dir, "qemu-img", args);
    let io = |cmd: &str, f: &str| qemu_ok(dir, "qemu-io", &["-c", cmd, f]);
    img(&["create", "-q", "-f", "raw", "base.raw", "4M"]);
    qemu_ok(
        dir,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 1M", "base.raw"],
    );
    for (f, cs, b, bf) in [
        ("mid.qcow2", "cluster_size=4k", "base.raw", "raw"),
        ("top.qcow2", "cluster_size=128k", "mid.qcow2", "qcow2"),
        ("short.qcow2", "cluster_size=64k", "base.raw", "raw"),
    ] {
        img(&[
            "create", "-q", "-f", "qcow2", "-o", cs, "-b", b, "-F", bf, f,
        ]);
    }
    io("write -P 2 1M 1M", "mid.qcow2");
    io("write -P 3 2M 1M", "top.qcow2");
    io("write -z 512k 128k", "top.qcow2");
    io("write -P 5 3M 64k", "short.qcow2");
    io("write -z 0 64k", "short.qcow2");
}

/// Commits into a raw base match qemu-img's: the raw file holds the same
/// bytes with the same holes (`qemu-img map` of it), every qcow2 image of
/// the chain reads the same, keeps the same backing strings, has the same
/// allocation and checks clean.
#[test]
fn commit_into_a_raw_base_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let cases: &[&[&str]] = &[
        &["-b", "base.raw", "top.qcow2"],
        &["-d", "-b", "base.raw", "-r", "64M", "top.qcow2"],
        &["mid.qcow2"],
        &["-d", "mid.qcow2"],
        &["-p", "short.qcow2"],
        &["-b", "./base.raw", "short.qcow2"],
        &["-q", "-b", "mid.qcow2", "top.qcow2"],
    ];
    for args in cases {
        let (qd, od) = twin_dirs(setup_raw);
        let (qd, od) = (qd.path(), od.path());
        let mut a = vec!["commit"];
        a.extend_from_slice(args);
        if args.contains(&"-p") {
            let q = qemu(qd, "qemu-img", &a);
            let o = ours(od, &a[..]);
            assert_eq!((o.code, &o.err), (q.code, &q.err), "{args:?}");
            assert!(
                o.out.ends_with("(100.00/100%)\r\nImage committed.\n"),
                "{o:?}"
            );
        } else {
            twins(qd, od, "qemu-img", &[], &a);
        }
        assert_twin_raw_same(qd, od, "base.raw", &format!("{args:?}"));
        for f in ["mid.qcow2", "top.qcow2", "short.qcow2"] {
            let c = qemu(od, "qemu-img", &["compare", &abs(qd, f), &abs(od, f)]);
            assert_eq!(c.code, 0, "{args:?}: {f} differs: {c:?}");
            let k = qemu(od, "qemu-img", &["check", f]);
            assert_eq!(k.code, 0, "{args:?}: {f}: {k:?}");
            assert_eq!(qemu_backing(qd, f), qemu_backing(od, f), "{args:?}: {f}");
            assert_eq!(
                qemu_map_no_offsets(qd, &[f]),
                qemu_map_no_offsets(od, &[f]),
                "{args:?}: {f}"
            );
        }
    }
}
