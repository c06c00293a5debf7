//! Tests of [`Header::decode`]: every rejection path in QEMU's order, and
//! accepted inputs.

use crate::format::consts::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_DATA_FILE,
    INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
use crate::format::header::test_support::{
    assert_rejects, base_v2, base_v3, ext, set32, set64, with_exts, CS,
};
use crate::format::header::{Header, HeaderExtension};
use crate::format::{FormatErrorKind, Structure};

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
