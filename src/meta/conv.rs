//! Checked conversions and lookups for `meta/`: lengths and indices that come
//! from the file (or are derived from it) become `usize` through these
//! helpers, so a value that does not fit, or an index past a table, is a
//! typed error instead of a silent narrowing or a panic.
//!
//! Kept in one small module (rather than inline at each site) so the other
//! files of `meta/` change by one call per site.

use crate::error::{Error, Limit, Result};
use crate::format::Structure;
use crate::types::Geometry;

/// `bytes` (the size of an in-memory copy of `what`, or an offset into one)
/// as `usize`; `Error::TooLarge(Limit::Memory)` when it does not fit this
/// process's address space.
pub(super) fn mem_len(what: Structure, bytes: u64) -> Result<usize> {
    usize::try_from(bytes).map_err(|_| Error::TooLarge(Limit::Memory { what, bytes }))
}

/// An index, count or length bounded by an in-memory table or buffer (or by
/// a caller's chunk size) as `usize`; a value that does not fit is a broken
/// invariant of the caller (`Error::Internal`).
pub(super) fn usize_of(i: u64) -> Result<usize> {
    usize::try_from(i)
        .map_err(|_| Error::Internal(format!("{i:#x} used as an in-memory index or length")))
}

/// The cluster size of `g` in bytes as `usize`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "header validation caps cluster_bits at 21, so the cluster size (at most 2 MiB) fits any usize of 32 bits or more"
)]
pub(super) fn cluster_bytes(g: &Geometry) -> usize {
    g.cluster_size as usize
}

/// Entry `i` of `table`, or `Error::Internal` naming `what` when `i` is past
/// its end.
pub(super) fn get<T: Copy>(table: &[T], i: usize, what: &str) -> Result<T> {
    table.get(i).copied().ok_or_else(|| {
        Error::Internal(format!(
            "{what} index {i} beyond its {} entries",
            table.len()
        ))
    })
}

/// A mutable reference to entry `i` of `table`, or `Error::Internal` naming
/// `what` when `i` is past its end.
pub(super) fn get_mut<'a, T>(table: &'a mut [T], i: usize, what: &str) -> Result<&'a mut T> {
    let len = table.len();
    table
        .get_mut(i)
        .ok_or_else(|| Error::Internal(format!("{what} index {i} beyond its {len} entries")))
}
