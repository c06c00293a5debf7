//! The README's block-job command lines (the `sh` block of "Block jobs"),
//! run in order on a fresh chain: each exits 0, and the chain reads the
//! same through `top.qcow2` after each one (every command there keeps the
//! guest view); the copies equal it.

use crate::support::*;

/// The `qcow2-img` lines of the README's block-jobs shell example.
fn lines() -> Vec<Vec<String>> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## Block jobs: commit, stream, mirror, rebase")
        .nth(1)
        .expect("the block-jobs section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its sh block");
    block
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let words: Vec<String> = l
                .split_whitespace()
                .map(|w| w.trim_matches('"').to_owned())
                .collect();
            assert_eq!(words[0], "qcow2-img", "{l}");
            words[1..].to_vec()
        })
        .collect()
}

#[test]
fn readme_block_job_lines_run() {
    if !have_qemu() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    let img = |args: &[&str]| qemu_ok(d, "qemu-img", args);
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_ok(d, "qemu-io", &["-c", "write -P 1 0 2M", "base.qcow2"]);
    for (f, b, pat) in [
        ("mid.qcow2", "base.qcow2", "write -P 2 1M 1M"),
        ("top.qcow2", "mid.qcow2", "write -P 3 3M 64k"),
    ] {
        img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", f]);
        qemu_ok(d, "qemu-io", &["-c", pat, f]);
    }
    img(&["convert", "-O", "raw", "top.qcow2", "view.raw"]);
    let lines = lines();
    assert!(lines.len() >= 8, "{lines:?}");
    for args in &lines {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = ours(d, &a);
        assert_eq!(r.code, 0, "qcow2-img {a:?}: {r:?}");
        let c = qemu(
            d,
            "qemu-img",
            &["compare", "-F", "raw", "top.qcow2", "view.raw"],
        );
        assert_eq!(c.code, 0, "after qcow2-img {a:?}: {c:?}");
    }
    let c = qemu(
        d,
        "qemu-img",
        &["compare", "-F", "raw", "copy.qcow2", "view.raw"],
    );
    assert_eq!(c.code, 0, "{c:?}");
    let c = qemu(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "copy.raw", "view.raw"],
    );
    assert_eq!(c.code, 0, "{c:?}");
}
