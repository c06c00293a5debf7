//! Vectored guest I/O: [`Image::read_vectored_at`] and
//! [`Image::write_vectored_at`]. Each contiguous host run is one
//! `preadv`/`pwritev` over the part of the caller's buffer list it covers
//! (sub-slices of the caller's buffers, no copy); only allocating writes copy
//! their data, into a per-thread buffer.

use super::write::WriteStep;
use super::*;
use std::cell::RefCell;
use std::io::{IoSlice, IoSliceMut};

/// Most bytes of an allocating vectored write copied (gathered) at once.
const GATHER_MAX: u64 = 4 << 20;

thread_local! {
    /// The gather buffer of allocating vectored writes.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Total length of a buffer list, `None` on overflow.
fn total(lens: impl Iterator<Item = usize>) -> Option<u64> {
    lens.map(|l| l as u64).try_fold(0u64, u64::checked_add)
}

/// Most buffer pieces one host run passes to `preadv`/`pwritev` from an
/// inline array; a run over more of the caller's buffers builds a list on
/// the heap.
const INLINE_IOV: usize = 8;

/// The part of a buffer of length `l` at position `lo` of the concatenation
/// that lies in `[start, end)`: `None` before it or when empty, `Some(None)`
/// past it (stop), else the range within the buffer.
fn clip(lo: usize, l: usize, start: usize, end: usize) -> Option<Option<(usize, usize)>> {
    let hi = lo + l;
    if lo >= end {
        return Some(None);
    }
    if hi <= start || l == 0 {
        return None;
    }
    Some(Some((start.max(lo) - lo, end.min(hi) - lo)))
}

/// Calls `f` with the parts of `bufs` covering bytes `[start, start +
/// len)` of their concatenation, borrowed from the caller's buffers (no
/// heap allocation for up to [`INLINE_IOV`] parts).
fn with_sub_mut<R>(
    bufs: &mut [IoSliceMut<'_>],
    start: usize,
    len: usize,
    f: impl FnOnce(&mut [IoSliceMut<'_>]) -> R,
) -> R {
    let mut arr: [IoSliceMut<'_>; INLINE_IOV] = std::array::from_fn(|_| IoSliceMut::new(&mut []));
    let mut n = 0usize;
    let mut spill: Vec<IoSliceMut<'_>> = Vec::new();
    let mut pos = 0usize;
    for b in bufs.iter_mut() {
        let lo = pos;
        pos += b.len();
        let (from, to) = match clip(lo, b.len(), start, start + len) {
            None => continue,
            Some(None) => break,
            Some(Some(r)) => r,
        };
        let part = IoSliceMut::new(&mut b[from..to]);
        if spill.is_empty() && n < INLINE_IOV {
            arr[n] = part;
            n += 1;
        } else {
            if spill.is_empty() {
                spill.extend(
                    arr.iter_mut()
                        .take(n)
                        .map(|x| std::mem::replace(x, IoSliceMut::new(&mut []))),
                );
            }
            spill.push(part);
        }
    }
    if spill.is_empty() {
        f(&mut arr[..n])
    } else {
        f(&mut spill)
    }
}

/// Calls `f` with the parts of `bufs` covering bytes `[start, start + len)`
/// (no heap allocation for up to [`INLINE_IOV`] parts).
fn with_sub<R>(
    bufs: &[IoSlice<'_>],
    start: usize,
    len: usize,
    f: impl FnOnce(&[IoSlice<'_>]) -> R,
) -> R {
    let mut arr = [IoSlice::new(&[]); INLINE_IOV];
    let mut n = 0usize;
    let mut spill: Vec<IoSlice<'_>> = Vec::new();
    let mut pos = 0usize;
    for b in bufs {
        let lo = pos;
        pos += b.len();
        let (from, to) = match clip(lo, b.len(), start, start + len) {
            None => continue,
            Some(None) => break,
            Some(Some(r)) => r,
        };
        let part = IoSlice::new(&b[from..to]);
        if spill.is_empty() && n < INLINE_IOV {
            arr[n] = part;
            n += 1;
        } else {
            if spill.is_empty() {
                spill.extend_from_slice(&arr[..n]);
            }
            spill.push(part);
        }
    }
    if spill.is_empty() {
        f(&arr[..n])
    } else {
        f(&spill)
    }
}

/// Calls `f(piece, at)` for each part of `[start, start + len)` of `bufs`,
/// `at` being the part's position relative to `start`.
fn each_mut(
    bufs: &mut [IoSliceMut<'_>],
    start: usize,
    len: usize,
    mut f: impl FnMut(&mut [u8], usize) -> Result<()>,
) -> Result<()> {
    let mut at = 0usize;
    let mut pos = 0usize;
    for b in bufs.iter_mut() {
        let lo = pos;
        pos += b.len();
        let (from, to) = match clip(lo, b.len(), start, start + len) {
            None => continue,
            Some(None) => break,
            Some(Some(r)) => r,
        };
        f(&mut b[from..to], at)?;
        at += to - from;
    }
    Ok(())
}

impl Image {
    /// Reads the guest bytes at `offset` into `bufs`, one after the other
    /// (scatter read): the same bytes as [`Image::read_at`] into their
    /// concatenation. Each contiguous run of host data is one `preadv`
    /// over the parts of `bufs` it covers; zero and unallocated clusters are
    /// filled in place, backing and compressed data read as for `read_at`.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::io::{IoSlice, IoSliceMut};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// // A header and a payload written with one call...
    /// img.write_vectored_at(&[IoSlice::new(b"head"), IoSlice::new(&[7; 60])], 4096)?;
    /// // ...read back split differently.
    /// let (mut a, mut b) = ([0u8; 10], [0u8; 54]);
    /// img.read_vectored_at(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)], 4096)?;
    /// assert_eq!(&a[..4], b"head");
    /// assert_eq!(a[4..], [7; 6]);
    /// assert_eq!(b, [7; 54]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Image::read_at`]; `Error::OutOfRange` also when the lengths of
    /// `bufs` overflow.
    pub fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let Some(len) = total(bufs.iter().map(|b| b.len())) else {
            return Err(Error::OutOfRange {
                offset,
                len: u64::MAX,
                size: self.size(),
            });
        };
        if self.data.is_encrypted() {
            return self.read_vectored_encrypted(bufs, offset, len);
        }
        // Built on the mapping API: one translation per up to
        // MAX_READ_EXTENTS runs, the I/O under the mapping's ticket.
        let mut done = 0u64;
        while done < len {
            let map = self.map_read(offset + done, len - done)?;
            let mut r = Ok(());
            for e in map.extents() {
                let (start, n) = ((e.guest - offset) as usize, e.len as usize);
                r = match e.kind {
                    Extent::Data { host } => {
                        with_sub_mut(bufs, start, n, |parts| self.data.read_vectored(parts, host))
                    }
                    Extent::Zero { .. } => each_mut(bufs, start, n, |d, _| {
                        d.fill(0);
                        Ok(())
                    }),
                    Extent::Unallocated => each_mut(bufs, start, n, |d, at| {
                        self.read_backing(d, e.guest + at as u64)
                    }),
                    Extent::Compressed {
                        offset: coff,
                        len: clen,
                    } => {
                        let in_cluster = (e.guest & (self.geom.cluster_size - 1)) as usize;
                        self.read_compressed(map.compression_type(), coff, clen)
                            .and_then(|data| {
                                each_mut(bufs, start, n, |d, at| {
                                    let from = in_cluster + at;
                                    let src = data.get(from..from + d.len()).ok_or_else(|| {
                                        Error::InvalidArgument(
                                            "compressed extent past its cluster".into(),
                                        )
                                    })?;
                                    d.copy_from_slice(src);
                                    Ok(())
                                })
                            })
                    }
                };
                if r.is_err() {
                    break;
                }
            }
            let mapped = map.len();
            // Never wait for the metadata lock while holding the barrier.
            drop(map);
            if let Err(e) = r {
                let mut meta = self.meta.write().map_err(|_| Error::PreviousIoFailed)?;
                return Err(self.fail(&mut meta, e, IoOp::Read));
            }
            done += mapped;
        }
        Ok(())
    }

    /// Writes `bufs`, one after the other, at guest offset `offset` (gather
    /// write): the same result as [`Image::write_at`] of their
    /// concatenation. Runs overwritten in place are one `pwritev` over the
    /// parts of `bufs` they cover; allocating runs (copy-on-write, new
    /// clusters) gather their data into a per-thread buffer first and go
    /// through the allocating path of `write_at`.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::io::IoSlice;
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.write_vectored_at(&[IoSlice::new(b"qcow"), IoSlice::new(b"2kit")], 100)?;
    /// let mut buf = [0u8; 8];
    /// img.read_at(&mut buf, 100)?;
    /// assert_eq!(&buf, b"qcow2kit");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Image::write_at`]; `Error::OutOfRange` also when the lengths of
    /// `bufs` overflow.
    pub fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.writable()?;
        let Some(len) = total(bufs.iter().map(|b| b.len())) else {
            return Err(Error::OutOfRange {
                offset,
                len: u64::MAX,
                size: self.size(),
            });
        };
        if self.data.is_encrypted() {
            return self.write_vectored_encrypted(bufs, offset, len);
        }
        let cb = self.geom.cluster_bits;
        let mut done = 0u64;
        while done < len {
            let g = offset + done;
            if let Some((meta, permit, n)) = self.in_place_shared(offset, len, g, len - done)? {
                with_sub(bufs, done as usize, n as usize, |parts| {
                    self.in_place(meta, permit, parts)
                })?;
                done += n;
                continue;
            }
            let mut meta = self.lock()?;
            if done == 0 {
                self.check_range(meta.header.size, offset, len)?;
            }
            let last = (offset + len - 1) >> cb;
            meta = self.wait_in_flight(meta, g >> cb, last)?;
            if done == 0 {
                if let Err(e) = self.before_first_write(&mut meta) {
                    return Err(self.fail(&mut meta, e, IoOp::Write));
                }
            }
            let step = match self.write_step(&mut meta, g, len - done) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(&mut meta, e, IoOp::Write)),
            };
            meta.note_dirty(g, step.len());
            done += match step {
                WriteStep::InPlace { permit, len: n } => {
                    with_sub(bufs, done as usize, n as usize, |parts| {
                        self.in_place(meta, permit, parts)
                    })?;
                    n
                }
                WriteStep::Alloc { len: n } => {
                    // Gather at most GATHER_MAX bytes, ending on a cluster
                    // boundary unless the request ends first.
                    let cap = ((g + GATHER_MAX) >> cb << cb).max(g + 1) - g;
                    let n = n.min(cap) as usize;
                    let mut tmp = GATHER.with(|b| std::mem::take(&mut *b.borrow_mut()));
                    tmp.clear();
                    with_sub(bufs, done as usize, n, |parts| {
                        for part in parts {
                            tmp.extend_from_slice(part);
                        }
                    });
                    let r = self.alloc_step(meta, g, &tmp);
                    GATHER.with(|b| *b.borrow_mut() = tmp);
                    r?
                }
            };
        }
        Ok(())
    }
}
