//! Small shared types: metadata kinds (QEMU's overlap classes) and the image
//! geometry that owns every shift and mask derived from the header (the
//! cluster and L2 layout in `Geometry`, the refcount structures in
//! `RefcountGeometry`).

use std::fmt;

/// The kinds of qcow2 metadata that overlap checks protect, in QEMU's bit order
/// (`QCOW2_OL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetadataKind {
    /// Cluster 0: the header, its extensions and the backing file name.
    MainHeader = 0,
    /// The active L1 table.
    ActiveL1 = 1,
    /// An L2 table referenced by the active L1 table.
    ActiveL2 = 2,
    /// The refcount table.
    RefcountTable = 3,
    /// A refcount block.
    RefcountBlock = 4,
    /// The snapshot table.
    SnapshotTable = 5,
    /// A snapshot's L1 table.
    InactiveL1 = 6,
    /// An L2 table referenced only by a snapshot's L1 table.
    InactiveL2 = 7,
    /// The persistent bitmap directory.
    BitmapDirectory = 8,
}

impl MetadataKind {
    /// Every kind, in QEMU's bit order.
    pub const ALL: [MetadataKind; 9] = [
        MetadataKind::MainHeader,
        MetadataKind::ActiveL1,
        MetadataKind::ActiveL2,
        MetadataKind::RefcountTable,
        MetadataKind::RefcountBlock,
        MetadataKind::SnapshotTable,
        MetadataKind::InactiveL1,
        MetadataKind::InactiveL2,
        MetadataKind::BitmapDirectory,
    ];

    /// The bit of this kind in an overlap-check mask (`QCOW2_OL_*`).
    pub const fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// QEMU's name of the structure in corruption messages
    /// (`metadata_ol_names[]`), e.g. `active L1 table`.
    pub const fn qemu_name(self) -> &'static str {
        match self {
            MetadataKind::MainHeader => "qcow2_header",
            MetadataKind::ActiveL1 => "active L1 table",
            MetadataKind::ActiveL2 => "active L2 table",
            MetadataKind::RefcountTable => "refcount table",
            MetadataKind::RefcountBlock => "refcount block",
            MetadataKind::SnapshotTable => "snapshot table",
            MetadataKind::InactiveL1 => "inactive L1 table",
            MetadataKind::InactiveL2 => "inactive L2 table",
            MetadataKind::BitmapDirectory => "bitmap directory",
        }
    }

    /// The option name of this kind (`overlap-check.<name>`), e.g. `active-l1`.
    pub const fn option_name(self) -> &'static str {
        match self {
            MetadataKind::MainHeader => "main-header",
            MetadataKind::ActiveL1 => "active-l1",
            MetadataKind::ActiveL2 => "active-l2",
            MetadataKind::RefcountTable => "refcount-table",
            MetadataKind::RefcountBlock => "refcount-block",
            MetadataKind::SnapshotTable => "snapshot-table",
            MetadataKind::InactiveL1 => "inactive-l1",
            MetadataKind::InactiveL2 => "inactive-l2",
            MetadataKind::BitmapDirectory => "bitmap-directory",
        }
    }
}

impl fmt::Display for MetadataKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// Every shift and mask of the cluster and L2 layout, derived from a
/// validated header.
///
/// Built only from a header that passed validation, so `cluster_bits` is in
/// 9..=21; the methods do no further checks beyond overflow-safe arithmetic
/// on caller-supplied offsets. Nothing here changes over the life of an
/// image (no amendment changes the cluster size or the L2 entry format), so
/// copies of it never go stale; the refcount width, which `amend` changes,
/// is [`RefcountGeometry`], kept by the metadata alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// log2 of the number of entries in an L2 table.
    pub l2_bits: u32,
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub l2_entry_bytes: u64,
    /// Extended L2 entries (32 subclusters per cluster).
    pub extended_l2: bool,
    /// log2 of the subcluster size (= `cluster_bits` without extended L2).
    pub subcluster_bits: u32,
}

/// The shifts and masks of the refcount structures: they follow the
/// refcount width (`refcount_order`), which `amend -o refcount_bits=N`
/// changes on an open image.
///
/// Built only from a validated header (`refcount_order` in 0..=6) or by the
/// refcount width change, which switches the metadata's copy when the new
/// structures take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RefcountGeometry {
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// log2 of the number of refcounts per refcount block.
    pub refcount_block_bits: u32,
}

impl RefcountGeometry {
    /// Derives the refcount geometry. `cluster_bits` must be 9..=21 and
    /// `refcount_order` 0..=6 (guaranteed by header validation).
    pub fn new(cluster_bits: u32, refcount_order: u32) -> Self {
        RefcountGeometry {
            refcount_order,
            // entries = cluster_size * 8 / refcount_bits
            refcount_block_bits: cluster_bits + 3 - refcount_order,
        }
    }

    /// Refcounts per refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        1 << self.refcount_block_bits
    }

    /// Reftable index and block index of a host cluster index.
    pub fn refcount_position(&self, cluster: u64) -> (u64, usize) {
        (
            cluster >> self.refcount_block_bits,
            (cluster & (self.refcount_block_entries() - 1)) as usize,
        )
    }
}

impl Geometry {
    /// Derives the geometry. `cluster_bits` must be 9..=21 (guaranteed by
    /// header validation).
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Self {
        let l2_entry_bytes = if extended_l2 { 16 } else { 8 };
        let l2_bits = cluster_bits - if extended_l2 { 4 } else { 3 };
        Geometry {
            cluster_bits,
            cluster_size: 1 << cluster_bits,
            l2_bits,
            l2_entry_bytes,
            extended_l2,
            subcluster_bits: if extended_l2 {
                cluster_bits - 5
            } else {
                cluster_bits
            },
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Guest bytes covered by one L2 table.
    #[cfg(test)]
    pub fn l2_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits)
    }

    /// Subcluster size in bytes.
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits
    }

    /// L1 index of a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.cluster_bits + self.l2_bits)
    }

    /// L2 index (within its table) of a guest offset.
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.l2_entries() - 1)
    }

    /// Byte offset within its cluster.
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size - 1)
    }

    /// Start of the cluster containing `off`.
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size - 1)
    }

    /// Whether `off` is cluster aligned.
    pub fn is_aligned(&self, off: u64) -> bool {
        off & (self.cluster_size - 1) == 0
    }

    /// Number of clusters needed for `bytes` (rounding up).
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        (bytes >> self.cluster_bits) + u64::from(bytes & (self.cluster_size - 1) != 0)
    }

    /// L1 entries needed to map a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let shift = self.cluster_bits + self.l2_bits;
        (size >> shift) + u64::from(size & ((1u64 << shift) - 1) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_64k() {
        let g = Geometry::new(16, false);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(RefcountGeometry::new(16, 4).refcount_block_entries(), 32768);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        assert_eq!(g.l2_index(0x10000), 1);
        let e = Geometry::new(16, true);
        assert_eq!(e.l2_entries(), 4096);
        assert_eq!(e.subcluster_size(), 2048);
        let small = RefcountGeometry::new(9, 6);
        assert_eq!(small.refcount_block_entries(), 64);
        assert_eq!(small.refcount_position(130), (2, 2));
    }

    #[test]
    fn names() {
        assert_eq!(MetadataKind::MainHeader.qemu_name(), "qcow2_header");
        assert_eq!(MetadataKind::BitmapDirectory.bit(), 1 << 8);
    }
}

/// A byte offset in the guest's view of the disk (what `read_at`/`write_at`
/// take), as opposed to a [`HostOffset`] in the image file. Used on the
/// write path's plans and permits, where mixing the two up would write guest
/// data at the wrong place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct GuestOffset(pub u64);

/// A byte offset in the image file or the external data file, as opposed to
/// a [`GuestOffset`] and to a [`ClusterIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct HostOffset(pub u64);

/// A host cluster index (a host offset shifted right by `cluster_bits`), as
/// the refcount structures count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct ClusterIndex(pub u64);

/// A number of clusters (of the image's cluster size), as opposed to a
/// number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct ClusterCount(pub u64);

/// `offset + n` bytes (guest offsets are below the virtual size, at most
/// 2^63, and host offsets below 2^56, so in-cluster additions cannot
/// overflow).
impl std::ops::Add<u64> for GuestOffset {
    type Output = GuestOffset;
    #[inline]
    fn add(self, n: u64) -> GuestOffset {
        GuestOffset(self.0 + n)
    }
}

impl std::ops::Add<u64> for HostOffset {
    type Output = HostOffset;
    #[inline]
    fn add(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }
}

impl GuestOffset {
    /// The index of the guest cluster this byte is in.
    #[inline]
    pub fn cluster(self, cluster_bits: u32) -> u64 {
        self.0 >> cluster_bits
    }
}

impl HostOffset {
    /// The host cluster this byte is in.
    #[inline]
    pub fn cluster(self, cluster_bits: u32) -> ClusterIndex {
        ClusterIndex(self.0 >> cluster_bits)
    }
}

impl ClusterIndex {
    /// The host offset of the cluster's first byte.
    #[inline]
    pub fn offset(self, cluster_bits: u32) -> HostOffset {
        HostOffset(self.0 << cluster_bits)
    }
}
