//! The write path against QEMU: images written by qcow2kit pass
//! `qemu-img check` and read back in QEMU; images written by QEMU stay
//! consistent after qcow2kit modifies them; zero writes and discards give
//! the same L2 encodings as QEMU (compared through `qemu-img map`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod support;

use support::{assert_bytes_eq, assert_check_clean, qemu_io, Rng};
use qcow2kit::options::Compat;
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::path::{Path, PathBuf};

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
    let dir = tempfile::tempdir().unwrap();
    let mut combos = Vec::new();
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for rb in [1u32, 2, 4, 8, 16, 32, 64] {
            combos.push((cs, rb, Compat::V3));
        }
        combos.push((cs, 16, Compat::V2));
    }
    for (cs, rb, compat) in combos {
        let name = format!("cs{cs}-rb{rb}-{compat:?}");
        let path = dir.path().join(format!("{name}.qcow2"));
        let size = 32u64 << 20;
        let opts = CreateOptions::new()
            .cluster_size(cs)
            .refcount_bits(rb)
            .compat(compat);
        qcow2kit::create::create(&path, &opts, size).unwrap();
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
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
        assert_check_clean(&path, &name);
        qemu_io(&path, &verify_cmds(&model, 64));
        assert_bytes_eq(&support::qemu_raw(&path), &model, &name);
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
        let before_check = support::qemu_check(&path);
        assert!(
            before_check.is_clean(),
            "{name} is not clean before: {before_check:?}"
        );
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        let size = img.size();
        let cs = img.cluster_size();
        let v3 = img.header().version == 3;
        let backed = img.header().backing_file.is_some();
        if size > 1 << 30 {
            drop(img);
            modify_big(&path);
            continue;
        }
        let mut model = support::qemu_raw(&path);
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
        assert_check_clean(&path, &format!("{name} after qcow2kit's writes"));
        qemu_io(&path, &[format!("read -q -P 0xa5 {p_off} 1000")]);
        assert_bytes_eq(&support::qemu_raw(&path), &model, name);
    }
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
