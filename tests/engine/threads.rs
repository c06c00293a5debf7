//! Concurrency: four threads do random reads, writes, zero writes, discards
//! and flushes on one `Arc<Image>`, each in its own region and all of them
//! in a shared region. Own regions must equal each thread's model; once the
//! threads are done, every shared cluster must hold exactly one whole-cluster
//! write (or zeroes), never a mix; while they run, a read of a shared cluster
//! may see overlapping writes torn but only ever words written to that
//! cluster; `qemu-img check` is clean afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use support::{assert_bytes_eq, Rng};

const THREADS: u64 = 4;
const OWN: u64 = 2 << 20;
const SHARED_CLUSTERS: u64 = 48;

/// The content of a shared cluster written by `thread` as its `seq`-th
/// write: every 512-byte sector says who wrote it, which write and which
/// sector it is.
fn shared_pattern(cs: u64, thread: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; cs as usize];
    for (i, sector) in v.chunks_mut(512).enumerate() {
        for (j, word) in sector.chunks_mut(8).enumerate() {
            let w = (thread + 1) << 56 | seq << 24 | (i as u64) << 8 | (j as u64 & 0xff);
            word.copy_from_slice(&w.to_be_bytes());
        }
    }
    v
}

/// Which write a shared cluster holds: `Some((thread, seq))`, `None` for
/// zeroes; panics on a torn or foreign content.
fn decode_shared(buf: &[u8], what: &str) -> Option<(u64, u64)> {
    if buf.iter().all(|b| *b == 0) {
        return None;
    }
    let w = u64::from_be_bytes(buf[..8].try_into().unwrap());
    let (thread, seq) = ((w >> 56) - 1, (w >> 24) & 0xffff_ffff);
    assert!(
        thread < THREADS && buf == shared_pattern(buf.len() as u64, thread, seq),
        "{what}: shared cluster is not one whole write (first word {w:#x})"
    );
    Some((thread, seq))
}

#[derive(Default)]
struct SharedLog {
    /// Per shared cluster: every (thread, seq) written, and whether it was
    /// ever zeroed or discarded.
    writes: Vec<HashSet<(u64, u64)>>,
    zeroed: Vec<bool>,
}

fn worker(img: &Image, t: u64, iters: u64, log: &Mutex<SharedLog>, mut model: Vec<u8>) -> Vec<u8> {
    let cs = img.cluster_size();
    let own0 = t * OWN;
    let shared0 = THREADS * OWN;
    let mut rng = Rng::new(t + 1);
    let mut seq = 0u64;
    for i in 0..iters {
        let what = format!("thread {t}, op {i}");
        match rng.below(100) {
            0..=29 => {
                let off = rng.below(OWN - 1);
                let len = (1 + rng.below(3 * cs + 1000)).min(OWN - off);
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                img.write_at(&d, own0 + off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            30..=37 => {
                let off = rng.below(OWN - 1);
                let len = (1 + rng.below(3 * cs + 1000)).min(OWN - off);
                img.write_zeroes(own0 + off, len, rng.chance(50)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            38..=43 => {
                let off = rng.below(OWN - 1);
                let len = (1 + rng.below(4 * cs)).min(OWN - off);
                img.discard(own0 + off, len).unwrap();
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
            }
            44..=59 => {
                let off = rng.below(OWN - 1);
                let len = (1 + rng.below(3 * cs + 1000)).min(OWN - off);
                let mut buf = vec![0u8; len as usize];
                img.read_at(&mut buf, own0 + off).unwrap();
                assert_bytes_eq(&buf, &model[off as usize..(off + len) as usize], &what);
            }
            60..=79 => {
                let c = rng.below(SHARED_CLUSTERS);
                seq += 1;
                // Log before writing: a concurrent reader may see it at once.
                log.lock().unwrap().writes[c as usize].insert((t, seq));
                img.write_at(&shared_pattern(cs, t, seq), shared0 + c * cs)
                    .unwrap();
            }
            80..=84 => {
                let c = rng.below(SHARED_CLUSTERS);
                let n = (1 + rng.below(3)).min(SHARED_CLUSTERS - c);
                {
                    let mut l = log.lock().unwrap();
                    for k in c..c + n {
                        l.zeroed[k as usize] = true;
                    }
                }
                if rng.chance(50) {
                    img.discard(shared0 + c * cs, n * cs).unwrap();
                } else {
                    img.write_zeroes(shared0 + c * cs, n * cs, rng.chance(50))
                        .unwrap();
                }
            }
            85..=96 => {
                let c = rng.below(SHARED_CLUSTERS);
                let mut buf = vec![0u8; cs as usize];
                img.read_at(&mut buf, shared0 + c * cs).unwrap();
                // A read that overlaps writes to the same cluster may see
                // them torn at any byte (block devices, QEMU included,
                // promise no atomicity between overlapping requests in
                // flight, and the page cache copies without a lock), so each
                // aligned 8-byte word is checked on its own: zero, or the
                // word at that place of a write logged for this very
                // cluster, never anything else.
                let l = log.lock().unwrap();
                for (k, word) in buf.chunks(8).enumerate() {
                    let w = u64::from_be_bytes(word.try_into().unwrap());
                    if w == 0 {
                        continue;
                    }
                    let (wt, seq) = ((w >> 56).wrapping_sub(1), (w >> 24) & 0xffff_ffff);
                    let at = ((k as u64 / 64) << 8) | (k as u64 % 64);
                    assert!(
                        wt < THREADS && w & 0xff_ffff == at,
                        "{what}: word {k} of shared cluster {c} is no word of a write: {w:#x}"
                    );
                    assert!(
                        l.writes[c as usize].contains(&(wt, seq)),
                        "{what}: {:?} was never written to shared cluster {c}",
                        (wt, seq)
                    );
                }
            }
            _ => img.flush().unwrap(),
        }
    }
    model
}

fn verify(img: &Image, models: &[Vec<u8>], log: &SharedLog, what: &str) {
    let cs = img.cluster_size();
    for (t, m) in models.iter().enumerate() {
        let mut buf = vec![0u8; OWN as usize];
        img.read_at(&mut buf, t as u64 * OWN).unwrap();
        assert_bytes_eq(&buf, m, &format!("{what}: own region of thread {t}"));
    }
    for c in 0..SHARED_CLUSTERS {
        let mut buf = vec![0u8; cs as usize];
        img.read_at(&mut buf, THREADS * OWN + c * cs).unwrap();
        match decode_shared(&buf, what) {
            Some(w) => assert!(log.writes[c as usize].contains(&w)),
            None => assert!(
                log.zeroed[c as usize] || log.writes[c as usize].is_empty(),
                "{what}: shared cluster {c} reads zero but was written and never zeroed"
            ),
        }
    }
}

/// Iterations per thread: `QCOW2KIT_THREAD_ITERS` overrides the default.
fn iters(default: u64) -> u64 {
    std::env::var("QCOW2KIT_THREAD_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(path: &Path, opts: &CreateOptions, open: &OpenOptions, iters: u64) {
    run_with(path, opts, open, iters, false);
}

/// With `backing`, a raw backing file covers the own regions (not the
/// shared one), so reads and copy-on-write go to it.
fn run_with(path: &Path, opts: &CreateOptions, open: &OpenOptions, iters: u64, backing: bool) {
    let cs = opts.cluster_size;
    let size = THREADS * OWN + SHARED_CLUSTERS * cs;
    let mut initial = vec![0u8; (THREADS * OWN) as usize];
    let mut opts = opts.clone();
    if backing {
        Rng::new(99).fill(&mut initial);
        let b = path.with_extension("raw");
        std::fs::write(&b, &initial).unwrap();
        opts = opts.backing_file(b.to_str().unwrap()).backing_fmt("raw");
    }
    qcow2kit::create::create(path, &opts, size).unwrap();
    let img = Arc::new(Image::open(path, open).unwrap());
    let log = Arc::new(Mutex::new(SharedLog {
        writes: vec![HashSet::new(); SHARED_CLUSTERS as usize],
        zeroed: vec![false; SHARED_CLUSTERS as usize],
    }));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            let log = log.clone();
            let model = initial[(t * OWN) as usize..((t + 1) * OWN) as usize].to_vec();
            std::thread::spawn(move || worker(&img, t, iters, &log, model))
        })
        .collect();
    let models: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let log = log.lock().unwrap();
    verify(&img, &models, &log, "after the threads");
    let img = Arc::into_inner(img).unwrap();
    img.close().unwrap();
    let img = Image::open(path, &OpenOptions::new().read_only(true)).unwrap();
    verify(&img, &models, &log, "after reopening");
    if support::have_qemu() {
        support::assert_check_clean(path, "threads");
        let mut all = vec![0u8; size as usize];
        img.read_at(&mut all, 0).unwrap();
        assert_bytes_eq(&support::qemu_raw(path), &all, "qemu-img convert");
    }
}

#[test]
fn four_threads_4k_clusters_small_caches() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions::new().cluster_size(4096);
    let open = OpenOptions::new()
        .l2_cache_size(4 * 4096)
        .refcount_cache_size(4 * 4096);
    run(&dir.path().join("t.qcow2"), &opts, &open, iters(600));
}

#[test]
fn four_threads_backing_file_lazy_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions::new().cluster_size(16384);
    let open = OpenOptions::new().lazy_refcounts(true);
    run_with(&dir.path().join("t.qcow2"), &opts, &open, iters(500), true);
    let opts = CreateOptions::new().cluster_size(16384).extended_l2(true);
    run_with(
        &dir.path().join("e.qcow2"),
        &opts,
        &OpenOptions::new(),
        iters(500),
        true,
    );
}

#[test]
fn four_threads_64k_extended_l2() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions::new().extended_l2(true).refcount_bits(4);
    run(
        &dir.path().join("t.qcow2"),
        &opts,
        &OpenOptions::new(),
        iters(400),
    );
}

#[test]
fn four_threads_512b_clusters_64bit_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions::new().cluster_size(512).refcount_bits(64);
    run(
        &dir.path().join("t.qcow2"),
        &opts,
        &OpenOptions::new(),
        iters(600),
    );
}

/// A partial zero write into an unallocated unit may zero the whole unit in
/// metadata (as QEMU does) only if nobody wrote to the rest of it
/// meanwhile: a concurrent write to other bytes of the same cluster must
/// never be lost.
#[test]
fn partial_zero_writes_do_not_eat_neighbouring_writes() {
    for (cs, ext) in [(4096u64, false), (65536, true)] {
        let unit = if ext { cs / 32 } else { cs };
        let units = 3000u64;
        let mem = support::mem_create(
            &CreateOptions::new().cluster_size(cs).extended_l2(ext),
            units * unit,
        );
        let img = Arc::new(support::mem_open(&mem, &OpenOptions::new()).unwrap());
        let start = Arc::new(std::sync::Barrier::new(2));
        let z = {
            let (img, start) = (img.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for u in 0..units {
                    img.write_zeroes(u * unit + 8, 100, false).unwrap();
                }
            })
        };
        start.wait();
        for u in 0..units {
            img.write_at(&[0xAB; 64], u * unit + unit / 2).unwrap();
        }
        z.join().unwrap();
        for u in 0..units {
            let mut buf = [0u8; 64];
            img.read_at(&mut buf, u * unit + unit / 2).unwrap();
            assert_eq!(
                buf, [0xAB; 64],
                "unit {u} (cluster size {cs}) lost its write"
            );
        }
    }
}
