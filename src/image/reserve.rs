//! The write side of the mapping API: [`Image::reserve_write`] reserves host
//! ranges for a guest write whose data the caller writes itself (io_uring,
//! guest memory, an async runtime), [`WriteReservation::commit`] links them
//! once the data has landed, [`WriteReservation::abort`] (or dropping the
//! reservation) releases them.
//!
//! A reservation is one step of [`Image::write_at`] with the data write left
//! to the caller, on the same code: an in-place run (clusters already
//! allocated and owned by this image) holds the I/O barrier like a read
//! mapping; an allocating run reserves new host clusters (refcount raised,
//! nothing points at them yet), registers its guest clusters as in flight,
//! writes the copy-on-write parts around the guest range before it is
//! returned, and links the L2 entries at commit. Crash ordering is that of
//! `write_at`: the entries reach the file only at a flush after the data
//! was synced, so a crash before the commit (or the flush after it) leaves
//! at most leaked clusters.

use super::write::{ClusterPlan, PendingWrite, WriteStep};
use super::*;
use crate::meta::DataPermit;
use crossbeam_utils::sync::ShardedLockReadGuard;

/// Most host runs one [`WriteReservation`] holds inline (a longer
/// reservation spills to the heap).
const INLINE_RUNS: usize = 4;

/// One guest run of a [`WriteReservation`] and the host range its data goes
/// to (in the external data file when
/// [`WriteReservation::in_data_file`] says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteExtent {
    /// Guest offset of the run.
    pub guest: u64,
    /// Length of the run in bytes.
    pub len: u64,
    /// Host offset where the run's data must be written.
    pub host: u64,
}

/// What a reservation holds until it is committed or aborted.
enum Held<'a> {
    /// Clusters overwritten in place, kept valid by the I/O barrier.
    InPlace {
        _ticket: ShardedLockReadGuard<'a, ()>,
        permit: DataPermit,
    },
    /// New clusters, reserved and registered as in flight.
    Alloc {
        plans: Vec<ClusterPlan>,
        permits: Vec<DataPermit>,
    },
    /// Committed, aborted, or nothing to do.
    Done,
}

/// Host ranges reserved for (a prefix of) a guest write, from
/// [`Image::reserve_write`]. Write the data of each of
/// [`extents`](Self::extents) at its host offset, then
/// [`commit`](Self::commit); or [`abort`](Self::abort) (dropping it does
/// the same).
///
/// While it is alive, requests that would change the mapping of its guest
/// clusters (writes, discards, write-zeroes, resize, flush of freed
/// clusters) wait for it: commit or abort promptly, and never call such a
/// request on the same image from the thread holding the reservation.
pub struct WriteReservation<'a> {
    img: &'a Image,
    extents: [WriteExtent; INLINE_RUNS],
    n: usize,
    spill: Vec<WriteExtent>,
    held: Held<'a>,
    in_data_file: bool,
}

impl std::fmt::Debug for WriteReservation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteReservation")
            .field("extents", &self.extents())
            .field("in_data_file", &self.in_data_file)
            .finish_non_exhaustive()
    }
}

impl<'a> WriteReservation<'a> {
    fn new(img: &'a Image, in_data_file: bool) -> Self {
        WriteReservation {
            img,
            extents: [WriteExtent {
                guest: 0,
                len: 0,
                host: 0,
            }; INLINE_RUNS],
            n: 0,
            spill: Vec::new(),
            held: Held::Done,
            in_data_file,
        }
    }

    /// Appends a run, merged with the last one when both guest and host
    /// offsets continue it.
    fn push(&mut self, e: WriteExtent) {
        if e.len == 0 {
            return;
        }
        let last = if self.spill.is_empty() {
            self.n.checked_sub(1).and_then(|i| self.extents.get_mut(i))
        } else {
            self.spill.last_mut()
        };
        if let Some(l) = last {
            if l.guest + l.len == e.guest && l.host + l.len == e.host {
                l.len += e.len;
                return;
            }
        }
        if self.spill.is_empty() && self.n < INLINE_RUNS {
            self.extents[self.n] = e;
            self.n += 1;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.extents[..self.n]);
            }
            self.spill.push(e);
        }
    }

    /// The runs, in guest order, contiguous, covering a prefix of the
    /// requested range (call [`Image::reserve_write`] again for the rest).
    pub fn extents(&self) -> &[WriteExtent] {
        if self.spill.is_empty() {
            &self.extents[..self.n]
        } else {
            &self.spill
        }
    }

    /// Bytes of the request covered.
    pub fn len(&self) -> u64 {
        self.extents().iter().map(|e| e.len).sum()
    }

    /// Whether nothing is covered (a request of length 0).
    pub fn is_empty(&self) -> bool {
        self.extents().is_empty()
    }

    /// Whether the host offsets are in the external data file (else in the
    /// image file).
    pub fn in_data_file(&self) -> bool {
        self.in_data_file
    }

    /// The data of every extent has been written: makes it the guest's
    /// content. For an allocating reservation the L2 entries are pointed at
    /// the new clusters (they reach the file at the next flush, after the
    /// data is synced); the next [`Image::flush`] syncs what the caller wrote.
    ///
    /// # Errors
    /// As [`Image::write_at`] (the reservation is then released).
    pub fn commit(mut self) -> Result<()> {
        match std::mem::replace(&mut self.held, Held::Done) {
            Held::Done => Ok(()),
            Held::InPlace { _ticket, permit } => {
                self.img.data.note_outside_write(permit);
                Ok(())
            }
            Held::Alloc { plans, permits } => {
                for p in permits {
                    self.img.data.note_outside_write(p);
                }
                self.img.finish_alloc(&plans, Ok(())).map(|_| ())
            }
        }
    }

    /// Gives the reservation up: new clusters are released (through the
    /// deferred-free path), nothing is linked. Bytes already written to an
    /// in-place run stay written, as after a failed write.
    pub fn abort(mut self) {
        self.release();
    }

    fn release(&mut self) {
        match std::mem::replace(&mut self.held, Held::Done) {
            Held::Done => {}
            Held::InPlace { permit, .. } => {
                // The caller may have written part of it.
                self.img.data.note_outside_write(permit);
            }
            Held::Alloc { plans, permits } => {
                drop(permits);
                self.img.abort_alloc(&plans);
            }
        }
    }
}

impl Drop for WriteReservation<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl Image {
    /// Reserves host ranges for writing guest bytes `[offset, offset + len)`
    /// (a prefix of it: one in-place run, or one run of clusters to
    /// allocate) with the caller's own I/O. Clusters partly covered are
    /// completed by copy-on-write before this returns; the caller writes
    /// exactly the guest data of each extent at its host offset, then
    /// commits. [`Image::write_at`] is this with the data write done for you.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file.clone(), &OpenOptions::new())?;
    /// let data = [9u8; 3000];
    /// let mut done = 0;
    /// while done < data.len() {
    ///     let res = img.reserve_write(1000 + done as u64, (data.len() - done) as u64)?;
    ///     for e in res.extents() {
    ///         let at = (e.guest - 1000) as usize;
    ///         // The caller's own I/O (io_uring, guest memory, ...).
    ///         file.write_at(&data[at..at + e.len as usize], e.host)
    ///             .expect("data write");
    ///     }
    ///     done += res.len() as usize;
    ///     res.commit()?;
    /// }
    /// let mut back = [0u8; 3000];
    /// img.read_at(&mut back, 1000)?;
    /// assert_eq!(back, data);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Image::write_at`]; [`crate::crypto::CryptoError::Unsupported`] on an
    /// encrypted image (the caller's own I/O would write plaintext).
    pub fn reserve_write(&self, offset: u64, len: u64) -> Result<WriteReservation<'_>> {
        self.writable()?;
        if self.data.is_encrypted() {
            // The caller would write plaintext where ciphertext belongs.
            return Err(crate::crypto::CryptoError::Unsupported(
                "writes through reserve_write (the caller's own I/O)".into(),
            )
            .into());
        }
        // Persistent bitmaps record the reserved range under the lock, before
        // the caller writes its data (the shared path in `in_place_shared`).
        if len > 0 {
            if let Some((meta, permit, n)) = self.in_place_shared(offset, len, offset, len)? {
                return self.reserve_in_place(meta, permit, offset, n);
            }
        }
        let cb = self.geom.cluster_bits;
        let mut meta = self.lock()?;
        self.check_range(meta.header.size, offset, len)?;
        let mut res = WriteReservation::new(self, meta.efmt.external_data);
        if len == 0 {
            return Ok(res);
        }
        meta = self.wait_in_flight(meta, offset >> cb, (offset + len - 1) >> cb)?;
        if let Err(e) = self.before_first_write(&mut meta) {
            return Err(self.fail(&mut meta, e, IoOp::Write));
        }
        let step = match self.write_step(&mut meta, offset, len) {
            Ok(s) => s,
            Err(e) => return Err(self.fail(&mut meta, e, IoOp::Write)),
        };
        meta.note_dirty(offset, step.len());
        let n = match step {
            WriteStep::InPlace { permit, len } => {
                return self.reserve_in_place(meta, permit, offset, len)
            }
            WriteStep::Alloc { len } => len,
        };
        let job = match self.prepare_alloc(&mut meta, offset, n, None) {
            Ok(j) => j,
            Err(e) => return Err(self.fail(&mut meta, e, IoOp::Write)),
        };
        if let Some((first, last)) = job.clusters(cb) {
            meta.in_flight.insert(first, last);
        }
        drop(meta);
        let mut cow = Vec::new();
        let mut permits = Vec::new();
        for w in job.writes {
            match w {
                PendingWrite::Outside { permit } => permits.push(permit),
                other => cow.push(other),
            }
        }
        // The copy-on-write parts, with no lock held (the clusters are
        // reachable by nobody yet).
        if let Err(e) = self.run_alloc(&mut cow, &[]) {
            drop(permits);
            self.finish_alloc(&job.plans, Err(e))?;
            return Err(Error::Internal("a failed reservation was linked".into()));
        }
        for p in &job.plans {
            res.push(WriteExtent {
                guest: (p.guest + p.lo_w).0,
                len: p.hi_w - p.lo_w,
                host: (p.host.unwrap_or_default() + p.lo_w).0,
            });
        }
        res.held = Held::Alloc {
            plans: job.plans,
            permits,
        };
        Ok(res)
    }

    /// An in-place reservation: takes the I/O barrier (held until commit or
    /// abort) before the metadata lock `meta` is released.
    fn reserve_in_place<G: std::ops::Deref<Target = Meta>>(
        &self,
        meta: G,
        permit: DataPermit,
        offset: u64,
        len: u64,
    ) -> Result<WriteReservation<'_>> {
        let mut res = WriteReservation::new(self, meta.efmt.external_data);
        let ticket = self
            .io_barrier
            .read()
            .map_err(|_| Error::PreviousIoFailed)?;
        drop(meta);
        res.push(WriteExtent {
            guest: offset,
            len,
            host: permit.host(),
        });
        res.held = Held::InPlace {
            _ticket: ticket,
            permit,
        };
        Ok(res)
    }

    /// Releases an allocating reservation that will not be committed: its
    /// guest clusters leave the in-flight set, its new clusters are queued
    /// for freeing.
    fn abort_alloc(&self, plans: &[ClusterPlan]) {
        let cb = self.geom.cluster_bits;
        // A poisoned lock: the handle is unusable anyway; the clusters leak.
        let Ok(mut meta) = self.meta.write() else {
            return;
        };
        if let Some((first, last)) = super::write::cluster_range(plans, cb) {
            meta.in_flight.remove(first, last);
        }
        self.notify_in_flight();
        self.release_alloc(&mut meta, plans);
    }
}
