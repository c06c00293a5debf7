//! Overlap checks (§5): the templates, the set of enabled checks and the `overlap-check*`
//! options.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::OptionError;
use super::parse::{parse_bool_onoff, split_option_string};
use crate::types::MetadataKind;

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
}
