//! The snapshot table as the checker reads it (QEMU's
//! `qcow2_check_read_snapshot_table` and `qcow2_check_fix_snapshot_table`).
//!
//! Unlike opening an image, a check reads the table entry by entry exactly
//! as QEMU does (bytes past the end of the file read as zeroes), and with
//! `-r all` it drops snapshots that overhang QEMU's limits (updating
//! `nb_snapshots` right away, which only leaks clusters) and truncates
//! oversized extra data. Entries that need rewriting (incomplete v3 entries,
//! truncated extra data) are written as a new table after the refcounts are
//! right: allocate, write, sync, switch the header with one write, free the
//! old table.

use super::findings::{CheckCounts, Finding};
use super::pass::Pass;
use crate::error::{Error, Limit, Result};
use crate::format::consts::*;
use crate::format::header::field;
use crate::format::snapshot::{encode_snapshot_table, snapshot_table_size, SnapshotEntry};
use crate::format::{be_u16, be_u32, be_u64};
use crate::meta::DiscardType;
use crate::types::ClusterCount;

/// Size of the fixed part of an entry.
const HEADER_SIZE: u64 = 40;
/// Extra data QEMU knows (vm_state_size_large, disk_size, icount).
const KNOWN_EXTRA: u32 = 24;
/// Window of the file read at once while decoding the table.
const WINDOW: u64 = 1 << 20;

/// One snapshot as the checker sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapEntry {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: u64,
    pub icount: u64,
    pub extra_data_size: u32,
    pub unknown_extra: Vec<u8>,
}

/// The snapshot table of one check run.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapTable {
    /// `snapshots_offset`.
    pub offset: u64,
    /// The entries read (possibly fewer than the header says, after a repair).
    pub entries: Vec<SnapEntry>,
    /// Bytes the table occupies (QEMU's `snapshots_size`).
    pub size: u64,
}

/// Reads the file through a window, zeroes past its end.
struct Reader {
    file: crate::meta::FileReader,
    start: u64,
    buf: Vec<u8>,
}

impl Reader {
    fn bytes(&mut self, pos: u64, len: usize) -> Result<Vec<u8>> {
        let end = pos.saturating_add(len as u64);
        if pos < self.start || end > self.start + self.buf.len() as u64 {
            let want = (len as u64).max(WINDOW);
            self.buf = vec![0u8; want as usize];
            self.start = pos;
            self.file
                .read_at(&mut self.buf, pos)
                .map_err(|e| Error::io(crate::error::IoOp::Read, pos, e))?;
        }
        let at = (pos - self.start) as usize;
        Ok(self.buf[at..at + len].to_vec())
    }
}

/// A name as QEMU keeps it: a C string (cut at the first NUL), shown lossily.
fn c_string(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

impl<'a, 's> Pass<'a, 's> {
    /// QEMU's `qcow2_check_read_snapshot_table`.
    pub(crate) fn check_read_snapshot_table(&mut self, res: &mut CheckCounts) -> Result<()> {
        let mut nb = self.meta.header.nb_snapshots;
        let offset = self.meta.header.snapshots_offset;
        self.snaps = SnapTable {
            offset,
            ..Default::default()
        };
        let mut reduced: u64 = 0;
        let mut dropped: u64 = 0;
        if nb > MAX_SNAPSHOTS && self.fix.errors {
            self.report(Finding::SnapshotsOverhanging {
                count: u64::from(nb - MAX_SNAPSHOTS),
                table_too_big: false,
            });
            reduced += u64::from(nb - MAX_SNAPSHOTS);
            nb = MAX_SNAPSHOTS;
        }
        // qcow2_validate_table(..., "snapshot table").
        let cs = self.geom.cluster_size;
        let invalid = if u64::from(nb) > MAX_SNAPSHOTS as u64 {
            Some(("snapshot table too large", true))
        } else if (i64::MAX as u64) - u64::from(nb) * HEADER_SIZE < offset
            || !offset.is_multiple_of(cs)
        {
            Some(("snapshot table offset invalid", false))
        } else {
            None
        };
        if let Some((msg, too_large)) = invalid {
            res.check_errors += 1;
            self.report(Finding::Report(format!("ERROR {msg}")));
            if nb > MAX_SNAPSHOTS {
                self.report(Finding::Message(format!(
                    "You can force-remove all {} overhanging snapshots with qcow2-check -r all",
                    nb - MAX_SNAPSHOTS
                )));
            }
            self.snaps.offset = 0;
            return Err(if too_large {
                Error::TooLarge(Limit::SnapshotTable { count: nb })
            } else {
                Error::InvalidArgument(msg.into())
            });
        }
        match self.read_snapshots(nb, offset, &mut reduced, &mut dropped) {
            Ok(()) => {}
            Err((msg, hint, e)) => {
                res.check_errors += 1;
                self.report(Finding::Report(format!(
                    "ERROR failed to read the snapshot table: {msg}"
                )));
                if let Some(hint) = hint {
                    self.report(Finding::Message(hint));
                }
                self.snaps = SnapTable::default();
                return Err(e);
            }
        }
        res.corruptions += reduced + dropped;
        if reduced != 0 {
            let n = self.snaps.entries.len() as u32;
            if let Err(e) = self
                .meta
                .write_header_field_for_repair(field::NB_SNAPSHOTS, &n.to_be_bytes())
            {
                res.check_errors += 1;
                self.report(Finding::Message(format!(
                    "ERROR failed to update the snapshot count in the image header: {}",
                    e.errno_text()
                )));
                return Err(e);
            }
            self.meta.header.nb_snapshots = n;
            res.corruptions_fixed += reduced;
            res.corruptions -= reduced;
        }
        if self.meta.header.version >= 3 {
            for i in 0..self.snaps.entries.len() {
                if self.snaps.entries[i].extra_data_size < 16 {
                    res.corruptions += 1;
                    self.report(Finding::SnapshotIncomplete {
                        index: i as u64,
                        repairing: self.fix.errors,
                    });
                }
            }
        }
        self.register_snapshots();
        Ok(())
    }

    /// QEMU's `qcow2_do_read_snapshots` with its repair mode.
    fn read_snapshots(
        &mut self,
        nb: u32,
        table_offset: u64,
        reduced: &mut u64,
        dropped: &mut u64,
    ) -> std::result::Result<(), (String, Option<String>, Error)> {
        let repair = self.fix.errors;
        let current_size = self.meta.header.size / 512 * 512;
        let mut entries = Vec::new();
        let mut notes = Vec::new();
        let mut offset = table_offset;
        let mut table_length: u64 = 0;
        let io = |e: Error| ("Failed to read snapshot table".to_string(), None, e);
        let mut rd = Reader {
            file: self.file.clone(),
            start: 0,
            buf: Vec::new(),
        };
        let mut result = Ok(());
        for i in 0..nb {
            let pre = offset;
            table_length = table_length.next_multiple_of(8);
            offset = offset.next_multiple_of(8);
            let h = match rd.bytes(offset, HEADER_SIZE as usize) {
                Ok(h) => h,
                Err(e) => {
                    result = Err(io(e));
                    break;
                }
            };
            offset += HEADER_SIZE;
            let mut sn = SnapEntry {
                l1_table_offset: be_u64(&h, 0).unwrap_or(0),
                l1_size: be_u32(&h, 8).unwrap_or(0),
                vm_state_size: u64::from(be_u32(&h, 32).unwrap_or(0)),
                date_sec: be_u32(&h, 16).unwrap_or(0),
                date_nsec: be_u32(&h, 20).unwrap_or(0),
                vm_clock_nsec: be_u64(&h, 24).unwrap_or(0),
                extra_data_size: be_u32(&h, 36).unwrap_or(0),
                ..Default::default()
            };
            let id_size = usize::from(be_u16(&h, 12).unwrap_or(0));
            let name_size = usize::from(be_u16(&h, 14).unwrap_or(0));
            let mut truncate = false;
            if sn.extra_data_size > MAX_SNAPSHOT_EXTRA_DATA {
                if !repair {
                    result = Err((
                        format!("Too much extra metadata in snapshot table entry {i}"),
                        Some(
                            "You can force-remove this extra metadata with qcow2-check -r all"
                                .into(),
                        ),
                        Error::TooLarge(Limit::SnapshotExtraData {
                            index: i,
                            size: sn.extra_data_size,
                        }),
                    ));
                    break;
                }
                notes.push(Finding::SnapshotExtraDataDropped {
                    index: u64::from(i),
                    size: sn.extra_data_size,
                });
                *dropped += 1;
                truncate = true;
            }
            let step = (|| -> Result<()> {
                let known = sn.extra_data_size.min(KNOWN_EXTRA) as usize;
                let extra = rd.bytes(offset, known)?;
                offset += known as u64;
                if sn.extra_data_size >= 8 {
                    sn.vm_state_size = be_u64(&extra, 0).unwrap_or(0);
                }
                sn.disk_size = if sn.extra_data_size >= 16 {
                    be_u64(&extra, 8).unwrap_or(0)
                } else {
                    current_size
                };
                sn.icount = if sn.extra_data_size >= 24 {
                    be_u64(&extra, 16).unwrap_or(0)
                } else {
                    u64::MAX
                };
                if sn.extra_data_size > KNOWN_EXTRA {
                    let extra_end = offset + u64::from(sn.extra_data_size - KNOWN_EXTRA);
                    if truncate {
                        sn.extra_data_size = MAX_SNAPSHOT_EXTRA_DATA;
                    }
                    let n = (sn.extra_data_size - KNOWN_EXTRA) as usize;
                    sn.unknown_extra = rd.bytes(offset, n)?;
                    offset = extra_end;
                }
                let id = rd.bytes(offset, id_size)?;
                offset += id_size as u64;
                let name = rd.bytes(offset, name_size)?;
                offset += name_size as u64;
                sn.id = c_string(&id);
                sn.name = c_string(&name);
                Ok(())
            })();
            if let Err(e) = step {
                result = Err(io(e));
                break;
            }
            table_length +=
                HEADER_SIZE + u64::from(sn.extra_data_size) + id_size as u64 + name_size as u64;
            if table_length > MAX_SNAPSHOT_TABLE_BYTES || offset - table_offset > i32::MAX as u64 {
                if !repair {
                    result = Err((
                        "Snapshot table is too big".into(),
                        Some(format!(
                            "You can force-remove all {} overhanging snapshots with qcow2-check \
                             -r all",
                            nb - i
                        )),
                        Error::TooLarge(Limit::SnapshotTableSize {
                            bytes: table_length,
                        }),
                    ));
                    break;
                }
                let count = u64::from(nb - i);
                notes.push(Finding::SnapshotsOverhanging {
                    count,
                    table_too_big: true,
                });
                *reduced += count;
                offset = pre;
                break;
            }
            entries.push(sn);
        }
        for n in notes {
            self.report(n);
        }
        result?;
        self.snaps.size = offset - table_offset;
        self.snaps.entries = entries;
        Ok(())
    }

    /// Registers the snapshot table and the snapshot L1 tables with the
    /// overlap checker (once per image: a second pass replaces them).
    ///
    /// Every snapshot L1 table is registered by its raw range, as QEMU's
    /// overlap check reads `s->snapshots`: an unaligned offset or an absurd
    /// size (which the check reports as a corrupted entry) still protects
    /// the bytes it names, so a repair never writes into them.
    fn register_snapshots(&mut self) {
        for (off, _) in std::mem::take(&mut self.registered_l1) {
            self.meta.gate.checker_mut().remove_inactive_l1(off);
        }
        self.meta
            .gate
            .checker_mut()
            .set_snapshot_table(self.snaps.offset, self.snaps.size);
        let mut added = Vec::new();
        for s in &self.snaps.entries {
            let bytes = u64::from(s.l1_size) * 8;
            if bytes > 0 {
                self.meta
                    .gate
                    .checker_mut()
                    .add_inactive_l1(s.l1_table_offset, bytes);
                added.push((s.l1_table_offset, bytes));
            }
        }
        self.registered_l1 = added;
    }

    /// QEMU's `qcow2_check_fix_snapshot_table`: with `-r all`, rewrites the
    /// table if reading it found something to repair.
    pub(crate) fn check_fix_snapshot_table(&mut self, res: &mut CheckCounts) -> Result<()> {
        if res.corruptions == 0 || !self.fix.errors {
            return Ok(());
        }
        if let Err(e) = self.write_snapshots() {
            res.check_errors += 1;
            self.report(Finding::Message(format!(
                "ERROR failed to update snapshot table: {}",
                e.errno_text()
            )));
            return Err(e);
        }
        res.corruptions_fixed += res.corruptions;
        res.corruptions = 0;
        Ok(())
    }

    /// QEMU's `qcow2_write_snapshots`: a new table in newly allocated
    /// clusters, then the header switch, then the old table is freed.
    fn write_snapshots(&mut self) -> Result<()> {
        let entries: Vec<SnapshotEntry> = self
            .snaps
            .entries
            .iter()
            .map(|s| {
                let extra = s.extra_data_size.max(KNOWN_EXTRA);
                let mut unknown = s.unknown_extra.clone();
                unknown.resize((extra - KNOWN_EXTRA) as usize, 0);
                SnapshotEntry {
                    l1_table_offset: s.l1_table_offset,
                    l1_size: s.l1_size,
                    id: s.id.clone(),
                    name: s.name.clone(),
                    date_sec: s.date_sec,
                    date_nsec: s.date_nsec,
                    vm_clock_nsec: s.vm_clock_nsec,
                    vm_state_size: s.vm_state_size,
                    disk_size: Some(s.disk_size),
                    icount: Some(s.icount),
                    extra_data_size: extra,
                    unknown_extra: unknown,
                }
            })
            .collect();
        let bytes = encode_snapshot_table(&entries)?;
        let size = snapshot_table_size(&entries);
        let cs = self.geom.cluster_size;
        // Refcount blocks this pass wrote directly may be cached stale.
        self.meta.rc.cache_mut().drop_clean();
        let new_off = if size == 0 {
            0
        } else {
            let off = self.meta.alloc_clusters(ClusterCount(size.div_ceil(cs)))?.0;
            self.meta.flush_refcounts()?;
            self.meta.sync()?;
            self.gate_write(&bytes, off, None)?;
            self.meta.sync()?;
            off
        };
        let mut sw = [0u8; 12];
        sw[..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
        sw[4..].copy_from_slice(&new_off.to_be_bytes());
        self.meta
            .write_header_field_for_repair(field::NB_SNAPSHOTS, &sw)?;
        let (old_off, old_size) = (self.snaps.offset, self.snaps.size);
        self.meta.header.nb_snapshots = entries.len() as u32;
        self.meta.header.snapshots_offset = new_off;
        self.meta
            .gate
            .checker_mut()
            .set_snapshot_table(new_off, size);
        self.snaps.offset = new_off;
        self.snaps.size = size;
        if old_size > 0 {
            // QEMU's qcow2_free_clusters: all or nothing, and a failure only
            // leaks the old table.
            let first = old_off >> self.geom.cluster_bits;
            let last = (old_off + old_size - 1) >> self.geom.cluster_bits;
            let mut all_used = true;
            for c in first..=last {
                if self.meta.refcount(c)? == 0 {
                    all_used = false;
                    break;
                }
            }
            if all_used {
                for c in first..=last {
                    let _ = self.meta.update_refcount(c, 1, -1, DiscardType::Snapshot)?;
                }
                self.meta.flush_refcounts()?;
            } else {
                self.report(Finding::Message(
                    "qcow2_free_clusters failed: Invalid argument".into(),
                ));
            }
        }
        Ok(())
    }
}
