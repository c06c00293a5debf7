//! Model-based test: random sequences of writes, zero writes, discards,
//! flushes and reopens on random geometries, checked against a `Vec<u8>`
//! after every operation; at the end `qemu-img check` is clean and QEMU
//! reads the same bytes.
//!
//! 24 cases by default; `PROPTEST_CASES=N` runs N.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use proptest::prelude::*;
use qcow2kit::options::Compat;
use qcow2kit::storage::MemStorage;
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;
use support::{assert_bytes_eq, Rng};

#[derive(Debug, Clone)]
struct Config {
    cluster_bits: u32,
    refcount_bits: u32,
    v3: bool,
    extended_l2: bool,
    backing: bool,
    /// Virtual size in 512-byte sectors.
    sectors: u64,
    /// Small L2/refcount caches, so that eviction paths run.
    small_cache: bool,
    /// `l2-cache-entry-size` (L2 slices smaller than a cluster).
    l2_entry: Option<u64>,
    /// Open options: discard-no-unref (v3 only), pass-discard-request,
    /// pass-discard-other.
    no_unref: bool,
    pass_request: bool,
    pass_other: bool,
    /// `lazy-refcounts=on` (v3 only).
    lazy: bool,
}

#[derive(Debug, Clone, Copy)]
enum OpKind {
    Write,
    Zeroes { unmap: bool },
    Discard,
    Flush,
    Reopen,
    Resize,
}

/// An operation with abstract position/length, made concrete for the
/// geometry by `place`.
#[derive(Debug, Clone, Copy)]
struct Op {
    kind: OpKind,
    cluster: u64,
    /// 0: aligned start, 1: random, 2: just before a cluster end.
    start_mode: u8,
    start_rand: u64,
    /// Length in clusters and extra bytes.
    len_clusters: u64,
    len_extra: u64,
    seed: u64,
}

fn config() -> impl Strategy<Value = Config> {
    (
        prop::sample::select(vec![9u32, 12, 14, 16, 21]),
        0u32..7,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        512u64..4096,
        any::<bool>(),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec![0u64, 0, 512, 1024, 4096]),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(cb, ro, v3, ext, backing, sectors, small_cache, o)| Config {
                cluster_bits: cb,
                refcount_bits: if v3 { 1 << ro } else { 16 },
                v3,
                extended_l2: v3 && ext && cb >= 14,
                backing,
                sectors,
                small_cache,
                l2_entry: (o.3 != 0 && o.3 <= 1 << cb).then_some(o.3),
                no_unref: v3 && o.0,
                pass_request: o.1,
                pass_other: o.2,
                lazy: v3 && o.4,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    (
        prop_oneof![
            6 => Just(OpKind::Write),
            2 => Just(OpKind::Zeroes { unmap: false }),
            2 => Just(OpKind::Zeroes { unmap: true }),
            2 => Just(OpKind::Discard),
            1 => Just(OpKind::Flush),
            1 => Just(OpKind::Reopen),
            1 => Just(OpKind::Resize),
        ],
        any::<u64>(),
        0u8..3,
        any::<u64>(),
        0u64..4,
        0u64..5000,
        any::<u64>(),
    )
        .prop_map(
            |(kind, cluster, start_mode, start_rand, len_clusters, len_extra, seed)| Op {
                kind,
                cluster,
                start_mode,
                start_rand,
                len_clusters,
                len_extra,
                seed,
            },
        )
}

/// Concrete (offset, length) of `op` on a disk of `size` bytes.
fn place(op: &Op, size: u64, cs: u64) -> (u64, u64) {
    let clusters = size.div_ceil(cs);
    let c = op.cluster % clusters;
    let start = match op.start_mode {
        0 => c * cs,
        1 => c * cs + op.start_rand % cs,
        _ => c * cs + cs - 1 - op.start_rand % 700.min(cs - 1),
    }
    .min(size - 1);
    let len = (op.len_clusters * cs + op.len_extra).clamp(1, size - start);
    (start, len)
}

fn open(mem: &Arc<MemStorage>, cfg: &Config) -> Image {
    let mut o = OpenOptions::new()
        .discard_no_unref(cfg.no_unref)
        .pass_discard_request(cfg.pass_request)
        .pass_discard_other(cfg.pass_other);
    if cfg.lazy {
        o = o.lazy_refcounts(true);
    }
    if let Some(e) = cfg.l2_entry {
        o = o.l2_cache_entry_size(e);
    }
    if cfg.small_cache {
        let cs = 1u64 << cfg.cluster_bits;
        o = o.l2_cache_size(2 * cs).refcount_cache_size(2 * cs);
    }
    support::mem_open(mem, &o).unwrap()
}

fn run_case(cfg: &Config, ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let cs = 1u64 << cfg.cluster_bits;
    let mut size = cfg.sectors * 512;
    let mut model = vec![0u8; size as usize];
    let mut opts = CreateOptions::new()
        .cluster_size(cs)
        .refcount_bits(cfg.refcount_bits)
        .compat(if cfg.v3 { Compat::V3 } else { Compat::V2 })
        .extended_l2(cfg.extended_l2);
    if cfg.backing {
        // A backing file a bit shorter than the disk: raw, or (for odd
        // sizes) qcow2 with 4 KiB clusters, partly written, format probed.
        let blen = size - size / 8;
        let mut b = vec![0u8; blen as usize];
        Rng::new(cfg.sectors).fill(&mut b);
        if cfg.sectors.is_multiple_of(2) {
            let path = support::write_file(dir.path(), "backing.raw", &b);
            opts = opts.backing_file(path.to_str().unwrap()).backing_fmt("raw");
        } else {
            let path = dir.path().join("backing.qcow2");
            qcow2kit::create::create(&path, &CreateOptions::new().cluster_size(4096), blen)
                .unwrap();
            let bimg = Image::open(&path, &OpenOptions::new()).unwrap();
            // Leave every third 64 KiB unallocated (reads as zeroes).
            for (i, chunk) in b.chunks_mut(65536).enumerate() {
                if i % 3 == 2 {
                    chunk.fill(0);
                } else {
                    bimg.write_at(chunk, i as u64 * 65536).unwrap();
                }
            }
            bimg.close().unwrap();
            opts = opts.backing_file(path.to_str().unwrap());
        }
        model[..b.len()].copy_from_slice(&b);
    }
    let mem = support::mem_create(&opts, size);
    let mut img = open(&mem, cfg);
    let mut back = vec![0u8; size as usize];
    for (i, op) in ops.iter().enumerate() {
        let (off, len) = place(op, size, cs);
        let r = off as usize..(off + len) as usize;
        match op.kind {
            OpKind::Write => {
                let mut d = vec![0u8; len as usize];
                Rng::new(op.seed).fill(&mut d);
                img.write_at(&d, off).unwrap();
                model[r].copy_from_slice(&d);
            }
            OpKind::Zeroes { unmap } => {
                img.write_zeroes(off, len, unmap).unwrap();
                model[r].fill(0);
            }
            OpKind::Discard => {
                img.discard(off, len).unwrap();
                // Whole clusters only (and a partial last cluster of the
                // disk); v2 with a backing file ignores discards.
                if cfg.v3 || !cfg.backing {
                    let a = off.div_ceil(cs) * cs;
                    let mut b = (off + len) / cs * cs;
                    if off + len == size && a <= size / cs * cs {
                        b = size;
                    }
                    if a < b {
                        model[a as usize..b as usize].fill(0);
                    }
                }
            }
            OpKind::Flush => img.flush().unwrap(),
            OpKind::Reopen => {
                img.close().unwrap();
                img = open(&mem, cfg);
            }
            OpKind::Resize => {
                // Grow by 512 B .. 2 MiB; the new part reads as zeroes (the
                // backing file, if any, is shorter than the original size).
                size += 512 * (1 + op.len_extra % 4096);
                img.resize(size).unwrap();
                model.resize(size as usize, 0);
                back.resize(size as usize, 0);
                assert_eq!(img.size(), size);
            }
        }
        img.read_at(&mut back, 0).unwrap();
        assert_bytes_eq(
            &back,
            &model,
            &format!("after op {i} {op:?} at {off}+{len}"),
        );
    }
    img.close().unwrap();
    if support::have_qemu() {
        let path = support::write_file(dir.path(), "image.qcow2", &mem.to_vec());
        support::assert_check_clean(&path, &format!("{cfg:?}"));
        assert_bytes_eq(&support::qemu_raw(&path), &model, "qemu-img convert");
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_match_the_model(cfg in config(), ops in prop::collection::vec(op(), 1..=40)) {
        run_case(&cfg, &ops);
    }
}
