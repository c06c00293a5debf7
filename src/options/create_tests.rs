//! Tests of [`CreateOptions`](super::CreateOptions) and its enumerations, including a
//! cross-check against `qemu-img create`.

use super::*;
use crate::options::parse::{check_option_list, parse_image_size};
use crate::options::testutil::{have, run, GIB, MIB, TIB};

fn create_err(s: &str) -> String {
    let mut c = CreateOptions::new().size(MIB);
    c.apply_qemu_str(s).unwrap();
    c.validate().unwrap_err().to_string()
}

#[test]
fn create_apply_and_defaults() {
    let c = CreateOptions::new();
    assert_eq!(c, CreateOptions::default());
    assert_eq!(c.compat, Compat::V3);
    assert_eq!(c.cluster_size, 65536);
    assert_eq!(c.refcount_bits, 16);
    assert_eq!(c.compression_type, CompressionType::Zlib);
    assert_eq!(c.preallocation, Preallocation::Off);
    assert!(c.validate().is_ok());
    let c = CreateOptions::from_qemu_str(
        "compat=0.10,cluster_size=4k,refcount_bits=16,lazy_refcounts=off,extended_l2=off,\
         compression_type=zlib,preallocation=metadata,backing_file=b,,c,backing_fmt=qcow2,\
         data_file=d,data_file_raw=off,nocow=on,size=2M",
    )
    .unwrap();
    assert_eq!(c.compat, Compat::V2);
    assert_eq!(c.compat_spelling.as_deref(), Some("0.10"));
    assert_eq!(c.cluster_size, 4096);
    assert_eq!(c.preallocation, Preallocation::Metadata);
    assert!(c.preallocation_given);
    assert_eq!(c.backing_file.as_deref(), Some("b,c"));
    assert_eq!(c.backing_fmt.as_deref(), Some("qcow2"));
    assert_eq!(c.data_file.as_deref(), Some("d"));
    assert_eq!(c.nocow, Some(true));
    assert_eq!(c.size, Some(2 * MIB));
    assert!(c.size_in_options);
    // Later values win; -o may be applied repeatedly.
    let mut c = CreateOptions::from_qemu_str("cluster_size=64k,cluster_size=4k").unwrap();
    assert_eq!(c.cluster_size, 4096);
    c.apply_qemu_str("compat=v2").unwrap();
    c.apply_qemu_str("compat=v3").unwrap();
    assert_eq!(c.compat, Compat::V3);
    // Refcount widths beyond u32 still fail validation.
    let c = CreateOptions::from_qemu_str("refcount_bits=4294967312").unwrap();
    assert_eq!(c.refcount_bits, u32::MAX);
    assert!(matches!(c.validate(), Err(OptionError::RefcountWidth)));
    assert_eq!(
        CreateOptions::from_qemu_str("refcount_bits=0x20")
            .unwrap()
            .refcount_bits,
        32
    );
    // Effective preallocation with data_file_raw.
    let c = CreateOptions::from_qemu_str("data_file=d,data_file_raw=on").unwrap();
    assert_eq!(c.effective_preallocation(), Preallocation::Metadata);
    assert_eq!(
        CreateOptions::new().effective_preallocation(),
        Preallocation::Off
    );
}

#[test]
fn create_parse_errors() {
    let err = |s: &str| CreateOptions::from_qemu_str(s).unwrap_err().to_string();
    assert_eq!(err("bogus=1"), "Invalid parameter 'bogus'");
    assert_eq!(err("=x"), "Invalid parameter ''");
    assert_eq!(err("a=b=c"), "Invalid parameter 'a'");
    assert_eq!(err("nocow"), "Invalid parameter 'cow'");
    assert_eq!(
        err("lazy_refcounts=maybe"),
        "Parameter 'lazy_refcounts' expects 'on' or 'off'"
    );
    assert_eq!(
        err("nocow=maybe"),
        "Parameter 'nocow' expects 'on' or 'off'"
    );
    assert_eq!(
        err("cluster_size=abc"),
        "Parameter 'cluster_size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
    );
    assert_eq!(
        err("size=-1024"),
        "Value '-1024' is out of range for parameter 'size'"
    );
    assert_eq!(
        err("refcount_bits=abc"),
        "Parameter 'refcount_bits' expects a number"
    );
    assert_eq!(
        err("refcount_bits=99999999999999999999"),
        "Value '99999999999999999999' is too large for parameter 'refcount_bits'"
    );
    assert_eq!(err(","), "Invalid option list: ,");
    // Encryption options are kept as given and echoed first, in QEMU's order.
    let e = CreateOptions::from_qemu_str(
        "encrypt.iter-time=10,encrypt.key-secret=k,encrypt.format=luks",
    )
    .unwrap();
    assert!(e.encrypt.is_requested());
    assert!(e.formatting_line("e.qcow2").starts_with(
        "Formatting 'e.qcow2', fmt=qcow2 encrypt.format=luks encrypt.key-secret=k encrypt.iter-time=10 cluster_size=65536"
    ));
    assert_eq!(
        err("encryption=maybe"),
        "Parameter 'encryption' expects 'on' or 'off'"
    );
    // Stops at the first error, in order, and leaves self unchanged.
    assert_eq!(
        err("bogus=1,lazy_refcounts=maybe"),
        "Invalid parameter 'bogus'"
    );
    let mut c = CreateOptions::new();
    assert!(c.apply_qemu_str("cluster_size=4k,bogus=1").is_err());
    assert_eq!(c, CreateOptions::new());
    // size twice / missing.
    let mut c = CreateOptions::from_qemu_str("size=2M").unwrap();
    assert_eq!(
        c.set_positional_size(4 * MIB).unwrap_err().to_string(),
        "The image size must be specified only once"
    );
    let mut c = CreateOptions::new();
    assert_eq!(
        c.require_size().unwrap_err().to_string(),
        "Image creation needs a size parameter"
    );
    c.set_positional_size(MIB).unwrap();
    assert_eq!(c.require_size(), Ok(MIB));
    // Same -o size twice is fine (last wins).
    assert_eq!(
        CreateOptions::from_qemu_str("size=1M,size=2M")
            .unwrap()
            .size,
        Some(2 * MIB)
    );
}

#[test]
fn create_validation_messages() {
    // Texts verified with qemu-img 10.0.2 (cli.md §2.3 and our own runs).
    assert_eq!(
        create_err("cluster_size=3000"),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    assert_eq!(
        create_err("cluster_size=256"),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    assert_eq!(
        create_err("cluster_size=4M"),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    assert_eq!(
        create_err("cluster_size=0"),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    assert_eq!(
        create_err("compat=0.10,lazy_refcounts=on"),
        "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    );
    for bad in ["0.9", "", "on", "V3", "1.10"] {
        assert_eq!(
            create_err(&format!("compat={bad}")),
            format!("Parameter 'version' does not accept value '{bad}'")
        );
    }
    assert_eq!(
        create_err("compat"),
        "Parameter 'version' does not accept value 'on'"
    );
    for bad in ["3", "0", "128", "-1", "4294967312"] {
        assert_eq!(
            create_err(&format!("refcount_bits={bad}")),
            "Refcount width must be a power of two and may not exceed 64 bits"
        );
    }
    assert_eq!(
        create_err("extended_l2=on,cluster_size=8k"),
        "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
    );
    assert_eq!(
        create_err("compat=0.10,refcount_bits=8"),
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
    );
    assert_eq!(
        create_err("compat=0.10,compression_type=zstd"),
        "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    );
    assert_eq!(
        create_err("compat=0.10,extended_l2=on"),
        "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    );
    assert_eq!(
        create_err("data_file_raw=on"),
        "data-file-raw requires data-file"
    );
    assert_eq!(
        create_err("compat=v2,data_file=d.raw"),
        "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    );
    assert_eq!(
        create_err("preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2"),
        "Backing file and preallocation can only be used at the same time if extended_l2 is on"
    );
    assert_eq!(
        create_err("backing_fmt=raw"),
        "Backing format cannot be used without backing file"
    );
    assert_eq!(
        create_err("backing_file=b.qcow2,backing_fmt=qcow2,data_file=x,data_file_raw=on"),
        "Backing file and data-file-raw cannot be used at the same time"
    );
    assert_eq!(
        create_err("preallocation=bogus"),
        "Parameter 'preallocation' does not accept value 'bogus'"
    );
    assert_eq!(
        create_err("preallocation=FULL"),
        "Parameter 'preallocation' does not accept value 'FULL'"
    );
    assert_eq!(
        create_err("compression_type=lz4"),
        "Parameter 'compression-type' does not accept value 'lz4'"
    );
    assert!(CreateOptions::from_qemu_str(
        "extended_l2=on,preallocation=metadata,backing_file=b,backing_fmt=qcow2,size=1M"
    )
    .unwrap()
    .validate()
    .is_ok());
    // Order (verified): version, preallocation, compression-type; then the driver's checks.
    assert_eq!(
        create_err("preallocation=bogus,compression_type=bogus,compat=bogus"),
        "Parameter 'version' does not accept value 'bogus'"
    );
    assert_eq!(
        create_err("compression_type=bogus,preallocation=bogus"),
        "Parameter 'preallocation' does not accept value 'bogus'"
    );
    assert!(
        create_err("compression_type=bogus,extended_l2=on,compat=0.10")
            .starts_with("Parameter 'compression-type'")
    );
    assert!(create_err("lazy_refcounts=on,compat=0.10,refcount_bits=8,extended_l2=on,compression_type=zstd,cluster_size=3000")
        .starts_with("Extended L2 entries are only supported with compatibility"));
    assert!(create_err("extended_l2=on,cluster_size=8k,refcount_bits=3")
        .starts_with("Extended L2 entries are only supported with cluster sizes"));
    assert!(create_err("refcount_bits=3,cluster_size=3000").starts_with("Cluster size"));
    assert!(
        create_err("lazy_refcounts=on,compat=0.10,refcount_bits=8").starts_with("Lazy refcounts")
    );
    assert!(create_err("compat=0.10,data_file=x,compression_type=zstd")
        .starts_with("External data files"));
    assert!(create_err("data_file_raw=on,compat=0.10").starts_with("data-file-raw requires"));
    assert!(
        create_err("data_file_raw=on,preallocation=metadata,backing_file=b,backing_fmt=qcow2")
            .starts_with("Backing file and preallocation")
    );
    assert!(create_err(
        "cluster_size=3000,preallocation=metadata,backing_file=b,backing_fmt=qcow2"
    )
    .starts_with("Cluster size"));
}

#[test]
fn create_size_limits() {
    let check = |cluster: &str, size: u64| {
        let mut c = CreateOptions::from_qemu_str(&format!("cluster_size={cluster}")).unwrap();
        c.size = Some(size);
        c.validate().map_err(|e| e.to_string())
    };
    // Verified boundaries: 512-byte clusters address exactly 128 GiB.
    assert_eq!(check("512", 128 * GIB), Ok(()));
    let too_large = Err(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
            .to_owned(),
    );
    assert_eq!(check("512", 128 * GIB + 1), too_large);
    assert_eq!(check("512", TIB), too_large);
    assert_eq!(check("64k", 7 << 60), too_large);
    assert_eq!(check("2M", 7 << 60), too_large);
    assert_eq!(check("2M", 1 << 61), Ok(()));
    assert_eq!(
        check("64k", 9 << 60),
        Err("Could not resize image: Image size cannot be negative".to_owned())
    );
    assert_eq!(
        check("2M", i64::MAX as u64),
        Err("Could not resize image: Image size cannot be negative".to_owned())
    );
    assert_eq!(
        check("2M", u64::MAX),
        Err("Could not resize image: Image size cannot be negative".to_owned())
    );
    assert_eq!(
        check("2M", 9_223_372_036_854_775_295),
        Err("Could not resize image: offset(9223372036854775296) exceeds maximum(9223372035781033984)".to_owned())
    );
    // Extended L2 halves what a cluster size can address.
    let mut c = CreateOptions::from_qemu_str("cluster_size=16k,extended_l2=on").unwrap();
    c.size = Some(64 * TIB);
    assert!(c.validate().is_ok());
    c.size = Some(64 * TIB + 1);
    assert_eq!(c.validate(), Err(OptionError::ImageTooLarge));
    assert_eq!(check("64k", 1), Ok(()));
}

#[test]
fn formatting_lines_match_cli_md() {
    let line = |o: &str, size: Option<u64>, file: &str| {
        let mut c = CreateOptions::from_qemu_str(o).unwrap();
        if let Some(s) = size {
            c.set_positional_size(s).unwrap();
        }
        c.formatting_line(file)
    };
    assert_eq!(
        line("", Some(GIB), "c1.qcow2"),
        "Formatting 'c1.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"
    );
    assert_eq!(
        line("cluster_size=4k,compat=0.10", Some(MIB), "c1.qcow2"),
        "Formatting 'c1.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off compression_type=zlib size=1048576 compat=0.10 lazy_refcounts=off refcount_bits=16"
    );
    assert_eq!(
        line("compat=1.1,lazy_refcounts=on,refcount_bits=64,extended_l2=on,cluster_size=128k", Some(MIB), "c2.qcow2"),
        "Formatting 'c2.qcow2', fmt=qcow2 cluster_size=131072 extended_l2=on compression_type=zlib size=1048576 compat=1.1 lazy_refcounts=on refcount_bits=64"
    );
    assert_eq!(
        line("compat=v3,compression_type=zstd,preallocation=falloc,nocow=on,size=2M", None, "c1.qcow2"),
        "Formatting 'c1.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=falloc compression_type=zstd size=2097152 compat=v3 lazy_refcounts=off refcount_bits=16 nocow=on"
    );
    assert_eq!(
        line("preallocation=metadata", Some(MIB), "c4.qcow2"),
        "Formatting 'c4.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=metadata compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16"
    );
    assert_eq!(
        line("data_file=c5b.data,data_file_raw=on", Some(MIB), "c5b.qcow2"),
        "Formatting 'c5b.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 data_file=c5b.data data_file_raw=on lazy_refcounts=off refcount_bits=16"
    );
    let c = CreateOptions::new()
        .backing_file("base.qcow2")
        .backing_fmt("qcow2")
        .size(64 * MIB);
    assert_eq!(
        c.formatting_line("ov.qcow2"),
        "Formatting 'ov.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 backing_file=base.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16"
    );
    // Verified with qemu-img: compat sits between size and backing_file; commas stay escaped;
    // booleans and enums are echoed as spelled; numbers as signed 64-bit.
    assert_eq!(
        line("compat=1.1,backing_file=b.qcow2,backing_fmt=qcow2,data_file=d.raw,data_file_raw=off,nocow=off,preallocation=off", Some(MIB), "t.qcow2"),
        "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=off compression_type=zlib size=1048576 compat=1.1 backing_file=b.qcow2 backing_fmt=qcow2 data_file=d.raw data_file_raw=off lazy_refcounts=off refcount_bits=16 nocow=off"
    );
    assert_eq!(
        line("data_file=a,,b.data", Some(MIB), "t.qcow2"),
        "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 data_file=a,,b.data lazy_refcounts=off refcount_bits=16"
    );
    assert_eq!(
        line("lazy_refcounts=yes,refcount_bits=-1,compat=bogus,preallocation=bogus,compression_type=ZSTD", Some(MIB), "t.qcow2"),
        "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=bogus compression_type=ZSTD size=1048576 compat=bogus lazy_refcounts=yes refcount_bits=-1"
    );
    assert_eq!(
        line("lazy_refcounts,refcount_bits=010", Some(MIB), "t.qcow2"),
        "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 lazy_refcounts=on refcount_bits=8"
    );
    assert_eq!(
        line("size=9E,cluster_size=9E", None, "t.qcow2"),
        "Formatting 't.qcow2', fmt=qcow2 cluster_size=-8070450532247928832 extended_l2=off compression_type=zlib size=-8070450532247928832 lazy_refcounts=off refcount_bits=16"
    );
    // Builders: typed values override stale spellings.
    let mut c =
        CreateOptions::from_qemu_str("lazy_refcounts=yes,preallocation=bogus,compat=v2").unwrap();
    c = c
        .lazy_refcounts(false)
        .preallocation(Preallocation::Full)
        .compat(Compat::V3)
        .size(1);
    assert_eq!(
        c.formatting_line("t"),
        "Formatting 't', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=full compression_type=zlib size=1 compat=1.1 lazy_refcounts=off refcount_bits=16"
    );
    assert!(c.validate().is_ok());
    let c = CreateOptions::new()
        .size(1)
        .data_file("d")
        .data_file_raw(true)
        .nocow(false)
        .extended_l2(true)
        .refcount_bits(8)
        .compression_type(CompressionType::Zstd)
        .cluster_size(16384);
    assert_eq!(
        c.formatting_line("t"),
        "Formatting 't', fmt=qcow2 cluster_size=16384 extended_l2=on compression_type=zstd size=1 data_file=d data_file_raw=on lazy_refcounts=off refcount_bits=8 nocow=off"
    );
    assert!(c.validate().is_ok());
}

#[test]
fn enum_parsing() {
    assert_eq!(
        "bogus".parse::<Preallocation>().unwrap_err().to_string(),
        "Invalid preallocation mode 'bogus'"
    );
    for p in [
        Preallocation::Off,
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        assert_eq!(p.as_str().parse::<Preallocation>(), Ok(p));
    }
    assert_eq!("zstd".parse::<CompressionType>(), Ok(CompressionType::Zstd));
    assert_eq!("zlib".parse::<CompressionType>(), Ok(CompressionType::Zlib));
    for (s, c) in [
        ("0.10", Compat::V2),
        ("v2", Compat::V2),
        ("1.1", Compat::V3),
        ("v3", Compat::V3),
    ] {
        assert_eq!(s.parse::<Compat>(), Ok(c));
    }
    assert_eq!(Compat::V2.version(), 2);
    assert_eq!(Compat::V3.to_string(), "1.1");
}

// ----- cross-check against the real QEMU tool -----

/// Our emulation of `qemu-img create -f qcow2 [-o OPTS] t.qcow2 [SIZE]`.
fn our_create(o: Option<&str>, size: Option<&str>) -> (String, String) {
    let file = "t.qcow2";
    let fail = |e: OptionError| match e {
        OptionError::InvalidOptionList { .. } => format!("qemu-img: {e}\n"),
        e => format!("qemu-img: {file}: {e}\n"),
    };
    let mut c = CreateOptions::new();
    if let Some(o) = o {
        if let Err(e) = check_option_list(o).and_then(|()| c.apply_qemu_str(o)) {
            return (String::new(), fail(e));
        }
    }
    if let Some(size) = size {
        let bytes = parse_image_size(size).expect("valid positional size");
        if let Err(e) = c.set_positional_size(bytes) {
            return (String::new(), fail(e));
        }
    }
    if let Err(e) = c.require_size() {
        return (String::new(), fail(e));
    }
    let stdout = format!("{}\n", c.formatting_line(file));
    match c.validate() {
        Ok(()) => (stdout, String::new()),
        Err(e) => (stdout, fail(e)),
    }
}

#[test]
fn qemu_img_create_output() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        "qemu-img",
        &["create", "-f", "qcow2", "-q", "b.qcow2", "1M"],
    );
    let one_m = Some("1M");
    let cases: &[(&str, Option<&str>)] = &[
        ("", Some("1G")),
        ("cluster_size=4k,compat=0.10", one_m),
        ("compat=1.1,lazy_refcounts=on,refcount_bits=64,extended_l2=on,cluster_size=128k", one_m),
        ("compat=v3,compression_type=zstd,preallocation=falloc,nocow=on,size=2M", None),
        ("preallocation=metadata", one_m),
        ("data_file=c5b.data,data_file_raw=on", one_m),
        ("bogus=1", one_m),
        ("cluster_size=3000", one_m),
        ("cluster_size=256", one_m),
        ("cluster_size=0", one_m),
        ("cluster_size=1.5k", one_m),
        ("compat=0.10,lazy_refcounts=on", one_m),
        ("compat=0.9", one_m),
        ("compat=V3", one_m),
        ("refcount_bits=3", one_m),
        ("extended_l2=on,cluster_size=8k", one_m),
        ("lazy_refcounts=maybe", one_m),
        ("size=2M", Some("4M")),
        ("size=1M,size=2M", None),
        ("compat=0.10,refcount_bits=8", one_m),
        ("compat=0.10,compression_type=zstd", one_m),
        ("compat=0.10,extended_l2=on", one_m),
        ("data_file_raw=on", one_m),
        ("preallocation=bogus", one_m),
        ("preallocation=FULL", one_m),
        ("compression_type=lz4", one_m),
        ("size=99999999E", None),
        ("size=1.5", None),
        ("size=-1024", None),
        ("size=-1k", None),
        ("size=0x10", None),
        ("size=.5k", None),
        ("size=1.0", None),
        ("size=", None),
        ("cluster_size=abc", one_m),
        ("cluster_size=", one_m),
        ("refcount_bits=abc", one_m),
        ("refcount_bits=-1", one_m),
        ("refcount_bits=0x10", one_m),
        ("refcount_bits=010", one_m),
        ("refcount_bits=4294967312", one_m),
        ("refcount_bits=18446744073709551616", one_m),
        ("lazy_refcounts=yes", one_m),
        ("lazy_refcounts=n", one_m),
        ("lazy_refcounts", one_m),
        ("nocow", one_m),
        ("nocow=maybe", one_m),
        ("compat", one_m),
        ("compat=", one_m),
        ("=x", one_m),
        ("a=b=c", one_m),
        (",", one_m),
        ("size=1M,", None),
        ("data_file=a,,b.data", one_m),
        ("preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2", one_m),
        ("extended_l2=on,preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2", one_m),
        ("backing_file=b.qcow2,backing_fmt=qcow2", one_m),
        ("backing_fmt=raw", one_m),
        ("backing_file=b.qcow2,backing_fmt=qcow2,data_file=x,data_file_raw=on", one_m),
        ("data_file_raw=on,preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2", one_m),
        ("compat=bogus,preallocation=bogus,compression_type=bogus", one_m),
        ("compression_type=bogus,preallocation=bogus", one_m),
        ("compression_type=bogus,extended_l2=on,compat=0.10", one_m),
        ("compat=v2,data_file=d.raw", one_m),
        ("compat=0.10,data_file=x,compression_type=zstd", one_m),
        ("lazy_refcounts=on,compat=0.10,refcount_bits=8,extended_l2=on,compression_type=zstd,cluster_size=3000", one_m),
        ("cluster_size=3000,preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2", one_m),
        ("cluster_size=512", Some("1T")),
        ("cluster_size=512", Some("137438953473")),
        ("cluster_size=16k,extended_l2=on", Some("70368744177665")),
        ("size=9E", None),
        ("size=7E", None),
        ("cluster_size=2M", Some("7E")),
        ("cluster_size=2M", Some("9223372036854775295")),
        ("cluster_size=2M", Some("9223372036854775807")),
        ("cluster_size=9E", one_m),
    ];
    for &(o, size) in cases {
        let mut args = vec!["create", "-f", "qcow2"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.push("t.qcow2");
        if let Some(size) = size {
            args.push(size);
        }
        let theirs = run(dir.path(), "qemu-img", &args);
        let ours = our_create((!o.is_empty()).then_some(o), size);
        assert_eq!(ours, theirs, "case -o {o:?} size {size:?}");
    }
}
