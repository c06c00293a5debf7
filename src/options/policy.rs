//! Error policy and backing policy (§12): `rerror`/`werror` and which backing files an open
//! may follow.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::OptionError;

/// What to do when a guest I/O request fails (`rerror=` / `werror=`, QEMU's `BlockdevOnError`
/// without `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    /// Report the error to the guest (default).
    #[default]
    Report,
    /// Ignore the error (pretend success).
    Ignore,
    /// Stop the VM.
    Stop,
    /// Stop on ENOSPC, report anything else (writes only).
    Enospc,
}

/// The action taken for one failed request (QEMU's `BlockErrorAction`, the `action` of a
/// `BLOCK_IO_ERROR` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorAction {
    /// The error was ignored.
    Ignore,
    /// The error was reported to the guest.
    Report,
    /// The VM was stopped.
    Stop,
}

impl ErrorAction {
    /// QEMU's name: `ignore`, `report`, `stop`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

impl fmt::Display for ErrorAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ErrorPolicy {
    /// Parses a `rerror=` (`read` true) or `werror=` value like QEMU's
    /// `parse_block_error_action`: `ignore`, `stop`, `report`, and `enospc` for writes only.
    ///
    /// # Errors
    /// [`OptionError::BadErrorAction`]: `'X' invalid read error action` (or `write`).
    pub fn parse(value: &str, read: bool) -> Result<Self, OptionError> {
        match value {
            "ignore" => Ok(ErrorPolicy::Ignore),
            "enospc" if !read => Ok(ErrorPolicy::Enospc),
            "stop" => Ok(ErrorPolicy::Stop),
            "report" => Ok(ErrorPolicy::Report),
            _ => Err(OptionError::BadErrorAction {
                value: value.to_owned(),
                operation: if read { "read" } else { "write" },
            }),
        }
    }

    /// The action for a failed request; `nospace` is whether the error was ENOSPC.
    pub const fn action_for(self, nospace: bool) -> ErrorAction {
        match self {
            ErrorPolicy::Report => ErrorAction::Report,
            ErrorPolicy::Ignore => ErrorAction::Ignore,
            ErrorPolicy::Stop => ErrorAction::Stop,
            ErrorPolicy::Enospc => {
                if nospace {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        }
    }

    /// QEMU's name: `report`, `ignore`, `stop`, `enospc`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorPolicy::Report => "report",
            ErrorPolicy::Ignore => "ignore",
            ErrorPolicy::Stop => "stop",
            ErrorPolicy::Enospc => "enospc",
        }
    }
}

impl fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which backing files an open may follow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Open any backing file the header names (QEMU's behaviour).
    #[default]
    Follow,
    /// Never open a backing file.
    Refuse,
    /// Open only these files, or files below these directories.
    AllowList(Vec<PathBuf>),
}

impl BackingPolicy {
    /// Whether `path` may be opened as a backing file.
    ///
    /// For [`BackingPolicy::AllowList`] both sides are canonicalised where possible (symlinks
    /// resolved, so a link inside an allowed directory that points outside it is refused); a
    /// path that does not exist (yet) is resolved through its deepest existing ancestor and then
    /// lexically. An entry that is an existing directory (or ends with a separator) permits
    /// everything below it; any other entry permits exactly that file. Relative paths are taken
    /// relative to the current directory: resolve a header's relative backing name against the
    /// image's directory before asking.
    pub fn permits(&self, path: &Path) -> bool {
        match self {
            BackingPolicy::Follow => true,
            BackingPolicy::Refuse => false,
            BackingPolicy::AllowList(entries) => {
                let target = resolve_path(path);
                entries.iter().any(|entry| {
                    let allowed = resolve_path(entry);
                    if target == allowed {
                        return true;
                    }
                    let is_dir = allowed.is_dir()
                        || entry
                            .as_os_str()
                            .to_string_lossy()
                            .ends_with(std::path::MAIN_SEPARATOR);
                    is_dir && target.starts_with(&allowed)
                })
            }
        }
    }
}

/// Canonical form of `path`: `canonicalize` where it works, else the canonical deepest
/// existing ancestor plus the remaining components with `.`/`..` resolved lexically.
fn resolve_path(path: &Path) -> PathBuf {
    if let Ok(canonical) = std::fs::canonicalize(path) {
        return canonical;
    }
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(dir) => dir.join(path),
            Err(_) => path.to_path_buf(),
        }
    };
    let (mut out, rest) = absolute
        .ancestors()
        .skip(1)
        .find_map(|anc| {
            let canonical = std::fs::canonicalize(anc).ok()?;
            let rest = absolute.strip_prefix(anc).ok()?.to_path_buf();
            Some((canonical, rest))
        })
        .unwrap_or_else(|| (PathBuf::new(), absolute.clone()));
    for component in rest.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn error_policies() {
        assert_eq!(ErrorPolicy::parse("report", true), Ok(ErrorPolicy::Report));
        assert_eq!(ErrorPolicy::parse("ignore", true), Ok(ErrorPolicy::Ignore));
        assert_eq!(ErrorPolicy::parse("stop", false), Ok(ErrorPolicy::Stop));
        assert_eq!(ErrorPolicy::parse("enospc", false), Ok(ErrorPolicy::Enospc));
        assert_eq!(
            ErrorPolicy::parse("enospc", true).unwrap_err().to_string(),
            "'enospc' invalid read error action"
        );
        assert_eq!(ErrorPolicy::default(), ErrorPolicy::Report);
        for nospace in [false, true] {
            assert_eq!(ErrorPolicy::Report.action_for(nospace), ErrorAction::Report);
            assert_eq!(ErrorPolicy::Ignore.action_for(nospace), ErrorAction::Ignore);
            assert_eq!(ErrorPolicy::Stop.action_for(nospace), ErrorAction::Stop);
        }
        assert_eq!(ErrorPolicy::Enospc.action_for(true), ErrorAction::Stop);
        assert_eq!(ErrorPolicy::Enospc.action_for(false), ErrorAction::Report);
        assert_eq!(ErrorAction::Stop.to_string(), "stop");
        assert_eq!(ErrorPolicy::Enospc.to_string(), "enospc");
    }

    #[cfg(unix)]
    #[test]
    fn backing_policy_permits() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let allowed = root.join("allowed");
        let other = root.join("other");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(allowed.join("base.qcow2"), b"").unwrap();
        std::fs::write(other.join("secret.qcow2"), b"").unwrap();
        std::fs::write(root.join("single.qcow2"), b"").unwrap();
        std::os::unix::fs::symlink(other.join("secret.qcow2"), allowed.join("link.qcow2")).unwrap();

        assert!(BackingPolicy::Follow.permits(&other.join("secret.qcow2")));
        assert!(!BackingPolicy::Refuse.permits(&allowed.join("base.qcow2")));

        let policy = BackingPolicy::AllowList(vec![allowed.clone(), root.join("single.qcow2")]);
        assert!(policy.permits(&allowed.join("base.qcow2")));
        assert!(policy.permits(&allowed.join("sub/../base.qcow2")));
        assert!(policy.permits(&allowed.join("sub/not-yet.qcow2")));
        assert!(policy.permits(&root.join("single.qcow2")));
        assert!(policy.permits(&root.join("other/../single.qcow2")));
        assert!(!policy.permits(&other.join("secret.qcow2")));
        // A symlink inside the allowed directory pointing outside is refused.
        assert!(!policy.permits(&allowed.join("link.qcow2")));
        // `..` out of the allowed directory, existing or not, is refused.
        assert!(!policy.permits(&allowed.join("../other/secret.qcow2")));
        assert!(!policy.permits(&allowed.join("nope/../../other/x.qcow2")));
        // A file entry does not allow its "children" or siblings.
        assert!(!policy.permits(&root.join("single.qcow2/x")));
        assert!(!policy.permits(&root.join("single.qcow2x")));
        // A directory entry does not allow a sibling with the same prefix.
        std::fs::write(root.join("allowed2"), b"").unwrap();
        assert!(!policy.permits(&root.join("allowed2")));
    }
}
