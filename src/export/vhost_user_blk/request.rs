//! One virtio-blk request: parse the chain, call the image, write the status.
//!
//! Request data moves between the image and guest memory in place: each
//! data descriptor that lies in one guest memory region becomes an
//! `IoSlice`/`IoSliceMut` (in `guest_io`, the export's one `unsafe` module)
//! and a run of them is one `Image::read_vectored_at`/`write_vectored_at`.
//! A descriptor that is not contiguous in one region, or a read into
//! descriptors that overlap, goes through the worker's buffer instead, in
//! pieces of at most [`CHUNK`] bytes.

use super::guest_io;
use super::{MAX_DISCARD_SECTORS, SECTOR};
use crate::Image;
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Largest piece of a request's data moved through the worker's buffer at
/// once, when it cannot be moved in place.
pub const CHUNK: usize = 1 << 20;

/// Most guest buffers passed to one vectored image call (`IOV_MAX`).
const IOV_BATCH: usize = 1024;

// Request types, statuses and flags of the virtio spec (5.2.6), as the
// bindings name them; statuses are one byte on the wire.
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD as T_DISCARD, VIRTIO_BLK_T_FLUSH as T_FLUSH,
    VIRTIO_BLK_T_GET_ID as T_GET_ID, VIRTIO_BLK_T_IN as T_IN, VIRTIO_BLK_T_OUT as T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES as T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP as WZ_FLAG_UNMAP,
};

const S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What a request came to: the used length reported to the driver and the
/// status written (`None` when the chain had no room for one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes written into device-writable descriptors, status byte included.
    pub used_len: u32,
    /// The `VIRTIO_BLK_S_*` status written, if any.
    pub status: Option<u8>,
}

/// One guest buffer: where it starts and how long it is.
type Seg = (GuestAddress, usize);

/// The descriptors of a chain, split by direction (zero-length ones left
/// out), with their total lengths.
#[derive(Default)]
struct Segs {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    r_len: u64,
    w_len: u64,
}

/// Splits `chain` into its readable and writable buffers; `None` when a
/// readable descriptor follows a writable one (virtio 2.7.4) or a length
/// does not fit. Indirect tables are followed by the chain's iterator,
/// which also bounds the chain (queue size, 4 GiB in total).
fn segs<M>(chain: DescriptorChain<M>) -> Option<Segs>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut s = Segs::default();
    for d in chain {
        let len = d.len();
        if len == 0 {
            continue;
        }
        let seg = (d.addr(), usize::try_from(len).ok()?);
        if d.is_write_only() {
            s.writable.push(seg);
            s.w_len = s.w_len.checked_add(u64::from(len))?;
        } else {
            if !s.writable.is_empty() {
                return None;
            }
            s.readable.push(seg);
            s.r_len = s.r_len.checked_add(u64::from(len))?;
        }
    }
    Some(s)
}

/// The buffers covering bytes `[skip, skip + len)` of `segs` (fewer bytes
/// when `segs` ends first).
fn sub(segs: &[Seg], mut skip: u64, mut len: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    for &(addr, n) in segs {
        if len == 0 {
            break;
        }
        let n64 = n as u64;
        if skip >= n64 {
            skip -= n64;
            continue;
        }
        let take = (n64 - skip).min(len);
        let Some(a) = addr.0.checked_add(skip) else {
            break;
        };
        // take <= n, a usize.
        out.push((GuestAddress(a), take as usize));
        len -= take;
        skip = 0;
    }
    out
}

/// Copies guest bytes at `segs` into `out` (all of it, or `false`).
fn read_guest<Mem: GuestMemory>(mem: &Mem, segs: &[Seg], out: &mut [u8]) -> bool {
    let mut at = 0usize;
    for &(addr, n) in segs {
        let Some(dst) = at.checked_add(n).and_then(|e| out.get_mut(at..e)) else {
            return false;
        };
        if mem.read_slice(dst, addr).is_err() {
            return false;
        }
        at += n;
    }
    at == out.len()
}

/// Copies `data` into guest memory at `segs` (all of it, or `false`).
fn write_guest<Mem: GuestMemory>(mem: &Mem, segs: &[Seg], data: &[u8]) -> bool {
    let mut at = 0usize;
    for &(addr, n) in segs {
        let Some(src) = at.checked_add(n).and_then(|e| data.get(at..e)) else {
            return false;
        };
        if mem.write_slice(src, addr).is_err() {
            return false;
        }
        at += n;
    }
    at == data.len()
}

/// Handles one request chain against `img`: reads the 16-byte header, moves
/// data between guest memory and the image (in place where the guest
/// buffers are contiguous, otherwise through `buf` in pieces of at most
/// [`CHUNK`] bytes; `buf` is kept between requests and shrunk after large
/// ones), and writes the status byte in the last device-writable byte.
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
    let Some(s) = segs(chain.clone()) else {
        return broken;
    };
    let Some(data_in) = s.w_len.checked_sub(1) else {
        return broken;
    };
    let status_at = sub(&s.writable, data_in, 1);
    let mut hdr = [0u8; 16];
    let (status, written) = if !read_guest(mem, &sub(&s.readable, 0, 16), &mut hdr) {
        (S_IOERR, 0)
    } else {
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector);
        let data_out = s.r_len.saturating_sub(16);
        match ty {
            T_IN => match range(img, sector, data_in) {
                None => (S_IOERR, 0),
                Some(off) => {
                    match image_to_guest(img, mem, &sub(&s.writable, 0, data_in), off, buf) {
                        Ok(()) => (S_OK, data_in),
                        Err(()) => (S_IOERR, 0),
                    }
                }
            },
            T_OUT => match range(img, sector, data_out) {
                _ if read_only => (S_IOERR, 0),
                None => (S_IOERR, 0),
                Some(off) => {
                    match guest_to_image(img, mem, &sub(&s.readable, 16, data_out), off, buf) {
                        Ok(()) => (S_OK, 0),
                        Err(()) => (S_IOERR, 0),
                    }
                }
            },
            T_FLUSH => match img.flush() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let sb = serial.as_bytes();
                let n = sb.len().min(ID_BYTES);
                id[..n].copy_from_slice(&sb[..n]);
                let n = data_in.min(ID_BYTES as u64);
                // n <= ID_BYTES.
                if write_guest(mem, &sub(&s.writable, 0, n), &id[..n as usize]) {
                    (S_OK, n)
                } else {
                    (S_IOERR, 0)
                }
            }
            T_DISCARD | T_WRITE_ZEROES if read_only => (S_IOERR, 0),
            T_DISCARD | T_WRITE_ZEROES => {
                // Exactly one 16-byte segment (max_discard_seg =
                // max_write_zeroes_seg = 1): anything else is an error.
                let mut seg = [0u8; 16];
                if data_out != 16 || !read_guest(mem, &sub(&s.readable, 16, 16), &mut seg) {
                    (S_IOERR, 0)
                } else {
                    (zero_range(img, ty, &seg), 0)
                }
            }
            _ => (S_UNSUPP, 0),
        }
    };
    if !write_guest(mem, &status_at, &[status]) {
        return broken;
    }
    if buf.capacity() > CHUNK {
        *buf = Vec::new();
    }
    Outcome {
        used_len: u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX),
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

/// Reads `len(segs)` bytes of the image at `off` into guest memory.
fn image_to_guest<Mem: GuestMemory>(
    img: &Image,
    mem: &Mem,
    segs: &[Seg],
    mut off: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    let mut i = 0;
    while i < segs.len() {
        let start = i;
        let mut slices = Vec::new();
        let mut run = 0u64;
        while i < segs.len() && slices.len() < IOV_BATCH {
            let Ok(vs) = mem.get_slice(segs[i].0, segs[i].1) else {
                break;
            };
            slices.push(vs);
            run += segs[i].1 as u64;
            i += 1;
        }
        if slices.is_empty() {
            // Not contiguous in one region (or not guest memory at all).
            bounce_in(img, mem, &segs[i..=i], off, buf)?;
            run = segs[i].1 as u64;
            i += 1;
        } else {
            match guest_io::with_io_mut(&slices, |iov| img.read_vectored_at(iov, off)) {
                Some(r) => r.map_err(|_| ())?,
                None => bounce_in(img, mem, &segs[start..i], off, buf)?,
            }
        }
        off = off.checked_add(run).ok_or(())?;
    }
    Ok(())
}

/// Writes the guest memory at `segs` to the image at `off`.
fn guest_to_image<Mem: GuestMemory>(
    img: &Image,
    mem: &Mem,
    segs: &[Seg],
    mut off: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    let mut i = 0;
    while i < segs.len() {
        let mut slices = Vec::new();
        let mut run = 0u64;
        while i < segs.len() && slices.len() < IOV_BATCH {
            let Ok(vs) = mem.get_slice(segs[i].0, segs[i].1) else {
                break;
            };
            slices.push(vs);
            run += segs[i].1 as u64;
            i += 1;
        }
        if slices.is_empty() {
            bounce_out(img, mem, segs[i], off, buf)?;
            run = segs[i].1 as u64;
            i += 1;
        } else {
            guest_io::with_io(&slices, |iov| img.write_vectored_at(iov, off)).map_err(|_| ())?;
        }
        off = off.checked_add(run).ok_or(())?;
    }
    Ok(())
}

/// The bounce path of a read: image -> `buf` -> guest, a [`CHUNK`] at a time.
fn bounce_in<Mem: GuestMemory>(
    img: &Image,
    mem: &Mem,
    segs: &[Seg],
    mut off: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    for &(addr, len) in segs {
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            buf.resize(n, 0);
            img.read_at(&mut buf[..n], off).map_err(|_| ())?;
            let at = addr.0.checked_add(done as u64).ok_or(())?;
            mem.write_slice(&buf[..n], GuestAddress(at))
                .map_err(|_| ())?;
            done += n;
            off = off.checked_add(n as u64).ok_or(())?;
        }
    }
    Ok(())
}

/// The bounce path of a write: guest -> `buf` -> image, a [`CHUNK`] at a time.
fn bounce_out<Mem: GuestMemory>(
    img: &Image,
    mem: &Mem,
    (addr, len): Seg,
    mut off: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ()> {
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(CHUNK);
        buf.resize(n, 0);
        let at = addr.0.checked_add(done as u64).ok_or(())?;
        mem.read_slice(&mut buf[..n], GuestAddress(at))
            .map_err(|_| ())?;
        img.write_at(&buf[..n], off).map_err(|_| ())?;
        done += n;
        off = off.checked_add(n as u64).ok_or(())?;
    }
    Ok(())
}

/// DISCARD / WRITE_ZEROES: exactly one 16-byte segment
/// (`sector: u64, num_sectors: u32, flags: u32`).
fn zero_range(img: &Image, ty: u32, seg: &[u8; 16]) -> u8 {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::{MemStorage, Storage};
    use crate::{CreateOptions, OpenOptions};
    use std::sync::Arc;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = 2; // VRING_DESC_F_WRITE
    /// Two guest memory regions, adjacent in guest addresses.
    const SPLIT: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), SPLIT as usize),
            (GuestAddress(SPLIT), SPLIT as usize),
        ])
        .unwrap()
    }

    fn image() -> Image {
        let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
        crate::create::create_on(file.clone(), &CreateOptions::new(), 4 << 20).unwrap();
        Image::open_storage(file, &OpenOptions::new()).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn run(img: &Image, m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Outcome {
        let vq = MockSplitQueue::new(m, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let mut buf = Vec::new();
        process_chain(img, "id", false, chain, &mut buf)
    }

    #[test]
    fn sub_takes_byte_ranges_across_buffers() {
        let segs = [(GuestAddress(100), 10), (GuestAddress(500), 20)];
        assert_eq!(
            sub(&segs, 5, 10),
            vec![(GuestAddress(105), 5), (GuestAddress(500), 5)]
        );
        assert_eq!(sub(&segs, 10, 20), vec![(GuestAddress(500), 20)]);
        assert_eq!(sub(&segs, 29, 5), vec![(GuestAddress(519), 1)]);
        assert!(sub(&segs, 30, 5).is_empty());
    }

    /// A write from a buffer across the two regions (bounce path) and a
    /// read into two overlapping buffers (bounce path, no aliasing views),
    /// then a read into separate buffers in place.
    #[test]
    fn region_crossing_and_overlapping_buffers() {
        let m = mem();
        let img = image();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let src = SPLIT - 4096;
        m.write_slice(&data, GuestAddress(src)).unwrap();
        header(&m, 0x1000, T_OUT, 8);
        let out = run(
            &img,
            &m,
            &[d(0x1000, 16, 0), d(src, 8192, 0), d(0x2000, 1, W)],
        );
        assert_eq!(
            out,
            Outcome {
                used_len: 1,
                status: Some(S_OK)
            }
        );
        let mut got = vec![0u8; 8192];
        img.read_at(&mut got, 4096).unwrap();
        assert!(got == data);

        // Two device-writable descriptors over the same 4 KiB.
        header(&m, 0x1000, T_IN, 8);
        let out = run(
            &img,
            &m,
            &[
                d(0x1000, 16, 0),
                d(0x8000, 4096, W),
                d(0x8000, 4096, W),
                d(0x2000, 1, W),
            ],
        );
        assert_eq!(
            out,
            Outcome {
                used_len: 8193,
                status: Some(S_OK)
            }
        );
        let mut g = vec![0u8; 4096];
        m.read_slice(&mut g, GuestAddress(0x8000)).unwrap();
        assert!(g == data[4096..], "the later descriptor's bytes last");

        // In place: two separate buffers, the second across nothing.
        header(&m, 0x1000, T_IN, 8);
        let out = run(
            &img,
            &m,
            &[
                d(0x1000, 16, 0),
                d(0x9000, 4096, W),
                d(0x20000, 4096, W),
                d(0x2000, 1, W),
            ],
        );
        assert_eq!(out.status, Some(S_OK));
        m.read_slice(&mut g, GuestAddress(0x9000)).unwrap();
        assert!(g == data[..4096]);
        m.read_slice(&mut g, GuestAddress(0x20000)).unwrap();
        assert!(g == data[4096..]);
    }

    /// Chains that cannot carry a status come back with a used length of 0;
    /// buffers outside guest memory fail the request, not the worker.
    #[test]
    fn broken_chains() {
        let m = mem();
        let img = image();
        header(&m, 0x1000, T_IN, 0);
        // No device-writable byte for the status.
        let out = run(&img, &m, &[d(0x1000, 16, 0), d(0x3000, 512, 0)]);
        assert_eq!(
            out,
            Outcome {
                used_len: 0,
                status: None
            }
        );
        // A readable descriptor after a writable one.
        let out = run(
            &img,
            &m,
            &[d(0x1000, 16, 0), d(0x3000, 512, W), d(0x4000, 1, 0)],
        );
        assert_eq!(out.status, None);
        // Data outside guest memory: IOERR, and the status still written.
        let out = run(
            &img,
            &m,
            &[d(0x1000, 16, 0), d(4 * SPLIT, 512, W), d(0x2000, 1, W)],
        );
        assert_eq!(
            out,
            Outcome {
                used_len: 1,
                status: Some(S_IOERR)
            }
        );
        // A header shorter than 16 bytes.
        let out = run(&img, &m, &[d(0x1000, 8, 0), d(0x2000, 1, W)]);
        assert_eq!(out.status, Some(S_IOERR));
    }
}
