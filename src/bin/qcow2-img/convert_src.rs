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

    /// qemu-img convert's source alignment in sectors (`src_alignment`): the
    /// cluster size of a qcow2 image (`bdrv_get_info`), one sector for a
    /// raw file (its request alignment; raw has no cluster size).
    pub fn alignment_sectors(&self) -> u64 {
        match self {
            Src::Qcow2(img) => (img.cluster_size() / 512).max(1),
            Src::Raw(..) => 1,
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
}

/// QEMU's `BDRV_REQUEST_MAX_SECTORS`: the longest block-status query.
const REQUEST_MAX_SECTORS: u64 = (i32::MAX as u64) >> 9;

/// qemu-img convert's copy buffer in sectors (`IO_BUF_SIZE`, 2 MiB).
pub const BUF_SECTORS: u64 = 4096;

/// qemu-img convert's walk over the source (`convert_iteration_sectors`):
/// the source is taken in chunks whose ends follow its block status (each
/// status run trimmed to the source alignment), data chunks at most
/// `buf` sectors; for a compressed target whole clusters (a run shorter
/// than a cluster counts as data for the whole cluster). The progress
/// indicator advances by data chunk, so following QEMU's chunks exactly
/// is what makes `-p` print what qemu-img prints.
pub struct Walk<'a> {
    ext: &'a Extents<'a>,
    /// Source sectors.
    total: u64,
    /// Source alignment in sectors.
    align: u64,
    /// Sectors per data chunk.
    buf: u64,
    /// Target cluster in sectors, for a compressed copy.
    cluster: Option<u64>,
    /// Where the current status run ends (`sector_next_status`).
    next_status: u64,
    /// The current run is `BLK_DATA` (else `BLK_ZERO`).
    data: bool,
}

impl<'a> Walk<'a> {
    /// A walk over `ext`, `total` sectors long.
    pub fn new(
        ext: &'a Extents<'a>,
        total: u64,
        align: u64,
        buf: u64,
        cluster: Option<u64>,
    ) -> Self {
        Walk {
            ext,
            total,
            align: align.max(1),
            buf: buf.max(1),
            cluster: cluster.filter(|c| *c > 0),
            next_status: 0,
            data: false,
        }
    }

    /// The chunk at `sector` (below `total`): its length in sectors (> 0)
    /// and whether it is data.
    ///
    /// # Errors
    /// Block status errors of the source.
    pub fn chunk(&mut self, sector: u64) -> Result<(u64, bool), Error> {
        let mut n = (self.total - sector).min(REQUEST_MAX_SECTORS);
        if self.next_status <= sector {
            let (st, len) = self.ext.status(sector * 512, n * 512)?;
            n = len.div_ceil(512).max(1);
            let tail = (sector + n) % self.align;
            if n > tail {
                n -= tail;
            }
            self.data = !st.zero;
            self.next_status = sector + n;
        }
        n = n.min(self.next_status - sector);
        if self.data {
            n = n.min(self.buf);
        }
        if let Some(cs) = self.cluster {
            if n < cs {
                n = cs.min(self.total - sector);
                self.data = true;
            } else {
                n -= n % cs;
            }
        }
        Ok((n, self.data))
    }

    /// The data sectors of the whole walk (qemu-img's first pass,
    /// `allocated_sectors`); the walk starts over afterwards.
    ///
    /// # Errors
    /// As for [`Walk::chunk`].
    pub fn data_sectors(&mut self) -> Result<u64, Error> {
        let (mut sector, mut data) = (0u64, 0u64);
        while sector < self.total {
            let (n, is_data) = self.chunk(sector)?;
            if is_data {
                data += n;
            }
            sector += n;
        }
        self.next_status = 0;
        Ok(data)
    }
}

/// The progress after `done` of `total` data sectors, as qemu-img computes
/// it (a double quotient passed on as a float).
pub fn percent(done: u64, total: u64) -> f32 {
    (100.0 * done as f64 / total.max(1) as f64) as f32
}

/// Clusters compressed per thread between two in-order write phases.
const CLUSTERS_PER_THREAD: usize = 16;

/// Copies `src` into `out` compressed: the source is walked in qemu-img's
/// chunks of one target cluster ([`Walk`]); every chunk holding non-zero
/// data is compressed (on up to `available_parallelism` threads, at most 8,
/// a batch at a time) and written in guest order with
/// [`Image::write_compressed_cluster`], so the host layout is the one
/// qemu-img's in-order compressed writes give; all-zero chunks are skipped
/// (the new target reads as zeroes), as qemu-img does. Progress advances by
/// data chunk, as qemu-img's does.
pub fn copy_compressed(
    src: &Src,
    src_name: &str,
    out: &Image,
    progress: &mut Progress,
) -> Result<(), Fail> {
    let ext = src
        .extents(src_name)
        .map_err(|e| Fail::Msg(e.qemu_message()))?;
    let total = src.size() / 512;
    let cluster = (out.cluster_size() / 512).max(1);
    let status_err = |sector: u64, e: Error| {
        Fail::Msg(format!(
            "error while reading block status at offset {}: {}",
            sector * 512,
            e.errno_text()
        ))
    };
    let mut walk = Walk::new(&ext, total, src.alignment_sectors(), cluster, Some(cluster));
    let allocated = walk.data_sectors().map_err(|e| status_err(0, e))?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let batch = threads * CLUSTERS_PER_THREAD;
    let mut done = 0u64;
    let mut sector = 0u64;
    // (start sector, sectors) of the data chunks of the batch, and their bytes.
    let mut chunks: Vec<(u64, u64)> = Vec::with_capacity(batch);
    let mut buf = Vec::new();
    while sector < total {
        chunks.clear();
        while sector < total && chunks.len() < batch {
            let (n, data) = walk.chunk(sector).map_err(|e| status_err(sector, e))?;
            if data {
                chunks.push((sector, n));
            }
            sector += n;
        }
        let bytes: u64 = chunks.iter().map(|(_, n)| n * 512).sum();
        buf.clear();
        buf.resize(usize::try_from(bytes).unwrap_or(0), 0);
        let mut at = 0usize;
        for (i, &(start, n)) in chunks.iter().enumerate() {
            let len = (n * 512) as usize;
            if let Err(e) = src.read_at(&mut buf[at..at + len], start * 512) {
                // qemu-img has printed the progress of the chunk it failed to read.
                for &(_, m) in &chunks[..=i] {
                    done += m;
                    progress.update(percent(done, allocated));
                }
                return Err(Fail::Msg(format!(
                    "error while reading at byte {}: {}",
                    start * 512,
                    e.errno_text()
                )));
            }
            at += len;
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(chunks.len());
        let mut rest = &buf[..];
        for &(_, n) in &chunks {
            let (part, tail) = rest.split_at((n * 512) as usize);
            parts.push(part);
            rest = tail;
        }
        let compressed = compress_all(out, &parts, threads);
        for (&(start, n), c) in chunks.iter().zip(compressed) {
            done += n;
            progress.update(percent(done, allocated));
            let at = start * 512;
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
