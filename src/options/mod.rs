//! Options, parsed the way QEMU 10 parses them (`qcow2-format.md` §5, §6, §7.1,
//! §9.4, §11.1, §12; `cli.md` §0, §2, §7, §12.2).
//!
//! * [`parse_size`]: qemu-img's size syntax (`1536b`, `512k`, `1.5G`, ...).
//! * QemuOpts `key=value,key=value` lists (`,,` is a literal comma,
//!   a bare `key` means `key=on`, a bare `nokey` means `key=off`): parsed by the typed
//!   `from_qemu_str` constructors below.
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

use crate::format::consts::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

// The items live in private submodules and are re-exported below, so every public path is
// `qcow2kit::options::NAME`. `cnum` holds the C/QEMU number parsers behind `parse`.
mod amend;
mod cache;
mod cnum;
mod create;
mod error;
mod open;
mod overlap;
pub(crate) mod parse;
mod policy;
#[cfg(test)]
mod testutil;

/// `file.locking` values (defined with the locks in [`crate::storage::lock`]).
pub use crate::storage::Locking;
pub use amend::{AmendImageState, AmendOptions};
pub use cache::{cache_config, CacheConfig};
pub use create::{Compat, CompressionType, CreateOptions, Preallocation};
pub use error::{OptionError, SizeError};
pub use open::{BackingBackend, OpenOptions};
pub use overlap::{OverlapCheckMode, OverlapCheckOptions, OverlapChecks};
// The rest of QEMU's option-string syntax (`parse`) is used inside this
// module and by the command-line tools, through `crate::cli_support`.
pub use parse::{parse_image_size, parse_size};
pub use policy::{BackingPolicy, ErrorAction, ErrorPolicy};

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

/// A power of two between 512 bytes and 2 MiB.
fn valid_cluster_size(cluster_size: u64) -> bool {
    cluster_size.is_power_of_two() && (MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;

    use super::parse::*;
    use super::*;
    use crate::options::testutil::fresh_image;

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
    }
}
