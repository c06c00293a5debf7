//! The crate's one public error type.

use crate::format::{FormatError, Structure};
use crate::types::MetadataKind;
use std::io;
use std::path::{Path, PathBuf};

/// Which I/O operation failed: in [`Error::Io`], and as the `operation` of an
/// [`Event::IoError`](crate::Event::IoError) (there only `Read` or `Write`,
/// QEMU's `IoOperationType`: flush, discard and write-zeroes report `Write`).
///
/// Serialized (in events) and displayed lower-case: `read`, `write`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum IoOp {
    /// Reading the image (or a backing file).
    Read,
    /// Writing the image (also discard and write-zeroes).
    Write,
    /// Flushing (syncing) the image.
    Flush,
    /// Truncating or extending the image file.
    Resize,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Resize => "resize",
        })
    }
}

/// What would exceed a limit of the format (or of QEMU, whose limits this
/// crate keeps): the payload of [`Error::TooLarge`]. `Display` is the message
/// QEMU prints for the same condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// A virtual disk of `size` bytes would need an L1 table larger than
    /// 32 MiB (resize).
    DiskSize {
        /// The requested virtual size in bytes.
        size: u64,
    },
    /// The active L1 table would grow to `entries` entries, beyond 32 MiB.
    ActiveL1Table {
        /// The entries needed.
        entries: u64,
    },
    /// The refcount table would exceed its maximum size (8 MiB).
    RefcountTable,
    /// A new cluster would lie beyond the largest host offset the format can
    /// address.
    HostOffset,
    /// The snapshot table has more than the allowed 65536 entries.
    SnapshotTable {
        /// Number of snapshots the header claims.
        count: u32,
    },
    /// A snapshot table entry's extra data exceeds 1 KiB.
    SnapshotExtraData {
        /// Index of the entry in the snapshot table.
        index: u32,
        /// Its extra data size in bytes.
        size: u32,
    },
    /// The snapshot table (with its entries' extra data and names) would
    /// exceed 64 MiB.
    SnapshotTableSize {
        /// Its size in bytes, counted up to the entry that went over.
        bytes: u64,
    },
    /// The image file has more clusters than `check` can track (2^31 - 1), or
    /// a table names a host offset at or beyond 2^63.
    CheckedClusters,
    /// The header, its extensions and the backing file name would not fit
    /// in the first cluster (QEMU's `-ENOSPC` from `qcow2_update_header`).
    HeaderSpace,
    /// A table of `bytes` bytes does not fit in this process's address space.
    Memory {
        /// The table.
        what: Structure,
        /// Its size in bytes.
        bytes: u64,
    },
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::DiskSize { .. } => f.write_str(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            ),
            Limit::ActiveL1Table { .. } => f.write_str("Active L1 table too large"),
            Limit::RefcountTable => f.write_str("Reference count table too large"),
            Limit::HostOffset => f.write_str("image file would exceed the largest host offset"),
            Limit::SnapshotTable { .. } => f.write_str("snapshot table too large"),
            Limit::SnapshotExtraData { .. }
            | Limit::SnapshotTableSize { .. }
            | Limit::CheckedClusters => {
                f.write_str("File too large")
            }
            Limit::HeaderSpace => f.write_str("No space left in the file header"),
            Limit::Memory { what, bytes } => {
                write!(f, "{what} of {bytes} bytes does not fit in memory")
            }
        }
    }
}

/// A feature or operation this crate does not implement: the payload of
/// [`Error::Unsupported`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unsupported {
    /// A backing file in a format other than qcow2 and raw.
    BackingFormat {
        /// The format named (`backing_fmt` or the `backing.driver` option).
        format: String,
    },
    /// Compressed writes to an image with an external data file (QEMU
    /// refuses them too: compressed clusters live in the image file).
    CompressedWithDataFile,
    /// Internal snapshots of an image with an external data file (QEMU
    /// refuses them too: the data file cannot be shared copy-on-write).
    SnapshotWithDataFile,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsupported::BackingFormat { format } => write!(f, "backing file format '{format}'"),
            Unsupported::CompressedWithDataFile => {
                f.write_str("compressed writes with an external data file")
            }
            Unsupported::SnapshotWithDataFile => {
                f.write_str("internal snapshots of an image with an external data file")
            }
        }
    }
}

/// Why a persistent dirty bitmap request failed: the payload of
/// [`Error::Bitmap`]. `Display` is QEMU's message for the same condition
/// (what `qemu-img bitmap` prints after `Operation OP on bitmap NAME
/// failed: `).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BitmapError {
    /// No bitmap of that name: `Dirty bitmap 'NAME' not found`.
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// The bitmap is flagged `in_use` (it was not stored cleanly, e.g. after
    /// a crash): its bits are lost, only removing it works. `Bitmap 'NAME'
    /// is inconsistent and cannot be used`; see [`BitmapError::hint`].
    Inconsistent {
        /// The bitmap.
        name: String,
    },
    /// A bitmap of that name exists: `Bitmap already exists: NAME`.
    Exists {
        /// The name.
        name: String,
    },
    /// `Bitmap name cannot be empty`.
    EmptyName,
    /// A granularity that is not a power of two from 512 bytes to 2 GiB:
    /// `Granularity must be power of 2 and at least 512`.
    Granularity {
        /// The granularity asked for, in bytes.
        granularity: u64,
    },
    /// The bitmap cannot be stored in this image: `Can't make bitmap 'NAME'
    /// persistent: REASON` (QEMU names its node after `persistent in`; see
    /// [`BitmapError::qemu_message_for`]).
    NotPersistent {
        /// The bitmap.
        name: String,
        /// Why not.
        reason: NotPersistent,
    },
    /// Applying an internal snapshot to an image with persistent bitmaps
    /// (QEMU refuses it: they would not record the change):
    /// `Device has active dirty bitmaps`.
    SnapshotApply,
    /// Merging bitmaps that cover disks of different sizes.
    SizeMismatch {
        /// Virtual size of the image of the bitmap merged into.
        destination: u64,
        /// Virtual size of the image of the source bitmap.
        source: u64,
    },
}

/// Why a bitmap cannot be stored in an image (QEMU's
/// `qcow2_co_can_store_new_dirty_bitmap`): the payload of
/// [`BitmapError::NotPersistent`]. `Display` is QEMU's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotPersistent {
    /// A v2 (`compat=0.10`) image has no autoclear bits to protect bitmaps.
    V2Image,
    /// The bitmap at this granularity would need more than 512 MiB (or
    /// more table entries than allowed).
    TooLarge,
    /// The name is longer than 1023 bytes.
    NameTooLong,
    /// The image has 65535 bitmaps already.
    TooMany,
    /// The bitmap directory would exceed its 64 MiB limit.
    DirectoryFull,
}

impl std::fmt::Display for NotPersistent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotPersistent::V2Image => "Cannot store dirty bitmaps in qcow2 v2 files",
            NotPersistent::TooLarge => {
                "Too much space will be occupied by the bitmap. Use larger granularity"
            }
            NotPersistent::NameTooLong => "Name length exceeds maximum (1023 characters)",
            NotPersistent::TooMany => "Maximum number of persistent bitmaps is already reached",
            NotPersistent::DirectoryFull => "Not enough space in the bitmap directory",
        })
    }
}

impl BitmapError {
    /// The second line QEMU prints after the message, if any: for an
    /// inconsistent bitmap, `Try block-dirty-bitmap-remove to delete this
    /// bitmap from disk`.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            BitmapError::Inconsistent { .. } => {
                Some("Try block-dirty-bitmap-remove to delete this bitmap from disk")
            }
            _ => None,
        }
    }

    /// QEMU's message with its node name: as `Display`, but
    /// [`BitmapError::NotPersistent`] reads `Can't make bitmap 'NAME'
    /// persistent in 'NODE': REASON`.
    pub fn qemu_message_for(&self, node: &str) -> String {
        match self {
            BitmapError::NotPersistent { name, reason } => {
                format!("Can't make bitmap '{name}' persistent in '{node}': {reason}")
            }
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for BitmapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BitmapError::NotFound { name } => write!(f, "Dirty bitmap '{name}' not found"),
            BitmapError::Inconsistent { name } => {
                write!(f, "Bitmap '{name}' is inconsistent and cannot be used")
            }
            BitmapError::Exists { name } => write!(f, "Bitmap already exists: {name}"),
            BitmapError::EmptyName => f.write_str("Bitmap name cannot be empty"),
            BitmapError::Granularity { .. } => {
                f.write_str("Granularity must be power of 2 and at least 512")
            }
            BitmapError::NotPersistent { name, reason } => {
                write!(f, "Can't make bitmap '{name}' persistent: {reason}")
            }
            BitmapError::SnapshotApply => f.write_str("Device has active dirty bitmaps"),
            BitmapError::SizeMismatch {
                destination,
                source,
            } => write!(
                f,
                "Bitmaps are of different sizes (destination size is {destination}, source \
                 size is {source}) and can't be merged"
            ),
        }
    }
}

/// Every error of the library.
///
/// `Display` is lower-case and names the structure and host offset where
/// there is one; [`Error::qemu_message`] gives the text `qemu-img`/`qemu-io`
/// print for the same condition.
///
/// The enum is `#[non_exhaustive]`, as are the typed payloads
/// ([`Structure`], [`Limit`], [`Unsupported`], [`IoOp`], [`BitmapError`]): match what you
/// handle and keep a catch-all arm.
///
/// ```
/// use qcow2kit::error::{IoOp, Limit};
/// use qcow2kit::format::Structure;
/// use qcow2kit::Error;
///
/// fn advice(e: &Error) -> String {
///     match e {
///         Error::Corrupt { what: Structure::L2Table, offset, .. } => {
///             format!("an L2 table at {offset:#x} is damaged: run qcow2-check -r all")
///         }
///         Error::Corrupt { what, .. } => format!("the {what} is damaged"),
///         Error::Io { op: IoOp::Write, .. } if e.is_nospace() => "the disk is full".into(),
///         Error::TooLarge(Limit::DiskSize { size }) => {
///             format!("{size} bytes need a larger cluster size")
///         }
///         Error::Unsupported(what) => format!("not implemented: {what}"),
///         other => other.to_string(),
///     }
/// }
///
/// let full = Error::io(IoOp::Write, 0x1_0000, std::io::Error::from_raw_os_error(28)); // ENOSPC;
/// assert_eq!(advice(&full), "the disk is full");
/// let big = Error::TooLarge(Limit::DiskSize { size: 1 << 60 });
/// assert_eq!(advice(&big), "1152921504606846976 bytes need a larger cluster size");
/// // Display keeps QEMU's message where the tools print it.
/// assert_eq!(
///     big.to_string(),
///     "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
/// );
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backing file could not be opened.
    #[error("could not open backing file '{}': {source}", path.display())]
    Backing {
        /// The path that was tried.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// Reading the backing image failed for a reason of its own (corruption
    /// found in the backing image's tables, a damaged compressed cluster):
    /// the backing image reported it (a non-fatal
    /// [`ImageCorrupted`](crate::Event::ImageCorrupted) event on its handle),
    /// and this image, whose own metadata is fine, is not marked corrupt.
    /// I/O errors of the backing file are reported as [`Error::Io`].
    #[error("reading the backing image failed: {source}")]
    BackingRead {
        /// What the backing image reported.
        #[source]
        source: Box<Error>,
    },
    /// A persistent dirty bitmap request failed (unknown or inconsistent
    /// bitmap, bad name or granularity, ...); QEMU's text.
    #[error("{0}")]
    Bitmap(BitmapError),
    /// The backing chain is deeper than [`crate::image::MAX_BACKING_DEPTH`]
    /// images below the image opened.
    #[error("Backing file '{}' exceeds the maximum backing chain depth of {max}", path.display())]
    BackingChainTooDeep {
        /// The backing file that would have been one too many.
        path: PathBuf,
        /// The bound.
        max: usize,
    },
    /// The backing chain comes back to a file already in it (same device
    /// and inode); QEMU's `qemu-img info --backing-chain` text.
    #[error("Backing file '{}' creates an infinite loop.", path.display())]
    BackingLoop {
        /// The backing file name (resolved) that was already open in the chain.
        path: PathBuf,
    },
    /// The backing file is not permitted by the embedder's policy.
    #[error("backing file '{}' is not permitted by the backing policy", path.display())]
    BackingNotPermitted {
        /// The path the image names.
        path: PathBuf,
    },
    /// Structural corruption found while translating or updating metadata.
    #[error("corrupt {what} at host offset {offset:#x}: {msg}")]
    Corrupt {
        /// The structure that is corrupt.
        what: Structure,
        /// Host offset of the offending entry or table.
        offset: u64,
        /// QEMU's message for the event.
        msg: String,
    },
    /// A key or cipher problem of an encrypted image (wrong password, missing
    /// secret, unsupported cipher): QEMU's text.
    #[error("{0}")]
    Crypto(#[from] crate::crypto::CryptoError),
    /// A compressed cluster's data could not be decompressed to one cluster.
    #[error("could not decompress the cluster at host offset {offset:#x}: {reason}")]
    Decompress {
        /// Host offset of the compressed stream.
        offset: u64,
        /// What the decompressor said.
        reason: String,
    },
    /// The image is encrypted (`crypt_method` 1 or 2) and no key was given:
    /// guest data can be neither read nor written. QEMU's text. Opening for
    /// inspection ([`crate::Image::open_for_info`]) works; every guest data
    /// request on such a handle fails with this error.
    #[error("Parameter 'encrypt.key-secret' is required for cipher")]
    EncryptionKeyRequired,
    /// The header or a table is invalid or unsupported (refused at open).
    #[error("{0}")]
    Format(#[from] FormatError),
    /// Opening the image at `path` failed after the file itself was opened
    /// (reading or decoding its header and tables, its locks, its backing
    /// chain, ...): the wrapper every path-based open
    /// ([`Image::open`](crate::Image::open) and its siblings,
    /// [`Checker::open`](crate::check::Checker::open),
    /// [`amend`](crate::amend::amend)) puts around the error, so that its
    /// `Display` names the file. Match [`Error::inner`] to see the cause
    /// whether or not it is wrapped; [`Error::qemu_message`],
    /// [`Error::errno_text`] and [`Error::raw_os_error`] look through it.
    /// A failed `open(2)` is [`Error::Open`], which names the file itself.
    #[error("could not open '{}': {source}", path.display())]
    Opening {
        /// The image file that was being opened.
        path: PathBuf,
        /// What went wrong (never itself an `Opening`).
        #[source]
        source: Box<Error>,
    },
    /// A file could not be opened (`open(2)` failed): the image file itself,
    /// or, inside [`Error::Backing`] / [`Error::DataFile`], one it names.
    #[error("could not open '{}': {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The error of `open(2)`.
        #[source]
        source: io::Error,
    },
    /// The external data file named by the image (or the `data-file`
    /// option) could not be opened.
    #[error("could not open the data file '{}': {source}", path.display())]
    DataFile {
        /// The path that was tried.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// Opening a corrupt image read-write.
    #[error("image is corrupt; cannot be opened read/write")]
    ImageCorrupt,
    /// Invalid argument (options, sizes, requests).
    #[error("{0}")]
    InvalidArgument(String),
    /// An internal invariant did not hold: a bug in this crate, not a
    /// property of the image or of the request. The handle should be
    /// reopened; please report it.
    #[error("internal error (a bug in qcow2kit): {0}")]
    Internal(String),
    /// An I/O error of the storage.
    #[error("{op} failed at host offset {offset:#x}: {source}")]
    Io {
        /// What was being done.
        op: IoOp,
        /// Where.
        offset: u64,
        /// The storage error.
        #[source]
        source: io::Error,
    },
    /// Another process (or another open in this one) uses the file in a way this open
    /// cannot share: QEMU's image locking (see [`crate::storage::lock`]).
    #[error("{0}")]
    Lock(#[from] crate::storage::LockError),
    /// The handle was disabled by a fatal corruption event; reopen the image.
    #[error("no medium found: the image was disabled after a corruption event")]
    MediumGone,
    /// A request beyond the virtual disk size.
    #[error("request at guest offset {offset:#x} length {len} is beyond the disk size {size}")]
    OutOfRange {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A write that would overwrite metadata was prevented; the image was marked corrupt.
    #[error("write to host offset {offset:#x} length {size} would overwrite the {kind}; image marked corrupt")]
    OverlapPrevented {
        /// The structure hit.
        kind: MetadataKind,
        /// Host offset of the attempted write.
        offset: u64,
        /// Its length.
        size: u64,
    },
    /// An earlier metadata write failed; the handle must be reopened.
    #[error("an earlier metadata write failed; reopen the image")]
    PreviousIoFailed,
    /// A write on a read-only handle.
    #[error("the image is open read-only")]
    ReadOnly,
    /// The handle was closed with [`Image::shutdown`](crate::Image::shutdown).
    #[error("the image was closed")]
    Closed,
    /// A refcount would exceed its maximum (small refcount widths).
    #[error("refcount of host cluster {cluster} would exceed {max}")]
    RefcountOverflow {
        /// Host cluster index.
        cluster: u64,
        /// Largest refcount of the width.
        max: u64,
    },
    /// No internal snapshot has the ID or name given.
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    /// The image would need a table (or a file) larger than the format allows.
    #[error("{0}")]
    TooLarge(Limit),
    /// A compressed write onto a guest cluster that already has a host
    /// cluster (QEMU refuses it with `EIO`: compressed data is never
    /// written over allocated data).
    #[error("cannot write compressed data over the allocated cluster at guest offset {offset:#x}")]
    ClusterAllocated {
        /// Guest offset of the cluster.
        offset: u64,
    },
    /// A feature this crate does not implement (yet).
    #[error("unsupported: {0}")]
    Unsupported(Unsupported),
    /// A block job could not be started or driven (QEMU's texts).
    #[error("{0}")]
    Job(#[from] crate::job::JobError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done and where.
    pub fn io(op: IoOp, offset: u64, source: io::Error) -> Self {
        Error::Io { op, offset, source }
    }

    /// Names the image file `path` in an error of opening it (see
    /// [`Error::Opening`]); errors that already name it (a failed `open(2)`
    /// of `path`, an error already wrapped) are returned as they are.
    pub(crate) fn opening(self, path: &Path) -> Self {
        match self {
            Error::Opening { .. } => self,
            Error::Open { path: ref p, .. } if p == path => self,
            other => Error::Opening {
                path: path.to_path_buf(),
                source: Box::new(other),
            },
        }
    }

    /// The error without the file name a path-based open adds: the cause
    /// inside [`Error::Opening`], `self` for every other variant. Match on
    /// this to handle a cause the same way whether the image was opened by
    /// path or from a [`Storage`](crate::storage::Storage).
    ///
    /// ```
    /// use qcow2kit::{Error, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("not-an-image");
    /// std::fs::write(&path, b"this is not a qcow2 header")?;
    /// let e = Image::open(&path, &OpenOptions::new().read_only(true)).unwrap_err();
    /// assert!(e.to_string().contains("not-an-image"));
    /// assert_eq!(e.path(), Some(path.as_path()));
    /// assert!(matches!(e.inner(), Error::Format(_)));
    /// # Ok(())
    /// # }
    /// ```
    pub fn inner(&self) -> &Error {
        match self {
            Error::Opening { source, .. } => source,
            other => other,
        }
    }

    /// The image file a failed open names ([`Error::Opening`] and
    /// [`Error::Open`]), if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Opening { path, .. } | Error::Open { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The underlying OS error number, when this is an I/O error.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Opening { source, .. } => source.raw_os_error(),
            Error::Io { source, .. } | Error::Open { source, .. } => source.raw_os_error(),
            Error::Backing { source, .. } | Error::DataFile { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// `true` for ENOSPC.
    pub fn is_nospace(&self) -> bool {
        self.raw_os_error() == Some(libc::ENOSPC)
    }

    /// The `strerror` text QEMU's tools print for a failed request
    /// (`read failed: <this>`): `Input/output error`, `No medium found`, ...
    ///
    /// ```
    /// use qcow2kit::Error;
    ///
    /// let e = Error::io(qcow2kit::error::IoOp::Write, 0, std::io::Error::from_raw_os_error(28));
    /// assert_eq!(e.errno_text(), "No space left on device");
    /// assert!(e.is_nospace());
    /// assert_eq!(Error::MediumGone.errno_text(), "No medium found");
    /// ```
    pub fn errno_text(&self) -> String {
        match self {
            Error::Opening { source, .. } => source.errno_text(),
            Error::MediumGone => "No medium found".into(),
            Error::Closed => "Bad file descriptor".into(),
            Error::BackingRead { source } => source.errno_text(),
            Error::ReadOnly => "Permission denied".into(),
            Error::Io { source, .. } | Error::Open { source, .. } => match source.raw_os_error() {
                Some(code) => strerror(code),
                None => source.to_string(),
            },
            Error::InvalidArgument(_)
            | Error::Bitmap(_)
            | Error::RefcountOverflow { .. }
            | Error::EncryptionKeyRequired
            | Error::Crypto(_)
            | Error::BackingLoop { .. }
            | Error::BackingChainTooDeep { .. } => "Invalid argument".into(),
            Error::TooLarge(_) => "File too large".into(),
            Error::Unsupported(_) => "Operation not supported".into(),
            Error::SnapshotNotFound(_) => "No such file or directory".into(),
            _ => "Input/output error".into(),
        }
    }

    /// The message QEMU prints for this error when opening an image fails
    /// (after `Could not open 'FILE': `).
    pub fn qemu_message(&self) -> String {
        match self {
            // QEMU's caller prints the file name (`Could not open 'FILE': `).
            Error::Opening { source, .. } => source.qemu_message(),
            Error::Format(e) => e.reason.clone(),
            Error::ImageCorrupt => "qcow2: Image is corrupt; cannot be opened read/write".into(),
            Error::Io { source, .. } | Error::Open { source, .. } => match source.raw_os_error() {
                Some(code) => strerror(code),
                None => source.to_string(),
            },
            Error::Lock(e) => e.qemu_message(),
            // QEMU's file layer names the file only for its own (OS) errors.
            Error::Backing { path, source } => match **source {
                Error::Io { .. } | Error::Open { .. } => format!(
                    "Could not open backing file: Could not open '{}': {}",
                    path.display(),
                    source.qemu_message()
                ),
                _ => format!("Could not open backing file: {}", source.qemu_message()),
            },
            // QEMU opens the data file as a child node: no "backing file" prefix.
            Error::DataFile { path, source } => match **source {
                Error::Io { .. } | Error::Open { .. } => format!(
                    "Could not open '{}': {}",
                    path.display(),
                    source.qemu_message()
                ),
                _ => source.qemu_message(),
            },
            Error::InvalidArgument(m) => m.clone(),
            Error::TooLarge(limit) => limit.to_string(),
            Error::Bitmap(e) => e.to_string(),
            other => other.to_string(),
        }
    }
}

/// The C library's text for an errno (`strerror`), without the " (os error N)" suffix.
pub fn strerror(code: i32) -> String {
    let s = io::Error::from_raw_os_error(code).to_string();
    match s.rfind(" (os error") {
        Some(p) => s[..p].to_string(),
        None => s,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::check::{Checker, Repair};
    use crate::options::{AmendOptions, CreateOptions, OpenOptions};
    use crate::Image;

    /// Every path-based open names the file in `Display`, keeps the cause
    /// reachable through `inner()`, and keeps QEMU's message (which the
    /// tools prefix with the file name themselves) unchanged.
    fn assert_names(e: &Error, path: &Path) {
        let shown = e.to_string();
        assert!(
            shown.contains(&path.display().to_string()),
            "{shown:?} does not name {}",
            path.display()
        );
        assert_eq!(e.path(), Some(path));
        assert!(!matches!(e.inner(), Error::Opening { .. }), "{e:?}");
        assert_eq!(e.qemu_message(), e.inner().qemu_message());
        assert_eq!(e.errno_text(), e.inner().errno_text());
        assert_eq!(e.raw_os_error(), e.inner().raw_os_error());
    }

    #[test]
    fn path_based_opens_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ro = OpenOptions::new().read_only(true);

        // Garbage: the header does not decode.
        let garbage = dir.path().join("garbage.img");
        std::fs::write(&garbage, vec![0x5a; 4096]).unwrap();
        let e = Image::open(&garbage, &ro).unwrap_err();
        assert_names(&e, &garbage);
        assert!(matches!(e.inner(), Error::Format(_)), "{e:?}");
        assert!(!e.qemu_message().contains("garbage.img"));

        // Truncated: a real image cut inside its header; and an empty file.
        let img = dir.path().join("truncated.qcow2");
        crate::create::create(&img, &CreateOptions::new(), 1 << 20).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        file.set_len(40).unwrap();
        drop(file);
        let empty = dir.path().join("empty.qcow2");
        std::fs::write(&empty, b"").unwrap();
        for path in [&img, &empty] {
            for e in [
                Image::open(path, &ro).unwrap_err(),
                Image::open(path, &OpenOptions::new()).unwrap_err(),
                Image::open_without_backing(path, &ro).unwrap_err(),
                Image::open_for_info(path, &ro).unwrap_err(),
                Image::open_no_io(path, &ro).unwrap_err(),
                Checker::open(path, Repair::None).map(|_| ()).unwrap_err(),
                crate::amend::amend(path, &AmendOptions::default()).unwrap_err(),
            ] {
                assert_names(&e, path);
                // Not just "read failed at host offset 0x0".
                let prefix = format!("could not open '{}': ", path.display());
                assert!(e.to_string().starts_with(&prefix), "{e}");
            }
        }

        // A missing file: `open(2)` fails, and the error names it once.
        let missing = dir.path().join("missing.qcow2");
        let e = Image::open(&missing, &ro).unwrap_err();
        assert!(matches!(e, Error::Open { .. }), "{e:?}");
        assert_names(&e, &missing);
        assert_eq!(e.to_string().matches("missing.qcow2").count(), 1, "{e}");
        assert_eq!(e.qemu_message(), "No such file or directory");
    }

    #[test]
    fn opening_wraps_once() {
        let p = Path::new("/x/y.qcow2");
        let e = Error::ImageCorrupt.opening(p).opening(Path::new("/other"));
        assert_eq!(e.path(), Some(p));
        assert!(matches!(e.inner(), Error::ImageCorrupt));
        assert_eq!(
            e.to_string(),
            "could not open '/x/y.qcow2': image is corrupt; cannot be opened read/write"
        );
        assert_eq!(
            e.qemu_message(),
            "qcow2: Image is corrupt; cannot be opened read/write"
        );
    }
}
