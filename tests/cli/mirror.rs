//! `qcow2-img mirror` against QEMU's `drive-mirror` (`sync=full`, the
//! target created by QEMU, `mode=absolute-paths`) run by
//! `qemu-storage-daemon` over QMP on a twin directory: qcow2 and raw
//! targets of a 3-deep chain and of a chain on a raw base. The targets read
//! the same (`qemu-img compare`), have no backing file, map the same
//! (adjacent runs merged, host offsets left out), and ours check clean.

use crate::support::qsd::{have_qsd, Qsd};
use crate::support::*;
use serde_json::json;
use std::path::Path;

/// The chains of `stream.rs`: base.qcow2 <- mid.qcow2 <- top.qcow2 (6 MiB,
/// mixed cluster sizes, a zeroed cluster in mid) and rbase.raw <-
/// rmid.qcow2 <- rtop.qcow2.
fn setup(dir: &Path) {
    crate::stream::setup(dir);
}

/// `qemu-img map --output json` of a qcow2 file without host offsets,
/// adjacent runs of the same kind merged (QEMU splits runs where host
/// offsets are not contiguous).
fn map(dir: &Path, f: &str) -> Vec<serde_json::Value> {
    let v = json(&qemu_ok(dir, "qemu-img", &["map", "--output", "json", f]).out);
    let mut out: Vec<serde_json::Value> = Vec::new();
    for mut e in v.as_array().cloned().unwrap_or_default() {
        if let Some(o) = e.as_object_mut() {
            o.remove("offset");
        }
        if let Some(last) = out.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| last[k] == e[k]);
            let end = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap();
            if same && end == e["start"].as_u64().unwrap() {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = json!(len);
                continue;
            }
        }
        out.push(e);
    }
    out
}

fn abs(dir: &Path, f: &str) -> String {
    dir.join(f).to_string_lossy().into_owned()
}

#[test]
fn mirror_matches_qemu_drive_mirror() {
    if !have_qemu() || !have_qsd() {
        return;
    }
    for (src, fmt) in [
        ("top.qcow2", "qcow2"),
        ("top.qcow2", "raw"),
        ("rtop.qcow2", "qcow2"),
        ("mid.qcow2", "qcow2"),
    ] {
        let (qd, od) = twin_dirs(setup);
        let (qd, od) = (qd.path(), od.path());
        let dst = format!("t.{fmt}");
        let mut q = Qsd::start(qd, src);
        let done = q
            .run_job(
                "drive-mirror",
                json!({"target": dst, "format": fmt, "sync": "full"}),
            )
            .unwrap();
        q.quit();
        assert!(done.get("error").is_none(), "{done}");
        let o = ours(od, &["mirror", "-O", fmt, src, &dst]);
        assert_eq!(
            (o.code, o.out.as_str(), o.err.as_str()),
            (0, "", ""),
            "{src} {fmt}"
        );
        let c = qemu(
            od,
            "qemu-img",
            &[
                "compare",
                "-f",
                fmt,
                "-F",
                fmt,
                &abs(qd, &dst),
                &abs(od, &dst),
            ],
        );
        assert_eq!(c.code, 0, "{src} {fmt}: {c:?}");
        let c = qemu(od, "qemu-img", &["compare", "-F", fmt, src, &dst]);
        assert_eq!(c.code, 0, "{src} {fmt}: source and target differ: {c:?}");
        if fmt == "qcow2" {
            let info = json(&qemu_ok(od, "qemu-img", &["info", "--output", "json", &dst]).out);
            assert!(info.get("backing-filename").is_none(), "{info}");
            assert_eq!(map(qd, &dst), map(od, &dst), "{src}: map");
            let k = qemu(od, "qemu-img", &["check", &dst]);
            assert_eq!(k.code, 0, "{src}: {k:?}");
        }
    }
}

#[test]
fn mirror_progress_and_errors() {
    if !have_qemu() {
        return;
    }
    let (_qd, od) = twin_dirs(setup);
    let od = od.path();
    let o = ours(od, &["mirror", "-p", "top.qcow2", "p.qcow2"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.out.starts_with("    (0.00/100%)\r"), "{:?}", o.out);
    assert!(o.out.ends_with("    (100.00/100%)\r\n"), "{:?}", o.out);
    let o = ours(od, &["mirror", "-p", "-q", "top.qcow2", "p.qcow2"]);
    assert_eq!((o.code, o.out.as_str()), (0, ""), "{o:?}");
    for (args, err) in [
        (
            &["mirror", "top.qcow2"][..],
            "qcow2-img: Expecting two image file names\nTry 'qcow2-img mirror --help' for more info\n",
        ),
        (
            &["mirror", "-O", "vmdk", "top.qcow2", "x.vmdk"],
            "qcow2-img: Unknown file format 'vmdk' (qcow2 and raw are supported)\n",
        ),
        (
            &["mirror", "nosuch.qcow2", "x.qcow2"],
            "qcow2-img: Could not open 'nosuch.qcow2': Could not open 'nosuch.qcow2': No such file or directory\n",
        ),
    ] {
        let o = ours(od, args);
        assert_eq!((o.code, o.err.as_str()), (1, err), "{args:?}");
    }
    assert!(!od.join("x.qcow2").exists() && !od.join("x.vmdk").exists());
}
