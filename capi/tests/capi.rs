//! The C ABI from C: `examples/c/demo.c` is compiled with `cc` against
//! `include/qcow2kit.h` and the built `libqcow2kit_c.so` (and `.a`), run, and its output
//! asserted; the committed header is checked against cbindgen's output.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2kit::{CreateOptions, Image, OpenOptions};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding this build's `libqcow2kit_c.so` and `.a`: the test
/// binary lives in `target/<profile>/deps`, next to the library built with it.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    for dir in [deps.clone(), deps.parent().unwrap().to_path_buf()] {
        if dir.join("libqcow2kit_c.so").exists() {
            return dir;
        }
    }
    panic!("libqcow2kit_c.so not found next to {}", exe.display());
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A 1 MiB image with data at guest 0 whose L2 entry is then pointed (with
/// the COPIED flag, so a write goes in place) at the active L1 table: the
/// next write to guest 0 must be refused by the overlap check.
fn corrupt_image(dir: &Path) -> PathBuf {
    let p = dir.join("corrupt.qcow2");
    qcow2kit::create::create(&p, &CreateOptions::new(), 1 << 20).unwrap();
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    img.write_at(&[0x11; 65536], 0).unwrap();
    img.close().unwrap();
    let f = File::options().read(true).write(true).open(&p).unwrap();
    let be64 = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be64(40);
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "the write allocated an L2 table");
    f.write_all_at(&((1u64 << 63) | l1).to_be_bytes(), l2)
        .unwrap();
    p
}

#[test]
fn c_demo_round_trips_sees_events_and_errors() {
    if !have("cc") {
        eprintln!("skipped: no C compiler (cc) on PATH");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let libs = lib_dir();
    let exe = tmp.path().join("demo");
    let out = Command::new("cc")
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-D_DEFAULT_SOURCE",
        ])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join("examples/c/demo.c"))
        .arg("-L")
        .arg(&libs)
        .arg("-lqcow2kit_c")
        .arg(format!("-Wl,-rpath,{}", libs.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = corrupt_image(tmp.path());
    let run = Command::new(&exe)
        .arg(tmp.path())
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "demo failed ({:?}):\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let missing = tmp.path().join("missing.qcow2");
    let expected = [
        format!(
            "open missing: error -2 (could not open '{}': No such file or directory (os error 2))",
            missing.display()
        ),
        "read NULL handle: error -22 (image handle is NULL)".into(),
        "open NULL name: error -22 (filename is NULL)".into(),
        "open bad option: error -22 (Unsupported value 'sometimes' for qcow2 option \
         'overlap-check'. Allowed are any of the following: none, constant, cached, all)"
            .into(),
        "length: 16777216".into(),
        "round trip: equal".into(),
        "vectored round trip: equal".into(),
        "status 0+16777216: len=1048576 kind=unallocated allocated=0 zero=1 data=0".into(),
        "status 1048576+15728640: len=65536 kind=data allocated=1 zero=0 data=1".into(),
        "status 1048576+65536: len=65536 kind=zero allocated=1 zero=1 data=0".into(),
        "status 2097152+65536: len=65536 kind=zero allocated=1 zero=1 data=0".into(),
        "zeroed reads zero: yes".into(),
        "length: 33554432".into(),
        "events on the healthy image: 0".into(),
        "persisted: equal".into(),
        "write read-only: error -1 (the image is open read-only)".into(),
        // The callback runs during the refused write, before it returns.
        "event: image corrupted node=bad0 fatal=1 offset=0x".into(),
        "write corrupt: error -5".into(),
        "write again: error -123".into(),
        "events on the corrupt image: 1".into(),
        "reopen corrupt read-write: error -13".into(),
        "failures: 0".into(),
    ];
    let mut rest = stdout.as_ref();
    for want in &expected {
        // In order: each expected line starts a line after the previous one.
        let at = rest
            .find(want.as_str())
            .unwrap_or_else(|| panic!("missing (in order) {want:?} in:\n{stdout}"));
        rest = &rest[at + want.len()..];
    }
    assert!(
        stdout.contains("Preventing invalid write on metadata (overlaps with active L1 table)"),
        "{stdout}"
    );
    assert!(!stdout.contains("UNEXPECTED"), "{stdout}");

    // QEMU agrees with what the C program left behind.
    if have("qemu-img") {
        let img = tmp.path().join("demo.qcow2");
        let check = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let info = Command::new("qemu-img")
            .args(["info", "-f", "qcow2", "--output=json"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&info.stdout).contains("\"virtual-size\": 33554432"));
        let bad_info = Command::new("qemu-img")
            .args(["info", "-f", "qcow2", "--output=json"])
            .arg(&bad)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&bad_info.stdout).contains("\"corrupt\": true"));
    } else {
        eprintln!("qemu-img not found: skipping the QEMU cross-checks");
    }
}

/// The same demo linked statically against `libqcow2kit_c.a` (with the
/// system libraries `rustc --print native-static-libs` lists on Linux).
#[test]
fn c_demo_links_statically() {
    if !have("cc") {
        eprintln!("skipped: no C compiler (cc) on PATH");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = tmp.path().join("demo_static");
    let out = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join("examples/c/demo.c"))
        .arg(lib_dir().join("libqcow2kit_c.a"))
        .args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"])
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).arg(tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}");
    for want in [
        "round trip: equal",
        "vectored round trip: equal",
        "persisted: equal",
        "failures: 0",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn committed_header_is_current() {
    if !have("cbindgen") {
        eprintln!("skipped: cbindgen not on PATH (cargo install cbindgen)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("qcow2kit.h");
    let out = Command::new("cbindgen")
        .current_dir(crate_dir())
        .args([
            "--config",
            "cbindgen.toml",
            "--crate",
            "qcow2kit-capi",
            "--quiet",
            "--output",
        ])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cbindgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read_to_string(crate_dir().join("include/qcow2kit.h")).unwrap();
    let generated = std::fs::read_to_string(&fresh).unwrap();
    assert!(
        committed == generated,
        "include/qcow2kit.h is stale: run `cbindgen --config cbindgen.toml --crate \
         qcow2kit-capi --output include/qcow2kit.h` in capi/"
    );
}
