//! Internal snapshots as seen by an open image: loading the snapshot table
//! and registering snapshot tables with the overlap checker.

use super::conv;
use crate::error::{Error, Result};
use crate::format::consts::*;
use crate::format::header::Header;
use crate::format::snapshot::{decode_snapshot_table, SnapshotEntry};
use crate::format::{be_u64, FormatError, FormatErrorKind, Structure};
use crate::meta::overlap_map::OverlapChecker;
use crate::meta::read_file;
use crate::storage::Storage;

/// Reads and decodes the snapshot table (bounded by the file length and the
/// format's 64 MiB limit).
///
/// # Errors
/// Format errors of the table, I/O errors.
pub(crate) fn load_snapshots(
    file: &dyn Storage,
    header: &Header,
    file_len: u64,
) -> Result<Vec<SnapshotEntry>> {
    if header.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let off = header.snapshots_offset;
    if off >= file_len {
        return Err(FormatError::new(
            FormatErrorKind::Invalid,
            Structure::SnapshotTable,
            Some(off),
            "Snapshot table lies beyond the end of the file",
        )
        .into());
    }
    let len = (file_len - off).min(MAX_SNAPSHOT_TABLE_BYTES);
    let mut buf = vec![0u8; len as usize];
    read_file(file, &mut buf, off)?;
    Ok(decode_snapshot_table(
        &buf,
        header.nb_snapshots,
        header.version,
        off,
    )?)
}

/// Registers the snapshot table, every snapshot L1 table and, when the
/// inactive-l2 check is enabled, every L2 table they reference.
pub(crate) fn register_snapshots(
    file: &dyn Storage,
    header: &Header,
    snapshots: &[SnapshotEntry],
    checker: &mut OverlapChecker,
    file_len: u64,
) -> Result<()> {
    if snapshots.is_empty() {
        return Ok(());
    }
    let table_bytes = crate::format::snapshot::snapshot_table_size(snapshots);
    checker.set_snapshot_table(header.snapshots_offset, table_bytes);
    let want_l2 = checker.enabled() & crate::types::MetadataKind::InactiveL2.bit() != 0;
    let cb = header.cluster_bits;
    for s in snapshots {
        let bytes = u64::from(s.l1_size) * 8;
        checker.add_inactive_l1(s.l1_table_offset, bytes);
        if want_l2 && bytes > 0 {
            if s.l1_table_offset.saturating_add(bytes) > file_len || bytes > MAX_L1_BYTES {
                return Err(Error::Corrupt {
                    what: Structure::SnapshotL1Table,
                    offset: s.l1_table_offset,
                    msg: "Snapshot L1 table lies beyond the end of the file".into(),
                });
            }
            let mut buf = vec![0u8; conv::mem_len(Structure::SnapshotL1Table, bytes)?];
            read_file(file, &mut buf, s.l1_table_offset)?;
            for e in buf.chunks_exact(8).filter_map(|c| be_u64(c, 0)) {
                let off = e & L1E_OFFSET_MASK;
                if off != 0 && off & ((1u64 << cb) - 1) == 0 {
                    checker.add_inactive_l2(off);
                }
            }
        }
    }
    Ok(())
}
