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
/// L2, refcount width, preallocation and backing file are what count;
/// the rest is ignored, as QEMU does) and a disk of `virtual_size` bytes.
/// `data` is the number of bytes the source's data occupies once rounded
/// to whole target clusters (`None` without a source: nothing).
///
/// # Errors
/// The options' errors QEMU reports at measure time (cluster size,
/// refcount width), `Error::TooLarge` for a disk the L1 table cannot map.
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
    Ok(Measurement {
        required: fully - aligned + required,
        fully_allocated: fully,
    })
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
        assert_eq!(
            bitmaps_size(64 << 20, 65536, &[(2, 65536), (2, 4096)]),
            327_680
        );
    }
}
