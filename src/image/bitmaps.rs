//! Persistent dirty bitmaps: managing them (QEMU's `block-dirty-bitmap-*`
//! commands, what `qemu-img bitmap` does) and querying them (what an
//! incremental backup reads). See `meta::bitmaps` for how they are kept and
//! stored.
//!
//! Management calls change the handle's bitmaps in memory; they reach the
//! file when the image is closed ([`Image::close`] / [`Image::shutdown`]),
//! crash-safely, as with QEMU. They wait until no request is in flight, so
//! every write is recorded entirely before or entirely after the change:
//! a write that returned before [`Image::clear_bitmap`] is not in the
//! cleared bitmap, one that starts after it is.

use super::*;
use crate::meta::bitmaps::DirtyBitmap;

impl Image {
    /// The persistent dirty bitmaps, in directory order: on a read-write
    /// handle as this handle has them (changes not stored yet included), on
    /// a read-only one as stored in the image.
    ///
    /// # Errors
    /// The errors of reading the bitmap directory; `Error::Closed`,
    /// `Error::MediumGone` and the other refusals of a disabled handle.
    pub fn bitmaps(&self) -> Result<Vec<BitmapStatus>> {
        let meta = self.lock_shared()?;
        crate::meta::bitmaps::list_bitmaps(&meta)
    }

    /// Runs the management step `f` with the metadata held exclusively and
    /// no request in flight (allocations linked, in-place data writes done).
    fn manage_bitmaps<T>(&self, f: impl FnOnce(&mut Meta) -> Result<T>) -> Result<T> {
        self.writable()?;
        let mut meta = self.lock_idle()?;
        let _barrier = self
            .io_barrier
            .write()
            .map_err(|_| Error::PreviousIoFailed)?;
        f(&mut meta)
    }

    /// Adds an enabled, clear persistent bitmap `name` recording guest
    /// writes at `granularity` bytes per bit (a power of two from 512 B to
    /// 2 GiB; `None`: QEMU's default, the cluster size within 4 KiB..64 KiB).
    /// To add a disabled one, disable it next (as `qemu-img bitmap --add
    /// --disable` does).
    ///
    /// ```
    /// use qcow2kit::{CreateOptions, Image, OpenOptions, storage::MemStorage};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 1 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.add_bitmap("backup", Some(4096))?;
    /// img.write_at(&[1; 100], 5000)?;
    /// assert_eq!(img.dirty_extents("backup", 0, 1 << 20)?, vec![(4096, 4096)]);
    /// assert_eq!(
    ///     img.add_bitmap("backup", None).unwrap_err().to_string(),
    ///     "Bitmap already exists: backup"
    /// );
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::ReadOnly`; [`Error::Bitmap`] with, in QEMU's order,
    /// [`BitmapError::EmptyName`], [`BitmapError::Granularity`],
    /// [`BitmapError::NotPersistent`] (a v2 image, a bitmap over 512 MiB at
    /// this granularity, a name over 1023 bytes, 65535 bitmaps already, a
    /// full directory), [`BitmapError::Exists`] (also for an inconsistent
    /// bitmap of that name).
    ///
    /// [`BitmapError::EmptyName`]: crate::error::BitmapError::EmptyName
    /// [`BitmapError::Granularity`]: crate::error::BitmapError::Granularity
    /// [`BitmapError::NotPersistent`]: crate::error::BitmapError::NotPersistent
    /// [`BitmapError::Exists`]: crate::error::BitmapError::Exists
    pub fn add_bitmap(&self, name: &str, granularity: Option<u64>) -> Result<()> {
        self.manage_bitmaps(|m| m.add_bitmap(name, granularity))
    }

    /// Removes persistent bitmap `name`, an inconsistent one too (the only
    /// thing an inconsistent bitmap is good for). Its clusters are freed
    /// when the removal is stored.
    ///
    /// # Errors
    /// `Error::ReadOnly`; [`BitmapError::NotFound`].
    ///
    /// [`BitmapError::NotFound`]: crate::error::BitmapError::NotFound
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.manage_bitmaps(|m| m.remove_bitmap(name))
    }

    /// Clears every bit of persistent bitmap `name` (the last step of an
    /// incremental backup: what it copied is clean again).
    ///
    /// # Errors
    /// `Error::ReadOnly`; [`BitmapError::NotFound`],
    /// [`BitmapError::Inconsistent`] (`Bitmap 'NAME' is inconsistent and
    /// cannot be used`: only removing it works).
    ///
    /// [`BitmapError::NotFound`]: crate::error::BitmapError::NotFound
    /// [`BitmapError::Inconsistent`]: crate::error::BitmapError::Inconsistent
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.manage_bitmaps(|m| m.clear_bitmap(name))
    }

    /// Enables persistent bitmap `name`: it records guest writes from now on.
    ///
    /// # Errors
    /// As [`Image::clear_bitmap`].
    pub fn enable_bitmap(&self, name: &str) -> Result<()> {
        self.manage_bitmaps(|m| m.set_bitmap_enabled(name, true))
    }

    /// Disables persistent bitmap `name`: its bits stay as they are, guest
    /// writes are no longer recorded.
    ///
    /// # Errors
    /// As [`Image::clear_bitmap`].
    pub fn disable_bitmap(&self, name: &str) -> Result<()> {
        self.manage_bitmaps(|m| m.set_bitmap_enabled(name, false))
    }

    /// ORs the bits of bitmap `source` into bitmap `target`, both of this
    /// image. The granularities may differ (every `target` granule a dirty
    /// `source` extent touches becomes dirty).
    ///
    /// # Errors
    /// `Error::ReadOnly`; in QEMU's order [`BitmapError::NotFound`] or
    /// [`BitmapError::Inconsistent`] for `target`, then for `source`.
    ///
    /// [`BitmapError::NotFound`]: crate::error::BitmapError::NotFound
    /// [`BitmapError::Inconsistent`]: crate::error::BitmapError::Inconsistent
    pub fn merge_bitmap(&self, target: &str, source: &str) -> Result<()> {
        self.merge_bitmap_from(target, self, source)
    }

    /// ORs the bits of bitmap `source` of the image `from` (which may be
    /// this one, or another image open read-only or read-write) into bitmap
    /// `target` of this image (`qemu-img bitmap --merge SOURCE -b
    /// SOURCE_FILE`). Both images must have the same virtual size.
    ///
    /// # Errors
    /// As [`Image::merge_bitmap`]; [`BitmapError::SizeMismatch`] for images
    /// of different sizes; the errors of reading `source` from `from`.
    ///
    /// [`BitmapError::SizeMismatch`]: crate::error::BitmapError::SizeMismatch
    pub fn merge_bitmap_from(&self, target: &str, from: &Image, source: &str) -> Result<()> {
        self.writable()?;
        // QEMU checks the target before it looks at the sources.
        self.lock()?.check_merge_target(target)?;
        let bits = if std::ptr::eq(self, from) {
            None
        } else {
            // Read with no lock of this image held: two merges in opposite
            // directions cannot deadlock.
            Some(from.bitmap_bits(source)?)
        };
        self.manage_bitmaps(|m| {
            m.check_merge_target(target)?;
            let bits = match bits {
                Some(b) => b,
                None => crate::meta::bitmaps::bits_of(m, source)?,
            };
            m.merge_bitmap(target, &bits)
        })
    }

    /// A copy of the bits of bitmap `name`.
    fn bitmap_bits(&self, name: &str) -> Result<DirtyBitmap> {
        let meta = self.lock_shared()?;
        crate::meta::bitmaps::bits_of(&meta, name)
    }

    /// The dirty guest extents `(offset, len)` of the persistent bitmap
    /// `name` within `[offset, offset + len)`, merged and clipped to the
    /// range, in order. On a read-write handle a bitmap includes every
    /// request made through this handle so far; on a read-only handle it is
    /// read from the image.
    ///
    /// At most 2^20 extents are returned per call; when that many come
    /// back, call again from the end of the last one.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("disk.qcow2");
    /// # qcow2kit::create::create(&path, &qcow2kit::CreateOptions::new(), 1 << 20)?;
    /// # let img = qcow2kit::Image::open(&path, &qcow2kit::OpenOptions::new())?;
    /// // An image without bitmaps.
    /// assert_eq!(
    ///     img.dirty_extents("b0", 0, 1 << 20).unwrap_err().to_string(),
    ///     "Dirty bitmap 'b0' not found"
    /// );
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`BitmapError::NotFound`] for an unknown bitmap,
    /// [`BitmapError::Inconsistent`] for one flagged `in_use` (QEMU's rule:
    /// its data is lost); `Error::OutOfRange` past the disk;
    /// `Error::Format` for a damaged bitmap directory or table; I/O errors.
    ///
    /// [`BitmapError::NotFound`]: crate::error::BitmapError::NotFound
    /// [`BitmapError::Inconsistent`]: crate::error::BitmapError::Inconsistent
    pub fn dirty_extents(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let meta = self.lock_shared()?;
        self.check_range(meta.header.size, offset, len)?;
        crate::meta::bitmaps::dirty_extents(&meta, name, offset, len)
    }
}
