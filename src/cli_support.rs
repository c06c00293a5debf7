//! Machinery of the command-line tools (`qcow2-img`, `qcow2-check`), which
//! are separate crates built on this library.
//!
//! **Not part of the API**: hidden from the documentation, exempt from semver,
//! may change or go away in any release. Embedders should use
//! [`OpenOptions::from_qemu_str`](crate::OpenOptions::from_qemu_str) and
//! [`CreateOptions::from_qemu_str`](crate::CreateOptions::from_qemu_str) for
//! QEMU's option strings instead.

pub use crate::options::parse::{
    check_option_list, escape_option_value, option_string_wants_help, parse_bool_onoff,
    parse_number, split_option_string, validate_node_name,
};

/// The `Snapshot list:` table of `qemu-img snapshot -l` and `info` without
/// its title: the header line and one line per snapshot.
pub fn snapshot_table(snaps: &[crate::info::SnapshotInfo]) -> Vec<String> {
    crate::info::snapshot_table(snaps)
}
