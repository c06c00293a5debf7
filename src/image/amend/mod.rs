//! Changing options of an existing image (`qemu-img amend`).
//!
//! Everything QEMU 10 amends: `compat` (upgrade, and downgrade with zero
//! clusters expanded: `compat.rs`), `refcount_bits` (new refcount structures:
//! `refcount_order.rs`), `lazy_refcounts`, `data_file` and `data_file_raw`
//! (header rewrites), `size` (QEMU's truncate: grow or shrink) and
//! `backing_file`/`backing_fmt` (which QEMU 10 only accepts unchanged).
//!
//! The steps run in QEMU's order (upgrade, refcount width, data file, the
//! backing check, lazy refcounts, size, downgrade) and every error QEMU can
//! give is checked, in that order, before the first step changes anything:
//! a refused amendment leaves the file as it was, where QEMU may already
//! have upgraded, expanded zero clusters or allocated new refcount blocks.

mod compat;
mod refcount_order;

use crate::error::{Error, IoOp, Result};
use crate::format::consts::*;
use crate::format::header::HeaderExtension;
use crate::image::Image;
use crate::options::{AmendImageState, AmendOptions, Compat, OpenOptions, Preallocation};
use std::path::Path;

/// Applies `opts` to the image at `path`. A dirty image is repaired first
/// (the read-write open does that); turning lazy refcounts off writes every
/// refcount and clears the dirty bit.
///
/// ```
/// use qcow2kit::options::AmendOptions;
/// use qcow2kit::{CreateOptions, Image, OpenOptions};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.qcow2");
/// qcow2kit::create::create(&path, &CreateOptions::new(), 1 << 20)?;
/// qcow2kit::amend::amend(&path, &AmendOptions::from_qemu_str("lazy_refcounts=on")?)?;
/// qcow2kit::amend::amend(&path, &AmendOptions::from_qemu_str("refcount_bits=64,compat=1.1")?)?;
/// let h = Image::open(&path, &OpenOptions::new().read_only(true))?.header();
/// assert_eq!((h.compatible_features & 1, h.refcount_bits()), (1, 64));
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// Open errors, `Error::InvalidArgument` with QEMU's message for options
/// the image cannot take, I/O errors; `Error::Corrupt` for damaged metadata
/// met on the way.
pub fn amend(path: &Path, opts: &AmendOptions) -> Result<()> {
    let img = Image::open(path, &OpenOptions::new())?;
    amend_image(&img, opts)?;
    img.close()
}

/// Applies `opts` to an open, writable image.
///
/// # Errors
/// As for [`amend`].
pub fn amend_image(img: &Image, opts: &AmendOptions) -> Result<()> {
    amend_image_with_progress(img, opts, &mut |_, _| {})
}

/// [`amend_image`], reporting progress as `(done, total)` (qemu-img's `-p`):
/// the compatibility change and the refcount width change are one part each.
///
/// # Errors
/// As for [`amend`].
pub fn amend_image_with_progress(
    img: &Image,
    opts: &AmendOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let h = img.header();
    let state = AmendImageState {
        compat: if h.version >= 3 {
            Compat::V3
        } else {
            Compat::V2
        },
        refcount_bits: h.refcount_bits(),
        lazy_refcounts: h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
        has_data_file: h.incompatible_features & INCOMPAT_DATA_FILE != 0,
        data_file_raw: h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0,
        backing_file: h.backing_file_name().map(str::to_owned),
        backing_fmt: h.backing_format().map(str::to_owned),
    };
    let invalid = |e: crate::options::OptionError| Error::InvalidArgument(e.to_string());
    opts.check_before_refcounts(&state).map_err(invalid)?;
    let target = opts
        .target_compat()
        .map_err(invalid)?
        .unwrap_or(state.compat);
    let new_bits = opts.refcount_bits_for(&state);
    let new_order = new_bits.trailing_zeros();
    let upgrade = target == Compat::V3 && state.compat == Compat::V2;
    let downgrade = target == Compat::V2 && state.compat == Compat::V3;
    let change_order = new_bits != state.refcount_bits;

    img.writable()?;
    // Every check first, in QEMU's order, under one lock.
    {
        let mut meta = img.lock_idle()?;
        if change_order {
            let r = refcount_order::survey(&mut meta, new_order);
            r.map_err(|e| img.fail(&mut meta, e, IoOp::Write))?;
        }
        opts.check_after_refcounts(&state).map_err(invalid)?;
        // qcow2_co_truncate's checks on the options, with the version the
        // image has by then.
        if let Some(size) = opts.size.filter(|s| *s != 0) {
            if size > i64::MAX as u64 {
                return Err(Error::InvalidArgument(
                    "Invalid image size specified. Must be between 0 and 9223372036854775807."
                        .into(),
                ));
            }
            if size % 512 != 0 {
                return Err(Error::InvalidArgument(
                    "The new size must be a multiple of 512".into(),
                ));
            }
            if !meta.snapshots.is_empty() && state.compat == Compat::V2 && !upgrade {
                return Err(Error::InvalidArgument(
                    "Can't resize a v2 image which has snapshots".into(),
                ));
            }
        }
        if downgrade {
            compat::check_downgrade(&mut meta).map_err(|e| img.fail(&mut meta, e, IoOp::Read))?;
        }
    }

    let parts = u64::from(upgrade || downgrade) + u64::from(change_order);
    let mut part = 0u64;
    let mut report = |part: u64, done: u64, total: u64| {
        let total = total.max(1);
        progress(part * total + done.min(total), parts.max(1) * total);
    };
    if upgrade {
        img.with_meta(compat::upgrade)?;
        part += 1;
        report(part, 0, 1);
    }
    if change_order {
        img.with_meta(|meta| {
            let _barrier = img
                .io_barrier
                .write()
                .map_err(|_| Error::PreviousIoFailed)?;
            refcount_order::change(meta, new_order, &mut |d, t| report(part, d, t))
        })?;
        part += 1;
        report(part, 0, 1);
    }
    let raw = opts.data_file_raw.unwrap_or(state.data_file_raw);
    if raw != state.data_file_raw || opts.data_file.is_some() {
        img.with_meta(|meta| {
            let mut h = meta.header.clone();
            if raw {
                h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
            } else {
                h.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
            }
            if let Some(name) = &opts.data_file {
                h.extensions
                    .retain(|e| !matches!(e, HeaderExtension::DataFile(_)));
                if !name.is_empty() {
                    h.extensions.push(HeaderExtension::DataFile(name.clone()));
                }
            }
            compat::rewrite_header(meta, h)
        })?;
    }
    if let Some(on) = opts.lazy_refcounts {
        img.set_lazy_refcounts(on)?;
    }
    if let Some(size) = opts.size.filter(|s| *s != 0) {
        // QEMU's amend truncates to exactly this size, shrinking too.
        img.truncate(size, Preallocation::Off)?;
    }
    if downgrade {
        let has_backing = img.backing.is_some();
        img.with_meta(|meta| {
            let _barrier = img
                .io_barrier
                .write()
                .map_err(|_| Error::PreviousIoFailed)?;
            compat::downgrade(meta, has_backing, &mut |d, t| report(part, d, t))
        })?;
        report(part + 1, 0, 1);
    }
    Ok(())
}

impl Image {
    /// Runs `f` on the metadata of the idle image; an error goes through
    /// the corruption and I/O-error signalling.
    fn with_meta<T>(&self, f: impl FnOnce(&mut crate::meta::Meta) -> Result<T>) -> Result<T> {
        let mut meta = self.lock_idle()?;
        let r = f(&mut meta);
        r.map_err(|e| self.fail(&mut meta, e, IoOp::Write))
    }
}
