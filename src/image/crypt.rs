//! Guest requests on an encrypted image opened with its key.
//!
//! Encryption works on whole 512-byte sectors (QEMU sets the request
//! alignment of an encrypted qcow2 node to the cipher's sector size, and its
//! block layer widens other requests). [`Image::read_at`] and
//! [`Image::write_at`] do the same here: a request that is not whole sectors
//! is widened to them, a write by read-modify-write of its first and last
//! sector. Those read-modify-writes take `Image::crypt_rmw` exclusively and
//! every other data write (`write_at` and the vectored writes) takes it
//! shared, so that no data write lands in a sector between the read and the
//! write of a widened one (QEMU's serialising requests). `write_zeroes` and
//! `discard` of whole clusters change only mappings and do not take it: one
//! racing a partial-sector write to the same sector may see that sector's
//! other bytes restored (callers that mix them concurrently on one sector
//! must order them, as with any overlapping requests). The vectored calls
//! gather into one buffer.

use super::*;
use std::io::{IoSlice, IoSliceMut};

/// Bytes of an encryption sector.
pub(super) const CRYPT_SECTOR: u64 = crate::crypto::cipher::SECTOR_SIZE as u64;

/// Whether `[offset, offset + len)` is whole sectors.
pub(super) fn sector_aligned(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(CRYPT_SECTOR) && len.is_multiple_of(CRYPT_SECTOR)
}

/// The whole sectors covering `[offset, offset + len)`, as (start, length).
fn widen(offset: u64, len: u64) -> Result<(u64, u64)> {
    let start = offset - offset % CRYPT_SECTOR;
    let end = offset
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(CRYPT_SECTOR))
        .ok_or(Error::OutOfRange {
            offset,
            len,
            size: u64::MAX,
        })?;
    Ok((start, end - start))
}

fn buffer(len: u64) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| Error::InvalidArgument("request too large".into()))?;
    Ok(vec![0u8; n])
}

impl Image {
    /// A read of an encrypted image that is not whole sectors: the covering
    /// sectors, decrypted, then the bytes asked for.
    pub(super) fn read_unaligned_encrypted(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        self.check_range(size, offset, buf.len() as u64)?;
        let (start, len) = widen(offset, buf.len() as u64)?;
        let mut whole = buffer(len)?;
        self.read_at(&mut whole, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&whole[at..at + buf.len()]);
        Ok(())
    }

    /// A write of an encrypted image that is not whole sectors: read the
    /// first and last covering sector, merge, write the covering sectors.
    pub(super) fn write_unaligned_encrypted(&self, buf: &[u8], offset: u64) -> Result<()> {
        let size = self.size();
        self.check_range(size, offset, buf.len() as u64)?;
        let (start, len) = widen(offset, buf.len() as u64)?;
        let mut whole = buffer(len)?;
        let _serial = self
            .crypt_rmw
            .write()
            .map_err(|_| Error::PreviousIoFailed)?;
        let last = len - CRYPT_SECTOR;
        self.read_at(&mut whole[..CRYPT_SECTOR as usize], start)?;
        if last > 0 {
            self.read_at(&mut whole[last as usize..], start + last)?;
        }
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        self.write_sectors(&whole, start)
    }

    /// A zero write of an encrypted image that is not whole sectors, as
    /// QEMU's block layer pads it for the 512-byte request alignment
    /// (`bdrv_co_do_zero_pwritev`): the partial sectors at either end are
    /// data writes of zeroes merged into what they hold (one write when no
    /// whole sector lies between them), the whole sectors between a zero
    /// write. So a small zero write into an unallocated cluster allocates
    /// it with encrypted zeroes, as in QEMU, where a plain image would get
    /// a zero cluster.
    pub(super) fn write_zeroes_unaligned_encrypted(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        let end = offset + len;
        let first_whole = offset.next_multiple_of(CRYPT_SECTOR);
        let end_whole = end - end % CRYPT_SECTOR;
        if first_whole >= end_whole {
            return self.write_unaligned_encrypted(&buffer(len)?, offset);
        }
        if offset < first_whole {
            self.write_unaligned_encrypted(&buffer(first_whole - offset)?, offset)?;
        }
        self.write_zeroes(first_whole, end_whole - first_whole, unmap)?;
        if end_whole < end {
            self.write_unaligned_encrypted(&buffer(end - end_whole)?, end_whole)?;
        }
        Ok(())
    }

    /// Reads into `bufs` through one gathered buffer.
    pub(super) fn read_vectored_encrypted(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let mut whole = buffer(len)?;
        self.read_at(&mut whole, offset)?;
        let mut at = 0usize;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&whole[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Writes `bufs` through one gathered buffer.
    pub(super) fn write_vectored_encrypted(
        &self,
        bufs: &[IoSlice<'_>],
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let mut whole = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        for b in bufs {
            whole.extend_from_slice(b);
        }
        self.write_at(&whole, offset)
    }
}
