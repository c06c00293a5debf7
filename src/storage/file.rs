//! A host file, accessed with `pread`/`pwrite` (no shared seek position).

use super::lock::{self, HeldLocks, LockError, LockRequest};
use super::{sys, Storage};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

/// Alignment of offsets, lengths and buffers for `O_DIRECT` I/O: 4 KiB
/// covers every logical block size Linux supports below the page size.
const DIRECT_ALIGN: usize = 4096;

/// Largest bounce buffer used for one piece of an `O_DIRECT` request.
const DIRECT_CHUNK: usize = 1 << 20;

/// A [`Storage`] over a host file using positioned I/O, safe to share between
/// threads.
///
/// Opening takes no locks; [`Storage::lock`] takes QEMU-compatible ones (see
/// [`crate::storage::lock`]), which are released when the storage is dropped.
///
/// Opened with `direct` ([`FileStorage::open_with`], `cache.direct=on`), the
/// file bypasses the page cache (`O_DIRECT`): requests whose offset, length
/// or buffer are not 4 KiB aligned go through aligned bounce buffers, and
/// partial blocks are read, modified and written back. Such read-modify-write
/// cycles exclude every other write for their duration, so concurrent
/// writers never lose each other's bytes.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// The name it was opened by (for lock messages).
    path: Option<PathBuf>,
    /// The lock bytes this open holds.
    locks: Mutex<HeldLocks>,
    /// `Some` with `O_DIRECT`: writes take it for reading, read-modify-write
    /// cycles for writing.
    direct: Option<RwLock<()>>,
    /// `FALLOC_FL_ZERO_RANGE` failed as unsupported once (tmpfs, NFS...):
    /// zeroes are written from then on.
    no_zero_range: std::sync::atomic::AtomicBool,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write.
    ///
    /// # Errors
    /// The error of `open(2)`.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        Self::open_with(path, writable, false)
    }

    /// Opens an existing file, read-only or read-write, with `O_DIRECT` if
    /// `direct` (QEMU's `cache.direct=on`).
    ///
    /// # Errors
    /// The error of `open(2)`: `EINVAL` when the file system does not support
    /// `O_DIRECT`.
    pub fn open_with(path: &Path, writable: bool, direct: bool) -> io::Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(writable);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path)?;
        let mut s = Self::with_path(file, path);
        s.direct = direct.then(|| RwLock::new(()));
        Ok(s)
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn with_path(file: File, path: &Path) -> Self {
        Self {
            file,
            path: Some(path.to_path_buf()),
            locks: Mutex::default(),
            direct: None,
            no_zero_range: Default::default(),
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

    /// Wraps an already open file (opened without `O_DIRECT`).
    pub fn from_file(file: File) -> Self {
        Self {
            file,
            path: None,
            locks: Mutex::default(),
            direct: None,
            no_zero_range: Default::default(),
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

/// A heap buffer whose start is [`DIRECT_ALIGN`]-aligned (found inside a
/// slightly larger allocation, so no `unsafe` is needed).
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let v = vec![0u8; len + DIRECT_ALIGN];
        let start = v.as_ptr().align_offset(DIRECT_ALIGN);
        if start >= DIRECT_ALIGN {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(Self { v, start, len })
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.len);
        &mut self.v[self.start..self.start + len]
    }
}

fn lock_poisoned() -> io::Error {
    io::Error::other("O_DIRECT lock poisoned")
}

fn is_aligned(v: u64) -> bool {
    v.is_multiple_of(DIRECT_ALIGN as u64)
}

fn buf_aligned(p: *const u8) -> bool {
    p.align_offset(DIRECT_ALIGN) == 0
}

impl FileStorage {
    /// Reads into `buf` at `offset`, both aligned for `O_DIRECT` (or any
    /// buffer without it); a short read means the end of the file and the
    /// rest reads as zeroes.
    fn read_raw(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) if self.direct.is_some() && n < buf.len() => {
                    // The next offset would be unaligned: past the end.
                    buf[n..].fill(0);
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

    /// `O_DIRECT` read of any range into any buffer, through aligned bounce
    /// buffers where needed.
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        if is_aligned(offset) && is_aligned(len) && buf_aligned(buf.as_ptr()) {
            return self.read_raw(buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut bounce = AlignedBuf::new(DIRECT_CHUNK)?;
        let mut pos = offset;
        while pos < end {
            let lo = pos / a * a;
            let hi = (lo + DIRECT_CHUNK as u64).min(end.div_ceil(a) * a);
            let b = bounce.get((hi - lo) as usize);
            self.read_raw(b, lo)?;
            let upto = hi.min(end);
            let dst = &mut buf[(pos - offset) as usize..(upto - offset) as usize];
            dst.copy_from_slice(&b[(pos - lo) as usize..(upto - lo) as usize]);
            pos = upto;
        }
        Ok(())
    }

    /// `O_DIRECT` write of an aligned range from any buffer.
    fn write_direct_aligned(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf_aligned(buf.as_ptr()) {
            return self.file.write_all_at(buf, offset);
        }
        let mut bounce = AlignedBuf::new(DIRECT_CHUNK.min(buf.len()))?;
        for (i, piece) in buf.chunks(DIRECT_CHUNK).enumerate() {
            let b = bounce.get(piece.len());
            b.copy_from_slice(piece);
            self.file
                .write_all_at(b, offset + (i * DIRECT_CHUNK) as u64)?;
        }
        Ok(())
    }

    /// `O_DIRECT` write of any range: the partial blocks at either end are
    /// read, modified and written back whole; the file keeps the length a
    /// buffered write would give it.
    fn write_direct(&self, lock: &RwLock<()>, buf: &[u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if is_aligned(offset) && is_aligned(len) {
            let _shared = lock.read().map_err(|_| lock_poisoned())?;
            return self.write_direct_aligned(buf, offset);
        }
        let _exclusive = lock.write().map_err(|_| lock_poisoned())?;
        let a = DIRECT_ALIGN as u64;
        let old_len = self.file.metadata()?.len();
        let (lo, hi) = (offset / a * a, end.div_ceil(a) * a);
        let mut block = AlignedBuf::new(DIRECT_ALIGN)?;
        // Head and tail blocks (one block if the range fits in one).
        let head_end = (lo + a).min(hi);
        let mut partial = vec![(lo, head_end)];
        if hi - a >= head_end {
            partial.push((hi - a, hi));
        }
        let mut middle = (head_end, hi - a);
        for (b_lo, b_hi) in partial {
            let whole = offset <= b_lo && end >= b_hi;
            if whole {
                // Aligned on this side after all: part of the middle run.
                middle = (middle.0.min(b_lo), middle.1.max(b_hi));
                continue;
            }
            let b = block.get(DIRECT_ALIGN);
            self.read_raw(b, b_lo)?;
            let s = offset.max(b_lo);
            let e = end.min(b_hi);
            b[(s - b_lo) as usize..(e - b_lo) as usize]
                .copy_from_slice(&buf[(s - offset) as usize..(e - offset) as usize]);
            self.file.write_all_at(b, b_lo)?;
        }
        if middle.0 < middle.1 {
            let src = &buf[(middle.0 - offset) as usize..(middle.1 - offset) as usize];
            self.write_direct_aligned(src, middle.0)?;
        }
        if hi > old_len.max(end) {
            // A buffered write would have ended the file at `end`.
            self.file.set_len(old_len.max(end))?;
        }
        Ok(())
    }
}

fn total_len(lens: impl Iterator<Item = usize>) -> io::Result<u64> {
    lens.map(|l| l as u64)
        .try_fold(0u64, u64::checked_add)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

impl FileStorage {
    /// Buffered vectored read: one `preadv` per [`sys::IOV_MAX`] buffers;
    /// a short transfer is finished buffer by buffer (end of file reads as
    /// zeroes, as in [`FileStorage::read_raw`]).
    fn read_vectored_raw(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for group in bufs.chunks_mut(sys::IOV_MAX) {
            let total = total_len(group.iter().map(|b| b.len()))?;
            let end = pos
                .checked_add(total)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let n = loop {
                match sys::preadv(&self.file, group, pos) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => break r? as u64,
                }
            };
            if n < total {
                // Short: finish the rest with plain reads (they loop on
                // short transfers and zero-fill past the end).
                let mut skip = n;
                let mut p = pos;
                for b in group.iter_mut() {
                    let len = b.len() as u64;
                    if skip >= len {
                        skip -= len;
                    } else {
                        self.read_raw(&mut b[skip as usize..], p + skip)?;
                        skip = 0;
                    }
                    p += len;
                }
            }
            pos = end;
        }
        Ok(())
    }

    /// Buffered vectored write: one `pwritev` per [`sys::IOV_MAX`] buffers;
    /// a short transfer is finished buffer by buffer.
    fn write_vectored_raw(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for group in bufs.chunks(sys::IOV_MAX) {
            let total = total_len(group.iter().map(|b| b.len()))?;
            let end = pos
                .checked_add(total)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let n = loop {
                match sys::pwritev(&self.file, group, pos) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => break r? as u64,
                }
            };
            if n < total {
                let mut skip = n;
                let mut p = pos;
                for b in group {
                    let len = b.len() as u64;
                    if skip >= len {
                        skip -= len;
                    } else {
                        self.file.write_all_at(&b[skip as usize..], p + skip)?;
                        skip = 0;
                    }
                    p += len;
                }
            }
            pos = end;
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        if self.direct.is_none() && bufs.len() > 1 {
            return self.read_vectored_raw(bufs, offset);
        }
        // O_DIRECT (alignment is per buffer) or a single buffer: one by one.
        let mut pos = offset;
        for b in bufs.iter_mut() {
            let next = pos
                .checked_add(b.len() as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            self.read_at(b, pos)?;
            pos = next;
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        if self.direct.is_none() && bufs.len() > 1 {
            return self.write_vectored_raw(bufs, offset);
        }
        let mut pos = offset;
        for b in bufs {
            let next = pos
                .checked_add(b.len() as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            self.write_at(b, pos)?;
            pos = next;
        }
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct.is_some() {
            self.read_direct(buf, offset)
        } else {
            self.read_raw(buf, offset)
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(lock) => self.write_direct(lock, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
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

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if !self.no_zero_range.load(Ordering::Relaxed) {
            match sys::zero_range(&self.file, offset, len) {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
                    ) =>
                {
                    self.no_zero_range.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        super::write_zeroes_by_writing(self, offset, len)
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

    /// Unaligned and aligned reads and writes through `O_DIRECT` give the
    /// same bytes and the same file length as buffered I/O.
    #[test]
    fn direct_io_matches_buffered_io() {
        let dir = tempfile::tempdir().unwrap();
        let (pd, pb) = (dir.path().join("d"), dir.path().join("b"));
        std::fs::write(&pd, b"").unwrap();
        std::fs::write(&pb, b"").unwrap();
        let d = match FileStorage::open_with(&pd, true, true) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: no O_DIRECT here ({e})");
                return;
            }
        };
        assert!(d.is_direct());
        let b = FileStorage::open(&pb, true).unwrap();
        // (offset, len): unaligned head/tail, one partial block, whole
        // blocks, spanning blocks, extending the file by odd amounts.
        let cases = [
            (0u64, 104usize),
            (4000, 200),
            (8192, 4096),
            (5000, 3 * 4096 + 17),
            (70000, 1),
            (65536, 65536),
            (100, 2 << 20),
            (3 << 20, 512),
            (16384, 8192 + 100),
            (20000, 4096 + 288),
            (100, 8092),
            (4 << 20, 5000),
            (12345, 0),
        ];
        for (k, (off, len)) in cases.into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + k * 13) as u8).collect();
            // An unaligned source buffer as well.
            let src = &[&[0u8][..], &data[..]].concat()[1..];
            d.write_at(src, off).unwrap();
            b.write_at(&data, off).unwrap();
            assert_eq!(d.len().unwrap(), b.len().unwrap(), "case {k}");
        }
        let n = b.len().unwrap() as usize + 5000;
        for (off, len) in [
            (0u64, n),
            (1, 4095),
            (4095, 2),
            (8190, 70000),
            (n as u64 - 10, 10),
        ] {
            let (mut x, mut y) = (vec![0xaa; len], vec![0x55; len]);
            d.read_at(&mut x, off).unwrap();
            b.read_at(&mut y, off).unwrap();
            assert!(x == y, "read {off}+{len}");
        }
        d.flush().unwrap();
        assert_eq!(std::fs::read(&pd).unwrap(), std::fs::read(&pb).unwrap());
    }

    /// Vectored reads and writes (more buffers than one `preadv` takes,
    /// empty buffers, a read running past the end) give the same bytes as
    /// plain ones, on buffered and `O_DIRECT` files and on `MemStorage`.
    #[test]
    fn vectored_io_matches_plain_io() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let mut stores: Vec<Box<dyn Storage>> = vec![
            Box::new(FileStorage::create(&path, false).unwrap()),
            Box::new(crate::storage::MemStorage::new()),
        ];
        let pd = dir.path().join("d");
        std::fs::write(&pd, b"").unwrap();
        if let Ok(d) = FileStorage::open_with(&pd, true, true) {
            stores.push(Box::new(d));
        }
        // 1500 pieces of varied lengths (some empty), 3 passes of a pattern.
        let lens: Vec<usize> = (0..1500).map(|i| (i * 7919) % 13).collect();
        let total: usize = lens.iter().sum();
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8 + 1).collect();
        for s in &stores {
            let mut pieces = Vec::new();
            let mut at = 0;
            for &l in &lens {
                pieces.push(IoSlice::new(&data[at..at + l]));
                at += l;
            }
            s.write_vectored_at(&pieces, 1000).unwrap();
            assert_eq!(s.len().unwrap(), 1000 + total as u64);
            let mut plain = vec![0u8; total];
            s.read_at(&mut plain, 1000).unwrap();
            assert_eq!(plain, data, "{s:?}");
            // Read back vectored, from 100 bytes before the end of the data
            // to 100 bytes past the end of the file.
            let mut out = vec![0xeeu8; 200 + total];
            let mut bufs: Vec<IoSliceMut<'_>> = out.chunks_mut(97).map(IoSliceMut::new).collect();
            s.read_vectored_at(&mut bufs, 900).unwrap();
            drop(bufs);
            assert!(out[..100].iter().all(|&b| b == 0));
            assert_eq!(&out[100..100 + total], &data[..]);
            assert!(out[100 + total..].iter().all(|&b| b == 0));
        }
    }
}
