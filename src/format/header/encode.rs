//! The encoder behind [`Header::encode`]: QEMU 10's `qcow2_update_header`
//! layout of the header, the extensions and the backing file name.

use super::decode::validate_compression;
use super::ext::{
    HeaderExtension, BACKING_FORMAT_BUF, BITMAPS_EXT_LEN, CRYPTO_EXT_LEN, EXT_HEADER_LEN,
    FEATURE_ENTRY_LEN, FEATURE_NAME_LEN,
};
use super::{Header, COMPRESSION_TYPE_OFFSET};
use crate::format::consts::{
    EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE,
    MAX_BACKING_FILE_NAME, QCOW2_MAGIC, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use crate::format::{put_be_u32, put_be_u64, FormatError, FormatErrorKind, Structure};

/// Bytes computed by the encoder together with the layout fields it chose.
pub(super) struct Layout {
    pub(super) bytes: Vec<u8>,
    pub(super) header_length: u32,
    pub(super) backing_file_offset: u64,
    pub(super) backing_file_size: u32,
}

impl Header {
    /// The bytes of [`Header::encode`] and the layout fields they were laid out with.
    pub(super) fn layout(&self) -> Result<Layout, FormatError> {
        let encode_err = |reason: String| FormatError::invalid(Structure::Header, None, reason);
        let (fixed_len, header_length) = match self.version {
            2 => {
                let v3_only = [
                    (self.incompatible_features != 0, "incompatible_features"),
                    (self.compatible_features != 0, "compatible_features"),
                    (self.autoclear_features != 0, "autoclear_features"),
                    (self.refcount_order != 4, "a refcount_order other than 4"),
                    (self.compression_type != 0, "compression_type"),
                    (!self.unknown_fields.is_empty(), "unknown header fields"),
                ];
                if let Some((_, what)) = v3_only.iter().find(|(present, _)| *present) {
                    return Err(encode_err(format!(
                        "a version 2 header cannot store {what}"
                    )));
                }
                (V2_HEADER_LENGTH, V2_HEADER_LENGTH)
            }
            3 => {
                let header_length = u32::try_from(self.unknown_fields.len())
                    .ok()
                    .and_then(|unknown| unknown.checked_add(V3_HEADER_LENGTH))
                    .ok_or_else(|| encode_err("unknown header fields are too long".into()))?;
                (V3_HEADER_LENGTH, header_length)
            }
            version => {
                return Err(FormatError::new(
                    FormatErrorKind::Unsupported,
                    Structure::Header,
                    Some(4),
                    format!("Unsupported qcow2 version {version}"),
                ))
            }
        };
        validate_compression(self.compression_type, self.incompatible_features)?;

        let mut bytes = vec![0u8; fixed_len as usize];
        put_be_u32(&mut bytes, 0, QCOW2_MAGIC);
        put_be_u32(&mut bytes, 4, self.version);
        put_be_u32(&mut bytes, 20, self.cluster_bits);
        put_be_u64(&mut bytes, 24, self.size);
        put_be_u32(&mut bytes, 32, self.crypt_method);
        put_be_u32(&mut bytes, 36, self.l1_size);
        put_be_u64(&mut bytes, 40, self.l1_table_offset);
        put_be_u64(&mut bytes, 48, self.refcount_table_offset);
        put_be_u32(&mut bytes, 56, self.refcount_table_clusters);
        put_be_u32(&mut bytes, 60, self.nb_snapshots);
        put_be_u64(&mut bytes, 64, self.snapshots_offset);
        if self.version == 3 {
            put_be_u64(&mut bytes, 72, self.incompatible_features);
            put_be_u64(&mut bytes, 80, self.compatible_features);
            put_be_u64(&mut bytes, 88, self.autoclear_features);
            put_be_u32(&mut bytes, 96, self.refcount_order);
            put_be_u32(&mut bytes, 100, header_length);
            if let Some(byte) = bytes.get_mut(COMPRESSION_TYPE_OFFSET as usize) {
                *byte = self.compression_type;
            }
            bytes.extend_from_slice(&self.unknown_fields);
        }

        for group in EXT_WRITE_ORDER {
            for ext in self
                .extensions
                .iter()
                .filter(|ext| ext_write_group(ext) == group)
            {
                let data = encode_ext_data(ext)?;
                let len = u32::try_from(data.len()).map_err(|_| {
                    encode_err(format!(
                        "header extension {:#x} is too long",
                        ext.ext_type()
                    ))
                })?;
                bytes.extend_from_slice(&ext.ext_type().to_be_bytes());
                bytes.extend_from_slice(&len.to_be_bytes());
                bytes.extend_from_slice(&data);
                // Padding is relative to the extension, as the area may start unaligned.
                bytes.resize(
                    bytes.len() + (data.len().next_multiple_of(8) - data.len()),
                    0,
                );
            }
        }
        bytes.extend_from_slice(&[0u8; crate::format::fixed_len(EXT_HEADER_LEN)]);

        let (backing_file_offset, backing_file_size) = match &self.backing_file {
            Some(name) => {
                let len = u32::try_from(name.len())
                    .ok()
                    .filter(|&len| len <= MAX_BACKING_FILE_NAME)
                    .ok_or_else(|| {
                        FormatError::invalid(
                            Structure::BackingFileName,
                            None,
                            "Backing file name too long",
                        )
                    })?;
                let offset = bytes.len() as u64;
                bytes.extend_from_slice(name.as_bytes());
                (offset, len)
            }
            None => (0, 0),
        };
        put_be_u64(&mut bytes, 8, backing_file_offset);
        put_be_u32(&mut bytes, 16, backing_file_size);
        Ok(Layout {
            bytes,
            header_length,
            backing_file_offset,
            backing_file_size,
        })
    }
}

/// QEMU's write order of extension types; anything else is written last.
pub(super) const EXT_WRITE_ORDER: [u32; 6] = [
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_CRYPTO,
    EXT_FEATURE_TABLE,
    EXT_BITMAPS,
    EXT_END,
];

/// The entry of [`EXT_WRITE_ORDER`] an extension is written with (`EXT_END`
/// stands for "all other types").
pub(super) fn ext_write_group(ext: &HeaderExtension) -> u32 {
    let ext_type = ext.ext_type();
    if EXT_WRITE_ORDER.contains(&ext_type) && ext_type != EXT_END {
        ext_type
    } else {
        EXT_END
    }
}

/// The payload of one extension, without padding.
fn encode_ext_data(ext: &HeaderExtension) -> Result<Vec<u8>, FormatError> {
    let invalid = |reason: String| FormatError::invalid(Structure::HeaderExtension, None, reason);
    Ok(match ext {
        HeaderExtension::BackingFormat(name) => {
            if name.len() >= BACKING_FORMAT_BUF as usize {
                return Err(invalid(format!(
                    "backing format name of {} bytes is too long (QEMU accepts at most {})",
                    name.len(),
                    BACKING_FORMAT_BUF - 1
                )));
            }
            name.as_bytes().to_vec()
        }
        HeaderExtension::FeatureNameTable(table) => {
            let mut data = Vec::with_capacity(table.len().saturating_mul(FEATURE_ENTRY_LEN));
            for entry in table {
                if entry.name.len() > FEATURE_NAME_LEN || entry.name.contains('\0') {
                    return Err(invalid(format!(
                        "feature name {:?} must be at most {FEATURE_NAME_LEN} bytes without NUL",
                        entry.name
                    )));
                }
                data.push(entry.kind.raw());
                data.push(entry.bit);
                data.extend_from_slice(entry.name.as_bytes());
                data.resize(data.len() + FEATURE_NAME_LEN - entry.name.len(), 0);
            }
            data
        }
        HeaderExtension::Bitmaps(bitmaps) => {
            let mut data = vec![0u8; BITMAPS_EXT_LEN as usize];
            put_be_u32(&mut data, 0, bitmaps.nb_bitmaps);
            put_be_u64(&mut data, 8, bitmaps.bitmap_directory_size);
            put_be_u64(&mut data, 16, bitmaps.bitmap_directory_offset);
            data
        }
        HeaderExtension::Crypto { offset, length } => {
            let mut data = vec![0u8; CRYPTO_EXT_LEN as usize];
            put_be_u64(&mut data, 0, *offset);
            put_be_u64(&mut data, 8, *length);
            data
        }
        HeaderExtension::DataFile(name) => name.as_bytes().to_vec(),
        HeaderExtension::Unknown { ext_type, data } => {
            if *ext_type == EXT_END {
                return Err(invalid(
                    "an extension of type 0 would end the extension area".into(),
                ));
            }
            data.clone()
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
#[path = "encode_tests.rs"]
mod tests;
