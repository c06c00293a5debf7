//! Fuzz target `check_repair`: see `tests/fuzz_bodies/check_repair.rs` for what it checks.
#![no_main]

#[path = "../../tests/fuzz_bodies/mod.rs"]
#[allow(dead_code)] // each target uses one body
mod fuzz_bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_bodies::check_repair::run(data));
