//! `qcow2kit::amend` on in-memory images, without QEMU: every refcount
//! width to every other across cluster sizes, compat down and up with zero
//! clusters, refused amendments leaving the bytes as they were; after each,
//! the content reads back, the handle keeps writing, and our own check finds
//! neither corruption nor leaks.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use qcow2kit::check::{check_storage, CheckOptions, Repair};
use qcow2kit::options::AmendOptions;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;

/// A 4 MiB image with data, zero clusters (plain and preallocated) and a
/// hole, and its guest content.
fn image(opts: &CreateOptions) -> (Arc<MemStorage>, Vec<u8>) {
    let mem = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(mem.clone(), opts, 4 << 20).unwrap();
    let img = Image::open_storage(mem.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    let mut model = vec![0u8; 4 << 20];
    for (i, (off, len)) in [(0usize, 70_000usize), (1 << 20, 65536), (3 << 20, 300_000)]
        .into_iter()
        .enumerate()
    {
        let data = vec![i as u8 + 1; len];
        img.write_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    img.write_zeroes(1 << 20, 32768, false).unwrap();
    img.write_zeroes(2 << 20, 65536, false).unwrap();
    model[1 << 20..(1 << 20) + 32768].fill(0);
    img.close().unwrap();
    (mem, model)
}

fn amend(mem: &Arc<MemStorage>, o: &str) -> qcow2kit::Result<()> {
    let img = Image::open_storage(mem.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    let r = qcow2kit::amend::amend_image(&img, &AmendOptions::from_qemu_str(o).unwrap());
    img.close().unwrap();
    r
}

/// Reads back `model`, writes one more cluster through a fresh handle and
/// checks the image.
fn verify(mem: &Arc<MemStorage>, model: &mut [u8], what: &str) {
    let img = Image::open_storage(mem.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
    let mut back = vec![0u8; model.len()];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == model, "{what}: content changed");
    let data = vec![0xa5u8; 5000];
    img.write_at(&data, 2 << 20).unwrap();
    model[2 << 20..(2 << 20) + 5000].copy_from_slice(&data);
    img.close().unwrap();
    let report = check_storage(
        Arc::new(MemStorage::from_bytes(mem.to_vec())),
        Repair::None,
        CheckOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (report.counts.corruptions, report.counts.leaks),
        (0, 0),
        "{what}: {report:?}"
    );
}

#[test]
fn refcount_widths_every_way() {
    for cs in [512u64, 4096, 65536] {
        let (mem, mut model) = image(&CreateOptions::new().cluster_size(cs));
        for bits in [1, 64, 2, 32, 4, 8, 16] {
            let what = format!("cluster size {cs}, to {bits} bits");
            amend(&mem, &format!("refcount_bits={bits}")).unwrap();
            let h = Image::open_storage(
                mem.clone() as Arc<dyn Storage>,
                &OpenOptions::new().read_only(true),
            )
            .unwrap()
            .header();
            assert_eq!(h.refcount_bits(), bits, "{what}");
            verify(&mem, &mut model, &what);
        }
    }
}

#[test]
fn compat_down_and_up() {
    for cs in [512u64, 65536] {
        let (mem, mut model) = image(&CreateOptions::new().cluster_size(cs).lazy_refcounts(true));
        amend(&mem, "compat=0.10").unwrap();
        verify(&mem, &mut model, "downgraded");
        amend(&mem, "compat=1.1,lazy_refcounts=on,refcount_bits=64").unwrap();
        verify(&mem, &mut model, "upgraded");
    }
}

#[test]
fn refused_amendments_change_nothing() {
    let (mem, _) = image(&CreateOptions::new().extended_l2(true).cluster_size(65536));
    let before = mem.to_vec();
    for (o, msg) in [
        ("compat=0.10", "Cannot downgrade an image with incompatible features 0x10 set"),
        ("compat=0.10,refcount_bits=8", "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"),
        ("refcount_bits=64,compat=0.10", "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"),
        ("size=3000", "The new size must be a multiple of 512"),
        ("data_file=x", "data-file can only be set for images that use an external data file"),
    ] {
        let e = amend(&mem, o).unwrap_err();
        assert_eq!(e.to_string(), msg, "{o}");
        assert!(mem.to_vec() == before, "{o}: the image changed");
    }
}

/// A write or sync failing at any point of a refcount width change or a
/// downgrade: the amendment fails, and the image left behind opens with
/// its content and has no corruption (leaks allowed).
#[test]
fn faults_during_amend_leave_a_consistent_image() {
    use crate::support::testing::{Fault, FaultKind, FaultOp, FaultyStorage};
    for (create, o) in [
        (CreateOptions::new().cluster_size(4096), "refcount_bits=64"),
        (CreateOptions::new().cluster_size(512), "refcount_bits=1"),
        (CreateOptions::new().cluster_size(4096), "compat=0.10"),
    ] {
        let (mem, model) = image(&create);
        let base = mem.to_vec();
        let opts = AmendOptions::from_qemu_str(o).unwrap();
        let open = |fs: &Arc<FaultyStorage<MemStorage>>| {
            Image::open_storage(fs.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap()
        };
        // How many writes and syncs the amendment makes.
        let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
        let img = open(&fs);
        fs.set_fault(None);
        qcow2kit::amend::amend_image(&img, &opts).unwrap();
        let counts = fs.counts();
        drop(img);
        for (op, n) in [(FaultOp::Write, counts[1]), (FaultOp::Flush, counts[2])] {
            for nth in 0..n {
                let what = format!("{o}: {op:?} {nth} of {n} fails");
                let fs = Arc::new(FaultyStorage::new(MemStorage::from_bytes(base.clone())));
                let img = open(&fs);
                fs.set_fault(Some(Fault {
                    op,
                    nth,
                    kind: FaultKind::Eio,
                    persistent: true,
                }));
                assert!(qcow2kit::amend::amend_image(&img, &opts).is_err(), "{what}");
                drop(img);
                let left = Arc::new(MemStorage::from_bytes(fs.inner().to_vec()));
                let img =
                    Image::open_storage(left.clone() as Arc<dyn Storage>, &OpenOptions::new())
                        .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
                let mut back = vec![0u8; model.len()];
                img.read_at(&mut back, 0).unwrap();
                assert!(back == model, "{what}: content changed");
                img.close().unwrap();
                let report = check_storage(
                    Arc::new(MemStorage::from_bytes(left.to_vec())),
                    Repair::None,
                    CheckOptions::default(),
                )
                .unwrap();
                assert_eq!(report.counts.corruptions, 0, "{what}: {report:?}");
            }
        }
    }
}

/// Internal snapshots made here, then amendments on the same handle: the
/// snapshots survive refcount width changes (their shared clusters keep
/// their counts), a downgrade (their zero clusters expanded, the L2 cache
/// not serving the tables as they were before) and an upgrade; each one
/// applies to its content afterwards, and the image checks clean.
#[test]
fn amend_with_snapshots_on_one_handle() {
    for cs in [512u64, 65536] {
        for (create, steps) in [
            (
                CreateOptions::new(),
                vec!["refcount_bits=64", "refcount_bits=4"],
            ),
            (
                CreateOptions::new(),
                vec!["compat=0.10", "compat=1.1,refcount_bits=8"],
            ),
            (
                CreateOptions::new().refcount_bits(8),
                vec!["refcount_bits=16,compat=0.10"],
            ),
        ] {
            let what = format!("cluster size {cs}, {steps:?}");
            let (mem, first) = image(&create.cluster_size(cs));
            let img =
                Image::open_storage(mem.clone() as Arc<dyn Storage>, &OpenOptions::new()).unwrap();
            img.snapshot_create("one").unwrap();
            // After the snapshot: data over shared clusters, compressed
            // clusters, zeroes; the first snapshot's L2 tables stay cached.
            let mut second = first.clone();
            let data = vec![0x77u8; 3 * cs as usize];
            img.write_at(&data, 5 * cs).unwrap();
            second[5 * cs as usize..8 * cs as usize].copy_from_slice(&data);
            let comp: Vec<u8> = (0..2 * cs as usize).map(|i| (i % 7) as u8).collect();
            img.write_compressed_at(&comp, 3 << 19).unwrap();
            second[3 << 19..(3 << 19) + 2 * cs as usize].copy_from_slice(&comp);
            img.write_zeroes(0, cs, false).unwrap();
            second[..cs as usize].fill(0);
            img.snapshot_create("two").unwrap();
            img.write_at(&vec![0x99u8; cs as usize], 1 << 20).unwrap();
            img.write_zeroes(3 << 20, 2 * cs, false).unwrap();
            for o in &steps {
                qcow2kit::amend::amend_image(&img, &AmendOptions::from_qemu_str(o).unwrap())
                    .unwrap_or_else(|e| panic!("{what}: {o}: {e}"));
            }
            for (name, model) in [("one", &first), ("two", &second), ("one", &first)] {
                img.snapshot_apply(name)
                    .unwrap_or_else(|e| panic!("{what}: apply {name}: {e}"));
                let mut back = vec![0u8; model.len()];
                img.read_at(&mut back, 0).unwrap();
                assert!(back == *model, "{what}: snapshot {name} content");
            }
            img.close().unwrap();
            let report = check_storage(
                Arc::new(MemStorage::from_bytes(mem.to_vec())),
                Repair::None,
                CheckOptions::default(),
            )
            .unwrap();
            assert_eq!(
                (report.counts.corruptions, report.counts.leaks),
                (0, 0),
                "{what}: {report:?}"
            );
        }
    }
}
