//! Unit tests of the metadata layer on `MemStorage`: refcount updates and
//! their undo paths, the write gate, and the mapping run merger.

use super::refcount::Update;
use super::*;
use crate::mapping::Extent;
use crate::storage::MemStorage;
use crate::types::{ClusterCount, HostOffset};
use crate::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;

/// An image on memory storage with 512-byte clusters and 16-bit refcounts:
/// one refcount block covers 256 clusters, so short runs cross blocks.
fn small_image() -> Image {
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let o = CreateOptions::new().cluster_size(512).refcount_bits(16);
    crate::create::create_on(file.clone(), &o, 64 << 20).unwrap();
    Image::open_storage(file, &OpenOptions::new()).unwrap()
}

fn refcounts(m: &mut Meta, start: u64, n: u64) -> Vec<u64> {
    (start..start + n).map(|c| m.refcount(c).unwrap()).collect()
}

#[test]
fn a_failed_decrement_across_blocks_is_undone() {
    let img = small_image();
    let mut m = img.lock_meta().unwrap();
    let cs = m.geom.cluster_size;
    // 300 clusters in use: the run crosses a refcount block boundary.
    let a = m.alloc_clusters(ClusterCount(300)).unwrap().0 / cs;
    assert!(refcounts(&mut m, a, 300).iter().all(|&r| r == 1));
    // The last cluster (in the second block range) drops to 0 first.
    let last = a + 299;
    assert_ne!(a >> 8, last >> 8, "the run crosses a block boundary");
    assert_eq!(
        m.update_refcount(last, 1, -1, DiscardType::Never).unwrap(),
        Update::Done
    );
    // It would now drop below zero: the whole update fails and the
    // segments already applied (the first block's) are reverted.
    let r = m.update_refcount(a, 300, -1, DiscardType::Never);
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    assert!(refcounts(&mut m, a, 299).iter().all(|&r| r == 1));
    assert_eq!(m.refcount(last).unwrap(), 0);
    // Nothing was queued for discard, nothing is pending.
    assert!(m.rc.discards.is_empty());
    assert_eq!(m.rc.pending_frees(), 0);
}

#[test]
fn an_overflowing_increment_changes_nothing() {
    let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let o = CreateOptions::new().cluster_size(512).refcount_bits(1);
    crate::create::create_on(file.clone(), &o, 64 << 20).unwrap();
    let img = Image::open_storage(file, &OpenOptions::new()).unwrap();
    let mut m = img.lock_meta().unwrap();
    let cs = m.geom.cluster_size;
    let a = m.alloc_clusters(ClusterCount(2)).unwrap().0 / cs;
    let r = m.update_refcount(a, 1, -1, DiscardType::Never).unwrap();
    assert_eq!(r, Update::Done);
    assert_eq!(refcounts(&mut m, a, 2), vec![0, 1]);
    // 1-bit refcounts: the second cluster would overflow, so the first one
    // (checked in the same pass) is not raised either.
    let r = m.update_refcount(a, 2, 1, DiscardType::Never);
    assert!(
        matches!(r, Err(Error::RefcountOverflow { max: 1, .. })),
        "{r:?}"
    );
    assert_eq!(refcounts(&mut m, a, 2), vec![0, 1]);
}

#[test]
fn an_update_that_needs_a_new_block_restarts_with_nothing_changed() {
    let img = small_image();
    let mut m = img.lock_meta().unwrap();
    // Clusters of a block range with no refcount block yet: the first
    // update allocates the block and asks the caller to start over.
    let rb = 1u64 << m.rgeom.refcount_block_bits;
    let start = 4 * rb - 10; // crosses into block range 4
    let before = m.rc.table().to_vec();
    assert_eq!(before.get(4).copied().unwrap_or(0), 0);
    let first = m.update_refcount(start, 20, 1, DiscardType::Never);
    let mut rounds = 0;
    let mut r = first;
    while matches!(r, Ok(Update::Again)) {
        // Nothing of the range was changed by the restarted update (the
        // clusters taken by new refcount blocks aside).
        rounds += 1;
        assert!(rounds < 8, "update keeps restarting");
        r = m.update_refcount(start, 20, 1, DiscardType::Never);
    }
    assert!(matches!(r, Ok(Update::Done)), "{r:?}");
    assert!(rounds >= 1, "a new refcount block was needed");
    assert!(refcounts(&mut m, start, 20).iter().all(|&c| c >= 1));
    assert_ne!(m.rc.table().get(4).copied().unwrap_or(0), 0);
    // Undo by hand: the image is consistent again.
    let r = m
        .update_refcount(start, 20, -1, DiscardType::Never)
        .unwrap();
    assert_eq!(r, Update::Done);
    drop(m);
    let file = img.storage().clone();
    img.close().unwrap();
    let report = crate::check::check_storage(
        file,
        crate::check::Repair::None,
        crate::check::CheckOptions::default(),
    )
    .unwrap();
    assert_eq!(report.counts.corruptions + report.counts.leaks, 0);
}

#[test]
fn the_gate_refuses_metadata_and_counts_the_file_end() {
    let img = small_image();
    let mut m = img.lock_meta().unwrap();
    let l1 = m.header.l1_table_offset;
    let r = m.gate.write_data(&[1; 512], l1);
    assert!(
        matches!(
            r,
            Err(Error::OverlapPrevented {
                kind: MetadataKind::ActiveL1,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(
        m.gate.permit_data(HostOffset(0), 512).is_err(),
        "the header is protected"
    );
    // Writing metadata of the kind written is allowed.
    let mut l1_bytes = vec![0u8; 8];
    m.gate.read(&mut l1_bytes, l1).unwrap();
    m.gate
        .write_metadata(MetadataKind::ActiveL1, &l1_bytes, l1)
        .unwrap();
    // A permit far past the end extends the known end before the write.
    let end = m.gate.file_end();
    let p = m
        .gate
        .permit_data(HostOffset(end + (1 << 20)), 512)
        .unwrap();
    assert_eq!(m.gate.file_end(), end + (1 << 20) + 512);
    let data = m.gate.data().clone();
    drop(m);
    data.write(p, &[7; 512]).unwrap();
    let mut back = [0u8; 512];
    img.lock_meta()
        .unwrap()
        .gate
        .read(&mut back, end + (1 << 20))
        .unwrap();
    assert_eq!(back, [7; 512]);
}

#[test]
fn a_permit_bounds_its_write() {
    let img = small_image();
    let m = img.lock_meta().unwrap();
    let end = m.gate.file_end();
    let p = m.gate.permit_data(HostOffset(end), 512).unwrap();
    let r = m.gate.data().write(p, &[0; 1024]);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}

#[test]
fn map_extent_merges_contiguous_runs_only() {
    let img = small_image();
    let cs = img.cluster_size();
    // Three clusters in one write: one contiguous host run.
    img.write_at(&vec![1; 3 * cs as usize], 0).unwrap();
    // Clusters 5 and 4 written in that order: host offsets go backwards.
    img.write_at(&vec![2; cs as usize], 5 * cs).unwrap();
    img.write_at(&vec![3; cs as usize], 4 * cs).unwrap();
    // Clusters 8..10 zeroed (no host cluster), 10.. never written.
    img.write_zeroes(8 * cs, 2 * cs, false).unwrap();
    let mut m = img.lock_meta().unwrap();

    let (e, len) = m.map_extent(0, 100 * cs).unwrap();
    assert!(matches!(e, Extent::Data { .. }), "{e:?}");
    assert_eq!(len, 3 * cs);
    // Starting inside a cluster: the run ends where the host run ends.
    let (e, len) = m.map_extent(cs + 100, 100 * cs).unwrap();
    assert!(matches!(e, Extent::Data { .. }), "{e:?}");
    assert_eq!(len, 2 * cs - 100);
    let (e3, _) = m.map_extent(3 * cs, cs).unwrap();
    assert_eq!(e3, Extent::Unallocated);
    let (Extent::Data { host: h4 }, l4) = m.map_extent(4 * cs, 100 * cs).unwrap() else {
        panic!("cluster 4 is data");
    };
    let (Extent::Data { host: h5 }, _) = m.map_extent(5 * cs, cs).unwrap() else {
        panic!("cluster 5 is data");
    };
    assert!(h5 < h4, "cluster 5 was allocated first");
    assert_eq!(l4, cs, "not merged with cluster 5 (host not contiguous)");
    let (e, len) = m.map_extent(8 * cs, 100 * cs).unwrap();
    assert_eq!(e, Extent::Zero { host: None });
    assert_eq!(len, 2 * cs);
    // The run never crosses the end of the L2 slice it started in.
    let (e, len) = m.map_extent(10 * cs, u64::MAX / 2).unwrap();
    assert_eq!(e, Extent::Unallocated);
    let slice = m.slice_entries() * cs;
    assert!(len <= slice, "{len} > {slice}");
    assert_eq!((10 * cs + len) % slice, 0);
}
