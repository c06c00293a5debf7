//! Persistent bitmaps under concurrency: writer threads (in-place writes on
//! the shared-lock fast path, allocating writes, write-zeroes, discards,
//! gather writes) race a thread that keeps clearing the bitmap. Whatever the
//! interleaving, a request that started after a clear returned is in the
//! bitmap afterwards (its granules are set while it holds the lock, after
//! the clear), and the bitmap stored at close is exactly the one the handle
//! showed. No timing is asserted: the property is about the order of events
//! each thread observes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use qcow2kit::{CreateOptions, OpenOptions};
use std::collections::BTreeSet;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use support::bitmaps::{granules, stored_bitmaps};
use support::Rng;

const SIZE: u64 = 8 << 20;
const WRITERS: u64 = 3;
const PER_WRITER: usize = 150;

#[test]
fn clears_racing_writes_lose_no_later_write() {
    let mem = support::mem_create(&CreateOptions::new(), SIZE);
    let img = Arc::new(support::mem_open(&mem, &OpenOptions::new()).unwrap());
    // Mostly allocated, so that most writes go the in-place shared path.
    img.write_at(&vec![1u8; (SIZE - (1 << 20)) as usize], 0)
        .unwrap();
    img.add_bitmap("b", Some(4096)).unwrap();
    let epoch = Arc::new(AtomicU64::new(0));
    // Writers meet the clearer once four fifths of their requests are done:
    // the clearer clears until all have arrived, clears a last time, then
    // lets them go on, so the last fifth starts after the last clear.
    let arrived = Arc::new(AtomicUsize::new(0));
    let meet = Arc::new(Barrier::new(WRITERS as usize + 1));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (img, epoch, arrived, meet) =
                (img.clone(), epoch.clone(), arrived.clone(), meet.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(77 + t);
                let mut done = Vec::with_capacity(PER_WRITER);
                for i in 0..PER_WRITER {
                    if i == PER_WRITER * 4 / 5 {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        meet.wait();
                    }
                    let off = rng.below(SIZE - 1);
                    let len = (1 + rng.below(40_000)).min(SIZE - off);
                    // Read before the request starts: any clear with a
                    // smaller epoch had returned.
                    let start = epoch.load(Ordering::SeqCst);
                    match rng.below(5) {
                        0 => img.write_zeroes(off, len, rng.chance(50)).unwrap(),
                        1 => img.discard(off, len).unwrap(),
                        2 => {
                            let d = vec![t as u8; len as usize];
                            let (a, b) = d.split_at(len as usize / 2);
                            img.write_vectored_at(&[IoSlice::new(a), IoSlice::new(b)], off)
                                .unwrap();
                        }
                        _ => img.write_at(&vec![t as u8; len as usize], off).unwrap(),
                    }
                    done.push((start, off, len));
                }
                done
            })
        })
        .collect();
    let clearer = {
        let (img, epoch, arrived, meet) =
            (img.clone(), epoch.clone(), arrived.clone(), meet.clone());
        std::thread::spawn(move || {
            let mut clears = 0u64;
            loop {
                let all_there = arrived.load(Ordering::SeqCst) == WRITERS as usize;
                img.clear_bitmap("b").unwrap();
                epoch.fetch_add(1, Ordering::SeqCst);
                clears += 1;
                if all_there {
                    break;
                }
                std::thread::yield_now();
            }
            meet.wait();
            clears
        })
    };
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.join().unwrap());
    }
    assert!(clearer.join().unwrap() > 0);
    let last = epoch.load(Ordering::SeqCst);
    let shown: BTreeSet<u64> = img
        .dirty_extents("b", 0, SIZE)
        .unwrap()
        .iter()
        .flat_map(|&(o, l)| granules(12, o, l))
        .collect();
    let after: Vec<_> = all.iter().filter(|w| w.0 == last).collect();
    assert!(!after.is_empty(), "no write started after the last clear");
    for &&(_, off, len) in &after {
        for g in granules(12, off, len) {
            assert!(shown.contains(&g), "write {off}+{len} lost granule {g}");
        }
    }
    // Every bit shown belongs to some write (none appears from nowhere).
    let written: BTreeSet<u64> = all
        .iter()
        .flat_map(|&(_, o, l)| granules(12, o, l))
        .collect();
    assert!(shown.is_subset(&written));
    Arc::into_inner(img).unwrap().close().unwrap();
    let stored = stored_bitmaps(&mem.to_vec()).unwrap();
    assert_eq!(stored[0].dirty.as_ref(), Some(&shown));
}
