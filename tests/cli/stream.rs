//! `qcow2-img stream` against QEMU's `block-stream` job, run by
//! `qemu-storage-daemon` over QMP on a twin directory (qemu-img has no
//! offline stream): 3-deep chains with mixed cluster sizes and a chain on a
//! raw base. Afterwards FILE reads the same in both (`qemu-img compare`),
//! maps the same (`qemu-img map`, host offsets left out), names the same
//! backing file and format (`info`), and ours checks clean. Errors carry
//! QMP's texts.

use crate::support::qsd::{have_qsd, Qsd};
use crate::support::*;
use serde_json::json;
use std::path::Path;

/// base.qcow2 (4 MiB, 64 KiB clusters, 0x01 in [0, 2M)) <- mid.qcow2 (4
/// KiB clusters, 0x02 in [1M, 2M) with a zeroed 64 KiB at 1.5M) <-
/// top.qcow2 (6 MiB, larger than its chain, 128 KiB clusters, 0x03 in
/// [2M, 2.5M)). rbase.raw (3 MiB, 0x05 in [512k, 1.5M)) <- rmid.qcow2
/// (backing format raw, 0x06 in [1M, 1.25M)) <- rtop.qcow2 (0x07 at 2M).
pub(crate) fn setup(dir: &Path) {
    let img = |args: &[&str]| qemu_ok(dir, "qemu-img", args);
    let io = |args: &[&str]| qemu_ok(dir, "qemu-io", args);
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io(&["-c", "write -P 1 0 2M", "base.qcow2"]);
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
    io(&[
        "-c",
        "write -P 2 1M 1M",
        "-c",
        "write -z 1536k 64k",
        "mid.qcow2",
    ]);
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
    io(&["-c", "write -P 3 2M 512k", "top.qcow2"]);
    img(&["create", "-q", "-f", "raw", "rbase.raw", "3M"]);
    io(&["-f", "raw", "-c", "write -P 5 512k 1M", "rbase.raw"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "rbase.raw",
        "-F",
        "raw",
        "rmid.qcow2",
        "3M",
    ]);
    io(&["-c", "write -P 6 1M 256k", "rmid.qcow2"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "rmid.qcow2",
        "-F",
        "qcow2",
        "rtop.qcow2",
    ]);
    io(&["-c", "write -P 7 2M 64k", "rtop.qcow2"]);
}

/// Runs QEMU's block-stream on `file` in `dir` with the QMP arguments.
fn qemu_stream(dir: &Path, file: &str, args: serde_json::Value) -> Result<(), String> {
    let mut q = Qsd::start(dir, file);
    let r = q.run_job("block-stream", args);
    q.quit();
    let done = r?;
    assert!(done.get("error").is_none(), "{done}");
    assert_eq!(done["type"], "stream");
    Ok(())
}

#[test]
fn stream_matches_qemu_block_stream() {
    if !have_qemu() || !have_qsd() {
        return;
    }
    // (our arguments, QMP's, FILE)
    let cases: &[(&[&str], serde_json::Value, &str)] = &[
        (&[], json!({}), "top.qcow2"),
        (
            &["-b", "base.qcow2"],
            json!({"base": "base.qcow2"}),
            "top.qcow2",
        ),
        (
            &["-b", "./base.qcow2"],
            json!({"base": "./base.qcow2"}),
            "top.qcow2",
        ),
        (
            &["-b", "mid.qcow2"],
            json!({"base": "mid.qcow2"}),
            "top.qcow2",
        ),
        (
            &["-b", "base.qcow2", "--backing-file", "./base.qcow2"],
            json!({"base": "base.qcow2", "backing-file": "./base.qcow2"}),
            "top.qcow2",
        ),
        (&["-p", "-r", "1G"], json!({}), "mid.qcow2"),
        (
            &["-b", "rbase.raw"],
            json!({"base": "rbase.raw"}),
            "rtop.qcow2",
        ),
        (&["-q"], json!({}), "rtop.qcow2"),
        (&[], json!({}), "base.qcow2"),
    ];
    for (ours_args, qmp, file) in cases {
        let (qd, od) = twin_dirs(setup);
        let (qd, od) = (qd.path(), od.path());
        qemu_stream(qd, file, qmp.clone()).unwrap();
        let mut a = vec!["stream"];
        a.extend_from_slice(ours_args);
        a.push(file);
        let o = ours(od, &a);
        assert_eq!((o.code, o.err.as_str()), (0, ""), "{a:?}");
        if ours_args.contains(&"-p") {
            assert!(o.out.starts_with("    (0.00/100%)\r"), "{:?}", o.out);
            assert!(o.out.ends_with("    (100.00/100%)\r\n"), "{:?}", o.out);
        } else {
            assert_eq!(o.out, "", "{a:?}");
        }
        let c = qemu(od, "qemu-img", &["compare", &abs(qd, file), &abs(od, file)]);
        assert_eq!(c.code, 0, "{a:?}: {c:?}");
        assert_eq!(
            qemu_map_no_offsets(qd, &[file]),
            qemu_map_no_offsets(od, &[file]),
            "{a:?}: map"
        );
        assert_eq!(
            qemu_backing(qd, file),
            qemu_backing(od, file),
            "{a:?}: backing"
        );
        let k = qemu(od, "qemu-img", &["check", file]);
        assert_eq!(k.code, 0, "{a:?}: {k:?}");
    }
}

#[test]
fn stream_errors_carry_qmp_texts() {
    if !have_qemu() || !have_qsd() {
        return;
    }
    let (qd, od) = twin_dirs(setup);
    let (qd, od) = (qd.path(), od.path());
    let cases: &[(&[&str], serde_json::Value)] = &[
        (
            &["--backing-file", "x.qcow2"],
            json!({"backing-file": "x.qcow2"}),
        ),
        (&["-b", "nosuch.qcow2"], json!({"base": "nosuch.qcow2"})),
        (&["-b", "top.qcow2"], json!({"base": "top.qcow2"})),
    ];
    for (ours_args, qmp) in cases {
        let e = qemu_stream(qd, "top.qcow2", qmp.clone()).unwrap_err();
        let mut a = vec!["stream"];
        a.extend_from_slice(ours_args);
        a.push("top.qcow2");
        let o = ours(od, &a);
        assert_eq!(
            (o.code, o.out.as_str(), o.err),
            (1, "", format!("qcow2-img: {e}\n")),
            "{a:?}"
        );
    }
    for (args, err) in [
        (&["stream", "-r", "abc", "top.qcow2"][..], "qcow2-img: Invalid rate limit specified: 'abc'.\n"),
        (&["stream"], "qcow2-img: Expecting one image file name\nTry 'qcow2-img stream --help' for more info\n"),
        (
            &["stream", "nosuch.qcow2"],
            "qcow2-img: Could not open 'nosuch.qcow2': Could not open 'nosuch.qcow2': No such file or directory\n",
        ),
    ] {
        let o = ours(od, args);
        assert_eq!((o.code, o.err.as_str()), (1, err), "{args:?}");
    }
    // Nothing changed.
    assert_eq!(
        qemu_map_no_offsets(qd, &["top.qcow2"]),
        qemu_map_no_offsets(od, &["top.qcow2"])
    );
    assert_eq!(qemu_backing(qd, "top.qcow2"), qemu_backing(od, "top.qcow2"));
}
