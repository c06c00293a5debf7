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
//! For a file, [`check`] takes a path; `cli::run_check_cli` (feature `cli`) is the whole
//! `qemu-img check` command line.
//!
//! # Write ordering of repairs
//! Every repair write goes through the image's write gate
//! (`WriteGate::write`) with the exemption of the structure
//! being written, so a repair can never overwrite other metadata. Leak
//! repairs only lower refcounts towards the counted value, refcounts that are
//! too low are only raised, a rebuild writes the new structures before the
//! header points at them (see `compare.rs`), COPIED flags are fixed after the
//! refcounts are right, and the dirty/corrupt bits are cleared last. An
//! interrupted repair therefore leaves an image that checks no worse than
//! before it.

#[cfg(feature = "cli")]
#[cfg(feature = "cli")]
pub mod cli;
mod compare;
mod copied;
mod imrt;
mod pass;
mod rebuild;
mod repair;
mod report;
mod snapshots;
mod walk;

pub use report::{CheckCounts, CheckReport, Finding, RefcountVerdict};

use crate::error::{Error, Result};
use crate::format::consts::{AUTOCLEAR_MASK, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::image::{Image, OpenMode};
use crate::options::OpenOptions;
use crate::storage::{FileStorage, Storage};
use pass::{Fix, Pass};
use std::path::Path;
use std::sync::Arc;

/// What a check may repair (`qemu-img check -r`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Repair {
    /// Only check; the image is opened read-only and never written.
    #[default]
    None,
    /// `-r leaks`: lower refcounts that are higher than the references.
    Leaks,
    /// `-r all`: repair leaks and corruptions, rebuilding the refcount
    /// structures if needed.
    All,
}

impl Repair {
    fn fix(self) -> Fix {
        match self {
            Repair::None => Fix::default(),
            Repair::Leaks => Fix {
                leaks: true,
                errors: false,
            },
            Repair::All => Fix {
                leaks: true,
                errors: true,
            },
        }
    }
}

/// Something a running check reports, in order.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum CheckEvent<'a> {
    /// A diagnostic line.
    Finding(&'a Finding),
    /// The repair run fixed something; the image is about to be checked a
    /// second time (`qemu-img` prints "The following inconsistencies were
    /// found and repaired" here).
    Repaired {
        /// Leaks fixed.
        leaks_fixed: u64,
        /// Corruptions fixed.
        corruptions_fixed: u64,
    },
    /// Progress of the current phase of a run (`done` out of `total` work
    /// units).
    Progress {
        /// What is being done ("Checking L1/L2 tables", "Comparing refcounts",
        /// "Checking COPIED flags").
        phase: &'static str,
        /// Units done.
        done: u64,
        /// Units in this phase.
        total: u64,
    },
}

/// The callback receiving [`CheckEvent`]s.
pub type EventCallback<'a> = Box<dyn FnMut(CheckEvent<'_>) + 'a>;

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

/// Collects findings and forwards events.
pub(crate) struct Sink<'s> {
    findings: Vec<Finding>,
    on_event: Option<EventCallback<'s>>,
}

impl Sink<'_> {
    pub(crate) fn push(&mut self, f: Finding) {
        if let Some(cb) = self.on_event.as_mut() {
            cb(CheckEvent::Finding(&f));
        }
        self.findings.push(f);
    }

    pub(crate) fn event(&mut self, e: CheckEvent<'_>) {
        if let Some(cb) = self.on_event.as_mut() {
            cb(e);
        }
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
    /// What opening the image fails with (`Error::Io` for the file,
    /// `Error::Format` for an invalid header, `Error::Backing`, ...).
    pub fn open(path: &Path, repair: Repair) -> Result<Checker> {
        let writable = repair != Repair::None;
        let file =
            FileStorage::open(path, writable).map_err(|e| crate::image::open_error(path, e))?;
        Self::open_inner(
            Arc::new(file),
            Some(path.to_path_buf()),
            repair,
            path.display().to_string(),
        )
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

    /// Repairs a dirty image opened read-write (QEMU's automatic repair of a
    /// dirty image on open): runs `check -r all` on it and hands it back.
    pub(crate) fn repair_dirty(image: Image) -> Result<(Image, CheckReport)> {
        // The repair reads what is past the end of the file as `check -r all`
        // does, and allocates on its own terms.
        image.lock_meta()?.rc.allow_past_eof();
        let filename = image
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let checker = Checker {
            image,
            repair: Repair::All,
            filename,
        };
        // Corruption met by the repair reaches the embedder's event callback
        // (given in `OpenOptions::on_event`) like corruption met by a request.
        let sink = checker.image.event_sink();
        let node_name = checker.image.options().get_node_name().map(str::to_owned);
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
        let report = checker.run(CheckOptions {
            on_event: Some(Box::new(forward)),
            filename: None,
        })?;
        Ok((checker.image, report))
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
        let mut sink = Sink {
            findings: Vec::new(),
            on_event: opts.on_event,
        };
        stale_bitmaps_warning(&meta.header, &mut sink);
        let fix = self.repair.fix();
        let writable = !self.image.is_read_only();
        // A writer must clear autoclear bits it does not understand (QEMU
        // does it when it opens the image read-write). One field write:
        // unlike QEMU's header rewrite in check mode, it keeps the snapshots.
        let unknown = meta.header.autoclear_features & !AUTOCLEAR_MASK;
        if fix.any() && unknown != 0 && meta.header.version >= 3 {
            meta.header.autoclear_features &= AUTOCLEAR_MASK;
            let v = meta.header.autoclear_features.to_be_bytes();
            meta.write_header_field_for_repair(88, &v)?;
        }
        let mut registered = Vec::new();
        let (first, rebuilt) = run_pass(&mut meta, &mut sink, fix, writable, &mut registered)?;
        let mut counts = first;
        let mut double_checked = false;
        if first.corruptions_fixed != 0 || first.leaks_fixed != 0 {
            sink.event(CheckEvent::Repaired {
                leaks_fixed: first.leaks_fixed,
                corruptions_fixed: first.corruptions_fixed,
            });
            let (second, _) = run_pass(
                &mut meta,
                &mut sink,
                Fix::default(),
                writable,
                &mut registered,
            )?;
            counts = second;
            counts.leaks_fixed = first.leaks_fixed;
            counts.corruptions_fixed = first.corruptions_fixed;
            double_checked = true;
        }
        let mut marked_clean = false;
        if fix.any() && counts.corruptions == 0 && counts.check_errors == 0 {
            meta.flush_all(true)?;
            let bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
            if meta.header.incompatible_features & bits != 0 {
                meta.header.incompatible_features &= !bits;
                meta.write_incompatible_features_for_repair()?;
                meta.dirty_at_open = false;
                marked_clean = true;
            }
        }
        Ok(CheckReport {
            counts,
            findings: sink.findings,
            rebuilt,
            double_checked,
            marked_clean,
            filename: opts.filename.unwrap_or_else(|| self.filename.clone()),
            format: "qcow2".into(),
        })
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

/// The warning QEMU prints when opening an image whose bitmaps extension
/// is present but stale (autoclear bit 0 clear): the bitmap clusters will
/// show up as leaks.
fn stale_bitmaps_warning(h: &crate::format::header::Header, sink: &mut Sink<'_>) {
    for f in stale_bitmaps_findings(h) {
        sink.push(f);
    }
}

/// The lines of [`stale_bitmaps_warning`] (none if the bitmaps are valid
/// or absent).
pub(crate) fn stale_bitmaps_findings(h: &crate::format::header::Header) -> Vec<Finding> {
    let present = h
        .extensions
        .iter()
        .any(|e| e.ext_type() == crate::format::consts::EXT_BITMAPS);
    if !present || h.autoclear_features & crate::format::consts::AUTOCLEAR_BITMAPS != 0 {
        return Vec::new();
    }
    vec![
        Finding::Report(if h.version < 3 {
            "warning: This qcow2 v2 image contains bitmaps, but they may have been modified by \
             a program without persistent bitmap support; so now they must all be considered \
             inconsistent"
                .into()
        } else {
            "warning: a program lacking bitmap support modified this file, so all bitmaps are \
             now considered inconsistent"
                .into()
        }),
        Finding::Message(
            "Some clusters may be leaked, run 'qcow2-check -r' on the image file to fix.".into(),
        ),
    ]
}

/// One check run (QEMU's `qcow2_co_check_locked`, without marking the image
/// clean): snapshot table, refcounts, snapshot table repair.
fn run_pass(
    meta: &mut crate::meta::Meta,
    sink: &mut Sink<'_>,
    fix: Fix,
    writable: bool,
    registered: &mut Vec<(u64, u64)>,
) -> Result<(CheckCounts, bool)> {
    let mut pass = Pass::new(meta, sink, fix, writable);
    pass.registered_l1 = std::mem::take(registered);
    let mut snap_res = CheckCounts::default();
    let mut result = CheckCounts::default();
    let r = (|| {
        pass.check_read_snapshot_table(&mut snap_res)?;
        let mut ref_res = CheckCounts::default();
        let rebuilt = pass.check_refcounts(&mut ref_res);
        result.add(&ref_res, true);
        let rebuilt = rebuilt?;
        let fixed = pass.check_fix_snapshot_table(&mut snap_res);
        result.add(&snap_res, false);
        fixed?;
        Ok(rebuilt)
    })();
    *registered = std::mem::take(&mut pass.registered_l1);
    r.map(|rebuilt| (result, rebuilt))
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
