//! The metadata state of an open image and every operation on it: table
//! lookups through the caches, the write gate, the refcount allocator and the
//! crash-safe flush order.
//!
//! All of it lives behind the image's metadata lock ([`crate::Image`] holds an
//! `RwLock<Meta>`: shared for cache-hit translations, exclusive otherwise). Guest data I/O is done by the caller outside the lock.
//!
//! # Write ordering
//! * A cluster's refcount increase reaches the file before any L2/L1 entry
//!   pointing at it: dirty refcount blocks are written and the file synced
//!   before dirty L2 slices are written ([`Meta::flush_l2_dependencies`]).
//! * Guest data of newly allocated clusters is synced before the L2 entry that
//!   points at it (the same sync).
//! * L1 entries are written after the L2 tables they point at (new L2 tables
//!   are written in full at allocation, L1 entries at flush time after a sync).
//! * An entry is removed before the refcount it held drops: decrements are
//!   queued ([`Refcounts`] keeps them) and applied only after the L2/L1 tables
//!   that dropped the references are durable, and only when no data I/O that
//!   translated before them is still in flight.
//! * New refcount blocks are written and synced before the refcount table
//!   entry that points at them; a new refcount table is written and synced
//!   before the header is switched to it with one write.

// Table contents come from the file: no silent narrowing, no indexing that can
// panic (tests may do both).
#![cfg_attr(
    not(test),
    warn(clippy::cast_possible_truncation, clippy::indexing_slicing)
)]

use crate::error::{Error, IoOp, Result};
use crate::format::consts::*;
use crate::format::entry::{EntryError, EntryFormat, L1Entry, L2Entry, Subclusters};
use crate::format::header::field;
use crate::format::header::Header;
use crate::format::Structure;
use crate::format::{be_u64, put_be_u64};
use crate::storage::{BlkdebugEvent, Storage};
use crate::types::{Geometry, MetadataKind, RefcountGeometry};
use std::collections::BTreeSet;

pub(crate) mod bitmaps;
pub(crate) mod cache;
mod compressed;
mod conv;
mod flush;
mod gate;
mod in_flight;
mod load;
pub(crate) mod overlap_map;
mod refcount;
pub(crate) mod snapshots;
mod tables;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)] // tests may panic
mod tests;

pub(crate) use cache::TableCache;
pub(crate) use gate::{DataPermit, DataTarget, FileReader, WriteGate};
pub(crate) use load::load;
pub(crate) use refcount::refcount_metadata_size;

/// Why a refcount is being dropped (QEMU's discard types), deciding whether
/// the freed host range is discarded in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiscardType {
    /// Never pass the discard down.
    Never,
    /// A guest discard or write-zeroes with unmap (`pass-discard-request`).
    Request,
    /// Snapshot operations (`pass-discard-snapshot`).
    Snapshot,
    /// Anything else: COW, table relocation (`pass-discard-other`).
    Other,
    /// Always passed down, whatever the options (QEMU's `QCOW2_DISCARD_ALWAYS`:
    /// clusters cut off by shrinking an image).
    Always,
}

/// Which kinds of freed ranges are discarded in the file.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DiscardPolicy {
    pub request: bool,
    pub snapshot: bool,
    pub other: bool,
}

/// One L2 entry as stored: the descriptor word and, with extended L2, the
/// subcluster bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawL2 {
    pub word: u64,
    pub bitmap: u64,
}

/// Where an L2 entry lives in the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct L2Slot {
    /// Host offset of the slice (cache key).
    pub slice: u64,
    /// Byte offset of the entry within the slice.
    pub pos: usize,
    /// Host offset of the L2 table.
    pub table: u64,
    /// Index of the entry in its table.
    pub index: u64,
}

/// The L1 table and the L2 slice cache.
#[derive(Debug)]
pub(crate) struct L2Tables {
    /// The active L1 table.
    l1: Vec<u64>,
    /// L1 indices changed since the last flush.
    l1_dirty: BTreeSet<usize>,
    /// Cached L2 slices keyed by host offset.
    cache: TableCache,
}

impl L2Tables {
    /// Wraps a loaded L1 table and an empty cache.
    pub fn new(l1: Vec<u64>, cache: TableCache) -> Self {
        L2Tables {
            l1,
            l1_dirty: BTreeSet::new(),
            cache,
        }
    }

    /// The active L1 table.
    pub fn l1(&self) -> &[u64] {
        &self.l1
    }

    /// Sets L1 entry `i` (which must exist) and marks it dirty.
    pub fn set_l1(&mut self, i: usize, v: u64) {
        if let Some(e) = self.l1.get_mut(i) {
            *e = v;
            self.l1_dirty.insert(i);
        }
    }

    /// Sets L1 entry `i` (which must exist) to `v` already written to the
    /// file (a repair): it is not marked dirty.
    pub fn set_l1_written(&mut self, i: usize, v: u64) {
        if let Some(e) = self.l1.get_mut(i) {
            *e = v;
        }
    }

    /// The L2 slice cache.
    pub fn cache(&self) -> &TableCache {
        &self.cache
    }

    /// The L2 slice cache, to load, update or evict slices.
    pub fn cache_mut(&mut self) -> &mut TableCache {
        &mut self.cache
    }
}

/// The refcount table, the refcount block cache, the allocator's state and
/// the queued reference drops and discards.
#[derive(Debug)]
pub(crate) struct Refcounts {
    /// The refcount table.
    table: Vec<u64>,
    /// Refcount table indices changed since the last flush.
    table_dirty: BTreeSet<usize>,
    /// Cached refcount blocks keyed by host offset.
    cache: TableCache,
    /// Lowest cluster index that may be free (QEMU's `free_cluster_index`).
    free_hint: u64,
    /// Refcount decrements waiting until the references are durably gone.
    pending_frees: Vec<(u64, DiscardType)>,
    /// Host ranges of freed clusters still to be discarded in the file
    /// (adjacent ranges merged); passed down before any allocation.
    discards: Vec<(u64, u64)>,
    /// Which freed ranges are discarded in the file.
    policy: DiscardPolicy,
    /// A refcount structure ran past the end of the file at open (what it is
    /// and where it starts) and reads as zeroes there, as in QEMU: clusters
    /// in use may look free, so the allocator refuses to run on this handle
    /// (the image is marked corrupt instead of being corrupted further). A
    /// repair (`check -r`) does not consult this.
    past_eof: Option<(Structure, u64)>,
}

impl Refcounts {
    /// Wraps a loaded refcount table and an empty block cache.
    pub fn new(
        table: Vec<u64>,
        cache: TableCache,
        policy: DiscardPolicy,
        past_eof: Option<(Structure, u64)>,
    ) -> Self {
        Refcounts {
            table,
            table_dirty: BTreeSet::new(),
            cache,
            free_hint: 0,
            pending_frees: Vec::new(),
            discards: Vec::new(),
            policy,
            past_eof,
        }
    }

    /// The refcount table.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// The refcount block cache.
    pub fn cache(&self) -> &TableCache {
        &self.cache
    }

    /// The refcount block cache, to update or evict blocks.
    pub fn cache_mut(&mut self) -> &mut TableCache {
        &mut self.cache
    }

    /// Switches to a refcount table already written to the file (a
    /// rebuild): nothing is dirty, clean cached blocks are dropped and the
    /// allocator starts over.
    pub fn replace_table(&mut self, table: Vec<u64>) {
        self.table = table;
        self.table_dirty.clear();
        self.cache.drop_clean();
        self.free_hint = 0;
    }

    /// Lets the allocator run although refcount structures ran past the end
    /// of the file at open (a repair rebuilds them).
    pub fn allow_past_eof(&mut self) {
        self.past_eof = None;
    }

    /// Which freed ranges are discarded in the file.
    pub fn policy(&self) -> DiscardPolicy {
        self.policy
    }

    /// How many reference drops are queued.
    pub fn pending_frees(&self) -> usize {
        self.pending_frees.len()
    }
}

/// The metadata of an open image.
#[derive(Debug)]
pub(crate) struct Meta {
    /// The write gate: the image file, the overlap map, the known end of
    /// the file and the poison flag.
    pub gate: WriteGate,
    /// The L1 table and the L2 cache.
    pub l2: L2Tables,
    /// The refcount state and the allocator.
    pub rc: Refcounts,
    pub header: Header,
    /// The cluster and L2 layout (fixed for the image's life).
    pub geom: Geometry,
    /// The refcount structures' layout: changes with the refcount width
    /// (only `amend`'s width change assigns it, when the header switches).
    pub rgeom: RefcountGeometry,
    pub efmt: EntryFormat,
    /// Skip syncs (image creation, like QEMU's `BDRV_O_NO_FLUSH`): the image
    /// is not valid before creation ends anyway; one sync at the end.
    pub no_flush: bool,
    /// Guest data was written to new clusters since the last sync (in the
    /// image file or the external data file): it must be synced before the
    /// L2 entries pointing at it are written.
    pub data_unsynced: bool,
    /// Reusable buffer for COW and table I/O (no allocation per request).
    pub scratch: Vec<u8>,
    /// `cache-clean-interval` and when the current interval ends, both in
    /// milliseconds of the coarse monotonic clock
    /// ([`crate::storage::sys::coarse_monotonic_ms`]).
    pub clean_interval: Option<(u64, u64)>,
    /// The image was dirty when opened (only a repair may clear the bit).
    pub dirty_at_open: bool,
    /// Lazy refcounts in effect: refcount writes are deferred behind the dirty bit.
    pub lazy_refcounts: bool,
    /// Guest clusters (indices) with an allocating write between its
    /// reservation and its link: other requests that would change their
    /// mapping wait (see [`crate::Image`]'s module docs).
    pub in_flight: in_flight::InFlight,
    /// Where the next compressed cluster is packed (QEMU's
    /// `free_byte_offset`): a byte inside a host cluster already holding
    /// compressed data, or 0 to start a new host cluster.
    pub free_byte_offset: u64,
    /// The internal snapshots.
    pub snapshots: Vec<crate::format::snapshot::SnapshotEntry>,
    /// The persistent dirty bitmaps of a read-write handle of a v3 image
    /// (see [`bitmaps`]; empty when the image has none); `None` read-only,
    /// in check mode and for v2 images (which cannot hold bitmaps).
    pub bitmaps: Option<bitmaps::Bitmaps>,
}

impl Meta {
    /// Whether an allocating write is in flight on any guest cluster in
    /// `first..=last` (a walk over the few in-flight clusters, however long
    /// the range).
    pub fn in_flight_overlaps(&self, first: u64, last: u64) -> bool {
        self.in_flight.overlaps(first, last)
    }

    /// Reports the blkdebug event `event` to the image file at the point
    /// QEMU's qcow2 driver reports it (see [`crate::storage::BlkdebugEvent`]
    /// for the list); a no-op virtual call on other storages.
    #[inline]
    pub(crate) fn event(&self, event: crate::storage::BlkdebugEvent) {
        self.gate.debug_event(event);
    }

    /// Writes metadata; a failure poisons the handle (the in-memory state is
    /// ahead of the file).
    pub(crate) fn meta_write(&mut self, buf: &[u8], offset: u64, kind: MetadataKind) -> Result<()> {
        self.gate.write_metadata(kind, buf, offset)
    }

    /// Syncs the image file, and first the external data file if guest data
    /// was written to new clusters in it since its last sync.
    pub fn sync(&mut self) -> Result<()> {
        if self.no_flush {
            self.data_unsynced = false;
            return Ok(());
        }
        if self.data_unsynced {
            self.gate.sync_data_file()?;
        }
        self.gate.sync_image()?;
        self.data_unsynced = false;
        Ok(())
    }

    /// Writes one header field (`bytes` at header offset `pos`) and syncs.
    pub fn write_header_field(&mut self, pos: u64, bytes: &[u8]) -> Result<()> {
        self.meta_write(bytes, pos, MetadataKind::MainHeader)?;
        self.sync()
    }

    /// Persists `incompatible_features` (dirty/corrupt bits) with one write.
    pub fn write_incompatible_features(&mut self) -> Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        let v = self.header.incompatible_features.to_be_bytes();
        self.write_header_field(field::INCOMPATIBLE_FEATURES, &v)
    }

    /// Persists `autoclear_features` with one write.
    pub fn write_autoclear_features(&mut self) -> Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        let v = self.header.autoclear_features.to_be_bytes();
        self.write_header_field(field::AUTOCLEAR_FEATURES, &v)
    }

    // ------------------------------------------------------------------
    // L1 / L2 lookups.
    // ------------------------------------------------------------------

    /// The L2 table offset for L1 index `l1i` (0 if none), validated.
    pub fn l2_table_offset(&self, l1i: u64) -> Result<(u64, bool)> {
        let Some(&raw) = usize::try_from(l1i).ok().and_then(|i| self.l2.l1.get(i)) else {
            return Ok((0, false));
        };
        match L1Entry::decode(raw, self.geom.cluster_bits) {
            Ok(e) => Ok((e.l2_offset, e.copied)),
            Err(_) => Err(Error::Corrupt {
                what: Structure::L1Table,
                offset: raw & L1E_OFFSET_MASK,
                msg: format!(
                    "L2 table offset {:#x} unaligned (L1 index: {:#x})",
                    raw & L1E_OFFSET_MASK,
                    l1i
                ),
            }),
        }
    }

    /// Locates the L2 entry for guest offset `guest` inside a table at `table`.
    pub fn l2_slot(&self, table: u64, guest: u64) -> L2Slot {
        let index = self.geom.l2_index(guest);
        let slice_bytes = self.l2.cache.entry_bytes() as u64;
        let byte = index * self.geom.l2_entry_bytes;
        let slice = table + byte / slice_bytes * slice_bytes;
        #[expect(
            clippy::cast_possible_truncation,
            reason = "a remainder of division by a usize"
        )]
        let pos = (byte % slice_bytes) as usize;
        L2Slot {
            slice,
            pos,
            table,
            index,
        }
    }

    /// Number of L2 entries in one cache slice.
    pub fn slice_entries(&self) -> u64 {
        self.l2.cache.entry_bytes() as u64 / self.geom.l2_entry_bytes
    }

    /// Makes sure the slice at `slice` is cached, loading it (and writing back
    /// a dirty victim in the right order) if needed.
    pub fn load_l2_slice(&mut self, slice: u64) -> Result<()> {
        if self.l2.cache.get(slice).is_some() {
            return Ok(());
        }
        self.make_room_l2()?;
        let n = self.l2.cache.entry_bytes();
        let mut buf = vec![0u8; n].into_boxed_slice();
        self.event(BlkdebugEvent::L2Load);
        self.gate.read(&mut buf, slice)?;
        self.l2.cache.insert(slice, buf, false);
        Ok(())
    }

    fn make_room_l2(&mut self) -> Result<()> {
        while self.l2.cache.is_full() {
            let Some((victim, dirty)) = self.l2.cache.lru_victim() else {
                break;
            };
            if dirty {
                self.flush_l2_dependencies()?;
                self.write_l2_slice(victim)?;
            }
            self.l2.cache.remove(victim);
        }
        Ok(())
    }

    /// Reads the raw L2 entry at `slot` (the slice must be cached).
    pub fn read_slot(&self, slot: &L2Slot) -> RawL2 {
        let Some(t) = self.l2.cache.peek(slot.slice) else {
            return RawL2 { word: 0, bitmap: 0 };
        };
        let word = be_u64(&t.data, slot.pos).unwrap_or(0);
        let bitmap = if self.geom.extended_l2 {
            be_u64(&t.data, slot.pos + 8).unwrap_or(0)
        } else {
            0
        };
        RawL2 { word, bitmap }
    }

    /// Updates the raw L2 entry at `slot` (the slice must be cached) and marks it dirty.
    pub fn write_slot(&mut self, slot: &L2Slot, raw: RawL2) {
        let ext = self.geom.extended_l2;
        if let Some(t) = self.l2.cache.get_mut(slot.slice) {
            put_be_u64(&mut t.data, slot.pos, raw.word);
            if ext {
                put_be_u64(&mut t.data, slot.pos + 8, raw.bitmap);
            }
            t.dirty = true;
        }
    }

    /// Decodes a raw L2 entry, turning format violations into corruption
    /// errors with QEMU's messages.
    pub fn decode_l2(&self, raw: RawL2, slot: &L2Slot) -> Result<(L2Entry, Subclusters)> {
        let corrupt = |msg: String| Error::Corrupt {
            what: Structure::L2Table,
            offset: slot.table,
            msg,
        };
        let e = match L2Entry::decode(raw.word, &self.efmt) {
            Ok(e) => e,
            Err(EntryError::UnalignedData { offset }) => {
                return Err(corrupt(format!(
                    "Cluster allocation offset {:#x} unaligned (L2 offset: {:#x}, L2 index: {:#x})",
                    offset, slot.table, slot.index
                )))
            }
            Err(EntryError::ZeroInV2) => {
                return Err(corrupt(format!(
                    "Zero cluster entry found in pre-v3 image (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                )))
            }
            Err(EntryError::CompressedWithDataFile) => {
                return Err(corrupt(format!(
                    "Compressed cluster entry found in image with external data file (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                )))
            }
            Err(_) => {
                return Err(corrupt(format!(
                    "Invalid cluster entry found  (L2 offset: {:#x}, L2 index: {:#x})",
                    slot.table, slot.index
                )))
            }
        };
        let bitmap = Subclusters(raw.bitmap);
        if self.geom.extended_l2 && bitmap.validate(e).is_err() {
            return Err(corrupt(format!(
                "Invalid cluster entry found  (L2 offset: {:#x}, L2 index: {:#x})",
                slot.table, slot.index
            )));
        }
        Ok((e, bitmap))
    }
}

/// Reads from the image file, attaching the offset to errors.
pub(crate) fn read_file(file: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_at(buf, offset)
        .map_err(|e| Error::io(IoOp::Read, offset, e))
}
