//! The read path against QEMU: every reference image made by
//! `testdata/make-images.sh` reads through `qcow2kit::Image` exactly as
//! `qemu-img convert -O raw` sees it, and `Image::block_status` agrees with
//! `qemu-img map`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use qcow2kit::{Error, Image, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use support::{assert_bytes_eq, Key, Kind, Rng};

fn open_ro(path: &Path) -> Image {
    Image::open(path, &OpenOptions::new().read_only(true))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Reads the whole disk in odd-sized chunks (spanning clusters and L2
/// tables), then at random unaligned places, comparing with `want`.
fn read_and_compare(img: &Image, want: &[u8], name: &str, seed: u64) {
    let size = img.size();
    assert_eq!(size, want.len() as u64, "{name}: virtual size");
    let cs = img.cluster_size();
    let chunks = [
        4097,
        777,
        3 * cs + 1,
        65537,
        123_457,
        511,
        cs - 1,
        1,
        cs + 513,
        300_001,
    ];
    let mut off = 0u64;
    let mut i = 0;
    let mut buf = Vec::new();
    while off < size {
        let n = chunks[i % chunks.len()].min(size - off);
        buf.resize(n as usize, 0xEE);
        img.read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("{name}: read {off}+{n}: {e}"));
        assert_bytes_eq(
            &buf,
            &want[off as usize..(off + n) as usize],
            &format!("{name}: sequential read at {off}+{n}"),
        );
        off += n;
        i += 1;
    }
    let mut rng = Rng::new(seed);
    let max_len = (4 * cs + 1000).min(300_000);
    for _ in 0..300 {
        let off = rng.below(size);
        let n = (1 + rng.below(max_len)).min(size - off);
        buf.resize(n as usize, 0xEE);
        img.read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("{name}: read {off}+{n}: {e}"));
        assert_bytes_eq(
            &buf,
            &want[off as usize..(off + n) as usize],
            &format!("{name}: random read at {off}+{n}"),
        );
    }
    assert_out_of_range(img, name);
}

fn assert_out_of_range(img: &Image, name: &str) {
    let size = img.size();
    for (off, len) in [
        (size, 1u64),
        (size - 5, 10),
        (size + 4096, 512),
        (u64::MAX - 3, 10),
        (u64::MAX, 1),
    ] {
        let mut buf = vec![0u8; len as usize];
        let r = img.read_at(&mut buf, off);
        assert!(
            matches!(r, Err(Error::OutOfRange { .. })),
            "{name}: read {off}+{len} past the end gave {r:?}"
        );
        let r = img.block_status(off, len);
        assert!(
            matches!(r, Err(Error::OutOfRange { .. })),
            "{name}: block_status {off}+{len} past the end gave {r:?}"
        );
    }
}

fn check_image(path: &Path, seed: u64) {
    check_image_key(path, seed, Key::PLAIN);
}

/// [`check_image`] with the image (and/or its backing file) opened
/// through `key`, by QEMU and by the library. QEMU's map shows no host
/// offsets of an encrypted image: ours are hidden the same way there.
fn check_image_key(path: &Path, seed: u64, key: Key) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let want = support::qemu_raw_key(path, key);
    let img = Image::open(path, &key.open_options().read_only(true))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    read_and_compare(&img, &want, &name, seed);
    let mut ours = support::our_map(&img);
    if key.top {
        ours = support::hide_host_offsets(&ours);
    }
    let theirs = support::qemu_map_key(path, key);
    assert_eq!(
        ours, theirs,
        "{name}: block_status differs from qemu-img map"
    );
}

fn images(prefix: &str) -> Vec<PathBuf> {
    let dir = support::reference_images();
    let mut v: Vec<PathBuf> = walk(dir)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(".qcow2")
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no reference images named {prefix}*");
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

fn check_group(prefix: &str) {
    if !support::have_qemu() {
        return;
    }
    for (i, p) in images(prefix).iter().enumerate() {
        check_image(p, 0x5eed + i as u64);
    }
}

/// Every qcow2 image the script makes belongs to one of the groups below.
#[test]
fn every_reference_image_is_covered() {
    if !support::have_qemu() {
        return;
    }
    let groups = [
        "cs", "rc", "zero", "comp-", "extl2-", "mid", "top", "df", "big", "prealloc",
    ];
    for p in walk(support::reference_images()) {
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.ends_with(".qcow2") {
            assert!(
                groups.iter().any(|g| n.starts_with(g)),
                "{n} is tested by no group"
            );
        }
    }
}

#[test]
fn cluster_sizes_and_versions() {
    check_group("cs");
}

#[test]
fn refcount_widths() {
    check_group("rc");
}

#[test]
fn zero_clusters() {
    check_group("zero");
}

#[test]
fn compressed_zlib_and_zstd() {
    check_group("comp-");
}

#[test]
fn extended_l2() {
    check_group("extl2-");
}

#[test]
fn backing_chain() {
    check_group("mid");
    check_group("top");
    if !support::have_qemu() {
        return;
    }
    // The chain is what we think it is: 3 deep, raw at the bottom, the top
    // one without a backing format.
    let top = images("top.qcow2").remove(0);
    let img = open_ro(&top);
    assert_eq!(img.header().backing_file.as_deref(), Some("../mid.qcow2"));
    assert_eq!(img.header().backing_format(), None);
    let Some(qcow2kit::image::Backing::Qcow2(mid)) = img.backing() else {
        panic!("top's backing is not qcow2");
    };
    assert_eq!(mid.header().backing_format(), Some("raw"));
    match mid.backing() {
        Some(qcow2kit::image::Backing::Raw { size, .. }) => {
            // 3 MiB + 1000 bytes, in whole sectors as QEMU sizes raw files.
            assert_eq!(*size, 3 * 1048576 + 1024)
        }
        other => panic!("mid's backing is {other:?}"),
    }
}

#[test]
fn preallocated() {
    check_group("prealloc");
}

#[test]
fn external_data_file() {
    check_group("df");
}

/// The 1 TiB image: the written ranges and a sample of holes read as QEMU
/// reads them, and the map says the rest is unallocated.
#[test]
fn one_tib_image() {
    if !support::have_qemu() {
        return;
    }
    let path = images("big.qcow2").remove(0);
    let img = open_ro(&path);
    let size = img.size();
    assert_eq!(size, 1 << 40);
    let ours = support::our_map(&img);
    let theirs = support::qemu_map(&path);
    assert_eq!(ours, theirs, "block_status differs from qemu-img map");
    // Everything outside the four writes is unallocated.
    let allocated: u64 = ours
        .iter()
        .filter(|r| r.kind != Kind::Unallocated)
        .map(|r| r.len)
        .sum();
    assert!(allocated <= 6 * 65536 + (1 << 20), "allocated {allocated}");
    assert!(ours
        .iter()
        .any(|r| r.start + r.len == size && matches!(r.kind, Kind::Data(_))));

    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("big.raw");
    support::qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let raw = std::fs::File::open(&raw).unwrap();
    let compare = |off: u64, len: u64| {
        let mut want = vec![0u8; len as usize];
        raw.read_exact_at(&mut want, off).unwrap();
        let mut got = vec![0xEEu8; len as usize];
        img.read_at(&mut got, off).unwrap();
        assert_bytes_eq(&got, &want, &format!("big.qcow2 at {off}+{len}"));
        want
    };
    for r in ours.iter().filter(|r| r.kind != Kind::Unallocated) {
        compare(r.start, r.len);
        // Unaligned reads around the edges of the run.
        compare(
            r.start.saturating_sub(777),
            (r.len + 1554).min(size - r.start.saturating_sub(777)),
        );
    }
    let last = compare(size - 512, 512);
    assert!(last.iter().any(|b| *b != 0), "the last sector was written");
    let mut rng = Rng::new(1);
    for _ in 0..64 {
        let off = rng.below(size - 70_000);
        if ours
            .iter()
            .any(|r| r.kind != Kind::Unallocated && off < r.start + r.len && r.start < off + 70_000)
        {
            continue;
        }
        let got = compare(off, 1 + rng.below(70_000));
        assert!(got.iter().all(|b| *b == 0), "hole at {off} is not zero");
    }
    assert_out_of_range(&img, "big.qcow2");
}

// ---------------------------------------------------------------------------
// The same over LUKS-encrypted images.
// ---------------------------------------------------------------------------

/// LUKS copies of the reference images (every cluster size, extended L2,
/// compressed and zero clusters: `support::luks_copy`, made and written by
/// QEMU through the key) read here exactly as QEMU reads them with the
/// key, and block status agrees with QEMU's map.
#[test]
fn luks_copies_of_reference_images() {
    if !support::have_qemu() {
        return;
    }
    let refs = support::reference_images();
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "cs512-v3",
        "cs4096-v3",
        "cs65536-v3",
        "cs2097152-v3",
        "extl2-16384",
        "extl2-65536",
        "extl2-2097152",
        "comp-zlib",
        "comp-zstd-2m",
        "zero",
        "rc1",
    ];
    for (i, name) in names.iter().enumerate() {
        let path = dir.path().join(format!("{name}.qcow2"));
        support::luks_copy(&refs.join(format!("{name}.qcow2")), Key::PLAIN, &path);
        let map = support::qemu_map_key(&path, Key::LUKS);
        for kind in [
            Kind::Compressed,
            Kind::Zero(None),
            Kind::Data(support::HIDDEN),
        ] {
            assert!(
                map.iter().any(|r| r.kind == kind),
                "{name}: the LUKS copy has no {kind:?} run: {map:?}"
            );
        }
        check_image_key(&path, 0x1a65 + i as u64, Key::LUKS);
    }
}

/// Backing chains with LUKS in them: an encrypted overlay over QEMU's
/// reference chain (qcow2 over raw), an encrypted overlay over an
/// encrypted backing file (each with its key), a plain overlay over an
/// encrypted backing file.
#[test]
fn luks_backing_chains() {
    if !support::have_qemu() {
        return;
    }
    let refs = support::reference_images();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(refs.join("chain/base.raw"), dir.path().join("base.raw")).unwrap();
    std::fs::copy(refs.join("chain/mid.qcow2"), dir.path().join("mid.qcow2")).unwrap();
    support::luks_copy(
        &refs.join("cs65536-v3.qcow2"),
        Key::PLAIN,
        &dir.path().join("luks-base.qcow2"),
    );
    let cases = [
        ("over-mid.qcow2", "mid.qcow2", Key::LUKS),
        ("luks-over-luks.qcow2", "luks-base.qcow2", Key::LUKS_CHAIN),
        (
            "plain-over-luks.qcow2",
            "luks-base.qcow2",
            Key::LUKS_BACKING,
        ),
    ];
    for (i, (top, base, key)) in cases.into_iter().enumerate() {
        let path = dir.path().join(top);
        let mut args = vec![
            "create".to_owned(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        args.extend(key.create_args());
        args.extend(["-b", base, "-F", "qcow2", top, "8M"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::qemu_img_in(dir.path(), &args);
        support::qemu_io_key(
            &path,
            key,
            &[
                "write -P 0x61 1000 5000".into(),
                "write -z 1M 128k".into(),
                "discard 2M 64k".into(),
                "write -P 0x62 5M 70000".into(),
            ],
        );
        check_image_key(&path, 0xc4a1 + i as u64, key);
    }
}
