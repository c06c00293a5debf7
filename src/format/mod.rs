//! Pure on-disk structures of the qcow2 format: decode, validate, encode.
//!
//! Nothing in this module does I/O. Every function takes byte slices that the
//! caller has read and returns either a typed structure or a [`FormatError`]
//! that says which structure and what is wrong, using QEMU's wording where
//! QEMU has one (so the command-line tools can print the same messages).
//!
//! The spec is QEMU's `docs/interop/qcow2.rst`; section numbers in the module
//! docs refer to `qcow2-format.md` of this project.

// Untrusted bytes are decoded here: no silent narrowing, no indexing that can panic
// (tests may do both).
#![cfg_attr(
    not(test),
    warn(clippy::cast_possible_truncation, clippy::indexing_slicing)
)]

pub mod bitmap;
pub mod consts;
pub mod entry;
pub mod header;
pub mod luks;
pub mod refcount;
pub mod snapshot;

use std::fmt;

/// A fixed on-disk length (a `u64` constant of the spec) as `usize`, checked
/// at compile time when used in a constant: every such length is tiny.
#[expect(
    clippy::cast_possible_truncation,
    reason = "asserted to fit 32 bits first"
)]
pub(crate) const fn fixed_len(n: u64) -> usize {
    assert!(n <= u32::MAX as u64, "fixed lengths are small");
    n as usize
}

/// A decode or validation failure of an on-disk structure.
///
/// `Display` prints QEMU's message for the same condition where QEMU has one
/// (for example `Unsupported cluster size: 2^8`), so tools can match
/// `qemu-img`'s output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    /// Which structure failed to decode.
    pub what: Structure,
    /// Host offset of the structure (or the field) when known.
    pub offset: Option<u64>,
    /// What is wrong, in QEMU's words where possible.
    pub reason: String,
    /// Which class of failure this is (maps to QEMU's errno).
    pub kind: FormatErrorKind,
}

/// The class of a [`FormatError`], mirroring the errno QEMU returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatErrorKind {
    /// Not a qcow2 image at all (bad magic).
    NotQcow2,
    /// Valid but unsupported (version, feature bits, compression type): ENOTSUP.
    Unsupported,
    /// A value that is invalid (misaligned, out of range, inconsistent): EINVAL.
    Invalid,
    /// A table or count that exceeds QEMU's limits: EFBIG.
    TooLarge,
}

/// The on-disk structures, named as in the spec: which structure a
/// [`FormatError`] or an [`Error::Corrupt`](crate::Error::Corrupt) is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Structure {
    /// The image header (cluster 0).
    Header,
    /// A header extension.
    HeaderExtension,
    /// The backing file name.
    BackingFileName,
    /// The active L1 table.
    L1Table,
    /// An L2 table.
    L2Table,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    SnapshotL1Table,
    /// The bitmap directory.
    BitmapDirectory,
    /// A compressed cluster.
    CompressedCluster,
    /// The LUKS header of an encrypted image.
    LuksHeader,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Structure::Header => "header",
            Structure::HeaderExtension => "header extension",
            Structure::BackingFileName => "backing file name",
            Structure::L1Table => "L1 table",
            Structure::L2Table => "L2 table",
            Structure::RefcountTable => "refcount table",
            Structure::RefcountBlock => "refcount block",
            Structure::SnapshotTable => "snapshot table",
            Structure::SnapshotL1Table => "snapshot L1 table",
            Structure::BitmapDirectory => "bitmap directory",
            Structure::CompressedCluster => "compressed cluster",
            Structure::LuksHeader => "LUKS header",
        })
    }
}

impl FormatError {
    /// A new error of kind [`FormatErrorKind::Invalid`].
    pub fn invalid(what: Structure, offset: Option<u64>, reason: impl Into<String>) -> Self {
        Self {
            what,
            offset,
            reason: reason.into(),
            kind: FormatErrorKind::Invalid,
        }
    }

    /// A new error of the given kind.
    pub fn new(
        kind: FormatErrorKind,
        what: Structure,
        offset: Option<u64>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            what,
            offset,
            reason: reason.into(),
            kind,
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for FormatError {}

/// Reads a big-endian `u64` at `pos`, or `None` if `buf` is too short.
#[inline]
pub fn be_u64(buf: &[u8], pos: usize) -> Option<u64> {
    let b = buf.get(pos..pos.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

/// Reads a big-endian `u32` at `pos`, or `None` if `buf` is too short.
#[inline]
pub fn be_u32(buf: &[u8], pos: usize) -> Option<u32> {
    let b = buf.get(pos..pos.checked_add(4)?)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    Some(u32::from_be_bytes(a))
}

/// Reads a big-endian `u16` at `pos`, or `None` if `buf` is too short.
#[inline]
pub fn be_u16(buf: &[u8], pos: usize) -> Option<u16> {
    let b: [u8; 2] = buf.get(pos..pos.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_be_bytes(b))
}

/// Writes a big-endian `u64` at `pos`; returns `false` if `buf` is too short.
#[inline]
pub fn put_be_u64(buf: &mut [u8], pos: usize, v: u64) -> bool {
    match pos.checked_add(8).and_then(|end| buf.get_mut(pos..end)) {
        Some(b) => {
            b.copy_from_slice(&v.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Writes a big-endian `u32` at `pos`; returns `false` if `buf` is too short.
#[inline]
pub fn put_be_u32(buf: &mut [u8], pos: usize, v: u32) -> bool {
    match pos.checked_add(4).and_then(|end| buf.get_mut(pos..end)) {
        Some(b) => {
            b.copy_from_slice(&v.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Writes a big-endian `u16` at `pos`; returns `false` if `buf` is too short.
#[inline]
pub fn put_be_u16(buf: &mut [u8], pos: usize, v: u16) -> bool {
    match pos.checked_add(2).and_then(|end| buf.get_mut(pos..end)) {
        Some(b) => {
            b.copy_from_slice(&v.to_be_bytes());
            true
        }
        None => false,
    }
}
