//! The only module with `unsafe`: thin wrappers over Linux system calls that
//! std does not expose (preadv/pwritev, fallocate, hole punching, SEEK_DATA, the nocow ioctl,
//! fcntl byte-range locks).
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;

fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// Most buffers one `preadv`/`pwritev` takes (`IOV_MAX` on Linux).
pub const IOV_MAX: usize = 1024;

/// One `preadv(fd, bufs, offset)` call (at most [`IOV_MAX`] buffers are
/// passed): the number of bytes read, which may be short (end of file,
/// signal). `EINTR` is returned as an error for the caller to retry.
pub fn preadv(file: &File, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
    let o = off(offset)?;
    let n = bufs.len().min(IOV_MAX);
    // IOV_MAX fits in a c_int.
    let cnt = n as libc::c_int;
    // SAFETY: `IoSliceMut` is ABI-compatible with `struct iovec` (guaranteed
    // by std on Unix); the first `n` elements are valid, writable buffers
    // borrowed mutably for the duration of the call, so the kernel may fill
    // them. The descriptor is owned by `file`, which outlives the call.
    let r = unsafe {
        libc::preadv(
            file.as_raw_fd(),
            bufs.as_mut_ptr().cast::<libc::iovec>(),
            cnt,
            o,
        )
    };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// One `pwritev(fd, bufs, offset)` call (at most [`IOV_MAX`] buffers are
/// passed): the number of bytes written, which may be short. `EINTR` is
/// returned as an error for the caller to retry.
pub fn pwritev(file: &File, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
    let o = off(offset)?;
    let n = bufs.len().min(IOV_MAX);
    let cnt = n as libc::c_int;
    // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` (guaranteed by
    // std on Unix); the first `n` elements are valid buffers borrowed for
    // the duration of the call, which the kernel only reads. The descriptor
    // is owned by `file`, which outlives the call.
    let r = unsafe {
        libc::pwritev(
            file.as_raw_fd(),
            bufs.as_ptr().cast::<libc::iovec>(),
            cnt,
            o,
        )
    };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// `fallocate(fd, 0, offset, len)`: reserve blocks, extending the file.
pub fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: fallocate only reads its integer arguments; the descriptor is
    // owned by `file`, which outlives the call.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, o, l) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // File system without fallocate: fall back to extending the file.
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if end > file.metadata()?.len() {
            file.set_len(end)?;
        }
        return Ok(());
    }
    Err(e)
}

/// Punches a hole in `[offset, offset + len)`, keeping the file size.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: as for `fallocate` above; the flags are valid constants.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `[offset, offset + len)` read as zeroes, its space allocated
/// (`FALLOC_FL_ZERO_RANGE`; the file grows if the range ends past it).
/// EOPNOTSUPP where the file system has no such mode (tmpfs).
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: as for `fallocate` above; the flag is a valid constant.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, o, l) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `[offset, offset + len)` holds no data (`SEEK_DATA` finds none in it).
pub fn is_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    let o = off(offset)?;
    // SAFETY: lseek only reads its integer arguments; the descriptor is valid.
    let r = unsafe { libc::lseek(file.as_raw_fd(), o, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data at or after `offset`.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(true)
        } else {
            Err(e)
        };
    }
    Ok((r as u64) >= offset.saturating_add(len))
}

/// `lseek` with `whence`, `None` for ENXIO (no data, or no hole, at or
/// after `offset`).
fn seek(file: &File, offset: libc::off_t, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek only reads its integer arguments; the descriptor is valid
    // for the lifetime of `file`.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// The run at `offset` (at most `max` bytes) that is all data or all hole:
/// `(is_data, len)`, from `SEEK_DATA` then `SEEK_HOLE`, as QEMU's
/// `find_allocation` asks them. No data at or after `offset` (ENXIO) is a
/// hole to the end; a position that is both data and hole (a racing
/// writer) is reported as data.
pub fn data_extent(file: &File, offset: u64, max: u64) -> io::Result<(bool, u64)> {
    let o = off(offset)?;
    let Some(data) = seek(file, o, libc::SEEK_DATA)? else {
        return Ok((false, max));
    };
    if data < offset {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    if data > offset {
        return Ok((false, (data - offset).min(max)));
    }
    match seek(file, o, libc::SEEK_HOLE)? {
        Some(hole) if hole > offset => Ok((true, (hole - offset).min(max))),
        Some(hole) if hole < offset => Err(io::Error::from_raw_os_error(libc::EIO)),
        // Data and hole at once, or no hole after data: no information.
        _ => Ok((true, max)),
    }
}

/// A one-byte `struct flock` at `byte` of the given type (`F_RDLCK`,
/// `F_WRLCK`, `F_UNLCK`); `l_pid` is 0, as open-file-description locks
/// require.
fn one_byte_flock(byte: u64, kind: libc::c_int) -> io::Result<libc::flock> {
    let l_type =
        libc::c_short::try_from(kind).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `flock` is plain old data for which all-zero bytes are valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = off(byte)?;
    fl.l_len = 1;
    fl.l_pid = 0;
    Ok(fl)
}

/// The fcntl commands for setting and testing a lock: open-file-description
/// locks (`F_OFD_SETLK`/`F_OFD_GETLK`, owned by the open file, as QEMU uses
/// them) or, with `ofd` false, process-associated POSIX locks.
fn lock_cmds(ofd: bool) -> (libc::c_int, libc::c_int) {
    if ofd {
        (libc::F_OFD_SETLK, libc::F_OFD_GETLK)
    } else {
        (libc::F_SETLK, libc::F_GETLK)
    }
}

/// Takes a shared (read) lock on one byte of the file (`shared`), or
/// releases this file's lock on it. Never waits: a conflicting exclusive lock
/// makes it fail with `EAGAIN`/`EACCES`.
pub fn set_byte_lock(file: &File, byte: u64, shared: bool, ofd: bool) -> io::Result<()> {
    let mut fl = one_byte_flock(byte, if shared { libc::F_RDLCK } else { libc::F_UNLCK })?;
    let (set, _) = lock_cmds(ofd);
    // SAFETY: F_(OFD_)SETLK reads one `struct flock` through the pointer,
    // which points to a live, initialised local; the descriptor is owned by
    // `file`, which outlives the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), set, &mut fl as *mut libc::flock) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether an exclusive lock on one byte would conflict with a lock that
/// another open file (another process, or another open of the same file in
/// this process) holds on it. This file's own locks never conflict.
pub fn byte_lock_conflicts(file: &File, byte: u64, ofd: bool) -> io::Result<bool> {
    let mut fl = one_byte_flock(byte, libc::F_WRLCK)?;
    let (_, get) = lock_cmds(ofd);
    // SAFETY: F_(OFD_)GETLK reads and rewrites one `struct flock` through
    // the pointer, which points to a live, initialised local.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), get, &mut fl as *mut libc::flock) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(fl.l_type) != libc::F_UNLCK)
}

/// Whether the kernel offers open-file-description locks (`F_OFD_GETLK` is
/// not refused with `EINVAL`), QEMU's `qemu_has_ofd_lock()`.
pub fn ofd_locks_supported(file: &File) -> bool {
    match byte_lock_conflicts(file, 0, true) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc::EINVAL),
    }
}

const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
const FS_NOCOW_FL: libc::c_long = 0x0080_0000;

/// Sets the no-copy-on-write attribute (`chattr +C`).
pub fn set_nocow(file: &File) -> io::Result<()> {
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one `long` through the pointer, which
    // points to a live local of that type.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            FS_IOC_GETFLAGS,
            &mut flags as *mut libc::c_long,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    flags |= FS_NOCOW_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one `long` through the pointer.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            FS_IOC_SETFLAGS,
            &flags as *const libc::c_long,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the no-copy-on-write attribute is set.
pub fn is_nocow(file: &File) -> io::Result<bool> {
    let mut flags: libc::c_long = 0;
    // SAFETY: as in `set_nocow`.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            FS_IOC_GETFLAGS,
            &mut flags as *mut libc::c_long,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & FS_NOCOW_FL != 0)
}

/// The local time zone's offset from UTC, in seconds, at Unix time `secs`
/// (`localtime_r`'s `tm_gmtoff`; 0 if the C library cannot tell).
pub fn local_utc_offset(secs: i64) -> i64 {
    let t: libc::time_t = match libc::time_t::try_from(secs) {
        Ok(t) => t,
        Err(_) => return 0,
    };
    // SAFETY: `tm` is plain old data for which all-zero bytes are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call and
    // localtime_r (unlike localtime) writes only into `tm`.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return 0;
    }
    #[allow(clippy::useless_conversion)] // c_long is i32 on 32-bit hosts.
    i64::from(tm.tm_gmtoff)
}

/// Milliseconds of `CLOCK_MONOTONIC_COARSE`: a few nanoseconds to read (no
/// hardware clock access), with the resolution of the kernel tick (a few
/// milliseconds). For intervals counted in seconds on the I/O fast path
/// (`cache-clean-interval`), where `Instant::now` would cost more than the
/// translation it guards.
pub fn coarse_monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the
    // call; clock_gettime only writes into it.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if r != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let ms = u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000;
    secs.saturating_mul(1000).saturating_add(ms)
}
