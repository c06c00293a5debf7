//! Preallocation, growing and shrinking, against QEMU: every operation is
//! done by qcow2kit on one image and by `qemu-img` on a twin (same names, in
//! a sibling directory); `qemu-img map --output json`, `qemu-img check
//! --output json`, the file size and the bytes of the files must agree.
//! Crash replay checks that every prefix of the writes of a resize leaves an
//! image that opens, has no corruption and still holds the old data.

use crate::support;

use crate::support::testing::{FaultyStorage, RecordedOp};
use qcow2kit::create::create;
use qcow2kit::options::{parse_size, CreateOptions, Preallocation};
use qcow2kit::storage::{FileStorage, Storage};
use qcow2kit::{Error, Image, OpenOptions};
use serde_json::Value;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MODES: [Preallocation; 4] = [
    Preallocation::Off,
    Preallocation::Metadata,
    Preallocation::Falloc,
    Preallocation::Full,
];

fn run(prog: &str, args: &[&str], dir: &Path) -> String {
    support::run_ok(dir, prog, args).out
}

/// Two directories with the same file names: `a` for qcow2kit, `b` for QEMU.
struct Twins {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

impl Twins {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        Twins { _tmp: tmp, a, b }
    }

    /// Runs a qemu tool in both directories (identical setup).
    fn both(&self, prog: &str, args: &[&str]) {
        run(prog, args, &self.a);
        run(prog, args, &self.b);
    }
}

fn map_json(dir: &Path, name: &str) -> Value {
    let s = run(
        "qemu-img",
        &["map", "--output", "json", "-f", "qcow2", name],
        dir,
    );
    serde_json::from_str(&s).unwrap()
}

/// `qemu-img check --output json` (exit 0, or 3 with leaks).
fn check_json(dir: &Path, name: &str) -> (i32, Value) {
    let out = support::run_in(dir, "qemu-img", &["check", "--output", "json", name]);
    let code = out.code;
    let v: Value = serde_json::from_str(&out.out).unwrap_or_else(|_| panic!("check: {}", out.err));
    (code, v)
}

/// Offset and length of the snapshot table (its timestamps differ between
/// twins made a moment apart).
fn snapshot_table(bytes: &[u8]) -> Option<(usize, usize)> {
    let n = u32::from_be_bytes(bytes[60..64].try_into().unwrap());
    let off = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
    (n > 0).then_some((off, 1024 * n as usize))
}

fn assert_same_image(t: &Twins, name: &str, what: &str) {
    let a = std::fs::read(t.a.join(name)).unwrap();
    let b = std::fs::read(t.b.join(name)).unwrap();
    assert_eq!(a.len(), b.len(), "{what}: file sizes differ");
    assert_eq!(map_json(&t.a, name), map_json(&t.b, name), "{what}: map");
    let (ca, mut ja) = check_json(&t.a, name);
    let (cb, mut jb) = check_json(&t.b, name);
    ja["filename"] = Value::Null;
    jb["filename"] = Value::Null;
    assert_eq!((ca, &ja), (cb, &jb), "{what}: check");
    assert_eq!(ja["check-errors"], 0, "{what}: check errors");
    let mask = snapshot_table(&a);
    let differs = a
        .iter()
        .zip(&b)
        .enumerate()
        .find(|(i, (x, y))| x != y && !mask.is_some_and(|(o, l)| *i >= o && *i < o + l));
    if let Some((i, _)) = differs {
        panic!("{what}: files differ first at byte {i:#x}");
    }
}

fn opts(s: &str) -> CreateOptions {
    CreateOptions::from_qemu_str(s).unwrap()
}

fn open(path: &Path) -> Image {
    Image::open(path, &OpenOptions::new()).unwrap()
}

/// Creates `name` with qcow2kit in `a` and with `qemu-img create` in `b`.
fn create_twins(t: &Twins, name: &str, o: &str, size: &str) {
    create(&t.a.join(name), &opts(o), parse_size(size).unwrap()).unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", o, name, size],
        &t.b,
    );
}

/// Grows `name` with qcow2kit in `a` and with `qemu-img resize` in `b`.
fn grow_twins(t: &Twins, name: &str, size: &str, mode: Preallocation) {
    let img = open(&t.a.join(name));
    img.resize_with(parse_size(size).unwrap(), mode, false)
        .unwrap();
    img.close().unwrap();
    let p = format!("--preallocation={mode}");
    run("qemu-img", &["resize", "-q", &p, name, size], &t.b);
}

fn shrink_twins(t: &Twins, name: &str, size: &str) {
    let img = open(&t.a.join(name));
    img.resize_with(parse_size(size).unwrap(), Preallocation::Off, true)
        .unwrap();
    img.close().unwrap();
    run("qemu-img", &["resize", "-q", "--shrink", name, size], &t.b);
}

// ----------------------------------------------------------------------
// Create and grow, every mode and cluster size.
// ----------------------------------------------------------------------

/// (cluster size, create size, grow-from size, grow-to size): sizes that are
/// multiples of 512 but not of the cluster size, several L2 tables with 4 KiB
/// clusters (where growing also moves the L1 table).
const GEOMETRIES: [(&str, &str, &str, &str); 3] = [
    ("4k", "9437696", "5243392", "13M"),
    ("64k", "41943552", "25166336", "40M"),
    ("2M", "20972032", "8389120", "60M"),
];

#[test]
fn create_matches_qemu() {
    if !support::have_qemu() {
        return;
    }
    for (cs, size, _, _) in GEOMETRIES {
        for mode in MODES {
            let t = Twins::new();
            let o = format!("cluster_size={cs},preallocation={mode}");
            create_twins(&t, "i.qcow2", &o, size);
            assert_same_image(&t, "i.qcow2", &format!("create {o} {size}"));
        }
    }
}

/// A zero size: `falloc` and `full` still move the refcount table (QEMU
/// builds a refcount area even for no data).
#[test]
fn create_zero_size_matches_qemu() {
    if !support::have_qemu() {
        return;
    }
    for mode in MODES {
        let t = Twins::new();
        create_twins(&t, "z.qcow2", &format!("preallocation={mode}"), "0");
        assert_same_image(&t, "z.qcow2", &format!("create {mode} 0"));
    }
}

#[test]
fn grow_matches_qemu() {
    if !support::have_qemu() {
        return;
    }
    for (cs, _, from, to) in GEOMETRIES {
        for mode in MODES {
            let t = Twins::new();
            let o = format!("cluster_size={cs}");
            t.both(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", &o, "i.qcow2", from],
            );
            // Data at the start and in the partial last cluster.
            let last = parse_size(from).unwrap() - 512;
            t.both(
                "qemu-io",
                &[
                    "-c",
                    "write -P 0x11 0 64k",
                    "-c",
                    &format!("write -P 0x22 {last} 512"),
                    "i.qcow2",
                ],
            );
            grow_twins(&t, "i.qcow2", to, mode);
            assert_same_image(&t, "i.qcow2", &format!("grow {o} {from} -> {to} {mode}"));
            // The old data is still there, the new range reads as zeroes.
            let img = open(&t.a.join("i.qcow2"));
            let mut buf = vec![0u8; 512];
            img.read_at(&mut buf, last).unwrap();
            assert!(buf.iter().all(|b| *b == 0x22));
            img.read_at(&mut buf, last + 512).unwrap();
            assert!(buf.iter().all(|b| *b == 0));
        }
    }
}

/// Growing a preallocated image again, with the partial last cluster
/// already allocated (kept by `metadata`, replaced by `falloc`).
#[test]
fn grow_preallocated_matches_qemu() {
    if !support::have_qemu() {
        return;
    }
    for first in [Preallocation::Metadata, Preallocation::Falloc] {
        for mode in [Preallocation::Metadata, Preallocation::Falloc] {
            let t = Twins::new();
            create_twins(&t, "i.qcow2", &format!("preallocation={first}"), "100352");
            t.both("qemu-io", &["-c", "write -P 7 99840 512", "i.qcow2"]);
            grow_twins(&t, "i.qcow2", "300k", mode);
            assert_same_image(&t, "i.qcow2", &format!("{first} then {mode}"));
        }
    }
}

#[test]
fn external_data_file_matches_qemu() {
    if !support::have_qemu() {
        return;
    }
    for mode in MODES {
        for raw in [false, true] {
            let t = Twins::new();
            let o = format!(
                "data_file=i.data,data_file_raw={},preallocation={mode}",
                if raw { "on" } else { "off" }
            );
            create_twins(&t, "i.qcow2", &o, "24M");
            assert_same_image(&t, "i.qcow2", &o);
            let (da, db) = (t.a.join("i.data"), t.b.join("i.data"));
            assert_eq!(
                std::fs::read(&da).unwrap(),
                std::fs::read(&db).unwrap(),
                "{o}: data file"
            );
            grow_twins(&t, "i.qcow2", "40M", mode);
            assert_same_image(&t, "i.qcow2", &format!("{o}, grown"));
            assert_eq!(std::fs::metadata(&da).unwrap().len(), 40 << 20);
            assert_eq!(std::fs::read(&da).unwrap(), std::fs::read(&db).unwrap());
        }
    }
}

/// `data_file_raw=on` implies metadata preallocation: 5 clusters for 64M
/// (header, refcount table and block, L1, one L2 table).
#[test]
fn data_file_raw_preallocates_metadata() {
    if !support::have_qemu() {
        return;
    }
    let t = Twins::new();
    create_twins(&t, "r.qcow2", "data_file=r.data,data_file_raw=on", "64M");
    assert_eq!(
        std::fs::metadata(t.a.join("r.qcow2")).unwrap().len(),
        5 * 65536
    );
    assert_same_image(&t, "r.qcow2", "data_file_raw");
    // Guest cluster N is data-file offset N.
    let img = open(&t.a.join("r.qcow2"));
    let st = img.block_status(5 << 20, 65536).unwrap();
    assert_eq!(st.extent, qcow2kit::Extent::Data { host: 5 << 20 });
}

/// With extended L2 entries and a backing file, preallocated subclusters
/// stay unallocated: the backing data still shows through.
#[test]
fn extended_l2_backing_preallocation() {
    if !support::have_qemu() {
        return;
    }
    for mode in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        let t = Twins::new();
        t.both(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
        );
        t.both("qemu-io", &["-c", "write -P 0x5a 0 4M", "base.qcow2"]);
        let o = format!(
            "extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2,preallocation={mode}"
        );
        create_twins(&t, "o.qcow2", &o, "4M");
        assert_same_image(&t, "o.qcow2", &o);
        let img = open(&t.a.join("o.qcow2"));
        let mut buf = vec![0u8; 4096];
        img.read_at(&mut buf, 3 << 20).unwrap();
        assert!(
            buf.iter().all(|b| *b == 0x5a),
            "{mode}: backing data hidden"
        );
    }
}

/// Growing over a backing file longer than the image: the new range reads
/// as zeroes (zero clusters), as in QEMU.
#[test]
fn grow_over_longer_backing_file() {
    if !support::have_qemu() {
        return;
    }
    for mode in MODES {
        let t = Twins::new();
        t.both(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
        );
        t.both("qemu-io", &["-c", "write -P 0x5a 0 8M", "base.qcow2"]);
        t.both(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "o.qcow2",
                "1000448",
            ],
        );
        grow_twins(&t, "o.qcow2", "6M", mode);
        assert_same_image(&t, "o.qcow2", &format!("backing, grown {mode}"));
        let img = open(&t.a.join("o.qcow2"));
        let mut buf = vec![0u8; 2 << 20];
        img.read_at(&mut buf, 1000448).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "{mode}: backing data shows");
    }
}

// ----------------------------------------------------------------------
// Shrinking.
// ----------------------------------------------------------------------

/// Guest content of an image as raw bytes (`qemu-img convert -O raw`).
fn raw_content(dir: &Path, name: &str) -> Vec<u8> {
    run("qemu-img", &["convert", "-O", "raw", name, "out.raw"], dir);
    let v = std::fs::read(dir.join("out.raw")).unwrap();
    std::fs::remove_file(dir.join("out.raw")).unwrap();
    v
}

/// Create options, size, (offset, length) of the data written, new size.
type ShrinkCase<'a> = (&'a str, &'a str, &'a [(u64, u64)], &'a str);

#[test]
fn shrink_matches_qemu() {
    if !support::have_qemu() {
        return;
    }
    // (create options, size, writes, new size)
    let cases: [ShrinkCase; 5] = [
        (
            "cluster_size=64k",
            "1G",
            &[
                (0, 64 << 10),
                (300 << 20, 128 << 10),
                (1000 << 20, 64 << 10),
            ],
            "300M",
        ),
        (
            "cluster_size=64k",
            "2G",
            &[(0, 64 << 10), (699 << 20, 2 << 20)],
            "734003712",
        ),
        (
            "cluster_size=4k",
            "64M",
            &[(0, 8 << 20), (40 << 20, 8 << 20)],
            "20M",
        ),
        (
            "cluster_size=64k,preallocation=metadata",
            "64M",
            &[(1 << 20, 1 << 20)],
            "10M",
        ),
        (
            "cluster_size=512,refcount_bits=64,preallocation=metadata",
            "3M",
            &[(0, 4096)],
            "1M",
        ),
    ];
    for (o, size, writes, new) in cases {
        let t = Twins::new();
        t.both(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, "s.qcow2", size],
        );
        for (i, (off, len)) in writes.iter().enumerate() {
            let w = format!("write -P {} {off} {len}", i + 1);
            t.both("qemu-io", &["-c", &w, "s.qcow2"]);
        }
        let before = raw_content(&t.a, "s.qcow2");
        shrink_twins(&t, "s.qcow2", new);
        let what = format!("shrink {o} {size} -> {new}");
        assert_same_image(&t, "s.qcow2", &what);
        let (code, j) = check_json(&t.a, "s.qcow2");
        assert_eq!(code, 0, "{what}: leaks or errors: {j}");
        // Data below the new end survives byte for byte.
        let after = raw_content(&t.a, "s.qcow2");
        let n = parse_size(new).unwrap() as usize;
        assert_eq!(after.len(), n);
        assert!(
            after == before[..n],
            "{what}: data below the new end changed"
        );
        assert_eq!(after, raw_content(&t.b, "s.qcow2"));
    }
}

#[test]
fn shrink_with_snapshot_and_data_file() {
    if !support::have_qemu() {
        return;
    }
    let t = Twins::new();
    t.both(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "s.qcow2", "64M"],
    );
    t.both("qemu-io", &["-c", "write -P 1 0 40M", "s.qcow2"]);
    t.both("qemu-img", &["snapshot", "-c", "snap", "s.qcow2"]);
    t.both("qemu-io", &["-c", "write -P 2 10M 30M", "s.qcow2"]);
    shrink_twins(&t, "s.qcow2", "16M");
    assert_same_image(&t, "s.qcow2", "shrink with a snapshot");
    // The snapshot keeps its data.
    run("qemu-img", &["snapshot", "-a", "snap", "s.qcow2"], &t.a);
    let raw = raw_content(&t.a, "s.qcow2");
    assert_eq!(raw.len(), 64 << 20);
    assert!(raw[..40 << 20].iter().all(|b| *b == 1));

    let t = Twins::new();
    t.both(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.data",
            "d.qcow2",
            "16M",
        ],
    );
    t.both("qemu-io", &["-c", "write -P 3 0 16M", "d.qcow2"]);
    shrink_twins(&t, "d.qcow2", "8M");
    assert_same_image(&t, "d.qcow2", "shrink with a data file");
    assert_eq!(
        std::fs::metadata(t.a.join("d.data")).unwrap().len(),
        8 << 20
    );
    let raw = raw_content(&t.a, "d.qcow2");
    assert!(raw.len() == 8 << 20 && raw.iter().all(|b| *b == 3));
}

fn message(e: Error) -> String {
    e.qemu_message()
}

#[test]
fn refused_resizes_leave_the_image_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u.qcow2");
    create(&p, &CreateOptions::new(), 8 << 20).unwrap();
    {
        let img = open(&p);
        img.write_at(&[9u8; 4096], 7 << 20).unwrap();
        img.close().unwrap();
    }
    let before = std::fs::read(&p).unwrap();
    let img = open(&p);
    let e = img
        .resize_with(4 << 20, Preallocation::Off, false)
        .unwrap_err();
    assert_eq!(
        message(e),
        "Use the --shrink option to perform a shrink operation."
    );
    let e = img.resize(4 << 20).unwrap_err();
    assert_eq!(
        message(e),
        "Use the --shrink option to perform a shrink operation."
    );
    for (size, shrink) in [(4 << 20, true), (4 << 20, false), (8 << 20, false)] {
        let e = img
            .resize_with(size, Preallocation::Metadata, shrink)
            .unwrap_err();
        assert_eq!(
            message(e),
            "Preallocation can only be used for growing images"
        );
    }
    let e = img
        .resize_with((16 << 20) + 100, Preallocation::Off, false)
        .unwrap_err();
    assert_eq!(message(e), "The new size must be a multiple of 512");
    img.close().unwrap();
    assert!(
        std::fs::read(&p).unwrap() == before,
        "a refused resize changed the file"
    );
    assert_eq!(open(&p).size(), 8 << 20);
}

#[test]
fn v2_with_snapshots_cannot_be_resized() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v.qcow2",
            "1M",
        ],
        dir.path(),
    );
    run("qemu-img", &["snapshot", "-c", "s", "v.qcow2"], dir.path());
    let img = open(&dir.path().join("v.qcow2"));
    let e = img.resize(2 << 20).unwrap_err();
    assert_eq!(message(e), "Can't resize a v2 image which has snapshots");
}

// ----------------------------------------------------------------------
// Crash replay.
// ----------------------------------------------------------------------

/// Applies one recorded operation to a file.
fn apply(f: &File, op: &RecordedOp) {
    match op {
        RecordedOp::Write { offset, data } => f.write_all_at(data, *offset).unwrap(),
        RecordedOp::Flush => {}
        RecordedOp::SetLen(len) => f.set_len(*len).unwrap(),
        RecordedOp::Discard { offset, len } => {
            let size = f.metadata().unwrap().len();
            let end = offset.saturating_add(*len).min(size);
            if *offset < end {
                f.write_all_at(&vec![0u8; (end - offset) as usize], *offset)
                    .unwrap();
            }
        }
    }
}

/// Records the writes of `op` on an image made by `setup`, then replays
/// every prefix of them onto the starting image: each state must open,
/// have no corruption (leaks are fine) and still hold the data written by
/// `setup` (`check` reads it back).
fn crash_replay(
    setup: impl Fn(&Image),
    op: impl Fn(&Image) -> qcow2kit::Result<()>,
    check: impl Fn(&Image),
) {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("c.qcow2");
    create(&img_path, &opts("cluster_size=64k"), 256 << 20).unwrap();
    {
        let img = open(&img_path);
        setup(&img);
        img.close().unwrap();
    }
    let start = std::fs::read(&img_path).unwrap();
    let faulty = Arc::new(FaultyStorage::new(
        FileStorage::open(&img_path, true).unwrap(),
    ));
    faulty.start_recording();
    {
        let img = Image::open_storage(faulty.clone(), &OpenOptions::new()).unwrap();
        op(&img).unwrap();
        img.close().unwrap();
    }
    let log = faulty.take_log();
    assert!(!log.is_empty());
    eprintln!("replaying {} recorded operations", log.len());
    let work = dir.path().join("w.qcow2");
    std::fs::write(&work, &start).unwrap();
    let f = File::options().write(true).open(&work).unwrap();
    let ro = OpenOptions::new().read_only(true);
    for i in 0..=log.len() {
        if i > 0 {
            apply(&f, &log[i - 1]);
        }
        let img = Image::open(&work, &ro)
            .unwrap_or_else(|e| panic!("prefix {i}/{}: open failed: {e}", log.len()));
        check(&img);
        drop(img);
        let (code, j) = check_json(dir.path(), "w.qcow2");
        assert!(
            code == 0 || code == 3,
            "prefix {i}/{}: qemu-img check exit {code}: {j}",
            log.len()
        );
        assert_eq!(j["check-errors"], 0, "prefix {i}: {j}");
        assert!(
            j.get("corruptions").is_none_or(|c| c == 0),
            "prefix {i}: {j}"
        );
    }
    // The final state is the resized image.
    let len = faulty.inner().len().unwrap();
    assert_eq!(f.metadata().unwrap().len(), len);
}

fn write_old(img: &Image) {
    img.write_at(&[0xa1; 1 << 20], 0).unwrap();
    img.write_at(&[0xb2; 4096], (200 << 20) + 512).unwrap();
}

fn check_old(img: &Image) {
    let mut a = vec![0u8; 1 << 20];
    img.read_at(&mut a, 0).unwrap();
    assert!(a.iter().all(|b| *b == 0xa1), "old data lost");
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, (200 << 20) + 512).unwrap();
    assert!(b.iter().all(|x| *x == 0xb2), "old data lost");
}

/// Growing 256 MiB -> 1.5 GiB moves the L1 table (1 -> 3 entries).
#[test]
fn crash_replay_grow_moves_l1() {
    if !support::have_qemu() {
        return;
    }
    for mode in [
        Preallocation::Off,
        Preallocation::Metadata,
        Preallocation::Falloc,
    ] {
        crash_replay(
            write_old,
            |img| img.resize_with(1536 << 20, mode, false),
            check_old,
        );
    }
}

#[test]
fn crash_replay_shrink() {
    if !support::have_qemu() {
        return;
    }
    crash_replay(
        |img| {
            write_old(img);
            img.write_at(&[0xc3; 1 << 20], 250 << 20).unwrap();
        },
        |img| img.resize_with(201 << 20, Preallocation::Off, true),
        check_old,
    );
}

// ----------------------------------------------------------------------
// Size and nocow.
// ----------------------------------------------------------------------

/// 1 TiB with `metadata` is created by batched work (no I/O per cluster);
/// only speed-insensitive facts are checked. The file size is QEMU's.
#[test]
fn one_tebibyte_metadata() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.qcow2");
    create(&p, &opts("preallocation=metadata"), 1 << 40).unwrap();
    let (code, j) = check_json(dir.path(), "big.qcow2");
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["allocated-clusters"], 16_777_216);
    assert_eq!(j["total-clusters"], 16_777_216);
    assert_eq!(j["check-errors"], 0);
    // What `qemu-img create -o preallocation=metadata big.qcow2 1T` gives.
    assert_eq!(j["image-end-offset"], 1_099_679_662_080u64);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1_099_679_662_080);
}

/// `nocow=on` sets the no-copy-on-write attribute on both files where the
/// file system keeps it (Btrfs) and is harmless elsewhere (ext4: the image
/// is the same as without it).
#[test]
fn nocow() {
    let dir = tempfile::tempdir().unwrap();
    let probe = FileStorage::create(&dir.path().join("probe"), true).unwrap();
    let supported = probe.is_nocow();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    create(&a, &opts("nocow=on,data_file=a.data"), 1 << 20).unwrap();
    let on = FileStorage::open(&a, false).unwrap().is_nocow();
    let data_on = FileStorage::open(&dir.path().join("a.data"), false)
        .unwrap()
        .is_nocow();
    create(&b, &opts("nocow=off,data_file=b.data"), 1 << 20).unwrap();
    if supported {
        assert!(on, "nocow=on: attribute not set on the image");
        assert!(data_on, "nocow=on: attribute not set on the data file");
    } else {
        eprintln!("note: this file system does not keep FS_NOCOW_FL; only checking it is harmless");
        assert!(!on);
    }
    assert!(!FileStorage::open(&b, false).unwrap().is_nocow());
    // Same image apart from the data file name in the header.
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(x.len(), y.len());
    assert_eq!(x.iter().zip(&y).filter(|(p, q)| p != q).count(), 1);
}
