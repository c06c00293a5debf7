//! The internal snapshot table (spec §4.1, §4.2, limits §13.1).
//!
//! The table holds `nb_snapshots` variable-sized entries, each starting at an
//! 8-byte aligned host offset:
//!
//! | Offset | Size | Field | Notes |
//! |---|---|---|---|
//! | 0 | 8 | `l1_table_offset` | the snapshot's copy of the L1 table |
//! | 8 | 4 | `l1_size` | entries in that L1 table |
//! | 12 | 2 | `id_str_size` | |
//! | 14 | 2 | `name_size` | |
//! | 16 | 4 | `date_sec` | |
//! | 20 | 4 | `date_nsec` | |
//! | 24 | 8 | `vm_clock_nsec` | |
//! | 32 | 4 | `vm_state_size` | 0 when the size does not fit in 32 bits |
//! | 36 | 4 | `extra_data_size` | at most 1024 (QEMU's limit) |
//! | 40 | 8 | extra: `vm_state_size_large` | if `extra_data_size >= 8` |
//! | 48 | 8 | extra: `disk_size` | if `extra_data_size >= 16` (required in v3) |
//! | 56 | 8 | extra: `icount` | if `extra_data_size >= 24`; -1 = no icount |
//! | 64 | .. | unknown extra data | preserved |
//! | 40 + extra | `id_str_size` | ID string | not NUL-terminated |
//! | .. | `name_size` | name | not NUL-terminated |
//!
//! The whole table may not exceed 64 MiB. Decoding mirrors QEMU's
//! `qcow2_read_snapshots` (not its `check -r all` repair mode, which truncates
//! instead of failing); encoding mirrors `qcow2_write_snapshots`.

use super::consts::{
    MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA,
    MAX_SNAPSHOT_TABLE_BYTES, MIN_CLUSTER_BITS,
};
use super::{put_be_u16, put_be_u32, put_be_u64, FormatError, FormatErrorKind, Structure};

/// Size of the fixed part of an entry (`QCowSnapshotHeader`).
pub const SNAPSHOT_HEADER_SIZE: u64 = 40;
/// Size of the extra data QEMU 10 knows and writes (`vm_state_size_large`,
/// `disk_size`, `icount`).
pub const SNAPSHOT_KNOWN_EXTRA_DATA: u32 = 24;
/// Extra data a v3 entry needs at least (`vm_state_size_large` and `disk_size`).
pub const SNAPSHOT_V3_MIN_EXTRA_DATA: u32 = 16;
/// Size of an L1 entry.
const L1_ENTRY_LEN: u64 = 8;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table (see [`SnapshotEntry::validate_l1`]).
    pub l1_table_offset: u64,
    /// Number of entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string (QEMU uses decimal numbers).
    pub id: String,
    /// Name given by the user.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Sub-second part of the creation time, in nanoseconds.
    pub date_nsec: u32,
    /// Guest run time at snapshot creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state: `vm_state_size_large` if present, else the
    /// 32-bit field.
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time, if the entry records it
    /// (`extra_data_size >= 16`). QEMU assumes the current size otherwise.
    pub disk_size: Option<u64>,
    /// Record/replay instruction count, if present (`extra_data_size >= 24`);
    /// `u64::MAX` (-1) means icount was off. QEMU assumes -1 when absent.
    pub icount: Option<u64>,
    /// `extra_data_size` as read.
    pub extra_data_size: u32,
    /// Extra data beyond the 24 bytes QEMU knows, preserved verbatim
    /// (`extra_data_size - 24` bytes when `extra_data_size > 24`).
    pub unknown_extra: Vec<u8>,
}

impl SnapshotEntry {
    /// Checks the snapshot's L1 table pointer as QEMU does before using it
    /// (apply, delete): at most 32 MiB of entries, at a cluster-aligned offset
    /// whose end stays within `i64::MAX`.
    ///
    /// # Errors
    ///
    /// [`FormatErrorKind::TooLarge`] "Snapshot L1 table too large",
    /// [`FormatErrorKind::Invalid`] "Snapshot L1 table offset invalid", or
    /// `Invalid` if `cluster_bits` is outside 9..=21.
    pub fn validate_l1(&self, cluster_bits: u32) -> Result<(), FormatError> {
        let err = |kind, reason: &str| {
            FormatError::new(kind, Structure::L1Table, Some(self.l1_table_offset), reason)
        };
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(err(
                FormatErrorKind::Invalid,
                &format!("Unsupported cluster size: 2^{cluster_bits}"),
            ));
        }
        let entries = u64::from(self.l1_size);
        if entries > MAX_L1_BYTES / L1_ENTRY_LEN {
            return Err(err(
                FormatErrorKind::TooLarge,
                "Snapshot L1 table too large",
            ));
        }
        let table_bytes = entries * L1_ENTRY_LEN; // <= 32 MiB
        let fits = (i64::MAX as u64)
            .checked_sub(table_bytes)
            .is_some_and(|room| self.l1_table_offset <= room);
        let aligned = self.l1_table_offset.is_multiple_of(1u64 << cluster_bits);
        if !fits || !aligned {
            return Err(err(
                FormatErrorKind::Invalid,
                "Snapshot L1 table offset invalid",
            ));
        }
        Ok(())
    }

    /// Whether the entry has all the extra data its image version requires:
    /// v3 entries need at least 16 bytes (`qemu-img check` reports
    /// "snapshot table entry N is incomplete" otherwise).
    pub fn is_complete(&self, version: u32) -> bool {
        version < 3 || self.extra_data_size >= SNAPSHOT_V3_MIN_EXTRA_DATA
    }

    /// The `extra_data_size` QEMU 10 writes for this entry: at least 24.
    fn written_extra_data_size(&self) -> u32 {
        self.extra_data_size.max(SNAPSHOT_KNOWN_EXTRA_DATA)
    }

    /// Length of the entry as written, without the padding before the next one.
    fn written_len(&self) -> u64 {
        SNAPSHOT_HEADER_SIZE
            .saturating_add(self.written_extra_data_size().into())
            .saturating_add(self.id.len() as u64)
            .saturating_add(self.name.len() as u64)
    }
}

/// Size in bytes of the table [`encode_snapshot_table`] writes for `entries`:
/// each entry starts 8-byte aligned, and the last one is not padded
/// (QEMU allocates exactly this many bytes).
pub fn snapshot_table_size(entries: &[SnapshotEntry]) -> u64 {
    entries.iter().fold(0u64, |offset, entry| {
        offset
            .next_multiple_of(8)
            .saturating_add(entry.written_len())
    })
}

/// Where the decoder is and what it is decoding, for error messages.
struct TableReader<'a> {
    buf: &'a [u8],
    table_offset: u64,
}

impl TableReader<'_> {
    /// `len` bytes at host offset `pos` of the table, or the error QEMU's
    /// limits imply: past 64 MiB the table is too big, otherwise the caller's
    /// buffer (the file) ended early.
    fn bytes(&self, pos: u64, len: u64, index: u32, entry_at: u64) -> Result<&[u8], FormatError> {
        let rel_start = pos.checked_sub(self.table_offset);
        let rel_end = rel_start.and_then(|start| start.checked_add(len));
        let Some((start, end)) = rel_start.zip(rel_end) else {
            return Err(too_big(entry_at));
        };
        let slice = usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(start, end)| self.buf.get(start..end));
        match slice {
            Some(slice) => Ok(slice),
            None if end > MAX_SNAPSHOT_TABLE_BYTES => Err(too_big(entry_at)),
            None => Err(FormatError::invalid(
                Structure::SnapshotTable,
                Some(entry_at),
                format!("Snapshot table is truncated at entry {index}"),
            )),
        }
    }
}

fn too_big(entry_at: u64) -> FormatError {
    FormatError::new(
        FormatErrorKind::TooLarge,
        Structure::SnapshotTable,
        Some(entry_at),
        "Snapshot table is too big",
    )
}

/// Big-endian integer of `N` bytes at `pos` of `bytes` (which the caller sized).
fn be<const N: usize>(bytes: &[u8], pos: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = pos.checked_add(N).and_then(|end| bytes.get(pos..end)) {
        out.copy_from_slice(src);
    }
    out
}

/// Decodes `nb_snapshots` entries of the snapshot table as QEMU does on open.
///
/// `buf` holds the table, starting at host offset `table_offset` (the header's
/// `snapshots_offset`): pass `min(64 MiB, file length - table_offset)` bytes.
/// `version` is the image's header version (2 or 3); v3 entries with less
/// than 16 bytes of extra data are accepted, as QEMU opens them (see
/// [`SnapshotEntry::is_complete`]).
///
/// # Errors
///
/// [`FormatErrorKind::TooLarge`] for `nb_snapshots > 65536` ("Snapshot table
/// too large"), more than 1024 bytes of extra data in an entry ("Too much extra
/// metadata in snapshot table entry N") or a table over 64 MiB ("Snapshot table
/// is too big"); [`FormatErrorKind::Invalid`] if `buf` ends inside an entry
/// ("Snapshot table is truncated at entry N"; QEMU would read zeros past the
/// end of the file) or an ID or name is not UTF-8;
/// [`FormatErrorKind::Unsupported`] for a version other than 2 or 3.
pub fn decode_snapshot_table(
    buf: &[u8],
    nb_snapshots: u32,
    version: u32,
    table_offset: u64,
) -> Result<Vec<SnapshotEntry>, FormatError> {
    if !(2..=3).contains(&version) {
        return Err(FormatError::new(
            FormatErrorKind::Unsupported,
            Structure::Header,
            Some(4),
            format!("Unsupported qcow2 version {version}"),
        ));
    }
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(FormatError::new(
            FormatErrorKind::TooLarge,
            Structure::SnapshotTable,
            Some(table_offset),
            "Snapshot table too large",
        ));
    }
    let reader = TableReader { buf, table_offset };
    // Each entry takes at least 40 bytes, so this bounds the allocation by `buf`.
    let capacity = (buf.len() / super::fixed_len(SNAPSHOT_HEADER_SIZE)).min(nb_snapshots as usize);
    let mut entries = Vec::with_capacity(capacity);
    let mut pos = table_offset;
    let mut table_length: u64 = 0;
    for index in 0..nb_snapshots {
        table_length = table_length.next_multiple_of(8);
        let entry_at = pos
            .checked_next_multiple_of(8)
            .ok_or_else(|| too_big(pos))?;
        let header = reader.bytes(entry_at, SNAPSHOT_HEADER_SIZE, index, entry_at)?;
        let l1_table_offset = u64::from_be_bytes(be(header, 0));
        let l1_size = u32::from_be_bytes(be(header, 8));
        let id_size = u16::from_be_bytes(be(header, 12));
        let name_size = u16::from_be_bytes(be(header, 14));
        let date_sec = u32::from_be_bytes(be(header, 16));
        let date_nsec = u32::from_be_bytes(be(header, 20));
        let vm_clock_nsec = u64::from_be_bytes(be(header, 24));
        let vm_state_size_small = u32::from_be_bytes(be(header, 32));
        let extra_data_size = u32::from_be_bytes(be(header, 36));
        if extra_data_size > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(FormatError::new(
                FormatErrorKind::TooLarge,
                Structure::SnapshotTable,
                Some(entry_at),
                format!("Too much extra metadata in snapshot table entry {index}"),
            ));
        }
        // Host offsets may come from anywhere: overflowing u64 means "too big".
        let add = |a: u64, b: u64| a.checked_add(b).ok_or_else(|| too_big(entry_at));
        let extra_at = add(entry_at, SNAPSHOT_HEADER_SIZE)?;
        let extra = reader.bytes(extra_at, extra_data_size.into(), index, entry_at)?;
        let field = |at: usize| {
            extra
                .get(at..at + 8)
                .map(|_| u64::from_be_bytes(be(extra, at)))
        };
        let vm_state_size = field(0).unwrap_or(vm_state_size_small.into());
        let disk_size = field(8);
        let icount = field(16);
        let unknown_extra = extra
            .get(SNAPSHOT_KNOWN_EXTRA_DATA as usize..)
            .unwrap_or_default()
            .to_vec();

        let id_at = add(extra_at, extra_data_size.into())?;
        let id = reader.bytes(id_at, id_size.into(), index, entry_at)?;
        let name_at = add(id_at, id_size.into())?;
        let name = reader.bytes(name_at, name_size.into(), index, entry_at)?;
        let utf8 = |bytes: &[u8], what: &str| {
            String::from_utf8(bytes.to_vec()).map_err(|_| {
                FormatError::invalid(
                    Structure::SnapshotTable,
                    Some(entry_at),
                    format!("Snapshot table entry {index} has a {what} that is not valid UTF-8"),
                )
            })
        };
        let id = utf8(id, "ID")?;
        let name = utf8(name, "name")?;
        pos = add(name_at, name_size.into())?;

        table_length += SNAPSHOT_HEADER_SIZE
            + u64::from(extra_data_size)
            + u64::from(id_size)
            + u64::from(name_size);
        // pos >= table_offset: every read above succeeded relative to it.
        let span = pos.saturating_sub(table_offset);
        if table_length > MAX_SNAPSHOT_TABLE_BYTES || span > i32::MAX as u64 {
            return Err(too_big(entry_at));
        }
        entries.push(SnapshotEntry {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            extra_data_size,
            unknown_extra,
        });
    }
    Ok(entries)
}

/// Encodes a snapshot table as QEMU 10's `qcow2_write_snapshots`: entries
/// 8-byte aligned (no padding after the last), `extra_data_size` =
/// `max(24, entry.extra_data_size)` holding `vm_state_size_large`, `disk_size`,
/// `icount` (`u64::MAX` when `None`) and then `unknown_extra`; the 32-bit
/// `vm_state_size` is 0 if the size does not fit.
///
/// The result is [`snapshot_table_size`] bytes long. Decoding it gives back
/// the entries with `extra_data_size` raised to at least 24 and `icount`
/// `Some(u64::MAX)` where it was `None`.
///
/// # Errors
///
/// [`FormatErrorKind::TooLarge`] for more than 65536 entries ("Snapshot table
/// too large"), a table over 64 MiB ("Snapshot table is too big") or more than
/// 1024 bytes of extra data in an entry; [`FormatErrorKind::Invalid`] if an ID
/// or name is longer than 65535 bytes, `unknown_extra` does not have
/// `extra_data_size - 24` bytes, or `disk_size` is `None` (QEMU writes the
/// current virtual size there: fill it in first).
pub fn encode_snapshot_table(entries: &[SnapshotEntry]) -> Result<Vec<u8>, FormatError> {
    let err = |kind, reason: String| FormatError::new(kind, Structure::SnapshotTable, None, reason);
    if entries.len() > MAX_SNAPSHOTS as usize {
        return Err(err(
            FormatErrorKind::TooLarge,
            "Snapshot table too large".into(),
        ));
    }
    let total = snapshot_table_size(entries);
    if total > MAX_SNAPSHOT_TABLE_BYTES {
        return Err(err(
            FormatErrorKind::TooLarge,
            "Snapshot table is too big".into(),
        ));
    }
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for (index, entry) in entries.iter().enumerate() {
        let extra_data_size = entry.written_extra_data_size();
        if extra_data_size > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(err(
                FormatErrorKind::TooLarge,
                format!("Too much extra metadata in snapshot table entry {index}"),
            ));
        }
        let unknown_len = (extra_data_size - SNAPSHOT_KNOWN_EXTRA_DATA) as usize;
        if entry.unknown_extra.len() != unknown_len {
            return Err(err(
                FormatErrorKind::Invalid,
                format!(
                    "snapshot table entry {index} has {} bytes of unknown extra data, but \
                     extra_data_size {} implies {unknown_len}",
                    entry.unknown_extra.len(),
                    entry.extra_data_size
                ),
            ));
        }
        let (Ok(id_size), Ok(name_size)) = (
            u16::try_from(entry.id.len()),
            u16::try_from(entry.name.len()),
        ) else {
            return Err(err(
                FormatErrorKind::Invalid,
                format!("snapshot table entry {index} has an ID or name over 65535 bytes"),
            ));
        };
        let Some(disk_size) = entry.disk_size else {
            return Err(err(
                FormatErrorKind::Invalid,
                format!("snapshot table entry {index} has no disk size"),
            ));
        };
        out.resize(out.len().next_multiple_of(8), 0);
        let mut fixed = [0u8; super::fixed_len(SNAPSHOT_HEADER_SIZE + 24)];
        put_be_u64(&mut fixed, 0, entry.l1_table_offset);
        put_be_u32(&mut fixed, 8, entry.l1_size);
        put_be_u16(&mut fixed, 12, id_size);
        put_be_u16(&mut fixed, 14, name_size);
        put_be_u32(&mut fixed, 16, entry.date_sec);
        put_be_u32(&mut fixed, 20, entry.date_nsec);
        put_be_u64(&mut fixed, 24, entry.vm_clock_nsec);
        put_be_u32(
            &mut fixed,
            32,
            u32::try_from(entry.vm_state_size).unwrap_or(0),
        );
        put_be_u32(&mut fixed, 36, extra_data_size);
        put_be_u64(&mut fixed, 40, entry.vm_state_size);
        put_be_u64(&mut fixed, 48, disk_size);
        put_be_u64(&mut fixed, 56, entry.icount.unwrap_or(u64::MAX));
        out.extend_from_slice(&fixed);
        out.extend_from_slice(&entry.unknown_extra);
        out.extend_from_slice(entry.id.as_bytes());
        out.extend_from_slice(entry.name.as_bytes());
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x70000,
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 123,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(0x100_0000),
            icount: Some(0),
            extra_data_size: 24,
            unknown_extra: Vec::new(),
        }
    }

    /// A raw entry: 40-byte header, `extra`, ID, name (no padding).
    fn raw_entry(extra_data_size: u32, extra: &[u8], id: &[u8], name: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 40];
        put_be_u64(&mut e, 0, 0x70000);
        put_be_u32(&mut e, 8, 1);
        put_be_u16(&mut e, 12, id.len() as u16);
        put_be_u16(&mut e, 14, name.len() as u16);
        put_be_u32(&mut e, 32, 0x1234);
        put_be_u32(&mut e, 36, extra_data_size);
        e.extend_from_slice(extra);
        e.extend_from_slice(id);
        e.extend_from_slice(name);
        e
    }

    #[track_caller]
    fn assert_rejects(buf: &[u8], nb: u32, kind: FormatErrorKind, msg: &str) {
        let err = decode_snapshot_table(buf, nb, 3, 0x50000).expect_err("decode should fail");
        assert_eq!((err.kind, err.reason.as_str()), (kind, msg));
        assert_eq!(err.what, Structure::SnapshotTable);
    }

    #[test]
    fn encodes_the_spec_example_entry() {
        // Spec §4.2: snapshot "snap1", ID "1": 70 bytes.
        let table = encode_snapshot_table(&[entry("1", "snap1")]).unwrap();
        assert_eq!(table.len(), 70);
        assert_eq!(snapshot_table_size(&[entry("1", "snap1")]), 70);
        assert_eq!(&table[36..40], &24u32.to_be_bytes());
        assert_eq!(&table[48..56], &0x100_0000u64.to_be_bytes());
        assert_eq!(&table[64..], b"1snap1");
        let two = [entry("1", "snap1"), entry("2", "b")];
        let table = encode_snapshot_table(&two).unwrap();
        assert_eq!(table.len(), 72 + 66);
        assert_eq!(snapshot_table_size(&two), 72 + 66);
        assert_eq!(&table[70..72], &[0, 0]);
        assert_eq!(decode_snapshot_table(&table, 2, 3, 0x50000).unwrap(), two);
    }

    #[test]
    fn decodes_short_extra_data() {
        // No extra data (old v2 entries): 32-bit VM state size, no disk size.
        let t = raw_entry(0, &[], b"1", b"a");
        let e = &decode_snapshot_table(&t, 1, 2, 0).unwrap()[0];
        assert_eq!(
            (e.vm_state_size, e.disk_size, e.icount),
            (0x1234, None, None)
        );
        assert!(e.is_complete(2));
        assert!(!e.is_complete(3));
        // 8 bytes: the large VM state size replaces the 32-bit one.
        let t = raw_entry(8, &5u64.to_be_bytes(), b"1", b"a");
        let e = &decode_snapshot_table(&t, 1, 3, 0).unwrap()[0];
        assert_eq!((e.vm_state_size, e.disk_size, e.icount), (5, None, None));
        // 20 bytes: disk size, and half an icount that QEMU ignores.
        let mut extra = vec![0u8; 20];
        put_be_u64(&mut extra, 8, 77);
        let t = raw_entry(20, &extra, b"1", b"a");
        let e = decode_snapshot_table(&t, 1, 3, 0).unwrap().remove(0);
        assert_eq!(
            (e.vm_state_size, e.disk_size, e.icount),
            (0, Some(77), None)
        );
        assert!(e.is_complete(3));
        // Re-encoding writes QEMU 10's 24 bytes, icount -1.
        let again = decode_snapshot_table(
            &encode_snapshot_table(std::slice::from_ref(&e)).unwrap(),
            1,
            3,
            0,
        )
        .unwrap();
        assert_eq!(again[0].extra_data_size, 24);
        assert_eq!(again[0].icount, Some(u64::MAX));
        assert_eq!(again[0].disk_size, Some(77));
    }

    #[test]
    fn keeps_unknown_extra_data() {
        let mut extra = vec![0u8; 24];
        extra.extend_from_slice(b"future!");
        let mut t = raw_entry(31, &extra, b"7", b"x");
        put_be_u32(&mut t, 32, 0); // vm_state_size_large (0) is what gets written back
        let e = decode_snapshot_table(&t, 1, 3, 0).unwrap().remove(0);
        assert_eq!(e.unknown_extra, b"future!");
        assert_eq!(encode_snapshot_table(&[e]).unwrap(), t);
    }

    #[test]
    fn entries_are_aligned_on_host_offsets() {
        // Table at an offset that is 4 mod 8: QEMU aligns the *host* offset of
        // every entry, the first included: entries at 0x50008 and 0x50050.
        let mut t = vec![0xee; 4];
        t.extend_from_slice(&raw_entry(24, &[0; 24], b"1", b"ab")); // 67 bytes
        t.resize(0x4c, 0xee);
        t.extend_from_slice(&raw_entry(24, &[0; 24], b"2", b"c"));
        let entries = decode_snapshot_table(&t, 2, 3, 0x50004).unwrap();
        assert_eq!(entries[1].id, "2");
        assert_eq!(entries[1].name, "c");
    }

    #[test]
    fn rejects_bad_version() {
        let err = decode_snapshot_table(&[], 0, 4, 0).unwrap_err();
        assert_eq!(err.kind, FormatErrorKind::Unsupported);
    }

    #[test]
    fn rejects_too_many_snapshots() {
        assert_rejects(
            &[],
            65537,
            FormatErrorKind::TooLarge,
            "Snapshot table too large",
        );
        assert_eq!(decode_snapshot_table(&[], 0, 3, 0).unwrap(), vec![]);
    }

    #[test]
    fn rejects_too_much_extra_data() {
        let mut t = encode_snapshot_table(&[entry("1", "a")]).unwrap();
        t.resize(72, 0);
        t.extend_from_slice(&raw_entry(1025, &[0; 1025], b"2", b"b"));
        assert_rejects(
            &t,
            2,
            FormatErrorKind::TooLarge,
            "Too much extra metadata in snapshot table entry 1",
        );
        let mut t = encode_snapshot_table(&[entry("1", "a")]).unwrap();
        t.resize(72, 0);
        t.extend_from_slice(&raw_entry(1024, &[0; 1024], b"2", b"b"));
        assert_eq!(
            decode_snapshot_table(&t, 2, 3, 0x50000).unwrap()[1]
                .unknown_extra
                .len(),
            1000
        );
    }

    #[test]
    fn rejects_truncated_tables_with_the_entry_index() {
        let t = encode_snapshot_table(&[entry("1", "first"), entry("2", "second")]).unwrap();
        let second = 72;
        for (cut, index) in [
            (0, 0),
            (39, 0),
            (60, 0),
            (68, 0),
            (second + 10, 1),
            (t.len() - 1, 1),
        ] {
            let err = decode_snapshot_table(&t[..cut], 2, 3, 0x50000).unwrap_err();
            assert_eq!(
                err.reason,
                format!("Snapshot table is truncated at entry {index}"),
                "cut {cut}"
            );
            assert_eq!(err.kind, FormatErrorKind::Invalid);
        }
        // Asking for more entries than the buffer holds.
        assert_rejects(
            &t,
            3,
            FormatErrorKind::Invalid,
            "Snapshot table is truncated at entry 2",
        );
        assert_eq!(decode_snapshot_table(&t, 2, 3, 0x50000).unwrap().len(), 2);
    }

    #[test]
    fn rejects_tables_over_64_mib() {
        // Entries of 40 + 65535 + 65535 bytes (131112 with padding): entry 511
        // ends past 64 MiB.
        let id = vec![b'i'; 65535];
        let name = vec![b'n'; 65535];
        let one = raw_entry(0, &[], &id, &name);
        let mut t = Vec::with_capacity(68 << 20);
        for _ in 0..512 {
            t.extend_from_slice(&one);
            t.resize(t.len().next_multiple_of(8), 0);
        }
        assert_rejects(
            &t,
            512,
            FormatErrorKind::TooLarge,
            "Snapshot table is too big",
        );
        assert_eq!(
            decode_snapshot_table(&t, 511, 3, 0x50000).unwrap().len(),
            511
        );
        // A buffer that ends early is "truncated" below 64 MiB, "too big" beyond.
        assert_rejects(
            &t[..1 << 20],
            512,
            FormatErrorKind::Invalid,
            "Snapshot table is truncated at entry 7",
        );
        // Host offsets that overflow u64 count as too big, not as a panic.
        let mut near_end = one[..40].to_vec();
        put_be_u16(&mut near_end, 14, 0);
        near_end.extend_from_slice(&id);
        let err = decode_snapshot_table(&near_end, 1, 3, u64::MAX - 47).unwrap_err();
        assert_eq!(err.reason, "Snapshot table is too big");
    }

    #[test]
    fn rejects_non_utf8_names() {
        let t = raw_entry(24, &[0; 24], b"1", &[0xff, 0xfe]);
        assert_rejects(
            &t,
            1,
            FormatErrorKind::Invalid,
            "Snapshot table entry 0 has a name that is not valid UTF-8",
        );
    }

    #[test]
    fn validates_snapshot_l1_tables() {
        let mut e = entry("1", "a");
        assert!(e.validate_l1(16).is_ok());
        e.l1_table_offset = 0x70200;
        let err = e.validate_l1(16).unwrap_err();
        assert_eq!(
            (err.kind, err.reason.as_str()),
            (FormatErrorKind::Invalid, "Snapshot L1 table offset invalid")
        );
        assert!(e.validate_l1(9).is_ok());
        e.l1_size = 4 * 1024 * 1024 + 1;
        let err = e.validate_l1(9).unwrap_err();
        assert_eq!(
            (err.kind, err.reason.as_str()),
            (FormatErrorKind::TooLarge, "Snapshot L1 table too large")
        );
        e.l1_size = 0x2000;
        e.l1_table_offset = 0x7fff_ffff_ffff_0000;
        assert_eq!(
            e.validate_l1(16).unwrap_err().reason,
            "Snapshot L1 table offset invalid"
        );
        e.l1_size = 0x1fff;
        assert!(e.validate_l1(16).is_ok());
        assert!(e.validate_l1(22).is_err());
        assert!(e.validate_l1(64).is_err());
    }

    #[test]
    fn encode_refuses_unrepresentable_entries() {
        let mut e = entry("1", "a");
        e.disk_size = None;
        assert_eq!(
            encode_snapshot_table(&[e]).unwrap_err().reason,
            "snapshot table entry 0 has no disk size"
        );
        let mut e = entry("1", "a");
        e.extra_data_size = 30;
        assert!(encode_snapshot_table(std::slice::from_ref(&e)).is_err());
        e.unknown_extra = vec![0; 6];
        assert!(encode_snapshot_table(std::slice::from_ref(&e)).is_ok());
        e.extra_data_size = 1025;
        e.unknown_extra = vec![0; 1001];
        assert_eq!(
            encode_snapshot_table(&[e]).unwrap_err().kind,
            FormatErrorKind::TooLarge
        );
        let mut e = entry("1", "a");
        e.unknown_extra = vec![1];
        assert!(encode_snapshot_table(&[e]).is_err());
        let e = entry(&"9".repeat(65536), "a");
        assert!(encode_snapshot_table(&[e]).is_err());
        let many = vec![entry("1", ""); 65537];
        assert_eq!(
            encode_snapshot_table(&many).unwrap_err().reason,
            "Snapshot table too large"
        );
    }

    #[test]
    fn large_vm_state_leaves_the_32_bit_field_zero() {
        let mut e = entry("1", "a");
        e.vm_state_size = 1 << 32;
        let t = encode_snapshot_table(std::slice::from_ref(&e)).unwrap();
        assert_eq!(&t[32..36], &[0; 4]);
        assert_eq!(decode_snapshot_table(&t, 1, 3, 0).unwrap(), vec![e]);
    }

    fn arb_entry() -> impl Strategy<Value = SnapshotEntry> {
        (
            (any::<u64>(), any::<u32>(), "[0-9]{0,6}", "\\PC{0,12}"),
            (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
            (
                any::<u64>(),
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 0..=1000),
            ),
        )
            .prop_map(
                |(
                    (l1_table_offset, l1_size, id, name),
                    (date_sec, date_nsec, vm_clock_nsec, vm_state_size),
                    (disk, icount, unknown_extra),
                )| {
                    SnapshotEntry {
                        l1_table_offset,
                        l1_size,
                        id,
                        name,
                        date_sec,
                        date_nsec,
                        vm_clock_nsec,
                        vm_state_size,
                        disk_size: Some(disk),
                        icount: Some(icount),
                        extra_data_size: 24 + unknown_extra.len() as u32,
                        unknown_extra,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_snapshot_table_round_trip(
            entries in prop::collection::vec(arb_entry(), 0..8),
            table_cluster in 0u64..1 << 40,
        ) {
            let table = encode_snapshot_table(&entries).unwrap();
            prop_assert_eq!(table.len() as u64, snapshot_table_size(&entries));
            let offset = table_cluster << 16;
            let decoded = decode_snapshot_table(&table, entries.len() as u32, 3, offset).unwrap();
            prop_assert_eq!(&decoded, &entries);
            prop_assert_eq!(encode_snapshot_table(&decoded).unwrap(), table);
        }

        #[test]
        fn prop_decode_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..4096),
            nb in prop_oneof![0u32..4, any::<u32>()],
            version in 1u32..5,
            offset in prop_oneof![0u64..64, any::<u64>()],
        ) {
            let _ = decode_snapshot_table(&bytes, nb, version, offset);
        }

        #[test]
        fn prop_decode_never_panics_on_mutated_tables(
            entries in prop::collection::vec(arb_entry(), 1..4),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut table = encode_snapshot_table(&entries).unwrap();
            for (at, value) in flips {
                let i = at.index(table.len());
                table[i] = value;
            }
            let table = &table[..cut.index(table.len() + 1)];
            let _ = decode_snapshot_table(table, entries.len() as u32, 3, 0x10000);
        }
    }

    #[test]
    fn qemu_img_snapshot_tables_round_trip_exactly() {
        use crate::format::header::Header;
        let qemu = std::process::Command::new("qemu-img")
            .arg("--version")
            .output();
        if !qemu.is_ok_and(|o| o.status.success()) {
            println!("skipping: qemu-img not found");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.qcow2");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("qemu-img")
                .args(args)
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let path_str = path.to_str().unwrap().to_string();
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", &path_str, "16M"])
            .output()
            .unwrap();
        assert!(out.status.success());
        run(&["snapshot", "-c", "snap1"]);
        run(&["snapshot", "-c", "second snapshot"]);
        let file = std::fs::read(&path).unwrap();
        let h = Header::decode(&file[..file.len().min(2 << 20)]).unwrap();
        assert_eq!(h.nb_snapshots, 2);
        let start = h.snapshots_offset as usize;
        let table = &file[start..file.len().min(start + (64 << 20))];
        let entries =
            decode_snapshot_table(table, h.nb_snapshots, h.version, h.snapshots_offset).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].id.as_str(), entries[0].name.as_str()),
            ("1", "snap1")
        );
        assert_eq!(
            (entries[1].id.as_str(), entries[1].name.as_str()),
            ("2", "second snapshot")
        );
        for e in &entries {
            assert_eq!(e.extra_data_size, 24);
            assert_eq!(e.disk_size, Some(16 << 20));
            assert_eq!(e.l1_size, h.l1_size);
            assert!(e.validate_l1(h.cluster_bits).is_ok());
            assert!(e.is_complete(3));
        }
        let encoded = encode_snapshot_table(&entries).unwrap();
        assert_eq!(encoded.as_slice(), &table[..encoded.len()]);
    }
}
