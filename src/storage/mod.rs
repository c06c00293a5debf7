//! The storage layer: positioned I/O on the image file.
//!
//! Everything above this module talks to a [`Storage`], never to a
//! `std::fs::File` directly, so tests can substitute an in-memory image
//! ([`MemStorage`]), inject faults and record writes ([`FaultyStorage`]).

mod faulty;
mod file;
mod memory;
pub(crate) mod sys;
mod tracked;

pub use faulty::{replay, Fault, FaultKind, FaultOp, FaultyStorage, RecordedOp};
pub use file::FileStorage;
pub use memory::MemStorage;
pub(crate) use tracked::Tracked;

use std::io;

/// Positioned I/O on a file-like object.
///
/// Implementations must be safe to call from several threads at once
/// (`&self` everywhere): qcow2kit does guest data I/O outside its metadata
/// lock. Reads past the end of the storage return zeroes for the missing part
/// (as QEMU's file driver does); writes past the end extend it, filling any gap
/// with zeroes.
#[allow(clippy::len_without_is_empty)] // a file of length 0 is not "empty" in any useful sense
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zero.
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, extending the storage if needed.
    ///
    /// # Errors
    /// Any I/O error of the backend (ENOSPC when full).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable (`fdatasync`).
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn flush(&self) -> io::Result<()>;

    /// Current length in bytes.
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn len(&self) -> io::Result<u64>;

    /// Truncates or extends to `len` bytes (new bytes read as zero).
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Reserves space for `[offset, offset + len)` (`fallocate`), extending the
    /// storage if needed. The default writes nothing and only extends.
    ///
    /// # Errors
    /// Any I/O error of the backend, ENOSPC when the space cannot be reserved.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if end > self.len()? {
            self.set_len(end)?;
        }
        Ok(())
    }

    /// Releases the space of `[offset, offset + len)` (punch a hole); the range
    /// reads as zeroes afterwards. The length does not change. The default
    /// writes zeroes.
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.len()?);
        let zeros = vec![0u8; 64 * 1024];
        let mut pos = offset;
        while pos < end {
            let n = usize::try_from((end - pos).min(zeros.len() as u64)).unwrap_or(zeros.len());
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Whether `[offset, offset + len)` is known to read as zeroes without
    /// holding data (a hole). Used by `map` to report preallocated metadata
    /// as zero. The default says "not known".
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn is_hole(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Bytes really allocated on the host (`st_blocks * 512` for a file).
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).allocate(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).is_hole(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        (**self).allocated_bytes()
    }
}
