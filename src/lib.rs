//! qcow2kit: read, write, check and repair qcow2 disk images, the format of QEMU.
//!
//! The crate is layered bottom-up (see `ARCHITECTURE.md`): pure encoders and
//! decoders in [`format`](mod@format), a [`storage`] trait under everything, metadata
//! caches and the overlap checker in their own modules, and [`Image`] on top.
//!
//! ```
//! use std::sync::Arc;
//! use qcow2kit::storage::{MemStorage, Storage};
//! use qcow2kit::{CreateOptions, Image, OpenOptions};
//!
//! # fn main() -> qcow2kit::Result<()> {
//! // A 64 MiB image with 64 KiB clusters, held in memory.
//! let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 64 << 20)?;
//!
//! let img = Image::open_storage(file.clone(), &OpenOptions::new())?;
//! img.write_at(b"hello, qcow2", 1 << 20)?;
//! img.flush()?;
//!
//! let mut buf = [0u8; 12];
//! img.read_at(&mut buf, 1 << 20)?;
//! assert_eq!(&buf, b"hello, qcow2");
//! // Unwritten clusters read as zeroes.
//! img.read_at(&mut buf, 0)?;
//! assert_eq!(buf, [0u8; 12]);
//! img.close()?;
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_code)]
#![warn(missing_debug_implementations, clippy::undocumented_unsafe_blocks)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod check;
#[doc(hidden)]
pub mod cli_support;
mod compress;
pub mod crypto;
pub mod error;
pub mod events;
pub mod export;
pub mod format;
pub mod image;
pub mod info;
pub mod job;
mod mapping;
mod meta;
pub mod options;
mod repair;
pub mod resize;
pub mod storage;
pub mod types;

pub use error::{Error, Result};
pub use events::{Event, QuorumOpType};
pub use image::CacheStats;
pub use image::CompressedCluster;
pub use image::Image;
// Creating and amending live in the image layer (`image::create`,
// `image::amend`); the short paths stay the documented ones.
pub use image::{amend, create, measure};
pub use mapping::Extent;
pub use options::{CreateOptions, OpenOptions};

/// The README's code blocks, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
