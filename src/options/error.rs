//! [`OptionError`] and [`SizeError`]: QEMU's message texts for bad options and sizes.

use crate::types::MetadataKind;

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
    /// open: a bad option of a storage backend (`file.driver=nbd|quorum|blkdebug|null-co`);
    /// the message is QEMU's for that driver.
    #[error("{message}")]
    Backend {
        /// The driver (`file.driver`).
        driver: String,
        /// QEMU's message.
        message: String,
    },
    /// open: `force-share=on` for a read-write open.
    #[error("force-share=on can only be used with read-only images")]
    ForceShareReadWrite,
    /// open: `file.read-only=on` under a read-write open (the format layer
    /// needs write permission the protocol node does not give).
    #[error("Block node is read-only")]
    FileReadOnly,
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
    /// rejects an empty `-o`, see `check_option_list` in the `parse` module).
    #[error("Invalid option list: {list}")]
    InvalidOptionList {
        /// The list as given.
        list: String,
    },
    /// open: an on/off/auto option (`file.locking`) got another value (QEMU's
    /// `qapi_enum_parse` text, which does not name the option).
    #[error("invalid parameter value: {value}")]
    InvalidParameterValue {
        /// QEMU's spelling of the option.
        option: &'static str,
        /// The value as given.
        value: String,
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
            E::BadEnumValue { option, .. } | E::InvalidParameterValue { option, .. } => option,
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
            E::FileConflict | E::Backend { .. } => "file",
            E::ForceShareReadWrite => "force-share",
            E::FileReadOnly => "file.read-only",
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

/// A string that is not a valid size (see [`parse_size`](super::parse_size)).
///
/// `Display` is a short description; QEMU's texts for the places a size appears are
/// [`SizeError::into_option_error`] (QemuOpts option values), [`SizeError::qemu_img_message`]
/// (qemu-img arguments) and [`SizeError::qemu_io_message`] (qemu-io command arguments).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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
    /// (the range form also applies to sizes above `i64::MAX`, see [`parse_image_size`](super::parse_image_size)).
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::options::{parse_image_size, parse_size};

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
}
