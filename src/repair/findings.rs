//! What a check or repair run found, as data: the counters of QEMU's
//! `BdrvCheckResult`, the per-cluster diagnostics in order (each with QEMU's
//! words), and the result of a whole run. Rendering the result as
//! `qemu-img check` prints it (summary, JSON, exit code) is `check`'s.

use std::fmt;

/// QEMU's counters of one check run (`BdrvCheckResult` plus its
/// `BlockFragInfo`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckCounts {
    /// Errors that may cause data loss or further corruption (refcount too
    /// low, invalid entries, wrong COPIED flags, broken snapshot entries).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their number of references.
    pub leaks: u64,
    /// Errors while performing the check itself (I/O errors and the like).
    pub check_errors: u64,
    /// Corruptions that a repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks that a repair fixed.
    pub leaks_fixed: u64,
    /// `(highest cluster in use + 1) * cluster_size`.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk, `ceil(size / cluster_size)`.
    pub total_clusters: u64,
    /// Guest clusters the active L1/L2 tables map to host clusters
    /// (normal, preallocated-zero or compressed).
    pub allocated_clusters: u64,
    /// Allocated guest clusters whose host cluster does not follow the host
    /// cluster of the previous allocated guest cluster of the same L2 table.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
}

impl CheckCounts {
    /// QEMU's `qcow2_add_check_result`: adds the error counters of `src`
    /// and, with `alloc_info`, takes its statistics.
    pub(crate) fn add(&mut self, src: &CheckCounts, alloc_info: bool) {
        self.corruptions += src.corruptions;
        self.leaks += src.leaks;
        self.check_errors += src.check_errors;
        self.corruptions_fixed += src.corruptions_fixed;
        self.leaks_fixed += src.leaks_fixed;
        if alloc_info {
            self.image_end_offset = src.image_end_offset;
            self.total_clusters = src.total_clusters;
            self.allocated_clusters = src.allocated_clusters;
            self.fragmented_clusters = src.fragmented_clusters;
            self.compressed_clusters = src.compressed_clusters;
        }
    }
}

/// The first word of a refcount comparison line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefcountVerdict {
    /// The refcount is higher than the references (`Leaked cluster ...`).
    Leaked,
    /// The refcount is lower than the references (`ERROR cluster ...`).
    Error,
    /// The refcount is being set to the references (`Repairing cluster ...`).
    Repairing,
}

/// One diagnostic line of a check, as data. `Display` prints QEMU's exact
/// text (without the trailing newline); see [`Finding::is_error_report`] for
/// the few lines QEMU prefixes with the program name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// A reference to a host range lying one cluster or more past the end
    /// of the file; it is not counted (corruption).
    ExceedsEof {
        /// Host offset of the range.
        offset: u64,
        /// Its length in bytes.
        size: u64,
    },
    /// A cluster has more references than the refcount width can express
    /// (corruption). Printed as two lines, as QEMU does.
    RefcountOverflow {
        /// Host offset of the cluster.
        offset: u64,
    },
    /// A standard L2 entry with reserved bits set (corruption).
    L2ReservedBits {
        /// The raw L2 entry.
        entry: u64,
    },
    /// A compressed L2 entry with the COPIED flag (corruption).
    CompressedCopied {
        /// Host offset of the compressed data.
        coffset: u64,
    },
    /// A compressed cluster in an image with an external data file (corruption).
    CompressedWithDataFile {
        /// Index of the entry in its L2 table.
        index: u64,
        /// The raw L2 entry.
        entry: u64,
    },
    /// A compressed cluster whose extended L2 bitmap is not zero (corruption).
    CompressedWithBitmap {
        /// Index of the entry in its L2 table.
        index: u64,
        /// The raw L2 entry.
        entry: u64,
    },
    /// An allocated cluster whose subcluster bitmap marks a subcluster both
    /// allocated and zero (corruption).
    CorruptSubclusterBitmap {
        /// Host offset of the cluster.
        offset: u64,
    },
    /// A preallocated zero cluster whose host offset is not cluster aligned
    /// (corruption; `-r all` turns the entry into a plain zero cluster).
    UnalignedPreallocated {
        /// The unaligned host offset.
        offset: u64,
        /// Whether the entry is being repaired.
        repairing: bool,
    },
    /// A data cluster whose host offset is not cluster aligned (corruption).
    UnalignedData {
        /// The unaligned host offset.
        offset: u64,
    },
    /// An unallocated cluster with allocated subclusters (corruption).
    UnallocatedWithBitmap,
    /// An L1 entry with reserved bits set (corruption).
    L1ReservedBits {
        /// The raw L1 entry.
        entry: u64,
    },
    /// An L2 table offset that is not cluster aligned (corruption).
    UnalignedL2 {
        /// The unaligned offset.
        offset: u64,
    },
    /// The COPIED flag of an active L1 entry does not match the L2 table's
    /// refcount (corruption).
    CopiedL1 {
        /// Index in the active L1 table.
        index: u64,
        /// The raw L1 entry.
        entry: u64,
        /// The L2 table's refcount.
        refcount: u64,
        /// Whether the flag is being repaired.
        repairing: bool,
    },
    /// The COPIED flag of an active L2 entry does not match the data
    /// cluster's refcount (corruption).
    CopiedL2 {
        /// The raw L2 entry.
        entry: u64,
        /// The data cluster's refcount.
        refcount: u64,
        /// Whether the flag is being repaired.
        repairing: bool,
    },
    /// A refcount table entry with reserved bits set (corruption).
    ReftableReservedBits {
        /// Index in the refcount table.
        index: u64,
    },
    /// A refcount block offset that is not cluster aligned (corruption).
    RefblockUnaligned {
        /// Index in the refcount table.
        index: u64,
    },
    /// A refcount block beyond the end of the file (corruption; `-r all`
    /// extends the file).
    RefblockOutside {
        /// Index in the refcount table.
        index: u64,
        /// Whether the file is being extended.
        repairing: bool,
    },
    /// Extending the file for a refcount block failed.
    ResizeFailed {
        /// The error text.
        reason: String,
    },
    /// A refcount block that is referenced other than exactly once (corruption).
    RefblockRefcount {
        /// Index in the refcount table.
        index: u64,
        /// How often it is referenced.
        refcount: u64,
    },
    /// Internal snapshots in an image with an external data file (corruption).
    SnapshotsWithDataFile {
        /// Number of snapshots.
        count: u64,
    },
    /// A snapshot whose L1 table offset is not cluster aligned (corruption).
    SnapshotL1Unaligned {
        /// Snapshot ID.
        id: String,
        /// Snapshot name.
        name: String,
        /// The L1 table offset.
        offset: u64,
    },
    /// A snapshot whose L1 table is larger than 32 MiB (corruption).
    SnapshotL1TooLarge {
        /// Snapshot ID.
        id: String,
        /// Snapshot name.
        name: String,
        /// The L1 table size in entries.
        l1_size: u32,
    },
    /// The on-disk refcount of a cluster could not be read (check error).
    RefcountUnreadable {
        /// Host cluster index.
        cluster: u64,
        /// The error text.
        reason: String,
    },
    /// A cluster's refcount differs from its number of references.
    Refcount {
        /// Leaked, error or repairing.
        verdict: RefcountVerdict,
        /// Host cluster index.
        cluster: u64,
        /// The on-disk refcount.
        refcount: u64,
        /// The number of references found.
        reference: u64,
    },
    /// A repair starts rebuilding the refcount table and blocks.
    Rebuilding,
    /// The rebuilt refcount structures still do not match the references.
    RebuildStillBroken,
    /// Refcounts are too low or the refcount structures are broken, and the
    /// repair mode does not allow rebuilding them.
    NeedRebuild,
    /// A v3 snapshot table entry with less than 16 bytes of extra data
    /// (corruption; `-r all` rewrites the table).
    SnapshotIncomplete {
        /// Index of the entry.
        index: u64,
        /// Whether it is being repaired.
        repairing: bool,
    },
    /// More snapshots than the format allows; the overhang is dropped.
    SnapshotsOverhanging {
        /// How many are dropped.
        count: u64,
        /// Whether the table (rather than `nb_snapshots`) is too big.
        table_too_big: bool,
    },
    /// A snapshot entry with more extra data than QEMU accepts; the excess is dropped.
    SnapshotExtraDataDropped {
        /// Index of the entry.
        index: u64,
        /// Its `extra_data_size`.
        size: u32,
    },
    /// A corruption event raised while reading metadata (QEMU's
    /// `qcow2_signal_corruption` text).
    CorruptionEvent {
        /// What is wrong.
        message: String,
        /// Whether the image is marked corrupt (writable open) or not.
        fatal: bool,
    },
    /// Any other message, printed as is (I/O errors while checking or
    /// repairing, in QEMU's words).
    Message(String),
    /// A message QEMU prints with `error_report` (prefixed with the program
    /// name), e.g. `ERROR snapshot table offset invalid`.
    Report(String),
}

impl Finding {
    /// Whether QEMU prints this line through `error_report`, i.e. prefixed
    /// with the program name and a colon (`qemu-img: ...`).
    pub fn is_error_report(&self) -> bool {
        matches!(self, Finding::Report(_))
    }
}

/// C's `%#x`: like `{:#x}`, but plain `0` for zero.
pub(crate) fn hash_x(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn ee(repairing: bool) -> &'static str {
    if repairing {
        "Repairing"
    } else {
        "ERROR"
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::ExceedsEof { offset, size } => write!(
                f,
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ),
            Finding::RefcountOverflow { offset } => write!(
                f,
                "ERROR: overflow cluster offset={offset:#x}\nUse qemu-img amend to increase \
                 the refcount entry width or qemu-img convert to create a clean copy if the \
                 image cannot be opened for writing"
            ),
            Finding::L2ReservedBits { entry } => {
                write!(f, "ERROR found l2 entry with reserved bits set: {entry:x}")
            }
            Finding::CompressedCopied { coffset } => write!(
                f,
                "ERROR: coffset={coffset:#x}: copied flag must never be set for compressed \
                 clusters"
            ),
            Finding::CompressedWithDataFile { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with data file, entry={entry:#x}"
            ),
            Finding::CompressedWithBitmap { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with non-zero subcluster allocation \
                 bitmap, entry={entry:#x}"
            ),
            Finding::CorruptSubclusterBitmap { offset } => write!(
                f,
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster \
                 allocation bitmap"
            ),
            Finding::UnalignedPreallocated { offset, repairing } => write!(
                f,
                "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 \
                 entry corrupted.",
                ee(*repairing)
            ),
            Finding::UnalignedData { offset } => write!(
                f,
                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry \
                 corrupted."
            ),
            Finding::UnallocatedWithBitmap => {
                f.write_str("ERROR: Unallocated cluster has non-zero subcluster allocation map")
            }
            Finding::L1ReservedBits { entry } => {
                write!(f, "ERROR found L1 entry with reserved bits set: {entry:x}")
            }
            Finding::UnalignedL2 { offset } => write!(
                f,
                "ERROR l2_offset={offset:x}: Table is not cluster aligned; L1 entry corrupted"
            ),
            Finding::CopiedL1 {
                index,
                entry,
                refcount,
                repairing,
            } => write!(
                f,
                "{} OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} \
                 refcount={refcount}",
                ee(*repairing)
            ),
            Finding::CopiedL2 {
                entry,
                refcount,
                repairing,
            } => write!(
                f,
                "{} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}",
                ee(*repairing)
            ),
            Finding::ReftableReservedBits { index } => write!(
                f,
                "ERROR refcount table entry {index} has reserved bits set"
            ),
            Finding::RefblockUnaligned { index } => write!(
                f,
                "ERROR refcount block {index} is not cluster aligned; refcount table entry \
                 corrupted"
            ),
            Finding::RefblockOutside { index, repairing } => write!(
                f,
                "{} refcount block {index} is outside image",
                ee(*repairing)
            ),
            Finding::ResizeFailed { reason } => {
                write!(f, "ERROR could not resize image: {reason}")
            }
            Finding::RefblockRefcount { index, refcount } => {
                write!(f, "ERROR refcount block {index} refcount={refcount}")
            }
            Finding::SnapshotsWithDataFile { count } => {
                write!(f, "ERROR {count} snapshots in image with data file")
            }
            Finding::SnapshotL1Unaligned { id, name, offset } => write!(
                f,
                "ERROR snapshot {id} ({name}) l1_offset={}: L1 table is not cluster \
                 aligned; snapshot table entry corrupted",
                hash_x(*offset)
            ),
            Finding::SnapshotL1TooLarge { id, name, l1_size } => write!(
                f,
                "ERROR snapshot {id} ({name}) l1_size={}: L1 table is too large; \
                 snapshot table entry corrupted",
                hash_x(u64::from(*l1_size))
            ),
            Finding::RefcountUnreadable { cluster, reason } => {
                write!(f, "Can't get refcount for cluster {cluster}: {reason}")
            }
            Finding::Refcount {
                verdict,
                cluster,
                refcount,
                reference,
            } => write!(
                f,
                "{} cluster {cluster} refcount={refcount} reference={reference}",
                match verdict {
                    RefcountVerdict::Leaked => "Leaked",
                    RefcountVerdict::Error => "ERROR",
                    RefcountVerdict::Repairing => "Repairing",
                }
            ),
            Finding::Rebuilding => f.write_str("Rebuilding refcount structure"),
            Finding::RebuildStillBroken => {
                f.write_str("ERROR rebuilt refcount structure is still broken")
            }
            Finding::NeedRebuild => f.write_str("ERROR need to rebuild refcount structures"),
            Finding::SnapshotIncomplete { index, repairing } => write!(
                f,
                "{} snapshot table entry {index} is incomplete",
                ee(*repairing)
            ),
            Finding::SnapshotsOverhanging {
                count,
                table_too_big,
            } => {
                if *table_too_big {
                    write!(
                        f,
                        "Discarding {count} overhanging snapshots (snapshot table is too big)"
                    )
                } else {
                    write!(f, "Discarding {count} overhanging snapshots")
                }
            }
            Finding::SnapshotExtraDataDropped { index, size } => write!(
                f,
                "Discarding too much extra metadata in snapshot table entry {index} \
                 ({size} > 1024)"
            ),
            Finding::CorruptionEvent { message, fatal } => {
                if *fatal {
                    write!(
                        f,
                        "qcow2: Marking image as corrupt: {message}; further corruption events \
                         will be suppressed"
                    )
                } else {
                    write!(
                        f,
                        "qcow2: Image is corrupt: {message}; further non-fatal corruption \
                         events will be suppressed"
                    )
                }
            }
            Finding::Message(m) | Finding::Report(m) => f.write_str(m),
        }
    }
}

/// The result of a check, and of a repair with its double check.
///
/// With a repair that fixed something, the counters describe the final
/// state (the "double check" run after the repair) plus the `*_fixed`
/// counts of the repair run, as `qemu-img check -r` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The counters.
    pub counts: CheckCounts,
    /// Every diagnostic line in order (repair run first, then the double check).
    pub findings: Vec<Finding>,
    /// Whether the refcount table and blocks were rebuilt.
    pub rebuilt: bool,
    /// Whether something was repaired and the image was checked a second
    /// time (`qemu-img check` then prints the "The following inconsistencies
    /// were found and repaired" paragraph).
    pub double_checked: bool,
    /// Whether the dirty and corrupt bits were cleared after the repair.
    pub marked_clean: bool,
    /// The file name to report in JSON output.
    pub filename: String,
    /// The image format (`qcow2`).
    pub format: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_texts() {
        let f = Finding::CopiedL2 {
            entry: 0x8000_0000_0005_0000,
            refcount: 0,
            repairing: false,
        };
        assert_eq!(
            f.to_string(),
            "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0"
        );
        let f = Finding::Refcount {
            verdict: RefcountVerdict::Leaked,
            cluster: 0,
            refcount: 2,
            reference: 1,
        };
        assert_eq!(f.to_string(), "Leaked cluster 0 refcount=2 reference=1");
    }
}
