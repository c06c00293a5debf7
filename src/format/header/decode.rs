//! [`Header::decode`]: QEMU's open-time checks of cluster 0, in QEMU's order
//! (spec §1.3), and the zero-filling byte readers they use.

use super::ext::{scan_extensions, unsupported_features_message, ExtArea, ExtScan, Pass};
use super::{Header, COMPRESSION_TYPE_OFFSET, COMPRESSION_TYPE_ZLIB};
use crate::format::consts::{
    INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, INCOMPAT_MASK, MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MAX_REFCOUNT_ORDER, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, MIN_CLUSTER_BITS,
    QCOW2_MAGIC, SUBCLUSTERS_PER_CLUSTER, V2_HEADER_LENGTH, V3_HEADER_LENGTH, V3_MIN_HEADER_LENGTH,
};
use crate::format::{FormatError, FormatErrorKind, Structure};

/// `compression_type` value for zstd.
const COMPRESSION_TYPE_ZSTD: u8 = 1;
/// Largest known `crypt_method` (0 none, 1 AES-CBC, 2 LUKS).
const MAX_CRYPT_METHOD: u32 = 2;
/// Size of the fixed part of a snapshot table entry (`QCowSnapshotHeader`).
const SNAPSHOT_HEADER_LEN: u64 = 40;
/// Size of an L1 entry.
const L1_ENTRY_LEN: u64 = 8;
/// Smallest subcluster QEMU accepts with extended L2 entries.
const MIN_SUBCLUSTER_SIZE: u64 = 1 << MIN_CLUSTER_BITS;

/// `N` bytes of `buf` at `pos`; bytes past the end of `buf` read as zero.
pub(super) fn read_array<const N: usize>(buf: &[u8], pos: u64) -> [u8; N] {
    let mut out = [0u8; N];
    let avail = usize::try_from(pos)
        .ok()
        .and_then(|start| buf.get(start..))
        .unwrap_or(&[]);
    for (dst, src) in out.iter_mut().zip(avail) {
        *dst = *src;
    }
    out
}

/// Big-endian `u64` at `pos`, zero-filled past the end of `buf`.
pub(super) fn read_u64(buf: &[u8], pos: u64) -> u64 {
    u64::from_be_bytes(read_array(buf, pos))
}

/// Big-endian `u32` at `pos`, zero-filled past the end of `buf`.
pub(super) fn read_u32(buf: &[u8], pos: u64) -> u32 {
    u32::from_be_bytes(read_array(buf, pos))
}

/// `len` bytes of `buf` at `pos`, zero-filled past its end. Callers bound `len`
/// by the cluster size (at most 2 MiB) before calling.
pub(super) fn read_vec(buf: &[u8], pos: u64, len: u64) -> Vec<u8> {
    let len = usize::try_from(len).unwrap_or(0);
    let mut out = vec![0u8; len];
    let avail = usize::try_from(pos)
        .ok()
        .and_then(|start| buf.get(start..))
        .unwrap_or(&[]);
    for (dst, src) in out.iter_mut().zip(avail) {
        *dst = *src;
    }
    out
}

/// An error about a field of the fixed header at byte `field`.
fn header_err(kind: FormatErrorKind, field: u64, reason: impl Into<String>) -> FormatError {
    FormatError::new(kind, Structure::Header, Some(field), reason)
}

/// QEMU's `validate_compression_type`.
pub(super) fn validate_compression(
    compression_type: u8,
    incompatible: u64,
) -> Result<(), FormatError> {
    if !matches!(
        compression_type,
        COMPRESSION_TYPE_ZLIB | COMPRESSION_TYPE_ZSTD
    ) {
        return Err(header_err(
            FormatErrorKind::Unsupported,
            COMPRESSION_TYPE_OFFSET.into(),
            format!("qcow2: unknown compression type: {compression_type}"),
        ));
    }
    let bit_set = incompatible & INCOMPAT_COMPRESSION != 0;
    if compression_type == COMPRESSION_TYPE_ZLIB && bit_set {
        return Err(header_err(
            FormatErrorKind::Invalid,
            72,
            "qcow2: Compression type incompatible feature bit must not be set",
        ));
    }
    if compression_type != COMPRESSION_TYPE_ZLIB && !bit_set {
        return Err(header_err(
            FormatErrorKind::Invalid,
            72,
            "qcow2: Compression type incompatible feature bit must be set",
        ));
    }
    Ok(())
}

/// QEMU's `qcow2_validate_table`: at most `max_bytes` of `entry_len`-byte
/// entries, at a cluster-aligned offset whose end stays within `i64::MAX`.
fn validate_table(
    what: Structure,
    name: &str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), FormatError> {
    if entry_len == 0 || entries > max_bytes / entry_len {
        return Err(FormatError::new(
            FormatErrorKind::TooLarge,
            what,
            Some(offset),
            format!("{name} too large"),
        ));
    }
    // Cannot overflow: entries * entry_len <= max_bytes.
    let table_bytes = entries.saturating_mul(entry_len);
    let end_ok = (i64::MAX as u64)
        .checked_sub(table_bytes)
        .is_some_and(|room| offset <= room);
    if !end_ok || cluster_size == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(FormatError::invalid(
            what,
            Some(offset),
            format!("{name} offset invalid"),
        ));
    }
    Ok(())
}

/// `ceil(size / (cluster_size * l2_entries))`, or `None` for a nonsensical `cluster_bits`.
pub(super) fn l1_entries_for(size: u64, cluster_bits: u32, extended_l2: bool) -> Option<u64> {
    let entry_bits = if extended_l2 { 4 } else { 3 };
    let l2_bits = cluster_bits.checked_sub(entry_bits)?;
    let shift = cluster_bits
        .checked_add(l2_bits)
        .filter(|&shift| shift < 64)?;
    let whole = size >> shift;
    let partial = size & ((1u64 << shift) - 1) != 0;
    Some(whole + u64::from(partial))
}

/// `Header::decode` and `Header::decode_for_check`.
pub(super) fn decode_impl(buf: &[u8], check_mode: bool) -> Result<Header, FormatError> {
    let not_qcow2 = || header_err(FormatErrorKind::NotQcow2, 0, "Image is not in qcow2 format");
    let too_short = |field| header_err(FormatErrorKind::Invalid, field, "qcow2 header too short");
    if buf.is_empty() || read_u32(buf, 0) != QCOW2_MAGIC {
        return Err(not_qcow2());
    }
    if buf.len() < 8 {
        return Err(too_short(0));
    }
    let version = read_u32(buf, 4);
    if !(2..=3).contains(&version) {
        return Err(header_err(
            FormatErrorKind::Unsupported,
            4,
            format!("Unsupported qcow2 version {version}"),
        ));
    }
    let fixed_len = if version == 2 {
        V2_HEADER_LENGTH
    } else {
        V3_MIN_HEADER_LENGTH
    };
    if (buf.len() as u64) < u64::from(fixed_len) {
        return Err(too_short(0));
    }

    let backing_file_offset = read_u64(buf, 8);
    let backing_file_size = read_u32(buf, 16);
    let cluster_bits = read_u32(buf, 20);
    let size = read_u64(buf, 24);
    let crypt_method = read_u32(buf, 32);
    let l1_size = read_u32(buf, 36);
    let l1_table_offset = read_u64(buf, 40);
    let refcount_table_offset = read_u64(buf, 48);
    let refcount_table_clusters = read_u32(buf, 56);
    let nb_snapshots = read_u32(buf, 60);
    let snapshots_offset = read_u64(buf, 64);

    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(header_err(
            FormatErrorKind::Invalid,
            20,
            format!("Unsupported cluster size: 2^{cluster_bits}"),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;

    let (
        incompatible_features,
        compatible_features,
        autoclear_features,
        refcount_order,
        header_length,
    ) = if version == 2 {
        (0, 0, 0, 4, V2_HEADER_LENGTH)
    } else {
        let header_length = read_u32(buf, 100);
        if header_length < V3_MIN_HEADER_LENGTH {
            return Err(too_short(100));
        }
        (
            read_u64(buf, 72),
            read_u64(buf, 80),
            read_u64(buf, 88),
            read_u32(buf, 96),
            header_length,
        )
    };
    if u64::from(header_length) > cluster_size {
        return Err(header_err(
            FormatErrorKind::Invalid,
            100,
            "qcow2 header exceeds cluster size",
        ));
    }
    // header_length <= cluster_size <= 2 MiB bounds this allocation.
    let unknown_fields = match header_length.checked_sub(V3_HEADER_LENGTH) {
        Some(extra) if extra > 0 => read_vec(buf, V3_HEADER_LENGTH.into(), extra.into()),
        _ => Vec::new(),
    };

    if backing_file_offset > cluster_size {
        return Err(header_err(
            FormatErrorKind::Invalid,
            8,
            "Invalid backing file offset",
        ));
    }
    let ext_end = if backing_file_offset != 0 {
        backing_file_offset
    } else {
        cluster_size
    };

    let compression_type = if header_length > COMPRESSION_TYPE_OFFSET {
        let [compression_type] = read_array::<1>(buf, COMPRESSION_TYPE_OFFSET.into());
        compression_type
    } else {
        COMPRESSION_TYPE_ZLIB
    };
    validate_compression(compression_type, incompatible_features)?;

    let area = ExtArea {
        buf,
        start: header_length.into(),
        end: ext_end,
        cluster_size,
        crypt_method,
        autoclear: autoclear_features,
    };
    let unknown_incompatible = incompatible_features & !INCOMPAT_MASK;
    if unknown_incompatible != 0 {
        let mut probe = ExtScan::default();
        // Errors are ignored here, as in QEMU: use whatever table came first.
        let _ = scan_extensions(&area, Pass::FeatureProbe, &mut probe);
        return Err(header_err(
            FormatErrorKind::Unsupported,
            72,
            unsupported_features_message(probe.last_feature_table.as_deref(), unknown_incompatible),
        ));
    }

    if incompatible_features & INCOMPAT_EXTL2 != 0 {
        let subcluster_size = cluster_size / u64::from(SUBCLUSTERS_PER_CLUSTER);
        if subcluster_size < MIN_SUBCLUSTER_SIZE {
            return Err(header_err(
                FormatErrorKind::Invalid,
                72,
                format!("Unsupported subcluster size: {subcluster_size}"),
            ));
        }
    }
    if refcount_order > MAX_REFCOUNT_ORDER {
        return Err(header_err(
            FormatErrorKind::Invalid,
            96,
            "Reference count entry width too large; may not exceed 64 bits",
        ));
    }
    if refcount_table_clusters == 0 && !check_mode {
        return Err(header_err(
            FormatErrorKind::Invalid,
            56,
            "Image does not contain a reference count table",
        ));
    }
    validate_table(
        Structure::RefcountTable,
        "Reference count table",
        refcount_table_offset,
        refcount_table_clusters.into(),
        cluster_size,
        MAX_REFTABLE_BYTES,
        cluster_size,
    )?;
    if !check_mode {
        validate_table(
            Structure::SnapshotTable,
            "Snapshot table",
            snapshots_offset,
            nb_snapshots.into(),
            SNAPSHOT_HEADER_LEN,
            SNAPSHOT_HEADER_LEN * u64::from(MAX_SNAPSHOTS),
            cluster_size,
        )?;
    }
    validate_table(
        Structure::L1Table,
        "Active L1 table",
        l1_table_offset,
        l1_size.into(),
        L1_ENTRY_LEN,
        MAX_L1_BYTES,
        cluster_size,
    )?;
    let extended_l2 = incompatible_features & INCOMPAT_EXTL2 != 0;
    let l1_needed = l1_entries_for(size, cluster_bits, extended_l2).unwrap_or(u64::MAX);
    if l1_needed > i32::MAX as u64 {
        return Err(header_err(
            FormatErrorKind::TooLarge,
            24,
            "Image is too big",
        ));
    }
    if u64::from(l1_size) < l1_needed {
        return Err(header_err(
            FormatErrorKind::Invalid,
            36,
            "L1 table is too small",
        ));
    }
    if crypt_method > MAX_CRYPT_METHOD {
        // QEMU prints the u32 with %d.
        let shown = i32::from_ne_bytes(crypt_method.to_ne_bytes());
        return Err(header_err(
            FormatErrorKind::Invalid,
            32,
            format!("Unsupported encryption method {shown}"),
        ));
    }

    let mut scan = ExtScan::default();
    scan_extensions(&area, Pass::Full, &mut scan)?;

    let backing_file = if backing_file_offset != 0 {
        let room = cluster_size - backing_file_offset; // offset <= cluster_size checked above
        let limit = room.min(MAX_BACKING_FILE_NAME.into());
        if u64::from(backing_file_size) > limit {
            return Err(FormatError::invalid(
                Structure::BackingFileName,
                Some(backing_file_offset),
                "Backing file name too long",
            ));
        }
        let raw = read_vec(buf, backing_file_offset, backing_file_size.into());
        let name = String::from_utf8(raw).map_err(|_| {
            FormatError::invalid(
                Structure::BackingFileName,
                Some(backing_file_offset),
                "Backing file name is not valid UTF-8",
            )
        })?;
        Some(name)
    } else {
        None
    };

    Ok(Header {
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible_features,
        compatible_features,
        autoclear_features,
        refcount_order,
        header_length,
        compression_type,
        unknown_fields,
        extensions: scan.extensions,
        backing_file,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
#[path = "decode_tests.rs"]
mod tests;
