//! Internal snapshots in the metadata layer: loading the snapshot table and
//! registering snapshot tables with the overlap checker at open, and the
//! table and refcount work of snapshot create/apply/delete (QEMU's
//! `qcow2_update_snapshot_refcount` and `qcow2_write_snapshots`); the
//! operations themselves, in their crash-safe order, are in
//! `image/snapshot.rs`.

use super::conv;
use super::refcount::Update;
use super::{DiscardType, Meta};
use crate::error::{Error, Result};
use crate::format::consts::*;
use crate::format::entry::L2Entry;
use crate::format::header::field;
use crate::format::header::Header;
use crate::format::put_be_u64;
use crate::format::snapshot::{
    decode_snapshot_table, encode_snapshot_table, SnapshotEntry, SNAPSHOT_KNOWN_EXTRA_DATA,
};
use crate::format::{be_u64, FormatError, FormatErrorKind, Structure};
use crate::meta::overlap_map::OverlapChecker;
use crate::meta::read_file;
use crate::storage::Storage;
use crate::types::{ClusterCount, MetadataKind};

/// Reads and decodes the snapshot table (bounded by the file length and the
/// format's 64 MiB limit).
///
/// # Errors
/// Format errors of the table, I/O errors.
pub(crate) fn load_snapshots(
    file: &dyn Storage,
    header: &Header,
    file_len: u64,
) -> Result<Vec<SnapshotEntry>> {
    if header.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let off = header.snapshots_offset;
    if off >= file_len {
        return Err(FormatError::new(
            FormatErrorKind::Invalid,
            Structure::SnapshotTable,
            Some(off),
            "Snapshot table lies beyond the end of the file",
        )
        .into());
    }
    let len = (file_len - off).min(MAX_SNAPSHOT_TABLE_BYTES);
    let mut buf = vec![0u8; len as usize];
    read_file(file, &mut buf, off)?;
    Ok(decode_snapshot_table(
        &buf,
        header.nb_snapshots,
        header.version,
        off,
    )?)
}

/// Registers the snapshot table, every snapshot L1 table and, when the
/// inactive-l2 check is enabled, every L2 table they reference.
pub(crate) fn register_snapshots(
    file: &dyn Storage,
    header: &Header,
    snapshots: &[SnapshotEntry],
    checker: &mut OverlapChecker,
    file_len: u64,
) -> Result<()> {
    if snapshots.is_empty() {
        return Ok(());
    }
    let table_bytes = crate::format::snapshot::snapshot_table_size(snapshots);
    checker.set_snapshot_table(header.snapshots_offset, table_bytes);
    let want_l2 = checker.enabled() & crate::types::MetadataKind::InactiveL2.bit() != 0;
    let cb = header.cluster_bits;
    for s in snapshots {
        let bytes = u64::from(s.l1_size) * 8;
        checker.add_inactive_l1(s.l1_table_offset, bytes);
        if want_l2 && bytes > 0 {
            if s.l1_table_offset.saturating_add(bytes) > file_len || bytes > MAX_L1_BYTES {
                return Err(Error::Corrupt {
                    what: Structure::SnapshotL1Table,
                    offset: s.l1_table_offset,
                    msg: "Snapshot L1 table lies beyond the end of the file".into(),
                });
            }
            let mut buf = vec![0u8; conv::mem_len(Structure::SnapshotL1Table, bytes)?];
            read_file(file, &mut buf, s.l1_table_offset)?;
            for e in buf.chunks_exact(8).filter_map(|c| be_u64(c, 0)) {
                let off = e & L1E_OFFSET_MASK;
                if off != 0 && off & ((1u64 << cb) - 1) == 0 {
                    checker.add_inactive_l2(off);
                }
            }
        }
    }
    Ok(())
}

/// Size in bytes of the snapshot table `entries` occupy on disk at host
/// offset `offset`, as they were read (QEMU's `snapshots_size`): entries
/// start 8-byte aligned in the file, each with its own `extra_data_size`.
pub(crate) fn table_bytes_on_disk(entries: &[SnapshotEntry], offset: u64) -> u64 {
    let end = entries.iter().fold(offset, |pos, e| {
        pos.next_multiple_of(8)
            .saturating_add(crate::format::snapshot::SNAPSHOT_HEADER_SIZE)
            .saturating_add(e.extra_data_size.into())
            .saturating_add(e.id.len() as u64)
            .saturating_add(e.name.len() as u64)
    });
    end - offset
}

/// The first snapshot whose ID is `id_or_name`, else the first whose name
/// is (QEMU's `find_snapshot_by_id_or_name`).
pub(crate) fn find_by_id_or_name(entries: &[SnapshotEntry], id_or_name: &str) -> Option<usize> {
    entries
        .iter()
        .position(|e| e.id == id_or_name)
        .or_else(|| entries.iter().position(|e| e.name == id_or_name))
}

/// The ID a new snapshot gets: the highest numeric ID + 1 (QEMU's
/// `find_new_snapshot_id`: IDs are read like `strtoul`, non-numbers as 0).
pub(crate) fn next_snapshot_id(entries: &[SnapshotEntry]) -> String {
    let max = entries
        .iter()
        .map(|e| {
            let digits: String =
                e.id.trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
            digits.parse::<u64>().unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    max.saturating_add(1).to_string()
}

/// A visitor of the references an L1 table holds: `(first host cluster,
/// number of clusters)`.
type RefVisitor<'a> = dyn FnMut(&mut Meta, u64, u64) -> Result<()> + 'a;

impl Meta {
    /// Reads the snapshot L1 table of `sn` (validated as QEMU does before
    /// using it).
    ///
    /// # Errors
    /// `Error::Format` for an invalid table pointer, I/O errors.
    pub(crate) fn read_snapshot_l1(&self, sn: &SnapshotEntry) -> Result<Vec<u64>> {
        sn.validate_l1(self.geom.cluster_bits)?;
        let bytes = u64::from(sn.l1_size) * 8;
        let mut buf = vec![0u8; conv::mem_len(Structure::L1Table, bytes)?];
        self.gate.read(&mut buf, sn.l1_table_offset)?;
        Ok(buf.chunks_exact(8).filter_map(|c| be_u64(c, 0)).collect())
    }

    /// The L2 table offset of raw L1 entry `raw` (index `l1i`), validated.
    fn table_of(&self, raw: u64, l1i: usize) -> Result<u64> {
        let off = raw & L1E_OFFSET_MASK;
        if off != 0 && !self.geom.is_aligned(off) {
            return Err(Error::Corrupt {
                what: Structure::L1Table,
                offset: off,
                msg: format!("L2 table offset {off:#x} unaligned (L1 index: {l1i:#x})"),
            });
        }
        Ok(off)
    }

    /// The descriptor words of the L2 table at `table`, read through the L2
    /// cache (so entries not yet written back are seen).
    fn l2_words(&mut self, table: u64) -> Result<Vec<u64>> {
        let cs = self.geom.cluster_size;
        let sb = self.l2.cache.entry_bytes() as u64;
        let stride = conv::usize_of(self.geom.l2_entry_bytes)?;
        let mut words = Vec::with_capacity(conv::usize_of(cs / self.geom.l2_entry_bytes)?);
        for s in 0..cs / sb {
            let slice = table + s * sb;
            self.load_l2_slice(slice)?;
            let Some(t) = self.l2.cache.peek(slice) else {
                return Err(Error::Internal("L2 slice not cached".into()));
            };
            words.extend(t.data.chunks_exact(stride).filter_map(|c| be_u64(c, 0)));
        }
        Ok(words)
    }

    /// Decodes L2 descriptor `word` (entry `index` of the table at `table`).
    fn decode_word(&self, word: u64, table: u64, index: usize) -> Result<L2Entry> {
        L2Entry::decode(word, &self.efmt).map_err(|_| Error::Corrupt {
            what: Structure::L2Table,
            offset: table,
            msg: format!(
                "Invalid cluster entry found  (L2 offset: {table:#x}, L2 index: {index:#x})"
            ),
        })
    }

    /// Visits the references of the L1 table `l1` in the order of QEMU's
    /// `qcow2_update_snapshot_refcount`: for each L2 table, the host
    /// clusters of its entries (data, preallocated zero clusters, every
    /// cluster a compressed cluster touches), then the table itself. Stops
    /// after `limit` visits; returns how many were made.
    fn visit_refs(&mut self, l1: &[u64], limit: u64, f: &mut RefVisitor<'_>) -> Result<u64> {
        let cb = self.geom.cluster_bits;
        let mut n = 0u64;
        for (i, &raw) in l1.iter().enumerate() {
            let table = self.table_of(raw, i)?;
            if table == 0 {
                continue;
            }
            let words = self.l2_words(table)?;
            for (j, word) in words.into_iter().enumerate() {
                let r = match self.decode_word(word, table, j)? {
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => Some((host >> cb, 1)),
                    e @ L2Entry::Compressed { .. } => e.compressed_range().map(|(o, l)| {
                        let first = o >> cb;
                        let last = (o + l.max(1) - 1) >> cb;
                        (first, last - first + 1)
                    }),
                    _ => None,
                };
                if let Some((first, count)) = r {
                    if n == limit {
                        return Ok(n);
                    }
                    f(self, first, count)?;
                    n += 1;
                }
            }
            if n == limit {
                return Ok(n);
            }
            f(self, table >> cb, 1)?;
            n += 1;
        }
        Ok(n)
    }

    /// Adds `addend` to the refcounts of `count` clusters from `first`,
    /// retrying after a refcount block had to be allocated.
    pub(crate) fn add_refs(
        &mut self,
        first: u64,
        count: u64,
        addend: i64,
        dtype: DiscardType,
    ) -> Result<()> {
        loop {
            if self.update_refcount(first, count, addend, dtype)? == Update::Done {
                return Ok(());
            }
        }
    }

    /// Raises the refcount of everything the L1 table `l1` references by
    /// one. All or nothing: a refcount that would overflow its width (1- and
    /// 2-bit refcounts) fails with `Error::RefcountOverflow` and the
    /// increments made so far are taken back in the cache.
    pub(crate) fn raise_refs(&mut self, l1: &[u64]) -> Result<()> {
        let mut done = 0u64;
        let r = self.visit_refs(l1, u64::MAX, &mut |m, first, count| {
            m.add_refs(first, count, 1, DiscardType::Never)?;
            done += 1;
            Ok(())
        });
        if let Err(e) = r {
            let _ = self.visit_refs(l1, done, &mut |m, first, count| {
                m.add_refs(first, count, -1, DiscardType::Never)
            });
            return Err(e);
        }
        Ok(())
    }

    /// Drops one reference of everything the L1 table `l1` references
    /// (the table itself is not freed). Clusters reaching 0 are discarded
    /// in the file as `pass-discard-snapshot` says. Call only once nothing
    /// durable holds these references any more.
    pub(crate) fn drop_refs(&mut self, l1: &[u64]) -> Result<()> {
        self.visit_refs(l1, u64::MAX, &mut |m, first, count| {
            m.add_refs(first, count, -1, DiscardType::Snapshot)
        })
        .map(|_| ())
    }

    /// Sets the COPIED flag of every entry of the L2 tables `l1` references
    /// exactly when its cluster's refcount is 1 (QEMU's
    /// `qcow2_update_snapshot_refcount` with addend 0); changed slices are
    /// dirty in the cache. Returns `l1` with its own COPIED flags set the
    /// same way for the L2 tables.
    pub(crate) fn fix_copied(&mut self, l1: &[u64]) -> Result<Vec<u64>> {
        let cb = self.geom.cluster_bits;
        let cs = self.geom.cluster_size;
        let sb = self.l2.cache.entry_bytes() as u64;
        let stride = conv::usize_of(self.geom.l2_entry_bytes)?;
        let per_slice = conv::usize_of(sb)? / stride;
        let mut out = l1.to_vec();
        for (i, raw) in out.iter_mut().enumerate() {
            let table = self.table_of(*raw, i)?;
            if table == 0 {
                continue;
            }
            for s in 0..cs / sb {
                let slice = table + s * sb;
                self.load_l2_slice(slice)?;
                let words: Vec<u64> = match self.l2.cache.peek(slice) {
                    Some(t) => t
                        .data
                        .chunks_exact(stride)
                        .filter_map(|c| be_u64(c, 0))
                        .collect(),
                    None => return Err(Error::Internal("L2 slice not cached".into())),
                };
                let mut changes = Vec::new();
                for (k, word) in words.into_iter().enumerate() {
                    let index = conv::usize_of(s)? * per_slice + k;
                    let want = match self.decode_word(word, table, index)? {
                        L2Entry::Normal { host, .. }
                        | L2Entry::Zero {
                            host: Some(host), ..
                        } => Some(self.refcount(host >> cb)? == 1),
                        L2Entry::Compressed { .. } => None,
                        _ => Some(false),
                    };
                    let Some(want) = want else { continue };
                    let new = if want {
                        word | OFLAG_COPIED
                    } else {
                        word & !OFLAG_COPIED
                    };
                    if new != word {
                        changes.push((k * stride, new));
                    }
                }
                if !changes.is_empty() {
                    // Refcount lookups may have evicted the slice: load it again.
                    self.load_l2_slice(slice)?;
                    let Some(t) = self.l2.cache.get_mut(slice) else {
                        return Err(Error::Internal("L2 slice not cached".into()));
                    };
                    for (pos, new) in changes {
                        put_be_u64(&mut t.data, pos, new);
                    }
                    t.dirty = true;
                }
            }
            let want = self.refcount(table >> cb)? == 1;
            let new = if want {
                *raw | OFLAG_COPIED
            } else {
                *raw & !OFLAG_COPIED
            };
            *raw = new;
        }
        Ok(out)
    }

    /// [`Meta::fix_copied`] on the active L1 table: changed L1 entries are
    /// marked dirty.
    pub(crate) fn fix_active_copied(&mut self) -> Result<()> {
        let l1 = self.l2.l1.clone();
        let fixed = self.fix_copied(&l1)?;
        for (i, (old, new)) in l1.iter().zip(&fixed).enumerate() {
            if old != new {
                self.l2.set_l1(i, *new);
            }
        }
        Ok(())
    }

    /// Writes what dropping references changed in the order that keeps a
    /// crash harmless: the tables first (COPIED flags), synced, then the
    /// lowered refcounts (a crash in between leaves refcounts too high:
    /// leaks). Queued discards of freed clusters go last.
    pub(crate) fn flush_tables_then_refcounts(&mut self) -> Result<()> {
        let slices = self.l2.cache.dirty_offsets();
        let wrote = !slices.is_empty();
        for s in slices {
            self.write_l2_slice(s)?;
        }
        if wrote {
            self.sync()?;
        }
        if self.write_l1_entries()? {
            self.sync()?;
        }
        self.flush_refcounts()?;
        self.process_discards();
        Ok(())
    }

    /// Writes `entries` as a new snapshot table and switches the header to
    /// it (QEMU's `qcow2_write_snapshots`): the new table's clusters are
    /// allocated and their refcounts made durable, the table is written and
    /// synced, then `nb_snapshots` and `snapshots_offset` change with one
    /// synced header write (the commit point), then the old table is freed.
    /// The overlap map follows the table.
    ///
    ///
    /// Entries are written as QEMU writes them, whatever they were read as:
    /// with v3's extra data (`extra_data_size` at least 24), a disk size
    /// that was not recorded being the current one and an instruction count
    /// that was not being -1 (what QEMU assumes for both when it reads such
    /// an entry); the entries kept in memory are the ones written, so the
    /// table's size on disk is known when it is freed.
    ///
    /// # Errors
    /// `Error::Format` for a table that cannot be encoded, overlap and I/O
    /// errors. Before the header write nothing refers to the new table (an
    /// error or crash leaks it at most).
    pub(crate) fn write_snapshot_table(&mut self, mut entries: Vec<SnapshotEntry>) -> Result<()> {
        let size = self.header.size;
        for e in &mut entries {
            e.disk_size.get_or_insert(size);
            e.icount.get_or_insert(u64::MAX);
            e.extra_data_size = e.extra_data_size.max(SNAPSHOT_KNOWN_EXTRA_DATA);
        }
        let buf = encode_snapshot_table(&entries)?;
        let size = buf.len() as u64;
        let cb = self.geom.cluster_bits;
        let new_off = if size > 0 {
            self.alloc_clusters(ClusterCount(self.geom.clusters_for(size)))?
                .0
        } else {
            0
        };
        self.flush_refcounts()?;
        if size > 0 {
            // Nothing may be there: check against every kind, then write.
            self.gate.check(new_off, size, 0)?;
            self.meta_write(&buf, new_off, MetadataKind::SnapshotTable)?;
            self.sync()?;
        }
        // At most 65536: the encoder refused more.
        let nb = u32::try_from(entries.len())
            .map_err(|_| Error::TooLarge(crate::error::Limit::SnapshotTable { count: u32::MAX }))?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&nb.to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        self.write_header_field(field::NB_SNAPSHOTS, &hdr)?;
        let old_off = self.header.snapshots_offset;
        let old_len = if self.header.nb_snapshots > 0 {
            table_bytes_on_disk(&self.snapshots, old_off)
        } else {
            0
        };
        self.header.nb_snapshots = nb;
        self.header.snapshots_offset = new_off;
        self.snapshots = entries;
        self.gate.checker_mut().set_snapshot_table(new_off, size);
        if old_len > 0 {
            let first = old_off >> cb;
            let last = (old_off + old_len - 1) >> cb;
            self.add_refs(first, last - first + 1, -1, DiscardType::Snapshot)?;
            self.flush_refcounts()?;
            self.process_discards();
        }
        Ok(())
    }

    /// Registers a snapshot's L1 table (`l1` its entries) with the overlap
    /// map, and its L2 tables when the inactive-l2 check is on.
    pub(crate) fn protect_snapshot(&mut self, sn: &SnapshotEntry, l1: &[u64]) {
        let want_l2 = self.gate.checker().enabled() & MetadataKind::InactiveL2.bit() != 0;
        let checker = self.gate.checker_mut();
        checker.add_inactive_l1(sn.l1_table_offset, u64::from(sn.l1_size) * 8);
        if want_l2 {
            for e in l1 {
                let off = e & L1E_OFFSET_MASK;
                if off != 0 {
                    checker.add_inactive_l2(off);
                }
            }
        }
    }

    /// Undoes [`Meta::protect_snapshot`].
    pub(crate) fn unprotect_snapshot(&mut self, sn: &SnapshotEntry, l1: &[u64]) {
        let want_l2 = self.gate.checker().enabled() & MetadataKind::InactiveL2.bit() != 0;
        let checker = self.gate.checker_mut();
        checker.remove_inactive_l1(sn.l1_table_offset);
        if want_l2 {
            for e in l1 {
                let off = e & L1E_OFFSET_MASK;
                if off != 0 {
                    checker.remove_inactive_l2(off);
                }
            }
        }
    }

    /// Replaces the active L1 table by `l1` (as long as it) with one synced
    /// write of the whole table in place (the commit point of a snapshot
    /// apply), then in memory; the overlap map follows the L2 tables.
    pub(crate) fn replace_active_l1(&mut self, l1: &[u64]) -> Result<()> {
        if l1.len() != self.l2.l1.len() {
            return Err(Error::Internal(format!(
                "new active L1 table has {} entries, not {}",
                l1.len(),
                self.l2.l1.len()
            )));
        }
        let mut buf = vec![0u8; l1.len() * 8];
        for (i, e) in l1.iter().enumerate() {
            put_be_u64(&mut buf, i * 8, *e);
        }
        if !buf.is_empty() {
            self.meta_write(&buf, self.header.l1_table_offset, MetadataKind::ActiveL1)?;
            self.sync()?;
        }
        let old = std::mem::replace(&mut self.l2.l1, l1.to_vec());
        self.l2.l1_dirty.clear();
        let checker = self.gate.checker_mut();
        for e in &old {
            let off = e & L1E_OFFSET_MASK;
            if off != 0 {
                checker.remove_active_l2(off);
            }
        }
        for e in l1 {
            let off = e & L1E_OFFSET_MASK;
            if off != 0 {
                checker.add_active_l2(off);
            }
        }
        Ok(())
    }

    /// Deletes snapshot `i` in the order of QEMU's `qcow2_snapshot_delete`:
    /// the table without it is written (the commit point), then its
    /// references are dropped and its L1 table freed (`pass-discard-snapshot`
    /// decides the discards), then COPIED flags of the active tables are set
    /// where refcounts dropped to 1, written before the lowered refcounts.
    ///
    /// # Errors
    /// `Error::Format` for an invalid snapshot L1 pointer, I/O errors.
    pub(crate) fn delete_snapshot_at(&mut self, i: usize) -> Result<()> {
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("snapshot index {i} beyond the table")))?;
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let mut table = self.snapshots.clone();
        table.remove(i);
        self.write_snapshot_table(table)?;
        self.unprotect_snapshot(&sn, &sn_l1);
        // Nothing durable refers to the snapshot's tables any more.
        self.drop_refs(&sn_l1)?;
        let l1_bytes = u64::from(sn.l1_size) * 8;
        if l1_bytes > 0 {
            let n = self.geom.clusters_for(l1_bytes);
            let first = sn.l1_table_offset >> self.geom.cluster_bits;
            self.add_refs(first, n, -1, DiscardType::Snapshot)?;
        }
        self.fix_active_copied()?;
        self.flush_tables_then_refcounts()
    }

    /// Makes this (read-only) handle show the content of snapshot
    /// `id_or_name` (ID first, then name): the active L1 table in memory is
    /// replaced by the snapshot's (QEMU's `qcow2_snapshot_load_tmp`). The
    /// virtual size stays the image's, as in QEMU.
    ///
    /// # Errors
    /// `Error::SnapshotNotFound`, `Error::Format` for an invalid snapshot L1
    /// pointer, I/O errors.
    pub(crate) fn view_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        let i = find_by_id_or_name(&self.snapshots, id_or_name)
            .ok_or_else(|| Error::SnapshotNotFound(id_or_name.to_owned()))?;
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| Error::Internal(format!("snapshot index {i} out of range")))?;
        let l1 = self.read_snapshot_l1(&sn)?;
        self.l2.l1 = l1;
        self.l2.l1_dirty.clear();
        Ok(())
    }
}
