//! Image locking compatible with QEMU's file driver (`block/file-posix.c`).
//!
//! QEMU describes what each user of a file does with *permissions*
//! ([`Permissions`]: consistent read, write, write unchanged, resize) and
//! publishes them as shared (read) byte-range locks on the file itself:
//!
//! | byte | held while this open … |
//! |---|---|
//! | `100 + i` ([`LOCK_PERM_BASE`]) | holds permission *i* |
//! | `200 + i` ([`LOCK_SHARED_BASE`]) | does **not** let others take permission *i* |
//!
//! (*i* = 0 consistent read, 1 write, 2 write unchanged, 3 resize.) A new open first takes its
//! own bytes, then tests, for every permission it wants, that nobody else locks
//! `200 + i`, and, for every permission it does not share, that nobody else locks `100 + i`.
//! Since the locks are shared locks, taking them never fails; only the tests find conflicts, and
//! the first one found is the error: `Failed to get "write" lock` (someone does not share a
//! permission we want) or `Failed to get shared "write" lock` (someone holds a permission we do
//! not share).
//!
//! The locks are open-file-description locks (`F_OFD_SETLK`/`F_OFD_GETLK`): they belong to
//! one open of the file, are released when it is closed, and two opens of the same file in one
//! process exclude each other just as two processes do. What qcow2kit asks for is what
//! `qemu-img`/`qemu-io` 10 ask for (observed in `/proc/locks`), so a QEMU process and a
//! qcow2kit process exclude each other exactly as two QEMU processes do:
//!
//! | open | permissions | shares | bytes |
//! |---|---|---|---|
//! | image file, read-write | consistent read, write, resize | consistent read, write unchanged | 100 101 103 201 203 |
//! | image file, read-only (also a qcow2 backing file) | consistent read | consistent read, write unchanged | 100 201 203 |
//! | any file with `force-share=on` | consistent read | everything | 100 |
//! | data file, read-write | consistent read, write, resize | all but resize | 100 101 103 203 |
//! | data file, read-only | consistent read | all but resize | 100 203 |
//! | raw backing file | consistent read | everything | 100 |
//! | file being created | write, resize | all but resize | 101 103 203 |

use super::sys;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Whether an open takes locks: QEMU's `file.locking` (`locking=on|off|auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Lock where open-file-description locks are supported (Linux ≥ 3.15), QEMU's default.
    #[default]
    Auto,
    /// Always lock: open-file-description locks, or process-associated POSIX locks where the
    /// kernel lacks them (as QEMU falls back; such locks are shared by the whole process and
    /// dropped when any descriptor of the file is closed).
    On,
    /// Take no locks and test none: nothing stops another process from using the image.
    Off,
}

impl Locking {
    /// Parses QEMU's `OnOffAuto` value (`on`, `off`, `auto`; exact spelling).
    pub fn parse(value: &str) -> Option<Locking> {
        match value {
            "on" => Some(Locking::On),
            "off" => Some(Locking::Off),
            "auto" => Some(Locking::Auto),
            _ => None,
        }
    }

    /// The option value as QEMU spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Locking::On => "on",
            Locking::Off => "off",
            Locking::Auto => "auto",
        }
    }
}

/// Number of QEMU block permissions (`BLOCK_PERMISSION__MAX` in QEMU 10).
const PERM_COUNT: u8 = 4;

/// First lock byte of the "holds permission *i*" range (QEMU's `RAW_LOCK_PERM_BASE`).
pub const LOCK_PERM_BASE: u64 = 100;

/// First lock byte of the "does not share permission *i*" range (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const LOCK_SHARED_BASE: u64 = 200;

/// A set of QEMU block permissions (`BLK_PERM_*`).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Permissions(u8);

impl Permissions {
    /// No permission.
    pub const NONE: Permissions = Permissions(0);
    /// Reading gives consistent data (`BLK_PERM_CONSISTENT_READ`).
    pub const CONSISTENT_READ: Permissions = Permissions(1);
    /// Writing (`BLK_PERM_WRITE`).
    pub const WRITE: Permissions = Permissions(2);
    /// Writing data that does not change what is read (`BLK_PERM_WRITE_UNCHANGED`).
    pub const WRITE_UNCHANGED: Permissions = Permissions(4);
    /// Changing the file's length (`BLK_PERM_RESIZE`).
    pub const RESIZE: Permissions = Permissions(8);
    /// Every permission (`BLK_PERM_ALL`).
    pub const ALL: Permissions = Permissions(15);

    /// Both sets.
    #[must_use]
    pub const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    /// This set without `other`.
    #[must_use]
    pub const fn without(self, other: Permissions) -> Permissions {
        Permissions(self.0 & !other.0)
    }

    /// Whether every permission of `other` is in this set.
    pub const fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    /// The single permissions in this set, lowest bit first, with their bit index.
    fn bits(self) -> impl Iterator<Item = (u8, Permissions)> {
        (0..PERM_COUNT)
            .map(|i| (i, Permissions(1 << i)))
            .filter(move |(_, p)| self.contains(*p))
    }

    /// QEMU's names (`bdrv_perm_names`), comma-separated: `consistent read`, `write`,
    /// `write unchanged`, `resize`.
    pub fn names(self) -> String {
        self.bits()
            .map(|(i, _)| perm_name(i))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permissions({})", self.names())
    }
}

/// QEMU's name of permission bit `i`.
fn perm_name(i: u8) -> &'static str {
    match i {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

/// What one open of a file asks for: the permissions it takes and those it lets others take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRequest {
    /// Permissions this open takes.
    pub perm: Permissions,
    /// Permissions others may still take.
    pub shared: Permissions,
    /// Whether to lock at all.
    pub locking: Locking,
}

impl LockRequest {
    /// Shares everything with `force-share`, else `shared`.
    fn sharing(force_share: bool, shared: Permissions) -> Permissions {
        if force_share {
            Permissions::ALL
        } else {
            shared
        }
    }

    /// The image file of a qcow2 image (QEMU's `file` child: metadata and data). Read-only opens
    /// take consistent read, read-write ones write and resize too; neither shares write or
    /// resize, unless `force_share` (which shares everything).
    pub fn image_file(read_only: bool, force_share: bool, locking: Locking) -> LockRequest {
        let perm = if read_only {
            Permissions::CONSISTENT_READ
        } else {
            Permissions::CONSISTENT_READ
                .union(Permissions::WRITE)
                .union(Permissions::RESIZE)
        };
        let shared = Permissions::CONSISTENT_READ.union(Permissions::WRITE_UNCHANGED);
        LockRequest {
            perm,
            shared: Self::sharing(force_share, shared),
            locking,
        }
    }

    /// An external data file (QEMU's `data-file` child): as [`LockRequest::image_file`] for
    /// the permissions, but only resize is not shared.
    pub fn data_file(read_only: bool, force_share: bool, locking: Locking) -> LockRequest {
        LockRequest {
            shared: Self::sharing(force_share, Permissions::ALL.without(Permissions::RESIZE)),
            ..Self::image_file(read_only, force_share, locking)
        }
    }

    /// What QEMU asks of a data file when it attaches it, before the image's own users add
    /// theirs: no permission, everything but resize shared. Taken first, so the first
    /// conflict reported is QEMU's (`Failed to get shared "resize" lock`).
    pub fn data_file_attach(force_share: bool, locking: Locking) -> LockRequest {
        LockRequest {
            perm: Permissions::NONE,
            ..Self::data_file(true, force_share, locking)
        }
    }

    /// A raw backing file: consistent read, everything shared.
    pub fn raw_backing(locking: Locking) -> LockRequest {
        LockRequest {
            perm: Permissions::CONSISTENT_READ,
            shared: Permissions::ALL,
            locking,
        }
    }

    /// A file being created (QEMU's `raw_co_create`): write and resize, everything but resize
    /// shared. Taken before the file is truncated, so a held image is left as it is.
    pub fn create(locking: Locking) -> LockRequest {
        LockRequest {
            perm: Permissions::WRITE.union(Permissions::RESIZE),
            shared: Permissions::ALL.without(Permissions::RESIZE),
            locking,
        }
    }
}

/// Why an open could not take its locks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another open of the file holds a lock that conflicts with the request: it does not
    /// share `perm` (which this open wants), or, with `shared`, it holds `perm` (which this open
    /// does not share).
    #[error(
        "failed to get {}\"{}\" lock on '{}': another process may be using the image",
        if *shared { "shared " } else { "" },
        perm.names(),
        path.display()
    )]
    Conflict {
        /// The file.
        path: PathBuf,
        /// The one permission concerned.
        perm: Permissions,
        /// `true`: someone holds `perm`, which we do not share; `false`: someone does not share
        /// `perm`, which we want.
        shared: bool,
    },
    /// `fcntl` failed on a lock byte.
    #[error("could not {op} byte {byte} of '{}': {source}", path.display())]
    Syscall {
        /// The file.
        path: PathBuf,
        /// The lock byte.
        byte: u64,
        /// `lock`, `unlock` or `test`.
        op: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

impl LockError {
    /// The message QEMU prints for this condition, hint line included
    /// (`Failed to get "write" lock` + `Is another process using the image [FILE]?`).
    pub fn qemu_message(&self) -> String {
        match self {
            LockError::Conflict { path, perm, shared } => format!(
                "Failed to get {}\"{}\" lock\nIs another process using the image [{}]?",
                if *shared { "shared " } else { "" },
                perm.names(),
                path.display()
            ),
            LockError::Syscall {
                byte, op, source, ..
            } => match *op {
                "test" => {
                    let (base, shared) = if *byte >= LOCK_SHARED_BASE {
                        (LOCK_SHARED_BASE, "")
                    } else {
                        (LOCK_PERM_BASE, "shared ")
                    };
                    let i = u8::try_from(byte.saturating_sub(base)).unwrap_or(u8::MAX);
                    format!("Failed to get {shared}\"{}\" lock", perm_name(i))
                }
                _ => format!(
                    "Failed to {op} byte {byte}: {}",
                    crate::error::strerror(source.raw_os_error().unwrap_or(libc::EIO))
                ),
            },
        }
    }
}

/// The locks one open file holds (kept by [`super::FileStorage`]).
#[derive(Debug, Default)]
pub(crate) struct HeldLocks {
    /// Permissions published (bytes `100 + i`).
    perm: Permissions,
    /// Permissions not shared (bytes `200 + i`).
    unshared: Permissions,
    /// Open-file-description locks (`true`) or POSIX locks, once something was locked.
    ofd: Option<bool>,
}

/// Sets this file's lock bytes to exactly `perm` / `unshared`.
fn set_bytes(
    file: &File,
    path: &Path,
    perm: Permissions,
    unshared: Permissions,
    ofd: bool,
) -> Result<(), LockError> {
    for (base, set) in [(LOCK_PERM_BASE, perm), (LOCK_SHARED_BASE, unshared)] {
        for i in 0..PERM_COUNT {
            let byte = base + u64::from(i);
            let on = set.contains(Permissions(1 << i));
            sys::set_byte_lock(file, byte, on, ofd).map_err(|source| LockError::Syscall {
                path: path.to_path_buf(),
                byte,
                op: if on { "lock" } else { "unlock" },
                source,
            })?;
        }
    }
    Ok(())
}

/// Tests `req` against the locks of every other open of the file.
fn test_conflicts(file: &File, path: &Path, req: &LockRequest, ofd: bool) -> Result<(), LockError> {
    let checks = req
        .perm
        .bits()
        .map(|(i, p)| (LOCK_SHARED_BASE + u64::from(i), p, false))
        .chain(
            Permissions::ALL
                .without(req.shared)
                .bits()
                .map(|(i, p)| (LOCK_PERM_BASE + u64::from(i), p, true)),
        );
    for (byte, perm, shared) in checks {
        let conflict =
            sys::byte_lock_conflicts(file, byte, ofd).map_err(|source| LockError::Syscall {
                path: path.to_path_buf(),
                byte,
                op: "test",
                source,
            })?;
        if conflict {
            return Err(LockError::Conflict {
                path: path.to_path_buf(),
                perm,
                shared,
            });
        }
    }
    Ok(())
}

/// Moves `held` to `req` the way QEMU's `raw_handle_perm_lock` does: take the union of the
/// old and the new bytes, test the new request, then drop what is no longer needed; on a
/// conflict or a failed lock, go back to the old bytes.
pub(crate) fn apply(
    file: &File,
    path: &Path,
    held: &mut HeldLocks,
    req: &LockRequest,
) -> Result<(), LockError> {
    let ofd = match (req.locking, held.ofd) {
        (Locking::Off, _) => return Ok(()),
        (_, Some(ofd)) => ofd,
        (Locking::Auto, None) => {
            if !sys::ofd_locks_supported(file) {
                return Ok(());
            }
            true
        }
        (Locking::On, None) => sys::ofd_locks_supported(file),
    };
    let unshared = Permissions::ALL.without(req.shared);
    let result = set_bytes(
        file,
        path,
        held.perm.union(req.perm),
        held.unshared.union(unshared),
        ofd,
    )
    .and_then(|()| test_conflicts(file, path, req, ofd))
    .and_then(|()| set_bytes(file, path, req.perm, unshared, ofd));
    match result {
        Ok(()) => {
            *held = HeldLocks {
                perm: req.perm,
                unshared,
                ofd: Some(ofd),
            };
            Ok(())
        }
        Err(e) => {
            // Best effort, as QEMU: unlocking does not fail for a valid descriptor.
            let _ = set_bytes(file, path, held.perm, held.unshared, ofd);
            Err(e)
        }
    }
}

/// Drops every lock `held` describes (best effort: unlocking does not fail
/// for a valid descriptor).
pub(crate) fn release(file: &File, held: &mut HeldLocks) {
    if let Some(ofd) = held.ofd.take() {
        let _ = set_bytes(
            file,
            Path::new(""),
            Permissions::NONE,
            Permissions::NONE,
            ofd,
        );
        held.perm = Permissions::NONE;
        held.unshared = Permissions::NONE;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn open(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn try_lock(f: &File, path: &Path, held: &mut HeldLocks, req: LockRequest) -> Option<String> {
        apply(f, path, held, &req).err().map(|e| e.qemu_message())
    }

    #[test]
    fn two_opens_exclude_each_other_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.qcow2");
        std::fs::write(&path, b"x").unwrap();
        let (a, b) = (open(&path), open(&path));
        let (mut ha, mut hb) = (HeldLocks::default(), HeldLocks::default());
        let auto = Locking::Auto;
        let rw = LockRequest::image_file(false, false, auto);
        let ro = LockRequest::image_file(true, false, auto);
        let shared = LockRequest::image_file(true, true, auto);
        let hint = format!("\nIs another process using the image [{}]?", path.display());

        // A reader blocks writers, not readers.
        assert_eq!(try_lock(&a, &path, &mut ha, ro), None);
        assert_eq!(try_lock(&b, &path, &mut hb, ro), None);
        let mut hc = HeldLocks::default();
        let c = open(&path);
        assert_eq!(
            try_lock(&c, &path, &mut hc, rw),
            Some(format!("Failed to get \"write\" lock{hint}"))
        );
        drop((b, hb));

        // A writer blocks readers; force-share readers get in.
        let mut ha2 = HeldLocks::default();
        drop((a, ha));
        let a = open(&path);
        assert_eq!(try_lock(&a, &path, &mut ha2, rw), None);
        assert_eq!(
            try_lock(&c, &path, &mut hc, ro),
            Some(format!("Failed to get shared \"write\" lock{hint}"))
        );
        assert_eq!(try_lock(&c, &path, &mut hc, shared), None);
        // Locking off tests nothing.
        let mut hd = HeldLocks::default();
        let d = open(&path);
        let off = LockRequest::image_file(false, false, Locking::Off);
        assert_eq!(try_lock(&d, &path, &mut hd, off), None);
        // Releasing the writer lets a writer in; a failed request left nothing behind.
        drop((a, ha2));
        assert_eq!(try_lock(&d, &path, &mut hd, rw), None);
    }

    #[test]
    fn locks_change_in_place_on_one_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.qcow2");
        std::fs::write(&path, b"x").unwrap();
        let a = open(&path);
        let mut ha = HeldLocks::default();
        let auto = Locking::Auto;
        assert_eq!(
            try_lock(&a, &path, &mut ha, LockRequest::create(auto)),
            None
        );
        assert_eq!(
            try_lock(
                &a,
                &path,
                &mut ha,
                LockRequest::image_file(false, false, auto)
            ),
            None
        );
        assert_eq!(ha.perm, LockRequest::image_file(false, false, auto).perm);
        // Down to read-only: another reader now gets in.
        assert_eq!(
            try_lock(
                &a,
                &path,
                &mut ha,
                LockRequest::image_file(true, false, auto)
            ),
            None
        );
        let b = open(&path);
        let mut hb = HeldLocks::default();
        assert_eq!(
            try_lock(
                &b,
                &path,
                &mut hb,
                LockRequest::image_file(true, false, auto)
            ),
            None
        );
    }

    #[test]
    fn locking_values_parse_as_qemu_spells_them() {
        assert_eq!(Locking::parse("on"), Some(Locking::On));
        assert_eq!(Locking::parse("off"), Some(Locking::Off));
        assert_eq!(Locking::parse("auto"), Some(Locking::Auto));
        assert_eq!(Locking::parse("On"), None);
        assert_eq!(Locking::parse("bogus"), None);
        assert_eq!(
            Permissions::ALL.names(),
            "consistent read, write, write unchanged, resize"
        );
    }
}
