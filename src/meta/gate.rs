//! The write gate: the only writable handle of the image file.
//!
//! [`WriteGate`] owns the image file, the overlap map, the known end of the
//! file and the poison flag. Its fields are private to this module, and no
//! other part of the crate holds a writable handle of the image file: the
//! rest of the crate reads through a [`FileReader`] and writes guest data
//! through a [`DataTarget`] with a [`DataPermit`] that only the gate issues
//! (after the overlap check when guest data lives in the image file). A
//! forgotten overlap check therefore does not compile.
//!
//! The external data file holds no metadata, so its writes need no check;
//! they still go through a separate, greppable handle ([`DataFile`]).

use crate::error::{Error, IoOp, Result};
use crate::format::consts::{INCOMPAT_CORRUPT, V3_HEADER_LENGTH};
use crate::format::header::field;
use crate::storage::{BlkdebugEvent, Storage, Tracked};
use crate::types::{GuestOffset, HostOffset, MetadataKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::overlap_map::{Overlap, OverlapChecker};
use crate::crypto::SectorCipher;

/// A read-only view of the image file.
#[derive(Debug, Clone)]
pub(crate) struct FileReader(Arc<Tracked>);

impl FileReader {
    /// Reads `buf.len()` bytes at `offset`, naming the offset on failure.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0
            .read_at(buf, offset)
            .map_err(|e| Error::io(IoOp::Read, offset, e))
    }

    /// The file's current length.
    pub fn len(&self) -> Result<u64> {
        self.0.len().map_err(|e| Error::io(IoOp::Read, 0, e))
    }

    /// Reads `buf.len()` bytes at `offset` ([`Storage::read_at`]).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }

    /// Bytes the file occupies on its device ([`Storage::allocated_bytes`]).
    pub fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.0.allocated_bytes()
    }

    /// Reports a blkdebug event to the image file ([`Storage::debug_event`]).
    pub fn debug_event(&self, event: BlkdebugEvent) {
        self.0.debug_event(event);
    }
}

/// Permission to write guest data to `[host, host + len)` of the data
/// target, issued by [`WriteGate::permit_data`] after the overlap check.
/// Consumed by the write; it cannot be copied or forged outside this module.
#[derive(Debug)]
#[must_use = "a permit is only useful for a write"]
pub(crate) struct DataPermit {
    host: u64,
    len: u64,
    /// The guest offset of the range's first byte, where the caller knows
    /// it (the legacy `aes` encryption derives its IVs from it).
    guest: Option<u64>,
}

impl DataPermit {
    /// First host byte of the permitted range.
    pub fn host(&self) -> u64 {
        self.host
    }

    /// The same permit, for guest data at guest offset `guest`.
    pub fn for_guest(mut self, guest: GuestOffset) -> Self {
        self.guest = Some(guest.0);
        self
    }

    /// Whether the permitted range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Splits the permit into its first `at` bytes (all of it if shorter)
    /// and the rest, without checking again: each piece is inside the
    /// checked range. Guest offsets follow the split.
    pub fn split_at(self, at: u64) -> (DataPermit, DataPermit) {
        let at = at.min(self.len);
        let rest = DataPermit {
            host: self.host + at,
            len: self.len - at,
            guest: self.guest.map(|g| g + at),
        };
        (DataPermit { len: at, ..self }, rest)
    }
}

/// The external data file: guest data only, mapped by the L2 tables. Writes
/// need no overlap check (there is no metadata in it).
#[derive(Debug, Clone)]
pub(crate) struct DataFile(Arc<Tracked>);

impl DataFile {
    /// Writes guest data at `offset`.
    pub fn write_data(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0
            .write_at(buf, offset)
            .map_err(|e| Error::io(IoOp::Write, offset, e))
    }

    /// The file's current length.
    pub fn len(&self) -> Result<u64> {
        self.0.len().map_err(|e| Error::io(IoOp::Read, 0, e))
    }

    /// Syncs the file.
    pub fn flush(&self) -> Result<()> {
        self.0.flush().map_err(|e| Error::io(IoOp::Flush, 0, e))
    }

    /// The file as a storage (it holds no metadata: nothing to check).
    pub fn storage(&self) -> &dyn Storage {
        &*self.0
    }
}

/// Where guest data lives: the image file (writes need a permit that passed
/// the overlap check) or the external data file.
#[derive(Debug, Clone)]
pub(crate) struct DataTarget {
    file: Arc<Tracked>,
    external: bool,
    /// The payload cipher of an encrypted image opened with its key: guest
    /// data is encrypted on the way to the file and decrypted on the way
    /// back, each 512-byte sector with the IV of its host offset (QEMU's
    /// `crypt_physical_offset` for LUKS). Requests must be whole sectors.
    crypto: Option<Arc<SectorCipher>>,
    /// IVs from host offsets (LUKS); otherwise from guest offsets (the
    /// legacy `aes` format), which every request must then name.
    physical: bool,
}

/// Bytes of the thread's encryption buffer kept between requests.
const SCRATCH_KEEP: usize = 2 << 20;

thread_local! {
    /// Each thread's buffer for encrypting a write (the caller's buffer is
    /// read-only) and for gathering a vectored read: one per thread, reused,
    /// so no request allocates once it has grown.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on the thread's scratch buffer, `len` bytes long.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            let r = f(v.get_mut(..len).unwrap_or_default());
            // Guest data does not linger in the buffer.
            if let Some(used) = v.get_mut(..len) {
                zeroize::Zeroize::zeroize(used);
            }
            if v.len() > SCRATCH_KEEP {
                v.truncate(SCRATCH_KEEP);
                v.shrink_to_fit();
            }
            r
        }
        // Re-entered (not expected): a buffer of its own.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// The first IV sector of an encrypted request of `len` bytes at host
/// offset `host` (guest offset `guest`, if known): the host sector with
/// physical IVs, else the guest sector. Requests must be whole sectors.
fn crypt_sector(physical: bool, host: u64, guest: Option<u64>, len: usize) -> Result<u64> {
    let at = if physical {
        host
    } else {
        guest.ok_or_else(|| {
            Error::Internal(format!(
                "encrypted data request at host offset {host:#x} without its guest offset"
            ))
        })?
    };
    let sector = at / SECTOR;
    if !at.is_multiple_of(SECTOR) || !(len as u64).is_multiple_of(SECTOR) {
        return Err(crate::crypto::CryptoError::Unaligned {
            sector,
            len: len as u64,
        }
        .into());
    }
    Ok(sector)
}

const SECTOR: u64 = crate::crypto::cipher::SECTOR_SIZE as u64;

impl DataTarget {
    /// Passes `sink` to the external data file's storage, if guest data lives in one.
    pub fn set_event_sink(&self, sink: Option<crate::events::EventSink>) {
        if self.external {
            self.file.set_event_sink(sink);
        }
    }

    /// The external data file, if guest data lives in one.
    pub fn external(&self) -> Option<DataFile> {
        self.external.then(|| DataFile(self.file.clone()))
    }

    /// Records that the caller of a write reservation wrote `permit`'s
    /// range itself (through its own handle of the file), so that the next
    /// flush syncs it.
    pub fn note_outside_write(&self, permit: DataPermit) {
        let DataPermit { .. } = permit;
        self.file.mark_changed();
    }

    /// Whether guest data is encrypted (requests must be whole sectors).
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// Reads guest data at host offset `offset`, guest offset `guest`
    /// (decrypted).
    pub fn read_guest(&self, buf: &mut [u8], offset: u64, guest: Option<u64>) -> Result<()> {
        let sector = match &self.crypto {
            Some(_) => Some(crypt_sector(self.physical, offset, guest, buf.len())?),
            None => None,
        };
        self.file
            .read_at(buf, offset)
            .map_err(|e| Error::io(IoOp::Read, offset, e))?;
        if let (Some(c), Some(sector)) = (&self.crypto, sector) {
            c.decrypt(buf, sector)?;
        }
        Ok(())
    }

    /// Writes `buf` at the start of `permit`'s range as it is, never
    /// encrypted: compressed clusters, which QEMU stores unencrypted even
    /// in an encrypted image.
    pub fn write_unencrypted(&self, permit: DataPermit, buf: &[u8]) -> Result<()> {
        self.check_permit(&permit, buf.len() as u64)?;
        self.file
            .write_at(buf, permit.host)
            .map_err(|e| Error::io(IoOp::Write, permit.host, e))
    }

    fn check_permit(&self, permit: &DataPermit, len: u64) -> Result<()> {
        if len > permit.len {
            return Err(Error::InvalidArgument(format!(
                "data write of {len} bytes at {:#x} exceeds its permit of {} bytes",
                permit.host, permit.len
            )));
        }
        Ok(())
    }

    /// Encrypts `bufs` (gathered) into the thread's scratch buffer and
    /// writes them at `host`.
    fn write_encrypted(
        &self,
        c: &SectorCipher,
        bufs: &[std::io::IoSlice<'_>],
        permit: &DataPermit,
        len: usize,
    ) -> Result<()> {
        let host = permit.host;
        let sector = crypt_sector(self.physical, host, permit.guest, len)?;
        with_scratch(len, |scratch| {
            let mut at = 0usize;
            for b in bufs {
                let end = at + b.len();
                if let Some(dst) = scratch.get_mut(at..end) {
                    dst.copy_from_slice(b);
                }
                at = end;
            }
            c.encrypt(scratch, sector)?;
            self.file
                .write_at(scratch, host)
                .map_err(|e| Error::io(IoOp::Write, host, e))
        })
    }

    /// Makes `permit`'s range read as zeroes ([`Storage::write_zeroes`]).
    /// Not for encrypted data (zeroes on disk do not decrypt to zeroes).
    ///
    /// # Errors
    /// `Error::Internal` on an encrypted image; I/O errors.
    pub fn write_zeroes(&self, permit: DataPermit) -> Result<()> {
        if self.crypto.is_some() {
            return Err(Error::Internal(
                "plain zeroes requested for encrypted data".into(),
            ));
        }
        self.file
            .write_zeroes(permit.host, permit.len)
            .map_err(|e| Error::io(IoOp::Write, permit.host, e))
    }

    /// Writes `buf` at the start of `permit`'s range (at most its length).
    ///
    /// # Errors
    /// `Error::InvalidArgument` if `buf` is longer than the permit (a bug,
    /// reported rather than written); I/O errors.
    pub fn write(&self, permit: DataPermit, buf: &[u8]) -> Result<()> {
        self.check_permit(&permit, buf.len() as u64)?;
        if let Some(c) = &self.crypto {
            return self.write_encrypted(c, &[std::io::IoSlice::new(buf)], &permit, buf.len());
        }
        self.file
            .write_at(buf, permit.host)
            .map_err(|e| Error::io(IoOp::Write, permit.host, e))
    }

    /// Reads guest data at host offset `offset` into `bufs`, one after the
    /// other (one `preadv` on a file).
    pub fn read_vectored(&self, bufs: &mut [std::io::IoSliceMut<'_>], offset: u64) -> Result<()> {
        if let Some(c) = &self.crypto {
            let len: usize = bufs.iter().map(|b| b.len()).sum();
            let sector = crypt_sector(self.physical, offset, None, len)?;
            return with_scratch(len, |scratch| {
                self.file
                    .read_at(scratch, offset)
                    .map_err(|e| Error::io(IoOp::Read, offset, e))?;
                c.decrypt(scratch, sector)?;
                let mut at = 0usize;
                for b in bufs.iter_mut() {
                    let end = at + b.len();
                    b.copy_from_slice(scratch.get(at..end).unwrap_or_default());
                    at = end;
                }
                Ok(())
            });
        }
        let r = match bufs {
            [one] => self.file.read_at(one, offset),
            _ => self.file.read_vectored_at(bufs, offset),
        };
        r.map_err(|e| Error::io(IoOp::Read, offset, e))
    }

    /// Writes `bufs`, one after the other, at the start of `permit`'s range
    /// (one `pwritev` on a file).
    ///
    /// # Errors
    /// `Error::InvalidArgument` if `bufs` hold more than the permit (a bug,
    /// reported rather than written); I/O errors.
    pub fn write_vectored(&self, permit: DataPermit, bufs: &[std::io::IoSlice<'_>]) -> Result<()> {
        if let [one] = bufs {
            return self.write(permit, one);
        }
        let total = bufs
            .iter()
            .try_fold(0u64, |t, b| t.checked_add(b.len() as u64));
        if total.is_none_or(|t| t > permit.len) {
            return Err(Error::InvalidArgument(format!(
                "vectored data write at {:#x} exceeds its permit of {} bytes",
                permit.host, permit.len
            )));
        }
        if let (Some(c), Some(t)) = (&self.crypto, total) {
            let len = usize::try_from(t).map_err(|_| Error::Internal("write length".into()))?;
            return self.write_encrypted(c, bufs, &permit, len);
        }
        self.file
            .write_vectored_at(bufs, permit.host)
            .map_err(|e| Error::io(IoOp::Write, permit.host, e))
    }

    /// Passes a discard of `[offset, offset + len)` down (best effort: a
    /// guest discard of clusters that keep their mapping).
    pub fn discard(&self, _permit: DataPermit) -> Result<()> {
        let DataPermit { host, len, .. } = _permit;
        self.file
            .discard(host, len)
            .map_err(|e| Error::io(IoOp::Write, host, e))
    }

    /// Whether `[offset, offset + len)` is a hole in the file.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.file.is_hole(offset, len).unwrap_or(false)
    }

    /// The data-or-hole run at `offset` (at most `max` bytes).
    pub fn data_extent(&self, offset: u64, max: u64) -> std::io::Result<(bool, u64)> {
        self.file.data_extent(offset, max)
    }
}

/// The only writable handle of the image file, with the overlap map, the
/// known end of the file and the poison flag.
#[derive(Debug)]
pub(crate) struct WriteGate {
    file: Arc<Tracked>,
    data: DataTarget,
    checker: OverlapChecker,
    /// Host length of the image file as far as this handle knows (an upper
    /// bound: writes outside the lock are counted before they start).
    file_end: AtomicU64,
    /// A metadata write or sync failed: the in-memory state may be ahead of
    /// the file.
    poisoned: bool,
}

impl WriteGate {
    /// Wraps the image file; guest data lives in it until
    /// [`WriteGate::set_data_file`].
    pub fn new(file: Arc<Tracked>, checker: OverlapChecker, file_end: u64) -> Self {
        let data = DataTarget {
            file: file.clone(),
            external: false,
            crypto: None,
            physical: true,
        };
        WriteGate {
            file,
            data,
            checker,
            file_end: AtomicU64::new(file_end),
            poisoned: false,
        }
    }

    /// Guest data lives in the external data file `file` from now on.
    pub fn set_data_file(&mut self, file: Arc<Tracked>) {
        self.data = DataTarget {
            file,
            external: true,
            crypto: self.data.crypto.clone(),
            physical: self.data.physical,
        };
    }

    /// Guest data is encrypted with `cipher` from now on (an encrypted
    /// image opened with its key), with IVs from host offsets (`physical`,
    /// LUKS) or guest offsets (the legacy `aes` format).
    pub fn set_crypto(&mut self, cipher: Arc<SectorCipher>, physical: bool) {
        self.data.crypto = Some(cipher);
        self.data.physical = physical;
    }

    /// Reads `buf.len()` bytes of the image file at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_at(buf, offset)
            .map_err(|e| Error::io(IoOp::Read, offset, e))
    }

    /// Reports a blkdebug event (QEMU's `BLKDBG_EVENT(bs->file, ...)`) to
    /// the image file: a no-op call unless a `blkdebug` storage is below.
    #[inline]
    pub fn debug_event(&self, event: BlkdebugEvent) {
        self.file.debug_event(event);
    }

    /// A read-only view of the image file.
    pub fn reader(&self) -> FileReader {
        FileReader(self.file.clone())
    }

    /// Where guest data lives.
    pub fn data(&self) -> &DataTarget {
        &self.data
    }

    /// The overlap map.
    pub fn checker(&self) -> &OverlapChecker {
        &self.checker
    }

    /// The overlap map, to add or remove structures.
    pub fn checker_mut(&mut self) -> &mut OverlapChecker {
        &mut self.checker
    }

    /// Host length of the image file as far as this handle knows.
    pub fn file_end(&self) -> u64 {
        self.file_end.load(Ordering::SeqCst)
    }

    /// Whether a failed metadata write or sync poisoned the handle.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Whether the image file changed since its last sync.
    pub fn is_dirty(&self) -> bool {
        self.file.is_dirty()
    }

    /// Checks that writing `len` bytes at `offset` does not hit metadata
    /// other than the kinds in `exempt`.
    ///
    /// # Errors
    /// `Error::OverlapPrevented` naming the structure hit.
    pub fn check(&self, offset: u64, len: u64, exempt: u16) -> Result<()> {
        match self.checker.check(offset, len, exempt) {
            Some(Overlap { kind, .. }) => Err(Error::OverlapPrevented {
                kind,
                offset,
                size: len,
            }),
            None => Ok(()),
        }
    }

    fn raw_write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_at(buf, offset)
            .map_err(|e| Error::io(IoOp::Write, offset, e))?;
        self.note_end(offset.saturating_add(buf.len() as u64));
        Ok(())
    }

    /// Writes to the image file after the overlap check, exempting `kind`
    /// (guest data with `None`). A failed write does not poison: the check
    /// and repair code decides.
    pub fn write(&mut self, buf: &[u8], offset: u64, kind: Option<MetadataKind>) -> Result<()> {
        self.check(offset, buf.len() as u64, kind.map_or(0, MetadataKind::bit))?;
        self.raw_write(buf, offset)
    }

    /// Writes metadata of `kind`; a failed write poisons the handle (the
    /// in-memory state is ahead of the file).
    pub fn write_metadata(&mut self, kind: MetadataKind, buf: &[u8], offset: u64) -> Result<()> {
        let r = self.write(buf, offset, Some(kind));
        if matches!(r, Err(Error::Io { .. })) {
            self.poisoned = true;
        }
        r
    }

    /// Writes metadata exempting every kind in `kinds` (a table that is
    /// legitimately two kinds at once: an L2 table shared by the active L1
    /// table and a snapshot's); a failed write poisons the handle.
    pub fn write_metadata_as(
        &mut self,
        kinds: &[MetadataKind],
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        let exempt = kinds.iter().fold(0u16, |m, k| m | k.bit());
        self.check(offset, buf.len() as u64, exempt)?;
        let r = self.raw_write(buf, offset);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Writes fixed header fields with every metadata kind exempt (QEMU never
    /// overlap-checks its header updates, and cluster 0 is the header
    /// whatever else wrongly claims it).
    ///
    /// # Errors
    /// `Error::InvalidArgument` for a range outside the fixed header.
    pub fn write_header_fields(&mut self, bytes: &[u8], pos: u64) -> Result<()> {
        let len = bytes.len() as u64;
        if pos.saturating_add(len) > u64::from(V3_HEADER_LENGTH) {
            return Err(Error::InvalidArgument(format!(
                "header field at {pos} of {len} bytes is outside the fixed header"
            )));
        }
        let all = MetadataKind::ALL.iter().fold(0u16, |m, k| m | k.bit());
        self.check(pos, len, all)?;
        self.raw_write(bytes, pos)
    }

    /// Writes `incompatible` (with the corrupt bit set) to the header: the
    /// one write exempt from the overlap check, done when corruption was
    /// found. Best effort: the caller disables the handle either way.
    pub fn write_corrupt_bit(&mut self, incompatible: u64) -> Result<()> {
        let v = (incompatible | INCOMPAT_CORRUPT).to_be_bytes();
        self.write_header_fields(&v, field::INCOMPATIBLE_FEATURES)?;
        self.sync_image()
    }

    /// Writes guest data (under the metadata lock) to the data target.
    #[cfg(test)]
    pub fn write_data(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let permit = self.permit_data(HostOffset(offset), buf.len() as u64)?;
        self.data.write(permit, buf)
    }

    /// [`WriteGate::write_data`] of guest data at guest offset `guest`.
    pub fn write_data_guest(
        &mut self,
        buf: &[u8],
        offset: HostOffset,
        guest: GuestOffset,
    ) -> Result<()> {
        let permit = self.permit_data(offset, buf.len() as u64)?.for_guest(guest);
        self.data.write(permit, buf)
    }

    /// Permission to write guest data to `[host, host + len)` of the data
    /// target from outside the lock: overlap-checked when data lives in the
    /// image file (whose known end then covers the range).
    ///
    /// # Errors
    /// `Error::OverlapPrevented`.
    pub fn permit_data(&self, host: HostOffset, len: u64) -> Result<DataPermit> {
        let HostOffset(host) = host;
        if !self.data.external {
            self.check(host, len, 0)?;
            self.note_end(host.saturating_add(len));
        }
        Ok(DataPermit {
            host,
            len,
            guest: None,
        })
    }

    /// Sets the image file's length (the known end follows).
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(IoOp::Resize, len, e))?;
        self.file_end.store(len, Ordering::SeqCst);
        Ok(())
    }

    /// Extends the known end of the file to at least `end` (the file was
    /// grown through [`WriteGate::set_len`] or [`WriteGate::allocate`]).
    fn note_end(&self, end: u64) {
        // Overwrites inside the file (the common case) only read the shared
        // value; a read-modify-write on every request would bounce its cache
        // line between cores.
        if end > self.file_end.load(Ordering::SeqCst) {
            self.file_end.fetch_max(end, Ordering::SeqCst);
        }
    }

    /// Allocates `[offset, offset + len)` of the image file (`fallocate`)
    /// after the overlap check.
    pub fn allocate(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, 0)?;
        self.file
            .allocate(offset, len)
            .map_err(|e| Error::io(IoOp::Resize, offset, e))?;
        self.note_end(offset.saturating_add(len));
        Ok(())
    }

    /// Writes zeroes to `[from, to)` of the image file (after the overlap
    /// check), in large requests.
    pub fn fill_zeroes(&mut self, from: u64, to: u64, chunk: u64) -> Result<()> {
        self.check(from, to.saturating_sub(from), 0)?;
        let zeros = vec![0u8; super::conv::usize_of(chunk.min(to.saturating_sub(from)))?];
        let mut pos = from;
        while pos < to {
            // At most `zeros.len()`, so it fits.
            let n = usize::try_from(to - pos).map_or(zeros.len(), |r| r.min(zeros.len()));
            let part = zeros
                .get(..n)
                .ok_or_else(|| Error::Internal("zero fill beyond its buffer".into()))?;
            self.raw_write(part, pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Discards `[offset, offset + len)` of the image file (best effort:
    /// freed clusters). Refused over metadata.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, 0)?;
        self.file
            .discard(offset, len)
            .map_err(|e| Error::io(IoOp::Write, offset, e))
    }

    /// Syncs the image file; a failure poisons the handle (after a failed
    /// fsync nothing written since the last good one can be trusted).
    pub fn sync_image(&mut self) -> Result<()> {
        if let Err(e) = self.file.flush() {
            self.poisoned = true;
            return Err(Error::io(IoOp::Flush, 0, e));
        }
        Ok(())
    }

    /// Syncs the external data file if it changed since its last sync; a
    /// failure poisons the handle.
    pub fn sync_data_file(&mut self) -> Result<()> {
        if self.data.external {
            if let Err(e) = self.data.file.flush_if_dirty() {
                self.poisoned = true;
                return Err(Error::io(IoOp::Flush, 0, e));
            }
        }
        Ok(())
    }
}
