//! `convert`'s sources (a qcow2 image with its backing chain, or a raw file
//! with `-f raw`) and its compressed copy (`-c`): whole clusters compressed
//! on several threads and written in guest order, as qemu-img does.

use crate::common::Fail;
use crate::map::{block_status, layers, Layer};
use crate::progress::Progress;
use qcow2kit::error::IoOp;
use qcow2kit::storage::{FileStorage, Storage};
use qcow2kit::{CompressedCluster, Error, Image};

/// The image `convert` reads.
pub enum Src {
    /// A qcow2 image, read through its backing chain.
    Qcow2(Box<Image>),
    /// A raw file (`-f raw`) and its length in bytes (the guest size is
    /// that rounded up to a 512-byte sector, as QEMU's block layer sees it;
    /// the bytes past the end read as zeroes).
    Raw(FileStorage, u64),
}

/// Where a source holds data: the backing-chain walker, or the raw file's
/// holes.
pub enum Extents<'a> {
    Qcow2(Vec<Layer<'a>>),
    Raw(&'a FileStorage),
}

impl Src {
    /// Opens `name` as a raw source, with qemu-img's message on failure.
    pub fn open_raw(name: &str, direct: bool) -> Result<Src, Fail> {
        let file =
            FileStorage::open_with(std::path::Path::new(name), false, direct).map_err(|e| {
                let text = Error::io(IoOp::Read, 0, e).qemu_message();
                Fail::Msg(format!(
                    "Could not open '{name}': Could not open '{name}': {text}"
                ))
            })?;
        let len = file
            .len()
            .map_err(|e| Fail::Msg(format!("Could not open '{name}': {e}")))?;
        Ok(Src::Raw(file, len))
    }

    /// The guest size.
    pub fn size(&self) -> u64 {
        match self {
            Src::Qcow2(img) => img.size(),
            Src::Raw(_, len) => len.checked_next_multiple_of(512).unwrap_or(*len),
        }
    }

    /// Reads guest bytes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        match self {
            Src::Qcow2(img) => img.read_at(buf, offset),
            Src::Raw(file, len) => {
                let n = len.saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[n..].fill(0);
                if n == 0 {
                    return Ok(());
                }
                file.read_at(&mut buf[..n], offset)
                    .map_err(|e| Error::io(IoOp::Read, offset, e))
            }
        }
    }

    /// The extent walker for `name`.
    pub fn extents(&self, name: &str) -> Result<Extents<'_>, Error> {
        Ok(match self {
            Src::Qcow2(img) => Extents::Qcow2(layers(img, name)?),
            Src::Raw(file, _) => Extents::Raw(file),
        })
    }
}

/// What block status says about a run (QEMU's `BDRV_BLOCK_ALLOCATED`,
/// `_ZERO`, `_DATA` and `_EOF`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Some layer of the chain allocates it.
    pub allocated: bool,
    /// It reads as zeroes.
    pub zero: bool,
    /// It has data.
    pub data: bool,
    /// The run reaches the end of the image.
    pub eof: bool,
}

impl Extents<'_> {
    /// Whether the run from `offset` (at most `max` bytes) may hold non-zero
    /// data, and its length (> 0).
    pub fn next(&self, offset: u64, max: u64) -> Result<(bool, u64), Error> {
        match self {
            Extents::Qcow2(ls) => {
                let e = block_status(ls, offset, max)?;
                Ok((e.data && !e.zero, e.length.clamp(1, max)))
            }
            Extents::Raw(file) => match file.data_extent(offset, max) {
                Ok((data, len)) => Ok((data, len.clamp(1, max))),
                Err(_) => Ok((true, max)),
            },
        }
    }

    /// The block status of the run from `offset` (at most `max` bytes) and
    /// its length (> 0).
    pub fn status(&self, offset: u64, max: u64) -> Result<(Status, u64), Error> {
        match self {
            Extents::Qcow2(ls) => {
                let e = block_status(ls, offset, max)?;
                let len = e.length.clamp(1, max);
                let s = Status {
                    allocated: e.present,
                    zero: e.zero,
                    data: e.data,
                    eof: len == max,
                };
                Ok((s, len))
            }
            Extents::Raw(_) => {
                // The raw driver allocates everything; holes read as zeroes.
                let (data, len) = self.next(offset, max)?;
                let s = Status {
                    allocated: true,
                    zero: !data,
                    data,
                    eof: len == max,
                };
                Ok((s, len))
            }
        }
    }

    /// Whether `[from, to)` may hold non-zero data.
    fn any_data(&self, from: u64, to: u64) -> Result<bool, Error> {
        let mut pos = from;
        while pos < to {
            let (data, len) = self.next(pos, to - pos)?;
            if data {
                return Ok(true);
            }
            pos += len;
        }
        Ok(false)
    }
}

/// Clusters compressed per thread between two in-order write phases.
const CLUSTERS_PER_THREAD: usize = 16;

/// Copies `src` into `out` compressed: every cluster holding non-zero data
/// is compressed (on up to `available_parallelism` threads, at most 8) and
/// written in guest order with [`Image::write_compressed_cluster`], so the
/// host layout is the one qemu-img's in-order compressed writes give;
/// all-zero clusters are skipped (the new target reads as zeroes), as
/// qemu-img does.
pub fn copy_compressed(
    src: &Src,
    src_name: &str,
    out: &Image,
    progress: &mut Progress,
) -> Result<(), Fail> {
    let ext = src
        .extents(src_name)
        .map_err(|e| Fail::Msg(e.qemu_message()))?;
    let size = src.size();
    let cs = out.cluster_size();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let batch = cs.saturating_mul((threads * CLUSTERS_PER_THREAD) as u64);
    let mut buf = Vec::new();
    let mut off = 0u64;
    while off < size {
        let end = off.saturating_add(batch).min(size);
        let has_data = ext.any_data(off, end).map_err(|e| {
            Fail::Msg(format!(
                "error while reading at byte {off}: {}",
                e.errno_text()
            ))
        })?;
        if has_data {
            // The target's size is the source's rounded up to a sector:
            // the last cluster is written up to it, zero-padded, as
            // qemu-img writes whole sectors.
            let padded_end = if end == size {
                out.size().max(end)
            } else {
                end
            };
            buf.clear();
            buf.resize((padded_end - off) as usize, 0);
            src.read_at(&mut buf[..(end - off) as usize], off)
                .map_err(|e| {
                    Fail::Msg(format!(
                        "error while reading at byte {off}: {}",
                        e.errno_text()
                    ))
                })?;
            let clusters: Vec<&[u8]> = buf.chunks(cs as usize).collect();
            let done = compress_all(out, &clusters, threads);
            for (i, c) in done.into_iter().enumerate() {
                let at = off + i as u64 * cs;
                let written = match c {
                    None => Ok(()),
                    Some(Ok(c)) => out.write_compressed_cluster(&c, at),
                    Some(Err(e)) => Err(e),
                };
                written.map_err(|e| {
                    Fail::Msg(format!(
                        "error while writing at byte {at}: {}",
                        e.errno_text()
                    ))
                })?;
            }
        }
        off = end;
        progress.set(off, size);
    }
    // qemu-img ends a compressed conversion with a zero-length compressed
    // write: the file end is aligned to a sector.
    out.write_compressed_at(&[], 0)
        .map_err(|e| Fail::Msg(format!("error while writing at byte 0: {}", e.errno_text())))
}

/// Compresses `clusters` on `threads` scoped threads, in contiguous shares;
/// `None` for an all-zero cluster.
fn compress_all(
    out: &Image,
    clusters: &[&[u8]],
    threads: usize,
) -> Vec<Option<Result<CompressedCluster, Error>>> {
    let one = |c: &[u8]| (!c.iter().all(|b| *b == 0)).then(|| out.compress_cluster(c));
    let share = clusters.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = clusters
            .chunks(share)
            .map(|part| s.spawn(move || part.iter().map(|c| one(c)).collect::<Vec<_>>()))
            .collect();
        let mut all = Vec::with_capacity(clusters.len());
        for (h, part) in handles.into_iter().zip(clusters.chunks(share)) {
            match h.join() {
                Ok(v) => all.extend(v),
                // A worker cannot panic on data (compression has no panics
                // on input); if it did, those clusters fail their write.
                Err(_) => all.extend(
                    part.iter()
                        .map(|_| Some(Err(Error::Internal("compression worker failed".into())))),
                ),
            }
        }
        all
    })
}
