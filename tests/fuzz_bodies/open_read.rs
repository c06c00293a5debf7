//! `open_read`: arbitrary bytes as an image file on `MemStorage`.
//!
//! * Read-only open with `BackingPolicy::Refuse`: an image naming a backing
//!   file or an external data file must fail to open (cleanly). When it opens:
//!   read the start and the end of the disk in chunks (bounded), walk
//!   `block_status` over the disk (bounded number of steps) and read what each
//!   extent points at; extents reported as zero or unallocated (there is no
//!   backing file) must read as zeroes.
//! * Read-write open: a small write inside one cluster, read back (must equal
//!   what was written if both succeed), flush, reopen read-only, read again.
//!   Then a second read-write handle does a few more operations whose results
//!   are not checked (only that they return): write-zeroes with unmap,
//!   discard, a write across clusters, write-zeroes without unmap, growing
//!   the disk by a cluster, flush.
//!
//! The storage may grow by at most `GROW_LIMIT` bytes (writes at crafted host
//! offsets far past the end fail with ENOSPC instead of allocating).

use qcow2kit::image::BlockStatus;
use qcow2kit::options::BackingPolicy;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::Extent;
use qcow2kit::{Image, OpenOptions};
use std::sync::Arc;

/// Largest read request.
const CHUNK: u64 = 64 << 10;
/// Bytes read from the start and from the end of the disk.
const EDGE_BYTES: u64 = 1 << 20;
/// `block_status` calls per image.
const STATUS_STEPS: usize = 512;
/// Bytes read at the extents the walk finds.
const EXTENT_BYTES: u64 = 2 << 20;
/// How far the image file may grow.
const GROW_LIMIT: u64 = 16 << 20;

pub fn run(data: &[u8]) {
    read_only(data);
    read_write(data);
}

fn refuse() -> OpenOptions {
    OpenOptions::new().backing_policy(BackingPolicy::Refuse)
}

fn storage(data: &[u8]) -> Arc<MemStorage> {
    Arc::new(MemStorage::with_limit(
        data.to_vec(),
        data.len() as u64 + GROW_LIMIT,
    ))
}

fn read_only(data: &[u8]) {
    let Ok(img) = Image::open_storage(storage(data), &refuse().read_only(true)) else {
        return;
    };
    assert!(
        img.header().backing_file_name().is_none() && img.backing().is_none(),
        "opened an image with a backing file under BackingPolicy::Refuse"
    );
    assert!(
        img.data_file_path().is_none(),
        "opened an external data file"
    );
    let size = img.size();
    let mut buf = vec![0u8; CHUNK as usize];

    // The start and the end of the disk.
    let head_end = size.min(EDGE_BYTES);
    read_range(&img, &mut buf, 0, head_end);
    read_range(
        &img,
        &mut buf,
        size.saturating_sub(EDGE_BYTES).max(head_end),
        size,
    );

    // The block-status walk.
    let mut offset = 0u64;
    let mut budget = EXTENT_BYTES;
    for _ in 0..STATUS_STEPS {
        if offset >= size {
            break;
        }
        let want = size - offset;
        let BlockStatus { len, extent } = match img.block_status(offset, want) {
            Ok(s) => s,
            Err(_) => {
                // Corrupt tables on the way: skip a sector and go on.
                offset = offset.saturating_add(512);
                continue;
            }
        };
        assert!(len > 0, "block_status returned an empty run at {offset:#x}");
        assert!(len <= want, "block_status ran past the end of the disk");
        let n = len.min(CHUNK).min(budget);
        budget -= n;
        let chunk = &mut buf[..n as usize];
        if img.read_at(chunk, offset).is_ok()
            && matches!(extent, Extent::Zero { .. } | Extent::Unallocated)
        {
            assert!(
                chunk.iter().all(|b| *b == 0),
                "{extent:?} run at {offset:#x} reads non-zero bytes"
            );
        }
        offset += len;
    }
}

/// Reads `[from, to)` in chunks, ignoring errors (corrupt tables are fine).
fn read_range(img: &Image, buf: &mut [u8], from: u64, to: u64) {
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(buf.len() as u64);
        let _ = img.read_at(&mut buf[..n as usize], pos);
        pos += n;
    }
}

fn read_write(data: &[u8]) {
    let file = storage(data);
    let Ok(img) = Image::open_storage(file.clone(), &refuse()) else {
        return;
    };
    let size = img.size();
    if size == 0 {
        return;
    }
    // A write inside one cluster, somewhere depending on the input.
    let cs = img.cluster_size();
    let offset = (data.len() as u64).wrapping_mul(0x9e37_79b9) % size;
    let len = 300.min(cs - offset % cs).min(size - offset);
    let pattern: Vec<u8> = (0..len).map(|i| (i as u8) ^ 0x5a).collect();
    let written = img.write_at(&pattern, offset).is_ok();
    let mut back = vec![0u8; len as usize];
    if written && img.read_at(&mut back, offset).is_ok() {
        assert_eq!(back, pattern, "read after write at {offset:#x} differs");
    }
    let flushed = img.flush().is_ok();
    drop(img);
    if written && flushed {
        // What was written and flushed is on the storage.
        let copy = Arc::new(MemStorage::from_bytes(file.to_vec()));
        let Ok(img) = Image::open_storage(copy as Arc<dyn Storage>, &refuse().read_only(true))
        else {
            panic!("an image that was written and flushed does not reopen");
        };
        if img.read_at(&mut back, offset).is_ok() {
            assert_eq!(back, pattern, "read after reopen at {offset:#x} differs");
        }
    }
    more_writes(file, data);
}

/// Longest write of `more_writes`.
const MORE_BYTES: u64 = 256 << 10;

/// More ways to allocate, free and move metadata on a crafted image; any
/// result is fine as long as each call returns.
fn more_writes(file: Arc<MemStorage>, data: &[u8]) {
    let Ok(img) = Image::open_storage(file, &refuse()) else {
        return;
    };
    let size = img.size();
    let cs = img.cluster_size();
    if size == 0 {
        return;
    }
    let pick = |k: u64| ((data.len() as u64) ^ k).wrapping_mul(0x2545_f491_4f6c_dd1d) % size;
    let span = |at: u64, n: u64| n.min(size - at).min(MORE_BYTES);
    let a = pick(1) / cs * cs;
    let _ = img.write_zeroes(a, span(a, 2 * cs), true);
    let b = pick(2) / cs * cs;
    let _ = img.discard(b, span(b, 2 * cs));
    let c = pick(3);
    let _ = img.write_at(&vec![0xc3; span(c, 3 * cs) as usize], c);
    let d = pick(4);
    let _ = img.write_zeroes(d, span(d, 1000), false);
    let _ = img.resize(size.saturating_add(cs));
    let _ = img.flush();
}
