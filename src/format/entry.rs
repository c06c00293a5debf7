//! L1 and L2 table entries (spec §2.4–§2.7).
//!
//! | word | bits | meaning |
//! |---|---|---|
//! | L1 | 9..55 | L2 table offset (cluster aligned); 63 COPIED |
//! | L2 standard | 0 zero flag, 9..55 host offset, 62 = 0, 63 COPIED |
//! | L2 compressed | 0..x-1 host byte offset, x..61 extra sectors, 62 = 1 |
//! | extended L2 bitmap | 0..31 allocated subclusters, 32..63 zero subclusters |
//!
//! Entries decode to enums; misaligned offsets and invalid combinations are
//! errors (QEMU treats them as corruption), reserved bits are ignored here and
//! reported by the checker, as QEMU does.

use super::consts::*;

/// The shape parameters needed to decode entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFormat {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// v3 (zero flag allowed) or v2.
    pub version: u32,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Guest data lives in an external data file.
    pub external_data: bool,
}

impl EntryFormat {
    /// Bit position where the compressed sector count starts (`csize_shift`).
    pub fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    /// Mask of the compressed sector count field (`csize_mask`).
    pub fn csize_mask(&self) -> u64 {
        (1u64 << (self.cluster_bits - 8)) - 1
    }
    /// Mask of the compressed host offset (`cluster_offset_mask`).
    pub fn compressed_offset_mask(&self) -> u64 {
        (1u64 << self.csize_shift()) - 1
    }
    fn cluster_mask(&self) -> u64 {
        (1u64 << self.cluster_bits) - 1
    }
}

/// A decoded L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry {
    /// Host offset of the L2 table, 0 if none.
    pub l2_offset: u64,
    /// COPIED: the L2 table's refcount is exactly 1.
    pub copied: bool,
}

impl L1Entry {
    /// Decodes an L1 entry; an L2 offset that is not cluster aligned is an error.
    ///
    /// # Errors
    /// `EntryError::UnalignedL2` with the offset.
    pub fn decode(raw: u64, cluster_bits: u32) -> Result<Self, EntryError> {
        let l2_offset = raw & L1E_OFFSET_MASK;
        if l2_offset & ((1u64 << cluster_bits) - 1) != 0 {
            return Err(EntryError::UnalignedL2 { offset: l2_offset });
        }
        Ok(Self {
            l2_offset,
            copied: raw & OFLAG_COPIED != 0,
        })
    }

    /// Encodes the entry.
    pub fn encode(self) -> u64 {
        (self.l2_offset & L1E_OFFSET_MASK) | if self.copied { OFLAG_COPIED } else { 0 }
    }
}

/// A decoded L2 entry (the first word; see [`Subclusters`] for the bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// No host cluster; reads go to the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster (`ZERO_ALLOC`) or
    /// `None` (`ZERO_PLAIN`).
    Zero {
        /// Preallocated host cluster, if any.
        host: Option<u64>,
        /// COPIED flag.
        copied: bool,
    },
    /// Data at a host cluster (in the data file when external).
    Normal {
        /// Host offset of the cluster.
        host: u64,
        /// COPIED flag.
        copied: bool,
    },
    /// Compressed data starting at a host byte offset.
    Compressed {
        /// Host byte offset of the compressed stream.
        offset: u64,
        /// Number of 512-byte sectors the descriptor covers (`nb_csectors`).
        sectors: u64,
    },
}

/// Why an entry cannot be used (QEMU signals these as corruption).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryError {
    /// L1 entry: L2 table offset not cluster aligned.
    UnalignedL2 {
        /// The offending offset.
        offset: u64,
    },
    /// L2 entry: data cluster offset not cluster aligned.
    UnalignedData {
        /// The offending offset.
        offset: u64,
    },
    /// Zero flag in a v2 image.
    ZeroInV2,
    /// Compressed cluster with an external data file.
    CompressedWithDataFile,
    /// Extended L2 bitmap with an invalid combination.
    InvalidSubclusterBitmap,
    /// External data file: host offset differs from guest offset.
    DataFileOffsetMismatch {
        /// The host offset found.
        host: u64,
    },
}

impl L2Entry {
    /// Decodes the first word of an L2 entry.
    ///
    /// # Errors
    /// See [`EntryError`].
    pub fn decode(raw: u64, fmt: &EntryFormat) -> Result<Self, EntryError> {
        if raw & OFLAG_COMPRESSED != 0 {
            if fmt.external_data {
                return Err(EntryError::CompressedWithDataFile);
            }
            let shift = fmt.csize_shift();
            let offset = raw & fmt.compressed_offset_mask();
            let sectors = ((raw >> shift) & fmt.csize_mask()) + 1;
            return Ok(L2Entry::Compressed { offset, sectors });
        }
        let host = raw & L2E_OFFSET_MASK;
        let copied = raw & OFLAG_COPIED != 0;
        if raw & OFLAG_ZERO != 0 && !fmt.extended_l2 {
            if fmt.version < 3 {
                return Err(EntryError::ZeroInV2);
            }
            if host & fmt.cluster_mask() != 0 {
                return Err(EntryError::UnalignedData { offset: host });
            }
            let host = if host != 0 { Some(host) } else { None };
            return Ok(L2Entry::Zero { host, copied });
        }
        if host == 0 && !(fmt.external_data && copied) {
            return Ok(L2Entry::Unallocated);
        }
        if host & fmt.cluster_mask() != 0 {
            return Err(EntryError::UnalignedData { offset: host });
        }
        Ok(L2Entry::Normal { host, copied })
    }

    /// Encodes the first word of the entry. For `Compressed`, the caller must
    /// pass a valid offset and sector count for `fmt`.
    pub fn encode(self, fmt: &EntryFormat) -> u64 {
        let c = |copied: bool| if copied { OFLAG_COPIED } else { 0 };
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied } => {
                let zero = if fmt.extended_l2 { 0 } else { OFLAG_ZERO };
                (host.unwrap_or(0) & L2E_OFFSET_MASK) | zero | c(copied)
            }
            L2Entry::Normal { host, copied } => (host & L2E_OFFSET_MASK) | c(copied),
            L2Entry::Compressed { offset, sectors } => {
                OFLAG_COMPRESSED
                    | ((sectors.saturating_sub(1) & fmt.csize_mask()) << fmt.csize_shift())
                    | (offset & fmt.compressed_offset_mask())
            }
        }
    }

    /// The host cluster this entry occupies, if any (not for compressed).
    pub fn host_cluster(self) -> Option<u64> {
        match self {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => Some(host),
            _ => None,
        }
    }

    /// The COPIED flag.
    pub fn copied(self) -> bool {
        matches!(
            self,
            L2Entry::Normal { copied: true, .. } | L2Entry::Zero { copied: true, .. }
        )
    }

    /// For a compressed entry: the byte range `[offset, offset + len)` to read.
    pub fn compressed_range(self) -> Option<(u64, u64)> {
        match self {
            L2Entry::Compressed { offset, sectors } => {
                let len = sectors * SECTOR_SIZE - (offset & (SECTOR_SIZE - 1));
                Some((offset, len))
            }
            _ => None,
        }
    }
}

/// How one subcluster (or, without extended L2, one whole cluster) reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// From the backing file (or zeroes).
    Unallocated,
    /// Zeroes.
    Zero,
    /// Data at this host offset (of the subcluster's start).
    Data(u64),
    /// Part of a compressed cluster.
    Compressed,
}

/// The subcluster bitmap of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Subclusters(pub u64);

impl Subclusters {
    /// Every subcluster reads as zero.
    pub const ALL_ZERO: Subclusters = Subclusters(0xffff_ffff_0000_0000);

    /// Allocation bits (low word).
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the low word, by definition"
    )]
    pub fn alloc(self) -> u32 {
        self.0 as u32
    }

    /// Zero bits (high word).
    pub fn zero(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Builds a bitmap from the allocation and zero words.
    pub fn from_parts(alloc: u32, zero: u32) -> Self {
        Subclusters(u64::from(alloc) | (u64::from(zero) << 32))
    }

    /// Validates the bitmap against its entry as QEMU does.
    ///
    /// # Errors
    /// `EntryError::InvalidSubclusterBitmap`.
    pub fn validate(self, entry: L2Entry) -> Result<(), EntryError> {
        match entry {
            L2Entry::Normal { .. } if self.alloc() & self.zero() != 0 => {
                Err(EntryError::InvalidSubclusterBitmap)
            }
            L2Entry::Unallocated if self.alloc() != 0 => Err(EntryError::InvalidSubclusterBitmap),
            // Compressed clusters have no subclusters; QEMU ignores the bitmap
            // on I/O (check reports it).
            _ => Ok(()),
        }
    }
}

/// Classifies subcluster `sc` of an entry (for standard L2 entries pass
/// `Subclusters(0)` and any `sc`; the whole cluster has one state).
pub fn subcluster_state(
    entry: L2Entry,
    bitmap: Subclusters,
    sc: u32,
    extended: bool,
    subcluster_size: u64,
) -> SubclusterState {
    match entry {
        L2Entry::Compressed { .. } => SubclusterState::Compressed,
        L2Entry::Zero { .. } => SubclusterState::Zero,
        L2Entry::Unallocated => {
            if extended && bitmap.zero() & (1 << sc) != 0 {
                SubclusterState::Zero
            } else {
                SubclusterState::Unallocated
            }
        }
        L2Entry::Normal { host, .. } => {
            if !extended {
                return SubclusterState::Data(host);
            }
            if bitmap.alloc() & (1 << sc) != 0 {
                SubclusterState::Data(host + u64::from(sc) * subcluster_size)
            } else if bitmap.zero() & (1 << sc) != 0 {
                SubclusterState::Zero
            } else {
                SubclusterState::Unallocated
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const F64K: EntryFormat = EntryFormat {
        cluster_bits: 16,
        version: 3,
        extended_l2: false,
        external_data: false,
    };

    #[test]
    fn verified_encodings() {
        assert_eq!(
            L2Entry::decode(0x8000_0000_0005_0000, &F64K),
            Ok(L2Entry::Normal {
                host: 0x50000,
                copied: true
            })
        );
        assert_eq!(
            L2Entry::decode(1, &F64K),
            Ok(L2Entry::Zero {
                host: None,
                copied: false
            })
        );
        assert_eq!(
            L2Entry::decode(0x8000_0000_0005_0001, &F64K),
            Ok(L2Entry::Zero {
                host: Some(0x50000),
                copied: true
            })
        );
        // Two compressed clusters packed in one host cluster (spec §2.7).
        let e = L2Entry::decode(0x4000_0000_0005_004f, &F64K).unwrap();
        assert_eq!(
            e,
            L2Entry::Compressed {
                offset: 0x5004f,
                sectors: 1
            }
        );
        assert_eq!(e.compressed_range(), Some((0x5004f, 512 - 0x4f)));
        assert_eq!(L2Entry::decode(0, &F64K), Ok(L2Entry::Unallocated));
    }

    #[test]
    fn rejections() {
        assert_eq!(
            L2Entry::decode(0x8000_0000_0005_0200, &F64K),
            Err(EntryError::UnalignedData { offset: 0x50200 })
        );
        let v2 = EntryFormat { version: 2, ..F64K };
        assert_eq!(L2Entry::decode(1, &v2), Err(EntryError::ZeroInV2));
        let ext = EntryFormat {
            external_data: true,
            ..F64K
        };
        assert_eq!(
            L2Entry::decode(OFLAG_COMPRESSED, &ext),
            Err(EntryError::CompressedWithDataFile)
        );
        assert_eq!(
            L2Entry::decode(OFLAG_COPIED, &ext),
            Ok(L2Entry::Normal {
                host: 0,
                copied: true
            })
        );
        assert_eq!(
            L1Entry::decode(0x40200, 16),
            Err(EntryError::UnalignedL2 { offset: 0x40200 })
        );
        let b = Subclusters::from_parts(1, 1);
        assert!(b
            .validate(L2Entry::Normal {
                host: 0x10000,
                copied: true
            })
            .is_err());
        assert!(Subclusters::from_parts(1, 0)
            .validate(L2Entry::Unallocated)
            .is_err());
    }

    #[test]
    fn subclusters() {
        let e = L2Entry::Normal {
            host: 0x50000,
            copied: true,
        };
        let b = Subclusters(0x0000_0004_0000_0001);
        assert_eq!(
            subcluster_state(e, b, 0, true, 2048),
            SubclusterState::Data(0x50000)
        );
        assert_eq!(
            subcluster_state(e, b, 1, true, 2048),
            SubclusterState::Unallocated
        );
        assert_eq!(subcluster_state(e, b, 2, true, 2048), SubclusterState::Zero);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn l2_round_trip(raw in any::<u64>(), bits in 9u32..=21, v3 in any::<bool>()) {
            let fmt = EntryFormat { cluster_bits: bits, version: if v3 { 3 } else { 2 },
                extended_l2: false, external_data: false };
            if let Ok(e) = L2Entry::decode(raw, &fmt) {
                let enc = e.encode(&fmt);
                prop_assert_eq!(L2Entry::decode(enc, &fmt), Ok(e));
                // Re-encoding only drops reserved bits.
                if !matches!(e, L2Entry::Compressed { .. }) {
                    prop_assert_eq!(enc, raw & !L2E_STD_RESERVED_MASK & !(if e == L2Entry::Unallocated { u64::MAX } else { 0 }));
                }
            }
        }

        #[test]
        fn l1_round_trip(raw in any::<u64>(), bits in 9u32..=21) {
            if let Ok(e) = L1Entry::decode(raw, bits) {
                prop_assert_eq!(e.encode(), raw & !L1E_RESERVED_MASK);
            }
        }
    }
}
