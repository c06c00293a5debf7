//! Discard and write-zeroes: QEMU's encodings (zero flag, unmap, subcluster
//! zero bits, discard-no-unref) and the queued reference drops behind them.

use super::write::range_mask;
use super::*;

impl Image {
    // ------------------------------------------------------------------
    // Discard and write-zeroes.
    // ------------------------------------------------------------------

    /// Discards guest range `[offset, offset+len)`: whole clusters only
    /// (partial clusters at the edges are ignored, except a partial last
    /// cluster of the disk). v3 images read zeroes afterwards; on v2 images
    /// the clusters are deallocated (reading zeroes), except that with a
    /// backing file the discard does nothing, as in QEMU: without the zero
    /// flag it would expose stale backing data.
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
    /// img.write_at(&[9; 64 << 10], 0)?;
    /// img.discard(0, 64 << 10)?;
    /// let mut buf = [0xffu8; 512];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [0; 512]); // v3: discarded clusters read as zeroes
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As for [`Image::write_at`].
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        let mut meta = self.lock_idle()?;
        self.check_range(meta.header.size, offset, len)?;
        // Recorded in persistent bitmaps even when it changes nothing (as
        // QEMU does).
        meta.note_dirty(offset, len);
        if meta.header.version < 3 && meta.header.backing_file_name().is_some() {
            // Without the zero flag a discard would expose stale backing
            // data; QEMU refuses (ENOTSUP), and discards are advisory.
            return Ok(());
        }
        let r = self
            .before_first_write(&mut meta)
            .and_then(|_| self.discard_locked(&mut meta, offset, len, false));
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(&mut meta, e, IoOp::Write)),
        }
    }

    pub(crate) fn discard_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        full: bool,
    ) -> Result<()> {
        let geom = self.geom;
        let cs = geom.cluster_size;
        let size = meta.header.size;
        let start = offset.div_ceil(cs) * cs;
        let mut end = (offset + len) & !(cs - 1);
        if offset + len == size && size & (cs - 1) != 0 && offset <= size & !(cs - 1) {
            end = size;
        }
        let v3 = meta.header.version >= 3;
        let no_unref = self.opts.get_discard_no_unref() && v3;
        let has_backing = meta.header.backing_file_name().is_some();
        let raw_data = meta.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
        let mut g = start;
        while g < end {
            let (table, _) = meta.l2_table_offset(geom.l1_index(g))?;
            // Without an L2 table everything is unallocated: nothing to do,
            // unless v3 must hide backing data behind zero entries.
            if table == 0 && (full || !v3 || !has_backing) {
                g = ((geom.l1_index(g) + 1) << (geom.cluster_bits + geom.l2_bits))
                    .min(end.max(g + cs));
                continue;
            }
            let (raw, e) = if table == 0 {
                (RawL2 { word: 0, bitmap: 0 }, L2Entry::Unallocated)
            } else {
                let slot = meta.l2_slot(table, g);
                meta.load_l2_slice(slot.slice)?;
                let raw = meta.read_slot(&slot);
                (raw, meta.decode_l2(raw, &slot)?.0)
            };
            let skip = !full
                && v3
                && match e {
                    L2Entry::Zero { host: None, .. } => !geom.extended_l2,
                    L2Entry::Unallocated => !has_backing && (!geom.extended_l2 || raw.bitmap == 0),
                    _ => false,
                };
            if !skip && !(e == L2Entry::Unallocated && raw.bitmap == 0 && (full || !v3)) {
                let table = meta.writable_l2_table(geom.l1_index(g))?;
                let slot = meta.l2_slot(table, g);
                meta.load_l2_slice(slot.slice)?;
                let new = if full || !v3 {
                    RawL2 { word: 0, bitmap: 0 }
                } else if no_unref && e.host_cluster().is_some() {
                    if geom.extended_l2 {
                        RawL2 {
                            word: raw.word,
                            bitmap: Subclusters::ALL_ZERO.0,
                        }
                    } else {
                        RawL2 {
                            word: raw.word | OFLAG_ZERO,
                            bitmap: 0,
                        }
                    }
                } else if geom.extended_l2 {
                    RawL2 {
                        word: 0,
                        bitmap: Subclusters::ALL_ZERO.0,
                    }
                } else {
                    RawL2 {
                        word: OFLAG_ZERO,
                        bitmap: 0,
                    }
                };
                meta.write_slot(&slot, new);
                if raw_data {
                    // Keep the raw data file equal to the guest view.
                    self.zero_data_file(g, (g + cs).min(size))?;
                }
                // discard-no-unref keeps the reference of a data cluster
                // (host_cluster() is None for a compressed one, whose
                // reference goes as always: QEMU's keep_reference).
                match e.host_cluster() {
                    Some(h) if no_unref && !full => {
                        // Only a cluster this entry owns alone (COPIED): a
                        // cluster shared with an internal snapshot keeps
                        // the snapshot's data.
                        if meta.rc.policy().request && (e.copied() || meta.efmt.external_data) {
                            // Where the data lives: with an external data
                            // file `h` is an offset in that file.
                            if let Ok(p) = meta.gate.permit_data(HostOffset(h), cs) {
                                let _ = self.data.discard(p);
                            }
                        }
                    }
                    _ => self.drop_reference(meta, e, DiscardType::Request),
                }
            }
            g += cs;
        }
        if meta.rc.pending_frees() > MAX_PENDING_FREES {
            self.flush_locked(meta)?;
        }
        Ok(())
    }

    pub(super) fn drop_reference(&self, meta: &mut Meta, e: L2Entry, dtype: DiscardType) {
        if meta.efmt.external_data {
            return;
        }
        match e {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => meta.queue_free(HostOffset(host), dtype),
            L2Entry::Compressed { .. } => {
                if let Some((o, l)) = e.compressed_range() {
                    meta.queue_free_compressed(o, l, dtype);
                }
            }
            _ => {}
        }
    }

    /// Writes zeroes to `[offset, offset+len)`, encoding them as QEMU does
    /// (qcow2-format.md §11.3). On v3 images whole clusters (subclusters
    /// with extended L2) are zeroed in metadata only; with `unmap` their host
    /// clusters are released. On v2 images without a backing file whole
    /// clusters are deallocated (they then read as zeroes). A partial unit
    /// at either end is zeroed in metadata too when it is unallocated or
    /// zero in this image and the rest of it reads as zeroes; otherwise it
    /// is written as zero data, as is everything on v2 images with a backing
    /// file. With `data_file_raw` the external data file is zeroed too, so
    /// that it stays a valid raw image.
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
    /// img.write_at(&[9; 256 << 10], 0)?;
    /// // Whole clusters become zero clusters in metadata; `unmap` frees their space.
    /// img.write_zeroes(64 << 10, 128 << 10, true)?;
    /// let mut buf = [0xffu8; 512];
    /// img.read_at(&mut buf, 64 << 10)?;
    /// assert_eq!(buf, [0; 512]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As for [`Image::write_at`].
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.writable()?;
        let (size, v3, raw_data, has_backing) = {
            let m = self.lock()?;
            self.check_range(m.header.size, offset, len)?;
            // Recorded in persistent bitmaps even where it changes nothing
            // (as QEMU does); the parts written below record themselves again
            // under the lock that issues them.
            m.note_dirty(offset, len);
            (
                m.header.size,
                m.header.version >= 3,
                m.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0,
                m.header.backing_file_name().is_some(),
            )
        };
        if self.data.is_encrypted() && !crypt::sector_aligned(offset, len) {
            return self.write_zeroes_unaligned_encrypted(offset, len, unmap);
        }
        if !v3 && has_backing {
            return self.write_zero_data(offset, len);
        }
        let geom = self.geom;
        let unit = if v3 {
            geom.subcluster_size()
        } else {
            geom.cluster_size
        };
        let end = offset + len;
        let mut a = offset.div_ceil(unit) * unit;
        let mut b = if end == size { end } else { end & !(unit - 1) };
        let head = offset & !(unit - 1);
        let head_whole = head < offset && self.unit_zeroable(head, unit, size, offset, end)?;
        if head_whole {
            a = head;
        }
        let tail = b;
        let tail_whole = b < end && self.unit_zeroable(tail, unit, size, offset.max(tail), end)?;
        if tail_whole {
            b = (tail + unit).min(size);
        }
        if a >= b {
            return self.write_zero_data(offset, len);
        }
        {
            let mut meta = self.lock_idle()?;
            let r = (|| {
                // A write may have allocated a partial unit since it was
                // checked: check its state again under the lock (as QEMU
                // does) and write zero data into it instead if so. Its
                // content cannot have changed while its state did not.
                let mut still = |u: u64| -> Result<bool> {
                    let ulen = unit.min(size - u);
                    let (ext, n) = meta.map_extent(u, ulen)?;
                    Ok(n >= ulen && matches!(ext, Extent::Unallocated | Extent::Zero { .. }))
                };
                if head_whole && !still(head)? {
                    a = head + unit;
                }
                if tail_whole && !still(tail)? {
                    b = tail;
                }
                if a >= b {
                    return Ok(());
                }
                self.before_first_write(&mut meta)?;
                // Whole units around the request are zeroed only when they
                // read as zeroes already: the request is what changes.
                let (lo, hi) = (a.max(offset), b.min(end));
                meta.note_dirty(lo, hi.saturating_sub(lo));
                if raw_data {
                    // The data file must stay a valid raw image (QEMU
                    // zeroes it before updating the L2 entries).
                    self.zero_data_file(a, b)?;
                }
                if v3 {
                    // discard-no-unref keeps the host clusters here too.
                    let unmap = unmap && !self.opts.get_discard_no_unref();
                    self.zero_locked(&mut meta, a, b, unmap)
                } else {
                    self.discard_locked(&mut meta, a, b - a, false)
                }
            })();
            if let Err(e) = r {
                return Err(self.fail(&mut meta, e, IoOp::Write));
            }
        }
        if a >= b {
            return self.write_zero_data(offset, len);
        }
        if offset < a {
            self.write_zero_data(offset, a - offset)?;
        }
        if b < end {
            self.write_zero_data(b, end - b)?;
        }
        Ok(())
    }

    /// Writes zeroes to `[start, end)` of the external data file (mapped 1:1).
    fn zero_data_file(&self, start: u64, end: u64) -> Result<()> {
        let Some(data) = self.data.external() else {
            return Ok(());
        };
        let zeros = vec![0u8; (end - start).min(1 << 20) as usize];
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            data.write_data(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Whether the unit at `start` (clipped to the disk) is unallocated or
    /// zero in this image and reads as zeroes outside `[keep_lo, keep_hi)`:
    /// then a partial zero write may zero it whole in metadata (QEMU's
    /// `is_zero` check in `qcow2_co_pwrite_zeroes`).
    fn unit_zeroable(
        &self,
        start: u64,
        unit: u64,
        size: u64,
        keep_lo: u64,
        keep_hi: u64,
    ) -> Result<bool> {
        let ulen = unit.min(size - start);
        let st = self.block_status(start, ulen)?;
        if st.len < ulen || !matches!(st.extent, Extent::Unallocated | Extent::Zero { .. }) {
            return Ok(false);
        }
        let keep_lo = keep_lo.clamp(start, start + ulen);
        let keep_hi = keep_hi.clamp(keep_lo, start + ulen);
        let mut buf = vec![0u8; ulen as usize];
        for (lo, hi) in [(start, keep_lo), (keep_hi, start + ulen)] {
            if lo < hi {
                let part = &mut buf[..(hi - lo) as usize];
                self.read_at(part, lo)?;
                if part.iter().any(|b| *b != 0) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Skip ranges that already read as zero.
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(buf.len() as u64) as usize;
            self.read_at(&mut buf[..n], pos)?;
            if buf[..n].iter().any(|b| *b != 0) {
                buf[..n].fill(0);
                self.write_at(&buf[..n], pos)?;
            }
            pos += n as u64;
        }
        Ok(())
    }

    pub(crate) fn zero_locked(
        &self,
        meta: &mut Meta,
        start: u64,
        end: u64,
        unmap: bool,
    ) -> Result<()> {
        let geom = self.geom;
        let cs = geom.cluster_size;
        let mut g = start;
        while g < end {
            let cg = g & !(cs - 1);
            let upto = (cg + cs).min(end);
            let table = meta.writable_l2_table(geom.l1_index(g))?;
            let slot = meta.l2_slot(table, g);
            meta.load_l2_slice(slot.slice)?;
            let raw = meta.read_slot(&slot);
            let (e, b) = meta.decode_l2(raw, &slot)?;
            if geom.extended_l2 {
                let scs = geom.subcluster_size();
                let mask = range_mask((g - cg) / scs, (upto - cg).div_ceil(scs));
                let whole = mask == u32::MAX;
                let drop_host = match e {
                    L2Entry::Compressed { .. } => true,
                    L2Entry::Normal { copied, .. } => whole && (unmap || !copied),
                    _ => false,
                };
                let new = if drop_host || matches!(e, L2Entry::Compressed { .. }) {
                    if !whole {
                        // Partial zeroing of a compressed/shared cluster: write zero data.
                        let mut z = vec![0u8; (upto - g) as usize];
                        z.fill(0);
                        self.allocating_write(meta, g, &z)?;
                        g = upto;
                        continue;
                    }
                    RawL2 {
                        word: 0,
                        bitmap: Subclusters::ALL_ZERO.0,
                    }
                } else {
                    let bm = Subclusters::from_parts(b.alloc() & !mask, b.zero() | mask);
                    RawL2 {
                        word: raw.word,
                        bitmap: bm.0,
                    }
                };
                if new != raw {
                    meta.write_slot(&slot, new);
                }
                if drop_host {
                    self.drop_reference(meta, e, DiscardType::Request);
                }
            } else {
                let shared = matches!(e, L2Entry::Compressed { .. })
                    || matches!(
                        e,
                        L2Entry::Normal { copied: false, .. }
                            | L2Entry::Zero {
                                copied: false,
                                host: Some(_)
                            }
                    );
                let new = if unmap || shared {
                    RawL2 {
                        word: OFLAG_ZERO,
                        bitmap: 0,
                    }
                } else {
                    match e {
                        L2Entry::Normal { .. } | L2Entry::Zero { .. } => RawL2 {
                            word: raw.word | OFLAG_ZERO,
                            bitmap: 0,
                        },
                        _ => RawL2 {
                            word: OFLAG_ZERO,
                            bitmap: 0,
                        },
                    }
                };
                if new != raw {
                    meta.write_slot(&slot, new);
                    if unmap || shared {
                        self.drop_reference(meta, e, DiscardType::Request);
                    }
                }
            }
            g = upto;
        }
        if meta.rc.pending_frees() > MAX_PENDING_FREES {
            self.flush_locked(meta)?;
        }
        Ok(())
    }
}
