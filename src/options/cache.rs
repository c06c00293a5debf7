//! Cache sizing (§6.2): QEMU 10's L2 and refcount cache sizes for an open image.

use super::error::OptionError;
use super::open::OpenOptions;
use super::{
    valid_cluster_size, DEFAULT_CACHE_CLEAN_INTERVAL, DEFAULT_L2_CACHE_MAX_SIZE, MIN_CLUSTER_SIZE,
    MIN_L2_CACHE_SLICES, MIN_REFCOUNT_CACHE_BLOCKS,
};
use crate::format::consts::SECTOR_SIZE;

/// `INT_MAX`: upper bound of the cache entry counts.
const INT_MAX: u64 = i32::MAX as u64;

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

    let l2_cache_max_setting = opts
        .get_l2_cache_size()
        .unwrap_or(DEFAULT_L2_CACHE_MAX_SIZE);
    let mut refcount_cache = opts.get_refcount_cache_size().unwrap_or(0);
    let mut entry_size = opts.get_l2_cache_entry_size().unwrap_or(cluster_size);
    let mut l2_cache = max_l2_cache.min(l2_cache_max_setting);

    if let Some(combined) = opts.get_cache_size() {
        if opts.get_l2_cache_size().is_some() && opts.get_refcount_cache_size().is_some() {
            return Err(OptionError::CacheSizeAllThree);
        } else if opts.get_l2_cache_size().is_some() && l2_cache_max_setting > combined {
            return Err(OptionError::L2CacheExceedsCacheSize);
        } else if refcount_cache > combined {
            return Err(OptionError::RefcountCacheExceedsCacheSize);
        }
        if opts.get_l2_cache_size().is_some() {
            refcount_cache = combined.saturating_sub(l2_cache);
        } else if opts.get_refcount_cache_size().is_some() {
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
    if l2_cache < max_l2_cache && opts.get_l2_cache_entry_size().is_none() {
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
        .get_cache_clean_interval()
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::options::testutil::{GIB, KIB, MIB, TIB};

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

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
    }
}
