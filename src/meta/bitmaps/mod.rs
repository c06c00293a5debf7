//! Persistent dirty bitmaps (QEMU's `qcow2-bitmap.c`).
//!
//! **Open.** Every open but the checker's validates the bitmap directory as
//! QEMU's `qcow2_load_dirty_bitmaps` does (read-only opens too, as
//! `qemu-img info` does): the directory must decode and satisfy QEMU's
//! constraints, names must be unique, and the table of every consistent
//! bitmap must hold valid entries; otherwise the open fails with QEMU's
//! message (`Error::Format` naming the bitmap directory and the offset of the
//! offending structure). A read-write open of a v3 image keeps the directory
//! in memory ([`Bitmaps`]): each consistent bitmap with its bits
//! ([`DirtyBitmap`]), each bitmap found `in_use` (left by a crash: QEMU calls
//! it inconsistent, its bits are lost) as a name only, carried over verbatim
//! until it is removed.
//!
//! **Writes.** Every guest write, write-zeroes and discard sets the granules
//! it touches in every enabled consistent bitmap ([`Meta::note_dirty`]), also
//! when it changes nothing (as QEMU does). The bits are set while the request
//! holds the metadata lock (shared or exclusive) for the step that issues its
//! data write, before the data reaches the file; the management calls and
//! the store hold the lock exclusively with no request in flight, so a bit
//! is never lost between them and a write (see `image/write.rs`).
//!
//! **On disk**, in the crash-safe order:
//! * Before the first guest write, and before a resize
//!   ([`Meta::mark_bitmaps_in_use`], QEMU's
//!   `update_ext_header_and_dir_in_place`, which QEMU runs at every
//!   read-write open): the autoclear bit is cleared and synced, the directory
//!   rewritten in place with `in_use` set on every consistent bitmap and
//!   synced, the autoclear bit set again and synced. A crash in between
//!   leaves the bit clear: QEMU then drops the bitmaps, it never uses them.
//!   A crash after it leaves them `in_use`: inconsistent, never silently
//!   wrong.
//! * At close ([`Meta::store_bitmaps`], QEMU's
//!   `qcow2_store_persistent_dirty_bitmaps`), when anything changed: new
//!   data clusters and new tables for every consistent bitmap, their
//!   refcounts made durable, a new directory (`in_use` cleared, `auto` for
//!   the enabled ones), synced; then the one commit write: the 24-byte
//!   payload of the bitmaps extension, or the whole header when the
//!   extension appears or goes (first bitmap added, last removed: the
//!   autoclear bit follows, as in QEMU), synced; only then are the old
//!   directory, tables and data clusters (and those of removed bitmaps)
//!   freed. A crash before the commit point leaves the old directory.
//! * Management ([`Meta::add_bitmap`] and the others in `manage.rs`) changes
//!   only memory; the change reaches the file with the store at close, as
//!   with `qemu-img bitmap`. A crash before it leaves the old directory
//!   (whose bitmaps are `in_use` if a write was made).

mod bits;
mod manage;
mod store;

pub(crate) use bits::DirtyBitmap;

use super::{conv, Meta};
use crate::error::{BitmapError, Error, Result};
use crate::format::bitmap::{
    decode_bitmap_directory, decode_bitmap_table_entry, BitmapDirEntry, BitmapTableEntry,
};
use crate::format::consts::{AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use crate::format::header::Header;
use crate::format::{be_u32, be_u64, FormatError, Structure};
use std::sync::atomic::{AtomicBool, Ordering};

/// Most extents one [`dirty_extents`] call returns.
pub(crate) const MAX_EXTENTS: usize = 1 << 20;

/// Table entries read per batch when a table is only validated.
const TABLE_BATCH: u64 = 1 << 17;

/// Most bytes of bitmap tables an open reads (all consistent bitmaps
/// together). QEMU has no bound; a real image's tables are tiny (a 1 TiB
/// disk at 64 KiB granularity and 64 KiB clusters needs 256 bytes), but a
/// crafted directory can name 65535 tables of 8 MiB each.
pub(crate) const MAX_TABLE_BYTES: u64 = 256 << 20;

/// Most bytes of bitmap bits a read-write handle holds (all bitmaps
/// together; one bitmap holds at most 512 MiB by QEMU's constraints): two
/// 64 TiB disks' worth at 64 KiB granularity would need 256 MiB.
pub(crate) const MAX_BITS_BYTES: u64 = 1 << 30;

/// The bytes of bits a bitmap of `1 << gbits` granularity over a disk of
/// `size` bytes needs.
fn bits_bytes(size: u64, gbits: u8) -> u64 {
    size.div_ceil(1u64 << gbits.min(63)).div_ceil(8)
}

/// Refuses a directory whose consistent bitmaps' tables (and, for a
/// read-write handle, bits) exceed this crate's bounds.
fn check_totals(entries: &[BitmapDirEntry], size: u64, bits: bool) -> Result<()> {
    let consistent = entries.iter().filter(|e| !e.in_use());
    let tables: u64 = consistent
        .clone()
        .map(|e| u64::from(e.bitmap_table_size) * 8)
        .sum();
    let memory: u64 = consistent
        .map(|e| bits_bytes(size, e.granularity_bits))
        .sum();
    for (total, max) in [
        (tables, MAX_TABLE_BYTES),
        (if bits { memory } else { 0 }, MAX_BITS_BYTES),
    ] {
        if total > max {
            return Err(Error::TooLarge(crate::error::Limit::Memory {
                what: Structure::BitmapDirectory,
                bytes: total,
            }));
        }
    }
    Ok(())
}

/// The bitmaps header extension as on disk (where its payload sits in the
/// header is looked up when it is rewritten: a header rewrite, by `amend`
/// for instance, may move it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExtOnDisk {
    dir_offset: u64,
    dir_size: u64,
}

/// One bitmap of a read-write handle.
#[derive(Debug)]
pub(crate) struct Entry {
    name: String,
    granularity_bits: u8,
    /// Enabled (`auto`): records guest writes.
    enabled: bool,
    /// The bits; `None` for an inconsistent bitmap (found `in_use`).
    bits: Option<DirtyBitmap>,
    /// Its entry in the directory on disk; `None` for a bitmap added by
    /// this handle and not stored yet.
    disk: Option<BitmapDirEntry>,
    /// Its decoded table on disk (what to free once it is replaced); empty
    /// for an inconsistent or new bitmap.
    table: Vec<BitmapTableEntry>,
}

impl Entry {
    /// The bits, or QEMU's refusal of an inconsistent bitmap.
    fn usable(&self) -> Result<&DirtyBitmap> {
        self.bits.as_ref().ok_or_else(|| {
            Error::Bitmap(BitmapError::Inconsistent {
                name: self.name.clone(),
            })
        })
    }
}

/// The bitmap directory of a read-write v3 handle: the bitmaps in directory
/// order (new ones at the end) and what the file holds.
#[derive(Debug)]
pub(crate) struct Bitmaps {
    /// The bitmaps extension on disk, when present and valid (autoclear bit
    /// 0 set).
    ext: Option<ExtOnDisk>,
    /// An extension is present but stale (autoclear bit 0 clear): QEMU
    /// ignores its bitmaps; the next store replaces it.
    stale: bool,
    /// The directory as on disk.
    disk_entries: Vec<BitmapDirEntry>,
    /// The bitmaps of this handle.
    list: Vec<Entry>,
    /// Bitmaps removed by this handle that are still on disk: freed after
    /// the next store.
    removed: Vec<Entry>,
    /// Every consistent bitmap on disk is flagged `in_use`.
    marked: bool,
    /// A management call or a resize changed the bitmaps since the last
    /// store.
    changed: bool,
    /// A request set bits since the last store (set under the shared lock).
    touched: AtomicBool,
}

impl Bitmaps {
    /// Whether the consistent bitmaps on disk still have to be flagged
    /// `in_use` before a guest write.
    pub(crate) fn needs_mark(&self) -> bool {
        !self.marked && self.disk_entries.iter().any(|e| !e.in_use())
    }

    /// Sets the granules `[offset, offset + len)` touches in every enabled
    /// consistent bitmap.
    fn note(&self, offset: u64, len: u64) {
        let mut any = false;
        for e in &self.list {
            if let (true, Some(bits)) = (e.enabled, &e.bits) {
                bits.set_range(offset, len);
                any = true;
            }
        }
        // Read first: the flag is set once per store, not once per request.
        if any && !self.touched.load(Ordering::Relaxed) {
            self.touched.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the next store has anything to write.
    fn store_due(&self) -> bool {
        self.marked || self.changed || self.touched.load(Ordering::Relaxed)
    }

    fn position(&self, name: &str) -> Result<usize> {
        self.list
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| {
                Error::Bitmap(BitmapError::NotFound {
                    name: name.to_owned(),
                })
            })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        let i = self.position(name)?;
        self.list
            .get(i)
            .ok_or_else(|| Error::Internal("bitmap index".into()))
    }
}

/// A persistent dirty bitmap as [`crate::Image::bitmaps`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BitmapStatus {
    /// The bitmap's name.
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Records guest writes (the `auto` flag).
    pub enabled: bool,
    /// Flagged `in_use` when the image was opened (not stored cleanly):
    /// its bits are lost and every use but removal is refused.
    pub inconsistent: bool,
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

/// Reads and checks the bitmap directory (QEMU's `bitmap_list_load` and the
/// name checks of `qcow2_load_dirty_bitmaps`): `None` when QEMU sees no
/// bitmaps (autoclear bit 0 clear, no extension, or none in it).
fn read_directory(meta: &Meta) -> Result<Option<(ExtOnDisk, Vec<BitmapDirEntry>)>> {
    let h = &meta.header;
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let Some(ext) = h.bitmaps().copied().filter(|e| e.nb_bitmaps > 0) else {
        return Ok(None);
    };
    let reader = meta.gate.reader();
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
    for bm in &entries {
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
    }
    Ok(Some((
        ExtOnDisk {
            dir_offset: ext.bitmap_directory_offset,
            dir_size: ext.bitmap_directory_size,
        },
        entries,
    )))
}

/// Reads `bm`'s table `TABLE_BATCH` entries at a time, checking every entry
/// (QEMU's `bitmap_table_load`), and hands each batch to `f`.
fn for_table_batches(
    meta: &Meta,
    bm: &BitmapDirEntry,
    mut f: impl FnMut(&[BitmapTableEntry]) -> Result<()>,
) -> Result<()> {
    let total = u64::from(bm.bitmap_table_size);
    let mut raw = Vec::new();
    let mut decoded = Vec::new();
    let mut k = 0u64;
    while k < total {
        let n = (total - k).min(TABLE_BATCH);
        raw.resize(conv::mem_len(Structure::BitmapDirectory, n * 8)?, 0);
        let at = bm.bitmap_table_offset.saturating_add(k * 8);
        meta.gate.reader().read(&mut raw, at)?;
        decoded.clear();
        for (i, word) in raw.chunks_exact(8).filter_map(|c| be_u64(c, 0)).enumerate() {
            let d = decode_bitmap_table_entry(word, meta.header.cluster_bits)
                .map_err(|_| table_err(at.saturating_add(i as u64 * 8), &bm.name))?;
            decoded.push(d);
        }
        f(&decoded)?;
        k += n;
    }
    Ok(())
}

/// `bm`'s whole decoded table (at most 2^20 entries: 512 MiB of bitmap data
/// in 512-byte clusters, QEMU's limit the directory decoder enforced).
fn read_table(meta: &Meta, bm: &BitmapDirEntry) -> Result<Vec<BitmapTableEntry>> {
    let mut table = Vec::new();
    for_table_batches(meta, bm, |batch| {
        table.extend_from_slice(batch);
        Ok(())
    })?;
    Ok(table)
}

/// The bits of the bitmap `bm` whose decoded table is `table`.
fn read_bits(meta: &Meta, bm: &BitmapDirEntry, table: &[BitmapTableEntry]) -> Result<DirtyBitmap> {
    let cs = meta.geom.cluster_size;
    let map = DirtyBitmap::new(bm.granularity_bits, meta.header.size)?;
    let mut buf = vec![0u8; conv::cluster_bytes(&meta.geom)];
    for (k, d) in table.iter().enumerate() {
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

/// Validates the bitmaps of an image opened without write access, as
/// QEMU's open does (see the module docs); nothing is kept.
///
/// # Errors
/// `Error::Format` naming the bitmap directory and the offset of the
/// offending structure, with QEMU's message; I/O errors;
/// `Error::TooLarge` beyond [`MAX_TABLE_BYTES`] of tables.
pub(crate) fn validate_bitmaps(meta: &Meta) -> Result<()> {
    let Some((_, entries)) = read_directory(meta)? else {
        return Ok(());
    };
    check_totals(&entries, meta.header.size, false)?;
    for bm in entries.iter().filter(|e| !e.in_use()) {
        for_table_batches(meta, bm, |_| Ok(()))?;
    }
    Ok(())
}

/// Loads the bitmaps of an image opened read-write (QEMU's
/// `qcow2_load_dirty_bitmaps`): `None` for a v2 image (which cannot hold
/// bitmaps), else the directory with the bits of every consistent bitmap.
///
/// # Errors
/// As [`validate_bitmaps`]; `Error::TooLarge` beyond [`MAX_BITS_BYTES`] of
/// bits or when a bitmap does not fit in memory.
pub(crate) fn load_bitmaps(meta: &Meta) -> Result<Option<Bitmaps>> {
    let h = &meta.header;
    if h.version < 3 {
        return Ok(None);
    }
    let stale = h.autoclear_features & AUTOCLEAR_BITMAPS == 0 && h.bitmaps().is_some();
    let (ext, disk_entries) = match read_directory(meta)? {
        Some((ext, entries)) => (Some(ext), entries),
        None => (None, Vec::new()),
    };
    check_totals(&disk_entries, h.size, true)?;
    let mut list = Vec::with_capacity(disk_entries.len());
    for bm in &disk_entries {
        let (bits, table) = if bm.in_use() {
            (None, Vec::new())
        } else {
            let table = read_table(meta, bm)?;
            (Some(read_bits(meta, bm, &table)?), table)
        };
        list.push(Entry {
            name: bm.name.clone(),
            granularity_bits: bm.granularity_bits,
            enabled: bm.auto(),
            bits,
            disk: Some(bm.clone()),
            table,
        });
    }
    Ok(Some(Bitmaps {
        ext,
        stale,
        disk_entries,
        list,
        removed: Vec::new(),
        marked: false,
        // QEMU drops a stale extension at a read-write open; ours goes with
        // the store at close.
        changed: stale,
        touched: AtomicBool::new(false),
    }))
}

/// The directory entry named `name` as on disk (a read-only handle, or a
/// read-write handle of a v2 image).
fn disk_entry(meta: &Meta, name: &str) -> Result<BitmapDirEntry> {
    read_directory(meta)?
        .and_then(|(_, entries)| entries.into_iter().find(|e| e.name == name))
        .ok_or_else(|| {
            Error::Bitmap(BitmapError::NotFound {
                name: name.to_owned(),
            })
        })
}

/// The bits of bitmap `name` read from the image.
fn disk_bits(meta: &Meta, name: &str) -> Result<DirtyBitmap> {
    let entry = disk_entry(meta, name)?;
    if entry.in_use() {
        return Err(Error::Bitmap(BitmapError::Inconsistent {
            name: name.to_owned(),
        }));
    }
    let table = read_table(meta, &entry)?;
    read_bits(meta, &entry, &table)
}

/// The dirty guest extents of bitmap `name` within `[offset, offset +
/// len)`: from memory on a read-write handle, else read from the image.
///
/// # Errors
/// [`BitmapError::NotFound`], [`BitmapError::Inconsistent`]; the errors of
/// reading the directory and table (`Error::Format` naming the offset), I/O
/// errors.
pub(crate) fn dirty_extents(
    meta: &Meta,
    name: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>> {
    if let Some(b) = &meta.bitmaps {
        return Ok(b.entry(name)?.usable()?.extents(offset, len, MAX_EXTENTS));
    }
    Ok(disk_bits(meta, name)?.extents(offset, len, MAX_EXTENTS))
}

/// A copy of the bits of bitmap `name` (the source of a merge).
///
/// # Errors
/// As [`dirty_extents`].
pub(crate) fn bits_of(meta: &Meta, name: &str) -> Result<DirtyBitmap> {
    if let Some(b) = &meta.bitmaps {
        return b.entry(name)?.usable()?.try_clone();
    }
    disk_bits(meta, name)
}

/// The bitmaps of the handle, in directory order.
///
/// # Errors
/// The errors of reading the directory (read-only handles).
pub(crate) fn list_bitmaps(meta: &Meta) -> Result<Vec<BitmapStatus>> {
    let status = |name: &str, g: u8, enabled: bool, inconsistent: bool| BitmapStatus {
        name: name.to_owned(),
        granularity: 1u64 << g.min(63),
        enabled,
        inconsistent,
    };
    if let Some(b) = &meta.bitmaps {
        return Ok(b
            .list
            .iter()
            .map(|e| status(&e.name, e.granularity_bits, e.enabled, e.bits.is_none()))
            .collect());
    }
    Ok(read_directory(meta)?
        .map(|(_, entries)| entries)
        .unwrap_or_default()
        .iter()
        .map(|e| status(&e.name, e.granularity_bits, e.auto(), e.in_use()))
        .collect())
}

impl Meta {
    /// Marks guest bytes `[offset, offset + len)` dirty in every enabled
    /// consistent bitmap. Called with the metadata lock held (shared or
    /// exclusive) by the step of a request that issues its write, before the
    /// data reaches the file.
    pub(crate) fn note_dirty(&self, offset: u64, len: u64) {
        if let Some(b) = &self.bitmaps {
            b.note(offset, len);
        }
    }

    /// Whether closing has bitmaps to store (see [`Meta::store_bitmaps`]).
    pub(crate) fn bitmaps_store_due(&self) -> bool {
        self.bitmaps.as_ref().is_some_and(Bitmaps::store_due)
    }

    /// Whether the handle has persistent bitmaps (of any kind).
    pub(crate) fn has_bitmaps(&self) -> bool {
        self.bitmaps.as_ref().is_some_and(|b| !b.list.is_empty())
    }

    /// Whether work is due before the next guest write: autoclear bits
    /// this crate does not maintain to clear, or consistent bitmaps on disk
    /// to flag `in_use`.
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

    /// Flags every consistent bitmap on disk `in_use` (QEMU's
    /// `update_ext_header_and_dir_in_place`); see the module docs. Nothing
    /// to do when they are flagged already or there are none.
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
            // Flagged already, or nothing on disk to flag (then nothing to
            // store either).
            return Ok(());
        }
        let Some(ext) = bm.ext else {
            return Err(Error::Internal(
                "bitmaps on disk without an extension".into(),
            ));
        };
        let mut entries = bm.disk_entries.clone();
        for e in &mut entries {
            e.flags |= crate::format::bitmap::BME_FLAG_IN_USE;
        }
        let buf = crate::format::bitmap::encode_bitmap_directory(&entries)?;
        if buf.len() as u64 != ext.dir_size {
            return Err(Error::Internal("bitmap directory changed size".into()));
        }
        self.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        self.write_autoclear_features()?;
        self.meta_write(
            &buf,
            ext.dir_offset,
            crate::types::MetadataKind::BitmapDirectory,
        )?;
        self.sync()?;
        self.header.autoclear_features |= AUTOCLEAR_BITMAPS;
        self.write_autoclear_features()?;
        bm.disk_entries = entries;
        bm.marked = true;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn bounds_the_tables_and_bits_of_a_directory() {
        let entry = |name: &str, table: u32, g: u8, flags: u32| BitmapDirEntry {
            bitmap_table_offset: 0x10000,
            bitmap_table_size: table,
            flags,
            bitmap_type: 1,
            granularity_bits: g,
            name: name.into(),
            extra_data: Vec::new(),
        };
        // 32 tables of 8 MiB: at the limit; one more is refused, unless it
        // is in_use (its table is never read).
        let mut v: Vec<_> = (0..32)
            .map(|i| entry(&format!("b{i}"), 1 << 20, 16, 2))
            .collect();
        assert!(check_totals(&v, 1 << 30, false).is_ok());
        v.push(entry("in-use", 1 << 20, 16, 3));
        assert!(check_totals(&v, 1 << 30, false).is_ok());
        v.push(entry("one-more", 1, 16, 2));
        assert!(matches!(
            check_totals(&v, 1 << 30, false),
            Err(Error::TooLarge(crate::error::Limit::Memory { .. }))
        ));
        // Bits: three 512 MiB bitmaps (2 TiB at 512 B) exceed 1 GiB.
        let v: Vec<_> = (0..3).map(|i| entry(&format!("b{i}"), 1, 9, 0)).collect();
        assert!(check_totals(&v[..2], 2 << 40, true).is_ok());
        assert!(check_totals(&v, 2 << 40, true).is_err());
        assert!(check_totals(&v, 2 << 40, false).is_ok());
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
