//! The commit job into a raw base: the chain is raw "base" (0x11 in
//! [0, 1M)) <- qcow2 "mid" (0x22 in [1M, 2M)) <- qcow2 "top" (0x33 in
//! [2M, 3M), and a zero cluster over the base's data at 512K). Active and
//! intermediate commits, and a crash replay of an offline commit.

use crate::jobs::{assert_commit_crash_safe, expected, job_opts, Files, MIB, SIZE};
use crate::support::testing::FaultyStorage;
use qcow2kit::job::{commit, CommitOptions, JobOutcome, JobStatus};
use qcow2kit::options::CreateOptions;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{Image, OpenOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the zero cluster of "top" hides base data, and its length.
const ZERO_AT: u64 = 512 << 10;
const ZERO_LEN: u64 = 64 << 10;

struct RawChain {
    files: Arc<Files>,
    faulty: HashMap<&'static str, Arc<FaultyStorage<MemStorage>>>,
}

fn raw_chain() -> RawChain {
    let mut base = vec![0u8; SIZE as usize];
    base[..MIB as usize].fill(0x11);
    let faulty: HashMap<&'static str, Arc<FaultyStorage<MemStorage>>> = [
        (
            "base",
            Arc::new(FaultyStorage::new(MemStorage::from_bytes(base))),
        ),
        ("mid", Arc::new(FaultyStorage::new(MemStorage::new()))),
        ("top", Arc::new(FaultyStorage::new(MemStorage::new()))),
    ]
    .into_iter()
    .collect();
    let st = |n: &str| -> Arc<dyn Storage> { faulty[n].clone() };
    let o = |b: &str, f: &str| CreateOptions::new().backing_file(b).backing_fmt(f);
    qcow2kit::create::create_on(st("mid"), &o("base", "raw"), SIZE).unwrap();
    qcow2kit::create::create_on(st("top"), &o("mid", "qcow2"), SIZE).unwrap();
    let files = Arc::new(Files(
        ["base", "mid", "top"]
            .into_iter()
            .map(|n| (n.to_string(), st(n)))
            .collect(),
    ));
    let opts = OpenOptions::new().file_resolver(files.clone());
    let mid = Image::open_storage(st("mid"), &opts).unwrap();
    mid.write_at(&vec![0x22; MIB as usize], MIB).unwrap();
    mid.close().unwrap();
    let top = Image::open_storage(st("top"), &opts).unwrap();
    top.write_at(&vec![0x33; MIB as usize], 2 * MIB).unwrap();
    top.write_zeroes(ZERO_AT, ZERO_LEN, false).unwrap();
    top.close().unwrap();
    RawChain { files, faulty }
}

impl RawChain {
    fn opts(&self) -> OpenOptions {
        OpenOptions::new().file_resolver(self.files.clone())
    }
    fn device(&self) -> Arc<Image> {
        let top = self.files.0["top"].clone();
        Arc::new(Image::open_storage(top, &self.opts().with_filename("top".into())).unwrap())
    }
    fn base_bytes(&self) -> Vec<u8> {
        let mut v = self.faulty["base"].inner().to_vec();
        v.resize(SIZE as usize, 0);
        v
    }
}

/// The guest view through "top" before any commit.
fn top_view() -> Vec<u8> {
    let mut v = expected(&[(0x11, 0), (0x22, MIB), (0x33, 2 * MIB)]);
    v[ZERO_AT as usize..(ZERO_AT + ZERO_LEN) as usize].fill(0);
    v
}

/// An active commit into the raw base (the default base): the raw file
/// ends up reading as the device, including what the embedder wrote after
/// the ready event and the zeroed range over the base's old data.
#[test]
fn active_commit_into_a_raw_base() {
    let c = raw_chain();
    let device = c.device();
    let job = commit(
        device.clone(),
        CommitOptions {
            job: job_opts(None, 0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait_ready(), JobStatus::Ready);
    device.write_at(&[0x44; 4096], 3 * MIB).unwrap();
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    let mut want = top_view();
    want[3 * MIB as usize..3 * MIB as usize + 4096].fill(0x44);
    assert_eq!(c.base_bytes(), want);
    let mut buf = vec![0u8; SIZE as usize];
    device.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, want);
}

/// Committing "mid" (an intermediate image) into the raw base: "top" then
/// names the base with the format `raw` and reads as before; the base
/// holds mid's view (not top's data).
#[test]
fn intermediate_commit_into_a_raw_base_rewrites_the_overlay() {
    let c = raw_chain();
    let device = c.device();
    let job = commit(
        device.clone(),
        CommitOptions {
            job: job_opts(None, 0),
            top: Some(PathBuf::from("mid")),
            base: Some(PathBuf::from("base")),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert_eq!(c.base_bytes(), expected(&[(0x11, 0), (0x22, MIB)]));
    drop(device);
    let top = Image::open_storage(c.files.0["top"].clone(), &c.opts()).unwrap();
    assert_eq!(top.header().backing_file_name(), Some("base"));
    assert_eq!(top.header().backing_format(), Some("raw"));
    let mut buf = vec![0u8; SIZE as usize];
    top.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, top_view());
}

/// A crash at any point of an offline commit into the raw base (the copy,
/// then emptying "top") leaves a chain that reads as before: every prefix
/// of the writes each file received, replayed onto its bytes from before.
#[test]
fn a_crash_anywhere_in_a_commit_into_a_raw_base_keeps_the_chain_readable() {
    let c = raw_chain();
    let want = top_view();
    let opts = CommitOptions {
        job: job_opts(None, 0),
        base: Some(PathBuf::from("base")),
        ..Default::default()
    };
    let mut base = assert_commit_crash_safe(&c.faulty, || c.device(), opts, &want);
    // Emptied, "top" shows the base, which now holds the whole view.
    base.resize(SIZE as usize, 0);
    assert_eq!(base, want);
}

/// The chain of `tests/cli/commit.rs`'s raw case, on files: base.raw (1 MiB
/// of 0x01) <- mid.qcow2 (4 KiB clusters, 0x02 at 1M, a zeroed 64 KiB over
/// the base's data) <- top.qcow2 (128 KiB clusters, 0x03 at 2M).
fn raw_files(dir: &std::path::Path) {
    use crate::support::qemu_ok;
    let img = |args: &[&str]| qemu_ok(dir, "qemu-img", args);
    img(&["create", "-q", "-f", "raw", "base.raw", "4M"]);
    qemu_ok(
        dir,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 1M", "base.raw"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
    ]);
    qemu_ok(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 2 1M 1M",
            "-c",
            "write -z 256k 64k",
            "mid.qcow2",
        ],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=128k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    qemu_ok(dir, "qemu-io", &["-c", "write -P 3 2M 1M", "top.qcow2"]);
}

/// An intermediate commit of mid.qcow2 into base.raw against QEMU's
/// `block-commit` (qemu-storage-daemon on top.qcow2): base.raw holds the
/// same bytes with the same allocation (`qemu-img map`: the zeroed range is
/// written, not punched, in an intermediate commit), top.qcow2 has the same
/// backing strings and reads the same, and the completion event matches.
#[test]
fn intermediate_commit_into_a_raw_base_matches_qemu_block_commit() {
    use crate::support::qsd::{have_qsd, Qsd};
    use crate::support::{
        abs, assert_twin_raw_same, have_qemu, qemu, qemu_backing, qemu_map_no_offsets, twin_dirs,
    };
    if !have_qemu() || !have_qsd() {
        return;
    }
    let (qd, od) = twin_dirs(raw_files);
    let (qd, od) = (qd.path(), od.path());
    let mut q = Qsd::start(qd, "top.qcow2");
    let done = q
        .run_job(
            "block-commit",
            serde_json::json!({"top": "mid.qcow2", "base": "base.raw"}),
        )
        .unwrap();
    q.quit();
    assert!(done.get("error").is_none(), "{done}");

    let (events, seen) = crate::jobs::sink();
    let device = Arc::new(Image::open(od.join("top.qcow2"), &OpenOptions::new()).unwrap());
    let job = commit(
        device.clone(),
        CommitOptions {
            job: job_opts(events, 0),
            top: Some(od.join("mid.qcow2")),
            base: Some(od.join("base.raw")),
            backing_file: Some("base.raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    drop(device);
    let ours = seen
        .lock()
        .unwrap()
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .find(|v| v["event"] == "BLOCK_JOB_COMPLETED")
        .expect("BLOCK_JOB_COMPLETED");
    for k in ["type", "len", "offset", "speed"] {
        assert_eq!(ours["data"][k], done[k], "{k}");
    }
    assert_twin_raw_same(qd, od, "base.raw", "intermediate commit");
    assert_eq!(
        qemu_map_no_offsets(qd, &["top.qcow2"]),
        qemu_map_no_offsets(od, &["top.qcow2"])
    );
    assert_eq!(qemu_backing(qd, "top.qcow2"), qemu_backing(od, "top.qcow2"));
    let c = qemu(
        od,
        "qemu-img",
        &["compare", &abs(qd, "top.qcow2"), &abs(od, "top.qcow2")],
    );
    assert_eq!(c.code, 0, "top.qcow2 differs: {c:?}");
    assert_eq!(qemu(od, "qemu-img", &["check", "top.qcow2"]).code, 0);
}
