//! Guest writes: in-place overwrites outside the metadata lock, allocating
//! writes in runs with copy-on-write from backing files, compressed, zero
//! and partially allocated (extended L2) clusters.

use super::*;
use crate::storage::BlkdebugEvent;
use crate::types::{ClusterCount, GuestOffset, HostOffset};
use std::io::IoSlice;

/// Bytes of zeroes around a write into a new cluster from which on they
/// are left to the storage ([`crate::storage::Storage::write_zeroes`])
/// instead of written: below it one write of data and zeroes is cheaper
/// than two requests.
const ZERO_RANGE_MIN: u64 = 32 * 1024;

impl Image {
    // ------------------------------------------------------------------
    // Writes.
    // ------------------------------------------------------------------

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Work done once before the first write of a handle: clear autoclear
    /// bits this crate does not maintain (the bitmaps bit too when the
    /// bitmaps are not loaded: they would become stale), and flag the
    /// tracked persistent bitmaps `in_use` (see `meta::bitmaps`).
    pub(crate) fn before_first_write(&self, meta: &mut Meta) -> Result<()> {
        let keep = meta.kept_autoclear();
        if meta.header.autoclear_features & !keep != 0 {
            meta.header.autoclear_features &= keep;
            // The bitmap directory stays allocated and protected: only its
            // consistency bit is dropped.
            meta.write_autoclear_features()?;
        }
        meta.mark_bitmaps_in_use()
    }

    /// Writes `buf` at guest offset `offset`.
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
    /// // Any offset and length: partial clusters are completed by copy-on-write.
    /// img.write_at(&[1; 100], 12_345)?;
    /// img.write_at(&[2; 128 << 10], 1 << 20)?; // two whole clusters, one data write
    /// img.flush()?; // durable from here on
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::ReadOnly`, `Error::OutOfRange`, `Error::OverlapPrevented` when
    /// the write would overwrite metadata (the image is then marked corrupt and
    /// the handle disabled), `Error::Corrupt`, I/O errors.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        if self.data.is_encrypted() {
            if !super::crypt::sector_aligned(offset, buf.len() as u64) {
                return self.write_unaligned_encrypted(buf, offset);
            }
            let _shared = self.crypt_rmw.read().map_err(|_| Error::PreviousIoFailed)?;
            return self.write_sectors(buf, offset);
        }
        self.write_sectors(buf, offset)
    }

    /// [`Image::write_at`] without the widening of an encrypted image's
    /// request to whole sectors (done by the caller).
    pub(super) fn write_sectors(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            let rest = &buf[done..];
            if let Some((meta, permit, n)) =
                self.in_place_shared(offset, buf.len() as u64, g, rest.len() as u64)?
            {
                self.in_place(meta, permit, &[IoSlice::new(&rest[..n as usize])])?;
                done += n as usize;
                continue;
            }
            let mut meta = self.lock()?;
            // A guest cluster with an allocation in flight: wait until it is
            // linked, then translate again.
            let last = (offset + buf.len() as u64 - 1) >> self.geom.cluster_bits;
            meta = self.wait_in_flight(meta, g >> self.geom.cluster_bits, last)?;
            if done == 0 {
                self.check_range(meta.header.size, offset, buf.len() as u64)?;
                if let Err(e) = self.before_first_write(&mut meta) {
                    return Err(self.fail(&mut meta, e, IoOp::Write));
                }
            }
            let step = match self.write_step(&mut meta, g, rest.len() as u64) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(&mut meta, e, IoOp::Write)),
            };
            // Persistent bitmaps record the step before its data is written,
            // under the lock (see `meta::bitmaps`).
            meta.note_dirty(g, step.len());
            done += match step {
                WriteStep::InPlace { permit, len } => {
                    self.in_place(meta, permit, &[IoSlice::new(&rest[..len as usize])])?;
                    len as usize
                }
                WriteStep::Alloc { len } => {
                    self.alloc_step(meta, g, &rest[..len as usize])? as usize
                }
            };
        }
        Ok(())
    }

    /// Writes an in-place run outside the lock (released here), holding the
    /// I/O barrier; on an error the image is failed as for any write.
    pub(super) fn in_place<G>(
        &self,
        meta: G,
        permit: crate::meta::DataPermit,
        bufs: &[IoSlice<'_>],
    ) -> Result<()> {
        let io = self
            .io_barrier
            .read()
            .map_err(|_| Error::PreviousIoFailed)?;
        drop(meta);
        let r = self.data.write_vectored(permit, bufs);
        // Never wait for the metadata lock while holding the barrier: flush
        // takes them in the other order.
        drop(io);
        if let Err(e) = r {
            let mut meta = self.meta.write().map_err(|_| Error::PreviousIoFailed)?;
            return Err(self.fail(&mut meta, e, IoOp::Write));
        }
        Ok(())
    }

    /// An allocating write of (a prefix of) `data` at `g`: reserve under
    /// the lock (held on entry), write with no lock held, link under the
    /// lock. Returns the bytes written.
    pub(super) fn alloc_step(&self, mut meta: MetaGuard<'_>, g: u64, data: &[u8]) -> Result<u64> {
        let job = match self.prepare_alloc(&mut meta, g, data.len() as u64, Some(data)) {
            Ok(j) => j,
            Err(e) => return Err(self.fail(&mut meta, e, IoOp::Write)),
        };
        if let Some((first, last)) = job.clusters(self.geom.cluster_bits) {
            meta.in_flight.insert(first, last);
        }
        let AllocJob { plans, mut writes } = job;
        drop(meta);
        // The reserved clusters are referenced by nothing a reader can
        // reach and cannot be handed out again: no lock and no barrier are
        // needed to fill them.
        let r = self.run_alloc(&mut writes, data);
        let n = self.finish_alloc(&plans, r);
        job_bufs::give_back(plans, writes);
        n
    }

    /// The last phase of an allocating write (or a write reservation's
    /// commit) after its data writes ended with `r`: under the exclusive
    /// lock, the guest clusters leave the in-flight set and are linked, or on
    /// an error their reservation is released. Returns the bytes linked.
    pub(super) fn finish_alloc(&self, plans: &[ClusterPlan], r: Result<()>) -> Result<u64> {
        let mut meta = self.meta.write().map_err(|_| Error::PreviousIoFailed)?;
        if let Some((first, last)) = cluster_range(plans, self.geom.cluster_bits) {
            meta.in_flight.remove(first, last);
        }
        self.notify_in_flight();
        let r = match r {
            Ok(()) => self.link_alloc(&mut meta, plans),
            Err(e) => {
                self.release_alloc(&mut meta, plans);
                Err(e)
            }
        };
        let n = match r {
            Ok(n) => n,
            Err(e) => return Err(self.fail(&mut meta, e, IoOp::Write)),
        };
        if meta.rc.pending_frees() > MAX_PENDING_FREES {
            if let Err(e) = self.flush_locked(&mut meta) {
                return Err(self.fail(&mut meta, e, IoOp::Write));
            }
        }
        Ok(n)
    }

    /// One step of a write of `rest` bytes at `g`: either an in-place run
    /// (permit issued, written by the caller outside the lock) or the length
    /// of the allocating write to do next ([`Image::alloc_step`]).
    pub(super) fn write_step(&self, meta: &mut Meta, g: u64, rest: u64) -> Result<WriteStep> {
        let geom = self.geom;
        let slice_entries = meta.slice_entries();
        let cluster = g >> geom.cluster_bits;
        let slice_end = ((cluster | (slice_entries - 1)) + 1) << geom.cluster_bits;
        let len = rest.min(slice_end - g);

        // Fast path: the first cluster can be overwritten in place.
        let mut count = true;
        for _ in 0..2 {
            match self.in_place_run(meta, g, len, count)? {
                InPlaceRun::Run { permit, len } => return Ok(WriteStep::InPlace { permit, len }),
                InPlaceRun::No => return Ok(WriteStep::Alloc { len }),
                InPlaceRun::Miss(slice) => {
                    meta.load_l2_slice(slice)?;
                    count = false;
                }
            }
        }
        Err(Error::Internal(
            "L2 slice not cached right after loading it".into(),
        ))
    }

    /// The run of `len` bytes at `g` (within one L2 slice) that can be
    /// overwritten in place, from the cached L2 slice alone (`&Meta`: works
    /// under the shared lock); `Miss` when the slice is not cached.
    fn in_place_run(&self, meta: &Meta, g: u64, len: u64, count: bool) -> Result<InPlaceRun> {
        let geom = self.geom;
        let cs = geom.cluster_size;
        let (table, table_copied) = meta.l2_table_offset(geom.l1_index(g))?;
        if table == 0 || !table_copied {
            return Ok(InPlaceRun::No);
        }
        let first = meta.l2_slot(table, g);
        if meta.l2.cache().get_shared(first.slice, count).is_none() {
            return Ok(InPlaceRun::Miss(first.slice));
        }
        let mut run = 0u64;
        let mut host0 = 0u64;
        while run < len {
            let gg = g + run;
            let slot = meta.l2_slot(table, gg);
            let (e, b) = meta.decode_l2(meta.read_slot(&slot), &slot)?;
            let in_c = gg & (cs - 1);
            let n = (cs - in_c).min(len - run);
            let host = match e {
                L2Entry::Normal { host, copied: true }
                    if !geom.extended_l2 || subclusters_allocated(&geom, b, in_c, n) =>
                {
                    host
                }
                _ => break,
            };
            if run == 0 {
                host0 = host + in_c;
            } else if host + in_c != host0 + run {
                break;
            }
            run += n;
        }
        if run == 0 {
            return Ok(InPlaceRun::No);
        }
        // Overlap-checked when data lives in the image file; the write may
        // extend the file (a cluster whose tail was never written), so the
        // known end covers it from here on.
        let permit = meta
            .gate
            .permit_data(HostOffset(host0), run)?
            .for_guest(GuestOffset(g));
        Ok(InPlaceRun::Run { permit, len: run })
    }

    /// The in-place step of a write under the shared lock (cache hit): the
    /// guard, the permit and the length of the run at `g` (at most `rest`
    /// bytes) of a request `[offset, offset + total)`. `None` sends the step
    /// to the exclusive path: a cache miss, any error (reported there), a
    /// request out of range, caches due for cleaning, an allocation in flight on the request's
    /// clusters, autoclear bits still to clear, or no in-place run at `g`.
    ///
    /// # Errors
    /// Only the refusals of [`Image::lock_shared`].
    pub(super) fn in_place_shared(
        &self,
        offset: u64,
        total: u64,
        g: u64,
        rest: u64,
    ) -> Result<Option<(MetaRead<'_>, crate::meta::DataPermit, u64)>> {
        if total == 0 {
            return Ok(None);
        }
        let Some(meta) = self.lock_shared_in_range(offset, total)? else {
            return Ok(None);
        };
        if meta.first_write_pending() {
            return Ok(None);
        }
        let cb = self.geom.cluster_bits;
        // Inside the disk, so the end does not overflow.
        let last = (offset + total - 1) >> cb;
        if meta.in_flight_overlaps(g >> cb, last) {
            return Ok(None);
        }
        let slice_entries = meta.slice_entries();
        let cluster = g >> cb;
        let slice_end = ((cluster | (slice_entries - 1)) + 1) << cb;
        let len = rest.min(slice_end - g);
        match self.in_place_run(&meta, g, len, true) {
            Ok(InPlaceRun::Run { permit, len }) => {
                // Persistent bitmaps record the run before it is written,
                // while the shared lock keeps management calls out.
                meta.note_dirty(g, len);
                Ok(Some((meta, permit, len)))
            }
            _ => Ok(None),
        }
    }

    /// Allocates clusters for (a prefix of) `data` at guest offset `g`,
    /// copying the untouched parts of partially written clusters from their
    /// old content, writes the data and updates the L2 entries, all under
    /// the lock. Returns how many bytes were written.
    pub(crate) fn allocating_write(&self, meta: &mut Meta, g: u64, data: &[u8]) -> Result<u64> {
        let job = self.prepare_alloc(meta, g, data.len() as u64, Some(data))?;
        let AllocJob { plans, mut writes } = job;
        let r = match self.run_alloc(&mut writes, data) {
            Ok(()) => self.link_alloc(meta, &plans),
            Err(e) => {
                self.release_alloc(meta, &plans);
                Err(e)
            }
        };
        job_bufs::give_back(plans, writes);
        r
    }

    /// The first phase of an allocating write, under the lock: classifies
    /// the clusters from `g` on, reserves new host clusters (refcount 1, not
    /// yet linked), reads the old content that copy-on-write keeps and gets
    /// the permits for the data writes. Nothing a reader can see changes.
    ///
    /// `data` is the guest data of `[g, g + len)`; `None` for a write
    /// reservation, whose caller writes the guest data itself: the plan then
    /// holds only the copy-on-write parts around it and, as
    /// [`PendingWrite::Outside`], the permits of the caller's ranges.
    pub(super) fn prepare_alloc(
        &self,
        meta: &mut Meta,
        g: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<AllocJob> {
        let geom = self.geom;
        let cs = geom.cluster_size;
        let table = meta.writable_l2_table(geom.l1_index(g))?;
        let c0 = g >> geom.cluster_bits;
        let c_last = (g + len - 1) >> geom.cluster_bits;

        // Classify clusters from c0: a run of clusters that all need a new host cluster.
        let (mut plans, writes) = job_bufs::take();
        for c in c0..=c_last {
            let cg = c << geom.cluster_bits;
            let slot = meta.l2_slot(table, cg);
            meta.load_l2_slice(slot.slice)?;
            let (e, b) = meta.decode_l2(meta.read_slot(&slot), &slot)?;
            let lo_w = g.max(cg) - cg;
            let hi_w = (g + len).min(cg + cs) - cg;
            let reuse = match e {
                L2Entry::Normal { host, copied: true } => Some(host),
                L2Entry::Zero {
                    host: Some(host),
                    copied: true,
                } => Some(host),
                _ => None,
            };
            if meta.efmt.external_data {
                // Data file clusters are mapped 1:1 and never refcounted.
                plans.push(ClusterPlan {
                    guest: GuestOffset(cg),
                    old: e,
                    bitmap: b,
                    host: Some(HostOffset(cg)),
                    fresh: false,
                    lo_w,
                    hi_w,
                    slot,
                });
                continue;
            }
            if reuse.is_some() && c != c0 {
                break; // handled by a later step (in place or reuse)
            }
            plans.push(ClusterPlan {
                guest: GuestOffset(cg),
                old: e,
                bitmap: b,
                host: reuse.map(HostOffset),
                fresh: false,
                lo_w,
                hi_w,
                slot,
            });
            if reuse.is_some() {
                break;
            }
        }
        // Allocate the clusters that need it, contiguously.
        let need = plans.iter().filter(|p| p.host.is_none()).count() as u64;
        if need > 0 {
            let first = meta.alloc_clusters(ClusterCount(need))?;
            for (k, p) in plans.iter_mut().filter(|p| p.host.is_none()).enumerate() {
                p.host = Some(first + k as u64 * cs);
                p.fresh = true;
            }
        }
        let mut job = AllocJob {
            plans: Vec::new(),
            writes,
        };
        let r = self.plan_writes(meta, g, data, &plans, &mut job.writes);
        job.plans = plans;
        if let Err(e) = r {
            self.release_alloc(meta, &job.plans);
            return Err(e);
        }
        Ok(job)
    }

    /// The data writes of an allocating write: each cluster's range `[lo,
    /// hi)` (see [`Image::cow_range`]), straight from the caller's buffer for
    /// runs that need no copy, or a buffer with the old content around the
    /// guest data.
    fn plan_writes(
        &self,
        meta: &mut Meta,
        g: u64,
        data: Option<&[u8]>,
        plans: &[ClusterPlan],
        writes: &mut Vec<PendingWrite>,
    ) -> Result<()> {
        let Some(data) = data else {
            return self.plan_cow_only(meta, plans, writes);
        };
        let cs = self.geom.cluster_size;
        let mut i = 0;
        while i < plans.len() {
            let p = &plans[i];
            let host = p.host.unwrap_or_default();
            let (lo, hi) = self.cow_range(p);
            if self.fast_path(meta, p, (lo, hi)) {
                // Nothing to copy: write only the guest data, straight from
                // the caller, in one request for the whole run of clusters
                // whose guest data and host clusters are both contiguous.
                let mut end = i + 1;
                while end < plans.len() {
                    let (prev, next) = (&plans[end - 1], &plans[end]);
                    let contiguous = prev.hi_w == cs
                        && next.lo_w == 0
                        && next.host == prev.host.map(|h| h + cs)
                        && self.fast_path(meta, next, self.cow_range(next));
                    if !contiguous {
                        break;
                    }
                    end += 1;
                }
                let last = &plans[end - 1];
                let src =
                    (p.guest.0 + p.lo_w - g) as usize..(last.guest.0 + last.hi_w - g) as usize;
                let permit = meta
                    .gate
                    .permit_data(host + p.lo_w, src.len() as u64)?
                    .for_guest(p.guest + p.lo_w);
                writes.push(PendingWrite::Caller { permit, src });
                i = end;
                continue;
            }
            i += 1;
            let src_range = (p.guest.0 + p.lo_w - g) as usize..(p.guest.0 + p.hi_w - g) as usize;
            if self.zero_range_pays(p, (lo, hi)) {
                // The rest of the cluster reads as zero: the guest data
                // from the caller, the storage zeroes the rest. One overlap
                // check over the whole range, as for the one write QEMU
                // would do (its report names that offset and size), split
                // into the three pieces.
                let whole = meta
                    .gate
                    .permit_data(host + lo, hi - lo)?
                    .for_guest(p.guest + lo);
                let (head, rest) = whole.split_at(p.lo_w - lo);
                let (guest_part, tail) = rest.split_at(p.hi_w - p.lo_w);
                writes.push(PendingWrite::Caller {
                    permit: guest_part,
                    src: src_range,
                });
                let mut first = true;
                for permit in [head, tail] {
                    if !permit.is_empty() {
                        writes.push(PendingWrite::Zeroes { permit, first });
                        first = false;
                    }
                }
                continue;
            }
            let src = &data[src_range];
            let mut buf = vec![0u8; (hi - lo) as usize];
            // Old content for the parts outside the write.
            self.fill_old(meta, p, lo, p.lo_w, &mut buf[..(p.lo_w - lo) as usize])?;
            let tail = (p.hi_w - lo) as usize;
            self.fill_old(meta, p, p.hi_w, hi, &mut buf[tail..])?;
            buf[(p.lo_w - lo) as usize..(p.hi_w - lo) as usize].copy_from_slice(src);
            let permit = meta
                .gate
                .permit_data(host + lo, buf.len() as u64)?
                .for_guest(p.guest + lo);
            writes.push(PendingWrite::Cow { permit, buf });
        }
        Ok(())
    }

    /// [`Image::plan_writes`] for a write reservation: the permit of each
    /// cluster's guest range (written by the caller) and, where the guest
    /// range does not cover the copy-on-write range, the old content around
    /// it as separate writes.
    fn plan_cow_only(
        &self,
        meta: &mut Meta,
        plans: &[ClusterPlan],
        writes: &mut Vec<PendingWrite>,
    ) -> Result<()> {
        for p in plans {
            let host = p.host.unwrap_or_default();
            let (lo, hi) = self.cow_range(p);
            let permit = meta
                .gate
                .permit_data(host + p.lo_w, p.hi_w - p.lo_w)?
                .for_guest(p.guest + p.lo_w);
            writes.push(PendingWrite::Outside { permit });
            if self.fast_path(meta, p, (lo, hi)) {
                continue;
            }
            for (from, to) in [(lo, p.lo_w), (p.hi_w, hi)] {
                if from < to {
                    let mut buf = vec![0u8; (to - from) as usize];
                    self.fill_old(meta, p, from, to, &mut buf)?;
                    let permit = meta
                        .gate
                        .permit_data(host + from, to - from)?
                        .for_guest(p.guest + from);
                    writes.push(PendingWrite::Cow { permit, buf });
                }
            }
        }
        Ok(())
    }

    /// The second phase: the data writes, with or without the lock held.
    pub(super) fn run_alloc(&self, writes: &mut Vec<PendingWrite>, data: &[u8]) -> Result<()> {
        for w in writes.drain(..) {
            match w {
                PendingWrite::Caller { permit, src } => {
                    let bytes = data.get(src).ok_or_else(|| {
                        Error::InvalidArgument("allocating write outside its buffer".into())
                    })?;
                    self.data.write(permit, bytes)?;
                }
                PendingWrite::Cow { permit, buf } => {
                    self.file.debug_event(BlkdebugEvent::CowWrite);
                    self.data.write(permit, &buf)?
                }
                PendingWrite::Zeroes { permit, first } => {
                    if first {
                        // QEMU's event for zeroing a new cluster's space
                        // instead of copying on write (`handle_alloc_space`).
                        self.file.debug_event(BlkdebugEvent::ClusterAllocSpace);
                    }
                    self.data.write_zeroes(permit)?
                }
                PendingWrite::Outside { .. } => {
                    return Err(Error::Internal(
                        "a reservation's guest range reached the data writes".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The last phase, under the lock: the data is written; the L2 entries
    /// are pointed at it (written back after the data is synced) and the old
    /// clusters' references are queued for dropping. Returns the bytes of
    /// the request written. On an error nothing was linked.
    fn link_alloc(&self, meta: &mut Meta, plans: &[ClusterPlan]) -> Result<u64> {
        meta.data_unsynced = true;
        let prepared = (|| {
            if meta.lazy_refcounts {
                // As QEMU: the image is marked dirty before the first entry
                // that relies on refcounts not yet written.
                meta.mark_dirty()?;
            }
            // The slices may have been evicted while the data was written.
            for p in plans {
                meta.load_l2_slice(p.slot.slice)?;
            }
            for p in plans {
                if meta.l2.cache().peek(p.slot.slice).is_none() {
                    return Err(Error::Internal("L2 slice not cached".into()));
                }
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            self.release_alloc(meta, plans);
            return Err(e);
        }
        let mut written = 0u64;
        for p in plans {
            let (lo, hi) = self.cow_range(p);
            let new = self.new_entry(p, p.host.unwrap_or_default(), lo, hi);
            meta.write_slot(&p.slot, new);
            self.drop_old(meta, p);
            written += p.hi_w - p.lo_w;
        }
        Ok(written)
    }

    /// Gives back the clusters reserved for an allocating write that will not
    /// be linked (through the deferred-free path: a crash before the next
    /// flush leaves them leaked, never referenced twice).
    pub(super) fn release_alloc(&self, meta: &mut Meta, plans: &[ClusterPlan]) {
        for p in plans.iter().filter(|p| p.fresh) {
            if let Some(h) = p.host {
                meta.queue_free(h, DiscardType::Never);
            }
        }
    }

    /// Whether cluster `p` can be written with its guest data alone, straight
    /// from the caller's buffer: the write covers its whole copy-on-write
    /// range `[lo, hi)`, or the cluster lies past the end of the image file
    /// (where unwritten bytes read as zero) and everything the write does not
    /// cover reads as zero.
    fn fast_path(&self, meta: &Meta, p: &ClusterPlan, (lo, hi): (u64, u64)) -> bool {
        let covers = p.lo_w == lo && p.hi_w == hi;
        // An encrypted cluster's unwritten bytes would decrypt to noise,
        // not zeroes: it is always written whole.
        covers
            || (!meta.efmt.external_data
                && !self.data.is_encrypted()
                && p.host
                    .is_some_and(|host| (host + lo).0 >= meta.gate.file_end())
                && self.old_reads_zero(p, lo))
    }

    /// Whether the parts of cluster `p`'s copy-on-write range `[lo, hi)`
    /// outside the guest data are better zeroed by the storage than written
    /// as a buffer of zeroes: they read as zero (from metadata alone), the
    /// data is not encrypted (zeroes would not decrypt to zeroes), and they
    /// are at least [`ZERO_RANGE_MIN`] bytes. Measured on ext4 with the
    /// sync the write is followed by: a 4 KiB write into a fresh 64 KiB
    /// cluster inside the file ran ~1.9× as fast with `FALLOC_FL_ZERO_RANGE`
    /// for the other 60 KiB as with the zeroes written.
    fn zero_range_pays(&self, p: &ClusterPlan, (lo, hi): (u64, u64)) -> bool {
        let outside = (p.lo_w - lo) + (hi - p.hi_w);
        outside >= ZERO_RANGE_MIN && !self.data.is_encrypted() && self.old_reads_zero(p, lo)
    }

    /// Drops the reference the cluster's old entry held (COW replaced it).
    fn drop_old(&self, meta: &mut Meta, p: &ClusterPlan) {
        let reused = matches!(
            p.old,
            L2Entry::Normal { copied: true, .. }
                | L2Entry::Zero {
                    host: Some(_),
                    copied: true
                }
        );
        if !reused {
            self.drop_reference(meta, p.old, DiscardType::Other);
        }
    }

    /// Whether the guest view of the cluster of `p` from `lo` on reads as
    /// zeroes, known from metadata alone (no I/O).
    fn old_reads_zero(&self, p: &ClusterPlan, lo: u64) -> bool {
        match p.old {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => match &self.backing {
                None => true,
                Some(b) => b.size() <= (p.guest + lo).0,
            },
            _ => false,
        }
    }

    /// The byte range of the cluster to write: the whole cluster for standard
    /// L2 (so no stale bytes become visible), the touched subclusters with
    /// extended L2 when the cluster had no data to carry over.
    fn cow_range(&self, p: &ClusterPlan) -> (u64, u64) {
        let geom = self.geom;
        let cs = geom.cluster_size;
        if !geom.extended_l2 {
            return (0, cs);
        }
        let carries_data = match p.old {
            L2Entry::Compressed { .. } => true,
            L2Entry::Normal { copied, .. } => !copied,
            _ => false,
        };
        if carries_data {
            return (0, cs);
        }
        let scs = geom.subcluster_size();
        (p.lo_w & !(scs - 1), (p.hi_w + scs - 1) & !(scs - 1))
    }

    fn new_entry(&self, p: &ClusterPlan, host: HostOffset, lo: u64, hi: u64) -> RawL2 {
        let geom = self.geom;
        let word = host.0 | OFLAG_COPIED;
        if !geom.extended_l2 {
            return RawL2 { word, bitmap: 0 };
        }
        let scs = geom.subcluster_size();
        let touched = range_mask(lo / scs, hi.div_ceil(scs));
        let (alloc, zero) = match p.old {
            L2Entry::Compressed { .. } => (u32::MAX, 0),
            L2Entry::Normal { .. } => (p.bitmap.alloc() | touched, p.bitmap.zero() & !touched),
            _ => (touched, p.bitmap.zero() & !touched),
        };
        RawL2 {
            word,
            bitmap: Subclusters::from_parts(alloc, zero).0,
        }
    }

    /// Fills `out` with the current guest view of `[from, to)` within the
    /// cluster of plan `p` (old data, backing data or zeroes).
    fn fill_old(
        &self,
        meta: &mut Meta,
        p: &ClusterPlan,
        from: u64,
        to: u64,
        out: &mut [u8],
    ) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        self.file.debug_event(BlkdebugEvent::CowRead);
        let geom = self.geom;
        match p.old {
            L2Entry::Compressed { .. } => {
                let (o, l) = p.old.compressed_range().unwrap_or((0, 0));
                let data = self.read_compressed(meta.header.compression_type, o, l)?;
                out.copy_from_slice(&data[from as usize..to as usize]);
                Ok(())
            }
            _ => {
                let unit = geom.subcluster_size();
                let mut pos = from;
                while pos < to {
                    let n = ((pos | (unit - 1)) + 1).min(to) - pos;
                    let dst = &mut out[(pos - from) as usize..(pos - from + n) as usize];
                    let sc = ((pos >> geom.subcluster_bits) & 31) as u32;
                    match crate::format::entry::subcluster_state(
                        p.old,
                        p.bitmap,
                        sc,
                        geom.extended_l2,
                        unit,
                    ) {
                        crate::format::entry::SubclusterState::Data(h) => self.data.read_guest(
                            dst,
                            h + (pos & (unit - 1)),
                            Some((p.guest + pos).0),
                        )?,
                        crate::format::entry::SubclusterState::Unallocated => {
                            self.read_backing(dst, (p.guest + pos).0)?
                        }
                        _ => dst.fill(0),
                    }
                    pos += n;
                }
                Ok(())
            }
        }
    }
}

/// One guest cluster of an allocating write.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClusterPlan {
    pub(super) guest: GuestOffset,
    old: L2Entry,
    bitmap: Subclusters,
    pub(super) host: Option<HostOffset>,
    /// `host` was reserved for this write (released if it fails).
    fresh: bool,
    /// Range written by the guest within the cluster.
    pub(super) lo_w: u64,
    pub(super) hi_w: u64,
    slot: crate::meta::L2Slot,
}

/// An allocating write between its phases: the reserved clusters and the
/// data writes still to do.
pub(super) struct AllocJob {
    pub(super) plans: Vec<ClusterPlan>,
    pub(super) writes: Vec<PendingWrite>,
}

impl AllocJob {
    /// The guest clusters the job links (cluster indices `first..=last`;
    /// its plans are consecutive clusters), `None` for no cluster.
    pub(super) fn clusters(&self, cluster_bits: u32) -> Option<(u64, u64)> {
        cluster_range(&self.plans, cluster_bits)
    }
}

/// The guest cluster indices `first..=last` of consecutive cluster plans.
pub(super) fn cluster_range(plans: &[ClusterPlan], cluster_bits: u32) -> Option<(u64, u64)> {
    let first = plans.first()?.guest.cluster(cluster_bits);
    let last = plans.last()?.guest.cluster(cluster_bits);
    Some((first, last))
}

/// One data write of an allocating write.
pub(super) enum PendingWrite {
    /// Bytes `src` of the caller's buffer.
    Caller {
        permit: crate::meta::DataPermit,
        src: std::ops::Range<usize>,
    },
    /// A cluster range with copied old content around the guest data.
    Cow {
        permit: crate::meta::DataPermit,
        buf: Vec<u8>,
    },
    /// A guest range of a write reservation: written by its caller.
    Outside { permit: crate::meta::DataPermit },
    /// A range of a new cluster that reads as zero, zeroed by the storage
    /// ([`crate::storage::Storage::write_zeroes`]); `first` of its cluster.
    Zeroes {
        permit: crate::meta::DataPermit,
        first: bool,
    },
}

/// What [`Image::in_place_run`] found.
enum InPlaceRun {
    /// Overwrite `len` bytes in place with `permit`.
    Run {
        permit: crate::meta::DataPermit,
        len: u64,
    },
    /// The first cluster cannot be overwritten in place.
    No,
    /// The L2 slice at this host offset is not cached.
    Miss(u64),
}

pub(super) enum WriteStep {
    /// Overwrite `len` bytes in place, outside the lock, with `permit`.
    InPlace {
        permit: crate::meta::DataPermit,
        len: u64,
    },
    /// An allocating write of (a prefix of) the next `len` bytes: prepared
    /// under the lock, its data written outside it, then linked under it.
    Alloc { len: u64 },
}

impl WriteStep {
    /// The guest bytes the step covers.
    pub(super) fn len(&self) -> u64 {
        match self {
            WriteStep::InPlace { len, .. } | WriteStep::Alloc { len } => *len,
        }
    }
}

pub(super) fn range_mask(lo: u64, hi: u64) -> u32 {
    let mut m = 0u32;
    for i in lo..hi.min(32) {
        m |= 1 << i;
    }
    m
}

fn subclusters_allocated(geom: &Geometry, b: Subclusters, in_c: u64, n: u64) -> bool {
    let scs = geom.subcluster_size();
    let mask = range_mask(in_c / scs, (in_c + n).div_ceil(scs));
    b.alloc() & mask == mask
}

/// Per-thread vectors for the plans and data writes of allocating writes,
/// reused from one request to the next so that an allocating write
/// allocates nothing once a thread has done a few (the vectors live across
/// the unlocked data write, so they cannot be borrowed from `Meta`).
mod job_bufs {
    use super::{ClusterPlan, PendingWrite};
    use std::cell::RefCell;

    /// Capacity kept for reuse; a thread that once did a huge write does
    /// not keep its vectors forever.
    const KEEP: usize = 64;

    thread_local! {
        static BUFS: RefCell<(Vec<ClusterPlan>, Vec<PendingWrite>)> =
            const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// Empty vectors, with this thread's reused capacity.
    pub(super) fn take() -> (Vec<ClusterPlan>, Vec<PendingWrite>) {
        BUFS.try_with(|b| {
            b.try_borrow_mut()
                .map(|mut b| std::mem::take(&mut *b))
                .unwrap_or_default()
        })
        .unwrap_or_default()
    }

    /// Gives the vectors back for the thread's next allocating write.
    pub(super) fn give_back(mut plans: Vec<ClusterPlan>, mut writes: Vec<PendingWrite>) {
        if plans.capacity() > KEEP || writes.capacity() > KEEP {
            return;
        }
        plans.clear();
        writes.clear();
        let _ = BUFS.try_with(|b| {
            if let Ok(mut b) = b.try_borrow_mut() {
                *b = (plans, writes);
            }
        });
    }
}
