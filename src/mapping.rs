//! Guest -> host translation for reads and writes. Returns where data lives;
//! never does guest data I/O itself.

use crate::error::{Error, Result};
use crate::format::entry::{subcluster_state, L2Entry, SubclusterState, Subclusters};
use crate::format::Structure;
use crate::meta::{L2Slot, Meta};

/// Where a run of guest bytes reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Data at this host offset (in the data file when external).
    Data {
        /// Host offset of the first byte of the run.
        host: u64,
    },
    /// Reads as zeroes; `host` is set for preallocated zero clusters.
    Zero {
        /// Host cluster of a preallocated zero cluster (start of the run).
        host: Option<u64>,
    },
    /// Not allocated in this image: backing file or zeroes.
    Unallocated,
    /// Inside a compressed cluster.
    Compressed {
        /// Host byte offset of the compressed stream.
        offset: u64,
        /// Bytes of compressed stream to read.
        len: u64,
    },
}

/// The outcome of one translation step on the cached L2 slice.
enum Mapped {
    /// The extent and its length.
    Done(Extent, u64),
    /// The L2 slice at this host offset is not cached.
    Miss(u64),
}

impl Meta {
    /// Translates guest offset `guest`: the extent kind and how many bytes
    /// (at most `max_len`, at least 1) share it, with contiguous host offsets.
    ///
    /// # Errors
    /// Corruption of the tables on the way (`Error::Corrupt`) and I/O errors.
    pub fn map_extent(&mut self, guest: u64, max_len: u64) -> Result<(Extent, u64)> {
        if let Mapped::Done(e, n) = self.map_extent_in(guest, max_len, true)? {
            return Ok((e, n));
        }
        // A miss: load the slice (counted there) and translate again.
        let (table, _) = self.l2_table_offset(self.geom.l1_index(guest))?;
        let slot = self.l2_slot(table, guest);
        self.load_l2_slice(slot.slice)?;
        match self.map_extent_in(guest, max_len, false)? {
            Mapped::Done(e, n) => Ok((e, n)),
            Mapped::Miss(slice) => Err(Error::Internal(format!(
                "L2 slice {slice:#x} not cached right after loading it"
            ))),
        }
    }

    /// [`Meta::map_extent`] through a shared reference (the image's shared
    /// lock): `None` when the L2 slice it needs is not cached.
    ///
    /// # Errors
    /// As [`Meta::map_extent`].
    pub fn map_extent_cached(&self, guest: u64, max_len: u64) -> Result<Option<(Extent, u64)>> {
        Ok(match self.map_extent_in(guest, max_len, true)? {
            Mapped::Done(e, n) => Some((e, n)),
            Mapped::Miss(_) => None,
        })
    }

    /// The translation itself, on the cached slice; `Miss(slice)` when the
    /// slice is not cached. `count`: count a cache hit.
    fn map_extent_in(&self, guest: u64, max_len: u64, count: bool) -> Result<Mapped> {
        let g = self.geom;
        let (table, _) = self.l2_table_offset(g.l1_index(guest))?;
        if table == 0 {
            let end = (g.l1_index(guest) + 1) << (g.cluster_bits + g.l2_bits);
            return Ok(Mapped::Done(Extent::Unallocated, max_len.min(end - guest)));
        }
        let slice_entries = self.slice_entries();
        let cluster = guest >> g.cluster_bits;
        let slice_end = ((cluster | (slice_entries - 1)) + 1) << g.cluster_bits;
        let limit = max_len.min(slice_end - guest);
        let unit_bits = g.subcluster_bits;
        let unit = 1u64 << unit_bits;

        let mut slot = self.l2_slot(table, guest);
        if self.l2.cache().get_shared(slot.slice, count).is_none() {
            return Ok(Mapped::Miss(slot.slice));
        }
        let (entry, bitmap) = self.decode_l2(self.read_slot(&slot), &slot)?;
        if let L2Entry::Compressed { .. } = entry {
            let (offset, len) = entry.compressed_range().unwrap_or((0, 0));
            if offset >= self.gate.file_end() {
                return Err(Error::Corrupt {
                    what: Structure::L2Table,
                    offset: slot.table,
                    msg: format!(
                        "Compressed cluster at host offset {offset:#x} lies beyond the end of the file (L2 offset: {:#x}, L2 index: {:#x})",
                        slot.table, slot.index
                    ),
                });
            }
            let cluster_end = (cluster + 1) << g.cluster_bits;
            return Ok(Mapped::Done(
                Extent::Compressed { offset, len },
                limit.min(cluster_end - guest),
            ));
        }
        let first = self.unit_state(entry, bitmap, guest);
        self.check_data_file_offset(first, guest, &slot)?;
        let extent = match first {
            SubclusterState::Data(h) => Extent::Data {
                host: h + (guest & (unit - 1)),
            },
            SubclusterState::Zero => Extent::Zero {
                host: entry
                    .host_cluster()
                    .map(|h| h + (guest & (g.cluster_size - 1))),
            },
            SubclusterState::Unallocated => Extent::Unallocated,
            // Compressed entries returned above: `unit_state` of any other
            // entry is never `Compressed`.
            SubclusterState::Compressed => Extent::Unallocated,
        };
        // Extend the run unit by unit while the state stays the same and
        // host offsets stay contiguous.
        let mut len = (unit - (guest & (unit - 1))).min(limit);
        let mut cur_entry = entry;
        let mut cur_bitmap = bitmap;
        let mut cur_cluster = cluster;
        while len < limit {
            let next = guest + len;
            let c = next >> g.cluster_bits;
            if c != cur_cluster {
                slot = self.l2_slot(table, next);
                let raw = self.read_slot(&slot);
                let (e, b) = match self.decode_l2(raw, &slot) {
                    Ok(x) => x,
                    Err(_) => break, // reported when the run reaches it
                };
                cur_entry = e;
                cur_bitmap = b;
                cur_cluster = c;
            }
            let s = match cur_entry {
                L2Entry::Compressed { .. } => break,
                e => self.unit_state(e, cur_bitmap, next),
            };
            let same = match (first, s) {
                (SubclusterState::Data(h0), SubclusterState::Data(h)) => {
                    h == h0 + ((next >> unit_bits) - (guest >> unit_bits)) * unit
                        && self.check_data_file_offset(s, next, &slot).is_ok()
                }
                (SubclusterState::Zero, SubclusterState::Zero) => {
                    // Preallocated zero runs must stay contiguous to report one offset.
                    match (entry.host_cluster(), cur_entry.host_cluster()) {
                        (None, None) => true,
                        (Some(h0), Some(h)) => h == h0 + ((c - cluster) << g.cluster_bits),
                        _ => false,
                    }
                }
                (SubclusterState::Unallocated, SubclusterState::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + unit).min(limit);
        }
        Ok(Mapped::Done(extent, len))
    }

    fn unit_state(&self, entry: L2Entry, bitmap: Subclusters, guest: u64) -> SubclusterState {
        let g = self.geom;
        let sc = ((guest >> g.subcluster_bits) & 31) as u32;
        subcluster_state(entry, bitmap, sc, g.extended_l2, g.subcluster_size())
    }

    fn check_data_file_offset(&self, s: SubclusterState, guest: u64, slot: &L2Slot) -> Result<()> {
        if !self.efmt.external_data {
            return Ok(());
        }
        if let SubclusterState::Data(h) = s {
            let unit = self.geom.subcluster_size();
            if h != guest & !(unit - 1) {
                return Err(Error::Corrupt {
                    what: Structure::L2Table,
                    offset: slot.table,
                    msg: format!(
                        "External data file host cluster offset {:#x} does not match guest cluster offset: {:#x}",
                        h & !(self.geom.cluster_size - 1),
                        guest & !(self.geom.cluster_size - 1)
                    ),
                });
            }
        }
        Ok(())
    }
}
