//! Storing the bitmaps at close (QEMU's
//! `qcow2_store_persistent_dirty_bitmaps` and `update_ext_header_and_dir`);
//! the order is in the module docs of [`super`].

use super::super::{conv, DiscardType, Meta};
use super::{bitmaps_ext_pos, read_table, Bitmaps, DirtyBitmap, ExtOnDisk};
use crate::error::{Error, Result};
use crate::format::bitmap::{
    encode_bitmap_directory, BitmapDirEntry, BitmapTableEntry, BME_FLAG_AUTO,
    BT_DIRTY_TRACKING_BITMAP,
};
use crate::format::consts::AUTOCLEAR_BITMAPS;
use crate::format::header::{BitmapsExtension, HeaderExtension};
use crate::format::Structure;
use crate::types::{ClusterCount, MetadataKind};

impl Meta {
    /// Stores the bitmaps when anything changed since they were loaded or
    /// last stored (a write flagged them `in_use`, or a management call or a
    /// resize changed them); see the module docs for the order. The caller
    /// holds the metadata exclusively with no request in flight.
    ///
    /// # Errors
    /// Overlap and I/O errors: before the commit point the old directory
    /// stays in effect (new clusters leak at most).
    pub(crate) fn store_bitmaps(&mut self) -> Result<()> {
        let Some(mut bm) = self.bitmaps.take() else {
            return Ok(());
        };
        let r = self.store_with(&mut bm);
        self.bitmaps = Some(bm);
        r
    }

    fn store_with(&mut self, bm: &mut Bitmaps) -> Result<()> {
        if !bm.store_due() {
            return Ok(());
        }
        // New tables and data for every consistent bitmap; inconsistent
        // ones keep their entry as it is.
        let mut entries = Vec::with_capacity(bm.list.len());
        let mut tables = Vec::with_capacity(bm.list.len());
        for e in &bm.list {
            match (&e.bits, &e.disk) {
                (Some(bits), _) if bits.disk_size() != self.header.size => {
                    // Never store bits for another disk size: the table
                    // might not cover the disk (the open would fail).
                    return Err(Error::Internal(format!(
                        "bitmap '{}' covers {} bytes, the disk has {}",
                        e.name,
                        bits.disk_size(),
                        self.header.size
                    )));
                }
                (Some(bits), _) => {
                    let (offset, table) = self.write_bitmap(bits)?;
                    let size = u32::try_from(table.len())
                        .map_err(|_| Error::Internal("bitmap table size".into()))?;
                    entries.push(BitmapDirEntry {
                        bitmap_table_offset: offset,
                        bitmap_table_size: size,
                        flags: if e.enabled { BME_FLAG_AUTO } else { 0 },
                        bitmap_type: BT_DIRTY_TRACKING_BITMAP,
                        granularity_bits: e.granularity_bits,
                        name: e.name.clone(),
                        extra_data: Vec::new(),
                    });
                    tables.push(Some(table));
                }
                (None, Some(disk)) => {
                    // An inconsistent bitmap stays flagged.
                    let mut d = disk.clone();
                    d.flags |= crate::format::bitmap::BME_FLAG_IN_USE;
                    entries.push(d);
                    tables.push(None);
                }
                (None, None) => {
                    return Err(Error::Internal("a new bitmap without bits".into()));
                }
            }
        }
        let dir = if entries.is_empty() {
            None
        } else {
            let buf = encode_bitmap_directory(&entries)?;
            let off = self
                .alloc_clusters(ClusterCount(self.geom.clusters_for(buf.len() as u64)))?
                .0;
            Some((off, buf))
        };
        // Refcounts of every new cluster, then the data, tables and the
        // directory, are durable before the header points at them.
        self.flush_refcounts()?;
        if let Some((off, buf)) = &dir {
            self.gate.check(*off, buf.len() as u64, 0)?;
            self.meta_write(buf, *off, MetadataKind::BitmapDirectory)?;
        }
        self.sync()?;
        let new_ext = match &dir {
            Some((off, buf)) => Some(BitmapsExtension {
                nb_bitmaps: u32::try_from(entries.len())
                    .map_err(|_| Error::Internal("bitmap count".into()))?,
                bitmap_directory_size: buf.len() as u64,
                bitmap_directory_offset: *off,
            }),
            None => None,
        };
        let old_ext = bm.ext;
        if old_ext.is_some() || new_ext.is_some() || bm.stale {
            bm.ext = self.commit_bitmaps_ext(bm, new_ext)?;
        }
        bm.stale = false;
        self.gate.checker_mut().set_bitmap_directory(
            new_ext.map(|e| (e.bitmap_directory_offset, e.bitmap_directory_size)),
        );

        // The old directory, the replaced tables and the removed bitmaps
        // are unreferenced now.
        if let Some(old) = old_ext {
            self.free_range(old.dir_offset, old.dir_size)?;
        }
        for (e, new) in bm.list.iter_mut().zip(tables) {
            let Some(new) = new else { continue };
            if let Some(disk) = e.disk.take() {
                let old = std::mem::take(&mut e.table);
                self.free_table(&disk, &old)?;
            }
            e.table = new;
        }
        for e in std::mem::take(&mut bm.removed) {
            let Some(disk) = &e.disk else { continue };
            if e.bits.is_some() {
                self.free_table(disk, &e.table)?;
            } else if let Ok(table) = read_table(self, disk) {
                // An inconsistent bitmap's table is checked before its
                // clusters are freed; a bad one leaks them (as in QEMU).
                self.free_table(disk, &table)?;
            }
        }
        for (e, d) in bm.list.iter_mut().zip(&entries) {
            e.disk = Some(d.clone());
        }
        self.flush_refcounts()?;
        self.process_discards();
        bm.disk_entries = entries;
        bm.marked = false;
        bm.changed = false;
        bm.touched
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Writes the bits of one bitmap to new data clusters (none for a
    /// cluster of zeroes) and a new table; returns the table's offset and
    /// entries.
    fn write_bitmap(&mut self, bits: &DirtyBitmap) -> Result<(u64, Vec<BitmapTableEntry>)> {
        let cs = self.geom.cluster_size;
        let mut buf = vec![0u8; conv::cluster_bytes(&self.geom)];
        let nclusters = bits.serialized_len().div_ceil(cs).max(1);
        let mut table = Vec::with_capacity(conv::usize_of(nclusters)?);
        for k in 0..nclusters {
            if !bits.store_bytes(k.saturating_mul(cs), &mut buf) {
                table.push(BitmapTableEntry::AllZeroes);
                continue;
            }
            let off = self.alloc_clusters(ClusterCount(1))?.0;
            self.gate.check(off, cs, 0)?;
            self.gate.write(&buf, off, None)?;
            table.push(BitmapTableEntry::Data(off));
        }
        let mut tbuf = vec![0u8; conv::mem_len(Structure::BitmapDirectory, nclusters * 8)?];
        for (chunk, e) in tbuf.chunks_exact_mut(8).zip(&table) {
            chunk.copy_from_slice(&e.encode().to_be_bytes());
        }
        let toff = self
            .alloc_clusters(ClusterCount(self.geom.clusters_for(tbuf.len() as u64)))?
            .0;
        self.gate.check(toff, tbuf.len() as u64, 0)?;
        self.gate.write(&tbuf, toff, None)?;
        Ok((toff, table))
    }

    /// The commit point: points the header at the new directory (`None`:
    /// no bitmaps left) with one write, synced. While the extension stays,
    /// that is its 24-byte payload (found in the header as it is now); when
    /// it appears or goes, the whole header cluster is rewritten with the
    /// autoclear bit following it, as QEMU's `update_ext_header_and_dir`
    /// does. Returns the extension as now on disk.
    fn commit_bitmaps_ext(
        &mut self,
        bm: &Bitmaps,
        new: Option<BitmapsExtension>,
    ) -> Result<Option<ExtOnDisk>> {
        let on_disk = new.map(|n| ExtOnDisk {
            dir_offset: n.bitmap_directory_offset,
            dir_size: n.bitmap_directory_size,
        });
        if let (Some(_), Some(n), false) = (bm.ext, new, bm.stale) {
            let mut head = vec![0u8; conv::cluster_bytes(&self.geom)];
            self.gate.reader().read(&mut head, 0)?;
            if let Some(pos) = bitmaps_ext_pos(&head, &self.header) {
                let mut p = [0u8; 24];
                p[..4].copy_from_slice(&n.nb_bitmaps.to_be_bytes());
                p[8..16].copy_from_slice(&n.bitmap_directory_size.to_be_bytes());
                p[16..].copy_from_slice(&n.bitmap_directory_offset.to_be_bytes());
                self.meta_write(&p, pos, MetadataKind::MainHeader)?;
                self.sync()?;
                for ext in &mut self.header.extensions {
                    if let HeaderExtension::Bitmaps(b) = ext {
                        *b = n;
                    }
                }
                return Ok(on_disk);
            }
        }
        let mut h = self.header.clone();
        h.extensions
            .retain(|e| !matches!(e, HeaderExtension::Bitmaps(_)));
        match new {
            Some(n) => {
                h.extensions.push(HeaderExtension::Bitmaps(n));
                h.autoclear_features |= AUTOCLEAR_BITMAPS;
            }
            None => h.autoclear_features &= !AUTOCLEAR_BITMAPS,
        }
        h.normalize()?;
        let buf = h.encode_into_cluster(self.geom.cluster_size)?;
        self.meta_write(&buf, 0, MetadataKind::MainHeader)?;
        self.sync()?;
        self.header = h;
        Ok(on_disk)
    }

    /// Drops the references of a stored bitmap: its data clusters and its
    /// table.
    fn free_table(&mut self, disk: &BitmapDirEntry, table: &[BitmapTableEntry]) -> Result<()> {
        let cs = self.geom.cluster_size;
        for e in table {
            if let BitmapTableEntry::Data(off) = *e {
                self.free_range(off, cs)?;
            }
        }
        self.free_range(
            disk.bitmap_table_offset,
            u64::from(disk.bitmap_table_size) * 8,
        )
    }

    /// Drops one reference of every cluster of `[off, off + len)`.
    fn free_range(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cb = self.geom.cluster_bits;
        let first = off >> cb;
        let last = off.saturating_add(len - 1) >> cb;
        self.add_refs(first, last - first + 1, -1, DiscardType::Other)
    }
}
