//! The write half of copy-on-read (QEMU's `bdrv_co_do_copy_on_readv`), as
//! the stream job uses it: data read from the backing chain is written
//! into this image only where this image still allocates nothing, decided
//! and allocated under the metadata lock, so a concurrent guest write to
//! the same clusters is never overwritten by the older backing data.

use super::write::WriteStep;
use super::*;
use std::io::IoSlice;

impl Image {
    /// Writes `data` (`None`: zeroes, as zero clusters where the format
    /// allows) at guest `offset`, `len` bytes, only over the parts of the
    /// range that this image does not allocate. Each part is checked and
    /// its allocation registered (in flight) under the exclusive lock:
    /// another writer either finished before (the part is then allocated
    /// and skipped) or waits for this allocation (and writes after it).
    /// Returns the bytes written.
    pub(crate) fn write_unallocated(
        &self,
        data: Option<&[u8]>,
        offset: u64,
        len: u64,
    ) -> Result<u64> {
        self.writable()?;
        if let Some(d) = data {
            if d.len() as u64 != len {
                return Err(Error::Internal(
                    "copy-on-read buffer and length differ".into(),
                ));
            }
        }
        let zero_buf;
        let buf: &[u8] = match data {
            Some(d) => d,
            None => {
                let n = usize::try_from(len).map_err(|_| {
                    Error::Internal("copy-on-read request larger than memory".into())
                })?;
                zero_buf = vec![0u8; n];
                &zero_buf
            }
        };
        let cb = self.geom.cluster_bits;
        let unit = self.geom.subcluster_size();
        let mut done = 0u64;
        let mut written = 0u64;
        while done < len {
            let g = offset + done;
            let rest = len - done;
            let mut meta = self.lock()?;
            meta = self.wait_in_flight(meta, g >> cb, (offset + len - 1) >> cb)?;
            if done == 0 {
                self.check_range(meta.header.size, offset, len)?;
                if let Err(e) = self.before_first_write(&mut meta) {
                    return Err(self.fail(&mut meta, e, IoOp::Write));
                }
            }
            let (extent, n) = match meta.map_extent(g, rest) {
                Ok(r) => r,
                Err(e) => return Err(self.fail(&mut meta, e, IoOp::Write)),
            };
            let n = n.min(rest);
            if n == 0 {
                return Err(Error::Internal(format!(
                    "no progress copying on read at {g:#x}"
                )));
            }
            if extent != Extent::Unallocated {
                done += n;
                continue;
            }
            let size = meta.header.size;
            let zero_clusters = data.is_none()
                && meta.header.version >= 3
                && meta.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW == 0
                && g.is_multiple_of(unit)
                && (n.is_multiple_of(unit) || g + n == size);
            if zero_clusters {
                if let Err(e) = self.zero_locked(&mut meta, g, g + n, false) {
                    return Err(self.fail(&mut meta, e, IoOp::Write));
                }
                done += n;
                written += n;
                continue;
            }
            let part = |k: u64| -> Result<&[u8]> {
                let s = usize::try_from(done)
                    .map_err(|_| Error::Internal("copy-on-read offset".into()))?;
                let e = usize::try_from(done + k)
                    .map_err(|_| Error::Internal("copy-on-read offset".into()))?;
                buf.get(s..e)
                    .ok_or_else(|| Error::Internal("copy-on-read outside its buffer".into()))
            };
            let step = match self.write_step(&mut meta, g, n) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(&mut meta, e, IoOp::Write)),
            };
            let w = match step {
                WriteStep::InPlace { permit, len } => {
                    self.in_place(meta, permit, &[IoSlice::new(part(len)?)])?;
                    len
                }
                WriteStep::Alloc { len } => self.alloc_step(meta, g, part(len)?)?,
            };
            done += w;
            written += w;
        }
        Ok(written)
    }
}
