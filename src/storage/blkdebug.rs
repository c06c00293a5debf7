//! `blkdebug`: error injection under the format layer, with QEMU's rule syntax.

use super::backend::{open_from_options, BackendSpec};
use super::Storage;
use crate::error::strerror;
use crate::options::parse::{parse_bool_onoff, parse_number};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

macro_rules! events {
    ($($v:ident = $n:literal,)*) => {
        /// QEMU's blkdebug event names (`BlkdebugEvent`, 48 of them, in QEMU's order).
        ///
        /// A rule switches on when its event is reported with [`Storage::debug_event`]
        /// and then fails the next requests (one if `once`), as in QEMU.
        ///
        /// **Reported by [`BlkdebugStorage`] itself** (storage level): `none` when it
        /// is opened; `read_aio` before every read; `write_aio` and `pwritev` before
        /// every write, `pwritev_done` after it; `pwritev_zero` before a discard
        /// (write-zeroes); `flush_to_disk` before every sync. QEMU reports the read and
        /// write events from the format layer for guest data only; here metadata
        /// requests report them too.
        ///
        /// **Reported by the qcow2 engine** to the image file, at QEMU's points:
        /// `reftable_load` (open, before the refcount table is read); `l2_load`
        /// (an L2 slice read into the cache); `l2_update` (a dirty L2 slice written
        /// back); `l1_update` (L1 entries written); `l2_alloc_cow_read` /
        /// `l2_alloc_write` (a new L2 table: copying a shared one, writing it);
        /// `l2_update_compressed` (a compressed cluster linked); `refblock_load`
        /// (every refcount block lookup, cache hits included, as QEMU's
        /// `load_refcount_block`); `refblock_update_part` (a dirty refcount block
        /// written back); `refblock_alloc` (every refcount update of a block range, as
        /// QEMU's `alloc_refcount_block`); `refblock_alloc_write`,
        /// `refblock_alloc_hookup` (a new refcount block written, entered in the
        /// table); `reftable_grow`, `refblock_alloc_write_blocks`,
        /// `refblock_alloc_write_table`, `refblock_alloc_switch_table` (refcount table
        /// growth); `reftable_update` (refcount table entries written);
        /// `cluster_alloc` (clusters allocated), `cluster_alloc_bytes` (bytes for a
        /// compressed cluster), `cluster_free` (references dropped);
        /// `l1_grow_alloc_table`, `l1_grow_write_table`, `l1_grow_activate_table`,
        /// `l1_shrink_write_table`, `l1_shrink_free_l2_clusters` (resize);
        /// `read_backing_aio` (a read from the backing file), `read_compressed`,
        /// `write_compressed`; `cow_read` / `cow_write` (copy-on-write of an
        /// allocating write's head and tail); `cluster_alloc_space` (a new
        /// cluster's head and tail zeroed by the storage instead, once per
        /// cluster); `flush_to_os` (a flush or close of the
        /// image, before the caches are written).
        ///
        /// Never reported (accepted, the rule never fires): `vmstate_load`,
        /// `vmstate_save` (no VM state), `cor_write` (no copy-on-read),
        /// `empty_image_prepare`. The `pwritev_rmw_*` events
        /// fire only under the node's own `align` (see [`BlkdebugConfig::align`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(missing_docs)]
        #[non_exhaustive]
        pub enum BlkdebugEvent { $($v,)* }

        impl BlkdebugEvent {
            /// Every event, in QEMU's order.
            pub const ALL: &'static [BlkdebugEvent] = &[$(BlkdebugEvent::$v,)*];

            /// QEMU's name (`l2_update`, ...).
            pub fn name(self) -> &'static str {
                match self { $(BlkdebugEvent::$v => $n,)* }
            }

            /// The event called `name`, if QEMU has one.
            pub fn from_name(name: &str) -> Option<BlkdebugEvent> {
                match name { $($n => Some(BlkdebugEvent::$v),)* _ => None }
            }
        }
    };
}

events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

/// I/O types a rule applies to (`iotype`).
const IO_READ: u8 = 1;
const IO_WRITE: u8 = 2;
const IO_WRITE_ZEROES: u8 = 4;
const IO_DISCARD: u8 = 8;
const IO_FLUSH: u8 = 16;
const IO_BLOCK_STATUS: u8 = 32;
const IO_ALL: u8 = 63;

/// An `[inject-error]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError {
    /// `event`.
    pub event: BlkdebugEvent,
    /// `errno` (default EIO).
    pub errno: i32,
    /// `sector`: only requests covering this 512-byte sector fail (`None`: all).
    pub sector: Option<u64>,
    /// `once`: fail one request, then the rule is removed.
    pub once: bool,
    /// `immediately` (accepted; requests are synchronous here, so it changes nothing).
    pub immediately: bool,
    /// `state`: the rule only switches on in this state (0: any).
    pub state: u64,
    iotypes: u8,
}

/// A `[set-state]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetState {
    /// `event`.
    pub event: BlkdebugEvent,
    /// `state`: the rule applies in this state (0: any).
    pub state: u64,
    /// `new_state`.
    pub new_state: u64,
}

/// The rules of a blkdebug node: the config file's, then the inline ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkdebugConfig {
    /// `[inject-error]` / `inject-error.N.*`.
    pub inject: Vec<InjectError>,
    /// `[set-state]` / `set-state.N.*`.
    pub set_state: Vec<SetState>,
    /// `max-transfer`: longer requests are split (0: no limit; a multiple of
    /// `align`).
    pub max_transfer: u64,
    /// `align`: the request alignment (0 or 1: none; a power of two). As QEMU's
    /// block layer does for such a node, a read is widened to whole aligned blocks,
    /// and an unaligned write becomes a read-modify-write of its first and last
    /// block (`pwritev_rmw_head`, `pwritev_rmw_after_head`, `pwritev_rmw_tail`,
    /// `pwritev_rmw_after_tail` around those reads, which rules can fail like any
    /// read) followed by an aligned write; past the end of the image the blocks
    /// read as zeroes, so a write there grows the image to the next multiple of
    /// `align`.
    pub align: u64,
}

fn num(key: &str, v: &str) -> Result<u64, String> {
    parse_number(key, v).map_err(|e| e.to_string())
}

impl BlkdebugConfig {
    fn add_section(&mut self, section: &str, pairs: &[(String, String)]) -> Result<(), String> {
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.as_str())
        };
        let allowed: &[&str] = match section {
            "inject-error" => &[
                "event",
                "errno",
                "sector",
                "once",
                "immediately",
                "state",
                "iotype",
            ],
            "set-state" => &["event", "state", "new_state"],
            _ => return Err(format!("Invalid parameter '{section}'")),
        };
        if let Some((k, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(format!("Invalid parameter '{k}'"));
        }
        let event_name = get("event").ok_or("Parameter 'event' is missing")?;
        let event = BlkdebugEvent::from_name(event_name)
            .ok_or_else(|| format!("invalid parameter value: {event_name}"))?;
        let state = get("state")
            .map(|v| num("state", v))
            .transpose()?
            .unwrap_or(0);
        if section == "set-state" {
            let new_state = num(
                "new_state",
                get("new_state").ok_or("Parameter 'new_state' is missing")?,
            )?;
            self.set_state.push(SetState {
                event,
                state,
                new_state,
            });
            return Ok(());
        }
        let errno = match get("errno") {
            Some(v) => i32::try_from(num("errno", v)?)
                .map_err(|_| format!("Value '{v}' is too large for parameter 'errno'"))?,
            None => libc::EIO,
        };
        let sector = match get("sector") {
            Some(v) if v.starts_with('-') => None,
            Some(v) => Some(num("sector", v)?),
            None => None,
        };
        let flag = |k: &str| {
            get(k)
                .map(|v| parse_bool_onoff(k, v).map_err(|e| e.to_string()))
                .transpose()
        };
        let iotypes = match get("iotype") {
            None => IO_ALL,
            Some(v) => match v {
                "read" => IO_READ,
                "write" => IO_WRITE,
                "write-zeroes" => IO_WRITE_ZEROES,
                "discard" => IO_DISCARD,
                "flush" => IO_FLUSH,
                "block-status" => IO_BLOCK_STATUS,
                _ => return Err(format!("invalid parameter value: {v}")),
            },
        };
        self.inject.push(InjectError {
            event,
            errno,
            sector,
            once: flag("once")?.unwrap_or(false),
            immediately: flag("immediately")?.unwrap_or(false),
            state,
            iotypes,
        });
        Ok(())
    }

    /// Parses a blkdebug config file's text (QEMU's `-readconfig` syntax: `[section]`
    /// lines, `key = "value"` lines, `#` comments).
    ///
    /// # Errors
    /// QEMU's message for an unknown section or key or a bad value.
    pub fn parse_file_text(&mut self, text: &str) -> Result<(), String> {
        let mut section: Option<(String, Vec<(String, String)>)> = None;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                if let Some((s, p)) = section.take() {
                    self.add_section(&s, &p)?;
                }
                section = Some((name.trim().to_owned(), Vec::new()));
                continue;
            }
            let parse_err = || format!("parse error at line {}", n + 1);
            let (k, v) = line.split_once('=').ok_or_else(parse_err)?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .ok_or_else(parse_err)?;
            let (_, pairs) = section.as_mut().ok_or_else(parse_err)?;
            pairs.push((k.trim().to_owned(), v.to_owned()));
        }
        if let Some((s, p)) = section {
            self.add_section(&s, &p)?;
        }
        Ok(())
    }

    /// The inline rules and options of `spec` (`inject-error.N.*`, `set-state.N.*`,
    /// `align`, `max-transfer`), without reading `config`.
    ///
    /// # Errors
    /// QEMU's message for an unknown key or a bad value, or a missing `image`.
    pub fn parse_inline(spec: &BackendSpec) -> Result<BlkdebugConfig, String> {
        let mut cfg = BlkdebugConfig::default();
        let mut has_image = false;
        let mut groups: Vec<Group> = Vec::new();
        for (k, v) in &spec.options {
            match k.as_str() {
                "config" | "node-name" | "read-only" | "x-image" => {}
                "align" => {
                    cfg.align = num(k, v)?;
                    if cfg.align != 0
                        && (cfg.align >= i32::MAX as u64 || !cfg.align.is_power_of_two())
                    {
                        return Err(format!("Cannot meet constraints with align {}", cfg.align));
                    }
                }
                "max-transfer" => cfg.max_transfer = num(k, v)?,
                "image" => has_image = true,
                _ if k.starts_with("image.") => has_image = true,
                _ => {
                    let (sect, rest) = k
                        .split_once('.')
                        .filter(|(s, _)| *s == "inject-error" || *s == "set-state")
                        .ok_or_else(|| format!("Invalid parameter '{k}'"))?;
                    let (idx, key) = rest
                        .split_once('.')
                        .ok_or_else(|| format!("Invalid parameter '{k}'"))?;
                    match groups.iter_mut().find(|(s, i, _)| s == sect && i == idx) {
                        Some((_, _, p)) => p.push((key.to_owned(), v.clone())),
                        None => groups.push((
                            sect.to_owned(),
                            idx.to_owned(),
                            vec![(key.to_owned(), v.clone())],
                        )),
                    }
                }
            }
        }
        if cfg.max_transfer != 0
            && (cfg.max_transfer >= i32::MAX as u64
                || !cfg.max_transfer.is_multiple_of(cfg.align.max(1)))
        {
            return Err(format!(
                "Cannot meet constraints with max-transfer {}",
                cfg.max_transfer
            ));
        }
        if !has_image {
            return Err("A block device must be specified for \"image\"".into());
        }
        for (s, _, p) in &groups {
            cfg.add_section(s, p)?;
        }
        Ok(cfg)
    }
}

/// An inline rule being collected: section, index, its key/value pairs.
type Group = (String, String, Vec<(String, String)>);

#[derive(Debug)]
struct RuleState {
    state: u64,
    /// Indexes into `inject` of the rules that are switched on.
    active: Vec<usize>,
    /// Rules removed by `once`.
    removed: Vec<bool>,
    /// How often each event was reported, indexed as [`BlkdebugEvent::ALL`].
    counts: Vec<u64>,
}

/// A storage that fails requests as its blkdebug rules say (see [`BlkdebugEvent`]).
#[derive(Debug)]
pub struct BlkdebugStorage {
    inner: Arc<dyn Storage>,
    cfg: BlkdebugConfig,
    rules: Mutex<RuleState>,
    /// Per event (indexed as [`BlkdebugEvent::ALL`]), its rules, so that an event
    /// costs what its own rules cost (a `[set-state]` chain counting thousands of
    /// occurrences stays cheap).
    by_event: Vec<EventRules>,
}

/// The rules of one event.
#[derive(Debug, Default)]
struct EventRules {
    /// Indexes into `inject`.
    inject: Vec<usize>,
    /// `[set-state]` rules by `state`: the index into `set_state` of the last one
    /// given for that state.
    set_state: HashMap<u64, usize>,
    /// The last `[set-state]` rule with `state` 0 (any).
    set_state_any: Option<usize>,
}

impl BlkdebugStorage {
    /// Opens the `blkdebug` node `spec`: reads `config`, adds the inline rules, opens
    /// `image`, then reports the `none` event.
    ///
    /// # Errors
    /// QEMU's message for bad options, an unreadable config file or image.
    pub fn open(spec: &BackendSpec, read_only: bool) -> Result<BlkdebugStorage, String> {
        let inline = BlkdebugConfig::parse_inline(spec)?;
        let mut cfg = BlkdebugConfig::default();
        if let Some(path) = spec.get("config") {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "Could not read blkdebug config file: {}",
                    strerror(e.raw_os_error().unwrap_or(libc::EIO))
                )
            })?;
            cfg.parse_file_text(&text)?;
        }
        cfg.inject.extend(inline.inject);
        cfg.set_state.extend(inline.set_state);
        cfg.align = inline.align;
        cfg.max_transfer = inline.max_transfer;
        let mut image = spec.child("image");
        if image.driver.is_empty() {
            image.driver = "file".into();
        }
        let inner = open_from_options(&image, read_only)?;
        let s = Self::new(inner, cfg);
        s.debug_event(BlkdebugEvent::None);
        Ok(s)
    }

    /// `inner` under the rules of `cfg`.
    pub fn new(inner: Arc<dyn Storage>, cfg: BlkdebugConfig) -> BlkdebugStorage {
        let n = cfg.inject.len();
        let mut by_event: Vec<EventRules> = BlkdebugEvent::ALL
            .iter()
            .map(|_| EventRules::default())
            .collect();
        for (i, rule) in cfg.inject.iter().enumerate() {
            if let Some(e) = by_event.get_mut(rule.event as usize) {
                e.inject.push(i);
            }
        }
        for (i, rule) in cfg.set_state.iter().enumerate() {
            if let Some(e) = by_event.get_mut(rule.event as usize) {
                if rule.state == 0 {
                    e.set_state_any = Some(i);
                } else {
                    e.set_state.insert(rule.state, i);
                }
            }
        }
        BlkdebugStorage {
            inner,
            by_event,
            cfg,
            rules: Mutex::new(RuleState {
                state: 1,
                active: Vec::new(),
                removed: vec![false; n],
                counts: vec![0; BlkdebugEvent::ALL.len()],
            }),
        }
    }

    /// The current state (starts at 1).
    pub fn state(&self) -> u64 {
        self.rules.lock().map(|r| r.state).unwrap_or(0)
    }

    /// How many times each event has been reported since the node was created
    /// (`none` at open included), in [`BlkdebugEvent::ALL`]'s order, events never
    /// reported left out. Not QEMU's (it has no such query): it lets a test write
    /// rules for the k-th occurrence of an event, counted with `[set-state]` chains.
    pub fn event_counts(&self) -> Vec<(BlkdebugEvent, u64)> {
        let Ok(r) = self.rules.lock() else {
            return Vec::new();
        };
        BlkdebugEvent::ALL
            .iter()
            .zip(&r.counts)
            .filter(|(_, &n)| n > 0)
            .map(|(&e, &n)| (e, n))
            .collect()
    }

    /// Fails the request if an active rule covers it.
    fn check(&self, iotype: u8, offset: u64, len: u64) -> io::Result<()> {
        let Ok(mut r) = self.rules.lock() else {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        };
        let hit = r.active.iter().position(|&i| {
            let rule = &self.cfg.inject[i];
            rule.iotypes & iotype != 0
                && rule.sector.is_none_or(|s| {
                    let at = s.saturating_mul(512);
                    len > 0 && at >= offset && at < offset.saturating_add(len)
                })
        });
        let Some(pos) = hit else { return Ok(()) };
        let i = r.active[pos];
        let rule = &self.cfg.inject[i];
        if rule.once {
            r.active.remove(pos);
            r.removed[i] = true;
        }
        Err(io::Error::from_raw_os_error(rule.errno))
    }

    fn split(&self, len: usize) -> usize {
        match usize::try_from(self.cfg.max_transfer) {
            Ok(0) | Err(_) => len.max(1),
            Ok(m) => m,
        }
    }

    /// The aligned range `[start, end)` around `len` bytes at `offset`, if `align`
    /// asks for one and the request is not aligned already.
    fn widen(&self, offset: u64, len: usize) -> io::Result<Option<(u64, u64)>> {
        let a = self.cfg.align;
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if a <= 1 || (offset.is_multiple_of(a) && end.is_multiple_of(a)) {
            return Ok(None);
        }
        let start = offset - offset % a;
        let end = end
            .checked_next_multiple_of(a)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(Some((start, end)))
    }

    /// A read of whole aligned blocks (rules checked): the bytes past the end of
    /// the image read as zeroes, as in QEMU's block layer.
    fn read_padded(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(IO_READ, offset, buf.len() as u64)?;
        let len = self.inner.len()?;
        let present = usize::try_from(len.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (head, tail) = buf.split_at_mut(present);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.inner.read_at(head, offset)
    }

    /// Reads `buf` at `offset` a `max-transfer` piece at a time (`read_aio` before
    /// each), zeroes past the end of the image when `padded`.
    fn read_pieces(&self, buf: &mut [u8], offset: u64, padded: bool) -> io::Result<()> {
        let step = self.split(buf.len());
        for (i, part) in buf.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            self.debug_event(BlkdebugEvent::ReadAio);
            if padded {
                self.read_padded(part, at)?;
            } else {
                self.check(IO_READ, at, part.len() as u64)?;
                self.inner.read_at(part, at)?;
            }
        }
        Ok(())
    }

    /// Writes aligned (or unconstrained) data, a `max-transfer` piece at a time.
    fn write_pieces(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let step = self.split(buf.len());
        for (i, part) in buf.chunks(step).enumerate() {
            let at = offset + (i * step) as u64;
            self.debug_event(BlkdebugEvent::WriteAio);
            self.debug_event(BlkdebugEvent::Pwritev);
            self.check(IO_WRITE, at, part.len() as u64)?;
            self.inner.write_at(part, at)?;
            self.debug_event(BlkdebugEvent::PwritevDone);
        }
        Ok(())
    }
}

impl Storage for BlkdebugStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Widened to `align` first, then split (`max-transfer` is a multiple of it).
        let Some((start, end)) = self.widen(offset, buf.len())? else {
            return self.read_pieces(buf, offset, false);
        };
        let mut tmp = vec![0u8; usize::try_from(end - start).unwrap_or(usize::MAX)];
        self.read_pieces(&mut tmp, start, true)?;
        let at = usize::try_from(offset - start).unwrap_or(usize::MAX);
        let src = tmp
            .get(at..at.saturating_add(buf.len()))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some((start, end)) = self.widen(offset, buf.len())? else {
            return self.write_pieces(buf, offset);
        };
        let a = self.cfg.align;
        let mut tmp = vec![0u8; usize::try_from(end - start).unwrap_or(usize::MAX)];
        let block = usize::try_from(a).unwrap_or(usize::MAX);
        let head = !offset.is_multiple_of(a);
        let tail = !(offset + buf.len() as u64).is_multiple_of(a);
        if head {
            self.debug_event(BlkdebugEvent::PwritevRmwHead);
            let b = tmp.get_mut(..block).unwrap_or_default();
            self.read_padded(b, start)?;
            self.debug_event(BlkdebugEvent::PwritevRmwAfterHead);
        }
        // One block holding both ends was read with the head.
        if tail && !(head && end - start == a) {
            self.debug_event(BlkdebugEvent::PwritevRmwTail);
            let from = tmp.len().saturating_sub(block);
            let b = tmp.get_mut(from..).unwrap_or_default();
            self.read_padded(b, end - a)?;
            self.debug_event(BlkdebugEvent::PwritevRmwAfterTail);
        }
        let at = usize::try_from(offset - start).unwrap_or(usize::MAX);
        tmp.get_mut(at..at.saturating_add(buf.len()))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?
            .copy_from_slice(buf);
        self.write_pieces(&tmp, start)
    }

    fn flush(&self) -> io::Result<()> {
        self.debug_event(BlkdebugEvent::FlushToDisk);
        self.check(IO_FLUSH, 0, 0)?;
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.debug_event(BlkdebugEvent::PwritevZero);
        self.check(IO_DISCARD | IO_WRITE_ZEROES, offset, len)?;
        self.inner.discard(offset, len)
    }

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.is_hole(offset, len)
    }

    fn data_extent(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        self.check(IO_BLOCK_STATUS, offset, max)?;
        self.inner.data_extent(offset, max)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }

    fn lock(&self, req: &super::LockRequest) -> Result<(), super::LockError> {
        self.inner.lock(req)
    }

    fn set_event_sink(&self, sink: Option<crate::events::EventSink>) {
        self.inner.set_event_sink(sink)
    }

    fn debug_event(&self, event: BlkdebugEvent) {
        let Ok(mut r) = self.rules.lock() else { return };
        if let Some(n) = r.counts.get_mut(event as usize) {
            *n += 1;
        }
        let state = r.state;
        let Some(rules) = self.by_event.get(event as usize) else {
            return;
        };
        for &i in &rules.inject {
            let Some(rule) = self.cfg.inject.get(i) else {
                continue;
            };
            if !r.removed.get(i).copied().unwrap_or(true)
                && (rule.state == 0 || rule.state == state)
                && !r.active.contains(&i)
            {
                r.active.push(i);
            }
        }
        // The last rule that applies sets the new state.
        let last = rules
            .set_state
            .get(&state)
            .copied()
            .max(rules.set_state_any);
        if let Some(s) = last.and_then(|i| self.cfg.set_state.get(i)) {
            r.state = s.new_state;
        }
    }
}
