//! The one support module of the integration tests, included by every test
//! binary (`#[path = "../support/mod.rs"] mod support;`):
//!
//! - here: whether QEMU is installed ([`have_qemu`]), the one way to run a
//!   program ([`Run`], [`ours`], [`ours_check`], [`qemu`]) and the one "run
//!   ours and QEMU's on twin directories, compare" helper ([`twins`],
//!   [`io_twin`]), plus small byte and JSON helpers;
//! - [`image`]: QEMU as a reference for the library (`qemu-img` output,
//!   check results, maps, reference images), a deterministic RNG and
//!   in-memory images;
//! - [`check`]: damaged twin images for `qcow2-check` against `qemu-img check`;
//! - [`testing`]: the library's fault-injection and write-replay helpers,
//!   imported in this one place only.
#![allow(dead_code, unused_imports)] // Each test binary uses a different subset.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers fail loudly.

pub mod bitmaps;
pub mod check;
pub mod image;
pub mod qsd;

pub use check::*;
pub use image::*;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// The library's test helpers: storage that injects faults and records
/// writes, and the replay of recorded writes. Tests import them from here
/// only, so moving them (e.g. behind a `testing` feature) is a change of
/// this one line.
pub mod testing {
    pub use qcow2kit::storage::{replay, Fault, FaultKind, FaultOp, FaultyStorage, RecordedOp};
}

/// Our `qcow2-img`.
pub const QCOW2_IMG: &str = env!("CARGO_BIN_EXE_qcow2-img");
/// Our `qcow2-check`.
pub const QCOW2_CHECK: &str = env!("CARGO_BIN_EXE_qcow2-check");

/// Whether qemu-img and qemu-io are installed. A test that needs them
/// returns early when they are not, and this prints why (naming the test:
/// libtest names each test's thread after it). CI installs them first.
pub fn have_qemu() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    let ok = *HAVE.get_or_init(|| {
        ["qemu-img", "qemu-io"].iter().all(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
    });
    if !ok {
        let thread = std::thread::current();
        eprintln!(
            "skipping {}: qemu-img/qemu-io not found",
            thread.name().unwrap_or("a test")
        );
    }
    ok
}

/// What a process printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// stdout.
    pub out: String,
    /// stderr.
    pub err: String,
    /// Exit code (128 + signal when killed).
    pub code: i32,
}

/// Runs a prepared command to its end (the one place tests spawn and wait).
pub fn run_cmd(cmd: &mut Command) -> Run {
    use std::os::unix::process::ExitStatusExt;
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let code = o
        .status
        .code()
        .unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0));
    Run {
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
        code,
    }
}

/// Runs `prog ARGS` in `dir`.
pub fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Run {
    run_cmd(Command::new(prog).args(args).current_dir(dir))
}

/// Runs `prog ARGS` in `dir` and asserts success.
#[track_caller]
pub fn run_ok(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let r = run_in(dir, prog, args);
    assert_eq!(r.code, 0, "{prog} {args:?} failed: {r:?}");
    r
}

/// Runs `qcow2-img ARGS` in `dir`.
pub fn ours(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, QCOW2_IMG, args)
}

/// Runs `qcow2-check ARGS` in `dir`.
pub fn ours_check(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, QCOW2_CHECK, args)
}

/// Runs QEMU's `prog` (`qemu-img`, `qemu-io`) in `dir`; its program name in
/// messages is replaced by `qcow2-img` (for `qemu-img SUB:` getopt lines,
/// by `qcow2-img SUB:`).
pub fn qemu(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let mut r = run_in(dir, prog, args);
    r.err = r.err.replace(prog, "qcow2-img");
    r.out = r.out.replace(prog, "qcow2-img");
    r
}

/// Runs QEMU's `prog` and asserts success.
#[track_caller]
pub fn qemu_ok(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let r = qemu(dir, prog, args);
    assert_eq!(r.code, 0, "{prog} {args:?} failed: {r:?}");
    r
}

/// Runs QEMU's `prog ARGS` in `qd` and `qcow2-img OURS ARGS` in `od` (twin
/// directories holding the same files) and asserts the same stdout (timing
/// lines compared by shape, see [`untime`]), stderr and exit code. Returns
/// (QEMU's run, ours).
#[track_caller]
pub fn twins(qd: &Path, od: &Path, prog: &str, ours_sub: &[&str], args: &[&str]) -> (Run, Run) {
    let q = qemu(qd, prog, args);
    let mut full = ours_sub.to_vec();
    full.extend_from_slice(args);
    let o = ours(od, &full);
    assert_eq!(untime(&o.out), untime(&q.out), "stdout of {full:?}");
    assert_eq!(o.err, q.err, "stderr of {full:?}");
    assert_eq!(o.code, q.code, "exit code of {full:?}");
    (q, o)
}

/// `-c` arguments for each command, then the trailing arguments.
pub fn io_args<'a>(pre: &[&'a str], cmds: &[&'a str], post: &[&'a str]) -> Vec<&'a str> {
    let mut v = pre.to_vec();
    for c in cmds {
        v.push("-c");
        v.push(c);
    }
    v.extend_from_slice(post);
    v
}

/// [`twins`] for `qemu-io PRE -c CMD... POST` against `qcow2-img io` with
/// the same arguments; returns our run.
#[track_caller]
pub fn io_twin(qd: &Path, od: &Path, pre: &[&str], cmds: &[&str], post: &[&str]) -> Run {
    twins(qd, od, "qemu-io", &["io"], &io_args(pre, cmds, post)).1
}

/// A scratch directory.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Twin scratch directories (QEMU's, ours), each set up by `setup`.
pub fn twin_dirs(setup: impl Fn(&Path)) -> (tempfile::TempDir, tempfile::TempDir) {
    let (qd, od) = (scratch(), scratch());
    for d in [qd.path(), od.path()] {
        setup(d);
    }
    (qd, od)
}

/// `qemu-img create -q -f qcow2 NAME SIZE` in `dir`.
pub fn qemu_create(dir: &Path, name: &str, size: &str) {
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", name, size],
    );
}

/// Writes a big-endian u64 at `offset` of the file.
pub fn put_u64(path: &Path, offset: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_be_bytes(), offset).unwrap();
}

/// Reads a big-endian u64 at `offset` of the file.
pub fn get_u64(path: &Path, offset: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

/// ORs `bits` into the incompatible-features field (header byte 72).
pub fn set_incompat(path: &Path, bits: u64) {
    let v = get_u64(path, 72);
    put_u64(path, 72, v | bits);
}

/// Replaces the structure-only part of qemu-io timing lines
/// (`64 KiB, 1 ops; 00.00 sec (… ops/sec)` keeps `64 KiB, 1 ops;`); other
/// lines, and whether the text ends in a newline, are kept.
pub fn untime(s: &str) -> String {
    let mut t = s
        .lines()
        .map(|l| match l.find(" ops; ") {
            Some(p) => {
                let rest = &l[p + 6..];
                assert!(
                    rest.ends_with(" ops/sec)") && rest.contains(" sec ("),
                    "timing line shape: {l}"
                );
                format!("{} ops; TIME", &l[..p])
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    if s.ends_with('\n') {
        t.push('\n');
    }
    t
}

/// Removes `actual-size` keys everywhere in a JSON value.
pub fn strip_actual_size(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("actual-size");
            for x in m.values_mut() {
                strip_actual_size(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_actual_size),
        _ => {}
    }
}

/// Parses JSON output.
#[track_caller]
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// `qemu-img map --output json ARGS` run in `dir`, without the host
/// offsets (twins whose allocation is the same place it differently).
#[track_caller]
pub fn qemu_map_no_offsets(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["map", "--output", "json"];
    a.extend_from_slice(args);
    let mut v = json(&qemu_ok(dir, "qemu-img", &a).out);
    if let Some(entries) = v.as_array_mut() {
        for e in entries {
            if let Some(o) = e.as_object_mut() {
                o.remove("offset");
            }
        }
    }
    v
}

/// The backing name and format `qemu-img info -U` reports for `f`.
#[track_caller]
pub fn qemu_backing(dir: &Path, f: &str) -> (serde_json::Value, serde_json::Value) {
    let v = json(&qemu_ok(dir, "qemu-img", &["info", "--output", "json", "-U", f]).out);
    (
        v["backing-filename"].clone(),
        v["backing-filename-format"].clone(),
    )
}

/// Asserts that the raw file `f` holds the same bytes (`qemu-img compare`)
/// with the same holes and data runs (`qemu-img map`) in twin directories
/// `qd` and `od`; `what` names the case in failures.
#[track_caller]
pub fn assert_twin_raw_same(qd: &Path, od: &Path, f: &str, what: &str) {
    let (q, o) = (abs(qd, f), abs(od, f));
    let c = qemu(
        od,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &q, &o],
    );
    assert_eq!(c.code, 0, "{what}: {f} differs: {c:?}");
    let map = ["-f", "raw", f];
    assert_eq!(
        qemu_map_no_offsets(qd, &map),
        qemu_map_no_offsets(od, &map),
        "{what}: {f}'s holes"
    );
}

/// `dir/f` as an absolute path string (for commands that name files in
/// both twin directories).
pub fn abs(dir: &Path, f: &str) -> String {
    dir.join(f).to_string_lossy().into_owned()
}

/// A blkdebug config file failing the `k`-th occurrence of `event` (counted from
/// the node's creation) once with `errno`: a `[set-state]` chain moves the state
/// from 1 to `k` one occurrence at a time, and the `[inject-error]` rule switches
/// on in state `k`, i.e. at the `k`-th occurrence (QEMU activates a rule before
/// the event's state change), and fails the next request.
pub fn kth_occurrence_config(event: &str, k: u64, errno: i32) -> String {
    let mut c = String::new();
    for s in 1..k {
        c.push_str(&format!(
            "[set-state]\nevent = \"{event}\"\nstate = \"{s}\"\nnew_state = \"{}\"\n",
            s + 1
        ));
    }
    c.push_str(&format!(
        "[inject-error]\nevent = \"{event}\"\nerrno = \"{errno}\"\nonce = \"on\"\nstate = \"{k}\"\n"
    ));
    c
}
