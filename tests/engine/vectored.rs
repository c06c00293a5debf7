//! Vectored guest I/O: `read_vectored_at`/`write_vectored_at` with random
//! buffer splits give the same bytes and the same image as `read_at`/
//! `write_at` on a twin image (allocated, unallocated, zero and backing
//! clusters mixed), and a failed vectored write reports its error and leaves
//! the image consistent.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;
use crate::support::testing::{Fault, FaultKind, FaultOp, FaultyStorage};
use proptest::prelude::*;
use qcow2kit::check::{check_storage, CheckOptions, Repair};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use support::Rng;

/// Lengths summing to `total`, cut at points drawn from `seed` (empty
/// pieces included).
fn splits(total: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut cuts: Vec<usize> = (0..(seed % 6))
        .map(|_| rng.below(total as u64 + 1) as usize)
        .collect();
    cuts.push(0);
    cuts.push(total);
    cuts.sort_unstable();
    cuts.windows(2).map(|w| w[1] - w[0]).collect()
}

fn read_split(img: &Image, off: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0xa5u8; len];
    {
        let mut rest: &mut [u8] = &mut out;
        let mut bufs = Vec::new();
        for n in splits(len, seed) {
            let (a, b) = rest.split_at_mut(n);
            bufs.push(IoSliceMut::new(a));
            rest = b;
        }
        img.read_vectored_at(&mut bufs, off).unwrap();
    }
    out
}

fn write_split(img: &Image, data: &[u8], off: u64, seed: u64) -> qcow2kit::Result<()> {
    let mut bufs = Vec::new();
    let mut at = 0;
    for n in splits(data.len(), seed) {
        bufs.push(IoSlice::new(&data[at..at + n]));
        at += n;
    }
    img.write_vectored_at(&bufs, off)
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u64 },
    Zero { off: u64, len: u64 },
    Read { off: u64, len: usize, seed: u64 },
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..size, 1usize..200_000, any::<u64>()).prop_map(move |(off, len, seed)| Op::Write {
            off,
            len: len.min((size - off) as usize).max(1),
            seed
        }),
        1 => (0..size / 4096, 1u64..64).prop_map(move |(c, n)| Op::Zero {
            off: c * 4096,
            len: (n * 4096).min(size - c * 4096)
        }),
        2 => (0..size, 1usize..300_000, any::<u64>()).prop_map(move |(off, len, seed)| Op::Read {
            off,
            len: len.min((size - off) as usize).max(1),
            seed
        }),
    ]
}

const SIZE: u64 = 4 << 20;

fn twins(
    cluster_bits: u32,
    extended_l2: bool,
    backing: Option<&std::path::Path>,
) -> (Image, Image) {
    let mut opts = CreateOptions::new()
        .cluster_size(1 << cluster_bits)
        .extended_l2(extended_l2);
    if let Some(p) = backing {
        opts = opts.backing_file(p.to_str().unwrap()).backing_fmt("raw");
    }
    let a = support::mem_create(&opts, SIZE);
    let b = support::mem_create(&opts, SIZE);
    (
        support::mem_open(&a, &OpenOptions::new()).unwrap(),
        support::mem_open(&b, &OpenOptions::new()).unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 100, ..ProptestConfig::default() })]

    #[test]
    fn vectored_io_matches_plain_io(
        cb in prop::sample::select(vec![9u32, 12, 16]),
        ext in any::<bool>(),
        with_backing in any::<bool>(),
        ops in prop::collection::vec(op(SIZE), 1..=24),
    ) {
        let ext = ext && cb >= 14;
        let dir = tempfile::tempdir().unwrap();
        let backing = with_backing.then(|| {
            let mut b = vec![0u8; (SIZE - SIZE / 8) as usize];
            Rng::new(7).fill(&mut b);
            support::write_file(dir.path(), "backing.raw", &b)
        });
        let (plain, vect) = twins(cb, ext, backing.as_deref());
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Write { off, len, seed } => {
                    let mut data = vec![0u8; len];
                    Rng::new(seed ^ i as u64).fill(&mut data);
                    plain.write_at(&data, off).unwrap();
                    write_split(&vect, &data, off, seed).unwrap();
                }
                Op::Zero { off, len } => {
                    plain.write_zeroes(off, len, false).unwrap();
                    vect.write_zeroes(off, len, false).unwrap();
                }
                Op::Read { off, len, seed } => {
                    let mut want = vec![0u8; len];
                    plain.read_at(&mut want, off).unwrap();
                    prop_assert!(read_split(&vect, off, len, seed) == want, "read {off}+{len} after op {i}");
                    prop_assert!(read_split(&plain, off, len, seed) == want, "plain read {off}+{len}");
                }
            }
        }
        let mut want = vec![0u8; SIZE as usize];
        plain.read_at(&mut want, 0).unwrap();
        let mut got = vec![0u8; SIZE as usize];
        vect.read_at(&mut got, 0).unwrap();
        prop_assert!(got == want, "final contents differ");
    }
}

/// A vectored write whose data write fails reports the error (the handle is
/// not poisoned by a data fault), the old contents stay readable, and after
/// a reopen `check` finds no corruption.
#[test]
fn failed_vectored_write_reports_and_stays_consistent() {
    let opts = CreateOptions::new().cluster_size(4096);
    let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(base.clone(), &opts, SIZE).unwrap();
    let mut bytes = vec![0u8; base.len().unwrap() as usize];
    base.read_at(&mut bytes, 0).unwrap();
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(bytes)));
    let img = Image::open_storage(fs.clone(), &OpenOptions::new()).unwrap();
    img.write_at(&[1; 8192], 0).unwrap();
    img.flush().unwrap();
    let new = [9u8; 6000];
    for (off, what) in [(1000u64, "in place"), (1 << 20, "allocating")] {
        fs.set_fault(Some(Fault {
            op: FaultOp::Write,
            nth: 0,
            kind: FaultKind::Eio,
            persistent: false,
        }));
        let err = write_split(&img, &new, off, 5).unwrap_err();
        fs.set_fault(None);
        assert!(
            err.to_string().contains("Input/output") || format!("{err:?}").contains("Io"),
            "{what}: {err:?}"
        );
        // Readable afterwards; an allocating write that failed left nothing linked.
        let mut b = vec![0u8; 6000];
        img.read_at(&mut b, off).unwrap();
        if off == 1 << 20 {
            assert!(b.iter().all(|&x| x == 0), "{what}");
        }
    }
    img.close().unwrap();
    let report = check_storage(
        Arc::new(MemStorage::from_bytes(fs.inner().to_vec())),
        Repair::None,
        CheckOptions::default(),
    )
    .unwrap();
    assert_eq!(report.counts.corruptions, 0, "{report:?}");
}
