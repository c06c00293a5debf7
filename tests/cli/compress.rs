//! `io write -c` and `convert -c` against qemu-io/qemu-img on twin files:
//! the same messages, and images that read back identically, check clean
//! and map alike.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support::{self, io_twin, qemu_ok, run_ok, twin_dirs, twins};
use std::path::Path;

const T: &[&str] = &["t.qcow2"];

#[test]
fn io_write_c_matches_qemu_io() {
    if !support::have_qemu() {
        return;
    }
    for ctype in ["zlib", "zstd"] {
        let opts = format!("compression_type={ctype}");
        let (qd, od) = twin_dirs(|d| {
            run_ok(
                d,
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "-o", &opts, "t.qcow2", "1000k",
                ],
            );
        });
        let (q, o) = (qd.path(), od.path());
        io_twin(
            q,
            o,
            &[],
            &[
                "write -c -P 0 0 64k",
                "write -c -P 1 64k 128k",
                "write -c -P 2 64k 64k",  // allocated: EIO
                "write -c 1k 64k",        // unaligned offset: EINVAL
                "write -c 256k 1k",       // unaligned length: EINVAL
                "write -c -P 3 960k 40k", // the partial last cluster
                "write -c 0 0",
                "write -c 2M 64k", // past the end
                "read -P 1 64k 128k",
                "read -P 3 960k 40k",
            ],
            T,
        );
        let map = |d: &Path| qemu_ok(d, "qemu-img", &["map", "--output=json", "t.qcow2"]).out;
        assert_eq!(map(o), map(q), "{ctype}: qemu-img map");
        let check = |d: &Path| qemu_ok(d, "qemu-img", &["check", "t.qcow2"]).out;
        assert_eq!(check(o), check(q), "{ctype}: qemu-img check");
    }
}

#[test]
fn convert_c_matches_qemu_img() {
    if !support::have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        // Compressible, incompressible, zero and unallocated clusters, and a
        // size that is not a multiple of the cluster size.
        run_ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "src.qcow2", "3000k"],
        );
        run_ok(
            d,
            "qemu-io",
            &[
                "-c",
                "write -P 7 0 300k",
                "-c",
                "write -z 512k 128k",
                "-c",
                "write -P 0 1M 64k",
                "-c",
                "write -P 9 2900k 100k",
                "src.qcow2",
            ],
        );
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut raw = noise.clone();
        raw.extend(std::iter::repeat_n(0u8, 100_000));
        raw.extend((0..123_457u32).map(|i| (i % 251) as u8));
        std::fs::write(d.join("src.raw"), raw).unwrap();
    });
    let (q, o) = (qd.path(), od.path());
    for (src, fmt, opts) in [
        ("src.qcow2", "qcow2", "compression_type=zlib"),
        ("src.qcow2", "qcow2", "compression_type=zstd"),
        ("src.raw", "raw", "compression_type=zlib"),
        ("src.raw", "raw", "compression_type=zstd,cluster_size=4k"),
    ] {
        twins(
            q,
            o,
            "qemu-img",
            &[],
            &[
                "convert",
                "-f",
                fmt,
                "-c",
                "-O",
                "qcow2",
                "-o",
                opts,
                src,
                "dst.qcow2",
            ],
        );
        for d in [q, o] {
            let c = support::run_in(
                d,
                "qemu-img",
                &["compare", "-f", fmt, "-F", "qcow2", src, "dst.qcow2"],
            );
            assert_eq!(c.code, 0, "{src} {opts}: {c:?}");
            let chk = support::run_in(d, "qemu-img", &["check", "dst.qcow2"]);
            assert_eq!(chk.code, 0, "{src} {opts}: {chk:?}");
        }
        let map = |d: &Path| qemu_ok(d, "qemu-img", &["map", "--output=json", "dst.qcow2"]).out;
        assert_eq!(map(o), map(q), "{src} {opts}: qemu-img map");
    }
    // Refused for a raw target, as qemu-img does.
    twins(
        q,
        o,
        "qemu-img",
        &[],
        &["convert", "-c", "-O", "raw", "src.qcow2", "dst.raw"],
    );
    // -p still ends with 100 % and a newline.
    let r = support::ours(
        o,
        &["convert", "-p", "-c", "-O", "qcow2", "src.qcow2", "p.qcow2"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out.starts_with("    (0.00/100%)\r"), "{:?}", r.out);
    assert!(r.out.ends_with("    (100.00/100%)\r\n"), "{:?}", r.out);
}
