//! `qcow2-img snapshot` against `qemu-img snapshot` on twin images (cli.md
//! §8): the list layout, the lookups (`-a` by ID then name, `-d` by name,
//! first match), messages and exit codes; `info` shows the list;
//! `qemu-img check` stays clean on our files after every step.

use crate::support::*;

/// Replaces the DATE column (local time of creation: structure only).
fn undate(s: &str) -> String {
    s.lines()
        .map(|l| {
            let b = l.as_bytes();
            // "%-7s %-16s %8s %19s ...": DATE is bytes 34..53 of a row.
            let is_row =
                b.len() > 53 && b[38] == b'-' && b[41] == b'-' && b[47] == b':' && b[50] == b':';
            if is_row {
                format!("{}YYYY-MM-DD hh:mm:ss{}\n", &l[..34], &l[53..])
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

#[track_caller]
fn same(qd: &std::path::Path, od: &std::path::Path, args: &[&str]) -> Run {
    let q = qemu(qd, "qemu-img", args);
    let o = ours(od, args);
    assert_eq!(undate(&o.out), undate(&q.out), "stdout of {args:?}");
    assert_eq!(o.err, q.err, "stderr of {args:?}");
    assert_eq!(o.code, q.code, "exit code of {args:?}");
    o
}

#[test]
fn snapshot_commands_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        qemu_create(d, "s.qcow2", "64M");
        qemu_ok(d, "qemu-io", &["-c", "write -P 1 0 1M", "s.qcow2"]);
    });
    let (q, o) = (qd.path(), od.path());
    let steps: &[&[&str]] = &[
        &["snapshot", "-l", "s.qcow2"],
        &["snapshot", "s.qcow2"],
        &["snapshot", "-c", "snap1", "s.qcow2"],
        &["snapshot", "-q", "-c", "second", "s.qcow2"],
        &["snapshot", "-c", "snap1", "s.qcow2"],
        &["snapshot", "-l", "s.qcow2"],
        &["snapshot", "-q", "-l", "s.qcow2"],
        &["snapshot", "-l", "-U", "s.qcow2"],
        &["snapshot", "-a", "nosuch", "s.qcow2"],
        &["snapshot", "-a", "2", "s.qcow2"],
        &["snapshot", "-a", "snap1", "s.qcow2"],
        &["snapshot", "-d", "1", "s.qcow2"],
        &["snapshot", "-d", "second", "s.qcow2"],
        &["snapshot", "-d", "second", "s.qcow2"],
        &["snapshot", "-d", "snap1", "s.qcow2"],
        &["snapshot", "-l", "s.qcow2"],
        &["snapshot", "-l", "-c", "x", "s.qcow2"],
        &["snapshot", "-c", "a", "-c", "b", "s.qcow2"],
        &["snapshot", "-c", "s.qcow2"],
        &["snapshot", "-c", "x"],
        &["snapshot", "-U", "-c", "x", "s.qcow2"],
        &["snapshot", "--bogus", "s.qcow2"],
        &["snapshot", "-l", "nosuch.qcow2"],
        &["snapshot", "-c", "last", "s.qcow2"],
        &["snapshot", "-l", "s.qcow2"],
    ];
    for args in steps {
        let r = same(q, o, args);
        if r.code == 0 && args.iter().any(|a| ["-c", "-a", "-d"].contains(a)) {
            assert_check_clean(&o.join("s.qcow2"), &format!("ours after {args:?}"));
        }
    }
    // The content is the same as QEMU's after the same steps.
    assert_bytes_eq(
        &qemu_raw(&o.join("s.qcow2")),
        &qemu_raw(&q.join("s.qcow2")),
        "content after the steps",
    );
    // info shows the list between cluster_size and the format-specific part.
    let qi = qemu_ok(q, "qemu-img", &["info", "s.qcow2"]);
    let oi = ours(o, &["info", "s.qcow2"]);
    let block = |s: &str| -> String {
        let start = s.find("Snapshot list:").expect("a snapshot list");
        let end = s.find("Format specific information:").expect("format part");
        undate(&s[start..end])
    };
    assert_eq!(block(&oi.out), block(&qi.out));
    let qj = json(&qemu_ok(q, "qemu-img", &["info", "--output", "json", "s.qcow2"]).out);
    let oj = json(&ours(o, &["info", "--output", "json", "s.qcow2"]).out);
    let strip = |v: &serde_json::Value| -> Vec<(String, String, u64)> {
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_owned(),
                    s["name"].as_str().unwrap().to_owned(),
                    s["icount"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&oj), strip(&qj));
    // qcow2-img check agrees with qemu-img check on our file.
    let oc = ours(o, &["check", "s.qcow2"]);
    let qc = qemu(o, "qemu-img", &["check", "s.qcow2"]);
    assert_eq!(
        (oc.code, oc.out.clone()),
        (qc.code, qc.out.clone()),
        "{oc:?}"
    );
}

#[test]
fn snapshot_refusals_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    // 1-bit refcounts with data: no snapshot; 2 bits: the third is refused.
    for (rb, n) in [("1", 0), ("2", 2)] {
        let (qd, od) = twin_dirs(|d| {
            qemu_ok(
                d,
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("refcount_bits={rb}"),
                    "r.qcow2",
                    "1M",
                ],
            );
            qemu_ok(d, "qemu-io", &["-c", "write -P 3 0 64k", "r.qcow2"]);
        });
        for i in 0..n {
            same(
                qd.path(),
                od.path(),
                &["snapshot", "-c", &format!("s{i}"), "r.qcow2"],
            );
        }
        let r = same(qd.path(), od.path(), &["snapshot", "-c", "over", "r.qcow2"]);
        assert_eq!(r.code, 1);
        if n == 2 {
            // Applying needs one more reference before the old ones go.
            let r = same(qd.path(), od.path(), &["snapshot", "-a", "s0", "r.qcow2"]);
            assert_eq!(r.code, 1);
        }
        let path = od.path().join("r.qcow2");
        assert_no_corruption(&path, &format!("refcount_bits={rb} after the refusal"));
        let list = ours(od.path(), &["snapshot", "-l", "r.qcow2"]);
        assert_eq!(list.out.lines().count(), if n == 0 { 0 } else { n + 2 });
    }
    // An image with an external data file has no internal snapshots.
    let (qd, od) = twin_dirs(|d| {
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
    });
    same(qd.path(), od.path(), &["snapshot", "-c", "x", "df.qcow2"]);
    same(qd.path(), od.path(), &["snapshot", "-l", "df.qcow2"]);
    // The backing chain is opened too: a missing backing file fails.
    let (qd, od) = twin_dirs(|d| {
        qemu_create(d, "b.qcow2", "1M");
        qemu_ok(
            d,
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "ov.qcow2",
            ],
        );
        std::fs::remove_file(d.join("b.qcow2")).unwrap();
    });
    same(qd.path(), od.path(), &["snapshot", "-l", "ov.qcow2"]);
    same(qd.path(), od.path(), &["snapshot", "-c", "x", "ov.qcow2"]);
}

/// A v2 image whose snapshot entries carry no extra data (as QEMU before
/// 1.1 wrote them): creating, applying and deleting snapshots rewrites the
/// table with v3's extra data, the missing disk size being the current one,
/// as qemu-img does; every step matches and leaves no leak.
#[test]
fn snapshot_on_a_table_without_extra_data_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
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
                "t.qcow2",
                "4M",
            ],
        );
        qemu_ok(d, "qemu-io", &["-c", "write -P 1 0 64k", "t.qcow2"]);
        qemu_ok(d, "qemu-img", &["snapshot", "-c", "s1", "t.qcow2"]);
        qemu_ok(d, "qemu-img", &["snapshot", "-c", "s2", "t.qcow2"]);
        qemu_ok(d, "qemu-io", &["-c", "write -P 2 0 4k", "t.qcow2"]);
        crate::amend::strip_snapshot_extra(&d.join("t.qcow2"));
    });
    let (q, o) = (qd.path(), od.path());
    let steps: &[&[&str]] = &[
        &["snapshot", "-c", "s3", "t.qcow2"],
        &["snapshot", "-l", "t.qcow2"],
        &["snapshot", "-d", "s1", "t.qcow2"],
        &["snapshot", "-a", "s2", "t.qcow2"],
        &["snapshot", "-d", "s3", "t.qcow2"],
        &["snapshot", "-l", "t.qcow2"],
    ];
    for args in steps {
        let r = same(q, o, args);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
        if args[1] != "-l" {
            assert_check_clean(&o.join("t.qcow2"), &format!("ours after {args:?}"));
        }
    }
    assert_bytes_eq(
        &qemu_raw(&o.join("t.qcow2")),
        &qemu_raw(&q.join("t.qcow2")),
        "content after the steps",
    );
}
