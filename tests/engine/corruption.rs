//! Structural corruption found while translating, and I/O error events.

use crate::support::testing::{Fault, FaultKind, FaultOp, FaultyStorage};
use qcow2kit::error::IoOp;
use qcow2kit::events::ErrorAction;
use qcow2kit::options::ErrorPolicy;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Error, Event, Image, OpenOptions};
use std::sync::{Arc, Mutex};

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// A 1 MiB image in memory with 64 KiB of data at guest 0.
fn image() -> Vec<u8> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(s.clone(), &CreateOptions::new(), 1 << 20).unwrap();
    let img = Image::open_storage(s.clone(), &OpenOptions::new()).unwrap();
    img.write_at(&[0x11; 65536], 0).unwrap();
    img.close().unwrap();
    let mem = MemStorage::new();
    let mut buf = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut buf, 0).unwrap();
    mem.write_at(&buf, 0).unwrap();
    buf
}

fn events_of(img: &Image) -> Arc<Mutex<Vec<Event>>> {
    let ev = Arc::new(Mutex::new(Vec::new()));
    let e2 = ev.clone();
    img.on_event(move |e| e2.lock().unwrap().push(e.clone()));
    ev
}

fn l1_offset(b: &[u8]) -> usize {
    be64(b, 40) as usize
}

fn l2_offset(b: &[u8]) -> usize {
    (be64(b, l1_offset(b)) & 0x00ff_ffff_ffff_fe00) as usize
}

/// Damages, then reads guest 0 read-only and read-write.
fn check_both(damage: impl Fn(&mut Vec<u8>), expect_msg: &str) {
    let mut bytes = image();
    damage(&mut bytes);

    // Read-only: non-fatal event, only this request fails, nothing written.
    let mem = Arc::new(MemStorage::from_bytes(bytes.clone()));
    let img = Image::open_storage(mem.clone(), &OpenOptions::new().read_only(true)).unwrap();
    let ev = events_of(&img);
    let mut buf = [0u8; 512];
    assert!(matches!(
        img.read_at(&mut buf, 0),
        Err(Error::Corrupt { .. })
    ));
    // The handle stays usable: the same request fails the same way again
    // (not with "no medium"), and unaffected ranges read fine.
    assert!(matches!(
        img.read_at(&mut buf, 0),
        Err(Error::Corrupt { .. })
    ));
    {
        let ev = ev.lock().unwrap();
        assert_eq!(ev.len(), 1);
        match &ev[0] {
            Event::ImageCorrupted { msg, fatal, .. } => {
                assert_eq!(msg, expect_msg);
                assert!(!fatal);
            }
            e => panic!("{e:?}"),
        }
        assert!(ev[0].to_string().starts_with("qcow2: Image is corrupt: "));
    }
    drop(img);
    assert_eq!(mem.to_vec(), bytes, "a read-only handle writes nothing");

    // Read-write: fatal, corrupt bit set, handle disabled.
    let mem = Arc::new(MemStorage::from_bytes(bytes.clone()));
    let img = Image::open_storage(mem.clone(), &OpenOptions::new()).unwrap();
    let ev = events_of(&img);
    assert!(matches!(
        img.read_at(&mut buf, 0),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        img.read_at(&mut buf, 512 << 10),
        Err(Error::MediumGone)
    ));
    match &ev.lock().unwrap()[0] {
        Event::ImageCorrupted {
            msg,
            fatal,
            offset,
            size,
            ..
        } => {
            assert_eq!(msg, expect_msg);
            assert!(*fatal);
            assert_eq!((*offset, *size), (None, None));
        }
        e => panic!("{e:?}"),
    }
    drop(img);
    let after = mem.to_vec();
    assert_eq!(be64(&after, 72) & 2, 2, "corrupt bit set");
    assert!(matches!(
        Image::open_storage(mem.clone(), &OpenOptions::new()),
        Err(Error::ImageCorrupt)
    ));
    assert!(Image::open_storage(mem, &OpenOptions::new().read_only(true)).is_ok());
}

#[test]
fn unaligned_l2_table_offset() {
    check_both(
        |b| {
            let l1 = l1_offset(b);
            let e = be64(b, l1) | 0x200;
            b[l1..l1 + 8].copy_from_slice(&e.to_be_bytes());
        },
        "L2 table offset 0x40200 unaligned (L1 index: 0x0)",
    );
}

#[test]
fn unaligned_data_cluster_offset() {
    check_both(
        |b| {
            let l2 = l2_offset(b);
            let e = be64(b, l2) | 0x200;
            b[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
        },
        "Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0x0)",
    );
}

#[test]
fn invalid_compressed_descriptor() {
    check_both(
        |b| {
            let l2 = l2_offset(b);
            // A compressed cluster descriptor pointing past the end of the file.
            let e: u64 = (1 << 62) | 0x3f_ffff_0000;
            b[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
        },
        "Compressed cluster at host offset 0x3fffff0000 lies beyond the end of the file (L2 offset: 0x40000, L2 index: 0x0)",
    );
}

#[test]
fn undecodable_compressed_data_is_an_io_error() {
    let mut b = image();
    let l2 = l2_offset(&b);
    let e: u64 = (1 << 62) | 0x50000;
    b[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
    let img =
        Image::open_storage(Arc::new(MemStorage::from_bytes(b)), &OpenOptions::new()).unwrap();
    let ev = events_of(&img);
    let mut buf = [0u8; 512];
    let err = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.errno_text(), "Input/output error");
    assert!(
        matches!(
            err,
            Error::Decompress {
                offset: 0x50000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        ev.lock().unwrap().is_empty(),
        "QEMU signals no corruption for bad compressed data"
    );
    img.read_at(&mut buf, 0).unwrap_err();
}

fn io_error_case(op: FaultOp, kind: FaultKind) {
    let bytes = image();
    let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(bytes)));
    let opts = OpenOptions::new()
        .werror(ErrorPolicy::Enospc)
        .node_name("drive0".into());
    let img = Image::open_storage(fs.clone(), &opts).unwrap();
    let ev = events_of(&img);
    fs.set_fault(Some(Fault {
        op,
        nth: 0,
        kind,
        persistent: false,
    }));
    let mut buf = [0u8; 4096];
    let (r, operation) = match op {
        FaultOp::Read => (img.read_at(&mut buf, 0), IoOp::Read),
        _ => (img.write_at(&buf, 0), IoOp::Write),
    };
    let err = r.expect_err("the request fails");
    assert_eq!(err.is_nospace(), kind == FaultKind::Enospc);
    let ev = ev.lock().unwrap().clone();
    assert_eq!(ev.len(), 1, "{ev:?}");
    let nospace = kind == FaultKind::Enospc;
    let action = if nospace && operation == IoOp::Write {
        ErrorAction::Stop
    } else {
        ErrorAction::Report
    };
    let reason = if nospace {
        "No space left on device"
    } else {
        "Input/output error"
    };
    assert_eq!(
        ev[0],
        Event::IoError {
            node_name: Some("drive0".into()),
            operation,
            action,
            nospace,
            reason: reason.into()
        }
    );
    // A transient data fault does not disable the handle.
    fs.set_fault(None);
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x11; 4096]);
}

#[test]
fn io_errors_raise_events() {
    for op in [FaultOp::Read, FaultOp::Write] {
        for kind in [FaultKind::Eio, FaultKind::Enospc] {
            io_error_case(op, kind);
        }
    }
}

/// Events given in `OpenOptions` are seen without `Image::on_event`, and a
/// backing image opened with the same options reports to the same callback
/// (its corruption would otherwise go unseen).
#[test]
fn open_options_event_callback_also_hears_the_backing_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = image();
    let l2 = l2_offset(&base);
    let e = be64(&base, l2) | 0x200;
    base[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
    std::fs::write(dir.path().join("base.qcow2"), &base).unwrap();
    let top = dir.path().join("top.qcow2");
    qcow2kit::create::create(
        &top,
        &CreateOptions::new()
            .backing_file("base.qcow2")
            .backing_fmt("qcow2"),
        1 << 20,
    )
    .unwrap();

    let ev = Arc::new(Mutex::new(Vec::new()));
    let e2 = ev.clone();
    let opts = OpenOptions::new()
        .read_only(true)
        .on_event(move |e| e2.lock().unwrap().push(e.clone()));
    let img = Image::open(&top, &opts).unwrap();
    let mut buf = [0u8; 512];
    match img.read_at(&mut buf, 0) {
        Err(Error::BackingRead { source }) => {
            assert!(matches!(*source, Error::Corrupt { .. }), "{source:?}")
        }
        r => panic!("{r:?}"),
    }
    let ev = ev.lock().unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    match &ev[0] {
        Event::ImageCorrupted { msg, fatal, .. } => {
            assert_eq!(
                msg,
                "Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0x0)"
            );
            assert!(!fatal);
        }
        e => panic!("{e:?}"),
    }
}

/// An event raised while the image opens reaches the callback given in
/// `OpenOptions` (issue 15, item 2): a read-write open of a dirty image runs
/// the repair at open, which meets an unaligned refcount block offset and
/// signals corruption before `open_storage` returns (so `Image::on_event`,
/// registered after it, would be too late).
#[test]
fn open_options_event_callback_hears_corruption_found_at_open() {
    let mut bytes = image();
    let reftable = be64(&bytes, 48) as usize;
    let rb = be64(&bytes, reftable) | 0x200;
    bytes[reftable..reftable + 8].copy_from_slice(&rb.to_be_bytes());
    // Incompatible bit 0: dirty (the repair at open runs).
    let inc = be64(&bytes, 72) | 1;
    bytes[72..80].copy_from_slice(&inc.to_be_bytes());
    let ev = Arc::new(Mutex::new(Vec::new()));
    let e2 = ev.clone();
    let opts = OpenOptions::new().on_event(move |e| e2.lock().unwrap().push(e.clone()));
    // Whether the open then succeeds is the repair's business; the event
    // must have been delivered either way.
    let _ = Image::open_storage(Arc::new(MemStorage::from_bytes(bytes)), &opts);
    let ev = ev.lock().unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    match &ev[0] {
        Event::ImageCorrupted { msg, fatal, .. } => {
            assert!(msg.starts_with("Refblock offset 0x"), "{msg}");
            assert!(msg.contains("unaligned (reftable index: 0"), "{msg}");
            assert!(fatal);
        }
        e => panic!("{e:?}"),
    }
}

/// Corruption in a backing image is the backing image's: a writable overlay
/// whose copy-on-write read hits it fails the request but is not marked
/// corrupt, and stays usable (QEMU's top node only sees -EIO).
#[test]
fn corrupt_backing_does_not_mark_the_overlay_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = image();
    let l2 = l2_offset(&base);
    let e = be64(&base, l2) | 0x200;
    base[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
    std::fs::write(dir.path().join("base.qcow2"), &base).unwrap();
    let top = dir.path().join("top.qcow2");
    qcow2kit::create::create(
        &top,
        &CreateOptions::new()
            .backing_file("base.qcow2")
            .backing_fmt("qcow2"),
        1 << 20,
    )
    .unwrap();
    let img = Image::open(&top, &OpenOptions::new()).unwrap();
    let ev = events_of(&img);
    // A partial-cluster write copies the rest of the cluster from the backing file.
    assert!(matches!(
        img.write_at(&[7; 512], 512),
        Err(Error::BackingRead { .. })
    ));
    assert!(ev.lock().unwrap().is_empty(), "{:?}", ev.lock().unwrap());
    assert!(!img.is_disabled());
    // Elsewhere the overlay works, and it closes clean.
    img.write_at(&[9; 65536], 65536).unwrap();
    img.close().unwrap();
    let bytes = std::fs::read(&top).unwrap();
    assert_eq!(be64(&bytes, 72) & 2, 0, "corrupt bit must not be set");
    let img = Image::open(&top, &OpenOptions::new()).unwrap();
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 65536).unwrap();
    assert_eq!(buf, [9; 512]);
}

/// Open failures are typed and name the file (not "read failed at host
/// offset 0x0").
#[test]
fn open_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    match Image::open(&missing, &OpenOptions::new()) {
        Err(Error::Open { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        r => panic!("{r:?}"),
    }
    let top = dir.path().join("df.qcow2");
    let opts = CreateOptions::new().size(1 << 20);
    let mut opts = opts;
    opts.data_file = Some("d.data".into());
    qcow2kit::create::create_image(&top, &opts).unwrap();
    std::fs::remove_file(dir.path().join("d.data")).unwrap();
    match Image::open(&top, &OpenOptions::new())
        .as_ref()
        .map_err(Error::inner)
    {
        Err(Error::DataFile { path, source }) => {
            assert_eq!(*path, dir.path().join("d.data"));
            assert!(matches!(**source, Error::Open { .. }), "{source:?}");
        }
        r => panic!("{r:?}"),
    }
}
