//! What block jobs and `qemu-img rebase` change in an image besides guest
//! data: emptying it (QEMU's `bdrv_make_empty`), rewriting its backing
//! string (QAPI `change-backing-file`, QEMU's `bdrv_change_backing_file`,
//! as a commit of an intermediate image does) and the safe-mode rebase
//! (qemu-img's `img_rebase`: copy where old and new backing differ, then
//! the backing string).

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
    /// format (QAPI `change-backing-file`, QEMU's
    /// `qcow2_change_backing_file`): an empty `name` removes the backing
    /// file (and its format); `format` `None` writes no backing format
    /// extension. The string is not validated and the open backing chain is
    /// not changed: the handle keeps reading through the chain it opened,
    /// and the new string takes effect at the next open. The header cluster
    /// is rewritten with one write, after a flush.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 1 << 20)?;
    /// let img = Image::open_storage(file.clone(), &OpenOptions::new())?;
    /// img.change_backing_file("does-not-exist-yet.qcow2", Some("qcow2"))?;
    /// assert_eq!(img.header().backing_file_name(), Some("does-not-exist-yet.qcow2"));
    /// img.change_backing_file("", None)?; // and gone again
    /// assert_eq!(img.header().backing_file_name(), None);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::ReadOnly`; `Error::InvalidArgument` for a name longer than
    /// 1023 bytes or a backing file for an image whose external data file
    /// is raw (QEMU's `-EINVAL`); [`Error::TooLarge`] with
    /// [`Limit::HeaderSpace`](crate::error::Limit::HeaderSpace) when the
    /// header would not fit in its cluster; I/O errors (which poison the
    /// handle, as for any failed metadata write).
    pub fn change_backing_file(&self, name: &str, format: Option<&str>) -> Result<()> {
        self.writable()?;
        // Refused before the flush when it cannot fit.
        self.encoded_header_with_backing(&self.header(), name, format)?;
        self.flush()?;
        let mut meta = self.lock_idle()?;
        // Rebuilt from the header as it is under the lock (the flush may
        // have changed it: the dirty bit, autoclear bits).
        let (h, bytes) = self.encoded_header_with_backing(&meta.header, name, format)?;
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

    /// `h` with `name`/`format` as its backing file, and its encoding.
    fn encoded_header_with_backing(
        &self,
        h: &Header,
        name: &str,
        format: Option<&str>,
    ) -> Result<(Header, Vec<u8>)> {
        let h = header_with_backing(h, name, format)?;
        let bytes = h
            .encode_into_cluster(self.geom.cluster_size)
            .map_err(|_| Error::TooLarge(crate::error::Limit::HeaderSpace))?;
        Ok((h, bytes))
    }

    /// `qemu-img rebase` in safe mode, after the new backing file was
    /// opened (see [`Backing::open`]): copies into this image every range
    /// it does not allocate itself where its current backing chain and
    /// `new` read differently (`None`: no backing file, reads as zeroes),
    /// so that the guest view does not change, then writes `name` and
    /// `format` as its backing file ([`Image::change_backing_file`]).
    ///
    /// Differences are found and copied in whole clusters (subclusters
    /// with extended L2 entries), as QEMU 8.2+ does; ranges past the end of
    /// the old backing file (which read as zeroes) are written as zeroes.
    /// `progress(done, total)` is called after each request compared (at
    /// most 2 MiB, as qemu-img's; ranges this image allocates are skipped
    /// without a call). The header changes last, with one write: a crash at any point
    /// leaves an image that reads as before, through the old backing file
    /// or (after the header write) the new one. Everything that can make the
    /// header write fail for its arguments is checked before the copy. The
    /// handle keeps its old chain open; reopen to read through the new one.
    ///
    /// ```
    /// use qcow2kit::image::Backing;
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let p = |n: &str| dir.path().join(n);
    /// let o = CreateOptions::new();
    /// qcow2kit::create::create(&p("base.qcow2"), &o, 1 << 20)?;
    /// qcow2kit::create::create(&p("nb.qcow2"), &o, 1 << 20)?;
    /// let b = o.clone().backing_file("base.qcow2").backing_fmt("qcow2");
    /// qcow2kit::create::create(&p("top.qcow2"), &b, 1 << 20)?;
    /// Image::open(&p("base.qcow2"), &OpenOptions::new())?.write_at(&[1; 4096], 0)?;
    ///
    /// let top = Image::open(&p("top.qcow2"), &OpenOptions::new())?;
    /// let nb = Backing::open("nb.qcow2", Some("qcow2"), top.path(), &OpenOptions::new())?;
    /// top.rebase(Some(&nb), "nb.qcow2", Some("qcow2"), &mut |_, _| {})?;
    /// drop((top, nb));
    /// let top = Image::open(&p("top.qcow2"), &OpenOptions::new().read_only(true))?;
    /// let mut buf = [0u8; 4];
    /// top.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [1; 4]); // copied from the old base
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::ReadOnly`; `Error::InvalidArgument("backing format must be
    /// specified")` for a non-empty `name` without `format` (QEMU's
    /// `qemu-img rebase` requires one; [`Image::change_backing_file`] does
    /// not); the errors of [`Image::change_backing_file`]; read errors of
    /// either backing file and write errors of this image.
    pub fn rebase(
        &self,
        new: Option<&Backing>,
        name: &str,
        format: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        self.writable()?;
        if !name.is_empty() && format.is_none() {
            return Err(Error::InvalidArgument(
                "backing format must be specified".into(),
            ));
        }
        // Fail before copying anything where the header write would fail.
        self.encoded_header_with_backing(&self.header(), name, format)?;
        self.copy_backing_differences(new, progress)?;
        self.change_backing_file(name, format)
    }

    /// The copy of [`Image::rebase`].
    fn copy_backing_differences(
        &self,
        new: Option<&Backing>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let size = self.size();
        let old = self.backing();
        let old_size = old.map_or(0, Backing::size);
        let new_size = new.map_or(0, Backing::size);
        // The (sub)cluster: subcluster_size is the cluster size without
        // extended L2 entries.
        let gran = self.geom.subcluster_size();
        let chunk_len = REBASE_CHUNK.max(gran);
        let cap = usize::try_from(chunk_len)
            .map_err(|_| Error::Internal("rebase buffer larger than memory".into()))?;
        let (mut buf_old, mut buf_new) = (vec![0u8; cap], vec![0u8; cap]);
        let mut off = 0u64;
        while off < size {
            let want = chunk_len.min(size - off);
            let st = self.block_status(off, want)?;
            let n = st.len.min(want);
            if n == 0 {
                return Err(Error::Internal(format!("no progress rebasing at {off:#x}")));
            }
            if st.extent != Extent::Unallocated {
                off += n;
                continue;
            }
            let len = usize::try_from(n)
                .map_err(|_| Error::Internal("rebase request larger than memory".into()))?;
            let (Some(bo), Some(bn)) = (buf_old.get_mut(..len), buf_new.get_mut(..len)) else {
                return Err(Error::Internal(
                    "rebase request larger than its buffer".into(),
                ));
            };
            match old {
                Some(b) => b.read_at(bo, off)?,
                None => bo.fill(0),
            }
            if off < new_size {
                match new {
                    Some(b) => b.read_at(bn, off)?,
                    None => bn.fill(0),
                }
            } else {
                bn.fill(0);
            }
            self.write_differences(off, bo, bn, gran, old_size)?;
            off += n;
            progress(off, size);
        }
        Ok(())
    }

    /// Writes the `gran`-sized blocks of `old` (at guest `off`) that differ
    /// from `new`, one request per run of differing blocks: as data, or as
    /// zeroes when the run starts past `old_size` (QEMU's `img_rebase`: a
    /// run that crosses the old backing file's end is written as data, the
    /// zeroes past the end included).
    fn write_differences(
        &self,
        off: u64,
        old: &[u8],
        new: &[u8],
        gran: u64,
        old_size: u64,
    ) -> Result<()> {
        let write = |start: usize, end: usize| -> Result<()> {
            let at = off + start as u64;
            if at >= old_size {
                self.write_zeroes(at, (end - start) as u64, false)
            } else {
                let data = old
                    .get(start..end)
                    .ok_or_else(|| Error::Internal("rebase run outside its buffer".into()))?;
                self.write_at(data, at)
            }
        };
        let mut run: Option<usize> = None;
        let mut i = 0usize;
        while i < old.len() {
            // Blocks are aligned to `gran` in guest offsets.
            let next = ((off + i as u64) / gran)
                .saturating_add(1)
                .saturating_mul(gran);
            let end = usize::try_from(next.saturating_sub(off))
                .unwrap_or(old.len())
                .clamp(i + 1, old.len());
            let differs = old.get(i..end) != new.get(i..end);
            match (run, differs) {
                (None, true) => run = Some(i),
                (Some(s), false) => {
                    write(s, i)?;
                    run = None;
                }
                _ => {}
            }
            i = end;
        }
        if let Some(s) = run {
            write(s, old.len())?;
        }
        Ok(())
    }
}

/// Bytes of the virtual disk compared per step of a rebase (qemu-img's
/// `IO_BUF_SIZE`).
const REBASE_CHUNK: u64 = 2 << 20;

/// `h` with `name`/`format` as its backing file, normalised.
fn header_with_backing(h: &Header, name: &str, format: Option<&str>) -> Result<Header> {
    if name.len() > 1023 {
        return Err(Error::InvalidArgument(
            "backing file name longer than 1023 bytes".into(),
        ));
    }
    if !name.is_empty() && h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
        return Err(Error::InvalidArgument(
            "a backing file cannot be added to an image whose data file is raw".into(),
        ));
    }
    let mut h = h.clone();
    h.extensions
        .retain(|e| !matches!(e, HeaderExtension::BackingFormat(_)));
    if name.is_empty() {
        h.backing_file = None;
    } else {
        h.backing_file = Some(name.to_owned());
        if let Some(f) = format {
            h.extensions
                .push(HeaderExtension::BackingFormat(f.to_owned()));
        }
    }
    h.normalize()?;
    Ok(h)
}
