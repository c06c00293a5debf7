//! Encrypted images (cli.md §21) are never read or written as plaintext:
//! without a key every command that touches guest data refuses, as
//! qemu-img/qemu-io 10 do, with the same message and exit code, and the
//! file is left byte for byte as it was; `info` works and its encryption
//! lines equal qemu-img's.

// Helpers outside #[test] functions panic on purpose when a tool misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::*;
use qcow2kit::check::{Checker, Repair};
use qcow2kit::storage::MemStorage;
use qcow2kit::{Error, Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;

const SECRET: &str = "secret,id=sec0,data=abc123";

/// Makes, in `dir`: `luks.qcow2` (LUKS, 0x5a written at 0 through the key),
/// `essiv.qcow2` (LUKS aes-128-cbc-essiv:sha256, sha1, with a backing
/// file `base.qcow2`), `aes.qcow2` (legacy AES, 0x5a written through the
/// key) and `over.qcow2` (plain, backed by `luks.qcow2`).
fn make_images(dir: &Path) {
    let luks_opts = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    qemu_ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            SECRET,
            "-f",
            "qcow2",
            "-o",
            luks_opts,
            "luks.qcow2",
            "1M",
        ],
    );
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    );
    qemu_ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            SECRET,
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
             encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
             encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "essiv.qcow2",
        ],
    );
    qemu_ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            SECRET,
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0",
            "aes.qcow2",
            "1M",
        ],
    );
    for f in ["luks.qcow2", "aes.qcow2"] {
        let opts = format!("driver=qcow2,encrypt.key-secret=sec0,file.filename={f}");
        qemu_ok(
            dir,
            "qemu-io",
            &[
                "--object",
                SECRET,
                "--image-opts",
                "-c",
                "write -P 0x5a 0 64k",
                &opts,
            ],
        );
    }
    qemu_ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "luks.qcow2",
            "-F",
            "qcow2",
            "over.qcow2",
        ],
    );
}

const IMAGES: [&str; 4] = ["luks.qcow2", "essiv.qcow2", "aes.qcow2", "over.qcow2"];

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn data_commands_refuse_like_qemu_and_write_nothing() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_images(dir);
    let before = snapshot(dir);
    for img in IMAGES {
        let cmds: Vec<Vec<&str>> = vec![
            vec!["check", img],
            vec!["check", "-r", "leaks", img],
            vec!["check", "-r", "all", img],
            vec!["check", "--output=json", img],
            vec!["map", img],
            vec!["map", "--output=json", img],
            vec!["convert", "-O", "raw", img, "out.raw"],
            vec!["convert", "-O", "qcow2", img, "out.qcow2"],
            vec!["amend", "-o", "lazy_refcounts=on", img],
            vec!["resize", img, "2M"],
            vec!["bench", "-c", "1", img],
            vec!["bench", "-w", "-c", "1", img],
        ];
        for args in &cmds {
            let q = qemu(dir, "qemu-img", args);
            let o = ours(dir, args);
            assert_eq!(o.err, q.err, "stderr of {args:?}");
            assert_eq!((o.code, q.code), (1, 1), "exit codes of {args:?}: {o:?}");
            assert_eq!(o.out, q.out, "stdout of {args:?}");
        }
        for cmd in ["read -P 0x5a 0 4k", "write -P 0x11 0 4k", "write -z 0 64k"] {
            let args = ["-c", cmd, img];
            let q = qemu(dir, "qemu-io", &args);
            let o = ours(dir, &[&["io"][..], &args[..]].concat());
            assert_eq!(o.err, q.err, "stderr of io {args:?}");
            assert_eq!((o.code, q.code), (1, 1), "exit codes of io {args:?}: {o:?}");
        }
        for args in [vec![img], vec!["-r", "all", img]] {
            let q = qemu(dir, "qemu-img", &[&["check"][..], &args[..]].concat());
            let o = ours_check(dir, &args);
            assert_eq!(
                o.err,
                q.err.replace("qcow2-img", "qcow2-check"),
                "qcow2-check {args:?}"
            );
            assert_eq!((o.code, q.code), (1, 1), "qcow2-check {args:?}");
        }
    }
    assert_eq!(
        snapshot(dir),
        before,
        "no file may change (and none be created) when a command refuses"
    );
}

/// `disk size` depends on the file system's allocation at the moment of
/// the call: compared by shape only.
fn without_disk_size(s: &str) -> String {
    s.lines()
        .filter(|l| !l.trim_start().starts_with("disk size: "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn info_shows_the_encryption_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_images(dir);
    let before = snapshot(dir);
    for img in IMAGES {
        for chain in [false, true] {
            let mut args = vec!["info", img];
            if chain {
                args.insert(1, "--backing-chain");
            }
            let q = qemu_ok(dir, "qemu-img", &args);
            let o = ours(dir, &args);
            assert_eq!(o.code, 0, "{args:?}: {o:?}");
            assert_eq!(
                without_disk_size(&o.out),
                without_disk_size(&q.out),
                "{args:?}"
            );
            assert_eq!(o.err, q.err, "{args:?}");
            if img != "over.qcow2" || chain {
                assert!(o.out.contains("\nencrypted: yes\n"), "{args:?}: {}", o.out);
                assert!(o.out.contains("\n    encrypt:\n"), "{args:?}: {}", o.out);
            }
            args.push("--output=json");
            let q = qemu_ok(dir, "qemu-img", &args);
            let o = ours(dir, &args);
            assert_eq!(o.code, 0, "{args:?}: {o:?}");
            let (mut qj, mut oj) = (json(&q.out), json(&o.out));
            strip_actual_size(&mut qj);
            strip_actual_size(&mut oj);
            assert_eq!(oj, qj, "{args:?}");
        }
    }
    // The JSON key order is qemu-img's too (the parsed comparison above
    // does not see it).
    let q = qemu_ok(dir, "qemu-img", &["info", "--output=json", "essiv.qcow2"]);
    let o = ours(dir, &["info", "--output=json", "essiv.qcow2"]);
    let keys = |s: &str| -> Vec<String> {
        s.lines()
            .filter_map(|l| l.trim_start().strip_prefix('"'))
            .filter_map(|l| l.split_once("\":").map(|(k, _)| k.to_owned()))
            .filter(|k| k != "actual-size")
            .collect()
    };
    assert_eq!(keys(&o.out), keys(&q.out));
    assert_eq!(snapshot(dir), before, "info writes nothing");
}

#[test]
fn library_refuses_guest_data_without_a_key() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_images(dir);
    let before = snapshot(dir);
    let ro = OpenOptions::new().read_only(true);
    for img in ["luks.qcow2", "essiv.qcow2", "aes.qcow2"] {
        let path = dir.join(img);
        for opts in [OpenOptions::new(), ro.clone()] {
            assert!(matches!(
                Image::open(&path, &opts).as_ref().map_err(Error::inner),
                Err(Error::EncryptionKeyRequired)
            ));
            assert!(matches!(
                Image::open_without_backing(&path, &opts)
                    .as_ref()
                    .map_err(Error::inner),
                Err(Error::EncryptionKeyRequired)
            ));
        }
        let mem = Arc::new(MemStorage::from_bytes(std::fs::read(&path).unwrap()));
        assert!(matches!(
            Image::open_storage(mem.clone(), &OpenOptions::new()),
            Err(Error::EncryptionKeyRequired)
        ));
        assert_eq!(mem.to_vec(), std::fs::read(&path).unwrap());
        for repair in [Repair::None, Repair::Leaks, Repair::All] {
            assert!(matches!(
                Checker::open(&path, repair).as_ref().map_err(Error::inner),
                Err(Error::EncryptionKeyRequired)
            ));
        }
        assert_eq!(
            Error::EncryptionKeyRequired.to_string(),
            "Parameter 'encrypt.key-secret' is required for cipher"
        );

        // The inspection handle describes the image but refuses guest data.
        let info = Image::open_for_info(&path, &OpenOptions::new()).unwrap();
        assert!(info.is_encrypted());
        assert!(info.is_read_only());
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            info.read_at(&mut buf, 0),
            Err(Error::EncryptionKeyRequired)
        ));
        assert!(buf.iter().all(|&b| b == 0), "no ciphertext handed out");
        assert!(matches!(
            info.block_status(0, 4096),
            Err(Error::EncryptionKeyRequired)
        ));
        assert!(info.write_at(&[0x11; 512], 0).is_err());
        assert!(info.write_zeroes(0, 65536, false).is_err());
        assert!(info.discard(0, 65536).is_err());
        match img {
            "aes.qcow2" => assert!(info.luks_header().is_none()),
            "luks.qcow2" => {
                let h = info.luks_header().unwrap();
                assert_eq!((h.cipher_alg, h.cipher_mode), ("aes-256", "xts"));
                assert_eq!((h.ivgen_alg, h.hash_alg), ("plain64", "sha256"));
                assert!(h.slots[0].active && !h.slots[1].active);
            }
            _ => {
                let h = info.luks_header().unwrap();
                assert_eq!((h.cipher_alg, h.cipher_mode), ("aes-128", "cbc"));
                assert_eq!((h.ivgen_alg, h.ivgen_hash_alg), ("essiv", Some("sha256")));
                assert_eq!(h.hash_alg, "sha1");
            }
        }
        info.close().unwrap();
    }
    // An encrypted backing file refuses the whole chain.
    let e = Image::open(dir.join("over.qcow2"), &ro).unwrap_err();
    match e.inner() {
        Error::Backing { source, .. } => {
            assert!(matches!(**source, Error::EncryptionKeyRequired), "{e:?}")
        }
        other => panic!("expected a backing error, got {other:?}"),
    }
    assert_eq!(
        e.qemu_message(),
        "Could not open backing file: Parameter 'encrypt.key-secret' is required for cipher"
    );
    assert_eq!(snapshot(dir), before, "the library wrote nothing");
}

#[test]
fn create_over_an_encrypted_backing_file_needs_no_key() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_images(dir);
    for backing in ["luks.qcow2", "aes.qcow2", "over.qcow2"] {
        let args = [
            "create",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "qcow2",
            "new.qcow2",
        ];
        let q = qemu(dir, "qemu-img", &args);
        std::fs::remove_file(dir.join("new.qcow2")).unwrap();
        let o = ours(dir, &args);
        assert_eq!(
            (o.code, &o.out, &o.err),
            (q.code, &q.out, &q.err),
            "{args:?}"
        );
        assert_eq!(o.code, 0);
        let info = Image::open_for_info(dir.join("new.qcow2"), &OpenOptions::new()).unwrap();
        assert_eq!(info.size(), 1 << 20);
        drop(info);
        std::fs::remove_file(dir.join("new.qcow2")).unwrap();
    }
}

/// Copies every file of `from` into `to` (twins of the same images: LUKS
/// keys are random, so each side must see the same bytes).
fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn keyed_io_and_check_match_qemu() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    make_images(q);
    copy_dir(q, o);
    for img in ["luks.qcow2", "essiv.qcow2", "aes.qcow2"] {
        let opts = format!("driver=qcow2,encrypt.key-secret=sec0,file.filename={img}");
        let pre = ["--object", SECRET, "--image-opts"];
        let r = io_twin(
            q,
            o,
            &pre,
            &[
                "write -P 0x5a 0 64k",
                "read -P 0x5a 0 64k",
                "write -P 0x66 4k 1k",
                "write -P 0x67 70000 333",
                "read -P 0x66 4k 1k",
                "read -P 0x67 70000 333",
                "read -P 0 128k 64k",
            ],
            &[&opts],
        );
        assert_eq!(r.code, 0, "{img}: {r:?}");
        // What each wrote reads back in the other.
        for dir in [q, o] {
            let r = qemu(
                dir,
                "qemu-io",
                &io_args(
                    &pre,
                    &["read -P 0x67 70000 333", "read -P 0x5a 0 4k"],
                    &[&opts],
                ),
            );
            assert!(!r.out.contains("verification failed"), "{r:?}");
            assert_eq!(r.code, 0, "{r:?}");
        }
        let check = ["check", "--object", SECRET, "--image-opts", &opts];
        twins(q, o, "qemu-img", &[], &check);
        let check_json = [&check[..], &["--output=json"]].concat();
        twins(q, o, "qemu-img", &[], &check_json);
        let r = ours_check(o, &check[1..]);
        assert_eq!(r.code, 0, "{r:?}");
        // Wrong password, missing secret, bad objects: qemu-io's messages.
        for pre in [
            vec!["--object", "secret,id=sec0,data=wrong", "--image-opts"],
            vec!["--image-opts"],
            vec!["--object", "secret,id=sec0", "--image-opts"],
            vec!["--object", "secret,data=abc", "--image-opts"],
            vec![
                "--object",
                "secret,id=sec0,data=a,format=hex",
                "--image-opts",
            ],
            vec!["--object", "secret,id=sec0,data=a,file=b", "--image-opts"],
            vec!["--object", "bogus,id=sec0", "--image-opts"],
            vec!["--object", "secret,id=sec0,file=nosuch.txt", "--image-opts"],
            vec![
                "--object",
                "secret,id=sec0,data=abc123,format=base64",
                "--image-opts",
            ],
        ] {
            let r = io_twin(q, o, &pre, &["read 0 4k"], &[&opts]);
            // The legacy format has no key check: a wrong password opens
            // (and reads noise) in QEMU as here.
            let opens = img == "aes.qcow2" && pre.len() == 3 && pre[1].contains("wrong");
            assert_eq!(r.code, i32::from(!opens), "{pre:?}: {r:?}");
        }
        let wrong = [
            "check",
            "--object",
            "secret,id=s,data=wrong",
            "--image-opts",
        ];
        let wrong_opts = opts.replace("sec0", "s");
        twins(
            q,
            o,
            "qemu-img",
            &[],
            &[&wrong[..], &[&wrong_opts]].concat(),
        );
    }
    // The secret from a file, in base64.
    std::fs::write(o.join("pw.b64"), "YWJjMTIz").unwrap();
    let r = ours(
        o,
        &[
            "io",
            "--object",
            "secret,id=s,file=pw.b64,format=base64",
            "--image-opts",
            "-c",
            "read -P 0x5a 0 4k",
            "driver=qcow2,encrypt.key-secret=s,file.filename=luks.qcow2",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
}

/// `info` without the values that differ on every creation (UUID,
/// calibrated iteration counts) and the disk size.
fn info_shape(s: &str) -> String {
    without_disk_size(s)
        .lines()
        .map(|l| {
            let t = l.trim_start();
            for key in ["uuid: ", "iters: ", "master key iters: "] {
                if t.starts_with(key) {
                    return format!("{}{key}*", &l[..l.len() - t.len()]);
                }
            }
            l.to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `qcow2-img create` of LUKS images (several ciphers) lays them out as
/// `qemu-img create` does: `qemu-img info` of both reads the same apart
/// from the random and calibrated values, both check clean, and the image
/// we made takes writes in qemu-io and reads back here. Creation errors are
/// QEMU's and leave no file.
#[test]
fn create_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    for (i, (extra, compat, size)) in [
        ("", "1.1", "4M"),
        ("", "0.10", "1G"),
        (",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1", "1.1", "4M"),
        (",encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512", "1.1", "4M"),
        (",encrypt.cipher-alg=aes-192,encrypt.hash-alg=sha1", "1.1", "4M"),
    ]
    .into_iter()
    .enumerate()
    {
        {
            let name = format!("c{i}-{compat}.qcow2");
            let o_opts = format!(
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,compat={compat}{extra}"
            );
            let args = [
                "create", "--object", SECRET, "-f", "qcow2", "-o", &o_opts, &name, size,
            ];
            twins(q, o, "qemu-img", &[], &args);
            let qi = qemu_ok(q, "qemu-img", &["info", &name]);
            let oi = qemu_ok(o, "qemu-img", &["info", &name]);
            assert_eq!(info_shape(&oi.out), info_shape(&qi.out), "{name}");
            // Our info of our image equals qemu-img's.
            let ours_info = ours(o, &["info", &name]);
            assert_eq!(without_disk_size(&ours_info.out), without_disk_size(&oi.out));
            // The same file length (the LUKS header clusters at the same place).
            assert_eq!(
                std::fs::metadata(o.join(&name)).unwrap().len(),
                std::fs::metadata(q.join(&name)).unwrap().len(),
                "{name}"
            );
            let opts = format!("driver=qcow2,encrypt.key-secret=sec0,file.filename={name}");
            let r = qemu_ok(
                o,
                "qemu-io",
                &io_args(
                    &["--object", SECRET, "--image-opts"],
                    &["write -P 0x3c 1000 70000", "read -P 0x3c 1000 70000"],
                    &[&opts],
                ),
            );
            assert!(!r.out.contains("verification failed"), "{r:?}");
            let r = ours(
                o,
                &io_args(
                    &["io", "--object", SECRET, "--image-opts"],
                    &["read -P 0x3c 1000 70000", "read -P 0 71000 1000"],
                    &[&opts],
                ),
            );
            assert_eq!(r.code, 0, "{r:?}");
            let r = qemu_ok(
                o,
                "qemu-img",
                &["check", "--object", SECRET, "--image-opts", &opts],
            );
            assert!(r.out.contains("No errors were found"), "{r:?}");
        }
    }
    // Errors: QEMU's text after the Formatting line, exit 1, no file.
    for o_opts in [
        "encrypt.format=luks,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=nosuch,encrypt.iter-time=10",
        "encrypt.format=bogus,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=bogus",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=bogus",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=bogus",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encryption=on",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=abc",
    ] {
        let args = [
            "create",
            "--object",
            SECRET,
            "-f",
            "qcow2",
            "-o",
            o_opts,
            "bad.qcow2",
            "1M",
        ];
        let (qr, _) = twins(q, o, "qemu-img", &[], &args);
        assert_eq!(qr.code, 1, "{o_opts}");
        assert!(!o.join("bad.qcow2").exists(), "{o_opts}");
    }
}

/// `convert` into and out of encrypted images: the same bytes as
/// qemu-img's, QEMU's messages for a wrong or missing key, and no target
/// file left by a failed conversion.
#[test]
fn convert_to_and_from_encrypted_images() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    make_images(q);
    copy_dir(q, o);
    let src = "driver=qcow2,encrypt.key-secret=sec0,file.filename=luks.qcow2";
    let args = [
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        src,
        "-O",
        "raw",
        "plain.raw",
    ];
    twins(q, o, "qemu-img", &[], &args);
    assert_eq!(
        std::fs::read(o.join("plain.raw")).unwrap(),
        std::fs::read(q.join("plain.raw")).unwrap()
    );
    // Into a new encrypted image (from the raw copy), read back by QEMU.
    let args = [
        "convert",
        "--object",
        SECRET,
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "plain.raw",
        "enc.qcow2",
    ];
    twins(q, o, "qemu-img", &[], &args);
    let enc = "driver=qcow2,encrypt.key-secret=sec0,file.filename=enc.qcow2";
    let back = [
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        enc,
        "-O",
        "raw",
        "back.raw",
    ];
    qemu_ok(o, "qemu-img", &back);
    assert_eq!(
        std::fs::read(o.join("back.raw")).unwrap(),
        std::fs::read(o.join("plain.raw")).unwrap()
    );
    let r = qemu_ok(
        o,
        "qemu-img",
        &["check", "--object", SECRET, "--image-opts", enc],
    );
    assert!(r.out.contains("No errors were found"), "{r:?}");
    // Failures: the same messages, no target left.
    for args in [
        vec![
            "convert",
            "--object",
            "secret,id=sec0,data=wrong",
            "--image-opts",
            src,
            "-O",
            "raw",
            "fail.raw",
        ],
        vec!["convert", "luks.qcow2", "-O", "raw", "fail.raw"],
        vec![
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.iter-time=10",
            "plain.raw",
            "fail.qcow2",
        ],
    ] {
        let (qr, _) = twins(q, o, "qemu-img", &[], &args);
        assert_eq!(qr.code, 1, "{args:?}");
        assert!(!o.join("fail.raw").exists() && !o.join("fail.qcow2").exists());
    }
}

/// `info`, `map`, `compare`, `resize`, `amend`, `snapshot` and `bitmap`
/// take the key as qemu-img does (`--object secret,... --image-opts
/// driver=qcow2,encrypt.key-secret=ID,file.filename=F`): the same output,
/// errors and exit codes, and the images they change agree.
#[test]
fn image_opts_commands_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = (scratch(), scratch());
    let (q, o) = (qd.path(), od.path());
    make_images(q);
    copy_dir(q, o);
    let opts = "driver=qcow2,encrypt.key-secret=sec0,file.filename=luks.qcow2";
    let essiv = "driver=qcow2,encrypt.key-secret=sec0,file.filename=essiv.qcow2";
    let pre = ["--object", SECRET, "--image-opts"];
    let with = |sub: &str, mid: &[&str], tail: &[&str]| -> Vec<String> {
        let mut v = vec![sub.to_owned()];
        v.extend(mid.iter().map(|s| (*s).to_owned()));
        v.extend(pre.iter().map(|s| (*s).to_owned()));
        v.extend(tail.iter().map(|s| (*s).to_owned()));
        v
    };
    let twin = |args: &[String]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        twins(q, o, "qemu-img", &[], &a)
    };
    // info: the `json:` name, the encryption lines (disk size by shape).
    for mid in [&[][..], &["--output=json"][..]] {
        for img in [opts, essiv, "driver=qcow2,file.filename=over.qcow2"] {
            let args = with("info", mid, &[img]);
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let (qr, or) = (qemu(q, "qemu-img", &a), ours(o, &a));
            let shape = |s: &str| {
                without_disk_size(s)
                    .lines()
                    .filter(|l| !l.contains("\"actual-size\""))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(shape(&or.out), shape(&qr.out), "{args:?}");
            assert_eq!((or.code, &or.err), (qr.code, &qr.err), "{args:?}");
        }
    }
    // map: JSON without host offsets; the human form refuses.
    twin(&with("map", &["--output=json"], &[opts]));
    twin(&with("map", &[], &[opts]));
    twin(&with("map", &["--output=json"], &[essiv]));
    // compare: identical; an encrypted image against its plain backing file.
    twin(&with("compare", &[], &[opts, opts]));
    twin(&with(
        "compare",
        &[],
        &[opts, "driver=qcow2,file.filename=over.qcow2"],
    ));
    twin(&with(
        "compare",
        &[],
        &[essiv, "driver=qcow2,file.filename=base.qcow2"],
    ));
    // Errors: no key, -f with --image-opts, a missing file, bad options.
    for (sub, mid) in [
        ("info", &[][..]),
        ("map", &[][..]),
        ("compare", &[][..]),
        ("resize", &[][..]),
        ("amend", &["-o", "lazy_refcounts=on"][..]),
        ("snapshot", &["-c", "s"][..]),
        ("bitmap", &["--add"][..]),
    ] {
        let tail: &[&str] = match sub {
            "compare" => &["driver=qcow2,file.filename=luks.qcow2", "x"],
            "resize" => &["driver=qcow2,file.filename=luks.qcow2", "2M"],
            "bitmap" => &["driver=qcow2,file.filename=luks.qcow2", "b"],
            _ => &["driver=qcow2,file.filename=luks.qcow2"],
        };
        let mut a = vec![sub, "--image-opts"];
        a.extend_from_slice(mid);
        a.extend_from_slice(tail);
        // (info needs no key: its output is compared above.)
        if sub != "info" {
            twins(q, o, "qemu-img", &[], &a);
        }
        let mut f = vec![sub, "-f", "qcow2"];
        f.extend_from_slice(&a[1..]);
        twins(q, o, "qemu-img", &[], &f);
        let nope: Vec<&str> = a
            .iter()
            .map(|s| s.replace("luks.qcow2", "nope.qcow2"))
            .map(|s| &*Box::leak(s.into_boxed_str()))
            .collect();
        twins(q, o, "qemu-img", &[], &nope);
    }
    // Writes with the key: both images end up consistent and equal.
    twin(&with("resize", &[], &[opts, "2M"]));
    twin(&with("snapshot", &["-c", "snap1"], &[opts]));
    twin(&with("bitmap", &["--add"], &[opts, "b0"]));
    twin(&with("amend", &["-o", "lazy_refcounts=on"], &[opts]));
    twin(&with("resize", &["--shrink"], &[opts, "1M"]));
    for dir in [q, o] {
        let r = qemu(
            dir,
            "qemu-img",
            &["check", "--object", SECRET, "--image-opts", opts],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let r = qemu(
            dir,
            "qemu-img",
            &[
                "info",
                "--output=json",
                "--object",
                SECRET,
                "--image-opts",
                opts,
            ],
        );
        for want in [
            "\"virtual-size\": 1048576",
            "\"lazy-refcounts\": true",
            "\"name\": \"b0\"",
            "\"name\": \"snap1\"",
        ] {
            assert!(r.out.contains(want), "{want}: {r:?}");
        }
    }
    let other = format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        o.join("luks.qcow2").display()
    );
    let r = qemu(
        q,
        "qemu-img",
        &["compare", "--object", SECRET, "--image-opts", opts, &other],
    );
    assert_eq!(r.code, 0, "{r:?}");
}
