//! Model-based test of internal snapshots: random interleavings of writes,
//! zero writes, discards, reopens and snapshot create/apply/delete on
//! random geometries, checked against a model (current content and each
//! snapshot's content) after every operation, every snapshot read through
//! a read-only snapshot view at the end, and `qemu-img check` clean.
//!
//! 12 cases by default; `PROPTEST_CASES=N` runs N, capped at 24 (each case
//! runs up to 40 operations with full-disk reads).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use proptest::prelude::*;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;
use support::{assert_bytes_eq, Rng};

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { at: u64, len: u64 },
    Zeroes { at: u64, len: u64, unmap: bool },
    Discard { at: u64, len: u64 },
    Create,
    Apply(usize),
    Delete(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let span = (0u64..1 << 20, 1u64..200_000);
    prop_oneof![
        4 => span.clone().prop_map(|(at, len)| Op::Write { at, len }),
        1 => (span.clone(), any::<bool>())
            .prop_map(|((at, len), unmap)| Op::Zeroes { at, len, unmap }),
        1 => span.prop_map(|(at, len)| Op::Discard { at, len }),
        2 => Just(Op::Create),
        2 => (0usize..8).prop_map(Op::Apply),
        1 => (0usize..8).prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
        .min(24)
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

fn run(geom: (u32, u32, bool, bool), small_cache: bool, ops: &[Op]) {
    let (cluster_bits, refcount_bits, ext, v3) = geom;
    let size = 1u64 << 20;
    let cs = 1u64 << cluster_bits;
    let mut copts = CreateOptions::new()
        .cluster_size(cs)
        .refcount_bits(refcount_bits)
        .extended_l2(ext);
    if !v3 {
        copts = copts.compat(qcow2kit::options::Compat::V2);
    }
    let mem = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(mem.clone(), &copts, size).unwrap();
    let mut oopts = OpenOptions::new();
    if small_cache {
        oopts = oopts.l2_cache_size(2 * cs).refcount_cache_size(cs);
    }
    let open = |o: &OpenOptions| Image::open_storage(mem.clone() as Arc<dyn Storage>, o).unwrap();
    let mut img = open(&oopts);
    let mut model = vec![0u8; size as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut rng = Rng::new(u64::from(cluster_bits) << 8 | u64::from(refcount_bits));
    let mut next = 0;
    for (i, &op) in ops.iter().enumerate() {
        match op {
            Op::Write { at, len } => {
                let len = len.min(size - at);
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                img.write_at(&d, at).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&d);
            }
            Op::Zeroes { at, len, unmap } => {
                let len = len.min(size - at);
                img.write_zeroes(at, len, unmap).unwrap();
                model[at as usize..(at + len) as usize].fill(0);
            }
            Op::Discard { at, len } => {
                let len = len.min(size - at);
                img.discard(at, len).unwrap();
                let a = at.div_ceil(cs) * cs;
                let b = (at + len) / cs * cs;
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
            Op::Create => {
                let name = format!("s{next}");
                next += 1;
                img.snapshot_create(&name).unwrap();
                snaps.push((name, model.clone()));
            }
            Op::Apply(k) if !snaps.is_empty() => {
                let (name, content) = &snaps[k % snaps.len()];
                img.snapshot_apply(name).unwrap();
                model = content.clone();
            }
            Op::Delete(k) if !snaps.is_empty() => {
                let (name, _) = snaps.remove(k % snaps.len());
                img.snapshot_delete(&name).unwrap();
            }
            Op::Apply(_) | Op::Delete(_) => {}
            Op::Reopen => {
                img.close().unwrap();
                img = open(&oopts);
            }
        }
        assert_bytes_eq(&read_all(&img), &model, &format!("after op {i} {op:?}"));
        let names: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
        let want: Vec<String> = snaps.iter().map(|s| s.0.clone()).collect();
        assert_eq!(names, want, "snapshot list after op {i}");
    }
    img.close().unwrap();
    for (name, content) in &snaps {
        let v = Image::open_storage(
            mem.clone() as Arc<dyn Storage>,
            &OpenOptions::new()
                .read_only(true)
                .load_snapshot(name.as_str()),
        )
        .unwrap();
        assert_bytes_eq(
            &read_all(&v),
            content,
            &format!("snapshot {name} at the end"),
        );
    }
    if support::have_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "m.qcow2", &mem.to_vec());
        support::assert_check_clean(&path, "after the sequence");
        assert_bytes_eq(&support::qemu_raw(&path), &model, "QEMU's read");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 100,
        ..ProptestConfig::default()
    })]

    #[test]
    fn snapshots_follow_the_model(
        geom in prop_oneof![
            Just((9u32, 16u32, false, true)),
            Just((12, 4, false, true)),
            Just((12, 16, false, false)),
            Just((12, 64, false, true)),
            Just((14, 8, true, true)),
            Just((16, 16, false, true)),
        ],
        small_cache in any::<bool>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(geom, small_cache, &ops);
    }
}
