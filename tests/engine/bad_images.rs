//! Crafted invalid images, built by code from a valid one: each must be
//! refused (or fail the request) with a specific typed error and QEMU's
//! message, never a panic, and never after a huge allocation.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// tests: a failed unwrap is a failed test
// The counting allocator below needs `unsafe impl GlobalAlloc`; it only
// forwards to `System`.
#![allow(unsafe_code)]

use crate::support;

use qcow2kit::format::consts::*;
use qcow2kit::format::FormatErrorKind;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Error, Event, Image, OpenOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------
// Largest single allocation made by the current thread while tracking is on.
// ---------------------------------------------------------------------------

struct Tracking;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static BIGGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = BIGGEST.try_with(|b| b.set(b.get().max(size)));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments; the
// bookkeeping touches only const-initialised thread-local `Cell`s and never
// allocates.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it made.
fn biggest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    BIGGEST.with(|b| b.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, BIGGEST.with(|b| b.get()))
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

const CS: u64 = 65536;

/// A valid v3 image (64 KiB clusters, 64 MiB) with data in its first
/// clusters, as bytes.
fn valid_image() -> Vec<u8> {
    valid_with(&CreateOptions::new(), 64 << 20)
}

fn valid_with(opts: &CreateOptions, size: u64) -> Vec<u8> {
    let mem = support::mem_create(opts, size);
    let img = support::mem_open(&mem, &OpenOptions::new()).unwrap();
    let data: Vec<u8> = (0..3 * CS as usize).map(|i| (i % 253) as u8 + 1).collect();
    img.write_at(&data, 0).unwrap();
    img.close().unwrap();
    mem.to_vec()
}

fn put_u32(b: &mut [u8], pos: usize, v: u32) {
    b[pos..pos + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_u64(b: &mut [u8], pos: usize, v: u64) {
    b[pos..pos + 8].copy_from_slice(&v.to_be_bytes());
}
fn get_u64(b: &[u8], pos: usize) -> u64 {
    u64::from_be_bytes(b[pos..pos + 8].try_into().unwrap())
}

fn open_bytes(bytes: Vec<u8>, read_only: bool) -> (Arc<MemStorage>, qcow2kit::Result<Image>) {
    let mem = Arc::new(MemStorage::from_bytes(bytes));
    let r = Image::open_storage(
        mem.clone() as Arc<dyn Storage>,
        &OpenOptions::new().read_only(read_only),
    );
    (mem, r)
}

/// Opens `bytes` read-only and read-write; both must fail with a format
/// error of `kind` whose message is `msg`.
#[track_caller]
fn assert_refused(bytes: Vec<u8>, kind: FormatErrorKind, msg: &str) {
    for ro in [true, false] {
        let (_, r) = open_bytes(bytes.clone(), ro);
        match r {
            Err(Error::Format(e)) => {
                assert_eq!(e.kind, kind, "kind of {msg:?} (read-only {ro})");
                assert_eq!(e.reason, msg, "read-only {ro}");
                assert_eq!(Error::Format(e).to_string(), msg);
            }
            other => panic!("expected {kind:?} {msg:?} (read-only {ro}), got {other:?}"),
        }
    }
}

fn l1_offset(b: &[u8]) -> u64 {
    get_u64(b, 40)
}

/// Host offset of the L2 table of L1 entry 0.
fn l2_offset(b: &[u8]) -> u64 {
    get_u64(b, l1_offset(b) as usize) & L1E_OFFSET_MASK
}

// ---------------------------------------------------------------------------
// Header and table checks at open.
// ---------------------------------------------------------------------------

#[test]
fn the_base_image_is_valid() {
    let (_, r) = open_bytes(valid_image(), false);
    let img = r.unwrap();
    let mut buf = vec![0u8; 100];
    img.read_at(&mut buf, 1000).unwrap();
    assert_eq!(buf[0], (1000 % 253) as u8 + 1);
}

#[test]
fn bad_magic() {
    let mut b = valid_image();
    b[0] = b'X';
    assert_refused(b, FormatErrorKind::NotQcow2, "Image is not in qcow2 format");
}

#[test]
fn version_1_and_4() {
    for v in [1, 4, 0, u32::MAX] {
        let mut b = valid_image();
        put_u32(&mut b, 4, v);
        assert_refused(
            b,
            FormatErrorKind::Unsupported,
            &format!("Unsupported qcow2 version {v}"),
        );
    }
}

#[test]
fn cluster_bits_8_and_22() {
    for bits in [8, 22, 0, 63, 64] {
        let mut b = valid_image();
        put_u32(&mut b, 20, bits);
        assert_refused(
            b,
            FormatErrorKind::Invalid,
            &format!("Unsupported cluster size: 2^{bits}"),
        );
    }
}

#[test]
fn huge_l1_size() {
    let mut b = valid_image();
    put_u32(&mut b, 36, (MAX_L1_BYTES / 8) as u32 + 1);
    assert_refused(b, FormatErrorKind::TooLarge, "Active L1 table too large");
    let mut b = valid_image();
    put_u32(&mut b, 36, u32::MAX);
    assert_refused(b, FormatErrorKind::TooLarge, "Active L1 table too large");
}

/// An L1 table at the limit (32 MiB) named by a 1 MiB file opens, as in
/// QEMU: the part past the end reads as zeroes. Memory stays bounded by
/// QEMU's cap on the table, not by the file: one table-sized buffer at most.
#[test]
fn huge_l1_in_small_file_is_bounded_by_qemus_cap() {
    let mut b = valid_image();
    b.resize(1 << 20, 0);
    put_u32(&mut b, 36, (MAX_L1_BYTES / 8) as u32);
    let ((_, r), biggest) = biggest_allocation(|| open_bytes(b, true));
    let img = r.expect("opens as in QEMU");
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[..3], [1, 2, 3], "the data is still mapped");
    assert!(
        biggest as u64 <= MAX_L1_BYTES,
        "open allocated {biggest} bytes at once (QEMU's cap: {MAX_L1_BYTES})"
    );
}

/// The same for the refcount table: 8 MiB (the limit) named by a 1 MiB file.
#[test]
fn huge_refcount_table_in_small_file_is_bounded_by_qemus_cap() {
    let mut b = valid_image();
    b.resize(1 << 20, 0);
    put_u32(&mut b, 56, (MAX_REFTABLE_BYTES / CS) as u32);
    let ((_, r), biggest) = biggest_allocation(|| open_bytes(b, true));
    r.expect("opens as in QEMU");
    assert!(
        biggest as u64 <= MAX_REFTABLE_BYTES,
        "open allocated {biggest} bytes at once (QEMU's cap: {MAX_REFTABLE_BYTES})"
    );
    let mut b = valid_image();
    put_u32(&mut b, 56, (MAX_REFTABLE_BYTES / CS) as u32 + 1);
    assert_refused(
        b,
        FormatErrorKind::TooLarge,
        "Reference count table too large",
    );
}

#[test]
fn l1_table_too_small_for_the_size() {
    let mut b = valid_image();
    put_u64(&mut b, 24, 1 << 40);
    assert_refused(b, FormatErrorKind::Invalid, "L1 table is too small");
}

#[test]
fn unaligned_table_offsets() {
    let mut b = valid_image();
    let l1 = l1_offset(&b);
    put_u64(&mut b, 40, l1 + 512);
    assert_refused(
        b,
        FormatErrorKind::Invalid,
        "Active L1 table offset invalid",
    );
    let mut b = valid_image();
    put_u64(&mut b, 48, CS + 8);
    assert_refused(
        b,
        FormatErrorKind::Invalid,
        "Reference count table offset invalid",
    );
    let mut b = valid_image();
    put_u64(&mut b, 48, !(CS - 1));
    assert_refused(
        b,
        FormatErrorKind::Invalid,
        "Reference count table offset invalid",
    );
}

/// Tables past the end of the file open (as in QEMU) and read as zeroes; a
/// handle whose refcounts lie past the end refuses to allocate, with the
/// corruption contract (fatal event, corrupt bit, handle disabled).
#[test]
fn tables_beyond_eof() {
    let b = valid_image();
    let len = b.len() as u64;
    let mut l1_out = b.clone();
    put_u64(&mut l1_out, 40, (len + CS) & !(CS - 1));
    let mut rt_out = b.clone();
    put_u64(&mut rt_out, 48, (len + CS) & !(CS - 1));
    // A refcount table that starts inside the file but ends past it.
    let mut rt_part = b;
    put_u64(&mut rt_part, 48, (len - 1) & !(CS - 1));
    put_u32(&mut rt_part, 56, 4);
    for (what, bytes) in [
        ("L1", l1_out),
        ("reftable", rt_out),
        ("reftable end", rt_part),
    ] {
        let (_, r) = open_bytes(bytes.clone(), true);
        let img = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut buf = vec![1u8; 4096];
        img.read_at(&mut buf, 0).unwrap();
        if what == "L1" {
            assert!(buf.iter().all(|&x| x == 0), "{what}: unmapped");
            continue;
        }
        assert_eq!(buf[..3], [1, 2, 3], "{what}: the data is still mapped");
        let (mem, r) = open_bytes(bytes, false);
        let img = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        img.on_event(move |e| sink.lock().unwrap().push(e.clone()));
        let before = mem.len().unwrap();
        match img.write_at(&[0x5a; 512], 32 << 20) {
            Err(Error::Corrupt { msg, .. }) => {
                assert!(
                    msg.starts_with("Preventing allocation: refcount"),
                    "{what}: {msg}"
                )
            }
            other => panic!("{what}: expected the allocation to be refused, got {other:?}"),
        }
        assert!(matches!(
            img.write_at(&[0x5a; 512], 0),
            Err(Error::MediumGone)
        ));
        assert_eq!(mem.len().unwrap(), before, "{what}: nothing allocated");
        let mut head = [0u8; 80];
        mem.read_at(&mut head, 0).unwrap();
        assert_eq!(
            get_u64(&head, 72) & INCOMPAT_CORRUPT,
            INCOMPAT_CORRUPT,
            "{what}"
        );
        assert!(
            matches!(
                &events.lock().unwrap()[..],
                [Event::ImageCorrupted { fatal: true, .. }]
            ),
            "{what}"
        );
    }
}

#[test]
fn refcount_order_7() {
    let mut b = valid_image();
    put_u32(&mut b, 96, 7);
    assert_refused(
        b,
        FormatErrorKind::Invalid,
        "Reference count entry width too large; may not exceed 64 bits",
    );
}

#[test]
fn no_refcount_table() {
    let mut b = valid_image();
    put_u32(&mut b, 56, 0);
    assert_refused(
        b,
        FormatErrorKind::Invalid,
        "Image does not contain a reference count table",
    );
}

#[test]
fn backing_name_too_long() {
    let mut b = valid_image();
    put_u64(&mut b, 8, 1024);
    put_u32(&mut b, 16, 1024);
    assert_refused(b, FormatErrorKind::Invalid, "Backing file name too long");
    // Fits the 1023 limit but not cluster 0.
    let mut b = valid_image();
    put_u64(&mut b, 8, CS - 100);
    put_u32(&mut b, 16, 200);
    assert_refused(b, FormatErrorKind::Invalid, "Backing file name too long");
    let mut b = valid_image();
    put_u64(&mut b, 8, CS + 512);
    put_u32(&mut b, 16, 4);
    assert_refused(b, FormatErrorKind::Invalid, "Invalid backing file offset");
}

#[test]
fn header_length_too_small_or_too_big() {
    let mut b = valid_image();
    put_u32(&mut b, 100, 100);
    assert_refused(b, FormatErrorKind::Invalid, "qcow2 header too short");
    let mut b = valid_image();
    put_u32(&mut b, 100, CS as u32 + 8);
    assert_refused(
        b,
        FormatErrorKind::Invalid,
        "qcow2 header exceeds cluster size",
    );
}

#[test]
fn overrunning_header_extension() {
    let b = valid_image();
    // The first extension QEMU writes is the feature name table at 112.
    assert_eq!(
        u32::from_be_bytes(b[112..116].try_into().unwrap()),
        EXT_FEATURE_TABLE
    );
    let mut x = b.clone();
    put_u32(&mut x, 116, CS as u32);
    assert_refused(x, FormatErrorKind::Invalid, "Header extension too large");
    let mut x = b;
    put_u32(&mut x, 116, u32::MAX);
    assert_refused(x, FormatErrorKind::Invalid, "Header extension too large");
}

/// Unknown incompatible bits are refused, named from the image's own
/// feature name table where it names them.
#[test]
fn unknown_incompatible_bits() {
    let mut b = valid_image();
    // Replace the extension area by one feature table entry naming bit 5.
    b[112..CS as usize].fill(0);
    put_u32(&mut b, 112, EXT_FEATURE_TABLE);
    put_u32(&mut b, 116, 48);
    b[120] = 0; // incompatible
    b[121] = 5;
    b[122..122 + 17].copy_from_slice(b"shiny new feature");
    put_u64(&mut b, 72, 1 << 5);
    assert_refused(
        b.clone(),
        FormatErrorKind::Unsupported,
        "Unsupported qcow2 feature(s): shiny new feature",
    );
    put_u64(&mut b, 72, (1 << 5) | (1 << 6));
    assert_refused(
        b,
        FormatErrorKind::Unsupported,
        "Unsupported qcow2 feature(s): shiny new feature, Unknown incompatible feature: 40",
    );
    let mut b = valid_image();
    put_u64(&mut b, 72, 1 << 63);
    assert_refused(
        b,
        FormatErrorKind::Unsupported,
        "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000",
    );
}

#[test]
fn truncated_and_empty_files() {
    let b = valid_image();
    assert_refused(
        Vec::new(),
        FormatErrorKind::NotQcow2,
        "Image is not in qcow2 format",
    );
    for n in [3, 4, 7, 60, 103] {
        let msg = if n < 4 {
            "Image is not in qcow2 format"
        } else {
            "qcow2 header too short"
        };
        let kind = if n < 4 {
            FormatErrorKind::NotQcow2
        } else {
            FormatErrorKind::Invalid
        };
        assert_refused(b[..n].to_vec(), kind, msg);
    }
    // Cut inside the L1 table or inside the refcount table (cluster 1):
    // opens as in QEMU, what is missing reads as zeroes.
    let l1 = l1_offset(&b) as usize;
    for cut in [l1 + 4, CS as usize + 100] {
        let (_, r) = open_bytes(b[..cut].to_vec(), true);
        let img = r.unwrap_or_else(|e| panic!("cut at {cut:#x}: {e}"));
        let mut buf = vec![1u8; 4096];
        img.read_at(&mut buf, 0).unwrap();
    }
    // Cut inside the data: opens; the missing part reads as zeroes (as in QEMU).
    let cut = b.len() - 1000;
    let (_, r) = open_bytes(b[..cut].to_vec(), true);
    let img = r.unwrap();
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
}

#[test]
fn extended_l2_with_small_clusters() {
    let mut b = valid_with(&CreateOptions::new().cluster_size(8192), 1 << 20);
    let inc = get_u64(&b, 72);
    put_u64(&mut b, 72, inc | INCOMPAT_EXTL2);
    assert_refused(
        b,
        FormatErrorKind::Invalid,
        "Unsupported subcluster size: 256",
    );
}

#[test]
fn corrupt_bit_refuses_read_write_only() {
    let mut b = valid_image();
    let inc = get_u64(&b, 72);
    put_u64(&mut b, 72, inc | INCOMPAT_CORRUPT);
    let (_, r) = open_bytes(b.clone(), false);
    assert!(matches!(r, Err(Error::ImageCorrupt)), "got {r:?}");
    assert_eq!(
        Error::ImageCorrupt.qemu_message(),
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
    let (mem, r) = open_bytes(b.clone(), true);
    let img = r.unwrap();
    let mut buf = vec![0u8; 300];
    img.read_at(&mut buf, 77).unwrap();
    assert_eq!(buf[0], 78);
    assert!(matches!(img.write_at(&buf, 0), Err(Error::ReadOnly)));
    drop(img);
    assert_eq!(mem.to_vec(), b, "a read-only open changed the file");
}

#[test]
fn dirty_bit_is_repaired_by_a_read_write_open() {
    let mut b = valid_image();
    let inc = get_u64(&b, 72);
    put_u64(&mut b, 72, inc | INCOMPAT_DIRTY);
    // Read-only: opens as is, changes nothing.
    let (mem, r) = open_bytes(b.clone(), true);
    let img = r.unwrap();
    assert!(img.dirty_repair_report().is_none());
    drop(img);
    assert_eq!(mem.to_vec(), b);
    // Read-write: repaired first (as QEMU), dirty bit cleared, data intact.
    let (mem, r) = open_bytes(b, false);
    let img = r.unwrap();
    assert!(img.dirty_repair_report().is_some());
    let mut buf = vec![0u8; 100];
    img.read_at(&mut buf, 1000).unwrap();
    assert_eq!(buf[0], (1000 % 253) as u8 + 1);
    drop(img);
    assert_eq!(get_u64(&mem.to_vec(), 72) & INCOMPAT_DIRTY, 0);
}

// ---------------------------------------------------------------------------
// Corrupt tables found while translating.
// ---------------------------------------------------------------------------

/// Opens `bytes` read-only, then read-write: a read at guest offset 0 must
/// fail with `Error::Corrupt` carrying `msg`; only the read-write handle marks
/// the image corrupt (and is disabled).
#[track_caller]
fn assert_corrupt_on_read(bytes: Vec<u8>, msg: &str) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let (mem, r) = open_bytes(bytes.clone(), true);
    let img = r.unwrap();
    let ev = events.clone();
    img.on_event(move |e| ev.lock().unwrap().push(e.clone()));
    let mut buf = vec![0u8; 4096];
    match img.read_at(&mut buf, 0) {
        Err(Error::Corrupt { msg: m, .. }) => assert_eq!(m, msg),
        other => panic!("read-only: expected Corrupt({msg:?}), got {other:?}"),
    }
    assert!(!img.is_disabled());
    drop(img);
    assert_eq!(mem.to_vec(), bytes, "a read-only handle changed the file");
    assert!(matches!(
        events.lock().unwrap().as_slice(),
        [Event::ImageCorrupted { fatal: false, .. }]
    ));

    let (mem, r) = open_bytes(bytes, false);
    let img = r.unwrap();
    match img.read_at(&mut buf, 0) {
        Err(Error::Corrupt { msg: m, .. }) => assert_eq!(m, msg),
        other => panic!("read-write: expected Corrupt({msg:?}), got {other:?}"),
    }
    assert!(img.is_disabled());
    assert!(matches!(img.read_at(&mut buf, 0), Err(Error::MediumGone)));
    drop(img);
    let after = mem.to_vec();
    assert_ne!(
        get_u64(&after, 72) & INCOMPAT_CORRUPT,
        0,
        "corrupt bit not set"
    );
    let (_, r) = open_bytes(after, false);
    assert!(matches!(r, Err(Error::ImageCorrupt)));
}

#[test]
fn unaligned_l2_table_offset() {
    let mut b = valid_image();
    let l1 = l1_offset(&b) as usize;
    let e = get_u64(&b, l1);
    put_u64(&mut b, l1, e + 0x200);
    let l2 = e & L1E_OFFSET_MASK;
    assert_corrupt_on_read(
        b,
        &format!(
            "L2 table offset {:#x} unaligned (L1 index: 0x0)",
            l2 + 0x200
        ),
    );
}

#[test]
fn unaligned_data_cluster_offset() {
    let mut b = valid_image();
    let l2 = l2_offset(&b);
    let e = get_u64(&b, l2 as usize);
    put_u64(&mut b, l2 as usize, e + 0x200);
    assert_corrupt_on_read(
        b,
        &format!(
            "Cluster allocation offset {:#x} unaligned (L2 offset: {l2:#x}, L2 index: 0x0)",
            (e & L2E_OFFSET_MASK) + 0x200
        ),
    );
}

#[test]
fn zero_flag_in_v2_image() {
    let mut b = valid_with(
        &CreateOptions::new().compat(qcow2kit::options::Compat::V2),
        64 << 20,
    );
    let l2 = l2_offset(&b);
    let e = get_u64(&b, l2 as usize);
    put_u64(&mut b, l2 as usize, e | OFLAG_ZERO);
    // v2 cannot persist the corrupt bit: only check the read-only side and
    // that a read-write read fails with the same error.
    let msg =
        format!("Zero cluster entry found in pre-v3 image (L2 offset: {l2:#x}, L2 index: 0x0)");
    for ro in [true, false] {
        let (_, r) = open_bytes(b.clone(), ro);
        let img = r.unwrap();
        let mut buf = vec![0u8; 512];
        match img.read_at(&mut buf, 0) {
            Err(Error::Corrupt { msg: m, .. }) => assert_eq!(m, msg),
            other => panic!("expected Corrupt({msg:?}), got {other:?}"),
        }
    }
}

#[test]
fn invalid_extended_l2_bitmap() {
    let mut b = valid_with(&CreateOptions::new().extended_l2(true), 64 << 20);
    let l2 = l2_offset(&b) as usize;
    // Subcluster 0 both allocated and zero.
    let bm = get_u64(&b, l2 + 8);
    put_u64(&mut b, l2 + 8, bm | (1 << 32));
    assert_corrupt_on_read(
        b,
        &format!(
            "Invalid cluster entry found  (L2 offset: {:#x}, L2 index: 0x0)",
            l2
        ),
    );
}

#[test]
fn garbage_compressed_cluster() {
    let mut b = valid_image();
    let l2 = l2_offset(&b) as usize;
    // A compressed descriptor pointing at the L2 table itself: not deflate data.
    let x = 62 - (16 - 8);
    put_u64(&mut b, l2, OFLAG_COMPRESSED | (1 << x) | l2 as u64);
    let (_, r) = open_bytes(b.clone(), true);
    let img = r.unwrap();
    let mut buf = vec![0u8; 512];
    // A decompression failure is a plain I/O error (EIO), as in QEMU.
    match img.read_at(&mut buf, 0) {
        Err(Error::Decompress { offset, .. }) => assert_eq!(offset, l2 as u64),
        other => panic!("expected a decompression error, got {other:?}"),
    }
    // Pointing past the end of the file (with the largest sector count).
    let mut b = valid_image();
    let far = 1u64 << 50;
    put_u64(&mut b, l2, OFLAG_COMPRESSED | (0xff << x) | far);
    let (_, r) = open_bytes(b, true);
    let img = r.unwrap();
    match img.read_at(&mut buf, 0) {
        Err(Error::Corrupt { what, msg, .. }) => {
            assert_eq!(what.to_string(), "L2 table");
            assert_eq!(
                msg,
                format!(
                    "Compressed cluster at host offset {far:#x} lies beyond the end of the file (L2 offset: {l2:#x}, L2 index: 0x0)"
                )
            );
        }
        other => panic!("expected a corrupt L2 entry, got {other:?}"),
    }
}

/// An L2 entry pointing at the active L1 table: reads return the table's
/// bytes (as in QEMU), a write is stopped by the overlap check, the image is
/// marked corrupt and the handle disabled.
#[test]
fn data_cluster_pointing_at_metadata() {
    let mut b = valid_image();
    let l1 = l1_offset(&b);
    let l2 = l2_offset(&b) as usize;
    put_u64(&mut b, l2, OFLAG_COPIED | l1);
    let (mem, r) = open_bytes(b.clone(), false);
    let img = r.unwrap();
    let mut buf = vec![0u8; 8];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(
        u64::from_be_bytes(buf[..8].try_into().unwrap()),
        get_u64(&b, l1 as usize)
    );
    match img.write_at(&[1u8; 512], 0) {
        Err(Error::OverlapPrevented { kind, offset, .. }) => {
            assert_eq!(kind, qcow2kit::types::MetadataKind::ActiveL1);
            assert_eq!(offset, l1);
        }
        other => panic!("expected OverlapPrevented, got {other:?}"),
    }
    assert!(img.is_disabled());
    assert!(matches!(
        img.write_at(&[1u8; 512], 0),
        Err(Error::MediumGone)
    ));
    drop(img);
    let after = mem.to_vec();
    assert_eq!(
        &after[l1 as usize..l1 as usize + 8],
        &b[l1 as usize..l1 as usize + 8]
    );
    assert_ne!(get_u64(&after, 72) & INCOMPAT_CORRUPT, 0);
}

/// An L1 entry with COPIED set and offset 0 (QEMU 10 aborts on an assertion
/// here, qcow2-format.md §13.2 item 8): no panic, and the range either
/// reads as unallocated or fails as corrupt.
#[test]
fn l1_entry_copied_with_offset_zero() {
    let mut b = valid_with(&CreateOptions::new(), 1 << 30);
    let l1 = l1_offset(&b) as usize;
    put_u64(&mut b, l1 + 8, OFLAG_COPIED);
    for ro in [true, false] {
        let (_, r) = open_bytes(b.clone(), ro);
        let img = r.unwrap();
        let guest = 512 << 20; // L1 index 1 with 64 KiB clusters
        let mut buf = vec![1u8; 4096];
        match img.read_at(&mut buf, guest + 4096 * 4) {
            Ok(()) => {}
            Err(Error::Corrupt { .. }) => {}
            Err(e) => panic!("read: {e:?}"),
        }
        if !ro {
            match img.write_at(&[7u8; 4096], guest + 4096) {
                Ok(()) | Err(Error::Corrupt { .. }) => {}
                Err(e) => panic!("write: {e:?}"),
            }
        }
    }
}

/// QEMU counts the disk in 512-byte sectors: a size that is not a multiple
/// of 512 loses its partial sector (reads, writes and `qemu-img info`).
#[test]
fn partial_last_sector_is_dropped() {
    let mut b = valid_image();
    put_u64(&mut b, 24, 1000);
    let (_, img) = open_bytes(b.clone(), false);
    let img = img.unwrap();
    assert_eq!(img.size(), 512);
    let mut buf = [0u8; 8];
    assert!(
        img.read_at(&mut buf, 600).is_err(),
        "read past the last whole sector"
    );
    assert!(
        img.write_at(&buf, 600).is_err(),
        "write past the last whole sector"
    );
    img.read_at(&mut buf, 504).unwrap();
    assert_eq!(buf[0], (504 % 253) as u8 + 1);
    drop(img);
    if support::have_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.qcow2");
        std::fs::write(&path, &b).unwrap();
        let info = support::qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
        assert!(info.contains("\"virtual-size\": 512,"), "{info}");
    }
}
