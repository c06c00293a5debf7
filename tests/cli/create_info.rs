//! `qcow2-img create` and `qcow2-img info` against qemu-img 10 (cli.md §2, §3):
//! each case runs both tools on twin files and compares streams and exit codes.

// Helpers outside #[test] functions panic on purpose when a tool misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::*;
use std::path::Path;

/// Runs `create ARGS` with qemu-img in `qd` and with qcow2-img in `od`;
/// stdout, stderr and the exit code must be equal.
fn create_twins(qd: &Path, od: &Path, args: &[&str]) -> (Run, Run) {
    let mut full = vec!["create"];
    full.extend_from_slice(args);
    twins(qd, od, "qemu-img", &[], &full)
}

#[test]
fn create_lines_and_errors_match_qemu() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| qemu_create(d, "base.qcow2", "64M"));
    let ok: &[&[&str]] = &[
        &["-f", "qcow2", "c1.qcow2", "1G"],
        &["-f", "qcow2", "-q", "c2.qcow2", "1G"],
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,compat=0.10",
            "c1.qcow2",
            "1M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=1.1,lazy_refcounts=on,refcount_bits=64,extended_l2=on,cluster_size=128k",
            "c2.qcow2",
            "1M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "data_file=c5b.data,data_file_raw=on",
            "c5b.qcow2",
            "1M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "data_file=a,,b.data",
            "c5c.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"],
        &[
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov2.qcow2",
            "128M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "size=2M",
            "-o",
            "compat=v3",
            "c6.qcow2",
        ],
        &["-f", "qcow2", "c7.qcow2", "1536b"],
        &["-f", "qcow2", "c8.qcow2", "1.5G"],
        &["-f", "qcow2", "c9.qcow2", "512K"],
    ];
    for args in ok {
        let (_, o) = create_twins(qd.path(), od.path(), args);
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
    }
    let bad: &[(&[&str], &str)] = &[
        (
            &["-f", "qcow2", "-o", "bogus=1", "c3.qcow2", "1M"],
            "c3.qcow2",
        ),
        (
            &["-f", "qcow2", "-o", "cluster_size=3000", "c3.qcow2", "1M"],
            "c3.qcow2",
        ),
        (
            &["-f", "qcow2", "-o", "cluster_size=256", "c3.qcow2", "1M"],
            "c3.qcow2",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,lazy_refcounts=on",
                "c3.qcow2",
                "1M",
            ],
            "c3.qcow2",
        ),
        (
            &["-f", "qcow2", "-o", "compat=0.9", "c3.qcow2", "1M"],
            "c3.qcow2",
        ),
        (
            &["-f", "qcow2", "-o", "refcount_bits=3", "c3.qcow2", "1M"],
            "c3.qcow2",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=8k",
                "c5.qcow2",
                "1M",
            ],
            "c5.qcow2",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=maybe",
                "c4.qcow2",
                "1M",
            ],
            "c4.qcow2",
        ),
        (
            &["-f", "qcow2", "-o", "size=2M", "c3.qcow2", "4M"],
            "c3.qcow2",
        ),
        (&["-f", "qcow2", "nosize.qcow2"], "nosize.qcow2"),
        (&["-f", "qcow2", "c3.qcow2", "10X"], "c3.qcow2"),
        (&["-f", "qcow2", "c3.qcow2", "-1"], "c3.qcow2"),
        (&["-f", "qcow2", "c5.qcow2", "1M", "2M"], "c5.qcow2"),
        (
            &["-f", "qcow2", "-b", "base.qcow2", "ov3.qcow2"],
            "ov3.qcow2",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-b",
                "nosuch.qcow2",
                "-F",
                "qcow2",
                "ov4.qcow2",
                "1G",
            ],
            "ov4.qcow2",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-b",
                "nosuch.qcow2",
                "-F",
                "qcow2",
                "ov4.qcow2",
            ],
            "ov4.qcow2",
        ),
        (&["-f", "qcow2", "nodir/x.qcow2", "1M"], "nodir/x.qcow2"),
        (&["-f", "qcow2", "-o", ",bad", "c3.qcow2", "1M"], "c3.qcow2"),
        (&["-f", "qcow2", "--bogus", "c3.qcow2", "1M"], "c3.qcow2"),
    ];
    for (args, file) in bad {
        let (_, o) = create_twins(qd.path(), od.path(), args);
        assert_eq!(o.code, 1, "{args:?}");
        assert!(
            !od.path().join(file).exists(),
            "{args:?} left {file} behind"
        );
    }
    // The Formatting line comes before validation errors, on stdout.
    let o = ours(
        od.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3000",
            "x.qcow2",
            "1M",
        ],
    );
    assert!(o
        .out
        .starts_with("Formatting 'x.qcow2', fmt=qcow2 cluster_size=3000 "));
    assert_eq!(
        o.err,
        "qcow2-img: x.qcow2: Cluster size must be a power of two between 512 and 2048k\n"
    );
}

#[test]
fn create_requires_qcow2_format() {
    let d = scratch();
    for args in [
        &["create", "c.qcow2", "1M"][..],
        &["create", "-f", "raw", "c.qcow2", "1M"],
    ] {
        let o = ours(d.path(), args);
        assert_eq!(o.code, 1, "{args:?}");
        assert!(
            o.out.is_empty() && o.err.starts_with("qcow2-img: "),
            "{o:?}"
        );
        assert!(!d.path().join("c.qcow2").exists());
    }
}

/// Strips `actual-size` and compares two `info --output json` outputs.
fn assert_info_json_eq(q: &Run, o: &Run, what: &str) {
    assert_eq!(o.code, q.code, "{what}: {o:?} vs {q:?}");
    let (mut a, mut b) = (json(&q.out), json(&o.out));
    strip_actual_size(&mut a);
    strip_actual_size(&mut b);
    assert_eq!(b, a, "{what}");
}

/// Compares human `info` output line by line, `disk size` lines by shape only.
fn assert_info_human_eq(q: &Run, o: &Run, what: &str) {
    assert_eq!(o.code, q.code, "{what}");
    assert_eq!(o.err, q.err, "{what}");
    let (ql, ol): (Vec<_>, Vec<_>) = (q.out.lines().collect(), o.out.lines().collect());
    assert_eq!(ol.len(), ql.len(), "{what}:\n{}\nvs\n{}", o.out, q.out);
    for (a, b) in ql.iter().zip(&ol) {
        if a.trim_start().starts_with("disk size: ") {
            let (pa, pb) = (a.split(':').next(), b.split(':').next());
            assert_eq!(pb, pa, "{what}");
            assert!(b.ends_with('B'), "{what}: {b}");
        } else {
            assert_eq!(b, a, "{what}");
        }
    }
}

#[test]
fn create_twins_have_equal_info_and_check_clean() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| qemu_create(d, "base.qcow2", "64M"));
    let cases: &[&[&str]] = &[
        &["64M"],
        &["-o", "compat=0.10", "64M"],
        &["-o", "cluster_size=4k", "1G"],
        &["-o", "cluster_size=2M,refcount_bits=1", "10G"],
        &["-o", "lazy_refcounts=on,refcount_bits=64", "8M"],
        &["-o", "extended_l2=on", "8M"],
        &["-o", "compression_type=zstd", "8M"],
        &["-o", "data_file=img.data", "8M"],
        &["-o", "data_file=img.data,data_file_raw=on", "8M"],
        &["-b", "base.qcow2", "-F", "qcow2"],
        &[
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=512",
            "100M",
        ],
        &["-o", "cluster_size=512", "2G"],
    ];
    for args in cases {
        // The file name goes before the size (if any).
        let (opts, size): (Vec<&str>, Option<&str>) = match args.last() {
            Some(s) if !s.contains('=') && !s.ends_with(".qcow2") && *s != "qcow2" => {
                (args[..args.len() - 1].to_vec(), Some(*s))
            }
            _ => (args.to_vec(), None),
        };
        let mut full = vec!["create", "-q", "-f", "qcow2"];
        full.extend(opts);
        full.push("img.qcow2");
        full.extend(size);
        qemu_ok(qd.path(), "qemu-img", &full);
        let o = ours(od.path(), &full);
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
        for out in ["json", "human"] {
            let info = ["info", "--output", out, "img.qcow2"];
            let q = qemu(qd.path(), "qemu-img", &info);
            // qemu-img's view of our image, and our view of it.
            let qo = qemu(od.path(), "qemu-img", &info);
            let o = ours(od.path(), &info);
            // Known gap: QEMU preallocates metadata for data_file_raw=on (its L2
            // tables map the data file 1:1); qcow2kit's create does not yet, so
            // the image file is shorter. Everything else must match.
            let short_file = args.iter().any(|a| a.contains("data_file_raw=on"));
            for (x, who) in [(&qo, "qemu-img"), (&o, "qcow2-img")] {
                let what = format!("{args:?} ({who} info)");
                if short_file {
                    let (mut a, mut b) = (json_or_lines(&q.out), json_or_lines(&x.out));
                    drop_file_length(&mut a);
                    drop_file_length(&mut b);
                    assert_eq!(b, a, "{what}");
                } else if out == "json" {
                    assert_info_json_eq(&q, x, &what);
                } else {
                    assert_info_human_eq(&q, x, &what);
                }
            }
        }
        let c = qemu(od.path(), "qemu-img", &["check", "img.qcow2"]);
        assert_eq!(c.code, 0, "{args:?}: {c:?}");
        assert!(
            c.out.starts_with("No errors were found on the image."),
            "{c:?}"
        );
    }
}

/// JSON output parsed, or human output as a JSON array of its lines.
fn json_or_lines(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|_| {
        serde_json::Value::Array(
            s.lines()
                .filter(|l| !l.contains("disk size: "))
                .map(|l| serde_json::Value::String(l.to_owned()))
                .collect(),
        )
    })
}

/// Removes the host file's length (and sizes) from `info` output.
fn drop_file_length(v: &mut serde_json::Value) {
    strip_actual_size(v);
    match v {
        serde_json::Value::Array(a) => a.retain(|l| {
            !l.as_str()
                .is_some_and(|l| l.trim_start().starts_with("file length: "))
        }),
        serde_json::Value::Object(m) => {
            if let Some(c) = m.get_mut("children") {
                if let Some(info) = c.get_mut(0).and_then(|c| c.get_mut("info")) {
                    if let Some(i) = info.as_object_mut() {
                        i.remove("virtual-size");
                    }
                }
            }
        }
        _ => {}
    }
}

/// Builds the images of cli.md §3 with qemu-img/qemu-io in `d`.
fn make_info_images(d: &Path) {
    let q = |args: &[&str]| {
        qemu_ok(d, "qemu-img", args);
    };
    q(&["create", "-q", "-f", "qcow2", "v3.qcow2", "64M"]);
    qemu_ok(d, "qemu-io", &["-c", "write -P 1 0 1M", "v3.qcow2"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "64M",
    ]);
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ov.qcow2",
    ]);
    q(&["create", "-q", "-f", "qcow2", "snap.qcow2", "64M"]);
    q(&["snapshot", "-c", "snap1", "snap.qcow2"]);
    q(&["create", "-q", "-f", "qcow2", "bm.qcow2", "64M"]);
    q(&["bitmap", "--add", "bm.qcow2", "bitmap0"]);
    q(&[
        "bitmap",
        "--add",
        "-g",
        "128k",
        "--disable",
        "bm.qcow2",
        "b2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=df.data",
        "df.qcow2",
        "64M",
    ]);
    q(&["create", "-q", "-f", "qcow2", "corrupt.qcow2", "64M"]);
    set_incompat(&d.join("corrupt.qcow2"), 2);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "dirty.qcow2",
        "64M",
    ]);
    let a = qemu(
        d,
        "qemu-io",
        &["-c", "write -P 6 0 64k", "-c", "abort", "dirty.qcow2"],
    );
    assert_eq!(a.code, 134, "{a:?}");
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "orphan.qcow2",
        "64M",
    ]);
    std::fs::write(d.join("raw.img"), vec![7u8; 4096]).unwrap();
    std::fs::write(d.join("rb.raw"), vec![9u8; 300 * 1024]).unwrap();
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "rb.raw",
        "-F",
        "raw",
        "onraw.qcow2",
        "1M",
    ]);
}

#[test]
fn info_matches_qemu_on_qemu_made_images() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    make_info_images(d);
    assert_eq!(
        get_u64(&d.join("dirty.qcow2"), 72) & 1,
        1,
        "dirty bit set by abort"
    );
    for img in [
        "v3.qcow2",
        "v2.qcow2",
        "ov.qcow2",
        "snap.qcow2",
        "bm.qcow2",
        "df.qcow2",
        "corrupt.qcow2",
        "dirty.qcow2",
        "orphan.qcow2",
    ] {
        let q = qemu(d, "qemu-img", &["info", "--output", "json", img]);
        let o = ours(d, &["info", "--output", "json", img]);
        assert_info_json_eq(&q, &o, img);
        let q = qemu(d, "qemu-img", &["info", img]);
        let o = ours(d, &["info", img]);
        assert_info_human_eq(&q, &o, img);
        let q = qemu(
            d,
            "qemu-img",
            &["info", "-U", "-f", "qcow2", "--output=json", img],
        );
        let o = ours(d, &["info", "-U", "-f", "qcow2", "--output=json", img]);
        assert_info_json_eq(&q, &o, img);
    }
    // Spot checks of the values the contract names.
    let o = ours(d, &["info", "--output", "json", "bm.qcow2"]);
    let v = json(&o.out);
    assert_eq!(
        v["format-specific"]["data"]["bitmaps"][1]["granularity"],
        131072
    );
    let o = ours(d, &["info", "dirty.qcow2"]);
    assert!(o.out.contains("\ncleanly shut down: no\n"));
    let o = ours(d, &["info", "--output", "json", "corrupt.qcow2"]);
    assert_eq!(json(&o.out)["format-specific"]["data"]["corrupt"], true);

    // --backing-chain, human and JSON.
    for args in [
        &["info", "--backing-chain", "ov.qcow2"][..],
        &["info", "--backing-chain", "--output", "json", "ov.qcow2"],
        &["info", "--backing-chain", "v3.qcow2"],
        &["info", "--backing-chain", "onraw.qcow2"],
        &["info", "--backing-chain", "--output", "json", "onraw.qcow2"],
    ] {
        let q = qemu(d, "qemu-img", args);
        let o = ours(d, args);
        if args.contains(&"json") {
            assert_info_json_eq(&q, &o, "chain");
        } else {
            assert_info_human_eq(&q, &o, "chain");
        }
    }
    // Errors (stderr and exit code exact).
    for args in [
        &["info", "--backing-chain", "orphan.qcow2"][..],
        &["info", "nosuch.qcow2"],
        &["info", "-f", "qcow2", "raw.img"],
        &["info", "--output", "yaml", "v3.qcow2"],
        &["info"],
        &["info", "v3.qcow2", "extra"],
        &["info", "--bogus", "v3.qcow2"],
        &["info", "-x", "v3.qcow2"],
        &["info", "v3.qcow2", "--output"],
    ] {
        let (_, o) = twins(d, d, "qemu-img", &[], args);
        assert_eq!(o.code, 1);
    }

    // Like qemu-img, info does not open the external data file: it works
    // when the data file is gone.
    let dname = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("df") && !n.ends_with(".qcow2"))
        .expect("df.qcow2's data file");
    std::fs::rename(d.join(&dname), d.join("moved.data")).unwrap();
    for args in [
        &["info", "df.qcow2"][..],
        &["info", "--output", "json", "df.qcow2"],
    ] {
        let q = qemu(d, "qemu-img", args);
        let o = ours(d, args);
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
        if args.contains(&"json") {
            assert_info_json_eq(&q, &o, "missing data file");
        } else {
            assert_info_human_eq(&q, &o, "missing data file");
        }
    }
}
