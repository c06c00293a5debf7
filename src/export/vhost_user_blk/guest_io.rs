//! The one module of the vhost-user-blk export with `unsafe`: guest memory
//! (a [`VolatileSlice`] of a mapped region) lent to the image's vectored
//! calls as `IoSlice`/`IoSliceMut`, so request data moves between the image
//! file and guest memory with no copy in between.
//!
//! vm-memory has no safe route from a `VolatileSlice` to a Rust slice (its
//! accessors copy, or hand out raw pointers through `ptr_guard`/
//! `ptr_guard_mut`), because guest memory is shared with another process
//! and Rust's aliasing rules cannot bind that process. Every vhost-user
//! back-end that does zero-copy I/O makes the step below; here it is made
//! in one place, for the duration of one call, over plain bytes.
#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::VolatileSlice;

/// Whether two of `slices` share a byte (a driver may point two
/// descriptors at one buffer; mutable views of them must not alias).
fn overlapping<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) -> bool {
    let mut spans: Vec<(usize, usize)> = slices
        .iter()
        .map(|s| {
            let start = s.ptr_guard().as_ptr() as usize;
            (start, start.saturating_add(s.len()))
        })
        .collect();
    spans.sort_unstable();
    spans.windows(2).any(|w| w[1].0 < w[0].1)
}

/// Calls `f` with `slices` as `IoSliceMut`s (for the image to read into),
/// then marks them dirty in their bitmap. `None`, without calling `f`, when
/// two slices overlap: the caller then moves the data through a buffer.
pub(super) fn with_io_mut<B: BitmapSlice, R>(
    slices: &[VolatileSlice<'_, B>],
    f: impl FnOnce(&mut [IoSliceMut<'_>]) -> R,
) -> Option<R> {
    if overlapping(slices) {
        return None;
    }
    let guards: Vec<PtrGuardMut> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iov: Vec<IoSliceMut<'_>> = guards
        .iter()
        .map(|g| {
            // SAFETY: `g` comes from a `VolatileSlice` of a mapped guest
            // memory region, so `g.as_ptr()` is non-null and `g.len()` bytes
            // from it are mapped read-write; the slice borrows the guest
            // memory (which the caller keeps loaded), and the guard keeps
            // the mapping alive, for longer than this `IoSliceMut` (it
            // borrows `guards` and is dropped before they are). The slices
            // do not overlap one another (checked above). `u8` has no invalid
            // values, so whatever the guest or the image writes there
            // concurrently can only change the bytes transferred: the driver
            // handed this buffer to the device until the request completes,
            // and a driver breaking that rule gets torn data, not unsound
            // values. The reference is used only inside `f` and never
            // escapes it.
            IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(g.as_ptr(), g.len()) })
        })
        .collect();
    let r = f(&mut iov);
    drop(iov);
    drop(guards);
    for s in slices {
        s.bitmap().mark_dirty(0, s.len());
    }
    Some(r)
}

/// Calls `f` with `slices` as `IoSlice`s (for the image to write from).
pub(super) fn with_io<B: BitmapSlice, R>(
    slices: &[VolatileSlice<'_, B>],
    f: impl FnOnce(&[IoSlice<'_>]) -> R,
) -> R {
    let guards: Vec<PtrGuard> = slices.iter().map(|s| s.ptr_guard()).collect();
    let iov: Vec<IoSlice<'_>> = guards
        .iter()
        .map(|g| {
            // SAFETY: as in `with_io_mut`: `g.len()` mapped bytes from
            // `g.as_ptr()`, kept mapped by the guard and the borrowed guest
            // memory for longer than this `IoSlice`, read only inside `f`.
            // Shared views may overlap. The guest may still change the
            // bytes (another process, or a driver reusing a buffer it gave
            // away): `u8` has no invalid values, so that only changes what
            // is written.
            IoSlice::new(unsafe { std::slice::from_raw_parts(g.as_ptr(), g.len()) })
        })
        .collect();
    f(&iov)
}
