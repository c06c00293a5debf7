//! Tests of [`Header::encode`] and friends: QEMU's layout, extension order and
//! what the encoder refuses.

use crate::format::consts::{
    AUTOCLEAR_BITMAPS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE,
    EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION,
};
use crate::format::header::decode::{read_u32, read_u64};
use crate::format::header::test_support::CS;
use crate::format::header::{
    qemu_feature_table, BitmapsExtension, FeatureKind, FeatureName, Header, HeaderExtension,
};
use crate::format::FormatErrorKind;

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
