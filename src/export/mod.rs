//! Exports: serving an open [`Image`](crate::Image) to other processes.
//!
//! Each export is a thin layer over the public `Image` API (read, write,
//! flush, discard, write-zeroes, block status); none adds engine code.
//! Today there is one, [`nbd`], the Network Block Device protocol that
//! qemu, the kernel, libnbd and nbdkit speak.

pub mod nbd;
#[cfg(all(feature = "vhost-user", target_os = "linux"))]
pub mod vhost_user_blk;
