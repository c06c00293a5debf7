//! Loading the metadata of an image at open: the L1 and refcount tables,
//! the overlap map, the snapshot table and the caches, built into one
//! [`Meta`] (its parts: [`WriteGate`], [`L2Tables`], [`Refcounts`]).

use super::{conv, DiscardPolicy, L2Tables, Meta, Refcounts, TableCache, WriteGate};
use crate::error::{Error, Limit, Result};
use crate::format::consts::*;
use crate::format::entry::EntryFormat;
use crate::format::header::Header;
use crate::format::Structure;
use crate::options::OpenOptions;
use crate::storage::{Storage, Tracked};
use crate::types::{Geometry, RefcountGeometry};
use std::sync::Arc;

use super::overlap_map::OverlapChecker;

/// Builds the metadata state of the image in `file` (of length `file_len`)
/// whose decoded header is `header`. `check` is QEMU's `BDRV_O_CHECK`:
/// refcounts past the end of the file do not stop allocations and the
/// snapshot table is left to the checker.
///
/// # Errors
/// I/O errors reading the tables; invalid cache options; snapshot table
/// errors.
pub(crate) fn load(
    file: Arc<Tracked>,
    header: Header,
    opts: &OpenOptions,
    check: bool,
    file_len: u64,
) -> Result<Meta> {
    let geom = Geometry::new(header.cluster_bits, header.is_extended_l2());
    let rgeom = RefcountGeometry::new(header.cluster_bits, header.refcount_order);
    let efmt = EntryFormat {
        cluster_bits: header.cluster_bits,
        version: header.version,
        extended_l2: geom.extended_l2,
        external_data: header.incompatible_features & INCOMPAT_DATA_FILE != 0,
    };
    // QEMU's open-time rules only (size caps, alignment, overflow: see
    // `Header::decode`): a table that runs past the end of the file reads
    // as zeroes there, as in QEMU, so a truncated image can still be
    // inspected and copied. The caps bound both buffers (32 MiB and
    // 8 MiB); the write path refuses allocations on such an image.
    let l1_bytes = u64::from(header.l1_size) * 8;
    let rt_bytes = u64::from(header.refcount_table_clusters) << geom.cluster_bits;
    let l1 = read_table(
        &*file,
        Structure::L1Table,
        header.l1_table_offset,
        l1_bytes,
        file_len,
    )?;
    // QEMU's `qcow2_refcount_init`.
    file.debug_event(crate::storage::BlkdebugEvent::ReftableLoad);
    let reftable = read_table(
        &*file,
        Structure::RefcountTable,
        header.refcount_table_offset,
        rt_bytes,
        file_len,
    )?;

    // Refcounts read from past the end of the file are zeroes that may
    // hide clusters in use: such a handle must not allocate. A partly
    // present last cluster counts as past the end.
    let refcounts_past_eof = if check {
        None
    } else if header.refcount_table_offset.saturating_add(rt_bytes) > file_len {
        Some((Structure::RefcountTable, header.refcount_table_offset))
    } else {
        reftable
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .find(|&off| off != 0 && off.saturating_add(geom.cluster_size) > file_len)
            .map(|off| (Structure::RefcountBlock, off))
    };

    let cache =
        crate::options::cache_config(opts, header.size, geom.cluster_size, geom.l2_entry_bytes)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let mut checker = OverlapChecker::new(opts.get_overlap_check().mask(), geom.cluster_bits);
    checker.set_active_l1(header.l1_table_offset, l1_bytes);
    checker.set_refcount_table(header.refcount_table_offset, rt_bytes);
    // Every table the image names is protected by its raw range, as in
    // QEMU's overlap check: an unaligned one covers two clusters.
    let covered = |off: u64| {
        let first = off & !(geom.cluster_size - 1);
        let second = (!geom.is_aligned(off)).then(|| first.checked_add(geom.cluster_size));
        std::iter::once(first).chain(second.flatten())
    };
    for e in &reftable {
        let off = e & REFT_OFFSET_MASK;
        if off != 0 {
            covered(off).for_each(|c| checker.add_refcount_block(c));
        }
    }
    for e in &l1 {
        let off = e & L1E_OFFSET_MASK;
        if off != 0 {
            covered(off).for_each(|c| checker.add_active_l2(c));
        }
    }
    // Check mode does not load the snapshot table (QEMU skips it with
    // BDRV_O_CHECK): the checker reads, validates and registers it.
    let snapshots = if check {
        Vec::new()
    } else {
        let snapshots = super::snapshots::load_snapshots(&*file, &header, file_len)?;
        super::snapshots::register_snapshots(&*file, &header, &snapshots, &mut checker, file_len)?;
        snapshots
    };
    // The LUKS header and key material (QEMU has no overlap class for them;
    // a guest write there would destroy every key slot): protected with the
    // main header.
    if header.crypt_method == crate::format::consts::CRYPT_LUKS {
        checker.set_crypto_header(header.crypto_header());
    }
    if header.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
        checker.set_bitmap_directory(Some(match header.bitmaps() {
            Some(b) => (b.bitmap_directory_offset, b.bitmap_directory_size),
            None => (0, 0),
        }));
    }

    let discard = DiscardPolicy {
        request: opts.get_pass_discard_request(),
        snapshot: opts.get_pass_discard_snapshot(),
        other: opts.get_pass_discard_other(),
    };
    let lazy_refcounts = !opts.get_read_only()
        && opts
            .get_lazy_refcounts()
            .unwrap_or(header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0);
    Ok(Meta {
        gate: WriteGate::new(file, checker, file_len),
        l2: L2Tables::new(
            l1,
            TableCache::new(cache.l2_slices, conv::usize_of(cache.l2_slice_bytes)?),
        ),
        rc: Refcounts::new(
            reftable,
            TableCache::new(cache.refcount_blocks, conv::cluster_bytes(&geom)),
            discard,
            refcounts_past_eof,
        ),
        geom,
        rgeom,
        efmt,
        no_flush: false,
        data_unsynced: false,
        scratch: Vec::new(),
        clean_interval: (cache.clean_interval_secs > 0).then(|| {
            let every = cache.clean_interval_secs.saturating_mul(1000);
            (
                every,
                crate::storage::sys::coarse_monotonic_ms().saturating_add(every),
            )
        }),
        dirty_at_open: header.incompatible_features & INCOMPAT_DIRTY != 0,
        lazy_refcounts,
        in_flight: Default::default(),
        free_byte_offset: 0,
        snapshots,
        bitmaps: None,
        header,
    })
}

/// Reads a table of big-endian u64 entries of `bytes` bytes at `offset`.
/// Entries past `file_len` are zeroes and are not read; the rest is read a
/// chunk at a time, so the only buffer the size of the table is the result
/// (whose size the header validation caps).
fn read_table(
    file: &dyn Storage,
    what: Structure,
    offset: u64,
    bytes: u64,
    file_len: u64,
) -> Result<Vec<u64>> {
    const CHUNK: u64 = 64 << 10;
    let entries =
        usize::try_from(bytes / 8).map_err(|_| Error::TooLarge(Limit::Memory { what, bytes }))?;
    let mut table = vec![0u64; entries];
    // Whole entries: a cut inside an entry keeps its leading bytes.
    let present = bytes.min(file_len.saturating_sub(offset).saturating_add(7) & !7);
    let mut buf = vec![0u8; present.min(CHUNK) as usize];
    let mut done = 0u64;
    while done < present {
        let n = (present - done).min(CHUNK);
        // `n` is at most CHUNK, `done / 8` below `entries`: both fit.
        let chunk = buf
            .get_mut(..conv::usize_of(n)?)
            .ok_or_else(|| Error::Internal("table chunk beyond its buffer".into()))?;
        file.read_at(chunk, offset + done)
            .map_err(|e| Error::io(crate::error::IoOp::Read, offset + done, e))?;
        let first = conv::usize_of(done / 8)?;
        let slots = table.get_mut(first..).unwrap_or_default();
        for (slot, raw) in slots.iter_mut().zip(chunk.chunks_exact(8)) {
            *slot = u64::from_be_bytes(raw.try_into().unwrap_or([0; 8]));
        }
        done += n;
    }
    Ok(table)
}
