//! Flush means durable: after `flush()` no change to the image file or the
//! external data file is left unsynced, whatever wrote it (in-place and
//! allocating writes, write-zeroes, discard), and a flush with nothing to
//! sync issues no sync. Checked with the recording storage.

use super::*;
use crate::storage::{FaultyStorage, MemStorage, RecordedOp};
use crate::CreateOptions;

type Rec = Arc<FaultyStorage<MemStorage>>;

/// Whether a change (write, discard, size change) follows the last sync.
fn unsynced(log: &[RecordedOp]) -> bool {
    log.iter()
        .rev()
        .take_while(|o| **o != RecordedOp::Flush)
        .next()
        .is_some()
}

fn changed(log: &[RecordedOp]) -> bool {
    log.iter().any(|o| !matches!(o, RecordedOp::Flush))
}

fn syncs(log: &[RecordedOp]) -> usize {
    log.iter().filter(|o| **o == RecordedOp::Flush).count()
}

/// A 4 MiB image (and its external data file, if `data_file`), recorded.
fn image(data_file: bool, raw: bool) -> (Image, Rec, Option<Rec>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qcow2");
    let mut o = CreateOptions::default();
    if data_file {
        o.data_file = Some("t.data".into());
        o.data_file_raw = raw;
    }
    crate::create::create(&path, &o, 4 << 20).unwrap();
    let file = Arc::new(FaultyStorage::new(MemStorage::from_bytes(
        std::fs::read(&path).unwrap(),
    )));
    let data = data_file.then(|| {
        Arc::new(FaultyStorage::new(MemStorage::from_bytes(
            std::fs::read(dir.path().join("t.data")).unwrap(),
        )))
    });
    let img = Image::open_created(
        file.clone(),
        data.clone().map(|d| d as Arc<dyn Storage>),
        None,
    )
    .unwrap();
    (img, file, data)
}

fn start(file: &Rec, data: &Option<Rec>) {
    file.start_recording();
    if let Some(d) = data {
        d.start_recording();
    }
}

/// Runs `op`, flushes, and checks that something reached the files and
/// that nothing is left unsynced in either.
fn assert_durable(img: &Image, file: &Rec, data: &Option<Rec>, what: &str, op: impl Fn(&Image)) {
    start(file, data);
    op(img);
    img.flush().unwrap();
    let flog = file.take_log();
    let dlog = data.as_ref().map(|d| d.take_log()).unwrap_or_default();
    assert!(
        changed(&flog) || changed(&dlog),
        "{what}: nothing was written"
    );
    assert!(
        !unsynced(&flog),
        "{what}: image file left unsynced: {flog:?}"
    );
    assert!(
        !unsynced(&dlog),
        "{what}: data file left unsynced: {dlog:?}"
    );
    // A second flush has nothing to do.
    start(file, data);
    img.flush().unwrap();
    let flog = file.take_log();
    let dlog = data.as_ref().map(|d| d.take_log()).unwrap_or_default();
    assert_eq!(syncs(&flog) + syncs(&dlog), 0, "{what}: needless sync");
    assert!(!changed(&flog) && !changed(&dlog), "{what}: wrote at flush");
}

fn scenarios(data_file: bool, raw: bool) {
    let (img, file, data) = image(data_file, raw);
    let pat = |b: u8, len: usize| vec![b; len];
    assert_durable(&img, &file, &data, "allocating write", |i| {
        i.write_at(&pat(1, 128 << 10), 0).unwrap()
    });
    assert_durable(&img, &file, &data, "in-place overwrite", |i| {
        i.write_at(&pat(2, 4096), 4096).unwrap()
    });
    assert_durable(&img, &file, &data, "partial in-place overwrite", |i| {
        i.write_at(&pat(3, 100), 70000).unwrap()
    });
    // The mapping API: the caller writes the data through its own handle
    // (not the image's), and the flush must still sync it.
    let mapped = |i: &Image, off: u64, len: u64, b: u8| {
        let res = i.reserve_write(off, len).unwrap();
        let target: &dyn Storage = match (&data, res.in_data_file()) {
            (Some(d), true) => &**d,
            _ => &*file,
        };
        for e in res.extents() {
            target.write_at(&pat(b, e.len as usize), e.host).unwrap();
        }
        res.commit().unwrap();
    };
    assert_durable(&img, &file, &data, "reserved in-place write", |i| {
        mapped(i, 8192, 4096, 5)
    });
    assert_durable(&img, &file, &data, "reserved allocating write", |i| {
        mapped(i, 2 << 20, 5000, 6)
    });
    assert_durable(&img, &file, &data, "write-zeroes", |i| {
        i.write_zeroes(0, 64 << 10, false).unwrap()
    });
    assert_durable(&img, &file, &data, "write-zeroes with unmap", |i| {
        i.write_at(&pat(4, 64 << 10), 1 << 20).unwrap();
        i.flush().unwrap();
        i.write_zeroes(1 << 20, 64 << 10, true).unwrap()
    });
    assert_durable(&img, &file, &data, "discard", |i| {
        i.write_at(&pat(5, 64 << 10), 2 << 20).unwrap();
        i.flush().unwrap();
        i.discard(2 << 20, 64 << 10).unwrap()
    });
    assert_durable(
        &img,
        &file,
        &data,
        "in-place overwrite after discard",
        |i| {
            i.write_at(&pat(6, 64 << 10), 3 << 20).unwrap();
            i.flush().unwrap();
            i.write_at(&pat(7, 512), 3 << 20).unwrap()
        },
    );
    // Reads never need a sync.
    start(&file, &data);
    let mut buf = vec![0u8; 100];
    img.read_at(&mut buf, 70000).unwrap();
    assert_eq!(buf, pat(3, 100));
    img.flush().unwrap();
    assert_eq!(syncs(&file.take_log()), 0);
    img.close().unwrap();
}

#[test]
fn flush_syncs_every_change_to_the_image_file() {
    scenarios(false, false);
}

#[test]
fn flush_syncs_every_change_to_the_data_file() {
    scenarios(true, false);
}

#[test]
fn flush_syncs_every_change_to_a_raw_data_file() {
    scenarios(true, true);
}

#[test]
fn in_place_overwrite_alone_is_synced() {
    // The case strace showed: an overwrite of an allocated cluster, then a
    // flush, must sync (and only the file written to).
    for data_file in [false, true] {
        let (img, file, data) = image(data_file, false);
        img.write_at(&[1u8; 65536], 0).unwrap();
        img.flush().unwrap();
        start(&file, &data);
        img.write_at(&[2u8; 4096], 0).unwrap();
        img.flush().unwrap();
        let flog = file.take_log();
        match &data {
            None => assert_eq!(flog.last(), Some(&RecordedOp::Flush), "{flog:?}"),
            Some(d) => {
                let dlog = d.take_log();
                assert_eq!(dlog.last(), Some(&RecordedOp::Flush), "{dlog:?}");
                assert!(flog.is_empty(), "image file touched: {flog:?}");
            }
        }
    }
}

#[test]
fn close_syncs_what_it_writes() {
    let (img, file, data) = image(true, false);
    start(&file, &data);
    img.write_at(&[1u8; 4096], 0).unwrap();
    img.close().unwrap();
    assert!(!unsynced(&file.take_log()));
    assert!(!unsynced(&data.unwrap().take_log()));
}

#[test]
fn no_flush_option_skips_syncs_but_writes_metadata() {
    let mem = Arc::new(MemStorage::new());
    crate::create::create_on(mem.clone(), &CreateOptions::default(), 1 << 20).unwrap();
    let file = Arc::new(FaultyStorage::new(MemStorage::from_bytes(mem.to_vec())));
    let img = Image::open_storage(file.clone(), &OpenOptions::new().cache_no_flush(true)).unwrap();
    file.start_recording();
    img.write_at(&[1u8; 4096], 0).unwrap();
    img.flush().unwrap();
    img.close().unwrap();
    let log = file.take_log();
    assert_eq!(syncs(&log), 0, "{log:?}");
    // The metadata reached the file anyway: the image reads back.
    let bytes = file.inner().to_vec();
    let img = Image::open_storage(
        Arc::new(MemStorage::from_bytes(bytes)),
        &OpenOptions::new().read_only(true),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1u8; 4096]);
}

#[test]
fn injected_eio_at_close_is_reported() {
    use crate::storage::{Fault, FaultKind, FaultOp};
    for op in [FaultOp::Write, FaultOp::Flush] {
        let mem = Arc::new(MemStorage::new());
        crate::create::create_on(mem.clone(), &CreateOptions::default(), 1 << 20).unwrap();
        let file = Arc::new(FaultyStorage::new(MemStorage::from_bytes(mem.to_vec())));
        let img = Image::open_storage(file.clone(), &OpenOptions::new()).unwrap();
        img.write_at(&[1u8; 4096], 0).unwrap();
        file.set_fault(Some(Fault {
            op,
            nth: 0,
            kind: FaultKind::Eio,
            persistent: true,
        }));
        let e = img.close().unwrap_err();
        assert!(
            matches!(&e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EIO)),
            "{op:?}: {e:?}"
        );
    }
}

#[test]
fn lazy_refcounts_flush_and_close_leave_nothing_unsynced() {
    let mem = Arc::new(MemStorage::new());
    crate::create::create_on(mem.clone(), &CreateOptions::default(), 1 << 20).unwrap();
    let file = Arc::new(FaultyStorage::new(MemStorage::from_bytes(mem.to_vec())));
    let img = Image::open_storage(file.clone(), &OpenOptions::new().lazy_refcounts(true)).unwrap();
    file.start_recording();
    img.write_at(&[1u8; 65536], 0).unwrap();
    img.flush().unwrap();
    assert!(!unsynced(&file.take_log()));
    file.start_recording();
    img.write_at(&[2u8; 4096], 0).unwrap();
    img.close().unwrap();
    let log = file.take_log();
    assert!(!unsynced(&log), "{log:?}");
    // The dirty bit (incompatible bit 0) is cleared by the clean close.
    let bytes = file.inner().to_vec();
    assert_eq!(bytes[79] & 1, 0);
}
