//! Magic numbers, masks and limits of the qcow2 format (spec §1–§3, limits §13.1).
//!
//! Public are the values a tool reading or crafting images needs next to the
//! decoders of [`format`](crate::format): the magic, the feature bits of the
//! header, the header extension types, the `crypt_method` values, the masks
//! and flags of table entries, the valid cluster and refcount widths, and the
//! table sizes QEMU refuses to open. The rest (header lengths, reserved-bit
//! masks, the crate's own limits and masks of understood features) are
//! implementation details of the decoders and the engine, private to the
//! crate.

/// `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Length of a v2 header.
pub(crate) const V2_HEADER_LENGTH: u32 = 72;
/// Minimum length of a v3 header.
pub(crate) const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Header length QEMU 10 writes for new v3 images (fields through `compression_type` + padding).
pub(crate) const V3_HEADER_LENGTH: u32 = 112;

/// Smallest supported `cluster_bits` (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported `cluster_bits` (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest `refcount_order` (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;

/// Incompatible feature bit 0: refcounts may be inconsistent.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: non-default compression type.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this crate understands.
pub(crate) const INCOMPAT_MASK: u64 = 0x1f;

/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Every autoclear bit this crate understands.
pub(crate) const AUTOCLEAR_MASK: u64 = 0x3;

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0x0000_0000;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// `crypt_method`: legacy AES-CBC encryption (QEMU's `QCOW_CRYPT_AES`).
pub const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS encryption (QEMU's `QCOW_CRYPT_LUKS`).
pub const CRYPT_LUKS: u32 = 2;

/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Host offset bits of an L1 entry.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub(crate) const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Host offset bits of a standard L2 entry.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard L2 entry.
pub(crate) const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// COPIED flag (bit 63) of L1 and L2 entries.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Compressed flag (bit 62) of L2 entries.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Zero flag (bit 0) of standard L2 entries.
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry.
pub(crate) const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Largest active L1 table QEMU opens: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots.
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table: 64 MiB.
pub(crate) const MAX_SNAPSHOT_TABLE_BYTES: u64 = 65536 * 1024;
/// Largest amount of extra data in one snapshot table entry.
pub(crate) const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Largest backing file name.
pub(crate) const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Largest number of persistent bitmaps.
pub(crate) const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory.
pub(crate) const MAX_BITMAP_DIRECTORY_BYTES: u64 = 65535 * 1024;
/// Host offsets must stay below 2^56 (64 PiB).
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Number of subclusters per cluster with extended L2 entries.
pub(crate) const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// Sector size used by compressed cluster descriptors.
pub(crate) const SECTOR_SIZE: u64 = 512;
