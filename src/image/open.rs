//! Opening an image: header, tables, backing file and data file, the
//! corrupt/dirty checks, and the automatic repair of a dirty image.

use super::*;
use crate::error::Unsupported;
use crate::format::luks::LuksHeader;
use crate::storage::LockRequest;

/// Most bytes of cluster 0 read to decode the header and its extensions.
const MAX_HEADER_READ: u64 = 2 << 20;

/// The bytes the header is decoded from: cluster 0 (where QEMU requires the header,
/// its extensions and the backing file name to be), in two requests: the first
/// sector, then the rest of the cluster its `cluster_bits` gives. Reading no further
/// keeps open-time requests from covering guest data (a quorum votes per request);
/// an unsupported `cluster_bits` reads up to [`MAX_HEADER_READ`] so that decoding
/// reports it as before.
fn read_head(file: &dyn Storage, file_len: u64) -> Result<Vec<u8>> {
    let first = file_len.min(512);
    let mut head = vec![0u8; first as usize];
    read_file(file, &mut head, 0)?;
    let cluster_bits = head
        .get(20..24)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes);
    let want = match cluster_bits {
        Some(bits) if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) => 1u64 << bits,
        _ => MAX_HEADER_READ,
    };
    let total = file_len.min(want).max(first);
    if total > first {
        head.resize(total as usize, 0);
        let rest = head.get_mut(first as usize..).unwrap_or_default();
        read_file(file, rest, first)?;
    }
    Ok(head)
}

impl Image {
    /// Opens the image at `path`.
    ///
    /// Takes QEMU's image locks on every file it opens (see
    /// [Image locking](crate::OpenOptions#image-locking)).
    ///
    /// ```
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("disk.qcow2");
    /// qcow2kit::create::create(&path, &CreateOptions::new(), 1 << 30)?;
    ///
    /// let img = Image::open(&path, &OpenOptions::new())?;
    /// assert_eq!(img.size(), 1 << 30);
    /// assert_eq!(img.cluster_size(), 64 << 10);
    /// img.close()?;
    ///
    /// // Read-only handles never write the file.
    /// let ro = Image::open(&path, &OpenOptions::new().read_only(true))?;
    /// assert!(ro.write_at(&[0; 512], 0).is_err());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Open failures, named by the file: `Error::Open` when `open(2)` fails,
    /// otherwise [`Error::Opening`] around the cause (match
    /// [`Error::inner`]): `Error::Io` for the file, `Error::Format` for an
    /// invalid or unsupported header, `Error::ImageCorrupt` for a read-write
    /// open of an image marked corrupt, `Error::Lock` when another process
    /// uses a file in a conflicting way, backing file errors).
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        check_open_mode(opts).map_err(|e| e.opening(path))?;
        let (file, named) = open_named(path, !opts.get_read_only(), opts.get_cache_direct())?;
        Self::open_inner(file, named, opts, OpenMode::default(), None).map_err(|e| e.opening(path))
    }

    /// Opens the image at `path` without opening its backing file: clusters
    /// not allocated in this image read as zeroes. For inspecting an image
    /// whose backing chain is missing or untrusted (like `qemu-img info`).
    ///
    /// ```
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let top = dir.path().join("top.qcow2");
    /// let opts = CreateOptions::new().backing_file("gone.qcow2").backing_fmt("qcow2");
    /// qcow2kit::create::create(&top, &opts, 1 << 20)?;
    ///
    /// let ro = OpenOptions::new().read_only(true);
    /// assert!(Image::open(&top, &ro).is_err()); // the backing file is missing
    /// let img = Image::open_without_backing(&top, &ro)?;
    /// assert_eq!(img.header().backing_file.as_deref(), Some("gone.qcow2"));
    /// assert!(img.backing().is_none());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As for [`Image::open`].
    pub fn open_without_backing(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        check_open_mode(opts).map_err(|e| e.opening(path))?;
        let (file, named) = open_named(path, !opts.get_read_only(), opts.get_cache_direct())?;
        let mode = OpenMode {
            skip_backing: true,
            ..Default::default()
        };
        Self::open_inner(file, named, opts, mode, None).map_err(|e| e.opening(path))
    }

    /// Opens the image at `path` for inspection, as `qemu-img info` does
    /// (QEMU's `BDRV_O_NO_IO | BDRV_O_NO_BACKING`): read-only whatever
    /// `opts` say, without its backing file. An encrypted image opens too, and
    /// its LUKS header is read and validated ([`Image::luks_header`]), but no
    /// guest data can be accessed through the handle: every data request
    /// ([`Image::read_at`], [`Image::block_status`], ...) fails with
    /// [`Error::EncryptionKeyRequired`]. Unencrypted images behave as with
    /// [`Image::open_without_backing`].
    ///
    /// # Errors
    /// As for [`Image::open`]; for a LUKS image, QEMU's messages for an
    /// invalid LUKS header (`Volume is not in LUKS format`, ...).
    pub fn open_for_info(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        Self::open_path_no_io(path.as_ref(), opts, true)
    }

    /// Opens the image at `path` and its backing chain without guest I/O, the
    /// way qemu-img opens a backing file to learn its size (`qemu-img create
    /// -b`, QEMU's `BDRV_O_NO_IO`): read-only whatever `opts` say; encrypted
    /// images anywhere in the chain open without a key, and their handles
    /// refuse guest data requests as with [`Image::open_for_info`]. Loops and
    /// the depth bound are enforced as in [`Image::open`].
    ///
    /// # Errors
    /// As for [`Image::open`], without [`Error::EncryptionKeyRequired`].
    pub fn open_no_io(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        Self::open_path_no_io(path.as_ref(), opts, false)
    }

    /// QEMU's `BDRV_O_NO_IO` open of `path`, read-only, with or without the
    /// backing chain.
    fn open_path_no_io(path: &Path, opts: &OpenOptions, skip_backing: bool) -> Result<Image> {
        let opts = opts.clone().read_only(true);
        let (file, named) = open_named(path, false, false)?;
        let mode = OpenMode {
            skip_backing,
            no_io: true,
            ..Default::default()
        };
        Self::open_inner(file, named, &opts, mode, None).map_err(|e| e.opening(path))
    }

    /// Opens for checking or repair: corrupt and dirty images open read-write.
    pub(crate) fn open_with_mode(
        file: Arc<dyn Storage>,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        mode: OpenMode,
    ) -> Result<Image> {
        Self::open_inner(file, path, opts, mode, None)
    }

    /// Opens an image just created, read-write and without its backing
    /// file, with the external data file (if any) given as storage.
    pub(crate) fn open_created(
        file: Arc<dyn Storage>,
        data: Option<Arc<dyn Storage>>,
        path: Option<PathBuf>,
    ) -> Result<Image> {
        let mode = OpenMode {
            skip_backing: true,
            ..Default::default()
        };
        Self::open_inner(file, path, &OpenOptions::new(), mode, data)
    }

    /// Opens an image held in any [`Storage`] (for example [`crate::storage::MemStorage`]).
    /// Relative backing file names are resolved against the current directory.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// img.write_at(&[0xab; 4096], 0)?;
    /// img.close()?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As for [`Image::open`].
    pub fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        Self::open_inner(storage, None, opts, OpenMode::default(), None)
    }

    fn open_inner(
        file: Arc<dyn Storage>,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        mode: OpenMode,
        data_override: Option<Arc<dyn Storage>>,
    ) -> Result<Image> {
        let read_only = opts.get_read_only();
        check_open_mode(opts)?;
        // QEMU locks the file when the format driver attaches it, before
        // reading the header.
        file.lock(&LockRequest::image_file(
            read_only,
            opts.get_force_share(),
            opts.get_locking(),
        ))?;
        // Every change to the file is tracked, so that a flush syncs exactly
        // when something changed since the last sync.
        let tracked = Arc::new(Tracked::new(file, opts.get_cache_no_flush()));
        let file: Arc<dyn Storage> = tracked.clone();
        // Events of the storage itself (quorum) from the first read on.
        if let Some(sink) = opts.get_event_sink() {
            file.set_event_sink(Some(sink));
        }
        let file_len = file.len().map_err(|e| Error::io(IoOp::Read, 0, e))?;
        let head = read_head(&*file, file_len)?;
        let mut header = if mode.check {
            Header::decode_for_check(&head)?
        } else {
            Header::decode(&head)?
        };
        drop(head);
        // QEMU counts the disk in 512-byte sectors (`total_sectors = size /
        // 512`): a crafted size that is not a multiple of 512 loses its
        // partial sector, in reads, writes, info and any header rewrite.
        header.size &= !(SECTOR_SIZE - 1);
        let repair = mode.repair || mode.check;
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only && !repair {
            return Err(Error::ImageCorrupt);
        }
        // A dirty image opened read-write is repaired before use (below).
        let repair_dirty =
            header.incompatible_features & INCOMPAT_DIRTY != 0 && !read_only && !repair;
        let (luks, cipher) = check_encryption(&header, &*file, mode, opts)?;
        let geom = Geometry::new(header.cluster_bits, header.is_extended_l2());
        let external_data = header.incompatible_features & INCOMPAT_DATA_FILE != 0;
        opts.check_image_version(header.version)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut meta = crate::meta::load(tracked, header, opts, mode.check, file_len)?;
        if let Some(sn) = opts.get_load_snapshot() {
            if !read_only {
                return Err(Error::InvalidArgument(
                    "A snapshot can only be loaded on a read-only image".into(),
                ));
            }
            meta.view_snapshot(sn)?;
        }
        // QEMU loads the persistent bitmaps at every open, read-only ones
        // (`qemu-img info`) included: a directory or table that fails its
        // checks fails the open. A read-write handle keeps them; check mode
        // leaves them to the checker.
        if !mode.check {
            if !read_only && !mode.no_io {
                meta.bitmaps = crate::meta::bitmaps::load_bitmaps(&meta)?;
            } else {
                crate::meta::bitmaps::validate_bitmaps(&meta)?;
            }
        }

        let base_dir = path
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let data_file_path = if let (true, Some(d)) = (external_data, data_override) {
            meta.gate
                .set_data_file(Arc::new(Tracked::new(d, opts.get_cache_no_flush())));
            None
        } else if external_data && mode.no_io {
            // QEMU's BDRV_O_NO_IO open (qemu-img info) does not open the
            // data file: inspecting an image does not need it, and a missing
            // or locked data file must not stop it. No guest data can be
            // reached through this handle anyway.
            None
        } else if let (true, Some(spec)) = (external_data, opts.data_file_backend()) {
            // `data-file.driver=nbd|blkdebug|quorum|null-co`: the storage comes
            // from the options, not from the name in the header.
            let name = PathBuf::from(format!("data-file.driver={}", spec.driver));
            let s = crate::storage::open_from_options(spec, read_only).map_err(|m| {
                Error::DataFile {
                    path: name.clone(),
                    source: Box::new(Error::InvalidArgument(m)),
                }
            })?;
            meta.gate
                .set_data_file(Arc::new(Tracked::new(s, opts.get_cache_no_flush())));
            Some(name)
        } else if external_data {
            let name = opts
                .get_data_file()
                .map(Path::to_path_buf)
                .or_else(|| meta.header.data_file_name().map(PathBuf::from))
                .ok_or_else(|| {
                    Error::InvalidArgument("'data-file' is required for this image".into())
                })?;
            let (s, resolved): (Arc<dyn Storage>, PathBuf) = match opts.get_file_resolver() {
                Some(r) => {
                    let shown = name.to_string_lossy().into_owned();
                    let s = r
                        .open(super::FileRole::DataFile, &shown, !read_only)
                        .map_err(|e| Error::DataFile {
                            path: name.clone(),
                            source: Box::new(e),
                        })?;
                    (s, name)
                }
                None => {
                    let resolved = resolve(base_dir.as_deref(), &name);
                    if opts.get_data_file().is_none()
                        && !opts.get_backing_policy().permits(&resolved)
                    {
                        return Err(Error::BackingNotPermitted { path: resolved });
                    }
                    let s = FileStorage::open_with(&resolved, !read_only, opts.get_cache_direct())
                        .map_err(|e| Error::DataFile {
                            path: resolved.clone(),
                            source: Box::new(open_error(&resolved, e)),
                        })?;
                    (Arc::new(s), resolved)
                }
            };
            // As QEMU: first what attaching the data file asks, then what
            // the image's users add (so the first conflict is QEMU's).
            let (share, locking) = (opts.get_force_share(), opts.get_locking());
            s.lock(&LockRequest::data_file_attach(share, locking))?;
            s.lock(&LockRequest::data_file(read_only, share, locking))?;
            meta.gate
                .set_data_file(Arc::new(Tracked::new(s, opts.get_cache_no_flush())));
            Some(resolved)
        } else {
            // QEMU refuses the "raw external data" bit without a data file.
            if meta.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 {
                return Err(Error::InvalidArgument(
                    "data-file-raw requires a data file".into(),
                ));
            }
            None
        };
        if let Some((c, physical)) = cipher.clone() {
            meta.gate.set_crypto(c, physical);
        }
        let data = meta.gate.data().clone();
        let reader = meta.gate.reader();

        // QEMU opens the backing chain after the image itself (data file
        // included). Before the handle exists, so that a failure here cannot
        // write anything (dropping a writable handle would close it).
        let backing = if mode.skip_backing {
            None
        } else {
            open_backing_chain(&meta.header, path.as_deref(), opts, mode.no_io)?
        };
        // Encrypted and no key: an inspection handle, refusing guest data.
        let no_key = meta.header.crypt_method != 0 && cipher.is_none();
        let image = Image {
            path,
            storage: file,
            file: reader,
            data,
            data_file_path,
            backing,
            meta: RwLock::new(meta),
            io_barrier: ShardedLock::new(()),
            in_flight_mx: Mutex::new(()),
            in_flight_done: Condvar::new(),
            in_flight_waiters: std::sync::atomic::AtomicUsize::new(0),
            read_only,
            gone: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            corruption_signalled: AtomicBool::new(false),
            events: RwLock::new(opts.get_event_sink()),
            opts: opts.clone(),
            geom,
            dirty_repair: None,
            no_key,
            luks,
            crypt_rmw: RwLock::new(()),
        };
        if !repair_dirty {
            return Ok(image);
        }
        // QEMU repairs a dirty image on a read-write open (`check -r all`).
        let (mut image, report) = repair_dirty_at_open(image)?;
        if report.counts.corruptions > 0 || report.counts.check_errors > 0 {
            return Err(Error::InvalidArgument(
                "Could not repair dirty image".into(),
            ));
        }
        image.dirty_repair = Some(report);
        Ok(image)
    }
}

/// Repairs a dirty image opened read-write with the repair service
/// (QEMU's `check -r all` at open) and hands it back with the report.
/// Corruption met by the repair reaches the embedder's event callback
/// (given in `OpenOptions::on_event`) like corruption met by a request.
fn repair_dirty_at_open(image: Image) -> Result<(Image, crate::repair::CheckReport)> {
    use crate::repair::{CheckEvent, Finding};
    let sink = image.event_sink();
    let node_name = image.options().get_node_name().map(str::to_owned);
    let forward = move |ev: CheckEvent<'_>| {
        if let (Some(sink), CheckEvent::Finding(Finding::CorruptionEvent { message, fatal })) =
            (sink.as_ref(), ev)
        {
            sink(&crate::Event::ImageCorrupted {
                node_name: node_name.clone(),
                msg: message.clone(),
                offset: None,
                size: None,
                fatal: *fatal,
            });
        }
    };
    let mut report =
        crate::repair::repair_dirty(&mut *image.lock_meta()?, Some(Box::new(forward)))?;
    report.filename = image
        .path()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Ok((image, report))
}

/// QEMU's refusals of `force-share=on` and `file.read-only=on` for a
/// read-write open.
fn check_open_mode(opts: &OpenOptions) -> Result<()> {
    opts.check_force_share()
        .and_then(|()| opts.check_file_read_only())
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// How an image is opened beyond its options.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OpenMode {
    /// Check/repair mode: corrupt and dirty images open read-write.
    pub repair: bool,
    /// QEMU's `BDRV_O_CHECK` (implies `repair`): the header is decoded with
    /// [`Header::decode_for_check`], refcounts past the end of the file do
    /// not stop allocations (the repair allocates on its own terms), and the
    /// snapshot table is not loaded (the checker reads, validates and
    /// registers it itself).
    pub check: bool,
    /// Do not open the backing file.
    pub skip_backing: bool,
    /// QEMU's `BDRV_O_NO_IO` (what `qemu-img info` opens with): an
    /// encrypted image opens without a key (its LUKS header is validated),
    /// and the handle refuses every guest data request.
    pub no_io: bool,
}

/// Most images a backing chain may have below the image opened. QEMU has no
/// bound; ours keeps the recursion of reads that fall through the chain, the
/// open file descriptors and the time to open a crafted chain small, far
/// above any real chain. A deeper chain fails to open with
/// [`Error::BackingChainTooDeep`].
pub const MAX_BACKING_DEPTH: usize = 200;

/// The identity of a file: device and inode (`st_dev`, `st_ino`), so that a
/// chain that comes back to a file under another name is still a loop.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Wraps `e`, an error of the backing file at `chain[k]`'s depth, in one
/// [`Error::Backing`] per image of `chain` (innermost last), as a recursive
/// open would have.
fn wrap_chain(chain: &[PathBuf], e: Error) -> Error {
    chain.iter().rev().fold(e, |source, path| Error::Backing {
        path: path.clone(),
        source: Box::new(source),
    })
}

/// Opens the backing chain of the image whose header is `header` (opened
/// from `top`, if it was opened from a file), iteratively: each backing
/// image is opened without its own backing file, and the chain is linked
/// bottom-up at the end. A file that is already in the chain (same device
/// and inode, whatever its name) is [`Error::BackingLoop`]; more than
/// [`MAX_BACKING_DEPTH`] backing files is [`Error::BackingChainTooDeep`]
/// (neither is wrapped in [`Error::Backing`]: they name the file). With
/// `no_io`, backing images are opened as [`OpenMode::no_io`] too.
fn open_backing_chain(
    header: &Header,
    top: Option<&Path>,
    opts: &OpenOptions,
    no_io: bool,
) -> Result<Option<Backing>> {
    let resolver = opts.get_file_resolver();
    let mut seen: Vec<(u64, u64)> = top.and_then(file_id).into_iter().collect();
    // Storages a resolver returned, by identity (a loop returns one again).
    let mut seen_storages: Vec<usize> = Vec::new();
    // A backing file names its own key (QEMU's `backing.encrypt.*`), never
    // the top image's.
    let bopts = opts.clone().read_only(true).without_key();
    // The backing images opened so far, top first, and their paths.
    let mut images: Vec<Image> = Vec::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut header = header.clone();
    let mut base = top.and_then(Path::parent).map(Path::to_path_buf);
    let mut tail: Option<Backing> = None;
    while let Some(name) = header.backing_file_name() {
        // With a resolver, names are the embedder's: no file system lookup
        // and no backing policy (the resolver is the policy).
        let path = match resolver {
            Some(_) => PathBuf::from(name),
            None => resolve(base.as_deref(), Path::new(name)),
        };
        // A backing name that is an NBD URI (`nbd+unix:///EXPORT?socket=S`,
        // `nbd://HOST:PORT/EXPORT`) is opened with the nbd client, as QEMU does.
        let uri = resolver.is_none().then(|| nbd_uri_spec(name)).flatten();
        let given_here = (images.is_empty() && opts.backing_backend().is_some()) || uri.is_some();
        if resolver.is_none() && !given_here && !opts.get_backing_policy().permits(&path) {
            return Err(wrap_chain(&paths, Error::BackingNotPermitted { path }));
        }
        if images.len() >= MAX_BACKING_DEPTH {
            return Err(Error::BackingChainTooDeep {
                path,
                max: MAX_BACKING_DEPTH,
            });
        }
        paths.push(path.clone());
        // `backing.file.driver=...`: the first backing image's storage comes
        // from the options.
        let given = opts.backing_backend().filter(|_| images.is_empty());
        let storage: Arc<dyn Storage> =
            match (given.map(|b| &b.storage).or(uri.as_ref()), &resolver) {
                (Some(spec), _) => crate::storage::open_from_options(spec, true)
                    .map_err(|m| wrap_chain(&paths, Error::InvalidArgument(m)))?,
                (None, Some(r)) => {
                    let s = r
                        .open(super::FileRole::Backing, name, false)
                        .map_err(|e| wrap_chain(&paths, e))?;
                    let id = super::resolver::storage_id(&s);
                    if seen_storages.contains(&id) {
                        return Err(Error::BackingLoop { path });
                    }
                    seen_storages.push(id);
                    s
                }
                (None, None) => {
                    let s = FileStorage::open(&path, false)
                        .map_err(|e| wrap_chain(&paths, open_error(&path, e)))?;
                    if let Some(id) = file_id(&path) {
                        if seen.contains(&id) {
                            return Err(Error::BackingLoop { path });
                        }
                        seen.push(id);
                    }
                    Arc::new(s)
                }
            };
        let format = given
            .and_then(|b| b.format.as_deref())
            .or(header.backing_format());
        let is_qcow2 = match format {
            Some("raw") => false,
            Some("qcow2") => true,
            Some(other) => {
                return Err(wrap_chain(
                    &paths,
                    Error::Unsupported(Unsupported::BackingFormat {
                        format: other.to_owned(),
                    }),
                ));
            }
            None => {
                let mut magic = [0u8; 4];
                storage
                    .read_at(&mut magic, 0)
                    .map_err(|e| wrap_chain(&paths, Error::io(IoOp::Read, 0, e)))?;
                u32::from_be_bytes(magic) == QCOW2_MAGIC
            }
        };
        if !is_qcow2 {
            storage
                .lock(&LockRequest::raw_backing(opts.get_locking()))
                .map_err(|e| wrap_chain(&paths, e.into()))?;
            // QEMU sizes a raw file in whole sectors (the tail reads as zero).
            let size = storage
                .len()
                .map_err(|e| wrap_chain(&paths, Error::io(IoOp::Read, 0, e)))?
                .div_ceil(512)
                * 512;
            tail = Some(Backing::Raw {
                storage,
                size,
                path,
            });
            break;
        }
        let mode = OpenMode {
            skip_backing: true,
            no_io,
            ..Default::default()
        };
        // `backing.encrypt.key-secret` keys the first backing image only.
        let keyed = match opts.get_backing_key_secret() {
            Some(id) if images.is_empty() => Some(bopts.clone().key_secret(id)),
            _ => None,
        };
        let img = Image::open_inner(
            storage,
            Some(path.clone()),
            keyed.as_ref().unwrap_or(&bopts),
            mode,
            None,
        )
        .map_err(|e| wrap_chain(&paths, e))?;
        header = img.header();
        base = path.parent().map(Path::to_path_buf);
        images.push(img);
    }
    while let Some(mut img) = images.pop() {
        img.backing = tail;
        tail = Some(Backing::Qcow2(Box::new(img)));
    }
    Ok(tail)
}

impl Backing {
    /// Opens `name` the way an image at `overlay` would open it as its
    /// backing file (QEMU's `bdrv_get_full_backing_filename_from_filename`
    /// then an open with the backing format), read-only: through `opts`'
    /// [`crate::image::FileResolver`] when there is one, else resolved
    /// against `overlay`'s directory. `format` is `"qcow2"`, `"raw"` or
    /// `None` (probed: the qcow2 magic, else raw, as QEMU's probe between
    /// the two); a qcow2 image comes with its own backing chain. This is
    /// how `qemu-img rebase` opens the new backing file it compares with.
    ///
    /// ```
    /// use qcow2kit::image::Backing;
    /// use qcow2kit::{CreateOptions, OpenOptions};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let (top, nb) = (dir.path().join("top.qcow2"), dir.path().join("nb.raw"));
    /// qcow2kit::create::create(&top, &CreateOptions::new(), 1 << 20)?;
    /// std::fs::write(&nb, vec![7u8; 4096])?;
    /// let b = Backing::open("nb.raw", None, Some(&top), &OpenOptions::new())?;
    /// assert!(matches!(b, Backing::Raw { size: 4096, .. }));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Error::Open` when the file cannot be opened;
    /// [`Error::Unsupported`] for a format other than qcow2 and raw; the
    /// errors of opening a qcow2 image (wrapped in [`Error::Opening`]).
    pub fn open(
        name: &str,
        format: Option<&str>,
        overlay: Option<&Path>,
        opts: &OpenOptions,
    ) -> Result<Backing> {
        let opts = opts.clone().read_only(true);
        check_open_mode(&opts)?;
        let resolver = opts.get_file_resolver();
        let path = match resolver {
            Some(_) => PathBuf::from(name),
            None => resolve(overlay.and_then(Path::parent), Path::new(name)),
        };
        let storage: Arc<dyn Storage> = match resolver {
            Some(r) => r.open(super::FileRole::Backing, name, false)?,
            None => Arc::new(FileStorage::open(&path, false).map_err(|e| open_error(&path, e))?),
        };
        let is_qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(other) => {
                return Err(Error::Unsupported(Unsupported::BackingFormat {
                    format: other.to_owned(),
                }))
            }
            None => {
                let mut magic = [0u8; 4];
                let n = storage.len().map_err(|e| Error::io(IoOp::Read, 0, e))?;
                if n >= 4 {
                    storage
                        .read_at(&mut magic, 0)
                        .map_err(|e| Error::io(IoOp::Read, 0, e))?;
                }
                u32::from_be_bytes(magic) == QCOW2_MAGIC
            }
        };
        if !is_qcow2 {
            storage.lock(&LockRequest::raw_backing(opts.get_locking()))?;
            let size = storage
                .len()
                .map_err(|e| Error::io(IoOp::Read, 0, e))?
                .div_ceil(512)
                * 512;
            return Ok(Backing::Raw {
                storage,
                size,
                path,
            });
        }
        let img = Image::open_inner(
            storage,
            Some(path.clone()),
            &opts,
            OpenMode::default(),
            None,
        )
        .map_err(|e| e.opening(&path))?;
        Ok(Backing::Qcow2(Box::new(img)))
    }
}

/// What [`check_encryption`] found: the LUKS header (for `info`) and, when
/// the image was opened with its key, the payload cipher.
/// The cipher comes with whether its IVs follow host offsets (LUKS) or
/// guest offsets (the legacy `aes` format).
type Encryption = (
    Option<Box<LuksHeader>>,
    Option<(Arc<crate::crypto::SectorCipher>, bool)>,
);

/// The encryption of the image at open, in QEMU's order
/// (`qcow2_update_options_prepare`, then `qcrypto_block_luks_open`):
/// `encrypt.format` against the header, the missing key
/// (`Parameter 'encrypt.key-secret' is required for cipher`), the secret
/// lookup, the LUKS header, then the key slots. An inspection open
/// ([`OpenMode::no_io`]) needs no key and only reads the LUKS header.
///
/// This is the one place where a key is turned into a cipher.
fn check_encryption(
    header: &Header,
    file: &dyn Storage,
    mode: OpenMode,
    opts: &OpenOptions,
) -> Result<Encryption> {
    use crate::crypto::CryptoError;
    let format = match header.crypt_method {
        0 => {
            if let Some(f) = opts.get_encrypt_format() {
                return Err(Error::InvalidArgument(format!(
                    "No encryption in image header, but options specified format '{f}'"
                )));
            }
            return Ok((None, None));
        }
        CRYPT_LUKS => "luks",
        _ => "aes",
    };
    if let Some(f) = opts.get_encrypt_format() {
        if f != format {
            return Err(CryptoError::FormatMismatch {
                header: format,
                options: f.to_owned(),
            }
            .into());
        }
    }
    let crypto = header.crypto_header();
    if mode.no_io {
        // QEMU reads the LUKS header only through the extension's range.
        let Some((offset, length)) = crypto else {
            return Ok((None, None));
        };
        return Ok((
            Some(Box::new(read_luks_header(file, offset, length)?)),
            None,
        ));
    }
    if header.crypt_method == CRYPT_LUKS && crypto.is_none() {
        return Err(crate::format::FormatError::invalid(
            crate::format::Structure::HeaderExtension,
            None,
            format!(
                "Missing CRYPTO header for crypt method {}",
                header.crypt_method
            ),
        )
        .into());
    }
    let Some(id) = opts.get_key_secret() else {
        return Err(Error::EncryptionKeyRequired);
    };
    let secret = opts
        .get_secrets()
        .get(id)
        .ok_or_else(|| CryptoError::SecretNotFound { id: id.to_owned() })?;
    let password = secret.as_utf8(id)?;
    let Some((offset, length)) = crypto else {
        // The legacy `aes` format (crypt_method 1): QEMU's
        // `qcrypto_block_qcow_init`, the first 16 bytes of the password
        // (zero-padded) as an AES-128-CBC key, `plain64` IVs of guest
        // sectors. There is no key check: a wrong password reads noise.
        let mut key = zeroize::Zeroizing::new([0u8; 16]);
        let pw = password.as_bytes();
        let n = pw.len().min(16);
        key[..n].copy_from_slice(&pw[..n]);
        let spec = crate::crypto::CipherSpec {
            cipher_alg: "aes-128",
            cipher_mode: "cbc",
            ivgen_alg: "plain64",
            ivgen_hash_alg: None,
        };
        let cipher = crate::crypto::SectorCipher::new(&spec, &key[..])?;
        return Ok((None, Some((Arc::new(cipher), false))));
    };
    let luks = read_luks_header(file, offset, length)?;
    let mut read = |at: u64, buf: &mut [u8]| -> Result<()> {
        // QEMU's `qcow2_crypto_hdr_read_func`: only inside the extension.
        let end = at.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > length) {
            return Err(crate::format::FormatError::invalid(
                crate::format::Structure::LuksHeader,
                Some(offset.saturating_add(at)),
                "Request for data outside of extension header",
            )
            .into());
        }
        read_file(file, buf, offset + at)
    };
    let cipher = crate::crypto::luks::unlock(&luks, password.as_bytes(), &mut read)?;
    Ok((Some(Box::new(luks)), Some((Arc::new(cipher), true))))
}

/// Reads and validates the LUKS header at host `offset` (the extension
/// names `length` bytes).
fn read_luks_header(file: &dyn Storage, offset: u64, length: u64) -> Result<LuksHeader> {
    let len = crate::format::luks::LUKS_HEADER_LEN;
    let mut buf = vec![0u8; len];
    if length >= len as u64 {
        read_file(file, &mut buf, offset)?;
    } else {
        buf.truncate(0);
    }
    LuksHeader::decode(&buf).map_err(|mut e| {
        e.offset = Some(offset);
        e.into()
    })
}

/// `open(2)` of `path` failed.
pub(crate) fn open_error(path: &Path, source: std::io::Error) -> Error {
    Error::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// Resolves a file name stored in an image against the image's directory.
pub(crate) fn resolve(base: Option<&Path>, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match base {
        Some(b) if !b.as_os_str().is_empty() => b.join(name),
        _ => name.to_path_buf(),
    }
}

/// The storage of an image given by name, and the path it has in the file
/// system: an NBD URI (`nbd+unix:///EXPORT?socket=S`, `nbd://HOST:PORT/EXPORT`) is
/// opened with the nbd client, as QEMU takes one wherever a file name goes (no
/// path: relative names stored in the image resolve against the current
/// directory); anything else is a file.
pub(crate) fn open_named(
    path: &Path,
    writable: bool,
    direct: bool,
) -> Result<(Arc<dyn Storage>, Option<PathBuf>)> {
    if let Some(spec) = path.to_str().and_then(nbd_uri_spec) {
        let s = crate::storage::open_from_options(&spec, !writable)
            .map_err(|m| Error::InvalidArgument(m).opening(path))?;
        return Ok((s, None));
    }
    let f = FileStorage::open_with(path, writable, direct).map_err(|e| open_error(path, e))?;
    Ok((Arc::new(f), Some(path.to_path_buf())))
}

/// The nbd storage spec of a backing file name that is an NBD URI, if it is one.
fn nbd_uri_spec(name: &str) -> Option<crate::storage::BackendSpec> {
    ["nbd://", "nbd+unix://", "nbd+tcp://"]
        .iter()
        .any(|p| name.starts_with(p))
        .then(|| crate::storage::BackendSpec {
            driver: "nbd".into(),
            options: vec![("filename".into(), name.replace("nbd+tcp://", "nbd://"))],
        })
}
