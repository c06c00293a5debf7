//! Crash consistency: scripted operation sequences run on a recording
//! `FaultyStorage`; every prefix of the recorded writes (and, after the last
//! flush before the cut, random subsets of the unflushed writes) is replayed
//! onto the starting image. Each result must open (read-only and
//! read-write), read back everything flushed before the cut, and pass
//! `qemu-img check` without corruption (leaks are allowed).
//!
//! Cut points are sampled (about 30 per scenario, plus some around flushes); set
//! `QCOW2KIT_CRASH_ALL=1` to replay every prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use crate::support::testing::{replay, FaultyStorage, RecordedOp};
use qcow2kit::options::Compat;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::ops::Range;
use std::sync::Arc;
use support::Rng;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Zeroes(u64, u64, bool),
    Discard(u64, u64),
    Flush,
    /// Grow the disk to this size (moves the L1 table when it must grow).
    Resize(u64),
    /// `qemu-img amend -o OPTS` on the open handle (guest content unchanged).
    Amend(&'static str),
    /// A compressed write of whole clusters (compressible data).
    WriteCompressed(u64, u64),
}

/// Compressible data: a short random run repeated.
fn compressible(rng: &mut Rng, len: u64) -> Vec<u8> {
    let mut unit = [0u8; 61];
    rng.fill(&mut unit);
    (0..len as usize).map(|i| unit[i % unit.len()]).collect()
}

/// What a scenario recorded.
struct Recording {
    base: Vec<u8>,
    log: Vec<RecordedOp>,
    /// (log length when a user flush returned, guest content then).
    snapshots: Vec<(usize, Vec<u8>)>,
    /// (log length when an op started, guest range it may change).
    touched: Vec<(usize, Range<usize>)>,
    cluster_size: u64,
}

fn record(opts: &CreateOptions, size: u64, ops: &[Op], open: &OpenOptions) -> Recording {
    let mem = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(mem.clone(), opts, size).unwrap();
    let base = mem.to_vec();
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
    fs.start_recording();
    let img = Image::open_storage(fs.clone() as Arc<dyn Storage>, open).unwrap();
    let cs = img.cluster_size();
    let mut log = Vec::new();
    let mut model = vec![0u8; size as usize];
    let final_size = ops.iter().fold(size, |s, o| match o {
        Op::Resize(n) => (*n).max(s),
        _ => s,
    });
    // The model covers the final size; bytes past the current size are
    // never looked at before the disk grows and then read as zeroes.
    model.resize(final_size as usize, 0);
    let mut snapshots = vec![(0, model.clone())];
    let mut touched = Vec::new();
    let mut rng = Rng::new(size);
    let collect = |log: &mut Vec<RecordedOp>| {
        log.extend(fs.take_log());
        fs.start_recording();
    };
    for op in ops {
        collect(&mut log);
        let start = log.len();
        match *op {
            Op::Write(off, len) => {
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                img.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                touched.push((start, off as usize..(off + len) as usize));
            }
            Op::Zeroes(off, len, unmap) => {
                img.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                touched.push((start, off as usize..(off + len) as usize));
            }
            Op::Discard(off, len) => {
                img.discard(off, len).unwrap();
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
                touched.push((start, off as usize..(off + len) as usize));
            }
            Op::Flush => {
                img.flush().unwrap();
                collect(&mut log);
                snapshots.push((log.len(), model.clone()));
            }
            Op::Resize(n) => {
                img.resize(n).unwrap();
                touched.push((start, 0..0));
            }
            Op::Amend(o) => {
                let opts = qcow2kit::options::AmendOptions::from_qemu_str(o).unwrap();
                qcow2kit::amend::amend_image(&img, &opts).unwrap();
                touched.push((start, 0..0));
            }
            Op::WriteCompressed(off, len) => {
                let d = compressible(&mut rng, len);
                img.write_compressed_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                touched.push((start, off as usize..(off + len) as usize));
            }
        }
    }
    img.close().unwrap();
    collect(&mut log);
    snapshots.push((log.len(), model.clone()));
    Recording {
        base,
        log,
        snapshots,
        touched,
        cluster_size: cs,
    }
}

/// The crash image for cut `p`: the prefix up to the last flush, then the
/// unflushed writes before `p` kept with probability 1/2 (all of them when
/// `rng` is `None`).
fn crash_image(r: &Recording, p: usize, rng: Option<&mut Rng>) -> (Vec<u8>, usize) {
    let durable = r.log[..p]
        .iter()
        .rposition(|o| *o == RecordedOp::Flush)
        .map_or(0, |i| i + 1);
    let mut bytes = replay(&r.base, &r.log[..durable]);
    match rng {
        None => bytes = replay(&bytes, &r.log[durable..p]),
        Some(rng) => {
            let kept: Vec<RecordedOp> = r.log[durable..p]
                .iter()
                .filter(|_| rng.chance(50))
                .cloned()
                .collect();
            bytes = replay(&bytes, &kept);
        }
    }
    (bytes, durable)
}

/// Checks one crash image: opens, flushed data reads back, qemu-img check.
/// Returns whether the crash image was dirty.
fn check_crash(
    r: &Recording,
    bytes: Vec<u8>,
    durable: usize,
    p: usize,
    what: &str,
    qemu: bool,
) -> bool {
    // The newest user flush whose records are all durable.
    let (snap_pos, snap) = r
        .snapshots
        .iter()
        .rfind(|(pos, _)| *pos <= durable)
        .unwrap();
    let changed: Vec<&Range<usize>> = r
        .touched
        .iter()
        .filter(|(start, _)| *start >= *snap_pos && *start < p)
        .map(|(_, range)| range)
        .collect();
    let mut mask = vec![true; snap.len()];
    for range in changed {
        mask[range.clone()].fill(false);
    }
    // With lazy refcounts a crash may leave the dirty bit set: refcounts are
    // then stale by design; a read-write open repairs them first (as QEMU).
    let dirty = u64::from_be_bytes(bytes[72..80].try_into().unwrap()) & 1 != 0;
    let mut repaired = None;
    for ro in [true, false] {
        let mem = Arc::new(MemStorage::from_bytes(bytes.clone()));
        let opened = Image::open_storage(
            mem.clone() as Arc<dyn Storage>,
            &OpenOptions::new().read_only(ro),
        );
        let img = opened.unwrap_or_else(|e| panic!("{what}: open (read-only {ro}) failed: {e}"));
        let mut back = vec![0u8; snap.len()];
        let n = img.size() as usize;
        img.read_at(&mut back[..n], 0)
            .unwrap_or_else(|e| panic!("{what}: read (read-only {ro}) failed: {e}"));
        if let Some(i) = (0..snap.len()).find(|i| mask[*i] && back[*i] != snap[*i]) {
            panic!(
                "{what}: flushed data (read-only {ro}) differs at guest offset {i}: {:02x?} vs {:02x?}",
                &back[i..(i + 16).min(back.len())],
                &snap[i..(i + 16).min(snap.len())]
            );
        }
        if dirty && !ro {
            assert!(
                img.dirty_repair_report().is_some(),
                "{what}: a dirty image was opened read-write without a repair"
            );
        }
        drop(img);
        if ro {
            assert!(
                mem.to_vec() == bytes,
                "{what}: a read-only open changed the image"
            );
        } else if dirty {
            let after = mem.to_vec();
            assert_eq!(
                u64::from_be_bytes(after[72..80].try_into().unwrap()) & 1,
                0,
                "{what}: the dirty bit survived the repair"
            );
            repaired = Some(after);
        }
    }
    if qemu {
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "crash.qcow2", &bytes);
        if dirty {
            // Everything but the refcounts must be consistent: QEMU's repair
            // (what its read-write open does) leaves a clean image.
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-q", "-r", "all", "-f", "qcow2"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(out.status.success(), "{what}: repair failed: {out:?}");
            support::assert_check_clean(&path, &format!("{what}, repaired by QEMU"));
            // And qcow2kit's own repair (done by the read-write open).
            let ours = support::write_file(dir.path(), "ours.qcow2", &repaired.unwrap());
            support::assert_check_clean(&ours, &format!("{what}, repaired by qcow2kit"));
        } else {
            support::assert_no_corruption(&path, what);
        }
    }
    dirty
}

fn cut_points(r: &Recording, n: usize) -> Vec<usize> {
    let len = r.log.len();
    if std::env::var_os("QCOW2KIT_CRASH_ALL").is_some() || len <= n {
        return (0..=len).collect();
    }
    let mut v: Vec<usize> = (0..n).map(|i| i * len / n).collect();
    // Right before and after a few flushes: where ordering matters most.
    let flushes: Vec<usize> = (0..len)
        .filter(|i| r.log[*i] == RecordedOp::Flush)
        .collect();
    for i in (0..flushes.len()).step_by(flushes.len().div_ceil(n / 2).max(1)) {
        v.push(flushes[i]);
        v.push(flushes[i] + 1);
    }
    v.push(len);
    v.sort_unstable();
    v.dedup();
    v
}

fn run_scenario(name: &str, opts: &CreateOptions, size: u64, ops: &[Op]) {
    let dirty = run_scenario_with(name, opts, size, ops, &OpenOptions::new());
    assert_eq!(
        dirty, 0,
        "{name}: dirty crash images without lazy refcounts"
    );
}

/// Runs a scenario; returns how many crash images were dirty.
fn run_scenario_with(
    name: &str,
    opts: &CreateOptions,
    size: u64,
    ops: &[Op],
    open: &OpenOptions,
) -> usize {
    let r = record(opts, size, ops, open);
    let qemu = support::have_qemu();
    let mut rng = Rng::new(0xC0FFEE);
    let cuts = cut_points(&r, 30);
    eprintln!(
        "{name}: {} recorded ops, {} cut points, cluster size {}",
        r.log.len(),
        cuts.len(),
        r.cluster_size
    );
    let mut dirty = 0;
    for &p in &cuts {
        let (bytes, durable) = crash_image(&r, p, None);
        dirty += usize::from(check_crash(
            &r,
            bytes,
            durable,
            p,
            &format!("{name}: prefix {p}"),
            qemu,
        ));
        if durable < p {
            for k in 0..1 {
                let (bytes, durable) = crash_image(&r, p, Some(&mut rng));
                dirty += usize::from(check_crash(
                    &r,
                    bytes,
                    durable,
                    p,
                    &format!("{name}: prefix {p}, subset {k}"),
                    qemu,
                ));
            }
        }
    }
    dirty
}

/// 512 B clusters and 64-bit refcounts: many L2 tables, many refcount
/// blocks, two refcount-table moves; then discards, zero writes and
/// overwrites.
#[test]
fn small_clusters_growing_refcount_table() {
    let opts = CreateOptions::new().cluster_size(512).refcount_bits(64);
    let k = 1024;
    let ops = vec![
        Op::Write(0, 4 * k),
        Op::Write(100 * k + 7, 3000),
        Op::Flush,
        Op::Write(200 * k, 1500 * k),
        Op::Flush,
        Op::Write(3000 * k, 900 * k),
        Op::Write(50 * k, 20 * k),
        Op::Flush,
        Op::Discard(300 * k, 400 * k),
        Op::Flush,
        Op::Zeroes(1000 * k, 100 * k, true),
        Op::Zeroes(1200 * k + 1, 50 * k, false),
        Op::Write(310 * k, 64 * k),
        Op::Flush,
        Op::Write(0, 2 * k),
        Op::Discard(0, 8 * k),
        Op::Write(7000 * k, 600 * k),
        Op::Flush,
        Op::Resize(12 << 20),
        Op::Write(11 << 20, 100 * k),
        Op::Flush,
        Op::Resize(16 << 20),
        Op::Write((16 << 20) - 1000, 1000),
    ];
    run_scenario("512B/rc64", &opts, 8 << 20, &ops);
}

/// Compressed writes packed into shared host clusters, mixed with plain
/// writes, overwrites (copy-on-write out of compressed clusters) and
/// discards: every crash leaves at most leaks, and flushed data reads back.
#[test]
fn compressed_writes() {
    for (cs, bits) in [(4096u64, 16u32), (512, 2)] {
        let opts = CreateOptions::new().cluster_size(cs).refcount_bits(bits);
        let ops = vec![
            Op::WriteCompressed(0, 16 * cs),
            Op::Flush,
            Op::WriteCompressed(32 * cs, 8 * cs),
            Op::Write(20 * cs, 3 * cs),
            Op::WriteCompressed(40 * cs, 4 * cs),
            Op::Flush,
            Op::Write(2 * cs + 100, 200),
            Op::Discard(4 * cs, 4 * cs),
            Op::WriteCompressed(4 * cs, 2 * cs),
            Op::Flush,
            Op::WriteCompressed(100 * cs, 30 * cs),
        ];
        run_scenario(&format!("compressed {cs}/rc{bits}"), &opts, 1 << 20, &ops);
    }
}

/// 4 KiB clusters, 16-bit refcounts, v3 and v2.
#[test]
fn four_k_clusters_v3_and_v2() {
    for compat in [Compat::V3, Compat::V2] {
        let opts = CreateOptions::new().cluster_size(4096).compat(compat);
        let k = 1024;
        let ops = vec![
            Op::Write(1000, 10 * k),
            Op::Flush,
            Op::Write(2048 * k - 100, 300 * k),
            Op::Zeroes(0, 8 * k, false),
            Op::Flush,
            Op::Discard(2048 * k, 64 * k),
            Op::Write(2060 * k, 8 * k),
            Op::Flush,
            Op::Zeroes(2100 * k, 100 * k, true),
            Op::Write(5000 * k, 1000 * k),
        ];
        run_scenario(&format!("4K/{compat:?}"), &opts, 8 << 20, &ops);
    }
}

/// Lazy refcounts: crash images may be dirty (refcounts stale); they open
/// read-only with the flushed data, a read-write open repairs them, and
/// both that repair and QEMU's leave them clean.
#[test]
fn lazy_refcounts() {
    let opts = CreateOptions::new().cluster_size(4096).lazy_refcounts(true);
    let k = 1024;
    let ops = vec![
        Op::Write(1000, 10 * k),
        Op::Flush,
        Op::Write(2048 * k - 100, 300 * k),
        Op::Discard(2048 * k, 64 * k),
        Op::Flush,
        Op::Zeroes(2100 * k, 100 * k, true),
        Op::Write(5000 * k, 500 * k),
        Op::Flush,
        Op::Write(100 * k, 8 * k),
    ];
    let dirty = run_scenario_with(
        "4K/lazy",
        &opts,
        8 << 20,
        &ops,
        &OpenOptions::new().lazy_refcounts(true),
    );
    assert!(
        dirty > 0,
        "no crash image was dirty: lazy refcounts not in use?"
    );
}

/// Extended L2 (16 KiB clusters, 512 B subclusters), 2-bit refcounts.
#[test]
fn extended_l2_subclusters() {
    let opts = CreateOptions::new()
        .cluster_size(16384)
        .extended_l2(true)
        .refcount_bits(2);
    let k = 1024;
    let ops = vec![
        Op::Write(512, 512),
        Op::Write(16 * k + 1000, 2000),
        Op::Flush,
        Op::Zeroes(32 * k, 16 * k, false),
        Op::Zeroes(48 * k + 512, 1024, false),
        Op::Flush,
        Op::Write(1024 * k, 700 * k),
        Op::Discard(1024 * k, 64 * k),
        Op::Flush,
        Op::Write(1030 * k, 5 * k),
        Op::Zeroes(1100 * k, 32 * k, true),
    ];
    run_scenario("extL2-16K/rc2", &opts, 4 << 20, &ops);
}

/// I/O errors instead of crashes: the n-th write (or flush) fails once or
/// for good; the sequence goes on (requests may fail), the handle is
/// dropped, and what is left on the storage must open and pass
/// `qemu-img check` without corruption.
#[test]
fn injected_io_errors_leave_a_consistent_image() {
    use crate::support::testing::{Fault, FaultKind, FaultOp};
    let opts = CreateOptions::new().cluster_size(512).refcount_bits(16);
    let k = 1024;
    let ops = vec![
        Op::Write(0, 4 * k),
        Op::Flush,
        Op::Write(200 * k, 700 * k),
        Op::Discard(300 * k, 100 * k),
        Op::Flush,
        Op::Zeroes(100 * k, 50 * k, true),
        Op::Write(2048 * k, 300 * k),
        Op::Flush,
        Op::Resize(12 << 20),
        Op::Write(11 << 20, 64 * k),
    ];
    let size = 8u64 << 20;
    let mem = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(mem.clone(), &opts, size).unwrap();
    let base = mem.to_vec();
    // Count the calls of a clean run.
    let counts = {
        let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
        fs.set_fault(None);
        run_ops(&fs, &ops);
        fs.counts()
    };
    let qemu = support::have_qemu();
    let mut rng = Rng::new(7);
    for i in 0..40 {
        let (op, total) = if i % 4 == 3 {
            (FaultOp::Flush, counts[2])
        } else {
            (FaultOp::Write, counts[1])
        };
        let nth = rng.below(total);
        let persistent = i % 2 == 1;
        let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
        fs.set_fault(Some(Fault {
            op,
            nth,
            kind: if i % 3 == 0 {
                FaultKind::Enospc
            } else {
                FaultKind::Eio
            },
            persistent,
        }));
        run_ops(&fs, &ops);
        let what = format!("{op:?} {nth} of {total} fails (persistent {persistent})");
        let bytes = fs.inner().to_vec();
        for ro in [true, false] {
            let img = Image::open_storage(
                Arc::new(MemStorage::from_bytes(bytes.clone())) as Arc<dyn Storage>,
                &OpenOptions::new().read_only(ro),
            )
            .unwrap_or_else(|e| panic!("{what}: open (read-only {ro}): {e}"));
            let mut buf = vec![0u8; img.size() as usize];
            img.read_at(&mut buf, 0)
                .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        }
        if qemu {
            let dir = tempfile::tempdir().unwrap();
            let path = support::write_file(dir.path(), "faulty.qcow2", &bytes);
            support::assert_no_corruption(&path, &what);
        }
    }
}

/// Runs `ops` on an image in `fs`, ignoring request errors.
fn run_ops(fs: &Arc<FaultyStorage<MemStorage>>, ops: &[Op]) {
    let Ok(img) = Image::open_storage(fs.clone() as Arc<dyn Storage>, &OpenOptions::new()) else {
        return;
    };
    let mut rng = Rng::new(3);
    for op in ops {
        let _ = match *op {
            Op::Write(off, len) => {
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                img.write_at(&d, off)
            }
            Op::Zeroes(off, len, unmap) => img.write_zeroes(off, len, unmap),
            Op::Discard(off, len) => img.discard(off, len),
            Op::Flush => img.flush(),
            Op::Resize(n) => img.resize(n),
            Op::Amend(o) => match qcow2kit::options::AmendOptions::from_qemu_str(o) {
                Ok(opts) => qcow2kit::amend::amend_image(&img, &opts),
                Err(_) => Ok(()),
            },
            Op::WriteCompressed(off, len) => {
                img.write_compressed_at(&compressible(&mut rng, len), off)
            }
        };
    }
    let _ = img.close();
}

/// Refcount width changes (wider, then down to 1 bit) and a downgrade with
/// zero clusters to expand, with writes through the same handle between
/// them: every prefix opens, reads what was flushed and has at most leaks.
#[test]
fn amend_refcount_width_and_downgrade() {
    for cs in [4096, 512] {
        amend_scenario(cs);
    }
}

fn amend_scenario(cs: u64) {
    let opts = CreateOptions::new().cluster_size(cs);
    let k = 1024;
    let ops = vec![
        Op::Write(0, 300 * k),
        Op::Write(1024 * k, 64 * k),
        Op::Zeroes(2048 * k, 64 * k, false),
        Op::Zeroes(100 * k, 16 * k, false),
        Op::Flush,
        Op::Amend("refcount_bits=64"),
        Op::Flush,
        Op::Write(100 * k, 8 * k),
        Op::Write(3072 * k, 100 * k),
        Op::Flush,
        Op::Amend("refcount_bits=1"),
        Op::Flush,
        Op::Write(5120 * k, 64 * k),
        Op::Zeroes(5120 * k, 8 * k, false),
        Op::Flush,
        Op::Amend("refcount_bits=16,compat=0.10"),
        Op::Flush,
        Op::Write(6144 * k, 8 * k),
    ];
    run_scenario(&format!("{cs}/amend"), &opts, 8 << 20, &ops);
}
