//! Checking and repairing qcow2 images, counting exactly as `qemu-img check`.
//!
//! A check walks every structure that references host clusters (the header,
//! the active and all snapshot L1/L2 tables, compressed cluster spans, the
//! snapshot table, the refcount table and blocks, the LUKS header, the
//! persistent bitmaps), builds the reference count every host cluster should
//! have, compares it with the on-disk refcounts and checks the COPIED flags
//! of the active tables. Findings are data ([`Finding`], in QEMU's order and
//! words); only a check that cannot run (unreadable file, absurd sizes, I/O
//! errors) is an `Err`.
//!
//! With [`Repair::Leaks`] refcounts that are too high are lowered; with
//! [`Repair::All`] COPIED flags are fixed, broken entries zeroed where QEMU
//! does, and the refcount structures rebuilt when a refcount is zero for a
//! referenced cluster or the structures themselves are broken. After a
//! repair that changed something the image is checked again (the counters
//! then describe that second run plus what was fixed), and the dirty and
//! corrupt bits are cleared only if that final run found no corruption.
//!
//! ```
//! use qcow2kit::check::{check_storage, CheckOptions, Repair};
//! use qcow2kit::storage::{MemStorage, Storage};
//! use std::sync::Arc;
//!
//! let disk: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! qcow2kit::create::create_on(disk.clone(), &qcow2kit::CreateOptions::default(), 1 << 20)?;
//! let report = check_storage(disk, Repair::None, CheckOptions::default())?;
//! assert_eq!(report.exit_code(), 0);
//! assert_eq!(report.human_summary(), "No errors were found on the image.\nImage end offset: 262144\n");
//! # Ok::<(), qcow2kit::Error>(())
//! ```
//!
//! For a file, [`check`] takes a path; the `qemu-img check` command line
//! itself is the `qcow2-check` binary's (and `qcow2-img check`'s).
//!
//! This module opens the image for a check and renders the report; the
//! walk and the repairs are the repair engine's (`crate::repair`), which the
//! image open also uses to repair a dirty image. Every repair write goes
//! through the image's write gate, ordered so that an interrupted repair
//! leaves an image that checks no worse than before it.

mod report;

pub use crate::repair::{
    stale_bitmaps_findings, CheckCounts, CheckEvent, CheckReport, EventCallback, Finding,
    RefcountVerdict, Repair, PHASES,
};

use crate::error::{Error, Result};
use crate::image::{Image, OpenMode};
use crate::options::OpenOptions;
use crate::storage::Storage;
use std::path::Path;
use std::sync::Arc;

/// Options of a check run.
#[derive(Default)]
pub struct CheckOptions<'a> {
    /// Called for every [`CheckEvent`] as it happens (for streaming output
    /// and progress bars; the findings are in the report as well).
    pub on_event: Option<EventCallback<'a>>,
    /// The file name the report carries (for JSON output).
    pub filename: Option<String>,
}

impl std::fmt::Debug for CheckOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckOptions")
            .field("on_event", &self.on_event.is_some())
            .field("filename", &self.filename)
            .finish()
    }
}

/// An image opened for checking (read-only) or repair (read-write, even
/// when marked corrupt or dirty).
#[derive(Debug)]
pub struct Checker {
    image: Image,
    repair: Repair,
    filename: String,
}

impl Checker {
    /// Opens the image at `path`: read-only for [`Repair::None`], read-write
    /// otherwise. The backing file is opened too, as `qemu-img check` does.
    ///
    /// # Errors
    /// What opening the image fails with, named by the file as for
    /// [`Image::open`] (`Error::Open`, or `Error::Opening` around `Error::Io`
    /// for the file, `Error::Format` for an invalid header,
    /// `Error::Backing`, ...).
    pub fn open(path: &Path, repair: Repair) -> Result<Checker> {
        let writable = repair != Repair::None;
        // An NBD URI opens the nbd client, as for `Image::open`.
        let (file, named) = crate::image::open_named(path, writable, false)?;
        Self::open_inner(file, named, repair, path.display().to_string())
            .map_err(|e| e.opening(path))
    }

    /// Opens an image held in any [`Storage`]. The storage must be writable
    /// for a repair.
    ///
    /// # Errors
    /// As for [`Checker::open`].
    pub fn open_storage(storage: Arc<dyn Storage>, repair: Repair) -> Result<Checker> {
        Self::open_inner(storage, None, repair, String::new())
    }

    /// Opens an image held in `storage` that was opened from `path` (used to
    /// find its backing file); the storage must be writable for a repair.
    ///
    /// # Errors
    /// As for [`Checker::open`].
    pub fn open_storage_at(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        repair: Repair,
    ) -> Result<Checker> {
        Self::open_storage_with(storage, path, repair, &OpenOptions::new())
    }

    /// As [`Checker::open_storage_at`], with runtime options for the image
    /// and its backing chain (locking, `force-share`, ...); read-only is
    /// set from `repair`, whatever `opts` says.
    ///
    /// # Errors
    /// As for [`Checker::open`]; `force-share` with a repair is refused
    /// with QEMU's message.
    pub fn open_storage_with(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        repair: Repair,
        opts: &OpenOptions,
    ) -> Result<Checker> {
        let name = path.map(|p| p.display().to_string()).unwrap_or_default();
        Self::open_inner_with(storage, path.map(Path::to_path_buf), repair, name, opts)
    }

    fn open_inner(
        storage: Arc<dyn Storage>,
        path: Option<std::path::PathBuf>,
        repair: Repair,
        filename: String,
    ) -> Result<Checker> {
        Self::open_inner_with(storage, path, repair, filename, &OpenOptions::new())
    }

    fn open_inner_with(
        storage: Arc<dyn Storage>,
        path: Option<std::path::PathBuf>,
        repair: Repair,
        filename: String,
        opts: &OpenOptions,
    ) -> Result<Checker> {
        let opts = opts.clone().read_only(repair == Repair::None);
        let mode = OpenMode {
            repair: true,
            check: true,
            ..Default::default()
        };
        let image = Image::open_with_mode(storage, path, &opts, mode)?;
        validate_bitmaps(&image)?;
        Ok(Checker {
            image,
            repair,
            filename,
        })
    }

    /// Closes the image: with a repair, whatever the repair left in the
    /// caches is written back and synced (see [`Image::close`]).
    ///
    /// # Errors
    /// As for [`Image::close`].
    pub fn close(self) -> Result<()> {
        self.image.close()
    }

    /// The open image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Runs the check (and the repair with its double check).
    ///
    /// # Errors
    /// When the check cannot complete, as `qemu-img check` fails with
    /// "Check failed: ...": I/O errors, absurd sizes (`Error::TooLarge`), an
    /// unreadable snapshot table or bitmap directory, or a refcount
    /// structure that needs rebuilding under [`Repair::Leaks`]
    /// (`Error::Corrupt`, "Input/output error"). Findings reported before the
    /// failure went to [`CheckOptions::on_event`].
    pub fn run(&self, opts: CheckOptions<'_>) -> Result<CheckReport> {
        let mut meta = self.image.lock_meta()?;
        let writable = !self.image.is_read_only();
        let filename = opts.filename.unwrap_or_else(|| self.filename.clone());
        crate::repair::run(&mut meta, self.repair, writable, filename, opts.on_event)
    }
}

/// What QEMU's open does with persistent bitmaps (`qcow2_load_dirty_bitmaps`,
/// in every mode): the directory must decode and satisfy QEMU's
/// constraints, names must be unique, and the table of every bitmap not
/// marked in use must hold valid entries; otherwise the open fails.
fn validate_bitmaps(image: &Image) -> Result<()> {
    use crate::format::bitmap::{decode_bitmap_directory, decode_bitmap_table_entry};
    let meta = image.lock_meta()?;
    let h = &meta.header;
    if h.autoclear_features & crate::format::consts::AUTOCLEAR_BITMAPS == 0 {
        return Ok(());
    }
    let Some(ext) = h.bitmaps().copied() else {
        return Ok(());
    };
    let invalid = |m: String| Error::InvalidArgument(m);
    let mut dir = vec![0u8; ext.bitmap_directory_size as usize];
    meta.gate
        .reader()
        .read_at(&mut dir, ext.bitmap_directory_offset)
        .map_err(|e| {
            invalid(format!(
                "Failed to read bitmap directory: {}",
                crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            ))
        })?;
    let list = decode_bitmap_directory(&dir, ext.nb_bitmaps, h.cluster_bits)
        .map_err(|e| invalid(e.reason))?;
    let mut names = std::collections::HashSet::new();
    for bm in &list {
        bm.check_covers(h.size, h.cluster_bits)
            .map_err(|e| invalid(e.reason))?;
        if !names.insert(bm.name.as_str()) {
            return Err(invalid(format!("Bitmap already exists: {}", bm.name)));
        }
        if bm.in_use() {
            continue;
        }
        let tsize = u64::from(bm.bitmap_table_size) * 8;
        let mut chunk = vec![0u8; tsize.min(1 << 20) as usize];
        let mut pos = 0u64;
        while pos < tsize {
            let n = (tsize - pos).min(chunk.len() as u64) as usize;
            let bad = |errno: i32| {
                invalid(format!(
                    "Could not read bitmap_table table from image for bitmap '{}': {}",
                    bm.name,
                    crate::error::strerror(errno)
                ))
            };
            meta.gate
                .reader()
                .read_at(&mut chunk[..n], bm.bitmap_table_offset + pos)
                .map_err(|e| bad(e.raw_os_error().unwrap_or(libc::EIO)))?;
            for c in chunk[..n].chunks_exact(8) {
                let e = crate::format::be_u64(c, 0).unwrap_or(0);
                if decode_bitmap_table_entry(e, h.cluster_bits).is_err() {
                    return Err(bad(libc::EINVAL));
                }
            }
            pos += n as u64;
        }
    }
    Ok(())
}

/// Checks (and with `repair`, repairs) the image at `path`.
///
/// ```
/// use qcow2kit::check::{self, Repair};
/// use qcow2kit::{CreateOptions, Image, OpenOptions};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.qcow2");
/// qcow2kit::create::create(&path, &CreateOptions::new(), 1 << 30)?;
/// Image::open(&path, &OpenOptions::new())?.write_at(&[1; 4096], 0)?;
///
/// // Without a repair mode the file is opened read-only and never written.
/// let report = check::check(&path, Repair::None)?;
/// assert_eq!(report.counts.corruptions, 0);
/// assert_eq!(report.counts.leaks, 0);
/// assert_eq!(report.exit_code(), 0); // qemu-img check's exit code
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// Opening errors and the errors of [`Checker::run`].
pub fn check(path: &Path, repair: Repair) -> Result<CheckReport> {
    Checker::open(path, repair)?.run(CheckOptions::default())
}

/// Checks (and with `repair`, repairs) an image held in any [`Storage`].
///
/// ```
/// use qcow2kit::check::{self, CheckEvent, CheckOptions, Repair};
/// use qcow2kit::storage::{MemStorage, Storage};
/// use qcow2kit::CreateOptions;
/// use std::sync::Arc;
///
/// # fn main() -> qcow2kit::Result<()> {
/// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 1 << 20)?;
/// let mut lines = Vec::new();
/// let opts = CheckOptions {
///     // Findings stream out as they are found (qcow2-check prints them).
///     on_event: Some(Box::new(|e| {
///         if let CheckEvent::Finding(f) = e {
///             lines.push(f.to_string());
///         }
///     })),
///     ..Default::default()
/// };
/// let report = check::check_storage(file, Repair::All, opts)?;
/// assert_eq!(report.counts.corruptions + report.counts.leaks, 0);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// Opening errors and the errors of [`Checker::run`].
pub fn check_storage(
    storage: Arc<dyn Storage>,
    repair: Repair,
    opts: CheckOptions<'_>,
) -> Result<CheckReport> {
    Checker::open_storage(storage, repair)?.run(opts)
}
