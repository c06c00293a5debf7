//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, shared with
//! `tests/fuzz_regressions.rs` so that `cargo test` replays every committed
//! regression input through exactly the code the fuzzer ran.
//!
//! Each module has `pub fn run(data: &[u8])`. A body panics only on a real
//! finding (a library panic, a broken round trip, a divergence from the
//! model); `Err` results from the library are fine where the input is invalid.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a body panics on a finding

pub mod check_repair;
pub mod header;
pub mod open_read;
pub mod options;
pub mod write_ops;

/// A target body: panics on a finding.
pub type Body = fn(&[u8]);

/// The fuzz targets, by name (the directory names under `fuzz/seeds/` and
/// `fuzz/regressions/`), with their bodies.
pub const TARGETS: &[(&str, Body)] = &[
    ("check_repair", check_repair::run),
    ("header", header::run),
    ("open_read", open_read::run),
    ("options", options::run),
    ("write_ops", write_ops::run),
];
