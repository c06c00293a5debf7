//! `measure` against `qemu-img measure` on twin files: the same output over
//! a table of sizes, cluster sizes, options and input images, and the same
//! errors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support::{self, run_ok, twin_dirs, twins};

#[test]
fn measure_matches_qemu_img() {
    if !support::have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        run_ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"],
        );
        run_ok(
            d,
            "qemu-io",
            &[
                "-c",
                "write 0 1M",
                "-c",
                "write 10M 64k",
                "-c",
                "write -z 20M 1M",
                "-c",
                "write -c 30M 192k",
                "src.qcow2",
            ],
        );
        run_ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
        );
        run_ok(d, "qemu-io", &["-c", "write -P 1 0 2M", "base.qcow2"]);
        run_ok(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "ov.qcow2",
            ],
        );
        run_ok(
            d,
            "qemu-io",
            &[
                "-c",
                "write -P 2 1M 1M",
                "-c",
                "write -P 2 40M 1000k",
                "ov.qcow2",
            ],
        );
        run_ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "bm.qcow2", "64M"],
        );
        run_ok(d, "qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
        run_ok(
            d,
            "qemu-img",
            &["bitmap", "--add", "-g", "4k", "bm.qcow2", "bitmap1"],
        );
        let raw: Vec<u8> = (0..3_000_000u32)
            .map(|i| if i < 1_000_000 { 0 } else { i as u8 })
            .collect();
        std::fs::write(d.join("src.raw"), raw).unwrap();
    });
    let (q, o) = (qd.path(), od.path());
    let mut cases: Vec<Vec<String>> = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    for size in ["0", "1", "511", "1G", "1000000", "3T", "100G"] {
        cases.push(s(&["--size", size]));
        for opts in [
            "",
            "cluster_size=512",
            "cluster_size=4k,refcount_bits=64",
            "cluster_size=2M,refcount_bits=1",
            "extended_l2=on",
            "extended_l2=on,cluster_size=16k",
            "refcount_bits=8,lazy_refcounts=on",
            "compat=0.10",
            "preallocation=full",
            "preallocation=falloc",
            "preallocation=metadata",
            "backing_file=x.qcow2",
        ] {
            let mut c = s(&["--size", size, "-O", "qcow2"]);
            if !opts.is_empty() {
                c.extend(s(&["-o", opts]));
            }
            cases.push(c);
        }
    }
    for file in ["src.qcow2", "ov.qcow2", "bm.qcow2"] {
        for opts in [
            "",
            "cluster_size=4k",
            "compat=0.10",
            "cluster_size=2M",
            "backing_file=b",
            "preallocation=full",
        ] {
            let mut c = s(&["-O", "qcow2", file]);
            if !opts.is_empty() {
                c.extend(s(&["-o", opts]));
            }
            cases.push(c.clone());
            c.insert(0, "--output=json".into());
            cases.push(c);
        }
        cases.push(s(&[file]));
    }
    cases.push(s(&["-f", "raw", "-O", "qcow2", "src.raw"]));
    cases.push(s(&[
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "--output=json",
        "src.raw",
    ]));
    cases.push(s(&["-f", "raw", "src.raw"]));
    // Errors.
    for e in [
        &["-O", "qcow2"][..],
        &["--size", "1G", "-O", "qcow2", "src.qcow2"],
        &["-O", "qcow2", "src.qcow2", "ov.qcow2"],
        &["--size", "1G", "-O", "qcow2", "-o", "bogus=1"],
        &["--size", "1G", "-O", "bogus"],
        &["--size", "1G", "-O", "qcow2", "-o", "cluster_size=3000"],
        &["--size", "10X", "-O", "qcow2"],
        &["--size", "-1", "-O", "qcow2"],
        &["--size", "1G", "--output=xml"],
        &["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
        &["--size", "1G", "-O", "qcow2", "-o", "compat=0.9"],
        &["--size", "1G", "-O", "qcow2", "-o", "preallocation=bogus"],
        &["--size", "1G", "-O", "qcow2", "-o", "cluster_size=abc"],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "size=2G,data_file=x,compression_type=zstd",
        ],
        &["--size", "1G", "-O", "raw", "-o", "preallocation=full"],
        &["-O", "qcow2", "nosuch.qcow2"],
    ] {
        cases.push(s(e));
    }
    for c in &cases {
        let mut args = vec!["measure"];
        args.extend(c.iter().map(String::as_str));
        twins(q, o, "qemu-img", &[], &args);
    }
}

/// `measure -o encrypt.format=luks,...`: the LUKS volume (sized for its
/// cipher, rounded to clusters) counts in both numbers, as in qemu-img;
/// a missing key, an unknown secret or a bad algorithm name are refused
/// with qemu-img's messages; the legacy `aes` format adds nothing.
#[test]
fn measure_with_luks_matches_qemu_img() {
    if !support::have_qemu() {
        return;
    }
    const SECRET: &str = "secret,id=s,data=abc123";
    let (qd, od) = twin_dirs(|d| {
        run_ok(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "--object",
                SECRET,
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
                "enc.qcow2",
                "16M",
            ],
        );
        run_ok(
            d,
            "qemu-io",
            &[
                "--object",
                SECRET,
                "-c",
                "write 0 1M",
                "-c",
                "write -z 4M 1M",
                "--image-opts",
                "driver=qcow2,encrypt.key-secret=s,file.filename=enc.qcow2",
            ],
        );
        run_ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "plain.qcow2", "16M"],
        );
        run_ok(d, "qemu-io", &["-c", "write 1M 3M", "plain.qcow2"]);
    });
    let luks = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10";
    let mut cases: Vec<Vec<String>> = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    // (QEMU calibrates PBKDF2 for about a second per LUKS case, whatever
    // iter-time says: few sizes.)
    for size in ["0", "3T"] {
        let o = luks.to_owned();
        cases.push(s(&[
            "--object", SECRET, "--size", size, "-O", "qcow2", "-o", &o,
        ]));
    }
    for size in ["1G"] {
        for extra in [
            "",
            ",cluster_size=512",
            ",cluster_size=2M",
            ",extended_l2=on",
            ",preallocation=full",
            ",encrypt.cipher-alg=aes-128",
            ",encrypt.cipher-alg=aes-192,encrypt.hash-alg=sha1",
            ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ecb",
            ",encrypt.cipher-alg=twofish-128",
        ] {
            let o = format!("{luks}{extra}");
            cases.push(s(&[
                "--object", SECRET, "--size", size, "-O", "qcow2", "-o", &o,
            ]));
        }
    }
    for file in [
        &["plain.qcow2"][..],
        &[
            "--image-opts",
            "driver=qcow2,encrypt.key-secret=s,file.filename=enc.qcow2",
        ],
    ] {
        for extra in ["", ",cluster_size=4k"] {
            let o = format!("{luks}{extra}");
            let mut c = s(&["--object", SECRET, "-O", "qcow2", "-o", &o]);
            c.extend(s(file));
            cases.push(c.clone());
            c.insert(0, "--output=json".into());
            cases.push(c);
        }
    }
    // The legacy format, the alias and unknown formats add nothing.
    for o in [
        "encrypt.format=aes,encrypt.key-secret=s",
        "encryption=on",
        "encrypt.format=foo",
    ] {
        cases.push(s(&[
            "--object", SECRET, "--size", "1G", "-O", "qcow2", "-o", o,
        ]));
    }
    // Errors, in QEMU's order.
    for e in [
        &["--size", "1G", "-O", "qcow2", "-o", "encrypt.format=luks"][..],
        &["--size", "100P", "-O", "qcow2", "-o", "encrypt.format=luks"],
        &["--size", "1G", "-O", "qcow2", "-o", luks],
        &[
            "--object",
            SECRET,
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=nosuch",
        ],
        &[
            "--object",
            SECRET,
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=foo",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,cluster_size=3k",
        ],
        &[
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,preallocation=foo",
        ],
        &["-O", "qcow2", "-o", luks, "enc.qcow2"],
    ] {
        cases.push(s(e));
    }
    for c in &cases {
        let mut args = vec!["measure"];
        args.extend(c.iter().map(String::as_str));
        twins(qd.path(), od.path(), "qemu-img", &[], &args);
    }
}
