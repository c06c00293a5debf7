//! Model-based test of persistent dirty bitmaps: random writes, zero
//! writes and discards, bitmap management (add with granularities from
//! 512 B to 64 MiB, remove, enable, disable, clear, merge), resizes and
//! reopens, against a model of granule sets. After every operation the
//! handle's bitmaps (list and dirty extents) equal the model; at every
//! reopen and at the end the bitmaps decoded from the image bytes equal it
//! (flags, granularity, dirty granules), the checker finds nothing, and at
//! the end `qemu-img check` is clean.
//!
//! 24 cases by default; `PROPTEST_CASES=N` runs N.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use proptest::prelude::*;
use qcow2kit::error::BitmapError;
use qcow2kit::format::bitmap::BME_FLAG_AUTO;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Error, Image, OpenOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use support::bitmaps::stored_bitmaps;
use support::Rng;

const NAMES: [&str; 4] = ["b0", "b1", "b2", "b3"];

#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, len: u64 },
    Zeroes { at: u64, len: u64, unmap: bool },
    Discard { at: u64, len: u64 },
    Add { name: usize, gbits: u8 },
    Remove { name: usize },
    Enable { name: usize },
    Disable { name: usize },
    Clear { name: usize },
    Merge { dst: usize, src: usize },
    Resize { sectors: u64 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let name = 0usize..NAMES.len();
    prop_oneof![
        6 => (any::<u64>(), 1u64..300_000).prop_map(|(at, len)| Op::Write { at, len }),
        2 => (any::<u64>(), 1u64..3_000_000, any::<bool>())
            .prop_map(|(at, len, unmap)| Op::Zeroes { at, len, unmap }),
        2 => (any::<u64>(), 1u64..3_000_000).prop_map(|(at, len)| Op::Discard { at, len }),
        3 => (name.clone(), 9u8..=26).prop_map(|(name, gbits)| Op::Add { name, gbits }),
        1 => name.clone().prop_map(|name| Op::Remove { name }),
        1 => name.clone().prop_map(|name| Op::Enable { name }),
        1 => name.clone().prop_map(|name| Op::Disable { name }),
        1 => name.clone().prop_map(|name| Op::Clear { name }),
        1 => (name.clone(), name).prop_map(|(dst, src)| Op::Merge { dst, src }),
        1 => (1u64..40_000).prop_map(|sectors| Op::Resize { sectors }),
        1 => Just(Op::Reopen),
    ]
}

/// One bitmap of the model.
#[derive(Debug, Clone)]
struct Bm {
    gbits: u8,
    enabled: bool,
    dirty: BTreeSet<u64>,
}

/// The granules of `1 << g` bytes `[at, at + len)` touches.
fn touched(g: u8, at: u64, len: u64) -> impl Iterator<Item = u64> {
    (at >> g)..=((at + len - 1) >> g)
}

/// The dirty runs of `set` on a disk of `size` bytes (the last granule
/// clipped to the disk).
fn runs(g: u8, set: &BTreeSet<u64>, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in set {
        let (o, e) = (b << g, ((b + 1) << g).min(size));
        match out.last_mut() {
            Some((s, l)) if *s + *l == o => *l = e - *s,
            _ => out.push((o, e - o)),
        }
    }
    out
}

fn not_found(name: &str) -> Error {
    Error::Bitmap(BitmapError::NotFound {
        name: name.to_owned(),
    })
}

/// The image's bitmaps equal the model: through the handle.
#[track_caller]
fn assert_handle(img: &Image, model: &BTreeMap<String, Bm>, size: u64, what: &str) {
    let listed: BTreeMap<String, (u64, bool)> = img
        .bitmaps()
        .unwrap()
        .into_iter()
        .map(|b| {
            assert!(!b.inconsistent, "{what}: {b:?}");
            (b.name, (b.granularity, b.enabled))
        })
        .collect();
    let want: BTreeMap<String, (u64, bool)> = model
        .iter()
        .map(|(n, b)| (n.clone(), (1u64 << b.gbits, b.enabled)))
        .collect();
    assert_eq!(listed, want, "{what}: bitmaps listed");
    for (n, b) in model {
        assert_eq!(
            img.dirty_extents(n, 0, size).unwrap(),
            runs(b.gbits, &b.dirty, size),
            "{what}: bitmap {n}"
        );
    }
}

/// The bitmaps stored in `bytes` equal the model.
#[track_caller]
fn assert_stored(bytes: &[u8], model: &BTreeMap<String, Bm>, what: &str) {
    let stored: BTreeMap<String, (u32, u8, BTreeSet<u64>)> = stored_bitmaps(bytes)
        .unwrap_or_default()
        .into_iter()
        .map(|b| {
            (
                b.name,
                (b.flags, b.granularity_bits, b.dirty.expect("consistent")),
            )
        })
        .collect();
    let want: BTreeMap<String, (u32, u8, BTreeSet<u64>)> = model
        .iter()
        .map(|(n, b)| {
            let flags = if b.enabled { BME_FLAG_AUTO } else { 0 };
            (n.clone(), (flags, b.gbits, b.dirty.clone()))
        })
        .collect();
    assert_eq!(stored, want, "{what}: stored bitmaps");
}

#[track_caller]
fn assert_checker_clean(mem: &Arc<MemStorage>, what: &str) {
    let r = qcow2kit::check::check_storage(
        mem.clone() as Arc<dyn Storage>,
        qcow2kit::check::Repair::None,
        Default::default(),
    )
    .unwrap();
    assert_eq!(
        (r.counts.corruptions, r.counts.leaks),
        (0, 0),
        "{what}: check finds {r:?}"
    );
}

fn run_case(cluster_bits: u32, sectors: u64, ops: &[Op]) {
    let mut size = sectors * 512;
    let opts = CreateOptions::new().cluster_size(1 << cluster_bits);
    let mem = support::mem_create(&opts, size);
    let mut img = support::mem_open(&mem, &OpenOptions::new()).unwrap();
    let mut model: BTreeMap<String, Bm> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        let what = format!("op {i} {op:?} (size {size})");
        let place = |at: u64, len: u64| {
            let at = at % size;
            (at, len.min(size - at))
        };
        let record = |model: &mut BTreeMap<String, Bm>, at: u64, len: u64| {
            for b in model.values_mut().filter(|b| b.enabled) {
                b.dirty.extend(touched(b.gbits, at, len));
            }
        };
        match *op {
            Op::Write { at, len } => {
                let (at, len) = place(at, len);
                let mut d = vec![0u8; len as usize];
                Rng::new(at ^ len).fill(&mut d);
                img.write_at(&d, at).unwrap();
                record(&mut model, at, len);
            }
            Op::Zeroes { at, len, unmap } => {
                let (at, len) = place(at, len);
                img.write_zeroes(at, len, unmap).unwrap();
                record(&mut model, at, len);
            }
            Op::Discard { at, len } => {
                let (at, len) = place(at, len);
                img.discard(at, len).unwrap();
                record(&mut model, at, len);
            }
            Op::Add { name, gbits } => {
                let n = NAMES[name];
                let r = img.add_bitmap(n, Some(1 << gbits));
                if model.contains_key(n) {
                    assert!(
                        matches!(r, Err(Error::Bitmap(BitmapError::Exists { .. }))),
                        "{what}: {r:?}"
                    );
                } else {
                    r.unwrap();
                    let b = Bm {
                        gbits,
                        enabled: true,
                        dirty: BTreeSet::new(),
                    };
                    model.insert(n.to_owned(), b);
                }
            }
            Op::Remove { name } => {
                let n = NAMES[name];
                match model.remove(n) {
                    Some(_) => img.remove_bitmap(n).unwrap(),
                    None => assert_eq!(
                        img.remove_bitmap(n).unwrap_err().to_string(),
                        not_found(n).to_string()
                    ),
                }
            }
            Op::Enable { name } | Op::Disable { name } | Op::Clear { name } => {
                let n = NAMES[name];
                let r = match op {
                    Op::Enable { .. } => img.enable_bitmap(n),
                    Op::Disable { .. } => img.disable_bitmap(n),
                    _ => img.clear_bitmap(n),
                };
                match model.get_mut(n) {
                    None => assert_eq!(r.unwrap_err().to_string(), not_found(n).to_string()),
                    Some(b) => {
                        r.unwrap();
                        match op {
                            Op::Enable { .. } => b.enabled = true,
                            Op::Disable { .. } => b.enabled = false,
                            _ => b.dirty.clear(),
                        }
                    }
                }
            }
            Op::Merge { dst, src } => {
                let (d, s) = (NAMES[dst], NAMES[src]);
                let r = img.merge_bitmap(d, s);
                let missing = [d, s].into_iter().find(|n| !model.contains_key(*n));
                match missing {
                    Some(n) => assert_eq!(r.unwrap_err().to_string(), not_found(n).to_string()),
                    None => {
                        r.unwrap();
                        let src = model[s].clone();
                        let dst = model.get_mut(d).unwrap();
                        for b in src.dirty {
                            let o = b << src.gbits;
                            let e = ((b + 1) << src.gbits).min(size);
                            dst.dirty.extend(touched(dst.gbits, o, e - o));
                        }
                    }
                }
            }
            Op::Resize { sectors } => {
                let new = sectors * 512;
                img.resize_with(new, qcow2kit::options::Preallocation::Off, true)
                    .unwrap();
                for b in model.values_mut() {
                    let bits = new.div_ceil(1 << b.gbits);
                    b.dirty.retain(|&x| x < bits);
                }
                size = new;
            }
            Op::Reopen => {
                img.close().unwrap();
                assert_stored(&mem.to_vec(), &model, &what);
                assert_checker_clean(&mem, &what);
                img = support::mem_open(&mem, &OpenOptions::new()).unwrap();
            }
        }
        assert_handle(&img, &model, size, &what);
    }
    img.close().unwrap();
    let bytes = mem.to_vec();
    assert_stored(&bytes, &model, "at the end");
    assert_checker_clean(&mem, "at the end");
    // Reopened, the handle sees the stored bitmaps.
    let img = support::mem_open(&mem, &OpenOptions::new().read_only(true)).unwrap();
    assert_handle(&img, &model, size, "reopened read-only");
    drop(img);
    if support::have_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "bm.qcow2", &bytes);
        support::assert_check_clean(&path, &format!("{ops:?}"));
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
    fn random_bitmap_operations_match_the_model(
        cluster_bits in prop::sample::select(vec![9u32, 12, 16]),
        sectors in 2048u64..32_768,
        ops in prop::collection::vec(op(), 1..=40),
    ) {
        run_case(cluster_bits, sectors, &ops);
    }
}
