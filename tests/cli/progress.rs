//! `-p` (qemu-img's progress indicator, cli.md §15/§20) on `qcow2-img
//! convert` and `amend`, against qemu-img on twin images; and `check`/
//! `resize`, which take no `-p` in qemu-img 10.0.2, refuse it the same way.

use crate::support::*;

/// The indicator in a command's stdout: the first and last update values
/// and what follows the last `\r`. Asserts every update has qemu-img's
/// form (`    (%.2f/100%)`) and that the values never go down.
fn shape(out: &str) -> (Option<String>, Option<String>, String) {
    let mut parts: Vec<&str> = out.split('\r').collect();
    let tail = parts.pop().unwrap_or_default().to_string();
    let mut last_value = -1.0f64;
    let mut values = Vec::new();
    for p in &parts {
        let v = p
            .strip_prefix("    (")
            .and_then(|r| r.strip_suffix("/100%)"))
            .unwrap_or_else(|| panic!("not a progress update: {p:?} in {out:?}"));
        let (int, frac) = v.split_once('.').expect("two decimals");
        assert_eq!(frac.len(), 2, "{p:?}");
        assert!(int.chars().all(|c| c.is_ascii_digit()), "{p:?}");
        let n: f64 = v.parse().expect("a number");
        assert!((0.0..=100.0).contains(&n) && n >= last_value, "{out:?}");
        last_value = n;
        values.push(v.to_string());
    }
    (values.first().cloned(), values.last().cloned(), tail)
}

/// Runs `args` (with `FILE` standing for `file`, and `DST` for `dst`) on
/// both twins and compares exit code, stderr and the indicator's shape.
fn compare(dir: &std::path::Path, args: &[&str], twins: [(&str, &str); 2]) -> Run {
    let run_on = |(file, dst): (&str, &str), qemu_side: bool| {
        let a: Vec<&str> = args
            .iter()
            .map(|a| match *a {
                "FILE" => file,
                "DST" => dst,
                other => other,
            })
            .collect();
        if qemu_side {
            qemu(dir, "qemu-img", &a)
        } else {
            ours(dir, &a)
        }
    };
    let q = run_on(twins[0], true);
    let o = run_on(twins[1], false);
    let what = format!("{args:?}");
    assert_eq!(o.code, q.code, "{what}: {o:?} vs qemu-img {q:?}");
    assert_eq!(
        o.err
            .replace(twins[1].0, twins[0].0)
            .replace(twins[1].1, twins[0].1),
        q.err,
        "{what}"
    );
    assert_eq!(
        shape(&o.out),
        shape(&q.out),
        "{what}: {:?} vs {:?}",
        o.out,
        q.out
    );
    o
}

#[test]
fn amend_progress_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    for f in ["q.qcow2", "o.qcow2"] {
        qemu_ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", f, "64M"]);
    }
    let twins = [("q.qcow2", "qd"), ("o.qcow2", "od")];
    let ok = compare(
        dir,
        &["amend", "-p", "-o", "lazy_refcounts=on", "FILE"],
        twins,
    );
    assert_eq!(ok.out, "    (0.00/100%)\r    (100.00/100%)\r\n");
    compare(
        dir,
        &["amend", "--progress", "-o", "size=128M", "FILE"],
        twins,
    );
    // The steps that report progress of their own: refcount width, downgrade, upgrade.
    for o in [
        "refcount_bits=64",
        "compat=0.10,refcount_bits=16",
        "compat=1.1",
    ] {
        let run = compare(dir, &["amend", "-p", "-o", o, "FILE"], twins);
        assert!(
            run.out.ends_with("    (100.00/100%)\r\n"),
            "{o}: {:?}",
            run.out
        );
    }
    // -q silences the indicator.
    let quiet = compare(
        dir,
        &["amend", "-p", "-q", "-o", "lazy_refcounts=off", "FILE"],
        twins,
    );
    assert_eq!(quiet.out, "");
    // Failures after the indicator started close it with a newline only;
    // a usage error comes before it.
    let cases: &[&[&str]] = &[
        &["amend", "-p", "-o", "cluster_size=4k", "FILE"],
        &["amend", "-p", "-o", "lazy_refcounts=on", "nosuch.qcow2"],
        &["amend", "-p", "FILE"],
        // Refused by the amendment itself: the indicator still reaches 100%.
        &["amend", "-p", "-o", "lazy_refcounts=on,compat=0.10", "FILE"],
    ];
    for args in cases {
        compare(dir, args, twins);
    }
}

#[test]
fn convert_progress_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"],
    );
    qemu_ok(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 8M",
            "-c",
            "write -P 2 32M 8M",
            "src.qcow2",
        ],
    );
    let twins = [("src.qcow2", "q.out"), ("src.qcow2", "o.out")];
    for fmt in ["raw", "qcow2"] {
        let o = compare(dir, &["convert", "-p", "-O", fmt, "FILE", "DST"], twins);
        assert!(o.out.starts_with("    (0.00/100%)\r"), "{:?}", o.out);
        assert!(o.out.ends_with("    (100.00/100%)\r\n"), "{:?}", o.out);
        // Updates in between, as the copy goes on.
        assert!(o.out.matches('\r').count() > 3, "{:?}", o.out);
        qemu_ok(dir, "qemu-img", &["compare", "src.qcow2", "o.out"]);
    }
    // Every update equals qemu-img's: one per data chunk of its walk (status
    // runs cut at the source's clusters, 2 MiB chunks, one cluster each for
    // -c; a forced data cluster for a short zero run), 100% for the last
    // chunk and again at the end, or only at the end when there is no data.
    let mut sources: Vec<(String, Vec<&str>)> = Vec::new();
    for (name, create, io) in [
        ("empty.qcow2", "cluster_size=64k", &[][..]),
        (
            "c4k.qcow2",
            "cluster_size=4k",
            &["write -P 1 1M 5M", "write -P 2 9M 300k", "write -z 12M 1M"][..],
        ),
        (
            "c512.qcow2",
            "cluster_size=512",
            &["write -P 1 1000 70000", "write -P 2 1M 5000"][..],
        ),
        (
            "xl2.qcow2",
            "extended_l2=on",
            &[
                "write -P 1 4k 8k",
                "write -P 2 100k 300k",
                "write -z 1M 64k",
            ][..],
        ),
        (
            "tail.qcow2",
            "cluster_size=64k",
            &["write -P 4 512k 488k"][..],
        ),
    ] {
        let size = if name == "tail.qcow2" { "1000k" } else { "16M" };
        qemu_ok(
            dir,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", create, name, size],
        );
        if !io.is_empty() {
            let mut a = Vec::new();
            for c in io {
                a.extend(["-c", *c]);
            }
            a.push(name);
            qemu_ok(dir, "qemu-io", &a);
        }
        sources.push((name.to_owned(), vec!["-f", "qcow2"]));
    }
    std::fs::write(dir.join("sparse.raw"), b"").unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("sparse.raw"))
        .unwrap();
    f.set_len(5 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"abc", 3_000_000).unwrap();
    drop(f);
    sources.push(("sparse.raw".to_owned(), vec!["-f", "raw"]));
    sources.push(("src.qcow2".to_owned(), vec!["-f", "qcow2"]));
    for (name, fmt) in &sources {
        for extra in [
            &["-O", "raw"][..],
            &["-O", "qcow2"],
            &["-c", "-O", "qcow2"],
            &["-c", "-O", "qcow2", "-o", "cluster_size=4k"],
        ] {
            let mut args = vec!["convert", "-p"];
            args.extend(fmt);
            args.extend(extra);
            args.extend(["FILE", "DST"]);
            let twins = [(name.as_str(), "q.out"), (name.as_str(), "o.out")];
            let o = compare(dir, &args, twins);
            let q = qemu(
                dir,
                "qemu-img",
                &args
                    .iter()
                    .map(|a| match *a {
                        "FILE" => name.as_str(),
                        "DST" => "q.out",
                        a => a,
                    })
                    .collect::<Vec<_>>(),
            );
            assert_eq!(o.out, q.out, "{args:?} on {name}");
            qemu_ok(dir, "qemu-img", &["compare", "q.out", "o.out"]);
        }
    }
    let quiet = compare(
        dir,
        &["convert", "-p", "-q", "-O", "raw", "FILE", "DST"],
        twins,
    );
    assert_eq!(quiet.out, "");
    let cases: &[&[&str]] = &[
        &["convert", "-p", "-O", "qcow2", "nosuch.qcow2", "DST"],
        &["convert", "-p", "-O", "vdi2", "FILE", "DST"],
        &[
            "convert", "-p", "-O", "qcow2", "-o", "bogus=1", "FILE", "DST",
        ],
        &["convert", "-p", "-c", "-O", "raw", "FILE", "DST"],
        &["convert", "-p", "FILE"],
    ];
    for args in cases {
        compare(dir, args, twins);
    }
}

#[test]
fn check_and_resize_refuse_p_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    for f in ["q.qcow2", "o.qcow2"] {
        qemu_ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", f, "64M"]);
    }
    let twins = [("q.qcow2", "-"), ("o.qcow2", "-")];
    for args in [
        &["check", "-p", "FILE"][..],
        &["resize", "-p", "FILE", "+1M"][..],
    ] {
        let o = compare(dir, args, twins);
        assert_eq!(o.code, 1);
        assert!(o.err.contains("invalid option -- 'p'"), "{o:?}");
    }
}
