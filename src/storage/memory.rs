//! In-memory storage for tests and fuzzing.

use super::Storage;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::RwLock;

/// A `Vec<u8>`-backed [`Storage`]. Cloning is not provided; share it with `Arc`.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    /// Writes that would grow the storage past this size fail with ENOSPC.
    limit: Option<u64>,
}

impl MemStorage {
    /// An empty storage.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    ///
    /// # fn main() -> std::io::Result<()> {
    /// let m = MemStorage::new();
    /// m.write_at(b"qcow2", 10)?;
    /// assert_eq!(m.len()?, 15);
    /// let mut buf = [0xffu8; 4];
    /// m.read_at(&mut buf, 13)?; // two bytes of data, then zeroes past the end
    /// assert_eq!(buf, [b'w', b'2', 0, 0]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(bytes),
            limit: None,
        }
    }

    /// A storage that refuses to grow past `limit` bytes (ENOSPC), like a full disk.
    pub fn with_limit(bytes: Vec<u8>, limit: u64) -> Self {
        Self {
            data: RwLock::new(bytes),
            limit: Some(limit),
        }
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn grow_to(&self, data: &mut Vec<u8>, end: u64) -> io::Result<()> {
        if let Some(limit) = self.limit {
            if end > limit {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let end = usize::try_from(end).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if end > data.len() {
            data.resize(end, 0);
        }
        Ok(())
    }
}

fn poisoned() -> io::Error {
    io::Error::other("memory storage lock poisoned")
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().map_err(|_| poisoned())?;
        let len = data.len() as u64;
        if offset >= len {
            buf.fill(0);
            return Ok(());
        }
        // offset < len <= usize::MAX, so the conversion is lossless.
        let start = offset as usize;
        let avail = (data.len() - start).min(buf.len());
        buf[..avail].copy_from_slice(&data[start..start + avail]);
        buf[avail..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut data = self.data.write().map_err(|_| poisoned())?;
        self.grow_to(&mut data, end)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        // One lock for the whole request: the buffers see one state.
        let data = self.data.read().map_err(|_| poisoned())?;
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            let len = data.len() as u64;
            if pos >= len {
                buf.fill(0);
            } else {
                let start = pos as usize;
                let avail = (data.len() - start).min(buf.len());
                buf[..avail].copy_from_slice(&data[start..start + avail]);
                buf[avail..].fill(0);
            }
            pos = pos.saturating_add(buf.len() as u64);
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let total = bufs
            .iter()
            .try_fold(0u64, |t, b| t.checked_add(b.len() as u64));
        let end = total
            .and_then(|t| offset.checked_add(t))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut data = self.data.write().map_err(|_| poisoned())?;
        self.grow_to(&mut data, end)?;
        let mut start = offset as usize;
        for b in bufs {
            data[start..start + b.len()].copy_from_slice(b);
            start += b.len();
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().map_err(|_| poisoned())?.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        if len > data.len() as u64 {
            self.grow_to(&mut data, len)
        } else {
            data.truncate(len as usize);
            Ok(())
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        let dlen = data.len() as u64;
        let start = offset.min(dlen) as usize;
        let end = offset.saturating_add(len).min(dlen) as usize;
        data[start..end].fill(0);
        Ok(())
    }
}
