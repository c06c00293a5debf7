//! qcow2kit: read, write, check and repair qcow2 disk images.
#![deny(unsafe_code)]

pub mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod error;
pub mod events;
pub mod format;
pub mod image;
pub mod mapping;
mod meta;
pub mod options;
pub mod overlap;
mod snapshot;
pub mod storage;
pub mod types;

pub use error::{Error, Result};
pub use events::Event;
pub use image::Image;
pub use options::{CreateOptions, OpenOptions};
