//! `qcow2-img serve --nbd` against real clients: qemu-io, qemu-img,
//! nbdinfo and nbdcopy (libnbd) over a Unix socket and over 127.0.0.1, with
//! qemu-nbd serving a twin image as the reference; plus a small client of
//! our own for concurrent random I/O against a model and for malformed
//! handshakes and requests. Every server is started and stopped (SIGTERM)
//! by the test; every wait is bounded. Tests skip with a message when
//! qemu-img/qemu-io or nbdinfo/nbdcopy are missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2-img");
/// Upper bound on any wait for a server to come up or go down.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn have(progs: &[&str], test: &str) -> bool {
    let missing: Vec<&str> = progs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("skipping {test}: {missing:?} not found");
    }
    missing.is_empty()
}

/// What a client printed.
#[derive(Debug)]
pub(crate) struct Out {
    pub(crate) code: i32,
    pub(crate) out: String,
    pub(crate) err: String,
}

pub(crate) fn run(dir: &Path, prog: &str, args: &[&str]) -> Out {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    Out {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

pub(crate) fn ok(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = run(dir, prog, args);
    assert_eq!(o.code, 0, "{prog} {args:?}: {o:?}");
    o.out
}

/// A server process (ours or qemu-nbd), stopped with SIGTERM on drop.
pub(crate) struct Served {
    child: Option<Child>,
    log: PathBuf,
}

impl Served {
    /// Starts `prog args` in `dir` and waits until `ready(stderr log)`.
    pub(crate) fn start(
        dir: &Path,
        prog: &str,
        args: &[&str],
        ready: impl Fn(&Path, &str) -> bool,
    ) -> Self {
        let log = dir.join(format!("{}.log", args.len() + rand_suffix()));
        let child = Command::new(prog)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
        let mut s = Served {
            child: Some(child),
            log,
        };
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(&s.log).unwrap_or_default();
            if ready(dir, &text) {
                return s;
            }
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{prog} {args:?} exited early ({st}): {text}");
            }
            assert!(t0.elapsed() < WAIT, "{prog} did not come up: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ours on a Unix socket `s.sock` in `dir`.
    pub(crate) fn ours_unix(dir: &Path, extra: &[&str], file: &str) -> Self {
        let sock = dir.join("s.sock");
        let sock_s = sock.to_str().unwrap().to_owned();
        let mut args = vec!["serve", "--nbd", "--socket", sock_s.as_str()];
        args.extend_from_slice(extra);
        args.push(file);
        Self::start(dir, BIN, &args, |d, _| d.join("s.sock").exists())
    }

    /// SIGKILL, and wait for it to die.
    fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit code (bounded wait).
    pub(crate) fn stop(self) -> (i32, String) {
        self.finish(Some("-TERM"))
    }

    /// Sends `sig` if given, then waits (bounded) for the exit code.
    fn finish(mut self, sig: Option<&str>) -> (i32, String) {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        if let Some(sig) = sig {
            let _ = Command::new("kill").args([sig, &pid]).status();
        }
        let sig = sig.unwrap_or("an earlier signal");
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not stop on {sig}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (st.code().unwrap_or(-1), self.log())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rand_suffix() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(100);
    N.fetch_add(1, Ordering::SeqCst)
}

/// cli.md §24's image: 1 MiB, data at 0 and 512k, a zero cluster at 128k.
fn make_d(dir: &Path, name: &str) {
    ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", name, "1M"],
    );
    ok(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -z 128k 64k",
            "-c",
            "write -P 0x22 512k 128k",
            name,
        ],
    );
}

const URI: &str = "nbd+unix:///?socket=s.sock";

/// Status, content and the effect of writes, trims and zeroes over our
/// server equal qemu-nbd serving a twin on which the same operations ran.
#[test]
fn qemu_and_libnbd_clients_see_what_qemu_nbd_shows() {
    if !have(
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"],
        "nbd clients",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_d(d, "d.qcow2");
    make_d(d, "t.qcow2");

    let srv = Served::ours_unix(d, &[], "d.qcow2");
    // cli.md §24, verbatim.
    assert_eq!(
        ok(d, "nbdinfo", &["--map", URI]),
        "         0       65536    0  data\n     65536      458752    3  hole,zero\n    \
         524288      131072    0  data\n    655360      393216    3  hole,zero\n"
    );
    assert_eq!(
        ok(d, "nbdinfo", &["--map=qemu:allocation-depth", URI]),
        "         0       65536    1  local\n     65536       65536    0  absent\n    \
         131072       65536    1  local\n    196608      327680    0  absent\n    \
         524288      131072    1  local\n    655360      393216    0  absent\n"
    );
    assert_eq!(ok(d, "nbdinfo", &["--size", URI]), "1048576\n");
    let info = ok(d, "nbdinfo", &[URI]);
    for line in [
        "export-size: 1048576 (1M)",
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "\t\tbase:allocation\n\t\tqemu:allocation-depth\n",
    ] {
        assert!(info.contains(line), "nbdinfo lacks {line:?}:\n{info}");
    }
    let map_json = ok(d, "qemu-img", &["map", "--output=json", "-f", "raw", URI]);
    assert!(map_json.starts_with(
        "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"
    ), "{map_json}");
    assert_eq!(map_json.lines().count(), 4, "{map_json}");
    let reads = ok(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0x22 512k 128k",
            URI,
        ],
    );
    assert!(!reads.contains("fail"), "{reads}");
    // qemu-img convert and nbdcopy out of the export give the file's content.
    ok(
        d,
        "qemu-img",
        &["convert", "-U", "-O", "raw", "d.qcow2", "want.raw"],
    );
    ok(
        d,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", URI, "conv.raw"],
    );
    ok(d, "nbdcopy", &[URI, "copy.raw"]);
    let want = std::fs::read(d.join("want.raw")).unwrap();
    assert!(std::fs::read(d.join("conv.raw")).unwrap() == want);
    assert!(std::fs::read(d.join("copy.raw")).unwrap() == want);

    // The same operations over NBD and on the twin directly.
    let ops = [
        "write -P 0x33 700k 4k",
        "write -P 0x44 60k 8k",
        "discard 512k 64k",
        "write -z 256k 64k",
        "write -z 200k 4k",
        "write -P 0x55 900k 100k",
        "discard 0 64k",
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for op in &ops {
        args.extend_from_slice(&["-c", op]);
    }
    args.push(URI);
    let out = ok(d, "qemu-io", &args);
    assert!(!out.contains("failed"), "{out}");
    let mut args = vec![];
    for op in &ops {
        args.extend_from_slice(&["-c", op]);
    }
    args.push("t.qcow2");
    ok(d, "qemu-io", &args);
    // qemu-img compare reads the export against the twin file.
    let cmp = run(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", URI, "t.qcow2"],
    );
    assert_eq!(cmp.code, 0, "{cmp:?}");
    assert_eq!(cmp.out, "Images are identical.\n");
    let ours_map = ok(d, "nbdinfo", &["--map", URI]);
    let ours_depth = ok(d, "nbdinfo", &["--map=qemu:allocation-depth", URI]);
    let ours_qmap = ok(d, "qemu-img", &["map", "--output=json", "-f", "raw", URI]);
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("client 1 connected"), "{log}");
    assert!(log.contains("client 1 disconnected"), "{log}");

    // qemu-nbd on the twin (discards honoured, allocation depth on).
    let sock = d.join("s.sock");
    let reference = Served::start(
        d,
        "qemu-nbd",
        &[
            "-t",
            "-f",
            "qcow2",
            "-A",
            "--discard=unmap",
            "-k",
            sock.to_str().unwrap(),
            "t.qcow2",
        ],
        |d, _| d.join("s.sock").exists(),
    );
    // The socket file appears at bind; wait until qemu-nbd answers.
    let t0 = Instant::now();
    while run(d, "nbdinfo", &["--size", URI]).code != 0 {
        assert!(t0.elapsed() < WAIT, "qemu-nbd not answering");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ok(d, "nbdinfo", &["--map", URI]), ours_map);
    assert_eq!(
        ok(d, "nbdinfo", &["--map=qemu:allocation-depth", URI]),
        ours_depth
    );
    assert_eq!(
        ok(d, "qemu-img", &["map", "--output=json", "-f", "raw", URI]),
        ours_qmap
    );
    drop(reference.stop());

    let cmp = run(d, "qemu-img", &["compare", "d.qcow2", "t.qcow2"]);
    assert_eq!(cmp.code, 0, "{cmp:?}");
    let chk = run(d, "qemu-img", &["check", "d.qcow2"]);
    assert_eq!(chk.code, 0, "{chk:?}");
}

/// A read-only named export: flags, listing, and the errors qemu-io prints
/// for a write open and for an unknown export (cli.md §24).
#[test]
fn read_only_named_export_and_client_errors() {
    if !have(&["qemu-img", "qemu-io", "nbdinfo"], "nbd read-only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_d(d, "d.qcow2");
    let srv = Served::ours_unix(
        d,
        &["--read-only", "--export", "disk0", "--shared", "1"],
        "d.qcow2",
    );
    let u = "nbd+unix:///disk0?socket=s.sock";
    let info = ok(d, "nbdinfo", &[u]);
    for line in [
        "export=\"disk0\":",
        "is_read_only: true",
        "can_trim: false",
        "can_zero: false",
        "can_fast_zero: false",
        "can_multi_conn: false",
        "can_flush: true",
    ] {
        assert!(info.contains(line), "nbdinfo lacks {line:?}:\n{info}");
    }
    let list = ok(d, "nbdinfo", &["--list", u]);
    assert!(list.contains("export=\"disk0\":"), "{list}");
    assert!(!list.contains("content:"), "{list}");
    assert_eq!(run(d, "nbdinfo", &["--is", "read-only", u]).code, 0);
    assert_eq!(run(d, "nbdinfo", &["--can", "write", u]).code, 2);

    let w = run(d, "qemu-io", &["-f", "raw", "-c", "write 0 4k", u]);
    assert_eq!(w.code, 1, "{w:?}");
    assert_eq!(
        w.err,
        "qemu-io: can't open device nbd+unix:///disk0?socket=s.sock: Could not open image: Permission denied\n"
    );
    let n = run(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 0 4k",
            "nbd+unix:///nosuch?socket=s.sock",
        ],
    );
    assert_eq!(
        n.err,
        "qemu-io: can't open device nbd+unix:///nosuch?socket=s.sock: Requested export not available\n\
         server reported: export 'nosuch' not present\n"
    );
    let def = run(d, "nbdinfo", &[URI]);
    assert_eq!(def.code, 1);
    assert!(
        def.err.contains("server replied with error to opt_go request: No such file or directory for the default export"),
        "{def:?}"
    );
    let r = ok(
        d,
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x11 0 4k", u],
    );
    assert!(r.starts_with("read 4096/4096 bytes at offset 0\n"), "{r}");
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
}

/// Over TCP with an ephemeral port: nbdinfo, `qemu-img map` and qemu-io
/// see what they see over the Unix socket; nbdcopy and `qemu-img convert`
/// out of the export equal `qemu-img convert` of the file and `qemu-img
/// compare` agrees; nbdcopy into it writes what the file then holds.
#[test]
fn tcp_nbdcopy_round_trip() {
    if !have(&["qemu-img", "qemu-io", "nbdcopy", "nbdinfo"], "nbd tcp") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_d(d, "d.qcow2");
    let srv = Served::start(
        d,
        BIN,
        &["serve", "--nbd", "--bind", "127.0.0.1:0", "d.qcow2"],
        |_, log| log.contains(" over NBD on 127.0.0.1:"),
    );
    let log = srv.log();
    let addr = log
        .split(" over NBD on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    let uri = format!("nbd://{addr}");
    ok(
        d,
        "qemu-img",
        &["convert", "-U", "-O", "raw", "d.qcow2", "want.raw"],
    );
    ok(d, "nbdcopy", &[&uri, "got.raw"]);
    assert!(
        std::fs::read(d.join("got.raw")).unwrap() == std::fs::read(d.join("want.raw")).unwrap()
    );
    ok(
        d,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, "conv.raw"],
    );
    assert!(
        std::fs::read(d.join("conv.raw")).unwrap() == std::fs::read(d.join("want.raw")).unwrap()
    );
    let cmp = run(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, "want.raw"],
    );
    assert_eq!(
        (cmp.code, cmp.out.as_str()),
        (0, "Images are identical.\n"),
        "{cmp:?}"
    );
    // cli.md §24's map, as over the Unix socket.
    assert_eq!(
        ok(d, "nbdinfo", &["--map", &uri]),
        "         0       65536    0  data\n     65536      458752    3  hole,zero\n    \
         524288      131072    0  data\n    655360      393216    3  hole,zero\n"
    );
    let map_json = ok(d, "qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    assert_eq!(map_json.lines().count(), 4, "{map_json}");
    let reads = ok(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "write -P 0x5c 64k 4k",
            "-c",
            "read -P 0x5c 64k 4k",
            "-c",
            "read -P 0x22 512k 128k",
            &uri,
        ],
    );
    assert!(!reads.contains("fail"), "{reads}");

    // Write a pattern file into the export.
    let mut pat = vec![0u8; 1 << 20];
    for (i, b) in pat.iter_mut().enumerate() {
        *b = if (i / 65536) % 3 == 0 {
            0
        } else {
            (i % 251) as u8
        };
    }
    std::fs::write(d.join("pat.raw"), &pat).unwrap();
    ok(d, "nbdcopy", &["pat.raw", &uri]);
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    let cmp = run(
        d,
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", "d.qcow2", "pat.raw"],
    );
    assert_eq!(cmp.code, 0, "{cmp:?}");
    assert_eq!(run(d, "qemu-img", &["check", "d.qcow2"]).code, 0);
}

/// `--discard=ignore` accepts TRIM and leaves the clusters allocated (as
/// qemu-nbd does by default); `--image-opts` names the file in an option
/// string.
#[test]
fn discard_ignore_and_image_opts() {
    if !have(&["qemu-img", "qemu-io", "nbdinfo"], "nbd discard=ignore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_d(d, "d.qcow2");
    let srv = Served::ours_unix(
        d,
        &["--discard=ignore", "--image-opts"],
        "driver=qcow2,file.filename=d.qcow2",
    );
    let out = ok(d, "qemu-io", &["-f", "raw", "-c", "discard 0 64k", URI]);
    assert!(
        out.starts_with("discard 65536/65536 bytes at offset 0\n"),
        "{out}"
    );
    let map = ok(d, "nbdinfo", &["--map", URI]);
    assert!(
        map.starts_with("         0       65536    0  data\n"),
        "{map}"
    );
    assert_eq!(srv.stop().0, 0);
    let r = ok(d, "qemu-io", &["-c", "read -P 0x11 0 64k", "d.qcow2"]);
    assert!(!r.contains("fail"), "{r}");
}

/// Over a backing chain, `qemu:allocation-depth` names the layer and
/// `base:allocation` reports whole clusters (cli.md §24's overlay).
#[test]
fn backing_chain_allocation_depth() {
    if !have(&["qemu-img", "qemu-io", "nbdinfo"], "nbd backing chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
    );
    ok(d, "qemu-io", &["-c", "write -P 0x11 0 128k", "b.qcow2"]);
    ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2",
        ],
    );
    ok(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x22 64k 4k",
            "-c",
            "write -P 0x33 512k 4k",
            "o.qcow2",
        ],
    );
    let srv = Served::ours_unix(d, &["--read-only"], "o.qcow2");
    let depth = ok(d, "nbdinfo", &["--map=qemu:allocation-depth", URI]);
    let lines: Vec<&str> = depth.lines().collect();
    assert_eq!(
        lines[0], "         0       65536    2  backing depth 2",
        "{depth}"
    );
    assert_eq!(lines[1], "     65536       65536    1  local", "{depth}");
    let base = ok(d, "nbdinfo", &["--map", URI]);
    assert!(
        base.starts_with("         0      131072    0  data\n"),
        "{base}"
    );
    let r = ok(
        d,
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "read -P 0x22 64k 4k",
            "-c",
            "read -P 0x11 68k 60k",
            "-c",
            "read -P 0x33 512k 4k",
            URI,
        ],
    );
    assert!(!r.contains("fail"), "{r}");
    assert_eq!(srv.stop().0, 0);
}

/// `serve --help` names every option the parser accepts and the exit
/// codes; argument errors exit 1 with qemu-img's usage shape.
#[test]
fn serve_help_and_argument_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = run(d, BIN, &["serve", "--help"]);
    assert_eq!(h.code, 0, "{h:?}");
    for o in [
        "--nbd",
        "-k, --socket",
        "-b, --bind",
        "-r, --read-only",
        "-x, --export",
        "-e, --shared",
        "--discard=unmap|ignore",
        "-f, --format",
        "--image-opts",
        "-q, --quiet",
        "-B, --bitmap",
        "-h, --help",
    ] {
        assert!(h.out.contains(o), "serve --help lacks {o}:\n{}", h.out);
    }
    let codes = h.out.split_once("\nExit codes:\n").expect("exit codes").1;
    assert!(
        codes.contains("  0  ") && codes.contains("  1  "),
        "{codes}"
    );
    let e = run(d, BIN, &["serve", "x.qcow2"]);
    assert_eq!(
        (e.code, e.err.as_str()),
        (
            1,
            "qcow2-img: Expecting an export type (--nbd or --vhost-user-blk)\nTry 'qcow2-img serve --help' for more info\n"
        )
    );
    let e = run(d, BIN, &["serve", "--nbd", "x.qcow2"]);
    assert_eq!(e.code, 1);
    assert!(
        e.err
            .starts_with("qcow2-img: Expecting --socket PATH or --bind ADDR:PORT\n"),
        "{e:?}"
    );
    let e = run(
        d,
        BIN,
        &[
            "serve", "--nbd", "--socket", "s.sock", "--shared", "0", "x.qcow2",
        ],
    );
    assert_eq!(
        (e.code, e.err.as_str()),
        (1, "qcow2-img: Invalid shared device number '0'\n")
    );
    let e = run(d, BIN, &["serve", "--nbd", "--socket", "s.sock", "x.qcow2"]);
    assert_eq!(e.code, 1);
    assert!(e.err.contains("Could not open 'x.qcow2'"), "{e:?}");
    assert!(
        !d.join("s.sock").exists(),
        "the socket is removed when the open fails"
    );
}

// ----------------------------------------------------------------------
// A small NBD client of our own, for what real clients never send.
// ----------------------------------------------------------------------

const NBDMAGIC: &[u8] = b"NBDMAGIC";
const IHAVEOPT: &[u8] = b"IHAVEOPT";
const REQ_MAGIC: u32 = 0x2560_9513;
const SIMPLE: u32 = 0x6744_6698;
const STRUCTURED: u32 = 0x668e_33ef;
const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;
const ENOSPC: u32 = 28;

struct Client {
    s: UnixStream,
    structured: bool,
    cookie: u64,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

impl Client {
    fn connect(sock: &Path) -> UnixStream {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    /// Greeting and client flags; returns the stream at option haggling.
    fn greet(sock: &Path) -> UnixStream {
        let mut s = Self::connect(sock);
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], NBDMAGIC);
        assert_eq!(&g[8..16], IHAVEOPT);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s
    }

    fn option(s: &mut UnixStream, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    /// One option reply: (type, payload).
    fn reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
        let mut p = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut p).unwrap();
        (be32(&h[12..]), p)
    }

    /// Connects with `NBD_OPT_GO` on the default export.
    fn go(sock: &Path, structured: bool) -> Client {
        let mut s = Self::greet(sock);
        if structured {
            Self::option(&mut s, 8, &[]);
            assert_eq!(Self::reply(&mut s).0, 1);
        }
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        Self::option(&mut s, 7, &d);
        loop {
            let (t, _) = Self::reply(&mut s);
            if t == 1 {
                break;
            }
            assert_eq!(t, 3, "NBD_REP_INFO expected");
        }
        Client {
            s,
            structured,
            cookie: 0,
        }
    }

    fn send(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, data: &[u8]) -> u64 {
        self.cookie += 1;
        let mut b = REQ_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
        self.cookie
    }

    /// The reply to a request: Ok(read data) or Err(errno).
    fn recv(&mut self, cookie: u64, offset: u64, len: usize, read: bool) -> Result<Vec<u8>, u32> {
        let mut data = vec![0u8; if read { len } else { 0 }];
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        match be32(&magic) {
            SIMPLE => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                assert_eq!(u64::from_be_bytes(h[4..].try_into().unwrap()), cookie);
                let err = be32(&h);
                if err != 0 {
                    return Err(err);
                }
                if read {
                    self.s.read_exact(&mut data).unwrap();
                }
                Ok(data)
            }
            STRUCTURED => {
                assert!(self.structured);
                let mut first = true;
                let mut err = None;
                loop {
                    if !first {
                        self.s.read_exact(&mut magic).unwrap();
                        assert_eq!(be32(&magic), STRUCTURED);
                    }
                    first = false;
                    let mut h = [0u8; 16];
                    self.s.read_exact(&mut h).unwrap();
                    let flags = u16::from_be_bytes([h[0], h[1]]);
                    let typ = u16::from_be_bytes([h[2], h[3]]);
                    assert_eq!(u64::from_be_bytes(h[4..12].try_into().unwrap()), cookie);
                    let mut p = vec![0u8; be32(&h[12..]) as usize];
                    self.s.read_exact(&mut p).unwrap();
                    match typ {
                        0 => {}
                        1 => {
                            let at = u64::from_be_bytes(p[..8].try_into().unwrap()) - offset;
                            let at = at as usize;
                            data[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                        }
                        2 => {
                            let at =
                                (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
                            let n = be32(&p[8..]) as usize;
                            data[at..at + n].fill(0);
                        }
                        t if t & 0x8000 != 0 => err = Some(be32(&p)),
                        t => panic!("unexpected chunk type {t}"),
                    }
                    if flags & 1 != 0 {
                        break;
                    }
                }
                match err {
                    Some(e) => Err(e),
                    None => Ok(data),
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let c = self.send(0, 0, offset, len, &[]);
        self.recv(c, offset, len as usize, true)
    }

    fn cmd(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, data: &[u8]) -> Result<(), u32> {
        let c = self.send(flags, cmd, offset, len, data);
        self.recv(c, offset, 0, false).map(|_| ())
    }

    /// Whether the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// A deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Four clients at once, each doing random writes, trims, zeroes and
/// checked reads on its own quarter of the disk, against a model; the
/// image is then clean and holds the model.
#[test]
fn four_concurrent_clients_against_a_model() {
    if !have(&["qemu-img"], "nbd concurrent clients") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    const SIZE: u64 = 16 << 20;
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "c.qcow2",
            "16M",
        ],
    );
    let srv = Served::ours_unix(d, &["--shared", "4"], "c.qcow2");
    let sock = d.join("s.sock");
    let quarter = SIZE / 4;
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::go(&sock, w % 2 == 0);
                let mut model = vec![0u8; quarter as usize];
                let base = w * quarter;
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w + 1));
                for i in 0..300u64 {
                    let off = rng.below(quarter - 1);
                    let len = (rng.below(200 << 10) + 1).min(quarter - off);
                    let (o, l) = (off as usize, len as usize);
                    match rng.below(10) {
                        0..=3 => {
                            let mut data = vec![0u8; l];
                            for (k, b) in data.iter_mut().enumerate() {
                                *b = ((i as usize * 31 + k) % 255 + 1) as u8;
                            }
                            let fua = if rng.below(4) == 0 { 1 } else { 0 };
                            c.cmd(fua, 1, base + off, len as u32, &data).unwrap();
                            model[o..o + l].copy_from_slice(&data);
                        }
                        4 => {
                            c.cmd(0, 4, base + off, len as u32, &[]).unwrap();
                            // A trim may or may not zero partial clusters:
                            // read back what the server now holds.
                            let got = c.read(base + off, len as u32).unwrap();
                            for (k, b) in got.iter().enumerate() {
                                assert!(*b == 0 || *b == model[o + k], "trim invented data");
                            }
                            model[o..o + l].copy_from_slice(&got);
                        }
                        5 => {
                            let no_hole = if rng.below(2) == 0 { 2 } else { 0 };
                            c.cmd(no_hole, 6, base + off, len as u32, &[]).unwrap();
                            model[o..o + l].fill(0);
                        }
                        6 => c.cmd(0, 3, 0, 0, &[]).unwrap(),
                        _ => {
                            let got = c.read(base + off, len as u32).unwrap();
                            assert!(got == model[o..o + l], "client {w} read {off}+{len}");
                        }
                    }
                }
                c.cmd(0, 3, 0, 0, &[]).unwrap();
                c.send(0, 2, 0, 0, &[]);
                model
            })
        })
        .collect();
    let mut want = Vec::new();
    for h in workers {
        want.extend_from_slice(&h.join().expect("client thread"));
    }
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    let chk = run(d, "qemu-img", &["check", "c.qcow2"]);
    assert_eq!(chk.code, 0, "{chk:?}");
    ok(d, "qemu-img", &["convert", "-O", "raw", "c.qcow2", "c.raw"]);
    assert!(
        std::fs::read(d.join("c.raw")).unwrap() == want,
        "image differs from the model"
    );
}

/// Malformed handshakes and requests get errors (or lose their own
/// connection when the stream cannot be trusted) while another client
/// keeps being served, and the image stays clean.
#[test]
fn malformed_input_gets_errors_and_others_are_served() {
    if !have(&["qemu-img", "qemu-io"], "nbd malformed input") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_d(d, "d.qcow2");
    let srv = Served::ours_unix(d, &[], "d.qcow2");
    let sock = d.join("s.sock");
    let mut good = Client::go(&sock, true);
    assert_eq!(good.read(0, 4096).unwrap(), vec![0x11; 4096]);

    // Handshake: a bad option magic closes that connection.
    let mut s = Client::greet(&sock);
    s.write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0").unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    // Unknown client flags close it too.
    let mut s = Client::connect(&sock);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    // Malformed options get error replies and haggling goes on.
    let mut s = Client::greet(&sock);
    Client::option(&mut s, 7, &[0, 0, 0, 9, b'x']); // name longer than the payload
    assert_eq!(Client::reply(&mut s).0, (1 << 31) | 3);
    Client::option(&mut s, 99, b"whatever");
    assert_eq!(Client::reply(&mut s).0, (1 << 31) | 1);
    Client::option(&mut s, 10, &[0; 8]); // meta context before structured replies
    assert_eq!(Client::reply(&mut s).0, (1 << 31) | 3);
    let mut big = IHAVEOPT.to_vec();
    big.extend_from_slice(&3u32.to_be_bytes());
    big.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&big).unwrap();
    s.write_all(&vec![0u8; 1 << 20]).unwrap();
    assert_eq!(Client::reply(&mut s).0, (1 << 31) | 9, "too big");
    Client::option(&mut s, 3, &[]);
    let (t, p) = Client::reply(&mut s);
    assert_eq!((t, p), (2, vec![0, 0, 0, 0]));
    assert_eq!(Client::reply(&mut s).0, 1);
    Client::option(&mut s, 2, &[]);
    assert_eq!(Client::reply(&mut s).0, 1);

    // Transmission, simple and structured replies.
    for structured in [false, true] {
        let mut c = Client::go(&sock, structured);
        let over = if structured { EOVERFLOW } else { EINVAL };
        assert_eq!(c.read(0, 64 << 20), Err(over), "oversized read");
        assert_eq!(c.read(1 << 20, 1), Err(EINVAL), "read past the end");
        assert_eq!(c.read(u64::MAX - 10, 100), Err(EINVAL), "offset overflow");
        assert_eq!(c.cmd(0, 1, (1 << 20) - 2, 4, &[1; 4]), Err(ENOSPC));
        assert_eq!(c.cmd(0, 4, 1 << 20, 4096, &[]), Err(ENOSPC));
        assert_eq!(c.cmd(0, 6, u64::MAX, 4096, &[]), Err(ENOSPC));
        assert_eq!(c.cmd(0, 42, 0, 0, &[]), Err(EINVAL), "unknown command");
        assert_eq!(c.cmd(0x100, 3, 0, 0, &[]), Err(EINVAL), "unknown flag");
        // Block status without a negotiated context.
        assert_eq!(c.cmd(0, 7, 0, 4096, &[]), Err(EINVAL));
        // Still in sync.
        assert_eq!(c.read(512 << 10, 8).unwrap(), vec![0x22; 8]);
        // An oversized write is refused and the connection dropped.
        let k = c.send(0, 1, 0, 33 << 20, &[]);
        assert_eq!(c.recv(k, 0, 0, false), Err(EINVAL));
        assert!(c.closed());
    }
    // Legacy NBD_OPT_EXPORT_NAME: size and flags (no zeroes asked), then
    // simple replies; an unknown name can only be answered by hanging up.
    let mut s = Client::greet(&sock);
    Client::option(&mut s, 1, b"");
    let mut x = [0u8; 10];
    s.read_exact(&mut x).unwrap();
    assert_eq!(u64::from_be_bytes(x[..8].try_into().unwrap()), 1 << 20);
    assert_eq!(
        u16::from_be_bytes([x[8], x[9]]) & 3,
        1,
        "has flags, writable"
    );
    let mut c = Client {
        s,
        structured: false,
        cookie: 0,
    };
    assert_eq!(c.read(0, 16).unwrap(), vec![0x11; 16]);
    let mut s = Client::greet(&sock);
    Client::option(&mut s, 1, b"nosuch");
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));

    // A bad request magic drops only that connection.
    let mut c = Client::go(&sock, false);
    c.s.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed());

    // The first client was served throughout, and a real client still is.
    assert_eq!(good.read(512 << 10, 4096).unwrap(), vec![0x22; 4096]);
    let out = ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x11 0 64k", URI],
    );
    assert!(out.starts_with("read 65536/65536"), "{out}");
    good.send(0, 2, 0, 0, &[]);
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("protocol error"), "{log}");
    assert_eq!(run(d, "qemu-img", &["check", "d.qcow2"]).code, 0);
    let r = ok(
        d,
        "qemu-io",
        &[
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "read -P 0x22 512k 128k",
            "d.qcow2",
        ],
    );
    assert!(!r.contains("fail"), "{r}");
}

/// SIGTERM with clients still connected (one idle, one mid-handshake):
/// the server exits 0, the lazy-refcounts image is closed clean (dirty bit
/// cleared), holds what was written and checks clean.
#[test]
fn sigterm_with_connected_clients_leaves_a_clean_image() {
    if !have(&["qemu-img", "qemu-io"], "nbd sigterm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "l.qcow2",
            "4M",
        ],
    );
    let srv = Served::ours_unix(d, &[], "l.qcow2");
    let sock = d.join("s.sock");
    let mut c = Client::go(&sock, true);
    c.cmd(0, 1, 64 << 10, 8192, &[0x5a; 8192]).unwrap();
    c.cmd(0, 1, 3 << 20, 4096, &[0xa5; 4096]).unwrap();
    let _half = Client::greet(&sock);
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!d.join("s.sock").exists(), "socket removed");
    let hdr = std::fs::read(d.join("l.qcow2")).unwrap();
    assert_eq!(hdr[79] & 1, 0, "dirty bit cleared on a clean stop");
    assert_eq!(run(d, "qemu-img", &["check", "l.qcow2"]).code, 0);
    let r = ok(
        d,
        "qemu-io",
        &[
            "-c",
            "read -P 0x5a 64k 8k",
            "-c",
            "read -P 0xa5 3M 4k",
            "l.qcow2",
        ],
    );
    assert!(!r.contains("fail"), "{r}");
}

/// SIGKILL after a flushed write and an unflushed one: the lazy-refcounts
/// image opens again (the dirty bit repaired on a read-write open), holds
/// the flushed data and then checks clean.
#[test]
fn sigkill_leaves_an_image_that_opens() {
    if !have(&["qemu-img"], "nbd sigkill") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "k.qcow2",
            "4M",
        ],
    );
    let srv = Served::ours_unix(d, &["-q"], "k.qcow2");
    let mut c = Client::go(&d.join("s.sock"), false);
    c.cmd(0, 1, 0, 65536, &[0x77; 65536]).unwrap();
    c.cmd(0, 3, 0, 0, &[]).unwrap();
    c.cmd(0, 1, 1 << 20, 65536, &[0x88; 65536]).unwrap();
    srv.kill();
    let r = run(d, BIN, &["io", "-c", "read -P 0x77 0 64k", "k.qcow2"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.out.starts_with("read 65536/65536 bytes at offset 0\n"),
        "{r:?}"
    );
    let chk = run(d, "qemu-img", &["check", "k.qcow2"]);
    assert_eq!(chk.code, 0, "{chk:?}");
}

/// SIGINT stops like SIGTERM, and requests the client sent before it are
/// still answered: eight writes are pipelined (sent before any reply is
/// read), then the signal; every reply is a success, the server exits 0,
/// `-q` kept the log empty, and the lazy-refcounts image is closed clean
/// with every write in it.
#[test]
fn sigint_answers_requests_sent_before_it_quietly() {
    if !have(&["qemu-img", "qemu-io"], "nbd sigint") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "i.qcow2",
            "4M",
        ],
    );
    let srv = Served::ours_unix(d, &["-q"], "i.qcow2");
    let mut c = Client::go(&d.join("s.sock"), true);
    let cookies: Vec<(u64, u64)> = (0..8u64)
        .map(|k| {
            let off = k * (256 << 10);
            (c.send(0, 1, off, 4096, &[0x10 + k as u8; 4096]), off)
        })
        .collect();
    let pid = srv.child.as_ref().unwrap().id().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    for (cookie, off) in cookies {
        assert_eq!(c.recv(cookie, off, 0, false), Ok(vec![]), "write at {off}");
    }
    let (code, log) = srv.finish(None);
    assert_eq!((code, log.as_str()), (0, ""), "quiet and clean on SIGINT");
    assert!(!d.join("s.sock").exists(), "socket removed");
    let hdr = std::fs::read(d.join("i.qcow2")).unwrap();
    assert_eq!(hdr[79] & 1, 0, "dirty bit cleared on SIGINT");
    assert_eq!(run(d, "qemu-img", &["check", "i.qcow2"]).code, 0);
    let mut args = vec![];
    let cmds: Vec<String> = (0..8u64)
        .map(|k| format!("read -P {:#x} {} 4k", 0x10 + k, k * (256 << 10)))
        .collect();
    for cmd in &cmds {
        args.extend_from_slice(&["-c", cmd.as_str()]);
    }
    args.push("i.qcow2");
    let r = ok(d, "qemu-io", &args);
    assert!(!r.contains("fail"), "{r}");
}
