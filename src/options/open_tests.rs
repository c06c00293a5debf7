//! Tests of [`OpenOptions`](super::OpenOptions), including a cross-check against
//! `qemu-io --image-opts`.

use std::path::Path;

use super::*;
use crate::options::testutil::{have, run, KIB, MIB};
use crate::options::{OverlapCheckMode, OverlapChecks};
use crate::types::MetadataKind;

fn open_err(s: &str) -> String {
    OpenOptions::from_qemu_str(s).unwrap_err().to_string()
}

#[test]
fn locking_and_force_share() {
    let o = OpenOptions::new();
    assert_eq!(
        (o.get_locking(), o.get_force_share()),
        (Locking::Auto, false)
    );
    let o = OpenOptions::from_qemu_str("file.locking=off,force-share=on").unwrap();
    assert_eq!((o.get_locking(), o.get_force_share()), (Locking::Off, true));
    assert_eq!(
        o.check_force_share().unwrap_err().to_string(),
        "force-share=on can only be used with read-only images"
    );
    assert_eq!(o.read_only(true).check_force_share(), Ok(()));
    assert_eq!(open_err("file.locking=yes"), "invalid parameter value: yes");
    assert_eq!(
        open_err("force-share=2"),
        "Parameter 'force-share' expects 'on' or 'off'"
    );
    // `file=NAME` excludes every other `file.*` option.
    assert_eq!(
        open_err("file=a.qcow2,file.locking=off"),
        "Cannot reference an existing block device with additional options or a new filename"
    );
    let o = OpenOptions::new().locking(Locking::On).force_share(true);
    assert_eq!((o.get_locking(), o.get_force_share()), (Locking::On, true));
}

#[test]
fn open_options_defaults_and_builders() {
    let o = OpenOptions::new();
    assert!(!o.get_read_only());
    assert_eq!(o.get_overlap_check(), OverlapChecks::default());
    assert_eq!(o.get_lazy_refcounts(), None);
    assert!(!o.get_pass_discard_request());
    assert!(o.get_pass_discard_snapshot());
    assert!(!o.get_pass_discard_other());
    assert!(!o.get_discard_no_unref());
    assert_eq!(o.get_backing_policy(), &BackingPolicy::Follow);
    assert_eq!(o.get_rerror(), ErrorPolicy::Report);
    assert_eq!(o.get_werror(), ErrorPolicy::Report);
    assert_eq!(o, OpenOptions::default());
    let o = OpenOptions::new()
        .read_only(true)
        .l2_cache_size(MIB)
        .l2_cache_entry_size(4096)
        .refcount_cache_size(256 * KIB)
        .cache_size(2 * MIB)
        .cache_clean_interval(30)
        .overlap_check(OverlapChecks::from_mode(OverlapCheckMode::All))
        .lazy_refcounts(true)
        .pass_discard_request(true)
        .pass_discard_snapshot(false)
        .pass_discard_other(true)
        .discard_no_unref(true)
        .with_filename("disk.qcow2".into())
        .data_file("d.raw".into())
        .backing_policy(BackingPolicy::Refuse)
        .rerror(ErrorPolicy::Stop)
        .werror(ErrorPolicy::Enospc)
        .node_name("drive0".to_owned());
    assert!(o.get_read_only());
    assert_eq!(o.get_l2_cache_size(), Some(MIB));
    assert_eq!(o.get_l2_cache_entry_size(), Some(4096));
    assert_eq!(o.get_refcount_cache_size(), Some(256 * KIB));
    assert_eq!(o.get_cache_size(), Some(2 * MIB));
    assert_eq!(o.get_cache_clean_interval(), Some(30));
    assert_eq!(o.get_overlap_check().mask(), 0x1ff);
    assert_eq!(o.get_lazy_refcounts(), Some(true));
    assert!(o.get_pass_discard_request());
    assert!(!o.get_pass_discard_snapshot());
    assert!(o.get_pass_discard_other());
    assert!(o.get_discard_no_unref());
    assert_eq!(o.filename(), Some(Path::new("disk.qcow2")));
    assert_eq!(o.get_data_file(), Some(Path::new("d.raw")));
    assert_eq!(o.get_backing_policy(), &BackingPolicy::Refuse);
    assert_eq!(o.get_rerror(), ErrorPolicy::Stop);
    assert_eq!(o.get_werror(), ErrorPolicy::Enospc);
    assert_eq!(o.get_node_name(), Some("drive0"));
}

#[test]
fn open_options_from_image_opts() {
    let o = OpenOptions::from_qemu_str(
        "driver=qcow2,file.filename=disk.qcow2,overlap-check=all,l2-cache-size=1M,lazy-refcounts=on",
    )
    .unwrap();
    assert_eq!(o.filename(), Some(Path::new("disk.qcow2")));
    assert_eq!(o.get_overlap_check().mask(), 0x1ff);
    assert_eq!(o.get_l2_cache_size(), Some(MIB));
    assert_eq!(o.get_lazy_refcounts(), Some(true));

    let o = OpenOptions::from_qemu_str(
        "file=a,,b.qcow2,read-only=on,node-name=drive0,rerror=stop,werror=enospc,\
         l2-cache-entry-size=4k,refcount-cache-size=1M,cache-size=4M,cache-clean-interval=0x10,\
         pass-discard-request=yes,pass-discard-snapshot=off,pass-discard-other=true,\
         discard-no-unref=on,data-file=d.raw,overlap-check.template=constant,\
         overlap-check.inactive-l2=on",
    )
    .unwrap();
    assert_eq!(o.filename(), Some(Path::new("a,b.qcow2")));
    assert!(o.get_read_only());
    assert_eq!(o.get_node_name(), Some("drive0"));
    assert_eq!(o.get_rerror(), ErrorPolicy::Stop);
    assert_eq!(o.get_werror(), ErrorPolicy::Enospc);
    assert_eq!(o.get_l2_cache_entry_size(), Some(4096));
    assert_eq!(o.get_refcount_cache_size(), Some(MIB));
    assert_eq!(o.get_cache_size(), Some(4 * MIB));
    assert_eq!(o.get_cache_clean_interval(), Some(16));
    assert!(o.get_pass_discard_request());
    assert!(!o.get_pass_discard_snapshot());
    assert!(o.get_pass_discard_other());
    assert!(o.get_discard_no_unref());
    assert_eq!(o.get_data_file(), Some(Path::new("d.raw")));
    assert_eq!(
        o.get_overlap_check().mask(),
        0x12b | MetadataKind::InactiveL2.bit()
    );

    // Later lists add to earlier ones; overlap flags keep applying over the current set.
    let mut o = OpenOptions::new().overlap_check(OverlapChecks::from_mode(OverlapCheckMode::None));
    o.apply_qemu_str("overlap-check.active-l1=on").unwrap();
    assert_eq!(o.get_overlap_check().mask(), MetadataKind::ActiveL1.bit());
    o.apply_qemu_str("file.driver=file,file.filename=x.qcow2")
        .unwrap();
    assert_eq!(o.filename(), Some(Path::new("x.qcow2")));
    assert_eq!(o.get_overlap_check().mask(), MetadataKind::ActiveL1.bit());
}

#[test]
fn open_option_errors_match_qemu_io() {
    // Texts verified with `qemu-io --image-opts ...` 10.0.2 (after "can't open: ").
    assert_eq!(
        open_err("bogus=1"),
        "Block format 'qcow2' does not support the option 'bogus'"
    );
    assert_eq!(open_err("driver=raw2"), "Unknown driver 'raw2'");
    assert_eq!(open_err("file.driver=foo"), "Unknown driver 'foo'");
    assert_eq!(
        open_err("overlap-check=some"),
        "Unsupported value 'some' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
    );
    assert_eq!(
        open_err("lazy-refcounts=maybe"),
        "Parameter 'lazy-refcounts' expects 'on' or 'off'"
    );
    assert_eq!(
        open_err("read-only=maybe"),
        "Parameter 'read-only' expects 'on' or 'off'"
    );
    assert_eq!(
        open_err("l2-cache-size=3x"),
        "Parameter 'l2-cache-size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
    );
    assert_eq!(
        open_err("l2-cache-size=99999E"),
        "Value '99999E' is out of range for parameter 'l2-cache-size'"
    );
    assert_eq!(
        open_err("cache-clean-interval=abc"),
        "Parameter 'cache-clean-interval' expects a number"
    );
    assert_eq!(open_err("node-name=1abc"), "Invalid node-name: '1abc'");
    assert_eq!(open_err("node-name="), "Invalid node-name: ''");
    assert_eq!(
        open_err(&format!("node-name={}", "a".repeat(32))),
        "Node name too long"
    );
    assert!(OpenOptions::from_qemu_str(&format!("node-name={}", "a".repeat(31))).is_ok());
    assert_eq!(
        open_err("file=a.qcow2,file.filename=b.qcow2"),
        "Cannot reference an existing block device with additional options or a new filename"
    );
    assert_eq!(
        open_err("rerror=enospc"),
        "'enospc' invalid read error action"
    );
    assert_eq!(
        open_err("werror=bogus"),
        "'bogus' invalid write error action"
    );
    assert_eq!(
        open_err("overlap-check.bogus=on"),
        "Block format 'qcow2' does not support the option 'overlap-check.bogus'"
    );
    let o = OpenOptions::from_qemu_str("encrypt.key-secret=sec0,encrypt.format=luks").unwrap();
    assert_eq!(o.get_key_secret(), Some("sec0"));
    assert_eq!(o.get_encrypt_format(), Some("luks"));
    assert_eq!(
        open_err("encrypt.cipher-alg=aes-128"),
        "Parameter 'cipher-alg' is unexpected"
    );
    // QEMU's order (verified): driver first, then bad values, then overlap resolution,
    // then unknown keys.
    assert_eq!(open_err("bogus=1,driver=raw2"), "Unknown driver 'raw2'");
    assert_eq!(
        open_err("bogus=1,lazy-refcounts=maybe"),
        "Parameter 'lazy-refcounts' expects 'on' or 'off'"
    );
    assert!(open_err("l2-cache-size=1M,bogus=1,overlap-check=some")
        .starts_with("Unsupported value 'some'"));
    assert!(
        open_err("l2-cache-size=abc,overlap-check=some").starts_with("Parameter 'l2-cache-size'")
    );
    // On error nothing changes.
    let mut o = OpenOptions::new();
    assert!(o.apply_qemu_str("read-only=on,bogus=1").is_err());
    assert_eq!(o, OpenOptions::new());
}

#[test]
fn open_version_checks() {
    let o = OpenOptions::new().lazy_refcounts(true);
    assert_eq!(
        o.check_image_version(2).unwrap_err().to_string(),
        "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
    );
    assert!(o.check_image_version(3).is_ok());
    let o = OpenOptions::new().discard_no_unref(true);
    assert_eq!(
        o.check_image_version(2).unwrap_err().to_string(),
        "discard-no-unref is only supported since qcow2 version 3"
    );
    assert!(OpenOptions::new()
        .lazy_refcounts(false)
        .check_image_version(2)
        .is_ok());
}

// ----- cross-check against the real QEMU tool -----

#[test]
fn qemu_io_image_opts_errors() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run(
        dir.path(),
        "qemu-img",
        &["create", "-f", "qcow2", "-q", "disk.qcow2", "1M"],
    );
    let long = format!("node-name={}", "a".repeat(32));
    let short = format!("node-name={}", "a".repeat(31));
    let cases = [
        "",
        "overlap-check=some",
        "overlap-check.template=some",
        "overlap-check=all,overlap-check.template=none",
        "overlap-check.template=foo,overlap-check=bar",
        "overlap-check=all,overlap-check.template=all",
        "overlap-check.main-header=maybe",
        "overlap-check.bogus=on",
        "overlap-check=none,overlap-check.active-l2=on",
        "overlap-check.template=all,overlap-check.inactive-l2=off",
        "overlap-check.bitmap-directory=off",
        "bogus=1",
        "l2-cache-size=3x",
        "l2-cache-size=99999E",
        "l2-cache-size=-1",
        "l2-cache-size=1.5",
        "cache-clean-interval=abc",
        "cache-clean-interval=-1",
        "cache-clean-interval=4294967296",
        "cache-clean-interval=99999999999999999999",
        "cache-clean-interval=0x10",
        "cache-size=1M,l2-cache-size=512k,refcount-cache-size=256k",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "cache-size=1M,refcount-cache-size=256k",
        "cache-size=100k",
        "l2-cache-size=1k",
        "l2-cache-entry-size=3000",
        "l2-cache-entry-size=256",
        "l2-cache-entry-size=128k",
        "l2-cache-entry-size=512,l2-cache-size=1k",
        "refcount-cache-size=1P",
        "lazy-refcounts=maybe",
        "lazy-refcounts=on",
        "pass-discard-request=yes",
        "pass-discard-other=nope",
        "pass-discard-snapshot=off",
        "discard-no-unref=on",
        "driver=raw2",
        "driver=raw2,bogus=1",
        "bogus=1,driver=raw2",
        "bogus=1,lazy-refcounts=maybe",
        "lazy-refcounts=on,bogus=1",
        "l2-cache-size=abc,overlap-check=some",
        "l2-cache-size=1M,bogus=1,overlap-check=some",
        "node-name=1abc",
        "node-name=a*b",
        "node-name=",
        &long,
        &short,
        "read-only=maybe",
        "read-only=on",
        "file.driver=foo",
        "file.driver=file",
        "file.locking=off",
        "file.locking=auto",
        "file.locking=on",
        "file.locking=bogus",
        "file.locking=OFF",
        "force-share=on",
        "force-share=maybe",
    ];
    for case in cases {
        let opts = if case.is_empty() {
            "driver=qcow2,file.filename=disk.qcow2".to_owned()
        } else {
            format!("driver=qcow2,file.filename=disk.qcow2,{case}")
        };
        let (_, stderr) = run(
            dir.path(),
            "qemu-io",
            &["-r", "--image-opts", "-c", "read -q 0 4k", &opts],
        );
        let ours = OpenOptions::from_qemu_str(&opts)
            .and_then(|o| o.cache_config(1 << 20, 65536, 8).map(|_| o))
            .and_then(|o| o.check_image_version(3));
        let want = match ours {
            Ok(()) => String::new(),
            Err(e) => format!("qemu-io: can't open: {e}\n"),
        };
        assert_eq!(stderr, want, "case {case:?}");
    }
}

#[test]
fn cache_direct_and_no_flush() {
    let o = OpenOptions::new();
    assert!(!o.get_cache_direct() && !o.get_cache_no_flush());
    let o = OpenOptions::new().cache_direct(true).cache_no_flush(true);
    assert!(o.get_cache_direct() && o.get_cache_no_flush());
    let o = OpenOptions::from_qemu_str("file.filename=d.qcow2,cache.direct=on,cache.no-flush=on")
        .unwrap();
    assert!(o.get_cache_direct() && o.get_cache_no_flush());
    let o = OpenOptions::from_qemu_str("cache.direct=off,cache.no-flush=off").unwrap();
    assert!(!o.get_cache_direct() && !o.get_cache_no_flush());
    // QEMU's messages (qemu-io --image-opts).
    assert_eq!(
        open_err("cache.direct=maybe"),
        "Parameter 'cache.direct' expects 'on' or 'off'"
    );
    assert_eq!(
        open_err("cache.no-flush=2"),
        "Parameter 'cache.no-flush' expects 'on' or 'off'"
    );
}
