//! `quorum`: one storage replicated on several children, reads decided by a vote.

use super::backend::{open_from_options, BackendSpec};
use super::Storage;
use crate::events::{Event, EventHandler, EventSink, QuorumOpType};
use crate::options::parse::{parse_bool_onoff, parse_number};
use std::io;
use std::sync::{Arc, Mutex, RwLock};

/// How reads pick their data (`read-pattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPattern {
    /// Read every child and vote (the default).
    Quorum,
    /// Read the first child that does not fail.
    Fifo,
}

/// The options of a `quorum` node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumConfig {
    /// `vote-threshold`: identical versions a read needs, successes a write needs.
    pub threshold: usize,
    /// `rewrite-corrupted`: write the winning data over the children that lost the vote.
    pub rewrite_corrupted: bool,
    /// `read-pattern`.
    pub read_pattern: ReadPattern,
    /// `blkverify`: 2 children, threshold 2, a mismatch fails the read.
    pub blkverify: bool,
    /// `children.N.*`, in index order.
    pub children: Vec<BackendSpec>,
    /// `node-name` of the quorum node (the `reference` of `QUORUM_FAILURE`).
    pub node_name: Option<String>,
}

impl QuorumConfig {
    /// Parses the `quorum` options of `spec` (QEMU's texts on error).
    ///
    /// # Errors
    /// QEMU's message for a missing or bad option.
    pub fn parse(spec: &BackendSpec) -> Result<QuorumConfig, String> {
        let mut threshold = 0u64;
        let mut rewrite = false;
        let mut pattern = ReadPattern::Quorum;
        let mut blkverify = false;
        let mut max_child: Option<usize> = None;
        let mut node_name = None;
        for (k, v) in &spec.options {
            match k.as_str() {
                "vote-threshold" => threshold = parse_number(k, v).map_err(|e| e.to_string())?,
                "rewrite-corrupted" => {
                    rewrite = parse_bool_onoff(k, v).map_err(|e| e.to_string())?
                }
                "blkverify" => blkverify = parse_bool_onoff(k, v).map_err(|e| e.to_string())?,
                "read-pattern" => {
                    pattern = match v.as_str() {
                        "quorum" => ReadPattern::Quorum,
                        "fifo" => ReadPattern::Fifo,
                        _ => return Err(format!("invalid parameter value: {v}")),
                    }
                }
                "node-name" => node_name = Some(v.clone()),
                "read-only" => {}
                _ => {
                    let idx = k
                        .strip_prefix("children.")
                        .and_then(|r| r.split_once('.'))
                        .and_then(|(i, _)| i.parse::<usize>().ok())
                        .filter(|&i| i < 64)
                        .ok_or_else(|| format!("Invalid parameter '{k}'"))?;
                    max_child = Some(max_child.map_or(idx, |m| m.max(idx)));
                }
            }
        }
        let mut children = Vec::new();
        for i in 0..max_child.map_or(0, |m| m + 1) {
            let mut c = spec.child(&format!("children.{i}"));
            if c.driver.is_empty() && c.options.is_empty() {
                return Err(format!("Parameter 'children.{i}' is missing"));
            }
            if c.driver.is_empty() {
                c.driver = "file".into();
            }
            c.validate()?;
            children.push(c);
        }
        if threshold < 1 {
            return Err("Parameter 'vote-threshold' expects a value >= 1".into());
        }
        if children.is_empty() {
            return Err("Number of provided children must be 1 or more".into());
        }
        let threshold = usize::try_from(threshold).unwrap_or(usize::MAX);
        if threshold > children.len() {
            return Err("threshold may not exceed children count".into());
        }
        if rewrite && pattern == ReadPattern::Fifo {
            return Err("rewrite-corrupted=on cannot be used with read-pattern=fifo".into());
        }
        if blkverify && (children.len() != 2 || threshold != 2) {
            return Err(
                "blkverify=on can only be set if there are exactly two files and vote-threshold is 2"
                    .into(),
            );
        }
        Ok(QuorumConfig {
            threshold,
            rewrite_corrupted: rewrite,
            read_pattern: pattern,
            blkverify,
            children,
            node_name,
        })
    }
}

/// A storage replicated on `children` (see [`QuorumConfig`]). Reads vote over the
/// whole request, as QEMU's: every child is read, the copies are grouped by equal
/// content over the whole buffer, and the biggest group wins if it has at least
/// `vote-threshold` members (on a tie, the content first seen last, as QEMU picks);
/// the children outside it lost the vote, and with `rewrite-corrupted` get the whole
/// request rewritten with the winning data. So two children bad in different sectors
/// of one request make two losing versions, and with three children and a threshold
/// of 2 the request fails, even though each sector alone has a majority. Writes go to
/// every child and succeed when at least `vote-threshold` do.
///
/// **Events**, with QEMU's fields, go to the sink given with
/// [`Storage::set_event_sink`] (an [`crate::Image`] passes its own) and are also kept
/// for [`QuorumStorage::take_events`]:
/// * [`Event::QuorumReportBad`] for each child that failed a request (with the error)
///   or whose data lost a read's vote (without), over the whole request's sectors;
///   flushes report sector 0, count 0.
/// * [`Event::QuorumFailure`] when fewer than `vote-threshold` children succeeded (read
///   or write) or agreed on a read; the request fails (EIO when the children's data
///   disagreed, else a child's error). `blkverify` mismatches fail with EIO without it
///   (QEMU exits there).
///
/// **Node names.** A child is named by its `children.N.node-name` option; without
/// one, by a generated stable name `#Q.children.N`, `Q` being the quorum's `node-name`
/// or `quorum` (QEMU generates `#blockNNN` from a process-wide counter; the `#` keeps
/// generated names apart from given ones, which cannot contain it). The quorum's
/// `reference` is its `node-name`, or `#quorum`.
///
/// **Replacing a child** (what a mirror with QAPI `replaces` does to a
/// quorum child, see [`crate::job::MirrorOptions::replaces`]):
/// [`QuorumStorage::begin_replace`] attaches a *spare* storage for a child;
/// from then on every write, discard and resize reaches the spare too
/// (errors there are remembered, not voted on);
/// [`QuorumStorage::copy_to_spare`] copies the voted content of a range
/// into it with writes held off meanwhile, so a racing write is never
/// overwritten with older data; [`QuorumStorage::finish_replace`] flushes
/// the spare and swaps it in for the child, which keeps its node name;
/// [`QuorumStorage::abort_replace`] drops the spare.
#[derive(Debug)]
pub struct QuorumStorage {
    cfg: QuorumConfig,
    children: RwLock<Vec<Arc<dyn Storage>>>,
    /// The child being replaced, if any. Writes hold it shared for their
    /// whole fan-out, copies to the spare exclusively (lock order: this,
    /// then `children`).
    spare: RwLock<Option<Spare>>,
    names: Vec<String>,
    reference: String,
    sink: RwLock<EventHandler>,
    events: Mutex<Vec<Event>>,
}

/// Why [`QuorumStorage::copy_to_spare`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SpareError {
    /// Reading the quorum failed (its vote).
    Read(io::Error),
    /// Writing the spare failed (now, or a write that reached it before),
    /// or no replace is begun.
    Write(io::Error),
}

/// A storage being filled to replace the child `index`.
#[derive(Debug)]
struct Spare {
    index: usize,
    storage: Arc<dyn Storage>,
    /// The errno of the first failed write to the spare.
    failed: Mutex<Option<i32>>,
}

impl Spare {
    /// Runs `f` on the spare, remembering a failure.
    fn apply(&self, f: impl Fn(&dyn Storage) -> io::Result<()>) {
        if let Err(e) = f(&*self.storage) {
            if let Ok(mut g) = self.failed.lock() {
                g.get_or_insert(e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
    }

    /// The remembered failure, as an error.
    fn check(&self) -> io::Result<()> {
        match self.failed.lock().map(|g| *g) {
            Ok(None) => Ok(()),
            Ok(Some(errno)) => Err(io::Error::from_raw_os_error(errno)),
            Err(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }
}

/// Events kept for [`QuorumStorage::take_events`] (older ones are dropped first).
const KEPT_EVENTS: usize = 4096;

fn sectors(offset: u64, len: usize) -> (u64, u64) {
    let end = offset.saturating_add(len as u64);
    (offset / 512, end.div_ceil(512) - offset / 512)
}

impl QuorumStorage {
    /// Opens the children of the `quorum` node `spec`.
    ///
    /// # Errors
    /// QEMU's message for bad options or a child that cannot be opened.
    pub fn open(spec: &BackendSpec, read_only: bool) -> Result<QuorumStorage, String> {
        let cfg = QuorumConfig::parse(spec)?;
        let children = cfg
            .children
            .iter()
            .map(|c| open_from_options(c, read_only))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_children(cfg, children))
    }

    /// A quorum over already opened children (`cfg.children` is not used to open
    /// them, only for the children's `node-name`s).
    pub fn from_children(cfg: QuorumConfig, children: Vec<Arc<dyn Storage>>) -> QuorumStorage {
        let base = cfg.node_name.as_deref().unwrap_or("quorum");
        let names = (0..children.len())
            .map(|i| {
                cfg.children
                    .get(i)
                    .and_then(|c| c.get("node-name"))
                    .map_or_else(|| format!("#{base}.children.{i}"), str::to_owned)
            })
            .collect();
        let reference = cfg
            .node_name
            .clone()
            .unwrap_or_else(|| "#quorum".to_owned());
        QuorumStorage {
            cfg,
            children: RwLock::new(children),
            spare: RwLock::new(None),
            names,
            reference,
            sink: RwLock::new(EventHandler::default()),
            events: Mutex::new(Vec::new()),
        }
    }

    /// The children's node names, in index order (given or generated).
    pub fn child_node_names(&self) -> &[String] {
        &self.names
    }

    /// The index of the child whose node name is `name`.
    pub fn child_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The children, in index order (a snapshot: a replace may swap one).
    pub fn children(&self) -> Vec<Arc<dyn Storage>> {
        self.children
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn spare_shared(&self) -> std::sync::RwLockReadGuard<'_, Option<Spare>> {
        self.spare.read().unwrap_or_else(|p| p.into_inner())
    }

    fn spare_exclusive(&self) -> std::sync::RwLockWriteGuard<'_, Option<Spare>> {
        self.spare.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts replacing the child `index` with `spare`: the spare is sized
    /// as the quorum, and from now on receives every write, discard and
    /// resize.
    ///
    /// # Errors
    /// `EINVAL` for an index out of range; `EBUSY` while another replace
    /// is unfinished; the spare's error sizing it.
    pub fn begin_replace(&self, index: usize, spare: Arc<dyn Storage>) -> io::Result<()> {
        let mut g = self.spare_exclusive();
        if index >= self.children().len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if g.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        spare.set_len(self.len()?)?;
        *g = Some(Spare {
            index,
            storage: spare,
            failed: Mutex::new(None),
        });
        Ok(())
    }

    /// Copies the voted content of `[offset, offset + buf.len())` (cut at
    /// the quorum's end) into the spare through `buf`, with writes held
    /// off meanwhile; the bytes copied.
    ///
    /// # Errors
    /// [`SpareError::Read`]: the read's error (the vote failed:
    /// `QUORUM_FAILURE`); [`SpareError::Write`]: the spare's write error,
    /// or an earlier one of a write that reached it, or `EINVAL` with no
    /// replace begun.
    pub fn copy_to_spare(&self, buf: &mut [u8], offset: u64) -> Result<usize, SpareError> {
        let g = self.spare_exclusive();
        let spare = g
            .as_ref()
            .ok_or_else(|| SpareError::Write(io::Error::from_raw_os_error(libc::EINVAL)))?;
        spare.check().map_err(SpareError::Write)?;
        let len = self.len().map_err(SpareError::Read)?;
        let n = usize::try_from(len.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(chunk) = buf.get_mut(..n) else {
            return Ok(0);
        };
        if n > 0 {
            self.read_at(chunk, offset).map_err(SpareError::Read)?;
            spare
                .storage
                .write_at(chunk, offset)
                .map_err(SpareError::Write)?;
        }
        Ok(n)
    }

    /// Flushes the spare and puts it in place of the child it replaces
    /// (which keeps its node name); returns the replaced child.
    ///
    /// # Errors
    /// `EINVAL` with no replace begun; the spare's flush error, or the
    /// error of a write that reached it (the replace is then dropped and
    /// the child stays).
    pub fn finish_replace(&self) -> io::Result<Arc<dyn Storage>> {
        let mut g = self.spare_exclusive();
        let spare = g
            .take()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        spare.check()?;
        spare.storage.flush()?;
        let mut children = self.children.write().unwrap_or_else(|p| p.into_inner());
        let slot = children
            .get_mut(spare.index)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(std::mem::replace(slot, spare.storage))
    }

    /// Drops the spare of an unfinished replace (nothing changes).
    pub fn abort_replace(&self) {
        self.spare_exclusive().take();
    }

    /// The events raised since the last call (at most the last 4096).
    pub fn take_events(&self) -> Vec<Event> {
        self.events
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    fn emit(&self, ev: Event) {
        if let Ok(sink) = self.sink.read() {
            if let Some(s) = sink.0.as_ref() {
                s(&ev);
            }
        }
        if let Ok(mut r) = self.events.lock() {
            if r.len() >= KEPT_EVENTS {
                r.remove(0);
            }
            r.push(ev);
        }
    }

    fn report_bad(
        &self,
        child: usize,
        kind: QuorumOpType,
        error: Option<&io::Error>,
        off: u64,
        len: usize,
    ) {
        let (sector_num, sectors_count) = if kind == QuorumOpType::Flush {
            (0, 0)
        } else {
            sectors(off, len)
        };
        self.emit(Event::QuorumReportBad {
            kind,
            error: error.map(|e| crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))),
            node_name: self.names.get(child).cloned().unwrap_or_default(),
            sector_num,
            sectors_count,
        });
    }

    fn report_failure(&self, off: u64, len: usize) {
        let (sector_num, sectors_count) = sectors(off, len);
        self.emit(Event::QuorumFailure {
            reference: self.reference.clone(),
            sector_num,
            sectors_count,
        });
    }

    /// Runs `f` on every child; Ok when at least `threshold` succeed.
    fn all(
        &self,
        kind: QuorumOpType,
        off: u64,
        len: usize,
        f: impl Fn(&dyn Storage) -> io::Result<()>,
    ) -> io::Result<()> {
        let spare = self.spare_shared();
        if let Some(s) = spare.as_ref() {
            s.apply(&f);
        }
        let mut ok = 0;
        let mut first_err = None;
        for (i, c) in self.children().iter().enumerate() {
            match f(&**c) {
                Ok(()) => ok += 1,
                Err(e) => {
                    self.report_bad(i, kind, Some(&e), off, len);
                    first_err.get_or_insert(e);
                }
            }
        }
        if ok >= self.cfg.threshold {
            return Ok(());
        }
        // QEMU reports no failure for flushes.
        if kind != QuorumOpType::Flush {
            self.report_failure(off, len);
        }
        Err(first_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)))
    }
}

impl Storage for QuorumStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let children = self.children();
        if self.cfg.read_pattern == ReadPattern::Fifo {
            let mut last = None;
            for (i, c) in children.iter().enumerate() {
                match c.read_at(buf, offset) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        self.report_bad(i, QuorumOpType::Read, Some(&e), offset, buf.len());
                        last = Some(e);
                    }
                }
            }
            return Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)));
        }
        // Read every child, then vote over the whole request, as QEMU's
        // `quorum_vote`: the copies are grouped by equal content, the biggest group
        // wins if it has `vote-threshold` members.
        let mut copies: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut first_err = None;
        for (i, c) in children.iter().enumerate() {
            let mut b = vec![0u8; buf.len()];
            match c.read_at(&mut b, offset) {
                Ok(()) => copies.push((i, b)),
                Err(e) => {
                    self.report_bad(i, QuorumOpType::Read, Some(&e), offset, buf.len());
                    first_err.get_or_insert(e);
                }
            }
        }
        if copies.len() < self.cfg.threshold {
            self.report_failure(offset, buf.len());
            return Err(first_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)));
        }
        // Versions: the holders (indices into `copies`) of each distinct content, in
        // the order first seen.
        let mut versions: Vec<Vec<usize>> = Vec::new();
        for (k, (_, b)) in copies.iter().enumerate() {
            match versions.iter_mut().find(|who| {
                who.first()
                    .and_then(|&f| copies.get(f))
                    .is_some_and(|(_, first)| first == b)
            }) {
                Some(who) => who.push(k),
                None => versions.push(vec![k]),
            }
        }
        if self.cfg.blkverify && versions.len() > 1 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // On a tie the version seen last wins: QEMU inserts new versions at the head
        // of its list and takes the first with the most votes. `max_by_key` returns
        // the last maximum, the same one.
        let win = (0..versions.len())
            .max_by_key(|&v| versions[v].len())
            .filter(|&w| versions[w].len() >= self.cfg.threshold);
        let Some(win) = win else {
            self.report_failure(offset, buf.len());
            return Err(io::Error::from_raw_os_error(libc::EIO));
        };
        let Some((_, data)) = versions[win].first().and_then(|&k| copies.get(k)) else {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        };
        buf.copy_from_slice(data);
        for (v, who) in versions.iter().enumerate() {
            if v == win {
                continue;
            }
            for &k in who {
                let child = copies[k].0;
                self.report_bad(child, QuorumOpType::Read, None, offset, buf.len());
                if self.cfg.rewrite_corrupted {
                    // The whole request, best effort, as QEMU's: a failed rewrite
                    // does not fail the read.
                    let _ = children[child].write_at(buf, offset);
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.all(QuorumOpType::Write, offset, buf.len(), |c| {
            c.write_at(buf, offset)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.all(QuorumOpType::Flush, 0, 0, |c| c.flush())
    }

    fn len(&self) -> io::Result<u64> {
        self.children()
            .first()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?
            .len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.all(QuorumOpType::Write, len, 0, |c| c.set_len(len))
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        self.all(QuorumOpType::Write, offset, n, |c| c.discard(offset, len))
    }

    fn as_quorum(&self) -> Option<&QuorumStorage> {
        Some(self)
    }

    fn set_event_sink(&self, sink: Option<EventSink>) {
        for c in &self.children() {
            c.set_event_sink(sink.clone());
        }
        if let Ok(mut s) = self.sink.write() {
            *s = EventHandler(sink);
        }
    }
}
