//! `qcow2-img amend` and `qcow2-img check` against qemu-img on twin images
//! (cli.md §7 and §1).

use crate::support::*;

#[test]
fn amend_messages_and_effects_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    for f in ["o.qcow2", "q.qcow2"] {
        qemu_ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", f, "64M"]);
    }
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "-o", "lazy_refcounts=on"],
        &["-f", "qcow2", "-o", "size=128M"],
        &["-f", "qcow2", "-o", "cluster_size=4k"],
        &["-f", "qcow2", "-o", "bogus=1"],
        &["-f", "qcow2"],
        &["-o", "lazy_refcounts=off"],
        // Turning lazy refcounts on together with a v2 target is refused.
        &["-f", "qcow2", "-o", "lazy_refcounts=on,compat=0.10"],
    ];
    for args in cases {
        let mut a: Vec<&str> = vec!["amend"];
        a.extend_from_slice(args);
        let mut ao = a.clone();
        ao.push("o.qcow2");
        a.push("q.qcow2");
        let o = ours(dir, &ao);
        let q = qemu(dir, "qemu-img", &a);
        assert_eq!(o.code, q.code, "{args:?}: {o:?} vs {q:?}");
        assert_eq!(o.err, q.err.replace("qemu-img", "qcow2-img"), "{args:?}");
        assert_eq!(o.out, q.out, "{args:?}");
        let io = qemu_ok(dir, "qemu-img", &["info", "--output", "json", "o.qcow2"]);
        let iq = qemu_ok(dir, "qemu-img", &["info", "--output", "json", "q.qcow2"]);
        let (mut jo, mut jq) = (json(&io.out), json(&iq.out));
        for j in [&mut jo, &mut jq] {
            strip_actual_size(j);
            j["filename"] = serde_json::Value::Null;
            j["children"] = serde_json::Value::Null;
        }
        assert_eq!(jo, jq, "{args:?}: info after amend");
    }
    let c = qemu(dir, "qemu-img", &["check", "o.qcow2"]);
    assert_eq!(c.code, 0, "{c:?}");
}

#[test]
fn qcow2_img_check_is_qcow2_check() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "64M"],
    );
    qemu_ok(dir, "qemu-io", &["-c", "write -P 1 0 1M", "c.qcow2"]);
    let o = ours(dir, &["check", "--output", "json", "c.qcow2"]);
    let q = qemu(dir, "qemu-img", &["check", "--output", "json", "c.qcow2"]);
    assert_eq!((o.code, json(&o.out)), (q.code, json(&q.out)));
    let o = ours(dir, &["check", "-r", "bogus", "c.qcow2"]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.err,
        "qcow2-img: --repair (-r) expects 'leaks' or 'all' not 'bogus'\nTry 'qcow2-img check --help' for more info\n"
    );
}
