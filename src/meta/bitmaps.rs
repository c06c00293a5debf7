//! Persistent dirty bitmaps of a read-write handle (QEMU's `qcow2-bitmap.c`).
//!
//! At a read-write open the bitmap directory is loaded ([`load_bitmaps`]):
//! every bitmap that is enabled (`auto`) and consistent (not `in_use`) is
//! *tracked*: its bits are read into memory ([`DirtyBitmap`]) and every
//! guest write, write-zeroes and discard sets the granules it touches.
//! Disabled bitmaps and bitmaps found `in_use` (left by a crash: their data
//! is unusable, QEMU calls them inconsistent) are never read, changed or
//! freed: their directory entries are carried over verbatim.
//!
//! Writes to the file, in the crash-safe order:
//! * Before the first guest write ([`Meta::mark_bitmaps_in_use`], QEMU's
//!   `update_ext_header_and_dir_in_place`): the autoclear bit is cleared and
//!   synced, the directory rewritten in place with `in_use` set on the
//!   tracked bitmaps and synced, the autoclear bit set again and synced. A
//!   crash in between leaves the bit clear: QEMU then drops the bitmaps, it
//!   never uses them.
//! * At close ([`Meta::store_bitmaps`], QEMU's
//!   `qcow2_store_persistent_dirty_bitmaps`): new data clusters and new
//!   bitmap tables are written, their refcounts made durable and synced;
//!   then a new directory (`in_use` cleared) is written to new clusters and
//!   synced; then the directory offset in the bitmaps header extension
//!   changes with one 8-byte write (the commit point, synced); only then are
//!   the old directory, tables and data clusters freed. A crash before the
//!   commit point leaves the old directory, whose tracked bitmaps are
//!   flagged `in_use`: inconsistent, never silently wrong.

use super::{conv, DiscardType, Meta};
use crate::error::{Error, Limit, Result};
use crate::format::bitmap::{
    decode_bitmap_directory, decode_bitmap_table_entry, encode_bitmap_directory, BitmapDirEntry,
    BitmapTableEntry, BME_FLAG_AUTO, BME_FLAG_IN_USE,
};
use crate::format::consts::{AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use crate::format::header::{Header, HeaderExtension};
use crate::format::{be_u32, be_u64, FormatError, Structure};
use crate::types::MetadataKind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The in-memory bits of one tracked bitmap: bit `i` covers guest bytes
/// `[i << granularity_bits, (i + 1) << granularity_bits)`. Words are atomic
/// so that requests set bits under the shared metadata lock or none.
#[derive(Debug)]
pub(crate) struct DirtyBitmap {
    granularity_bits: u32,
    /// Number of granules (bits) covering the disk.
    bits: u64,
    words: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// An all-clear bitmap for a `disk_size`-byte disk. The caller bounds
    /// the size (the directory entry's table covers the disk and holds at
    /// most 512 MiB of data); the allocation itself may still fail, which
    /// is an error, not an abort.
    fn new(granularity_bits: u32, disk_size: u64) -> Result<Self> {
        let granule = 1u64
            .checked_shl(granularity_bits)
            .ok_or_else(|| Error::Internal("bitmap granularity out of range".into()))?;
        let bits = disk_size.div_ceil(granule);
        let nwords = conv::mem_len(Structure::BitmapDirectory, bits.div_ceil(64))?;
        let mut words = Vec::new();
        words.try_reserve_exact(nwords).map_err(|_| {
            Error::TooLarge(Limit::Memory {
                what: Structure::BitmapDirectory,
                bytes: bits.div_ceil(8),
            })
        })?;
        words.extend((0..nwords).map(|_| AtomicU64::new(0)));
        Ok(Self {
            granularity_bits,
            bits,
            words: words.into_boxed_slice(),
        })
    }

    /// Sets bits `[first, end)` (clamped to the disk).
    fn set_bits(&self, first: u64, end: u64) {
        let end = end.min(self.bits);
        let mut b = first;
        while b < end {
            let w = b / 64;
            let lo = b % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if let Some(word) = usize::try_from(w).ok().and_then(|w| self.words.get(w)) {
                word.fetch_or(mask, Ordering::Relaxed);
            }
            b = (w + 1) * 64;
        }
    }

    /// Sets every granule guest bytes `[offset, offset + len)` touch.
    pub(crate) fn set_range(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = offset.saturating_add(len - 1);
        self.set_bits(
            offset >> self.granularity_bits,
            (last >> self.granularity_bits).saturating_add(1),
        );
    }

    /// Whether bit `b` is set.
    #[cfg(test)]
    fn get(&self, b: u64) -> bool {
        usize::try_from(b / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (b % 64)) != 0)
    }

    /// The dirty guest extents `(offset, len)` within `[offset, offset +
    /// len)`, merged and clipped to the range, at most `max` of them.
    pub(crate) fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let Some(end) = offset.checked_add(len).filter(|_| len > 0) else {
            return out;
        };
        let g = self.granularity_bits;
        let mut b = offset >> g;
        let last = ((end - 1) >> g).min(self.bits.saturating_sub(1));
        while b <= last && self.bits > 0 {
            let word = usize::try_from(b / 64)
                .ok()
                .and_then(|w| self.words.get(w))
                .map_or(0, |w| w.load(Ordering::Relaxed));
            let rest = word >> (b % 64);
            if rest == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += u64::from(rest.trailing_zeros());
            if b > last {
                break;
            }
            let start = (b << g).max(offset);
            let stop = b
                .saturating_add(1)
                .checked_shl(g)
                .unwrap_or(u64::MAX)
                .min(end);
            match out.last_mut() {
                Some((o, l)) if o.saturating_add(*l) == start => *l = stop - *o,
                _ => {
                    if out.len() >= max {
                        break;
                    }
                    out.push((start, stop - start));
                }
            }
            b += 1;
        }
        out
    }

    /// ORs serialized bitmap bytes (QEMU's layout: bit `i` is bit `i % 8`
    /// of byte `i / 8`) starting at serialized byte `at` into the words.
    /// `at` and `bytes.len()` are multiples of 8 (whole clusters).
    fn load_bytes(&self, at: u64, bytes: &[u8]) {
        let first = at / 8;
        for (k, chunk) in bytes.chunks_exact(8).enumerate() {
            let Some(w) = first
                .checked_add(k as u64)
                .and_then(|w| usize::try_from(w).ok())
            else {
                return;
            };
            let Some(word) = self.words.get(w) else {
                return;
            };
            let v = chunk
                .first_chunk::<8>()
                .map_or(0, |b| u64::from_le_bytes(*b));
            word.fetch_or(v & self.word_mask(w as u64), Ordering::Relaxed);
        }
    }

    /// The bits of word `w` that lie on the disk.
    fn word_mask(&self, w: u64) -> u64 {
        let start = w.saturating_mul(64);
        match self.bits.saturating_sub(start) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    /// Serializes the words from serialized byte `at` into `out` (zeroes
    /// past the disk); returns whether any bit is set.
    fn store_bytes(&self, at: u64, out: &mut [u8]) -> bool {
        let first = at / 8;
        let mut any = false;
        for (k, chunk) in out.chunks_exact_mut(8).enumerate() {
            let v = first
                .checked_add(k as u64)
                .and_then(|w| usize::try_from(w).ok())
                .and_then(|w| self.words.get(w))
                .map_or(0, |w| w.load(Ordering::Relaxed));
            any |= v != 0;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        any
    }

    /// Bytes of the serialized bitmap (QEMU rounds up to whole bytes).
    fn serialized_len(&self) -> u64 {
        self.bits.div_ceil(8)
    }
}

/// The tracked bitmaps' bits, shared by the handle (which sets them on
/// every request, with no lock) and [`Bitmaps`] (which stores them).
#[derive(Debug, Default)]
pub(crate) struct DirtySet {
    /// One per tracked bitmap, in directory order.
    pub maps: Vec<DirtyBitmap>,
    /// The disk size the bitmaps cover.
    size: u64,
    /// A bit was set since the last store.
    changed: AtomicBool,
}

impl DirtySet {
    /// Marks guest bytes `[offset, offset + len)` dirty in every tracked
    /// bitmap (a request past the disk sets nothing: it fails anyway).
    pub(crate) fn note(&self, offset: u64, len: u64) {
        if self.maps.is_empty() || offset.checked_add(len).is_none_or(|e| e > self.size) {
            return;
        }
        for m in &self.maps {
            m.set_range(offset, len);
        }
        self.changed.store(true, Ordering::Release);
    }
}

/// One tracked bitmap's place in the directory and its table on disk.
#[derive(Debug)]
struct Tracked {
    /// Index of its entry in [`Bitmaps::entries`].
    entry: usize,
    /// The raw bitmap table on disk (what to free after the next store).
    table: Vec<u64>,
}

/// The bitmap directory of a read-write handle and the tracked bitmaps.
#[derive(Debug)]
pub(crate) struct Bitmaps {
    /// Header offset of the bitmaps extension's payload (`nb_bitmaps`,
    /// reserved, directory size, directory offset).
    ext_pos: u64,
    dir_offset: u64,
    dir_size: u64,
    /// The directory as on disk.
    entries: Vec<BitmapDirEntry>,
    tracked: Vec<Tracked>,
    /// The bits of the tracked bitmaps (same order as `tracked`).
    pub set: Arc<DirtySet>,
    /// The directory on disk flags the tracked bitmaps `in_use`.
    marked: bool,
}

impl Bitmaps {
    /// Whether the tracked bitmaps still have to be flagged `in_use`
    /// before a guest write.
    pub(crate) fn needs_mark(&self) -> bool {
        !self.marked && !self.tracked.is_empty()
    }
}

/// The bits of the bitmap `bm` whose decoded table is `decoded`.
fn read_bits(
    meta: &Meta,
    bm: &BitmapDirEntry,
    decoded: &[BitmapTableEntry],
) -> Result<DirtyBitmap> {
    let cs = meta.geom.cluster_size;
    let map = DirtyBitmap::new(u32::from(bm.granularity_bits), meta.header.size)?;
    let mut buf = vec![0u8; conv::cluster_bytes(&meta.geom)];
    for (k, d) in decoded.iter().enumerate() {
        let at = (k as u64).saturating_mul(cs);
        if at >= map.serialized_len() {
            break;
        }
        match *d {
            BitmapTableEntry::AllZeroes => {}
            BitmapTableEntry::AllOnes => {
                let first = at.saturating_mul(8);
                map.set_bits(first, first.saturating_add(cs.saturating_mul(8)));
            }
            BitmapTableEntry::Data(off) => {
                meta.gate.reader().read(&mut buf, off)?;
                map.load_bytes(at, &buf);
            }
        }
    }
    Ok(map)
}

/// QEMU's message for a bitmap table entry that fails its checks (at open
/// QEMU reports them as EINVAL); `at` is the entry's host offset.
fn table_err(at: u64, name: &str) -> Error {
    dir_err(
        at,
        format!(
            "Could not read bitmap_table table from image for bitmap '{name}': Invalid argument"
        ),
    )
}

fn dir_err(offset: u64, reason: impl Into<String>) -> Error {
    Error::Format(FormatError::invalid(
        Structure::BitmapDirectory,
        Some(offset),
        reason,
    ))
}

/// Header offset of the payload of the last bitmaps extension in `head`
/// (the start of the file), walking the extension area as QEMU does.
fn bitmaps_ext_pos(head: &[u8], header: &Header) -> Option<u64> {
    let mut pos = if header.version >= 3 {
        usize::try_from(header.header_length).ok()?
    } else {
        72
    };
    let mut found = None;
    loop {
        let ty = be_u32(head, pos)?;
        let len = usize::try_from(be_u32(head, pos.checked_add(4)?)?).ok()?;
        if ty == 0 {
            return found;
        }
        let data = pos.checked_add(8)?;
        if ty == EXT_BITMAPS {
            found = Some(data as u64);
        }
        pos = data.checked_add(len.checked_next_multiple_of(8)?)?;
    }
}

/// Loads the bitmap directory of an image opened read-write (QEMU's
/// `qcow2_load_dirty_bitmaps`): `None` without bitmaps (autoclear bit 0
/// clear, or no extension). The directory must decode and satisfy QEMU's
/// constraints, names must be unique, the table of every consistent bitmap
/// must hold valid entries; the data of enabled consistent bitmaps is read.
///
/// # Errors
/// `Error::Format` naming the bitmap directory and the offset of the
/// offending structure; I/O errors; `Error::TooLarge` when a bitmap does
/// not fit in memory.
pub(crate) fn load_bitmaps(meta: &Meta) -> Result<Option<Bitmaps>> {
    let h = &meta.header;
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let Some(ext) = h.bitmaps().copied().filter(|e| e.nb_bitmaps > 0) else {
        return Ok(None);
    };
    let reader = meta.gate.reader();
    let mut head = vec![0u8; conv::cluster_bytes(&meta.geom)];
    reader.read(&mut head, 0)?;
    let ext_pos = bitmaps_ext_pos(&head, h).ok_or_else(|| {
        Error::Format(FormatError::invalid(
            Structure::HeaderExtension,
            None,
            "bitmaps extension not found in the header cluster",
        ))
    })?;
    // The extension was validated at decode: at most 64 MiB.
    let mut dir = vec![0u8; conv::mem_len(Structure::BitmapDirectory, ext.bitmap_directory_size)?];
    reader.read(&mut dir, ext.bitmap_directory_offset)?;
    let entries =
        decode_bitmap_directory(&dir, ext.nb_bitmaps, h.cluster_bits).map_err(|mut e| {
            e.offset = Some(
                ext.bitmap_directory_offset
                    .saturating_add(e.offset.unwrap_or(0)),
            );
            Error::Format(e)
        })?;
    let mut names = std::collections::HashSet::new();
    let mut tracked = Vec::new();
    let mut maps = Vec::new();
    for (i, bm) in entries.iter().enumerate() {
        bm.check_covers(h.size, h.cluster_bits).map_err(|mut e| {
            e.offset = Some(ext.bitmap_directory_offset);
            Error::Format(e)
        })?;
        if !names.insert(bm.name.as_str()) {
            return Err(dir_err(
                ext.bitmap_directory_offset,
                format!("Bitmap already exists: {}", bm.name),
            ));
        }
        if bm.in_use() {
            continue;
        }
        // At most 2^27 entries and 512 MiB of data (decode's constraints).
        let tbytes = u64::from(bm.bitmap_table_size) * 8;
        let mut raw = vec![0u8; conv::mem_len(Structure::BitmapDirectory, tbytes)?];
        reader.read(&mut raw, bm.bitmap_table_offset)?;
        let table: Vec<u64> = raw.chunks_exact(8).filter_map(|c| be_u64(c, 0)).collect();
        let mut decoded = Vec::with_capacity(table.len());
        for (k, &e) in table.iter().enumerate() {
            let at = bm.bitmap_table_offset.saturating_add(k as u64 * 8);
            let d = decode_bitmap_table_entry(e, h.cluster_bits)
                .map_err(|_| table_err(at, &bm.name))?;
            decoded.push(d);
        }
        if !bm.auto() {
            continue;
        }
        maps.push(read_bits(meta, bm, &decoded)?);
        tracked.push(Tracked { entry: i, table });
    }
    Ok(Some(Bitmaps {
        ext_pos,
        dir_offset: ext.bitmap_directory_offset,
        dir_size: ext.bitmap_directory_size,
        entries,
        tracked,
        set: Arc::new(DirtySet {
            maps,
            size: h.size,
            changed: AtomicBool::new(false),
        }),
        marked: false,
    }))
}

/// Most extents one [`dirty_extents`] call returns.
pub(crate) const MAX_EXTENTS: usize = 1 << 20;

/// The dirty guest extents of bitmap `name` within `[offset, offset +
/// len)`: from memory for a tracked bitmap, else read from the image (a
/// disabled bitmap, or any bitmap of a read-only handle).
///
/// # Errors
/// `Error::InvalidArgument` with QEMU's messages for an unknown bitmap
/// ("Dirty bitmap 'NAME' not found") and one flagged `in_use` ("Bitmap
/// 'NAME' is inconsistent and cannot be used"); the load errors of the
/// directory and table (`Error::Format` naming the offset), I/O errors.
pub(crate) fn dirty_extents(
    meta: &Meta,
    name: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>> {
    let not_found = || Error::InvalidArgument(format!("Dirty bitmap '{name}' not found"));
    let entry = if let Some(b) = &meta.bitmaps {
        let i = b
            .entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(not_found)?;
        if let Some(k) = b.tracked.iter().position(|t| t.entry == i) {
            let map = b
                .set
                .maps
                .get(k)
                .ok_or_else(|| Error::Internal("tracked bitmap without bits".into()))?;
            return Ok(map.extents(offset, len, MAX_EXTENTS));
        }
        b.entries.get(i).cloned().ok_or_else(not_found)?
    } else {
        let h = &meta.header;
        let ext = h
            .bitmaps()
            .copied()
            .filter(|_| h.autoclear_features & AUTOCLEAR_BITMAPS != 0)
            .ok_or_else(not_found)?;
        let mut dir =
            vec![0u8; conv::mem_len(Structure::BitmapDirectory, ext.bitmap_directory_size)?];
        meta.gate
            .reader()
            .read(&mut dir, ext.bitmap_directory_offset)?;
        decode_bitmap_directory(&dir, ext.nb_bitmaps, h.cluster_bits)
            .map_err(|mut e| {
                e.offset = Some(
                    ext.bitmap_directory_offset
                        .saturating_add(e.offset.unwrap_or(0)),
                );
                Error::Format(e)
            })?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(not_found)?
    };
    if entry.in_use() {
        return Err(Error::InvalidArgument(format!(
            "Bitmap '{name}' is inconsistent and cannot be used"
        )));
    }
    entry
        .check_covers(meta.header.size, meta.header.cluster_bits)
        .map_err(|mut e| {
            e.offset = Some(entry.bitmap_table_offset);
            Error::Format(e)
        })?;
    let tbytes = u64::from(entry.bitmap_table_size) * 8;
    let mut raw = vec![0u8; conv::mem_len(Structure::BitmapDirectory, tbytes)?];
    meta.gate
        .reader()
        .read(&mut raw, entry.bitmap_table_offset)?;
    let mut decoded = Vec::with_capacity(raw.len() / 8);
    for (k, word) in raw.chunks_exact(8).filter_map(|c| be_u64(c, 0)).enumerate() {
        let at = entry.bitmap_table_offset.saturating_add(k as u64 * 8);
        decoded.push(
            decode_bitmap_table_entry(word, meta.header.cluster_bits)
                .map_err(|_| table_err(at, name))?,
        );
    }
    Ok(read_bits(meta, &entry, &decoded)?.extents(offset, len, MAX_EXTENTS))
}

impl Meta {
    /// Whether work is due before the next guest write: autoclear bits
    /// this crate does not maintain to clear, or tracked bitmaps to flag
    /// `in_use`.
    pub(crate) fn first_write_pending(&self) -> bool {
        self.header.autoclear_features & !self.kept_autoclear() != 0
            || self.bitmaps.as_ref().is_some_and(Bitmaps::needs_mark)
    }

    /// The autoclear bits this handle keeps set across writes.
    pub(crate) fn kept_autoclear(&self) -> u64 {
        let bitmaps = if self.bitmaps.is_some() {
            AUTOCLEAR_BITMAPS
        } else {
            0
        };
        crate::format::consts::AUTOCLEAR_DATA_FILE_RAW | bitmaps
    }

    /// Flags the tracked bitmaps `in_use` on disk (QEMU's
    /// `update_ext_header_and_dir_in_place`); see the module docs.
    ///
    /// # Errors
    /// Overlap and I/O errors (the handle is then to be failed).
    pub(crate) fn mark_bitmaps_in_use(&mut self) -> Result<()> {
        let Some(mut bm) = self.bitmaps.take() else {
            return Ok(());
        };
        let r = self.mark_in_use_with(&mut bm);
        self.bitmaps = Some(bm);
        r
    }

    fn mark_in_use_with(&mut self, bm: &mut Bitmaps) -> Result<()> {
        if !bm.needs_mark() {
            return Ok(());
        }
        let mut entries = bm.entries.clone();
        for t in &bm.tracked {
            conv::get_mut(&mut entries, t.entry, "bitmap directory")?.flags |= BME_FLAG_IN_USE;
        }
        let buf = encode_bitmap_directory(&entries)?;
        if buf.len() as u64 != bm.dir_size {
            return Err(Error::Internal("bitmap directory changed size".into()));
        }
        self.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        self.write_autoclear_features()?;
        self.meta_write(&buf, bm.dir_offset, MetadataKind::BitmapDirectory)?;
        self.sync()?;
        self.header.autoclear_features |= AUTOCLEAR_BITMAPS;
        self.write_autoclear_features()?;
        bm.entries = entries;
        bm.marked = true;
        Ok(())
    }

    /// Stores the tracked bitmaps (QEMU's
    /// `qcow2_store_persistent_dirty_bitmaps`) when they changed or are
    /// flagged `in_use`; see the module docs for the order. The caller
    /// holds the metadata exclusively with no data I/O in flight.
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
        let changed = bm.set.changed.load(Ordering::Acquire);
        if bm.tracked.is_empty() || (!bm.marked && !changed) {
            return Ok(());
        }
        bm.set.changed.store(false, Ordering::Release);
        let cs = self.geom.cluster_size;
        let mut buf = vec![0u8; conv::cluster_bytes(&self.geom)];
        let mut entries = bm.entries.clone();
        let mut new_tables = Vec::with_capacity(bm.tracked.len());
        for (t, map) in bm.tracked.iter().zip(&bm.set.maps) {
            let nclusters = map.serialized_len().div_ceil(cs).max(1);
            let mut table = Vec::with_capacity(conv::usize_of(nclusters)?);
            for k in 0..nclusters {
                if !map.store_bytes(k.saturating_mul(cs), &mut buf) {
                    table.push(BitmapTableEntry::AllZeroes.encode());
                    continue;
                }
                let off = self.alloc_clusters(1)?;
                self.gate.check(off, cs, 0)?;
                self.gate.write(&buf, off, None)?;
                table.push(BitmapTableEntry::Data(off).encode());
            }
            let mut tbuf = vec![0u8; conv::mem_len(Structure::BitmapDirectory, nclusters * 8)?];
            for (chunk, e) in tbuf.chunks_exact_mut(8).zip(&table) {
                chunk.copy_from_slice(&e.to_be_bytes());
            }
            let toff = self.alloc_clusters(self.geom.clusters_for(tbuf.len() as u64))?;
            self.gate.check(toff, tbuf.len() as u64, 0)?;
            self.gate.write(&tbuf, toff, None)?;
            let e = conv::get_mut(&mut entries, t.entry, "bitmap directory")?;
            e.bitmap_table_offset = toff;
            e.bitmap_table_size = u32::try_from(nclusters)
                .map_err(|_| Error::Internal("bitmap table size".into()))?;
            e.flags = BME_FLAG_AUTO;
            new_tables.push(table);
        }
        let dbuf = encode_bitmap_directory(&entries)?;
        let dsize = dbuf.len() as u64;
        if dsize != bm.dir_size {
            return Err(Error::Internal("bitmap directory changed size".into()));
        }
        let doff = self.alloc_clusters(self.geom.clusters_for(dsize))?;
        // Refcounts of every new cluster, then the data, tables and the
        // directory, are durable before the header points at them.
        self.flush_refcounts()?;
        self.gate.check(doff, dsize, 0)?;
        self.meta_write(&dbuf, doff, MetadataKind::BitmapDirectory)?;
        self.sync()?;
        // The commit point: the directory offset (same size, same count).
        self.meta_write(
            &doff.to_be_bytes(),
            bm.ext_pos.saturating_add(16),
            MetadataKind::MainHeader,
        )?;
        self.sync()?;
        for ext in &mut self.header.extensions {
            if let HeaderExtension::Bitmaps(b) = ext {
                b.bitmap_directory_offset = doff;
            }
        }
        self.gate
            .checker_mut()
            .set_bitmap_directory(Some((doff, dsize)));
        // The old directory, tables and data clusters are unreferenced now.
        let (old_off, old_size) = (bm.dir_offset, bm.dir_size);
        self.free_range(old_off, old_size)?;
        for (t, new) in bm.tracked.iter_mut().zip(new_tables) {
            let old = std::mem::replace(&mut t.table, new);
            let old_entry = bm
                .entries
                .get(t.entry)
                .ok_or_else(|| Error::Internal("bitmap directory index".into()))?;
            for raw in &old {
                if let Ok(BitmapTableEntry::Data(off)) =
                    decode_bitmap_table_entry(*raw, self.geom.cluster_bits)
                {
                    self.free_range(off, cs)?;
                }
            }
            self.free_range(
                old_entry.bitmap_table_offset,
                u64::from(old_entry.bitmap_table_size) * 8,
            )?;
        }
        self.flush_refcounts()?;
        self.process_discards();
        bm.entries = entries;
        bm.dir_offset = doff;
        bm.marked = false;
        Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn set_range_covers_touched_granules_only() {
        let m = DirtyBitmap::new(16, 10 << 16).unwrap();
        m.set_range(65535, 2);
        assert!(m.get(0) && m.get(1) && !m.get(2));
        m.set_range(9 << 16, 1 << 20); // clamped to the disk
        assert!(m.get(9));
        let big = DirtyBitmap::new(9, 1 << 20).unwrap();
        big.set_range(512 * 3, 512 * 130);
        assert!(!big.get(2) && big.get(3) && big.get(132) && !big.get(133));
    }

    #[test]
    fn extents_merge_and_clip() {
        let m = DirtyBitmap::new(12, 1 << 20).unwrap();
        m.set_range(4096, 8192); // granules 1, 2
        m.set_range(64 * 4096, 1); // granule 64 (next word)
        m.set_range((1 << 20) - 1, 1); // the last granule
        assert_eq!(
            m.extents(0, 1 << 20, 10),
            vec![(4096, 8192), (64 * 4096, 4096), ((1 << 20) - 4096, 4096)]
        );
        assert_eq!(m.extents(5000, 4000, 10), vec![(5000, 4000)]);
        assert_eq!(m.extents(0, 1 << 20, 1), vec![(4096, 8192)]);
        assert!(m.extents(3 * 4096, 60 * 4096, 10).is_empty());
    }

    #[test]
    fn serialization_round_trips_in_qemu_byte_order() {
        let m = DirtyBitmap::new(9, 512 * 100).unwrap();
        m.set_bits(0, 1);
        m.set_bits(9, 10);
        let mut out = [0u8; 16];
        assert!(m.store_bytes(0, &mut out));
        assert_eq!(out[0], 1);
        assert_eq!(out[1], 2);
        let n = DirtyBitmap::new(9, 512 * 100).unwrap();
        out[15] = 0xff; // past the disk's 100 bits: ignored
        n.load_bytes(0, &out);
        assert!(n.get(0) && n.get(9) && !n.get(1) && !n.get(120));
    }

    #[test]
    fn finds_the_extension_payload() {
        let mut head = vec![0u8; 512];
        head[112..116].copy_from_slice(&0x6803_f857u32.to_be_bytes());
        head[116..120].copy_from_slice(&5u32.to_be_bytes());
        head[128..132].copy_from_slice(&EXT_BITMAPS.to_be_bytes());
        head[132..136].copy_from_slice(&24u32.to_be_bytes());
        let mut h = Header::new_v3(16, 1 << 20);
        h.header_length = 112;
        assert_eq!(bitmaps_ext_pos(&head, &h), Some(136));
    }
}
