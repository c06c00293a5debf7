//! Whole-header tests: accessors, decode/encode round-trip properties, and
//! interoperability with `qemu-img`.

use crate::format::consts::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO,
    EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
};
use crate::format::header::decode::l1_entries_for;
use crate::format::header::ext::CRYPT_LUKS;
use crate::format::header::test_support::{base_v3, set32, set64, CS};
use crate::format::header::{
    qemu_feature_table, BitmapsExtension, FeatureKind, FeatureName, Header, HeaderExtension,
};
use proptest::prelude::*;

#[test]
fn backing_file_name_is_a_c_string() {
    let mut h = Header::new_v3(16, 1 << 30);
    let cases: &[(Option<&str>, Option<&str>)] = &[
        (None, None),
        (Some(""), None),
        (Some("\0base.qcow2"), None),
        (Some("base.qcow2"), Some("base.qcow2")),
        (Some("base.qcow2\0junk"), Some("base.qcow2")),
    ];
    for &(raw, name) in cases {
        h.backing_file = raw.map(str::to_owned);
        assert_eq!(h.backing_file_name(), name, "raw name {raw:?}");
    }
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
                    (aligned(), any::<u64>())
                        .prop_map(|(offset, length)| HeaderExtension::Crypto { offset, length }),
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
                    let (low_bits, zstd, compat, autoclear, refcount_order, unknown) = v3_fields;
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

fn qemu_img_available() -> bool {
    std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `qemu-img create -f qcow2 <args> <name> <size>` in `dir` and returns the file's bytes.
pub(crate) fn qemu_create(dir: &std::path::Path, name: &str, opts: &[&str], size: &str) -> Vec<u8> {
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
