//! Helpers shared by the tests of the option modules.

use std::path::Path;
use std::process::Command;

use super::{AmendImageState, Compat};

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;
pub(super) const TIB: u64 = 1024 * GIB;

pub(super) fn fresh_image() -> AmendImageState {
    AmendImageState {
        compat: Compat::V3,
        refcount_bits: 16,
        lazy_refcounts: false,
        has_data_file: false,
        data_file_raw: false,
        backing_file: None,
        backing_fmt: None,
    }
}

/// Whether `tool` runs; prints a note when it does not.
pub(super) fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("note: {tool} is not installed; skipping the cross-check");
    }
    ok
}

pub(super) fn run(dir: &Path, tool: &str, args: &[&str]) -> (String, String) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the QEMU tool");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
