//! Protocol drivers other than `file` under the qcow2 layer, selected by `file.driver=`
//! in a QEMU option string (`--image-opts`): `null-co`/`null-aio` ([`NullStorage`]),
//! `nbd` ([`NbdStorage`]), `quorum` ([`QuorumStorage`]) and `blkdebug`
//! ([`BlkdebugStorage`]). A [`BackendSpec`] holds the driver and its options (the keys
//! below `file.`); it is checked when the option string is parsed and opened with
//! [`open_from_options`].

use super::{BlkdebugStorage, FileStorage, NbdStorage, NullStorage, QuorumStorage, Storage};
use crate::error::strerror;
use crate::options::parse::{parse_bool_onoff, parse_number, parse_size_option};
use std::path::Path;
use std::sync::Arc;

/// The driver names [`BackendSpec`] accepts besides `file`.
pub const BACKEND_DRIVERS: &[&str] = &["null-co", "null-aio", "nbd", "quorum", "blkdebug"];

/// A protocol driver and its options, as given below one prefix (`file.`) of an option
/// string: `driver` is the value of `file.driver`, `options` the other `file.*` pairs
/// with the prefix removed, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The driver (`null-co`, `null-aio`, `nbd`, `quorum`, `blkdebug` or `file`).
    pub driver: String,
    /// `key=value` pairs relative to the driver node (`size`, `server.path`, ...).
    pub options: Vec<(String, String)>,
}

impl BackendSpec {
    /// The value of `key`, the last one if given several times.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The options below `prefix.` as a spec of their own (`driver` from `prefix.driver`,
    /// empty when absent).
    pub fn child(&self, prefix: &str) -> BackendSpec {
        let p = format!("{prefix}.");
        let mut driver = String::new();
        let mut options = Vec::new();
        for (k, v) in &self.options {
            if let Some(rest) = k.strip_prefix(&p) {
                if rest == "driver" {
                    driver = v.clone();
                } else {
                    options.push((rest.to_owned(), v.clone()));
                }
            }
        }
        BackendSpec { driver, options }
    }

    /// Checks the options without opening anything; the error is QEMU's message.
    ///
    /// # Errors
    /// QEMU's text for an unknown option or a bad value.
    pub fn validate(&self) -> Result<(), String> {
        match self.driver.as_str() {
            "null-co" | "null-aio" => null_config(self).map(|_| ()),
            "nbd" => super::nbd::NbdConfig::parse(self).map(|_| ()),
            "quorum" => super::quorum::QuorumConfig::parse(self).map(|_| ()),
            "blkdebug" => super::blkdebug::BlkdebugConfig::parse_inline(self).map(|_| ()),
            "file" => file_config(self).map(|_| ()),
            other => Err(format!("Unknown driver '{other}'")),
        }
    }
}

/// Opens the storage `spec` describes (read-write unless `read_only`).
///
/// ```
/// use qcow2kit::storage::{open_from_options, BackendSpec};
///
/// let spec = BackendSpec {
///     driver: "null-co".into(),
///     options: vec![("size".into(), "1M".into())],
/// };
/// let s = open_from_options(&spec, false).unwrap();
/// assert_eq!(s.len().unwrap(), 1 << 20);
/// ```
///
/// # Errors
/// QEMU's `can't open` text (without that prefix): bad options, a server that cannot be
/// reached, a child file that cannot be opened.
pub fn open_from_options(spec: &BackendSpec, read_only: bool) -> Result<Arc<dyn Storage>, String> {
    Ok(match spec.driver.as_str() {
        "null-co" | "null-aio" => Arc::new(null_config(spec)?),
        "nbd" => Arc::new(NbdStorage::connect(&super::nbd::NbdConfig::parse(spec)?)?),
        "quorum" => Arc::new(QuorumStorage::open(spec, read_only)?),
        "blkdebug" => Arc::new(BlkdebugStorage::open(spec, read_only)?),
        "file" => {
            let path = file_config(spec)?;
            let f = FileStorage::open(Path::new(&path), !read_only).map_err(|e| {
                format!(
                    "Could not open '{path}': {}",
                    strerror(e.raw_os_error().unwrap_or(libc::EIO))
                )
            })?;
            Arc::new(f)
        }
        other => return Err(format!("Unknown driver '{other}'")),
    })
}

fn unsupported(driver: &str, key: &str) -> String {
    format!("Block protocol '{driver}' doesn't support the option '{key}'")
}

fn file_config(spec: &BackendSpec) -> Result<String, String> {
    let mut path = None;
    for (k, v) in &spec.options {
        match k.as_str() {
            "filename" => path = Some(v.clone()),
            "locking" | "aio" | "node-name" | "read-only" => {}
            _ => return Err(unsupported("file", k)),
        }
    }
    path.ok_or_else(|| "The 'file' block driver requires a file name".to_owned())
}

fn null_config(spec: &BackendSpec) -> Result<NullStorage, String> {
    let mut size = 1u64 << 30;
    let mut zeroes = false;
    let mut latency = 0;
    for (k, v) in &spec.options {
        match k.as_str() {
            "size" => {
                size = parse_size_option(k, v).map_err(|e| e.to_string())?;
            }
            "read-zeroes" => zeroes = parse_bool_onoff(k, v).map_err(|e| e.to_string())?,
            "latency-ns" => latency = parse_number(k, v).map_err(|e| e.to_string())?,
            "filename" | "node-name" | "read-only" => {}
            _ => return Err(unsupported(&spec.driver, k)),
        }
    }
    Ok(NullStorage::new(size)
        .read_zeroes(zeroes)
        .latency_ns(latency))
}
