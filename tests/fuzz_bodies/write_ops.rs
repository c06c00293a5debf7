//! `write_ops`: a valid image made by `create_on` with fuzz-chosen options
//! (cluster size, refcount width, v2/v3, extended L2), then a sequence of
//! operations (write, write-zeroes with or without unmap, discard, read,
//! flush, grow, close-and-reopen with fuzz-chosen cache and discard options,
//! internal snapshot create/apply/delete, compressed writes of whole clusters
//! (through `write_compressed_at` or a cluster at a time through
//! `compress_cluster`/`write_compressed_cluster`; a cluster that already has a
//! host cluster must be refused); some writes are gather writes, some
//! go through the mapping API (`reserve_write`, the data written to the file
//! by the test, `commit`; sometimes after an aborted reservation of the same
//! range), and every read is also done as a scatter read and through `map_read`)
//! against a model of the disk (64 KiB pages; absent pages are zeroes).
//!
//! Disks are small (up to 4 MiB) or, one time in four, large (16 MiB up to
//! what an L1 table of `MAX_L1` bytes maps: 4 GiB with 512-byte clusters,
//! 64 TiB with 64 KiB ones); a grow can turn a small disk into a large one.
//! On a large disk operations land in a window at its start or at its end.
//!
//! On a valid image every operation must succeed (but for the refusals its
//! `Op` variant names: refcount overflow and QEMU's v2 resize refusal around
//! snapshots, `ClusterAllocated` for a compressed write onto a cluster with a
//! host cluster) and every read must equal
//! the model; after each reopen and at the end the whole disk (a small one)
//! or both windows and every page ever written (a large one) are compared,
//! and after each close `qcow2kit::check` must find no corruption, no leak
//! and write nothing.
//!
//! Discard follows its documented contract (`Image::discard`): only whole
//! clusters inside the range are discarded (plus a partial last cluster of
//! the disk when the range reaches the end), and they read as zeroes
//! afterwards (v3: zero clusters; v2: unallocated, and there is no backing file).

use arbitrary::{Arbitrary, Unstructured};
use qcow2kit::check::{check_storage, CheckOptions, Repair};
use qcow2kit::create::create_on;
use qcow2kit::options::{Compat, CompressionType};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Error, Image, OpenOptions};
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

/// Largest small disk; operations on larger disks land in windows this big.
const WINDOW: u64 = 4 << 20;
/// Largest L1 table, which bounds the virtual size.
const MAX_L1: u64 = 1 << 20;
/// Model page size.
const PAGE: u64 = 64 << 10;
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
    /// Initial size in 512-byte sectors (modulo `WINDOW`), plus
    /// `1 << (24 + big / 4 % 16)` bytes when `big % 4 == 0`.
    sectors: u16,
    big: u8,
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

/// One operation. Offsets are taken modulo the disk size (a large disk: bit
/// 31 picks the window at its start or end, the rest modulo `WINDOW`) and
/// rounded down to a cluster boundary with `align`; lengths are cut at the
/// end of the disk; `shift` scales a length (`len << shift % 8`, up to
/// 8 MiB). A grow adds `sectors` * 512 bytes, shifted left by `shift / 4 %
/// 24` when `shift % 4 == 0`, up to the size `MAX_L1` allows.
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
        shift: u8,
    },
    Reopen {
        knobs: Knobs,
    },
    /// An internal snapshot of the current content.
    SnapshotCreate,
    /// Apply snapshot `index % count` (if any).
    SnapshotApply {
        index: u8,
    },
    /// Delete snapshot `index % count` (if any).
    SnapshotDelete {
        index: u8,
    },
    /// A compressed write of `clusters % 4 + 1` whole clusters from a
    /// cluster-aligned offset (cut at the end of the disk, so a partial last
    /// cluster too). The data compresses (a short run repeated), or does not
    /// (`seed % 4 == 0`: written uncompressed, as QEMU does), or is all
    /// zeroes (`seed % 4 == 1`: compressed like any other). With `seed &
    /// 0x10` the whole range goes through `write_compressed_at`, otherwise a
    /// cluster at a time through `compress_cluster` and
    /// `write_compressed_cluster` (what `convert -c` does). A cluster whose
    /// data compresses must be refused (`Error::ClusterAllocated`, nothing
    /// written) when it already has a host cluster; `write_compressed_at`
    /// stops there, having written the clusters before it.
    WriteCompressed {
        offset: u32,
        clusters: u8,
        seed: u8,
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
    let small = (u64::from(input.sectors) * 512) % (WINDOW + 512);
    let size = if input.big.is_multiple_of(4) {
        small + (1 << (24 + u32::from(input.big / 4 % 16)))
    } else {
        small
    };
    size.min(max_size(&create_options(input)))
}

/// The largest size whose L1 table fits in `MAX_L1` bytes, in whole sectors.
fn max_size(o: &CreateOptions) -> u64 {
    let l2_entry = if o.extended_l2 { 16 } else { 8 };
    let per_l1 = o.cluster_size * (o.cluster_size / l2_entry);
    (per_l1 * (MAX_L1 / 8)).min(i64::MAX as u64 / 2) / 512 * 512
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
    t.check_closed("at the end");
    if std::env::var_os("FUZZ_QEMU_CHECK").is_some() {
        qemu_check(&t.file.to_vec());
    }
}

/// With `FUZZ_QEMU_CHECK` set: `qemu-img check` must also find the closed
/// image clean (no corruption, no leak): a second oracle beside
/// `qcow2kit::check`; off by default (a process per input).
fn qemu_check(image: &[u8]) {
    let path = std::env::temp_dir().join(format!("qcow2kit-fuzz-{}.qcow2", std::process::id()));
    std::fs::write(&path, image).expect("write image for qemu-img");
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
        .expect("run qemu-img");
    if !out.status.success() {
        let keep = path.with_extension("failed.qcow2");
        let _ = std::fs::rename(&path, &keep);
        panic!(
            "qemu-img check ({}) on {}:\n{}{}",
            out.status,
            keep.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_file(&path);
}

struct Test {
    file: Arc<MemStorage>,
    img: Option<Image>,
    model: Model,
    /// Internal snapshots: name, disk size and pages when taken.
    snaps: Vec<(String, u64, HashMap<u64, Vec<u8>>)>,
    cluster_size: u64,
    max_size: u64,
    buf: Vec<u8>,
    want: Vec<u8>,
}

/// The disk as it should read: pages of `PAGE` bytes, absent ones zero.
struct Model {
    size: u64,
    pages: HashMap<u64, Vec<u8>>,
}

impl Model {
    /// Calls `f(page index, offset in page, range of the caller's buffer)`
    /// for each page piece of `[offset, offset+len)`.
    fn pieces(offset: u64, len: u64, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
        let mut pos = offset;
        while pos < offset + len {
            let in_page = pos % PAGE;
            let n = (PAGE - in_page).min(offset + len - pos);
            let at = (pos - offset) as usize;
            f(pos / PAGE, in_page as usize, at..at + n as usize);
            pos += n;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let pages = &mut self.pages;
        Self::pieces(offset, data.len() as u64, |p, at, r| {
            let page = pages.entry(p).or_insert_with(|| vec![0; PAGE as usize]);
            page[at..at + r.len()].copy_from_slice(&data[r]);
        });
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let pages = &mut self.pages;
        Self::pieces(offset, len, |p, at, r| {
            if let Some(page) = pages.get_mut(&p) {
                page[at..at + r.len()].fill(0);
            }
        });
    }

    fn read(&self, offset: u64, out: &mut [u8]) {
        Self::pieces(offset, out.len() as u64, |p, at, r| {
            match self.pages.get(&p) {
                Some(page) => out[r.clone()].copy_from_slice(&page[at..at + r.len()]),
                None => out[r].fill(0),
            }
        });
    }
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

/// The data of a compressed write (see [`Op::WriteCompressed`]):
/// incompressible, all zeroes, or a short run of pattern bytes repeated.
fn compressed_data(op: usize, seed: u8, len: usize) -> Vec<u8> {
    match seed % 4 {
        0 => {
            // xorshift64: no structure for the compressor to find.
            let mut x = (op as u64) << 8 | u64::from(seed) | 1 << 40;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 32) as u8
                })
                .collect()
        }
        1 => vec![0; len],
        _ => {
            let unit = pattern(op, seed, usize::from(seed % 61) + 3);
            (0..len).map(|i| unit[i % unit.len()]).collect()
        }
    }
}

/// Clamps a fuzz-chosen range into `[0, size)` (see [`Op`]).
fn range(size: u64, offset: u32, len: u64, align: Option<u64>) -> (u64, u64) {
    if size == 0 {
        return (0, 0);
    }
    let mut offset = if size <= 2 * WINDOW {
        u64::from(offset) % size
    } else if offset >> 31 == 0 {
        u64::from(offset) % WINDOW
    } else {
        size - WINDOW + u64::from(offset) % WINDOW
    };
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
            model: Model {
                size,
                pages: HashMap::new(),
            },
            snaps: Vec::new(),
            cluster_size,
            max_size: max_size(&opts),
            buf: vec![0; READ_CHUNK as usize],
            want: vec![0; READ_CHUNK as usize],
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
        assert_eq!(img.size(), self.model.size, "size after open");
        self.img = Some(img);
    }

    fn img(&self) -> &Image {
        self.img.as_ref().expect("open")
    }

    fn apply(&mut self, i: usize, op: &Op) {
        let size = self.model.size;
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
                let r = if seed % 4 == 3 {
                    // Same bytes as a gather write, cut at three points.
                    let cuts = pieces_of(buf.len(), seed);
                    let bufs: Vec<_> = cuts.iter().map(|r| IoSlice::new(&buf[r.clone()])).collect();
                    self.img().write_vectored_at(&bufs, offset)
                } else if seed % 4 == 2 {
                    // Through the mapping API, the data written by "the
                    // caller"; sometimes a reservation given up first.
                    mapped_write(self.img(), &self.file, &buf, offset, seed & 0x10 != 0)
                } else {
                    self.img().write_at(&buf, offset)
                };
                r.unwrap_or_else(|e| panic!("op {i} {op:?}: write failed: {e}"));
                self.model.write(offset, &buf);
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
                self.model.zero(offset, len);
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
                    self.model.zero(start, end - start);
                }
            }
            Op::Read { offset, len } => {
                let (offset, len) = range(size, offset, len.into(), None);
                self.compare(offset, len, &format!("op {i} {op:?}"));
                self.compare_vectored(offset, len, &format!("op {i} {op:?} (vectored)"));
                self.compare_mapped(offset, len, &format!("op {i} {op:?} (mapped)"));
            }
            Op::Flush => self
                .img()
                .flush()
                .unwrap_or_else(|e| panic!("op {i}: flush failed: {e}")),
            Op::Grow { sectors, shift } => {
                let mut add = u64::from(sectors) * 512;
                if shift % 4 == 0 {
                    add <<= shift / 4 % 24;
                }
                let new = (size + add).min(self.max_size).max(size);
                match self.img().resize(new) {
                    Ok(()) => {}
                    // QEMU cannot resize a v2 image with internal snapshots.
                    Err(Error::InvalidArgument(_)) if !self.snaps.is_empty() => {
                        return;
                    }
                    Err(e) => panic!("op {i}: resize {size} -> {new} failed: {e}"),
                }
                self.model.size = new;
                assert_eq!(self.img().size(), new, "size after resize");
            }
            Op::Reopen { knobs } => {
                self.img
                    .take()
                    .expect("open")
                    .close()
                    .unwrap_or_else(|e| panic!("op {i}: close failed: {e}"));
                self.check_closed(&format!("after close (op {i})"));
                self.open(knobs);
                self.compare_all(&format!("after reopen (op {i})"));
            }
            Op::SnapshotCreate => {
                let name = format!("s{i}");
                match self.img().snapshot_create(&name) {
                    Ok(_) => self.snaps.push((name, size, self.model.pages.clone())),
                    // 1- and 2-bit refcounts cannot share clusters that much:
                    // refused, nothing changed.
                    Err(Error::RefcountOverflow { .. }) => {}
                    Err(e) => panic!("op {i}: snapshot create failed: {e}"),
                }
            }
            Op::SnapshotApply { index } => {
                if self.snaps.is_empty() {
                    return;
                }
                let k = usize::from(index) % self.snaps.len();
                let name = self.snaps[k].0.clone();
                match self.img().snapshot_apply(&name) {
                    Ok(()) => {
                        self.model.size = self.snaps[k].1;
                        self.model.pages = self.snaps[k].2.clone();
                        assert_eq!(self.img().size(), self.model.size, "size after apply");
                    }
                    // Small refcount widths; a v2 image cannot change size.
                    Err(Error::RefcountOverflow { .. } | Error::InvalidArgument(_)) => {}
                    Err(e) => panic!("op {i}: snapshot apply of {name} failed: {e}"),
                }
            }
            Op::WriteCompressed {
                offset,
                clusters,
                seed,
            } => {
                let len = (u64::from(clusters % 4) + 1) * cs;
                let (offset, len) = range(size, offset, len, Some(cs));
                if len > 0 {
                    let data = compressed_data(i, seed, len as usize);
                    self.write_compressed(
                        offset,
                        &data,
                        seed & 0x10 != 0,
                        &format!("op {i} {op:?}"),
                    );
                }
            }
            Op::SnapshotDelete { index } => {
                if self.snaps.is_empty() {
                    return;
                }
                let k = usize::from(index) % self.snaps.len();
                let (name, _, _) = self.snaps.remove(k);
                self.img()
                    .snapshot_delete(&name)
                    .unwrap_or_else(|e| panic!("op {i}: snapshot delete of {name} failed: {e}"));
            }
        }
    }

    /// Writes `data` at `offset` (cluster-aligned) compressed, as
    /// [`Op::WriteCompressed`] says, predicting each cluster's refusal from
    /// its mapping before anything is written, and updates the model with
    /// what was written.
    fn write_compressed(&mut self, offset: u64, data: &[u8], whole: bool, when: &str) {
        let img = self.img.as_ref().expect("open");
        let cs = self.cluster_size as usize;
        // (guest offset, the cluster ready to write, refused).
        let mut clusters = Vec::new();
        for (k, chunk) in data.chunks(cs).enumerate() {
            let pos = offset + (k * cs) as u64;
            let c = img
                .compress_cluster(chunk)
                .unwrap_or_else(|e| panic!("{when}: compress_cluster failed: {e}"));
            let host = img
                .host_cluster(pos)
                .unwrap_or_else(|e| panic!("{when}: host_cluster {pos:#x} failed: {e}"));
            let status = img
                .block_status(pos, chunk.len() as u64)
                .unwrap_or_else(|e| panic!("{when}: block_status {pos:#x} failed: {e}"));
            let allocated =
                host.is_some() || matches!(status.extent, qcow2kit::Extent::Compressed { .. });
            let refused = c.is_compressed() && allocated;
            clusters.push((pos, c, refused));
        }
        let expect_refusal = |r: qcow2kit::Result<()>, pos: u64| match r {
            Err(Error::ClusterAllocated { offset }) if offset == pos => {}
            other => panic!("{when}: cluster {pos:#x} has a host cluster, got {other:?}"),
        };
        if whole {
            let r = img.write_compressed_at(data, offset);
            let first_refused = clusters.iter().position(|(_, _, refused)| *refused);
            let written = match first_refused {
                None => {
                    r.unwrap_or_else(|e| panic!("{when}: write_compressed_at failed: {e}"));
                    data.len()
                }
                Some(k) => {
                    expect_refusal(r, clusters[k].0);
                    k * cs
                }
            };
            self.model.write(offset, &data[..written]);
        } else {
            for (k, (pos, c, refused)) in clusters.iter().enumerate() {
                let r = img.write_compressed_cluster(c, *pos);
                if *refused {
                    expect_refusal(r, *pos);
                    continue;
                }
                r.unwrap_or_else(|e| {
                    panic!("{when}: write_compressed_cluster {pos:#x} failed: {e}")
                });
                let chunk = &data[k * cs..((k + 1) * cs).min(data.len())];
                self.model.write(*pos, chunk);
            }
        }
    }

    /// `qcow2kit::check` on the closed image: no corruption, no leak, no
    /// check error, and the check writes nothing.
    fn check_closed(&self, when: &str) {
        let before = self.file.to_vec();
        let report = check_storage(
            self.file.clone() as Arc<dyn Storage>,
            Repair::None,
            CheckOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{when}: check failed: {e}"));
        let c = &report.counts;
        assert!(
            c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0,
            "{when}: check found {} corruptions, {} leaks, {} check errors",
            c.corruptions,
            c.leaks,
            c.check_errors
        );
        assert!(
            self.file.to_vec() == before,
            "{when}: check wrote to the image"
        );
    }

    /// Reads `[offset, offset+len)` (in one request if it fits `READ_CHUNK`)
    /// and compares it with the model.
    fn compare(&mut self, offset: u64, len: u64, when: &str) {
        let img = self.img.as_ref().expect("open");
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(READ_CHUNK) as usize;
            let (buf, want) = (&mut self.buf[..n], &mut self.want[..n]);
            img.read_at(buf, pos)
                .unwrap_or_else(|e| panic!("{when}: read {pos:#x}+{n:#x} failed: {e}"));
            self.model.read(pos, want);
            if buf != want {
                let at = buf
                    .iter()
                    .zip(want.iter())
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                panic!(
                    "{when}: guest byte {:#x} reads {:#04x}, model has {:#04x}",
                    pos + at as u64,
                    buf[at],
                    want[at]
                );
            }
            pos += n as u64;
        }
    }

    /// Reads `[offset, offset+len)` (at most `READ_CHUNK`) as a scatter read
    /// into pieces and compares it with the model.
    fn compare_vectored(&mut self, offset: u64, len: u64, when: &str) {
        let img = self.img.as_ref().expect("open");
        let n = len.min(READ_CHUNK) as usize;
        let (buf, want) = (&mut self.buf[..n], &mut self.want[..n]);
        buf.fill(0xa5);
        {
            let mut rest: &mut [u8] = buf;
            let mut bufs = Vec::new();
            for r in pieces_of(n, (offset ^ len) as u8) {
                let (a, b) = rest.split_at_mut(r.len());
                bufs.push(IoSliceMut::new(a));
                rest = b;
            }
            img.read_vectored_at(&mut bufs, offset)
                .unwrap_or_else(|e| panic!("{when}: read {offset:#x}+{n:#x} failed: {e}"));
        }
        self.model.read(offset, want);
        if buf != want {
            let at = buf
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{when}: guest byte {:#x} reads {:#04x}, model has {:#04x}",
                offset + at as u64,
                buf[at],
                want[at]
            );
        }
    }

    /// Reads `[offset, offset+len)` (at most `READ_CHUNK`) through
    /// `map_read`, doing the I/O of data runs on the file itself (compressed
    /// runs through `read_at`), and compares it with the model.
    fn compare_mapped(&mut self, offset: u64, len: u64, when: &str) {
        let img = self.img.as_ref().expect("open");
        let n = len.min(READ_CHUNK) as usize;
        let (buf, want) = (&mut self.buf[..n], &mut self.want[..n]);
        buf.fill(0x5a);
        let mut compressed = Vec::new();
        let mut done = 0usize;
        while done < n {
            let map = img
                .map_read(offset + done as u64, (n - done) as u64)
                .unwrap_or_else(|e| panic!("{when}: map_read failed: {e}"));
            assert!(!map.is_empty(), "{when}: empty mapping");
            assert!(!map.in_data_file(), "{when}: no data file here");
            for e in map.extents() {
                let at = (e.guest - offset) as usize;
                let dst = &mut buf[at..at + e.len as usize];
                match e.kind {
                    qcow2kit::Extent::Data { host } => self
                        .file
                        .read_at(dst, host)
                        .unwrap_or_else(|e| panic!("{when}: file read failed: {e}")),
                    qcow2kit::Extent::Zero { .. } | qcow2kit::Extent::Unallocated => dst.fill(0),
                    qcow2kit::Extent::Compressed { .. } => compressed.push((e.guest, e.len)),
                }
            }
            done += map.len() as usize;
            // Compressed runs through `read_at`, after the mapping is dropped
            // (nothing may wait for the image while holding one).
            drop(map);
            for (guest, len) in compressed.drain(..) {
                let at = (guest - offset) as usize;
                img.read_at(&mut buf[at..at + len as usize], guest)
                    .unwrap_or_else(|e| panic!("{when}: read of a compressed run failed: {e}"));
            }
        }
        self.model.read(offset, want);
        if buf != want {
            let at = buf
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{when}: guest byte {:#x} reads {:#04x}, model has {:#04x}",
                offset + at as u64,
                buf[at],
                want[at]
            );
        }
    }

    /// Compares the whole disk (small), or both windows and every page ever
    /// written (large).
    fn compare_all(&mut self, when: &str) {
        let size = self.model.size;
        if size <= 2 * WINDOW {
            return self.compare(0, size, when);
        }
        self.compare(0, WINDOW, when);
        self.compare(size - WINDOW, WINDOW, when);
        let mut pages: Vec<u64> = self.model.pages.keys().copied().collect();
        pages.sort_unstable();
        for p in pages {
            let start = p * PAGE;
            self.compare(start, PAGE.min(size - start), when);
        }
    }
}

/// The guest range a discard of `[offset, offset+len)` zeroes: the whole
/// clusters inside it, and the partial last cluster of the disk when the
/// range covers it entirely.
/// `0..len` cut at three points chosen from `seed` (empty pieces possible).
/// Writes `buf` at `offset` with `reserve_write`, the data going straight
/// to `file` as a caller with its own I/O would do it, then `commit`;
/// `abort_first`: a reservation of the same range is given up before.
fn mapped_write(
    img: &Image,
    file: &MemStorage,
    buf: &[u8],
    offset: u64,
    abort_first: bool,
) -> qcow2kit::Result<()> {
    if abort_first && !buf.is_empty() {
        img.reserve_write(offset, buf.len() as u64)?.abort();
    }
    let mut done = 0usize;
    while done < buf.len() {
        let res = img.reserve_write(offset + done as u64, (buf.len() - done) as u64)?;
        assert!(!res.is_empty() && !res.in_data_file(), "{res:?}");
        for e in res.extents() {
            let at = (e.guest - offset) as usize;
            file.write_at(&buf[at..at + e.len as usize], e.host)
                .map_err(|err| qcow2kit::Error::io(qcow2kit::error::IoOp::Write, e.host, err))?;
        }
        done += res.len() as usize;
        res.commit()?;
    }
    Ok(())
}

fn pieces_of(len: usize, seed: u8) -> Vec<std::ops::Range<usize>> {
    let s = usize::from(seed);
    let mut cuts = [
        0,
        len * (s % 7) / 7,
        len * (s % 5) / 5,
        len / (s % 3 + 1),
        len,
    ];
    cuts.sort_unstable();
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

fn discarded(offset: u64, len: u64, size: u64, cs: u64) -> (u64, u64) {
    let start = offset.div_ceil(cs) * cs;
    let mut end = (offset + len) / cs * cs;
    let last = size / cs * cs;
    if offset + len == size && !size.is_multiple_of(cs) && offset <= last {
        end = size;
    }
    (start, end)
}
