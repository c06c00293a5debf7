//! qcow2kit: read, write, check and repair qcow2 disk images.
#![deny(unsafe_code)]

pub mod format;
pub mod options;
pub mod types;
