//! Check-specific writes of the metadata layer.
//!
//! Header fields: cluster 0 is the header whatever else wrongly claims it
//! (a snapshot L1 table at offset 0, a refcount table there...), and QEMU
//! never overlap-checks its header updates, so a repair writes header
//! fields with every metadata kind exempt. The write still goes through the
//! gate's check, and is limited to the fixed header fields.

use crate::error::Result;
use crate::format::header::field;
use crate::meta::Meta;

impl Meta {
    /// Writes `bytes` at header offset `pos` (within the fixed header
    /// fields) and syncs, whatever other structure claims cluster 0.
    ///
    /// # Errors
    /// `Error::InvalidArgument` for a range outside the fixed header; I/O
    /// errors.
    pub(crate) fn write_header_field_for_repair(&mut self, pos: u64, bytes: &[u8]) -> Result<()> {
        self.gate.write_header_fields(bytes, pos)?;
        self.sync()
    }

    /// Persists `incompatible_features` (the dirty and corrupt bits) with one
    /// write; v2 images have no such field.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn write_incompatible_features_for_repair(&mut self) -> Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        let v = self.header.incompatible_features.to_be_bytes();
        self.write_header_field_for_repair(field::INCOMPATIBLE_FEATURES, &v)
    }
}
