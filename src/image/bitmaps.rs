//! Querying persistent dirty bitmaps: what an incremental backup reads.

use super::*;

impl Image {
    /// The dirty guest extents `(offset, len)` of the persistent bitmap
    /// `name` within `[offset, offset + len)`, merged and clipped to the
    /// range, in order. On a read-write handle an enabled bitmap includes
    /// every request made through this handle so far; other bitmaps (and
    /// every bitmap of a read-only handle) are read from the image.
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
    /// assert!(img.dirty_extents("b0", 0, 1 << 20).is_err());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::InvalidArgument` for an unknown bitmap (`Dirty bitmap 'NAME'
    /// not found`) and for one flagged `in_use` (`Bitmap 'NAME' is
    /// inconsistent and cannot be used`, QEMU's rule: its data is lost);
    /// `Error::OutOfRange` past the disk; `Error::Format` for a damaged
    /// bitmap directory or table; I/O errors.
    pub fn dirty_extents(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let meta = self.lock_shared()?;
        self.check_range(meta.header.size, offset, len)?;
        crate::meta::bitmaps::dirty_extents(&meta, name, offset, len)
    }
}
