//! Changing the refcount width of an image (`amend -o refcount_bits=N`, QEMU's
//! `qcow2_change_refcount_order`).
//!
//! # Layout and write order
//! The new refcount table and blocks go into one area at the end of the file
//! (after the last cluster in use), table first. Their contents are the old
//! refcounts in the new width, with the area itself counted once and the old
//! table and blocks already counted as free: they are unreferenced from the
//! moment the header points at the new structures. The area is written and
//! synced, then the header is switched with one write of bytes 48..100
//! (`refcount_table_offset`, `refcount_table_clusters` and, unchanged in
//! between, the snapshot and feature fields, then `refcount_order`) and
//! synced. A crash before the switch leaves the old structures in charge and
//! the area unreferenced past their end (nothing to repair); a crash after it
//! leaves the new ones in charge, exact. QEMU allocates the new structures
//! through the old ones and frees the old ones afterwards, which can leak
//! both ways on a crash; the result is the same refcounts.

use crate::error::{Error, Limit, Result};
use crate::format::consts::*;
use crate::format::header::field;
use crate::format::put_be_u64;
use crate::format::refcount;
use crate::format::Structure;
use crate::meta::Meta;
use crate::types::{MetadataKind, RefcountGeometry};
use std::collections::{BTreeSet, HashSet};

/// Reads refcounts of the old structures from the file, one block at a time.
struct OldRefcounts {
    table: Vec<u64>,
    order: u32,
    block_bits: u32,
    cluster_size: usize,
    /// The block read last: (reftable index, bytes).
    current: Option<(u64, Vec<u8>)>,
}

impl OldRefcounts {
    fn new(meta: &Meta) -> Self {
        OldRefcounts {
            table: meta.rc.table().to_vec(),
            order: meta.rgeom.refcount_order,
            block_bits: meta.rgeom.refcount_block_bits,
            cluster_size: meta.geom.cluster_size as usize,
            current: None,
        }
    }

    /// The block for reftable index `index` (`None` where there is none).
    fn block(&mut self, meta: &Meta, index: u64) -> Result<Option<&[u8]>> {
        let offset = usize::try_from(index)
            .ok()
            .and_then(|i| self.table.get(i))
            .map_or(0, |e| e & REFT_OFFSET_MASK);
        if offset == 0 {
            return Ok(None);
        }
        if self.current.as_ref().map(|(i, _)| *i) != Some(index) {
            let mut buf = vec![0u8; self.cluster_size];
            meta.gate.read(&mut buf, offset)?;
            self.current = Some((index, buf));
        }
        Ok(self.current.as_ref().map(|(_, b)| b.as_slice()))
    }

    /// The refcount of host cluster `cluster`.
    fn get(&mut self, meta: &Meta, cluster: u64) -> Result<u64> {
        let index = cluster >> self.block_bits;
        let entry = (cluster & ((1u64 << self.block_bits) - 1)) as usize;
        let order = self.order;
        Ok(self
            .block(meta, index)?
            .and_then(|b| refcount::get(b, order, entry))
            .unwrap_or(0))
    }
}

/// `Error::TooLarge` for a refcount structure size past the limits (the
/// sizes are bounded by `MAX_REFTABLE_BYTES` before they are used).
fn too_large() -> Error {
    Error::TooLarge(Limit::RefcountTable)
}

/// Host clusters of the old refcount table and blocks.
fn old_structures(meta: &Meta) -> Result<HashSet<u64>> {
    let cb = meta.geom.cluster_bits;
    let first = meta.header.refcount_table_offset >> cb;
    let mut set: HashSet<u64> =
        (first..first + u64::from(meta.header.refcount_table_clusters)).collect();
    for e in meta.rc.table() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !meta.geom.is_aligned(off) {
            return Err(Error::Corrupt {
                what: Structure::RefcountTable,
                offset: off,
                msg: format!("Refblock offset {off:#x} unaligned"),
            });
        }
        set.insert(off >> cb);
    }
    Ok(set)
}

/// What the first walk over the old refcounts found.
pub(super) struct Survey {
    /// New refcount block indices holding a non-zero refcount (old
    /// structures not counted).
    blocks: BTreeSet<u64>,
    /// One past the last cluster with a non-zero refcount.
    end: u64,
}

/// Makes every refcount durable in the file (the old structures are read
/// from there) and walks them: QEMU's error for a refcount the new width
/// cannot hold, naming the lowest such cluster, or what the new structures
/// must cover.
///
/// # Errors
/// `Error::InvalidArgument` (`Cannot decrease refcount entry width to N
/// bits: ...`), I/O errors, `Error::Corrupt` for an unaligned refcount block.
pub(super) fn survey(meta: &mut Meta, new_order: u32) -> Result<Survey> {
    // Refcounts past the end of the file read as zeroes: nothing to copy.
    meta.check_allocatable()?;
    meta.flush_all(true)?;
    meta.flush_refcounts()?;
    if meta.gate.is_dirty() {
        meta.sync()?;
    }
    let old_set = old_structures(meta)?;
    let new_bits = 1u32 << new_order;
    let new_block_bits =
        RefcountGeometry::new(meta.geom.cluster_bits, new_order).refcount_block_bits;
    let per_old = meta.rgeom.refcount_block_entries();
    let mut old = OldRefcounts::new(meta);
    let mut blocks = BTreeSet::new();
    let mut end = 0u64;
    for index in 0..old.table.len() as u64 {
        let order = old.order;
        let Some(block) = old.block(meta, index)? else {
            continue;
        };
        for i in 0..per_old {
            let v = refcount::get(block, order, i as usize).unwrap_or(0);
            if v == 0 {
                continue;
            }
            let cluster = index * per_old + i;
            if new_bits < 64 && v >> new_bits != 0 {
                let offset = cluster.saturating_mul(meta.geom.cluster_size);
                return Err(Error::InvalidArgument(format!(
                    "Cannot decrease refcount entry width to {new_bits} bits: Cluster at offset {} has a refcount of {v}",
                    c_hex(offset)
                )));
            }
            if !old_set.contains(&cluster) {
                blocks.insert(cluster >> new_block_bits);
                end = end.max(cluster + 1);
            }
        }
    }
    Ok(Survey { blocks, end })
}

/// C's `%#" PRIx64` (no prefix for 0).
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Rewrites the refcount structures with `1 << new_order`-bit refcounts
/// (see the module docs), reporting `(done, total)` refcount blocks written.
/// Walks the old refcounts again first ([`survey`]): the handle may have
/// allocated since the checks.
///
/// # Errors
/// I/O errors (the handle is then poisoned), `Error::TooLarge` when the new
/// refcount table would exceed QEMU's limit.
pub(super) fn change(
    meta: &mut Meta,
    new_order: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let survey = survey(meta, new_order)?;
    if meta.rc.cache().has_dirty() {
        return Err(Error::Internal(
            "refcount blocks dirty after the survey".into(),
        ));
    }
    let cb = meta.geom.cluster_bits;
    let cs = meta.geom.cluster_size;
    let new_geom = RefcountGeometry::new(cb, new_order);
    let nbb = new_geom.refcount_block_bits;
    let per_new = 1u64 << nbb;
    let old_set = old_structures(meta)?;

    // The area: the table (t clusters) then the blocks, past everything in use.
    let file_clusters = meta.gate.file_end().div_ceil(cs);
    let start = file_clusters.max(survey.end);
    let (mut t, mut b) = (1u64, 0u64);
    let mut blocks;
    let mut rounds = 0;
    loop {
        blocks = survey.blocks.clone();
        let area_end = start.checked_add(t + b).ok_or_else(too_large)?;
        blocks.extend((start >> nbb)..=((area_end - 1) >> nbb));
        let max = blocks.last().copied().unwrap_or(0);
        let need_t = max
            .checked_add(1)
            .and_then(|n| n.checked_mul(8))
            .ok_or_else(too_large)?
            .div_ceil(cs)
            .max(1);
        if need_t.saturating_mul(cs) > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge(Limit::RefcountTable));
        }
        let need_b = blocks.len() as u64;
        if (need_t, need_b) == (t, b) {
            break;
        }
        (t, b) = (need_t.max(t), need_b.max(b));
        rounds += 1;
        if rounds > 64 {
            return Err(Error::Internal(
                "refcount area size does not converge".into(),
            ));
        }
    }
    let area_end = start.checked_add(t + b).ok_or_else(too_large)?;
    let area = start..area_end;
    let table_offset = start.checked_mul(cs).ok_or_else(too_large)?;
    // t * cs <= MAX_REFTABLE_BYTES (checked above).
    let table_bytes = usize::try_from(t * cs).map_err(|_| too_large())?;
    let table_clusters = u32::try_from(t).map_err(|_| too_large())?;
    let mut table = vec![0u64; table_bytes / 8];

    // Write the blocks, then the table, then sync.
    let mut old = OldRefcounts::new(meta);
    let mut buf = vec![0u8; cs as usize];
    let total = blocks.len() as u64;
    for (n, &k) in blocks.iter().enumerate() {
        buf.fill(0);
        let first = k.checked_mul(per_new).ok_or_else(too_large)?;
        let last = first.saturating_add(per_new).min(area.end.max(survey.end));
        for c in first..last {
            let v = if area.contains(&c) {
                1
            } else if old_set.contains(&c) {
                0
            } else {
                old.get(meta, c)?
            };
            if v != 0 {
                refcount::set(&mut buf, new_order, (c - first) as usize, v);
            }
        }
        let at = (start + t + n as u64)
            .checked_mul(cs)
            .ok_or_else(too_large)?;
        meta.gate
            .write_metadata(MetadataKind::RefcountBlock, &buf, at)?;
        if let Some(slot) = table.get_mut(k as usize) {
            *slot = at;
        }
        progress(n as u64 + 1, total);
    }
    let mut bytes = vec![0u8; table_bytes];
    for (i, e) in table.iter().enumerate() {
        put_be_u64(&mut bytes, i * 8, *e);
    }
    meta.gate
        .write_metadata(MetadataKind::RefcountTable, &bytes, table_offset)?;
    meta.sync()?;

    // Switch the header with one write (bytes 48..100).
    let h = &meta.header;
    let mut sw = [0u8; 52];
    put_be_u64(&mut sw, 0, table_offset);
    sw[8..12].copy_from_slice(&table_clusters.to_be_bytes());
    sw[12..16].copy_from_slice(&h.nb_snapshots.to_be_bytes());
    put_be_u64(&mut sw, 16, h.snapshots_offset);
    put_be_u64(&mut sw, 24, h.incompatible_features);
    put_be_u64(&mut sw, 32, h.compatible_features);
    put_be_u64(&mut sw, 40, h.autoclear_features);
    sw[48..52].copy_from_slice(&new_order.to_be_bytes());
    meta.gate
        .write_header_fields(&sw, field::REFCOUNT_TABLE_OFFSET)?;
    meta.sync()?;

    // The image now uses the new structures.
    for c in meta.rc.table().iter().map(|e| e & REFT_OFFSET_MASK) {
        if c != 0 {
            meta.gate.checker_mut().remove_refcount_block(c);
        }
    }
    for &o in table.iter().filter(|o| **o != 0) {
        meta.gate.checker_mut().add_refcount_block(o);
    }
    meta.gate
        .checker_mut()
        .set_refcount_table(table_offset, t * cs);
    meta.header.refcount_table_offset = table_offset;
    meta.header.refcount_table_clusters = table_clusters;
    meta.header.refcount_order = new_order;
    meta.rgeom = new_geom;
    meta.rc.replace_table(table);
    Ok(())
}
