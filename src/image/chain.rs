//! What block jobs change in an image besides guest data: emptying it
//! (QEMU's `bdrv_make_empty`) and rewriting its backing string (QEMU's
//! `bdrv_change_backing_file`, as a commit of an intermediate image does).

use super::*;
use crate::format::header::HeaderExtension;

impl Image {
    /// Drops every cluster of the active L1 table, so that the whole disk
    /// reads from the backing file again (QEMU's `qcow2_make_empty`, which
    /// `qemu-img commit` runs on the committed image unless `-d`). Clusters
    /// internal snapshots still use stay theirs. Flushes.
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
    /// img.make_empty()?;
    /// assert_eq!(img.block_status(0, 8 << 20)?.extent, qcow2kit::Extent::Unallocated);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As for [`Image::discard`].
    pub fn make_empty(&self) -> Result<()> {
        self.writable()?;
        {
            let mut meta = self.lock_idle()?;
            let size = meta.header.size;
            let r = self
                .before_first_write(&mut meta)
                .and_then(|_| self.discard_locked(&mut meta, 0, size, true));
            if let Err(e) = r {
                return Err(self.fail(&mut meta, e, IoOp::Write));
            }
        }
        self.flush()
    }

    /// Writes `name` as the backing file string and `format` as the backing
    /// format (none: no backing format extension), rewriting the header
    /// cluster with one write. The string is not validated and the open
    /// backing chain is not changed (QAPI `change-backing-file` semantics).
    pub(crate) fn write_backing_string(&self, name: &str, format: Option<&str>) -> Result<()> {
        self.writable()?;
        self.flush()?;
        let mut meta = self.lock_idle()?;
        let mut h = meta.header.clone();
        h.backing_file = Some(name.to_owned());
        h.extensions
            .retain(|e| !matches!(e, HeaderExtension::BackingFormat(_)));
        if let Some(f) = format {
            h.extensions
                .push(HeaderExtension::BackingFormat(f.to_owned()));
        }
        h.normalize()?;
        let bytes = h.encode_into_cluster(self.geom.cluster_size)?;
        let r = meta
            .gate
            .write_metadata(MetadataKind::MainHeader, &bytes, 0)
            .and_then(|_| meta.gate.sync_image());
        match r {
            Ok(()) => {
                meta.header = h;
                Ok(())
            }
            Err(e) => Err(self.fail(&mut meta, e, IoOp::Write)),
        }
    }
}
