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
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
mod tests {
    use super::decode::{read_u32, read_u64};
    use super::ext::CRYPT_LUKS;
    use super::*;
    use crate::format::consts::{
        AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT,
        EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION,
        INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, MAX_BITMAPS,
        MAX_BITMAP_DIRECTORY_BYTES, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, QCOW2_MAGIC,
    };
    use crate::format::{put_be_u32, put_be_u64};
    use proptest::prelude::*;

    const CS: u64 = 65536;

    /// A valid v3 header (64 KiB clusters, 64 MiB disk), 112 bytes; the rest of
    /// cluster 0 reads as zero, i.e. an end marker.
    fn base_v3() -> Vec<u8> {
        let mut b = vec![0u8; 112];
        put_be_u32(&mut b, 0, QCOW2_MAGIC);
        put_be_u32(&mut b, 4, 3);
        put_be_u32(&mut b, 20, 16);
        put_be_u64(&mut b, 24, 64 << 20);
        put_be_u32(&mut b, 36, 1);
        put_be_u64(&mut b, 40, 0x30000);
        put_be_u64(&mut b, 48, 0x10000);
        put_be_u32(&mut b, 56, 1);
        put_be_u32(&mut b, 96, 4);
        put_be_u32(&mut b, 100, 112);
        b
    }

    fn base_v2() -> Vec<u8> {
        let mut b = base_v3();
        b.truncate(72);
        put_be_u32(&mut b, 4, 2);
        b
    }

    fn set32(b: &mut Vec<u8>, pos: usize, v: u32) {
        if b.len() < pos + 4 {
            b.resize(pos + 4, 0);
        }
        put_be_u32(b, pos, v);
    }

    fn set64(b: &mut Vec<u8>, pos: usize, v: u64) {
        if b.len() < pos + 8 {
            b.resize(pos + 8, 0);
        }
        put_be_u64(b, pos, v);
    }

    fn ext(ext_type: u32, data: &[u8]) -> Vec<u8> {
        let mut e = ext_type.to_be_bytes().to_vec();
        e.extend_from_slice(&(data.len() as u32).to_be_bytes());
        e.extend_from_slice(data);
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    /// `hdr` followed by the given extensions and an end marker.
    fn with_exts(mut hdr: Vec<u8>, exts: &[Vec<u8>]) -> Vec<u8> {
        for e in exts {
            hdr.extend_from_slice(e);
        }
        hdr.extend_from_slice(&[0; 8]);
        hdr
    }

    fn feature(kind: u8, bit: u8, name: &[u8]) -> Vec<u8> {
        let mut e = vec![kind, bit];
        e.extend_from_slice(name);
        e.resize(48, 0);
        e
    }

    fn bitmaps_payload(nb: u32, reserved: u32, size: u64, offset: u64) -> Vec<u8> {
        let mut d = vec![0u8; 24];
        put_be_u32(&mut d, 0, nb);
        put_be_u32(&mut d, 4, reserved);
        put_be_u64(&mut d, 8, size);
        put_be_u64(&mut d, 16, offset);
        d
    }

    #[track_caller]
    fn assert_rejects(buf: &[u8], kind: FormatErrorKind, msg: &str) {
        let err = Header::decode(buf).expect_err("decode should fail");
        assert_eq!(err.reason, msg);
        assert_eq!(err.kind, kind, "kind for {msg:?}");
        assert_eq!(err.to_string(), msg);
    }

    // ---- rejection paths, in QEMU's order ----

    #[test]
    fn rejects_empty_buffer() {
        assert_rejects(
            &[],
            FormatErrorKind::NotQcow2,
            "Image is not in qcow2 format",
        );
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = base_v3();
        b[3] = 0xfc;
        assert_rejects(
            &b,
            FormatErrorKind::NotQcow2,
            "Image is not in qcow2 format",
        );
        assert_rejects(
            b"QFI",
            FormatErrorKind::NotQcow2,
            "Image is not in qcow2 format",
        );
        assert_rejects(
            &[0u8; 1024],
            FormatErrorKind::NotQcow2,
            "Image is not in qcow2 format",
        );
    }

    #[test]
    fn rejects_unsupported_versions() {
        for v in [0u32, 1, 4, u32::MAX] {
            let mut b = base_v3();
            set32(&mut b, 4, v);
            assert_rejects(
                &b,
                FormatErrorKind::Unsupported,
                &format!("Unsupported qcow2 version {v}"),
            );
        }
    }

    #[test]
    fn rejects_truncated_buffers() {
        let msg = "qcow2 header too short";
        assert_rejects(&base_v3()[..6], FormatErrorKind::Invalid, msg);
        assert_rejects(&base_v3()[..103], FormatErrorKind::Invalid, msg);
        assert_rejects(&base_v2()[..71], FormatErrorKind::Invalid, msg);
        assert!(Header::decode(&base_v3()[..104]).is_ok());
        assert!(Header::decode(&base_v2()).is_ok());
    }

    #[test]
    fn rejects_cluster_bits_out_of_range() {
        for bits in [0u32, 8, 22, 64] {
            let mut b = base_v3();
            set32(&mut b, 20, bits);
            assert_rejects(
                &b,
                FormatErrorKind::Invalid,
                &format!("Unsupported cluster size: 2^{bits}"),
            );
        }
    }

    #[test]
    fn version_is_checked_before_cluster_bits() {
        let mut b = base_v3();
        set32(&mut b, 4, 1);
        set32(&mut b, 20, 8);
        assert_rejects(
            &b,
            FormatErrorKind::Unsupported,
            "Unsupported qcow2 version 1",
        );
    }

    #[test]
    fn rejects_short_header_length() {
        let mut b = base_v3();
        set32(&mut b, 100, 103);
        assert_rejects(&b, FormatErrorKind::Invalid, "qcow2 header too short");
    }

    #[test]
    fn rejects_header_length_beyond_cluster() {
        let mut b = base_v3();
        set32(&mut b, 100, CS as u32 + 1);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "qcow2 header exceeds cluster size",
        );
    }

    #[test]
    fn rejects_backing_file_offset_beyond_cluster() {
        let mut b = base_v3();
        set64(&mut b, 8, CS + 1);
        assert_rejects(&b, FormatErrorKind::Invalid, "Invalid backing file offset");
    }

    #[test]
    fn rejects_unknown_compression_type() {
        let mut b = base_v3();
        b[104] = 2;
        assert_rejects(
            &b,
            FormatErrorKind::Unsupported,
            "qcow2: unknown compression type: 2",
        );
    }

    #[test]
    fn rejects_zlib_with_compression_bit() {
        let mut b = base_v3();
        set64(&mut b, 72, INCOMPAT_COMPRESSION);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "qcow2: Compression type incompatible feature bit must not be set",
        );
    }

    #[test]
    fn rejects_zstd_without_compression_bit() {
        let mut b = base_v3();
        b[104] = 1;
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "qcow2: Compression type incompatible feature bit must be set",
        );
    }

    #[test]
    fn compression_type_is_absent_below_105() {
        // header_length 104: byte 104 is the first extension byte, not compression_type.
        let mut b = base_v3();
        set32(&mut b, 100, 104);
        b.truncate(104);
        let b = with_exts(b, &[ext(EXT_BACKING_FORMAT, b"raw")]);
        // The extension type's first byte (0xe2) sits at 104.
        assert_eq!(b[104], 0xe2);
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.compression_type, 0);
        assert_eq!(h.backing_format(), Some("raw"));
        // header_length 105: present.
        let mut b = base_v3();
        set32(&mut b, 100, 105);
        b[104] = 1;
        set64(&mut b, 72, INCOMPAT_COMPRESSION);
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.compression_type, 1);
        assert!(h.unknown_fields.is_empty());
    }

    #[test]
    fn rejects_unknown_incompatible_bit_without_table() {
        let mut b = base_v3();
        set64(&mut b, 72, 1 << 5);
        assert_rejects(
            &b,
            FormatErrorKind::Unsupported,
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 20",
        );
        set64(&mut b, 72, (1 << 5) | (1 << 40) | INCOMPAT_DIRTY);
        assert_rejects(
            &b,
            FormatErrorKind::Unsupported,
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000020",
        );
    }

    #[test]
    fn unknown_incompatible_bits_use_the_feature_table() {
        // Same image as verified against qemu-img 10.0.2: bit 7 is only named as
        // a compatible bit, so it stays "unknown"; a 46-byte name is not NUL-terminated.
        let mut table = feature(0, 5, b"foo bar");
        table.extend(feature(1, 7, b"compat7"));
        table.extend(feature(0, 9, &[b'x'; 46]));
        let mut b = base_v3();
        set64(&mut b, 72, (1 << 5) | (1 << 7) | (1 << 9));
        let b = with_exts(b, &[ext(EXT_FEATURE_TABLE, &table)]);
        let x46 = "x".repeat(46);
        assert_rejects(
            &b,
            FormatErrorKind::Unsupported,
            &format!(
                "Unsupported qcow2 feature(s): foo bar, {x46}, Unknown incompatible feature: 80"
            ),
        );
    }

    #[test]
    fn feature_table_after_a_broken_extension_is_not_used() {
        let mut b = base_v3();
        set64(&mut b, 72, 1 << 5);
        let b = with_exts(
            b,
            &[
                ext(EXT_BACKING_FORMAT, &[b'a'; 16]),
                ext(EXT_FEATURE_TABLE, &feature(0, 5, b"foo")),
            ],
        );
        assert_rejects(
            &b,
            FormatErrorKind::Unsupported,
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 20",
        );
    }

    #[test]
    fn feature_table_walk_stops_at_an_empty_name() {
        let mut table = feature(0, 5, b"");
        table.extend(feature(0, 6, b"six"));
        let mut b = base_v3();
        set64(&mut b, 72, (1 << 5) | (1 << 6));
        let b = with_exts(b, &[ext(EXT_FEATURE_TABLE, &table)]);
        assert_rejects(
            &b,
            FormatErrorKind::Unsupported,
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 60",
        );
    }

    #[test]
    fn feature_probe_stops_at_a_crypto_extension() {
        // QEMU has not stored crypt_method yet when it probes, so even a LUKS
        // image's crypto extension ends the probe.
        let mut b = base_v3();
        set32(&mut b, 32, 2);
        set64(&mut b, 72, 1 << 5);
        let mut crypto = vec![0u8; 16];
        put_be_u64(&mut crypto, 0, 0x50000);
        let b = with_exts(
            b,
            &[
                ext(EXT_CRYPTO, &crypto),
                ext(EXT_FEATURE_TABLE, &feature(0, 5, b"foo")),
            ],
        );
        assert_rejects(
            &b,
            FormatErrorKind::Unsupported,
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 20",
        );
    }

    #[test]
    fn rejects_small_subclusters() {
        let mut b = base_v3();
        set64(&mut b, 72, INCOMPAT_EXTL2);
        set32(&mut b, 20, 13);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Unsupported subcluster size: 256",
        );
        set32(&mut b, 20, 14);
        set32(&mut b, 36, 4); // 1024 extended entries of 16 KiB per L2 table
        assert!(Header::decode(&b).is_ok());
    }

    #[test]
    fn rejects_wide_refcounts() {
        let mut b = base_v3();
        set32(&mut b, 96, 7);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Reference count entry width too large; may not exceed 64 bits",
        );
    }

    #[test]
    fn rejects_missing_refcount_table_except_in_check_mode() {
        let mut b = base_v3();
        set32(&mut b, 56, 0);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Image does not contain a reference count table",
        );
        assert_eq!(
            Header::decode_for_check(&b)
                .unwrap()
                .refcount_table_clusters,
            0
        );
    }

    #[test]
    fn rejects_large_refcount_table() {
        let mut b = base_v3();
        set32(&mut b, 56, 129); // 129 * 64 KiB > 8 MiB
        assert_rejects(
            &b,
            FormatErrorKind::TooLarge,
            "Reference count table too large",
        );
        set32(&mut b, 56, 128);
        assert!(Header::decode(&b).is_ok());
    }

    #[test]
    fn rejects_invalid_refcount_table_offset() {
        let mut b = base_v3();
        set64(&mut b, 48, 0x10200);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Reference count table offset invalid",
        );
        // Aligned, but the table would end beyond INT64_MAX.
        set64(&mut b, 48, 0x7fff_ffff_ffff_0000);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Reference count table offset invalid",
        );
        set64(&mut b, 48, 0x7fff_ffff_fffe_0000);
        assert!(Header::decode(&b).is_ok());
        let err = {
            set64(&mut b, 48, !0xffff);
            Header::decode(&b).unwrap_err()
        };
        assert_eq!(err.what, Structure::RefcountTable);
        assert_eq!(err.offset, Some(!0xffff));
    }

    #[test]
    fn rejects_too_many_snapshots_except_in_check_mode() {
        let mut b = base_v3();
        set32(&mut b, 60, 65537);
        assert_rejects(&b, FormatErrorKind::TooLarge, "Snapshot table too large");
        assert!(Header::decode_for_check(&b).is_ok());
        set32(&mut b, 60, 65536);
        assert!(Header::decode(&b).is_ok());
    }

    #[test]
    fn rejects_invalid_snapshot_table_offset_even_without_snapshots() {
        let mut b = base_v3();
        set64(&mut b, 64, 3);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Snapshot table offset invalid",
        );
        // 1638 entries of 40 bytes end exactly at INT64_MAX + 1.
        set64(&mut b, 64, 0x7fff_ffff_ffff_0000);
        set32(&mut b, 60, 1638);
        assert!(Header::decode(&b).is_ok());
        set32(&mut b, 60, 1639);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Snapshot table offset invalid",
        );
        assert!(Header::decode_for_check(&b).is_ok());
    }

    #[test]
    fn rejects_large_l1_table() {
        let mut b = base_v3();
        set32(&mut b, 36, 4 * 1024 * 1024 + 1);
        assert_rejects(&b, FormatErrorKind::TooLarge, "Active L1 table too large");
    }

    #[test]
    fn rejects_invalid_l1_table_offset() {
        let mut b = base_v3();
        set64(&mut b, 40, 0x30008);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Active L1 table offset invalid",
        );
        set64(&mut b, 40, 0x7fff_ffff_ffff_0000);
        set32(&mut b, 36, 0x1fff);
        assert!(Header::decode(&b).is_ok());
        set32(&mut b, 36, 0x2000);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Active L1 table offset invalid",
        );
        // Unaligned even with an empty L1 table.
        set32(&mut b, 36, 0);
        set64(&mut b, 24, 0);
        set64(&mut b, 40, 1);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Active L1 table offset invalid",
        );
    }

    #[test]
    fn rejects_image_too_big() {
        let mut b = base_v3();
        set64(&mut b, 24, 1 << 62);
        set32(&mut b, 36, 4 * 1024 * 1024);
        assert_rejects(&b, FormatErrorKind::TooLarge, "Image is too big");
        // Same with the largest possible size: no overflow in the rounding.
        set64(&mut b, 24, u64::MAX);
        assert_rejects(&b, FormatErrorKind::TooLarge, "Image is too big");
    }

    #[test]
    fn rejects_small_l1_table() {
        let mut b = base_v3();
        set32(&mut b, 36, 0);
        assert_rejects(&b, FormatErrorKind::Invalid, "L1 table is too small");
        // One L1 entry covers 512 MiB with 64 KiB clusters, 256 MiB with extended L2.
        set32(&mut b, 36, 1);
        set64(&mut b, 24, 512 << 20);
        assert!(Header::decode(&b).is_ok());
        set64(&mut b, 24, (512 << 20) + 1);
        assert_rejects(&b, FormatErrorKind::Invalid, "L1 table is too small");
        set64(&mut b, 24, 512 << 20);
        set64(&mut b, 72, INCOMPAT_EXTL2);
        assert_rejects(&b, FormatErrorKind::Invalid, "L1 table is too small");
    }

    #[test]
    fn rejects_unknown_encryption_method() {
        let mut b = base_v3();
        set32(&mut b, 32, 5);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Unsupported encryption method 5",
        );
        // QEMU prints the field with %d (verified: -2147483647).
        set32(&mut b, 32, 0x8000_0001);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "Unsupported encryption method -2147483647",
        );
    }

    #[test]
    fn l1_checks_come_before_encryption_method() {
        let mut b = base_v3();
        set32(&mut b, 32, 5);
        set32(&mut b, 36, 0);
        assert_rejects(&b, FormatErrorKind::Invalid, "L1 table is too small");
    }

    #[test]
    fn rejects_extension_larger_than_area() {
        let b = with_exts(base_v3(), &[]);
        let mut b = b;
        set32(&mut b, 112, 0x1234_5678);
        set32(&mut b, 116, (CS - 120 + 1) as u32);
        assert_rejects(&b, FormatErrorKind::Invalid, "Header extension too large");
        set32(&mut b, 116, (CS - 120) as u32);
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.extensions.len(), 1);
        assert!(
            matches!(&h.extensions[0], HeaderExtension::Unknown { ext_type: 0x1234_5678, data } if data.len() == (CS - 120) as usize)
        );
    }

    #[test]
    fn rejects_extension_header_crossing_backing_name_offset() {
        // The area ends at backing_file_offset = 116: the 8-byte extension
        // header at 112 does not fit.
        let mut b = base_v3();
        set64(&mut b, 8, 116);
        set32(&mut b, 112, 0x1234_5678);
        assert_rejects(&b, FormatErrorKind::Invalid, "Header extension too large");
    }

    #[test]
    fn unaligned_header_length_reads_extensions_from_there() {
        // Verified with qemu-img: header_length 113 on a fresh image makes QEMU
        // read garbage as an extension and fail.
        let h = Header::new_v3(16, 64 << 20);
        let mut b = h.encode().unwrap();
        set32(&mut b, 36, 1);
        set32(&mut b, 56, 1);
        set64(&mut b, 48, 0x10000);
        set64(&mut b, 40, 0x30000);
        assert!(Header::decode(&b).is_ok());
        set32(&mut b, 100, 113);
        assert_rejects(&b, FormatErrorKind::Invalid, "Header extension too large");
    }

    #[test]
    fn rejects_long_backing_format() {
        let b = with_exts(base_v3(), &[ext(EXT_BACKING_FORMAT, &[b'a'; 16])]);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "ERROR: ext_backing_format: len=16 too large (>=16)",
        );
        let b = with_exts(base_v3(), &[ext(EXT_BACKING_FORMAT, &[b'a'; 15])]);
        assert_eq!(
            Header::decode(&b).unwrap().backing_format(),
            Some("aaaaaaaaaaaaaaa")
        );
    }

    #[test]
    fn rejects_crypto_extension_without_luks() {
        let b = with_exts(base_v3(), &[ext(EXT_CRYPTO, &[0; 16])]);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "CRYPTO header extension only expected with LUKS encryption method",
        );
    }

    #[test]
    fn rejects_crypto_extension_of_wrong_size() {
        let mut b = base_v3();
        set32(&mut b, 32, 2);
        let b = with_exts(b, &[ext(EXT_CRYPTO, &[0; 8])]);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "CRYPTO header extension size 8, but expected size 16",
        );
    }

    #[test]
    fn rejects_unaligned_crypto_header() {
        let mut b = base_v3();
        set32(&mut b, 32, 2);
        let mut crypto = vec![0u8; 16];
        put_be_u64(&mut crypto, 0, 513);
        let b2 = with_exts(b.clone(), &[ext(EXT_CRYPTO, &crypto)]);
        assert_rejects(
            &b2,
            FormatErrorKind::Invalid,
            "Encryption header offset '513' is not a multiple of cluster size '65536'",
        );
        put_be_u64(&mut crypto, 0, 0x50000);
        put_be_u64(&mut crypto, 8, 2 << 20);
        let h = Header::decode(&with_exts(b, &[ext(EXT_CRYPTO, &crypto)])).unwrap();
        assert_eq!(
            h.extensions,
            vec![HeaderExtension::Crypto {
                offset: 0x50000,
                length: 2 << 20
            }]
        );
    }

    #[test]
    fn rejects_bad_bitmaps_extensions() {
        let cases: [(Vec<u8>, &str); 6] = [
            (vec![0; 16], "bitmaps_ext: Invalid extension length"),
            (bitmaps_payload(1, 1, 8, 0x10000), "bitmaps_ext: Reserved field is not zero"),
            (bitmaps_payload(0, 0, 8, 0x10000), "found bitmaps extension with zero bitmaps"),
            (
                bitmaps_payload(65536, 0, 8, 0x10000),
                "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535",
            ),
            (bitmaps_payload(1, 0, 8, 0x10001), "bitmaps_ext: invalid bitmap directory offset"),
            (
                bitmaps_payload(1, 0, 65535 * 1024 + 1, 0x10000),
                "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)",
            ),
        ];
        for (payload, msg) in cases {
            let mut b = base_v3();
            set64(&mut b, 88, AUTOCLEAR_BITMAPS);
            let b = with_exts(b, &[ext(EXT_BITMAPS, &payload)]);
            assert_rejects(&b, FormatErrorKind::Invalid, msg);
        }
    }

    #[test]
    fn bitmaps_extension_without_autoclear_bit_is_kept_unchecked() {
        // Length is still checked.
        let b = with_exts(base_v3(), &[ext(EXT_BITMAPS, &[0; 16])]);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "bitmaps_ext: Invalid extension length",
        );
        // Invalid content is kept verbatim.
        let bad = bitmaps_payload(0, 7, 8, 0x10001);
        let h = Header::decode(&with_exts(base_v3(), &[ext(EXT_BITMAPS, &bad)])).unwrap();
        assert_eq!(
            h.extensions,
            vec![HeaderExtension::Unknown {
                ext_type: EXT_BITMAPS,
                data: bad
            }]
        );
        assert_eq!(h.bitmaps(), None);
        // Valid content decodes.
        let good = bitmaps_payload(2, 0, 64, 0x40000);
        let h = Header::decode(&with_exts(base_v3(), &[ext(EXT_BITMAPS, &good)])).unwrap();
        let expected = BitmapsExtension {
            nb_bitmaps: 2,
            bitmap_directory_size: 64,
            bitmap_directory_offset: 0x40000,
        };
        assert_eq!(h.bitmaps(), Some(&expected));
    }

    #[test]
    fn rejects_long_backing_file_name() {
        let mut b = base_v3();
        set64(&mut b, 8, 0x200);
        set32(&mut b, 16, 1024);
        assert_rejects(&b, FormatErrorKind::Invalid, "Backing file name too long");
        set32(&mut b, 16, 1023);
        assert_eq!(
            Header::decode(&b).unwrap().backing_file.unwrap().len(),
            1023
        );
        // Must also fit in cluster 0.
        set64(&mut b, 8, CS - 10);
        set32(&mut b, 16, 11);
        assert_rejects(&b, FormatErrorKind::Invalid, "Backing file name too long");
        set32(&mut b, 16, 10);
        assert_eq!(
            Header::decode(&b).unwrap().backing_file.as_deref(),
            Some("\0".repeat(10).as_str())
        );
    }

    #[test]
    fn rejects_non_utf8_names() {
        let mut b = base_v3();
        set64(&mut b, 8, 0x200);
        set32(&mut b, 16, 2);
        b.resize(0x202, 0);
        b[0x200] = 0xff;
        let err = Header::decode(&b).unwrap_err();
        assert_eq!(err.what, Structure::BackingFileName);
        assert_eq!(err.offset, Some(0x200));
        let b = with_exts(base_v3(), &[ext(EXT_DATA_FILE, &[0xc3])]);
        assert_eq!(
            Header::decode(&b).unwrap_err().reason,
            "External data file name is not valid UTF-8"
        );
        let b = with_exts(base_v3(), &[ext(EXT_BACKING_FORMAT, &[0xc3])]);
        assert_eq!(
            Header::decode(&b).unwrap_err().reason,
            "Backing format name is not valid UTF-8"
        );
    }

    #[test]
    fn backing_name_is_checked_after_extensions() {
        let mut b = base_v3();
        set64(&mut b, 8, 0x200);
        set32(&mut b, 16, 2000);
        let b = with_exts(b, &[ext(EXT_BACKING_FORMAT, &[b'a'; 20])]);
        assert_rejects(
            &b,
            FormatErrorKind::Invalid,
            "ERROR: ext_backing_format: len=20 too large (>=16)",
        );
    }

    #[test]
    fn corrupt_and_dirty_bits_are_not_rejected() {
        let mut b = base_v3();
        set64(
            &mut b,
            72,
            INCOMPAT_CORRUPT | INCOMPAT_DIRTY | INCOMPAT_DATA_FILE,
        );
        set64(&mut b, 88, AUTOCLEAR_DATA_FILE_RAW | (1 << 9));
        set64(&mut b, 80, COMPAT_LAZY_REFCOUNTS | (1 << 33));
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.incompatible_features, 0x7);
        assert_eq!(h.autoclear_features, AUTOCLEAR_DATA_FILE_RAW | (1 << 9));
    }

    // ---- accepted inputs ----

    #[test]
    fn decodes_v2_with_defaults() {
        let mut b = base_v2();
        // Bytes 72.. are extensions in v2: a backing format, then the end marker.
        b = with_exts(b, &[ext(EXT_BACKING_FORMAT, b"raw")]);
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.header_length, 72);
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(
            (
                h.incompatible_features,
                h.compatible_features,
                h.autoclear_features,
                h.compression_type
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(h.backing_format(), Some("raw"));
        assert_eq!(h.encode().unwrap(), b);
    }

    #[test]
    fn keeps_unknown_fields_and_unknown_extensions() {
        let mut b = base_v3();
        set32(&mut b, 100, 128);
        b.extend_from_slice(&[0xab; 16]);
        let b = with_exts(
            b,
            &[ext(0x1111_1111, b"first"), ext(0x2222_2222, b"second!!!")],
        );
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.unknown_fields, vec![0xab; 16]);
        assert_eq!(
            h.extensions,
            vec![
                HeaderExtension::Unknown {
                    ext_type: 0x1111_1111,
                    data: b"first".to_vec()
                },
                HeaderExtension::Unknown {
                    ext_type: 0x2222_2222,
                    data: b"second!!!".to_vec()
                },
            ]
        );
        assert_eq!(h.encode().unwrap(), b);
    }

    #[test]
    fn feature_table_that_cannot_be_typed_is_kept_raw() {
        for raw in [
            feature(0, 0, b"dirty bit")[..40].to_vec(), // not a multiple of 48
            feature(3, 0, b"x"),                        // unknown type
            feature(0, 0, b"a\0b"),                     // bytes after the NUL
            feature(0, 0, &[0xff]),                     // not UTF-8
        ] {
            let h = Header::decode(&with_exts(base_v3(), &[ext(EXT_FEATURE_TABLE, &raw)])).unwrap();
            assert_eq!(
                h.extensions,
                vec![HeaderExtension::Unknown {
                    ext_type: EXT_FEATURE_TABLE,
                    data: raw
                }]
            );
        }
        let mut table = feature(0, 0, &[b'n'; 46]);
        table.extend(feature(2, 63, b""));
        let h = Header::decode(&with_exts(base_v3(), &[ext(EXT_FEATURE_TABLE, &table)])).unwrap();
        assert_eq!(
            h.feature_name(FeatureKind::Incompatible, 0),
            Some("n".repeat(46).as_str())
        );
        assert_eq!(h.feature_name(FeatureKind::Autoclear, 63), Some(""));
        assert_eq!(h.feature_name(FeatureKind::Compatible, 0), None);
    }

    #[test]
    fn extension_area_ends_at_backing_file_offset() {
        // A non-zero word right at the backing name is not read as an extension.
        let mut b = with_exts(base_v3(), &[ext(EXT_BACKING_FORMAT, b"qcow2")]);
        let name_at = b.len() - 8; // the end marker's position
        b.truncate(name_at);
        b.extend_from_slice(b"base.img");
        set64(&mut b, 8, name_at as u64);
        set32(&mut b, 16, 8);
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format(), Some("qcow2"));
        assert!(h.has_backing());
    }

    #[test]
    fn duplicate_extensions_are_kept_and_the_last_wins() {
        let b = with_exts(
            base_v3(),
            &[
                ext(EXT_BACKING_FORMAT, b"raw"),
                ext(EXT_BACKING_FORMAT, b"qcow2"),
                ext(EXT_DATA_FILE, b"a"),
                ext(EXT_DATA_FILE, b"b"),
            ],
        );
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.extensions.len(), 4);
        assert_eq!(h.backing_format(), Some("qcow2"));
        assert_eq!(h.data_file_name(), Some("b"));
    }

    #[test]
    fn convenience_accessors() {
        let mut h = Header::new_v3(16, 1 << 30);
        assert_eq!(h.cluster_size(), CS);
        assert_eq!(h.l2_entry_size(), 8);
        assert_eq!(h.l1_entries_needed(1 << 30), Some(2));
        assert_eq!(h.l1_entries_needed(0), Some(0));
        assert_eq!(h.l1_entries_needed(u64::MAX), Some(1 << 35));
        assert!(!h.has_backing());
        h.backing_file = Some(String::new());
        assert!(!h.has_backing());
        h.incompatible_features = INCOMPAT_EXTL2;
        assert!(h.is_extended_l2());
        assert_eq!(h.l2_entry_size(), 16);
        assert_eq!(h.l1_entries_needed(1 << 30), Some(4));
        assert_eq!(
            h.feature_name(FeatureKind::Incompatible, 4),
            Some("extended L2 entries")
        );
        assert_eq!(
            h.feature_name(FeatureKind::Autoclear, 1),
            Some("raw external data")
        );
        h.cluster_bits = 70;
        assert_eq!(h.cluster_size(), 0);
        assert_eq!(h.l1_entries_needed(1), None);
        h.refcount_order = 40;
        assert_eq!(h.refcount_bits(), 0);
        assert_eq!(Header::new_v3(12, 0).extensions, vec![]);
    }

    // ---- encoding ----

    /// A complete valid header for `new_v3`-style tests.
    fn fresh_v3() -> Header {
        let mut h = Header::new_v3(16, 1 << 30);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h
    }

    #[test]
    fn encodes_qemu_layout_with_backing_file() {
        // Spec §1.5: backing format at 0x70, feature table at 0x80, end marker
        // at 0x208, backing name at 0x210.
        let mut h = fresh_v3();
        h.extensions
            .insert(0, HeaderExtension::BackingFormat("qcow2".into()));
        h.backing_file = Some("base.qcow2".into());
        let b = h.encode().unwrap();
        assert_eq!(read_u32(&b, 0x70), EXT_BACKING_FORMAT);
        assert_eq!(read_u32(&b, 0x74), 5);
        assert_eq!(read_u32(&b, 0x80), EXT_FEATURE_TABLE);
        assert_eq!(read_u32(&b, 0x84), 8 * 48);
        assert_eq!(&b[0x208..0x210], &[0; 8]);
        assert_eq!(&b[0x210..], b"base.qcow2");
        assert_eq!(read_u64(&b, 8), 0x210);
        assert_eq!(read_u32(&b, 16), 10);
        assert_eq!(read_u32(&b, 100), 112);
        let mut normalized = h.clone();
        normalized.normalize().unwrap();
        assert_eq!(
            (normalized.backing_file_offset, normalized.backing_file_size),
            (0x210, 10)
        );
        assert_eq!(Header::decode(&b).unwrap(), normalized);
    }

    #[test]
    fn encodes_extensions_in_qemu_order() {
        let mut h = fresh_v3();
        h.crypt_method = 2;
        h.autoclear_features = AUTOCLEAR_BITMAPS;
        let bitmaps = BitmapsExtension {
            nb_bitmaps: 1,
            bitmap_directory_size: 40,
            bitmap_directory_offset: 0x50000,
        };
        h.extensions = vec![
            HeaderExtension::Unknown {
                ext_type: 7,
                data: vec![1, 2, 3],
            },
            HeaderExtension::Bitmaps(bitmaps),
            HeaderExtension::FeatureNameTable(qemu_feature_table()),
            HeaderExtension::Crypto {
                offset: 0x40000,
                length: 0x1000,
            },
            HeaderExtension::DataFile("data.raw".into()),
            HeaderExtension::BackingFormat("raw".into()),
            HeaderExtension::Unknown {
                ext_type: EXT_FEATURE_TABLE,
                data: vec![9; 5],
            },
        ];
        let d = Header::decode(&h.encode().unwrap()).unwrap();
        let types: Vec<u32> = d.extensions.iter().map(HeaderExtension::ext_type).collect();
        assert_eq!(
            types,
            vec![
                EXT_BACKING_FORMAT,
                EXT_DATA_FILE,
                EXT_CRYPTO,
                EXT_FEATURE_TABLE,
                EXT_FEATURE_TABLE,
                EXT_BITMAPS,
                7
            ]
        );
    }

    #[test]
    fn encode_into_cluster_pads_and_refuses_overflow() {
        let h = fresh_v3();
        let c = h.encode_into_cluster(CS).unwrap();
        assert_eq!(c.len(), CS as usize);
        assert_eq!(Header::decode(&c).unwrap().extensions, h.extensions);
        let mut h = Header::new_v3(9, 0);
        h.backing_file = Some("x".repeat(1000));
        let err = h.encode_into_cluster(512).unwrap_err();
        assert_eq!(err.kind, FormatErrorKind::TooLarge);
        assert!(h.encode_into_cluster(4 << 20).is_err());
    }

    #[test]
    fn encode_refuses_what_qemu_would_not_open() {
        let mut h = Header::new_v2(16, 0);
        h.compatible_features = 1;
        assert_eq!(
            h.encode().unwrap_err().reason,
            "a version 2 header cannot store compatible_features"
        );
        let mut h = Header::new_v2(16, 0);
        h.unknown_fields = vec![0; 8];
        assert!(h.encode().is_err());
        let mut h = fresh_v3();
        h.version = 4;
        assert_eq!(h.encode().unwrap_err().kind, FormatErrorKind::Unsupported);
        let mut h = fresh_v3();
        h.compression_type = 1;
        assert_eq!(
            h.encode().unwrap_err().reason,
            "qcow2: Compression type incompatible feature bit must be set"
        );
        h.incompatible_features = INCOMPAT_COMPRESSION;
        assert!(h.encode().is_ok());
        let mut h = fresh_v3();
        h.backing_file = Some("n".repeat(1024));
        assert_eq!(h.encode().unwrap_err().reason, "Backing file name too long");
        let mut h = fresh_v3();
        h.extensions = vec![HeaderExtension::BackingFormat("f".repeat(16))];
        assert!(h.encode().is_err());
        h.extensions = vec![HeaderExtension::FeatureNameTable(vec![FeatureName {
            kind: FeatureKind::Compatible,
            bit: 1,
            name: "n".repeat(47),
        }])];
        assert!(h.encode().is_err());
        h.extensions = vec![HeaderExtension::Unknown {
            ext_type: 0,
            data: vec![],
        }];
        assert!(h.encode().is_err());
    }

    #[test]
    fn qemu_feature_table_matches_spec() {
        let table = qemu_feature_table();
        assert_eq!(table.len(), 8);
        let mut h = fresh_v3();
        h.extensions = vec![HeaderExtension::FeatureNameTable(table)];
        let b = h.encode().unwrap();
        // 8 entries of 48 bytes: 0x70 + 8 + 384 = 0x1f8, end marker, no backing file.
        assert_eq!(b.len(), 0x1f8 + 8);
        assert_eq!(&b[0x78..0x78 + 11], b"\x00\x00dirty bit");
        assert_eq!(
            &b[0x78 + 7 * 48..0x78 + 7 * 48 + 19],
            b"\x02\x01raw external data"
        );
    }

    // ---- property tests ----

    fn arb_unknown_ext() -> impl Strategy<Value = HeaderExtension> {
        let known = [
            EXT_END,
            EXT_BACKING_FORMAT,
            EXT_FEATURE_TABLE,
            EXT_BITMAPS,
            EXT_CRYPTO,
            EXT_DATA_FILE,
        ];
        (
            any::<u32>().prop_filter("unknown type", move |t| !known.contains(t)),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(ext_type, data)| HeaderExtension::Unknown { ext_type, data })
    }

    fn arb_feature_table() -> impl Strategy<Value = HeaderExtension> {
        prop::collection::vec((0u8..3, any::<u8>(), "[a-z é]{0,23}"), 0..4).prop_map(|entries| {
            HeaderExtension::FeatureNameTable(
                entries
                    .into_iter()
                    .map(|(kind, bit, name)| FeatureName {
                        kind: FeatureKind::from_raw(kind).unwrap(),
                        bit,
                        name,
                    })
                    .collect(),
            )
        })
    }

    /// Arbitrary valid headers whose encoding fits in cluster 0, normalized.
    fn arb_header() -> impl Strategy<Value = Header> {
        (any::<bool>(), 9u32..=21, any::<bool>())
            .prop_flat_map(|(v3, cluster_bits, want_extl2)| {
                let extl2 = v3 && want_extl2 && cluster_bits >= 14;
                let l2_bits = cluster_bits - if extl2 { 4 } else { 3 };
                let max_l1 = (MAX_L1_BYTES / 8) as u32;
                let max_size = (u64::from(max_l1) << (cluster_bits + l2_bits)).min(i64::MAX as u64);
                let max_reftable = (MAX_REFTABLE_BYTES >> cluster_bits) as u32;
                let aligned = move || (0u64..1 << 30).prop_map(move |i| i << cluster_bits);
                let fixed = (
                    0..=max_size,
                    0u32..1000,
                    0u32..=2,
                    aligned(),
                    aligned(),
                    1..=max_reftable,
                    0..=MAX_SNAPSHOTS,
                    aligned(),
                );
                let v3_fields = (
                    0u64..8, // dirty, corrupt, data file
                    any::<bool>(),
                    any::<u64>(),
                    any::<u64>(),
                    0u32..=6,
                    prop::collection::vec(any::<u8>(), 0..24),
                );
                let exts = (
                    prop::collection::vec(
                        "[a-z0-9é]{0,7}".prop_map(HeaderExtension::BackingFormat),
                        0..2,
                    ),
                    prop::collection::vec(
                        "[a-zA-Z0-9/_.é-]{0,40}".prop_map(HeaderExtension::DataFile),
                        0..2,
                    ),
                    prop::collection::vec(
                        (aligned(), any::<u64>()).prop_map(|(offset, length)| {
                            HeaderExtension::Crypto { offset, length }
                        }),
                        0..2,
                    ),
                    prop::collection::vec(arb_feature_table(), 0..2),
                    prop::collection::vec(
                        (1..=MAX_BITMAPS, 0..=MAX_BITMAP_DIRECTORY_BYTES, aligned()).prop_map(
                            |(nb, size, offset)| {
                                HeaderExtension::Bitmaps(BitmapsExtension {
                                    nb_bitmaps: nb,
                                    bitmap_directory_size: size,
                                    bitmap_directory_offset: offset,
                                })
                            },
                        ),
                        0..2,
                    ),
                    prop::collection::vec(arb_unknown_ext(), 0..3),
                    prop::option::of("[a-zA-Z0-9/_.:é-]{0,60}"),
                );
                (Just((v3, cluster_bits, extl2)), fixed, v3_fields, exts)
            })
            .prop_filter_map(
                "must fit in cluster 0",
                |((v3, cluster_bits, extl2), fixed, v3_fields, exts)| {
                    let (
                        size,
                        l1_extra,
                        crypt_method,
                        l1_table_offset,
                        refcount_table_offset,
                        refcount_table_clusters,
                        nb_snapshots,
                        snapshots_offset,
                    ) = fixed;
                    let mut h = if v3 {
                        Header::new_v3(cluster_bits, size)
                    } else {
                        Header::new_v2(cluster_bits, size)
                    };
                    let needed = l1_entries_for(size, cluster_bits, extl2).unwrap() as u32;
                    h.l1_size = needed
                        .saturating_add(l1_extra)
                        .min((MAX_L1_BYTES / 8) as u32);
                    h.crypt_method = crypt_method;
                    h.l1_table_offset = l1_table_offset;
                    h.refcount_table_offset = refcount_table_offset;
                    h.refcount_table_clusters = refcount_table_clusters;
                    h.nb_snapshots = nb_snapshots;
                    h.snapshots_offset = snapshots_offset;
                    if v3 {
                        let (low_bits, zstd, compat, autoclear, refcount_order, unknown) =
                            v3_fields;
                        h.incompatible_features = low_bits
                            | if extl2 { INCOMPAT_EXTL2 } else { 0 }
                            | if zstd { INCOMPAT_COMPRESSION } else { 0 };
                        h.compression_type = u8::from(zstd);
                        h.compatible_features = compat;
                        h.autoclear_features = autoclear;
                        h.refcount_order = refcount_order;
                        h.unknown_fields = unknown;
                    }
                    let (formats, data_files, cryptos, tables, bitmaps, unknowns, backing) = exts;
                    h.extensions = formats;
                    h.extensions.extend(data_files);
                    if crypt_method == CRYPT_LUKS {
                        h.extensions.extend(cryptos);
                    }
                    h.extensions.extend(tables);
                    h.extensions.extend(bitmaps);
                    h.extensions.extend(unknowns);
                    h.backing_file = backing;
                    h.normalize().ok()?;
                    let len = h.encode().ok()?.len() as u64;
                    (len <= h.cluster_size()).then_some(h)
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_decode_encode_round_trip(h in arb_header()) {
            let bytes = h.encode().unwrap();
            prop_assert_eq!(Header::decode(&bytes).unwrap(), h.clone());
            let cluster = h.encode_into_cluster(h.cluster_size()).unwrap();
            prop_assert_eq!(Header::decode(&cluster).unwrap(), h.clone());
            // Encoding a decoded header reproduces the bytes.
            prop_assert_eq!(Header::decode(&cluster).unwrap().encode().unwrap(), bytes);
        }

        #[test]
        fn prop_decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Header::decode(&bytes);
            let _ = Header::decode_for_check(&bytes);
        }

        #[test]
        fn prop_decode_never_panics_after_a_valid_fixed_header(
            tail in prop::collection::vec(any::<u8>(), 0..2048),
            header_length in prop_oneof![Just(112u32), 0u32..300, any::<u32>()],
            backing in prop_oneof![Just(0u64), 0u64..2400, any::<u64>()],
            backing_size in prop_oneof![0u32..100, any::<u32>()],
            cluster_bits in prop_oneof![Just(9u32), Just(16u32), 0u32..30],
            incompatible in prop_oneof![Just(0u64), any::<u64>()],
            autoclear in prop_oneof![Just(1u64), any::<u64>()],
            crypt in 0u32..4,
            cut in any::<prop::sample::Index>(),
        ) {
            let mut b = base_v3();
            set32(&mut b, 100, header_length);
            set64(&mut b, 8, backing);
            set32(&mut b, 16, backing_size);
            set32(&mut b, 20, cluster_bits);
            set64(&mut b, 72, incompatible);
            set64(&mut b, 88, autoclear);
            set32(&mut b, 32, crypt);
            b.extend_from_slice(&tail);
            let _ = Header::decode(&b);
            let _ = Header::decode(&b[..cut.index(b.len() + 1)]);
            if let Ok(h) = Header::decode(&b) {
                let _ = h.encode();
            }
        }

        #[test]
        fn prop_decode_never_panics_on_mutated_valid_headers(
            h in arb_header(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut b = h.encode().unwrap();
            for (at, value) in flips {
                let i = at.index(b.len());
                b[i] = value;
            }
            let _ = Header::decode(&b);
            let _ = Header::decode(&b[..cut.index(b.len() + 1)]);
        }
    }

    // ---- interoperability with qemu-img ----

    fn qemu_img_available() -> bool {
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Runs `qemu-img create -f qcow2 <args> <name> <size>` in `dir` and returns the file's bytes.
    pub(crate) fn qemu_create(
        dir: &std::path::Path,
        name: &str,
        opts: &[&str],
        size: &str,
    ) -> Vec<u8> {
        let path = dir.join(name);
        let out = std::process::Command::new("qemu-img")
            .current_dir(dir)
            .args(["create", "-q", "-f", "qcow2"])
            .args(opts)
            .arg(&path)
            .arg(size)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img create {opts:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn qemu_img_created_headers_round_trip_exactly() {
        if !qemu_img_available() {
            println!("skipping: qemu-img not found");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &[&str], &str)] = &[
            ("plain.qcow2", &[], "1G"),
            ("v2.qcow2", &["-o", "compat=0.10"], "64M"),
            ("overlay.qcow2", &["-b", "plain.qcow2", "-F", "qcow2"], "1G"),
            (
                "v2overlay.qcow2",
                &["-o", "compat=0.10", "-b", "plain.qcow2", "-F", "qcow2"],
                "1G",
            ),
            (
                "datafile.qcow2",
                &["-o", "data_file=data.raw,data_file_raw=on"],
                "16M",
            ),
            ("small.qcow2", &["-o", "cluster_size=4k"], "64M"),
            (
                "tiny.qcow2",
                &["-o", "cluster_size=512,refcount_bits=1"],
                "64M",
            ),
            (
                "extl2.qcow2",
                &["-o", "extended_l2=on,lazy_refcounts=on,refcount_bits=64"],
                "1G",
            ),
            (
                "zstd.qcow2",
                &["-o", "compression_type=zstd,cluster_size=2M"],
                "1G",
            ),
        ];
        for (name, opts, size) in cases {
            let file = qemu_create(dir.path(), name, opts, size);
            let buf = &file[..file.len().min(2 << 20)];
            let h = Header::decode(buf).unwrap_or_else(|e| panic!("{name}: {e}"));
            let cs = h.cluster_size() as usize;
            let mut cluster0 = file[..file.len().min(cs)].to_vec();
            cluster0.resize(cs, 0);
            assert_eq!(
                h.encode_into_cluster(h.cluster_size()).unwrap(),
                cluster0,
                "{name}"
            );
            match *name {
                "plain.qcow2" => {
                    assert_eq!(
                        (h.version, h.cluster_bits, h.size, h.l1_size),
                        (3, 16, 1 << 30, 2)
                    );
                    assert_eq!(
                        h.extensions,
                        vec![HeaderExtension::FeatureNameTable(qemu_feature_table())]
                    );
                    assert_eq!(h.header_length, 112);
                }
                "v2.qcow2" => {
                    assert_eq!((h.version, h.header_length), (2, 72));
                    assert!(h.extensions.is_empty());
                }
                "overlay.qcow2" => {
                    assert_eq!(h.backing_file.as_deref(), Some("plain.qcow2"));
                    assert_eq!(h.backing_format(), Some("qcow2"));
                    assert_eq!(h.backing_file_offset, 0x210);
                }
                "v2overlay.qcow2" => assert_eq!(h.backing_format(), Some("qcow2")),
                "datafile.qcow2" => {
                    assert_eq!(h.data_file_name(), Some("data.raw"));
                    assert_eq!(h.incompatible_features, INCOMPAT_DATA_FILE);
                    assert_eq!(h.autoclear_features, AUTOCLEAR_DATA_FILE_RAW);
                }
                "small.qcow2" | "tiny.qcow2" => assert!(h.extensions.is_empty()),
                "extl2.qcow2" => {
                    assert!(h.is_extended_l2());
                    assert_eq!(h.refcount_bits(), 64);
                    assert_eq!(h.compatible_features, COMPAT_LAZY_REFCOUNTS);
                }
                "zstd.qcow2" => assert_eq!((h.compression_type, h.cluster_bits), (1, 21)),
                _ => unreachable!(),
            }
        }
    }
}
