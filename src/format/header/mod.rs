//! The image header, its extensions and the backing file name (spec §1, limits §13.1).
//!
//! Everything here lives in host cluster 0:
//!
//! | Offset | Size | Field | Rule enforced by [`Header::decode`] |
//! |---|---|---|---|
//! | 0 | 4 | magic | `QFI\xfb`, else "Image is not in qcow2 format" |
//! | 4 | 4 | `version` | 2 or 3 |
//! | 8 | 8 | `backing_file_offset` | `<= cluster_size`; 0 = no backing file |
//! | 16 | 4 | `backing_file_size` | `<= min(1023, cluster_size - backing_file_offset)` |
//! | 20 | 4 | `cluster_bits` | 9..=21 |
//! | 24 | 8 | `size` | needs at most `i32::MAX` L1 entries, and no more than `l1_size` |
//! | 32 | 4 | `crypt_method` | 0, 1 or 2 |
//! | 36 | 4 | `l1_size` | `l1_size * 8 <= 32 MiB` |
//! | 40 | 8 | `l1_table_offset` | cluster-aligned, `offset + l1_size * 8 <= i64::MAX` |
//! | 48 | 8 | `refcount_table_offset` | cluster-aligned, end `<= i64::MAX` |
//! | 56 | 4 | `refcount_table_clusters` | 1..; table `<= 8 MiB` |
//! | 60 | 4 | `nb_snapshots` | `<= 65536` |
//! | 64 | 8 | `snapshots_offset` | cluster-aligned, end `<= i64::MAX` |
//! | 72 | 8 | `incompatible_features` (v3) | only bits 0..=4 |
//! | 80 | 8 | `compatible_features` (v3) | unknown bits ignored |
//! | 88 | 8 | `autoclear_features` (v3) | unknown bits kept (the opener clears them) |
//! | 96 | 4 | `refcount_order` (v3) | `<= 6` |
//! | 100 | 4 | `header_length` (v3) | `104 <= header_length <= cluster_size` |
//! | 104 | 1 | `compression_type` (v3, if `header_length > 104`) | 0 (zlib) or 1 (zstd), matching incompatible bit 3 |
//! | 105 | 7 | padding | ignored |
//! | 112 | .. | unknown additional fields | kept verbatim in [`Header::unknown_fields`] |
//!
//! Header extensions follow at `header_length` (72 for v2), each an 8-byte
//! `type`/`len` pair followed by `len` bytes padded to a multiple of 8; the
//! area ends at an extension of type 0 or at `backing_file_offset` (if non-zero,
//! else at the end of cluster 0). The backing file name (not NUL-terminated)
//! sits at `backing_file_offset`.
//!
//! [`Header::decode`] performs, in QEMU 10's order and with QEMU's messages, every
//! open-time check that can be decided from cluster 0 alone. It does *not* look at
//! the dirty or corrupt bit, at table offsets versus the file length, at the
//! `data-file` options, or at a missing LUKS header: those need the open mode or
//! the file and belong to the opener.

/// Byte offsets of the header fields the engine rewrites in place (the
/// spec's "Byte" column, big-endian fields), so writers name the field
/// instead of a literal number.
pub mod field {
    /// `size`: the virtual disk size (8 bytes).
    pub const SIZE: u64 = 24;
    /// `l1_size`: entries of the active L1 table (4 bytes), followed by
    /// `l1_table_offset` (8 bytes).
    pub const L1_SIZE: u64 = 36;
    /// `refcount_table_offset` (8 bytes), followed by
    /// `refcount_table_clusters` (4 bytes).
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// `nb_snapshots` (4 bytes), followed by `snapshots_offset` (8 bytes).
    pub const NB_SNAPSHOTS: u64 = 60;
    /// `incompatible_features` (8 bytes, version 3).
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    /// `compatible_features` (8 bytes, version 3).
    pub const COMPATIBLE_FEATURES: u64 = 80;
    /// `autoclear_features` (8 bytes, version 3).
    pub const AUTOCLEAR_FEATURES: u64 = 88;
}

mod decode;
mod encode;
mod ext;

pub use ext::{qemu_feature_table, BitmapsExtension, FeatureKind, FeatureName, HeaderExtension};

use super::consts::{INCOMPAT_EXTL2, MAX_CLUSTER_BITS, V2_HEADER_LENGTH, V3_HEADER_LENGTH};
use super::{FormatError, FormatErrorKind, Structure};
use decode::{decode_impl, l1_entries_for};
use encode::{ext_write_group, EXT_WRITE_ORDER};

/// Offset of `compression_type`, the first optional v3 field.
const COMPRESSION_TYPE_OFFSET: u32 = 104;
/// `compression_type` value for deflate (zlib).
const COMPRESSION_TYPE_ZLIB: u8 = 0;
/// QEMU's feature-name tables are omitted for clusters of 4 KiB and smaller.
const FEATURE_TABLE_MIN_CLUSTER_BITS: u32 = 13;

/// A decoded qcow2 header with its extensions and backing file name.
///
/// Field names are the spec's. For a v2 image the v3 fields hold their
/// defaults (feature masks 0, `refcount_order` 4, `header_length` 72,
/// `compression_type` 0).
///
/// `header_length`, `backing_file_offset` and `backing_file_size` describe the
/// layout *as read*; [`Header::encode`] recomputes them (see [`Header::normalize`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version: 2 or 3.
    pub version: u32,
    /// Host offset of the backing file name in cluster 0; 0 = no backing file.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 = none, 1 = legacy AES-CBC, 2 = LUKS.
    pub crypt_method: u32,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// `refcount_bits = 1 << refcount_order` (0..=6).
    pub refcount_order: u32,
    /// Header length in bytes as read (72 for v2).
    pub header_length: u32,
    /// 0 = deflate, 1 = zstd; 0 when absent (`header_length <= 104`).
    pub compression_type: u8,
    /// Bytes 112..`header_length`, preserved verbatim.
    pub unknown_fields: Vec<u8>,
    /// Header extensions in file order, unknown ones included.
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name (raw, an untrusted path), if `backing_file_offset != 0`.
    pub backing_file: Option<String>,
}

impl Header {
    /// A fresh v3 header as `qemu-img create` would start it: 16-bit refcounts,
    /// `header_length` 112, zlib compression, QEMU's feature name table when the
    /// cluster size is above 4 KiB, and no backing file.
    ///
    /// The table fields (`l1_size`, `l1_table_offset`, `refcount_table_offset`,
    /// `refcount_table_clusters`) are zero: the caller fills them in once it has
    /// laid out the image, otherwise the header does not decode.
    pub fn new_v3(cluster_bits: u32, size: u64) -> Header {
        let extensions = if cluster_bits >= FEATURE_TABLE_MIN_CLUSTER_BITS {
            vec![HeaderExtension::FeatureNameTable(qemu_feature_table())]
        } else {
            Vec::new()
        };
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LENGTH,
            compression_type: COMPRESSION_TYPE_ZLIB,
            unknown_fields: Vec::new(),
            extensions,
            backing_file: None,
        }
    }

    /// A fresh v2 (`compat=0.10`) header: like [`Header::new_v3`] but with the
    /// v2 defaults and no extensions.
    pub fn new_v2(cluster_bits: u32, size: u64) -> Header {
        Header {
            version: 2,
            header_length: V2_HEADER_LENGTH,
            extensions: Vec::new(),
            ..Header::new_v3(cluster_bits, size)
        }
    }

    /// Decodes and validates the start of an image file, as QEMU does when it
    /// opens an image (not in check mode).
    ///
    /// `buf` is the beginning of the file: pass `min(file length, 2 MiB)` bytes
    /// so that all of cluster 0 is covered. Bytes beyond `buf` read as zero, as
    /// QEMU reads past the end of the file.
    ///
    /// ```
    /// use qcow2kit::format::header::Header;
    /// use qcow2kit::storage::{MemStorage, Storage};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let file = std::sync::Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &qcow2kit::CreateOptions::new(), 1 << 30)?;
    /// let mut cluster0 = vec![0u8; 65536];
    /// file.read_at(&mut cluster0, 0)?;
    /// let h = Header::decode(&cluster0)?; // pure: no I/O, QEMU's validation
    /// assert_eq!((h.version, h.size, h.cluster_bits), (3, 1 << 30, 16));
    /// assert!(Header::decode(b"not an image").is_err());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// With QEMU's message and errno class, in QEMU's order:
    /// [`FormatErrorKind::NotQcow2`] for an empty buffer or a bad magic;
    /// [`FormatErrorKind::Unsupported`] for an unknown version, compression type
    /// or incompatible feature; [`FormatErrorKind::TooLarge`] for tables or
    /// sizes beyond QEMU's limits; [`FormatErrorKind::Invalid`] for everything
    /// else, including a buffer shorter than the fixed header fields (72 bytes
    /// for v2, 104 for v3), reported as "qcow2 header too short".
    pub fn decode(buf: &[u8]) -> Result<Header, FormatError> {
        decode_impl(buf, false)
    }

    /// Like [`Header::decode`], but with QEMU's relaxations for `qemu-img check`
    /// (`BDRV_O_CHECK`): a zero `refcount_table_clusters` and an invalid snapshot
    /// table pointer are accepted, so the checker can report and repair them.
    ///
    /// # Errors
    ///
    /// As [`Header::decode`], minus the two relaxed checks.
    pub fn decode_for_check(buf: &[u8]) -> Result<Header, FormatError> {
        decode_impl(buf, true)
    }

    /// The cluster size in bytes (0 if `cluster_bits` is 64 or more, which
    /// never happens for a decoded header).
    pub fn cluster_size(&self) -> u64 {
        1u64.checked_shl(self.cluster_bits).unwrap_or(0)
    }

    /// Width of a refcount in bits, `1 << refcount_order` (0 if
    /// `refcount_order` is 32 or more, which never happens for a decoded header).
    pub fn refcount_bits(&self) -> u32 {
        1u32.checked_shl(self.refcount_order).unwrap_or(0)
    }

    /// Whether the image has a backing file: a non-empty backing file name
    /// (QEMU treats an empty name as no backing file).
    pub fn has_backing(&self) -> bool {
        self.backing_file
            .as_deref()
            .is_some_and(|name| !name.is_empty())
    }

    /// The backing file name as QEMU uses it: a C string, so it ends at the
    /// first NUL, and an empty name (`backing_file_size` 0, or a leading
    /// NUL) means no backing file. [`Header::backing_file`] keeps the raw
    /// bytes of the header.
    pub fn backing_file_name(&self) -> Option<&str> {
        self.backing_file
            .as_deref()
            .map(|n| n.split('\0').next().unwrap_or(""))
            .filter(|n| !n.is_empty())
    }

    /// The backing format from the backing format extension (the last one if
    /// there are several, as QEMU keeps the last).
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().rev().find_map(|ext| match ext {
            HeaderExtension::BackingFormat(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The external data file name from its extension (the last one if there
    /// are several). An untrusted path: see spec §13.2 item 19.
    pub fn data_file_name(&self) -> Option<&str> {
        self.extensions.iter().rev().find_map(|ext| match ext {
            HeaderExtension::DataFile(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Host offset and length of the LUKS header from the full disk
    /// encryption extension (the last one if there are several, as QEMU
    /// keeps the last).
    pub fn crypto_header(&self) -> Option<(u64, u64)> {
        self.extensions.iter().rev().find_map(|ext| match ext {
            HeaderExtension::Crypto { offset, length } => Some((*offset, *length)),
            _ => None,
        })
    }

    /// The bitmaps extension (the last one if there are several).
    pub fn bitmaps(&self) -> Option<&BitmapsExtension> {
        self.extensions.iter().rev().find_map(|ext| match ext {
            HeaderExtension::Bitmaps(bitmaps) => Some(bitmaps),
            _ => None,
        })
    }

    /// The name the image's feature name table gives to a feature bit (the last
    /// table if there are several).
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        let table = self.extensions.iter().rev().find_map(|ext| match ext {
            HeaderExtension::FeatureNameTable(table) => Some(table),
            _ => None,
        })?;
        table
            .iter()
            .find(|entry| entry.kind == kind && entry.bit == bit)
            .map(|entry| entry.name.as_str())
    }

    /// Whether incompatible bit 4 (extended L2 entries, subclusters) is set.
    pub fn is_extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Size of an L2 entry in bytes: 16 with extended L2 entries, else 8.
    pub fn l2_entry_size(&self) -> u64 {
        if self.is_extended_l2() {
            16
        } else {
            8
        }
    }

    /// Number of L1 entries needed to map `size` guest bytes:
    /// `ceil(size / (cluster_size * l2_entries))` (spec §2.3).
    ///
    /// Returns `None` only for a nonsensical `cluster_bits` (never for a decoded
    /// header). Unlike QEMU's `size_to_l1`, this does not wrap for sizes near 2^64.
    pub fn l1_entries_needed(&self, size: u64) -> Option<u64> {
        l1_entries_for(size, self.cluster_bits, self.is_extended_l2())
    }

    /// Encodes the header, every extension (padded to 8 bytes), the end marker
    /// and the backing file name, laid out as QEMU 10's `qcow2_update_header`:
    ///
    /// 1. the header: 72 bytes for v2; for v3 112 bytes (through
    ///    `compression_type` and its padding) followed by `unknown_fields`;
    /// 2. extensions grouped by type in QEMU's order — backing format, external
    ///    data file, crypto, feature name table, bitmaps, then all others —
    ///    each group in the order of [`Header::extensions`];
    /// 3. the 8-byte end marker, then the backing file name right after it.
    ///
    /// `header_length` (112 + `unknown_fields.len()` for v3), `backing_file_offset`
    /// and `backing_file_size` are computed, not taken from `self`. The result is
    /// not padded to a cluster; see [`Header::encode_into_cluster`].
    ///
    /// Unlike QEMU, which keeps unknown extensions in a list it builds by
    /// prepending (and so writes them in reverse order of reading), this keeps
    /// their order, so that decoding the result gives back the same header.
    ///
    /// # Errors
    ///
    /// [`FormatErrorKind::Invalid`] (or `Unsupported` for a bad version or
    /// compression type) if the header cannot be written as QEMU would accept
    /// it: a v2 header with v3-only values, an invalid compression type setting,
    /// a backing format of 16 bytes or more, a backing file name over 1023
    /// bytes, a feature name over 46 bytes or containing NUL, an unknown
    /// extension of type 0, or a length that does not fit its 32-bit field.
    /// Other fields are written as they are; this does not re-run the checks
    /// of [`Header::decode`].
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.layout().map(|layout| layout.bytes)
    }

    /// [`Header::encode`] padded with zeros to exactly `cluster_size` bytes,
    /// ready to be written over cluster 0 in one write.
    ///
    /// # Errors
    ///
    /// As [`Header::encode`]; [`FormatErrorKind::TooLarge`] if the encoding does
    /// not fit in `cluster_size` bytes (QEMU fails with ENOSPC) or if
    /// `cluster_size` exceeds 2 MiB.
    pub fn encode_into_cluster(&self, cluster_size: u64) -> Result<Vec<u8>, FormatError> {
        let max_cluster_size = 1u64 << MAX_CLUSTER_BITS;
        if cluster_size > max_cluster_size {
            return Err(FormatError::new(
                FormatErrorKind::TooLarge,
                Structure::Header,
                None,
                format!("cluster size {cluster_size} exceeds the maximum of {max_cluster_size}"),
            ));
        }
        let mut bytes = self.encode()?;
        let used = bytes.len() as u64;
        let target = usize::try_from(cluster_size)
            .ok()
            .filter(|_| used <= cluster_size);
        match target {
            Some(target) => {
                bytes.resize(target, 0);
                Ok(bytes)
            }
            None => Err(FormatError::new(
                FormatErrorKind::TooLarge,
                Structure::Header,
                Some(0),
                format!(
                    "header, extensions and backing file name need {used} bytes, \
                     more than the cluster size {cluster_size}"
                ),
            )),
        }
    }

    /// Sets `header_length`, `backing_file_offset` and `backing_file_size` to
    /// the values [`Header::encode`] writes and puts the extensions in the
    /// order it writes them (QEMU's grouping by type; the order within a
    /// group is kept), so that `Header::decode(&h.encode()?)? == h` holds for
    /// a valid header `h`.
    ///
    /// # Errors
    ///
    /// As [`Header::encode`].
    pub fn normalize(&mut self) -> Result<(), FormatError> {
        let layout = self.layout()?;
        self.header_length = layout.header_length;
        self.backing_file_offset = layout.backing_file_offset;
        self.backing_file_size = layout.backing_file_size;
        // A stable sort: extensions of one group keep their order.
        self.extensions.sort_by_key(|ext| {
            EXT_WRITE_ORDER
                .iter()
                .position(|group| *group == ext_write_group(ext))
        });
        Ok(())
    }
}

#[cfg(test)]
mod test_support;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
mod tests;
