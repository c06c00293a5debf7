//! Backing chains that come back to themselves, and very deep chains: the
//! library and every command fail cleanly (exit 1, no signal, no hang) with
//! QEMU's "Backing file 'NAME' creates an infinite loop." or the depth
//! error; a chain of exactly `MAX_BACKING_DEPTH` backing files still works.
//!
//! Loops are detected by file identity (device and inode), so a loop through
//! a second name (a symlink) is caught too.

// Helpers outside #[test] functions panic on purpose when a tool misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support::*;
use qcow2kit::check::{Checker, Repair};
use qcow2kit::image::MAX_BACKING_DEPTH;
use qcow2kit::{Error, Image, OpenOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `prog ARGS` in `dir`, killing it if it runs for more than a minute
/// (a hang guard, not a timing assertion: every case here ends at once).
fn bounded(dir: &Path, prog: &str, args: &[&str]) -> Run {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes while waiting, or a large output would block the child.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("{prog} {args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    Run {
        out,
        err,
        code: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
    }
}

fn img(dir: &Path, args: &[&str]) -> Run {
    bounded(dir, QCOW2_IMG, args)
}

/// Points `file`'s backing file name at `name` (same length as the old one).
fn set_backing_name(file: &Path, name: &str) {
    let bytes = std::fs::read(file).unwrap();
    let off = u64::from_be_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
    assert_eq!(len, name.len(), "backing name length of {}", file.display());
    let mut bytes = bytes;
    bytes[off..off + len].copy_from_slice(name.as_bytes());
    std::fs::write(file, bytes).unwrap();
}

fn create(dir: &Path, name: &str, backing: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
    if let Some(b) = backing {
        args.extend(["-u", "-b", b, "-F", "qcow2"]);
    }
    args.extend([name, "64k"]);
    qemu_ok(dir, "qemu-img", &args);
}

/// The commands that open the whole chain, with the file they name.
fn chain_commands(top: &str) -> Vec<Vec<&str>> {
    vec![
        vec!["info", "--backing-chain", top],
        vec!["info", "--backing-chain", "--output=json", top],
        vec!["map", top],
        vec!["map", "--output=json", top],
        vec!["convert", "-O", "raw", top, "out.raw"],
        vec!["check", top],
        vec!["check", "-r", "all", top],
        vec!["io", "-c", "read 0 4k", top],
        vec!["io", "-r", "-c", "read 0 4k", top],
        vec!["resize", top, "128k"],
        vec!["amend", "-o", "lazy_refcounts=on", top],
        vec!["bench", "-c", "1", top],
    ]
}

/// What our tools print for a chain that fails at open with `msg`.
fn expected_err(args: &[&str], top: &str, msg: &str) -> String {
    match args[0] {
        "info" => format!("qcow2-img: {msg}\n"),
        "io" => format!("qcow2-img: can't open device {top}: {msg}\n"),
        _ => format!("qcow2-img: Could not open '{top}': {msg}\n"),
    }
}

fn assert_all_fail(dir: &Path, top: &str, msg: &str) {
    for args in chain_commands(top) {
        let o = img(dir, &args);
        assert_eq!(o.code, 1, "{args:?}: {o:?}");
        assert_eq!(o.err, expected_err(&args, top, msg), "{args:?}");
        assert_eq!(o.out, "", "{args:?}");
    }
    let o = bounded(dir, QCOW2_CHECK, &[top]);
    assert_eq!(o.code, 1, "qcow2-check: {o:?}");
    assert_eq!(
        o.err,
        format!("qcow2-check: Could not open '{top}': {msg}\n")
    );
    // Plain info does not follow the chain.
    assert_eq!(img(dir, &["info", top]).code, 0);
    assert!(!dir.join("out.raw").exists());
}

#[test]
fn loops_fail_everywhere_with_qemus_message() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    // a -> a
    create(dir, "a.qcow2", Some("x.qcow2"));
    set_backing_name(&dir.join("a.qcow2"), "a.qcow2");
    // b1 -> b2 -> b1
    create(dir, "b1.qcow2", Some("b2.qcow2"));
    create(dir, "b2.qcow2", Some("b1.qcow2"));
    // c1 -> c2 -> c3 -> c1
    create(dir, "c1.qcow2", Some("c2.qcow2"));
    create(dir, "c2.qcow2", Some("c3.qcow2"));
    create(dir, "c3.qcow2", Some("c1.qcow2"));
    // s -> s-link (a symlink to s): a loop under another name.
    create(dir, "s.qcow2", Some("s-link.qcow2"));
    std::os::unix::fs::symlink("s.qcow2", dir.join("s-link.qcow2")).unwrap();

    let before: Vec<_> = ["a", "b1", "b2", "c1", "c2", "c3", "s"]
        .iter()
        .map(|n| std::fs::read(dir.join(format!("{n}.qcow2"))).unwrap())
        .collect();
    for (top, again) in [
        ("a.qcow2", "a.qcow2"),
        ("b1.qcow2", "b1.qcow2"),
        ("c2.qcow2", "c2.qcow2"),
        ("s.qcow2", "s-link.qcow2"),
    ] {
        let msg = format!("Backing file '{again}' creates an infinite loop.");
        assert_all_fail(dir, top, &msg);
        // qemu-img info --backing-chain (the one QEMU command that detects
        // loops; it compares names) says the same.
        if top != "s.qcow2" {
            let q = bounded(dir, "qemu-img", &["info", "--backing-chain", top]);
            assert_eq!(q.code, 1);
            assert_eq!(
                q.err.replace("qemu-img", "qcow2-img"),
                format!("qcow2-img: {msg}\n")
            );
        }
        // The library.
        for opts in [OpenOptions::new(), OpenOptions::new().read_only(true)] {
            match Image::open(dir.join(top), &opts)
                .as_ref()
                .map_err(Error::inner)
            {
                Err(Error::BackingLoop { path }) => {
                    assert_eq!(*path, dir.join(again));
                }
                other => panic!("{top}: expected a loop, got {other:?}"),
            }
        }
        assert!(matches!(
            Checker::open(&dir.join(top), Repair::All)
                .as_ref()
                .map_err(Error::inner),
            Err(Error::BackingLoop { .. })
        ));
        let info = Image::open_for_info(dir.join(top), &OpenOptions::new()).unwrap();
        assert!(info.backing().is_none());
        // create -b opens the chain for its size (qemu-img hangs here).
        let o = img(
            dir,
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                top,
                "-F",
                "qcow2",
                "new.qcow2",
            ],
        );
        assert_eq!(o.code, 1, "{o:?}");
        assert!(o.err.contains(&msg), "{o:?}");
        let _ = std::fs::remove_file(dir.join("new.qcow2"));
    }
    let after: Vec<_> = ["a", "b1", "b2", "c1", "c2", "c3", "s"]
        .iter()
        .map(|n| std::fs::read(dir.join(format!("{n}.qcow2"))).unwrap())
        .collect();
    assert!(before == after, "a failed open wrote to an image");
}

/// `c0000.qcow2` (no backing file, 0x5a in its first cluster) and
/// `cNNNN.qcow2` backed by `c(NNNN-1).qcow2`, up to `depth`: tiny images
/// made by patching one template.
fn deep_chain(dir: &Path, depth: usize) {
    create(dir, "c0000.qcow2", None);
    qemu_ok(
        dir,
        "qemu-io",
        &["-c", "write -q -P 0x5a 0 512", "c0000.qcow2"],
    );
    create(dir, "template.qcow2", Some("c9999.qcow2"));
    let template = std::fs::read(dir.join("template.qcow2")).unwrap();
    for i in 1..=depth {
        let path = dir.join(format!("c{i:04}.qcow2"));
        std::fs::write(&path, &template).unwrap();
        set_backing_name(&path, &format!("c{:04}.qcow2", i - 1));
    }
}

#[test]
fn chains_deeper_than_the_bound_fail_cleanly() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let dir = d.path();
    deep_chain(dir, 1000);
    // 1000 backing files: the 201st is one too many.
    let too_deep = format!("c{:04}.qcow2", 1000 - MAX_BACKING_DEPTH - 1);
    let msg = format!(
        "Backing file '{too_deep}' exceeds the maximum backing chain depth of {MAX_BACKING_DEPTH}"
    );
    assert_all_fail(dir, "c1000.qcow2", &msg);
    match Image::open(dir.join("c1000.qcow2"), &OpenOptions::new().read_only(true))
        .as_ref()
        .map_err(Error::inner)
    {
        Err(Error::BackingChainTooDeep { path, max }) => {
            assert_eq!((path, *max), (&dir.join(&too_deep), MAX_BACKING_DEPTH));
        }
        other => panic!("expected the depth error, got {other:?}"),
    }
    // One past the bound fails, the bound itself works.
    let over = format!("c{:04}.qcow2", MAX_BACKING_DEPTH + 1);
    assert!(matches!(
        Image::open(dir.join(&over), &OpenOptions::new())
            .as_ref()
            .map_err(Error::inner),
        Err(Error::BackingChainTooDeep { .. })
    ));
    let top = format!("c{MAX_BACKING_DEPTH:04}.qcow2");
    let image = Image::open(dir.join(&top), &OpenOptions::new().read_only(true)).unwrap();
    // The read falls through every backing file (recursively, bounded).
    let mut buf = vec![0u8; 1024];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0x5a));
    assert!(buf[512..].iter().all(|&b| b == 0));
    drop(image);
    for args in [
        vec!["map", "--output=json", top.as_str()],
        vec!["map", top.as_str()],
        vec!["convert", "-O", "raw", top.as_str(), "bottom.raw"],
    ] {
        let o = img(dir, &args);
        let q = bounded(dir, "qemu-img", &args);
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
        assert_eq!(o.out, q.out, "{args:?}");
    }
    let o = img(dir, &["info", "--backing-chain", &top]);
    assert_eq!(o.code, 0);
    assert_eq!(
        o.out.matches("\nimage: ").count() + 1,
        MAX_BACKING_DEPTH + 1
    );
    let raw = std::fs::read(dir.join("bottom.raw")).unwrap();
    assert!(raw[..512].iter().all(|&b| b == 0x5a));
}

mod resolver {
    use qcow2kit::image::{FileResolver, FileRole};
    use qcow2kit::storage::{MemStorage, Storage};
    use qcow2kit::{CreateOptions, Error, Image, OpenOptions};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// Storages made by the test, by name; records what was asked.
    #[derive(Debug, Default)]
    struct Files {
        by_name: HashMap<String, Arc<dyn Storage>>,
        asked: Mutex<Vec<(FileRole, String, bool)>>,
    }

    impl FileResolver for Files {
        fn open(
            &self,
            role: FileRole,
            name: &str,
            writable: bool,
        ) -> qcow2kit::Result<Arc<dyn Storage>> {
            self.asked
                .lock()
                .unwrap()
                .push((role, name.to_string(), writable));
            self.by_name
                .get(name)
                .cloned()
                .ok_or_else(|| Error::InvalidArgument(format!("no such file: {name}")))
        }
    }

    fn qcow2(backing: Option<&str>) -> Arc<dyn Storage> {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let mut o = CreateOptions::new();
        if let Some(b) = backing {
            o = o.backing_file(b).backing_fmt("qcow2");
        }
        qcow2kit::create::create_on(s.clone(), &o, 4 << 20).unwrap();
        s
    }

    /// A 3-deep chain (top -> mid -> base) and an external data file, all
    /// storages the embedder made, opened through the resolver: data
    /// reads through every layer, names are passed as stored.
    #[test]
    fn three_deep_chain_through_the_resolver() {
        let base = qcow2(None);
        let mid = qcow2(Some("mid-base"));
        let top = qcow2(Some("vm/mid"));
        // Data in each layer; the base has no backing file.
        let b = Image::open_storage(base.clone(), &OpenOptions::new()).unwrap();
        b.write_at(&[1; 65536], 0).unwrap();
        b.close().unwrap();
        let files = Arc::new(Files {
            by_name: HashMap::from([
                ("mid-base".to_string(), base.clone()),
                ("vm/mid".to_string(), mid.clone()),
            ]),
            ..Default::default()
        });
        // Writes into mid and top go through the resolver too.
        let opts = OpenOptions::new().file_resolver(files.clone());
        let m = Image::open_storage(mid.clone(), &opts).unwrap();
        m.write_at(&[2; 65536], 65536).unwrap();
        m.close().unwrap();
        let t = Image::open_storage(top.clone(), &opts).unwrap();
        t.write_at(&[3; 65536], 2 * 65536).unwrap();
        t.close().unwrap();

        let img = Image::open_storage(top, &opts.clone().read_only(true)).unwrap();
        let mut buf = vec![0u8; 4 * 65536];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 1), "base layer");
        assert!(buf[65536..2 * 65536].iter().all(|&b| b == 2), "mid layer");
        assert!(
            buf[2 * 65536..3 * 65536].iter().all(|&b| b == 3),
            "top layer"
        );
        assert!(buf[3 * 65536..].iter().all(|&b| b == 0), "nowhere");
        let asked = files.asked.lock().unwrap();
        assert!(asked.contains(&(FileRole::Backing, "vm/mid".into(), false)));
        assert!(asked.contains(&(FileRole::Backing, "mid-base".into(), false)));
    }

    /// A resolver that hands the same storage back closes a loop: refused
    /// by identity, whatever the names.
    #[test]
    fn a_loop_through_the_resolver_is_refused() {
        let a = qcow2(Some("b"));
        let b = qcow2(Some("a"));
        let files = Arc::new(Files {
            by_name: HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b)]),
            ..Default::default()
        });
        let opts = OpenOptions::new().read_only(true).file_resolver(files);
        // Opening `a` itself: b -> a -> b ... the second `b` is the loop.
        match Image::open_storage(a, &opts) {
            Err(Error::BackingLoop { path }) => assert_eq!(path.to_str(), Some("b")),
            r => panic!("{r:?}"),
        }
    }

    /// The external data file comes from the resolver too (writable as the
    /// image): guest data lands in the storage it returned.
    #[test]
    fn the_data_file_comes_from_the_resolver() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        let mut o = CreateOptions::new().size(1 << 20);
        o.data_file = Some("disk.data".into());
        qcow2kit::create::create_image(&path, &o).unwrap();
        let img_file: Arc<dyn Storage> =
            Arc::new(MemStorage::from_bytes(std::fs::read(&path).unwrap()));
        let data = Arc::new(MemStorage::from_bytes(
            std::fs::read(dir.path().join("disk.data")).unwrap(),
        ));
        let files = Arc::new(Files {
            by_name: HashMap::from([("disk.data".to_string(), data.clone() as Arc<dyn Storage>)]),
            ..Default::default()
        });
        let img = Image::open_storage(img_file, &OpenOptions::new().file_resolver(files.clone()))
            .unwrap();
        img.write_at(&[0x5a; 4096], 8192).unwrap();
        img.close().unwrap();
        let mut buf = [0u8; 4096];
        data.read_at(&mut buf, 8192).unwrap();
        assert_eq!(
            buf, [0x5a; 4096],
            "an external data file keeps guest offset = host offset"
        );
        assert_eq!(
            *files.asked.lock().unwrap(),
            vec![(FileRole::DataFile, "disk.data".to_string(), true)]
        );
    }

    /// A name the resolver does not know fails the open with its error.
    #[test]
    fn an_unknown_name_fails_the_open() {
        let top = qcow2(Some("nowhere"));
        let opts = OpenOptions::new().file_resolver(Arc::new(Files::default()));
        match Image::open_storage(top, &opts) {
            Err(Error::Backing { source, .. }) => {
                assert!(matches!(*source, Error::InvalidArgument(_)), "{source:?}")
            }
            r => panic!("{r:?}"),
        }
    }
}
