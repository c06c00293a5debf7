//! Header rewrites of `amend`: the compatibility level (QEMU's `qcow2_upgrade`
//! and `qcow2_downgrade`, zero clusters expanded first) and the external data
//! file's name and raw flag.
//!
//! # Write order
//! The header is rewritten whole (cluster 0, one write, then a sync), as
//! QEMU's `qcow2_update_header` does. A downgrade first makes the image clean,
//! then expands zero clusters: zeroes are written to (and, with a backing
//! file, new clusters allocated for) the clusters that will hold them and
//! synced, then the L2 entries change through the normal flush order
//! (refcounts durable before the entries that use them); the v2 header comes
//! last. The snapshots' tables follow the active ones: zeroes and refcounts
//! durable, then each table written whole. A crash in between leaves a valid
//! v3 image with some zero clusters already expanded (reading the same) and
//! at most leaked clusters.

use crate::error::{Error, Result};
use crate::format::consts::*;
use crate::format::entry::L2Entry;
use crate::format::header::{qemu_feature_table, Header, HeaderExtension};
use crate::format::{be_u64, put_be_u64, FormatErrorKind, Structure};
use crate::meta::DiscardType;
use crate::meta::{Meta, RawL2};
use crate::types::{ClusterCount, GuestOffset, HostOffset, MetadataKind};
use crate::Extent;
use std::collections::HashSet;

/// QEMU writes its feature name table only for clusters above 4 KiB.
const FEATURE_TABLE_MIN_CLUSTER_BITS: u32 = 13;

/// `vm_state_size_large` and `disk_size`: the extra data v3 requires.
const V3_SNAPSHOT_EXTRA: u32 = 16;

/// Writes `h` over cluster 0 in one write and syncs; the in-memory header
/// follows. QEMU regenerates its feature name table on every rewrite (only
/// for v3, only above 4 KiB clusters).
pub(super) fn rewrite_header(meta: &mut Meta, mut h: Header) -> Result<()> {
    h.extensions
        .retain(|e| !matches!(e, HeaderExtension::FeatureNameTable(_)));
    if h.version >= 3 && h.cluster_bits >= FEATURE_TABLE_MIN_CLUSTER_BITS {
        h.extensions
            .push(HeaderExtension::FeatureNameTable(qemu_feature_table()));
    }
    let enc = |h: &mut Header| {
        h.normalize()?;
        h.encode_into_cluster(1u64 << h.cluster_bits)
    };
    let buf = enc(&mut h).map_err(|e| match e.kind {
        FormatErrorKind::TooLarge => Error::InvalidArgument(
            "Failed to update the image header: No space left on device".into(),
        ),
        _ => Error::Format(e),
    })?;
    meta.gate
        .write_metadata(MetadataKind::MainHeader, &buf, 0)?;
    meta.sync()?;
    meta.efmt.version = h.version;
    meta.header = h;
    Ok(())
}

/// QEMU's `qcow2_upgrade` to v3: a snapshot table without v3's extra data
/// in every entry is rewritten first.
pub(super) fn upgrade(meta: &mut Meta) -> Result<()> {
    if meta
        .snapshots
        .iter()
        .any(|s| s.extra_data_size < V3_SNAPSHOT_EXTRA)
    {
        // In v3's layout, to new clusters, one header write, the old
        // clusters freed (QEMU's qcow2_write_snapshots).
        meta.write_snapshot_table(meta.snapshots.clone())?;
    }
    let mut h = meta.header.clone();
    h.version = 3;
    rewrite_header(meta, h)
}

/// QEMU's content checks of `qcow2_downgrade` (after those on the options),
/// in its order: internal snapshots, incompatible features other than the
/// dirty bit and the compression type, the snapshots' L1 tables
/// (`qcow2_validate_table` in the zero-cluster expansion), then zstd
/// compressed clusters. QEMU expands zero clusters before it looks at
/// snapshot tables and compressed clusters; here nothing is changed before
/// every check passed.
pub(super) fn check_downgrade(meta: &mut Meta) -> Result<()> {
    let size = meta.header.size;
    // An entry without a disk size has the current one (QEMU fills it in
    // when it reads the table).
    if meta
        .snapshots
        .iter()
        .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size.unwrap_or(size) != size)
    {
        return Err(Error::InvalidArgument(
            "Internal snapshots prevent downgrade of image".into(),
        ));
    }
    let incompat = meta.header.incompatible_features & !(INCOMPAT_COMPRESSION | INCOMPAT_DIRTY);
    if incompat != 0 {
        return Err(Error::InvalidArgument(format!(
            "Cannot downgrade an image with incompatible features {incompat:#x} set"
        )));
    }
    for sn in &meta.snapshots {
        sn.validate_l1(meta.geom.cluster_bits)?;
    }
    if meta.header.incompatible_features & INCOMPAT_COMPRESSION != 0 {
        let mut guest = 0;
        while guest < size {
            let (extent, len) = meta.map_extent(guest, size - guest)?;
            if matches!(extent, Extent::Compressed { .. }) {
                return Err(Error::InvalidArgument(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters".into(),
                ));
            }
            guest += len.max(1);
        }
    }
    Ok(())
}

/// QEMU's `qcow2_downgrade` to v2 ([`check_downgrade`] first): makes the
/// image clean, expands zero clusters, clears the v3-only state and writes a
/// v2 header. Reports `(done, total)` L1 entries.
pub(super) fn downgrade(
    meta: &mut Meta,
    has_backing: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    // Again under this lock: the handle may have written since the checks.
    check_downgrade(meta)?;
    meta.mark_clean()?;
    meta.lazy_refcounts = false;
    expand_zero_clusters(meta, has_backing, progress)?;
    meta.flush_all(true)?;
    meta.flush_refcounts()?;
    expand_snapshot_zero_clusters(meta, has_backing)?;
    let mut h = meta.header.clone();
    h.version = 2;
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.compression_type = 0;
    h.unknown_fields.clear();
    rewrite_header(meta, h)?;
    // A v2 image holds no bitmaps: the extension stays in the header, stale
    // (as QEMU leaves it), and this handle stores nothing at close.
    meta.bitmaps = None;
    Ok(())
}

/// Every zero L2 entry of the active tables becomes unallocated (no backing
/// file) or a data cluster of zeroes (QEMU's `expand_zero_clusters_in_l1`).
fn expand_zero_clusters(
    meta: &mut Meta,
    has_backing: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let geom = meta.geom;
    let cs = geom.cluster_size;
    let l1_len = meta.l2.l1().len() as u64;
    let zeroes = vec![0u8; cs as usize];
    for l1i in 0..l1_len {
        progress(l1i, l1_len);
        let (table, _) = meta.l2_table_offset(l1i)?;
        if table == 0 {
            continue;
        }
        // The zero entries of this table (guest offsets and preallocation).
        let mut found: Vec<(u64, Option<u64>)> = Vec::new();
        for j in 0..geom.l2_entries() {
            let guest = (l1i << (geom.cluster_bits + geom.l2_bits)) | (j << geom.cluster_bits);
            let slot = meta.l2_slot(table, guest);
            meta.load_l2_slice(slot.slice)?;
            let raw = meta.read_slot(&slot);
            if let (L2Entry::Zero { host, .. }, _) = meta.decode_l2(raw, &slot)? {
                found.push((guest, host));
            }
        }
        if found.is_empty() {
            continue;
        }
        let table = meta.writable_l2_table(l1i)?;
        // Data first: zeroes in every cluster that will hold them, synced.
        let mut words = Vec::with_capacity(found.len());
        for (guest, host) in found {
            let word = match host {
                None if !has_backing => 0,
                None => {
                    let h = meta.alloc_clusters(ClusterCount(1))?.0;
                    meta.gate
                        .write_data_guest(&zeroes, HostOffset(h), GuestOffset(guest))?;
                    h | OFLAG_COPIED
                }
                Some(h) => {
                    meta.gate
                        .write_data_guest(&zeroes, HostOffset(h), GuestOffset(guest))?;
                    // Shared with a snapshot: not COPIED.
                    if meta.refcount(h >> geom.cluster_bits)? == 1 {
                        h | OFLAG_COPIED
                    } else {
                        h
                    }
                }
            };
            words.push((guest, word));
        }
        meta.data_unsynced = true;
        meta.sync()?;
        for (guest, word) in words {
            let slot = meta.l2_slot(table, guest);
            meta.load_l2_slice(slot.slice)?;
            meta.write_slot(&slot, RawL2 { word, bitmap: 0 });
        }
        meta.flush_all(false)?;
    }
    progress(l1_len, l1_len);
    Ok(())
}

/// The zero entries of the snapshots' L2 tables, expanded in place as QEMU
/// does (after the active tables, whose shared tables were copied on write
/// by then: a table changed here is no longer active). A new cluster gets
/// the refcount of the table that points at it; COPIED is set where that is
/// 1. Zeroes and refcounts are durable before the table is written.
///
/// The tables are read and written in the file, behind the L2 cache (which
/// holds snapshot-only tables too once a snapshot operation walked them), so
/// the cache must be clean first and each table written here leaves it, as
/// QEMU's `qcow2_cache_empty` before the same walk ensures.
fn expand_snapshot_zero_clusters(meta: &mut Meta, has_backing: bool) -> Result<()> {
    if meta.l2.cache().has_dirty() {
        return Err(Error::Internal(
            "L2 slices dirty before the snapshot tables are expanded".into(),
        ));
    }
    let geom = meta.geom;
    let cs = geom.cluster_size;
    let cb = geom.cluster_bits;
    let eb = usize::try_from(geom.l2_entry_bytes)
        .map_err(|_| Error::Internal("L2 entry size".into()))?;
    let zeroes =
        vec![0u8; usize::try_from(cs).map_err(|_| Error::Internal("cluster size".into()))?];
    let active: HashSet<u64> = meta
        .l2
        .l1()
        .iter()
        .map(|e| e & L1E_OFFSET_MASK)
        .filter(|o| *o != 0)
        .collect();
    let mut seen = HashSet::new();
    for sn in meta.snapshots.clone() {
        // Validated as QEMU's qcow2_validate_table does (check_downgrade
        // made sure it passes).
        for (l1i, raw) in meta.read_snapshot_l1(&sn)?.into_iter().enumerate() {
            let table = raw & L1E_OFFSET_MASK;
            if table == 0 || active.contains(&table) || !seen.insert(table) {
                continue;
            }
            let mut buf = zeroes.clone();
            meta.gate.read(&mut buf, table)?;
            let l2_refcount = meta.refcount(table >> cb)?;
            let mut changed = false;
            for (index, entry) in buf.chunks_exact_mut(eb).enumerate() {
                let word = be_u64(entry, 0).unwrap_or(0);
                let L2Entry::Zero { host, .. } =
                    L2Entry::decode(word, &meta.efmt).map_err(|_| Error::Corrupt {
                        what: Structure::L2Table,
                        offset: table,
                        msg: format!(
                            "Invalid cluster entry found  (L2 offset: {table:#x}, L2 index: {index:#x})"
                        ),
                    })?
                else {
                    continue;
                };
                // The guest offset this entry maps (an encrypted image's
                // zeroes are encrypted; legacy `aes` derives IVs from it).
                let guest = (l1i as u64) << (cb + geom.l2_bits) | (index as u64) << cb;
                let new = match host {
                    None if !has_backing => 0,
                    None => {
                        let h = meta.alloc_clusters(ClusterCount(1))?.0;
                        let mut tries = 0;
                        while l2_refcount > 1 && meta.refcount(h >> cb)? != l2_refcount {
                            let delta = i64::try_from(l2_refcount - 1)
                                .map_err(|_| Error::Internal("refcount overflow".into()))?;
                            // `Again` (a new refcount block was needed) is retried by the loop.
                            let _ = meta.update_refcount(h >> cb, 1, delta, DiscardType::Never)?;
                            tries += 1;
                            if tries > 8 {
                                return Err(Error::Internal(
                                    "cannot raise a new cluster's refcount".into(),
                                ));
                            }
                        }
                        meta.gate
                            .write_data_guest(&zeroes, HostOffset(h), GuestOffset(guest))?;
                        h
                    }
                    Some(h) => {
                        meta.gate
                            .write_data_guest(&zeroes, HostOffset(h), GuestOffset(guest))?;
                        h
                    }
                };
                let new = if new != 0 && meta.refcount(new >> cb)? == 1 {
                    new | OFLAG_COPIED
                } else {
                    new
                };
                put_be_u64(entry, 0, new);
                changed = true;
            }
            if changed {
                meta.data_unsynced = true;
                meta.flush_refcounts()?;
                meta.sync()?;
                meta.gate
                    .write_metadata(MetadataKind::InactiveL2, &buf, table)?;
                meta.l2
                    .cache_mut()
                    .forget_range(table, table.saturating_add(cs));
                meta.sync()?;
            }
        }
    }
    Ok(())
}
