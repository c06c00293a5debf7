//! The read and in-place overwrite hot paths allocate nothing per request:
//! a counting global allocator (per thread, so the test harness's own
//! threads do not count) around `read_at`, `read_vectored_at`, `map_read`,
//! `write_at` and `write_vectored_at` on allocated, cached clusters.
//! Its own test binary: the global allocator applies to the whole binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
#![allow(unsafe_code)] // implementing `GlobalAlloc` is unsafe by definition; it only forwards

use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is a const-initialised thread-local `Cell` (no allocation, no
// destructor), so counting cannot recurse into the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as for `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations made by this thread while `f` runs.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

#[test]
fn hot_paths_allocate_nothing_per_request() {
    // The counter sees this thread's allocations.
    assert!(allocations(|| drop(std::hint::black_box(vec![0u8; 10]))) > 0);
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let o = CreateOptions::from_qemu_str("cluster_size=65536").unwrap();
    qcow2kit::create::create_on(file.clone(), &o, 64 << 20).unwrap();
    let img = Image::open_storage(file, &OpenOptions::new()).unwrap();
    // Allocate and cache (the allocating writes may allocate).
    img.write_at(&vec![1u8; 1 << 20], 0).unwrap();
    let mut buf = vec![0u8; 4096];
    let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 3096]);
    let data = vec![2u8; 4096];
    for round in 0..2 {
        let n = allocations(|| {
            for i in 0..64u64 {
                let off = (i * 12_345) % ((1 << 20) - 4096);
                img.read_at(&mut buf, off).unwrap();
                img.read_vectored_at(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)], off)
                    .unwrap();
                let map = img.map_read(off, 4096).unwrap();
                assert_eq!(map.len(), 4096);
                drop(map);
                // Unallocated clusters read as zeroes: no allocation either.
                img.read_at(&mut buf, (32 << 20) + off).unwrap();
                img.write_at(&data, off).unwrap();
                img.write_vectored_at(
                    &[IoSlice::new(&data[..100]), IoSlice::new(&data[100..])],
                    off,
                )
                .unwrap();
                let res = img.reserve_write(off, 4096).unwrap();
                assert_eq!(res.len(), 4096);
                res.commit().unwrap();
            }
        });
        // The first round may fill lazily created state; none after.
        if round == 1 {
            assert_eq!(n, 0, "heap allocations on the hot paths");
        }
    }
}

/// Allocating 4 KiB writes into clusters nobody wrote, the headline case of
/// random writes into an empty image: once the L2 table and the refcount
/// block exist and the thread has done a few, no heap allocation per request.
#[test]
fn allocating_writes_into_fresh_clusters_allocate_nothing() {
    let made = Arc::new(MemStorage::new());
    let o = CreateOptions::from_qemu_str("cluster_size=65536").unwrap();
    qcow2kit::create::create_on(made.clone(), &o, 256 << 20).unwrap();
    // Room for the file to grow without the storage's own reallocation
    // (which would count here: it runs on this thread).
    let mut bytes = made.to_vec();
    bytes.reserve(64 << 20);
    let file: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes));
    let img = Image::open_storage(file, &OpenOptions::new()).unwrap();
    let data = vec![3u8; 4096];
    // Create the L2 table, grow the file a little and warm the thread's buffers.
    for c in 0..8u64 {
        img.write_at(&data, c << 16).unwrap();
    }
    let mut c = 8u64;
    for round in 0..2 {
        let n = allocations(|| {
            for _ in 0..64 {
                // A different cluster each time, at a 4 KiB slot inside it.
                let off = (((c * 37) % 4096) << 16) + (c % 16) * 4096;
                img.write_at(&data, off).unwrap();
                c += 1;
            }
        });
        if round == 1 {
            assert_eq!(n, 0, "heap allocations on the allocating-write path");
        }
    }
    // The writes landed.
    let mut buf = vec![0u8; 4096];
    let last = c - 1;
    img.read_at(&mut buf, (((last * 37) % 4096) << 16) + (last % 16) * 4096)
        .unwrap();
    assert_eq!(buf, data);
}
