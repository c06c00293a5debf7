//! `compare` against `qemu-img compare` on twin files: stdout, stderr and
//! exit codes (cli.md §18.2).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support::{self, run_ok, twin_dirs, twins};

#[test]
fn compare_matches_qemu_img() {
    if !support::have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| {
        let img = |args: &[&str]| {
            run_ok(d, "qemu-img", args);
        };
        let io = |args: &[&str]| {
            run_ok(d, "qemu-io", args);
        };
        img(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
        io(&["-c", "write -P 1 0 1M", "a.qcow2"]);
        img(&["convert", "-O", "qcow2", "a.qcow2", "b.qcow2"]);
        img(&["convert", "-O", "raw", "a.qcow2", "a.raw"]);
        for (name, at) in [("c.qcow2", "70000"), ("d.qcow2", "70512")] {
            std::fs::copy(d.join("a.qcow2"), d.join(name)).unwrap();
            io(&["-c", &format!("write -P 5 {at} 1"), name]);
        }
        img(&["create", "-q", "-f", "qcow2", "big.qcow2", "8M"]);
        io(&["-c", "write -P 1 0 1M", "big.qcow2"]);
        std::fs::copy(d.join("big.qcow2"), d.join("bigx.qcow2")).unwrap();
        io(&["-c", "write -P 9 6292000 4k", "bigx.qcow2"]);
        std::fs::copy(d.join("a.qcow2"), d.join("e.qcow2")).unwrap();
        io(&["-c", "write -P 0 3M 64k", "e.qcow2"]);
        std::fs::copy(d.join("a.qcow2"), d.join("z.qcow2")).unwrap();
        io(&["-c", "write -z 2M 64k", "z.qcow2"]);
        // An overlay whose content equals a.qcow2 through its backing file.
        img(&[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "ov.qcow2",
        ]);
        io(&["-c", "write -P 1 512k 4k", "ov.qcow2"]);
        img(&["create", "-q", "-f", "qcow2", "cz.qcow2", "4M"]);
        io(&["-c", "write -c -P 1 0 1M", "cz.qcow2"]);
    });
    let (q, o) = (qd.path(), od.path());
    for args in [
        &["a.qcow2", "b.qcow2"][..],
        &["a.qcow2", "a.raw"],
        &["-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"],
        &["a.qcow2", "c.qcow2"],
        &["a.qcow2", "d.qcow2"],
        &["a.qcow2", "big.qcow2"],
        &["big.qcow2", "a.qcow2"],
        &["a.qcow2", "bigx.qcow2"],
        &["bigx.qcow2", "a.qcow2"],
        &["-s", "a.qcow2", "big.qcow2"],
        &["-s", "a.qcow2", "e.qcow2"],
        &["a.qcow2", "e.qcow2"],
        &["-s", "a.qcow2", "z.qcow2"],
        &["-s", "a.qcow2", "b.qcow2"],
        &["-s", "a.qcow2", "a.raw"],
        &["a.qcow2", "ov.qcow2"],
        &["-s", "a.qcow2", "ov.qcow2"],
        &["a.qcow2", "cz.qcow2"],
        &["-q", "a.qcow2", "c.qcow2"],
        &["-q", "a.qcow2", "b.qcow2"],
        &["-p", "a.qcow2", "b.qcow2"],
        &["-p", "a.qcow2", "c.qcow2"],
        &["-p", "-q", "a.qcow2", "c.qcow2"],
        &["a.qcow2", "nosuch.qcow2"],
        &["nosuch.qcow2", "a.qcow2"],
        &["-f", "bogus", "a.qcow2", "b.qcow2"],
        &["a.qcow2"],
        &["a.qcow2", "b.qcow2", "c.qcow2"],
        &["--bogus", "a.qcow2", "b.qcow2"],
        &["-T", "bogus", "a.qcow2", "b.qcow2"],
    ] {
        let mut full = vec!["compare"];
        full.extend_from_slice(args);
        twins(q, o, "qemu-img", &[], &full);
    }
}
