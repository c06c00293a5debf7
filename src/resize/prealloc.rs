//! Preallocation while growing: QEMU's `preallocate_co` replayed through
//! the allocator (`metadata`, and `falloc`/`full` with an external data
//! file) and the refcount-area path (`falloc`/`full`), with the batches of
//! in-memory L2 tables both use (see the parent module's docs).

use super::resize_data_file;
use crate::error::{Error, Result};
use crate::format::consts::*;
use crate::format::entry::{L2Entry, Subclusters};
use crate::format::Structure;
use crate::format::{be_u64, put_be_u64};
use crate::image::Image;
use crate::mapping::Extent;
use crate::meta::{DiscardType, Meta, RawL2};
use crate::options::Preallocation;
use crate::types::{ClusterCount, GuestOffset, HostOffset, MetadataKind};
use std::collections::HashMap;

/// New L2 tables held in memory before they are written (one batch).
const BATCH_BYTES: usize = 32 << 20;
/// QEMU's `BDRV_REQUEST_MAX_BYTES`: one allocation covers at most this.
const REQUEST_MAX_BYTES: u64 = ((i32::MAX as u64) >> 9) << 9;

/// QEMU's subcluster types (`QCow2SubclusterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sc {
    Normal,
    ZeroAlloc,
    ZeroPlain,
    UnallocAlloc,
    UnallocPlain,
    Compressed,
    Invalid,
}

/// An L2 table the preallocation works on.
#[derive(Debug, Clone, Copy)]
enum Table {
    /// Built in memory, not written yet (index into the batch).
    New(usize),
    /// An existing writable table, accessed through the L2 cache.
    Cached(u64),
}

/// One allocation to link into the L2 tables (QEMU's `QCowL2Meta`): guest
/// clusters from `offset` get host clusters from `alloc`; the COW regions
/// are byte ranges relative to `offset`.
#[derive(Debug, Clone, Copy)]
struct Link {
    offset: u64,
    alloc: u64,
    nb: u64,
    keep_old: bool,
    cow_start: (u64, u64),
    cow_end: (u64, u64),
}

/// A new L2 table not written yet.
#[derive(Debug)]
struct NewTable {
    l1i: usize,
    host: u64,
    buf: Vec<u8>,
}

/// State of one preallocation.
#[derive(Debug)]
struct Prealloc {
    tables: Vec<NewTable>,
    by_l1: HashMap<usize, usize>,
    bytes: usize,
    /// Where the image file (or the data file) must end before the entries
    /// of the pending tables may be written: the end of the last data run.
    data_end: u64,
    /// The mode the data file is extended with (external data file only).
    mode: Preallocation,
}

impl Prealloc {
    fn new(mode: Preallocation) -> Self {
        Prealloc {
            tables: Vec::new(),
            by_l1: HashMap::new(),
            bytes: 0,
            data_end: 0,
            mode,
        }
    }
}

fn corrupt_entry(table: u64, index: u64) -> Error {
    Error::Corrupt {
        what: Structure::L2Table,
        offset: table,
        msg: format!("Invalid cluster entry found  (L2 offset: {table:#x}, L2 index: {index:#x})"),
    }
}

/// Whether a write to this cluster needs a new host cluster (QEMU's
/// `cluster_needs_new_alloc`).
fn needs_new_alloc(e: L2Entry) -> bool {
    !matches!(
        e,
        L2Entry::Normal { copied: true, .. }
            | L2Entry::Zero {
                host: Some(_),
                copied: true
            }
    )
}

/// Bits `[from, to)` of a 32-bit mask.
fn bits(from: u32, to: u32) -> u32 {
    let below = |n: u32| if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
    below(to) & !below(from)
}

impl Image {
    /// QEMU's `preallocate_co` over `[old, new)`.
    pub(super) fn preallocate_metadata(
        &self,
        meta: &mut Meta,
        old: u64,
        new: u64,
        mode: Preallocation,
    ) -> Result<()> {
        let cs = self.geom.cluster_size;
        let chunk_max = (i32::MAX as u64) & !(cs - 1);
        let mut ctx = Prealloc::new(mode);
        let mut offset = old;
        while offset < new {
            let want = (new - offset).min(chunk_max);
            let (host, done) = self.alloc_host_offset(meta, &mut ctx, offset, want)?;
            ctx.data_end = ctx.data_end.max(host + done);
            offset += done;
            if ctx.bytes >= BATCH_BYTES {
                self.flush_batch(meta, &mut ctx)?;
            }
        }
        self.flush_batch(meta, &mut ctx)
    }

    /// QEMU's `qcow2_alloc_host_offset`: maps (a prefix of) `bytes` guest
    /// bytes from `offset` to one contiguous host range, allocating what is
    /// needed, and links the allocations. Returns the host offset of
    /// `offset` and how many bytes were handled.
    fn alloc_host_offset(
        &self,
        meta: &mut Meta,
        ctx: &mut Prealloc,
        offset: u64,
        bytes: u64,
    ) -> Result<(u64, u64)> {
        let mut start = offset;
        let mut remaining = bytes;
        let mut cluster_offset: Option<u64> = None;
        let mut host_offset: Option<u64> = None;
        let mut cur = 0u64;
        loop {
            if host_offset.is_none() {
                host_offset = cluster_offset;
            }
            start += cur;
            remaining -= cur;
            if let Some(c) = cluster_offset.as_mut() {
                *c += cur;
            }
            if remaining == 0 {
                break;
            }
            cur = remaining;
            if self.handle_copied(meta, ctx, start, &mut cluster_offset, &mut cur)? {
                continue;
            }
            if cur == 0 {
                break;
            }
            if !self.handle_alloc(meta, ctx, start, &mut cluster_offset, &mut cur)? {
                break;
            }
        }
        let done = bytes - remaining;
        match host_offset {
            Some(h) if done > 0 => Ok((h, done)),
            _ => Err(Error::Internal(format!(
                "preallocation made no progress at guest offset {offset:#x}"
            ))),
        }
    }

    /// How many clusters to look at from `start` for at most `bytes` bytes:
    /// stop at the L2 slice end and at QEMU's request limit.
    fn clusters_to_look_at(&self, meta: &Meta, start: u64, bytes: u64) -> u64 {
        let g = self.geom;
        let oic = g.offset_in_cluster(start);
        let slice = meta.slice_entries();
        let idx = (start >> g.cluster_bits) & (slice - 1);
        g.clusters_for(oic + bytes)
            .min(slice - idx)
            .min(REQUEST_MAX_BYTES >> g.cluster_bits)
    }

    /// QEMU's `handle_copied`: clusters already allocated and writable in
    /// place (contiguous with `cluster_offset` if given) are kept.
    fn handle_copied(
        &self,
        meta: &mut Meta,
        ctx: &mut Prealloc,
        start: u64,
        cluster_offset: &mut Option<u64>,
        bytes: &mut u64,
    ) -> Result<bool> {
        let g = self.geom;
        let oic = g.offset_in_cluster(start);
        let nb = self.clusters_to_look_at(meta, start, *bytes);
        let t = self.table_for(meta, ctx, start)?;
        let (_, e, _) = self.entry(meta, ctx, t, start)?;
        if needs_new_alloc(e) {
            return Ok(false);
        }
        let host = e.host_cluster().unwrap_or(0);
        if let Some(c) = *cluster_offset {
            if c != host {
                *bytes = 0;
                return Ok(false);
            }
        }
        let keep = self.count_single_write(meta, ctx, t, start, nb, false)?;
        *bytes = (*bytes).min(keep * g.cluster_size - oic);
        if let Some(m) = self.l2_meta(meta, ctx, t, host, start, *bytes, true)? {
            self.link(meta, ctx, &m, true)?;
        }
        *cluster_offset = Some(host + oic);
        Ok(true)
    }

    /// QEMU's `handle_alloc`: allocates new clusters for the ones that need
    /// it, contiguous with `cluster_offset` if given.
    fn handle_alloc(
        &self,
        meta: &mut Meta,
        ctx: &mut Prealloc,
        start: u64,
        cluster_offset: &mut Option<u64>,
        bytes: &mut u64,
    ) -> Result<bool> {
        let g = self.geom;
        let cs = g.cluster_size;
        let oic = g.offset_in_cluster(start);
        let nb = self.clusters_to_look_at(meta, start, *bytes);
        let t = self.table_for(meta, ctx, start)?;
        let mut nb = self.count_single_write(meta, ctx, t, start, nb, true)?;
        if nb == 0 {
            return Err(Error::Internal(format!(
                "no cluster to allocate at guest offset {start:#x}"
            )));
        }
        let host = if meta.efmt.external_data {
            // Data file clusters map 1:1 and are not refcounted.
            g.cluster_start(start)
        } else {
            match *cluster_offset {
                None => meta.alloc_clusters(ClusterCount(nb))?.0,
                Some(c) => {
                    let h = g.cluster_start(c);
                    nb = meta
                        .alloc_clusters_at(HostOffset(h).cluster(g.cluster_bits), ClusterCount(nb))?
                        .0;
                    h
                }
            }
        };
        if nb == 0 {
            *bytes = 0;
            return Ok(false);
        }
        let nb_bytes = (*bytes + oic).min(nb * cs);
        *cluster_offset = Some(host + oic);
        *bytes = (*bytes).min(nb_bytes - oic);
        // The file must reach these clusters before entries point at them.
        ctx.data_end = ctx.data_end.max(host + oic + *bytes);
        if let Some(m) = self.l2_meta(meta, ctx, t, host, start, *bytes, false)? {
            self.link(meta, ctx, &m, true)?;
        }
        Ok(true)
    }

    /// QEMU's `count_single_write_clusters`: how many of the `nb` clusters
    /// from `start` need a new allocation (`new_alloc`), or can be written in
    /// place at contiguous host offsets.
    fn count_single_write(
        &self,
        meta: &mut Meta,
        ctx: &Prealloc,
        t: Table,
        start: u64,
        nb: u64,
        new_alloc: bool,
    ) -> Result<u64> {
        let cs = self.geom.cluster_size;
        let base = self.geom.cluster_start(start);
        if let Table::New(i) = t {
            // A table built here: only entries set in this run are non-zero.
            if new_alloc {
                let tab = &ctx.tables[i];
                let eb = self.geom.l2_entry_bytes as usize;
                let first = self.geom.l2_index(base) as usize;
                let n = (0..nb as usize)
                    .take_while(|k| be_u64(&tab.buf, (first + k) * eb).unwrap_or(0) == 0)
                    .count();
                if n as u64 == nb {
                    return Ok(nb);
                }
            }
        }
        let (_, first, _) = self.entry(meta, ctx, t, base)?;
        let mut expected = first.host_cluster().unwrap_or(0);
        for i in 0..nb {
            let (_, e, _) = self.entry(meta, ctx, t, base + i * cs)?;
            if needs_new_alloc(e) != new_alloc {
                return Ok(i);
            }
            if !new_alloc {
                if e.host_cluster() != Some(expected) {
                    return Ok(i);
                }
                expected += cs;
            }
        }
        Ok(nb)
    }

    /// QEMU's subcluster type of subcluster `sc` of an entry.
    fn sc_type(&self, e: L2Entry, b: Subclusters, sc: u32) -> Sc {
        if let L2Entry::Compressed { .. } = e {
            return Sc::Compressed;
        }
        if !self.geom.extended_l2 {
            return match e {
                L2Entry::Normal { .. } => Sc::Normal,
                L2Entry::Zero { host: Some(_), .. } => Sc::ZeroAlloc,
                L2Entry::Zero { host: None, .. } => Sc::ZeroPlain,
                _ => Sc::UnallocPlain,
            };
        }
        let zero = b.zero() & (1 << sc) != 0;
        let alloc = b.alloc() & (1 << sc) != 0;
        if e.host_cluster().is_some() {
            if zero {
                Sc::ZeroAlloc
            } else if alloc {
                Sc::Normal
            } else {
                Sc::UnallocAlloc
            }
        } else if zero {
            Sc::ZeroPlain
        } else if alloc {
            Sc::Invalid
        } else {
            Sc::UnallocPlain
        }
    }

    /// QEMU's `qcow2_get_subcluster_range_type`: the type of subcluster
    /// `from` and how many subclusters from there share it.
    fn sc_range(&self, e: L2Entry, b: Subclusters, from: u32) -> (Sc, u32) {
        let ty = self.sc_type(e, b, from);
        if !self.geom.extended_l2 || ty == Sc::Compressed {
            let spc = if self.geom.extended_l2 { 32 } else { 1 };
            return (ty, spc - from);
        }
        let below = bits(0, from);
        let n = match ty {
            Sc::Normal => (b.alloc() | below).trailing_ones() - from,
            Sc::ZeroPlain | Sc::ZeroAlloc => (b.zero() | below).trailing_ones() - from,
            Sc::UnallocPlain | Sc::UnallocAlloc => {
                ((b.zero() | b.alloc()) & !below).trailing_zeros() - from
            }
            _ => 0,
        };
        (ty, n)
    }

    /// QEMU's `calculate_l2_meta`: the link for `bytes` guest bytes from
    /// `guest` mapped to host clusters from `host`, with the COW regions the
    /// old entries call for; `None` when kept clusters need nothing.
    #[allow(clippy::too_many_arguments)]
    fn l2_meta(
        &self,
        meta: &mut Meta,
        ctx: &Prealloc,
        t: Table,
        host: u64,
        guest: u64,
        bytes: u64,
        keep_old: bool,
    ) -> Result<Option<Link>> {
        let g = self.geom;
        let cs = g.cluster_size;
        let scs = g.subcluster_size();
        let spc: u32 = if g.extended_l2 { 32 } else { 1 };
        let sc_of = |off: u64| ((off >> g.subcluster_bits) & u64::from(spc - 1)) as u32;
        let base = g.cluster_start(guest);
        let cow_start_to = g.offset_in_cluster(guest);
        let cow_end_from = cow_start_to + bytes;
        let nb = g.clusters_for(cow_end_from);
        let mut skip = keep_old;
        for i in 0..nb {
            let (_, e, b) = self.entry(meta, ctx, t, base + i * cs)?;
            let ty = if skip {
                let from = cow_start_to.max(i * cs);
                let to = cow_end_from.min((i + 1) * cs);
                let (first, last) = (sc_of(from), sc_of(to - 1));
                let (ty, cnt) = self.sc_range(e, b, first);
                if ty != Sc::Normal || first + cnt <= last {
                    skip = false;
                }
                ty
            } else {
                self.sc_type(e, b, 0)
            };
            if ty == Sc::Invalid {
                let table = match t {
                    Table::Cached(o) => o,
                    Table::New(i) => ctx.tables[i].host,
                };
                return Err(corrupt_entry(table, g.l2_index(base + i * cs)));
            }
        }
        if skip {
            return Ok(None);
        }
        let (_, e, b) = self.entry(meta, ctx, t, base)?;
        let sc = sc_of(cow_start_to);
        let cow_start_from = match (keep_old, self.sc_type(e, b, sc)) {
            (false, Sc::Compressed) => 0,
            (false, Sc::Normal | Sc::ZeroAlloc | Sc::UnallocAlloc) => {
                if g.extended_l2 {
                    u64::from(sc.min(b.alloc().trailing_zeros())) * scs
                } else {
                    0
                }
            }
            (false, _) => u64::from(sc) * scs,
            (true, Sc::Normal) => cow_start_to,
            (true, _) => u64::from(sc) * scs,
        };
        let (_, e, b) = self.entry(meta, ctx, t, base + (nb - 1) * cs)?;
        let sc = sc_of(g.offset_in_cluster(guest + bytes - 1));
        let cow_end_to = match (keep_old, self.sc_type(e, b, sc)) {
            (false, Sc::Compressed) => cow_end_from.div_ceil(cs) * cs,
            (false, Sc::Normal | Sc::ZeroAlloc | Sc::UnallocAlloc) => {
                let end = cow_end_from.div_ceil(cs) * cs;
                if g.extended_l2 {
                    end - u64::from((spc - sc - 1).min(b.alloc().leading_zeros())) * scs
                } else {
                    end
                }
            }
            (false, _) => cow_end_from.div_ceil(scs) * scs,
            (true, Sc::Normal) => cow_end_from,
            (true, _) => cow_end_from.div_ceil(scs) * scs,
        };
        Ok(Some(Link {
            offset: base,
            alloc: host,
            nb,
            keep_old,
            cow_start: (cow_start_from, cow_start_to - cow_start_from),
            cow_end: (cow_end_from, cow_end_to - cow_end_from),
        }))
    }

    /// QEMU's `qcow2_alloc_cluster_link_l2` for a preallocation: copies the
    /// COW regions, points the entries at the new clusters (`NORMAL |
    /// COPIED`; with `prealloc` the subcluster bitmaps stay as they are) and
    /// drops the old clusters' references.
    fn link(&self, meta: &mut Meta, ctx: &mut Prealloc, m: &Link, prealloc: bool) -> Result<()> {
        let g = self.geom;
        let cs = g.cluster_size;
        let external = meta.efmt.external_data;
        for (off, len) in [m.cow_start, m.cow_end] {
            if len == 0 {
                continue;
            }
            let mut buf = vec![0u8; len as usize];
            self.read_guest_locked(meta, m.offset + off, &mut buf)?;
            meta.gate.write_data_guest(
                &buf,
                HostOffset(m.alloc + off),
                GuestOffset(m.offset + off),
            )?;
            meta.data_unsynced = true;
        }
        let t = self.table_for(meta, ctx, m.offset)?;
        let mut old = Vec::new();
        let written = (m.cow_start.0, m.cow_end.0 + m.cow_end.1);
        for i in 0..m.nb {
            let guest = m.offset + i * cs;
            let (raw, e, _) = self.entry(meta, ctx, t, guest)?;
            if raw.word != 0 && !m.keep_old {
                old.push(e);
            }
            let mut bitmap = raw.bitmap;
            if g.extended_l2 && !prealloc {
                let from = written.0.max(i * cs) - i * cs;
                let to = written.1.min((i + 1) * cs) - i * cs;
                let first = (from >> g.subcluster_bits) as u32;
                let last = ((to - 1) >> g.subcluster_bits) as u32;
                let range = bits(first, last + 1);
                let b = Subclusters(bitmap);
                bitmap = Subclusters::from_parts(b.alloc() | range, b.zero() & !range).0;
            }
            let word = (m.alloc + i * cs) | OFLAG_COPIED;
            self.set_entry(meta, ctx, t, guest, RawL2 { word, bitmap })?;
        }
        if !old.is_empty() && !external {
            // QEMU drops these references at once (later allocations may
            // reuse the clusters): make the new entries durable first.
            self.flush_batch(meta, ctx)?;
            meta.flush_all(false)?;
            for e in old {
                self.drop_now(meta, e)?;
            }
        }
        Ok(())
    }

    /// Drops the reference an L2 entry held, immediately.
    fn drop_now(&self, meta: &mut Meta, e: L2Entry) -> Result<()> {
        let cb = self.geom.cluster_bits;
        let (first, n) = match e {
            L2Entry::Compressed { .. } => match e.compressed_range() {
                Some((o, l)) => (o >> cb, ((o + l.max(1) - 1) >> cb) - (o >> cb) + 1),
                None => return Ok(()),
            },
            _ => match e.host_cluster() {
                Some(h) => (h >> cb, 1),
                None => return Ok(()),
            },
        };
        for c in first..first + n {
            let _ = meta.update_refcount(c, 1, -1, DiscardType::Never)?;
        }
        Ok(())
    }

    /// Reads the current guest content of `buf.len()` bytes at `guest`
    /// while the metadata lock is held.
    fn read_guest_locked(&self, meta: &mut Meta, guest: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.geom.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let g = guest + done as u64;
            let (ext, len) = meta.map_extent(g, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + len as usize];
            match ext {
                Extent::Data { host } => self.data.read_guest(chunk, host, Some(g))?,
                Extent::Zero { .. } => chunk.fill(0),
                Extent::Unallocated => self.read_backing(chunk, g)?,
                Extent::Compressed { offset, len: clen } => {
                    let data = self.read_compressed(meta.header.compression_type, offset, clen)?;
                    let at = (g & (cs - 1)) as usize;
                    chunk.copy_from_slice(&data[at..at + chunk.len()]);
                }
            }
            done += len as usize;
        }
        Ok(())
    }

    /// QEMU's `get_cluster_table`: the writable L2 table for `guest`,
    /// allocating a new one (built in memory) or copying a shared one.
    fn table_for(&self, meta: &mut Meta, ctx: &mut Prealloc, guest: u64) -> Result<Table> {
        let l1i = self.geom.l1_index(guest);
        let idx = usize::try_from(l1i)
            .ok()
            .filter(|i| *i < meta.l2.l1().len())
            .ok_or_else(|| Error::Internal(format!("L1 index {l1i} beyond the L1 table")))?;
        if let Some(i) = ctx.by_l1.get(&idx) {
            return Ok(Table::New(*i));
        }
        let (off, copied) = meta.l2_table_offset(l1i)?;
        if off != 0 {
            if copied {
                return Ok(Table::Cached(off));
            }
            return Ok(Table::Cached(meta.writable_l2_table(l1i)?));
        }
        let host = meta.alloc_clusters(ClusterCount(1))?.0;
        if host == 0 {
            return Err(Error::Corrupt {
                what: Structure::L2Table,
                offset: 0,
                msg: "Preventing invalid allocation of L2 table at offset 0".into(),
            });
        }
        meta.gate.checker_mut().add_active_l2(host);
        let cs = self.geom.cluster_size as usize;
        ctx.tables.push(NewTable {
            l1i: idx,
            host,
            buf: vec![0u8; cs],
        });
        ctx.bytes += cs;
        ctx.by_l1.insert(idx, ctx.tables.len() - 1);
        Ok(Table::New(ctx.tables.len() - 1))
    }

    /// The raw and decoded L2 entry of `guest` in table `t`.
    fn entry(
        &self,
        meta: &mut Meta,
        ctx: &Prealloc,
        t: Table,
        guest: u64,
    ) -> Result<(RawL2, L2Entry, Subclusters)> {
        match t {
            Table::Cached(table) => {
                let slot = meta.l2_slot(table, guest);
                meta.load_l2_slice(slot.slice)?;
                let raw = meta.read_slot(&slot);
                let (e, b) = meta.decode_l2(raw, &slot)?;
                Ok((raw, e, b))
            }
            Table::New(i) => {
                let tab = &ctx.tables[i];
                let pos = (self.geom.l2_index(guest) * self.geom.l2_entry_bytes) as usize;
                let word = be_u64(&tab.buf, pos).unwrap_or(0);
                let bitmap = if self.geom.extended_l2 {
                    be_u64(&tab.buf, pos + 8).unwrap_or(0)
                } else {
                    0
                };
                let e = L2Entry::decode(word, &meta.efmt)
                    .map_err(|_| corrupt_entry(tab.host, self.geom.l2_index(guest)))?;
                Ok((RawL2 { word, bitmap }, e, Subclusters(bitmap)))
            }
        }
    }

    fn set_entry(
        &self,
        meta: &mut Meta,
        ctx: &mut Prealloc,
        t: Table,
        guest: u64,
        raw: RawL2,
    ) -> Result<()> {
        match t {
            Table::Cached(table) => {
                let slot = meta.l2_slot(table, guest);
                meta.load_l2_slice(slot.slice)?;
                meta.write_slot(&slot, raw);
            }
            Table::New(i) => {
                let pos = (self.geom.l2_index(guest) * self.geom.l2_entry_bytes) as usize;
                let buf = &mut ctx.tables[i].buf;
                put_be_u64(buf, pos, raw.word);
                if self.geom.extended_l2 {
                    put_be_u64(buf, pos + 8, raw.bitmap);
                }
            }
        }
        Ok(())
    }

    /// Extends the image file (or the data file, with the preallocation
    /// mode) so it covers the data clusters allocated so far.
    fn extend_for_data(&self, meta: &mut Meta, ctx: &Prealloc) -> Result<()> {
        let end = ctx.data_end;
        if let Some(d) = self.data.external() {
            let len = d.len()?;
            if end > len {
                resize_data_file(d.storage(), end, ctx.mode)?;
            }
        } else {
            let len = self.file.len()?;
            if end > len {
                // Only extends the file (no byte of it is overwritten).
                meta.gate.set_len(end)?;
            }
        }
        Ok(())
    }

    /// Writes the pending new L2 tables: the file covers their data first,
    /// their refcounts (and any COW data) are made durable, the tables are
    /// written whole and synced, then the L1 entries point at them.
    fn flush_batch(&self, meta: &mut Meta, ctx: &mut Prealloc) -> Result<()> {
        self.extend_for_data(meta, ctx)?;
        if ctx.tables.is_empty() {
            return Ok(());
        }
        meta.flush_refcounts()?;
        if meta.data_unsynced {
            meta.sync()?;
        }
        let mut tables = std::mem::take(&mut ctx.tables);
        ctx.by_l1.clear();
        ctx.bytes = 0;
        tables.sort_by_key(|t| t.host);
        for t in &tables {
            meta.meta_write(&t.buf, t.host, MetadataKind::ActiveL2)?;
        }
        meta.sync()?;
        for t in &tables {
            meta.l2.set_l1(t.l1i, t.host | OFLAG_COPIED);
        }
        meta.flush_all(false)
    }

    /// QEMU's refcount-area path for `falloc` and `full` (no data file).
    /// With `zero_write` the new subclusters are marked allocated (the grown
    /// file reads as zeroes) instead of staying as they are.
    pub(super) fn preallocate_area(
        &self,
        meta: &mut Meta,
        old: u64,
        new: u64,
        mode: Preallocation,
        zero_write: bool,
    ) -> Result<()> {
        let g = self.geom;
        let cs = g.cluster_size;
        let cb = g.cluster_bits;
        let file_len = self.file.len()?;
        let used_end = match meta.last_used_cluster(file_len)? {
            Some(last) => (last + 1) * cs,
            None => file_len.div_ceil(cs) * cs,
        };
        let nb_data = (new.div_ceil(cs) * cs - g.cluster_start(old)) >> cb;
        let nb_l2 = nb_data.div_ceil(cs / g.l2_entry_bytes) + 1;
        let area = meta.refcount_area(used_end, nb_data + nb_l2, true, None)?;
        let ClusterCount(got) =
            meta.alloc_clusters_at(HostOffset(area).cluster(cb), ClusterCount(nb_data))?;
        if got != nb_data {
            return Err(Error::InvalidArgument(format!(
                "Failed to allocate data clusters: {got} of {nb_data} free at {area:#x}"
            )));
        }
        let new_file_size = area + nb_data * cs;
        if let Err(e) = self.allocate_area(meta, new_file_size, mode) {
            let _ = meta.update_refcount(area >> cb, nb_data, -1, DiscardType::Other);
            return Err(e);
        }
        let mut ctx = Prealloc::new(mode);
        let slice = meta.slice_entries();
        let mut host = area;
        let mut guest = old;
        let mut left = nb_data;
        while left > 0 {
            let nb = left.min(slice - ((guest >> cb) & (slice - 1)));
            let start_len = g.offset_in_cluster(guest);
            guest = g.cluster_start(guest);
            let m = Link {
                offset: guest,
                alloc: host,
                nb,
                keep_old: false,
                cow_start: (0, start_len),
                cow_end: (nb << cb, 0),
            };
            self.link(meta, &mut ctx, &m, !zero_write)?;
            if ctx.bytes >= BATCH_BYTES {
                self.flush_batch(meta, &mut ctx)?;
            }
            guest += nb * cs;
            host += nb * cs;
            left -= nb;
        }
        self.flush_batch(meta, &mut ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_ranges() {
        assert_eq!(bits(0, 0), 0);
        assert_eq!(bits(0, 32), u32::MAX);
        assert_eq!(bits(3, 5), 0b11000);
        assert_eq!(bits(31, 32), 1 << 31);
        assert_eq!(bits(5, 32), u32::MAX << 5);
    }
}
