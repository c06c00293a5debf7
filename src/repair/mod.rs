//! The check-and-repair engine (QEMU's `qcow2_co_check_locked`), working on
//! an image's metadata state ([`Meta`]) alone.
//!
//! A run walks every structure that references host clusters, counts the
//! references, compares them with the on-disk refcounts, checks the COPIED
//! flags and, as allowed by [`Repair`], lowers leaked refcounts, fixes
//! corruptions or rebuilds the refcount structures; after a repair that
//! changed something it checks again. Its result is data ([`CheckReport`],
//! [`Finding`]s in QEMU's order and words) and a stream of [`CheckEvent`]s.
//!
//! Two users: `crate::check` (opening an image for a check, rendering the
//! report as `qemu-img check` prints it) and the image open, which repairs
//! a dirty image (lazy refcounts) with [`repair_dirty`]. This module knows
//! neither: it depends on the metadata layer only, so `image` and `check`
//! both depend on it and not on each other.
//!
//! # Write ordering of repairs
//! Every repair write goes through the image's write gate
//! (`Meta::gate_write`) with the exemption of the structure being written,
//! so a repair can never overwrite other metadata. Leak repairs only lower
//! refcounts towards the counted value, refcounts that are too low are only
//! raised, a rebuild writes the new structures before the header points at
//! them (see `compare.rs`), COPIED flags are fixed after the refcounts are
//! right, and the dirty/corrupt bits are cleared last. An interrupted repair
//! therefore leaves an image that checks no worse than before it.

mod compare;
mod copied;
mod findings;
mod header;
mod imrt;
mod pass;
mod rebuild;
mod snapshots;
mod walk;

pub use findings::{CheckCounts, CheckReport, Finding, RefcountVerdict};

use crate::error::Result;
use crate::format::consts::{AUTOCLEAR_MASK, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::format::header::field;
use crate::meta::Meta;
use pass::{Fix, Pass};

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
    /// units). The phases of one pass come in the order of
    /// [`PHASES`]; a repair that fixed something runs a second pass.
    Progress {
        /// What is being done (one of [`PHASES`]).
        phase: &'static str,
        /// Units done.
        done: u64,
        /// Units in this phase.
        total: u64,
    },
}

/// The phases a pass reports [`CheckEvent::Progress`] for, in order.
pub const PHASES: [&str; 3] = [
    "Checking L1/L2 tables",
    "Comparing refcounts",
    "Checking COPIED flags",
];

/// The callback receiving [`CheckEvent`]s.
pub type EventCallback<'a> = Box<dyn FnMut(CheckEvent<'_>) + 'a>;

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

/// Runs a check of the image whose metadata is `meta`, repairing what
/// `repair` allows (with its double check), and clears the dirty and
/// corrupt bits if the final run found no corruption. `writable` says
/// whether the image is open read-write; `filename` goes into the report.
///
/// # Errors
/// When the check cannot complete (QEMU's "Check failed: ..."): I/O errors,
/// absurd sizes, an unreadable snapshot table or bitmap directory, a
/// refcount structure that needs rebuilding under [`Repair::Leaks`].
pub(crate) fn run(
    meta: &mut Meta,
    repair: Repair,
    writable: bool,
    filename: String,
    on_event: Option<EventCallback<'_>>,
) -> Result<CheckReport> {
    let mut sink = Sink {
        findings: Vec::new(),
        on_event,
    };
    for f in stale_bitmaps_findings(&meta.header) {
        sink.push(f);
    }
    let fix = repair.fix();
    // A writer must clear autoclear bits it does not understand (QEMU
    // does it when it opens the image read-write). One field write:
    // unlike QEMU's header rewrite in check mode, it keeps the snapshots.
    let unknown = meta.header.autoclear_features & !AUTOCLEAR_MASK;
    if fix.any() && unknown != 0 && meta.header.version >= 3 {
        meta.header.autoclear_features &= AUTOCLEAR_MASK;
        let v = meta.header.autoclear_features.to_be_bytes();
        meta.write_header_field_for_repair(field::AUTOCLEAR_FEATURES, &v)?;
    }
    let mut registered = Vec::new();
    let (first, rebuilt) = run_pass(meta, &mut sink, fix, writable, &mut registered)?;
    let mut counts = first;
    let mut double_checked = false;
    if first.corruptions_fixed != 0 || first.leaks_fixed != 0 {
        sink.event(CheckEvent::Repaired {
            leaks_fixed: first.leaks_fixed,
            corruptions_fixed: first.corruptions_fixed,
        });
        let (second, _) = run_pass(meta, &mut sink, Fix::default(), writable, &mut registered)?;
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
        filename,
        format: "qcow2".into(),
    })
}

/// QEMU's automatic repair of a dirty image opened read-write (lazy
/// refcounts): `check -r all` on its metadata. The repair reads what is
/// past the end of the file as the check does, and allocates on its own
/// terms. `on_event` sees the findings (the image open forwards corruption
/// events to the embedder).
///
/// # Errors
/// As for a check run with [`Repair::All`].
pub(crate) fn repair_dirty(
    meta: &mut Meta,
    on_event: Option<EventCallback<'_>>,
) -> Result<CheckReport> {
    meta.rc.allow_past_eof();
    run(meta, Repair::All, true, String::new(), on_event)
}

/// The lines QEMU prints when opening an image whose bitmaps extension is
/// present but stale (autoclear bit 0 clear): the bitmap clusters will show
/// up as leaks. None if the bitmaps are valid or absent.
pub fn stale_bitmaps_findings(h: &crate::format::header::Header) -> Vec<Finding> {
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
    meta: &mut Meta,
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
