//! Small shared types: metadata kinds (QEMU's overlap classes) and the image
//! geometry that owns every shift and mask derived from the header.

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
