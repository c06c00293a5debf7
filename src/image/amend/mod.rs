//! Changing options of an existing image (`qemu-img amend`).
//!
//! Supported: `lazy_refcounts` (on/off) and `size` (through resize). Other
//! amendments QEMU knows (`compat` up/downgrade, `refcount_bits`, backing
//! and data file names) are refused with `Error::Unsupported` rather than
//! half done.

use crate::error::{Error, Result, Unsupported};
use crate::format::consts::*;
use crate::image::Image;
use crate::options::{AmendImageState, AmendOptions, Compat, OpenOptions};
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
/// let h = Image::open(&path, &OpenOptions::new().read_only(true))?.header();
/// assert_eq!(h.compatible_features & 1, 1);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// Open errors, `Error::InvalidArgument` for options the image cannot take
/// (QEMU's messages), `Error::Unsupported` for amendments not implemented.
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
    opts.check(&state)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let target = opts
        .target_compat()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if target.is_some_and(|c| c != state.compat) {
        return Err(Error::Unsupported(Unsupported::AmendCompat));
    }
    if opts
        .refcount_bits
        .is_some_and(|b| b != u64::from(state.refcount_bits))
    {
        return Err(Error::Unsupported(Unsupported::AmendRefcountBits));
    }
    if opts
        .backing_file
        .as_ref()
        .is_some_and(|b| Some(b) != state.backing_file.as_ref())
        || opts
            .backing_fmt
            .as_ref()
            .is_some_and(|f| Some(f) != state.backing_fmt.as_ref())
    {
        return Err(Error::Unsupported(Unsupported::AmendBackingFile));
    }
    if opts.data_file.is_some() || opts.data_file_raw.is_some_and(|r| r != state.data_file_raw) {
        return Err(Error::Unsupported(Unsupported::AmendDataFile));
    }
    if let Some(on) = opts.lazy_refcounts {
        img.set_lazy_refcounts(on)?;
    }
    if let Some(size) = opts.size {
        if size < img.size() {
            return Err(Error::Unsupported(Unsupported::AmendShrink));
        }
        img.resize(size)?;
    }
    Ok(())
}
