//! `null-co` / `null-aio`: a device of a fixed size with no storage behind it.

use super::Storage;
use std::io;
use std::time::Duration;

/// QEMU's `null-co`/`null-aio` driver: writes succeed and are dropped, reads succeed.
///
/// QEMU leaves the read buffer untouched unless `read-zeroes=on`; this storage always
/// fills it with zeroes (there is no caller buffer state to preserve in a Rust API), so
/// `read-zeroes` only changes what [`Storage::data_extent`] reports: a hole with
/// `read-zeroes=off` (QEMU's `map` says "not allocated"), data with `on`.
/// Requests that reach past `size` fail with EIO, as in QEMU; the size cannot change.
///
/// ```
/// use qcow2kit::storage::{NullStorage, Storage};
///
/// # fn main() -> std::io::Result<()> {
/// let n = NullStorage::new(1 << 20);
/// n.write_at(&[1; 512], 0)?; // dropped
/// let mut buf = [0xffu8; 512];
/// n.read_at(&mut buf, 0)?;
/// assert_eq!(buf, [0; 512]);
/// assert!(n.read_at(&mut buf, 1 << 20).is_err()); // past the end
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullStorage {
    size: u64,
    read_zeroes: bool,
    latency: Duration,
}

impl NullStorage {
    /// A null device of `size` bytes, `read-zeroes=off`, no latency.
    pub fn new(size: u64) -> Self {
        NullStorage {
            size,
            read_zeroes: false,
            latency: Duration::ZERO,
        }
    }

    /// QEMU's `read-zeroes` (see the type's documentation).
    pub fn read_zeroes(mut self, on: bool) -> Self {
        self.read_zeroes = on;
        self
    }

    /// QEMU's `latency-ns`: every request sleeps this long before completing.
    pub fn latency_ns(mut self, ns: u64) -> Self {
        self.latency = Duration::from_nanos(ns);
        self
    }

    fn request(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        if end > self.size {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
        Ok(())
    }
}

impl Storage for NullStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.request(offset, buf.len())?;
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.request(offset, buf.len())
    }

    fn flush(&self) -> io::Result<()> {
        self.request(0, 0)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOTSUP))
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn is_hole(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(true)
    }

    fn data_extent(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        let in_size = self.size.saturating_sub(offset);
        if in_size == 0 {
            return Ok((false, max));
        }
        Ok((self.read_zeroes, max.min(in_size)))
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(0)
    }
}
