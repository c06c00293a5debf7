//! Crash replay over internal snapshot create, apply and delete: the
//! operations run on a recording `FaultyStorage`; prefixes of the recorded
//! writes inside each snapshot operation (sampled; and, after the last
//! flush before the cut, a random subset of the unflushed writes) are
//! replayed onto the starting image. Each crash image must open, show the
//! content and snapshot list of before or after the operation, show every
//! listed snapshot's content as it was taken, and leave at most leaks:
//! after `qemu-img check -r leaks` it checks clean (the window where a
//! raised refcount is durable and a COPIED flag not yet changed shows as a
//! COPIED mismatch of a leaked cluster, which the leak repair clears, as
//! with QEMU's own snapshots).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use crate::support::testing::{replay, FaultyStorage, RecordedOp};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::collections::BTreeMap;
use std::sync::Arc;
use support::Rng;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Create(&'static str),
    Apply(&'static str),
    Delete(&'static str),
}

/// The state a crash image may show: current content and snapshots
/// (ID, name) with their contents.
#[derive(Clone)]
struct State {
    content: Vec<u8>,
    snaps: Vec<(String, String)>,
}

struct Recording {
    base: Vec<u8>,
    log: Vec<RecordedOp>,
    /// For each snapshot operation: (log range, state before, state after).
    ops: Vec<(std::ops::Range<usize>, State, State)>,
    /// Snapshot ID -> content when taken.
    taken: BTreeMap<String, Vec<u8>>,
}

fn record(opts: &CreateOptions, size: u64, ops: &[Op]) -> Recording {
    let mem = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(mem.clone(), opts, size).unwrap();
    let base = mem.to_vec();
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
    fs.start_recording();
    let img = Image::open_storage(fs.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    let mut log = Vec::new();
    let mut rng = Rng::new(size);
    let mut state = State {
        content: vec![0u8; size as usize],
        snaps: Vec::new(),
    };
    let mut taken = BTreeMap::new();
    let mut recorded = Vec::new();
    for op in ops {
        log.extend(fs.take_log());
        fs.start_recording();
        let start = log.len();
        let before = state.clone();
        match *op {
            Op::Write(off, len) => {
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                img.write_at(&d, off).unwrap();
                img.flush().unwrap();
                state.content[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::Create(name) => {
                let e = img.snapshot_create(name).unwrap();
                taken.insert(e.id.clone(), state.content.clone());
                state.snaps.push((e.id, name.to_owned()));
            }
            Op::Apply(name) => {
                img.snapshot_apply(name).unwrap();
                let id = &state.snaps.iter().find(|s| s.1 == name).unwrap().0;
                state.content = taken[id].clone();
            }
            Op::Delete(name) => {
                img.snapshot_delete(name).unwrap();
                let i = state.snaps.iter().position(|s| s.1 == name).unwrap();
                state.snaps.remove(i);
            }
        }
        log.extend(fs.take_log());
        fs.start_recording();
        if !matches!(op, Op::Write(..)) {
            recorded.push((start..log.len(), before, state.clone()));
        }
    }
    img.close().unwrap();
    Recording {
        base,
        log,
        ops: recorded,
        taken,
    }
}

fn check_crash(r: &Recording, bytes: Vec<u8>, before: &State, after: &State, what: &str) {
    let mem = Arc::new(MemStorage::from_bytes(bytes.clone()));
    let img = Image::open_storage(
        mem.clone() as Arc<dyn Storage>,
        &OpenOptions::new().read_only(true),
    )
    .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
    let snaps: Vec<(String, String)> = img
        .snapshots()
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    assert!(
        snaps == before.snaps || snaps == after.snaps,
        "{what}: snapshot list {snaps:?}"
    );
    let mut content = vec![0u8; img.size() as usize];
    img.read_at(&mut content, 0).unwrap();
    assert!(
        content == before.content || content == after.content,
        "{what}: content is neither before nor after"
    );
    drop(img);
    for (id, _) in &snaps {
        let v = Image::open_storage(
            Arc::new(MemStorage::from_bytes(bytes.clone())) as Arc<dyn Storage>,
            &OpenOptions::new()
                .read_only(true)
                .load_snapshot(id.as_str()),
        )
        .unwrap();
        let mut c = vec![0u8; v.size() as usize];
        v.read_at(&mut c, 0).unwrap();
        assert!(c == r.taken[id], "{what}: snapshot {id} changed");
    }
    // A read-write open works too.
    let rw = Image::open_storage(
        Arc::new(MemStorage::from_bytes(bytes.clone())) as Arc<dyn Storage>,
        &OpenOptions::new(),
    );
    assert!(rw.is_ok(), "{what}: read-write open failed: {rw:?}");
    drop(rw);
    if support::have_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "crash.qcow2", &bytes);
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-q", "-r", "leaks", "-f", "qcow2"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: leak repair failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            support::human_check(&path)
        );
        support::assert_check_clean(&path, &format!("{what}, leaks repaired"));
    }
}

fn run(name: &str, opts: &CreateOptions, size: u64, ops: &[Op], per_op: usize) {
    let r = record(opts, size, ops);
    let mut rng = Rng::new(0x5eed);
    for (k, (range, before, after)) in r.ops.iter().enumerate() {
        let len = range.end - range.start;
        let mut cuts: Vec<usize> = (0..=per_op)
            .map(|i| range.start + i * len / per_op)
            .collect();
        // Right after each flush of the operation: where ordering matters.
        let flushes: Vec<usize> = range
            .clone()
            .filter(|i| r.log[*i] == RecordedOp::Flush)
            .map(|i| i + 1)
            .collect();
        cuts.extend(
            flushes
                .iter()
                .step_by(flushes.len().div_ceil(per_op).max(1)),
        );
        cuts.sort_unstable();
        cuts.dedup();
        for p in cuts {
            let what = format!("{name}: op {k} ({:?}), prefix {p}", ops_name(&r, k, ops));
            let bytes = replay(&r.base, &r.log[..p]);
            check_crash(&r, bytes, before, after, &what);
            let durable = r.log[..p]
                .iter()
                .rposition(|o| *o == RecordedOp::Flush)
                .map_or(0, |i| i + 1);
            if durable < p {
                let kept: Vec<RecordedOp> = r.log[durable..p]
                    .iter()
                    .filter(|_| rng.chance(50))
                    .cloned()
                    .collect();
                let bytes = replay(&replay(&r.base, &r.log[..durable]), &kept);
                check_crash(&r, bytes, before, after, &format!("{what}, subset"));
            }
        }
    }
}

fn ops_name(_r: &Recording, k: usize, ops: &[Op]) -> String {
    ops.iter()
        .filter(|o| !matches!(o, Op::Write(..)))
        .nth(k)
        .map(|o| format!("{o:?}"))
        .unwrap_or_default()
}

fn scenario() -> Vec<Op> {
    let k = 1024;
    vec![
        Op::Write(0, 300 * k),
        Op::Write(1000 * k, 70 * k),
        Op::Create("a"),
        Op::Write(100 * k, 50 * k),
        Op::Write(2000 * k, 10 * k),
        Op::Create("b"),
        Op::Write(0, 20 * k),
        Op::Apply("a"),
        Op::Write(3000 * k, 5 * k),
        Op::Delete("a"),
        Op::Apply("b"),
        Op::Delete("b"),
    ]
}

#[test]
fn snapshot_ops_4k_clusters() {
    let opts = CreateOptions::new().cluster_size(4096);
    run("4K/rc16", &opts, 4 << 20, &scenario(), 12);
}

#[test]
fn snapshot_ops_extended_l2_small_refcounts() {
    let opts = CreateOptions::new()
        .cluster_size(16384)
        .extended_l2(true)
        .refcount_bits(4);
    run("extL2-16K/rc4", &opts, 4 << 20, &scenario(), 8);
}

#[test]
fn snapshot_ops_512b_clusters() {
    let opts = CreateOptions::new().cluster_size(512).refcount_bits(64);
    run("512B/rc64", &opts, 4 << 20, &scenario(), 8);
}
