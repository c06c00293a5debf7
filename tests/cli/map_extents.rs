//! `map` reports the data and hole runs of raw backing files and data files
//! exactly as the file system gives them (`SEEK_DATA`/`SEEK_HOLE`), as
//! qemu-img's file driver does: no fixed probe unit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use crate::support::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Writes `len` bytes of `byte` at `offset` of an existing file.
fn poke(path: &Path, offset: u64, len: usize, byte: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len], offset).unwrap();
}

/// A sparse file of `len` bytes with 512-byte (or shorter) runs of data at
/// unaligned 512 B positions.
fn sparse_raw(path: &Path, len: u64, runs: &[(u64, usize)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    drop(f);
    for &(off, n) in runs {
        poke(path, off, n, 0x58);
    }
}

fn assert_map_same(d: &Path, img: &str) {
    for args in [
        &["map", img][..],
        &["map", "--output", "json", img],
        &["map", "-s", "70000", "-l", "3000000", img],
    ] {
        let (_, o) = twins(d, d, "qemu-img", &[], args);
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
    }
}

#[test]
fn raw_backing_runs_match_qemu() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    sparse_raw(
        &d.join("base.raw"),
        4 << 20,
        &[
            (512, 512),
            (70000, 512),
            (200704, 512),
            (1049088, 512),
            (3145216, 512),
        ],
    );
    qemu_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "base.raw",
            "top.qcow2",
            "4M",
        ],
    );
    qemu_ok(d, "qemu-io", &["-c", "write 1M 64k", "top.qcow2"]);
    assert_map_same(d, "top.qcow2");
    // A shorter backing file whose length is not a multiple of 512, with
    // data right up to its end.
    sparse_raw(
        &d.join("short.raw"),
        3_000_000,
        &[(1536, 100), (2_999_808, 192)],
    );
    qemu_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "short.raw",
            "top2.qcow2",
            "4M",
        ],
    );
    assert_map_same(d, "top2.qcow2");
    let o = ours(d, &["map", "top2.qcow2"]);
    assert!(
        o.out.contains("0x6c0           0x2dc000"),
        "the last run ends at the end of the file: {}",
        o.out
    );
    // convert copies what map reports: same output, same guest data.
    let q = qemu(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "q.raw"],
    );
    let o = ours(d, &["convert", "-O", "raw", "top.qcow2", "o.raw"]);
    assert_eq!(o, q);
    assert!(std::fs::read(d.join("o.raw")).unwrap() == std::fs::read(d.join("q.raw")).unwrap());
}

#[test]
fn data_file_and_preallocated_runs_match_qemu() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let d = d.path();
    let writes = [
        "-c",
        "write -P 1 512 512",
        "-c",
        "write -P 2 70000 512",
        "-c",
        "write -P 3 3M 64k",
    ];
    // A sparse external data file with data-file-raw.
    qemu_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw,data_file_raw=on",
            "dfr.qcow2",
            "4M",
        ],
    );
    let mut args = writes.to_vec();
    args.push("dfr.qcow2");
    qemu_ok(d, "qemu-io", &args);
    assert_map_same(d, "dfr.qcow2");
    // Metadata preallocation: map asks the image file for its holes.
    qemu_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "pm.qcow2",
            "4M",
        ],
    );
    let mut args = writes.to_vec();
    args.push("pm.qcow2");
    qemu_ok(d, "qemu-io", &args);
    assert_map_same(d, "pm.qcow2");
}
