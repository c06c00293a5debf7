//! `write_ops`: a valid image made by `create_on` with fuzz-chosen options
//! (cluster size, refcount width, v2/v3, extended L2), then a sequence of
//! operations (write, write-zeroes with or without unmap, discard, read,
//! flush, grow, close-and-reopen with fuzz-chosen cache and discard options)
//! against a `Vec<u8>` model of the disk.
//!
//! On a valid image every operation must succeed and every read must equal
//! the model; the whole disk is compared after each reopen and at the end.
//!
//! Discard follows its documented contract (`Image::discard`): only whole
//! clusters inside the range are discarded (plus a partial last cluster of
//! the disk when the range reaches the end), and they read as zeroes
//! afterwards (v3: zero clusters; v2: unallocated, and there is no backing file).

use arbitrary::{Arbitrary, Unstructured};
use qcow2kit::create::create_on;
use qcow2kit::options::{Compat, CompressionType};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;

/// Largest virtual size, initial or grown.
const MAX_SIZE: u64 = 4 << 20;
/// Reads are compared in pieces of this size (one reused buffer: large
/// fresh allocations per read made the target slow).
const READ_CHUNK: u64 = 64 << 10;
/// Longest operation sequence.
const MAX_OPS: usize = 48;
/// How far the image file may grow.
const FILE_LIMIT: u64 = 64 << 20;

#[derive(Arbitrary, Debug)]
struct Input {
    /// 9 + this % 8: clusters of 512 B to 64 KiB (16 KiB at least with extended L2).
    cluster_bits: u8,
    /// This % 7: refcounts of 1 to 64 bits (v3 only).
    refcount_order: u8,
    v2: bool,
    extended_l2: bool,
    lazy_refcounts: bool,
    zstd: bool,
    /// Initial size in 512-byte sectors (modulo `MAX_SIZE`).
    sectors: u16,
    knobs: Knobs,
}

/// Open options: small caches force evictions and write-back ordering.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Knobs {
    /// 0: default L2 cache; else this many slices (at least QEMU's minimum of 2).
    l2_slices: u8,
    /// L2 cache slice size: 512 << (this % 8), capped at the cluster size.
    l2_slice_shift: u8,
    /// 0: default refcount cache; else this many blocks.
    refcount_blocks: u8,
    pass_discard_request: bool,
    pass_discard_other: bool,
    discard_no_unref: bool,
}

/// One operation. Offsets are taken modulo the disk size and rounded down to
/// a cluster boundary with `align`; lengths are cut at the end of the disk;
/// `shift` scales a length (`len << shift % 8`, up to 8 MiB).
#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        offset: u32,
        len: u16,
        seed: u8,
        align: bool,
    },
    WriteZeroes {
        offset: u32,
        len: u16,
        shift: u8,
        unmap: bool,
        align: bool,
    },
    Discard {
        offset: u32,
        len: u16,
        shift: u8,
        align: bool,
    },
    Read {
        offset: u32,
        len: u16,
    },
    Flush,
    Grow {
        sectors: u16,
    },
    Reopen {
        knobs: Knobs,
    },
}

/// The setup, then operations until the data runs out (at most `MAX_OPS`).
/// Not `Vec<Op>`'s own encoding, which spends a byte per element on whether
/// to go on and so gives two operations on average.
fn parse(data: &[u8]) -> arbitrary::Result<(Input, Vec<Op>)> {
    let mut u = Unstructured::new(data);
    let input = Input::arbitrary(&mut u)?;
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_OPS {
        ops.push(Op::arbitrary(&mut u)?);
    }
    Ok((input, ops))
}

/// What `data` decodes to, for triage.
pub fn describe(data: &[u8]) -> String {
    match parse(data) {
        Ok((input, ops)) => format!(
            "{:?}\ninitial size {} B\n{input:#?}\n{ops:#?}",
            create_options(&input),
            initial_size(&input)
        ),
        Err(e) => format!("not an input: {e}"),
    }
}

fn initial_size(input: &Input) -> u64 {
    (u64::from(input.sectors) * 512) % (MAX_SIZE + 512)
}

pub fn run(data: &[u8]) {
    let Ok((input, ops)) = parse(data) else {
        return;
    };
    let mut t = Test::create(&input);
    for (i, op) in ops.iter().enumerate() {
        t.apply(i, op);
    }
    t.compare_all("at the end");
    t.img.take().expect("open").close().expect("close");
}

struct Test {
    file: Arc<MemStorage>,
    img: Option<Image>,
    model: Vec<u8>,
    cluster_size: u64,
    buf: Vec<u8>,
}

fn create_options(input: &Input) -> CreateOptions {
    let v2 = input.v2;
    let extended_l2 = input.extended_l2 && !v2;
    let mut cluster_bits = 9 + u64::from(input.cluster_bits % 8);
    if extended_l2 {
        cluster_bits = cluster_bits.max(14);
    }
    let mut o = CreateOptions::new()
        .cluster_size(1 << cluster_bits)
        .extended_l2(extended_l2);
    if v2 {
        o = o.compat(Compat::V2);
    } else {
        o = o
            .compat(Compat::V3)
            .refcount_bits(1 << (input.refcount_order % 7))
            .lazy_refcounts(input.lazy_refcounts);
        if input.zstd {
            o = o.compression_type(CompressionType::Zstd);
        }
    }
    o
}

fn open_options(k: Knobs, cluster_size: u64) -> OpenOptions {
    let slice = (512u64 << (k.l2_slice_shift % 8)).min(cluster_size);
    let mut o = OpenOptions::new()
        .pass_discard_request(k.pass_discard_request)
        .pass_discard_other(k.pass_discard_other)
        .discard_no_unref(k.discard_no_unref);
    if k.l2_slices != 0 {
        o = o
            .l2_cache_entry_size(slice)
            .l2_cache_size(u64::from(k.l2_slices) * slice);
    }
    if k.refcount_blocks != 0 {
        o = o.refcount_cache_size(u64::from(k.refcount_blocks) * cluster_size);
    }
    o
}

/// The bytes a write writes: distinct per operation and position, so a
/// misplaced or stale cluster shows.
fn pattern(op: usize, seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (i as u32).wrapping_mul(0x9e37_79b1) ^ (op as u32).wrapping_mul(0x85eb_ca6b);
            (x >> 24) as u8 ^ seed | 1
        })
        .collect()
}

/// Clamps a fuzz-chosen range into `[0, size)` (see [`Op`]).
fn range(size: u64, offset: u32, len: u64, align: Option<u64>) -> (u64, u64) {
    if size == 0 {
        return (0, 0);
    }
    let mut offset = u64::from(offset) % size;
    if let Some(cs) = align {
        offset = offset / cs * cs;
    }
    (offset, len.min(size - offset))
}

fn scaled(len: u16, shift: u8) -> u64 {
    u64::from(len) << (shift % 8)
}

impl Test {
    fn create(input: &Input) -> Test {
        let opts = create_options(input);
        let size = initial_size(input);
        let file = Arc::new(MemStorage::with_limit(Vec::new(), FILE_LIMIT));
        create_on(file.clone() as Arc<dyn Storage>, &opts, size)
            .unwrap_or_else(|e| panic!("create_on({opts:?}, {size}) failed: {e}"));
        let cluster_size = opts.cluster_size;
        let mut t = Test {
            file,
            img: None,
            model: vec![0; size as usize],
            cluster_size,
            buf: vec![0; READ_CHUNK as usize],
        };
        t.open(input.knobs);
        t
    }

    fn open(&mut self, mut knobs: Knobs) {
        // discard-no-unref needs a v3 image (QEMU refuses it on v2).
        let mut version = [0u8; 4];
        self.file.read_at(&mut version, 4).expect("read version");
        if u32::from_be_bytes(version) < 3 {
            knobs.discard_no_unref = false;
        }
        let opts = open_options(knobs, self.cluster_size);
        let img = Image::open_storage(self.file.clone() as Arc<dyn Storage>, &opts)
            .unwrap_or_else(|e| panic!("open with {knobs:?} failed: {e}"));
        assert_eq!(img.size(), self.model.len() as u64, "size after open");
        self.img = Some(img);
    }

    fn img(&self) -> &Image {
        self.img.as_ref().expect("open")
    }

    fn apply(&mut self, i: usize, op: &Op) {
        let size = self.model.len() as u64;
        let cs = self.cluster_size;
        match *op {
            Op::Write {
                offset,
                len,
                seed,
                align,
            } => {
                let (offset, len) = range(size, offset, len.into(), align.then_some(cs));
                let buf = pattern(i, seed, len as usize);
                self.img()
                    .write_at(&buf, offset)
                    .unwrap_or_else(|e| panic!("op {i} {op:?}: write failed: {e}"));
                self.model[offset as usize..(offset + len) as usize].copy_from_slice(&buf);
            }
            Op::WriteZeroes {
                offset,
                len,
                shift,
                unmap,
                align,
            } => {
                let (offset, len) = range(size, offset, scaled(len, shift), align.then_some(cs));
                self.img()
                    .write_zeroes(offset, len, unmap)
                    .unwrap_or_else(|e| panic!("op {i} {op:?}: write_zeroes failed: {e}"));
                self.model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Discard {
                offset,
                len,
                shift,
                align,
            } => {
                let (offset, len) = range(size, offset, scaled(len, shift), align.then_some(cs));
                self.img()
                    .discard(offset, len)
                    .unwrap_or_else(|e| panic!("op {i} {op:?}: discard failed: {e}"));
                let (start, end) = discarded(offset, len, size, cs);
                if start < end {
                    self.model[start as usize..end as usize].fill(0);
                }
            }
            Op::Read { offset, len } => {
                let (offset, len) = range(size, offset, len.into(), None);
                self.compare(offset, len, &format!("op {i} {op:?}"));
            }
            Op::Flush => self
                .img()
                .flush()
                .unwrap_or_else(|e| panic!("op {i}: flush failed: {e}")),
            Op::Grow { sectors } => {
                let new = (size + u64::from(sectors) * 512).min(MAX_SIZE).max(size);
                self.img()
                    .resize(new)
                    .unwrap_or_else(|e| panic!("op {i}: resize {size} -> {new} failed: {e}"));
                self.model.resize(new as usize, 0);
                assert_eq!(self.img().size(), new, "size after resize");
            }
            Op::Reopen { knobs } => {
                self.img
                    .take()
                    .expect("open")
                    .close()
                    .unwrap_or_else(|e| panic!("op {i}: close failed: {e}"));
                self.open(knobs);
                self.compare_all(&format!("after reopen (op {i})"));
            }
        }
    }

    /// Reads `[offset, offset+len)` (in one request if it fits `READ_CHUNK`)
    /// and compares it with the model.
    fn compare(&mut self, offset: u64, len: u64, when: &str) {
        let img = self.img.as_ref().expect("open");
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(READ_CHUNK);
            let buf = &mut self.buf[..n as usize];
            img.read_at(buf, pos)
                .unwrap_or_else(|e| panic!("{when}: read {pos:#x}+{n:#x} failed: {e}"));
            let want = &self.model[pos as usize..(pos + n) as usize];
            if buf != want {
                let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                panic!(
                    "{when}: guest byte {:#x} reads {:#04x}, model has {:#04x}",
                    pos + at as u64,
                    buf[at],
                    want[at]
                );
            }
            pos += n;
        }
    }

    fn compare_all(&mut self, when: &str) {
        let size = self.model.len() as u64;
        self.compare(0, size, when);
    }
}

/// The guest range a discard of `[offset, offset+len)` zeroes: the whole
/// clusters inside it, and the partial last cluster of the disk when the
/// range covers it entirely.
fn discarded(offset: u64, len: u64, size: u64, cs: u64) -> (u64, u64) {
    let start = offset.div_ceil(cs) * cs;
    let mut end = (offset + len) / cs * cs;
    let last = size / cs * cs;
    if offset + len == size && size % cs != 0 && offset <= last {
        end = size;
    }
    (start, end)
}
