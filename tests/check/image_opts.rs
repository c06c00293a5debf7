//! `check --image-opts` and `--object` (qemu-img's long options, which the
//! getopt emulation already counted for abbreviations) behave as in
//! qemu-img 10.0.2: same output, messages and exit codes on twin images.

use crate::support::*;

#[test]
fn image_opts_and_object_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    qemu_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
    );
    qemu_ok(dir, "qemu-io", &["-c", "write -P 1 0 1M", "a.qcow2"]);
    let cases: &[&[&str]] = &[
        &["--image-opts", "driver=qcow2,file.filename=a.qcow2"],
        &["--image-opts", "file.filename=a.qcow2"],
        &[
            "--image-opts",
            "--output=json",
            "driver=qcow2,file.filename=a.qcow2",
        ],
        &["--image-opts", "driver=raw,file.filename=a.qcow2"],
        &[
            "--image-opts",
            "-f",
            "qcow2",
            "driver=qcow2,file.filename=a.qcow2",
        ],
        &["--image-opts", "driver=qcow2,file.filename=nosuch"],
        &["--image-opts", "driver=qcow2,file.filename=a.qcow2,bogus=1"],
        &["--image-opts", "driver=qcow2"],
        &["--image-opts", "a.qcow2"],
        &["--image-opts", "file=a.qcow2"],
        &["--i", "a.qcow2"],
        &["--image-opts=1", "a.qcow2"],
        &["--help=x"],
        &["--object", "secret,id=s0,data=x", "a.qcow2"],
        &["--obj", "secret,id=s0,data=x", "a.qcow2"],
        &["--o", "json", "a.qcow2"],
        &["--ob"],
    ];
    for args in cases {
        let mut a = vec!["check"];
        a.extend_from_slice(args);
        let q = qemu(dir, "qemu-img", &a);
        let o = ours(dir, &a);
        assert_eq!(o, q, "{a:?}");
    }
    // A repair through --image-opts writes the image named in the string.
    qemu_ok(
        dir,
        "qemu-img",
        &["amend", "-o", "lazy_refcounts=on", "a.qcow2"],
    );
    let o = ours(
        dir,
        &[
            "check",
            "--image-opts",
            "-r",
            "all",
            "driver=qcow2,file.filename=a.qcow2",
        ],
    );
    assert_eq!(o.code, 0, "{o:?}");
    qemu_ok(dir, "qemu-img", &["check", "a.qcow2"]);
}
