//! A host file, accessed with `pread`/`pwrite` (no shared seek position).

use super::lock::{self, HeldLocks, LockError, LockRequest};
use super::{sys, Storage};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A [`Storage`] over a host file using positioned I/O, safe to share between
/// threads.
///
/// Opening takes no locks; [`Storage::lock`] takes QEMU-compatible ones (see
/// [`crate::storage::lock`]), which are released when the storage is dropped.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// The name it was opened by (for lock messages).
    path: Option<PathBuf>,
    /// The lock bytes this open holds.
    locks: Mutex<HeldLocks>,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write.
    ///
    /// # Errors
    /// The error of `open(2)`.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Self::with_path(file, path))
    }

    fn with_path(file: File, path: &Path) -> Self {
        Self {
            file,
            path: Some(path.to_path_buf()),
            locks: Mutex::default(),
        }
    }

    /// Opens a file for creating an image in it: read-write, created if missing, but **not**
    /// truncated, so that locks can be taken ([`LockRequest::create`]) before the old contents
    /// are dropped with `set_len(0)` (as QEMU's `raw_co_create` does).
    ///
    /// # Errors
    /// The error of `open(2)`.
    pub fn open_for_create(path: &Path, new_only: bool) -> io::Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        if new_only {
            oo.create_new(true);
        } else {
            oo.create(true).truncate(false);
        }
        let file = oo.open(path)?;
        Ok(Self::with_path(file, path))
    }

    /// Sets the no-copy-on-write attribute (`chattr +C`; effective on Btrfs for an empty
    /// file).
    ///
    /// # Errors
    /// The error of the `FS_IOC_SETFLAGS` ioctl.
    pub fn set_nocow(&self) -> io::Result<()> {
        sys::set_nocow(&self.file)
    }

    /// Creates (or truncates) a file for writing. With `nocow`, the
    /// no-copy-on-write attribute is set while the file is still empty
    /// (effective on Btrfs, ignored elsewhere, as QEMU does).
    ///
    /// ```
    /// use qcow2kit::storage::{FileStorage, Storage};
    ///
    /// # fn main() -> std::io::Result<()> {
    /// # let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("raw.img");
    /// let f = FileStorage::create(&path, false)?;
    /// f.write_at(&[1; 512], 4096)?;
    /// f.flush()?; // fdatasync
    /// let ro = FileStorage::open(&path, false)?;
    /// assert_eq!(ro.len()?, 4608);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// The error of `open(2)`.
    pub fn create(path: &Path, nocow: bool) -> io::Result<Self> {
        Self::create_with(path, nocow, false)
    }

    /// Like [`FileStorage::create`], but with `new_only` an existing file is
    /// not touched and the call fails with `ErrorKind::AlreadyExists`
    /// (`O_CREAT | O_EXCL`).
    ///
    /// # Errors
    /// The error of `open(2)`.
    pub fn create_with(path: &Path, nocow: bool, new_only: bool) -> io::Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        if new_only {
            oo.create_new(true);
        } else {
            oo.create(true).truncate(true);
        }
        let file = oo.open(path)?;
        if nocow {
            // Like QEMU: failure to set the attribute is not an error.
            let _ = sys::set_nocow(&file);
        }
        Ok(Self::with_path(file, path))
    }

    /// Wraps an already open file.
    pub fn from_file(file: File) -> Self {
        Self {
            file,
            path: None,
            locks: Mutex::default(),
        }
    }

    /// Whether the file has the no-copy-on-write attribute (`chattr +C`).
    pub fn is_nocow(&self) -> bool {
        sys::is_nocow(&self.file).unwrap_or(false)
    }
}

impl Drop for FileStorage {
    /// Releases the locks explicitly instead of leaving it to `close(2)`: a
    /// child process forked by another thread shares the open file
    /// description until it execs, and would keep them alive meanwhile.
    fn drop(&mut self) {
        let held = self.locks.get_mut().unwrap_or_else(|p| p.into_inner());
        lock::release(&self.file, held);
    }
}

impl Storage for FileStorage {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        sys::fallocate(&self.file, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match sys::punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(()),
            // Not supported by the file system: discard is advisory, like QEMU.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        sys::is_hole(&self.file, offset, len)
    }

    fn data_extent(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        sys::data_extent(&self.file, offset, max)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn lock(&self, req: &LockRequest) -> Result<(), LockError> {
        let mut held = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.path.as_deref().unwrap_or(Path::new(""));
        lock::apply(&self.file, path, &mut held, req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    /// The runs are whatever SEEK_DATA/SEEK_HOLE say (file-system blocks),
    /// they tile the file, and past the last data everything is hole.
    #[test]
    fn data_extent_tiles_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let s = FileStorage::create(&path, false).unwrap();
        let len = 1u64 << 20;
        s.set_len(len).unwrap();
        s.write_at(&[7u8; 512], 70_000).unwrap();
        let mut runs = Vec::new();
        let mut pos = 0;
        while pos < len {
            let (data, n) = s.data_extent(pos, len - pos).unwrap();
            assert!(n > 0 && n <= len - pos, "run at {pos}: {n}");
            runs.push((data, pos, n));
            pos += n;
        }
        // Exactly one data run, covering the written bytes, unless the file
        // system reports no holes at all (one data run over everything).
        let data: Vec<_> = runs.iter().filter(|r| r.0).collect();
        assert_eq!(data.len(), 1, "{runs:?}");
        let (_, start, n) = *data[0];
        assert!(start <= 70_000 && start + n >= 70_512, "{runs:?}");
        // Past the end of the file: a hole of the asked length.
        assert_eq!(s.data_extent(len + 4096, 512).unwrap(), (false, 512));
    }
}
