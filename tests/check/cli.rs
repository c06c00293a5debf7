//! The qcow2-check command line against `qemu-img check`: messages, streams
//! and exit codes (cli.md §1), with the program names swapped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use crate::support::*;
use std::process::Command;

fn runs(dir: &std::path::Path, args: &[&str]) -> (Run, Run) {
    let mut qemu_args = vec!["check"];
    qemu_args.extend_from_slice(args);
    (run_in(dir, "qemu-img", &qemu_args), ours_check(dir, args))
}

/// qemu-img's text with our program name.
fn ours(s: &str) -> String {
    s.replace("qemu-img check", "qcow2-check")
        .replace("qemu-img:", "qcow2-check:")
}

fn assert_same(dir: &std::path::Path, args: &[&str]) {
    let (q, o) = runs(dir, args);
    assert_eq!(
        o.code, q.code,
        "exit code of {args:?}\nqemu: {q:#?}\nours: {o:#?}"
    );
    assert_eq!(o.out, ours(&q.out), "stdout of {args:?}");
    assert_eq!(o.err, ours(&q.err), "stderr of {args:?}");
}

#[test]
fn usage_and_open_errors() {
    if !have_qemu() {
        return;
    }
    let t = Twin::create(&[], "64M");
    let dir = t.q.dir.clone();
    std::fs::write(dir.join("plain.raw"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(dir.join("empty.raw"), b"").unwrap();
    for args in [
        &["nonexist.qcow2"][..],
        &["-f", "qcow2", "plain.raw"],
        &["-f", "raw", "plain.raw"],
        &["-f", "qcow2", "empty.raw"],
        &["--output", "json", "-f", "raw", "plain.raw"],
        &[],
        &[NAME, "extra"],
        &["--bogus", NAME],
        &["--bogus=1", NAME],
        &["-x", NAME],
        &["-r", "bogus", NAME],
        &["--output", "xml", NAME],
        &["--output", "xml", "-r", "bogus", NAME],
        &["-r", "all", "-U", NAME],
        &["-f", "nosuch", NAME],
        &["-f", "raw", "nonexist"],
        &["-r"],
        &["-qr"],
        &["--repair"],
        &["--output"],
        &["-T", "bad", NAME],
        &["--f", "qcow2", NAME],
        &["--o", "json", NAME],
    ] {
        assert_same(&dir, args);
    }
}

/// Asserts that `qcow2-check OURS` prints and exits as `qemu-img check QEMU`.
fn assert_same_as(dir: &std::path::Path, our_args: &[&str], qemu_args: &[&str]) {
    let (q, _) = runs(dir, qemu_args);
    let (_, o) = runs(dir, our_args);
    assert_eq!(o.code, q.code, "{our_args:?}\nqemu: {q:#?}\nours: {o:#?}");
    assert_eq!(o.out, ours(&q.out), "stdout of {our_args:?}");
    assert_eq!(o.err, ours(&q.err), "stderr of {our_args:?}");
}

#[test]
fn files_without_format_are_qcow2_and_special_files_are_refused() {
    if !have_qemu() {
        return;
    }
    let t = Twin::create(&[], "64M");
    let dir = t.q.dir.clone();
    std::fs::write(dir.join("plain.raw"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(dir.join("empty.raw"), b"").unwrap();
    std::fs::create_dir(dir.join("adir")).unwrap();
    // qcow2-check checks qcow2 only: without -f a file is taken as qcow2
    // (qemu-img would probe raw and exit 63), as `qemu-img check -f qcow2`.
    for f in ["plain.raw", "empty.raw", "/dev/null", "/dev/zero"] {
        assert_same_as(&dir, &[f], &["-f", "qcow2", f]);
        assert_same_as(&dir, &["-r", "all", f], &["-r", "all", "-f", "qcow2", f]);
        let (_, o) = runs(&dir, &[f]);
        assert_eq!(o.code, 1);
        assert_eq!(
            o.err,
            format!("qcow2-check: Could not open '{f}': Image is not in qcow2 format\n")
        );
    }
    // Exit 63 only for an explicit non-qcow2 format.
    for f in ["plain.raw", "/dev/null"] {
        assert_same(&dir, &["-f", "raw", f]);
        let (_, o) = runs(&dir, &["-f", "raw", f]);
        assert_eq!(o.code, 63);
    }
    // A directory: QEMU's file driver message (read-only), or the open's
    // error (read-write), with or without -f.
    for args in [
        &["adir"][..],
        &["-f", "qcow2", "adir"],
        &["-f", "raw", "adir"],
        &["--output", "json", "adir"],
        &["-r", "all", "adir"],
        &["-r", "leaks", "-f", "qcow2", "adir"],
    ] {
        assert_same(&dir, args);
    }
    // A socket cannot be opened: the open's own error, as in QEMU.
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    assert_same(&dir, &["sock"]);
    assert_same(&dir, &["-f", "raw", "sock"]);
    // A FIFO: QEMU blocks opening it; ours refuses it as the file driver
    // refuses any other non-regular file.
    let made = Command::new("mkfifo").arg(dir.join("fifo")).status();
    if made.map(|s| s.success()).unwrap_or(false) {
        let o = Command::new(QCOW2_CHECK)
            .arg("fifo")
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            "qcow2-check: Could not open 'fifo': 'file' driver requires 'fifo' to be a regular file\n"
        );
    }
    let (_, o) = runs(&dir, &["adir"]);
    assert_eq!(
        o.err,
        "qcow2-check: Could not open 'adir': 'file' driver requires 'adir' to be a regular file\n"
    );
    // qcow2-img check probes as qemu-img check does.
    let img = |args: &[&str]| {
        let o = Command::new(QCOW2_IMG)
            .arg("check")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    for args in [
        &["plain.raw"][..],
        &["/dev/null"],
        &["-r", "all", "plain.raw"],
        &["adir"],
    ] {
        let (q, _) = runs(&dir, args);
        let (code, err) = img(args);
        assert_eq!(code, Some(q.code), "qcow2-img check {args:?}");
        assert_eq!(
            err,
            q.err.replace("qemu-img:", "qcow2-img:"),
            "qcow2-img check {args:?}"
        );
    }
}

#[test]
fn option_spellings() {
    if !have_qemu() {
        return;
    }
    let t = Twin::create(&[], "64M");
    t.img().io(&["write 0 1M"]);
    let dir = t.q.dir.clone();
    for args in [
        &[NAME][..],
        &["-f", "qcow2", NAME],
        &["-U", NAME],
        &["--force-share", "--format=qcow2", NAME],
        &["--output=json", NAME],
        &["--out", "json", NAME],
        &["-q", NAME],
        &["--quiet", "--output", "json", NAME],
        &["-T", "none", NAME],
        &[NAME, "--output", "json"],
        &["--output", "json", "--", NAME],
        &["-rleaks", NAME],
        &["--repa=all", NAME],
    ] {
        assert_same(&dir, args);
    }
}

#[test]
fn leaky_and_corrupt_outputs_exactly() {
    if !have_qemu() {
        return;
    }
    // cli.md §1.3/1.4: clean.qcow2 with 1 MiB + 64 KiB written.
    let t = Twin::create(&[], "64M");
    t.img().io(&["write 0 1M", "write 2M 64k"]);
    t.img().set_refcount(0, 2);
    t.split();
    let (q, o) = runs(&t.q.dir, &[NAME]);
    assert_eq!(
        q.out,
        "\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no \
         harm to data.\n17/1024 = 1.66% allocated, 0.00% fragmented, 0.00% compressed \
         clusters\nImage end offset: 1441792\n"
    );
    assert_eq!((o.code, &o.out, &o.err), (3, &q.out, &q.err));
    // -q: nothing on stdout, the diagnostics still on stderr.
    assert_same(&t.q.dir, &["-q", NAME]);
    // -r leaks on the twins.
    let q = t.q.qemu_check(&["-r", "leaks"]);
    let o = t.o.our_check(&["-r", "leaks"]);
    assert_eq!((o.code, &o.out, &o.err), (q.code, &q.out, &q.err));
    assert!(o
        .out
        .starts_with("The following inconsistencies were found and repaired:"));

    // Refcount of data cluster 5 lowered to 0: two errors; -r all rebuilds.
    let t = Twin::create(&[], "64M");
    t.img().io(&["write 0 1M", "write 2M 64k"]);
    t.img().set_refcount(5, 0);
    t.split();
    assert_same(&t.q.dir, &[NAME]);
    assert_same(&t.q.dir, &["--output", "json", NAME]);
    let q = t.q.qemu_check(&["-r", "all"]);
    let o = t.o.our_check(&["-r", "all"]);
    assert_eq!(o.code, q.code);
    assert_eq!(o.err, q.err, "the same rebuild lines");
    // The image end offset after a rebuild is layout, not contract.
    let cut = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("Image end"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(cut(&o.out), cut(&q.out));
}

#[test]
fn json_of_compressed_and_fragmented_images() {
    if !have_qemu() {
        return;
    }
    let t = Twin::create(&[], "16M");
    t.img()
        .io(&["write 0 64k", "write 4M 64k", "write 64k 64k"]);
    assert_same(&t.q.dir, &["--output", "json", NAME]);
    assert_same(&t.q.dir, &[NAME]);
    let r =
        t.q.qemu_img(&["convert", "-c", "-O", "qcow2", NAME, "comp.qcow2"]);
    assert_eq!(r.code, 0);
    assert_same(&t.q.dir, &["--output", "json", "comp.qcow2"]);
    assert_same(&t.q.dir, &["comp.qcow2"]);
}

#[test]
fn missing_backing_file_fails_to_open() {
    if !have_qemu() {
        return;
    }
    let t = Twin::create(&[], "16M");
    let r = t.q.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        NAME,
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_same(&t.q.dir, &["top.qcow2"]);
    std::fs::remove_file(t.q.path()).unwrap();
    assert_same(&t.q.dir, &["top.qcow2"]);
}
