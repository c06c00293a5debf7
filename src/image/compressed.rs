//! Compressed writes (QEMU's `qcow2_co_pwritev_compressed`): whole guest
//! clusters compressed with the image's `compression_type` and packed
//! byte-granular into shared host clusters ([`Meta::alloc_bytes`]).
//!
//! Each cluster is compressed with no lock held; under the lock its bytes are
//! reserved and its guest cluster recorded in flight; the stream is written
//! with no lock held; under the lock again the L2 entry is pointed at it
//! (written back only after the data is synced, as for every new cluster).
//! A cluster that does not compress to less than a cluster is written
//! uncompressed through [`Image::write_at`], as QEMU does. An all-zero
//! cluster is compressed like any other (QEMU's driver does not skip it;
//! `qemu-img convert` does, before it gets here).

use super::*;

/// One guest cluster ready for [`Image::write_compressed_cluster`], made by
/// [`Image::compress_cluster`] (which may run on any thread, without the
/// image's lock).
#[derive(Debug, Clone)]
pub struct CompressedCluster {
    /// The compressed stream, or the guest bytes when they did not compress.
    bytes: Vec<u8>,
    /// `bytes` is a compressed stream.
    compressed: bool,
    /// Guest bytes the cluster stands for (a partial last cluster is
    /// shorter than the cluster size).
    guest_len: u64,
}

impl CompressedCluster {
    /// Whether the cluster compressed (otherwise it is written as plain data).
    pub fn is_compressed(&self) -> bool {
        self.compressed
    }

    /// Bytes it takes in the image file (the stream, or the guest bytes).
    pub fn stored_len(&self) -> usize {
        self.bytes.len()
    }
}

impl Image {
    /// Writes `buf` at `offset` compressed, one guest cluster at a time, as
    /// QEMU's compressed writes do: `offset` must be cluster-aligned and the
    /// length a multiple of the cluster size unless the write ends at the
    /// end of the disk (a partial last cluster is padded with zeroes before
    /// compressing). Only unallocated and zero clusters (without a host
    /// cluster) can be written: compressed data never overwrites allocated
    /// data. An empty `buf` aligns the end of the image file to a sector
    /// (as QEMU's zero-length compressed write does).
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.write_compressed_at(&[7; 128 << 10], 0)?; // two clusters, a few bytes each
    /// assert!(img.write_compressed_at(&[1; 64 << 10], 0).is_err()); // allocated now
    /// let mut back = vec![0; 128 << 10];
    /// img.read_at(&mut back, 0)?;
    /// assert!(back.iter().all(|&b| b == 7));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::InvalidArgument` for an unaligned request, `Error::OutOfRange`,
    /// `Error::ClusterAllocated` when a cluster already has a host cluster
    /// (`EIO` in QEMU), `Error::Unsupported` with an external data file, and
    /// what [`Image::write_at`] returns.
    pub fn write_compressed_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        if buf.is_empty() {
            return self.align_file_end();
        }
        let len = buf.len() as u64;
        self.check_compressed_request(offset, len)?;
        let cs = self.geom.cluster_size as usize;
        let mut pos = offset;
        for chunk in buf.chunks(cs) {
            let c = self.compress_cluster(chunk)?;
            self.write_compressed_cluster(&c, pos)?;
            pos += chunk.len() as u64;
        }
        Ok(())
    }

    /// Compresses one guest cluster (`data` at most a cluster; shorter only
    /// for the last cluster of the disk) with the image's compression type.
    /// Takes no lock beyond a moment to read the header: callers may
    /// compress on several threads and write the results in order.
    ///
    /// # Errors
    /// `Error::InvalidArgument` when `data` is empty or longer than a cluster.
    pub fn compress_cluster(&self, data: &[u8]) -> Result<CompressedCluster> {
        let cs = self.geom.cluster_size as usize;
        if data.is_empty() || data.len() > cs {
            return Err(Error::InvalidArgument(format!(
                "a compressed cluster takes 1..={cs} bytes, not {}",
                data.len()
            )));
        }
        let ctype = self.lock()?.header.compression_type;
        let packed;
        let whole = if data.len() < cs {
            let mut b = vec![0u8; cs];
            b[..data.len()].copy_from_slice(data);
            packed = b;
            &packed[..]
        } else {
            data
        };
        Ok(match crate::compress::compress(ctype, whole) {
            Some(bytes) => CompressedCluster {
                bytes,
                compressed: true,
                guest_len: data.len() as u64,
            },
            None => CompressedCluster {
                bytes: data.to_vec(),
                compressed: false,
                guest_len: data.len() as u64,
            },
        })
    }

    /// Writes a cluster made by [`Image::compress_cluster`] at guest offset
    /// `offset` (cluster-aligned): the stream is packed after the previous
    /// compressed cluster, written with no lock held, then linked. An
    /// incompressible cluster is written as plain data ([`Image::write_at`]).
    ///
    /// # Errors
    /// As for [`Image::write_compressed_at`].
    pub fn write_compressed_cluster(&self, c: &CompressedCluster, offset: u64) -> Result<()> {
        self.writable()?;
        self.check_compressed_request(offset, c.guest_len)?;
        if c.guest_len > self.geom.cluster_size {
            return Err(Error::InvalidArgument("more than one cluster".into()));
        }
        if !c.compressed {
            return self.write_at(&c.bytes, offset);
        }
        let cb = self.geom.cluster_bits;
        let cluster = offset >> cb;
        let size = c.bytes.len() as u64;
        let mut meta = self.lock()?;
        meta = self.wait_in_flight(meta, cluster, cluster)?;
        let host = match self.reserve_compressed(&mut meta, offset, size) {
            Ok(h) => h,
            Err(e) => return Err(self.fail_compressed(&mut meta, e)),
        };
        let permit = match meta.gate.permit_data(HostOffset(host), size) {
            Ok(p) => p,
            Err(e) => {
                meta.release_bytes(host, size);
                return Err(self.fail(&mut meta, e, IoOp::Write));
            }
        };
        meta.in_flight.insert(cluster, cluster);
        // Persistent bitmaps record the cluster before its data is written.
        meta.note_dirty(offset, c.guest_len);
        drop(meta);
        // The reserved bytes are referenced by nothing a reader can reach
        // and cannot be handed out again: no lock is needed to fill them.
        self.file
            .debug_event(crate::storage::BlkdebugEvent::WriteCompressed);
        let r = self.data.write_unencrypted(permit, &c.bytes);
        let mut meta = self.meta.write().map_err(|_| Error::PreviousIoFailed)?;
        meta.in_flight.remove(cluster, cluster);
        self.notify_in_flight();
        let r = r.and_then(|()| self.link_compressed(&mut meta, offset, host, size));
        if let Err(e) = r {
            meta.release_bytes(host, size);
            return Err(self.fail(&mut meta, e, IoOp::Write));
        }
        Ok(())
    }

    /// QEMU's zero-length compressed write (what `qemu-img convert -c`
    /// ends with): the image file's end is aligned to a 512-byte sector,
    /// so sector-based readers see whole sectors.
    fn align_file_end(&self) -> Result<()> {
        let mut meta = self.lock()?;
        let r = (|| {
            let len = self.file.len()?;
            let aligned = len.checked_next_multiple_of(SECTOR_SIZE).unwrap_or(len);
            if aligned != len {
                meta.gate.set_len(aligned)?;
            }
            Ok(())
        })();
        r.map_err(|e| self.fail(&mut meta, e, IoOp::Write))
    }

    /// QEMU's request checks for compressed writes: the range (`EIO`),
    /// the data file (`ENOTSUP`), then the alignment (`EINVAL`).
    fn check_compressed_request(&self, offset: u64, len: u64) -> Result<()> {
        let (size, external) = {
            let meta = self.lock()?;
            (meta.header.size, meta.efmt.external_data)
        };
        self.check_range(size, offset, len)?;
        if external {
            return Err(Error::Unsupported(
                crate::error::Unsupported::CompressedWithDataFile,
            ));
        }
        let cs = self.geom.cluster_size;
        let disk_end = size.checked_next_multiple_of(512).unwrap_or(size);
        if offset & (cs - 1) != 0
            || (len & (cs - 1) != 0 && offset + len != disk_end && offset + len != size)
        {
            return Err(Error::InvalidArgument(format!(
                "compressed write of {len} bytes at {offset:#x} is not cluster-aligned"
            )));
        }
        Ok(())
    }

    /// Under the lock: the L2 table (allocated if missing), the refusal of
    /// an allocated cluster, then the bytes for the stream.
    fn reserve_compressed(&self, meta: &mut Meta, offset: u64, size: u64) -> Result<u64> {
        self.before_first_write(meta)?;
        let table = meta.writable_l2_table(self.geom.l1_index(offset))?;
        let slot = meta.l2_slot(table, offset);
        meta.load_l2_slice(slot.slice)?;
        if meta.read_slot(&slot).word & L2E_OFFSET_MASK != 0 {
            return Err(Error::ClusterAllocated { offset });
        }
        meta.alloc_bytes(size)
    }

    /// Under the lock, after the stream is written: points the L2 entry at
    /// it (compressed entries never carry COPIED; extended L2 bitmap 0).
    fn link_compressed(&self, meta: &mut Meta, offset: u64, host: u64, size: u64) -> Result<()> {
        meta.data_unsynced = true;
        if meta.lazy_refcounts {
            meta.mark_dirty()?;
        }
        // The table may have been replaced (copy-on-write of a shared
        // table) or the slice evicted while the data was written.
        let table = meta.writable_l2_table(self.geom.l1_index(offset))?;
        let slot = meta.l2_slot(table, offset);
        meta.load_l2_slice(slot.slice)?;
        let old = meta.read_slot(&slot);
        if old.word & L2E_OFFSET_MASK != 0 {
            return Err(Error::ClusterAllocated { offset });
        }
        let sectors = (host + size - 1) / SECTOR_SIZE - host / SECTOR_SIZE + 1;
        let word = L2Entry::Compressed {
            offset: host,
            sectors,
        }
        .encode(&meta.efmt);
        meta.event(crate::storage::BlkdebugEvent::L2UpdateCompressed);
        meta.write_slot(&slot, RawL2 { word, bitmap: 0 });
        Ok(())
    }

    /// Errors of the reservation: a refused request fails alone, anything
    /// else as any failed write.
    fn fail_compressed(&self, meta: &mut Meta, e: Error) -> Error {
        match e {
            Error::ClusterAllocated { .. } => e,
            e => self.fail(meta, e, IoOp::Write),
        }
    }
}
