//! Tests of [`Header::decode`]: every rejection path in QEMU's order, and
//! accepted inputs.

use crate::format::consts::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_DATA_FILE,
    INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
use crate::format::header::decode::{read_u32, read_u64};
use crate::format::header::test_support::{
    add_exts, assert_outcome, assert_rejects, base_v2, base_v3, check_cases, ext, set32, set64,
    with_exts, Case, CS,
};
use crate::format::header::{Header, HeaderExtension};
use crate::format::FormatErrorKind::{Invalid, NotQcow2, TooLarge, Unsupported};
use crate::format::{FormatErrorKind, Structure};

const NOT_QCOW2: &str = "Image is not in qcow2 format";
const TOO_SHORT: &str = "qcow2 header too short";
const REFTABLE_OFFSET: &str = "Reference count table offset invalid";
const SNAPSHOTS_OFFSET: &str = "Snapshot table offset invalid";
const L1_OFFSET: &str = "Active L1 table offset invalid";
const L1_TOO_SMALL: &str = "L1 table is too small";

// ---- rejection paths, in QEMU's order ----

/// Magic, version, buffer and header lengths, cluster size, backing file
/// offset and compression type: the checks before the feature bits.
#[test]
fn fixed_field_checks() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("empty buffer", |b| b.clear(), Err((NotQcow2, NOT_QCOW2))),
        ("magic ending in 0xfc", |b| b[3] = 0xfc, Err((NotQcow2, NOT_QCOW2))),
        ("3-byte buffer", |b| *b = b"QFI".to_vec(), Err((NotQcow2, NOT_QCOW2))),
        ("1 KiB of zeros", |b| *b = vec![0; 1024], Err((NotQcow2, NOT_QCOW2))),
        ("version 0", |b| set32(b, 4, 0), Err((Unsupported, "Unsupported qcow2 version 0"))),
        ("version 1", |b| set32(b, 4, 1), Err((Unsupported, "Unsupported qcow2 version 1"))),
        ("version 4", |b| set32(b, 4, 4), Err((Unsupported, "Unsupported qcow2 version 4"))),
        ("version u32::MAX", |b| set32(b, 4, u32::MAX),
            Err((Unsupported, "Unsupported qcow2 version 4294967295"))),
        ("cut to 6 bytes", |b| b.truncate(6), Err((Invalid, TOO_SHORT))),
        ("v3 cut to 103 bytes", |b| b.truncate(103), Err((Invalid, TOO_SHORT))),
        ("v3 cut to 104 bytes", |b| b.truncate(104), Ok(())),
        ("v2 cut to 71 bytes", |b| { *b = base_v2(); b.truncate(71) }, Err((Invalid, TOO_SHORT))),
        ("v2 of 72 bytes", |b| *b = base_v2(), Ok(())),
        ("cluster_bits 0", |b| set32(b, 20, 0), Err((Invalid, "Unsupported cluster size: 2^0"))),
        ("cluster_bits 8", |b| set32(b, 20, 8), Err((Invalid, "Unsupported cluster size: 2^8"))),
        ("cluster_bits 22", |b| set32(b, 20, 22), Err((Invalid, "Unsupported cluster size: 2^22"))),
        ("cluster_bits 64", |b| set32(b, 20, 64), Err((Invalid, "Unsupported cluster size: 2^64"))),
        ("version is checked before cluster_bits", |b| { set32(b, 4, 1); set32(b, 20, 8) },
            Err((Unsupported, "Unsupported qcow2 version 1"))),
        ("header_length 103", |b| set32(b, 100, 103), Err((Invalid, TOO_SHORT))),
        ("header_length beyond the cluster", |b| set32(b, 100, CS as u32 + 1),
            Err((Invalid, "qcow2 header exceeds cluster size"))),
        ("backing_file_offset beyond the cluster", |b| set64(b, 8, CS + 1),
            Err((Invalid, "Invalid backing file offset"))),
        ("compression_type 2", |b| b[104] = 2,
            Err((Unsupported, "qcow2: unknown compression type: 2"))),
        ("zlib with the compression bit", |b| set64(b, 72, INCOMPAT_COMPRESSION),
            Err((Invalid, "qcow2: Compression type incompatible feature bit must not be set"))),
        ("zstd without the compression bit", |b| b[104] = 1,
            Err((Invalid, "qcow2: Compression type incompatible feature bit must be set"))),
    ];
    check_cases(cases);
}

/// Subclusters, refcount width, the refcount, snapshot and L1 tables, the
/// disk size and the encryption method, with the accepted values at each limit.
#[test]
fn table_and_size_checks() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("256-byte subclusters", |b| { set64(b, 72, INCOMPAT_EXTL2); set32(b, 20, 13) },
            Err((Invalid, "Unsupported subcluster size: 256"))),
        // 1024 extended entries of 16 KiB per L2 table.
        ("512-byte subclusters",
            |b| { set64(b, 72, INCOMPAT_EXTL2); set32(b, 20, 14); set32(b, 36, 4) },
            Ok(())),
        ("refcount_order 7", |b| set32(b, 96, 7),
            Err((Invalid, "Reference count entry width too large; may not exceed 64 bits"))),
        // 129 * 64 KiB > 8 MiB.
        ("refcount table of 129 clusters", |b| set32(b, 56, 129),
            Err((TooLarge, "Reference count table too large"))),
        ("refcount table of 128 clusters", |b| set32(b, 56, 128), Ok(())),
        ("unaligned refcount table", |b| set64(b, 48, 0x10200), Err((Invalid, REFTABLE_OFFSET))),
        ("refcount table ending beyond INT64_MAX", |b| set64(b, 48, 0x7fff_ffff_ffff_0000),
            Err((Invalid, REFTABLE_OFFSET))),
        ("refcount table ending at INT64_MAX", |b| set64(b, 48, 0x7fff_ffff_fffe_0000), Ok(())),
        ("65536 snapshots", |b| set32(b, 60, 65536), Ok(())),
        ("unaligned snapshot table, no snapshots",
            |b| set64(b, 64, 3), Err((Invalid, SNAPSHOTS_OFFSET))),
        // 1638 entries of 40 bytes end exactly at INT64_MAX + 1.
        ("snapshot table ending at INT64_MAX + 1",
            |b| { set64(b, 64, 0x7fff_ffff_ffff_0000); set32(b, 60, 1638) },
            Ok(())),
        ("L1 table of 4 Mi + 1 entries", |b| set32(b, 36, 4 * 1024 * 1024 + 1),
            Err((TooLarge, "Active L1 table too large"))),
        ("unaligned L1 table", |b| set64(b, 40, 0x30008), Err((Invalid, L1_OFFSET))),
        ("L1 table ending at INT64_MAX",
            |b| { set64(b, 40, 0x7fff_ffff_ffff_0000); set32(b, 36, 0x1fff) },
            Ok(())),
        ("L1 table ending beyond INT64_MAX",
            |b| { set64(b, 40, 0x7fff_ffff_ffff_0000); set32(b, 36, 0x2000) },
            Err((Invalid, L1_OFFSET))),
        ("unaligned empty L1 table", |b| { set32(b, 36, 0); set64(b, 24, 0); set64(b, 40, 1) },
            Err((Invalid, L1_OFFSET))),
        ("size 2^62", |b| { set64(b, 24, 1 << 62); set32(b, 36, 4 * 1024 * 1024) },
            Err((TooLarge, "Image is too big"))),
        // No overflow in the rounding.
        ("size u64::MAX", |b| { set64(b, 24, u64::MAX); set32(b, 36, 4 * 1024 * 1024) },
            Err((TooLarge, "Image is too big"))),
        ("empty L1 table", |b| set32(b, 36, 0), Err((Invalid, L1_TOO_SMALL))),
        // One L1 entry covers 512 MiB with 64 KiB clusters, 256 MiB with extended L2.
        ("512 MiB, 1 L1 entry", |b| set64(b, 24, 512 << 20), Ok(())),
        ("512 MiB + 1, 1 L1 entry",
            |b| set64(b, 24, (512 << 20) + 1), Err((Invalid, L1_TOO_SMALL))),
        ("512 MiB, 1 extended L1 entry",
            |b| { set64(b, 24, 512 << 20); set64(b, 72, INCOMPAT_EXTL2) },
            Err((Invalid, L1_TOO_SMALL))),
        ("crypt_method 5", |b| set32(b, 32, 5), Err((Invalid, "Unsupported encryption method 5"))),
        // QEMU prints the field with %d (verified: -2147483647).
        ("crypt_method 0x8000_0001", |b| set32(b, 32, 0x8000_0001),
            Err((Invalid, "Unsupported encryption method -2147483647"))),
        ("L1 checks come before crypt_method", |b| { set32(b, 32, 5); set32(b, 36, 0) },
            Err((Invalid, L1_TOO_SMALL))),
        ("backing name is checked after the extensions",
            |b| {
                set64(b, 8, 0x200);
                set32(b, 16, 2000);
                add_exts(b, &[ext(EXT_BACKING_FORMAT, &[b'a'; 20])]);
            },
            Err((Invalid, "ERROR: ext_backing_format: len=20 too large (>=16)"))),
    ];
    check_cases(cases);
}

/// What [`Header::decode`] rejects but [`Header::decode_for_check`] accepts,
/// and decodes as it is, so that the checker can repair it.
#[test]
fn check_mode_relaxations() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("no refcount table", |b| set32(b, 56, 0),
            Err((Invalid, "Image does not contain a reference count table"))),
        ("65537 snapshots", |b| set32(b, 60, 65537), Err((TooLarge, "Snapshot table too large"))),
        ("snapshot table ending beyond INT64_MAX",
            |b| { set64(b, 64, 0x7fff_ffff_ffff_0000); set32(b, 60, 1639) },
            Err((Invalid, SNAPSHOTS_OFFSET))),
    ];
    for &(name, change, expect) in cases {
        let mut b = base_v3();
        change(&mut b);
        assert_outcome(name, Header::decode(&b), expect);
        let h = Header::decode_for_check(&b).unwrap_or_else(|e| panic!("case {name:?}: {e}"));
        let decoded = (
            h.refcount_table_clusters,
            h.nb_snapshots,
            h.snapshots_offset,
        );
        let raw = (read_u32(&b, 56), read_u32(&b, 60), read_u64(&b, 64));
        assert_eq!(decoded, raw, "case {name:?}");
    }
}

#[test]
fn table_errors_name_the_table_and_its_offset() {
    let mut b = base_v3();
    set64(&mut b, 48, !0xffff);
    let err = Header::decode(&b).unwrap_err();
    assert_eq!(err.what, Structure::RefcountTable);
    assert_eq!(err.offset, Some(!0xffff));
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
