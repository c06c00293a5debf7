//! Amend options (cli.md §7): [`AmendOptions`] and their checks against the image.

use super::create::{Compat, CreateKeys, CreateOptions};
use super::error::OptionError;
use super::parse::{parse_bool_onoff, parse_number, parse_size_option, split_option_string};

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

    /// The refcount width the image has after the amendment (valid once
    /// [`AmendOptions::check_before_refcounts`] passed).
    pub fn refcount_bits_for(&self, image: &AmendImageState) -> u32 {
        u32::try_from(self.target_refcount_bits(image)).unwrap_or(image.refcount_bits)
    }

    /// Checks these options against the image, in QEMU's order, before anything is changed:
    /// [`AmendOptions::check_before_refcounts`] then [`AmendOptions::check_after_refcounts`].
    /// (QEMU's further checks need the image contents: refcounts too large for a new width,
    /// and for a downgrade internal snapshots, incompatible features and compressed clusters;
    /// `qcow2kit::amend` makes them between the two halves and after them.)
    ///
    /// # Errors
    /// As the two halves.
    pub fn check(&self, image: &AmendImageState) -> Result<(), OptionError> {
        self.check_before_refcounts(image)?;
        self.check_after_refcounts(image)
    }

    /// The checks QEMU makes before it changes the refcount width: the `compat` value;
    /// `data_file`; `data_file_raw`; the refcount width; a new width on v2.
    ///
    /// # Errors
    /// [`OptionError::AmendUnknownCompat`], [`OptionError::AmendDataFile`],
    /// [`OptionError::AmendDataFileRaw`], [`OptionError::RefcountWidth`],
    /// [`OptionError::AmendRefcountBitsV2`].
    pub fn check_before_refcounts(&self, image: &AmendImageState) -> Result<(), OptionError> {
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
        Ok(())
    }

    /// The checks QEMU makes after it changed the refcount width: `backing_file`/`backing_fmt`
    /// (must be unchanged); lazy refcounts on v2; and for a downgrade the refcount width and
    /// the data file.
    ///
    /// # Errors
    /// [`OptionError::AmendUnknownCompat`], [`OptionError::AmendBackingFile`],
    /// [`OptionError::AmendLazyRefcountsV2`], [`OptionError::AmendDowngradeRefcountBits`],
    /// [`OptionError::AmendDowngradeDataFile`].
    pub fn check_after_refcounts(&self, image: &AmendImageState) -> Result<(), OptionError> {
        let new_compat = self.target_compat()?.unwrap_or(image.compat);
        let refcount_bits = self.target_refcount_bits(image);
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
    use crate::options::parse::check_option_list;
    use crate::options::testutil::{fresh_image, have, run};

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

    // ----- cross-check against the real QEMU tool -----

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
