//! Storage backends under the qcow2 layer (`file.driver=null-co|nbd|quorum|blkdebug` in
//! `--image-opts`), against qemu-io 10 where it has an opinion (cli.md §25), and against
//! real NBD servers (qemu-nbd, nbdkit) started by the tests on Unix sockets.

#[path = "../support/mod.rs"]
mod support;

mod chain;
mod events;
mod nbd;
mod quorum;

use qcow2kit::storage::{
    BackendSpec, MemStorage, QuorumConfig, QuorumStorage, ReadPattern, Storage,
};
use qcow2kit::{Event, QuorumOpType};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use support::*;

/// A server process the test started; killed (by its handle) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(prog: &str) -> bool {
    let ok = Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping: {prog} not found");
    }
    ok
}

/// Starts `cmd` and waits until `sock` accepts connections.
fn serve(mut cmd: Command, sock: &Path) -> Server {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start server");
    let server = Server(child);
    for _ in 0..2000 {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return server;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("server on {} never came up", sock.display());
}

/// q.qcow2: 1 MiB, `write -P 0x11 0 64k` (as in cli.md §25).
fn base_image(dir: &Path, name: &str) {
    qemu_create(dir, name, "1M");
    qemu_ok(dir, "qemu-io", &["-c", "write -P 0x11 0 64k", name]);
}

fn nbd_opts(sock: &Path) -> String {
    format!(
        "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={}",
        sock.display()
    )
}

#[test]
fn null_co_under_qcow2_and_option_errors_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|_| {});
    for opts in [
        "driver=qcow2,file.driver=null-co,file.size=1G",
        "driver=qcow2,file.driver=null-aio,file.size=1M,file.read-zeroes=on",
        "driver=qcow2,file.driver=null-co,file.bogus=1",
    ] {
        io_twin(
            qd.path(),
            od.path(),
            &["--image-opts"],
            &["read 0 512"],
            &[opts],
        );
    }
}

#[test]
fn null_storage_drops_writes_and_refuses_past_its_size() {
    let spec = BackendSpec {
        driver: "null-co".into(),
        options: vec![
            ("size".into(), "1M".into()),
            ("latency-ns".into(), "0".into()),
        ],
    };
    let s = qcow2kit::storage::open_from_options(&spec, false).unwrap();
    assert_eq!(s.len().unwrap(), 1 << 20);
    s.write_at(&[7; 4096], 0).unwrap();
    let mut b = [0xab; 4096];
    s.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0; 4096]);
    assert_eq!(
        s.read_at(&mut b, 1 << 20).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
}

#[test]
fn nbd_client_over_qemu_nbd_reads_writes_and_leaves_a_clean_image() {
    if !have_qemu() || !have("qemu-nbd") {
        return;
    }
    let d = scratch();
    let dir = d.path();
    base_image(dir, "q.qcow2");
    std::fs::copy(dir.join("q.qcow2"), dir.join("ref.qcow2")).unwrap();
    // Room for allocating writes: the export has a fixed size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("q.qcow2"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let sock = dir.join("s.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-t", "-f", "raw", "-k"])
        .arg(&sock)
        .arg(dir.join("q.qcow2"));
    let server = serve(cmd, &sock);
    let cmds = [
        "read -P 0x11 0 64k",
        "write -P 0x22 64k 64k",
        "write -P 0x33 512k 4k",
        "read -P 0x22 64k 64k",
        "discard 0 64k",
        "read -P 0 0 64k",
    ];
    let r = ours(
        dir,
        &io_args(&["io", "--image-opts"], &cmds, &[&nbd_opts(&sock)]),
    );
    assert_eq!(r.code, 0, "{r:?}");
    drop(server);
    // The same commands on a local twin give the same data; check on the file is clean.
    qemu_ok(dir, "qemu-io", &io_args(&[], &cmds, &["ref.qcow2"]));
    qemu_ok(dir, "qemu-img", &["check", "q.qcow2"]);
    let cmp = qemu(dir, "qemu-img", &["compare", "q.qcow2", "ref.qcow2"]);
    assert_eq!(cmp.out, "Images are identical.\n", "{cmp:?}");
}

#[test]
fn nbd_allocating_write_past_the_export_fails_with_einval_like_qemu_io() {
    if !have_qemu() || !have("qemu-nbd") {
        return;
    }
    let (qd, od) = twin_dirs(|d| base_image(d, "q.qcow2"));
    let mut servers = Vec::new();
    for d in [qd.path(), od.path()] {
        let sock = d.join("s.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-t", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(d.join("q.qcow2"));
        servers.push(serve(cmd, &sock));
    }
    let opts = "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=s.sock";
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &[
            "read -P 0x11 0 64k",
            "write -P 0x22 64k 64k",
            "read -P 0 64k 64k",
        ],
        &[opts],
    );
}

#[test]
fn nbd_option_errors_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|_| {});
    for opts in [
        "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=s.sock",
        "driver=qcow2,file.driver=nbd,file.server.type=unix",
        "driver=qcow2,file.driver=nbd,file.server.type=bogus,file.server.path=s.sock",
        "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=s.sock,file.reconnect-delay=soon",
        "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=s.sock,file.open-timeout=1x",
    ] {
        io_twin(
            qd.path(),
            od.path(),
            &["--image-opts"],
            &["read 0 512"],
            &[opts],
        );
    }
}

#[test]
fn nbd_client_over_nbdkit_file_and_memory() {
    if !have_qemu() || !have("nbdkit") {
        return;
    }
    let d = scratch();
    let dir = d.path();
    base_image(dir, "q.qcow2");
    std::fs::copy(dir.join("q.qcow2"), dir.join("ref.qcow2")).unwrap();
    let sock = dir.join("k.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(dir.join("q.qcow2"));
    let server = serve(cmd, &sock);
    let cmds = [
        "read -P 0x11 0 64k",
        "write -P 0x44 0 4k",
        "read -P 0x44 0 4k",
    ];
    let r = ours(
        dir,
        &io_args(&["io", "--image-opts"], &cmds, &[&nbd_opts(&sock)]),
    );
    assert_eq!(r.code, 0, "{r:?}");
    drop(server);
    qemu_ok(dir, "qemu-io", &io_args(&[], &cmds, &["ref.qcow2"]));
    qemu_ok(dir, "qemu-img", &["check", "q.qcow2"]);
    let cmp = qemu(dir, "qemu-img", &["compare", "q.qcow2", "ref.qcow2"]);
    assert_eq!(cmp.out, "Images are identical.\n", "{cmp:?}");

    // nbdkit memory: an empty export is not a qcow2 image, as for qemu-io.
    let msock = dir.join("m.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(&msock).args(["memory", "1M"]);
    let _mem = serve(cmd, &msock);
    let r = ours(
        dir,
        &io_args(
            &["io", "--image-opts"],
            &["read 0 512"],
            &[&nbd_opts(&msock)],
        ),
    );
    assert_eq!(
        r.err,
        "qcow2-img: can't open: Image is not in qcow2 format\n"
    );
}

const QUORUM: &str = "driver=qcow2,file.driver=quorum,file.vote-threshold=2,\
file.children.0.driver=file,file.children.0.filename=A.qcow2,\
file.children.1.driver=file,file.children.1.filename=B.qcow2,\
file.children.2.driver=file,file.children.2.filename=C.qcow2";

fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[!b[0]], offset).unwrap();
}

fn quorum_files(d: &Path) {
    base_image(d, "A.qcow2");
    std::fs::copy(d.join("A.qcow2"), d.join("B.qcow2")).unwrap();
    std::fs::copy(d.join("A.qcow2"), d.join("C.qcow2")).unwrap();
    // The data cluster of guest 0 is at host 0x50000.
    flip(&d.join("B.qcow2"), 0x50000 + 100);
}

#[test]
fn quorum_outvotes_one_bad_child_like_qemu_io_and_rewrites_it() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(quorum_files);
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &["read -P 0x11 0 64k"],
        &[QUORUM],
    );
    let a = std::fs::read(od.path().join("A.qcow2")).unwrap();
    assert_ne!(a, std::fs::read(od.path().join("B.qcow2")).unwrap());
    let rw = format!("{QUORUM},file.rewrite-corrupted=on");
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &["read -P 0x11 0 64k"],
        &[&rw],
    );
    assert_eq!(a, std::fs::read(od.path().join("B.qcow2")).unwrap());
    // Writes go to every child.
    let w = ours(
        od.path(),
        &io_args(&["io", "--image-opts"], &["write -P 0x55 0 4k"], &[QUORUM]),
    );
    assert_eq!(w.code, 0, "{w:?}");
    for f in ["A.qcow2", "B.qcow2", "C.qcow2"] {
        qemu_ok(od.path(), "qemu-io", &["-c", "read -P 0x55 0 4k", f]);
    }
}

/// Like [`quorum_files`], but A is bad in the data cluster's first sector and B in
/// its second: each sector alone has a majority, a request covering both does not.
fn quorum_two_bad_files(d: &Path) {
    base_image(d, "A.qcow2");
    std::fs::copy(d.join("A.qcow2"), d.join("B.qcow2")).unwrap();
    std::fs::copy(d.join("A.qcow2"), d.join("C.qcow2")).unwrap();
    flip(&d.join("A.qcow2"), 0x50000 + 100);
    flip(&d.join("B.qcow2"), 0x50000 + 1000);
}

#[test]
fn quorum_votes_over_the_whole_request_like_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(quorum_two_bad_files);
    // The cluster's read has three versions (no two agree over the whole request):
    // EIO. Each sector alone has two equal copies; the rest all three.
    let r = io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &[
            "read -P 0x11 0 64k",
            "read -P 0x11 0 512",
            "read -P 0x11 512 512",
            "read -P 0x11 1k 1k",
        ],
        &[QUORUM],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.out.starts_with("read failed: Input/output error\n"),
        "{r:?}"
    );
    // rewrite-corrupted rewrites the whole request on the losers: the 512-byte
    // read repairs A's first sector (A then equals C), the cluster's read then wins
    // and rewrites all of B's cluster. All three files end up identical.
    let rw = format!("{QUORUM},file.rewrite-corrupted=on");
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &[
            "read -P 0x11 0 64k",
            "read -P 0x11 0 512",
            "read -P 0x11 0 64k",
        ],
        &[&rw],
    );
    for d in [qd.path(), od.path()] {
        let c = std::fs::read(d.join("C.qcow2")).unwrap();
        assert_eq!(std::fs::read(d.join("A.qcow2")).unwrap(), c);
        assert_eq!(std::fs::read(d.join("B.qcow2")).unwrap(), c);
    }
}

#[test]
fn quorum_fifo_and_blkverify_under_qcow2_like_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(quorum_two_bad_files);
    // fifo reads the first child only: A's bad byte shows.
    let fifo = "driver=qcow2,file.driver=quorum,file.vote-threshold=1,file.read-pattern=fifo,\
file.children.0.driver=file,file.children.0.filename=A.qcow2,\
file.children.1.driver=file,file.children.1.filename=C.qcow2";
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &["read -P 0x11 0 64k", "read -P 0x11 512 512"],
        &[fifo],
    );
    // blkverify: requests where A and C agree succeed; a mismatch makes QEMU exit
    // (`quorum: offset=... contents mismatch at offset ...`), ours fails the request
    // with EIO (README): both exit 1 after the same first request.
    let verify = "driver=qcow2,file.driver=quorum,file.vote-threshold=2,file.blkverify=on,\
file.children.0.driver=file,file.children.0.filename=A.qcow2,\
file.children.1.driver=file,file.children.1.filename=C.qcow2";
    let args = io_args(
        &["--image-opts"],
        &["read -P 0x11 512 512", "read -P 0x11 0 512"],
        &[verify],
    );
    let q = qemu(qd.path(), "qemu-io", &args);
    let mut full = vec!["io"];
    full.extend_from_slice(&args);
    let o = ours(od.path(), &full);
    assert_eq!((q.code, o.code), (1, 1), "{q:?} {o:?}");
    assert_eq!(o.out.lines().next(), q.out.lines().next(), "{q:?} {o:?}");
    assert!(q.err.contains("contents mismatch"), "{q:?}");
    assert!(o.out.contains("read failed: Input/output error"), "{o:?}");
}

#[test]
fn quorum_option_errors_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(quorum_files);
    for opts in [
        QUORUM.replace("vote-threshold=2", "vote-threshold=4"),
        QUORUM.replace("file.vote-threshold=2,", ""),
        QUORUM.replace("C.qcow2", "nosuch.qcow2"),
    ] {
        io_twin(
            qd.path(),
            od.path(),
            &["--image-opts"],
            &["read 0 512"],
            &[&opts],
        );
    }
}

fn quorum_of(
    children: Vec<Arc<dyn Storage>>,
    threshold: usize,
    pattern: ReadPattern,
) -> QuorumStorage {
    let cfg = QuorumConfig {
        threshold,
        rewrite_corrupted: false,
        read_pattern: pattern,
        blkverify: false,
        children: Vec::new(),
        node_name: None,
    };
    QuorumStorage::from_children(cfg, children)
}

#[test]
fn quorum_below_threshold_fails_and_reports_the_children() {
    let mk = |b: u8| -> Arc<dyn Storage> { Arc::new(MemStorage::from_bytes(vec![b; 4096])) };
    let q = quorum_of(vec![mk(1), mk(1), mk(2)], 2, ReadPattern::Quorum);
    let mut buf = [0u8; 1024];
    q.read_at(&mut buf, 1024).unwrap();
    assert_eq!(buf, [1; 1024]);
    assert_eq!(
        q.take_events(),
        [Event::QuorumReportBad {
            kind: QuorumOpType::Read,
            error: None,
            node_name: "#quorum.children.2".into(),
            sector_num: 2,
            sectors_count: 2,
        }]
    );
    // Three different versions: no majority of 2.
    let q = quorum_of(vec![mk(1), mk(2), mk(3)], 2, ReadPattern::Quorum);
    assert_eq!(
        q.read_at(&mut buf, 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(
        q.take_events(),
        [Event::QuorumFailure {
            reference: "#quorum".into(),
            sector_num: 0,
            sectors_count: 2,
        }]
    );
    // fifo reads the first child.
    let q = quorum_of(vec![mk(3), mk(2)], 1, ReadPattern::Fifo);
    q.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [3; 1024]);
    // A write succeeds when enough children take it.
    let full: Arc<dyn Storage> = Arc::new(MemStorage::with_limit(vec![0; 512], 512));
    let q = quorum_of(vec![mk(0), mk(0), full.clone()], 2, ReadPattern::Quorum);
    q.write_at(&[9; 4096], 4096).unwrap();
    let q = quorum_of(vec![mk(0), full.clone(), full], 2, ReadPattern::Quorum);
    assert!(q.write_at(&[9; 4096], 4096).is_err());
}

fn blkdebug_files(d: &Path) {
    qemu_create(d, "F.qcow2", "1M");
    qemu_ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x11 128k 64k",
            "F.qcow2",
        ],
    );
    std::fs::write(
        d.join("C.conf"),
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nonce = \"on\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("E.conf"),
        "# fail reads of the data cluster of guest 0\n[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"640\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("B.conf"),
        "[inject-error]\nevent = \"read_aio\"\nbogus = \"1\"\n",
    )
    .unwrap();
}

#[test]
fn blkdebug_storage_level_rules_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(blkdebug_files);
    let img = |conf: &str| {
        format!("driver=qcow2,file.driver=blkdebug,file.config={conf},file.image.filename=F.qcow2")
    };
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &[
            "write -P 0x22 0 4k",
            "write -P 0x22 0 4k",
            "read -P 0x22 0 4k",
        ],
        &[&img("C.conf")],
    );
    // Inline rules work like the config file's.
    let inline = "driver=qcow2,file.driver=blkdebug,file.image.filename=F.qcow2,\
file.inject-error.0.event=write_aio,file.inject-error.0.sector=640";
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &[
            "write -P 0x22 128k 4k",
            "write -P 0x22 0 4k",
            "write -P 0x22 4k 4k",
        ],
        &[inline],
    );
}

#[test]
fn blkdebug_option_errors_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(blkdebug_files);
    for opts in [
        "driver=qcow2,file.driver=blkdebug,file.config=nosuch.conf,file.image.filename=F.qcow2",
        "driver=qcow2,file.driver=blkdebug,file.config=C.conf",
        "driver=qcow2,file.driver=blkdebug,file.config=B.conf,file.image.filename=F.qcow2",
        "driver=qcow2,file.driver=blkdebug,file.inject-error.0.event=bogus_event,file.image.filename=F.qcow2",
        "driver=qcow2,file.driver=blkdebug,file.align=3000,file.image.filename=F.qcow2",
        "driver=qcow2,file.driver=blkdebug,file.align=4096,file.max-transfer=1000,file.image.filename=F.qcow2",
    ] {
        io_twin(qd.path(), od.path(), &["--image-opts"], &["read 0 512"], &[opts]);
    }
}

/// `align` and `max-transfer`: unaligned guest requests and metadata updates go
/// through read-modify-write and give QEMU's data and `check` result.
#[test]
fn blkdebug_align_and_max_transfer_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let cmds = [
        "write -P 0x22 100 1000",
        "read -P 0x22 100 1000",
        "write -P 0x33 300k 70k",
        "read -P 0x33 300k 70k",
        "read -P 0x11 0 4k",
    ];
    for extra in [
        "file.align=4096",
        "file.align=512,file.max-transfer=4096",
        "file.max-transfer=1000",
    ] {
        let (qd, od) = twin_dirs(blkdebug_files);
        let o = format!("driver=qcow2,file.driver=blkdebug,file.image.filename=F.qcow2,{extra}");
        io_twin(qd.path(), od.path(), &["--image-opts"], &cmds, &[&o]);
        let qc = qemu(qd.path(), "qemu-img", &["check", "F.qcow2"]);
        let oc = qemu(od.path(), "qemu-img", &["check", "F.qcow2"]);
        assert_eq!((oc.out, oc.code), (qc.out, qc.code), "check: {extra}");
    }
}

#[test]
fn quorum_fifo_falls_over_on_eio_and_blkverify_fails_on_a_mismatch() {
    let mk = |b: u8| -> Arc<dyn Storage> { Arc::new(MemStorage::from_bytes(vec![b; 4096])) };
    // A child whose reads fail with EIO (a null device too small for the read).
    let broken: Arc<dyn Storage> = Arc::new(qcow2kit::storage::NullStorage::new(0));
    let q = quorum_of(vec![broken.clone(), mk(4)], 1, ReadPattern::Fifo);
    let mut buf = [0u8; 512];
    q.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [4; 512]);
    assert_eq!(
        q.take_events(),
        [Event::QuorumReportBad {
            kind: QuorumOpType::Read,
            error: Some("Input/output error".into()),
            node_name: "#quorum.children.0".into(),
            sector_num: 0,
            sectors_count: 1,
        }]
    );
    // blkverify: two children that must agree; a mismatch fails the read.
    let cfg = QuorumConfig {
        threshold: 2,
        rewrite_corrupted: false,
        read_pattern: ReadPattern::Quorum,
        blkverify: true,
        children: Vec::new(),
        node_name: None,
    };
    let q = QuorumStorage::from_children(cfg.clone(), vec![mk(1), mk(1)]);
    q.read_at(&mut buf, 0).unwrap();
    let q = QuorumStorage::from_children(cfg, vec![mk(1), mk(2)]);
    assert_eq!(
        q.read_at(&mut buf, 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
}
