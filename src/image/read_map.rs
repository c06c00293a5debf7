//! The read side of the mapping API: [`Image::map_read`] translates a guest
//! range once and hands back where each part lives, holding the I/O barrier
//! so that the host clusters stay valid (not freed, not reused) while the
//! caller does its own I/O.

use super::*;
use crossbeam_utils::sync::ShardedLockReadGuard;

/// Most extents one [`ReadMapping`] holds (inline: mapping allocates
/// nothing); a longer request maps a prefix.
pub const MAX_READ_EXTENTS: usize = 16;

/// An unused slot of [`ReadMapping`]'s inline array.
const NO_EXTENT: MappedExtent = MappedExtent {
    guest: 0,
    len: 0,
    kind: Extent::Unallocated,
};

/// One run of guest bytes and where it reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedExtent {
    /// Guest offset of the run.
    pub guest: u64,
    /// Length of the run in bytes.
    pub len: u64,
    /// Where it reads from ([`Extent::Data`] hosts are in the external data
    /// file when [`ReadMapping::in_data_file`] says so).
    pub kind: Extent,
}

/// The translation of a guest range, from [`Image::map_read`]. While it is
/// alive the host clusters it names are not freed or reused (it holds the
/// image's I/O barrier, as a read in flight does); drop it as soon as the
/// I/O is done: flushes, discards and other requests that free clusters
/// wait for it.
///
/// `N` is the inline capacity: [`Image::map_read`] maps up to
/// [`MAX_READ_EXTENTS`] runs; [`Image::read_at`] uses a smaller one (a
/// short array to fill and move on the hot path) and loops.
#[derive(Debug)]
pub struct ReadMapping<'a, const N: usize = MAX_READ_EXTENTS> {
    _ticket: ShardedLockReadGuard<'a, ()>,
    extents: [MappedExtent; N],
    n: usize,
    in_data_file: bool,
    compression_type: u8,
}

impl<const N: usize> ReadMapping<'_, N> {
    /// The runs, in guest order, contiguous, covering a prefix of the
    /// request (all of it unless more than `N` runs).
    pub fn extents(&self) -> &[MappedExtent] {
        self.extents.get(..self.n).unwrap_or_default()
    }

    /// Bytes of the request covered.
    pub fn len(&self) -> u64 {
        self.extents().iter().map(|e| e.len).sum()
    }

    /// Whether nothing is covered (a request of length 0).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The image's compression type (header field) for
    /// [`Extent::Compressed`] runs.
    pub fn compression_type(&self) -> u8 {
        self.compression_type
    }

    /// Whether [`Extent::Data`] host offsets are in the external data file
    /// (else in the image file).
    pub fn in_data_file(&self) -> bool {
        self.in_data_file
    }
}

impl Image {
    /// Translates `[offset, offset + len)` for a read done by the caller
    /// (its own I/O engine): data runs with their host offsets, zero runs,
    /// unallocated runs (read from the backing image, or zeroes) and
    /// compressed clusters. The mapping keeps the clusters valid until it is
    /// dropped.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Extent, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file.clone(), &OpenOptions::new())?;
    /// img.write_at(b"hello", 65536)?;
    /// let map = img.map_read(0, 2 * 65536)?;
    /// let ext = map.extents();
    /// assert_eq!(ext[0].kind, Extent::Unallocated);
    /// let Extent::Data { host } = ext[1].kind else { panic!("data") };
    /// let mut buf = [0u8; 5];
    /// file.read_at(&mut buf, host).expect("the caller's own I/O");
    /// assert_eq!(&buf, b"hello");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// On an encrypted image the data extents hold ciphertext (each 512-byte
    /// sector encrypted with the IV of its host offset): read guest data with
    /// [`Image::read_at`] there.
    ///
    /// # Errors
    /// As [`Image::read_at`] (out of range, corrupt tables, I/O errors
    /// reading them, a disabled handle).
    pub fn map_read(&self, offset: u64, len: u64) -> Result<ReadMapping<'_>> {
        self.map_read_n(offset, len)
    }

    /// [`Image::map_read`] into an inline array of `N` runs.
    #[inline]
    pub(crate) fn map_read_n<const N: usize>(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<ReadMapping<'_, N>> {
        if let Some(map) = self.map_read_shared(offset, len)? {
            return Ok(map);
        }
        self.map_read_exclusive(offset, len)
    }

    /// [`Image::map_read`] under the exclusive lock: loads missing L2
    /// slices and reports errors.
    #[cold]
    fn map_read_exclusive<const N: usize>(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<ReadMapping<'_, N>> {
        let mut meta = self.lock()?;
        self.check_range(meta.header.size, offset, len)?;
        let mut extents = [NO_EXTENT; N];
        let mut n_ext = 0usize;
        let mut done = 0u64;
        while done < len && n_ext < N {
            let g = offset + done;
            let (kind, n) = match meta.map_extent(g, len - done) {
                Ok(x) => x,
                Err(e) => return Err(self.fail(&mut meta, e, IoOp::Read)),
            };
            extents[n_ext] = MappedExtent {
                guest: g,
                len: n,
                kind,
            };
            n_ext += 1;
            done += n;
        }
        let in_data_file = meta.efmt.external_data;
        let compression_type = meta.header.compression_type;
        // Taken with the metadata lock held (the order flush uses), then
        // the lock is released: the barrier alone keeps the clusters.
        let ticket = self
            .io_barrier
            .read()
            .map_err(|_| Error::PreviousIoFailed)?;
        drop(meta);
        Ok(ReadMapping {
            _ticket: ticket,
            extents,
            n: n_ext,
            in_data_file,
            compression_type,
        })
    }
}

impl Image {
    /// [`Image::map_read`] under the shared lock, from cached L2 slices
    /// only: the prefix of the request mapped before the first miss or
    /// error, `None` when that is nothing (the exclusive path then loads,
    /// or reports the error).
    #[inline]
    fn map_read_shared<const N: usize>(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<ReadMapping<'_, N>>> {
        let Some(meta) = self.lock_shared_in_range(offset, len)? else {
            return Ok(None);
        };
        let mut extents = [NO_EXTENT; N];
        let mut n_ext = 0usize;
        let mut done = 0u64;
        while done < len && n_ext < N {
            let g = offset + done;
            let Ok(Some((kind, n))) = meta.map_extent_cached(g, len - done) else {
                break;
            };
            extents[n_ext] = MappedExtent {
                guest: g,
                len: n,
                kind,
            };
            n_ext += 1;
            done += n;
        }
        if done == 0 && len > 0 {
            return Ok(None);
        }
        let in_data_file = meta.efmt.external_data;
        let compression_type = meta.header.compression_type;
        // Taken before the shared lock is released: clusters freed after
        // this translation are not reused until the ticket is dropped.
        let ticket = self
            .io_barrier
            .read()
            .map_err(|_| Error::PreviousIoFailed)?;
        drop(meta);
        Ok(Some(ReadMapping {
            _ticket: ticket,
            extents,
            n: n_ext,
            in_data_file,
            compression_type,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::options::CreateOptions;
    use crate::storage::MemStorage;

    fn image() -> (Arc<MemStorage>, Image) {
        let mem = Arc::new(MemStorage::new());
        let file: Arc<dyn Storage> = mem.clone();
        let o = CreateOptions::new().cluster_size(4096);
        crate::create::create_on(file.clone(), &o, 8 << 20).unwrap();
        (mem, Image::open_storage(file, &OpenOptions::new()).unwrap())
    }

    /// Doing the I/O the mapping describes gives the bytes `read_at` gives,
    /// over data, zero and unallocated runs; the runs tile the request.
    #[test]
    fn caller_io_from_the_mapping_matches_read_at() {
        let (mem, img) = image();
        img.write_at(&[1; 10_000], 3000).unwrap();
        img.write_at(&[2; 4096], 40_960).unwrap();
        img.write_zeroes(16_384, 8192, false).unwrap();
        let (off, len) = (1000u64, 60_000u64);
        let map = img.map_read(off, len).unwrap();
        assert_eq!(map.len(), len);
        assert!(!map.in_data_file());
        let mut got = vec![0xeeu8; len as usize];
        let mut pos = off;
        let mut kinds = Vec::new();
        for e in map.extents() {
            assert_eq!(e.guest, pos, "contiguous");
            let dst = &mut got[(e.guest - off) as usize..(e.guest - off + e.len) as usize];
            match e.kind {
                Extent::Data { host } => mem.read_at(dst, host).unwrap(),
                Extent::Zero { .. } | Extent::Unallocated => dst.fill(0),
                Extent::Compressed { .. } => panic!("nothing compressed"),
            }
            kinds.push(std::mem::discriminant(&e.kind));
            pos += e.len;
        }
        drop(map);
        assert!(kinds.contains(&std::mem::discriminant(&Extent::Unallocated)));
        assert!(kinds.contains(&std::mem::discriminant(&Extent::Zero { host: None })));
        let mut want = vec![0u8; len as usize];
        img.read_at(&mut want, off).unwrap();
        assert_eq!(got, want);
    }

    /// Cache-hit reads, in-place overwrites and in-place reservations need
    /// only the shared side of the metadata lock: they complete on another
    /// thread while this one holds it (with an exclusive lock they could
    /// not, and the test would hang), and they count as cache hits.
    #[test]
    fn cache_hits_translate_under_the_shared_lock() {
        let (_mem, img) = image();
        img.write_at(&[4; 3 * 4096], 0).unwrap();
        let mut warm = [0u8; 4096];
        img.read_at(&mut warm, 0).unwrap();
        let before = img.cache_stats().0;
        let held = img.lock_shared().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = [0u8; 5000];
                img.read_at(&mut buf, 100).unwrap();
                assert_eq!(buf, [4; 5000]);
                let map = img.map_read(0, 3 * 4096).unwrap();
                assert_eq!(map.extents().len(), 1);
                drop(map);
                img.write_at(&[5; 100], 200).unwrap();
                let res = img.reserve_write(4096, 4096).unwrap();
                assert_eq!(res.len(), 4096);
                res.commit().unwrap();
            })
            .join()
            .unwrap();
        });
        drop(held);
        let after = img.cache_stats().0;
        assert_eq!(after.misses, before.misses, "no miss");
        assert!(after.hits >= before.hits + 4, "{before:?} -> {after:?}");
        let mut b = [0u8; 300];
        img.read_at(&mut b, 0).unwrap();
        assert!(b[..200].iter().all(|&x| x == 4) && b[200..].iter().all(|&x| x == 5));
    }

    /// A request of many runs maps a prefix of at most `MAX_READ_EXTENTS`
    /// runs; out-of-range requests are refused; length 0 maps nothing.
    #[test]
    fn long_requests_map_a_prefix() {
        let (_mem, img) = image();
        // Every other cluster written: alternating data and unallocated.
        for c in (0..400u64).step_by(2) {
            img.write_at(&[3; 4096], c * 4096).unwrap();
        }
        let map = img.map_read(0, 400 * 4096).unwrap();
        assert_eq!(map.extents().len(), MAX_READ_EXTENTS);
        assert_eq!(map.len(), MAX_READ_EXTENTS as u64 * 4096);
        drop(map);
        assert!(img.map_read(8 << 20, 1).is_err());
        assert!(img.map_read(0, 0).unwrap().is_empty());
    }
}
