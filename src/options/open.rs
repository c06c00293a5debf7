//! Runtime options (§6.1, §7.1, §11.1, cli.md §12.2): [`OpenOptions`] and QEMU's
//! `--image-opts` syntax.

use std::path::{Path, PathBuf};

use super::cache::{cache_config, CacheConfig};
use super::error::OptionError;
use super::overlap::{OverlapCheckOptions, OverlapChecks};
use super::parse::{
    parse_bool_onoff, parse_number, parse_size_option, split_option_string, validate_node_name,
};
use super::policy::{BackingPolicy, ErrorPolicy};
use crate::storage::Locking;

/// Options for opening an image (QEMU's qcow2 runtime options plus a few block-layer ones).
///
/// Build with [`OpenOptions::new`] and the builder methods, or from QEMU's `--image-opts`
/// syntax with [`OpenOptions::from_qemu_str`]. Getters are prefixed `get_` (the plain names are
/// the builders).
///
/// # Image locking
///
/// Opening an image file takes the byte-range locks QEMU's file driver takes
/// (see [`crate::storage::lock`] for the bytes), on the image file, the external data file and
/// every backing file, and keeps them until the image is dropped. So a qcow2kit process and a
/// QEMU process (or two of either) exclude each other as two QEMU processes do:
///
/// * a read-write open blocks every other open of the file (it fails with
///   [`Error::Lock`](crate::Error::Lock): `Failed to get shared "write" lock` for a read-only
///   opener, `Failed to get "write" lock` for a writer);
/// * a read-only open blocks writers, not other readers;
/// * a read-only open with [`force_share`](OpenOptions::force_share) (`-U`) blocks nobody and is
///   blocked by nobody (what it reads may change under it).
///
/// The locks are open-file-description locks: two opens of one file in the same process
/// exclude each other too. [`locking`](OpenOptions::locking) (QEMU's `file.locking`) turns
/// this off; unlike QEMU, where `file.locking` concerns the image file only, it applies to
/// every file of the open. Images opened from a caller's [`Storage`](crate::storage::Storage)
/// are locked through [`Storage::lock`](crate::storage::Storage::lock), which only
/// [`FileStorage`](crate::storage::FileStorage) implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    read_only: bool,
    l2_cache_size: Option<u64>,
    l2_cache_entry_size: Option<u64>,
    refcount_cache_size: Option<u64>,
    cache_size: Option<u64>,
    cache_clean_interval: Option<u64>,
    overlap_check: OverlapChecks,
    overlap_options: OverlapCheckOptions,
    lazy_refcounts: Option<bool>,
    pass_discard_request: bool,
    pass_discard_snapshot: bool,
    pass_discard_other: bool,
    discard_no_unref: bool,
    filename: Option<PathBuf>,
    data_file: Option<PathBuf>,
    backing_policy: BackingPolicy,
    rerror: ErrorPolicy,
    werror: ErrorPolicy,
    node_name: Option<String>,
    event_handler: crate::events::EventHandler,
    file_resolver: crate::image::ResolverHandle,
    locking: Locking,
    force_share: bool,
    file_read_only: bool,
    cache_direct: bool,
    cache_no_flush: bool,
    file_backend: Option<crate::storage::BackendSpec>,
    data_file_backend: Option<crate::storage::BackendSpec>,
    backing_backend: Option<BackingBackend>,
    load_snapshot: Option<String>,
    secrets: crate::crypto::SecretStore,
    key_secret: Option<String>,
    backing_key_secret: Option<String>,
    encrypt_format: Option<String>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions::new()
    }
}

impl OpenOptions {
    /// QEMU's defaults: read-write, caches sized by [`cache_config`], `cached` overlap checks,
    /// lazy refcounts as the header says, `pass-discard-snapshot` on, the other discard options
    /// off, follow backing files, report I/O errors.
    ///
    /// ```
    /// use qcow2kit::options::{BackingPolicy, OverlapCheckMode, OverlapChecks};
    /// use qcow2kit::OpenOptions;
    ///
    /// let opts = OpenOptions::new()
    ///     .l2_cache_size(8 << 20)
    ///     .overlap_check(OverlapChecks::from_mode(OverlapCheckMode::All))
    ///     .backing_policy(BackingPolicy::Refuse); // an untrusted image opens no other file
    /// assert!(!opts.get_read_only());
    /// ```
    pub fn new() -> Self {
        OpenOptions {
            read_only: false,
            l2_cache_size: None,
            l2_cache_entry_size: None,
            refcount_cache_size: None,
            cache_size: None,
            cache_clean_interval: None,
            overlap_check: OverlapChecks::default(),
            overlap_options: OverlapCheckOptions::new(),
            lazy_refcounts: None,
            pass_discard_request: false,
            pass_discard_snapshot: true,
            pass_discard_other: false,
            discard_no_unref: false,
            filename: None,
            data_file: None,
            backing_policy: BackingPolicy::Follow,
            rerror: ErrorPolicy::Report,
            werror: ErrorPolicy::Report,
            node_name: None,
            event_handler: crate::events::EventHandler::default(),
            file_resolver: crate::image::ResolverHandle::default(),
            locking: Locking::Auto,
            force_share: false,
            file_read_only: false,
            cache_direct: false,
            cache_no_flush: false,
            file_backend: None,
            data_file_backend: None,
            backing_backend: None,
            load_snapshot: None,
            secrets: crate::crypto::SecretStore::new(),
            key_secret: None,
            backing_key_secret: None,
            encrypt_format: None,
        }
    }

    /// Parses QEMU runtime options (see [`OpenOptions::apply_qemu_str`]) over the defaults.
    ///
    /// ```
    /// use qcow2kit::OpenOptions;
    ///
    /// # fn main() -> Result<(), qcow2kit::options::OptionError> {
    /// // The syntax of qemu-io --image-opts (QEMU's runtime option names).
    /// let opts = OpenOptions::from_qemu_str("l2-cache-size=4M,overlap-check=all,read-only=on")?;
    /// assert!(opts.get_read_only());
    /// // Unknown values are refused with QEMU's message.
    /// let err = OpenOptions::from_qemu_str("overlap-check=sometimes").unwrap_err();
    /// assert!(err.to_string().contains("sometimes"));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`OpenOptions::apply_qemu_str`].
    pub fn from_qemu_str(s: &str) -> Result<Self, OptionError> {
        let mut opts = OpenOptions::new();
        opts.apply_qemu_str(s)?;
        Ok(opts)
    }

    /// Opens read-only (`read-only=on`).
    #[must_use]
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    /// Upper bound of the L2 cache in bytes (`l2-cache-size`).
    #[must_use]
    pub fn l2_cache_size(mut self, bytes: u64) -> Self {
        self.l2_cache_size = Some(bytes);
        self
    }

    /// Size of one L2 cache entry (an L2 slice) in bytes (`l2-cache-entry-size`).
    #[must_use]
    pub fn l2_cache_entry_size(mut self, bytes: u64) -> Self {
        self.l2_cache_entry_size = Some(bytes);
        self
    }

    /// Size of the refcount block cache in bytes (`refcount-cache-size`).
    #[must_use]
    pub fn refcount_cache_size(mut self, bytes: u64) -> Self {
        self.refcount_cache_size = Some(bytes);
        self
    }

    /// Combined size of both caches in bytes (`cache-size`).
    #[must_use]
    pub fn cache_size(mut self, bytes: u64) -> Self {
        self.cache_size = Some(bytes);
        self
    }

    /// Seconds after which unused cache entries are dropped, 0 = never (`cache-clean-interval`).
    #[must_use]
    pub fn cache_clean_interval(mut self, seconds: u64) -> Self {
        self.cache_clean_interval = Some(seconds);
        self
    }

    /// The overlap checks (replaces any `overlap-check*` options parsed before).
    #[must_use]
    pub fn overlap_check(mut self, checks: OverlapChecks) -> Self {
        self.overlap_check = checks;
        self.overlap_options = OverlapCheckOptions::new();
        self
    }

    /// Overrides the image's lazy-refcounts bit for this open (`lazy-refcounts`).
    #[must_use]
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = Some(on);
        self
    }

    /// Passes guest discards that free host clusters down to the file (`pass-discard-request`).
    /// QEMU's default follows `discard=unmap`; qemu-io sets it, so `qcow2-img io` should too.
    #[must_use]
    pub fn pass_discard_request(mut self, on: bool) -> Self {
        self.pass_discard_request = on;
        self
    }

    /// Discards host ranges freed by snapshot operations (`pass-discard-snapshot`, default on).
    #[must_use]
    pub fn pass_discard_snapshot(mut self, on: bool) -> Self {
        self.pass_discard_snapshot = on;
        self
    }

    /// Shows the content of internal snapshot `id_or_name` (looked up by ID
    /// first, then by name) instead of the current content: QEMU's
    /// `qcow2_snapshot_load_tmp`, what `qemu-img convert -l` and `measure -l`
    /// do. Only for read-only opens; the virtual size stays the image's.
    ///
    /// ```
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 1 << 20)?;
    /// let img = Image::open_storage(file.clone(), &OpenOptions::new())?;
    /// img.write_at(b"old", 0)?;
    /// img.snapshot_create("s1")?;
    /// img.write_at(b"new", 0)?;
    /// img.close()?;
    /// let opts = OpenOptions::new().read_only(true).load_snapshot("s1");
    /// let snap = Image::open_storage(file, &opts)?;
    /// let mut buf = [0u8; 3];
    /// snap.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf, b"old");
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn load_snapshot(mut self, id_or_name: impl Into<String>) -> Self {
        self.load_snapshot = Some(id_or_name.into());
        self
    }

    /// The secrets `encrypt.key-secret` may name (QEMU's `--object secret,...`).
    /// The same store is used for the backing files (each names its own key).
    #[must_use]
    pub fn secrets(mut self, secrets: crate::crypto::SecretStore) -> Self {
        self.secrets = secrets;
        self
    }

    /// The id of the secret holding the image's key: the LUKS passphrase
    /// (`encrypt.key-secret`). Without it an encrypted image refuses to open
    /// for I/O (`Parameter 'encrypt.key-secret' is required for cipher`).
    ///
    /// ```
    /// use qcow2kit::crypto::{Secret, SecretStore};
    /// use qcow2kit::OpenOptions;
    ///
    /// let mut secrets = SecretStore::new();
    /// secrets.insert("sec0", Secret::new("abc"));
    /// let opts = OpenOptions::new().secrets(secrets).key_secret("sec0");
    /// assert_eq!(opts.get_key_secret(), Some("sec0"));
    /// assert!(!format!("{opts:?}").contains("abc")); // secrets never show
    /// ```
    #[must_use]
    pub fn key_secret(mut self, id: impl Into<String>) -> Self {
        self.key_secret = Some(id.into());
        self
    }

    /// The id of the secret holding the key of the first backing image,
    /// when that image is encrypted (QEMU's `backing.encrypt.key-secret`).
    /// Without it an encrypted backing file refuses to open, as in QEMU.
    ///
    /// ```
    /// use qcow2kit::OpenOptions;
    ///
    /// let opts = OpenOptions::from_qemu_str("encrypt.key-secret=a,backing.encrypt.key-secret=b")
    ///     .expect("QEMU's option names");
    /// assert_eq!(opts.get_key_secret(), Some("a"));
    /// assert_eq!(opts.get_backing_key_secret(), Some("b"));
    /// ```
    #[must_use]
    pub fn backing_key_secret(mut self, id: impl Into<String>) -> Self {
        self.backing_key_secret = Some(id.into());
        self
    }

    /// Discards host ranges freed for other reasons (`pass-discard-other`, default off).
    #[must_use]
    pub fn pass_discard_other(mut self, on: bool) -> Self {
        self.pass_discard_other = on;
        self
    }

    /// Keeps clusters allocated on guest discard, only marking them zero (`discard-no-unref`,
    /// v3 only).
    #[must_use]
    pub fn discard_no_unref(mut self, on: bool) -> Self {
        self.discard_no_unref = on;
        self
    }

    /// The image file (`file.filename`), for callers that take it from the option string.
    #[must_use]
    pub fn with_filename(mut self, path: PathBuf) -> Self {
        self.filename = Some(path);
        self
    }

    /// The external data file to use instead of the one named in the header (`data-file`).
    #[must_use]
    pub fn data_file(mut self, path: PathBuf) -> Self {
        self.data_file = Some(path);
        self
    }

    /// Which backing files may be opened.
    #[must_use]
    pub fn backing_policy(mut self, policy: BackingPolicy) -> Self {
        self.backing_policy = policy;
        self
    }

    /// Policy for failed reads (`rerror`).
    #[must_use]
    pub fn rerror(mut self, policy: ErrorPolicy) -> Self {
        self.rerror = policy;
        self
    }

    /// Policy for failed writes (`werror`).
    #[must_use]
    pub fn werror(mut self, policy: ErrorPolicy) -> Self {
        self.werror = policy;
        self
    }

    /// The node name reported in events (`node-name`; not validated here, see
    /// [`validate_node_name`]).
    #[must_use]
    pub fn node_name(mut self, name: String) -> Self {
        self.node_name = Some(name);
        self
    }

    /// Registers the callback that receives the image's [`Event`](crate::Event)s from the
    /// moment it opens, so events raised during the open itself (the automatic repair of a
    /// dirty image, corruption found while loading tables) are seen too. Backing images
    /// opened with these options report to the same callback. [`Image::on_event`] replaces
    /// it later.
    ///
    /// The callback runs on the thread that hit the condition, possibly with the image's
    /// metadata lock held: it must not call back into the same image.
    ///
    /// ```
    /// use qcow2kit::{Event, Image, OpenOptions, storage::MemStorage};
    /// use std::sync::{Arc, Mutex};
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &qcow2kit::CreateOptions::new(), 1 << 20)?;
    /// let seen = Arc::new(Mutex::new(Vec::<Event>::new()));
    /// let log = seen.clone();
    /// let opts = OpenOptions::new().on_event(move |e| log.lock().unwrap().push(e.clone()));
    /// let img = Image::open_storage(file, &opts)?;
    /// img.write_at(&[1; 512], 0)?;
    /// assert!(seen.lock().unwrap().is_empty()); // nothing went wrong
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`Image::on_event`]: crate::Image::on_event
    #[must_use]
    pub fn on_event(mut self, sink: impl Fn(&crate::Event) + Send + Sync + 'static) -> Self {
        self.event_handler = crate::events::EventHandler(Some(std::sync::Arc::new(sink)));
        self
    }

    /// Opens the backing files and the external data file through `resolver`
    /// instead of the file system (see [`FileResolver`](crate::image::FileResolver)):
    /// for embedders that hand out storages themselves, such as a sandboxed
    /// VMM that receives file descriptors. The backing policy does not apply
    /// then: the resolver decides.
    #[must_use]
    pub fn file_resolver(
        mut self,
        resolver: std::sync::Arc<dyn crate::image::FileResolver>,
    ) -> Self {
        self.file_resolver = crate::image::ResolverHandle(Some(resolver));
        self
    }

    /// The resolver given with [`OpenOptions::file_resolver`], if any.
    pub(crate) fn get_file_resolver(
        &self,
    ) -> Option<std::sync::Arc<dyn crate::image::FileResolver>> {
        self.file_resolver.0.clone()
    }

    /// The event callback given with [`OpenOptions::on_event`], if any.
    pub(crate) fn get_event_sink(&self) -> Option<crate::events::EventSink> {
        self.event_handler.0.clone()
    }

    /// Whether to take QEMU-compatible image locks (`file.locking`, default
    /// [`Locking::Auto`]); see [Image locking](OpenOptions#image-locking).
    #[must_use]
    pub fn locking(mut self, locking: Locking) -> Self {
        self.locking = locking;
        self
    }

    /// Shares every permission with other users of the files (`force-share`, qemu-img's
    /// `-U`): the open neither blocks nor is blocked by others. Only for read-only opens: a
    /// read-write open with it fails with [`OptionError::ForceShareReadWrite`]'s message.
    #[must_use]
    pub fn force_share(mut self, on: bool) -> Self {
        self.force_share = on;
        self
    }

    /// `file.locking`.
    pub fn get_locking(&self) -> Locking {
        self.locking
    }

    /// `force-share`.
    pub fn get_force_share(&self) -> bool {
        self.force_share
    }

    /// QEMU's check of `force-share` against the open mode, made before any file is opened.
    ///
    /// # Errors
    /// [`OptionError::ForceShareReadWrite`] for `force-share=on` without read-only.
    pub fn check_force_share(&self) -> Result<(), OptionError> {
        if self.force_share && !self.read_only {
            return Err(OptionError::ForceShareReadWrite);
        }
        Ok(())
    }

    /// QEMU's check of `file.read-only` against the open mode: the image
    /// file's node may be read-only only when the image is.
    ///
    /// # Errors
    /// [`OptionError::FileReadOnly`] for `file.read-only=on` under a
    /// read-write open.
    pub fn check_file_read_only(&self) -> Result<(), OptionError> {
        if self.file_read_only && !self.read_only {
            return Err(OptionError::FileReadOnly);
        }
        Ok(())
    }

    /// Bypasses the host page cache: the image file (and an external data
    /// file) is opened with `O_DIRECT` (`cache.direct`, QEMU's
    /// `cache=none`/`directsync`). File systems without `O_DIRECT` (tmpfs)
    /// make the open fail with `EINVAL`, as in QEMU.
    #[must_use]
    pub fn cache_direct(mut self, on: bool) -> Self {
        self.cache_direct = on;
        self
    }

    /// Makes flushes skip the sync (`cache.no-flush`, QEMU's `cache=unsafe`):
    /// dirty metadata is still written to the file, but nothing is made
    /// durable, so a host crash can lose or corrupt the image.
    #[must_use]
    pub fn cache_no_flush(mut self, on: bool) -> Self {
        self.cache_no_flush = on;
        self
    }

    /// `cache.direct`.
    pub fn get_cache_direct(&self) -> bool {
        self.cache_direct
    }

    /// `cache.no-flush`.
    pub fn get_cache_no_flush(&self) -> bool {
        self.cache_no_flush
    }

    /// Whether the image is opened read-only.
    pub fn get_read_only(&self) -> bool {
        self.read_only
    }

    /// `l2-cache-size`, if given.
    pub fn get_l2_cache_size(&self) -> Option<u64> {
        self.l2_cache_size
    }

    /// `l2-cache-entry-size`, if given.
    pub fn get_l2_cache_entry_size(&self) -> Option<u64> {
        self.l2_cache_entry_size
    }

    /// `refcount-cache-size`, if given.
    pub fn get_refcount_cache_size(&self) -> Option<u64> {
        self.refcount_cache_size
    }

    /// `cache-size`, if given.
    pub fn get_cache_size(&self) -> Option<u64> {
        self.cache_size
    }

    /// `cache-clean-interval` in seconds, if given ([`cache_config`] applies the default).
    pub fn get_cache_clean_interval(&self) -> Option<u64> {
        self.cache_clean_interval
    }

    /// The enabled overlap checks.
    pub fn get_overlap_check(&self) -> OverlapChecks {
        self.overlap_check
    }

    /// The lazy-refcounts override; `None` means: as the header's compatible bit 0 says.
    pub fn get_lazy_refcounts(&self) -> Option<bool> {
        self.lazy_refcounts
    }

    /// `pass-discard-request`.
    pub fn get_pass_discard_request(&self) -> bool {
        self.pass_discard_request
    }

    /// `pass-discard-snapshot`.
    pub fn get_pass_discard_snapshot(&self) -> bool {
        self.pass_discard_snapshot
    }

    /// The snapshot whose content the image shows ([`OpenOptions::load_snapshot`]).
    pub fn get_load_snapshot(&self) -> Option<&str> {
        self.load_snapshot.as_deref()
    }

    /// These options without `encrypt.key-secret`/`encrypt.format` (for
    /// backing files, which take their own).
    pub(crate) fn without_key(mut self) -> Self {
        self.key_secret = None;
        self.backing_key_secret = None;
        self.encrypt_format = None;
        self
    }

    /// The secret store.
    pub fn get_secrets(&self) -> &crate::crypto::SecretStore {
        &self.secrets
    }

    /// `encrypt.key-secret`.
    pub fn get_key_secret(&self) -> Option<&str> {
        self.key_secret.as_deref()
    }

    /// `backing.encrypt.key-secret` ([`OpenOptions::backing_key_secret`]).
    pub fn get_backing_key_secret(&self) -> Option<&str> {
        self.backing_key_secret.as_deref()
    }

    /// `encrypt.format` (`luks` or `aes`), if given: the image must match.
    pub fn get_encrypt_format(&self) -> Option<&str> {
        self.encrypt_format.as_deref()
    }

    /// `pass-discard-other`.
    pub fn get_pass_discard_other(&self) -> bool {
        self.pass_discard_other
    }

    /// `discard-no-unref`.
    pub fn get_discard_no_unref(&self) -> bool {
        self.discard_no_unref
    }

    /// The image file given as `file.filename=` or `file=`.
    pub fn filename(&self) -> Option<&Path> {
        self.filename.as_deref()
    }

    /// The storage backend given as `file.driver=null-co|null-aio|nbd|quorum|blkdebug`
    /// and its `file.*` options (open it with
    /// [`open_from_options`](crate::storage::open_from_options)).
    pub fn file_backend(&self) -> Option<&crate::storage::BackendSpec> {
        self.file_backend.as_ref()
    }

    /// The storage of the external data file given as `data-file.driver=DRIVER` and its
    /// `data-file.*` options (any of [`BACKEND_DRIVERS`](crate::storage::BACKEND_DRIVERS));
    /// used instead of the data file the image names.
    pub fn data_file_backend(&self) -> Option<&crate::storage::BackendSpec> {
        self.data_file_backend.as_ref()
    }

    /// The first backing image given as `backing.file.driver=DRIVER` (a storage backend,
    /// or `file` with `backing.file.filename`) and its `backing.file.*` options, with
    /// `backing.driver` (`qcow2` or `raw`) if given: used instead of the backing file
    /// the image names. Its own backing files are found as usual.
    pub fn backing_backend(&self) -> Option<&BackingBackend> {
        self.backing_backend.as_ref()
    }

    /// The external data file override.
    pub fn get_data_file(&self) -> Option<&Path> {
        self.data_file.as_deref()
    }

    /// The backing file policy.
    pub fn get_backing_policy(&self) -> &BackingPolicy {
        &self.backing_policy
    }

    /// The read error policy.
    pub fn get_rerror(&self) -> ErrorPolicy {
        self.rerror
    }

    /// The write error policy.
    pub fn get_werror(&self) -> ErrorPolicy {
        self.werror
    }

    /// The node name, if any.
    pub fn get_node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }

    /// Cache sizes for an image with this geometry; see [`cache_config`].
    ///
    /// # Errors
    /// As [`cache_config`].
    pub fn cache_config(
        &self,
        virtual_size: u64,
        cluster_size: u64,
        l2_entry_bytes: u64,
    ) -> Result<CacheConfig, OptionError> {
        cache_config(self, virtual_size, cluster_size, l2_entry_bytes)
    }

    /// The checks QEMU makes once the image version is known (after [`cache_config`]):
    /// `lazy-refcounts=on` and `discard-no-unref=on` need a v3 image.
    ///
    /// # Errors
    /// [`OptionError::LazyRefcountsOpenV2`], [`OptionError::DiscardNoUnrefV2`].
    pub fn check_image_version(&self, version: u32) -> Result<(), OptionError> {
        if version < 3 {
            if self.lazy_refcounts == Some(true) {
                return Err(OptionError::LazyRefcountsOpenV2);
            }
            if self.discard_no_unref {
                return Err(OptionError::DiscardNoUnrefV2);
            }
        }
        Ok(())
    }

    /// Applies a QEMU runtime option list (`--image-opts` / `open -o` syntax) on top of the
    /// current values. Accepted keys:
    ///
    /// * `driver` (only `qcow2`), `file.filename` or `file` (the image file), `file.driver`
    ///   (only `file`), `data-file` / `data-file.filename` (a path), `read-only`, `node-name`,
    ///   `rerror`, `werror` (the last two are `-drive` options in QEMU; accepted here),
    ///   `force-share` (a boolean), `file.locking` (`on`, `off` or `auto`), `file.read-only`
    ///   (a boolean; `on` requires a read-only open, as the image file node then is);
    ///   `cache.direct`, `cache.no-flush` (booleans; see [`OpenOptions::cache_direct`] and
    ///   [`OpenOptions::cache_no_flush`]);
    /// * `l2-cache-size`, `l2-cache-entry-size`, `refcount-cache-size`, `cache-size` (sizes,
    ///   [`parse_size`](super::parse_size) syntax), `cache-clean-interval` (a number);
    /// * `lazy-refcounts`, `pass-discard-request`, `pass-discard-snapshot`,
    ///   `pass-discard-other`, `discard-no-unref` (booleans);
    /// * `overlap-check`, `overlap-check.template`, `overlap-check.<kind>` (see
    ///   [`OverlapCheckOptions`]).
    ///
    /// Errors are reported in QEMU's order: an unknown driver first, then the first bad value
    /// in list order, then overlap-check resolution, then the first unknown key. (QEMU reports
    /// cache-size errors before the last two; those need the image and come from
    /// [`cache_config`].) On error `self` is unchanged.
    ///
    /// # Errors
    /// [`OptionError::UnknownDriver`], [`OptionError::FileConflict`], value errors
    /// ([`OptionError::BadBool`], [`OptionError::BadSize`], [`OptionError::SizeOutOfRange`],
    /// [`OptionError::BadNumber`], [`OptionError::NumberTooLarge`],
    /// [`OptionError::BadErrorAction`], [`OptionError::InvalidNodeName`],
    /// [`OptionError::NodeNameTooLong`], [`OptionError::UnexpectedParameter`] for `encrypt.*`
    /// other than `encrypt.key-secret` and `encrypt.format`), overlap
    /// errors ([`OptionError::OverlapConflict`], [`OptionError::OverlapMode`]),
    /// [`OptionError::UnsupportedOption`] / [`OptionError::UnknownOverlapFlag`] for unknown keys,
    /// [`OptionError::InvalidOptionList`].
    pub fn apply_qemu_str(&mut self, s: &str) -> Result<(), OptionError> {
        let mut pairs = split_option_string(s)?;
        let mut next = self.clone();
        if let Some(spec) = take_backend(&mut pairs, "file.", None)? {
            next.file_backend = Some(spec);
        }
        if let Some(spec) = take_backend(&mut pairs, "data-file.", None)? {
            next.data_file_backend = Some(spec);
            next.data_file = None;
        }
        let backing_format = pairs
            .iter()
            .rev()
            .find(|(k, _)| k == "backing.driver")
            .map(|(_, v)| v.clone());
        if let Some(spec) = take_backend(&mut pairs, "backing.file.", Some("file"))? {
            if let Some(f) = backing_format.as_deref() {
                if f != "qcow2" && f != "raw" {
                    return Err(OptionError::UnknownDriver {
                        driver: f.to_owned(),
                    });
                }
            }
            pairs.retain(|(k, _)| k != "backing.driver");
            next.backing_backend = Some(BackingBackend {
                format: backing_format,
                storage: spec,
            });
        }
        let mut driver_error = None;
        let mut value_error = None;
        let mut unknown_error = None;
        let mut files = FileKeys::default();
        let mut data_files = FileKeys::default();
        for (key, value) in &pairs {
            let result = next.apply_pair(key, value, &mut files, &mut data_files);
            match result {
                Ok(()) => {}
                Err(e @ OptionError::UnknownDriver { .. }) => {
                    driver_error.get_or_insert(e);
                }
                Err(
                    e @ (OptionError::UnsupportedOption { .. }
                    | OptionError::UnknownOverlapFlag { .. }),
                ) => {
                    unknown_error.get_or_insert(e);
                }
                Err(e) => {
                    value_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = driver_error {
            return Err(e);
        }
        let file_result = files
            .resolve()
            .and_then(|f| data_files.resolve().map(|d| (f, d)));
        if let Some(e) = file_result.as_ref().err().cloned().or(value_error) {
            return Err(e);
        }
        if let Ok((file, data_file)) = file_result {
            if let Some(file) = file {
                next.filename = Some(file);
            }
            if let Some(data_file) = data_file {
                next.data_file = Some(data_file);
            }
        }
        if !next.overlap_options.is_empty() {
            next.overlap_check = next.overlap_options.resolve_over(self.overlap_check)?;
        }
        if let Some(e) = unknown_error {
            return Err(e);
        }
        *self = next;
        Ok(())
    }

    fn apply_pair(
        &mut self,
        key: &str,
        value: &str,
        files: &mut FileKeys,
        data_files: &mut FileKeys,
    ) -> Result<(), OptionError> {
        let bool_value = || parse_bool_onoff(key, value);
        match key {
            "driver" => {
                if value != "qcow2" {
                    return Err(OptionError::UnknownDriver {
                        driver: value.to_owned(),
                    });
                }
            }
            "file" => files.reference = Some(value.into()),
            "file.filename" => files.filename = Some(value.into()),
            "file.driver" => files.set_driver(value)?,
            "file.locking" => {
                files.other = true;
                self.locking =
                    Locking::parse(value).ok_or_else(|| OptionError::InvalidParameterValue {
                        option: "file.locking",
                        value: value.to_owned(),
                    })?;
            }
            "file.read-only" => {
                files.other = true;
                // QEMU names the option as the file node sees it.
                self.file_read_only = parse_bool_onoff("read-only", value)?;
            }
            "force-share" => self.force_share = bool_value()?,
            "data-file" => data_files.reference = Some(value.into()),
            "data-file.filename" => data_files.filename = Some(value.into()),
            "data-file.driver" => data_files.set_driver(value)?,
            "read-only" => self.read_only = bool_value()?,
            "cache.direct" => self.cache_direct = bool_value()?,
            "cache.no-flush" => self.cache_no_flush = bool_value()?,
            "node-name" => {
                validate_node_name(value)?;
                self.node_name = Some(value.to_owned());
            }
            "rerror" => self.rerror = ErrorPolicy::parse(value, true)?,
            "werror" => self.werror = ErrorPolicy::parse(value, false)?,
            "l2-cache-size" => self.l2_cache_size = Some(parse_size_option(key, value)?),
            "l2-cache-entry-size" => {
                self.l2_cache_entry_size = Some(parse_size_option(key, value)?);
            }
            "refcount-cache-size" => {
                self.refcount_cache_size = Some(parse_size_option(key, value)?);
            }
            "cache-size" => self.cache_size = Some(parse_size_option(key, value)?),
            "cache-clean-interval" => {
                self.cache_clean_interval = Some(parse_number(key, value)?);
            }
            "lazy-refcounts" => self.lazy_refcounts = Some(bool_value()?),
            "pass-discard-request" => self.pass_discard_request = bool_value()?,
            "pass-discard-snapshot" => self.pass_discard_snapshot = bool_value()?,
            "pass-discard-other" => self.pass_discard_other = bool_value()?,
            "discard-no-unref" => self.discard_no_unref = bool_value()?,
            "encrypt.key-secret" => self.key_secret = Some(value.to_owned()),
            "backing.encrypt.key-secret" => self.backing_key_secret = Some(value.to_owned()),
            // Compared with the header at open, as QEMU does.
            "encrypt.format" => self.encrypt_format = Some(value.to_owned()),
            _ if key.starts_with("encrypt.") => {
                return Err(OptionError::UnexpectedParameter {
                    option: key.trim_start_matches("encrypt.").to_owned(),
                })
            }
            _ => {
                if !self.overlap_options.set(key, value)? {
                    return Err(OptionError::UnsupportedOption {
                        option: key.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The first backing image given by options (`backing.driver`, `backing.file.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingBackend {
    /// `backing.driver` (`qcow2` or `raw`); `None`: as the image header says, or probed.
    pub format: Option<String>,
    /// `backing.file.driver` and the other `backing.file.*` options.
    pub storage: crate::storage::BackendSpec,
}

/// When `PREFIXdriver` names a storage backend ([`BACKEND_DRIVERS`](crate::storage::BACKEND_DRIVERS))
/// or `extra`, removes every `PREFIX*` pair from `pairs` and returns them as a checked spec.
fn take_backend(
    pairs: &mut Vec<(String, String)>,
    prefix: &str,
    extra: Option<&str>,
) -> Result<Option<crate::storage::BackendSpec>, OptionError> {
    let driver_key = format!("{prefix}driver");
    let driver = pairs
        .iter()
        .rev()
        .find(|(k, _)| *k == driver_key)
        .map(|(_, v)| v.clone());
    let Some(driver) = driver.filter(|d| {
        crate::storage::BACKEND_DRIVERS.contains(&d.as_str()) || Some(d.as_str()) == extra
    }) else {
        return Ok(None);
    };
    let mut options = Vec::new();
    pairs.retain(|(k, v)| match k.strip_prefix(prefix) {
        Some("driver") => false,
        Some(rest) => {
            options.push((rest.to_owned(), v.clone()));
            false
        }
        None => true,
    });
    let spec = crate::storage::BackendSpec { driver, options };
    spec.validate().map_err(|message| OptionError::Backend {
        driver: spec.driver.clone(),
        message,
    })?;
    Ok(Some(spec))
}

/// `file=` / `file.filename=` / `file.driver=` (or the `data-file` equivalents) of one list.
#[derive(Default)]
struct FileKeys {
    reference: Option<PathBuf>,
    filename: Option<PathBuf>,
    driver: bool,
    /// Another `file.*` option was given.
    other: bool,
}

impl FileKeys {
    fn set_driver(&mut self, value: &str) -> Result<(), OptionError> {
        if value != "file" {
            return Err(OptionError::UnknownDriver {
                driver: value.to_owned(),
            });
        }
        self.driver = true;
        Ok(())
    }

    /// The path given, or a conflict if both a reference and `.filename`/`.driver` were given.
    fn resolve(&self) -> Result<Option<PathBuf>, OptionError> {
        match (&self.reference, &self.filename) {
            (Some(_), _) if self.filename.is_some() || self.driver || self.other => {
                Err(OptionError::FileConflict)
            }
            (Some(path), None) | (None, Some(path)) => Ok(Some(path.clone())),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "open_tests.rs"]
mod tests;
