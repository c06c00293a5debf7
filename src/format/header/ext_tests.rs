//! Tests of the extension area: QEMU's checks of each extension type, the
//! feature table probe, and what is kept verbatim.

use crate::format::consts::{
    AUTOCLEAR_BITMAPS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE,
    EXT_FEATURE_TABLE, INCOMPAT_DIRTY,
};
use crate::format::header::test_support::{
    add_exts, assert_rejects, base_v3, check_cases, ext, set32, set64, with_exts, Case, CS,
};
use crate::format::header::{BitmapsExtension, FeatureKind, Header, HeaderExtension};
use crate::format::FormatErrorKind::{Invalid, Unsupported};
use crate::format::{put_be_u32, put_be_u64, FormatErrorKind};

/// The message for incompatible bit 5 when no feature table names it.
const UNKNOWN_BIT_5: &str = "Unsupported qcow2 feature(s): Unknown incompatible feature: 20";

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

/// Sets autoclear bit 0, so that the bitmaps extension is checked, and
/// appends one with `payload` and an end marker.
fn add_checked_bitmaps(b: &mut Vec<u8>, payload: &[u8]) {
    set64(b, 88, AUTOCLEAR_BITMAPS);
    add_exts(b, &[ext(EXT_BITMAPS, payload)]);
}

/// Unknown incompatible bits: named from the first feature table the probe
/// scan finds before it stops, else reported as a hex mask.
#[test]
fn unsupported_feature_messages() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("bit 5 without a table", |b| set64(b, 72, 1 << 5), Err((Unsupported, UNKNOWN_BIT_5))),
        ("bits 5, 40 and dirty without a table",
            |b| set64(b, 72, (1 << 5) | (1 << 40) | INCOMPAT_DIRTY),
            Err((Unsupported, "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000020"))),
        ("table after a broken extension",
            |b| {
                set64(b, 72, 1 << 5);
                add_exts(b, &[
                    ext(EXT_BACKING_FORMAT, &[b'a'; 16]),
                    ext(EXT_FEATURE_TABLE, &feature(0, 5, b"foo")),
                ]);
            },
            Err((Unsupported, UNKNOWN_BIT_5))),
        ("table walk stops at an empty name",
            |b| {
                let mut table = feature(0, 5, b"");
                table.extend(feature(0, 6, b"six"));
                set64(b, 72, (1 << 5) | (1 << 6));
                add_exts(b, &[ext(EXT_FEATURE_TABLE, &table)]);
            },
            Err((Unsupported, "Unsupported qcow2 feature(s): Unknown incompatible feature: 60"))),
        // QEMU has not stored crypt_method yet when it probes, so even a LUKS
        // image's crypto extension ends the probe.
        ("probe stops at a crypto extension",
            |b| {
                set32(b, 32, 2);
                set64(b, 72, 1 << 5);
                let mut crypto = vec![0u8; 16];
                put_be_u64(&mut crypto, 0, 0x50000);
                add_exts(b, &[
                    ext(EXT_CRYPTO, &crypto),
                    ext(EXT_FEATURE_TABLE, &feature(0, 5, b"foo")),
                ]);
            },
            Err((Unsupported, UNKNOWN_BIT_5))),
    ];
    check_cases(cases);
}

/// Rejections of the full extension scan: the area's end, crypto and
/// (with autoclear bit 0 set) bitmaps extensions.
#[test]
fn extension_checks() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        // The area ends at backing_file_offset = 116: the 8-byte extension
        // header at 112 does not fit.
        ("extension header crossing the backing name offset",
            |b| { set64(b, 8, 116); set32(b, 112, 0x1234_5678) },
            Err((Invalid, "Header extension too large"))),
        ("crypto extension without LUKS", |b| add_exts(b, &[ext(EXT_CRYPTO, &[0; 16])]),
            Err((Invalid, "CRYPTO header extension only expected with LUKS encryption method"))),
        ("crypto extension of 8 bytes",
            |b| { set32(b, 32, 2); add_exts(b, &[ext(EXT_CRYPTO, &[0; 8])]) },
            Err((Invalid, "CRYPTO header extension size 8, but expected size 16"))),
        ("bitmaps extension of 16 bytes", |b| add_checked_bitmaps(b, &[0; 16]),
            Err((Invalid, "bitmaps_ext: Invalid extension length"))),
        ("bitmaps reserved field set",
            |b| add_checked_bitmaps(b, &bitmaps_payload(1, 1, 8, 0x10000)),
            Err((Invalid, "bitmaps_ext: Reserved field is not zero"))),
        ("zero bitmaps", |b| add_checked_bitmaps(b, &bitmaps_payload(0, 0, 8, 0x10000)),
            Err((Invalid, "found bitmaps extension with zero bitmaps"))),
        ("65536 bitmaps", |b| add_checked_bitmaps(b, &bitmaps_payload(65536, 0, 8, 0x10000)),
            Err((Invalid, "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"))),
        ("unaligned bitmap directory",
            |b| add_checked_bitmaps(b, &bitmaps_payload(1, 0, 8, 0x10001)),
            Err((Invalid, "bitmaps_ext: invalid bitmap directory offset"))),
        ("bitmap directory too large",
            |b| add_checked_bitmaps(b, &bitmaps_payload(1, 0, 65535 * 1024 + 1, 0x10000)),
            Err((Invalid, "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)"))),
    ];
    check_cases(cases);
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
        &format!("Unsupported qcow2 feature(s): foo bar, {x46}, Unknown incompatible feature: 80"),
    );
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
