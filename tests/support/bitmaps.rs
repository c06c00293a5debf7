//! Reading persistent dirty bitmaps straight from image bytes (through the
//! crate's `format` decoders only), to compare ours with QEMU's.

use qcow2kit::format::bitmap::{
    decode_bitmap_directory, decode_bitmap_table_entry, BitmapTableEntry, BME_FLAG_IN_USE,
};
use qcow2kit::format::consts::AUTOCLEAR_BITMAPS;
use qcow2kit::format::header::Header;
use std::collections::BTreeSet;
use std::path::Path;

/// One bitmap as stored: name, flags, granularity bits and (unless the
/// bitmap is `in_use`) the set granule indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    pub name: String,
    pub flags: u32,
    pub granularity_bits: u8,
    pub dirty: Option<BTreeSet<u64>>,
}

/// The bitmaps of the image in `bytes`: `None` when QEMU would ignore them
/// (autoclear bit 0 clear or no extension).
pub fn stored_bitmaps(bytes: &[u8]) -> Option<Vec<StoredBitmap>> {
    let h = Header::decode(bytes).expect("header");
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return None;
    }
    let ext = *h.bitmaps()?;
    let at = |off: u64, len: u64| -> &[u8] {
        bytes
            .get(off as usize..(off + len) as usize)
            .expect("structure inside the file")
    };
    let dir = at(ext.bitmap_directory_offset, ext.bitmap_directory_size);
    let entries = decode_bitmap_directory(dir, ext.nb_bitmaps, h.cluster_bits).expect("directory");
    let cs = 1u64 << h.cluster_bits;
    let bits = |g: u8| h.size.div_ceil(1 << g);
    Some(
        entries
            .into_iter()
            .map(|e| {
                let dirty = (!e.in_use()).then(|| {
                    let mut set = BTreeSet::new();
                    let table = at(e.bitmap_table_offset, u64::from(e.bitmap_table_size) * 8);
                    for (k, raw) in table.chunks_exact(8).enumerate() {
                        let raw = u64::from_be_bytes(raw.try_into().unwrap());
                        let base = k as u64 * cs * 8;
                        match decode_bitmap_table_entry(raw, h.cluster_bits).expect("entry") {
                            BitmapTableEntry::AllZeroes => {}
                            BitmapTableEntry::AllOnes => set.extend(base..base + cs * 8),
                            BitmapTableEntry::Data(off) => {
                                for (i, byte) in at(off, cs).iter().enumerate() {
                                    for b in 0..8 {
                                        if byte & (1 << b) != 0 {
                                            set.insert(base + i as u64 * 8 + b);
                                        }
                                    }
                                }
                            }
                        }
                    }
                    set.retain(|&b| b < bits(e.granularity_bits));
                    set
                });
                StoredBitmap {
                    name: e.name,
                    flags: e.flags,
                    granularity_bits: e.granularity_bits,
                    dirty,
                }
            })
            .collect(),
    )
}

/// The granules of `1 << g` bytes that `[off, off + len)` touches.
pub fn granules(g: u8, off: u64, len: u64) -> impl Iterator<Item = u64> {
    let (first, end) = if len == 0 {
        (0, 0)
    } else {
        (off >> g, ((off + len - 1) >> g) + 1)
    };
    first..end
}

/// Sets the `in_use` flag of bitmap `name` in the directory of `path`, as
/// a crash of QEMU leaves it.
pub fn set_in_use(path: &Path, name: &str) {
    let mut bytes = std::fs::read(path).unwrap();
    let h = Header::decode(&bytes).unwrap();
    let ext = *h.bitmaps().unwrap();
    let start = ext.bitmap_directory_offset as usize;
    let dir = &bytes[start..start + ext.bitmap_directory_size as usize];
    let mut pos = start;
    for e in decode_bitmap_directory(dir, ext.nb_bitmaps, h.cluster_bits).unwrap() {
        if e.name == name {
            let flags = u32::from_be_bytes(bytes[pos + 12..pos + 16].try_into().unwrap());
            bytes[pos + 12..pos + 16].copy_from_slice(&(flags | BME_FLAG_IN_USE).to_be_bytes());
        }
        pos += e.entry_size() as usize;
    }
    std::fs::write(path, bytes).unwrap();
}
