//! Lazy refcounts: the dirty bit is set (and synced) before refcounts go
//! stale, and cleared by a clean close.

use qcow2kit::storage::{FaultyStorage, MemStorage, RecordedOp, Storage};
use qcow2kit::{CreateOptions, Error, Image, OpenOptions};
use std::sync::Arc;

fn incompat(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[72..80].try_into().unwrap())
}

fn new_image(opts: &str) -> Arc<FaultyStorage<MemStorage>> {
    let s = Arc::new(FaultyStorage::new(MemStorage::new()));
    qcow2kit::create::create_on(
        s.clone(),
        &CreateOptions::from_qemu_str(opts).unwrap(),
        64 << 20,
    )
    .unwrap();
    s
}

#[test]
fn create_sets_the_compatible_bit_and_v2_is_refused() {
    let s = new_image("lazy_refcounts=on");
    let b = s.inner().to_vec();
    assert_eq!(u64::from_be_bytes(b[80..88].try_into().unwrap()), 1);
    let v2 = CreateOptions::from_qemu_str("compat=0.10,lazy_refcounts=on").unwrap();
    let err = qcow2kit::create::create_on(Arc::new(MemStorage::new()), &v2, 1 << 20).unwrap_err();
    assert!(
        err.to_string()
            .contains("Lazy refcounts only supported with compatibility level 1.1"),
        "{err}"
    );
    let s = new_image("compat=0.10");
    let err = Image::open_storage(s, &OpenOptions::from_qemu_str("lazy-refcounts=on").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(
        err.to_string()
            .contains("Lazy refcounts require a qcow2 image with at least qemu 1.1"),
        "{err}"
    );
}

#[test]
fn dirty_bit_is_durable_before_an_l2_entry_and_cleared_on_close() {
    for (create, open) in [
        ("lazy_refcounts=on", ""),
        ("lazy_refcounts=off", "lazy-refcounts=on"),
    ] {
        let s = new_image(create);
        let opts = OpenOptions::from_qemu_str(open).unwrap();
        let img = Image::open_storage(s.clone(), &opts).unwrap();
        s.start_recording();
        img.write_at(&[7; 65536], 0).unwrap();
        img.flush().unwrap();
        let log = s.take_log();
        // The dirty bit (header offset 72) is written and flushed before any
        // L2 entry or L1 entry that references the new clusters.
        let pos = |f: &dyn Fn(&RecordedOp) -> bool| log.iter().position(f);
        let dirty =
            pos(&|op| matches!(op, RecordedOp::Write { offset: 72, data } if data[7] & 1 == 1))
                .expect("dirty bit written");
        let l2_entry = pos(&|op| {
            matches!(op, RecordedOp::Write { offset: 0x40000, data } if data.iter().any(|b| *b != 0))
        })
        .expect("L2 entry written");
        let l1_entry = pos(&|op| {
            matches!(
                op,
                RecordedOp::Write {
                    offset: 0x30000,
                    ..
                }
            )
        })
        .expect("L1 written");
        assert!(
            dirty < l2_entry && dirty < l1_entry,
            "dirty {dirty}, L2 {l2_entry}, L1 {l1_entry}"
        );
        assert_eq!(log[dirty + 1], RecordedOp::Flush);
        assert_eq!(incompat(&s.inner().to_vec()) & 1, 1, "dirty while open");
        img.close().unwrap();
        assert_eq!(incompat(&s.inner().to_vec()) & 1, 0, "clean after close");
        // And the image reads back.
        let img = Image::open_storage(s.clone(), &OpenOptions::new().read_only(true)).unwrap();
        let mut b = [0u8; 512];
        img.read_at(&mut b, 65024).unwrap();
        assert_eq!(b, [7; 512]);
    }
}

#[test]
fn without_lazy_refcounts_the_dirty_bit_is_never_set() {
    let s = new_image("lazy_refcounts=on");
    let img = Image::open_storage(
        s.clone(),
        &OpenOptions::from_qemu_str("lazy-refcounts=off").unwrap(),
    )
    .unwrap();
    img.write_at(&[7; 65536], 0).unwrap();
    img.flush().unwrap();
    assert_eq!(incompat(&s.inner().to_vec()) & 1, 0);
    img.close().unwrap();
    let _ = s.len();
}
