//! Managing the bitmaps of a read-write handle, with QEMU's checks and
//! their order (`qmp_block_dirty_bitmap_add` and siblings,
//! `qcow2_co_can_store_new_dirty_bitmap`, `bdrv_dirty_bitmap_check`,
//! `bdrv_merge_dirty_bitmap`, `qcow2_truncate_bitmaps_check`). Each call
//! changes memory only; the store at close writes the result (see the module
//! docs of [`super`]). The caller holds the metadata exclusively with no
//! request in flight.

use super::super::Meta;
use super::{bits_bytes, Bitmaps, DirtyBitmap, Entry, MAX_BITS_BYTES};
use crate::error::{BitmapError, Error, NotPersistent, Result};
use crate::format::bitmap::{
    BITMAP_DIR_ENTRY_HEADER_SIZE, BME_MAX_GRANULARITY_BITS, BME_MAX_NAME_SIZE, BME_MAX_PHYS_SIZE,
    BME_MAX_TABLE_SIZE, BME_MIN_GRANULARITY_BITS,
};
use crate::format::consts::MAX_BITMAP_DIRECTORY_BYTES;

/// Most bitmaps an image may hold (QEMU's `QCOW2_MAX_BITMAPS`).
const MAX_BITMAPS: usize = 65535;

/// QEMU's default granularity (`bdrv_get_default_bitmap_granularity`): the
/// cluster size, at least 4 KiB and at most 64 KiB.
fn default_granularity_bits(cluster_bits: u32) -> u8 {
    // 12..=16 fits in a u8.
    u8::try_from(cluster_bits.clamp(12, 16)).unwrap_or(16)
}

/// The size of a directory entry for a bitmap named `name`.
fn entry_size(name: &str) -> u64 {
    (BITMAP_DIR_ENTRY_HEADER_SIZE + name.len() as u64).next_multiple_of(8)
}

fn not_persistent(name: &str, reason: NotPersistent) -> Error {
    Error::Bitmap(BitmapError::NotPersistent {
        name: name.to_owned(),
        reason,
    })
}

impl Meta {
    /// The bitmaps of a read-write v3 handle; a v2 image has none.
    fn bitmaps_or_not_found(&mut self, name: &str) -> Result<&mut Bitmaps> {
        self.bitmaps.as_mut().ok_or_else(|| {
            Error::Bitmap(BitmapError::NotFound {
                name: name.to_owned(),
            })
        })
    }

    /// The entry `name`, refused when it is inconsistent.
    fn usable_entry(&mut self, name: &str) -> Result<&mut Entry> {
        let b = self.bitmaps_or_not_found(name)?;
        let i = b.position(name)?;
        let e = b
            .list
            .get_mut(i)
            .ok_or_else(|| Error::Internal("bitmap index".into()))?;
        e.usable()?;
        Ok(e)
    }

    /// Adds an enabled, clear bitmap `name` of `granularity` bytes per bit
    /// (QEMU's default for `None`).
    ///
    /// # Errors
    /// [`BitmapError::EmptyName`], [`BitmapError::Granularity`],
    /// [`BitmapError::NotPersistent`] (v2 image, bitmap too large for the
    /// granularity, name over 1023 bytes, too many bitmaps, directory full),
    /// [`BitmapError::Exists`], in that order (QEMU's).
    pub(crate) fn add_bitmap(&mut self, name: &str, granularity: Option<u64>) -> Result<()> {
        if name.is_empty() {
            return Err(Error::Bitmap(BitmapError::EmptyName));
        }
        let gbits = match granularity {
            None => default_granularity_bits(self.geom.cluster_bits),
            Some(g) => {
                let bits = u8::try_from(g.trailing_zeros()).unwrap_or(u8::MAX);
                if !g.is_power_of_two()
                    || !(BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS).contains(&bits)
                {
                    return Err(Error::Bitmap(BitmapError::Granularity { granularity: g }));
                }
                bits
            }
        };
        let size = self.header.size;
        let cluster_size = self.geom.cluster_size;
        let Some(b) = self.bitmaps.as_mut() else {
            return Err(not_persistent(name, NotPersistent::V2Image));
        };
        let bytes = size.div_ceil(1u64 << gbits).div_ceil(8);
        if bytes > BME_MAX_PHYS_SIZE
            || bytes > u64::from(BME_MAX_TABLE_SIZE).saturating_mul(cluster_size)
        {
            return Err(not_persistent(name, NotPersistent::TooLarge));
        }
        if name.len() > usize::from(BME_MAX_NAME_SIZE) {
            return Err(not_persistent(name, NotPersistent::NameTooLong));
        }
        if b.list.len() >= MAX_BITMAPS {
            return Err(not_persistent(name, NotPersistent::TooMany));
        }
        let dir: u64 = b.list.iter().map(|e| entry_size(&e.name)).sum();
        if dir.saturating_add(entry_size(name)) > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(not_persistent(name, NotPersistent::DirectoryFull));
        }
        if b.list.iter().any(|e| e.name == name) {
            return Err(Error::Bitmap(BitmapError::Exists {
                name: name.to_owned(),
            }));
        }
        let held: u64 = b
            .list
            .iter()
            .filter(|e| e.bits.is_some())
            .map(|e| bits_bytes(size, e.granularity_bits))
            .sum();
        let total = held.saturating_add(bytes);
        if total > MAX_BITS_BYTES {
            return Err(Error::TooLarge(crate::error::Limit::Memory {
                what: crate::format::Structure::BitmapDirectory,
                bytes: total,
            }));
        }
        let bits = DirtyBitmap::new(gbits, size)?;
        b.list.push(Entry {
            name: name.to_owned(),
            granularity_bits: gbits,
            enabled: true,
            bits: Some(bits),
            disk: None,
            table: Vec::new(),
        });
        b.changed = true;
        Ok(())
    }

    /// Removes bitmap `name` (an inconsistent one too); its clusters are
    /// freed by the next store.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`].
    pub(crate) fn remove_bitmap(&mut self, name: &str) -> Result<()> {
        let b = self.bitmaps_or_not_found(name)?;
        let i = b.position(name)?;
        let e = b.list.remove(i);
        if e.disk.is_some() {
            b.removed.push(e);
        }
        b.changed = true;
        Ok(())
    }

    /// Clears every bit of bitmap `name`.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`], [`BitmapError::Inconsistent`].
    pub(crate) fn clear_bitmap(&mut self, name: &str) -> Result<()> {
        self.usable_entry(name)?.usable()?.clear();
        self.mark_changed();
        Ok(())
    }

    /// Enables (`true`) or disables bitmap `name`.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`], [`BitmapError::Inconsistent`].
    pub(crate) fn set_bitmap_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        self.usable_entry(name)?.enabled = enabled;
        self.mark_changed();
        Ok(())
    }

    /// The checks QEMU makes on the target of a merge before it looks at the
    /// sources.
    ///
    /// # Errors
    /// [`BitmapError::NotFound`], [`BitmapError::Inconsistent`].
    pub(crate) fn check_merge_target(&mut self, name: &str) -> Result<()> {
        self.usable_entry(name).map(drop)
    }

    /// ORs `src` (the bits of a bitmap of this or another image) into bitmap
    /// `target`.
    ///
    /// # Errors
    /// As [`Meta::check_merge_target`]; [`BitmapError::SizeMismatch`] when
    /// `src` covers a disk of another size.
    pub(crate) fn merge_bitmap(&mut self, target: &str, src: &DirtyBitmap) -> Result<()> {
        let size = self.header.size;
        let dst = self.usable_entry(target)?.usable()?;
        if src.disk_size() != size {
            return Err(Error::Bitmap(BitmapError::SizeMismatch {
                destination: size,
                source: src.disk_size(),
            }));
        }
        dst.merge_from(src);
        self.mark_changed();
        Ok(())
    }

    fn mark_changed(&mut self) {
        if let Some(b) = self.bitmaps.as_mut() {
            b.changed = true;
        }
    }

    /// Before a resize (QEMU's `qcow2_truncate_bitmaps_check`): refuses an
    /// image with an inconsistent bitmap, and flags the consistent bitmaps
    /// on disk `in_use` (their tables would no longer cover the disk).
    ///
    /// # Errors
    /// [`BitmapError::Inconsistent`]; the errors of
    /// [`Meta::mark_bitmaps_in_use`].
    pub(crate) fn prepare_bitmaps_resize(&mut self) -> Result<()> {
        let Some(b) = &self.bitmaps else {
            return Ok(());
        };
        if let Some(e) = b.list.iter().find(|e| e.bits.is_none()) {
            return Err(Error::Bitmap(BitmapError::Inconsistent {
                name: e.name.clone(),
            }));
        }
        self.mark_bitmaps_in_use()
    }

    /// After a resize to `size` bytes: every bitmap covers the new disk
    /// (QEMU's `bdrv_dirty_bitmap_truncate`: bits past the end dropped, new
    /// ones clear). The disk has its new size already: a bitmap whose new
    /// bits cannot be allocated becomes inconsistent (it stays flagged
    /// `in_use` on disk; one not stored yet is dropped) rather than stored
    /// for the old size.
    pub(crate) fn resize_bitmaps(&mut self, size: u64) {
        let Some(b) = self.bitmaps.as_mut() else {
            return;
        };
        b.list.retain_mut(|e| {
            let Some(bits) = &e.bits else {
                return true;
            };
            if bits.disk_size() != size {
                e.bits = bits.resized(size).ok();
            }
            e.bits.is_some() || e.disk.is_some()
        });
        b.changed |= !b.list.is_empty();
    }
}
