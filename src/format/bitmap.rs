//! The persistent dirty bitmap directory and bitmap tables (spec §4.6).
//!
//! The bitmaps header extension ([`crate::format::header::BitmapsExtension`])
//! points at the bitmap directory: `nb_bitmaps` contiguous entries, each
//! 8-byte aligned:
//!
//! | Offset | Size | Field | Rule enforced by [`decode_bitmap_directory`] (QEMU's) |
//! |---|---|---|---|
//! | 0 | 8 | `bitmap_table_offset` | non-zero, cluster-aligned |
//! | 8 | 4 | `bitmap_table_size` | 1..=2^27 entries, at most 512 MiB of bitmap data |
//! | 12 | 4 | `flags` | bit 0 `in_use`, bit 1 `auto`; others must be 0 |
//! | 16 | 1 | `type` | 1 (dirty tracking bitmap) |
//! | 17 | 1 | `granularity_bits` | 9..=31 |
//! | 18 | 2 | `name_size` | 1..=1023 |
//! | 20 | 4 | `extra_data_size` | must be 0 (QEMU supports no extra data) |
//! | 24 | .. | extra data, then name (no NUL), then zero padding to 8 | |
//!
//! A bitmap table is `bitmap_table_size` big-endian `u64` entries, see
//! [`decode_bitmap_table_entry`].

use super::consts::{MAX_BITMAP_DIRECTORY_BYTES, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::{put_be_u16, put_be_u32, put_be_u64, FormatError, Structure};

/// Size of the fixed part of a bitmap directory entry.
pub const BITMAP_DIR_ENTRY_HEADER_SIZE: u64 = 24;
/// Flag bit 0: the bitmap was not saved cleanly; its data is unusable.
pub const BME_FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap is enabled (tracks writes).
pub const BME_FLAG_AUTO: u32 = 1 << 1;
/// Flag bits QEMU rejects. The spec defines bit 2 (`extra_data_compatible`),
/// but QEMU supports no extra data and treats it as reserved too.
pub const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
/// The only bitmap type: dirty tracking.
pub const BT_DIRTY_TRACKING_BITMAP: u8 = 1;
/// Largest `bitmap_table_size` QEMU accepts.
pub const BME_MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Largest amount of bitmap data (`bitmap_table_size * cluster_size`) QEMU accepts.
pub const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Smallest `granularity_bits` (512-byte granularity).
pub const BME_MIN_GRANULARITY_BITS: u8 = 9;
/// Largest `granularity_bits` (2 GiB granularity).
pub const BME_MAX_GRANULARITY_BITS: u8 = 31;
/// Largest bitmap name in bytes.
pub const BME_MAX_NAME_SIZE: u16 = 1023;
/// Reserved bits of a bitmap table entry (1..=8 and 56..=63).
pub const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Host offset bits of a bitmap table entry.
pub const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of a bitmap table entry without offset: the cluster reads as all ones.
pub const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirEntry {
    /// Host offset of the bitmap table (cluster-aligned).
    pub bitmap_table_offset: u64,
    /// Number of entries in the bitmap table.
    pub bitmap_table_size: u32,
    /// Flags: [`BME_FLAG_IN_USE`], [`BME_FLAG_AUTO`].
    pub flags: u32,
    /// Bitmap type; always [`BT_DIRTY_TRACKING_BITMAP`] once decoded.
    pub bitmap_type: u8,
    /// log2 of the number of guest bytes one bit covers.
    pub granularity_bits: u8,
    /// Bitmap name (UTF-8 here; the spec only says "no NUL terminator").
    pub name: String,
    /// Extra data. Always empty after [`decode_bitmap_directory`], since QEMU
    /// rejects entries with extra data; kept so that the layout is complete.
    pub extra_data: Vec<u8>,
}

impl BitmapDirEntry {
    /// Whether the `in_use` flag is set: the bitmap was not stored cleanly and
    /// its data must not be used.
    pub fn in_use(&self) -> bool {
        self.flags & BME_FLAG_IN_USE != 0
    }

    /// Whether the `auto` flag is set: the bitmap is enabled and tracks writes.
    pub fn auto(&self) -> bool {
        self.flags & BME_FLAG_AUTO != 0
    }

    /// Size of the entry in the directory, padding included.
    pub fn entry_size(&self) -> u64 {
        BITMAP_DIR_ENTRY_HEADER_SIZE
            .saturating_add(self.extra_data.len() as u64)
            .saturating_add(self.name.len() as u64)
            .next_multiple_of(8)
    }

    /// QEMU's last constraint on an entry, which needs the virtual disk size:
    /// a bitmap that is not `in_use` must have a bitmap table large enough to
    /// cover `virtual_size` bytes at its granularity.
    ///
    /// # Errors
    ///
    /// [`crate::format::FormatErrorKind::Invalid`] "Bitmap 'NAME' doesn't
    /// satisfy the constraints" (QEMU's message) if the table is too small.
    pub fn check_covers(&self, virtual_size: u64, cluster_bits: u32) -> Result<(), FormatError> {
        let phys_bytes = u128::from(self.bitmap_table_size) << cluster_bits.min(MAX_CLUSTER_BITS);
        let covered = phys_bytes.saturating_mul(8) << self.granularity_bits.min(64);
        if !self.in_use() && u128::from(virtual_size) > covered {
            return Err(constraint_error(&self.name, None));
        }
        Ok(())
    }
}

/// QEMU's message for an entry that fails `check_dir_entry`.
fn constraint_error(name: &str, offset: Option<u64>) -> FormatError {
    FormatError::invalid(
        Structure::BitmapDirectory,
        offset,
        format!("Bitmap '{name}' doesn't satisfy the constraints"),
    )
}

fn invalid(offset: Option<u64>, reason: impl Into<String>) -> FormatError {
    FormatError::invalid(Structure::BitmapDirectory, offset, reason)
}

/// Checks `cluster_bits` and returns the cluster size.
fn cluster_size(cluster_bits: u32) -> Result<u64, FormatError> {
    if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        Ok(1u64 << cluster_bits)
    } else {
        Err(invalid(
            None,
            format!("Unsupported cluster size: 2^{cluster_bits}"),
        ))
    }
}

/// `N` bytes at `pos` of `bytes`, which the caller has sized.
fn be<const N: usize>(bytes: &[u8], pos: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = pos.checked_add(N).and_then(|end| bytes.get(pos..end)) {
        out.copy_from_slice(src);
    }
    out
}

/// Decodes the bitmap directory as QEMU's `bitmap_list_load` does.
///
/// `buf` is the whole directory: `bitmap_directory_size` bytes read at
/// `bitmap_directory_offset` (from the header's bitmaps extension, which
/// limits it to 64 MiB). Offsets in errors are relative to the directory.
///
/// The check that a bitmap's table covers the virtual disk needs the disk
/// size; it is [`BitmapDirEntry::check_covers`].
///
/// # Errors
///
/// [`crate::format::FormatErrorKind::Invalid`], with QEMU's messages: an empty
/// or oversized directory ("Requested bitmap directory size is zero" / "...
/// is too big"), an entry crossing the end ("Broken bitmap directory"), more or
/// fewer entries than `nb_bitmaps` ("More bitmaps found than specified in
/// header extension" / "Less bitmaps ..."), extra data ("Bitmap extra data is
/// not supported"), an entry failing QEMU's constraints ("Bitmap 'NAME' doesn't
/// satisfy the constraints": zero or misaligned table offset, table size 0 or
/// over 2^27 entries or 512 MiB of data, granularity outside 9..=31, reserved
/// flags, name over 1023 bytes, type other than 1), plus an empty name (the
/// spec forbids it; QEMU does not check) and a name that is not UTF-8, or a
/// `cluster_bits` outside 9..=21.
pub fn decode_bitmap_directory(
    buf: &[u8],
    nb_bitmaps: u32,
    cluster_bits: u32,
) -> Result<Vec<BitmapDirEntry>, FormatError> {
    let cluster_size = cluster_size(cluster_bits)?;
    let size = buf.len() as u64;
    if size == 0 {
        return Err(invalid(None, "Requested bitmap directory size is zero"));
    }
    if size > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(invalid(None, "Requested bitmap directory size is too big"));
    }
    let broken = |at: usize| invalid(Some(at as u64), "Broken bitmap directory");
    let capacity =
        (buf.len() / super::fixed_len(BITMAP_DIR_ENTRY_HEADER_SIZE)).min(nb_bitmaps as usize);
    let mut entries = Vec::with_capacity(capacity);
    let mut pos: usize = 0;
    while pos < buf.len() {
        let at = Some(pos as u64);
        let header = pos
            .checked_add(super::fixed_len(BITMAP_DIR_ENTRY_HEADER_SIZE))
            .and_then(|end| buf.get(pos..end))
            .ok_or_else(|| broken(pos))?;
        if entries.len() >= nb_bitmaps as usize {
            return Err(invalid(
                at,
                "More bitmaps found than specified in header extension",
            ));
        }
        let bitmap_table_offset = u64::from_be_bytes(be(header, 0));
        let bitmap_table_size = u32::from_be_bytes(be(header, 8));
        let flags = u32::from_be_bytes(be(header, 12));
        let [bitmap_type] = be::<1>(header, 16);
        let [granularity_bits] = be::<1>(header, 17);
        let name_size = u16::from_be_bytes(be(header, 18));
        let extra_data_size = u32::from_be_bytes(be(header, 20));

        // 24 + up to 4 GiB + 64 KiB: computed in u64 so it cannot overflow.
        let entry_size =
            (BITMAP_DIR_ENTRY_HEADER_SIZE + u64::from(extra_data_size) + u64::from(name_size))
                .next_multiple_of(8);
        let entry_end = (pos as u64)
            .checked_add(entry_size)
            .filter(|&end| end <= size)
            .ok_or_else(|| broken(pos))?;
        if extra_data_size != 0 {
            return Err(invalid(at, "Bitmap extra data is not supported"));
        }
        let name_start = pos + super::fixed_len(BITMAP_DIR_ENTRY_HEADER_SIZE);
        let name_bytes = buf
            .get(name_start..name_start + usize::from(name_size))
            .ok_or_else(|| broken(pos))?;

        let phys_bytes = u64::from(bitmap_table_size) << cluster_bits;
        let fails = bitmap_table_size == 0
            || bitmap_table_offset == 0
            || bitmap_table_offset % cluster_size != 0
            || bitmap_table_size > BME_MAX_TABLE_SIZE
            || !(BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS).contains(&granularity_bits)
            || flags & BME_RESERVED_FLAGS != 0
            || name_size > BME_MAX_NAME_SIZE
            || name_size == 0
            || bitmap_type != BT_DIRTY_TRACKING_BITMAP
            || phys_bytes > BME_MAX_PHYS_SIZE;
        if fails {
            // QEMU prints the name with %.*s: up to name_size bytes or a NUL.
            let shown = name_bytes.split(|&b| b == 0).next().unwrap_or_default();
            return Err(constraint_error(&String::from_utf8_lossy(shown), at));
        }
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| invalid(at, "Bitmap name is not valid UTF-8"))?;
        entries.push(BitmapDirEntry {
            bitmap_table_offset,
            bitmap_table_size,
            flags,
            bitmap_type,
            granularity_bits,
            name,
            extra_data: Vec::new(),
        });
        // entry_end <= buf.len(), so it fits in usize.
        pos = usize::try_from(entry_end).map_err(|_| broken(pos))?;
    }
    if entries.len() != nb_bitmaps as usize {
        return Err(invalid(
            None,
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(entries)
}

/// Encodes a bitmap directory, entries back to back, each padded to 8 bytes
/// (QEMU's `bitmap_list_store`).
///
/// # Errors
///
/// [`crate::format::FormatErrorKind::Invalid`] if a name exceeds 65535 bytes,
/// extra data exceeds 4 GiB, or the directory would exceed 65535 * 1024 bytes.
pub fn encode_bitmap_directory(entries: &[BitmapDirEntry]) -> Result<Vec<u8>, FormatError> {
    let total = entries
        .iter()
        .fold(0u64, |sum, entry| sum.saturating_add(entry.entry_size()));
    if total > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(invalid(None, "Requested bitmap directory size is too big"));
    }
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for entry in entries {
        let (Ok(name_size), Ok(extra_data_size)) = (
            u16::try_from(entry.name.len()),
            u32::try_from(entry.extra_data.len()),
        ) else {
            return Err(invalid(
                None,
                format!("bitmap {:?}: name or extra data too long", entry.name),
            ));
        };
        let mut header = [0u8; super::fixed_len(BITMAP_DIR_ENTRY_HEADER_SIZE)];
        put_be_u64(&mut header, 0, entry.bitmap_table_offset);
        put_be_u32(&mut header, 8, entry.bitmap_table_size);
        put_be_u32(&mut header, 12, entry.flags);
        if let Some([bitmap_type, granularity_bits]) = header.get_mut(16..18) {
            *bitmap_type = entry.bitmap_type;
            *granularity_bits = entry.granularity_bits;
        }
        put_be_u16(&mut header, 18, name_size);
        put_be_u32(&mut header, 20, extra_data_size);
        out.extend_from_slice(&header);
        out.extend_from_slice(&entry.extra_data);
        out.extend_from_slice(entry.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    Ok(out)
}

/// A decoded bitmap table entry: where one cluster of bitmap data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapTableEntry {
    /// No data cluster; every bit in its range is 0.
    AllZeroes,
    /// No data cluster; every bit in its range is 1.
    AllOnes,
    /// Bitmap data lives in the cluster at this host offset.
    Data(u64),
}

impl BitmapTableEntry {
    /// The on-disk `u64` for this entry.
    pub fn encode(self) -> u64 {
        match self {
            BitmapTableEntry::AllZeroes => 0,
            BitmapTableEntry::AllOnes => BME_TABLE_ENTRY_FLAG_ALL_ONES,
            BitmapTableEntry::Data(offset) => offset & BME_TABLE_ENTRY_OFFSET_MASK,
        }
    }
}

/// Decodes one bitmap table entry with QEMU's `check_table_entry` rules.
///
/// # Errors
///
/// [`crate::format::FormatErrorKind::Invalid`] if reserved bits (1..=8,
/// 56..=63) are set, if an entry with a data offset also has bit 0 set, if the
/// data offset is not cluster-aligned, or if `cluster_bits` is outside 9..=21.
/// (QEMU reports these only as EINVAL while loading or checking a bitmap.)
pub fn decode_bitmap_table_entry(
    raw: u64,
    cluster_bits: u32,
) -> Result<BitmapTableEntry, FormatError> {
    let cluster_size = cluster_size(cluster_bits)?;
    if raw & BME_TABLE_ENTRY_RESERVED_MASK != 0 {
        return Err(invalid(
            None,
            format!("Bitmap table entry {raw:#x} has reserved bits set"),
        ));
    }
    let offset = raw & BME_TABLE_ENTRY_OFFSET_MASK;
    if offset == 0 {
        return Ok(if raw & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 {
            BitmapTableEntry::AllOnes
        } else {
            BitmapTableEntry::AllZeroes
        });
    }
    if raw & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 {
        return Err(invalid(
            None,
            format!("Bitmap table entry {raw:#x} has a data offset and the all-ones flag"),
        ));
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(invalid(
            None,
            format!("Bitmap table entry offset {offset:#x} is not cluster-aligned"),
        ));
    }
    Ok(BitmapTableEntry::Data(offset))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
mod tests {
    use super::*;
    use crate::format::FormatErrorKind;
    use proptest::prelude::*;

    fn entry(name: &str) -> BitmapDirEntry {
        BitmapDirEntry {
            bitmap_table_offset: 0x50000,
            bitmap_table_size: 1,
            flags: BME_FLAG_AUTO,
            bitmap_type: BT_DIRTY_TRACKING_BITMAP,
            granularity_bits: 16,
            name: name.into(),
            extra_data: Vec::new(),
        }
    }

    fn dir(entries: &[BitmapDirEntry]) -> Vec<u8> {
        encode_bitmap_directory(entries).unwrap()
    }

    #[track_caller]
    fn assert_rejects(buf: &[u8], nb: u32, msg: &str) {
        let err = decode_bitmap_directory(buf, nb, 16).expect_err("decode should fail");
        assert_eq!(
            (err.kind, err.reason.as_str()),
            (FormatErrorKind::Invalid, msg)
        );
        assert_eq!(err.what, Structure::BitmapDirectory);
    }

    /// A one-entry directory with `change` applied to the entry first.
    fn mutated(change: impl FnOnce(&mut BitmapDirEntry)) -> Vec<u8> {
        let mut e = entry("bm0");
        change(&mut e);
        dir(&[e])
    }

    #[test]
    fn decodes_entries_and_flags() {
        let mut second = entry("second");
        second.flags = BME_FLAG_IN_USE;
        second.granularity_bits = 17;
        let entries = vec![entry("bm0"), second];
        let buf = dir(&entries);
        assert_eq!(buf.len(), 32 + 32);
        let decoded = decode_bitmap_directory(&buf, 2, 16).unwrap();
        assert_eq!(decoded, entries);
        assert!(decoded[0].auto() && !decoded[0].in_use());
        assert!(decoded[1].in_use() && !decoded[1].auto());
        assert_eq!(decoded[1].entry_size(), 32);
    }

    #[test]
    fn rejects_empty_and_oversized_directories() {
        assert_rejects(&[], 1, "Requested bitmap directory size is zero");
        let big = vec![0u8; MAX_BITMAP_DIRECTORY_BYTES as usize + 1];
        assert_rejects(&big, 1, "Requested bitmap directory size is too big");
    }

    #[test]
    fn rejects_broken_directories() {
        let buf = dir(&[entry("bm0")]);
        assert_rejects(&buf[..16], 1, "Broken bitmap directory");
        // The entry claims a longer name than the directory holds.
        let mut buf = buf;
        put_be_u16(&mut buf, 18, 9);
        assert_rejects(&buf, 1, "Broken bitmap directory");
        // A trailing partial entry.
        let mut buf = dir(&[entry("bm0")]);
        buf.extend_from_slice(&[0; 8]);
        assert_rejects(&buf, 2, "Broken bitmap directory");
    }

    #[test]
    fn rejects_wrong_bitmap_counts() {
        let buf = dir(&[entry("a"), entry("b")]);
        assert_rejects(
            &buf,
            1,
            "More bitmaps found than specified in header extension",
        );
        assert_rejects(
            &buf,
            3,
            "Less bitmaps found than specified in header extension",
        );
        assert_rejects(
            &buf,
            0,
            "More bitmaps found than specified in header extension",
        );
    }

    #[test]
    fn rejects_extra_data() {
        let buf = mutated(|e| e.extra_data = vec![1, 2, 3]);
        assert_rejects(&buf, 1, "Bitmap extra data is not supported");
    }

    #[test]
    fn rejects_each_constraint() {
        let msg = "Bitmap 'bm0' doesn't satisfy the constraints";
        type Change = Box<dyn Fn(&mut BitmapDirEntry)>;
        let cases: Vec<Change> = vec![
            Box::new(|e| e.bitmap_table_size = 0),
            Box::new(|e| e.bitmap_table_offset = 0),
            Box::new(|e| e.bitmap_table_offset = 0x50200),
            Box::new(|e| e.bitmap_table_size = BME_MAX_TABLE_SIZE + 1),
            Box::new(|e| e.bitmap_table_size = 0x2001), // 0x2001 clusters > 512 MiB
            Box::new(|e| e.granularity_bits = 8),
            Box::new(|e| e.granularity_bits = 32),
            Box::new(|e| e.flags = 1 << 2),
            Box::new(|e| e.flags = 1 << 31),
            Box::new(|e| e.bitmap_type = 2),
            Box::new(|e| e.bitmap_type = 0),
        ];
        for change in cases {
            assert_rejects(&mutated(change), 1, msg);
        }
        assert!(decode_bitmap_directory(&mutated(|e| e.bitmap_table_size = 0x2000), 1, 16).is_ok());
        assert!(decode_bitmap_directory(&mutated(|e| e.granularity_bits = 31), 1, 16).is_ok());
        assert!(decode_bitmap_directory(&mutated(|e| e.flags = 3), 1, 16).is_ok());
    }

    #[test]
    fn rejects_bad_names() {
        let long = "n".repeat(1024);
        assert_rejects(
            &mutated(|e| e.name = long.clone()),
            1,
            &format!("Bitmap '{long}' doesn't satisfy the constraints"),
        );
        assert!(decode_bitmap_directory(&mutated(|e| e.name = "n".repeat(1023)), 1, 16).is_ok());
        assert_rejects(
            &mutated(|e| e.name = String::new()),
            1,
            "Bitmap '' doesn't satisfy the constraints",
        );
        let mut buf = dir(&[entry("bm0")]);
        buf[24] = 0xff;
        assert_rejects(&buf, 1, "Bitmap name is not valid UTF-8");
        // The constraint message shows the name up to a NUL, like %.*s.
        let mut buf = mutated(|e| e.bitmap_type = 9);
        buf[25] = 0;
        assert_rejects(&buf, 1, "Bitmap 'b' doesn't satisfy the constraints");
    }

    #[test]
    fn rejects_bad_cluster_bits() {
        assert!(decode_bitmap_directory(&dir(&[entry("a")]), 1, 8).is_err());
        assert!(decode_bitmap_table_entry(0, 22).is_err());
    }

    #[test]
    fn checks_that_the_table_covers_the_disk() {
        // One 64 KiB cluster of bits at 64 KiB granularity covers 32 GiB.
        let mut e = entry("bm0");
        assert!(e.check_covers(32 << 30, 16).is_ok());
        let err = e.check_covers((32 << 30) + 1, 16).unwrap_err();
        assert_eq!(err.reason, "Bitmap 'bm0' doesn't satisfy the constraints");
        e.flags |= BME_FLAG_IN_USE;
        assert!(e.check_covers(u64::MAX, 16).is_ok());
    }

    #[test]
    fn decodes_bitmap_table_entries() {
        assert_eq!(
            decode_bitmap_table_entry(0, 16).unwrap(),
            BitmapTableEntry::AllZeroes
        );
        assert_eq!(
            decode_bitmap_table_entry(1, 16).unwrap(),
            BitmapTableEntry::AllOnes
        );
        assert_eq!(
            decode_bitmap_table_entry(0x70000, 16).unwrap(),
            BitmapTableEntry::Data(0x70000)
        );
        assert!(decode_bitmap_table_entry(0x70001, 16).is_err());
        assert!(decode_bitmap_table_entry(0x70200, 16).is_err());
        assert!(decode_bitmap_table_entry(0x70200, 9).is_ok());
        assert!(decode_bitmap_table_entry(1 << 1, 16).is_err());
        assert!(decode_bitmap_table_entry(1 << 8, 16).is_err());
        assert!(decode_bitmap_table_entry(1 << 56, 16).is_err());
        assert!(decode_bitmap_table_entry(1 << 63, 16).is_err());
        for e in [
            BitmapTableEntry::AllZeroes,
            BitmapTableEntry::AllOnes,
            BitmapTableEntry::Data(0xab_cdef_0000),
        ] {
            assert_eq!(decode_bitmap_table_entry(e.encode(), 16).unwrap(), e);
        }
    }

    fn arb_entry() -> impl Strategy<Value = BitmapDirEntry> {
        (
            1u64..1 << 30,
            1u32..=0x2000,
            0u32..4,
            9u8..=31,
            "[a-zA-Z0-9 _é-]{1,40}",
        )
            .prop_map(
                |(cluster, bitmap_table_size, flags, granularity_bits, name)| BitmapDirEntry {
                    bitmap_table_offset: cluster << 16,
                    bitmap_table_size,
                    flags,
                    bitmap_type: BT_DIRTY_TRACKING_BITMAP,
                    granularity_bits,
                    name,
                    extra_data: Vec::new(),
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_directory_round_trip(entries in prop::collection::vec(arb_entry(), 1..10)) {
            let buf = dir(&entries);
            let decoded = decode_bitmap_directory(&buf, entries.len() as u32, 16).unwrap();
            prop_assert_eq!(&decoded, &entries);
            prop_assert_eq!(dir(&decoded), buf);
        }

        #[test]
        fn prop_table_entry_round_trip(raw in any::<u64>(), cluster_bits in 9u32..=21) {
            if let Ok(entry) = decode_bitmap_table_entry(raw, cluster_bits) {
                prop_assert_eq!(entry.encode(), raw);
            }
        }

        #[test]
        fn prop_decode_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..2048),
            nb in prop_oneof![0u32..4, any::<u32>()],
            cluster_bits in 0u32..70,
        ) {
            let _ = decode_bitmap_directory(&bytes, nb, cluster_bits);
        }

        #[test]
        fn prop_decode_never_panics_on_mutated_directories(
            entries in prop::collection::vec(arb_entry(), 1..4),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            virtual_size in any::<u64>(),
        ) {
            let mut buf = dir(&entries);
            for (at, value) in flips {
                let i = at.index(buf.len());
                buf[i] = value;
            }
            if let Ok(decoded) = decode_bitmap_directory(&buf, entries.len() as u32, 16) {
                for e in decoded {
                    let _ = e.check_covers(virtual_size, 16);
                }
            }
        }
    }

    #[test]
    fn qemu_img_bitmap_directories_round_trip_exactly() {
        use crate::format::header::Header;
        let qemu = std::process::Command::new("qemu-img")
            .arg("--version")
            .output();
        if !qemu.is_ok_and(|o| o.status.success()) {
            println!("skipping: qemu-img not found");
            return;
        }
        let dir_path = tempfile::tempdir().unwrap();
        let path = dir_path.path().join("bitmaps.qcow2");
        let path_str = path.to_str().unwrap();
        for args in [
            &["create", "-q", "-f", "qcow2", path_str, "64M"][..],
            &["bitmap", "--add", path_str, "bm0"],
            &[
                "bitmap",
                "--add",
                "-g",
                "128k",
                "--disable",
                path_str,
                "second",
            ],
        ] {
            let out = std::process::Command::new("qemu-img")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let file = std::fs::read(&path).unwrap();
        let h = Header::decode(&file[..file.len().min(2 << 20)]).unwrap();
        let ext = *h.bitmaps().expect("bitmaps extension");
        assert_eq!(ext.nb_bitmaps, 2);
        let start = ext.bitmap_directory_offset as usize;
        let buf = &file[start..start + ext.bitmap_directory_size as usize];
        let entries = decode_bitmap_directory(buf, ext.nb_bitmaps, h.cluster_bits).unwrap();
        assert_eq!(entries[0].name, "bm0");
        assert!(entries[0].auto());
        assert_eq!(entries[0].granularity_bits, 16);
        assert_eq!(entries[1].name, "second");
        assert!(!entries[1].auto());
        assert_eq!(entries[1].granularity_bits, 17);
        for e in &entries {
            assert!(!e.in_use());
            e.check_covers(h.size, h.cluster_bits).unwrap();
            let table = e.bitmap_table_offset as usize;
            for i in 0..e.bitmap_table_size as usize {
                let raw =
                    u64::from_be_bytes(file[table + 8 * i..table + 8 * i + 8].try_into().unwrap());
                decode_bitmap_table_entry(raw, h.cluster_bits).unwrap();
            }
        }
        assert_eq!(dir(&entries), buf);
    }
}
