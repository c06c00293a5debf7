//! Byte-granular allocation for compressed clusters (QEMU's
//! `qcow2_alloc_bytes`): compressed streams are packed one after the other
//! into shared host clusters.
//!
//! The refcount of a host cluster is the number of compressed clusters whose
//! byte range touches it (a stream that runs into the next host cluster
//! raises both), as QEMU counts them and `check` verifies.

use super::refcount::Update;
use super::{DiscardType, Meta};
use crate::error::{Error, Result};
use crate::format::refcount;

impl Meta {
    /// Reserves `size` bytes (1..=cluster size) for one compressed cluster
    /// and returns their host offset. The refcounts of the host clusters the
    /// range touches are raised (in the cache: written before any L2 entry
    /// at flush time). Continues in the host cluster of the previous
    /// compressed cluster while it has room and its refcount is below the
    /// maximum; a stream that does not fit continues into the next host
    /// cluster when that one is the next free cluster, as in QEMU.
    pub fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        self.event(crate::storage::BlkdebugEvent::ClusterAllocBytes);
        let cs = self.geom.cluster_size;
        let cb = self.geom.cluster_bits;
        if size == 0 || size > cs {
            return Err(Error::Internal(format!(
                "compressed allocation of {size} bytes"
            )));
        }
        let max = refcount::max_value(self.rgeom.refcount_order);
        let mut offset = self.free_byte_offset;
        if offset != 0 && self.refcount(offset >> cb)? >= max {
            offset = 0;
        }
        let mut free_in_cluster = cs - (offset & (cs - 1));
        loop {
            if offset == 0 || free_in_cluster < size {
                let new_cluster = self.alloc_noref(1)? << cb;
                if new_cluster == 0 {
                    return Err(Error::Internal(
                        "compressed cluster allocated at host offset 0".into(),
                    ));
                }
                let next = offset.checked_next_multiple_of(cs);
                if offset == 0 || next != Some(new_cluster) {
                    offset = new_cluster;
                    free_in_cluster = cs;
                } else {
                    free_in_cluster += cs;
                }
            }
            let first = offset >> cb;
            let last = (offset + size - 1) >> cb;
            match self.update_refcount(first, last - first + 1, 1, DiscardType::Never)? {
                Update::Done => break,
                // New refcount metadata may sit where we meant to write:
                // start over in a fresh cluster (QEMU's -EAGAIN).
                Update::Again => offset = 0,
            }
        }
        let end = offset + size;
        self.free_byte_offset = if end & (cs - 1) == 0 { 0 } else { end };
        Ok(offset)
    }

    /// Gives back the bytes of [`Meta::alloc_bytes`] that will not be linked
    /// (through the deferred-free path). Nothing more is packed into those
    /// host clusters.
    pub fn release_bytes(&mut self, offset: u64, size: u64) {
        self.free_byte_offset = 0;
        self.queue_free_compressed(offset, size, DiscardType::Never);
    }
}
