//! The write path against QEMU: images written by qcow2kit pass
//! `qemu-img check` and read back in QEMU; images written by QEMU stay
//! consistent after qcow2kit modifies them; zero writes and discards give
//! the same L2 encodings as QEMU (compared through `qemu-img map`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use qcow2kit::format::consts::*;
use qcow2kit::options::Compat;
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::path::{Path, PathBuf};
use support::{
    assert_bytes_eq, assert_check_clean, assert_check_clean_key, qemu_io, qemu_io_key, Key, Rng,
};

/// An operation applied both to an image and to a `Vec<u8>` model.
#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zeroes(u64, u64, bool),
    Discard(u64, u64),
}

fn apply(img: &Image, model: &mut [u8], op: &Op, cs: u64, discard_zeroes: bool) {
    match op {
        Op::Write(off, data) => {
            img.write_at(data, *off).unwrap();
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        Op::Zeroes(off, len, unmap) => {
            img.write_zeroes(*off, *len, *unmap).unwrap();
            model[*off as usize..(*off + *len) as usize].fill(0);
        }
        Op::Discard(off, len) => {
            img.discard(*off, *len).unwrap();
            if discard_zeroes {
                let size = model.len() as u64;
                let a = off.div_ceil(cs) * cs;
                let mut b = (off + len) / cs * cs;
                if off + len == size {
                    b = size;
                }
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
        }
    }
}

/// `qemu-io read -P` commands covering the model in runs of one byte value.
fn verify_cmds(model: &[u8], max: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut i = 0;
    while i < model.len() {
        let v = model[i];
        let mut j = i + 1;
        while j < model.len() && model[j] == v {
            j += 1;
        }
        if j - i >= 512 || v == 0 {
            cmds.push(format!("read -q -P {v} {i} {}", j - i));
        }
        i = j;
    }
    assert!(cmds.len() <= max, "{} verify commands", cmds.len());
    cmds
}

fn pattern(b: u8, n: u64) -> Vec<u8> {
    vec![b; n as usize]
}

/// Images written by qcow2kit for every cluster size and refcount width:
/// `qemu-img check` is clean and QEMU reads the data back.
#[test]
fn qcow2kit_images_check_clean_in_qemu() {
    if !support::have_qemu() {
        return;
    }
    let mut combos = Vec::new();
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for rb in [1u32, 2, 4, 8, 16, 32, 64] {
            combos.push((cs, rb, Compat::V3, false));
        }
        combos.push((cs, 16, Compat::V2, false));
    }
    check_clean_combos(Key::PLAIN, &combos);
}

/// The same over LUKS images created by qcow2kit (QEMU's default cipher):
/// 512 B, 64 KiB and 2 MiB clusters, extended L2, narrow and wide
/// refcounts; QEMU checks them clean and reads the data back with the key.
#[test]
fn qcow2kit_luks_images_check_clean_in_qemu() {
    if !support::have_qemu() {
        return;
    }
    let combos = [
        (512u64, 16u32, Compat::V3, false),
        (65536, 16, Compat::V3, false),
        (65536, 1, Compat::V3, false),
        (65536, 64, Compat::V3, false),
        (2 << 20, 16, Compat::V3, false),
        (65536, 16, Compat::V3, true),
        (2 << 20, 16, Compat::V3, true),
    ];
    check_clean_combos(Key::LUKS, &combos);
}

/// Creates an image per (cluster size, refcount bits, compat, extended
/// L2), encrypted if `key` says so, writes, zeroes and discards with
/// qcow2kit, then lets QEMU check and read it through `key`.
fn check_clean_combos(key: Key, combos: &[(u64, u32, Compat, bool)]) {
    let dir = tempfile::tempdir().unwrap();
    for &(cs, rb, compat, ext) in combos {
        let name = format!("cs{cs}-rb{rb}-{compat:?}-ext{ext}");
        let path = dir.path().join(format!("{name}.qcow2"));
        let size = 32u64 << 20;
        let opts = CreateOptions::new()
            .cluster_size(cs)
            .refcount_bits(rb)
            .compat(compat)
            .extended_l2(ext);
        qcow2kit::create::create(&path, &key.create_options(opts), size).unwrap();
        let img = Image::open(&path, &key.open_options()).unwrap();
        let base = cs.max(65536);
        let v3 = compat == Compat::V3;
        let ops = vec![
            Op::Write(1000, pattern(0x11, 5000)),
            Op::Write(3 * base - 100, pattern(0x22, 2 * cs + 200)),
            Op::Write(8 * base, pattern(0x33, 4 * cs)),
            Op::Write(8 * base + cs / 2, pattern(0x44, 100)),
            Op::Write(12 * base + 77, pattern(0x55, 3 << 19)),
            Op::Zeroes(8 * base + cs, cs, false),
            Op::Zeroes(8 * base + 2 * cs, cs, true),
            Op::Discard(12 * base + 77, 3 * cs),
            Op::Write(size - 333, pattern(0x66, 333)),
            Op::Zeroes(1500, 100, false),
        ];
        let mut model = vec![0u8; size as usize];
        for op in &ops {
            apply(&img, &mut model, op, cs, v3);
        }
        if !v3 {
            // v2 discards deallocate: without a backing file that reads as zeroes.
            let a = (12 * base + 77).div_ceil(cs) * cs;
            let b = (12 * base + 77 + 3 * cs) / cs * cs;
            model[a as usize..b as usize].fill(0);
        }
        img.close().unwrap();
        assert_check_clean_key(&path, key, &name);
        qemu_io_key(&path, key, &verify_cmds(&model, 64));
        assert_bytes_eq(&support::qemu_raw_key(&path, key), &model, &name);
    }
}

/// Many L2 tables and refcount blocks, and a refcount table that has to grow
/// (512 B clusters, 64-bit refcounts: one refcount block covers 64 clusters,
/// one reftable cluster 64 blocks = 2 MiB of file).
#[test]
fn refcount_table_growth_checks_clean() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for rb in [64u32, 16] {
        let path = dir.path().join(format!("grow-{rb}.qcow2"));
        let size = 64u64 << 20;
        let opts = CreateOptions::new().cluster_size(512).refcount_bits(rb);
        qcow2kit::create::create(&path, &opts, size).unwrap();
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(rb as u64);
        // A sequential run, then scattered writes that each need an L2 table.
        let mut data = vec![0u8; 3 << 20];
        rng.fill(&mut data);
        apply(&img, &mut model, &Op::Write(4096 + 7, data), 512, true);
        for _ in 0..400 {
            let off = rng.below(size - 3000);
            let mut d = vec![0u8; 1 + rng.below(3000) as usize];
            rng.fill(&mut d);
            apply(&img, &mut model, &Op::Write(off, d), 512, true);
        }
        img.close().unwrap();
        let h = Image::open(&path, &OpenOptions::new().read_only(true))
            .unwrap()
            .header();
        if rb == 64 {
            assert_ne!(
                h.refcount_table_offset, 512,
                "the refcount table did not move"
            );
            assert!(h.refcount_table_clusters > 1);
        }
        assert_check_clean(&path, &format!("growth rb{rb}"));
        assert_bytes_eq(&support::qemu_raw(&path), &model, "grown image");
        // Reopen with qcow2kit and keep writing into the grown image.
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let mut d = vec![0u8; 1 << 20];
        rng.fill(&mut d);
        apply(&img, &mut model, &Op::Write(40 << 20, d), 512, true);
        apply(&img, &mut model, &Op::Discard(4096, 1 << 20), 512, true);
        img.close().unwrap();
        assert_check_clean(&path, &format!("growth rb{rb}, reopened"));
        assert_bytes_eq(&support::qemu_raw(&path), &model, "grown image, reopened");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let t = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

/// Images written by QEMU, then modified by qcow2kit: QEMU reads what we
/// wrote and `qemu-img check` stays clean.
#[test]
fn qemu_images_modified_by_qcow2kit() {
    if !support::have_qemu() {
        return;
    }
    let refdir = support::reference_images();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(refdir, dir.path());
    let names = [
        "cs512-v2",
        "cs512-v3",
        "cs4096-v3",
        "cs65536-v2",
        "cs65536-v3",
        "cs2097152-v3",
        "rc1",
        "rc2",
        "rc4",
        "rc8",
        "rc16",
        "rc32",
        "rc64",
        "zero",
        "zero-backed",
        "comp-zlib",
        "comp-zstd",
        "comp-zlib-512",
        "comp-zstd-2m",
        "comp-write",
        "extl2-16384",
        "extl2-65536",
        "extl2-2097152",
        "extl2-backed",
        "chain/mid",
        "chain/top/top",
        "chain/top-v2",
        "df",
        "dfraw",
        "big",
    ];
    for (i, name) in names.iter().enumerate() {
        let path: PathBuf = dir.path().join(format!("{name}.qcow2"));
        modify_and_verify(&path, name, i, Key::PLAIN);
    }
}

/// LUKS copies of QEMU's reference images (`support::luks_copy`: every
/// cluster size, extended L2, compressed and zero clusters, written by
/// QEMU through the key), plus encrypted overlays over plain and encrypted
/// backing files, modified by qcow2kit: QEMU reads what we wrote with the
/// key and `qemu-img check` stays clean.
#[test]
fn qemu_luks_images_modified_by_qcow2kit() {
    if !support::have_qemu() {
        return;
    }
    let refdir = support::reference_images();
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "cs512-v3",
        "cs4096-v3",
        "cs65536-v3",
        "cs2097152-v3",
        "rc1",
        "rc64",
        "zero",
        "comp-zlib",
        "comp-zstd-2m",
        "extl2-16384",
        "extl2-65536",
        "extl2-2097152",
    ];
    for (i, name) in names.iter().enumerate() {
        let path = dir.path().join(format!("{name}.qcow2"));
        support::luks_copy(&refdir.join(format!("{name}.qcow2")), Key::PLAIN, &path);
        modify_and_verify(&path, name, i, Key::LUKS);
    }
    // Chains: a LUKS overlay over QEMU's reference chain (qcow2 over raw),
    // over a LUKS backing file, and a plain overlay over a LUKS backing.
    copy_dir(&refdir.join("chain"), &dir.path().join("chain"));
    support::luks_copy(
        &refdir.join("cs65536-v3.qcow2"),
        Key::PLAIN,
        &dir.path().join("luks-base.qcow2"),
    );
    for (i, (top, base, key)) in [
        ("over-mid", "chain/mid.qcow2", Key::LUKS),
        ("luks-over-luks", "luks-base.qcow2", Key::LUKS_CHAIN),
        ("plain-over-luks", "luks-base.qcow2", Key::LUKS_BACKING),
    ]
    .into_iter()
    .enumerate()
    {
        let file = format!("{top}.qcow2");
        let mut args = vec![
            "create".to_owned(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
        ];
        args.extend(key.create_args());
        args.extend(["-b", base, "-F", "qcow2", &file, "8M"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::qemu_img_in(dir.path(), &args);
        let path = dir.path().join(&file);
        qemu_io_key(
            &path,
            key,
            &["write -P 0x61 1000 5000".into(), "write -z 1M 128k".into()],
        );
        modify_and_verify(&path, top, 50 + i, key);
    }
}

/// Writes, zero writes and discards by qcow2kit on `path` (opened through
/// `key`), applied to QEMU's view of it as a model; then `qemu-img check`
/// must be clean and QEMU must read the model back.
fn modify_and_verify(path: &Path, name: &str, i: usize, key: Key) {
    let before_check = support::qemu_check_key(path, key);
    assert!(
        before_check.is_clean(),
        "{name} is not clean before: {before_check:?}"
    );
    let img = Image::open(path, &key.open_options()).unwrap();
    let size = img.size();
    let cs = img.cluster_size();
    let v3 = img.header().version == 3;
    let backed = img.header().backing_file.is_some();
    if size > 1 << 30 {
        drop(img);
        modify_big(path);
        return;
    }
    // qemu-img cannot read the image while it is open read-write here
    // (image locking): take the model first.
    drop(img);
    let mut model = support::qemu_raw_key(path, key);
    let img = Image::open(path, &key.open_options()).unwrap();
    let mut rng = Rng::new(i as u64 + 100);
    let mut rnd = |n: u64| {
        let mut d = vec![0u8; n as usize];
        rng.fill(&mut d);
        d
    };
    let room = |off: u64, len: u64| len.min(size - off);
    let p_off = (cs * 5 + 10).min(size / 2 + 10);
    let mut ops = vec![
        Op::Write(size / 3 + 123, rnd(room(size / 3 + 123, 3 * cs + 77))),
        Op::Write((4 << 20).min(size - 5000), rnd(5000)),
        Op::Zeroes(size / 2 - 1000, room(size / 2 - 1000, 2 * cs + 3000), false),
        Op::Zeroes((cs * 9).min(size - 2 * cs), 2 * cs, true),
        Op::Write(size - 700, rnd(700)),
        Op::Write(0, rnd(100)),
    ];
    if v3 || !backed {
        ops.push(Op::Discard(size / 4 + 5, room(size / 4 + 5, 3 * cs + 100)));
    }
    ops.push(Op::Write(size / 4 + cs, rnd(1000)));
    ops.push(Op::Write(p_off, pattern(0xA5, 1000)));
    for op in &ops {
        apply(&img, &mut model, op, cs, true);
    }
    img.close().unwrap();
    assert_check_clean_key(path, key, &format!("{name} after qcow2kit's writes"));
    qemu_io_key(path, key, &[format!("read -q -P 0xa5 {p_off} 1000")]);
    assert_bytes_eq(&support::qemu_raw_key(path, key), &model, name);
}

/// The 1 TiB image: write at the start, across an L2 boundary and on the
/// last sector, then let QEMU verify.
fn modify_big(path: &Path) {
    let img = Image::open(path, &OpenOptions::new()).unwrap();
    let t = 1u64 << 40;
    img.write_at(&pattern(0x71, 3000), 50_000).unwrap();
    img.write_at(&pattern(0x72, 100_000), (t / 4) - 50_000)
        .unwrap();
    img.write_at(&pattern(0x73, 512), t - 512).unwrap();
    img.write_zeroes(t / 2 - 65536, 3 * 65536, true).unwrap();
    img.close().unwrap();
    assert_check_clean(path, "big.qcow2 after qcow2kit's writes");
    qemu_io(
        path,
        &[
            "read -q -P 0x71 50000 3000".into(),
            format!("read -q -P 0x72 {} 100000", t / 4 - 50_000),
            format!("read -q -P 0x73 {} 512", t - 512),
            format!("read -q -P 0 {} {}", t / 2 - 65536, 3 * 65536),
        ],
    );
}

// ---------------------------------------------------------------------------
// Extended L2: only touched subclusters are allocated.
// ---------------------------------------------------------------------------

fn be64(b: &[u8], pos: u64) -> u64 {
    u64::from_be_bytes(b[pos as usize..pos as usize + 8].try_into().unwrap())
}

/// The raw (descriptor, bitmap) of guest cluster `c` of an extended-L2 image file.
fn ext_l2_entry(file: &[u8], c: u64, cs: u64) -> (u64, u64) {
    let l1 = be64(file, 40);
    let per_l2 = cs / 16;
    let l2 = be64(file, l1 + 8 * (c / per_l2)) & L1E_OFFSET_MASK;
    if l2 == 0 {
        return (0, 0);
    }
    let pos = l2 + 16 * (c % per_l2);
    (be64(file, pos), be64(file, pos + 8))
}

#[test]
fn extended_l2_partial_writes_allocate_only_touched_subclusters() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for cs in [16384u64, 65536, 2 << 20] {
        let sc = cs / 32;
        for backed in [false, true] {
            let name = format!("extl2-{cs}-backed-{backed}");
            let path = dir.path().join(format!("{name}.qcow2"));
            let size = 16u64 << 20;
            let mut model = vec![0u8; size as usize];
            let mut opts = CreateOptions::new().cluster_size(cs).extended_l2(true);
            if backed {
                let base = dir.path().join(format!("{name}.raw"));
                let mut b = vec![0u8; size as usize];
                Rng::new(cs).fill(&mut b);
                std::fs::write(&base, &b).unwrap();
                model.copy_from_slice(&b);
                opts = opts.backing_file(base.to_str().unwrap()).backing_fmt("raw");
            }
            qcow2kit::create::create(&path, &opts, size).unwrap();
            let img = Image::open(&path, &OpenOptions::new()).unwrap();
            // Cluster 1: 100 bytes inside subcluster 3.
            apply(
                &img,
                &mut model,
                &Op::Write(cs + 3 * sc + 10, pattern(0xB1, 100)),
                cs,
                true,
            );
            img.flush().unwrap();
            let (d, bm) = ext_l2_entry(&std::fs::read(&path).unwrap(), 1, cs);
            assert_ne!(d & L2E_OFFSET_MASK, 0, "{name}: no host cluster");
            assert_eq!(bm, 1 << 3, "{name}: bitmap after one partial write");
            // Subclusters 5..=7, unaligned at both ends.
            apply(
                &img,
                &mut model,
                &Op::Write(cs + 5 * sc + 1, pattern(0xB2, 3 * sc - 2)),
                cs,
                true,
            );
            // Zero subcluster 10 (aligned) and part of 12 (unaligned: data write).
            apply(
                &img,
                &mut model,
                &Op::Zeroes(cs + 10 * sc, sc, false),
                cs,
                true,
            );
            apply(
                &img,
                &mut model,
                &Op::Zeroes(cs + 12 * sc + 7, 9, false),
                cs,
                true,
            );
            img.flush().unwrap();
            let (d2, bm) = ext_l2_entry(&std::fs::read(&path).unwrap(), 1, cs);
            assert_eq!(d2, d, "{name}: the host cluster moved");
            // Subcluster 12: zeroes over backing data are written as data;
            // without a backing file it already reads as zero, so (as in
            // QEMU) the whole subcluster gets its zero bit.
            let (alloc, zero) = if backed {
                ((1u64 << 3) | (0b111 << 5) | (1 << 12), 1u64 << (32 + 10))
            } else {
                (
                    (1u64 << 3) | (0b111 << 5),
                    (1u64 << (32 + 10)) | (1 << (32 + 12)),
                )
            };
            assert_eq!(bm, alloc | zero, "{name}: bitmap {bm:#x}");
            // Cluster 3: a write across the cluster boundary into cluster 4.
            apply(
                &img,
                &mut model,
                &Op::Write(4 * cs - sc - 5, pattern(0xB3, sc + 10)),
                cs,
                true,
            );
            img.close().unwrap();
            let file = std::fs::read(&path).unwrap();
            assert_eq!(ext_l2_entry(&file, 3, cs).1, (1 << 31) | (1 << 30));
            assert_eq!(ext_l2_entry(&file, 4, cs).1, 1);
            assert_check_clean(&path, &name);
            assert_bytes_eq(&support::qemu_raw(&path), &model, &name);
            qemu_io(
                &path,
                &[format!(
                    "read -q -P 0xb2 {} {}",
                    cs + 5 * sc + 1,
                    3 * sc - 2
                )],
            );
            let img = Image::open(&path, &OpenOptions::new().read_only(true)).unwrap();
            let mut back = vec![0u8; size as usize];
            img.read_at(&mut back, 0).unwrap();
            assert_bytes_eq(&back, &model, &format!("{name}: qcow2kit read-back"));
        }
    }
}

// ---------------------------------------------------------------------------
// Twins: the same zero writes and discards done by qemu-io and by qcow2kit
// give the same map.
// ---------------------------------------------------------------------------

struct Twin {
    _dir: tempfile::TempDir,
    qemu: PathBuf,
    ours: PathBuf,
    /// How both are opened (QEMU's tools and the library alike).
    key: Key,
}

/// Creates an image with `qemu-img create ARGS` (encrypted when `key`
/// says so) and populates it with `setup` qemu-io commands, then copies it.
fn twin(key: Key, create_args: &[&str], setup: &[String]) -> Twin {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut b = vec![0u8; 4 << 20];
    Rng::new(9).fill(&mut b);
    std::fs::write(&base, &b).unwrap();
    let qemu = dir.path().join("qemu.qcow2");
    let key_args = key.create_args();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(key_args.iter().map(String::as_str));
    args.extend_from_slice(create_args);
    args.push(qemu.to_str().unwrap());
    args.push("4M");
    support::qemu_img_in(dir.path(), &args);
    if !setup.is_empty() {
        qemu_io_key(&qemu, key, setup);
    }
    let ours = dir.path().join("ours.qcow2");
    std::fs::copy(&qemu, &ours).unwrap();
    Twin {
        _dir: dir,
        qemu,
        ours,
        key,
    }
}

fn compare_twins(t: &Twin, what: &str) {
    let a = support::qemu_map_key(&t.qemu, t.key);
    let b = support::qemu_map_key(&t.ours, t.key);
    assert_eq!(
        b, a,
        "{what}: qcow2kit's map (left) differs from QEMU's (right)"
    );
    let full = |p: &Path| support::qemu_map_json(p, t.key);
    assert_eq!(full(&t.ours), full(&t.qemu), "{what}: full maps differ");
    assert_check_clean_key(&t.qemu, t.key, &format!("{what} (qemu)"));
    assert_check_clean_key(&t.ours, t.key, &format!("{what} (ours)"));
    assert_bytes_eq(
        &support::qemu_raw_key(&t.ours, t.key),
        &support::qemu_raw_key(&t.qemu, t.key),
        &format!("{what}: content"),
    );
}

#[derive(Debug, Clone, Copy)]
enum ZOp {
    Zero(u64, u64),
    ZeroUnmap(u64, u64),
    Discard(u64, u64),
    /// `len` bytes of `pattern` at `offset`.
    Write(u64, u64, u8),
}

impl ZOp {
    fn qemu(self) -> String {
        match self {
            ZOp::Zero(o, l) => format!("write -z {o} {l}"),
            ZOp::ZeroUnmap(o, l) => format!("write -z -u {o} {l}"),
            ZOp::Discard(o, l) => format!("discard {o} {l}"),
            ZOp::Write(o, l, p) => format!("write -P {p} {o} {l}"),
        }
    }
    fn ours(self, img: &Image) {
        match self {
            ZOp::Zero(o, l) => img.write_zeroes(o, l, false).unwrap(),
            ZOp::ZeroUnmap(o, l) => img.write_zeroes(o, l, true).unwrap(),
            ZOp::Discard(o, l) => img.discard(o, l).unwrap(),
            ZOp::Write(o, l, p) => img.write_at(&pattern(p, l), o).unwrap(),
        }
    }
}

fn twin_case(create_args: &[&str], setup: &[String], ops: &[ZOp], what: &str) {
    twin_case_key(Key::PLAIN, create_args, setup, ops, what);
}

/// A twin case on images opened through `key`; failures are collected
/// (see [`assert_no_twin_failures`]).
fn twin_case_key(key: Key, create_args: &[&str], setup: &[String], ops: &[ZOp], what: &str) {
    let r = std::panic::catch_unwind(|| twin_case_inner(key, create_args, setup, ops, what));
    if let Err(e) = r {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        FAILURES.with(|f| f.borrow_mut().push(format!("{what}: {msg}")));
    }
}

thread_local! {
    static FAILURES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn assert_no_twin_failures() {
    let f = FAILURES.with(|f| std::mem::take(&mut *f.borrow_mut()));
    assert!(
        f.is_empty(),
        "{} twin cases differ:\n{}",
        f.len(),
        f.join("\n")
    );
}

fn twin_case_inner(key: Key, create_args: &[&str], setup: &[String], ops: &[ZOp], what: &str) {
    let t = twin(key, create_args, setup);
    let cmds: Vec<String> = ops.iter().map(|o| o.qemu()).collect();
    qemu_io_key(&t.qemu, key, &cmds);
    let img = Image::open(&t.ours, &key.open_options()).unwrap();
    for o in ops {
        o.ours(&img);
    }
    img.close().unwrap();
    compare_twins(&t, what);
}

const K64: u64 = 65536;

fn data_setup() -> Vec<String> {
    vec![
        "write -P 0x11 0 1M".into(),
        format!("write -P 0x22 {} {}", 2 << 20, 3 * K64),
    ]
}

/// The zero-write and discard cases of a v3 image (with 64 KiB clusters,
/// over [`data_setup`]).
fn v3_zero_cases() -> Vec<(&'static str, Vec<ZOp>)> {
    use ZOp::*;
    vec![
        (
            "zero on allocated clusters keeps them (ZERO_ALLOC)",
            vec![Zero(K64, 2 * K64)],
        ),
        (
            "zero on unallocated clusters (ZERO_PLAIN)",
            vec![Zero(3 << 20, 2 * K64)],
        ),
        (
            "zero with unmap frees (ZERO_PLAIN)",
            vec![ZeroUnmap(K64, 2 * K64)],
        ),
        ("discard frees (ZERO_PLAIN)", vec![Discard(K64, 2 * K64)]),
        (
            "discard of unallocated clusters",
            vec![Discard(3 << 20, 2 * K64)],
        ),
        (
            "partial-cluster discard is ignored",
            vec![Discard(K64 + 100, K64)],
        ),
        (
            "unaligned zero writes data at the edges",
            vec![Zero(K64 - 1000, 2 * K64 + 2000), Zero((3 << 20) + 5, 100)],
        ),
        (
            "zero then write then discard",
            vec![
                Zero(4 * K64, K64),
                ZeroUnmap(5 * K64, K64),
                Discard(4 * K64, 2 * K64),
            ],
        ),
        (
            "discard up to the end of the disk",
            vec![Discard((2 << 20) + K64, (2 << 20) - K64)],
        ),
    ]
}

/// The zero-write and discard cases of an extended-L2 image (2 KiB
/// subclusters, over [`data_setup`]).
fn ext_l2_zero_cases() -> Vec<(&'static str, Vec<ZOp>)> {
    use ZOp::*;
    vec![
        ("zeroing an unallocated cluster", vec![Zero(3 << 20, K64)]),
        (
            "zeroing one subcluster of an unallocated cluster",
            vec![Zero((3 << 20) + 4 * 2048, 2048)],
        ),
        (
            "zeroing subclusters of an allocated cluster",
            vec![Zero(2048, 3 * 2048)],
        ),
        ("zeroing a whole allocated cluster", vec![Zero(K64, K64)]),
        (
            "zero with unmap of allocated clusters",
            vec![ZeroUnmap(K64, 2 * K64)],
        ),
        ("discard of allocated clusters", vec![Discard(K64, 2 * K64)]),
        ("unaligned zero inside subclusters", vec![Zero(100, 5000)]),
    ]
}

#[test]
fn zero_and_discard_encodings_match_qemu() {
    if !support::have_qemu() {
        return;
    }
    use ZOp::*;
    let setup = data_setup();
    // v3, no backing file (§11.2, §11.3).
    let cases = &v3_zero_cases();
    for (what, ops) in cases {
        twin_case(&[], &setup, ops, &format!("v3: {what}"));
    }
    // v3 over a backing file: discards must not re-expose backing data.
    for (what, ops) in cases {
        twin_case(
            &["-b", "base.raw", "-F", "raw"],
            &setup,
            ops,
            &format!("v3 with backing: {what}"),
        );
    }
    // A fresh image has no L2 table yet: zeroes and discards over a backing
    // file still have to hide the backing data.
    for (args, what) in [
        (
            &["-b", "base.raw", "-F", "raw"][..],
            "v3 with backing, no L2 table",
        ),
        (&[][..], "v3, no L2 table"),
    ] {
        for ops in [
            vec![Discard(K64, 2 * K64)],
            vec![Zero(K64, 2 * K64)],
            vec![ZeroUnmap(0, 4 << 20)],
            vec![Zero(100, 1000)],
        ] {
            twin_case(args, &[], &ops, &format!("{what}: {ops:?}"));
        }
    }
    // v2: no zero flag; discards deallocate.
    for (what, ops) in cases {
        twin_case(&["-o", "compat=0.10"], &setup, ops, &format!("v2: {what}"));
        twin_case(
            &["-o", "compat=0.10", "-b", "base.raw", "-F", "raw"],
            &setup,
            ops,
            &format!("v2 with backing: {what}"),
        );
    }
    // Extended L2: zero bits per subcluster (2 KiB subclusters).
    let ext = &ext_l2_zero_cases();
    for (what, ops) in ext {
        twin_case(
            &["-o", "extended_l2=on"],
            &setup,
            ops,
            &format!("extended L2: {what}"),
        );
        twin_case(
            &["-o", "extended_l2=on", "-b", "base.raw", "-F", "raw"],
            &setup,
            ops,
            &format!("extended L2 with backing: {what}"),
        );
    }
    assert_no_twin_failures();
}

/// After a snapshot-free COW setup: zeroing and discarding compressed clusters.
#[test]
fn zero_and_discard_of_compressed_clusters_match_qemu() {
    if !support::have_qemu() {
        return;
    }
    compressed_twins(Key::PLAIN);
}

/// The same over a LUKS image: QEMU stores compressed clusters of an
/// encrypted image unencrypted (qemu-io `write -c` makes them; qemu-img
/// convert refuses `-c` into one).
#[test]
fn luks_zero_and_discard_of_compressed_clusters_match_qemu() {
    if !support::have_qemu() {
        return;
    }
    compressed_twins(Key::LUKS);
}

fn compressed_twins(key: Key) {
    use ZOp::*;
    let setup = vec![
        "write -c -P 0x11 0 64k".to_string(),
        "write -c -P 0x12 64k 64k".into(),
        "write -c -P 0x13 128k 64k".into(),
        "write -c -P 0x14 192k 64k".into(),
    ];
    for (what, ops) in [
        ("zero", vec![Zero(0, K64)]),
        ("zero with unmap", vec![ZeroUnmap(K64, K64)]),
        ("discard", vec![Discard(2 * K64, 2 * K64)]),
        ("all of them", vec![Discard(0, 4 * K64)]),
    ] {
        twin_case_key(key, &[], &setup, &ops, &format!("compressed: {what}"));
    }
    // A partial write into a compressed cluster (copy-on-write of its
    // decompressed data, encrypted when the image is).
    twin_case_key(
        key,
        &[],
        &setup,
        &[Write(1000, 100, 0x33), Zero(K64 + 512, 1024)],
        "compressed: partial write",
    );
    assert_no_twin_failures();
}

/// The zero-write and discard twins over LUKS images (QEMU's default
/// cipher): v3 with and without a backing file, fresh images, extended
/// L2, and guest writes (partial sectors, across clusters) mixed in; the
/// maps, `qemu-img check` and the content through the key must equal
/// QEMU's.
#[test]
fn luks_zero_and_discard_encodings_match_qemu() {
    if !support::have_qemu() {
        return;
    }
    use ZOp::*;
    let setup = data_setup();
    let luks = Key::LUKS;
    for (what, ops) in &v3_zero_cases() {
        twin_case_key(luks, &[], &setup, ops, &format!("luks v3: {what}"));
        twin_case_key(
            luks,
            &["-b", "base.raw", "-F", "raw"],
            &setup,
            ops,
            &format!("luks v3 with backing: {what}"),
        );
    }
    for ops in [
        vec![Discard(K64, 2 * K64)],
        vec![Zero(K64, 2 * K64)],
        vec![ZeroUnmap(0, 4 << 20)],
        vec![Zero(100, 1000)],
    ] {
        twin_case_key(luks, &[], &[], &ops, &format!("luks, no L2 table: {ops:?}"));
        twin_case_key(
            luks,
            &["-b", "base.raw", "-F", "raw"],
            &[],
            &ops,
            &format!("luks with backing, no L2 table: {ops:?}"),
        );
    }
    for (what, ops) in &ext_l2_zero_cases() {
        twin_case_key(
            luks,
            &["-o", "extended_l2=on"],
            &setup,
            ops,
            &format!("luks extended L2: {what}"),
        );
        twin_case_key(
            luks,
            &["-o", "extended_l2=on", "-b", "base.raw", "-F", "raw"],
            &setup,
            ops,
            &format!("luks extended L2 with backing: {what}"),
        );
    }
    // Guest writes: partial sectors, overwrites, across cluster and L2
    // boundaries, with zeroes and discards between.
    let writes = vec![
        Write(1, 1, 0x71),
        Write(511, 2, 0x72),
        Write(K64 - 300, 700, 0x73),
        Write(3 * K64 + 17, 2 * K64, 0x74),
        Zero(3 * K64 + 100, 300),
        Write((2 << 20) + 5, 4000, 0x75),
        Discard(2 << 20, 3 * K64),
        Write((2 << 20) + K64 + 1000, 513, 0x76),
        Write((4 << 20) - 1, 1, 0x77),
    ];
    for args in [
        &[][..],
        &["-b", "base.raw", "-F", "raw"],
        &["-o", "extended_l2=on"],
        &["-o", "cluster_size=512"],
        &["-o", "cluster_size=2M"],
    ] {
        for setup in [&setup[..], &[]] {
            twin_case_key(
                luks,
                args,
                setup,
                &writes,
                &format!("luks writes {args:?}, setup {}", !setup.is_empty()),
            );
        }
    }
    assert_no_twin_failures();
}

/// Runs `f` on another thread and fails (instead of hanging) if it does not
/// finish within `secs` seconds.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish in {secs} s (deadlock?)"))
}

/// A partial write into a compressed cluster copies the rest of the cluster
/// out of the compressed data (under the metadata lock): it used to deadlock
/// re-taking that lock to learn the compression type.
#[test]
fn partial_write_into_compressed_cluster() {
    if !support::have_qemu() {
        return;
    }
    for ctype in ["zlib", "zstd"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.qcow2");
        support::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compression_type={ctype}"),
            path.to_str().unwrap(),
            "1M",
        ]);
        qemu_io(
            &path,
            &[
                "write -c -P 0x21 0 64k".into(),
                "write -c -P 0x22 64k 64k".into(),
            ],
        );
        let p = path.clone();
        within(60, "a partial write into a compressed cluster", move || {
            let img = Image::open(&p, &OpenOptions::new()).unwrap();
            img.write_at(&[0x33; 100], 1000).unwrap();
            img.write_zeroes(65536 + 512, 1024, false).unwrap();
            img.close().unwrap();
        });
        assert_check_clean(&path, ctype);
        qemu_io(
            &path,
            &[
                "read -q -P 0x21 0 1000".into(),
                "read -q -P 0x33 1000 100".into(),
                "read -q -P 0x21 1100 64436".into(),
                "read -q -P 0x22 65536 512".into(),
                "read -q -P 0 66048 1024".into(),
                "read -q -P 0x22 67072 64000".into(),
            ],
        );
    }
}

/// External data files: qcow2kit and qemu-io do the same writes, zero
/// writes and discards on twin images; the guest content, the map and (with
/// `data_file_raw`) the data file itself must agree, and both check clean.
#[test]
fn external_data_file_twins() {
    if !support::have_qemu() {
        return;
    }
    for raw in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut made = Vec::new();
        for who in ["qemu", "ours"] {
            let img = dir.path().join(format!("{who}.qcow2"));
            let data = format!("{who}.data");
            support::qemu_img_in(
                dir.path(),
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!(
                        "data_file={data},data_file_raw={}",
                        if raw { "on" } else { "off" }
                    ),
                    img.to_str().unwrap(),
                    "4M",
                ],
            );
            qemu_io(
                &img,
                &["write -P 0x11 0 1M".into(), "write -P 0x22 2M 192k".into()],
            );
            made.push((img, dir.path().join(data)));
        }
        let ops = [
            ("write -P 0x33 100 5000", None),
            ("write -z 65536 131072", Some((65536u64, 131072u64, false))),
            ("write -z -u 524288 65536", Some((524288, 65536, true))),
            ("write -z 1000000 100", Some((1_000_000, 100, false))),
        ];
        let cmds: Vec<String> = ops
            .iter()
            .map(|o| o.0.to_string())
            .chain(["discard 2162688 65536".to_string()])
            .collect();
        qemu_io(&made[0].0, &cmds);
        let img = Image::open(&made[1].0, &OpenOptions::new()).unwrap();
        img.write_at(&[0x33; 5000], 100).unwrap();
        for (_, z) in &ops {
            if let Some((o, l, u)) = z {
                img.write_zeroes(*o, *l, *u).unwrap();
            }
        }
        img.discard(2162688, 65536).unwrap();
        img.close().unwrap();
        let what = format!("data_file_raw={raw}");
        assert_check_clean(&made[0].0, &format!("{what} (qemu)"));
        assert_check_clean(&made[1].0, &format!("{what} (ours)"));
        let guest = support::qemu_raw(&made[0].0);
        assert_bytes_eq(
            &support::qemu_raw(&made[1].0),
            &guest,
            &format!("{what}: content"),
        );
        assert_eq!(
            support::qemu_map(&made[1].0),
            support::qemu_map(&made[0].0),
            "{what}: qcow2kit's map (left) differs from QEMU's (right)"
        );
        if raw {
            // The data file is a valid raw image of the guest content.
            let mut ours = std::fs::read(&made[1].1).unwrap();
            ours.resize(guest.len(), 0);
            assert_bytes_eq(&ours, &guest, &format!("{what}: our raw data file"));
        }
    }
}

/// `discard-no-unref`: QEMU keeps the host clusters (ZERO_ALLOC) and passes
/// the discard down to where the data lives; with an external data file
/// that is the data file, never the qcow2 file at the same offset.
#[test]
fn discard_no_unref_matches_qemu() {
    if !support::have_qemu() {
        return;
    }
    for data_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut imgs = Vec::new();
        for who in ["qemu", "ours"] {
            let img = dir.path().join(format!("{who}.qcow2"));
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            let o = format!("data_file={who}.data");
            if data_file {
                args.extend(["-o", &o]);
            }
            args.extend([img.to_str().unwrap(), "4M"]);
            support::qemu_img_in(dir.path(), &args);
            qemu_io(&img, &["write -P 0x11 0 1M".into()]);
            imgs.push(img);
        }
        let out = std::process::Command::new("qemu-io")
            .current_dir(dir.path())
            .arg("--image-opts")
            .arg(format!(
                "driver=qcow2,discard-no-unref=on,discard=unmap,file.filename={}",
                imgs[0].display()
            ))
            .args(["-c", "discard 0 192k", "-c", "write -z -u 256k 64k"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let opts = OpenOptions::new()
            .discard_no_unref(true)
            .pass_discard_request(true);
        let img = Image::open(&imgs[1], &opts).unwrap();
        img.discard(0, 192 * 1024).unwrap();
        img.write_zeroes(256 * 1024, 65536, true).unwrap();
        img.close().unwrap();
        let what = format!("discard-no-unref, data file {data_file}");
        assert_check_clean(&imgs[1], &what);
        assert_eq!(
            support::qemu_map(&imgs[1]),
            support::qemu_map(&imgs[0]),
            "{what}: qcow2kit's map (left) differs from QEMU's (right)"
        );
        assert_bytes_eq(
            &support::qemu_raw(&imgs[1]),
            &support::qemu_raw(&imgs[0]),
            &what,
        );
    }
}

/// Writes over an internal snapshot made by QEMU: shared L2 tables and data
/// clusters (COPIED clear) are copied on write, references dropped, and the
/// snapshot keeps its content.
#[test]
fn writes_over_an_internal_snapshot() {
    if !support::have_qemu() {
        return;
    }
    for (cs, ext) in [(65536u64, false), (4096, false), (65536, true)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.qcow2");
        let o = format!(
            "cluster_size={cs},extended_l2={}",
            if ext { "on" } else { "off" }
        );
        support::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            path.to_str().unwrap(),
            "8M",
        ]);
        qemu_io(
            &path,
            &[
                "write -P 0x11 0 3M".into(),
                "write -c -P 0x12 4M 64k".into(),
                "write -z 5M 64k".into(),
            ],
        );
        support::qemu_img(&["snapshot", "-c", "s1", path.to_str().unwrap()]);
        let snap_before = support::qemu_raw(&path);
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let mut model = snap_before.clone();
        let mut rng = Rng::new(cs);
        let mut d = vec![0u8; 5000];
        rng.fill(&mut d);
        let ops = [
            Op::Write(1000, d.clone()),
            Op::Write(cs * 3 + 7, d.clone()),
            Op::Write((4 << 20) + 100, d.clone()),
            Op::Zeroes(cs * 8, cs * 2, false),
            Op::Zeroes(cs * 12, cs * 2, true),
            Op::Discard(cs * 20, cs * 3),
            Op::Discard(4 << 20, 65536),
            Op::Write((5 << 20) + 10, d),
        ];
        for op in &ops {
            apply(&img, &mut model, op, cs, true);
        }
        img.close().unwrap();
        let what = format!("snapshot, cluster size {cs}, extended L2 {ext}");
        assert_check_clean(&path, &what);
        assert_bytes_eq(&support::qemu_raw(&path), &model, &what);
        // The snapshot is untouched.
        let snap = dir.path().join("s1.raw");
        support::qemu_img(&[
            "convert",
            "-l",
            "snapshot.name=s1",
            "-O",
            "raw",
            path.to_str().unwrap(),
            snap.to_str().unwrap(),
        ]);
        assert_bytes_eq(
            &std::fs::read(&snap).unwrap(),
            &snap_before,
            &format!("{what}: s1"),
        );
    }
}

/// Like `qemu-img create`, `create` rounds the size up to whole sectors
/// (QEMU ignores a partial last sector of a qcow2 image's size).
#[test]
fn create_rounds_the_size_up_to_sectors() {
    let mem = support::mem_create(&CreateOptions::new(), 1000);
    let img = support::mem_open(&mem, &OpenOptions::new()).unwrap();
    assert_eq!(img.size(), 1024);
    img.write_at(&[5u8; 24], 1000).unwrap();
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    support::qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1000"]);
    let info = support::qemu_img(&["info", "--output=json", q.to_str().unwrap()]);
    assert!(info.contains("\"virtual-size\": 1024"), "{info}");
}

/// Images created by qcow2kit with an external data file (with and without
/// data_file_raw), zstd as compression type, lazy refcounts: QEMU opens
/// them, checks them clean and reads what we wrote.
#[test]
fn qcow2kit_created_feature_images_check_clean() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, CreateOptions)> = vec![
        ("df", CreateOptions::new().data_file("df.data")),
        (
            "dfraw",
            CreateOptions::new()
                .data_file("dfraw.data")
                .data_file_raw(true),
        ),
        (
            "zstd",
            CreateOptions::new().compression_type(qcow2kit::options::CompressionType::Zstd),
        ),
        ("lazy", CreateOptions::new().lazy_refcounts(true)),
        (
            "extl2-zstd-rc1",
            CreateOptions::new()
                .extended_l2(true)
                .refcount_bits(1)
                .compression_type(qcow2kit::options::CompressionType::Zstd),
        ),
    ];
    for (name, opts) in cases {
        let path = dir.path().join(format!("{name}.qcow2"));
        let size = 4u64 << 20;
        qcow2kit::create::create(&path, &opts, size).unwrap();
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(5);
        let mut d = vec![0u8; 200_000];
        rng.fill(&mut d);
        for op in [
            Op::Write(12345, d.clone()),
            Op::Write(3 << 20, d[..70_000].to_vec()),
            Op::Zeroes(65536, 65536, false),
            Op::Zeroes(131072, 4096, true),
            Op::Discard(3 << 20, 65536),
        ] {
            apply(&img, &mut model, &op, 65536, true);
        }
        img.close().unwrap();
        assert_check_clean(&path, name);
        assert_bytes_eq(&support::qemu_raw(&path), &model, name);
        if name == "dfraw" {
            let mut raw = std::fs::read(dir.path().join("dfraw.data")).unwrap();
            raw.resize(model.len(), 0);
            assert_bytes_eq(&raw, &model, "dfraw: raw data file");
        }
    }
}
