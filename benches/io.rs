//! Criterion benches of the hot I/O paths, each next to the raw-file loop it
//! is measured against (same machine, same run, so the ratio is what counts):
//!
//! * `read/4k_random/{qcow2,raw}`: 4 KiB random reads of a fully allocated 1 GiB image.
//! * `write/4k_overwrite/{qcow2,raw}`: 4 KiB random overwrites of allocated clusters.
//! * `write/4k_alloc/{qcow2,raw}`: 4 KiB sequential writes that each allocate a cluster.
//! * `overlap/<mode>/{overwrite,alloc}`: the cost of each `overlap-check` mode.

#![allow(missing_docs)] // criterion's macros generate undocumented functions

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qcow2kit::options::{OverlapCheckMode, OverlapChecks};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const DISK: u64 = 1 << 30;
const BS: usize = 4096;

/// A tiny xorshift generator: deterministic offsets without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn offset(&mut self, span: u64) -> u64 {
        (self.next() % (span / BS as u64)) * BS as u64
    }
}

fn filled_qcow2(path: &Path, size: u64) -> Image {
    qcow2kit::create::create(path, &CreateOptions::new(), size).expect("create");
    let img = Image::open(path, &OpenOptions::new()).expect("open");
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..size).step_by(chunk.len()) {
        img.write_at(&chunk, off).expect("fill");
    }
    img.flush().expect("flush");
    img
}

fn filled_raw(path: &Path, size: u64) -> File {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("raw");
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..size).step_by(chunk.len()) {
        f.write_all_at(&chunk, off).expect("fill raw");
    }
    f.sync_all().expect("sync");
    f
}

fn reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = filled_qcow2(&dir.path().join("r.qcow2"), DISK);
    let raw = filled_raw(&dir.path().join("r.raw"), DISK);
    let mut g = c.benchmark_group("read/4k_random");
    g.throughput(Throughput::Bytes(BS as u64));
    let mut buf = vec![0u8; BS];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    g.bench_function("qcow2", |b| {
        b.iter(|| {
            img.read_at(black_box(&mut buf), rng.offset(DISK))
                .expect("read")
        })
    });
    g.bench_function("raw", |b| {
        b.iter(|| {
            raw.read_exact_at(black_box(&mut buf), rng.offset(DISK))
                .expect("pread")
        })
    });
    g.finish();
}

fn writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    const SPAN: u64 = 256 << 20;
    let img = filled_qcow2(&dir.path().join("w.qcow2"), SPAN);
    let raw = filled_raw(&dir.path().join("w.raw"), SPAN);
    let data = vec![0xa5u8; BS];
    let mut g = c.benchmark_group("write/4k_overwrite");
    g.throughput(Throughput::Bytes(BS as u64));
    let mut rng = Rng(7);
    g.bench_function("qcow2", |b| {
        b.iter(|| {
            img.write_at(black_box(&data), rng.offset(SPAN))
                .expect("write")
        })
    });
    g.bench_function("raw", |b| {
        b.iter(|| {
            raw.write_all_at(black_box(&data), rng.offset(SPAN))
                .expect("pwrite")
        })
    });
    g.finish();

    // Allocating writes: every 4 KiB write lands in a new 64 KiB cluster.
    let mut g = c.benchmark_group("write/4k_alloc");
    g.throughput(Throughput::Bytes(BS as u64));
    const N: u64 = 1024;
    g.bench_function("qcow2", |b| {
        b.iter_batched(
            || {
                let p = dir.path().join("a.qcow2");
                qcow2kit::create::create(&p, &CreateOptions::new(), N << 16).expect("create");
                Image::open(&p, &OpenOptions::new()).expect("open")
            },
            |img| {
                for i in 0..N {
                    img.write_at(&data, i << 16).expect("alloc write");
                }
                img
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("raw", |b| {
        b.iter_batched(
            || {
                File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(dir.path().join("a.raw"))
                    .expect("raw")
            },
            |f| {
                for i in 0..N {
                    f.write_all_at(&data, i << 16).expect("pwrite");
                }
                f
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn overlap_modes(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    const SPAN: u64 = 64 << 20;
    let path = dir.path().join("o.qcow2");
    drop(filled_qcow2(&path, SPAN));
    let data = vec![0x3cu8; BS];
    for mode in [
        OverlapCheckMode::None,
        OverlapCheckMode::Constant,
        OverlapCheckMode::Cached,
        OverlapCheckMode::All,
    ] {
        let opts = OpenOptions::new().overlap_check(OverlapChecks::from_mode(mode));
        let mut g = c.benchmark_group(format!("overlap/{}", mode.as_str()));
        g.throughput(Throughput::Bytes(BS as u64));
        let img = Image::open(&path, &opts).expect("open");
        let mut rng = Rng(3);
        g.bench_function("overwrite", |b| {
            b.iter(|| {
                img.write_at(black_box(&data), rng.offset(SPAN))
                    .expect("write")
            })
        });
        drop(img);
        g.bench_function("alloc", |b| {
            b.iter_batched(
                || {
                    let p = dir.path().join("oa.qcow2");
                    qcow2kit::create::create(&p, &CreateOptions::new(), 256 << 16).expect("create");
                    Image::open(&p, &opts).expect("open")
                },
                |img| {
                    for i in 0..256u64 {
                        img.write_at(&data, i << 16).expect("alloc write");
                    }
                    img
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, reads, writes, overlap_modes);
criterion_main!(benches);
