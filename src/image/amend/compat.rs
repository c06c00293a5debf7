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
//! last. A crash in between leaves a valid v3 image with some zero clusters
//! already expanded (reading the same) and at most leaked clusters.

use crate::error::{Error, Result, Unsupported};
use crate::format::consts::*;
use crate::format::entry::L2Entry;
use crate::format::header::{qemu_feature_table, Header, HeaderExtension};
use crate::format::FormatErrorKind;
use crate::meta::{Meta, RawL2};
use crate::types::MetadataKind;
use crate::Extent;

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

/// QEMU's `qcow2_upgrade` to v3. Snapshot tables without the v3 extra data
/// would have to be rewritten first (QEMU does): not done here.
pub(super) fn upgrade(meta: &mut Meta) -> Result<()> {
    if meta
        .snapshots
        .iter()
        .any(|s| s.extra_data_size < V3_SNAPSHOT_EXTRA)
    {
        return Err(Error::Unsupported(Unsupported::AmendCompat));
    }
    let mut h = meta.header.clone();
    h.version = 3;
    rewrite_header(meta, h)
}

/// QEMU's content checks of `qcow2_downgrade` (after those on the options),
/// in its order: internal snapshots, incompatible features other than the
/// dirty bit and the compression type, then zstd compressed clusters. QEMU
/// expands zero clusters before it looks for compressed ones; here nothing is
/// changed before every check passed.
pub(super) fn check_downgrade(meta: &mut Meta) -> Result<()> {
    let size = meta.header.size;
    if meta
        .snapshots
        .iter()
        .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size != Some(size))
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
    if !meta.snapshots.is_empty() {
        // Zero clusters of snapshot tables are not expanded here.
        return Err(Error::Unsupported(Unsupported::AmendCompat));
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

/// QEMU's `qcow2_downgrade` to v2 once [`check_downgrade`] passed: makes the
/// image clean, expands zero clusters, clears the v3-only state and writes a
/// v2 header. Reports `(done, total)` L1 entries.
pub(super) fn downgrade(
    meta: &mut Meta,
    has_backing: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    meta.mark_clean()?;
    meta.lazy_refcounts = false;
    expand_zero_clusters(meta, has_backing, progress)?;
    meta.flush_all(true)?;
    meta.flush_refcounts()?;
    let mut h = meta.header.clone();
    h.version = 2;
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.compression_type = 0;
    h.unknown_fields.clear();
    rewrite_header(meta, h)
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
                    let h = meta.alloc_clusters(1)?;
                    meta.gate.write_data(&zeroes, h)?;
                    h | OFLAG_COPIED
                }
                Some(h) => {
                    meta.gate.write_data(&zeroes, h)?;
                    h | OFLAG_COPIED
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
