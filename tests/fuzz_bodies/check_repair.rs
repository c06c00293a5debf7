//! `check_repair`: arbitrary bytes as an image file on `MemStorage`.
//!
//! * A check without repair must not write a single byte.
//! * `-r all`, then a second check: either a typed error, or — when the
//!   repair reports no remaining corruption — the second check finds no
//!   corruption and the same leaks as the repair's double check (a few
//!   pathological images keep leaks even a rebuild cannot reclaim; qemu-img
//!   fails outright on those). Never a panic.
//!
//! Images naming a backing file or an external data file are skipped (the
//! checker would open host files named by the input). The storage may grow
//! by at most `GROW_LIMIT` bytes.

use qcow2kit::check::{check_storage, CheckOptions, Repair};
use qcow2kit::format::consts::INCOMPAT_DATA_FILE;
use qcow2kit::format::header::Header;
use qcow2kit::storage::MemStorage;
use std::sync::Arc;

/// How far the image file may grow during a repair.
const GROW_LIMIT: u64 = 16 << 20;

pub fn run(data: &[u8]) {
    match Header::decode_for_check(data) {
        Ok(h) if h.backing_file.is_none() && h.incompatible_features & INCOMPAT_DATA_FILE == 0 => {}
        _ => return,
    }
    let limit = data.len() as u64 + GROW_LIMIT;
    let mem = Arc::new(MemStorage::with_limit(data.to_vec(), limit));
    let _ = check_storage(mem.clone(), Repair::None, CheckOptions::default());
    assert!(
        mem.to_vec() == data,
        "a check without repair changed the image"
    );
    let Ok(report) = check_storage(mem.clone(), Repair::All, CheckOptions::default()) else {
        return;
    };
    if report.counts.corruptions == 0 && report.counts.check_errors == 0 {
        if let Ok(again) = check_storage(mem.clone(), Repair::None, CheckOptions::default()) {
            assert_eq!(
                again.counts.corruptions, 0,
                "corruptions after a clean repair"
            );
            // Leaks may remain where even a rebuild cannot place the
            // refcount structures cleanly (qemu-img fails outright on such
            // images), but the repair's double check must agree with a
            // fresh check.
            assert_eq!(
                again.counts.leaks, report.counts.leaks,
                "leaks differ from the repair's double check"
            );
        }
    }
}
