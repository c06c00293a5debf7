//! `qcow2-img serve --nbd --bitmap NAME`: the `qemu:dirty-bitmap:NAME`
//! block-status context against qemu-nbd `-B NAME` serving the same file,
//! as `nbdinfo --map=qemu:dirty-bitmap:NAME` and `qemu-img map --image-opts
//! ...,x-dirty-bitmap=qemu:dirty-bitmap:NAME` see them; a read-write export
//! whose bitmap records the client's writes live, stored at the end and
//! read back by qemu-nbd; qemu-nbd's refusals of a missing or inconsistent
//! bitmap. Servers are started and stopped by the tests (Unix sockets).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::nbd_serve::{have, ok, run, Served, WAIT};
use crate::support::bitmaps::{granules, set_in_use, stored_bitmaps};
use crate::support::qemu_ok;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

const URI: &str = "nbd+unix:///?socket=s.sock";

/// A run of a bitmap map: start, length, dirty.
type Run = (u64, u64, bool);

/// qemu-nbd `-t -f qcow2 -k s.sock ARGS FILE` in `d`, answering.
fn qemu_nbd(d: &Path, args: &[&str], file: &str) -> Served {
    let sock = d.join("s.sock");
    let sock = sock.to_str().unwrap();
    let mut all = vec!["-t", "-f", "qcow2", "-k", sock];
    all.extend_from_slice(args);
    all.push(file);
    let s = Served::start(d, "qemu-nbd", &all, |d, _| d.join("s.sock").exists());
    // The socket file appears at bind; wait until qemu-nbd answers.
    let t0 = Instant::now();
    while run(d, "nbdinfo", &["--size", URI]).code != 0 {
        assert!(t0.elapsed() < WAIT, "qemu-nbd not answering");
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

/// What clients see of bitmap `name` on the server at `s.sock`.
fn views(d: &Path, name: &str) -> (String, String) {
    let ctx = format!("qemu:dirty-bitmap:{name}");
    let nbdinfo = ok(d, "nbdinfo", &[&format!("--map={ctx}"), URI]);
    let opts =
        format!("driver=nbd,export=,server.type=unix,server.path=s.sock,x-dirty-bitmap={ctx}");
    let map = ok(
        d,
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts],
    );
    (nbdinfo, map)
}

/// The dirty runs of `nbdinfo --map` output (`start length 1 dirty`).
fn dirty_runs(map: &str) -> Vec<(u64, u64)> {
    map.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(2) == Some(&"1")).then(|| (w[0].parse().unwrap(), w[1].parse().unwrap()))
        })
        .collect()
}

fn runs_of(g: u8, set: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in set {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b << g => *l += 1 << g,
            _ => out.push((b << g, 1 << g)),
        }
    }
    out
}

/// A 4 MiB image: `a` (64k) saw two writes, `d` (512 B, disabled) one
/// write before it was disabled, `e` (enabled, clean).
fn make(d: &Path) {
    qemu_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "n.qcow2", "4M"],
    );
    qemu_ok(d, "qemu-img", &["bitmap", "--add", "n.qcow2", "a"]);
    qemu_ok(
        d,
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "n.qcow2", "d"],
    );
    qemu_ok(d, "qemu-io", &["-c", "write 5000 3000", "n.qcow2"]);
    qemu_ok(d, "qemu-img", &["bitmap", "--disable", "n.qcow2", "d"]);
    qemu_ok(
        d,
        "qemu-io",
        &["-c", "write 100k 1k", "-c", "write 3M 70k", "n.qcow2"],
    );
    qemu_ok(d, "qemu-img", &["bitmap", "--add", "n.qcow2", "e"]);
}

#[test]
fn dirty_bitmap_context_matches_qemu_nbd() {
    if !have(
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"],
        "nbd bitmaps",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(d);
    let names = ["a", "d", "e"];
    let srv = Served::ours_unix(d, &["-r", "-B", "a", "-B", "d", "-B", "e"], "n.qcow2");
    let ours: Vec<(String, String)> = names.iter().map(|n| views(d, n)).collect();
    let ours_list = ok(d, "nbdinfo", &["--list", URI]);
    assert_eq!(srv.stop().0, 0);
    let reference = qemu_nbd(d, &["-r", "-B", "a", "-B", "d", "-B", "e"], "n.qcow2");
    for (n, o) in names.iter().zip(&ours) {
        assert_eq!(&views(d, n), o, "bitmap {n}");
    }
    let theirs_list = ok(d, "nbdinfo", &["--list", URI]);
    assert_eq!(reference.stop().0, 0);
    let contexts = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.contains("qemu:dirty-bitmap:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(contexts(&ours_list), contexts(&theirs_list));
    // The expected runs, from the writes each bitmap saw.
    let a: BTreeSet<u64> = granules(16, 100 << 10, 1024)
        .chain(granules(16, 3 << 20, 70 << 10))
        .chain(granules(16, 5000, 3000))
        .collect();
    assert_eq!(dirty_runs(&ours[0].0), runs_of(16, &a));
    let dd: BTreeSet<u64> = granules(9, 5000, 3000).collect();
    assert_eq!(dirty_runs(&ours[1].0), runs_of(9, &dd));
    assert!(dirty_runs(&ours[2].0).is_empty());
}

/// A read-write export: the client's writes show in the bitmap at once;
/// after the server stops (closing the image stores the bitmaps) qemu-nbd
/// sees the same bits, and they are exactly the granules written.
#[test]
fn read_write_export_records_client_writes() {
    if !have(
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"],
        "nbd bitmaps rw",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(d);
    let srv = Served::ours_unix(d, &["-B", "e", "-B", "d"], "n.qcow2");
    let writes: &[(&str, u64, u64)] = &[
        ("write -P 7 1M 5k", 1 << 20, 5 << 10),
        ("write -z 2M 64k", 2 << 20, 64 << 10),
        ("discard 512k 64k", 512 << 10, 64 << 10),
    ];
    let mut args = vec!["-f", "raw"];
    for (c, _, _) in writes {
        args.extend(["-c", *c]);
    }
    args.push(URI);
    ok(d, "qemu-io", &args);
    let want: BTreeSet<u64> = writes
        .iter()
        .flat_map(|&(_, o, l)| granules(16, o, l))
        .collect();
    let (live, _) = views(d, "e");
    assert_eq!(dirty_runs(&live), runs_of(16, &want));
    // The disabled bitmap records nothing.
    let dd: BTreeSet<u64> = granules(9, 5000, 3000).collect();
    assert_eq!(dirty_runs(&views(d, "d").0), runs_of(9, &dd));
    assert_eq!(srv.stop().0, 0);
    let stored = stored_bitmaps(&std::fs::read(d.join("n.qcow2")).unwrap()).unwrap();
    let e = stored.iter().find(|b| b.name == "e").unwrap();
    assert_eq!(e.dirty.as_ref(), Some(&want));
    crate::support::assert_check_clean(&d.join("n.qcow2"), "after the export");
    let reference = qemu_nbd(d, &["-r", "-B", "e"], "n.qcow2");
    assert_eq!(views(d, "e").0, live);
    assert_eq!(reference.stop().0, 0);
}

/// A missing or inconsistent bitmap: the server refuses to start, with
/// qemu-nbd's message, and leaves no socket behind.
#[test]
fn missing_or_inconsistent_bitmaps_refused_like_qemu_nbd() {
    if !have(&["qemu-img", "qemu-io", "qemu-nbd"], "nbd bitmap errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(d);
    std::fs::copy(d.join("n.qcow2"), d.join("iu.qcow2")).unwrap();
    set_in_use(&d.join("iu.qcow2"), "a");
    // qemu-nbd binds before it opens (and leaves its socket file behind).
    let qsock = d.join("q.sock");
    let qsock = qsock.to_str().unwrap();
    for (file, name) in [("n.qcow2", "nope"), ("iu.qcow2", "a")] {
        let q = run(
            d,
            "qemu-nbd",
            &["-t", "-r", "-f", "qcow2", "-k", qsock, "-B", name, file],
        );
        let _ = std::fs::remove_file(qsock);
        let o = run(
            d,
            env!("CARGO_BIN_EXE_qcow2-img"),
            &["serve", "--nbd", "-r", "-k", "s.sock", "-B", name, file],
        );
        assert_eq!(q.code, 1, "{q:?}");
        assert_eq!(o.code, 1, "{o:?}");
        assert_eq!(
            o.err,
            q.err.replace("qemu-nbd", "qcow2-img"),
            "{file} {name}"
        );
        assert!(!d.join("s.sock").exists(), "our socket is removed");
    }
}

/// `qcow2-img map --bitmap NAME` prints what qemu-nbd `-B NAME` shows of the
/// same file: JSON every run, human the dirty ones; `-s`/`-l` cut the range;
/// unknown and inconsistent bitmaps fail.
#[test]
fn map_bitmap_matches_qemu_nbd() {
    if !have(
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"],
        "map --bitmap",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(d);
    let img = env!("CARGO_BIN_EXE_qcow2-img");
    let reference = qemu_nbd(d, &["-r", "-B", "a", "-B", "d"], "n.qcow2");
    let qemu_runs: Vec<(String, Vec<Run>)> = ["a", "d"]
        .iter()
        .map(|n| {
            let map = views(d, n).0;
            let runs = map
                .lines()
                .map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    (w[0].parse().unwrap(), w[1].parse().unwrap(), w[2] == "1")
                })
                .collect();
            (n.to_string(), runs)
        })
        .collect();
    assert_eq!(reference.stop().0, 0);
    for (name, want) in &qemu_runs {
        let j = ok(
            d,
            img,
            &["map", "--output=json", "--bitmap", name, "n.qcow2"],
        );
        let got: Vec<Run> = crate::support::json(&j)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["dirty"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(&got, want, "{name}");
        let human = ok(d, img, &["map", "-B", name, "n.qcow2"]);
        let mut lines = vec!["Offset          Length".to_string()];
        for (o, l, _) in want.iter().filter(|r| r.2) {
            let hex = |v: &u64| {
                if *v == 0 {
                    "0".into()
                } else {
                    format!("{v:#x}")
                }
            };
            lines.push(format!("{:<16}{}", hex(o), hex(l)));
        }
        assert_eq!(human, lines.join("\n") + "\n", "{name}");
    }
    // A window of the disk: runs clipped to it.
    let j = ok(
        d,
        img,
        &[
            "map",
            "--output=json",
            "-B",
            "a",
            "-s",
            "100k",
            "-l",
            "3M",
            "n.qcow2",
        ],
    );
    let v = crate::support::json(&j);
    let runs: Vec<Run> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["dirty"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (100 << 10, 28 << 10, true),
            (128 << 10, (3 << 20) - (128 << 10), false),
            (3 << 20, 100 << 10, true)
        ]
    );
    std::fs::copy(d.join("n.qcow2"), d.join("iu.qcow2")).unwrap();
    set_in_use(&d.join("iu.qcow2"), "a");
    for (file, name, err) in [
        (
            "n.qcow2",
            "nope",
            "qcow2-img: Dirty bitmap 'nope' not found\n",
        ),
        (
            "iu.qcow2",
            "a",
            "qcow2-img: Bitmap 'a' is inconsistent and cannot be used\n\
             Try block-dirty-bitmap-remove to delete this bitmap from disk\n",
        ),
    ] {
        let r = run(d, img, &["map", "-B", name, file]);
        assert_eq!((r.code, r.out.as_str(), r.err.as_str()), (1, "", err));
    }
}
