//! The storage layer: positioned I/O on the image file.
//!
//! Everything above this module talks to a [`Storage`], never to a
//! `std::fs::File` directly, so tests can substitute an in-memory image
//! ([`MemStorage`]). With the `testing` cargo feature, tests can also inject
//! faults and record writes (`FaultyStorage`, `replay`); those helpers are not
//! part of the default public API.

mod backend;
mod blkdebug;
#[cfg(any(test, feature = "testing"))]
mod faulty;
mod file;
pub mod lock;
mod memory;
mod nbd;
mod null;
mod quorum;
pub(crate) mod sys;
mod tracked;

pub use backend::{open_from_options, BackendSpec, BACKEND_DRIVERS};
pub use blkdebug::{BlkdebugConfig, BlkdebugEvent, BlkdebugStorage, InjectError, SetState};
#[cfg(any(test, feature = "testing"))]
pub use faulty::{replay, Fault, FaultKind, FaultOp, FaultyStorage, RecordedOp};
pub use file::FileStorage;
pub use lock::{LockError, LockRequest, Locking, Permissions};
pub use memory::MemStorage;
pub use nbd::{NbdConfig, NbdServer, NbdStorage};
pub use null::NullStorage;
pub use quorum::{QuorumConfig, QuorumStorage, ReadPattern, SpareError};
pub(crate) use tracked::Tracked;

use std::io::{self, IoSlice, IoSliceMut};

/// Positioned I/O on a file-like object.
///
/// Implementations must be safe to call from several threads at once
/// (`&self` everywhere): qcow2kit does guest data I/O outside its metadata
/// lock. Reads past the end of the storage return zeroes for the missing part
/// (as QEMU's file driver does); writes past the end extend it, filling any gap
/// with zeroes.
///
/// A storage of your own: here a wrapper counting the syncs qcow2kit asks for.
/// Only the five required methods need an implementation.
/// ```
/// use qcow2kit::storage::{MemStorage, Storage};
/// use qcow2kit::{CreateOptions, Image, OpenOptions};
/// use std::io;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
///
/// #[derive(Debug, Default)]
/// struct CountingSyncs {
///     inner: MemStorage,
///     syncs: AtomicU64,
/// }
///
/// impl Storage for CountingSyncs {
///     fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
///         self.inner.read_at(buf, offset)
///     }
///     fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
///         self.inner.write_at(buf, offset)
///     }
///     fn flush(&self) -> io::Result<()> {
///         self.syncs.fetch_add(1, Ordering::Relaxed);
///         self.inner.flush()
///     }
///     fn len(&self) -> io::Result<u64> {
///         self.inner.len()
///     }
///     fn set_len(&self, len: u64) -> io::Result<()> {
///         self.inner.set_len(len)
///     }
/// }
///
/// # fn main() -> qcow2kit::Result<()> {
/// let file = Arc::new(CountingSyncs::default());
/// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 1 << 20)?;
/// let img = Image::open_storage(file.clone(), &OpenOptions::new())?;
/// img.write_at(&[1; 512], 0)?;
/// let before = file.syncs.load(Ordering::Relaxed);
/// img.flush()?;
/// assert!(file.syncs.load(Ordering::Relaxed) > before);
/// # Ok(())
/// # }
/// ```
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

    /// Reads into `bufs`, one after the other, from `offset` on (`preadv`):
    /// the same bytes as one [`Storage::read_at`] per buffer at consecutive
    /// offsets, which is what the default does. `bufs` themselves are not
    /// changed (only the memory they point to).
    ///
    /// # Errors
    /// Any I/O error of the backend; `InvalidInput` if the range overflows.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for b in bufs.iter_mut() {
            let next = pos
                .checked_add(b.len() as u64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.read_at(b, pos)?;
            pos = next;
        }
        Ok(())
    }

    /// Writes `bufs`, one after the other, from `offset` on (`pwritev`): the
    /// same bytes as one [`Storage::write_at`] per buffer at consecutive
    /// offsets, which is what the default does. On an error, any prefix of
    /// the range may have been written.
    ///
    /// # Errors
    /// Any I/O error of the backend; `InvalidInput` if the range overflows.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for b in bufs {
            let next = pos
                .checked_add(b.len() as u64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.write_at(b, pos)?;
            pos = next;
        }
        Ok(())
    }

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

    /// Releases the space of `[offset, offset + len)` (punch a hole). The
    /// length does not change. Advisory: the range reads as zeroes afterwards
    /// only where the backend could release it ([`FileStorage`] on a file
    /// system without hole punching leaves the data, as QEMU's
    /// `discard=unmap` does); callers that need zeroes check
    /// [`is_hole`](Self::is_hole) or use [`write_zeroes`](Self::write_zeroes).
    /// The default writes zeroes.
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // Within the current length only: a discard never grows the storage.
        let end = offset.saturating_add(len).min(self.len()?);
        write_zeroes_by_writing(self, offset, end.saturating_sub(offset))
    }

    /// Makes `[offset, offset + len)` read as zeroes with its space kept
    /// allocated (unlike [`discard`](Self::discard)), extending the storage
    /// if the range ends past it. Used for the parts of a newly allocated
    /// cluster that a write does not cover. The default writes zeroes;
    /// [`FileStorage`] asks the file system (`FALLOC_FL_ZERO_RANGE`), which
    /// is cheaper than writing tens of KiB of zeroes and syncing them.
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeroes_by_writing(self, offset, len)
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

    /// The run starting at `offset` that is all data or all hole, as the
    /// host file system reports it (`SEEK_DATA`/`SEEK_HOLE`): `(is_data,
    /// len)` with `0 < len <= max` for `max > 0`. Past the end of the
    /// storage is a hole. This is what QEMU's file driver answers for block
    /// status; the default says "all data" (no information).
    ///
    /// # Errors
    /// Any I/O error of the backend (callers may treat it as "all data", as
    /// QEMU does).
    fn data_extent(&self, _offset: u64, max: u64) -> io::Result<(bool, u64)> {
        Ok((true, max))
    }

    /// Bytes really allocated on the host (`st_blocks * 512` for a file).
    ///
    /// # Errors
    /// Any I/O error of the backend.
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }

    /// Takes (or changes) QEMU-compatible advisory locks for `req` on the underlying file
    /// (see [`lock`]): on success this storage holds exactly the request's lock bytes until it
    /// is dropped or locked again; on a conflict it keeps what it held before. The default
    /// (storage that no other process can open, such as [`MemStorage`]) takes none.
    ///
    /// # Errors
    /// [`LockError::Conflict`] when another open of the file holds a conflicting lock,
    /// [`LockError::Syscall`] when `fcntl` fails.
    fn lock(&self, _req: &LockRequest) -> Result<(), LockError> {
        Ok(())
    }

    /// Reports a blkdebug event (QEMU's `BLKDBG_EVENT`) to this storage: the format
    /// layer calls it at the points QEMU does (`l2_update`, `cluster_alloc`, ...), so
    /// that a [`BlkdebugStorage`] below can switch its rules on. Other storages ignore it
    /// (the default).
    fn debug_event(&self, _event: BlkdebugEvent) {}

    /// Gives this storage the callback for the events it raises itself (a
    /// [`QuorumStorage`]'s `QUORUM_REPORT_BAD` / `QUORUM_FAILURE`), `None` to stop.
    /// [`crate::Image`] passes its own (from [`crate::Image::on_event`] or
    /// [`crate::OpenOptions::on_event`]) to its image and data file. Wrappers forward
    /// it to what they wrap; the default ignores it.
    fn set_event_sink(&self, _sink: Option<crate::events::EventSink>) {}

    /// The [`QuorumStorage`] this storage is, or wraps (so a job can find
    /// the quorum under an image: a mirror replacing a quorum child).
    /// Wrappers forward it; the default is none.
    fn as_quorum(&self) -> Option<&QuorumStorage> {
        None
    }
}

/// Zeroes shared by the writers of zeroes (no allocation per request).
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// [`Storage::write_zeroes`] by writing zeroes, 64 KiB at a time.
pub(crate) fn write_zeroes_by_writing<S: Storage + ?Sized>(
    s: &S,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(ZEROES.len() as u64);
        let chunk = ZEROES.get(..n as usize).unwrap_or(&ZEROES);
        s.write_at(chunk, pos)?;
        pos += n;
    }
    Ok(())
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        (**self).read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
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
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).is_hole(offset, len)
    }
    fn data_extent(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        (**self).data_extent(offset, max)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        (**self).allocated_bytes()
    }
    fn lock(&self, req: &LockRequest) -> Result<(), LockError> {
        (**self).lock(req)
    }
    fn debug_event(&self, event: BlkdebugEvent) {
        (**self).debug_event(event)
    }
    fn set_event_sink(&self, sink: Option<crate::events::EventSink>) {
        (**self).set_event_sink(sink)
    }

    fn as_quorum(&self) -> Option<&QuorumStorage> {
        (**self).as_quorum()
    }
}
