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
use crate::options::{Compat, CompressionType, CreateOptions, LuksToCreate, Preallocation};
use crate::storage::{FileStorage, LockRequest, Locking, Storage};
use crate::types::{ClusterCount, Geometry, RefcountGeometry};
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
/// and virtual size (rounded up to a multiple of 512, as QEMU does). An
/// external data file named by the options is opened by name (relative to
/// the current directory); [`create`] passes it directly.
///
/// With `preallocation` other than `off` (or `data_file_raw`, which implies
/// `metadata`), the image is created empty and then grown with the mode,
/// exactly as `qemu-img create` does (see [`Image::resize_with`]).
///
/// # Errors
/// Invalid options, I/O errors.
pub fn create_on(file: Arc<dyn Storage>, opts: &CreateOptions, size: u64) -> Result<()> {
    opts.validate()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let luks = opts.encrypt.resolve(opts.get_secrets())?;
    create_with(file, None, None, opts, size, luks.as_ref())
}

fn create_with(
    file: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    path: Option<&Path>,
    opts: &CreateOptions,
    size: u64,
    luks: Option<&LuksToCreate>,
) -> Result<()> {
    let size = sector_aligned(size);
    let prealloc = opts.effective_preallocation();
    // Preallocated images start empty and grow with the mode, as in QEMU.
    let direct_size = if prealloc == Preallocation::Off {
        size
    } else {
        0
    };
    let mut h = build_header(opts, direct_size)?;
    let geom = Geometry::new(h.cluster_bits, h.is_extended_l2());
    let cs = geom.cluster_size;
    let l1_entries = geom.l1_entries_for(size);
    if l1_entries * 8 > MAX_L1_BYTES || size > i64::MAX as u64 {
        return Err(Error::InvalidArgument(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .into(),
        ));
    }
    let l1_entries = geom.l1_entries_for(direct_size);
    let l1_clusters = geom.clusters_for(l1_entries * 8);
    let direct = 3 + l1_clusters
        <= RefcountGeometry::new(h.cluster_bits, h.refcount_order).refcount_block_entries();
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
    if h.size != size || prealloc != Preallocation::Off {
        let img = Image::open_created(file.clone(), data.clone(), path.map(Path::to_path_buf))?;
        // Like QEMU's creation (BDRV_O_NO_FLUSH): no syncs until the end.
        img.set_no_flush(true)?;
        img.truncate(size, prealloc)?;
        img.set_no_flush(false)?;
        img.close()?;
        file.flush().map_err(|e| Error::io(IoOp::Flush, 0, e))?;
    }
    if let Some(l) = luks {
        set_up_luks(&file, data, path, cs, l)?;
    }
    Ok(())
}

/// QEMU's `qcow2_set_up_encryption` on the new image: formats a LUKS volume
/// (random master key, slot 0 keyed with the passphrase), writes it to
/// clusters the allocator gives (after the L1 table, zero-filled first),
/// then sets `crypt_method` 2 and the full disk encryption header
/// extension with one header write.
fn set_up_luks(
    file: &Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    path: Option<&Path>,
    cs: u64,
    l: &LuksToCreate,
) -> Result<()> {
    let formatted = crate::crypto::luks::format(&l.spec, l.password.as_bytes())?;
    let img = Image::open_created(file.clone(), data, path.map(Path::to_path_buf))?;
    let offset = img.write_luks_volume(&formatted)?;
    img.close()?;
    // The header, now naming the volume: one write of cluster 0.
    let len = file.len().map_err(|e| Error::io(IoOp::Read, 0, e))?.min(cs);
    let mut head = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_at(&mut head, 0)
        .map_err(|e| Error::io(IoOp::Read, 0, e))?;
    let mut h = Header::decode(&head)?;
    h.crypt_method = CRYPT_LUKS;
    h.extensions.push(HeaderExtension::Crypto {
        offset,
        length: formatted.len,
    });
    h.normalize()?;
    let buf = h.encode_into_cluster(cs)?;
    file.write_at(&buf, 0)
        .map_err(|e| Error::io(IoOp::Write, 0, e))?;
    file.flush().map_err(|e| Error::io(IoOp::Flush, 0, e))
}

impl Image {
    /// Allocates clusters for the LUKS volume `f`, zero-fills them and
    /// writes its header and slot 0's key material (through the write gate);
    /// returns the volume's host offset. The refcounts reach the file first.
    fn write_luks_volume(&self, f: &crate::crypto::luks::LuksFormatted) -> Result<u64> {
        let cs = self.geom.cluster_size;
        let n = f.len.div_ceil(cs);
        let mut meta = self.lock()?;
        let offset = meta.alloc_clusters(ClusterCount(n))?.0;
        meta.flush_all(true)?;
        let total =
            usize::try_from(n * cs).map_err(|_| Error::Internal("LUKS volume size".into()))?;
        let mut buf = vec![0u8; total];
        let header = f.header.encode()?;
        buf[..header.len()].copy_from_slice(&header);
        let at = usize::try_from(f.header.slots[0].key_offset)
            .map_err(|_| Error::Internal("LUKS key offset".into()))?;
        let material = buf
            .get_mut(at..at + f.key_material.len())
            .ok_or_else(|| Error::Internal("LUKS key material past the volume".into()))?;
        material.copy_from_slice(&f.key_material);
        meta.gate.write(&buf, offset, None)?;
        zeroize::Zeroize::zeroize(&mut buf);
        meta.gate.sync_image()?;
        Ok(offset)
    }
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
/// option, the external data file next to it. With `nocow`, both files get
/// the no-copy-on-write attribute while still empty (Btrfs; ignored by other
/// file systems, as QEMU does).
///
/// Each file is locked ([`LockRequest::create`]) before it is truncated, as
/// `qemu-img create` does: a file another process holds open is left as it
/// is and the creation fails with [`Error::Lock`]. The image file is
/// prepared first, then the data file (QEMU's order).
///
/// # Errors
/// `Error::Io` if a file cannot be created, `Error::Lock` if one is in use,
/// invalid options.
pub fn create(path: &Path, opts: &CreateOptions, size: u64) -> Result<()> {
    opts.validate()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if let Some(given) = opts.size.filter(|&s| s != size) {
        return Err(Error::InvalidArgument(format!(
            "Image size given twice: {size} bytes and {given} bytes in the options"
        )));
    }
    // Before any file is touched: a key problem leaves nothing behind.
    let luks = opts.encrypt.resolve(opts.get_secrets())?;
    let nocow = opts.nocow.unwrap_or(false);
    let new_only = opts.create_new;
    let f = create_file(path, nocow, new_only)?;
    let data = match &opts.data_file {
        Some(df) => {
            let dpath = crate::image::resolve(path.parent(), Path::new(df));
            let d = match create_file(&dpath, nocow, new_only) {
                Ok(d) => d,
                Err(e) => {
                    if new_only {
                        // Leave nothing behind that this call created.
                        drop(f);
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(e);
                }
            };
            if opts.effective_preallocation() == Preallocation::Off {
                crate::resize::resize_data_file(&d, sector_aligned(size), Preallocation::Off)?;
            }
            Some(Arc::new(d) as Arc<dyn Storage>)
        }
        None => None,
    };
    create_with(Arc::new(f), data, Some(path), opts, size, luks.as_ref())
}

/// Opens (or creates; with `new_only` only creates) `path`, locks it for creation, then empties it and
/// sets the nocow attribute (QEMU's `raw_co_create` steps).
fn create_file(path: &Path, nocow: bool, new_only: bool) -> Result<FileStorage> {
    let io = |e| Error::io(IoOp::Write, 0, e);
    let f = FileStorage::open_for_create(path, new_only).map_err(io)?;
    f.lock(&LockRequest::create(Locking::Auto))?;
    f.set_len(0).map_err(io)?;
    if nocow {
        // Like QEMU: failure to set the attribute is not an error.
        let _ = f.set_nocow();
    }
    Ok(f)
}

/// Creates the image file at `path` with the virtual size given in the
/// options ([`CreateOptions::size`]); otherwise as [`create`].
///
/// ```
/// use qcow2kit::{CreateOptions, Image, OpenOptions};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.qcow2");
/// let opts = CreateOptions::new().size(1 << 30).create_new(true);
/// qcow2kit::create::create_image(&path, &opts)?;
/// assert_eq!(Image::open(&path, &OpenOptions::new().read_only(true))?.size(), 1 << 30);
/// // `create_new` leaves an existing file alone.
/// assert!(qcow2kit::create::create_image(&path, &opts).is_err());
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// `Error::InvalidArgument` when the options give no size; as [`create`].
pub fn create_image(path: &Path, opts: &CreateOptions) -> Result<()> {
    let size = opts
        .require_size()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    create(path, opts, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_new_leaves_existing_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        std::fs::write(&img, b"precious").unwrap();
        let opts = CreateOptions::new().create_new(true);
        let e = create(&img, &opts, 1 << 20).unwrap_err();
        assert!(
            matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&img).unwrap(), b"precious");

        // With a data file: an existing image leaves no new data file behind,
        // and an existing data file is not truncated.
        let mut opts = opts;
        opts.data_file = Some("a.data".into());
        assert!(create(&img, &opts, 1 << 20).is_err());
        assert!(!dir.path().join("a.data").exists());
        std::fs::write(dir.path().join("a.data"), b"also precious").unwrap();
        let fresh = dir.path().join("b.qcow2");
        assert!(create(&fresh, &opts, 1 << 20).is_err());
        assert_eq!(
            std::fs::read(dir.path().join("a.data")).unwrap(),
            b"also precious"
        );
        assert!(!fresh.exists());

        // Without create_new the file is overwritten, as by qemu-img.
        create(&img, &CreateOptions::new(), 1 << 20).unwrap();
        assert_ne!(std::fs::read(&img).unwrap(), b"precious");
    }

    #[test]
    fn the_size_in_the_options_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        let opts = CreateOptions::new().size(3 << 20);
        let e = create(&img, &opts, 1 << 20).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        create(&img, &opts, 3 << 20).unwrap();
        create_image(&img, &opts).unwrap();
        let h = Image::open(&img, &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(h.size(), 3 << 20);
        let e = create_image(&img, &CreateOptions::new()).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }
}
