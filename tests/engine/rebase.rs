//! `Image::change_backing_file` (QAPI `change-backing-file`) and the
//! safe-mode `Image::rebase` on in-memory chains (a resolver hands out the
//! files): the string is written as given without reopening the chain, the
//! rebase keeps the guest view, and a crash at any point of a rebase leaves
//! an image that reads as before (through the old or the new backing file)
//! with at most leaked clusters.

use crate::support::testing::{replay, FaultyStorage};
use qcow2kit::check::{CheckOptions, Checker, Repair};
use qcow2kit::error::Limit;
use qcow2kit::image::{Backing, FileResolver, FileRole};
use qcow2kit::options::CreateOptions;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{Error, Image, OpenOptions};
use std::collections::HashMap;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

#[derive(Debug)]
struct Files(HashMap<String, Arc<dyn Storage>>);

impl FileResolver for Files {
    fn open(&self, _role: FileRole, name: &str, _w: bool) -> qcow2kit::Result<Arc<dyn Storage>> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("no file {name}")))
    }
}

fn mem(b: Vec<u8>) -> Arc<dyn Storage> {
    Arc::new(MemStorage::from_bytes(b))
}

/// base (0x11 in [0, 2M)) <- mid (0x22 in [1M, 2M)) <- top (0x33 in
/// [3M, 3M + 64k)); nb (0x11 in [0, 1M), 0x99 in [1M, 2M) and in [2M, 3M)):
/// the bytes of each file.
fn files() -> HashMap<String, Vec<u8>> {
    let st: HashMap<&str, Arc<MemStorage>> = ["base", "mid", "top", "nb"]
        .into_iter()
        .map(|n| (n, Arc::new(MemStorage::new())))
        .collect();
    let dynst = |n: &str| -> Arc<dyn Storage> { st[n].clone() };
    let o = CreateOptions::new();
    qcow2kit::create::create_on(dynst("base"), &o, SIZE).unwrap();
    qcow2kit::create::create_on(dynst("nb"), &o, SIZE).unwrap();
    let b = |n: &str| o.clone().backing_file(n).backing_fmt("qcow2");
    qcow2kit::create::create_on(dynst("mid"), &b("base"), SIZE).unwrap();
    let small = b("mid").cluster_size(4096);
    qcow2kit::create::create_on(dynst("top"), &small, SIZE).unwrap();
    let files = Arc::new(Files(
        st.iter()
            .map(|(n, s)| (n.to_string(), s.clone() as Arc<dyn Storage>))
            .collect(),
    ));
    for (name, byte, at, len) in [
        ("base", 0x11u8, 0, 2 * MIB),
        ("mid", 0x22, MIB, MIB),
        ("top", 0x33, 3 * MIB, 64 << 10),
        ("nb", 0x11, 0, MIB),
        ("nb", 0x99, MIB, 2 * MIB),
    ] {
        let opts = OpenOptions::new().file_resolver(files.clone());
        let img = Image::open_storage(files.0[name].clone(), &opts).unwrap();
        img.write_at(&vec![byte; len as usize], at).unwrap();
        img.close().unwrap();
    }
    st.iter()
        .map(|(n, s)| (n.to_string(), s.to_vec()))
        .collect()
}

/// The guest view of the chain before any rebase.
fn expected() -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    v[..MIB as usize].fill(0x11);
    v[MIB as usize..2 * MIB as usize].fill(0x22);
    v[3 * MIB as usize..(3 * MIB + (64 << 10)) as usize].fill(0x33);
    v
}

fn resolver(files: &HashMap<String, Vec<u8>>, top: Arc<dyn Storage>) -> Arc<Files> {
    let mut m: HashMap<String, Arc<dyn Storage>> = files
        .iter()
        .map(|(n, b)| (n.clone(), mem(b.clone())))
        .collect();
    m.insert("top".into(), top);
    Arc::new(Files(m))
}

/// What `top` (these bytes) reads through the chain its header names.
fn view(files: &HashMap<String, Vec<u8>>, top: Vec<u8>) -> (Vec<u8>, Option<String>) {
    let t = mem(top);
    let opts = OpenOptions::new()
        .file_resolver(resolver(files, t.clone()))
        .read_only(true);
    let img = Image::open_storage(t, &opts).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    (buf, img.header().backing_file_name().map(str::to_owned))
}

#[test]
fn change_backing_file_writes_the_string_without_reopening() {
    let f = files();
    let tm = Arc::new(MemStorage::from_bytes(f["top"].clone()));
    let t: Arc<dyn Storage> = tm.clone();
    let opts = OpenOptions::new().file_resolver(resolver(&f, t.clone()));
    let img = Image::open_storage(t.clone(), &opts).unwrap();
    // Not validated: no such file.
    img.change_backing_file("nowhere", Some("qcow2")).unwrap();
    assert_eq!(img.header().backing_file_name(), Some("nowhere"));
    assert_eq!(img.header().backing_format(), Some("qcow2"));
    // The open chain is unchanged: the handle still reads through mid.
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, expected());
    // Without a format: no backing format extension.
    img.change_backing_file("nb", None).unwrap();
    assert_eq!(img.header().backing_format(), None);
    img.close().unwrap();
    let (v, name) = view(&f, tm.to_vec());
    assert_eq!(name.as_deref(), Some("nb"));
    let mut want = expected();
    want[..3 * MIB as usize].copy_from_slice(&{
        let mut n = vec![0x11u8; 3 * MIB as usize];
        n[MIB as usize..].fill(0x99);
        n
    });
    assert_eq!(v, want, "reopened: reads through nb");

    // Empty: no backing file (nor format) any more.
    let img = Image::open_storage(t.clone(), &opts).unwrap();
    img.change_backing_file("", Some("qcow2")).unwrap();
    assert_eq!(img.header().backing_file_name(), None);
    assert_eq!(img.header().backing_format(), None);
    // QEMU's limits: 1023 bytes, and the header cluster.
    let e = img
        .change_backing_file(&"x".repeat(1024), None)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    img.close().unwrap();
    let report = Checker::open_storage_with(t, None, Repair::None, &opts)
        .unwrap()
        .run(CheckOptions::default())
        .unwrap();
    assert_eq!((report.counts.corruptions, report.counts.leaks), (0, 0));

    let small: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let o = CreateOptions::new().cluster_size(512);
    qcow2kit::create::create_on(small.clone(), &o, MIB).unwrap();
    let img = Image::open_storage(small, &OpenOptions::new()).unwrap();
    let e = img.change_backing_file(&"y".repeat(600), None).unwrap_err();
    assert!(matches!(e, Error::TooLarge(Limit::HeaderSpace)), "{e:?}");
    assert_eq!(img.header().backing_file_name(), None);

    // A read-only handle refuses.
    let ro = Image::open_storage(mem(f["top"].clone()), &opts.clone().read_only(true)).unwrap();
    assert!(matches!(
        ro.change_backing_file("nb", None),
        Err(Error::ReadOnly)
    ));
}

#[test]
fn rebase_without_a_format_changes_nothing() {
    let f = files();
    let t = Arc::new(FaultyStorage::new(MemStorage::from_bytes(f["top"].clone())));
    t.start_recording();
    let opts = OpenOptions::new().file_resolver(resolver(&f, t.clone()));
    let img = Image::open_storage(t.clone(), &opts).unwrap();
    let nb = Backing::open("nb", Some("qcow2"), None, &opts).unwrap();
    let e = img
        .rebase(Some(&nb), "nb", None, &mut |_, _| {})
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m == "backing format must be specified"),
        "{e:?}"
    );
    drop(img);
    assert!(t
        .take_log()
        .iter()
        .all(|op| matches!(op, qcow2kit::storage::RecordedOp::Flush)));
}

/// A crash after any prefix of the writes a rebase makes (the copy of the
/// differing ranges, then the header) leaves an image that reads as before
/// (through mid before the header write, through nb after it), with at
/// most leaked clusters. Rebasing onto no backing file too.
#[test]
fn a_crash_anywhere_in_a_rebase_keeps_the_guest_view() {
    for (name, fmt) in [("nb", Some("qcow2")), ("", None)] {
        let f = files();
        let t = Arc::new(FaultyStorage::new(MemStorage::from_bytes(f["top"].clone())));
        let opts = OpenOptions::new().file_resolver(resolver(&f, t.clone()));
        let img = Image::open_storage(t.clone(), &opts).unwrap();
        let new = (!name.is_empty()).then(|| Backing::open(name, fmt, None, &opts).unwrap());
        t.start_recording();
        let mut calls = 0;
        img.rebase(new.as_ref(), name, fmt, &mut |done, total| {
            assert!(done <= total);
            calls += 1;
        })
        .unwrap();
        assert!(calls >= 1);
        drop(img);
        let log = t.take_log();
        assert!(
            log.len() > 2,
            "{name:?}: the rebase wrote little: {}",
            log.len()
        );
        let want = expected();
        let mut switched = false;
        for k in 0..=log.len() {
            let bytes = replay(&f["top"], &log[..k]);
            let (got, backing) = view(&f, bytes.clone());
            assert!(
                got == want,
                "{name:?}: crash after {k} of {} writes",
                log.len()
            );
            switched |= backing.as_deref() != Some("mid");
            let r = Checker::open_storage_with(mem(bytes), None, Repair::None, &opts)
                .unwrap()
                .run(CheckOptions::default())
                .unwrap();
            assert_eq!(r.counts.corruptions, 0, "{name:?}: after {k} writes: {r:?}");
        }
        assert!(switched, "{name:?}: the header was never rewritten");
        let (_, backing) = view(&f, replay(&f["top"], &log));
        assert_eq!(backing.as_deref(), (!name.is_empty()).then_some(name));
    }
}
