//! The command lines against QEMU's: `qcow2-img` (and its `io`) and
//! `qcow2-check` run on twin files next to qemu-img/qemu-io 10, comparing
//! streams and exit codes (`/work/shared/docs/cli.md` is the contract).
//! One test binary; each module was once a test file of its own.

#[path = "../support/mod.rs"]
mod support;

mod amend;
mod backing_loops;
mod bitmap;
mod commit;
mod compare;
mod compress;
mod convert_errors;
mod create_info;
mod damaged_images;
mod encrypted;
mod help;
mod io;
mod io_cache;
mod io_help;
mod io_more;
mod locking;
mod map_convert;
mod map_extents;
mod measure;
mod mirror;
mod nbd_bitmaps;
mod nbd_serve;
mod progress;
mod readme;
mod rebase;
mod snapshot;
mod stream;
mod vhost_user;
