//! Create options (§9.4, cli.md §2): [`CreateOptions`] and the enumerations it uses.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::OptionError;
use super::parse::{
    escape_option_value, parse_bool_onoff, parse_number, parse_size_option, split_option_string,
};
use super::{
    valid_cluster_size, DEFAULT_CLUSTER_SIZE, DEFAULT_REFCOUNT_BITS, MAX_IMAGE_LENGTH,
    MIN_EXTENDED_L2_CLUSTER_SIZE,
};
use crate::format::consts::{MAX_L1_BYTES, SECTOR_SIZE};

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
pub(super) enum CreateKeys {
    /// `qemu-img create -o`: the qcow2 driver's options plus the file layer's `nocow`.
    Create,
    /// Only the qcow2 driver's options, encryption included (amend's "only supported for image
    /// creation" test).
    DriverOnly,
}

/// Options of `qemu-img create -f qcow2` (`-o` keys, `-b`/`-F`, the positional size).
///
/// Besides the public typed fields, private bookkeeping keeps values exactly as the user wrote
/// them in a `-o` string, for the `Formatting` line (QEMU echoes them) and for values that
/// [`CreateOptions::validate`] rejects after that line is printed (`compat=0.9`,
/// `preallocation=bogus`). The builder methods keep it consistent; a remembered spelling that
/// parses to a different value than its typed field is ignored, so assigning the typed fields
/// directly is safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (`-o size=`, the positional size or the backing file's).
    pub size: Option<u64>,
    /// Whether `size` came from `-o size=` (a positional size then is an error).
    pub(crate) size_in_options: bool,
    /// Image version.
    pub compat: Compat,
    /// `compat` as the user spelled it (`0.10`, `v2`, `1.1`, `v3`, or an invalid value).
    pub(crate) compat_spelling: Option<String>,
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
    pub(crate) preallocation_given: bool,
    /// `nocow` (Btrfs `chattr +C`), if given.
    pub nocow: Option<bool>,
    /// Refuse to overwrite an existing image file (or data file): creation
    /// fails with an I/O error of kind `AlreadyExists` and leaves it alone.
    /// Off by default, as `qemu-img create` truncates an existing file.
    pub create_new: bool,
    /// `encryption` / `encrypt.*`, as given (resolved at creation with
    /// [`CreateOptions::secrets`]).
    pub encrypt: super::EncryptOptions,
    /// The secrets `encrypt.key-secret` may name.
    pub(crate) secrets: crate::crypto::SecretStore,
    /// Other values as given, keyed by qemu-img option name (`preallocation`,
    /// `compression_type`, `lazy_refcounts`, `extended_l2`, `data_file_raw`, `nocow`,
    /// `refcount_bits`).
    pub(crate) spellings: BTreeMap<String, String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions::new()
    }
}

impl CreateOptions {
    /// qemu-img's defaults: v3, 64 KiB clusters, 16-bit refcounts, zlib, no preallocation.
    ///
    /// ```
    /// use qcow2kit::options::{CompressionType, Preallocation};
    /// use qcow2kit::CreateOptions;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let opts = CreateOptions::new()
    ///     .size(10 << 30)
    ///     .cluster_size(256 << 10)
    ///     .compression_type(CompressionType::Zstd)
    ///     .preallocation(Preallocation::Metadata);
    /// qcow2kit::create::create_image(&dir.path().join("vm.qcow2"), &opts)?;
    /// # Ok(())
    /// # }
    /// ```
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
            create_new: false,
            encrypt: super::EncryptOptions::default(),
            secrets: crate::crypto::SecretStore::new(),
            spellings: BTreeMap::new(),
        }
    }

    /// The secrets `encrypt.key-secret` may name (QEMU's `--object
    /// secret,...`).
    ///
    /// ```
    /// use qcow2kit::crypto::{Secret, SecretStore};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let mut secrets = SecretStore::new();
    /// secrets.insert("sec0", Secret::new("passphrase"));
    /// let opts = CreateOptions::from_qemu_str(
    ///     "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
    /// )?
    /// .secrets(secrets.clone());
    /// let path = dir.path().join("secret.qcow2");
    /// qcow2kit::create::create(&path, &opts, 1 << 20)?;
    ///
    /// let img = Image::open(&path, &OpenOptions::new().secrets(secrets).key_secret("sec0"))?;
    /// img.write_at(b"hello", 0)?;
    /// let mut back = [0u8; 5];
    /// img.read_at(&mut back, 0)?;
    /// assert_eq!(&back, b"hello");
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn secrets(mut self, secrets: crate::crypto::SecretStore) -> Self {
        self.secrets = secrets;
        self
    }

    /// The secret store.
    pub fn get_secrets(&self) -> &crate::crypto::SecretStore {
        &self.secrets
    }

    /// Parses a `-o` string over the defaults (see [`CreateOptions::apply_qemu_str`]).
    ///
    /// ```
    /// use qcow2kit::options::Compat;
    /// use qcow2kit::CreateOptions;
    ///
    /// # fn main() -> Result<(), qcow2kit::options::OptionError> {
    /// // The syntax of qemu-img create -o.
    /// let opts = CreateOptions::from_qemu_str("cluster_size=2M,lazy_refcounts=on,compat=1.1")?;
    /// assert_eq!(opts.cluster_size, 2 << 20);
    /// assert!(opts.lazy_refcounts);
    /// assert_eq!(opts.compat, Compat::V3);
    /// assert!(CreateOptions::from_qemu_str("cluster_size=3k")?.validate().is_err());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`CreateOptions::apply_qemu_str`].
    pub fn from_qemu_str(s: &str) -> Result<Self, OptionError> {
        let mut opts = CreateOptions::new();
        opts.apply_qemu_str(s)?;
        Ok(opts)
    }

    /// Refuse to overwrite an existing file (see [`CreateOptions::create_new`]).
    #[must_use]
    pub fn create_new(mut self, on: bool) -> Self {
        self.create_new = on;
        self
    }

    /// Virtual size in bytes, used by [`crate::create::create_image`]; the
    /// explicit size of [`crate::create::create`] must agree with it when both
    /// are given.
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
    /// [`OptionError::InvalidOptionList`]. (`encryption` and `encrypt.*` are kept as given in
    /// [`CreateOptions::encrypt`] and checked at creation.) All of these come without a `Formatting` line.
    pub fn apply_qemu_str(&mut self, s: &str) -> Result<(), OptionError> {
        let pairs = split_option_string(s)?;
        let mut next = self.clone();
        for (key, value) in &pairs {
            next.apply_pair(key, value, CreateKeys::Create)?;
        }
        *self = next;
        Ok(())
    }

    pub(super) fn apply_pair(
        &mut self,
        key: &str,
        value: &str,
        keys: CreateKeys,
    ) -> Result<(), OptionError> {
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
            _ if self.encrypt.apply(key, value)? => {}
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
        let mut items: Vec<(&str, String)> = self.encrypt.formatting_items();
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "create_tests.rs"]
mod tests;
