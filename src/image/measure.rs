//! `qemu-img measure` arithmetic for qcow2 targets (QEMU's `qcow2_measure`
//! and `qcow2_calc_prealloc_size`): how large a new image is right after
//! creation or conversion and when every cluster is allocated. Pure
//! computation; walking a source image's allocation is the caller's part.

use crate::error::{Error, Limit, Result};
use crate::format::consts::MAX_L1_BYTES;
use crate::meta::refcount_metadata_size;
use crate::options::{Compat, CreateOptions, Preallocation};

/// What `measure` reports for a qcow2 target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// File size right after creating (or converting into) the image.
    pub required: u64,
    /// File size with every cluster allocated.
    pub fully_allocated: u64,
}

/// The file size of an image of `virtual_size` bytes with every cluster
/// allocated: header cluster, L2 tables, L1 table, refcount structures and
/// data (QEMU's `qcow2_calc_prealloc_size`).
///
/// # Errors
/// `Error::TooLarge` when the sizes overflow.
pub fn fully_allocated_size(
    virtual_size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> Result<u64> {
    let too_large = || Error::TooLarge(Limit::DiskSize { size: virtual_size });
    let cs = cluster_size;
    let aligned = virtual_size
        .checked_next_multiple_of(cs)
        .ok_or_else(too_large)?;
    let l2e: u64 = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs)
        .checked_next_multiple_of(cs / l2e)
        .ok_or_else(too_large)?;
    meta = nl2e
        .checked_mul(l2e)
        .and_then(|b| b.checked_add(meta))
        .ok_or_else(too_large)?;
    let nl1e = (nl2e * l2e / cs)
        .checked_next_multiple_of(cs / 8)
        .ok_or_else(too_large)?;
    meta = nl1e
        .checked_mul(8)
        .and_then(|b| b.checked_add(meta))
        .ok_or_else(too_large)?;
    let clusters = meta.checked_add(aligned).ok_or_else(too_large)? / cs;
    let (blocks, table) = refcount_metadata_size(clusters, cs, refcount_order, false);
    blocks
        .checked_add(table)
        .and_then(|n| n.checked_mul(cs))
        .and_then(|b| b.checked_add(meta))
        .and_then(|b| b.checked_add(aligned))
        .ok_or_else(too_large)
}

/// `qcow2_measure` for the target options `opts` (cluster size, extended
/// L2, refcount width, preallocation, backing file and a LUKS volume,
/// sized for its cipher, are what count; the rest is ignored, as QEMU
/// does) and a disk of `virtual_size` bytes.
/// `data` is the number of bytes the source's data occupies once rounded
/// to whole target clusters (`None` without a source: nothing).
///
/// # Errors
/// The options' errors QEMU reports at measure time (cluster size,
/// refcount width, and for `encrypt.format=luks` those of
/// [`EncryptOptions::resolve`](crate::options::EncryptOptions::resolve):
/// no `encrypt.key-secret`, no such secret, a bad algorithm name), `Error::TooLarge` for a disk the L1 table cannot map.
pub fn qcow2(opts: &CreateOptions, virtual_size: u64, data: Option<u64>) -> Result<Measurement> {
    use crate::options::OptionError;
    let invalid = |e: OptionError| Error::InvalidArgument(e.to_string());
    // QEMU's order: cluster size, version, refcount width, preallocation.
    let cs = opts.cluster_size;
    if !(512..=(2 << 20)).contains(&cs) || !cs.is_power_of_two() {
        return Err(invalid(OptionError::ClusterSize));
    }
    if opts.extended_l2 && cs < crate::options::MIN_EXTENDED_L2_CLUSTER_SIZE {
        return Err(invalid(OptionError::ExtendedL2ClusterSize));
    }
    if let Some(spelling) = &opts.compat_spelling {
        if spelling.parse::<Compat>().is_err() {
            // qcow2_opt_get_version_del's text (creation says it otherwise).
            return Err(Error::InvalidArgument(format!(
                "Invalid compatibility level: '{spelling}'"
            )));
        }
    }
    let bits = opts.refcount_bits;
    if !bits.is_power_of_two() || bits > 64 {
        return Err(Error::InvalidArgument(
            OptionError::RefcountWidth.to_string(),
        ));
    }
    if opts.compat == Compat::V2 && bits != 16 {
        // qcow2_opt_get_refcount_bits_del's text.
        return Err(Error::InvalidArgument(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use compat=1.1 or greater)"
                .into(),
        ));
    }
    if let Some(spelling) = opts.spellings.get("preallocation") {
        if spelling.parse::<Preallocation>().is_err() {
            return Err(invalid(OptionError::InvalidParameterValue {
                option: "preallocation",
                value: spelling.clone(),
            }));
        }
    }
    let luks = luks_volume_bytes(opts)?;
    let aligned = virtual_size
        .checked_next_multiple_of(cs)
        .ok_or(Error::TooLarge(Limit::DiskSize { size: virtual_size }))?;
    let l2e: u64 = if opts.extended_l2 { 16 } else { 8 };
    let l2_tables = (aligned / cs).div_ceil(cs / l2e);
    if l2_tables.saturating_mul(8) > MAX_L1_BYTES {
        return Err(Error::InvalidArgument(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    let mut required = match data {
        // Any backing file may share nothing with the source: every
        // cluster counts.
        Some(_) if opts.backing_file.is_some() => aligned,
        Some(d) => d,
        None => 0,
    };
    if matches!(
        opts.preallocation,
        Preallocation::Falloc | Preallocation::Full
    ) {
        required = aligned;
    }
    let fully = fully_allocated_size(aligned, cs, bits.trailing_zeros(), opts.extended_l2)?;
    let too_large = || Error::TooLarge(Limit::DiskSize { size: virtual_size });
    Ok(Measurement {
        required: (fully - aligned + required)
            .checked_add(luks)
            .ok_or_else(too_large)?,
        fully_allocated: fully.checked_add(luks).ok_or_else(too_large)?,
    })
}

/// The clusters a LUKS volume of the target takes (QEMU's
/// `luks_payload_size`): only `encrypt.format=luks` counts (the legacy
/// `aes` format and the `encryption` alias add nothing, and measure does
/// not look at other values). The options are resolved as creation would
/// (QEMU builds a throw-away volume), so a missing `encrypt.key-secret`,
/// an unknown secret or a bad algorithm name is refused with QEMU's
/// message; no key is derived.
fn luks_volume_bytes(opts: &CreateOptions) -> Result<u64> {
    if opts.encrypt.format.as_deref() != Some("luks") {
        return Ok(0);
    }
    let mut encrypt = opts.encrypt.clone();
    encrypt.encryption = None;
    let Some(luks) = encrypt.resolve(opts.get_secrets())? else {
        return Ok(0);
    };
    let cipher = &luks.spec.cipher;
    let key_len = crate::crypto::luks::master_key_len(cipher.cipher_alg, cipher.cipher_mode)?;
    crate::crypto::luks::volume_len(key_len)
        .checked_next_multiple_of(opts.cluster_size)
        .ok_or(Error::Internal("LUKS volume size".into()))
}

/// The space persistent bitmaps of a `disk_size`-byte disk take in a
/// target with `cluster_size` clusters: each bitmap whole plus its table,
/// and the directory (QEMU's `qcow2_get_persistent_dirty_bitmap_size`).
/// `bitmaps` gives each bitmap's name length and granularity.
pub fn bitmaps_size(disk_size: u64, cluster_size: u64, bitmaps: &[(usize, u64)]) -> u64 {
    let cs = cluster_size.max(1);
    let mut size = 0u64;
    let mut dir = 0u64;
    for &(name_len, granularity) in bitmaps {
        let bits = disk_size.div_ceil(granularity.max(1));
        let clusters = bits.div_ceil(8).div_ceil(cs);
        size = size.saturating_add(clusters.saturating_mul(cs));
        size = size.saturating_add(clusters.saturating_mul(8).div_ceil(cs).saturating_mul(cs));
        dir = dir.saturating_add((24 + name_len as u64).div_ceil(8) * 8);
    }
    size.saturating_add(dir.div_ceil(cs).saturating_mul(cs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_qemu_examples() {
        let m = |o: CreateOptions, size: u64| qcow2(&o, size, None).unwrap();
        let g = 1u64 << 30;
        assert_eq!(
            m(CreateOptions::new(), g),
            Measurement {
                required: 393_216,
                fully_allocated: 1_074_135_040
            }
        );
        let o = CreateOptions::new().cluster_size(4096).refcount_bits(64);
        assert_eq!(m(o, g).required, 4_222_976);
        assert_eq!(
            m(CreateOptions::new().extended_l2(true), g).required,
            524_288
        );
        assert_eq!(m(CreateOptions::new(), 0).required, 196_608);
        // A LUKS volume, sized for its cipher and rounded to clusters
        // (qemu-img measure's numbers).
        let mut secrets = crate::crypto::SecretStore::new();
        secrets.insert("s", crate::crypto::Secret::new("pw"));
        let luks = |extra: &str| {
            CreateOptions::from_qemu_str(&format!(
                "encrypt.format=luks,encrypt.key-secret=s{extra}"
            ))
            .unwrap()
            .secrets(secrets.clone())
        };
        assert_eq!(
            m(luks(""), g),
            Measurement {
                required: 2_490_368,
                fully_allocated: 1_076_232_192
            }
        );
        assert_eq!(m(luks(",encrypt.cipher-mode=cbc"), g).required, 1_507_328);
        assert_eq!(m(luks(",cluster_size=512"), g).required, 23_453_696);
        // The legacy format and unknown formats add nothing.
        let aes = CreateOptions::from_qemu_str("encrypt.format=aes").unwrap();
        assert_eq!(m(aes, g).required, 393_216);
        // No key: QEMU's message, before the size check.
        let no_key = CreateOptions::from_qemu_str("encrypt.format=luks").unwrap();
        let e = qcow2(&no_key, u64::MAX / 2, None).unwrap_err();
        assert!(matches!(e, Error::EncryptionKeyRequired), "{e:?}");
        assert_eq!(
            bitmaps_size(64 << 20, 65536, &[(2, 65536), (2, 4096)]),
            327_680
        );
    }
}
