//! One virtio-blk request: parse the chain, call the image, write the status.

use super::{MAX_DISCARD_SECTORS, SECTOR};
use crate::Image;
use std::io::{Read, Write};
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

/// Largest piece of a request's data moved through the worker's buffer at once.
pub const CHUNK: usize = 1 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const ID_BYTES: usize = 20;
const WZ_FLAG_UNMAP: u32 = 1;

/// What a request came to: the used length reported to the driver and the
/// status written (`None` when the chain had no room for one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes written into device-writable descriptors, status byte included.
    pub used_len: u32,
    /// The `VIRTIO_BLK_S_*` status written, if any.
    pub status: Option<u8>,
}

/// Handles one request chain against `img`: reads the 16-byte header, moves
/// data between guest memory and the image in pieces of at most [`CHUNK`]
/// bytes (through `buf`, kept between requests and shrunk after large ones),
/// and writes the status byte in the last device-writable byte.
pub fn process_chain<M>(
    img: &Image,
    serial: &str,
    read_only: bool,
    chain: DescriptorChain<M>,
    buf: &mut Vec<u8>,
) -> Outcome
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let broken = Outcome {
        used_len: 0,
        status: None,
    };
    let mem = chain.memory();
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.clone().writer(mem))
    else {
        return broken;
    };
    let Some(data_in) = writer.available_bytes().checked_sub(1) else {
        return broken;
    };
    let Ok(mut status_w) = writer.split_at(data_in) else {
        return broken;
    };
    let mut hdr = [0u8; 16];
    let (status, written) = if reader.read_exact(&mut hdr).is_err() {
        (S_IOERR, 0)
    } else {
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector);
        match ty {
            T_IN => match range(img, sector, data_in as u64) {
                None => (S_IOERR, 0),
                Some(off) => match copy_in(img, off, data_in, &mut writer, buf) {
                    Ok(()) => (S_OK, data_in),
                    Err(()) => (S_IOERR, 0),
                },
            },
            T_OUT => {
                let len = reader.available_bytes();
                match range(img, sector, len as u64) {
                    _ if read_only => (S_IOERR, 0),
                    None => (S_IOERR, 0),
                    Some(off) => match copy_out(img, off, len, &mut reader, buf) {
                        Ok(()) => (S_OK, 0),
                        Err(()) => (S_IOERR, 0),
                    },
                }
            }
            T_FLUSH => match img.flush() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let s = serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let n = data_in.min(ID_BYTES);
                match writer.write_all(&id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_DISCARD | T_WRITE_ZEROES if read_only => (S_IOERR, 0),
            T_DISCARD | T_WRITE_ZEROES => (zero_range(img, ty, &mut reader), 0),
            _ => (S_UNSUPP, 0),
        }
    };
    if status_w.write_all(&[status]).is_err() {
        return broken;
    }
    if buf.capacity() > CHUNK {
        *buf = Vec::new();
    }
    Outcome {
        used_len: u32::try_from(written + 1).unwrap_or(u32::MAX),
        status: Some(status),
    }
}

/// The byte offset of `sector` when `len` bytes from there are inside the
/// image and `len` is a whole number of sectors.
fn range(img: &Image, sector: u64, len: u64) -> Option<u64> {
    let off = sector.checked_mul(SECTOR)?;
    let end = off.checked_add(len)?;
    (len.is_multiple_of(SECTOR) && end <= img.size()).then_some(off)
}

fn copy_in<W: Write>(
    img: &Image,
    off: u64,
    len: usize,
    w: &mut W,
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(CHUNK);
        buf.resize(n, 0);
        img.read_at(&mut buf[..n], off + done as u64)
            .map_err(|_| ())?;
        w.write_all(&buf[..n]).map_err(|_| ())?;
        done += n;
    }
    Ok(())
}

fn copy_out<R: Read>(
    img: &Image,
    off: u64,
    len: usize,
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(CHUNK);
        buf.resize(n, 0);
        r.read_exact(&mut buf[..n]).map_err(|_| ())?;
        img.write_at(&buf[..n], off + done as u64).map_err(|_| ())?;
        done += n;
    }
    Ok(())
}

/// DISCARD / WRITE_ZEROES: exactly one 16-byte segment
/// (`sector: u64, num_sectors: u32, flags: u32`).
fn zero_range<R: Read>(img: &Image, ty: u32, r: &mut R) -> u8 {
    let mut seg = [0u8; 16];
    if r.read_exact(&mut seg).is_err() {
        return S_IOERR;
    }
    // max_discard_seg = max_write_zeroes_seg = 1: anything more is an error.
    let mut extra = [0u8; 1];
    if matches!(r.read(&mut extra), Ok(n) if n > 0) {
        return S_IOERR;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&seg[0..8]);
    let sector = u64::from_le_bytes(s);
    let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    let unmap = flags & WZ_FLAG_UNMAP != 0;
    // Unknown flags, or UNMAP on a discard (reserved there): unsupported.
    if flags & !WZ_FLAG_UNMAP != 0 || (ty == T_DISCARD && unmap) {
        return S_UNSUPP;
    }
    if num > MAX_DISCARD_SECTORS {
        return S_IOERR;
    }
    let len = u64::from(num) * SECTOR;
    let Some(off) = range(img, sector, len) else {
        return S_IOERR;
    };
    let r = if ty == T_DISCARD {
        img.discard(off, len)
    } else {
        img.write_zeroes(off, len, unmap)
    };
    if r.is_ok() {
        S_OK
    } else {
        S_IOERR
    }
}
