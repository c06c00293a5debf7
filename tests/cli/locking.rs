//! Image locking against QEMU's (cli.md §22): a `qemu-io` holding an image
//! blocks our commands with qemu-img's/qemu-io's exact messages and exit
//! codes, our `io` holding one blocks QEMU's tools, `-U` reads get through
//! both ways, readers coexist, `file.locking=off` opts out.
//!
//! Holders run `sleep` far longer than any test and are killed when the test
//! ends (no timing assumption); a test waits for its holder to show up in
//! `/proc/locks` (a bounded poll) before it starts.

// Helpers outside #[test] functions panic on purpose when a tool misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::*;
use qcow2kit::error::Error;
use qcow2kit::options::Locking;
use qcow2kit::{Image, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A process holding an image open; killed and reaped on drop.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether some open file description holds a lock on `path` (`/proc/locks`
/// lists `OFDLCK ... MAJ:MIN:INODE START END`).
fn has_ofd_lock(path: &Path) -> bool {
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let needle = format!(":{ino} ");
    locks
        .lines()
        .any(|l| l.contains("OFDLCK") && l.contains(&needle))
}

/// Starts `prog ARGS` in `dir` (a `sleep` that outlasts the test) and waits
/// until it holds its locks on `dir/image`.
fn hold(dir: &Path, prog: &str, args: &[&str], image: &str) -> Holder {
    let child = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn holder");
    let mut holder = Holder(child);
    let path = dir.join(image);
    for _ in 0..600 {
        if has_ofd_lock(&path) {
            return holder;
        }
        if let Some(status) = holder.0.try_wait().unwrap() {
            panic!("holder {prog} {args:?} exited early: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("holder {prog} {args:?} did not lock {image} within 30 s");
}

/// `qemu-io -c 'sleep …' IMG` (read-write holder), with extra flags.
fn qemu_holder(dir: &Path, flags: &[&str], image: &str) -> Holder {
    let mut args = flags.to_vec();
    args.extend_from_slice(&["-c", "sleep 600000", image]);
    hold(dir, "qemu-io", &args, image)
}

/// `qcow2-img io -c 'sleep …' IMG`, with extra flags.
fn our_holder(dir: &Path, flags: &[&str], image: &str) -> Holder {
    let mut args = vec!["io"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["-c", "sleep 600000", image]);
    hold(dir, QCOW2_IMG, &args, image)
}

/// An image with data, made by qemu-img/qemu-io in `dir`.
fn make_image(dir: &Path, name: &str) {
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", name, "1M"],
    );
    qemu_ok(dir, "qemu-io", &["-c", "write -q -P 7 0 64k", name]);
}

/// Runs `qemu-img`/`qemu-io` (`prog`, with `args`) and our equivalent
/// (`ours_args`, starting with the subcommand) and requires the same stderr
/// and exit code. Returns our run.
fn same_failure(dir: &Path, prog: &str, args: &[&str], ours_args: &[&str]) -> Run {
    let q = qemu(dir, prog, args);
    let o = ours(dir, ours_args);
    assert_eq!(o.err, q.err, "stderr of {ours_args:?} vs {prog} {args:?}");
    assert_eq!(
        o.code, q.code,
        "exit code of {ours_args:?} vs {prog} {args:?}"
    );
    o
}

fn hash(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn qemu_writer_blocks_our_commands_with_qemus_messages() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_image(dir, "h.qcow2");
    let before = hash(&dir.join("h.qcow2"));
    let _holder = qemu_holder(dir, &[], "h.qcow2");

    let shared_write = "qcow2-img: Could not open 'h.qcow2': Failed to get shared \"write\" lock\n\
                        Is another process using the image [h.qcow2]?\n";
    let write = "qcow2-img: Could not open 'h.qcow2': Failed to get \"write\" lock\n\
                 Is another process using the image [h.qcow2]?\n";
    // Readers are refused the shared "write" lock, writers the "write" lock.
    for args in [
        &["info", "h.qcow2"][..],
        &["map", "h.qcow2"],
        &["check", "h.qcow2"],
        &["bench", "-c", "1", "h.qcow2"],
    ] {
        let o = same_failure(dir, "qemu-img", args, args);
        assert_eq!((o.err.as_str(), o.code), (shared_write, 1), "{args:?}");
    }
    for args in [
        &["resize", "h.qcow2", "2M"][..],
        &["amend", "-o", "lazy_refcounts=on", "h.qcow2"],
        &["check", "-r", "all", "h.qcow2"],
        &["check", "-r", "leaks", "h.qcow2"],
        &["bench", "-w", "-c", "1", "h.qcow2"],
    ] {
        let o = same_failure(dir, "qemu-img", args, args);
        assert_eq!((o.err.as_str(), o.code), (write, 1), "{args:?}");
    }
    let o = same_failure(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "h.qcow2", "x.raw"],
        &["convert", "-O", "raw", "h.qcow2", "x.raw"],
    );
    assert_eq!(o.code, 1);
    // qemu-io: "can't open device", the same two lines.
    for args in [
        &["-c", "write -P 1 0 4k", "h.qcow2"][..],
        &["-r", "-c", "read 0 4k", "h.qcow2"],
    ] {
        let mut full = vec!["io"];
        full.extend_from_slice(args);
        let o = same_failure(dir, "qemu-io", args, &full);
        assert!(o
            .err
            .starts_with("qcow2-img: can't open device h.qcow2: Failed to get "));
        assert!(o
            .err
            .ends_with("\nIs another process using the image [h.qcow2]?\n"));
    }
    // create over a held image: the Formatting line, then the lock error;
    // the image stays as it was.
    let args = ["create", "-f", "qcow2", "h.qcow2", "2M"];
    let q = qemu(dir, "qemu-img", &args);
    let o = ours(dir, &args);
    assert_eq!(
        (o.out.as_str(), o.err.as_str(), o.code),
        (q.out.as_str(), q.err.as_str(), q.code)
    );
    assert_eq!(
        o.err,
        "qcow2-img: h.qcow2: Failed to get \"write\" lock\nIs another process using the image [h.qcow2]?\n"
    );
    // An image in use can still be a backing file (opened with force-share).
    let args = [
        "create", "-q", "-f", "qcow2", "-b", "h.qcow2", "-F", "qcow2", "ov.qcow2",
    ];
    qemu_ok(dir, "qemu-img", &args);
    std::fs::remove_file(dir.join("ov.qcow2")).unwrap();
    let o = ours(dir, &args);
    assert_eq!((o.err.as_str(), o.code), ("", 0));
    // qcow2-check speaks as qemu-img check does.
    let q = qemu(dir, "qemu-img", &["check", "-r", "all", "h.qcow2"]);
    let o = ours_check(dir, &["-r", "all", "h.qcow2"]);
    assert_eq!(o.err, q.err.replace("qcow2-img", "qcow2-check"));
    assert_eq!(o.code, 1);

    // -U gets the reads through, as in QEMU.
    for args in [
        &["info", "-U", "h.qcow2"][..],
        &["map", "-U", "h.qcow2"],
        &["check", "-U", "h.qcow2"],
        &["convert", "-U", "-O", "raw", "h.qcow2", "y.raw"],
        &["bench", "-U", "-c", "1", "h.qcow2"],
    ] {
        let q = qemu(dir, "qemu-img", args);
        let o = ours(dir, args);
        assert_eq!((q.code, o.code), (0, 0), "{args:?}: {q:?} {o:?}");
        if args[0] != "bench" {
            assert_eq!(o.out, q.out, "stdout of {args:?}");
        }
    }
    let o = ours(
        dir,
        &["io", "-r", "-U", "-c", "read -q -P 7 0 64k", "h.qcow2"],
    );
    assert_eq!((o.out.as_str(), o.err.as_str(), o.code), ("", "", 0));
    assert_eq!(ours_check(dir, &["-U", "h.qcow2"]).code, 0);

    // -U with a write is refused as QEMU refuses it.
    for (prog, args) in [
        ("qemu-img", &["check", "-U", "-r", "leaks", "h.qcow2"][..]),
        ("qemu-img", &["bench", "-U", "-w", "-c", "1", "h.qcow2"]),
        ("qemu-img", &["resize", "-U", "h.qcow2", "2M"]),
        (
            "qemu-img",
            &["amend", "-U", "-o", "lazy_refcounts=on", "h.qcow2"],
        ),
        (
            "qemu-img",
            &["create", "-U", "-f", "qcow2", "h.qcow2", "2M"],
        ),
        ("qemu-io", &["-U", "-c", "read -q 0 4k", "h.qcow2"]),
    ] {
        let full: Vec<&str> = if prog == "qemu-io" {
            std::iter::once("io").chain(args.iter().copied()).collect()
        } else {
            args.to_vec()
        };
        let o = same_failure(dir, prog, args, &full);
        assert_eq!(o.code, 1, "{args:?}");
    }
    let o = ours(dir, &["io", "-U", "-c", "read -q 0 4k", "h.qcow2"]);
    assert_eq!(
        o.err,
        "qcow2-img: can't open device h.qcow2: force-share=on can only be used with read-only images\n"
    );

    drop(_holder);
    assert!(
        before == hash(&dir.join("h.qcow2")),
        "the held image was modified"
    );
}

#[test]
fn our_writer_blocks_qemu() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_image(dir, "h.qcow2");
    let before = hash(&dir.join("h.qcow2"));
    let holder = our_holder(dir, &[], "h.qcow2");

    let r = qemu(dir, "qemu-io", &["-c", "write -P 1 0 4k", "h.qcow2"]);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        "qcow2-img: can't open device h.qcow2: Failed to get \"write\" lock\n\
         Is another process using the image [h.qcow2]?\n"
    );
    let r = qemu(dir, "qemu-img", &["check", "-r", "all", "h.qcow2"]);
    assert_eq!(r.code, 1);
    let r = qemu(dir, "qemu-img", &["info", "h.qcow2"]);
    assert_eq!(
        (r.err.as_str(), r.code),
        (
            "qcow2-img: Could not open 'h.qcow2': Failed to get shared \"write\" lock\n\
             Is another process using the image [h.qcow2]?\n",
            1
        )
    );
    // -U readers get in.
    qemu_ok(dir, "qemu-img", &["info", "-U", "h.qcow2"]);
    qemu_ok(
        dir,
        "qemu-io",
        &["-r", "-U", "-c", "read -q -P 7 0 64k", "h.qcow2"],
    );
    // So do ours, while a second open of ours is refused as QEMU's is.
    let o = ours(
        dir,
        &["io", "-r", "-U", "-c", "read -q -P 7 0 64k", "h.qcow2"],
    );
    assert_eq!(o.code, 0, "{o:?}");
    let o = ours(dir, &["resize", "h.qcow2", "2M"]);
    assert_eq!(o.code, 1);
    drop(holder);
    assert!(
        before == hash(&dir.join("h.qcow2")),
        "the held image was modified"
    );
    // Once the holder is gone, writers get in again.
    qemu_ok(dir, "qemu-io", &["-c", "write -q -P 1 0 4k", "h.qcow2"]);
}

#[test]
fn readers_coexist_and_block_writers() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_image(dir, "h.qcow2");
    let before = hash(&dir.join("h.qcow2"));
    let write = "Failed to get \"write\" lock\nIs another process using the image [h.qcow2]?\n";
    {
        let _holder = qemu_holder(dir, &["-r"], "h.qcow2");
        // Readers of both kinds get in.
        let o = ours(dir, &["io", "-r", "-c", "read -q -P 7 0 64k", "h.qcow2"]);
        assert_eq!(o.code, 0, "{o:?}");
        assert_eq!(ours(dir, &["info", "h.qcow2"]).code, 0);
        assert_eq!(ours_check(dir, &["h.qcow2"]).code, 0);
        // Writers do not.
        let o = same_failure(
            dir,
            "qemu-img",
            &["resize", "h.qcow2", "2M"],
            &["resize", "h.qcow2", "2M"],
        );
        assert_eq!(
            o.err,
            format!("qcow2-img: Could not open 'h.qcow2': {write}")
        );
        let o = ours(dir, &["io", "-c", "write 0 4k", "h.qcow2"]);
        assert_eq!(
            o.err,
            format!("qcow2-img: can't open device h.qcow2: {write}")
        );
    }
    {
        let _holder = our_holder(dir, &["-r"], "h.qcow2");
        qemu_ok(
            dir,
            "qemu-io",
            &["-r", "-c", "read -q -P 7 0 64k", "h.qcow2"],
        );
        qemu_ok(dir, "qemu-img", &["info", "h.qcow2"]);
        let r = qemu(dir, "qemu-io", &["-c", "write 0 4k", "h.qcow2"]);
        assert_eq!(
            r.err,
            format!("qcow2-img: can't open device h.qcow2: {write}")
        );
        assert_eq!(r.code, 1);
    }
    assert!(
        before == hash(&dir.join("h.qcow2")),
        "the held image was modified"
    );
}

#[test]
fn force_share_holder_blocks_nobody() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_image(dir, "h.qcow2");
    {
        let _holder = qemu_holder(dir, &["-r", "-U"], "h.qcow2");
        let o = ours(dir, &["io", "-c", "write -q -P 9 0 4k", "h.qcow2"]);
        assert_eq!((o.err.as_str(), o.code), ("", 0));
    }
    let _holder = our_holder(dir, &["-r", "-U"], "h.qcow2");
    qemu_ok(dir, "qemu-io", &["-c", "write -q -P 8 4k 4k", "h.qcow2"]);
    qemu_ok(
        dir,
        "qemu-io",
        &["-r", "-c", "read -q -P 9 0 4k", "h.qcow2"],
    );
}

#[test]
fn locking_off_and_its_option_errors() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_image(dir, "h.qcow2");
    let _holder = qemu_holder(dir, &[], "h.qcow2");
    for (ro, opts) in [
        (false, "driver=qcow2,file.filename=h.qcow2,file.locking=off"),
        (
            true,
            "file.filename=h.qcow2,file.locking=off,force-share=on",
        ),
        (
            false,
            "driver=qcow2,file.filename=h.qcow2,file.locking=bogus",
        ),
        (false, "driver=qcow2,file.filename=h.qcow2,file.locking=on"),
        (true, "driver=qcow2,file.filename=h.qcow2,file.locking=auto"),
        (false, "driver=qcow2,file.filename=h.qcow2,force-share=on"),
        (true, "driver=qcow2,file.filename=h.qcow2,force-share=on"),
        (
            false,
            "driver=qcow2,file.filename=h.qcow2,force-share=maybe",
        ),
    ] {
        let mut args = vec!["--image-opts", "-c", "read -q -P 7 0 4k", opts];
        if ro {
            args.insert(0, "-r");
        }
        let mut full = vec!["io"];
        full.extend_from_slice(&args);
        let q = qemu(dir, "qemu-io", &args);
        let o = ours(dir, &full);
        assert_eq!((o.out, o.err, o.code), (q.out, q.err, q.code), "{opts}");
    }
}

#[test]
fn held_backing_and_data_files_block_like_qemu() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    make_image(dir, "base.qcow2");
    qemu_ok(
        dir,
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
            "top.qcow2",
        ],
    );
    qemu_ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw",
            "h.qcow2",
            "1M",
        ],
    );
    std::fs::copy(dir.join("h.qcow2"), dir.join("h2.qcow2")).unwrap();
    let _base = qemu_holder(dir, &[], "base.qcow2");
    let _data = qemu_holder(dir, &[], "h2.qcow2");
    for img in ["top.qcow2", "h.qcow2"] {
        for args in [&["map", img][..], &["check", img]] {
            let o = same_failure(dir, "qemu-img", args, args);
            assert_eq!(o.code, 1, "{args:?}");
        }
        for args in [
            &["-c", "write 0 4k", img][..],
            &["-r", "-c", "read 0 4k", img],
        ] {
            let mut full = vec!["io"];
            full.extend_from_slice(args);
            same_failure(dir, "qemu-io", args, &full);
        }
    }
    let o = ours(dir, &["map", "top.qcow2"]);
    assert_eq!(
        o.err,
        "qcow2-img: Could not open 'top.qcow2': Could not open backing file: Failed to get \
         shared \"write\" lock\nIs another process using the image [base.qcow2]?\n"
    );
    // With -U the chain opens.
    assert_eq!(ours(dir, &["map", "-U", "top.qcow2"]).code, 0);
}

/// Two opens in one process exclude each other like two processes
/// (open-file-description locks), in the library.
#[test]
fn library_opens_exclude_each_other() {
    let d = scratch();
    let path = d.path().join("l.qcow2");
    qcow2kit::create::create(&path, &qcow2kit::CreateOptions::new(), 1 << 20).unwrap();
    let rw = Image::open(&path, &OpenOptions::new()).unwrap();
    let ro = OpenOptions::new().read_only(true);
    match Image::open(&path, &ro).as_ref().map_err(Error::inner) {
        Err(e @ Error::Lock(_)) => assert_eq!(
            e.qemu_message(),
            format!(
                "Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
                path.display()
            )
        ),
        other => panic!("expected a lock error, got {other:?}"),
    }
    Image::open(&path, &ro.clone().force_share(true)).unwrap();
    Image::open(&path, &ro.clone().locking(Locking::Off)).unwrap();
    // Creating over it is refused and leaves it alone.
    let r = qcow2kit::create::create(&path, &qcow2kit::CreateOptions::new(), 2 << 20);
    assert!(matches!(r, Err(Error::Lock(_))), "{r:?}");
    assert_eq!(rw.size(), 1 << 20);
    drop(rw);
    let r1 = Image::open(&path, &ro).unwrap();
    let r2 = Image::open(&path, &ro).unwrap();
    assert!(matches!(
        Image::open(&path, &OpenOptions::new())
            .as_ref()
            .map_err(Error::inner),
        Err(Error::Lock(_))
    ));
    drop((r1, r2));
    let e = Image::open(&path, &OpenOptions::new().force_share(true)).unwrap_err();
    assert_eq!(
        e.qemu_message(),
        "force-share=on can only be used with read-only images"
    );
    let o = OpenOptions::from_qemu_str("file.filename=x,file.locking=off,force-share=on").unwrap();
    assert_eq!((o.get_locking(), o.get_force_share()), (Locking::Off, true));
    assert_eq!(
        OpenOptions::from_qemu_str("file.locking=maybe")
            .unwrap_err()
            .to_string(),
        "invalid parameter value: maybe"
    );
}
