//! The library's reads and writes against QEMU's on files: reference images
//! read like `qemu-img convert`, written images check clean, allocation
//! layout and preallocation equal QEMU's byte for byte.
//! One test binary; each module was once a test file of its own.

#[path = "../support/mod.rs"]
mod support;

mod alloc_layout;
mod bitmaps;
mod compressed;
mod encrypted;
mod prealloc;
mod read;
mod snapshot;
mod write;
