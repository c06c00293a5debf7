//! Multi-queue stress: four threads share one `Arc<Image>` and do random
//! reads, writes, write-zeroes and discards over the same clusters at once.
//!
//! Writes also go through the mapping API (`reserve_write`, the thread's
//! own data write on the storage, `commit`; a failed data write aborts) and
//! as gather writes; reads also through `map_read` and as scatter reads.
//!
//! Every shared cluster is cut into four stripes, one per thread, so each
//! thread's view is an exact model even though all threads allocate, COW and
//! zero the same guest clusters concurrently (a lost or torn copy-on-write
//! shows as another thread's stripe changing). Each thread also owns whole
//! clusters that it discards and zeroes with unmap, so freed host clusters
//! are reused under the others' in-flight requests.
//!
//! Afterwards every byte must equal the model (read back through the image
//! and, for files, through `qemu-img convert`) and `qemu-img check` must be
//! clean. Under the fault injector a failed request makes its range unknown,
//! the image must stay consistent (`qemu-img check`: leaks at most) and the
//! rest of the model must still hold after reopening.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;
use crate::support::testing::{Fault, FaultKind, FaultOp, FaultyStorage};
use crate::support::Rng;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Error, Extent, Image, OpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

const THREADS: u64 = 4;
/// Shared clusters: every thread writes its stripe of each.
const SHARED: u64 = 24;
/// Whole clusters each thread owns (discarded and zeroed with unmap).
const OWN: u64 = 8;

/// What one thread knows of its bytes: the expected value, and whether the
/// byte may also read as zero (a discard) or is unknown (a failed request).
struct Model {
    bytes: Vec<u8>,
    zero_ok: Vec<bool>,
    unknown: Vec<bool>,
    /// Requests that failed.
    failed: u64,
}

impl Model {
    fn new(n: usize) -> Self {
        Model {
            bytes: vec![0; n],
            zero_ok: vec![false; n],
            unknown: vec![false; n],
            failed: 0,
        }
    }
    fn set(&mut self, at: usize, data: &[u8]) {
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.zero_ok[at..at + data.len()].fill(false);
    }
    fn check(&self, at: usize, got: &[u8], what: &str) {
        for (i, &b) in got.iter().enumerate() {
            let k = at + i;
            let ok = self.unknown[k] || b == self.bytes[k] || (self.zero_ok[k] && b == 0);
            assert!(
                ok,
                "{what}: byte {k} of the model is {b:#x}, want {:#x}",
                self.bytes[k]
            );
        }
    }
}

/// Where thread `t`'s model bytes live on the disk: its stripe of every
/// shared cluster, then its own clusters.
struct Layout {
    cs: u64,
    stripe: u64,
}

impl Layout {
    fn model_len(&self) -> usize {
        (SHARED * self.stripe + OWN * self.cs) as usize
    }
    /// Disk offset of byte `k` of thread `t`'s model.
    fn disk(&self, t: u64, k: u64) -> u64 {
        let shared = SHARED * self.stripe;
        if k < shared {
            (k / self.stripe) * self.cs + t * self.stripe + k % self.stripe
        } else {
            let own0 = SHARED * self.cs + t * OWN * self.cs;
            own0 + (k - shared)
        }
    }
}

/// One thread's random requests; returns its model. `faults` allows
/// failed requests (their range becomes unknown); a poisoned or disabled
/// handle stops the thread.
fn worker(img: &Image, t: u64, iters: u64, faults: bool) -> Model {
    let cs = img.cluster_size();
    let lay = Layout {
        cs,
        stripe: cs / THREADS,
    };
    let mut m = Model::new(lay.model_len());
    let mut rng = Rng::new(0x5eed_0000 + t);
    let shared = SHARED * lay.stripe;
    let mut buf = vec![0u8; cs as usize];
    for i in 0..iters {
        // A range inside one stripe or one own cluster, so it is one
        // contiguous disk range.
        let own = rng.chance(30);
        let (k0, room) = if own {
            let c = rng.below(OWN);
            (shared + c * cs, cs)
        } else {
            let c = rng.below(SHARED);
            (c * lay.stripe, lay.stripe)
        };
        let off = rng.below(room);
        let len = 1 + rng.below((room - off).min(8192));
        let k = (k0 + off) as usize;
        let disk = lay.disk(t, k0 + off);
        let op = rng.below(100);
        let r: Result<(), Error> = if op < 35 {
            // Writes: a third through the mapping API (the data written by
            // this thread on the storage itself), some as gather writes.
            let data = &mut buf[..len as usize];
            rng.fill(data);
            let r = match op % 3 {
                0 => mapped_write(img, data, disk),
                1 => {
                    let (a, b) = data.split_at(data.len() / 2);
                    img.write_vectored_at(&[IoSlice::new(a), IoSlice::new(b)], disk)
                }
                _ => img.write_at(data, disk),
            };
            if r.is_ok() {
                m.set(k, data);
            }
            r
        } else if op < 70 {
            // Reads: also through map_read (this thread's own I/O) and as
            // scatter reads.
            let data = &mut buf[..len as usize];
            let r = match op % 3 {
                0 => mapped_read(img, data, disk),
                1 => {
                    let (a, b) = data.split_at_mut(len as usize / 3);
                    img.read_vectored_at(&mut [IoSliceMut::new(a), IoSliceMut::new(b)], disk)
                }
                _ => img.read_at(data, disk),
            };
            if r.is_ok() {
                m.check(k, data, &format!("thread {t} read {i} at {disk:#x}"));
            }
            r
        } else if op < 85 {
            // Sub-cluster zeroes in a stripe, whole clusters with unmap in
            // an own cluster.
            let (kk, d, n, unmap) = if own {
                ((k0) as usize, lay.disk(t, k0), cs, rng.chance(50))
            } else {
                (k, disk, len, false)
            };
            let r = img.write_zeroes(d, n, unmap);
            if r.is_ok() {
                m.set(kk, &vec![0; n as usize]);
            }
            r
        } else if op < 97 {
            // Discard: whole own clusters are dropped (read as zeroes or,
            // if QEMU would keep them, the old data); in a stripe it is a
            // partial-cluster discard, which must not touch anything.
            let (kk, d, n) = if own {
                (k0 as usize, lay.disk(t, k0), cs)
            } else {
                (k, disk, len)
            };
            let r = img.discard(d, n);
            if r.is_ok() && own {
                m.zero_ok[kk..kk + n as usize].fill(true);
            }
            r
        } else {
            img.flush()
        };
        if let Err(e) = r {
            assert!(faults, "thread {t} request {i}: {e}");
            m.failed += 1;
            match e {
                Error::PreviousIoFailed | Error::MediumGone => return m,
                _ => {
                    // The range may hold old, new or zero bytes now.
                    let n = if own { cs as usize } else { len as usize };
                    let kk = if own { k0 as usize } else { k };
                    m.unknown[kk..kk + n].fill(true);
                }
            }
        }
    }
    m
}

/// Writes `data` at `disk` with `reserve_write`, writing the data to the
/// image's storage itself, then `commit`; a failed data write aborts the
/// reservation (its clusters are released) and fails the request.
fn mapped_write(img: &Image, data: &[u8], disk: u64) -> Result<(), Error> {
    let mut done = 0usize;
    while done < data.len() {
        let res = img.reserve_write(disk + done as u64, (data.len() - done) as u64)?;
        let mut failed = None;
        for e in res.extents() {
            let at = (e.guest - disk) as usize;
            if let Err(err) = img
                .storage()
                .write_at(&data[at..at + e.len as usize], e.host)
            {
                failed = Some(Error::io(qcow2kit::error::IoOp::Write, e.host, err));
                break;
            }
        }
        if let Some(e) = failed {
            res.abort();
            return Err(e);
        }
        done += res.len() as usize;
        res.commit()?;
    }
    Ok(())
}

/// Reads `data` at `disk` through `map_read`, reading data runs from the
/// image's storage itself (nothing here is compressed or backed).
fn mapped_read(img: &Image, data: &mut [u8], disk: u64) -> Result<(), Error> {
    let mut done = 0usize;
    while done < data.len() {
        let map = img.map_read(disk + done as u64, (data.len() - done) as u64)?;
        for e in map.extents() {
            let at = (e.guest - disk) as usize;
            let dst = &mut data[at..at + e.len as usize];
            match e.kind {
                Extent::Data { host } => img
                    .storage()
                    .read_at(dst, host)
                    .map_err(|err| Error::io(qcow2kit::error::IoOp::Read, host, err))?,
                Extent::Zero { .. } | Extent::Unallocated => dst.fill(0),
                Extent::Compressed { .. } => panic!("nothing is compressed here"),
            }
        }
        done += map.len() as usize;
    }
    Ok(())
}

fn run_threads(img: &Arc<Image>, iters: u64, faults: bool) -> Vec<Model> {
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || worker(&img, t, iters, faults))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Checks every thread's model against `read(disk offset, buf)`.
fn verify(models: &[Model], cs: u64, read: &dyn Fn(&mut [u8], u64), what: &str) {
    let lay = Layout {
        cs,
        stripe: cs / THREADS,
    };
    for (t, m) in models.iter().enumerate() {
        let t = t as u64;
        let shared = SHARED * lay.stripe;
        let mut k = 0u64;
        while k < lay.model_len() as u64 {
            let n = if k < shared { lay.stripe } else { cs };
            let mut buf = vec![0u8; n as usize];
            read(&mut buf, lay.disk(t, k));
            m.check(
                k as usize,
                &buf,
                &format!("{what}: thread {t} model byte {k}"),
            );
            k += n;
        }
    }
}

fn disk_size(cs: u64) -> u64 {
    (SHARED + THREADS * OWN) * cs
}

#[test]
fn four_threads_share_clusters_and_match_the_model() {
    if !support::have_qemu() {
        eprintln!("skipping: qemu-img not installed");
        return;
    }
    for (name, opts) in [
        ("64k", "cluster_size=65536"),
        ("16k-ext", "cluster_size=16384,extended_l2=on"),
        ("512-rc1", "cluster_size=512,refcount_bits=1"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{name}.qcow2"));
        let o = CreateOptions::from_qemu_str(opts).unwrap();
        let cs = o.cluster_size;
        qcow2kit::create::create(&path, &o, disk_size(cs)).unwrap();
        let img = Arc::new(Image::open(&path, &OpenOptions::new()).unwrap());
        let models = run_threads(&img, 1500, false);
        verify(
            &models,
            cs,
            &|b, off| img.read_at(b, off).unwrap(),
            &format!("{name} read back"),
        );
        Arc::try_unwrap(img).unwrap().close().unwrap();
        support::assert_check_clean(&path, name);
        let raw = support::qemu_raw(&path);
        verify(
            &models,
            cs,
            &|b, off| b.copy_from_slice(&raw[off as usize..off as usize + b.len()]),
            &format!("{name} through qemu-img"),
        );
    }
}

/// Memory storage whose writes take a while, so that requests overlap in
/// time even on a busy machine (no timing is asserted).
#[derive(Debug)]
struct SlowStorage(MemStorage);

impl Storage for SlowStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(std::time::Duration::from_micros(200));
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len)
    }
}

#[test]
fn slow_writes_under_four_threads_match_the_model() {
    if !support::have_qemu() {
        eprintln!("skipping: qemu-img not installed");
        return;
    }
    let o = CreateOptions::from_qemu_str("cluster_size=4096").unwrap();
    let cs = o.cluster_size;
    let mem = support::mem_create(&o, disk_size(cs));
    let slow = Arc::new(SlowStorage(MemStorage::from_bytes(mem.to_vec())));
    let img = Arc::new(
        Image::open_storage(slow.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap(),
    );
    let models = run_threads(&img, 400, false);
    verify(&models, cs, &|b, off| img.read_at(b, off).unwrap(), "slow");
    Arc::try_unwrap(img).unwrap().close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = support::write_file(dir.path(), "slow.qcow2", &slow.0.to_vec());
    support::assert_check_clean(&path, "slow writes");
}

/// All four threads write their stripe of the same fresh clusters in the
/// same order, so each cluster's first allocation is contended: the later
/// writers must wait for (and then see) the first one's allocation instead
/// of allocating the cluster again.
#[test]
fn contended_first_allocations_keep_every_stripe() {
    if !support::have_qemu() {
        eprintln!("skipping: qemu-img not installed");
        return;
    }
    for opts in ["cluster_size=4096", "cluster_size=16384,extended_l2=on"] {
        let o = CreateOptions::from_qemu_str(opts).unwrap();
        let cs = o.cluster_size;
        let n = 96u64;
        let mem = support::mem_create(&o, n * cs);
        let slow = Arc::new(SlowStorage(MemStorage::from_bytes(mem.to_vec())));
        let img = Arc::new(
            Image::open_storage(slow.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap(),
        );
        let stripe = cs / THREADS;
        let pattern = move |t: u64, c: u64| vec![(1 + t + 4 * (c % 60)) as u8; stripe as usize];
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let img = img.clone();
                std::thread::spawn(move || {
                    for c in 0..n {
                        img.write_at(&pattern(t, c), c * cs + t * stripe).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for c in 0..n {
            for t in 0..THREADS {
                let mut b = vec![0u8; stripe as usize];
                img.read_at(&mut b, c * cs + t * stripe).unwrap();
                assert!(b == pattern(t, c), "{opts}: cluster {c} stripe {t} lost");
            }
        }
        Arc::try_unwrap(img).unwrap().close().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "race.qcow2", &slow.0.to_vec());
        support::assert_check_clean(&path, opts);
    }
}

/// A failed data write of an allocating write releases the clusters it
/// reserved: after the next flush nothing is leaked and the guest range
/// still reads as before.
#[test]
fn a_failed_allocating_data_write_releases_its_clusters() {
    if !support::have_qemu() {
        eprintln!("skipping: qemu-img not installed");
        return;
    }
    let o = CreateOptions::from_qemu_str("cluster_size=4096").unwrap();
    let cs = o.cluster_size;
    let mem = support::mem_create(&o, 1 << 20);
    let faulty = Arc::new(FaultyStorage::new(MemStorage::from_bytes(mem.to_vec())));
    let img = Image::open_storage(faulty.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    // The L2 table and refcount block exist: the next allocating write's
    // first file write is its data.
    img.write_at(&[1; 4096], 0).unwrap();
    img.flush().unwrap();
    faulty.set_fault(Some(Fault {
        op: FaultOp::Write,
        nth: 0,
        kind: FaultKind::Eio,
        persistent: false,
    }));
    let r = img.write_at(&vec![2; 3 * cs as usize], 5 * cs);
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    faulty.set_fault(None);
    let mut b = vec![9u8; 3 * cs as usize];
    img.read_at(&mut b, 5 * cs).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "the failed write left no mapping"
    );
    // The handle is not poisoned: a data write failure fails that request.
    img.write_at(&[3; 4096], 9 * cs).unwrap();
    img.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = support::write_file(dir.path(), "rel.qcow2", &faulty.inner().to_vec());
    support::assert_check_clean(&path, "after a failed allocating write");
}

#[test]
fn failed_requests_under_four_threads_leave_a_consistent_image() {
    if !support::have_qemu() {
        eprintln!("skipping: qemu-img not installed");
        return;
    }
    let o = CreateOptions::from_qemu_str("cluster_size=4096").unwrap();
    let cs = o.cluster_size;
    for (round, (op, nth, persistent)) in [
        (FaultOp::Write, 40, false),
        (FaultOp::Write, 300, false),
        (FaultOp::Write, 150, true),
        (FaultOp::Read, 200, false),
        (FaultOp::Flush, 3, false),
        (FaultOp::Any, 500, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mem = support::mem_create(&o, disk_size(cs));
        let faulty = Arc::new(FaultyStorage::new(MemStorage::from_bytes(mem.to_vec())));
        let img = Arc::new(
            Image::open_storage(faulty.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap(),
        );
        faulty.set_fault(Some(Fault {
            op,
            nth,
            kind: FaultKind::Eio,
            persistent,
        }));
        let mut models = run_threads(&img, 600, true);
        faulty.set_fault(None);
        // Whatever was in flight when the handle stopped is unknown too:
        // only bytes a thread verified or wrote successfully are compared,
        // and a poisoned handle may have lost unflushed writes.
        let closed = Arc::try_unwrap(img).unwrap().close();
        let bytes = faulty.inner().to_vec();
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "f.qcow2", &bytes);
        let what = format!("round {round} ({op:?} #{nth}, persistent {persistent})");
        let failed: u64 = models.iter().map(|m| m.failed).sum();
        assert!(failed > 0, "{what}: the fault never hit a request");
        support::assert_no_corruption(&path, &what);
        if closed.is_ok() {
            // A clean close: everything acknowledged is there.
            let img = Image::open(&path, &OpenOptions::new().read_only(true)).unwrap();
            verify(&models, cs, &|b, off| img.read_at(b, off).unwrap(), &what);
        } else {
            // The handle was poisoned: writes since the last good flush may
            // be lost; the image must still open and read.
            for m in &mut models {
                m.unknown.fill(true);
            }
            let img = Image::open(&path, &OpenOptions::new().read_only(true)).unwrap();
            let mut b = vec![0u8; disk_size(cs) as usize];
            img.read_at(&mut b, 0).unwrap();
        }
    }
}
