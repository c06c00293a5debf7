//! A `null` storage for qcow2kit: guest data reads return zeroes and guest
//! data writes are dropped, so a run over it measures the format layer alone.
//!
//! A storage that returns zeroes for *everything* cannot hold a qcow2 image
//! (the header would read as zeroes), so the clusters that are not guest data
//! when the storage is built (header, refcount table and blocks, L1 and L2
//! tables) are kept in memory and stay readable and writable. Every other
//! cluster, including clusters allocated later (new data clusters and new L2
//! tables alike), reads as zeroes and drops its writes. The L2 tables a run
//! allocates therefore live only in qcow2kit's L2 cache, which with the
//! default cache size covers the whole 1 GiB disk, so nothing is lost.

use qcow2kit::storage::Storage;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Metadata clusters in memory, data clusters nowhere.
#[derive(Debug)]
pub struct NullStorage {
    /// Sorted by cluster index; the set never changes after construction.
    meta: Vec<(u64, RwLock<Vec<u8>>)>,
    cluster_bits: u32,
    len: AtomicU64,
}

impl NullStorage {
    /// Snapshots the metadata clusters of the qcow2 image at `path`.
    pub fn from_image(path: &Path) -> io::Result<NullStorage> {
        use std::os::unix::fs::FileExt;
        let err = |e: qcow2kit::Error| io::Error::other(e.to_string());
        let img = qcow2kit::Image::open(path, &qcow2kit::OpenOptions::new().read_only(true))
            .map_err(err)?;
        let cs = img.cluster_size();
        let cluster_bits = cs.trailing_zeros();
        let mut data = std::collections::HashSet::new();
        let mut g = 0;
        while g < img.size() {
            if let Some(h) = img.host_cluster(g).map_err(err)? {
                data.insert(h >> cluster_bits);
            }
            g += cs;
        }
        drop(img);
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let mut meta = Vec::new();
        for c in 0..len.div_ceil(cs) {
            if data.contains(&c) {
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            let off = c << cluster_bits;
            let n = (len - off).min(cs) as usize;
            file.read_exact_at(&mut buf[..n], off)?;
            meta.push((c, RwLock::new(buf)));
        }
        Ok(NullStorage {
            meta,
            cluster_bits,
            len: AtomicU64::new(len),
        })
    }

    fn find(&self, cluster: u64) -> Option<&RwLock<Vec<u8>>> {
        self.meta
            .binary_search_by_key(&cluster, |(c, _)| *c)
            .ok()
            .map(|i| &self.meta[i].1)
    }

    /// Calls `f(cluster_buffer, offset_in_cluster, position_in_request, length)`
    /// for each cluster piece of `[offset, offset + len)`.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(Option<&RwLock<Vec<u8>>>, usize, usize, usize),
    ) {
        let cs = 1usize << self.cluster_bits;
        let mut pos = 0;
        while pos < len {
            let o = offset + pos as u64;
            let within = (o & (cs as u64 - 1)) as usize;
            let n = (len - pos).min(cs - within);
            f(self.find(o >> self.cluster_bits), within, pos, n);
            pos += n;
        }
    }
}

impl Storage for NullStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.pieces(offset, buf.len(), |c, within, pos, n| match c {
            Some(c) => buf[pos..pos + n].copy_from_slice(&c.read().unwrap()[within..within + n]),
            None => buf[pos..pos + n].fill(0),
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pieces(offset, buf.len(), |c, within, pos, n| {
            if let Some(c) = c {
                c.write().unwrap()[within..within + n].copy_from_slice(&buf[pos..pos + n]);
            }
        });
        self.len
            .fetch_max(offset + buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Relaxed))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.len.store(len, Ordering::Relaxed);
        Ok(())
    }
}
