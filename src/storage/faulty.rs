//! A [`Storage`] wrapper for tests: records every mutating call (for crash
//! replay) and fails a chosen call with EIO or ENOSPC (for fault injection).

use super::Storage;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Which calls a [`Fault`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `set_len` and `allocate`.
    SetLen,
    /// Every call of the above.
    Any,
}

/// The error a [`Fault`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `EIO`.
    Eio,
    /// `ENOSPC`.
    Enospc,
}

impl FaultKind {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            FaultKind::Eio => libc::EIO,
            FaultKind::Enospc => libc::ENOSPC,
        })
    }
}

/// Fail the `nth` (0-based) call of kind `op`, once or from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Which calls are counted.
    pub op: FaultOp,
    /// The 0-based index of the first failing call among those counted.
    pub nth: u64,
    /// The error returned.
    pub kind: FaultKind,
    /// Whether every later counted call fails too.
    pub persistent: bool,
}

/// One recorded mutating call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedOp {
    /// A successful `write_at`.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// A successful `flush`.
    Flush,
    /// A successful `set_len`.
    SetLen(u64),
    /// A successful `discard`.
    Discard {
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
    },
}

/// Records mutating calls and injects faults; see the module docs.
#[derive(Debug)]
pub struct FaultyStorage<S> {
    inner: S,
    log: Mutex<Option<Vec<RecordedOp>>>,
    fault: Mutex<Option<Fault>>,
    counters: [AtomicU64; 4],
}

impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner`; nothing is recorded and no fault is armed yet.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            log: Mutex::new(None),
            fault: Mutex::new(None),
            counters: Default::default(),
        }
    }

    /// Starts recording (clearing anything recorded before).
    pub fn start_recording(&self) {
        if let Ok(mut l) = self.log.lock() {
            *l = Some(Vec::new());
        }
    }

    /// Stops recording and returns what was recorded.
    pub fn take_log(&self) -> Vec<RecordedOp> {
        self.log
            .lock()
            .ok()
            .and_then(|mut l| l.take())
            .unwrap_or_default()
    }

    /// Arms a fault (replacing any earlier one) and resets the call counters.
    pub fn set_fault(&self, fault: Option<Fault>) {
        for c in &self.counters {
            c.store(0, Ordering::SeqCst);
        }
        if let Ok(mut f) = self.fault.lock() {
            *f = fault;
        }
    }

    /// How many calls of each kind (read, write, flush, set_len) were made
    /// since the last [`set_fault`](Self::set_fault).
    pub fn counts(&self) -> [u64; 4] {
        [0, 1, 2, 3].map(|i| self.counters[i].load(Ordering::SeqCst))
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn check(&self, op: FaultOp) -> io::Result<()> {
        let idx = match op {
            FaultOp::Read => 0,
            FaultOp::Write => 1,
            FaultOp::Flush => 2,
            _ => 3,
        };
        let n_op = self.counters[idx].fetch_add(1, Ordering::SeqCst);
        let guard = self
            .fault
            .lock()
            .map_err(|_| io::Error::other("fault lock poisoned"))?;
        if let Some(f) = *guard {
            let n = if f.op == FaultOp::Any {
                self.counters
                    .iter()
                    .map(|c| c.load(Ordering::SeqCst))
                    .sum::<u64>()
                    - 1
            } else if f.op == op {
                n_op
            } else {
                return Ok(());
            };
            if n == f.nth || (f.persistent && n > f.nth) {
                return Err(f.kind.error());
            }
        }
        Ok(())
    }

    fn record(&self, op: RecordedOp) {
        if let Ok(mut l) = self.log.lock() {
            if let Some(log) = l.as_mut() {
                log.push(op);
            }
        }
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(FaultOp::Read)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(FaultOp::Write)?;
        self.inner.write_at(buf, offset)?;
        self.record(RecordedOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.check(FaultOp::Flush)?;
        self.inner.flush()?;
        self.record(RecordedOp::Flush);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check(FaultOp::SetLen)?;
        self.inner.set_len(len)?;
        self.record(RecordedOp::SetLen(len));
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(FaultOp::SetLen)?;
        let before = self.inner.len()?;
        self.inner.allocate(offset, len)?;
        let after = self.inner.len()?;
        if after != before {
            self.record(RecordedOp::SetLen(after));
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(FaultOp::Write)?;
        self.inner.discard(offset, len)?;
        self.record(RecordedOp::Discard { offset, len });
        Ok(())
    }

    fn lock(&self, req: &super::LockRequest) -> Result<(), super::LockError> {
        self.inner.lock(req)
    }

    fn set_event_sink(&self, sink: Option<crate::events::EventSink>) {
        self.inner.set_event_sink(sink)
    }

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.is_hole(offset, len)
    }

    fn data_extent(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        self.inner.data_extent(offset, max)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

/// Applies `ops` to `base`, producing the bytes a file would hold after them.
pub fn replay(base: &[u8], ops: &[RecordedOp]) -> Vec<u8> {
    let mut out = base.to_vec();
    for op in ops {
        match op {
            RecordedOp::Write { offset, data } => {
                let start = *offset as usize;
                let end = start + data.len();
                if out.len() < end {
                    out.resize(end, 0);
                }
                out[start..end].copy_from_slice(data);
            }
            RecordedOp::Flush => {}
            RecordedOp::SetLen(len) => out.resize(*len as usize, 0),
            RecordedOp::Discard { offset, len } => {
                let start = (*offset as usize).min(out.len());
                let end = (offset.saturating_add(*len) as usize).min(out.len());
                out[start..end].fill(0);
            }
        }
    }
    out
}
