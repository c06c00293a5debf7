//! Creating new images with the same layout as `qemu-img create`:
//! header in cluster 0, refcount table in cluster 1, the first refcount block
//! in cluster 2, the L1 table from cluster 3 (only its `l1_size * 8` bytes
//! written). Images whose L1 table does not fit that first refcount block
//! are grown through the normal allocator, as QEMU does.

use crate::error::{Error, IoOp, Result};
use crate::format::consts::*;
use crate::format::header::{Header, HeaderExtension};
use crate::format::{put_be_u64, refcount};
use crate::image::Image;
use crate::options::{Compat, CompressionType, CreateOptions, OpenOptions};
use crate::storage::{FileStorage, Storage};
use crate::types::Geometry;
use std::path::Path;
use std::sync::Arc;

/// Builds the header `qemu-img create` writes for `opts` (with no L1 table yet).
///
/// # Errors
/// `Error::InvalidArgument` for invalid option combinations (QEMU's messages).
pub fn build_header(opts: &CreateOptions, size: u64) -> Result<Header> {
    opts.validate()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let cluster_bits = opts.cluster_size.trailing_zeros();
    let mut h = match opts.compat {
        Compat::V2 => Header::new_v2(cluster_bits, size),
        Compat::V3 => Header::new_v3(cluster_bits, size),
    };
    h.refcount_order = opts.refcount_bits.trailing_zeros();
    h.refcount_table_offset = opts.cluster_size;
    h.refcount_table_clusters = 1;
    if opts.lazy_refcounts {
        h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
    }
    if opts.extended_l2 {
        h.incompatible_features |= INCOMPAT_EXTL2;
    }
    if opts.compression_type == CompressionType::Zstd {
        h.incompatible_features |= INCOMPAT_COMPRESSION;
        h.compression_type = 1;
    }
    let mut front = Vec::new();
    if let Some(fmt) = &opts.backing_fmt {
        if opts.backing_file.is_some() {
            front.push(HeaderExtension::BackingFormat(fmt.clone()));
        }
    }
    if let Some(df) = &opts.data_file {
        h.incompatible_features |= INCOMPAT_DATA_FILE;
        front.push(HeaderExtension::DataFile(df.clone()));
        if opts.data_file_raw {
            h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
        }
    }
    front.append(&mut h.extensions);
    h.extensions = front;
    h.backing_file = opts.backing_file.clone();
    h.normalize()?;
    Ok(h)
}

/// Creates an image in `file` (which should be empty) with the given options
/// and virtual size. The external data file, if any, is `data` (created by
/// the caller).
///
/// # Errors
/// Invalid options, I/O errors.
pub fn create_on(file: Arc<dyn Storage>, opts: &CreateOptions, size: u64) -> Result<()> {
    let size = sector_aligned(size);
    let mut h = build_header(opts, size)?;
    let geom = Geometry::new(h.cluster_bits, h.is_extended_l2(), h.refcount_order);
    let cs = geom.cluster_size;
    let l1_entries = geom.l1_entries_for(size);
    if l1_entries * 8 > MAX_L1_BYTES || size > i64::MAX as u64 {
        return Err(Error::InvalidArgument(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .into(),
        ));
    }
    let l1_clusters = geom.clusters_for(l1_entries * 8);
    let direct = 3 + l1_clusters <= geom.refcount_block_entries();
    let used = if direct { 3 + l1_clusters } else { 3 };
    if direct && l1_entries > 0 {
        h.l1_size = l1_entries as u32;
        h.l1_table_offset = 3 * cs;
    } else {
        h.size = 0;
    }
    let io = |e| Error::io(IoOp::Write, 0, e);
    let mut buf = h.encode_into_cluster(cs)?;
    // Refcount table (cluster 1) and first refcount block (cluster 2).
    buf.resize(3 * cs as usize, 0);
    put_be_u64(&mut buf, cs as usize, 2 * cs);
    for c in 0..used {
        refcount::set(&mut buf[2 * cs as usize..], h.refcount_order, c as usize, 1);
    }
    file.write_at(&buf, 0).map_err(io)?;
    if direct && l1_entries > 0 {
        let l1 = vec![0u8; (l1_entries * 8) as usize];
        file.write_at(&l1, 3 * cs).map_err(io)?;
    }
    file.flush().map_err(|e| Error::io(IoOp::Flush, 0, e))?;
    if !direct {
        let mode = crate::image::OpenMode {
            skip_backing: true,
            ..Default::default()
        };
        let img = Image::open_with_mode(file, None, &OpenOptions::new(), mode)?;
        img.resize(size)?;
        img.close()?;
    }
    Ok(())
}

/// `size` rounded up to whole 512-byte sectors, as `qemu-img create` does
/// (QEMU's qcow2 driver ignores a partial last sector of the virtual size:
/// `total_sectors = size / 512`). Sizes that overflow become `u64::MAX`,
/// which the size checks refuse.
fn sector_aligned(size: u64) -> u64 {
    size.checked_next_multiple_of(SECTOR_SIZE)
        .unwrap_or(u64::MAX)
}

/// Creates the image file at `path` (overwriting it) and, with a `data_file`
/// option, the external data file next to it.
///
/// # Errors
/// `Error::Io` if a file cannot be created, invalid options.
pub fn create(path: &Path, opts: &CreateOptions, size: u64) -> Result<()> {
    opts.validate()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let nocow = opts.nocow.unwrap_or(false);
    if let Some(df) = &opts.data_file {
        let dpath = crate::image::resolve(path.parent(), Path::new(df));
        let d = FileStorage::create(&dpath, nocow).map_err(|e| Error::io(IoOp::Write, 0, e))?;
        d.set_len(sector_aligned(size))
            .map_err(|e| Error::io(IoOp::Resize, 0, e))?;
    }
    let f = FileStorage::create(path, nocow).map_err(|e| Error::io(IoOp::Write, 0, e))?;
    create_on(Arc::new(f), opts, size)
}
