//! `qcow2-img convert`'s errors while creating the target carry qemu-img's
//! `DST: error while converting FMT: ` prefix, raw targets validate their
//! creation options as QEMU's file driver does, and `-o size=` does not
//! change the target's size (qemu-img sets it to the source's).

use crate::support::*;

#[test]
fn target_creation_errors_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"],
    );
    qemu_ok(dir, "qemu-io", &["-c", "write -P 7 0 1M", "src.qcow2"]);
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "src.qcow2", "nodir/x.qcow2"],
        &["-O", "raw", "src.qcow2", "nodir/x.raw"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3",
            "src.qcow2",
            "x.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "src.qcow2",
            "x.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "src.qcow2",
            "x.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "preallocation=bogus",
            "src.qcow2",
            "x.qcow2",
        ],
        &[
            "-O",
            "raw",
            "-o",
            "preallocation=bogus",
            "src.qcow2",
            "x.raw",
        ],
        &[
            "-O",
            "raw",
            "-o",
            "preallocation=metadata",
            "src.qcow2",
            "x.raw",
        ],
        &["-O", "raw", "-o", "nocow=maybe", "src.qcow2", "x.raw"],
        &["-O", "raw", "-o", "size=abc", "src.qcow2", "x.raw"],
    ];
    for args in cases {
        let mut a = vec!["convert"];
        a.extend_from_slice(args);
        let q = qemu(dir, "qemu-img", &a);
        let o = ours(dir, &a);
        assert_eq!(o, q, "{a:?}");
        assert_eq!(o.code, 1, "{a:?}");
    }
}

#[test]
fn size_option_does_not_change_the_target_size() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"],
    );
    qemu_ok(dir, "qemu-io", &["-c", "write -P 7 3M 1M", "src.qcow2"]);
    for (size, q_out, o_out) in [
        ("1M", "q1.qcow2", "o1.qcow2"),
        ("8M", "q8.qcow2", "o8.qcow2"),
    ] {
        let opt = format!("size={size}");
        let q = qemu(
            dir,
            "qemu-img",
            &["convert", "-O", "qcow2", "-o", &opt, "src.qcow2", q_out],
        );
        let o = ours(
            dir,
            &["convert", "-O", "qcow2", "-o", &opt, "src.qcow2", o_out],
        );
        assert_eq!((o.code, &o.out, &o.err), (q.code, &q.out, &q.err), "{size}");
        let info = |f: &str| {
            let r = qemu_ok(dir, "qemu-img", &["info", "--output", "json", f]);
            json(&r.out)["virtual-size"].as_u64()
        };
        assert_eq!(info(o_out), info(q_out), "{size}");
        assert_eq!(info(o_out), Some(4 << 20), "{size}");
        qemu_ok(dir, "qemu-img", &["compare", "src.qcow2", o_out]);
    }
}
