//! `qcow2-img amend` and `qcow2-img check` against qemu-img on twin images
//! (cli.md §7 and §1).

use crate::support::*;

#[test]
fn amend_messages_and_effects_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    for f in ["o.qcow2", "q.qcow2"] {
        qemu_ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", f, "64M"]);
    }
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "-o", "lazy_refcounts=on"],
        &["-f", "qcow2", "-o", "size=128M"],
        &["-f", "qcow2", "-o", "cluster_size=4k"],
        &["-f", "qcow2", "-o", "bogus=1"],
        &["-f", "qcow2"],
        &["-o", "lazy_refcounts=off"],
        // Turning lazy refcounts on together with a v2 target is refused.
        &["-f", "qcow2", "-o", "lazy_refcounts=on,compat=0.10"],
    ];
    for args in cases {
        let mut a: Vec<&str> = vec!["amend"];
        a.extend_from_slice(args);
        let mut ao = a.clone();
        ao.push("o.qcow2");
        a.push("q.qcow2");
        let o = ours(dir, &ao);
        let q = qemu(dir, "qemu-img", &a);
        assert_eq!(o.code, q.code, "{args:?}: {o:?} vs {q:?}");
        assert_eq!(o.err, q.err.replace("qemu-img", "qcow2-img"), "{args:?}");
        assert_eq!(o.out, q.out, "{args:?}");
        let io = qemu_ok(dir, "qemu-img", &["info", "--output", "json", "o.qcow2"]);
        let iq = qemu_ok(dir, "qemu-img", &["info", "--output", "json", "q.qcow2"]);
        let (mut jo, mut jq) = (json(&io.out), json(&iq.out));
        for j in [&mut jo, &mut jq] {
            strip_actual_size(j);
            j["filename"] = serde_json::Value::Null;
            j["children"] = serde_json::Value::Null;
        }
        assert_eq!(jo, jq, "{args:?}: info after amend");
    }
    let c = qemu(dir, "qemu-img", &["check", "o.qcow2"]);
    assert_eq!(c.code, 0, "{c:?}");
}

#[test]
fn qcow2_img_check_is_qcow2_check() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "64M"],
    );
    qemu_ok(dir, "qemu-io", &["-c", "write -P 1 0 1M", "c.qcow2"]);
    let o = ours(dir, &["check", "--output", "json", "c.qcow2"]);
    let q = qemu(dir, "qemu-img", &["check", "--output", "json", "c.qcow2"]);
    assert_eq!((o.code, json(&o.out)), (q.code, json(&q.out)));
    let o = ours(dir, &["check", "-r", "bogus", "c.qcow2"]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.err,
        "qcow2-img: --repair (-r) expects 'leaks' or 'all' not 'bogus'\nTry 'qcow2-img check --help' for more info\n"
    );
}

/// One twin case: how the image `t.qcow2` is made (`qemu-img create -o`
/// options, size, qemu-io commands, then `qemu-img` commands such as a
/// snapshot), with `base.qcow2` (data at 0 and 1 MiB) and `d.raw`/`e.raw`
/// next to it, and the amend options.
struct Case {
    create: &'static str,
    io: &'static [&'static str],
    post: &'static [&'static [&'static str]],
    amend: &'static str,
}

const DATA: &[&str] = &[
    "write -P 1 0 64k",
    "write -z 128k 64k",
    "write -P 3 1M 64k",
    "write -z 1M 64k",
    "write -P 5 3M 200k",
];

/// Compressed clusters (several share a host cluster) and data, then a
/// snapshot made by qcow2-img, then writes over shared clusters.
const COMPRESSED_OUR_SNAPSHOT: &[&[&str]] = &[
    &[
        "qemu-io",
        "-c",
        "write -c -P 8 2M 64k",
        "-c",
        "write -c -P 9 2112k 64k",
        "t.qcow2",
    ],
    &["qcow2-img", "snapshot", "-c", "s1", "t.qcow2"],
    &[
        "qemu-io",
        "-c",
        "write -P 3 1M 4k",
        "-c",
        "write -z 0 64k",
        "t.qcow2",
    ],
];

/// A snapshot, then writes that leave zero clusters in shared and unshared tables.
const SNAP_THEN_WRITE: &[&[&str]] = &[
    &["snapshot", "-c", "s1", "t.qcow2"],
    &[
        "qemu-io",
        "-c",
        "write -P 3 1M 4k",
        "-c",
        "write -z 2M 64k",
        "t.qcow2",
    ],
];

/// Makes the twin's files in `dir` as `case` says.
fn setup(dir: &std::path::Path, case: &Case) {
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    qemu_ok(dir, "qemu-io", &["-c", "write -P 7 0 2M", "base.qcow2"]);
    for raw in ["d.raw", "e.raw"] {
        qemu_ok(dir, "qemu-img", &["create", "-q", "-f", "raw", raw, "4M"]);
    }
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !case.create.is_empty() {
        args.extend(["-o", case.create]);
    }
    args.extend(["t.qcow2", "4M"]);
    qemu_ok(dir, "qemu-img", &args);
    if !case.io.is_empty() {
        let mut a = Vec::new();
        for c in case.io {
            a.extend(["-c", *c]);
        }
        a.push("t.qcow2");
        qemu_ok(dir, "qemu-io", &a);
    }
    for p in case.post {
        match p.split_first() {
            Some((&"qemu-io", rest)) => qemu_ok(dir, "qemu-io", rest),
            Some((&"qcow2-img", rest)) => {
                let r = ours(dir, rest);
                assert_eq!(r.code, 0, "{p:?}: {r:?}");
                r
            }
            _ => qemu_ok(dir, "qemu-img", p),
        };
    }
}

/// `qemu-img info --output json` of `t.qcow2` (its run, JSON or not), with
/// what differs between twins for unrelated reasons removed.
fn info(dir: &std::path::Path) -> (i32, String, serde_json::Value) {
    let r = qemu(dir, "qemu-img", &["info", "--output", "json", "t.qcow2"]);
    let mut j = serde_json::from_str(&r.out).unwrap_or(serde_json::Value::Null);
    strip_actual_size(&mut j);
    if j.is_object() {
        j["children"] = serde_json::Value::Null;
        j["snapshots"] = serde_json::Value::Null;
    }
    (r.code, r.err, j)
}

/// Runs every case on twins: qemu-img amend in one directory, ours in the
/// other; same exit code, stderr and stdout; on success the images read the
/// same (`qemu-img compare`), `qemu-img info` agrees and ours checks clean;
/// on failure ours is byte-identical to before.
fn run_cases(cases: &[Case]) {
    for case in cases {
        let what = format!("{} / {:?} / amend {}", case.create, case.io, case.amend);
        let (qd, od) = twin_dirs(|d| setup(d, case));
        let snapshot = case.post.iter().any(|p| p.contains(&"snapshot"));
        compare_amend(qd.path(), od.path(), case.amend, &what, snapshot);
    }
}

/// Runs `amend -o AMEND t.qcow2` with qemu-img in `qd` and with ours in `od`
/// and compares as [`run_cases`] says (and the contents of snapshot `s1`
/// when `snapshot`).
fn compare_amend(
    qd: &std::path::Path,
    od: &std::path::Path,
    amend: &str,
    what: &str,
    snapshot: bool,
) {
    let before = std::fs::read(od.join("t.qcow2")).unwrap();
    let args = ["amend", "-f", "qcow2", "-o", amend, "t.qcow2"];
    let mut q = qemu(qd, "qemu-img", &args);
    // The hint names QEMU's command on both sides.
    q.err = q.err.replace("'qcow2-img rebase'", "'qemu-img rebase'");
    let o = ours(od, &args);
    assert_eq!((o.code, &o.err, &o.out), (q.code, &q.err, &q.out), "{what}");
    if o.code != 0 {
        let after = std::fs::read(od.join("t.qcow2")).unwrap();
        assert!(after == before, "{what}: a refused amend changed the image");
        return;
    }
    assert_eq!(info(od), info(qd), "{what}: info");
    let q_img = qd.join("t.qcow2");
    let o_img = od.join("t.qcow2");
    let cmp = qemu(
        od,
        "qemu-img",
        &["compare", o_img.to_str().unwrap(), q_img.to_str().unwrap()],
    );
    // An image whose data file name was removed cannot be opened alone.
    if !amend.starts_with("data_file=,") && amend != "data_file=" {
        assert_eq!(cmp.code, 0, "{what}: contents differ: {cmp:?}");
        let c = qemu(od, "qemu-img", &["check", "t.qcow2"]);
        assert_eq!(c.code, 0, "{what}: check: {c:?}");
        assert!(c.out.starts_with("No errors were found"), "{what}: {c:?}");
    }
    // Snapshot contents read the same too.
    if snapshot {
        let raw = |d: &std::path::Path| {
            qemu_ok(
                d,
                "qemu-img",
                &[
                    "convert",
                    "-l",
                    "snapshot.name=s1",
                    "-O",
                    "raw",
                    "t.qcow2",
                    "s1.raw",
                ],
            );
            std::fs::read(d.join("s1.raw")).unwrap()
        };
        assert!(raw(od) == raw(qd), "{what}: snapshot contents differ");
    }
}

#[test]
fn amend_compat_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    run_cases(&[
        // Downgrade: zero clusters expanded (plain ones dropped, preallocated ones zeroed).
        Case {
            create: "",
            io: DATA,
            post: &[],
            amend: "compat=0.10",
        },
        Case {
            create: "cluster_size=4k",
            io: DATA,
            post: &[],
            amend: "compat=v2",
        },
        // With a backing file plain zero clusters get zeroed clusters.
        Case {
            create: "backing_file=base.qcow2,backing_fmt=qcow2",
            io: DATA,
            post: &[],
            amend: "compat=0.10",
        },
        // Lazy refcounts and zstd without compressed clusters downgrade.
        Case {
            create: "lazy_refcounts=on",
            io: DATA,
            post: &[],
            amend: "compat=0.10",
        },
        Case {
            create: "compression_type=zstd",
            io: DATA,
            post: &[],
            amend: "compat=0.10",
        },
        Case {
            create: "refcount_bits=64",
            io: DATA,
            post: &[],
            amend: "compat=0.10,refcount_bits=16",
        },
        Case {
            create: "",
            io: DATA,
            post: &[],
            amend: "compat=0.10,size=8M",
        },
        // Snapshots: their tables' zero clusters are expanded too.
        Case {
            create: "",
            io: DATA,
            post: SNAP_THEN_WRITE,
            amend: "compat=0.10",
        },
        Case {
            create: "backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=4k",
            io: DATA,
            post: SNAP_THEN_WRITE,
            amend: "compat=0.10",
        },
        Case {
            create: "compat=0.10",
            io: &["write -P 1 0 64k"],
            post: SNAP_THEN_WRITE,
            amend: "compat=1.1",
        },
        // A snapshot made by qcow2-img over compressed clusters.
        Case {
            create: "",
            io: DATA,
            post: COMPRESSED_OUR_SNAPSHOT,
            amend: "compat=0.10",
        },
        Case {
            create: "backing_file=base.qcow2,backing_fmt=qcow2",
            io: DATA,
            post: COMPRESSED_OUR_SNAPSHOT,
            amend: "compat=0.10",
        },
        // Refused, with QEMU's messages.
        Case {
            create: "",
            io: DATA,
            post: &[
                &["snapshot", "-c", "s1", "t.qcow2"],
                &["resize", "-q", "t.qcow2", "8M"],
            ],
            amend: "compat=0.10",
        },
        Case {
            create: "extended_l2=on",
            io: DATA,
            post: &[],
            amend: "compat=0.10",
        },
        Case {
            create: "compression_type=zstd",
            io: &["write -c 0 64k"],
            post: &[],
            amend: "compat=0.10",
        },
        Case {
            create: "refcount_bits=64",
            io: DATA,
            post: &[],
            amend: "compat=0.10",
        },
        Case {
            create: "data_file=d.raw",
            io: DATA,
            post: &[],
            amend: "compat=0.10",
        },
        Case {
            create: "",
            io: DATA,
            post: &[],
            amend: "compat=0.9",
        },
        Case {
            create: "",
            io: DATA,
            post: &[],
            amend: "compat=0.10,lazy_refcounts=on",
        },
        // The backing check comes before the downgrade's.
        Case {
            create: "extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2",
            io: &[],
            post: &[],
            amend: "compat=0.10,backing_file=x",
        },
        // Upgrade.
        Case {
            create: "compat=0.10",
            io: DATA,
            post: &[],
            amend: "compat=1.1",
        },
        Case {
            create: "compat=0.10,cluster_size=4k",
            io: DATA,
            post: &[],
            amend: "compat=v3,lazy_refcounts=on",
        },
        Case {
            create: "compat=0.10",
            io: DATA,
            post: &[],
            amend: "compat=1.1,refcount_bits=64",
        },
        Case {
            create: "compat=0.10",
            io: DATA,
            post: &[],
            amend: "refcount_bits=8",
        },
    ]);
}

#[test]
fn amend_refcount_bits_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let snap: &[&[&str]] = &[&["snapshot", "-c", "s1", "t.qcow2"]];
    let mut cases = Vec::new();
    for bits in ["1", "2", "4", "8", "32", "64"] {
        let amend: &'static str = Box::leak(format!("refcount_bits={bits}").into_boxed_str());
        cases.push(Case {
            create: "",
            io: DATA,
            post: &[],
            amend,
        });
        cases.push(Case {
            create: "cluster_size=512",
            io: DATA,
            post: &[],
            amend,
        });
    }
    cases.extend([
        Case {
            create: "refcount_bits=1",
            io: DATA,
            post: &[],
            amend: "refcount_bits=64",
        },
        Case {
            create: "refcount_bits=64,extended_l2=on",
            io: DATA,
            post: &[],
            amend: "refcount_bits=2",
        },
        Case {
            create: "lazy_refcounts=on",
            io: DATA,
            post: &[],
            amend: "refcount_bits=4,lazy_refcounts=off",
        },
        // Snapshots keep their references (refcount 2 fits 2 bits, not 1).
        Case {
            create: "",
            io: DATA,
            post: snap,
            amend: "refcount_bits=2",
        },
        Case {
            create: "",
            io: DATA,
            post: snap,
            amend: "refcount_bits=1",
        },
        Case {
            create: "cluster_size=4k",
            io: DATA,
            post: snap,
            amend: "refcount_bits=1,lazy_refcounts=on",
        },
        // Compressed clusters sharing host clusters, under a snapshot
        // made by qcow2-img: every count carried, or QEMU's error.
        Case {
            create: "",
            io: DATA,
            post: COMPRESSED_OUR_SNAPSHOT,
            amend: "refcount_bits=64",
        },
        Case {
            create: "cluster_size=4k,refcount_bits=8",
            io: DATA,
            post: COMPRESSED_OUR_SNAPSHOT,
            amend: "refcount_bits=2",
        },
        Case {
            create: "",
            io: DATA,
            post: COMPRESSED_OUR_SNAPSHOT,
            amend: "refcount_bits=4",
        },
        // The width error comes before the backing check.
        Case {
            create: "backing_file=base.qcow2,backing_fmt=qcow2",
            io: DATA,
            post: snap,
            amend: "refcount_bits=1,backing_file=x",
        },
        Case {
            create: "",
            io: DATA,
            post: &[],
            amend: "refcount_bits=3",
        },
        Case {
            create: "",
            io: DATA,
            post: &[],
            amend: "refcount_bits=128",
        },
    ]);
    run_cases(&cases);
}

#[test]
fn amend_files_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let backed = "backing_file=base.qcow2,backing_fmt=qcow2";
    run_cases(&[
        Case {
            create: "data_file=d.raw,data_file_raw=on",
            io: DATA,
            post: &[],
            amend: "data_file_raw=off",
        },
        Case {
            create: "data_file=d.raw,data_file_raw=on",
            io: DATA,
            post: &[],
            amend: "data_file_raw=on",
        },
        Case {
            create: "data_file=d.raw",
            io: DATA,
            post: &[],
            amend: "data_file_raw=on",
        },
        Case {
            create: "data_file=d.raw",
            io: DATA,
            post: &[],
            amend: "data_file=e.raw",
        },
        Case {
            create: "data_file=d.raw",
            io: DATA,
            post: &[],
            amend: "data_file=",
        },
        Case {
            create: "",
            io: DATA,
            post: &[],
            amend: "data_file=e.raw",
        },
        Case {
            create: backed,
            io: DATA,
            post: &[],
            amend: "backing_file=base.qcow2,backing_fmt=qcow2",
        },
        Case {
            create: backed,
            io: DATA,
            post: &[],
            amend: "backing_file=base.qcow2",
        },
        Case {
            create: backed,
            io: DATA,
            post: &[],
            amend: "backing_fmt=raw",
        },
        Case {
            create: backed,
            io: DATA,
            post: &[],
            amend: "backing_file=x,backing_fmt=qcow2",
        },
        Case {
            create: "",
            io: DATA,
            post: &[],
            amend: "lazy_refcounts=on,size=16M",
        },
    ]);
}

/// Strips the extra data from every entry of the snapshot table of a v2
/// image (as QEMU before 1.1 wrote them), rewriting the table in place.
pub(crate) fn strip_snapshot_extra(path: &std::path::Path) {
    let mut f = std::fs::read(path).unwrap();
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let be16 = |b: &[u8], o: usize| u16::from_be_bytes(b[o..o + 2].try_into().unwrap());
    let n = be32(&f, 60) as usize;
    let off = u64::from_be_bytes(f[64..72].try_into().unwrap()) as usize;
    let (mut pos, mut out) = (off, Vec::new());
    for _ in 0..n {
        pos = pos.next_multiple_of(8);
        let extra = be32(&f, pos + 36) as usize;
        let (id, name) = (be16(&f, pos + 12) as usize, be16(&f, pos + 14) as usize);
        out.resize(out.len().next_multiple_of(8), 0);
        let mut fixed = f[pos..pos + 40].to_vec();
        fixed[36..40].copy_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&fixed);
        out.extend_from_slice(&f[pos + 40 + extra..pos + 40 + extra + id + name]);
        pos += 40 + extra + id + name;
    }
    f[off..pos].fill(0);
    f[off..off + out.len()].copy_from_slice(&out);
    std::fs::write(path, f).unwrap();
}

#[test]
fn amend_upgrade_rewrites_old_snapshot_tables_as_qemu_img() {
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
        strip_snapshot_extra(&d.join("t.qcow2"));
        let c = qemu(d, "qemu-img", &["check", "t.qcow2"]);
        assert_eq!(c.code, 0, "{c:?}");
    });
    compare_amend(
        qd.path(),
        od.path(),
        "compat=1.1",
        "old snapshot table, compat=1.1",
        true,
    );
}

/// A snapshot whose L1 table offset is not cluster aligned: QEMU's
/// downgrade finds it while expanding zero clusters, after it changed the
/// image, and fails with two lines; ours checks the snapshots' L1 tables
/// before the first change and fails with QEMU's first line, exit 1, the
/// file untouched.
#[test]
fn amend_downgrade_refuses_an_invalid_snapshot_l1_table_first() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        qemu_create(d, "t.qcow2", "4M");
        qemu_ok(
            d,
            "qemu-io",
            &[
                "-c",
                "write -P 1 0 64k",
                "-c",
                "write -z 64k 64k",
                "t.qcow2",
            ],
        );
        qemu_ok(d, "qemu-img", &["snapshot", "-c", "s1", "t.qcow2"]);
        let path = d.join("t.qcow2");
        let mut f = std::fs::read(&path).unwrap();
        let table = u64::from_be_bytes(f[64..72].try_into().unwrap()) as usize;
        let l1 = u64::from_be_bytes(f[table..table + 8].try_into().unwrap());
        f[table..table + 8].copy_from_slice(&(l1 + 512).to_be_bytes());
        std::fs::write(&path, f).unwrap();
    });
    let before = std::fs::read(od.path().join("t.qcow2")).unwrap();
    let args = ["amend", "-o", "compat=0.10", "t.qcow2"];
    let q = qemu(qd.path(), "qemu-img", &args);
    let o = ours(od.path(), &args);
    assert_eq!(
        q.err,
        "qcow2-img: Snapshot L1 table offset invalid\n\
         qcow2-img: Failed to turn zero into data clusters: Invalid argument\n"
    );
    assert_eq!((o.code, o.out.as_str()), (q.code, q.out.as_str()));
    assert_eq!(o.err, "qcow2-img: Snapshot L1 table offset invalid\n");
    let after = std::fs::read(od.path().join("t.qcow2")).unwrap();
    assert!(after == before, "the refused amend changed the image");
}

/// A v3 image whose snapshot entries lost their extra data (`check` calls
/// that an error): QEMU takes the missing disk size for the current one
/// and downgrades; so do we.
#[test]
fn amend_downgrade_takes_a_missing_snapshot_disk_size_as_current() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        qemu_create(d, "t.qcow2", "4M");
        qemu_ok(
            d,
            "qemu-io",
            &[
                "-c",
                "write -P 1 0 64k",
                "-c",
                "write -z 64k 64k",
                "t.qcow2",
            ],
        );
        qemu_ok(d, "qemu-img", &["snapshot", "-c", "s1", "t.qcow2"]);
        strip_snapshot_extra(&d.join("t.qcow2"));
    });
    compare_amend(
        qd.path(),
        od.path(),
        "compat=0.10",
        "v3 snapshot table without extra data, compat=0.10",
        true,
    );
}
