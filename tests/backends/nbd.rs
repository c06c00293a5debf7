//! The nbd client against real servers: block status (`base:allocation`) for
//! map and convert, reconnect within `reconnect-delay` while qemu-nbd is killed
//! and restarted, and `request-timeout`.

use super::support::*;
use super::{have, serve, Server};
use qcow2kit::storage::{open_from_options, BackendSpec, NbdConfig, NbdStorage, Storage};
use qcow2kit::{Image, OpenOptions};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `qemu-nbd -t` exporting `file` raw (read-only unless `rw`) on `dir/sock`.
fn qemu_nbd(dir: &Path, sock: &str, file: &str, rw: bool) -> Server {
    let s = dir.join(sock);
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-t", "-f", "raw"]);
    if !rw {
        cmd.arg("-r");
    }
    cmd.arg("-k").arg(&s).arg(dir.join(file));
    serve(cmd, &s)
}

fn nbd_spec(sock: &Path, extra: &[(&str, &str)]) -> BackendSpec {
    let mut options = vec![
        ("server.type".to_owned(), "unix".to_owned()),
        ("server.path".to_owned(), sock.display().to_string()),
    ];
    options.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    BackendSpec {
        driver: "nbd".into(),
        options,
    }
}

/// base.raw: 1 MiB, data in [0, 64k) and [512k, 576k), holes elsewhere; top.qcow2
/// over it with the backing name `nbd+unix:///?socket=b.sock` (format raw) and
/// one cluster of its own.
fn raw_backed(d: &Path) {
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(d.join("base.raw")).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[0x11; 65536], 0).unwrap();
        f.write_all_at(&[0x22; 65536], 512 << 10).unwrap();
    }
    qemu_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nbd+unix:///?socket=b.sock",
            "-F",
            "raw",
            "top.qcow2",
            "1M",
        ],
    );
}

/// `map` of an image whose raw backing file is an NBD export: the backing
/// layer's extents come from `NBD_CMD_BLOCK_STATUS`, as in qemu-img; convert
/// skips the holes as qemu-img does.
#[test]
fn nbd_block_status_drives_map_and_convert_like_qemu_img() {
    if !have_qemu() || !have("qemu-nbd") {
        return;
    }
    let (qd, od) = twin_dirs(raw_backed);
    let _servers = [
        qemu_nbd(qd.path(), "b.sock", "base.raw", false),
        qemu_nbd(od.path(), "b.sock", "base.raw", false),
    ];
    for d in [qd.path(), od.path()] {
        qemu_ok(d, "qemu-io", &["-c", "write -P 0x33 256k 64k", "top.qcow2"]);
    }
    for fmt in ["--output=json", "--output=human"] {
        let (q, o) = twins(
            qd.path(),
            od.path(),
            "qemu-img",
            &[],
            &["map", fmt, "top.qcow2"],
        );
        assert_eq!(q.code, 0, "{q:?}");
        let _ = o;
    }
    // The export's holes are reported as such (not "all data").
    let q = qemu_ok(
        qd.path(),
        "qemu-img",
        &["map", "--output=json", "top.qcow2"],
    );
    assert!(q.out.contains("\"data\": false"), "{}", q.out);

    // The storage itself: runs tile the export and match the file's holes.
    let s = open_from_options(&nbd_spec(&od.path().join("b.sock"), &[]), true).unwrap();
    let mut runs = Vec::new();
    let mut pos = 0;
    while pos < 1 << 20 {
        let (data, n) = s.data_extent(pos, (1 << 20) - pos).unwrap();
        assert!(n > 0);
        runs.push((data, pos, n));
        pos += n;
    }
    assert!(runs.contains(&(true, 0, 65536)), "{runs:?}");
    assert!(s.is_hole(128 << 10, 64 << 10).unwrap());
    assert!(!s.is_hole(0, 4096).unwrap());
    assert!(!s.is_hole(500 << 10, 64 << 10).unwrap());
    // Past the end is a hole.
    assert_eq!(s.data_extent(2 << 20, 512).unwrap(), (false, 512));
    drop(s);

    // convert over the nbd backing: same result as qemu-img's, holes left
    // unallocated.
    let (q, o) = twins(
        qd.path(),
        od.path(),
        "qemu-img",
        &[],
        &["convert", "-O", "qcow2", "top.qcow2", "out.qcow2"],
    );
    assert_eq!((q.code, o.code), (0, 0));
    let qm = qemu_ok(
        qd.path(),
        "qemu-img",
        &["map", "--output=json", "out.qcow2"],
    );
    let om = qemu_ok(
        od.path(),
        "qemu-img",
        &["map", "--output=json", "out.qcow2"],
    );
    assert_eq!(qm.out, om.out);
    let cmp = qemu(
        od.path(),
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "out.qcow2",
            "top.qcow2",
        ],
    );
    assert_eq!(cmp.code, 0, "{cmp:?}");
}

/// An image on qemu-nbd, written from a thread while the server is killed and
/// restarted on the same socket: with `reconnect-delay` every write succeeds
/// (the ones in flight are sent again), none is lost, and the image is clean.
#[test]
fn nbd_reconnect_within_the_delay_loses_no_acknowledged_write() {
    if !have_qemu() || !have("qemu-nbd") {
        return;
    }
    let d = scratch();
    let dir = d.path();
    qemu_create(dir, "q.qcow2", "1M");
    // Room for allocating writes: the export has a fixed size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("q.qcow2"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let sock = dir.join("s.sock");
    let mut server = Some(qemu_nbd(dir, "s.sock", "q.qcow2", true));
    let cfg = NbdConfig::parse(&nbd_spec(&sock, &[("reconnect-delay", "60")])).unwrap();
    let nbd = Arc::new(NbdStorage::connect(&cfg).unwrap());
    let img = Arc::new(Image::open_storage(nbd.clone(), &OpenOptions::new()).unwrap());

    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (img, done, stop) = (img.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut model = vec![0u8; 1 << 20];
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let off = (i * 7 % 256) * 4096;
                let byte = (i % 251) as u8 + 1;
                img.write_at(&[byte; 4096], off as u64)
                    .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
                model[off..off + 4096].fill(byte);
                if i % 16 == 15 {
                    img.flush()
                        .unwrap_or_else(|e| panic!("flush after {i} failed: {e}"));
                }
                i += 1;
                done.store(i, Ordering::SeqCst);
            }
            img.flush().unwrap();
            let mut back = vec![0u8; 1 << 20];
            img.read_at(&mut back, 0).unwrap();
            assert!(back == model, "read back differs from what was written");
            model
        })
    };
    let wait_for = |n: usize| {
        let t = Instant::now();
        while done.load(Ordering::SeqCst) < n {
            assert!(t.elapsed() < Duration::from_secs(120), "writer stuck");
            assert!(!writer.is_finished(), "writer died");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for round in 0..2 {
        wait_for(done.load(Ordering::SeqCst) + 40);
        drop(server.take()); // SIGKILL, mid-run
        std::thread::sleep(Duration::from_millis(300 + 200 * round));
        server = Some(qemu_nbd(dir, "s.sock", "q.qcow2", true));
    }
    wait_for(done.load(Ordering::SeqCst) + 40);
    stop.store(true, Ordering::SeqCst);
    let model = writer.join().expect("writer");
    // Both restarts were noticed (the client did not just miss them).
    assert!(nbd.reconnects() >= 2, "{}", nbd.reconnects());
    drop(img);
    drop(nbd);
    drop(server);
    qemu_ok(dir, "qemu-img", &["check", "q.qcow2"]);
    qemu_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "q.qcow2", "out.raw"],
    );
    assert!(std::fs::read(dir.join("out.raw")).unwrap() == model);
}

/// Without `reconnect-delay` a request fails (EIO) while the server is gone,
/// and the next request after the server is back connects again (QEMU's
/// reconnect-delay=0). `open-timeout` keeps trying to connect at open.
#[test]
fn nbd_without_reconnect_delay_fails_then_reconnects() {
    if !have("qemu-nbd") {
        return;
    }
    let d = scratch();
    let dir = d.path();
    std::fs::write(dir.join("a.raw"), vec![0x5a; 1 << 20]).unwrap();
    let sock = dir.join("s.sock");
    let server = qemu_nbd(dir, "s.sock", "a.raw", true);
    let s = open_from_options(&nbd_spec(&sock, &[]), false).unwrap();
    let mut b = [0u8; 4096];
    s.read_at(&mut b, 0).unwrap();
    drop(server);
    assert_eq!(
        s.read_at(&mut b, 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    let _server = qemu_nbd(dir, "s.sock", "a.raw", true);
    s.write_at(&[7; 4096], 4096).unwrap();
    s.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [7; 4096]);
    drop(s);

    // open-timeout: the server comes up after the open started.
    let sock2 = dir.join("t.sock");
    let spec = nbd_spec(&sock2, &[("open-timeout", "60")]);
    let opener =
        std::thread::spawn(move || open_from_options(&spec, true).map(|s| s.len().unwrap()));
    std::thread::sleep(Duration::from_millis(300));
    let _s2 = qemu_nbd(dir, "t.sock", "a.raw", false);
    assert_eq!(opener.join().unwrap(), Ok(1 << 20));
    // Without it, a missing server fails the open at once with QEMU's text.
    let err = open_from_options(&nbd_spec(&dir.join("none.sock"), &[]), true).unwrap_err();
    assert!(err.starts_with("Failed to connect to '"), "{err}");
}

/// `request-timeout` (ours): a server that does not answer in time fails the
/// request with EIO instead of blocking forever (nbdkit's delay filter holds
/// every read for 30 s).
#[test]
fn nbd_request_timeout_fails_a_stuck_request() {
    if !have("nbdkit") {
        return;
    }
    let d = scratch();
    let sock = d.path().join("k.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"])
        .arg(&sock)
        .args(["--filter=delay", "memory", "1M", "rdelay=30"]);
    let _server = serve(cmd, &sock);
    let s = open_from_options(&nbd_spec(&sock, &[("request-timeout", "1")]), false).unwrap();
    s.write_at(&[1; 512], 0).unwrap();
    let mut b = [0u8; 512];
    assert_eq!(
        s.read_at(&mut b, 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    // Bad values are refused with QEMU's number parser's text.
    let bad = nbd_spec(&sock, &[("reconnect-delay", "soon")]);
    assert!(open_from_options(&bad, false).is_err());
}

/// An NBD URI as the image name (`qemu-img map nbd+unix:///?socket=S`): the
/// qcow2 file exported raw by qemu-nbd. map, check and convert say what
/// qemu-img says (over NBD QEMU cannot see the file's holes, so a
/// metadata-preallocated image maps as all data, on both sides).
#[test]
fn nbd_uri_as_the_image_name_for_map_check_and_convert_like_qemu_img() {
    if !have_qemu() || !have("qemu-nbd") {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        qemu_ok(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "q.qcow2",
                "1M",
            ],
        );
        qemu_ok(d, "qemu-io", &["-c", "write -P 0x11 0 64k", "q.qcow2"]);
    });
    let _servers = [
        qemu_nbd(qd.path(), "q.sock", "q.qcow2", false),
        qemu_nbd(od.path(), "q.sock", "q.qcow2", false),
    ];
    let uri = "nbd+unix:///?socket=q.sock";
    for args in [
        &["map", "--output=json", uri][..],
        &["map", "-f", "qcow2", uri],
        &["check", uri],
        &["check", "--output=json", uri],
        &["map", "nbd+unix:///?socket=nosuch.sock"],
        &["check", "nbd+unix:///?socket=nosuch.sock"],
    ] {
        twins(qd.path(), od.path(), "qemu-img", &[], args);
    }
    let (q, o) = twins(
        qd.path(),
        od.path(),
        "qemu-img",
        &[],
        &["convert", "-O", "qcow2", uri, "out.qcow2"],
    );
    assert_eq!((q.code, o.code), (0, 0));
    let qm = qemu_ok(
        qd.path(),
        "qemu-img",
        &["map", "--output=json", "out.qcow2"],
    );
    let om = qemu_ok(
        od.path(),
        "qemu-img",
        &["map", "--output=json", "out.qcow2"],
    );
    assert_eq!(qm.out, om.out);
    qemu_ok(
        od.path(),
        "qemu-img",
        &["compare", "-U", "out.qcow2", "q.qcow2"],
    );
}
