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
fn merged_map(dir: &Path, f: &str) -> Vec<serde_json::Value> {
    let v = qemu_map_no_offsets(dir, &[f]);
    let mut out: Vec<serde_json::Value> = Vec::new();
    for e in v.as_array().cloned().unwrap_or_default() {
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
            assert_eq!(merged_map(qd, &dst), merged_map(od, &dst), "{src}: map");
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

/// bad.qcow2: a compressed cluster at 0 whose stream is overwritten with
/// 0xff (every read of it fails), data at 64K; good.qcow2: no errors.
fn setup_bad(dir: &Path) {
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "bad.qcow2", "1M"],
    );
    qemu_ok(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -c -P 7 0 64k",
            "-c",
            "write -P 8 64k 64k",
            "bad.qcow2",
        ],
    );
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "good.qcow2", "1M"],
    );
    qemu_ok(dir, "qemu-io", &["-c", "write -P 9 0 128k", "good.qcow2"]);
    // The compressed cluster's host offset: L1[0] -> L2[0], whose low 54
    // bits (64 KiB clusters) are the stream's offset.
    let path = dir.join("bad.qcow2");
    let mut b = std::fs::read(&path).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&b, 40) as usize;
    let l2 = (be(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(&b, l2);
    assert_ne!(entry & (1 << 62), 0, "not a compressed cluster");
    let stream = (entry & ((1 << 54) - 1)) as usize;
    b[stream..stream + 32].fill(0xff);
    std::fs::write(&path, b).unwrap();
    let r = qemu(dir, "qemu-io", &["-c", "read 0 64k", "bad.qcow2"]);
    assert!(
        r.out.contains("read failed") || r.err.contains("read failed"),
        "{r:?}"
    );
}

/// `--on-source-error` / `--on-target-error`: `report` and `enospc` (the
/// error is EIO, not ENOSPC) end the mirror with the error, `stop` ends it
/// saying which side stopped it; the other side's policy does not apply to
/// a read error; bad values are refused with QAPI's text before anything
/// is created; a source without errors mirrors whatever the policies.
#[test]
fn mirror_error_policies_per_side() {
    if !have_qemu() {
        return;
    }
    let (_qd, od) = twin_dirs(setup_bad);
    let od = od.path();
    for args in [
        &[][..],
        &["--on-source-error=report"],
        &["--on-source-error", "enospc"],
        &["--on-target-error=stop"],
        &["--on-target-error=ignore", "--on-source-error=report"],
    ] {
        let mut a = vec!["mirror"];
        a.extend_from_slice(args);
        a.extend(["bad.qcow2", "t.qcow2"]);
        let o = ours(od, &a);
        assert_eq!(o.code, 1, "{args:?}: {o:?}");
        assert!(o.err.starts_with("qcow2-img: "), "{args:?}: {o:?}");
        assert!(!o.err.contains("stopped"), "{args:?}: {o:?}");
    }
    for args in [
        &["--on-source-error=stop"][..],
        &["--on-source-error=stop", "--on-target-error=report"],
    ] {
        let mut a = vec!["mirror", "-O", "raw"];
        a.extend_from_slice(args);
        a.extend(["bad.qcow2", "t.raw"]);
        let o = ours(od, &a);
        assert_eq!(
            (o.code, o.err.as_str()),
            (
                1,
                "qcow2-img: the mirror stopped on an error reading SRC (on-source-error); t.raw is incomplete\n"
            ),
            "{args:?}"
        );
    }
    for (args, err) in [
        (
            &["--on-source-error=bogus"][..],
            "qcow2-img: Parameter 'on-source-error' does not accept value 'bogus'\n",
        ),
        (
            &["--on-target-error="],
            "qcow2-img: Parameter 'on-target-error' does not accept value ''\n",
        ),
    ] {
        let mut a = vec!["mirror"];
        a.extend_from_slice(args);
        a.extend(["good.qcow2", "x.qcow2"]);
        let o = ours(od, &a);
        assert_eq!((o.code, o.err.as_str()), (1, err), "{args:?}");
    }
    assert!(!od.join("x.qcow2").exists());
    for p in ["report", "ignore", "stop", "enospc"] {
        let (s, t) = (
            format!("--on-source-error={p}"),
            format!("--on-target-error={p}"),
        );
        let o = ours(od, &["mirror", &s, &t, "good.qcow2", "g.qcow2"]);
        assert_eq!((o.code, o.out.as_str(), o.err.as_str()), (0, "", ""), "{p}");
        let c = qemu(od, "qemu-img", &["compare", "good.qcow2", "g.qcow2"]);
        assert_eq!(c.code, 0, "{p}: {c:?}");
    }
    let h = ours(od, &["mirror", "--help"]);
    assert!(
        h.out
            .contains("--on-source-error=report|ignore|stop|enospc"),
        "{h:?}"
    );
    assert!(
        h.out
            .contains("--on-target-error=report|ignore|stop|enospc"),
        "{h:?}"
    );
}
