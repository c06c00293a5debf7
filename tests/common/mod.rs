//! Helpers shared by the `cli_*` tests: run `qcow2-img` and QEMU's tools on
//! twin files in a scratch directory and compare what they print.
#![allow(dead_code)] // Each test crate uses a different subset.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers fail loudly.

use std::path::Path;
use std::process::Command;

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

fn run(cmd: &mut Command) -> Run {
    use std::os::unix::process::ExitStatusExt;
    let o = cmd.output().expect("spawn");
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

/// Runs `qcow2-img ARGS` in `dir`.
pub fn ours(dir: &Path, args: &[&str]) -> Run {
    run(Command::new(env!("CARGO_BIN_EXE_qcow2-img"))
        .args(args)
        .current_dir(dir))
}

/// Runs QEMU's `prog` (`qemu-img`, `qemu-io`) in `dir`; its program name in
/// messages is replaced by `qcow2-img` (for `qemu-img SUB:` getopt lines,
/// by `qcow2-img SUB:`).
pub fn qemu(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let mut r = run(Command::new(prog).args(args).current_dir(dir));
    r.err = r.err.replace(prog, "qcow2-img");
    r.out = r.out.replace(prog, "qcow2-img");
    r
}

/// Runs QEMU's `prog` and asserts success.
pub fn qemu_ok(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let r = qemu(dir, prog, args);
    assert_eq!(r.code, 0, "{prog} {args:?} failed: {r:?}");
    r
}

/// Whether qemu-img and qemu-io are installed; prints why a test is skipped.
pub fn have_qemu(test: &str) -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if !ok {
        eprintln!("skipping {test}: qemu-img/qemu-io not found");
    }
    ok
}

/// A scratch directory.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
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
/// (`64 KiB, 1 ops; 00.00 sec (… ops/sec)` keeps `64 KiB, 1 ops;`).
pub fn untime(s: &str) -> String {
    s.lines()
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
        .join("\n")
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
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}
