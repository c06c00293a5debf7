//! Storage backends for the other files of an image: the external data file
//! (`data-file.driver=`), backing files (an NBD URI as the backing name, or
//! `backing.file.driver=`), and nbd as a quorum child.

use super::support::*;
use super::{have, serve, Server};
use std::path::Path;
use std::process::Command;

/// `qemu-nbd` exporting `file` (raw, read-only unless `rw`) on `dir/sock`.
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

/// base.qcow2 (0x11 in the first 64 KiB) and top.qcow2 over it, whose backing
/// name is the NBD URI of base.qcow2 exported on `b.sock`.
fn nbd_backed(d: &Path) {
    qemu_create(d, "base.qcow2", "1M");
    qemu_ok(d, "qemu-io", &["-c", "write -P 0x11 0 64k", "base.qcow2"]);
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
            "qcow2",
            "top.qcow2",
            "1M",
        ],
    );
}

const CHAIN_CMDS: &[&str] = &[
    "read -P 0x11 0 4k",
    "write -P 0x22 4k 4k",
    "read -P 0x11 8k 56k",
    "read -P 0x22 4k 4k",
    "read -P 0 64k 64k",
    "map",
];

#[test]
fn backing_file_served_by_qemu_nbd_over_a_unix_socket() {
    if !have_qemu() || !have("qemu-nbd") {
        return;
    }
    let (qd, od) = twin_dirs(nbd_backed);
    let _servers = [
        qemu_nbd(qd.path(), "b.sock", "base.qcow2", false),
        qemu_nbd(od.path(), "b.sock", "base.qcow2", false),
    ];
    // The backing name is an NBD URI: opened with the nbd client, as by qemu-io.
    io_twin(qd.path(), od.path(), &[], CHAIN_CMDS, &["top.qcow2"]);
    let qc = qemu(qd.path(), "qemu-img", &["check", "top.qcow2"]);
    let oc = qemu(od.path(), "qemu-img", &["check", "top.qcow2"]);
    assert_eq!((oc.out, oc.code), (qc.out, qc.code));

    // The options form: the first backing image's storage given explicitly,
    // overriding the name in the header (QEMU refuses `backing.file.server.*`
    // next to a backing name from the header; ours takes the options).
    let d = scratch();
    let dir = d.path();
    qemu_create(dir, "base.qcow2", "1M");
    qemu_ok(dir, "qemu-io", &["-c", "write -P 0x11 0 64k", "base.qcow2"]);
    qemu_ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "elsewhere.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "1M",
        ],
    );
    let _s = qemu_nbd(dir, "n.sock", "base.qcow2", false);
    let opts = "driver=qcow2,file.filename=top.qcow2,backing.driver=qcow2,\
backing.file.driver=nbd,backing.file.server.type=unix,backing.file.server.path=n.sock";
    let r = ours(
        dir,
        &io_args(
            &["io", "--image-opts"],
            &[
                "read -P 0x11 0 64k",
                "write -P 0x33 0 4k",
                "read -P 0x33 0 4k",
            ],
            &[opts],
        ),
    );
    assert_eq!(r.code, 0, "{r:?}");
    // Writes go to the top image; the export is untouched.
    qemu_ok(
        dir,
        "qemu-io",
        &["-r", "-U", "-c", "read -P 0x11 0 64k", "base.qcow2"],
    );
    // A bad backing storage fails the open with the backend's message.
    let bad = opts.replace("n.sock", "nosuch.sock");
    let r = ours(
        dir,
        &io_args(&["io", "--image-opts"], &["read 0 512"], &[&bad]),
    );
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        "qcow2-img: can't open: Could not open backing file: Failed to connect to 'nosuch.sock': No such file or directory\n"
    );
}

/// I.qcow2 with its guest data in the external data file D.raw.
fn with_data_file(d: &Path) {
    qemu_ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=D.raw",
            "I.qcow2",
            "1M",
        ],
    );
    qemu_ok(d, "qemu-io", &["-c", "write -P 0x11 0 64k", "I.qcow2"]);
}

/// blkdebug as the external data file. QEMU's qcow2 driver reports its events to
/// the image file, never to the data file, so the rules that fire there are on
/// `none` (when the node is created); `sector` then picks the requests.
#[test]
fn data_file_through_blkdebug_with_an_injected_error() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(with_data_file);
    let cmds = [
        "read -P 0x11 0 4k",
        "read -P 0x11 4k 4k",
        "write -P 0x22 128k 4k",
        "read -P 0x22 128k 4k",
    ];
    for rules in [
        "data-file.inject-error.0.event=none,data-file.inject-error.0.once=on",
        "data-file.inject-error.0.event=none,data-file.inject-error.0.sector=8,data-file.inject-error.0.errno=28",
    ] {
        let opts = format!(
            "driver=qcow2,file.filename=I.qcow2,data-file.driver=blkdebug,data-file.image.filename=D.raw,{rules}"
        );
        let o = io_twin(qd.path(), od.path(), &["--image-opts"], &cmds, &[&opts]);
        assert_eq!(o.code, 1, "no error was injected: {o:?}");
        let qc = qemu(qd.path(), "qemu-img", &["check", "I.qcow2"]);
        let oc = qemu(od.path(), "qemu-img", &["check", "I.qcow2"]);
        assert_eq!((&oc.out, oc.code), (&qc.out, qc.code));
        assert_eq!(oc.code, 0, "{oc:?}");
    }
    // Option errors of the data file's driver are QEMU's too.
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &["read 0 512"],
        &["driver=qcow2,file.filename=I.qcow2,data-file.driver=blkdebug,data-file.config=nosuch.conf,data-file.image.filename=D.raw"],
    );
}

/// Quorum with an nbd child (one of three replicas served by qemu-nbd): the vote
/// outvotes a bad file child as with three files, and writes reach the export.
#[test]
fn nbd_works_as_a_quorum_child() {
    if !have_qemu() || !have("qemu-nbd") {
        return;
    }
    let (qd, od) = twin_dirs(super::quorum_files);
    let _servers = [
        qemu_nbd(qd.path(), "c.sock", "C.qcow2", true),
        qemu_nbd(od.path(), "c.sock", "C.qcow2", true),
    ];
    let q = super::QUORUM.replace(
        "file.children.2.driver=file,file.children.2.filename=C.qcow2",
        "file.children.2.driver=nbd,file.children.2.server.type=unix,file.children.2.server.path=c.sock",
    );
    io_twin(
        qd.path(),
        od.path(),
        &["--image-opts"],
        &[
            "read -P 0x11 0 64k",
            "write -P 0x66 0 4k",
            "read -P 0x66 0 4k",
        ],
        &[&q],
    );
    drop(_servers);
    for f in ["A.qcow2", "B.qcow2", "C.qcow2"] {
        qemu_ok(od.path(), "qemu-io", &["-c", "read -P 0x66 0 4k", f]);
    }
}
