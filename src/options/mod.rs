//! Options, parsed the way QEMU 10 parses them (`qcow2-format.md` §5, §6, §7.1,
//! §9.4, §11.1, §12; `cli.md` §0, §2, §7, §12.2).
//!
//! * [`parse_size`]: qemu-img's size syntax (`1536b`, `512k`, `1.5G`, ...).
//! * [`split_option_string`]: QemuOpts `key=value,key=value` lists (`,,` is a literal comma,
//!   a bare `key` means `key=on`, a bare `nokey` means `key=off`).
//! * [`OverlapChecks`]: the metadata overlap-check set and its `overlap-check*` options.
//! * [`OpenOptions`]: runtime (open) options, including QEMU's `--image-opts` spellings.
//! * [`cache_config`]: QEMU 10's L2 / refcount cache sizing algorithm.
//! * [`CreateOptions`]: `qemu-img create -o` options, their validation and the `Formatting ...` line.
//! * [`AmendOptions`]: `qemu-img amend -o` options.
//!
//! Every [`OptionError`] displays QEMU's message text byte for byte (without the
//! `qemu-img: FILE: ` prefix), so the binaries can print `qcow2-img: ...` exactly where
//! qemu-img prints `qemu-img: ...`. Messages that QEMU prints with a hint span several lines
//! (`\n`, no trailing newline). The order in which errors are reported follows QEMU's as far as
//! it can without the image (see [`OpenOptions::apply_qemu_str`] and [`CreateOptions::validate`]).
//!
//! Nothing here panics, whatever the input: all arithmetic on user-supplied numbers is checked.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::format::consts::{MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, SECTOR_SIZE};
use crate::types::MetadataKind;

/// Smallest cluster size QEMU accepts (512 bytes).
pub const MIN_CLUSTER_SIZE: u64 = 1 << MIN_CLUSTER_BITS;
/// Largest cluster size QEMU accepts (2 MiB).
pub const MAX_CLUSTER_SIZE: u64 = 1 << MAX_CLUSTER_BITS;
/// Default cluster size of new images (64 KiB).
pub const DEFAULT_CLUSTER_SIZE: u64 = 65536;
/// Default refcount width of new images.
pub const DEFAULT_REFCOUNT_BITS: u32 = 16;
/// Smallest cluster size that allows extended L2 entries (32 subclusters of 512 bytes).
pub const MIN_EXTENDED_L2_CLUSTER_SIZE: u64 = 16384;
/// Default upper bound of the L2 cache: 32 MiB on Linux, 8 MiB elsewhere (QEMU's
/// `DEFAULT_L2_CACHE_MAX_SIZE`).
pub const DEFAULT_L2_CACHE_MAX_SIZE: u64 = if cfg!(target_os = "linux") {
    32 << 20
} else {
    8 << 20
};
/// Default `cache-clean-interval` in seconds: 600 on Linux, 0 (disabled) elsewhere.
pub const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = if cfg!(target_os = "linux") { 600 } else { 0 };
/// The L2 cache always holds at least this many slices (QEMU's `MIN_L2_CACHE_SIZE`).
pub const MIN_L2_CACHE_SLICES: usize = 2;
/// The refcount cache always holds at least this many blocks (QEMU's `MIN_REFCOUNT_CACHE_SIZE`).
pub const MIN_REFCOUNT_CACHE_BLOCKS: usize = 4;
/// Largest image length the block layer handles (`BDRV_MAX_LENGTH`, 2^63 - 2^30).
pub const MAX_IMAGE_LENGTH: u64 = (1 << 63) - (1 << 30);
/// Maximum length of a node name, exclusive (QEMU's `sizeof(bs->node_name)`).
const NODE_NAME_MAX: usize = 32;
/// `INT_MAX`: upper bound of the cache entry counts.
const INT_MAX: u64 = i32::MAX as u64;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An invalid option, option value or combination of options.
///
/// `Display` is QEMU 10.0's message for the same condition, byte for byte (QEMU's hint lines
/// included, separated by `\n`, without a trailing newline). [`OptionError::option`] names the
/// option concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// amend: `backing_file`/`backing_fmt` differ from the image's (amend cannot change them).
    #[error("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")]
    AmendBackingFile,
    /// amend: `data_file` given for an image without an external data file.
    #[error("data-file can only be set for images that use an external data file")]
    AmendDataFile,
    /// amend: `data_file_raw=on` for an image that does not have the bit already.
    #[error("data-file-raw cannot be set on existing images")]
    AmendDataFileRaw,
    /// amend: downgrade to v2 of an image with an external data file.
    #[error("Cannot downgrade an image with a data file")]
    AmendDowngradeDataFile,
    /// amend: downgrade to v2 with a refcount width other than 16.
    #[error("compat=0.10 requires refcount_bits=16")]
    AmendDowngradeRefcountBits,
    /// amend: `lazy_refcounts=on` with a v2 result.
    #[error(
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
    )]
    AmendLazyRefcountsV2,
    /// amend: a refcount width other than 16 with a v2 result.
    #[error(
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
    )]
    AmendRefcountBitsV2,
    /// amend: `compat` is none of `0.10`, `v2`, `1.1`, `v3`.
    #[error("Unknown compatibility level {value}")]
    AmendUnknownCompat {
        /// The value as given.
        value: String,
    },
    /// create: `backing_fmt` without `backing_file`.
    #[error("Backing format cannot be used without backing file")]
    BackingFmtWithoutFile,
    /// create: `data_file_raw=on` together with a backing file.
    #[error("Backing file and data-file-raw cannot be used at the same time")]
    BackingWithDataFileRaw,
    /// create: preallocation together with a backing file, without extended L2 entries.
    #[error(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on"
    )]
    BackingWithPreallocation,
    /// A boolean option got a value other than on/yes/true/y or off/no/false/n.
    #[error("Parameter '{option}' expects 'on' or 'off'")]
    BadBool {
        /// The option as given.
        option: String,
    },
    /// An enumeration got an unknown value (create: `version`, `preallocation`,
    /// `compression-type`; QEMU uses the QAPI member names here).
    #[error("Parameter '{option}' does not accept value '{value}'")]
    BadEnumValue {
        /// QEMU's (QAPI) name of the option.
        option: &'static str,
        /// The value as given.
        value: String,
    },
    /// `rerror=`/`werror=` got an unknown action (`enospc` is valid for writes only).
    #[error("'{value}' invalid {operation} error action")]
    BadErrorAction {
        /// The value as given.
        value: String,
        /// `read` (rerror) or `write` (werror).
        operation: &'static str,
    },
    /// A numeric option is not a number (C `strtoull` syntax, base 0).
    #[error("Parameter '{option}' expects a number")]
    BadNumber {
        /// The option as given.
        option: String,
    },
    /// A size option is not a size.
    #[error(
        "Parameter '{option}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
    )]
    BadSize {
        /// The option as given.
        option: String,
    },
    /// `cache-clean-interval` above `UINT_MAX` (e.g. `-1`).
    #[error("Cache clean interval too big")]
    CacheCleanIntervalTooBig,
    /// A non-zero `cache-clean-interval` on a host other than Linux.
    #[error("cache-clean-interval not supported on this host")]
    CacheCleanIntervalUnsupported,
    /// `cache-size`, `l2-cache-size` and `refcount-cache-size` all given.
    #[error("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")]
    CacheSizeAllThree,
    /// The cluster size is not a power of two between 512 bytes and 2 MiB.
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize,
    /// amend: an option that only `create` accepts.
    #[error("Invalid parameter '{option}'\nThis option is only supported for image creation")]
    CreateOnlyOption {
        /// The option as given.
        option: String,
    },
    /// create: `data_file_raw=on` without `data_file`.
    #[error("data-file-raw requires data-file")]
    DataFileRawWithoutDataFile,
    /// create: an external data file with `compat=0.10`.
    #[error(
        "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    DataFileV2,
    /// open: `discard-no-unref=on` on a v2 image.
    #[error("discard-no-unref is only supported since qcow2 version 3")]
    DiscardNoUnrefV2,
    /// An encryption option: qcow2kit does not support encrypted images.
    #[error("Parameter '{option}': encrypted images are not supported")]
    EncryptionUnsupported {
        /// The option as given.
        option: String,
    },
    /// create: extended L2 entries with clusters smaller than 16 KiB.
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize,
    /// create: extended L2 entries with `compat=0.10`.
    #[error(
        "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    ExtendedL2V2,
    /// open: `file=NAME` together with `file.*` options (or `data-file` likewise).
    #[error("Cannot reference an existing block device with additional options or a new filename")]
    FileConflict,
    /// create: the image size, rounded up to 512 bytes, exceeds the block layer's maximum.
    #[error("Could not resize image: offset({size}) exceeds maximum(9223372035781033984)")]
    ImageSizeExceedsMaximum {
        /// The size rounded up to a multiple of 512.
        size: u64,
    },
    /// create: the image size, rounded up to 512 bytes, is 2^63 or more.
    #[error("Could not resize image: Image size cannot be negative")]
    ImageSizeNegative,
    /// create: the L1 table for this size would exceed 32 MiB.
    #[error(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    )]
    ImageTooLarge,
    /// open: a `node-name` that does not start with a letter or has characters other than
    /// letters, digits, `-`, `.`, `_`.
    #[error("Invalid node-name: '{name}'")]
    InvalidNodeName {
        /// The name as given.
        name: String,
    },
    /// An option list that starts with `,` or ends with an odd number of `,` (qemu-img also
    /// rejects an empty `-o`, see [`check_option_list`]).
    #[error("Invalid option list: {list}")]
    InvalidOptionList {
        /// The list as given.
        list: String,
    },
    /// create/amend: an unknown option.
    #[error("Invalid parameter '{option}'")]
    InvalidParameter {
        /// The option as given.
        option: String,
    },
    /// The L2 cache entry size is not a power of two between 512 and the cluster size.
    #[error(
        "L2 cache entry size must be a power of two between 512 and the cluster size ({cluster_size})"
    )]
    L2CacheEntrySize {
        /// The image's cluster size.
        cluster_size: u64,
    },
    /// `l2-cache-size` larger than `cache-size`.
    #[error("l2-cache-size may not exceed cache-size")]
    L2CacheExceedsCacheSize,
    /// The L2 cache would need more than `INT_MAX` entries.
    #[error("L2 cache size too big")]
    L2CacheTooBig,
    /// open: `lazy-refcounts=on` on a v2 image.
    #[error("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")]
    LazyRefcountsOpenV2,
    /// create: `lazy_refcounts=on` with `compat=0.10`.
    #[error(
        "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    LazyRefcountsV2,
    /// create: no size (neither positional, nor `-o size=`, nor from a backing file).
    #[error("Image creation needs a size parameter")]
    MissingSize,
    /// open: a `node-name` of 32 characters or more.
    #[error("Node name too long")]
    NodeNameTooLong,
    /// create: `compression_type=zstd` with `compat=0.10`.
    #[error(
        "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    NonZlibV2,
    /// A numeric option does not fit in 64 bits.
    #[error("Value '{value}' is too large for parameter '{option}'")]
    NumberTooLarge {
        /// The option as given.
        option: String,
        /// The value as given.
        value: String,
    },
    /// `overlap-check` and `overlap-check.template` both given, with different values.
    #[error(
        "Conflicting values for qcow2 options 'overlap-check' ('{mode}') and 'overlap-check.template' ('{template}')"
    )]
    OverlapConflict {
        /// The value of `overlap-check`.
        mode: String,
        /// The value of `overlap-check.template`.
        template: String,
    },
    /// An overlap-check mode other than none, constant, cached, all.
    #[error(
        "Unsupported value '{value}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
    )]
    OverlapMode {
        /// The value as given.
        value: String,
    },
    /// A preallocation mode other than off, metadata, falloc, full (qemu-img resize's text; create
    /// reports [`OptionError::BadEnumValue`] instead).
    #[error("Invalid preallocation mode '{value}'")]
    PreallocationMode {
        /// The value as given.
        value: String,
    },
    /// create: a refcount width other than 16 with `compat=0.10`.
    #[error(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
    )]
    RefcountBitsV2,
    /// `refcount-cache-size` larger than `cache-size`.
    #[error("refcount-cache-size may not exceed cache-size")]
    RefcountCacheExceedsCacheSize,
    /// The refcount cache would need more than `INT_MAX` entries.
    #[error("Refcount cache size too big")]
    RefcountCacheTooBig,
    /// The refcount width is not a power of two between 1 and 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountWidth,
    /// A size option that does not fit in 64 bits (or is negative).
    #[error("Value '{value}' is out of range for parameter '{option}'")]
    SizeOutOfRange {
        /// The option as given.
        option: String,
        /// The value as given.
        value: String,
    },
    /// create: `-o size=` together with a positional size.
    #[error("The image size must be specified only once")]
    SizeSpecifiedTwice,
    /// open: `driver=` other than `qcow2` (or `file.driver=` other than `file`).
    #[error("Unknown driver '{driver}'")]
    UnknownDriver {
        /// The driver as given.
        driver: String,
    },
    /// open: `overlap-check.<name>` with an unknown name (QEMU's generic text; the valid names
    /// are in [`OptionError::hint`]).
    #[error("Block format 'qcow2' does not support the option '{option}'")]
    UnknownOverlapFlag {
        /// The option as given.
        option: String,
    },
    /// open: an unknown runtime option.
    #[error("Block format 'qcow2' does not support the option '{option}'")]
    UnsupportedOption {
        /// The option as given.
        option: String,
    },
}

impl OptionError {
    /// The option this error is about: QEMU's spelling of it (create/amend options use
    /// underscores, runtime options hyphens). `None` for [`OptionError::InvalidOptionList`].
    pub fn option(&self) -> Option<&str> {
        use OptionError as E;
        Some(match self {
            E::AmendBackingFile => "backing_file",
            E::AmendDataFile | E::DataFileV2 => "data_file",
            E::AmendDataFileRaw | E::BackingWithDataFileRaw | E::DataFileRawWithoutDataFile => {
                "data_file_raw"
            }
            E::AmendDowngradeDataFile
            | E::AmendDowngradeRefcountBits
            | E::AmendUnknownCompat { .. } => "compat",
            E::AmendLazyRefcountsV2 | E::LazyRefcountsV2 => "lazy_refcounts",
            E::AmendRefcountBitsV2 | E::RefcountBitsV2 | E::RefcountWidth => "refcount_bits",
            E::BackingFmtWithoutFile => "backing_fmt",
            E::BackingWithPreallocation | E::PreallocationMode { .. } => "preallocation",
            E::BadEnumValue { option, .. } => option,
            E::BadErrorAction { operation, .. } => {
                if *operation == "read" {
                    "rerror"
                } else {
                    "werror"
                }
            }
            E::BadBool { option }
            | E::BadNumber { option }
            | E::BadSize { option }
            | E::CreateOnlyOption { option }
            | E::EncryptionUnsupported { option }
            | E::InvalidParameter { option }
            | E::NumberTooLarge { option, .. }
            | E::SizeOutOfRange { option, .. }
            | E::UnknownOverlapFlag { option }
            | E::UnsupportedOption { option } => option,
            E::CacheCleanIntervalTooBig | E::CacheCleanIntervalUnsupported => {
                "cache-clean-interval"
            }
            E::CacheSizeAllThree => "cache-size",
            E::ClusterSize => "cluster_size",
            E::DiscardNoUnrefV2 => "discard-no-unref",
            E::ExtendedL2ClusterSize | E::ExtendedL2V2 => "extended_l2",
            E::FileConflict => "file",
            E::ImageSizeExceedsMaximum { .. }
            | E::ImageSizeNegative
            | E::ImageTooLarge
            | E::MissingSize
            | E::SizeSpecifiedTwice => "size",
            E::InvalidNodeName { .. } | E::NodeNameTooLong => "node-name",
            E::InvalidOptionList { .. } => return None,
            E::L2CacheEntrySize { .. } => "l2-cache-entry-size",
            E::L2CacheExceedsCacheSize | E::L2CacheTooBig => "l2-cache-size",
            E::LazyRefcountsOpenV2 => "lazy-refcounts",
            E::NonZlibV2 => "compression_type",
            E::OverlapConflict { .. } | E::OverlapMode { .. } => "overlap-check",
            E::RefcountCacheExceedsCacheSize | E::RefcountCacheTooBig => "refcount-cache-size",
            E::UnknownDriver { .. } => "driver",
        })
    }

    /// An extra line qcow2kit may print after the message, where QEMU prints none but a hint
    /// helps (currently: the valid `overlap-check.<name>` flags).
    pub fn hint(&self) -> Option<String> {
        match self {
            OptionError::UnknownOverlapFlag { .. } => {
                let names: Vec<&str> = MetadataKind::ALL.iter().map(|k| k.option_name()).collect();
                Some(format!(
                    "Valid overlap-check flags: template, {}",
                    names.join(", ")
                ))
            }
            _ => None,
        }
    }
}

/// A string that is not a valid size (see [`parse_size`]).
///
/// `Display` is a short description; QEMU's texts for the places a size appears are
/// [`SizeError::into_option_error`] (QemuOpts option values), [`SizeError::qemu_img_message`]
/// (qemu-img arguments) and [`SizeError::qemu_io_message`] (qemu-io command arguments).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a size at all (bad syntax, trailing characters, a fraction without a suffix, ...).
    #[error("invalid size '{input}'")]
    Invalid {
        /// The string as given.
        input: String,
    },
    /// Well-formed, but negative or not representable in 64 bits.
    #[error("size '{input}' is out of range")]
    OutOfRange {
        /// The string as given.
        input: String,
    },
}

impl SizeError {
    /// The string that failed to parse.
    pub fn input(&self) -> &str {
        match self {
            SizeError::Invalid { input } | SizeError::OutOfRange { input } => input,
        }
    }

    /// The error QemuOpts reports for this value of `option`:
    /// [`OptionError::BadSize`] or [`OptionError::SizeOutOfRange`].
    pub fn into_option_error(self, option: &str) -> OptionError {
        match self {
            SizeError::Invalid { .. } => OptionError::BadSize {
                option: option.to_owned(),
            },
            SizeError::OutOfRange { input } => OptionError::SizeOutOfRange {
                option: option.to_owned(),
                value: input,
            },
        }
    }

    /// qemu-img's message for a bad positional size argument, `what` being e.g. `image size`:
    /// `Invalid image size specified: '10X'.` or
    /// `Invalid image size specified. Must be between 0 and 9223372036854775807.`
    /// (the range form also applies to sizes above `i64::MAX`, see [`parse_image_size`]).
    pub fn qemu_img_message(&self, what: &str) -> String {
        match self {
            SizeError::Invalid { input } => format!("Invalid {what} specified: '{input}'."),
            SizeError::OutOfRange { .. } => {
                format!(
                    "Invalid {what} specified. Must be between 0 and {}.",
                    i64::MAX
                )
            }
        }
    }

    /// qemu-io's message for a bad offset or length argument of a command.
    pub fn qemu_io_message(&self) -> String {
        match self {
            SizeError::Invalid { input } => format!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {input}"
            ),
            SizeError::OutOfRange { input } => {
                format!("Parsing error: argument too large -- {input}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// C number parsing (glibc strtoull / strtod as QEMU uses them)
// ---------------------------------------------------------------------------------------------

/// Failure kinds of QEMU's string-to-number helpers (`-EINVAL`, `-ERANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumErr {
    Inval,
    Range,
}

/// C `isspace` in the C locale.
const fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The byte at `i`, or NUL past the end (C string semantics).
fn byte_at(s: &[u8], i: usize) -> u8 {
    s.get(i).copied().unwrap_or(0)
}

/// What glibc's `strtoull` makes of `s`.
#[derive(Debug, Clone, Copy)]
struct Strtoull {
    /// The value (wrapped for a leading `-`, `u64::MAX` on overflow).
    value: u64,
    /// Index just past the number; 0 when nothing was converted.
    end: usize,
    /// Whether anything was converted.
    converted: bool,
    /// Whether the magnitude overflowed (errno `ERANGE`).
    overflow: bool,
}

/// glibc `strtoull(s, &end, base)` for `base` 0, 10 or 16.
fn c_strtoull(s: &[u8], base: u32) -> Strtoull {
    let mut i = 0;
    while is_c_space(byte_at(s, i)) {
        i += 1;
    }
    let mut negative = false;
    match byte_at(s, i) {
        b'+' => i += 1,
        b'-' => {
            negative = true;
            i += 1;
        }
        _ => {}
    }
    let mut base = base;
    if (base == 0 || base == 16)
        && byte_at(s, i) == b'0'
        && (byte_at(s, i + 1) | 0x20) == b'x'
        && byte_at(s, i + 2).is_ascii_hexdigit()
    {
        // "0x" only counts as a prefix before a hex digit; otherwise "0" is the number and
        // the end points at the 'x' (glibc behaviour).
        i += 2;
        base = 16;
    } else if base == 0 {
        base = if byte_at(s, i) == b'0' { 8 } else { 10 };
    }
    let start = i;
    let mut value: u64 = 0;
    let mut overflow = false;
    while let Some(d) = char::from(byte_at(s, i)).to_digit(base) {
        match value
            .checked_mul(u64::from(base))
            .and_then(|v| v.checked_add(u64::from(d)))
        {
            Some(v) => value = v,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return Strtoull {
            value: 0,
            end: 0,
            converted: false,
            overflow: false,
        };
    }
    if overflow {
        value = u64::MAX;
    } else if negative {
        value = value.wrapping_neg();
    }
    Strtoull {
        value,
        end: i,
        converted: true,
        overflow,
    }
}

/// QEMU's `parse_uint(s, &end, 10)`: rejects negative numbers with `-ERANGE`.
fn parse_uint10(s: &[u8]) -> (Result<(), NumErr>, u64, usize) {
    let r = c_strtoull(s, 10);
    if r.overflow {
        return (Err(NumErr::Range), u64::MAX, r.end);
    }
    if !r.converted {
        return (Err(NumErr::Inval), 0, 0);
    }
    let mut i = 0;
    while is_c_space(byte_at(s, i)) {
        i += 1;
    }
    if byte_at(s, i) == b'-' {
        return (Err(NumErr::Range), 0, r.end);
    }
    (Ok(()), r.value, r.end)
}

/// What glibc's `strtod` makes of the fraction part that QEMU's `do_strtosz` hands it (the
/// exponent letters were already cut off, and hexadecimal input cannot get here).
enum Strtod {
    /// Nothing converted.
    NoConversion,
    /// `inf`/`nan`: rejected by `qemu_strtod_finite`.
    NonFinite,
    /// A finite number.
    Value {
        /// Bytes consumed.
        len: usize,
        /// The magnitude.
        value: f64,
        /// A `-` sign was present (`signbit`, also for `-0.0`).
        negative: bool,
        /// Some digit was not `0` (to detect underflow to zero).
        nonzero: bool,
    },
}

fn c_strtod(s: &[u8]) -> Strtod {
    let mut i = 0;
    while is_c_space(byte_at(s, i)) {
        i += 1;
    }
    let mut negative = false;
    match byte_at(s, i) {
        b'+' => i += 1,
        b'-' => {
            negative = true;
            i += 1;
        }
        _ => {}
    }
    let rest = s.get(i..).unwrap_or(&[]);
    let starts_with_ci =
        |word: &[u8]| rest.len() >= word.len() && rest[..word.len()].eq_ignore_ascii_case(word);
    if starts_with_ci(b"inf") || starts_with_ci(b"nan") {
        return Strtod::NonFinite;
    }
    let int_start = i;
    while byte_at(s, i).is_ascii_digit() {
        i += 1;
    }
    let int_digits = s.get(int_start..i).unwrap_or(&[]);
    let mut frac_digits: &[u8] = &[];
    if byte_at(s, i) == b'.' {
        let frac_start = i + 1;
        let mut j = frac_start;
        while byte_at(s, j).is_ascii_digit() {
            j += 1;
        }
        if !int_digits.is_empty() || j > frac_start {
            frac_digits = s.get(frac_start..j).unwrap_or(&[]);
            i = j;
        }
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Strtod::NoConversion;
    }
    let nonzero = int_digits
        .iter()
        .chain(frac_digits.iter())
        .any(|&d| d != b'0');
    let text = format!(
        "{}.{}",
        if int_digits.is_empty() {
            "0"
        } else {
            std::str::from_utf8(int_digits).unwrap_or("0")
        },
        if frac_digits.is_empty() {
            "0"
        } else {
            std::str::from_utf8(frac_digits).unwrap_or("0")
        }
    );
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Strtod::Value {
            len: i,
            value,
            negative,
            nonzero,
        },
        _ => Strtod::NonFinite,
    }
}

/// Multiplier of a size suffix (QEMU's `suffix_mul` with unit 1024), or `None`.
fn suffix_mul(c: u8) -> Option<u64> {
    match c.to_ascii_uppercase() {
        b'B' => Some(1),
        b'K' => Some(1 << 10),
        b'M' => Some(1 << 20),
        b'G' => Some(1 << 30),
        b'T' => Some(1 << 40),
        b'P' => Some(1 << 50),
        b'E' => Some(1 << 60),
        _ => None,
    }
}

/// QEMU 10's `qemu_strtosz(s, NULL, &result)` (`do_strtosz` with default suffix `B` and
/// unit 1024), including its 64.64 fixed-point handling of fractions.
fn qemu_strtosz(s: &[u8]) -> Result<u64, NumErr> {
    let (first, mut val, mut end) = parse_uint10(s);
    let mut retval = first;
    let mut valf: u64 = 0;
    let outcome: Result<u64, NumErr> = 'out: {
        if retval == Err(NumErr::Range) {
            break 'out Err(NumErr::Range);
        }
        if retval.is_ok() && val == 0 && matches!(byte_at(s, end), b'x' | b'X') {
            // Hexadecimal: no fraction and no suffix allowed.
            let r = c_strtoull(s, 16);
            end = r.end;
            if !r.converted {
                break 'out Err(NumErr::Inval);
            }
            if r.overflow {
                break 'out Err(NumErr::Range);
            }
            val = r.value;
            let c = byte_at(s, end);
            if c == b'.' || suffix_mul(c).is_some() {
                end = 0;
                break 'out Err(NumErr::Inval);
            }
        } else if byte_at(s, end) == b'.' || (end == 0 && s.contains(&b'.')) {
            let mut fraction = 0.0_f64;
            let mut nonzero = false;
            if retval.is_ok() && byte_at(s, end) == b'.' && !byte_at(s, end + 1).is_ascii_digit() {
                end += 1;
            } else {
                let tail = s.get(end..).unwrap_or(&[]);
                let cut = tail
                    .iter()
                    .position(|&b| b == b'e' || b == b'E')
                    .unwrap_or(tail.len());
                match c_strtod(tail.get(..cut).unwrap_or(&[])) {
                    Strtod::NoConversion | Strtod::NonFinite => retval = Err(NumErr::Inval),
                    Strtod::Value {
                        len,
                        value,
                        negative,
                        nonzero: nz,
                    } => {
                        end += len;
                        if negative {
                            break 'out Err(NumErr::Range);
                        }
                        retval = Ok(());
                        fraction = value;
                        nonzero = nz;
                    }
                }
            }
            if fraction == 1.0 {
                // Rounded up to a whole unit (e.g. ".99999999999999999999").
                match val.checked_add(1) {
                    Some(v) => val = v,
                    None => break 'out Err(NumErr::Range),
                }
            } else if fraction == 0.0 && nonzero {
                // strtod underflow (ERANGE): QEMU keeps a minimal non-zero fraction.
                valf = 1;
            } else {
                // `as` truncates like C's conversion; fraction < 1.0 so it fits.
                valf = (fraction * 18_446_744_073_709_551_616.0) as u64;
                if valf == 0 && fraction > 0.0 {
                    valf = 1;
                }
            }
        }
        if let Err(e) = retval {
            break 'out Err(e);
        }
        let mul = match suffix_mul(byte_at(s, end)) {
            Some(m) => {
                end += 1;
                m
            }
            None => 1,
        };
        if mul == 1 {
            if valf != 0 {
                // A fraction needs a scaling suffix.
                end = 0;
                break 'out Err(NumErr::Inval);
            }
        } else {
            let frac = u128::from(valf) * u128::from(mul);
            let total =
                u128::from(val) * u128::from(mul) + (frac >> 64) + u128::from((frac as u64) >> 63);
            match u64::try_from(total) {
                Ok(v) => val = v,
                Err(_) => break 'out Err(NumErr::Range),
            }
        }
        Ok(val)
    };
    // The whole string must be consumed.
    if end < s.len() {
        return Err(NumErr::Inval);
    }
    outcome
}

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

/// Parses a size the way qemu-img does (`qemu_strtosz`): a byte count with an optional
/// fraction and an optional suffix `b k m g t p e` in either case (1024-based, `b` = bytes).
///
/// `1536`, `1536b`, `512k`, `1.5G` (= 1610612736), `1.k`, `.5k` and hexadecimal `0x10` are
/// accepted; a fraction needs a suffix other than `b` (`1.5` is invalid); leading whitespace and
/// `+` are accepted (as by C's `strtoull`), trailing characters are not.
///
/// # Errors
/// [`SizeError::Invalid`] for bad syntax, [`SizeError::OutOfRange`] for a negative number or a
/// value of 2^64 or more (QEMU's `-ERANGE` cases: `-1024`, `16E`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    qemu_strtosz(s.as_bytes()).map_err(|e| match e {
        NumErr::Inval => SizeError::Invalid {
            input: s.to_owned(),
        },
        NumErr::Range => SizeError::OutOfRange {
            input: s.to_owned(),
        },
    })
}

/// Parses a positional image size for qemu-img (`cvtnum`): [`parse_size`] limited to
/// `0..=i64::MAX`.
///
/// # Errors
/// As [`parse_size`]; sizes above `i64::MAX` give [`SizeError::OutOfRange`]. Print them with
/// [`SizeError::qemu_img_message`].
pub fn parse_image_size(s: &str) -> Result<u64, SizeError> {
    let size = parse_size(s)?;
    if size > i64::MAX as u64 {
        return Err(SizeError::OutOfRange {
            input: s.to_owned(),
        });
    }
    Ok(size)
}

/// Parses a QemuOpts number option (C `strtoull` with base 0: decimal, `0x` hex, `0` octal;
/// a leading `-` wraps around like in C, so `-1` is `u64::MAX`).
///
/// # Errors
/// [`OptionError::BadNumber`] for bad syntax or trailing characters,
/// [`OptionError::NumberTooLarge`] for values of 2^64 or more.
pub fn parse_number(option: &str, value: &str) -> Result<u64, OptionError> {
    let s = value.as_bytes();
    let r = c_strtoull(s, 0);
    if !r.converted || r.end < s.len() {
        return Err(OptionError::BadNumber {
            option: option.to_owned(),
        });
    }
    if r.overflow {
        return Err(OptionError::NumberTooLarge {
            option: option.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(r.value)
}

/// Parses a QemuOpts boolean: `on`, `yes`, `true`, `y` or `off`, `no`, `false`, `n`
/// (case-sensitive, as QEMU's `qapi_bool_parse`).
///
/// # Errors
/// [`OptionError::BadBool`]: `Parameter 'KEY' expects 'on' or 'off'`.
pub fn parse_bool_onoff(key: &str, value: &str) -> Result<bool, OptionError> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(OptionError::BadBool {
            option: key.to_owned(),
        }),
    }
}

/// Parses a size-valued option, with QemuOpts' error messages.
fn parse_size_option(key: &str, value: &str) -> Result<u64, OptionError> {
    parse_size(value).map_err(|e| e.into_option_error(key))
}

/// Checks a `node-name` like QEMU (`Invalid node-name: 'X'`, `Node name too long`).
///
/// # Errors
/// [`OptionError::InvalidNodeName`] unless the name starts with an ASCII letter and continues
/// with letters, digits, `-`, `.`, `_`; [`OptionError::NodeNameTooLong`] for 32 bytes or more.
pub fn validate_node_name(name: &str) -> Result<(), OptionError> {
    let mut bytes = name.bytes();
    let well_formed = bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !well_formed {
        return Err(OptionError::InvalidNodeName {
            name: name.to_owned(),
        });
    }
    if name.len() >= NODE_NAME_MAX {
        return Err(OptionError::NodeNameTooLong);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Option lists
// ---------------------------------------------------------------------------------------------

/// One element of a QemuOpts list.
struct RawOption {
    name: String,
    value: String,
    /// Given without `=` (a flag: `key` → on, `nokey` → off, `help`/`?`).
    bare: bool,
}

/// QemuOpts' `get_opt_value`: reads up to a single `,`; `,,` is a literal comma. Returns the
/// value and the number of bytes consumed (the terminating `,` is not consumed).
fn get_opt_value(s: &str) -> (String, usize) {
    let mut value = String::new();
    let mut pos = 0;
    loop {
        let rest = s.get(pos..).unwrap_or("");
        match rest.find(',') {
            None => {
                value.push_str(rest);
                return (value, s.len());
            }
            Some(off) => {
                let (head, tail) = rest.split_at(off);
                value.push_str(head);
                if tail.as_bytes().get(1) == Some(&b',') {
                    value.push(',');
                    pos += off + 2;
                } else {
                    return (value, pos + off);
                }
            }
        }
    }
}

/// QemuOpts' parser (`qemu_opts_do_parse` without an implied first name).
fn parse_qemu_opts(s: &str) -> Vec<RawOption> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < s.len() {
        let rest = s.get(pos..).unwrap_or("");
        let name_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let (name, after) = rest.split_at(name_len);
        if let Some(value_part) = after.strip_prefix('=') {
            let (value, consumed) = get_opt_value(value_part);
            out.push(RawOption {
                name: name.to_owned(),
                value,
                bare: false,
            });
            pos += name_len + 1 + consumed;
        } else {
            let (name, value) = match name.strip_prefix("no") {
                Some(stripped) => (stripped, "off"),
                None => (name, "on"),
            };
            out.push(RawOption {
                name: name.to_owned(),
                value: value.to_owned(),
                bare: true,
            });
            pos += name_len;
        }
        if s.as_bytes().get(pos) == Some(&b',') {
            pos += 1;
        }
    }
    out
}

/// Splits a QEMU option list `key=value,key=value` into pairs, in order.
///
/// Exactly QemuOpts' syntax: `,,` inside a value is a literal comma (`data_file=a,,b` gives
/// `a,b`); an element without `=` is a flag, `key` meaning `key=on` and `nokey` meaning
/// `key=off` (so a bare `nocow` is `cow=off`); `a=b=c` gives `a` = `b=c`; keys are not
/// unescaped. An empty string gives an empty list (qemu-img itself refuses an empty `-o`; see
/// [`check_option_list`]).
///
/// # Errors
/// [`OptionError::InvalidOptionList`] for a list starting with `,` or ending with an odd number
/// of `,` (qemu-img's `Invalid option list: ...`).
pub fn split_option_string(s: &str) -> Result<Vec<(String, String)>, OptionError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    check_option_list(s)?;
    Ok(parse_qemu_opts(s)
        .into_iter()
        .map(|o| (o.name, o.value))
        .collect())
}

/// qemu-img's check of each `-o` argument (`is_valid_option_list`): not empty, not starting
/// with `,`, not ending with an odd number of `,`.
///
/// # Errors
/// [`OptionError::InvalidOptionList`] naming the list.
pub fn check_option_list(s: &str) -> Result<(), OptionError> {
    let trailing = s.bytes().rev().take_while(|&b| b == b',').count();
    if s.is_empty() || s.starts_with(',') || trailing % 2 == 1 {
        return Err(OptionError::InvalidOptionList { list: s.to_owned() });
    }
    Ok(())
}

/// Whether an option list asks for help (a bare `help` or `?` element, as `-o help`).
pub fn option_string_wants_help(s: &str) -> bool {
    parse_qemu_opts(s)
        .iter()
        .any(|o| o.bare && (o.name == "help" || o.name == "?"))
}

/// Escapes a value for an option list or the `Formatting` line: `,` becomes `,,`.
pub fn escape_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

// ---------------------------------------------------------------------------------------------
// Overlap checks (§5)
// ---------------------------------------------------------------------------------------------

/// QEMU's overlap-check templates (`Qcow2OverlapCheckMode`), §5.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlapCheckMode {
    /// No checks.
    None,
    /// The O(1) checks: main-header, active-l1, refcount-table, snapshot-table,
    /// bitmap-directory.
    Constant,
    /// `constant` plus active-l2, refcount-block, inactive-l1 (all in memory). QEMU's default.
    #[default]
    Cached,
    /// `cached` plus inactive-l2 (reads snapshot L1 tables on every check).
    All,
}

impl OverlapCheckMode {
    /// Every mode, from weakest to strongest.
    pub const MODES: [OverlapCheckMode; 4] = [
        OverlapCheckMode::None,
        OverlapCheckMode::Constant,
        OverlapCheckMode::Cached,
        OverlapCheckMode::All,
    ];

    /// The checks of this mode as a [`MetadataKind::bit`] mask (QEMU's `QCOW2_OL_*`).
    pub const fn mask(self) -> u16 {
        const CONSTANT: u16 = MetadataKind::MainHeader.bit()
            | MetadataKind::ActiveL1.bit()
            | MetadataKind::RefcountTable.bit()
            | MetadataKind::SnapshotTable.bit()
            | MetadataKind::BitmapDirectory.bit();
        const CACHED: u16 = CONSTANT
            | MetadataKind::ActiveL2.bit()
            | MetadataKind::RefcountBlock.bit()
            | MetadataKind::InactiveL1.bit();
        const ALL: u16 = CACHED | MetadataKind::InactiveL2.bit();
        match self {
            OverlapCheckMode::None => 0,
            OverlapCheckMode::Constant => CONSTANT,
            OverlapCheckMode::Cached => CACHED,
            OverlapCheckMode::All => ALL,
        }
    }

    /// QEMU's name: `none`, `constant`, `cached`, `all`.
    pub const fn as_str(self) -> &'static str {
        match self {
            OverlapCheckMode::None => "none",
            OverlapCheckMode::Constant => "constant",
            OverlapCheckMode::Cached => "cached",
            OverlapCheckMode::All => "all",
        }
    }
}

impl fmt::Display for OverlapCheckMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OverlapCheckMode {
    type Err = OptionError;

    /// Parses `none`, `constant`, `cached`, `all` (case-sensitive).
    fn from_str(s: &str) -> Result<Self, OptionError> {
        OverlapCheckMode::MODES
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| OptionError::OverlapMode {
                value: s.to_owned(),
            })
    }
}

/// The set of enabled overlap checks (one bit per [`MetadataKind`]). Default: `cached`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OverlapChecks {
    mask: u16,
}

impl Default for OverlapChecks {
    fn default() -> Self {
        OverlapChecks::from_mode(OverlapCheckMode::Cached)
    }
}

impl OverlapChecks {
    /// Every bit that names a [`MetadataKind`].
    const VALID: u16 = OverlapCheckMode::All.mask();

    /// The checks of a template.
    pub const fn from_mode(mode: OverlapCheckMode) -> Self {
        OverlapChecks { mask: mode.mask() }
    }

    /// A set from a bit mask; bits that name no [`MetadataKind`] are dropped.
    pub const fn from_mask(mask: u16) -> Self {
        OverlapChecks {
            mask: mask & Self::VALID,
        }
    }

    /// The bit mask ([`MetadataKind::bit`] of every enabled kind).
    pub const fn mask(self) -> u16 {
        self.mask
    }

    /// Whether writes overlapping `kind` are checked.
    pub const fn enabled(self, kind: MetadataKind) -> bool {
        self.mask & kind.bit() != 0
    }

    /// This set with the check for `kind` switched on or off.
    #[must_use]
    pub const fn with(self, kind: MetadataKind, on: bool) -> Self {
        OverlapChecks {
            mask: if on {
                self.mask | kind.bit()
            } else {
                self.mask & !kind.bit()
            },
        }
    }

    /// The enabled kinds, in QEMU's bit order.
    pub fn kinds(self) -> impl Iterator<Item = MetadataKind> {
        MetadataKind::ALL
            .into_iter()
            .filter(move |&k| self.enabled(k))
    }

    /// Parses a list that holds only `overlap-check*` options (see [`OverlapCheckOptions`]).
    ///
    /// # Errors
    /// Those of [`OverlapCheckOptions::set`] and [`OverlapCheckOptions::resolve`];
    /// [`OptionError::UnsupportedOption`] for any other key.
    pub fn from_qemu_str(s: &str) -> Result<Self, OptionError> {
        let mut parser = OverlapCheckOptions::new();
        for (key, value) in split_option_string(s)? {
            if !parser.set(&key, &value)? {
                return Err(OptionError::UnsupportedOption { option: key });
            }
        }
        parser.resolve()
    }
}

/// Collects the `overlap-check` options of one option list and resolves them like QEMU:
/// `overlap-check=MODE`, `overlap-check.template=MODE` and `overlap-check.<kind>=on|off`
/// (`<kind>` being a [`MetadataKind::option_name`]), in any order.
///
/// Resolution: if both `overlap-check` and `overlap-check.template` are given they must be
/// equal; the template's set (default `cached`, or the base passed to
/// [`OverlapCheckOptions::resolve_over`]) is the start, then every explicitly given boolean sets
/// or clears its bit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlapCheckOptions {
    mode: Option<String>,
    template: Option<String>,
    flags: [Option<bool>; 9],
}

impl OverlapCheckOptions {
    /// No options given.
    pub fn new() -> Self {
        OverlapCheckOptions::default()
    }

    /// Whether no overlap option was given.
    pub fn is_empty(&self) -> bool {
        self.mode.is_none() && self.template.is_none() && self.flags.iter().all(Option::is_none)
    }

    /// Records one option. Returns `Ok(false)` if `key` is not an overlap-check option
    /// (nothing recorded). Mode values are checked by [`OverlapCheckOptions::resolve`], as QEMU
    /// checks them after all options were read.
    ///
    /// # Errors
    /// [`OptionError::BadBool`] for a flag whose value is not a boolean,
    /// [`OptionError::UnknownOverlapFlag`] for `overlap-check.<unknown>`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, OptionError> {
        if key == "overlap-check" {
            self.mode = Some(value.to_owned());
            return Ok(true);
        }
        let Some(name) = key.strip_prefix("overlap-check.") else {
            return Ok(false);
        };
        if name == "template" {
            self.template = Some(value.to_owned());
            return Ok(true);
        }
        let Some(index) = MetadataKind::ALL
            .iter()
            .position(|k| k.option_name() == name)
        else {
            return Err(OptionError::UnknownOverlapFlag {
                option: key.to_owned(),
            });
        };
        let on = parse_bool_onoff(key, value)?;
        if let Some(slot) = self.flags.get_mut(index) {
            *slot = Some(on);
        }
        Ok(true)
    }

    /// Resolves against QEMU's default template (`cached`).
    ///
    /// # Errors
    /// [`OptionError::OverlapConflict`] if `overlap-check` and `overlap-check.template` differ,
    /// [`OptionError::OverlapMode`] for an unknown mode.
    pub fn resolve(&self) -> Result<OverlapChecks, OptionError> {
        self.resolve_over(OverlapChecks::default())
    }

    /// Resolves with `base` as the template when no mode is given.
    ///
    /// # Errors
    /// As [`OverlapCheckOptions::resolve`].
    pub fn resolve_over(&self, base: OverlapChecks) -> Result<OverlapChecks, OptionError> {
        let chosen = match (&self.mode, &self.template) {
            (Some(mode), Some(template)) if mode != template => {
                return Err(OptionError::OverlapConflict {
                    mode: mode.clone(),
                    template: template.clone(),
                })
            }
            (Some(mode), _) => Some(mode),
            (None, template) => template.as_ref(),
        };
        let mut checks = match chosen {
            Some(mode) => OverlapChecks::from_mode(mode.parse()?),
            None => base,
        };
        for (kind, flag) in MetadataKind::ALL.into_iter().zip(self.flags) {
            if let Some(on) = flag {
                checks = checks.with(kind, on);
            }
        }
        Ok(checks)
    }
}

// ---------------------------------------------------------------------------------------------
// Error policy and backing policy (§12)
// ---------------------------------------------------------------------------------------------

/// What to do when a guest I/O request fails (`rerror=` / `werror=`, QEMU's `BlockdevOnError`
/// without `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    /// Report the error to the guest (default).
    #[default]
    Report,
    /// Ignore the error (pretend success).
    Ignore,
    /// Stop the VM.
    Stop,
    /// Stop on ENOSPC, report anything else (writes only).
    Enospc,
}

/// The action taken for one failed request (QEMU's `BlockErrorAction`, the `action` of a
/// `BLOCK_IO_ERROR` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorAction {
    /// The error was ignored.
    Ignore,
    /// The error was reported to the guest.
    Report,
    /// The VM was stopped.
    Stop,
}

impl ErrorAction {
    /// QEMU's name: `ignore`, `report`, `stop`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

impl fmt::Display for ErrorAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ErrorPolicy {
    /// Parses a `rerror=` (`read` true) or `werror=` value like QEMU's
    /// `parse_block_error_action`: `ignore`, `stop`, `report`, and `enospc` for writes only.
    ///
    /// # Errors
    /// [`OptionError::BadErrorAction`]: `'X' invalid read error action` (or `write`).
    pub fn parse(value: &str, read: bool) -> Result<Self, OptionError> {
        match value {
            "ignore" => Ok(ErrorPolicy::Ignore),
            "enospc" if !read => Ok(ErrorPolicy::Enospc),
            "stop" => Ok(ErrorPolicy::Stop),
            "report" => Ok(ErrorPolicy::Report),
            _ => Err(OptionError::BadErrorAction {
                value: value.to_owned(),
                operation: if read { "read" } else { "write" },
            }),
        }
    }

    /// The action for a failed request; `nospace` is whether the error was ENOSPC.
    pub const fn action_for(self, nospace: bool) -> ErrorAction {
        match self {
            ErrorPolicy::Report => ErrorAction::Report,
            ErrorPolicy::Ignore => ErrorAction::Ignore,
            ErrorPolicy::Stop => ErrorAction::Stop,
            ErrorPolicy::Enospc => {
                if nospace {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        }
    }

    /// QEMU's name: `report`, `ignore`, `stop`, `enospc`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorPolicy::Report => "report",
            ErrorPolicy::Ignore => "ignore",
            ErrorPolicy::Stop => "stop",
            ErrorPolicy::Enospc => "enospc",
        }
    }
}

impl fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which backing files an open may follow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Open any backing file the header names (QEMU's behaviour).
    #[default]
    Follow,
    /// Never open a backing file.
    Refuse,
    /// Open only these files, or files below these directories.
    AllowList(Vec<PathBuf>),
}

impl BackingPolicy {
    /// Whether `path` may be opened as a backing file.
    ///
    /// For [`BackingPolicy::AllowList`] both sides are canonicalised where possible (symlinks
    /// resolved, so a link inside an allowed directory that points outside it is refused); a
    /// path that does not exist (yet) is resolved through its deepest existing ancestor and then
    /// lexically. An entry that is an existing directory (or ends with a separator) permits
    /// everything below it; any other entry permits exactly that file. Relative paths are taken
    /// relative to the current directory: resolve a header's relative backing name against the
    /// image's directory before asking.
    pub fn permits(&self, path: &Path) -> bool {
        match self {
            BackingPolicy::Follow => true,
            BackingPolicy::Refuse => false,
            BackingPolicy::AllowList(entries) => {
                let target = resolve_path(path);
                entries.iter().any(|entry| {
                    let allowed = resolve_path(entry);
                    if target == allowed {
                        return true;
                    }
                    let is_dir = allowed.is_dir()
                        || entry
                            .as_os_str()
                            .to_string_lossy()
                            .ends_with(std::path::MAIN_SEPARATOR);
                    is_dir && target.starts_with(&allowed)
                })
            }
        }
    }
}

/// Canonical form of `path`: `canonicalize` where it works, else the canonical deepest
/// existing ancestor plus the remaining components with `.`/`..` resolved lexically.
fn resolve_path(path: &Path) -> PathBuf {
    if let Ok(canonical) = std::fs::canonicalize(path) {
        return canonical;
    }
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(dir) => dir.join(path),
            Err(_) => path.to_path_buf(),
        }
    };
    let (mut out, rest) = absolute
        .ancestors()
        .skip(1)
        .find_map(|anc| {
            let canonical = std::fs::canonicalize(anc).ok()?;
            let rest = absolute.strip_prefix(anc).ok()?.to_path_buf();
            Some((canonical, rest))
        })
        .unwrap_or_else(|| (PathBuf::new(), absolute.clone()));
    for component in rest.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Runtime options (§6.1, §7.1, §11.1, cli.md §12.2)
// ---------------------------------------------------------------------------------------------

/// Options for opening an image (QEMU's qcow2 runtime options plus a few block-layer ones).
///
/// Build with [`OpenOptions::new`] and the builder methods, or from QEMU's `--image-opts`
/// syntax with [`OpenOptions::from_qemu_str`]. Getters are prefixed `get_` (the plain names are
/// the builders).
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
        }
    }

    /// Parses QEMU runtime options (see [`OpenOptions::apply_qemu_str`]) over the defaults.
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
    ///   `rerror`, `werror` (the last two are `-drive` options in QEMU; accepted here);
    /// * `l2-cache-size`, `l2-cache-entry-size`, `refcount-cache-size`, `cache-size` (sizes,
    ///   [`parse_size`] syntax), `cache-clean-interval` (a number);
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
    /// [`OptionError::NodeNameTooLong`], [`OptionError::EncryptionUnsupported`]), overlap
    /// errors ([`OptionError::OverlapConflict`], [`OptionError::OverlapMode`]),
    /// [`OptionError::UnsupportedOption`] / [`OptionError::UnknownOverlapFlag`] for unknown keys,
    /// [`OptionError::InvalidOptionList`].
    pub fn apply_qemu_str(&mut self, s: &str) -> Result<(), OptionError> {
        let pairs = split_option_string(s)?;
        let mut next = self.clone();
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
            "data-file" => data_files.reference = Some(value.into()),
            "data-file.filename" => data_files.filename = Some(value.into()),
            "data-file.driver" => data_files.set_driver(value)?,
            "read-only" => self.read_only = bool_value()?,
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
            _ if key.starts_with("encrypt.") => {
                return Err(OptionError::EncryptionUnsupported {
                    option: key.to_owned(),
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

/// `file=` / `file.filename=` / `file.driver=` (or the `data-file` equivalents) of one list.
#[derive(Default)]
struct FileKeys {
    reference: Option<PathBuf>,
    filename: Option<PathBuf>,
    driver: bool,
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
            (Some(_), _) if self.filename.is_some() || self.driver => {
                Err(OptionError::FileConflict)
            }
            (Some(path), None) | (None, Some(path)) => Ok(Some(path.clone())),
            _ => Ok(None),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cache sizing (§6.2)
// ---------------------------------------------------------------------------------------------

/// The cache configuration of one open image (QEMU 10's `read_cache_sizes` and
/// `qcow2_update_options_prepare`).
///
/// Byte fields are effective sizes: entry count times entry size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bytes of the L2 cache (`l2_slices * l2_slice_bytes`).
    pub l2_cache_bytes: u64,
    /// Size of one L2 cache entry (an L2 slice), i.e. the effective `l2-cache-entry-size`.
    pub l2_slice_bytes: u64,
    /// Number of L2 slices the cache holds (at least 2).
    pub l2_slices: usize,
    /// Bytes of the refcount block cache (`refcount_blocks * cluster_size`).
    pub refcount_cache_bytes: u64,
    /// Number of refcount blocks the cache holds (at least 4).
    pub refcount_blocks: usize,
    /// Seconds after which unused entries are dropped; 0 = never.
    pub clean_interval_secs: u64,
}

/// Sizes the L2 and refcount caches exactly as QEMU 10 does (§6.2).
///
/// `virtual_size` is the header's size in bytes (QEMU works in whole 512-byte sectors, rounded
/// down), `cluster_size` the image's cluster size and `l2_entry_bytes` 8, or 16 with extended L2
/// entries. The counts are only counts: a cache should allocate entries lazily, so a huge
/// `l2-cache-size` (up to `INT_MAX` entries) costs nothing up front.
///
/// # Errors
/// In QEMU's order: [`OptionError::CacheSizeAllThree`], [`OptionError::L2CacheExceedsCacheSize`],
/// [`OptionError::RefcountCacheExceedsCacheSize`], [`OptionError::L2CacheEntrySize`],
/// [`OptionError::L2CacheTooBig`], [`OptionError::RefcountCacheTooBig`],
/// [`OptionError::CacheCleanIntervalUnsupported`] (non-Linux hosts),
/// [`OptionError::CacheCleanIntervalTooBig`]; [`OptionError::ClusterSize`] if `cluster_size` is
/// not a valid qcow2 cluster size.
pub fn cache_config(
    opts: &OpenOptions,
    virtual_size: u64,
    cluster_size: u64,
    l2_entry_bytes: u64,
) -> Result<CacheConfig, OptionError> {
    if !valid_cluster_size(cluster_size) {
        return Err(OptionError::ClusterSize);
    }
    let virtual_disk_size = virtual_size / SECTOR_SIZE * SECTOR_SIZE;
    let max_l2_entries = virtual_disk_size.div_ceil(cluster_size);
    let max_l2_cache = u64::try_from(
        (u128::from(max_l2_entries) * u128::from(l2_entry_bytes))
            .div_ceil(u128::from(cluster_size))
            * u128::from(cluster_size),
    )
    .unwrap_or(u64::MAX);
    let min_refcount_cache = cluster_size.saturating_mul(MIN_REFCOUNT_CACHE_BLOCKS as u64);

    let l2_cache_max_setting = opts.l2_cache_size.unwrap_or(DEFAULT_L2_CACHE_MAX_SIZE);
    let mut refcount_cache = opts.refcount_cache_size.unwrap_or(0);
    let mut entry_size = opts.l2_cache_entry_size.unwrap_or(cluster_size);
    let mut l2_cache = max_l2_cache.min(l2_cache_max_setting);

    if let Some(combined) = opts.cache_size {
        if opts.l2_cache_size.is_some() && opts.refcount_cache_size.is_some() {
            return Err(OptionError::CacheSizeAllThree);
        } else if opts.l2_cache_size.is_some() && l2_cache_max_setting > combined {
            return Err(OptionError::L2CacheExceedsCacheSize);
        } else if refcount_cache > combined {
            return Err(OptionError::RefcountCacheExceedsCacheSize);
        }
        if opts.l2_cache_size.is_some() {
            refcount_cache = combined.saturating_sub(l2_cache);
        } else if opts.refcount_cache_size.is_some() {
            l2_cache = combined.saturating_sub(refcount_cache);
        } else if combined >= max_l2_cache.saturating_add(min_refcount_cache) {
            // As much as possible for the L2 cache, the rest for refcounts.
            l2_cache = max_l2_cache;
            refcount_cache = combined - l2_cache;
        } else {
            refcount_cache = combined.min(min_refcount_cache);
            l2_cache = combined - refcount_cache;
        }
    }

    // An L2 cache that cannot cover the whole disk uses 4 KiB slices by default.
    if l2_cache < max_l2_cache && opts.l2_cache_entry_size.is_none() {
        entry_size = cluster_size.min(4096);
    }
    if entry_size < MIN_CLUSTER_SIZE || entry_size > cluster_size || !entry_size.is_power_of_two() {
        return Err(OptionError::L2CacheEntrySize { cluster_size });
    }

    let l2_slices = (l2_cache / entry_size).max(MIN_L2_CACHE_SLICES as u64);
    if l2_slices > INT_MAX {
        return Err(OptionError::L2CacheTooBig);
    }
    let refcount_blocks = (refcount_cache / cluster_size).max(MIN_REFCOUNT_CACHE_BLOCKS as u64);
    if refcount_blocks > INT_MAX {
        return Err(OptionError::RefcountCacheTooBig);
    }
    let clean_interval_secs = opts
        .cache_clean_interval
        .unwrap_or(DEFAULT_CACHE_CLEAN_INTERVAL);
    if !cfg!(target_os = "linux") && clean_interval_secs != 0 {
        return Err(OptionError::CacheCleanIntervalUnsupported);
    }
    if clean_interval_secs > u64::from(u32::MAX) {
        return Err(OptionError::CacheCleanIntervalTooBig);
    }
    Ok(CacheConfig {
        l2_cache_bytes: l2_slices.saturating_mul(entry_size),
        l2_slice_bytes: entry_size,
        l2_slices: usize::try_from(l2_slices).map_err(|_| OptionError::L2CacheTooBig)?,
        refcount_cache_bytes: refcount_blocks.saturating_mul(cluster_size),
        refcount_blocks: usize::try_from(refcount_blocks)
            .map_err(|_| OptionError::RefcountCacheTooBig)?,
        clean_interval_secs,
    })
}

/// A power of two between 512 bytes and 2 MiB.
fn valid_cluster_size(cluster_size: u64) -> bool {
    cluster_size.is_power_of_two() && (MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
}

// ---------------------------------------------------------------------------------------------
// Create options (§9.4, cli.md §2)
// ---------------------------------------------------------------------------------------------

/// The image version (`compat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compat {
    /// Version 2 (`compat=0.10` or `v2`).
    V2,
    /// Version 3 (`compat=1.1` or `v3`), the default.
    #[default]
    V3,
}

impl Compat {
    /// Parses `0.10`, `v2`, `1.1`, `v3` (case-sensitive); `None` for anything else.
    pub fn from_qemu(s: &str) -> Option<Compat> {
        match s {
            "0.10" | "v2" => Some(Compat::V2),
            "1.1" | "v3" => Some(Compat::V3),
            _ => None,
        }
    }

    /// The header version number: 2 or 3.
    pub const fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }

    /// qemu-img's spelling: `0.10` or `1.1` (as `qemu-img info` prints it).
    pub const fn as_str(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }
}

impl fmt::Display for Compat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compat {
    type Err = OptionError;

    /// Parses like [`Compat::from_qemu`].
    fn from_str(s: &str) -> Result<Self, OptionError> {
        Compat::from_qemu(s).ok_or_else(|| OptionError::BadEnumValue {
            option: "version",
            value: s.to_owned(),
        })
    }
}

/// Preallocation mode (QEMU's `PreallocMode`, §9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preallocation {
    /// Only metadata needed for an empty image (default).
    #[default]
    Off,
    /// All L2 tables and data clusters allocated, the file extended sparsely.
    Metadata,
    /// Like `metadata`, the data area reserved with `posix_fallocate()`.
    Falloc,
    /// Like `metadata`, the data area really allocated (zeroes written if need be).
    Full,
}

impl Preallocation {
    /// QEMU's name: `off`, `metadata`, `falloc`, `full`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

impl fmt::Display for Preallocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Preallocation {
    type Err = OptionError;

    /// Parses `off`, `metadata`, `falloc`, `full` (case-sensitive).
    ///
    /// The error is qemu-img resize's `Invalid preallocation mode 'X'`; `create -o` reports
    /// [`OptionError::BadEnumValue`] from [`CreateOptions::validate`] instead.
    fn from_str(s: &str) -> Result<Self, OptionError> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(OptionError::PreallocationMode {
                value: s.to_owned(),
            }),
        }
    }
}

/// Compression type of compressed clusters (header field `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    /// zlib/deflate (type 0, default).
    #[default]
    Zlib,
    /// zstd (type 1, v3 only).
    Zstd,
}

impl CompressionType {
    /// QEMU's name: `zlib` or `zstd`.
    pub const fn as_str(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

impl fmt::Display for CompressionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CompressionType {
    type Err = OptionError;

    /// Parses `zlib` or `zstd` (case-sensitive).
    fn from_str(s: &str) -> Result<Self, OptionError> {
        match s {
            "zlib" => Ok(CompressionType::Zlib),
            "zstd" => Ok(CompressionType::Zstd),
            _ => Err(OptionError::BadEnumValue {
                option: "compression-type",
                value: s.to_owned(),
            }),
        }
    }
}

/// Which keys a create-option parse accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CreateKeys {
    /// `qemu-img create -o`: the qcow2 driver's options plus the file layer's `nocow`.
    Create,
    /// Only the qcow2 driver's options, encryption included (amend's "only supported for image
    /// creation" test).
    DriverOnly,
}

/// Options of `qemu-img create -f qcow2` (`-o` keys, `-b`/`-F`, the positional size).
///
/// The `*_spelling`/`spellings` fields keep values exactly as the user wrote them, for the
/// `Formatting` line (QEMU echoes them) and for values that [`CreateOptions::validate`] rejects
/// after that line is printed (`compat=0.9`, `preallocation=bogus`). The builder methods keep
/// them consistent; code that assigns the typed fields directly should not rely on a stale
/// spelling (a spelling that parses to a different value than its field is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (`-o size=`, the positional size or the backing file's).
    pub size: Option<u64>,
    /// Whether `size` came from `-o size=` (a positional size then is an error).
    pub size_in_options: bool,
    /// Image version.
    pub compat: Compat,
    /// `compat` as the user spelled it (`0.10`, `v2`, `1.1`, `v3`, or an invalid value).
    pub compat_spelling: Option<String>,
    /// Cluster size in bytes (default 65536).
    pub cluster_size: u64,
    /// Refcount width in bits (default 16; values beyond `u32` are stored as `u32::MAX`).
    pub refcount_bits: u32,
    /// Set compatible bit 0 (lazy refcounts).
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name, stored in the header as given.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_fmt: Option<String>,
    /// External data file name, stored in the header as given.
    pub data_file: Option<String>,
    /// Autoclear bit 1: the data file is a valid raw image.
    pub data_file_raw: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Whether `preallocation` was given (the `Formatting` line shows it only then).
    pub preallocation_given: bool,
    /// `nocow` (Btrfs `chattr +C`), if given.
    pub nocow: Option<bool>,
    /// Other values as given, keyed by qemu-img option name (`preallocation`,
    /// `compression_type`, `lazy_refcounts`, `extended_l2`, `data_file_raw`, `nocow`,
    /// `refcount_bits`).
    pub spellings: BTreeMap<String, String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions::new()
    }
}

impl CreateOptions {
    /// qemu-img's defaults: v3, 64 KiB clusters, 16-bit refcounts, zlib, no preallocation.
    pub fn new() -> Self {
        CreateOptions {
            size: None,
            size_in_options: false,
            compat: Compat::V3,
            compat_spelling: None,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            refcount_bits: DEFAULT_REFCOUNT_BITS,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            preallocation_given: false,
            nocow: None,
            spellings: BTreeMap::new(),
        }
    }

    /// Parses a `-o` string over the defaults (see [`CreateOptions::apply_qemu_str`]).
    ///
    /// # Errors
    /// As [`CreateOptions::apply_qemu_str`].
    pub fn from_qemu_str(s: &str) -> Result<Self, OptionError> {
        let mut opts = CreateOptions::new();
        opts.apply_qemu_str(s)?;
        Ok(opts)
    }

    /// Virtual size in bytes.
    #[must_use]
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    /// Image version (shown as `compat=0.10`/`compat=1.1` on the `Formatting` line).
    #[must_use]
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = compat;
        self.compat_spelling = Some(compat.as_str().to_owned());
        self
    }

    /// Cluster size in bytes.
    #[must_use]
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// Refcount width in bits.
    #[must_use]
    pub fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self.spellings.remove("refcount_bits");
        self
    }

    /// Lazy refcounts.
    #[must_use]
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = on;
        self.spellings.remove("lazy_refcounts");
        self
    }

    /// Extended L2 entries.
    #[must_use]
    pub fn extended_l2(mut self, on: bool) -> Self {
        self.extended_l2 = on;
        self.spellings.remove("extended_l2");
        self
    }

    /// Compression type.
    #[must_use]
    pub fn compression_type(mut self, kind: CompressionType) -> Self {
        self.compression_type = kind;
        self.spellings.remove("compression_type");
        self
    }

    /// Backing file name (`-b`).
    #[must_use]
    pub fn backing_file(mut self, name: impl Into<String>) -> Self {
        self.backing_file = Some(name.into());
        self
    }

    /// Backing file format (`-F`).
    #[must_use]
    pub fn backing_fmt(mut self, format: impl Into<String>) -> Self {
        self.backing_fmt = Some(format.into());
        self
    }

    /// External data file name.
    #[must_use]
    pub fn data_file(mut self, name: impl Into<String>) -> Self {
        self.data_file = Some(name.into());
        self
    }

    /// The data file is a valid raw image (shown on the `Formatting` line).
    #[must_use]
    pub fn data_file_raw(mut self, on: bool) -> Self {
        self.data_file_raw = on;
        self.spellings
            .insert("data_file_raw".to_owned(), on_off(on).to_owned());
        self
    }

    /// Preallocation mode (shown on the `Formatting` line).
    #[must_use]
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self.preallocation_given = true;
        self.spellings.remove("preallocation");
        self
    }

    /// Btrfs no-copy-on-write.
    #[must_use]
    pub fn nocow(mut self, on: bool) -> Self {
        self.nocow = Some(on);
        self.spellings.remove("nocow");
        self
    }

    /// Sets the positional size argument (after the `-o` options were applied, as qemu-img).
    ///
    /// # Errors
    /// [`OptionError::SizeSpecifiedTwice`] if `-o size=` was given.
    pub fn set_positional_size(&mut self, bytes: u64) -> Result<(), OptionError> {
        if self.size_in_options {
            return Err(OptionError::SizeSpecifiedTwice);
        }
        self.size = Some(bytes);
        Ok(())
    }

    /// The size, once it is known (after the positional size and the backing file's size were
    /// considered).
    ///
    /// # Errors
    /// [`OptionError::MissingSize`] (qemu-img prints it before the `Formatting` line).
    pub fn require_size(&self) -> Result<u64, OptionError> {
        self.size.ok_or(OptionError::MissingSize)
    }

    /// Applies one `-o` argument, element by element, stopping at the first error like
    /// qemu-img (on error `self` is unchanged). Keys: `size`, `compat`, `cluster_size`,
    /// `refcount_bits`, `lazy_refcounts`, `extended_l2`, `compression_type`, `preallocation`,
    /// `backing_file`, `backing_fmt`, `data_file`, `data_file_raw`, `nocow`; later values
    /// override earlier ones.
    ///
    /// Values of `compat`, `preallocation` and `compression_type` are not checked here: qemu-img
    /// prints the `Formatting` line first and then rejects them, so [`CreateOptions::validate`]
    /// does.
    ///
    /// # Errors
    /// [`OptionError::InvalidParameter`] for an unknown key, [`OptionError::BadSize`] /
    /// [`OptionError::SizeOutOfRange`] (`size`, `cluster_size`), [`OptionError::BadNumber`] /
    /// [`OptionError::NumberTooLarge`] (`refcount_bits`), [`OptionError::BadBool`],
    /// [`OptionError::EncryptionUnsupported`] (`encryption`, `encrypt.*`),
    /// [`OptionError::InvalidOptionList`]. All of these come without a `Formatting` line.
    pub fn apply_qemu_str(&mut self, s: &str) -> Result<(), OptionError> {
        let pairs = split_option_string(s)?;
        let mut next = self.clone();
        for (key, value) in &pairs {
            next.apply_pair(key, value, CreateKeys::Create)?;
        }
        *self = next;
        Ok(())
    }

    fn apply_pair(&mut self, key: &str, value: &str, keys: CreateKeys) -> Result<(), OptionError> {
        let spell = |this: &mut Self| {
            this.spellings.insert(key.to_owned(), value.to_owned());
        };
        match key {
            "size" => {
                self.size = Some(parse_size_option(key, value)?);
                self.size_in_options = true;
            }
            "compat" => {
                if let Some(compat) = Compat::from_qemu(value) {
                    self.compat = compat;
                }
                self.compat_spelling = Some(value.to_owned());
            }
            "cluster_size" => self.cluster_size = parse_size_option(key, value)?,
            "refcount_bits" => {
                let bits = parse_number(key, value)?;
                self.refcount_bits = u32::try_from(bits).unwrap_or(u32::MAX);
                spell(self);
            }
            "lazy_refcounts" => {
                self.lazy_refcounts = parse_bool_onoff(key, value)?;
                spell(self);
            }
            "extended_l2" => {
                self.extended_l2 = parse_bool_onoff(key, value)?;
                spell(self);
            }
            "data_file_raw" => {
                self.data_file_raw = parse_bool_onoff(key, value)?;
                spell(self);
            }
            "nocow" if keys == CreateKeys::Create => {
                self.nocow = Some(parse_bool_onoff(key, value)?);
                spell(self);
            }
            "compression_type" => {
                if let Ok(kind) = value.parse() {
                    self.compression_type = kind;
                }
                spell(self);
            }
            "preallocation" => {
                if let Ok(mode) = value.parse() {
                    self.preallocation = mode;
                }
                self.preallocation_given = true;
                spell(self);
            }
            "backing_file" => self.backing_file = Some(value.to_owned()),
            "backing_fmt" => self.backing_fmt = Some(value.to_owned()),
            "data_file" => self.data_file = Some(value.to_owned()),
            "encryption" if keys == CreateKeys::DriverOnly => {
                parse_bool_onoff(key, value)?;
            }
            _ if keys == CreateKeys::DriverOnly && key.starts_with("encrypt.") => {}
            _ if key == "encryption" || key.starts_with("encrypt.") => {
                return Err(OptionError::EncryptionUnsupported {
                    option: key.to_owned(),
                })
            }
            _ => {
                return Err(OptionError::InvalidParameter {
                    option: key.to_owned(),
                })
            }
        }
        Ok(())
    }

    /// Checks the options the way QEMU 10's qcow2 driver does, in its order. qemu-img prints
    /// the `Formatting` line ([`CreateOptions::formatting_line`]) before any of these errors.
    ///
    /// Order: the values of `compat`, `preallocation`, `compression_type`; extended L2 on v2;
    /// the cluster size; extended L2 with clusters below 16 KiB; backing file with
    /// preallocation; `backing_fmt` without `backing_file`; lazy refcounts on v2; the refcount
    /// width; refcount width on v2; `data_file_raw` without `data_file`; `data_file_raw` with a
    /// backing file; data file on v2; zstd on v2; then the size (if known): 2^63 or more,
    /// beyond the block layer's maximum, or too large for the L1 table.
    ///
    /// # Errors
    /// [`OptionError::BadEnumValue`], [`OptionError::ExtendedL2V2`],
    /// [`OptionError::ClusterSize`], [`OptionError::ExtendedL2ClusterSize`],
    /// [`OptionError::BackingWithPreallocation`], [`OptionError::BackingFmtWithoutFile`],
    /// [`OptionError::LazyRefcountsV2`], [`OptionError::RefcountWidth`],
    /// [`OptionError::RefcountBitsV2`], [`OptionError::DataFileRawWithoutDataFile`],
    /// [`OptionError::BackingWithDataFileRaw`], [`OptionError::DataFileV2`],
    /// [`OptionError::NonZlibV2`], [`OptionError::ImageSizeNegative`],
    /// [`OptionError::ImageSizeExceedsMaximum`], [`OptionError::ImageTooLarge`].
    pub fn validate(&self) -> Result<(), OptionError> {
        if let Some(spelling) = &self.compat_spelling {
            spelling.parse::<Compat>()?;
        }
        if let Some(spelling) = self.spellings.get("preallocation") {
            if spelling.parse::<Preallocation>().is_err() {
                return Err(OptionError::BadEnumValue {
                    option: "preallocation",
                    value: spelling.clone(),
                });
            }
        }
        if let Some(spelling) = self.spellings.get("compression_type") {
            spelling.parse::<CompressionType>()?;
        }
        let v2 = self.compat == Compat::V2;
        if self.extended_l2 && v2 {
            return Err(OptionError::ExtendedL2V2);
        }
        if !valid_cluster_size(self.cluster_size) {
            return Err(OptionError::ClusterSize);
        }
        if self.extended_l2 && self.cluster_size < MIN_EXTENDED_L2_CLUSTER_SIZE {
            return Err(OptionError::ExtendedL2ClusterSize);
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return Err(OptionError::BackingWithPreallocation);
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err(OptionError::BackingFmtWithoutFile);
        }
        if v2 && self.lazy_refcounts {
            return Err(OptionError::LazyRefcountsV2);
        }
        if self.refcount_bits > 64 || !self.refcount_bits.is_power_of_two() {
            return Err(OptionError::RefcountWidth);
        }
        if v2 && self.refcount_bits != DEFAULT_REFCOUNT_BITS {
            return Err(OptionError::RefcountBitsV2);
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(OptionError::DataFileRawWithoutDataFile);
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(OptionError::BackingWithDataFileRaw);
        }
        if self.data_file.is_some() && v2 {
            return Err(OptionError::DataFileV2);
        }
        if self.compression_type != CompressionType::Zlib && v2 {
            return Err(OptionError::NonZlibV2);
        }
        if let Some(size) = self.size {
            check_image_size(size, self.cluster_size, self.extended_l2)?;
        }
        Ok(())
    }

    /// The effective preallocation: QEMU turns `off` into `metadata` with `data_file_raw=on`
    /// (the L1/L2 tables must map the raw data file 1:1).
    pub fn effective_preallocation(&self) -> Preallocation {
        if self.data_file_raw && self.preallocation == Preallocation::Off {
            Preallocation::Metadata
        } else {
            self.preallocation
        }
    }

    /// qemu-img's `Formatting 'FILE', fmt=qcow2 ...` line (without the newline), exactly: keys
    /// in QEMU's option-table order, `cluster_size`, `extended_l2`, `compression_type`, `size`,
    /// `lazy_refcounts` and `refcount_bits` always, the others only when given; sizes and
    /// numbers as signed 64-bit decimals (QEMU's `PRId64`), booleans and strings as spelled,
    /// commas in strings doubled.
    pub fn formatting_line(&self, filename: &str) -> String {
        let mut items: Vec<(&str, String)> = Vec::new();
        items.push(("cluster_size", (self.cluster_size as i64).to_string()));
        items.push((
            "extended_l2",
            self.bool_spelling("extended_l2", self.extended_l2),
        ));
        if self.preallocation_given || self.spellings.contains_key("preallocation") {
            items.push((
                "preallocation",
                self.enum_spelling("preallocation", self.preallocation),
            ));
        }
        items.push((
            "compression_type",
            self.enum_spelling("compression_type", self.compression_type),
        ));
        items.push(("size", self.size.map_or(-1, |s| s as i64).to_string()));
        match &self.compat_spelling {
            Some(spelling) => {
                let shown = match Compat::from_qemu(spelling) {
                    Some(c) if c != self.compat => self.compat.as_str().to_owned(),
                    _ => escape_option_value(spelling),
                };
                items.push(("compat", shown));
            }
            None if self.compat != Compat::V3 => {
                items.push(("compat", self.compat.as_str().to_owned()));
            }
            None => {}
        }
        for (key, value) in [
            ("backing_file", &self.backing_file),
            ("backing_fmt", &self.backing_fmt),
            ("data_file", &self.data_file),
        ] {
            if let Some(value) = value {
                items.push((key, escape_option_value(value)));
            }
        }
        if self.data_file_raw || self.spellings.contains_key("data_file_raw") {
            items.push((
                "data_file_raw",
                self.bool_spelling("data_file_raw", self.data_file_raw),
            ));
        }
        items.push((
            "lazy_refcounts",
            self.bool_spelling("lazy_refcounts", self.lazy_refcounts),
        ));
        let refcount_bits = self
            .spellings
            .get("refcount_bits")
            .and_then(|s| parse_number("refcount_bits", s).ok())
            .filter(|&v| u32::try_from(v).unwrap_or(u32::MAX) == self.refcount_bits)
            .map_or(i64::from(self.refcount_bits), |v| v as i64);
        items.push(("refcount_bits", refcount_bits.to_string()));
        if let Some(nocow) = self.nocow {
            items.push(("nocow", self.bool_spelling("nocow", nocow)));
        }
        let body: Vec<String> = items.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("Formatting '{filename}', fmt=qcow2 {}", body.join(" "))
    }

    /// A boolean as the user spelled it, if that spelling means `value`; else on/off.
    fn bool_spelling(&self, key: &str, value: bool) -> String {
        match self.spellings.get(key) {
            Some(s) if parse_bool_onoff(key, s).ok() == Some(value) => s.clone(),
            _ => on_off(value).to_owned(),
        }
    }

    /// An enum as the user spelled it (escaped), if that spelling is invalid or means `value`;
    /// else the canonical name.
    fn enum_spelling<T>(&self, key: &str, value: T) -> String
    where
        T: FromStr + PartialEq + fmt::Display,
    {
        match self.spellings.get(key) {
            Some(s) => match s.parse::<T>() {
                Ok(parsed) if parsed != value => value.to_string(),
                _ => escape_option_value(s),
            },
            None => value.to_string(),
        }
    }
}

fn on_off(value: bool) -> &'static str {
    if value {
        "on"
    } else {
        "off"
    }
}

/// QEMU's size checks when it resizes the new image to `size` (rounded up to 512 bytes).
fn check_image_size(size: u64, cluster_size: u64, extended_l2: bool) -> Result<(), OptionError> {
    let rounded = u128::from(size).div_ceil(u128::from(SECTOR_SIZE)) * u128::from(SECTOR_SIZE);
    if rounded > i64::MAX as u128 {
        return Err(OptionError::ImageSizeNegative);
    }
    if rounded > u128::from(MAX_IMAGE_LENGTH) {
        return Err(OptionError::ImageSizeExceedsMaximum {
            size: u64::try_from(rounded).unwrap_or(u64::MAX),
        });
    }
    let l2_entry_bytes: u64 = if extended_l2 { 16 } else { 8 };
    let bytes_per_l1_entry = u128::from(cluster_size) * u128::from(cluster_size / l2_entry_bytes);
    if bytes_per_l1_entry == 0 {
        return Err(OptionError::ClusterSize);
    }
    if rounded.div_ceil(bytes_per_l1_entry) > u128::from(MAX_L1_BYTES / 8) {
        return Err(OptionError::ImageTooLarge);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Amend options (cli.md §7)
// ---------------------------------------------------------------------------------------------

/// Options of `qemu-img amend -o` (only explicitly given options change anything).
///
/// Values are kept raw where QEMU checks them against the image ([`AmendOptions::check`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// New virtual size (`size`; 0 means no change, as in QEMU).
    pub size: Option<u64>,
    /// New compatibility level, as given (`0.10`, `v2`, `1.1`, `v3`).
    pub compat: Option<String>,
    /// `backing_file` (must equal the image's: amend cannot change it).
    pub backing_file: Option<String>,
    /// `backing_fmt` (must equal the image's).
    pub backing_fmt: Option<String>,
    /// New data file name (only for images that already have one; empty removes the name).
    pub data_file: Option<String>,
    /// `data_file_raw` (can only be kept on or switched off).
    pub data_file_raw: Option<bool>,
    /// Switch lazy refcounts on or off.
    pub lazy_refcounts: Option<bool>,
    /// New refcount width, as parsed (QEMU truncates it to a C `int`).
    pub refcount_bits: Option<u64>,
}

/// What [`AmendOptions::check`] needs to know about the image being amended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmendImageState {
    /// Current version.
    pub compat: Compat,
    /// Current refcount width.
    pub refcount_bits: u32,
    /// Whether lazy refcounts are in use (compatible bit 0).
    pub lazy_refcounts: bool,
    /// Whether the image has an external data file (incompatible bit 2).
    pub has_data_file: bool,
    /// Whether autoclear bit 1 (data file is raw) is set.
    pub data_file_raw: bool,
    /// The backing file name from the header.
    pub backing_file: Option<String>,
    /// The backing format from the header extension.
    pub backing_fmt: Option<String>,
}

impl AmendOptions {
    /// No options.
    pub fn new() -> Self {
        AmendOptions::default()
    }

    /// Parses a `-o` string (see [`AmendOptions::apply_qemu_str`]).
    ///
    /// # Errors
    /// As [`AmendOptions::apply_qemu_str`].
    pub fn from_qemu_str(s: &str) -> Result<Self, OptionError> {
        let mut opts = AmendOptions::new();
        opts.apply_qemu_str(s)?;
        Ok(opts)
    }

    /// Whether no option was given (qemu-img then says `Must specify options (-o)`).
    pub fn is_empty(&self) -> bool {
        *self == AmendOptions::default()
    }

    /// Applies one `-o` argument, stopping at the first error (on error `self` is unchanged).
    /// Keys: `size`, `compat`, `backing_file`, `backing_fmt`, `data_file`, `data_file_raw`,
    /// `lazy_refcounts`, `refcount_bits`.
    ///
    /// # Errors
    /// [`OptionError::CreateOnlyOption`] for an unknown key when the whole string would be
    /// valid `create` options (`Invalid parameter 'cluster_size'` + `This option is only
    /// supported for image creation`), else [`OptionError::InvalidParameter`];
    /// value errors as for create ([`OptionError::BadSize`], [`OptionError::BadBool`],
    /// [`OptionError::BadNumber`], ...); [`OptionError::EncryptionUnsupported`] for
    /// `encrypt.*`; [`OptionError::InvalidOptionList`].
    pub fn apply_qemu_str(&mut self, s: &str) -> Result<(), OptionError> {
        let pairs = split_option_string(s)?;
        let mut next = self.clone();
        for (key, value) in &pairs {
            if let Err(e) = next.apply_pair(key, value) {
                if let OptionError::InvalidParameter { option } = &e {
                    let mut scratch = CreateOptions::new();
                    let create_ok = pairs
                        .iter()
                        .all(|(k, v)| scratch.apply_pair(k, v, CreateKeys::DriverOnly).is_ok());
                    if create_ok {
                        return Err(OptionError::CreateOnlyOption {
                            option: option.clone(),
                        });
                    }
                }
                return Err(e);
            }
        }
        *self = next;
        Ok(())
    }

    fn apply_pair(&mut self, key: &str, value: &str) -> Result<(), OptionError> {
        match key {
            "size" => self.size = Some(parse_size_option(key, value)?),
            "compat" => self.compat = Some(value.to_owned()),
            "backing_file" => self.backing_file = Some(value.to_owned()),
            "backing_fmt" => self.backing_fmt = Some(value.to_owned()),
            "data_file" => self.data_file = Some(value.to_owned()),
            "data_file_raw" => self.data_file_raw = Some(parse_bool_onoff(key, value)?),
            "lazy_refcounts" => self.lazy_refcounts = Some(parse_bool_onoff(key, value)?),
            "refcount_bits" => self.refcount_bits = Some(parse_number(key, value)?),
            _ if key.starts_with("encrypt.") => {
                return Err(OptionError::EncryptionUnsupported {
                    option: key.to_owned(),
                })
            }
            _ => {
                return Err(OptionError::InvalidParameter {
                    option: key.to_owned(),
                })
            }
        }
        Ok(())
    }

    /// The requested version, if `compat` was given.
    ///
    /// # Errors
    /// [`OptionError::AmendUnknownCompat`]: `Unknown compatibility level X`.
    pub fn target_compat(&self) -> Result<Option<Compat>, OptionError> {
        match &self.compat {
            None => Ok(None),
            Some(value) => {
                Compat::from_qemu(value)
                    .map(Some)
                    .ok_or_else(|| OptionError::AmendUnknownCompat {
                        value: value.clone(),
                    })
            }
        }
    }

    /// The requested refcount width as QEMU sees it (the number truncated to a C `int`).
    fn target_refcount_bits(&self, image: &AmendImageState) -> i64 {
        match self.refcount_bits {
            // C's conversion of an out-of-range unsigned value to int keeps the low 32 bits.
            Some(bits) => i64::from(bits as u32 as i32),
            None => i64::from(image.refcount_bits),
        }
    }

    /// Checks these options against the image, in QEMU's order, before anything is changed:
    /// the `compat` value; `data_file`; `data_file_raw`; the refcount width; a new width on v2;
    /// `backing_file`/`backing_fmt` (must be unchanged); lazy refcounts on v2; and for a
    /// downgrade the refcount width and the data file. (QEMU's further downgrade checks need
    /// the image contents: internal snapshots, incompatible features, compressed clusters.)
    ///
    /// # Errors
    /// [`OptionError::AmendUnknownCompat`], [`OptionError::AmendDataFile`],
    /// [`OptionError::AmendDataFileRaw`], [`OptionError::RefcountWidth`],
    /// [`OptionError::AmendRefcountBitsV2`], [`OptionError::AmendBackingFile`],
    /// [`OptionError::AmendLazyRefcountsV2`], [`OptionError::AmendDowngradeRefcountBits`],
    /// [`OptionError::AmendDowngradeDataFile`].
    pub fn check(&self, image: &AmendImageState) -> Result<(), OptionError> {
        let new_compat = self.target_compat()?.unwrap_or(image.compat);
        if self.data_file.is_some() && !image.has_data_file {
            return Err(OptionError::AmendDataFile);
        }
        if self.data_file_raw == Some(true) && !image.data_file_raw {
            return Err(OptionError::AmendDataFileRaw);
        }
        let refcount_bits = self.target_refcount_bits(image);
        if refcount_bits <= 0
            || refcount_bits > 64
            || !refcount_bits.unsigned_abs().is_power_of_two()
        {
            return Err(OptionError::RefcountWidth);
        }
        if refcount_bits != i64::from(image.refcount_bits)
            && new_compat == Compat::V2
            && refcount_bits != 16
        {
            return Err(OptionError::AmendRefcountBitsV2);
        }
        if (self.backing_file.is_some() || self.backing_fmt.is_some())
            && (self.backing_file != image.backing_file || self.backing_fmt != image.backing_fmt)
        {
            return Err(OptionError::AmendBackingFile);
        }
        if self.lazy_refcounts == Some(true) && !image.lazy_refcounts && new_compat == Compat::V2 {
            return Err(OptionError::AmendLazyRefcountsV2);
        }
        if new_compat == Compat::V2 && image.compat == Compat::V3 {
            if refcount_bits != 16 {
                return Err(OptionError::AmendDowngradeRefcountBits);
            }
            if image.has_data_file {
                return Err(OptionError::AmendDowngradeDataFile);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    const TIB: u64 = 1024 * GIB;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn open_err(s: &str) -> String {
        OpenOptions::from_qemu_str(s).unwrap_err().to_string()
    }

    fn create_err(s: &str) -> String {
        let mut c = CreateOptions::new().size(MIB);
        c.apply_qemu_str(s).unwrap();
        c.validate().unwrap_err().to_string()
    }

    // ----- sizes -----

    #[test]
    fn parse_size_cli_examples() {
        // cli.md §0 and §2.2 (all verified with qemu-img 10.0.2).
        for (input, want) in [
            ("1536", 1536),
            ("1536b", 1536),
            ("1536B", 1536),
            ("512k", 524_288),
            ("512K", 524_288),
            ("1m", MIB),
            ("1g", GIB),
            ("2T", 2 * TIB),
            ("1.5G", 1_610_612_736),
            ("1E", 1 << 60),
            ("1e", 1 << 60),
            ("1p", 1 << 50),
        ] {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn parse_size_edge_cases_match_qemu() {
        // Each verified against `qemu-img create -o size=...` 10.0.2.
        for (input, want) in [
            ("0x10", 16),
            ("0X1f", 31),
            ("0x10b", 267),
            ("1.k", 1024),
            (".5k", 512),
            ("+1.5k", 1536),
            (" 1k", 1024),
            ("1.0", 1),
            ("0.5e", 576_460_752_303_423_488),
            ("15.9999999999999999E", u64::MAX - 127),
            ("15.99999E", (-11_529_215_046_016_i64) as u64),
            ("9223372036854775807", i64::MAX as u64),
            ("1.0000000000000000000000000000000000000000000001k", 1024),
            ("0.00000000000000000001k", 0),
            ("0.99999999999999999999k", 1024),
        ] {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
        for input in [
            "",
            "10X",
            "1.5",
            "1.5b",
            "-1k",
            "-.5k",
            " 1k ",
            "1k ",
            "0x",
            "0x10k",
            ".k",
            ".",
            "1..5k",
            "1 k",
            "1e3",
            "inf.5k",
            "+-1",
            "99999999999999999999k",
            "1.0000000000000000000000000000000000000000000001",
            "abc",
            "1kb",
            "0x1.8",
            "1,5k",
        ] {
            assert_eq!(
                parse_size(input),
                Err(SizeError::Invalid {
                    input: input.to_owned()
                }),
                "{input}"
            );
        }
        for input in [
            "-1024",
            "-.5",
            "-0",
            "-.0",
            "99999999999999999999",
            "16E",
            "99999999E",
        ] {
            assert_eq!(
                parse_size(input),
                Err(SizeError::OutOfRange {
                    input: input.to_owned()
                }),
                "{input}"
            );
        }
    }

    #[test]
    fn size_error_messages() {
        let bad = parse_size("10X").unwrap_err();
        assert_eq!(bad.input(), "10X");
        assert_eq!(
            bad.qemu_img_message("image size"),
            "Invalid image size specified: '10X'."
        );
        assert_eq!(
            bad.qemu_io_message(),
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 10X"
        );
        assert_eq!(
            bad.clone().into_option_error("size").to_string(),
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        );
        let big = parse_image_size("8E").unwrap_err();
        assert_eq!(
            big.qemu_img_message("image size"),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            parse_size("99999E").unwrap_err().qemu_io_message(),
            "Parsing error: argument too large -- 99999E"
        );
        assert_eq!(
            parse_size("99999999E")
                .unwrap_err()
                .into_option_error("size")
                .to_string(),
            "Value '99999999E' is out of range for parameter 'size'"
        );
        assert_eq!(parse_image_size("7E"), Ok(7 << 60));
    }

    #[test]
    fn parse_size_agrees_with_plain_multiplication() {
        for n in [
            0_u64,
            1,
            7,
            1023,
            4096,
            123_456_789,
            u64::MAX / 1024,
            u64::MAX,
        ] {
            for (suffix, shift) in [
                ("", 0),
                ("b", 0),
                ("k", 10),
                ("M", 20),
                ("g", 30),
                ("T", 40),
                ("p", 50),
                ("E", 60),
            ] {
                let s = format!("{n}{suffix}");
                let want = n.checked_mul(1 << shift);
                match want {
                    Some(v) => assert_eq!(parse_size(&s), Ok(v), "{s}"),
                    None => assert!(
                        matches!(parse_size(&s), Err(SizeError::OutOfRange { .. })),
                        "{s}"
                    ),
                }
            }
        }
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(parse_number("refcount_bits", "16"), Ok(16));
        assert_eq!(parse_number("refcount_bits", "0x10"), Ok(16));
        assert_eq!(parse_number("refcount_bits", "010"), Ok(8));
        assert_eq!(parse_number("refcount_bits", " 16"), Ok(16));
        assert_eq!(parse_number("x", "-1"), Ok(u64::MAX));
        for bad in ["abc", "1k", "", "08", "0x", "16 "] {
            assert_eq!(
                parse_number("refcount_bits", bad).unwrap_err().to_string(),
                "Parameter 'refcount_bits' expects a number",
                "{bad}"
            );
        }
        assert_eq!(
            parse_number("refcount_bits", "18446744073709551616")
                .unwrap_err()
                .to_string(),
            "Value '18446744073709551616' is too large for parameter 'refcount_bits'"
        );
        for on in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool_onoff("k", on), Ok(true));
        }
        for off in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool_onoff("k", off), Ok(false));
        }
        for bad in ["ON", "On", "1", "0", "TRUE", "", " on", "maybe", "Y"] {
            assert_eq!(
                parse_bool_onoff("lazy_refcounts", bad)
                    .unwrap_err()
                    .to_string(),
                "Parameter 'lazy_refcounts' expects 'on' or 'off'"
            );
        }
    }

    // ----- option lists -----

    #[test]
    fn split_escapes_and_flags() {
        assert_eq!(
            split_option_string("data_file=a,,b.data,size=1M").unwrap(),
            pairs(&[("data_file", "a,b.data"), ("size", "1M")])
        );
        assert_eq!(
            split_option_string("a=x,,,b=1").unwrap(),
            pairs(&[("a", "x,"), ("b", "1")])
        );
        assert_eq!(
            split_option_string("a=,,,,").unwrap(),
            pairs(&[("a", ",,")])
        );
        assert_eq!(
            split_option_string("lazy_refcounts,nocow,no").unwrap(),
            pairs(&[("lazy_refcounts", "on"), ("cow", "off"), ("", "off")])
        );
        assert_eq!(
            split_option_string("a=b=c").unwrap(),
            pairs(&[("a", "b=c")])
        );
        assert_eq!(split_option_string("=x").unwrap(), pairs(&[("", "x")]));
        assert_eq!(split_option_string("k=").unwrap(), pairs(&[("k", "")]));
        assert_eq!(split_option_string("").unwrap(), pairs(&[]));
        assert_eq!(
            split_option_string("a,,b=c").unwrap(),
            pairs(&[("a", "on"), ("", "on"), ("b", "c")])
        );
        for bad in [",", ",a=b", "a=b,", "a=b,,,"] {
            assert_eq!(
                split_option_string(bad).unwrap_err().to_string(),
                format!("Invalid option list: {bad}")
            );
        }
        assert!(split_option_string("a=b,,").is_ok());
        assert!(check_option_list("").is_err());
        assert!(check_option_list("a=b").is_ok());
        assert!(option_string_wants_help("help"));
        assert!(option_string_wants_help("size=1M,?"));
        assert!(!option_string_wants_help("help=on"));
        assert_eq!(escape_option_value("a,b,,c"), "a,,b,,,,c");
    }

    // ----- overlap checks -----

    #[test]
    fn overlap_mode_masks_are_qemus() {
        use MetadataKind as K;
        let set = |kinds: &[K]| kinds.iter().fold(0, |m, k| m | k.bit());
        let constant = set(&[
            K::MainHeader,
            K::ActiveL1,
            K::RefcountTable,
            K::SnapshotTable,
            K::BitmapDirectory,
        ]);
        let cached = constant | set(&[K::ActiveL2, K::RefcountBlock, K::InactiveL1]);
        let all = cached | K::InactiveL2.bit();
        assert_eq!(OverlapCheckMode::None.mask(), 0);
        assert_eq!(OverlapCheckMode::Constant.mask(), constant);
        assert_eq!(OverlapCheckMode::Cached.mask(), cached);
        assert_eq!(OverlapCheckMode::All.mask(), all);
        assert_eq!((constant, cached, all), (0x12b, 0x17f, 0x1ff));
        assert_eq!(OverlapCheckMode::default(), OverlapCheckMode::Cached);
        assert_eq!(OverlapChecks::default().mask(), cached);
        let cached_checks = OverlapChecks::from_mode(OverlapCheckMode::Cached);
        assert!(!cached_checks.enabled(K::InactiveL2));
        assert_eq!(cached_checks.kinds().count(), 8);
        assert!(OverlapChecks::from_mode(OverlapCheckMode::All).enabled(K::InactiveL2));
        assert_eq!(OverlapChecks::from_mask(0xffff).mask(), 0x1ff);
        let c = OverlapChecks::from_mode(OverlapCheckMode::None).with(K::ActiveL2, true);
        assert_eq!(c.mask(), K::ActiveL2.bit());
        assert_eq!(c.with(K::ActiveL2, false).mask(), 0);
        for mode in OverlapCheckMode::MODES {
            assert_eq!(mode.as_str().parse::<OverlapCheckMode>(), Ok(mode));
        }
    }

    #[test]
    fn overlap_templates_and_overrides() {
        use MetadataKind as K;
        let mask = |s: &str| OverlapChecks::from_qemu_str(s).unwrap().mask();
        assert_eq!(mask(""), 0x17f);
        assert_eq!(mask("overlap-check=none"), 0);
        assert_eq!(mask("overlap-check=all"), 0x1ff);
        assert_eq!(mask("overlap-check.template=constant"), 0x12b);
        assert_eq!(mask("overlap-check=all,overlap-check.template=all"), 0x1ff);
        assert_eq!(
            mask("overlap-check.template=all,overlap-check.inactive-l2=off"),
            0x17f
        );
        assert_eq!(
            mask("overlap-check.active-l2=on,overlap-check=none"),
            K::ActiveL2.bit()
        );
        assert_eq!(mask("overlap-check.main-header=off"), 0x17e);
        assert_eq!(mask("overlap-check.bitmap-directory=off"), 0x07f);
        assert_eq!(
            mask("overlap-check=constant,overlap-check.active-l1=off,overlap-check.inactive-l2=on"),
            0x12b & !K::ActiveL1.bit() | K::InactiveL2.bit()
        );
        assert_eq!(
            mask("overlap-check.main-header=off,overlap-check.main-header=on"),
            0x17f
        );
        // Every flag name works.
        for kind in MetadataKind::ALL {
            let s = format!("overlap-check=none,overlap-check.{}=on", kind.option_name());
            assert_eq!(mask(&s), kind.bit());
        }
    }

    #[test]
    fn overlap_errors() {
        let err = |s: &str| OverlapChecks::from_qemu_str(s).unwrap_err().to_string();
        assert_eq!(
            err("overlap-check=some"),
            "Unsupported value 'some' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
        );
        assert_eq!(
            err("overlap-check.template=some"),
            "Unsupported value 'some' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
        );
        assert_eq!(
            err("overlap-check=all,overlap-check.template=none"),
            "Conflicting values for qcow2 options 'overlap-check' ('all') and 'overlap-check.template' ('none')"
        );
        // Conflict is reported before an unknown mode, and values are shown as given.
        assert_eq!(
            err("overlap-check.template=foo,overlap-check=bar"),
            "Conflicting values for qcow2 options 'overlap-check' ('bar') and 'overlap-check.template' ('foo')"
        );
        assert_eq!(
            err("overlap-check=ALL"),
            "Unsupported value 'ALL' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
        );
        assert_eq!(
            err("overlap-check.main-header=maybe"),
            "Parameter 'overlap-check.main-header' expects 'on' or 'off'"
        );
        let unknown = OverlapChecks::from_qemu_str("overlap-check.bogus=on").unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "Block format 'qcow2' does not support the option 'overlap-check.bogus'"
        );
        assert_eq!(unknown.option(), Some("overlap-check.bogus"));
        assert_eq!(
            unknown.hint().unwrap(),
            "Valid overlap-check flags: template, main-header, active-l1, active-l2, refcount-table, refcount-block, snapshot-table, inactive-l1, inactive-l2, bitmap-directory"
        );
        // A bare flag means on, `no` + flag means off; a bare mode means `on` (invalid).
        assert_eq!(
            OverlapChecks::from_qemu_str("overlap-check=none,overlap-check.main-header")
                .unwrap()
                .mask(),
            1
        );
        assert_eq!(
            OverlapChecks::from_qemu_str("nooverlap-check.main-header")
                .unwrap()
                .mask(),
            0x17e
        );
        assert_eq!(
            err("overlap-check"),
            "Unsupported value 'on' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
        );
        assert_eq!(
            err("l2-cache-size=1M"),
            "Block format 'qcow2' does not support the option 'l2-cache-size'"
        );
    }

    // ----- runtime options -----

    #[test]
    fn open_options_defaults_and_builders() {
        let o = OpenOptions::new();
        assert!(!o.get_read_only());
        assert_eq!(o.get_overlap_check(), OverlapChecks::default());
        assert_eq!(o.get_lazy_refcounts(), None);
        assert!(!o.get_pass_discard_request());
        assert!(o.get_pass_discard_snapshot());
        assert!(!o.get_pass_discard_other());
        assert!(!o.get_discard_no_unref());
        assert_eq!(o.get_backing_policy(), &BackingPolicy::Follow);
        assert_eq!(o.get_rerror(), ErrorPolicy::Report);
        assert_eq!(o.get_werror(), ErrorPolicy::Report);
        assert_eq!(o, OpenOptions::default());
        let o = OpenOptions::new()
            .read_only(true)
            .l2_cache_size(MIB)
            .l2_cache_entry_size(4096)
            .refcount_cache_size(256 * KIB)
            .cache_size(2 * MIB)
            .cache_clean_interval(30)
            .overlap_check(OverlapChecks::from_mode(OverlapCheckMode::All))
            .lazy_refcounts(true)
            .pass_discard_request(true)
            .pass_discard_snapshot(false)
            .pass_discard_other(true)
            .discard_no_unref(true)
            .with_filename("disk.qcow2".into())
            .data_file("d.raw".into())
            .backing_policy(BackingPolicy::Refuse)
            .rerror(ErrorPolicy::Stop)
            .werror(ErrorPolicy::Enospc)
            .node_name("drive0".to_owned());
        assert!(o.get_read_only());
        assert_eq!(o.get_l2_cache_size(), Some(MIB));
        assert_eq!(o.get_l2_cache_entry_size(), Some(4096));
        assert_eq!(o.get_refcount_cache_size(), Some(256 * KIB));
        assert_eq!(o.get_cache_size(), Some(2 * MIB));
        assert_eq!(o.get_cache_clean_interval(), Some(30));
        assert_eq!(o.get_overlap_check().mask(), 0x1ff);
        assert_eq!(o.get_lazy_refcounts(), Some(true));
        assert!(o.get_pass_discard_request());
        assert!(!o.get_pass_discard_snapshot());
        assert!(o.get_pass_discard_other());
        assert!(o.get_discard_no_unref());
        assert_eq!(o.filename(), Some(Path::new("disk.qcow2")));
        assert_eq!(o.get_data_file(), Some(Path::new("d.raw")));
        assert_eq!(o.get_backing_policy(), &BackingPolicy::Refuse);
        assert_eq!(o.get_rerror(), ErrorPolicy::Stop);
        assert_eq!(o.get_werror(), ErrorPolicy::Enospc);
        assert_eq!(o.get_node_name(), Some("drive0"));
    }

    #[test]
    fn open_options_from_image_opts() {
        let o = OpenOptions::from_qemu_str(
            "driver=qcow2,file.filename=disk.qcow2,overlap-check=all,l2-cache-size=1M,lazy-refcounts=on",
        )
        .unwrap();
        assert_eq!(o.filename(), Some(Path::new("disk.qcow2")));
        assert_eq!(o.get_overlap_check().mask(), 0x1ff);
        assert_eq!(o.get_l2_cache_size(), Some(MIB));
        assert_eq!(o.get_lazy_refcounts(), Some(true));

        let o = OpenOptions::from_qemu_str(
            "file=a,,b.qcow2,read-only=on,node-name=drive0,rerror=stop,werror=enospc,\
             l2-cache-entry-size=4k,refcount-cache-size=1M,cache-size=4M,cache-clean-interval=0x10,\
             pass-discard-request=yes,pass-discard-snapshot=off,pass-discard-other=true,\
             discard-no-unref=on,data-file=d.raw,overlap-check.template=constant,\
             overlap-check.inactive-l2=on",
        )
        .unwrap();
        assert_eq!(o.filename(), Some(Path::new("a,b.qcow2")));
        assert!(o.get_read_only());
        assert_eq!(o.get_node_name(), Some("drive0"));
        assert_eq!(o.get_rerror(), ErrorPolicy::Stop);
        assert_eq!(o.get_werror(), ErrorPolicy::Enospc);
        assert_eq!(o.get_l2_cache_entry_size(), Some(4096));
        assert_eq!(o.get_refcount_cache_size(), Some(MIB));
        assert_eq!(o.get_cache_size(), Some(4 * MIB));
        assert_eq!(o.get_cache_clean_interval(), Some(16));
        assert!(o.get_pass_discard_request());
        assert!(!o.get_pass_discard_snapshot());
        assert!(o.get_pass_discard_other());
        assert!(o.get_discard_no_unref());
        assert_eq!(o.get_data_file(), Some(Path::new("d.raw")));
        assert_eq!(
            o.get_overlap_check().mask(),
            0x12b | MetadataKind::InactiveL2.bit()
        );

        // Later lists add to earlier ones; overlap flags keep applying over the current set.
        let mut o =
            OpenOptions::new().overlap_check(OverlapChecks::from_mode(OverlapCheckMode::None));
        o.apply_qemu_str("overlap-check.active-l1=on").unwrap();
        assert_eq!(o.get_overlap_check().mask(), MetadataKind::ActiveL1.bit());
        o.apply_qemu_str("file.driver=file,file.filename=x.qcow2")
            .unwrap();
        assert_eq!(o.filename(), Some(Path::new("x.qcow2")));
        assert_eq!(o.get_overlap_check().mask(), MetadataKind::ActiveL1.bit());
    }

    #[test]
    fn open_option_errors_match_qemu_io() {
        // Texts verified with `qemu-io --image-opts ...` 10.0.2 (after "can't open: ").
        assert_eq!(
            open_err("bogus=1"),
            "Block format 'qcow2' does not support the option 'bogus'"
        );
        assert_eq!(open_err("driver=raw2"), "Unknown driver 'raw2'");
        assert_eq!(open_err("file.driver=foo"), "Unknown driver 'foo'");
        assert_eq!(
            open_err("overlap-check=some"),
            "Unsupported value 'some' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
        );
        assert_eq!(
            open_err("lazy-refcounts=maybe"),
            "Parameter 'lazy-refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            open_err("read-only=maybe"),
            "Parameter 'read-only' expects 'on' or 'off'"
        );
        assert_eq!(
            open_err("l2-cache-size=3x"),
            "Parameter 'l2-cache-size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        );
        assert_eq!(
            open_err("l2-cache-size=99999E"),
            "Value '99999E' is out of range for parameter 'l2-cache-size'"
        );
        assert_eq!(
            open_err("cache-clean-interval=abc"),
            "Parameter 'cache-clean-interval' expects a number"
        );
        assert_eq!(open_err("node-name=1abc"), "Invalid node-name: '1abc'");
        assert_eq!(open_err("node-name="), "Invalid node-name: ''");
        assert_eq!(
            open_err(&format!("node-name={}", "a".repeat(32))),
            "Node name too long"
        );
        assert!(OpenOptions::from_qemu_str(&format!("node-name={}", "a".repeat(31))).is_ok());
        assert_eq!(
            open_err("file=a.qcow2,file.filename=b.qcow2"),
            "Cannot reference an existing block device with additional options or a new filename"
        );
        assert_eq!(
            open_err("rerror=enospc"),
            "'enospc' invalid read error action"
        );
        assert_eq!(
            open_err("werror=bogus"),
            "'bogus' invalid write error action"
        );
        assert_eq!(
            open_err("overlap-check.bogus=on"),
            "Block format 'qcow2' does not support the option 'overlap-check.bogus'"
        );
        assert!(matches!(
            OpenOptions::from_qemu_str("encrypt.key-secret=sec0"),
            Err(OptionError::EncryptionUnsupported { .. })
        ));
        // QEMU's order (verified): driver first, then bad values, then overlap resolution,
        // then unknown keys.
        assert_eq!(open_err("bogus=1,driver=raw2"), "Unknown driver 'raw2'");
        assert_eq!(
            open_err("bogus=1,lazy-refcounts=maybe"),
            "Parameter 'lazy-refcounts' expects 'on' or 'off'"
        );
        assert!(open_err("l2-cache-size=1M,bogus=1,overlap-check=some")
            .starts_with("Unsupported value 'some'"));
        assert!(open_err("l2-cache-size=abc,overlap-check=some")
            .starts_with("Parameter 'l2-cache-size'"));
        // On error nothing changes.
        let mut o = OpenOptions::new();
        assert!(o.apply_qemu_str("read-only=on,bogus=1").is_err());
        assert_eq!(o, OpenOptions::new());
    }

    #[test]
    fn open_version_checks() {
        let o = OpenOptions::new().lazy_refcounts(true);
        assert_eq!(
            o.check_image_version(2).unwrap_err().to_string(),
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
        );
        assert!(o.check_image_version(3).is_ok());
        let o = OpenOptions::new().discard_no_unref(true);
        assert_eq!(
            o.check_image_version(2).unwrap_err().to_string(),
            "discard-no-unref is only supported since qcow2 version 3"
        );
        assert!(OpenOptions::new()
            .lazy_refcounts(false)
            .check_image_version(2)
            .is_ok());
    }

    #[test]
    fn error_policies() {
        assert_eq!(ErrorPolicy::parse("report", true), Ok(ErrorPolicy::Report));
        assert_eq!(ErrorPolicy::parse("ignore", true), Ok(ErrorPolicy::Ignore));
        assert_eq!(ErrorPolicy::parse("stop", false), Ok(ErrorPolicy::Stop));
        assert_eq!(ErrorPolicy::parse("enospc", false), Ok(ErrorPolicy::Enospc));
        assert_eq!(
            ErrorPolicy::parse("enospc", true).unwrap_err().to_string(),
            "'enospc' invalid read error action"
        );
        assert_eq!(ErrorPolicy::default(), ErrorPolicy::Report);
        for nospace in [false, true] {
            assert_eq!(ErrorPolicy::Report.action_for(nospace), ErrorAction::Report);
            assert_eq!(ErrorPolicy::Ignore.action_for(nospace), ErrorAction::Ignore);
            assert_eq!(ErrorPolicy::Stop.action_for(nospace), ErrorAction::Stop);
        }
        assert_eq!(ErrorPolicy::Enospc.action_for(true), ErrorAction::Stop);
        assert_eq!(ErrorPolicy::Enospc.action_for(false), ErrorAction::Report);
        assert_eq!(ErrorAction::Stop.to_string(), "stop");
        assert_eq!(ErrorPolicy::Enospc.to_string(), "enospc");
    }

    #[cfg(unix)]
    #[test]
    fn backing_policy_permits() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let allowed = root.join("allowed");
        let other = root.join("other");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(allowed.join("base.qcow2"), b"").unwrap();
        std::fs::write(other.join("secret.qcow2"), b"").unwrap();
        std::fs::write(root.join("single.qcow2"), b"").unwrap();
        std::os::unix::fs::symlink(other.join("secret.qcow2"), allowed.join("link.qcow2")).unwrap();

        assert!(BackingPolicy::Follow.permits(&other.join("secret.qcow2")));
        assert!(!BackingPolicy::Refuse.permits(&allowed.join("base.qcow2")));

        let policy = BackingPolicy::AllowList(vec![allowed.clone(), root.join("single.qcow2")]);
        assert!(policy.permits(&allowed.join("base.qcow2")));
        assert!(policy.permits(&allowed.join("sub/../base.qcow2")));
        assert!(policy.permits(&allowed.join("sub/not-yet.qcow2")));
        assert!(policy.permits(&root.join("single.qcow2")));
        assert!(policy.permits(&root.join("other/../single.qcow2")));
        assert!(!policy.permits(&other.join("secret.qcow2")));
        // A symlink inside the allowed directory pointing outside is refused.
        assert!(!policy.permits(&allowed.join("link.qcow2")));
        // `..` out of the allowed directory, existing or not, is refused.
        assert!(!policy.permits(&allowed.join("../other/secret.qcow2")));
        assert!(!policy.permits(&allowed.join("nope/../../other/x.qcow2")));
        // A file entry does not allow its "children" or siblings.
        assert!(!policy.permits(&root.join("single.qcow2/x")));
        assert!(!policy.permits(&root.join("single.qcow2x")));
        // A directory entry does not allow a sibling with the same prefix.
        std::fs::write(root.join("allowed2"), b"").unwrap();
        assert!(!policy.permits(&root.join("allowed2")));
    }

    // ----- cache sizing -----

    #[test]
    fn cache_config_table() {
        let k64 = 64 * KIB;
        // (options, virtual size, cluster size, L2 entry bytes) ->
        // (L2 bytes, slice bytes, slices, refcount bytes, refcount blocks)
        type Expected = (u64, u64, usize, u64, usize);
        #[rustfmt::skip]
        let cases: [(&str, u64, u64, u64, Expected); 21] = [
            // 1 GiB, defaults: L2 covers the disk (128 KiB) -> 2 slices of a cluster.
            ("", GIB, k64, 8, (128 * KIB, k64, 2, 256 * KIB, 4)),
            // 1 TiB: needs 128 MiB > 32 MiB default -> 32 MiB of 4 KiB slices.
            ("", TIB, k64, 8, (32 * MIB, 4096, 8192, 256 * KIB, 4)),
            // 256 GiB is exactly covered by 32 MiB.
            ("", 256 * GIB, k64, 8, (32 * MIB, k64, 512, 256 * KIB, 4)),
            // Extended L2: twice the bytes.
            ("", GIB, k64, 16, (256 * KIB, k64, 4, 256 * KIB, 4)),
            // Tiny image: max_l2 is one cluster, minimum of 2 slices.
            ("", MIB, k64, 8, (128 * KIB, k64, 2, 256 * KIB, 4)),
            // Empty image.
            ("", 0, k64, 8, (128 * KIB, k64, 2, 256 * KIB, 4)),
            // 4 KiB clusters, 1 GiB: 262144 entries * 8 = 2 MiB.
            ("", GIB, 4096, 8, (2 * MIB, 4096, 512, 16 * KIB, 4)),
            // 512-byte clusters: slices are at most a cluster.
            ("", TIB, 512, 8, (32 * MIB, 512, 65536, 2048, 4)),
            // l2-cache-size smaller than needed -> 4 KiB slices.
            ("l2-cache-size=1M", TIB, k64, 8, (MIB, 4096, 256, 256 * KIB, 4)),
            // l2-cache-size larger than needed is capped at what the image needs.
            ("l2-cache-size=1G", GIB, k64, 8, (128 * KIB, k64, 2, 256 * KIB, 4)),
            ("l2-cache-size=0", GIB, k64, 8, (8 * KIB, 4096, 2, 256 * KIB, 4)),
            // Explicit entry size is kept even when the cache is small.
            ("l2-cache-entry-size=512", TIB, k64, 8, (32 * MIB, 512, 65536, 256 * KIB, 4)),
            ("l2-cache-entry-size=16k", GIB, k64, 8, (128 * KIB, 16 * KIB, 8, 256 * KIB, 4)),
            // cache-size alone, enough for both: L2 gets what it needs, refcounts the rest.
            ("cache-size=1M", GIB, k64, 8, (128 * KIB, k64, 2, 896 * KIB, 14)),
            // cache-size alone, too small: refcounts get their minimum first.
            ("cache-size=256k", GIB, k64, 8, (8 * KIB, 4096, 2, 256 * KIB, 4)),
            ("cache-size=320k", GIB, k64, 8, (64 * KIB, 4096, 16, 256 * KIB, 4)),
            // 100k: refcount budget 100k (< 4 clusters) -> the minimum of 4 blocks still applies.
            ("cache-size=100k", MIB, k64, 8, (8 * KIB, 4096, 2, 256 * KIB, 4)),
            // cache-size + l2-cache-size: refcount = rest.
            ("cache-size=1M,l2-cache-size=512k", GIB, k64, 8, (128 * KIB, k64, 2, 896 * KIB, 14)),
            // cache-size + refcount-cache-size: L2 = rest (not capped).
            ("cache-size=1M,refcount-cache-size=256k", TIB, k64, 8, (768 * KIB, 4096, 192, 256 * KIB, 4)),
            ("cache-size=1M,refcount-cache-size=256k", GIB, k64, 8, (768 * KIB, k64, 12, 256 * KIB, 4)),
            // refcount-cache-size alone.
            ("refcount-cache-size=1M", GIB, k64, 8, (128 * KIB, k64, 2, MIB, 16)),
        ];
        for (opts, size, cluster, l2e, (l2_bytes, slice, slices, rc_bytes, blocks)) in cases {
            let o = OpenOptions::from_qemu_str(opts).unwrap();
            let got = cache_config(&o, size, cluster, l2e).unwrap();
            let want = CacheConfig {
                l2_cache_bytes: l2_bytes,
                l2_slice_bytes: slice,
                l2_slices: slices,
                refcount_cache_bytes: rc_bytes,
                refcount_blocks: blocks,
                clean_interval_secs: DEFAULT_CACHE_CLEAN_INTERVAL,
            };
            assert_eq!(got, want, "{opts} size={size} cluster={cluster}");
        }
    }

    #[test]
    fn cache_config_errors() {
        let err = |s: &str, size: u64| {
            cache_config(&OpenOptions::from_qemu_str(s).unwrap(), size, 65536, 8)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(
                "cache-size=1M,l2-cache-size=512k,refcount-cache-size=256k",
                GIB
            ),
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
        );
        assert_eq!(
            err("cache-size=1M,l2-cache-size=2M", GIB),
            "l2-cache-size may not exceed cache-size"
        );
        // The setting is compared, not the capped value.
        assert_eq!(
            err("cache-size=1M,l2-cache-size=2M", MIB),
            "l2-cache-size may not exceed cache-size"
        );
        assert_eq!(
            err("cache-size=1M,refcount-cache-size=2M", GIB),
            "refcount-cache-size may not exceed cache-size"
        );
        for entry in ["3000", "256", "128k", "0"] {
            assert_eq!(
                err(&format!("l2-cache-entry-size={entry}"), GIB),
                "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"
            );
        }
        assert_eq!(
            cache_config(&OpenOptions::new().l2_cache_entry_size(8192), GIB, 4096, 8)
                .unwrap_err()
                .to_string(),
            "L2 cache entry size must be a power of two between 512 and the cluster size (4096)"
        );
        if cfg!(target_os = "linux") {
            assert_eq!(
                err("cache-clean-interval=-1", GIB),
                "Cache clean interval too big"
            );
            assert_eq!(
                err("cache-clean-interval=4294967296", GIB),
                "Cache clean interval too big"
            );
            let max = cache_config(
                &OpenOptions::new().cache_clean_interval(u64::from(u32::MAX)),
                GIB,
                65536,
                8,
            )
            .unwrap();
            assert_eq!(max.clean_interval_secs, u64::from(u32::MAX));
            let off =
                cache_config(&OpenOptions::new().cache_clean_interval(0), GIB, 65536, 8).unwrap();
            assert_eq!(off.clean_interval_secs, 0);
        }
        // Absurd sizes: counts above INT_MAX are errors, never allocations.
        assert_eq!(err("l2-cache-size=15E", 1 << 62), "L2 cache size too big");
        assert_eq!(
            err("refcount-cache-size=1P", GIB),
            "Refcount cache size too big"
        );
        let huge = cache_config(
            &OpenOptions::new().l2_cache_size(u64::MAX),
            u64::MAX,
            65536,
            16,
        );
        assert_eq!(huge, Err(OptionError::L2CacheTooBig));
        // 64 PiB needs 8 TiB of L2 tables: 2^27 slices of 64 KiB is still fine (allocated lazily).
        let big = cache_config(
            &OpenOptions::new().l2_cache_size(8 * TIB),
            64 * TIB * 1024,
            65536,
            8,
        )
        .unwrap();
        assert_eq!(
            (big.l2_slices, big.l2_slice_bytes, big.l2_cache_bytes),
            (1 << 27, 65536, 8 * TIB)
        );
        // Invalid geometry is an error, not a panic.
        assert_eq!(
            cache_config(&OpenOptions::new(), GIB, 0, 8),
            Err(OptionError::ClusterSize)
        );
        assert_eq!(
            cache_config(&OpenOptions::new(), GIB, 3000, 8),
            Err(OptionError::ClusterSize)
        );
        // Overflowing intermediate products saturate.
        let odd = cache_config(&OpenOptions::new(), u64::MAX, 512, u64::MAX).unwrap();
        assert_eq!((odd.l2_slices, odd.l2_slice_bytes), (65536, 512));
    }

    // ----- create -----

    #[test]
    fn create_apply_and_defaults() {
        let c = CreateOptions::new();
        assert_eq!(c, CreateOptions::default());
        assert_eq!(c.compat, Compat::V3);
        assert_eq!(c.cluster_size, 65536);
        assert_eq!(c.refcount_bits, 16);
        assert_eq!(c.compression_type, CompressionType::Zlib);
        assert_eq!(c.preallocation, Preallocation::Off);
        assert!(c.validate().is_ok());
        let c = CreateOptions::from_qemu_str(
            "compat=0.10,cluster_size=4k,refcount_bits=16,lazy_refcounts=off,extended_l2=off,\
             compression_type=zlib,preallocation=metadata,backing_file=b,,c,backing_fmt=qcow2,\
             data_file=d,data_file_raw=off,nocow=on,size=2M",
        )
        .unwrap();
        assert_eq!(c.compat, Compat::V2);
        assert_eq!(c.compat_spelling.as_deref(), Some("0.10"));
        assert_eq!(c.cluster_size, 4096);
        assert_eq!(c.preallocation, Preallocation::Metadata);
        assert!(c.preallocation_given);
        assert_eq!(c.backing_file.as_deref(), Some("b,c"));
        assert_eq!(c.backing_fmt.as_deref(), Some("qcow2"));
        assert_eq!(c.data_file.as_deref(), Some("d"));
        assert_eq!(c.nocow, Some(true));
        assert_eq!(c.size, Some(2 * MIB));
        assert!(c.size_in_options);
        // Later values win; -o may be applied repeatedly.
        let mut c = CreateOptions::from_qemu_str("cluster_size=64k,cluster_size=4k").unwrap();
        assert_eq!(c.cluster_size, 4096);
        c.apply_qemu_str("compat=v2").unwrap();
        c.apply_qemu_str("compat=v3").unwrap();
        assert_eq!(c.compat, Compat::V3);
        // Refcount widths beyond u32 still fail validation.
        let c = CreateOptions::from_qemu_str("refcount_bits=4294967312").unwrap();
        assert_eq!(c.refcount_bits, u32::MAX);
        assert!(matches!(c.validate(), Err(OptionError::RefcountWidth)));
        assert_eq!(
            CreateOptions::from_qemu_str("refcount_bits=0x20")
                .unwrap()
                .refcount_bits,
            32
        );
        // Effective preallocation with data_file_raw.
        let c = CreateOptions::from_qemu_str("data_file=d,data_file_raw=on").unwrap();
        assert_eq!(c.effective_preallocation(), Preallocation::Metadata);
        assert_eq!(
            CreateOptions::new().effective_preallocation(),
            Preallocation::Off
        );
    }

    #[test]
    fn create_parse_errors() {
        let err = |s: &str| CreateOptions::from_qemu_str(s).unwrap_err().to_string();
        assert_eq!(err("bogus=1"), "Invalid parameter 'bogus'");
        assert_eq!(err("=x"), "Invalid parameter ''");
        assert_eq!(err("a=b=c"), "Invalid parameter 'a'");
        assert_eq!(err("nocow"), "Invalid parameter 'cow'");
        assert_eq!(
            err("lazy_refcounts=maybe"),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            err("nocow=maybe"),
            "Parameter 'nocow' expects 'on' or 'off'"
        );
        assert_eq!(
            err("cluster_size=abc"),
            "Parameter 'cluster_size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        );
        assert_eq!(
            err("size=-1024"),
            "Value '-1024' is out of range for parameter 'size'"
        );
        assert_eq!(
            err("refcount_bits=abc"),
            "Parameter 'refcount_bits' expects a number"
        );
        assert_eq!(
            err("refcount_bits=99999999999999999999"),
            "Value '99999999999999999999' is too large for parameter 'refcount_bits'"
        );
        assert_eq!(err(","), "Invalid option list: ,");
        assert!(matches!(
            CreateOptions::from_qemu_str("encryption=on"),
            Err(OptionError::EncryptionUnsupported { .. })
        ));
        // Stops at the first error, in order, and leaves self unchanged.
        assert_eq!(
            err("bogus=1,lazy_refcounts=maybe"),
            "Invalid parameter 'bogus'"
        );
        let mut c = CreateOptions::new();
        assert!(c.apply_qemu_str("cluster_size=4k,bogus=1").is_err());
        assert_eq!(c, CreateOptions::new());
        // size twice / missing.
        let mut c = CreateOptions::from_qemu_str("size=2M").unwrap();
        assert_eq!(
            c.set_positional_size(4 * MIB).unwrap_err().to_string(),
            "The image size must be specified only once"
        );
        let mut c = CreateOptions::new();
        assert_eq!(
            c.require_size().unwrap_err().to_string(),
            "Image creation needs a size parameter"
        );
        c.set_positional_size(MIB).unwrap();
        assert_eq!(c.require_size(), Ok(MIB));
        // Same -o size twice is fine (last wins).
        assert_eq!(
            CreateOptions::from_qemu_str("size=1M,size=2M")
                .unwrap()
                .size,
            Some(2 * MIB)
        );
    }

    #[test]
    fn create_validation_messages() {
        // Texts verified with qemu-img 10.0.2 (cli.md §2.3 and our own runs).
        assert_eq!(
            create_err("cluster_size=3000"),
            "Cluster size must be a power of two between 512 and 2048k"
        );
        assert_eq!(
            create_err("cluster_size=256"),
            "Cluster size must be a power of two between 512 and 2048k"
        );
        assert_eq!(
            create_err("cluster_size=4M"),
            "Cluster size must be a power of two between 512 and 2048k"
        );
        assert_eq!(
            create_err("cluster_size=0"),
            "Cluster size must be a power of two between 512 and 2048k"
        );
        assert_eq!(
            create_err("compat=0.10,lazy_refcounts=on"),
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        );
        for bad in ["0.9", "", "on", "V3", "1.10"] {
            assert_eq!(
                create_err(&format!("compat={bad}")),
                format!("Parameter 'version' does not accept value '{bad}'")
            );
        }
        assert_eq!(
            create_err("compat"),
            "Parameter 'version' does not accept value 'on'"
        );
        for bad in ["3", "0", "128", "-1", "4294967312"] {
            assert_eq!(
                create_err(&format!("refcount_bits={bad}")),
                "Refcount width must be a power of two and may not exceed 64 bits"
            );
        }
        assert_eq!(
            create_err("extended_l2=on,cluster_size=8k"),
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        );
        assert_eq!(
            create_err("compat=0.10,refcount_bits=8"),
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
        );
        assert_eq!(
            create_err("compat=0.10,compression_type=zstd"),
            "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        );
        assert_eq!(
            create_err("compat=0.10,extended_l2=on"),
            "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        );
        assert_eq!(
            create_err("data_file_raw=on"),
            "data-file-raw requires data-file"
        );
        assert_eq!(
            create_err("compat=v2,data_file=d.raw"),
            "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        );
        assert_eq!(
            create_err("preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2"),
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        );
        assert_eq!(
            create_err("backing_fmt=raw"),
            "Backing format cannot be used without backing file"
        );
        assert_eq!(
            create_err("backing_file=b.qcow2,backing_fmt=qcow2,data_file=x,data_file_raw=on"),
            "Backing file and data-file-raw cannot be used at the same time"
        );
        assert_eq!(
            create_err("preallocation=bogus"),
            "Parameter 'preallocation' does not accept value 'bogus'"
        );
        assert_eq!(
            create_err("preallocation=FULL"),
            "Parameter 'preallocation' does not accept value 'FULL'"
        );
        assert_eq!(
            create_err("compression_type=lz4"),
            "Parameter 'compression-type' does not accept value 'lz4'"
        );
        assert!(CreateOptions::from_qemu_str(
            "extended_l2=on,preallocation=metadata,backing_file=b,backing_fmt=qcow2,size=1M"
        )
        .unwrap()
        .validate()
        .is_ok());
        // Order (verified): version, preallocation, compression-type; then the driver's checks.
        assert_eq!(
            create_err("preallocation=bogus,compression_type=bogus,compat=bogus"),
            "Parameter 'version' does not accept value 'bogus'"
        );
        assert_eq!(
            create_err("compression_type=bogus,preallocation=bogus"),
            "Parameter 'preallocation' does not accept value 'bogus'"
        );
        assert!(
            create_err("compression_type=bogus,extended_l2=on,compat=0.10")
                .starts_with("Parameter 'compression-type'")
        );
        assert!(create_err("lazy_refcounts=on,compat=0.10,refcount_bits=8,extended_l2=on,compression_type=zstd,cluster_size=3000")
            .starts_with("Extended L2 entries are only supported with compatibility"));
        assert!(create_err("extended_l2=on,cluster_size=8k,refcount_bits=3")
            .starts_with("Extended L2 entries are only supported with cluster sizes"));
        assert!(create_err("refcount_bits=3,cluster_size=3000").starts_with("Cluster size"));
        assert!(create_err("lazy_refcounts=on,compat=0.10,refcount_bits=8")
            .starts_with("Lazy refcounts"));
        assert!(create_err("compat=0.10,data_file=x,compression_type=zstd")
            .starts_with("External data files"));
        assert!(create_err("data_file_raw=on,compat=0.10").starts_with("data-file-raw requires"));
        assert!(create_err(
            "data_file_raw=on,preallocation=metadata,backing_file=b,backing_fmt=qcow2"
        )
        .starts_with("Backing file and preallocation"));
        assert!(create_err(
            "cluster_size=3000,preallocation=metadata,backing_file=b,backing_fmt=qcow2"
        )
        .starts_with("Cluster size"));
    }

    #[test]
    fn create_size_limits() {
        let check = |cluster: &str, size: u64| {
            let mut c = CreateOptions::from_qemu_str(&format!("cluster_size={cluster}")).unwrap();
            c.size = Some(size);
            c.validate().map_err(|e| e.to_string())
        };
        // Verified boundaries: 512-byte clusters address exactly 128 GiB.
        assert_eq!(check("512", 128 * GIB), Ok(()));
        let too_large = Err(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .to_owned(),
        );
        assert_eq!(check("512", 128 * GIB + 1), too_large);
        assert_eq!(check("512", TIB), too_large);
        assert_eq!(check("64k", 7 << 60), too_large);
        assert_eq!(check("2M", 7 << 60), too_large);
        assert_eq!(check("2M", 1 << 61), Ok(()));
        assert_eq!(
            check("64k", 9 << 60),
            Err("Could not resize image: Image size cannot be negative".to_owned())
        );
        assert_eq!(
            check("2M", i64::MAX as u64),
            Err("Could not resize image: Image size cannot be negative".to_owned())
        );
        assert_eq!(
            check("2M", u64::MAX),
            Err("Could not resize image: Image size cannot be negative".to_owned())
        );
        assert_eq!(
            check("2M", 9_223_372_036_854_775_295),
            Err("Could not resize image: offset(9223372036854775296) exceeds maximum(9223372035781033984)".to_owned())
        );
        // Extended L2 halves what a cluster size can address.
        let mut c = CreateOptions::from_qemu_str("cluster_size=16k,extended_l2=on").unwrap();
        c.size = Some(64 * TIB);
        assert!(c.validate().is_ok());
        c.size = Some(64 * TIB + 1);
        assert_eq!(c.validate(), Err(OptionError::ImageTooLarge));
        assert_eq!(check("64k", 1), Ok(()));
    }

    #[test]
    fn formatting_lines_match_cli_md() {
        let line = |o: &str, size: Option<u64>, file: &str| {
            let mut c = CreateOptions::from_qemu_str(o).unwrap();
            if let Some(s) = size {
                c.set_positional_size(s).unwrap();
            }
            c.formatting_line(file)
        };
        assert_eq!(
            line("", Some(GIB), "c1.qcow2"),
            "Formatting 'c1.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            line("cluster_size=4k,compat=0.10", Some(MIB), "c1.qcow2"),
            "Formatting 'c1.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off compression_type=zlib size=1048576 compat=0.10 lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            line("compat=1.1,lazy_refcounts=on,refcount_bits=64,extended_l2=on,cluster_size=128k", Some(MIB), "c2.qcow2"),
            "Formatting 'c2.qcow2', fmt=qcow2 cluster_size=131072 extended_l2=on compression_type=zlib size=1048576 compat=1.1 lazy_refcounts=on refcount_bits=64"
        );
        assert_eq!(
            line("compat=v3,compression_type=zstd,preallocation=falloc,nocow=on,size=2M", None, "c1.qcow2"),
            "Formatting 'c1.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=falloc compression_type=zstd size=2097152 compat=v3 lazy_refcounts=off refcount_bits=16 nocow=on"
        );
        assert_eq!(
            line("preallocation=metadata", Some(MIB), "c4.qcow2"),
            "Formatting 'c4.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=metadata compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            line("data_file=c5b.data,data_file_raw=on", Some(MIB), "c5b.qcow2"),
            "Formatting 'c5b.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 data_file=c5b.data data_file_raw=on lazy_refcounts=off refcount_bits=16"
        );
        let c = CreateOptions::new()
            .backing_file("base.qcow2")
            .backing_fmt("qcow2")
            .size(64 * MIB);
        assert_eq!(
            c.formatting_line("ov.qcow2"),
            "Formatting 'ov.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 backing_file=base.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16"
        );
        // Verified with qemu-img: compat sits between size and backing_file; commas stay escaped;
        // booleans and enums are echoed as spelled; numbers as signed 64-bit.
        assert_eq!(
            line("compat=1.1,backing_file=b.qcow2,backing_fmt=qcow2,data_file=d.raw,data_file_raw=off,nocow=off,preallocation=off", Some(MIB), "t.qcow2"),
            "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=off compression_type=zlib size=1048576 compat=1.1 backing_file=b.qcow2 backing_fmt=qcow2 data_file=d.raw data_file_raw=off lazy_refcounts=off refcount_bits=16 nocow=off"
        );
        assert_eq!(
            line("data_file=a,,b.data", Some(MIB), "t.qcow2"),
            "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 data_file=a,,b.data lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            line("lazy_refcounts=yes,refcount_bits=-1,compat=bogus,preallocation=bogus,compression_type=ZSTD", Some(MIB), "t.qcow2"),
            "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=bogus compression_type=ZSTD size=1048576 compat=bogus lazy_refcounts=yes refcount_bits=-1"
        );
        assert_eq!(
            line("lazy_refcounts,refcount_bits=010", Some(MIB), "t.qcow2"),
            "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 lazy_refcounts=on refcount_bits=8"
        );
        assert_eq!(
            line("size=9E,cluster_size=9E", None, "t.qcow2"),
            "Formatting 't.qcow2', fmt=qcow2 cluster_size=-8070450532247928832 extended_l2=off compression_type=zlib size=-8070450532247928832 lazy_refcounts=off refcount_bits=16"
        );
        // Builders: typed values override stale spellings.
        let mut c =
            CreateOptions::from_qemu_str("lazy_refcounts=yes,preallocation=bogus,compat=v2")
                .unwrap();
        c = c
            .lazy_refcounts(false)
            .preallocation(Preallocation::Full)
            .compat(Compat::V3)
            .size(1);
        assert_eq!(
            c.formatting_line("t"),
            "Formatting 't', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=full compression_type=zlib size=1 compat=1.1 lazy_refcounts=off refcount_bits=16"
        );
        assert!(c.validate().is_ok());
        let c = CreateOptions::new()
            .size(1)
            .data_file("d")
            .data_file_raw(true)
            .nocow(false)
            .extended_l2(true)
            .refcount_bits(8)
            .compression_type(CompressionType::Zstd)
            .cluster_size(16384);
        assert_eq!(
            c.formatting_line("t"),
            "Formatting 't', fmt=qcow2 cluster_size=16384 extended_l2=on compression_type=zstd size=1 data_file=d data_file_raw=on lazy_refcounts=off refcount_bits=8 nocow=off"
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn enum_parsing() {
        assert_eq!(
            "bogus".parse::<Preallocation>().unwrap_err().to_string(),
            "Invalid preallocation mode 'bogus'"
        );
        for p in [
            Preallocation::Off,
            Preallocation::Metadata,
            Preallocation::Falloc,
            Preallocation::Full,
        ] {
            assert_eq!(p.as_str().parse::<Preallocation>(), Ok(p));
        }
        assert_eq!("zstd".parse::<CompressionType>(), Ok(CompressionType::Zstd));
        assert_eq!("zlib".parse::<CompressionType>(), Ok(CompressionType::Zlib));
        for (s, c) in [
            ("0.10", Compat::V2),
            ("v2", Compat::V2),
            ("1.1", Compat::V3),
            ("v3", Compat::V3),
        ] {
            assert_eq!(s.parse::<Compat>(), Ok(c));
        }
        assert_eq!(Compat::V2.version(), 2);
        assert_eq!(Compat::V3.to_string(), "1.1");
    }

    // ----- amend -----

    fn fresh_image() -> AmendImageState {
        AmendImageState {
            compat: Compat::V3,
            refcount_bits: 16,
            lazy_refcounts: false,
            has_data_file: false,
            data_file_raw: false,
            backing_file: None,
            backing_fmt: None,
        }
    }

    fn amend_err(s: &str) -> String {
        match AmendOptions::from_qemu_str(s) {
            Err(e) => e.to_string(),
            Ok(a) => a.check(&fresh_image()).unwrap_err().to_string(),
        }
    }

    #[test]
    fn amend_messages() {
        // cli.md §7 and our qemu-img 10.0.2 runs on a fresh v3 image.
        assert_eq!(
            amend_err("cluster_size=4k"),
            "Invalid parameter 'cluster_size'\nThis option is only supported for image creation"
        );
        assert_eq!(
            amend_err("size=4M,cluster_size=64k"),
            "Invalid parameter 'cluster_size'\nThis option is only supported for image creation"
        );
        for key in [
            "preallocation=full",
            "extended_l2=on",
            "compression_type=zstd",
            "encryption=on",
            "cluster_size=3000",
        ] {
            let k = key.split('=').next().unwrap();
            assert_eq!(
                amend_err(key),
                format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                )
            );
        }
        assert_eq!(
            amend_err("cluster_size=4k,bogus=1"),
            "Invalid parameter 'cluster_size'"
        );
        assert_eq!(
            amend_err("cluster_size=4k,lazy_refcounts=maybe"),
            "Invalid parameter 'cluster_size'"
        );
        assert_eq!(
            amend_err("bogus=1,cluster_size=4k"),
            "Invalid parameter 'bogus'"
        );
        assert_eq!(amend_err("bogus=1"), "Invalid parameter 'bogus'");
        assert_eq!(amend_err("nocow=on"), "Invalid parameter 'nocow'");
        assert_eq!(amend_err("compat=0.9"), "Unknown compatibility level 0.9");
        assert_eq!(amend_err("compat="), "Unknown compatibility level ");
        assert_eq!(
            amend_err("refcount_bits=3"),
            "Refcount width must be a power of two and may not exceed 64 bits"
        );
        assert_eq!(
            amend_err("lazy_refcounts=maybe"),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            amend_err("lazy_refcounts=on,compat=0.10"),
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
        );
        for s in ["refcount_bits=8,compat=0.10", "compat=0.10,refcount_bits=8"] {
            assert_eq!(
                amend_err(s),
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
            );
        }
        assert!(amend_err("size=abc")
            .starts_with("Parameter 'size' expects a non-negative number below 2^64\n"));
        assert_eq!(
            amend_err("backing_file=x"),
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead."
        );
        assert_eq!(
            amend_err("data_file=x"),
            "data-file can only be set for images that use an external data file"
        );
        assert_eq!(
            amend_err("data_file_raw=on"),
            "data-file-raw cannot be set on existing images"
        );
        // Successful ones.
        for ok in [
            "compat=0.10",
            "compat=v3",
            "compat=1.1,lazy_refcounts=on",
            "refcount_bits=64",
            "size=8M",
            "size=0",
            "refcount_bits=16,compat=1.1,lazy_refcounts=off",
            "data_file_raw=off",
        ] {
            let a = AmendOptions::from_qemu_str(ok).unwrap();
            assert!(a.check(&fresh_image()).is_ok(), "{ok}");
        }
        assert!(AmendOptions::new().is_empty());
        assert!(!AmendOptions::from_qemu_str("size=0").unwrap().is_empty());
    }

    #[test]
    fn amend_checks_against_image() {
        let a = AmendOptions::from_qemu_str("compat=0.10").unwrap();
        let mut image = fresh_image();
        image.refcount_bits = 64;
        assert_eq!(
            a.check(&image).unwrap_err().to_string(),
            "compat=0.10 requires refcount_bits=16"
        );
        let mut image = fresh_image();
        image.has_data_file = true;
        assert_eq!(
            a.check(&image).unwrap_err().to_string(),
            "Cannot downgrade an image with a data file"
        );
        // Backing file unchanged is fine; a missing backing_fmt differs from a set one.
        let mut image = fresh_image();
        image.backing_file = Some("b.qcow2".into());
        image.backing_fmt = Some("qcow2".into());
        assert!(
            AmendOptions::from_qemu_str("backing_file=b.qcow2,backing_fmt=qcow2")
                .unwrap()
                .check(&image)
                .is_ok()
        );
        assert_eq!(
            AmendOptions::from_qemu_str("backing_file=b.qcow2")
                .unwrap()
                .check(&image),
            Err(OptionError::AmendBackingFile)
        );
        // data_file on an image that has one; data_file_raw kept on.
        let mut image = fresh_image();
        image.has_data_file = true;
        image.data_file_raw = true;
        assert!(
            AmendOptions::from_qemu_str("data_file=new.raw,data_file_raw=on")
                .unwrap()
                .check(&image)
                .is_ok()
        );
        // Lazy refcounts already on: no error even when downgrading (QEMU only checks changes).
        let mut image = fresh_image();
        image.lazy_refcounts = true;
        assert!(AmendOptions::from_qemu_str("lazy_refcounts=on,compat=0.10")
            .unwrap()
            .check(&image)
            .is_ok());
        // The compat error comes first.
        assert_eq!(
            AmendOptions::from_qemu_str("data_file=x,compat=9")
                .unwrap()
                .check(&fresh_image()),
            Err(OptionError::AmendUnknownCompat { value: "9".into() })
        );
        // QEMU truncates the width to an int.
        assert!(AmendOptions::from_qemu_str("refcount_bits=4294967312")
            .unwrap()
            .check(&fresh_image())
            .is_ok());
        assert_eq!(
            AmendOptions::from_qemu_str("refcount_bits=-1")
                .unwrap()
                .check(&fresh_image()),
            Err(OptionError::RefcountWidth)
        );
    }

    #[test]
    fn every_error_names_its_option() {
        let samples = [
            OptionError::ClusterSize,
            OptionError::CacheSizeAllThree,
            OptionError::BadBool { option: "x".into() },
            OptionError::BadErrorAction {
                value: "v".into(),
                operation: "read",
            },
            OptionError::BadErrorAction {
                value: "v".into(),
                operation: "write",
            },
            OptionError::OverlapMode { value: "v".into() },
        ];
        let names: Vec<_> = samples.iter().map(|e| e.option()).collect();
        assert_eq!(
            names,
            [
                Some("cluster_size"),
                Some("cache-size"),
                Some("x"),
                Some("rerror"),
                Some("werror"),
                Some("overlap-check")
            ]
        );
        assert_eq!(
            OptionError::InvalidOptionList { list: ",".into() }.option(),
            None
        );
        assert_eq!(OptionError::ClusterSize.hint(), None);
    }

    // ----- cross-checks against the real QEMU tools -----

    mod qemu {
        use super::*;
        use std::process::Command;

        /// Whether `tool` runs; prints a note when it does not.
        fn have(tool: &str) -> bool {
            let ok = Command::new(tool)
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("note: {tool} is not installed; skipping the cross-check");
            }
            ok
        }

        fn run(dir: &Path, tool: &str, args: &[&str]) -> (String, String) {
            let out = Command::new(tool)
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run the QEMU tool");
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }

        #[test]
        fn qemu_io_image_opts_errors() {
            if !have("qemu-io") || !have("qemu-img") {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            run(
                dir.path(),
                "qemu-img",
                &["create", "-f", "qcow2", "-q", "disk.qcow2", "1M"],
            );
            let long = format!("node-name={}", "a".repeat(32));
            let short = format!("node-name={}", "a".repeat(31));
            let cases = [
                "",
                "overlap-check=some",
                "overlap-check.template=some",
                "overlap-check=all,overlap-check.template=none",
                "overlap-check.template=foo,overlap-check=bar",
                "overlap-check=all,overlap-check.template=all",
                "overlap-check.main-header=maybe",
                "overlap-check.bogus=on",
                "overlap-check=none,overlap-check.active-l2=on",
                "overlap-check.template=all,overlap-check.inactive-l2=off",
                "overlap-check.bitmap-directory=off",
                "bogus=1",
                "l2-cache-size=3x",
                "l2-cache-size=99999E",
                "l2-cache-size=-1",
                "l2-cache-size=1.5",
                "cache-clean-interval=abc",
                "cache-clean-interval=-1",
                "cache-clean-interval=4294967296",
                "cache-clean-interval=99999999999999999999",
                "cache-clean-interval=0x10",
                "cache-size=1M,l2-cache-size=512k,refcount-cache-size=256k",
                "cache-size=1M,l2-cache-size=2M",
                "cache-size=1M,refcount-cache-size=2M",
                "cache-size=1M,refcount-cache-size=256k",
                "cache-size=100k",
                "l2-cache-size=1k",
                "l2-cache-entry-size=3000",
                "l2-cache-entry-size=256",
                "l2-cache-entry-size=128k",
                "l2-cache-entry-size=512,l2-cache-size=1k",
                "refcount-cache-size=1P",
                "lazy-refcounts=maybe",
                "lazy-refcounts=on",
                "pass-discard-request=yes",
                "pass-discard-other=nope",
                "pass-discard-snapshot=off",
                "discard-no-unref=on",
                "driver=raw2",
                "driver=raw2,bogus=1",
                "bogus=1,driver=raw2",
                "bogus=1,lazy-refcounts=maybe",
                "lazy-refcounts=on,bogus=1",
                "l2-cache-size=abc,overlap-check=some",
                "l2-cache-size=1M,bogus=1,overlap-check=some",
                "node-name=1abc",
                "node-name=a*b",
                "node-name=",
                &long,
                &short,
                "read-only=maybe",
                "read-only=on",
                "file.driver=foo",
                "file.driver=file",
            ];
            for case in cases {
                let opts = if case.is_empty() {
                    "driver=qcow2,file.filename=disk.qcow2".to_owned()
                } else {
                    format!("driver=qcow2,file.filename=disk.qcow2,{case}")
                };
                let (_, stderr) = run(
                    dir.path(),
                    "qemu-io",
                    &["-r", "--image-opts", "-c", "read -q 0 4k", &opts],
                );
                let ours = OpenOptions::from_qemu_str(&opts)
                    .and_then(|o| o.cache_config(1 << 20, 65536, 8).map(|_| o))
                    .and_then(|o| o.check_image_version(3));
                let want = match ours {
                    Ok(()) => String::new(),
                    Err(e) => format!("qemu-io: can't open: {e}\n"),
                };
                assert_eq!(stderr, want, "case {case:?}");
            }
        }

        /// Our emulation of `qemu-img create -f qcow2 [-o OPTS] t.qcow2 [SIZE]`.
        fn our_create(o: Option<&str>, size: Option<&str>) -> (String, String) {
            let file = "t.qcow2";
            let fail = |e: OptionError| match e {
                OptionError::InvalidOptionList { .. } => format!("qemu-img: {e}\n"),
                e => format!("qemu-img: {file}: {e}\n"),
            };
            let mut c = CreateOptions::new();
            if let Some(o) = o {
                if let Err(e) = check_option_list(o).and_then(|()| c.apply_qemu_str(o)) {
                    return (String::new(), fail(e));
                }
            }
            if let Some(size) = size {
                let bytes = parse_image_size(size).expect("valid positional size");
                if let Err(e) = c.set_positional_size(bytes) {
                    return (String::new(), fail(e));
                }
            }
            if let Err(e) = c.require_size() {
                return (String::new(), fail(e));
            }
            let stdout = format!("{}\n", c.formatting_line(file));
            match c.validate() {
                Ok(()) => (stdout, String::new()),
                Err(e) => (stdout, fail(e)),
            }
        }

        #[test]
        fn qemu_img_create_output() {
            if !have("qemu-img") {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            run(
                dir.path(),
                "qemu-img",
                &["create", "-f", "qcow2", "-q", "b.qcow2", "1M"],
            );
            let one_m = Some("1M");
            let cases: &[(&str, Option<&str>)] = &[
                ("", Some("1G")),
                ("cluster_size=4k,compat=0.10", one_m),
                ("compat=1.1,lazy_refcounts=on,refcount_bits=64,extended_l2=on,cluster_size=128k", one_m),
                ("compat=v3,compression_type=zstd,preallocation=falloc,nocow=on,size=2M", None),
                ("preallocation=metadata", one_m),
                ("data_file=c5b.data,data_file_raw=on", one_m),
                ("bogus=1", one_m),
                ("cluster_size=3000", one_m),
                ("cluster_size=256", one_m),
                ("cluster_size=0", one_m),
                ("cluster_size=1.5k", one_m),
                ("compat=0.10,lazy_refcounts=on", one_m),
                ("compat=0.9", one_m),
                ("compat=V3", one_m),
                ("refcount_bits=3", one_m),
                ("extended_l2=on,cluster_size=8k", one_m),
                ("lazy_refcounts=maybe", one_m),
                ("size=2M", Some("4M")),
                ("size=1M,size=2M", None),
                ("compat=0.10,refcount_bits=8", one_m),
                ("compat=0.10,compression_type=zstd", one_m),
                ("compat=0.10,extended_l2=on", one_m),
                ("data_file_raw=on", one_m),
                ("preallocation=bogus", one_m),
                ("preallocation=FULL", one_m),
                ("compression_type=lz4", one_m),
                ("size=99999999E", None),
                ("size=1.5", None),
                ("size=-1024", None),
                ("size=-1k", None),
                ("size=0x10", None),
                ("size=.5k", None),
                ("size=1.0", None),
                ("size=", None),
                ("cluster_size=abc", one_m),
                ("cluster_size=", one_m),
                ("refcount_bits=abc", one_m),
                ("refcount_bits=-1", one_m),
                ("refcount_bits=0x10", one_m),
                ("refcount_bits=010", one_m),
                ("refcount_bits=4294967312", one_m),
                ("refcount_bits=18446744073709551616", one_m),
                ("lazy_refcounts=yes", one_m),
                ("lazy_refcounts=n", one_m),
                ("lazy_refcounts", one_m),
                ("nocow", one_m),
                ("nocow=maybe", one_m),
                ("compat", one_m),
                ("compat=", one_m),
                ("=x", one_m),
                ("a=b=c", one_m),
                (",", one_m),
                ("size=1M,", None),
                ("data_file=a,,b.data", one_m),
                ("preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2", one_m),
                ("extended_l2=on,preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2", one_m),
                ("backing_file=b.qcow2,backing_fmt=qcow2", one_m),
                ("backing_fmt=raw", one_m),
                ("backing_file=b.qcow2,backing_fmt=qcow2,data_file=x,data_file_raw=on", one_m),
                ("data_file_raw=on,preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2", one_m),
                ("compat=bogus,preallocation=bogus,compression_type=bogus", one_m),
                ("compression_type=bogus,preallocation=bogus", one_m),
                ("compression_type=bogus,extended_l2=on,compat=0.10", one_m),
                ("compat=v2,data_file=d.raw", one_m),
                ("compat=0.10,data_file=x,compression_type=zstd", one_m),
                ("lazy_refcounts=on,compat=0.10,refcount_bits=8,extended_l2=on,compression_type=zstd,cluster_size=3000", one_m),
                ("cluster_size=3000,preallocation=metadata,backing_file=b.qcow2,backing_fmt=qcow2", one_m),
                ("cluster_size=512", Some("1T")),
                ("cluster_size=512", Some("137438953473")),
                ("cluster_size=16k,extended_l2=on", Some("70368744177665")),
                ("size=9E", None),
                ("size=7E", None),
                ("cluster_size=2M", Some("7E")),
                ("cluster_size=2M", Some("9223372036854775295")),
                ("cluster_size=2M", Some("9223372036854775807")),
                ("cluster_size=9E", one_m),
            ];
            for &(o, size) in cases {
                let mut args = vec!["create", "-f", "qcow2"];
                if !o.is_empty() {
                    args.extend(["-o", o]);
                }
                args.push("t.qcow2");
                if let Some(size) = size {
                    args.push(size);
                }
                let theirs = run(dir.path(), "qemu-img", &args);
                let ours = our_create((!o.is_empty()).then_some(o), size);
                assert_eq!(ours, theirs, "case -o {o:?} size {size:?}");
            }
        }

        #[test]
        fn qemu_img_amend_errors() {
            if !have("qemu-img") {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            let cases = [
                "cluster_size=4k",
                "cluster_size=4k,bogus=1",
                "bogus=1,cluster_size=4k",
                "cluster_size=4k,lazy_refcounts=maybe",
                "size=4M,cluster_size=64k",
                "compat=0.9",
                "compat=",
                "compat=v3",
                "compat=0.10",
                "refcount_bits=3",
                "refcount_bits=-1",
                "refcount_bits=64",
                "lazy_refcounts=maybe",
                "lazy_refcounts=on,compat=0.10",
                "refcount_bits=8,compat=0.10",
                "compat=0.10,refcount_bits=8",
                "size=abc",
                "size=8M",
                "preallocation=full",
                "extended_l2=on",
                "compression_type=zstd",
                "nocow=on",
                "encryption=on",
                "backing_file=x",
                "data_file=x",
                "data_file_raw=on",
                "data_file_raw=off",
                "refcount_bits=16,compat=1.1,lazy_refcounts=off",
                ",",
            ];
            for case in cases {
                run(
                    dir.path(),
                    "qemu-img",
                    &["create", "-f", "qcow2", "-q", "am.qcow2", "1M"],
                );
                let (_, stderr) = run(
                    dir.path(),
                    "qemu-img",
                    &["amend", "-f", "qcow2", "-o", case, "am.qcow2"],
                );
                let ours = check_option_list(case)
                    .and_then(|()| AmendOptions::from_qemu_str(case))
                    .and_then(|a| a.check(&fresh_image()));
                let want = match ours {
                    Ok(()) => String::new(),
                    Err(e) => format!("qemu-img: {e}\n"),
                };
                assert_eq!(stderr, want, "case {case:?}");
            }
        }
    }

    // ----- properties -----

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn interesting() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[0-9a-zA-Z.,=+\\- _x?]{0,40}",
                "(size|compat|cluster_size|refcount_bits|lazy_refcounts|extended_l2|compression_type|preallocation|backing_file|backing_fmt|data_file|data_file_raw|nocow|overlap-check|overlap-check\\.template|overlap-check\\.main-header|l2-cache-size|cache-size|refcount-cache-size|l2-cache-entry-size|cache-clean-interval|driver|file|file\\.filename|node-name|rerror|werror)=[-0-9a-zA-Z.,+ ]{0,12}(,[a-z_.-]{0,14}=[-0-9a-zA-Z.+]{0,10}){0,4}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn parsers_never_panic(s in interesting()) {
                let _ = parse_size(&s);
                let _ = parse_image_size(&s);
                let _ = parse_number("n", &s);
                let _ = parse_bool_onoff("b", &s);
                let _ = validate_node_name(&s);
                let _ = split_option_string(&s);
                let _ = check_option_list(&s);
                let _ = option_string_wants_help(&s);
                let _ = OverlapChecks::from_qemu_str(&s);
                let _ = s.parse::<OverlapCheckMode>();
                let _ = s.parse::<Preallocation>();
                let _ = s.parse::<Compat>();
                let _ = ErrorPolicy::parse(&s, true);
                if let Ok(o) = OpenOptions::from_qemu_str(&s) {
                    for (size, cluster, l2e) in [(1 << 30, 65536, 8), (u64::MAX, 512, 16), (0, 2 << 20, 8)] {
                        let _ = cache_config(&o, size, cluster, l2e);
                    }
                    let _ = o.check_image_version(2);
                }
                if let Ok(c) = CreateOptions::from_qemu_str(&s) {
                    let _ = c.validate();
                    let _ = c.formatting_line("f");
                    let _ = c.effective_preallocation();
                }
                if let Ok(a) = AmendOptions::from_qemu_str(&s) {
                    let _ = a.check(&fresh_image());
                }
            }

            #[test]
            fn cache_config_never_panics(
                size in any::<u64>(),
                cluster_bits in 0u32..32,
                l2e in prop_oneof![Just(8u64), Just(16u64), any::<u64>()],
                l2 in proptest::option::of(any::<u64>()),
                entry in proptest::option::of(any::<u64>()),
                rc in proptest::option::of(any::<u64>()),
                total in proptest::option::of(any::<u64>()),
                interval in proptest::option::of(any::<u64>()),
            ) {
                let mut o = OpenOptions::new();
                if let Some(v) = l2 { o = o.l2_cache_size(v); }
                if let Some(v) = entry { o = o.l2_cache_entry_size(v); }
                if let Some(v) = rc { o = o.refcount_cache_size(v); }
                if let Some(v) = total { o = o.cache_size(v); }
                if let Some(v) = interval { o = o.cache_clean_interval(v); }
                if let Ok(c) = cache_config(&o, size, 1u64 << cluster_bits, l2e) {
                    prop_assert!(c.l2_slices >= 2 && c.refcount_blocks >= 4);
                    prop_assert!(c.l2_slices as u64 <= INT_MAX && c.refcount_blocks as u64 <= INT_MAX);
                    prop_assert!(c.l2_slice_bytes.is_power_of_two());
                }
            }

            #[test]
            fn escaped_values_round_trip(key in "[a-z_]{1,10}", value in "[a-z,=]{0,12}") {
                let s = format!("{key}={}", escape_option_value(&value));
                // A value ending in commas would be an odd-trailing-comma list only if the
                // escaped form has an odd count, which escaping never produces.
                let parsed = split_option_string(&s).unwrap();
                prop_assert_eq!(parsed, vec![(key, value)]);
            }
        }
    }
}
