//! [`Tracked`]: a [`Storage`] wrapper that knows whether anything was
//! changed since the last successful sync, so that a flush syncs every
//! acknowledged write (in place or allocating, guest data or metadata,
//! discards and size changes) and no sync is issued when nothing changed.
//!
//! # Races
//! Writers set the flag *after* their change completed; a sync clears it
//! *before* it calls `fdatasync`. A change that completes while a sync runs
//! therefore leaves the flag set and the next flush syncs again: a sync can
//! only clear the flag for changes it covers. A failed sync sets the flag
//! again.
//!
//! With `cache.no-flush=on` (QEMU's `BDRV_O_NO_FLUSH`) syncs do nothing.

use super::Storage;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Tracks unsynced changes of one file; see the module docs.
#[derive(Debug)]
pub(crate) struct Tracked {
    inner: Arc<dyn Storage>,
    dirty: AtomicBool,
    no_flush: bool,
}

impl Tracked {
    /// Wraps `inner`; `no_flush` turns every sync into a no-op.
    pub(crate) fn new(inner: Arc<dyn Storage>, no_flush: bool) -> Self {
        Self {
            inner,
            dirty: AtomicBool::new(false),
            no_flush,
        }
    }

    /// Whether something changed since the last successful sync.
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
    }

    /// Syncs if something changed since the last successful sync.
    ///
    /// # Errors
    /// The error of the sync.
    pub(crate) fn flush_if_dirty(&self) -> io::Result<()> {
        if self.is_dirty() {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Records a change made to the file through another handle (a write
    /// reservation's caller wrote guest data itself).
    pub(crate) fn mark_changed(&self) {
        self.dirty.store(true, Ordering::SeqCst);
    }

    fn changed<T>(&self, r: io::Result<T>) -> io::Result<T> {
        // Even a failed write may have changed part of the range. Stored
        // only when clear, so that writers on several cores do not keep
        // taking the flag's cache line from each other. Sound with the
        // flush protocol: if this (sequentially consistent) load still sees
        // `true`, it comes before `flush`'s clearing store in the total
        // order, so the write finished before that flush's sync began.
        if !self.dirty.load(Ordering::SeqCst) {
            self.dirty.store(true, Ordering::SeqCst);
        }
        r
    }
}

impl Storage for Tracked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.inner.write_at(buf, offset);
        self.changed(r)
    }

    fn read_vectored_at(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<()> {
        let r = self.inner.write_vectored_at(bufs, offset);
        self.changed(r)
    }

    fn flush(&self) -> io::Result<()> {
        // Cleared before the sync: see the module docs.
        self.dirty.store(false, Ordering::SeqCst);
        if self.no_flush {
            return Ok(());
        }
        let r = self.inner.flush();
        if r.is_err() {
            self.dirty.store(true, Ordering::SeqCst);
        }
        r
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let r = self.inner.set_len(len);
        self.changed(r)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.inner.allocate(offset, len);
        self.changed(r)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.inner.discard(offset, len);
        self.changed(r)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.inner.write_zeroes(offset, len);
        self.changed(r)
    }

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.is_hole(offset, len)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }

    fn data_extent(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        self.inner.data_extent(offset, max)
    }

    fn lock(&self, req: &super::LockRequest) -> Result<(), super::LockError> {
        self.inner.lock(req)
    }

    fn debug_event(&self, event: super::BlkdebugEvent) {
        self.inner.debug_event(event)
    }

    fn set_event_sink(&self, sink: Option<crate::events::EventSink>) {
        self.inner.set_event_sink(sink)
    }

    fn as_quorum(&self) -> Option<&super::QuorumStorage> {
        self.inner.as_quorum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::storage::{FaultyStorage, MemStorage, RecordedOp};

    fn syncs(log: &[RecordedOp]) -> usize {
        log.iter().filter(|o| **o == RecordedOp::Flush).count()
    }

    #[test]
    fn syncs_only_after_changes() {
        let f = Arc::new(FaultyStorage::new(MemStorage::new()));
        let t = Tracked::new(f.clone(), false);
        f.start_recording();
        t.flush_if_dirty().unwrap();
        t.write_at(b"x", 0).unwrap();
        t.flush_if_dirty().unwrap();
        t.flush_if_dirty().unwrap();
        t.discard(0, 1).unwrap();
        t.flush_if_dirty().unwrap();
        t.set_len(4096).unwrap();
        t.flush_if_dirty().unwrap();
        assert_eq!(syncs(&f.take_log()), 3);
    }

    #[test]
    fn failed_sync_leaves_the_flag_set() {
        let f = Arc::new(FaultyStorage::new(MemStorage::new()));
        let t = Tracked::new(f.clone(), false);
        t.write_at(b"x", 0).unwrap();
        f.set_fault(Some(crate::storage::Fault {
            op: crate::storage::FaultOp::Flush,
            nth: 0,
            kind: crate::storage::FaultKind::Eio,
            persistent: false,
        }));
        assert!(t.flush_if_dirty().is_err());
        assert!(t.is_dirty());
        t.flush_if_dirty().unwrap();
        assert!(!t.is_dirty());
    }

    /// A storage whose writes wait until released, to hold one in flight.
    #[derive(Debug)]
    struct Gate {
        inner: MemStorage,
        entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Storage for Gate {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.entered.lock().unwrap().send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.inner.flush()
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
    }

    #[test]
    fn a_write_completing_during_a_sync_stays_unsynced() {
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let gate = Arc::new(Gate {
            inner: MemStorage::new(),
            entered: std::sync::Mutex::new(entered_tx),
            release: std::sync::Mutex::new(release_rx),
        });
        let t = Arc::new(Tracked::new(gate, false));
        // An earlier completed write makes the flag set.
        release_tx.send(()).unwrap();
        t.write_at(b"a", 0).unwrap();
        entered_rx.recv().unwrap();
        // A second write is in flight while a flush syncs.
        let t2 = t.clone();
        let writer = std::thread::spawn(move || t2.write_at(b"b", 1).unwrap());
        entered_rx.recv().unwrap();
        t.flush().unwrap();
        assert!(!t.is_dirty());
        release_tx.send(()).unwrap();
        writer.join().unwrap();
        // The sync did not cover it: the next flush must sync again.
        assert!(t.is_dirty());
    }

    #[test]
    fn no_flush_skips_the_sync() {
        let f = Arc::new(FaultyStorage::new(MemStorage::new()));
        let t = Tracked::new(f.clone(), true);
        f.start_recording();
        t.write_at(b"x", 0).unwrap();
        t.flush().unwrap();
        assert_eq!(syncs(&f.take_log()), 0);
        assert!(!t.is_dirty());
    }
}
