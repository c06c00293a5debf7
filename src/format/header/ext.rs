//! Header extensions (spec §1.5): their types, and QEMU's scan of the
//! extension area (`qcow2_read_extensions`) with the checks it makes on the way.
//!
//! Encoding them is in `encode.rs`.

use super::decode::{read_array, read_u32, read_u64, read_vec};
use crate::format::consts::{
    AUTOCLEAR_BITMAPS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END,
    EXT_FEATURE_TABLE, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES,
};
use crate::format::{FormatError, Structure};

/// `crypt_method` value for LUKS (the only method with a crypto extension).
pub(super) const CRYPT_LUKS: u32 = 2;
/// QEMU keeps the backing format in a 16-byte C string, so `len` must be `< 16`.
pub(super) const BACKING_FORMAT_BUF: u32 = 16;
/// Size of one feature name table entry.
pub(super) const FEATURE_ENTRY_LEN: usize = 48;
/// Size of the name field of a feature name table entry.
pub(super) const FEATURE_NAME_LEN: usize = 46;
/// Payload size of the full disk encryption extension.
pub(super) const CRYPTO_EXT_LEN: u32 = 16;
/// Payload size of the bitmaps extension.
pub(super) const BITMAPS_EXT_LEN: u32 = 24;
/// Size of an extension's `type`/`len` header and of the end marker.
pub(super) const EXT_HEADER_LEN: u64 = 8;

/// Which of the three feature masks a named feature bit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// `incompatible_features` (type byte 0).
    Incompatible,
    /// `compatible_features` (type byte 1).
    Compatible,
    /// `autoclear_features` (type byte 2).
    Autoclear,
}

impl FeatureKind {
    /// The kind for the on-disk type byte, or `None` for an unknown type.
    pub fn from_raw(raw: u8) -> Option<FeatureKind> {
        match raw {
            0 => Some(FeatureKind::Incompatible),
            1 => Some(FeatureKind::Compatible),
            2 => Some(FeatureKind::Autoclear),
            _ => None,
        }
    }

    /// The on-disk type byte.
    pub fn raw(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
        }
    }
}

/// One entry of the feature name table extension (48 bytes on disk).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureName {
    /// Which feature mask the bit belongs to.
    pub kind: FeatureKind,
    /// Bit number in that mask (0..=63 in a sensible table).
    pub bit: u8,
    /// Human-readable name, at most 46 bytes, no NUL (the on-disk field is
    /// zero-padded and not NUL-terminated when the name is 46 bytes long).
    pub name: String,
}

/// The bitmaps extension (spec §4.6): where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory (1..=65535).
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes (`<= 65535 * 1024`).
    pub bitmap_directory_size: u64,
    /// Host offset of the bitmap directory (cluster-aligned).
    pub bitmap_directory_offset: u64,
}

/// A header extension, as found between the header and the end of the extension area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// `0xe2792aca`: the backing file's format name, e.g. `qcow2` (< 16 bytes).
    BackingFormat(String),
    /// `0x6803f857`: names of feature bits, for error messages.
    ///
    /// A table that cannot be represented exactly (length not a multiple of
    /// 48, unknown type byte, non-UTF-8 name, garbage after a name's NUL) is
    /// kept as [`HeaderExtension::Unknown`] instead, so its bytes survive a rewrite.
    FeatureNameTable(Vec<FeatureName>),
    /// `0x23852875`: persistent dirty bitmaps.
    ///
    /// If autoclear bit 0 is clear QEMU does not validate this extension (it
    /// considers the bitmaps stale and drops the extension on the next header
    /// rewrite); an extension that then fails validation is kept as
    /// [`HeaderExtension::Unknown`].
    Bitmaps(BitmapsExtension),
    /// `0x0537be77`: location of the LUKS header (only with `crypt_method == 2`).
    Crypto {
        /// Host offset of the LUKS header (cluster-aligned).
        offset: u64,
        /// Length of the LUKS header in bytes.
        length: u64,
    },
    /// `0x44415441`: name of the external data file (raw bytes of the image,
    /// an untrusted path).
    DataFile(String),
    /// Any other extension, kept verbatim (QEMU preserves them on rewrite).
    Unknown {
        /// The extension type (magic).
        ext_type: u32,
        /// The payload, without padding.
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// The extension type (magic) this extension is written with.
    pub fn ext_type(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNameTable(_) => EXT_FEATURE_TABLE,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::Crypto { .. } => EXT_CRYPTO,
            HeaderExtension::DataFile(_) => EXT_DATA_FILE,
            HeaderExtension::Unknown { ext_type, .. } => *ext_type,
        }
    }
}

/// The feature name table QEMU 10 writes into new v3 images with clusters larger than 4 KiB.
pub fn qemu_feature_table() -> Vec<FeatureName> {
    let entry = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        entry(FeatureKind::Incompatible, 0, "dirty bit"),
        entry(FeatureKind::Incompatible, 1, "corrupt bit"),
        entry(FeatureKind::Incompatible, 2, "external data file"),
        entry(FeatureKind::Incompatible, 3, "compression type"),
        entry(FeatureKind::Incompatible, 4, "extended L2 entries"),
        entry(FeatureKind::Compatible, 0, "lazy refcounts"),
        entry(FeatureKind::Autoclear, 0, "bitmaps"),
        entry(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

/// Where and how to scan the extension area.
pub(super) struct ExtArea<'a> {
    pub(super) buf: &'a [u8],
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) cluster_size: u64,
    pub(super) crypt_method: u32,
    pub(super) autoclear: u64,
}

/// QEMU reads the extensions twice: once, ignoring errors, only to find the
/// feature name table for the "Unsupported qcow2 feature(s)" message, and once
/// for real after the table checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    FeatureProbe,
    Full,
}

/// What a scan found so far (kept when the scan stops at an error).
#[derive(Default)]
pub(super) struct ExtScan {
    pub(super) extensions: Vec<HeaderExtension>,
    pub(super) last_feature_table: Option<Vec<u8>>,
}

/// QEMU's `qcow2_read_extensions`.
pub(super) fn scan_extensions(
    area: &ExtArea<'_>,
    pass: Pass,
    out: &mut ExtScan,
) -> Result<(), FormatError> {
    let ext_err = |at: u64, reason: String| {
        FormatError::invalid(Structure::HeaderExtension, Some(at), reason)
    };
    let mut offset = area.start;
    while offset < area.end {
        let ext_start = offset;
        let ext_type = read_u32(area.buf, offset);
        let len = read_u32(area.buf, offset.saturating_add(4));
        offset = offset.saturating_add(EXT_HEADER_LEN);
        let fits = area
            .end
            .checked_sub(offset)
            .is_some_and(|room| u64::from(len) <= room);
        if !fits {
            return Err(ext_err(ext_start, "Header extension too large".into()));
        }
        // Bounded by the extension area, which lies within cluster 0 (<= 2 MiB).
        let data = || read_vec(area.buf, offset, len.into());
        let utf8 = |bytes: Vec<u8>, what: &str| {
            String::from_utf8(bytes)
                .map_err(|_| ext_err(ext_start, format!("{what} is not valid UTF-8")))
        };
        match ext_type {
            EXT_END => return Ok(()),
            EXT_BACKING_FORMAT => {
                if len >= BACKING_FORMAT_BUF {
                    return Err(ext_err(
                        ext_start,
                        format!(
                            "ERROR: ext_backing_format: len={len} too large (>={BACKING_FORMAT_BUF})"
                        ),
                    ));
                }
                if pass == Pass::Full {
                    let name = utf8(data(), "Backing format name")?;
                    out.extensions.push(HeaderExtension::BackingFormat(name));
                }
            }
            EXT_FEATURE_TABLE => {
                let raw = data();
                if pass == Pass::Full {
                    out.extensions.push(match parse_feature_table(&raw) {
                        Some(table) => HeaderExtension::FeatureNameTable(table),
                        None => HeaderExtension::Unknown {
                            ext_type,
                            data: raw.clone(),
                        },
                    });
                }
                out.last_feature_table = Some(raw);
            }
            EXT_CRYPTO => {
                // In the probe pass QEMU has not stored crypt_method yet, so a
                // crypto extension always stops that scan.
                let crypt_method = if pass == Pass::Full {
                    area.crypt_method
                } else {
                    0
                };
                if crypt_method != CRYPT_LUKS {
                    return Err(ext_err(
                        ext_start,
                        "CRYPTO header extension only expected with LUKS encryption method".into(),
                    ));
                }
                if len != CRYPTO_EXT_LEN {
                    return Err(ext_err(
                        ext_start,
                        format!(
                            "CRYPTO header extension size {len}, but expected size {CRYPTO_EXT_LEN}"
                        ),
                    ));
                }
                let crypto_offset = read_u64(area.buf, offset);
                let length = read_u64(area.buf, offset.saturating_add(8));
                if area.cluster_size == 0 || !crypto_offset.is_multiple_of(area.cluster_size) {
                    return Err(ext_err(
                        ext_start,
                        format!(
                            "Encryption header offset '{crypto_offset}' is not a multiple of \
                             cluster size '{}'",
                            area.cluster_size
                        ),
                    ));
                }
                out.extensions.push(HeaderExtension::Crypto {
                    offset: crypto_offset,
                    length,
                });
            }
            EXT_BITMAPS => {
                if len != BITMAPS_EXT_LEN {
                    return Err(ext_err(
                        ext_start,
                        "bitmaps_ext: Invalid extension length".into(),
                    ));
                }
                let raw = data();
                let checked = check_bitmaps_ext(&raw, area.cluster_size);
                if area.autoclear & AUTOCLEAR_BITMAPS == 0 {
                    // QEMU only warns: the bitmaps are stale and the extension
                    // is dropped on the next header update. Keep it as it is.
                    out.extensions.push(match checked {
                        Ok(bitmaps) => HeaderExtension::Bitmaps(bitmaps),
                        Err(_) => HeaderExtension::Unknown {
                            ext_type,
                            data: raw,
                        },
                    });
                } else {
                    let bitmaps = checked.map_err(|reason| ext_err(ext_start, reason))?;
                    out.extensions.push(HeaderExtension::Bitmaps(bitmaps));
                }
            }
            EXT_DATA_FILE => {
                if pass == Pass::Full {
                    let name = utf8(data(), "External data file name")?;
                    out.extensions.push(HeaderExtension::DataFile(name));
                }
            }
            _ => {
                if pass == Pass::Full {
                    out.extensions.push(HeaderExtension::Unknown {
                        ext_type,
                        data: data(),
                    });
                }
            }
        }
        offset = offset.saturating_add(u64::from(len).next_multiple_of(8));
    }
    Ok(())
}

/// QEMU's checks of a 24-byte bitmaps extension payload, in its order.
fn check_bitmaps_ext(raw: &[u8], cluster_size: u64) -> Result<BitmapsExtension, String> {
    let nb_bitmaps = read_u32(raw, 0);
    let reserved = read_u32(raw, 4);
    let bitmap_directory_size = read_u64(raw, 8);
    let bitmap_directory_offset = read_u64(raw, 16);
    if reserved != 0 {
        return Err("bitmaps_ext: Reserved field is not zero".into());
    }
    if nb_bitmaps > MAX_BITMAPS {
        return Err(format!(
            "bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU supported \
             maximum of {MAX_BITMAPS}"
        ));
    }
    if nb_bitmaps == 0 {
        return Err("found bitmaps extension with zero bitmaps".into());
    }
    if cluster_size == 0 || !bitmap_directory_offset.is_multiple_of(cluster_size) {
        return Err("bitmaps_ext: invalid bitmap directory offset".into());
    }
    if bitmap_directory_size > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(format!(
            "bitmaps_ext: bitmap directory size ({bitmap_directory_size}) exceeds the maximum \
             supported size ({MAX_BITMAP_DIRECTORY_BYTES})"
        ));
    }
    Ok(BitmapsExtension {
        nb_bitmaps,
        bitmap_directory_size,
        bitmap_directory_offset,
    })
}

/// The typed feature name table, or `None` if `raw` cannot be represented
/// exactly by [`FeatureName`]s.
fn parse_feature_table(raw: &[u8]) -> Option<Vec<FeatureName>> {
    if !raw.len().is_multiple_of(FEATURE_ENTRY_LEN) {
        return None;
    }
    raw.chunks_exact(FEATURE_ENTRY_LEN)
        .map(|entry| {
            let (head, name_field) = entry.split_at(2);
            let kind = FeatureKind::from_raw(*head.first()?)?;
            let bit = *head.get(1)?;
            let name_len = name_field
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_field.len());
            let (name, padding) = name_field.split_at(name_len);
            if padding.iter().any(|&b| b != 0) {
                return None;
            }
            let name = String::from_utf8(name.to_vec()).ok()?;
            Some(FeatureName { kind, bit, name })
        })
        .collect()
}

/// QEMU's `report_unsupported_feature`: names from the image's feature table
/// for the bits it names (walking the table until an entry with an empty
/// name), then the remaining bits as a hex mask.
pub(super) fn unsupported_features_message(table: Option<&[u8]>, mut mask: u64) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(table) = table {
        // QEMU reads the table into a buffer with two zeroed entries appended,
        // so a partial last entry reads as zero-padded.
        let entries = table.len().div_ceil(FEATURE_ENTRY_LEN);
        for index in 0..entries {
            let start = (index * FEATURE_ENTRY_LEN) as u64;
            let entry: [u8; FEATURE_ENTRY_LEN] = read_array(table, start);
            let [kind, bit, name_field @ ..] = entry;
            let name_len = name_field
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_field.len());
            if name_len == 0 {
                break;
            }
            // C's `1ULL << bit` is undefined for bit >= 64; treat it as no match.
            let bit_mask = 1u64.checked_shl(bit.into()).unwrap_or(0);
            if kind == FeatureKind::Incompatible.raw() && mask & bit_mask != 0 {
                let name = name_field.get(..name_len).unwrap_or_default();
                parts.push(String::from_utf8_lossy(name).into_owned());
                mask &= !bit_mask;
            }
        }
    }
    if mask != 0 {
        parts.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    format!("Unsupported qcow2 feature(s): {}", parts.join(", "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
#[path = "ext_tests.rs"]
mod tests;
