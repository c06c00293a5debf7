//! What `qemu-img info` reports about an image: [`ImageInfo`] (serialises to
//! QEMU's JSON keys, `cli.md` §3.3) and its human-readable text
//! ([`ImageInfo::to_human`], `cli.md` §3.2).
//!
//! Also two helpers tools need to match QEMU's output: [`path_combine`] (how
//! QEMU resolves a backing file name against the image's name) and
//! [`to_json_pretty`] (QEMU's 4-space JSON layout). The text formatting
//! (`size_to_str`, the `Snapshot list:` table) is internal to
//! [`ImageInfo::to_human`].

use crate::error::{Error, IoOp, Result};
use crate::format::bitmap::{decode_bitmap_directory, BME_FLAG_AUTO, BME_FLAG_IN_USE};
use crate::format::consts::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, CRYPT_AES, CRYPT_LUKS, INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
};
use crate::format::header::Header;
use crate::format::snapshot::SnapshotEntry;
use crate::image::Image;
use crate::storage::{FileStorage, Storage};
use serde::Serialize;
use std::fmt::Write as _;

/// One image (or file node) as `qemu-img info` describes it (`ImageInfo` in
/// QEMU's QAPI). Field order follows QEMU's JSON output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Child nodes: for a qcow2 image, its `file` (the host file).
    pub children: Vec<ChildInfo>,
    /// Format of the backing file as recorded in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Internal snapshots (only when there are any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotInfo>>,
    /// Virtual disk size (for a file node: the file length).
    pub virtual_size: u64,
    /// The name the image was opened by.
    pub filename: String,
    /// Cluster size (images only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// `qcow2`, `raw` or `file`.
    pub format: String,
    /// Bytes allocated on the host for the file (`st_blocks * 512`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// Format-specific data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    /// The backing file name resolved against the image's name ([`path_combine`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// `true` for an encrypted image (omitted otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// The backing file name as recorded in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Whether the image was not closed cleanly (qcow2 incompatible bit 0).
    pub dirty_flag: bool,
}

/// A child node of an image (`BlockChildInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChildInfo {
    /// The child's role: `file`.
    pub name: String,
    /// What the child is.
    pub info: ImageInfo,
}

/// One internal snapshot (`SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Instruction count, unless icount was off (`-1` on disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    /// Sub-second part of the guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Snapshot name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Sub-second part of the creation time.
    pub date_nsec: u64,
    /// Guest clock, whole seconds.
    pub vm_clock_sec: u64,
    /// Snapshot ID.
    pub id: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
}

/// Format-specific data (`ImageInfoSpecific`): `{"type": ..., "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum FormatSpecific {
    /// A qcow2 image.
    Qcow2(Qcow2Info),
    /// A host file.
    File(FileInfo),
}

/// qcow2-specific data (`ImageInfoSpecificQCow2`); keys omitted as QEMU does
/// (v2 images have only `compat`, `compression-type`, `refcount-bits`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Info {
    /// `0.10` (v2) or `1.1` (v3).
    pub compat: String,
    /// `zlib` or `zstd`.
    pub compression_type: String,
    /// Compatible bit 0 (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Persistent dirty bitmaps (only when the image has some).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    /// Refcount width.
    pub refcount_bits: u32,
    /// External data file name (only with an external data file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// The encryption (only for an encrypted image whose encryption QEMU
    /// could describe: AES, or LUKS with its header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<Box<EncryptInfo>>,
    /// Autoclear bit 1 (only with an external data file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// Incompatible bit 1 (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Extended L2 entries (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// How an image is encrypted (`ImageInfoSpecificQCow2Encryption`): only
/// `format` for AES; for LUKS the header's fields. Keys are in the order
/// qemu-img prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EncryptInfo {
    /// IV generator (LUKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_alg: Option<String>,
    /// Whether the LUKS header is detached (never, in a qcow2 image).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detached_header: Option<bool>,
    /// Key derivation hash (LUKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_alg: Option<String>,
    /// Cipher algorithm with key size (LUKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher_alg: Option<String>,
    /// Volume UUID (LUKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// IV generator hash (LUKS with `essiv` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<String>,
    /// `aes` or `luks`.
    pub format: String,
    /// Cipher mode (LUKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher_mode: Option<String>,
    /// The eight key slots (LUKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<LuksSlotInfo>>,
    /// Byte offset of the encrypted payload in the LUKS volume (LUKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_offset: Option<u64>,
    /// PBKDF2 iterations of the master key digest (LUKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_key_iters: Option<u64>,
}

/// One LUKS key slot (`QCryptoBlockInfoLUKSSlot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksSlotInfo {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations (active slots only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u64>,
    /// Byte offset of the key material in the LUKS volume.
    pub key_offset: u64,
    /// Anti-forensic stripes (active slots only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u64>,
}

impl EncryptInfo {
    /// What qemu-img shows for an image opened for inspection: `None` for an
    /// unencrypted image and for a LUKS image without its crypto extension
    /// (QEMU then has no crypto context to describe).
    pub fn from_image(image: &Image) -> Option<EncryptInfo> {
        let empty = |format: &str| EncryptInfo {
            ivgen_alg: None,
            detached_header: None,
            hash_alg: None,
            cipher_alg: None,
            uuid: None,
            ivgen_hash_alg: None,
            format: format.to_owned(),
            cipher_mode: None,
            slots: None,
            payload_offset: None,
            master_key_iters: None,
        };
        match image.header().crypt_method {
            CRYPT_AES => Some(empty("aes")),
            CRYPT_LUKS => image.luks_header().map(|h| EncryptInfo {
                ivgen_alg: Some(h.ivgen_alg.to_owned()),
                detached_header: Some(false),
                hash_alg: Some(h.hash_alg.to_owned()),
                cipher_alg: Some(h.cipher_alg.to_owned()),
                uuid: Some(h.uuid.clone()),
                ivgen_hash_alg: h
                    .ivgen_hash_alg
                    .filter(|_| h.ivgen_alg == "essiv")
                    .map(str::to_owned),
                cipher_mode: Some(h.cipher_mode.to_owned()),
                slots: Some(
                    h.slots
                        .iter()
                        .map(|s| LuksSlotInfo {
                            active: s.active,
                            iters: s.active.then_some(u64::from(s.iterations)),
                            key_offset: s.key_offset,
                            stripes: s.active.then_some(u64::from(s.stripes)),
                        })
                        .collect(),
                ),
                payload_offset: Some(h.payload_offset),
                master_key_iters: Some(u64::from(h.master_key_iters)),
                ..empty("luks")
            }),
            _ => None,
        }
    }

    /// The lines of the `encrypt:` block (indented by 4 under it), as
    /// QEMU's `dump_qobject` prints them.
    pub fn human_lines(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut opt = |key: &str, val: &Option<String>| {
            if let Some(x) = val {
                v.push(format!("    {key}: {x}"));
            }
        };
        opt("ivgen alg", &self.ivgen_alg);
        opt(
            "detached header",
            &self.detached_header.map(|b| b.to_string()),
        );
        opt("hash alg", &self.hash_alg);
        opt("cipher alg", &self.cipher_alg);
        opt("uuid", &self.uuid);
        opt("ivgen hash alg", &self.ivgen_hash_alg);
        opt("format", &Some(self.format.clone()));
        opt("cipher mode", &self.cipher_mode);
        if let Some(slots) = &self.slots {
            v.push("    slots:".into());
            for (i, s) in slots.iter().enumerate() {
                v.push(format!("        [{i}]:"));
                v.push(format!("            active: {}", s.active));
                if let Some(it) = s.iters {
                    v.push(format!("            iters: {it}"));
                }
                v.push(format!("            key offset: {}", s.key_offset));
                if let Some(st) = s.stripes {
                    v.push(format!("            stripes: {st}"));
                }
            }
        }
        if let Some(p) = self.payload_offset {
            v.push(format!("    payload offset: {p}"));
        }
        if let Some(m) = self.master_key_iters {
            v.push(format!("    master key iters: {m}"));
        }
        v
    }
}

/// One persistent dirty bitmap (`Qcow2BitmapInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapInfo {
    /// `in-use`, `auto` (in that order), as set.
    pub flags: Vec<String>,
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
}

/// Data of a host file node (`ImageInfoSpecificFile`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileInfo {
    /// `true` when the file has the no-copy-on-write attribute (omitted otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nocow: Option<bool>,
}

impl ImageInfo {
    /// Describes an open qcow2 image. `filename` is the name to show (as the
    /// user gave it); it is also what a relative backing file name is
    /// resolved against for `full-backing-filename`.
    ///
    /// ```
    /// use qcow2kit::info::ImageInfo;
    /// use qcow2kit::storage::{MemStorage, Storage};
    /// use qcow2kit::{CreateOptions, Image, OpenOptions};
    /// use std::sync::Arc;
    ///
    /// # fn main() -> qcow2kit::Result<()> {
    /// let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
    /// qcow2kit::create::create_on(file.clone(), &CreateOptions::new(), 8 << 20)?;
    /// let img = Image::open_storage(file, &OpenOptions::new())?;
    /// let info = ImageInfo::from_image(&img, "disk.qcow2")?;
    /// let text = info.to_human(); // what `qemu-img info` prints
    /// assert!(text.contains("virtual size: 8 MiB (8388608 bytes)"));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// I/O errors reading the host file's size or the bitmap directory;
    /// format errors of the bitmap directory.
    pub fn from_image(image: &Image, filename: &str) -> Result<ImageInfo> {
        let header = image.header();
        let storage = image.storage();
        let file = file_node_info(&**storage, filename, image.path())?;
        let snapshots = image.snapshots();
        let snapshots = (!snapshots.is_empty())
            .then(|| snapshots.iter().map(SnapshotInfo::from_entry).collect());
        let mut specific = qcow2_info(&header, &**storage)?;
        specific.encrypt = EncryptInfo::from_image(image).map(Box::new);
        let backing = header.backing_file_name().map(str::to_owned);
        Ok(ImageInfo {
            actual_size: file.actual_size,
            children: vec![ChildInfo {
                name: "file".into(),
                info: file,
            }],
            backing_filename_format: backing
                .as_ref()
                .and(header.backing_format().map(str::to_owned)),
            snapshots,
            virtual_size: header.size,
            filename: filename.to_owned(),
            cluster_size: Some(header.cluster_size()),
            format: "qcow2".into(),
            format_specific: Some(FormatSpecific::Qcow2(specific)),
            full_backing_filename: backing.as_deref().map(|b| path_combine(filename, b)),
            encrypted: (header.crypt_method != 0).then_some(true),
            backing_filename: backing,
            dirty_flag: header.incompatible_features & INCOMPAT_DIRTY != 0,
        })
    }

    /// Describes a raw image file (a raw backing file in a chain).
    ///
    /// # Errors
    /// I/O errors reading the file's size.
    pub fn raw(storage: &dyn Storage, filename: &str) -> Result<ImageInfo> {
        let file = file_node_info(storage, filename, None)?;
        Ok(ImageInfo {
            actual_size: file.actual_size,
            virtual_size: file.virtual_size,
            children: vec![ChildInfo {
                name: "file".into(),
                info: file,
            }],
            backing_filename_format: None,
            snapshots: None,
            filename: filename.to_owned(),
            cluster_size: None,
            format: "raw".into(),
            format_specific: None,
            full_backing_filename: None,
            encrypted: None,
            backing_filename: None,
            dirty_flag: false,
        })
    }

    /// QEMU's human-readable text (`bdrv_image_info_dump`), every line
    /// terminated by `\n`: image lines, snapshot table, format-specific
    /// block, then `Child node '/file':` blocks indented by 4.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        self.dump(&mut out, 0, "");
        out
    }

    fn dump(&self, out: &mut String, indent: usize, path: &str) {
        let ind = " ".repeat(indent);
        let protocol = self.format == "file";
        let dsize = self
            .actual_size
            .map_or_else(|| "unavailable".to_owned(), size_to_str);
        let _ = writeln!(
            out,
            "{ind}{}: {}",
            if protocol { "filename" } else { "image" },
            self.filename
        );
        let _ = writeln!(
            out,
            "{ind}{}: {}",
            if protocol {
                "protocol type"
            } else {
                "file format"
            },
            self.format
        );
        let _ = writeln!(
            out,
            "{ind}{}: {} ({} bytes)",
            if protocol {
                "file length"
            } else {
                "virtual size"
            },
            size_to_str(self.virtual_size),
            self.virtual_size
        );
        let _ = writeln!(out, "{ind}disk size: {dsize}");
        if self.encrypted == Some(true) {
            let _ = writeln!(out, "{ind}encrypted: yes");
        }
        if let Some(cs) = self.cluster_size {
            let _ = writeln!(out, "{ind}cluster_size: {cs}");
        }
        if self.dirty_flag {
            let _ = writeln!(out, "{ind}cleanly shut down: no");
        }
        if let Some(b) = &self.backing_filename {
            let _ = write!(out, "{ind}backing file: {b}");
            match &self.full_backing_filename {
                None => out.push_str(" (cannot determine actual path)"),
                Some(full) if full != b => {
                    let _ = write!(out, " (actual path: {full})");
                }
                Some(_) => {}
            }
            out.push('\n');
        }
        if let Some(f) = &self.backing_filename_format {
            let _ = writeln!(out, "{ind}backing file format: {f}");
        }
        if let Some(snaps) = &self.snapshots {
            let _ = writeln!(out, "{ind}Snapshot list:");
            for line in snapshot_table(snaps) {
                let _ = writeln!(out, "{ind}{line}");
            }
        }
        if let Some(spec) = &self.format_specific {
            let lines = spec.human_lines();
            if !lines.is_empty() {
                let _ = writeln!(out, "{ind}Format specific information:");
                for l in lines {
                    let _ = writeln!(out, "{ind}    {l}");
                }
            }
        }
        for child in &self.children {
            let _ = writeln!(out, "{ind}Child node '{path}/{}':", child.name);
            child
                .info
                .dump(out, indent + 4, &format!("{path}/{}", child.name));
        }
    }
}

impl FormatSpecific {
    /// The lines of the `Format specific information:` block, without the
    /// block's own indentation (QEMU's `dump_qobject` of `data`).
    pub fn human_lines(&self) -> Vec<String> {
        let mut v = Vec::new();
        match self {
            FormatSpecific::Qcow2(q) => {
                v.push(format!("compat: {}", q.compat));
                v.push(format!("compression type: {}", q.compression_type));
                if let Some(l) = q.lazy_refcounts {
                    v.push(format!("lazy refcounts: {l}"));
                }
                if let Some(bitmaps) = &q.bitmaps {
                    v.push("bitmaps:".into());
                    for (i, b) in bitmaps.iter().enumerate() {
                        v.push(format!("    [{i}]:"));
                        v.push("        flags:".into());
                        for (j, f) in b.flags.iter().enumerate() {
                            v.push(format!("            [{j}]: {f}"));
                        }
                        v.push(format!("        name: {}", b.name));
                        v.push(format!("        granularity: {}", b.granularity));
                    }
                }
                v.push(format!("refcount bits: {}", q.refcount_bits));
                if let Some(d) = &q.data_file {
                    v.push(format!("data file: {d}"));
                }
                if let Some(e) = &q.encrypt {
                    v.push("encrypt:".into());
                    v.extend(e.human_lines());
                }
                if let Some(r) = q.data_file_raw {
                    v.push(format!("data file raw: {r}"));
                }
                if let Some(c) = q.corrupt {
                    v.push(format!("corrupt: {c}"));
                }
                if let Some(e) = q.extended_l2 {
                    v.push(format!("extended l2: {e}"));
                }
            }
            FormatSpecific::File(f) => {
                if let Some(n) = f.nocow {
                    v.push(format!("nocow: {n}"));
                }
            }
        }
        v
    }
}

impl SnapshotInfo {
    /// Converts a snapshot table entry (`icount` absent or `-1` is omitted).
    pub fn from_entry(e: &SnapshotEntry) -> SnapshotInfo {
        SnapshotInfo {
            icount: e.icount.filter(|&i| i != u64::MAX),
            vm_clock_nsec: e.vm_clock_nsec % 1_000_000_000,
            name: e.name.clone(),
            date_sec: u64::from(e.date_sec),
            date_nsec: u64::from(e.date_nsec),
            vm_clock_sec: e.vm_clock_nsec / 1_000_000_000,
            id: e.id.clone(),
            vm_state_size: e.vm_state_size,
        }
    }
}

fn file_node_info(
    storage: &dyn Storage,
    filename: &str,
    path: Option<&std::path::Path>,
) -> Result<ImageInfo> {
    // QEMU reports whole 512-byte sectors (bdrv_getlength).
    let len = storage
        .len()
        .map_err(|e| Error::io(IoOp::Read, 0, e))?
        .div_ceil(512)
        * 512;
    let actual = storage
        .allocated_bytes()
        .map_err(|e| Error::io(IoOp::Read, 0, e))?;
    let nocow = path
        .and_then(|p| FileStorage::open(p, false).ok())
        .is_some_and(|f| f.is_nocow());
    Ok(ImageInfo {
        children: Vec::new(),
        backing_filename_format: None,
        snapshots: None,
        virtual_size: len,
        filename: filename.to_owned(),
        cluster_size: None,
        format: "file".into(),
        actual_size: Some(actual),
        format_specific: Some(FormatSpecific::File(FileInfo {
            nocow: nocow.then_some(true),
        })),
        full_backing_filename: None,
        encrypted: None,
        backing_filename: None,
        dirty_flag: false,
    })
}

fn qcow2_info(header: &Header, storage: &dyn Storage) -> Result<Qcow2Info> {
    let compression_type = match header.compression_type {
        1 => "zstd",
        _ => "zlib",
    }
    .to_owned();
    if header.version < 3 {
        return Ok(Qcow2Info {
            compat: "0.10".into(),
            compression_type,
            lazy_refcounts: None,
            bitmaps: None,
            refcount_bits: header.refcount_bits(),
            data_file: None,
            encrypt: None,
            data_file_raw: None,
            corrupt: None,
            extended_l2: None,
        });
    }
    let has_data_file = header.incompatible_features & INCOMPAT_DATA_FILE != 0;
    Ok(Qcow2Info {
        compat: "1.1".into(),
        compression_type,
        lazy_refcounts: Some(header.compatible_features & 1 != 0),
        bitmaps: read_bitmaps(header, storage)?,
        refcount_bits: header.refcount_bits(),
        data_file: header.data_file_name().map(str::to_owned),
        encrypt: None,
        data_file_raw: has_data_file
            .then_some(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0),
        corrupt: Some(header.incompatible_features & INCOMPAT_CORRUPT != 0),
        extended_l2: Some(header.is_extended_l2()),
    })
}

/// The bitmap directory, when the bitmaps extension is present and valid
/// (autoclear bit 0 set); `None` otherwise, as QEMU ignores it then.
fn read_bitmaps(header: &Header, storage: &dyn Storage) -> Result<Option<Vec<BitmapInfo>>> {
    let Some(ext) = header.bitmaps() else {
        return Ok(None);
    };
    if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 || ext.nb_bitmaps == 0 {
        return Ok(None);
    }
    let len = usize::try_from(ext.bitmap_directory_size)
        .ok()
        .filter(|&l| l as u64 <= crate::format::consts::MAX_BITMAP_DIRECTORY_BYTES)
        .unwrap_or(0);
    let mut buf = vec![0u8; len];
    storage
        .read_at(&mut buf, ext.bitmap_directory_offset)
        .map_err(|e| Error::io(IoOp::Read, ext.bitmap_directory_offset, e))?;
    let entries = decode_bitmap_directory(&buf, ext.nb_bitmaps, header.cluster_bits)?;
    Ok(Some(
        entries
            .iter()
            .map(|e| {
                let mut flags = Vec::new();
                if e.flags & BME_FLAG_IN_USE != 0 {
                    flags.push("in-use".to_owned());
                }
                if e.flags & BME_FLAG_AUTO != 0 {
                    flags.push("auto".to_owned());
                }
                BitmapInfo {
                    flags,
                    name: e.name.clone(),
                    granularity: 1u64 << e.granularity_bits,
                }
            })
            .collect(),
    ))
}

/// QEMU's `path_combine`: `name` if it is absolute, else `name` placed in
/// the directory part of `base` (everything up to its last `/`).
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_owned();
    }
    match base.rfind('/') {
        Some(p) => format!("{}{name}", &base[..=p]),
        None => name.to_owned(),
    }
}

/// QEMU's `size_to_str`: the value divided by the largest power of 1024
/// that keeps it below 1000 (roughly), printed with `%0.3g` and a binary
/// unit: `0 B`, `512 B`, `192 KiB`, `1.31 MiB`, `64 GiB`.
pub(crate) fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000.0 / 1024.0), &i); i = (i - 1) / 10;
    let x = val as f64 / (1000.0 / 1024.0);
    let exp = if x == 0.0 {
        0
    } else {
        // frexp's exponent: x = m * 2^e with 0.5 <= m < 1.
        x.log2().floor() as i64 + 1
    };
    let i = usize::try_from(((exp - 1) / 10).max(0))
        .unwrap_or(0)
        .min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g(val as f64 / div, 3), SUFFIXES[i])
}

/// C's `%.{prec}g` for a non-negative finite value.
pub(crate) fn format_g(v: f64, prec: usize) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let prec = prec.max(1);
    // Exponent after rounding to `prec` significant digits.
    let sci = format!("{:.*e}", prec - 1, v);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= prec as i32 {
        let mant = trim_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let decimals = usize::try_from(prec as i32 - 1 - exp).unwrap_or(0);
        trim_zeros(&format!("{v:.decimals$}")).to_owned()
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// The `Snapshot list:` table without that title: the header line and one
/// line per snapshot, each C `"%-7s %-16s %8s %19s %15s %10s"` of ID, TAG,
/// VM_SIZE, DATE (local time), VM_CLOCK, ICOUNT.
pub(crate) fn snapshot_table(snaps: &[SnapshotInfo]) -> Vec<String> {
    let mut v = vec![format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )];
    for s in snaps {
        let secs = s.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            s.vm_clock_nsec / 1_000_000
        );
        // QEMU shows "--" when icount was off (-1 on disk, or no field).
        let icount = s
            .icount
            .map_or_else(|| "--".to_owned(), |i| (i as i64).to_string());
        v.push(format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            size_to_str(s.vm_state_size),
            local_date(s.date_sec),
            clock,
            icount
        ));
    }
    v
}

/// `%Y-%m-%d %H:%M:%S` of Unix time `secs` in the local time zone.
pub(crate) fn local_date(secs: u64) -> String {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    let t = secs.saturating_add(crate::storage::sys::local_utc_offset(secs));
    let days = t.div_euclid(86_400);
    let rem = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Serialises `value` the way QEMU prints JSON (its `qobject_to_json_pretty`):
/// 4-space indentation, `"key": value`, one key or element per line, and
/// empty arrays and objects broken over two lines (`[` then `]` on the next
/// line at the same indentation), as `qemu-img info --output json` prints
/// `"children": [` / `]` and `"data": {` / `}`.
///
/// # Errors
/// Serialisation errors of `value` (none for this module's types).
pub fn to_json_pretty<T: Serialize>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuJsonFormatter::default());
    value.serialize(&mut ser)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// serde_json's pretty layout, except that a container always closes on a
/// line of its own, even when empty (QEMU's layout).
#[derive(Debug, Default)]
struct QemuJsonFormatter {
    /// Containers open around the current position.
    depth: usize,
}

impl QemuJsonFormatter {
    /// A line break and the indentation of the current depth.
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b"\n")?;
        for _ in 0..self.depth {
            w.write_all(b"    ")?;
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for QemuJsonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth = self.depth.saturating_sub(1);
        self.newline(w)?;
        w.write_all(b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        Ok(())
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth = self.depth.saturating_sub(1);
        self.newline(w)?;
        w.write_all(b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(196608), "192 KiB");
        assert_eq!(size_to_str(1376256), "1.31 MiB");
        assert_eq!(size_to_str(1310720), "1.25 MiB");
        assert_eq!(size_to_str(67108864), "64 MiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(524800), "512 KiB");
        assert_eq!(size_to_str(1 << 40), "1 TiB");
    }

    #[test]
    fn g_format() {
        assert_eq!(format_g(1.3125, 3), "1.31");
        assert_eq!(format_g(999.9, 3), "1e+03");
        assert_eq!(format_g(0.5, 3), "0.5");
        assert_eq!(format_g(100.0, 3), "100");
    }

    #[test]
    fn combine() {
        assert_eq!(path_combine("ov.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(path_combine("d/ov.qcow2", "base.qcow2"), "d/base.qcow2");
        assert_eq!(path_combine("/x/ov.qcow2", "/y/b"), "/y/b");
    }

    #[test]
    fn json_layout_like_qemu() {
        let v = serde_json::json!({"children": [], "data": {}, "list": [1, {"a": true}]});
        assert_eq!(
            to_json_pretty(&v).unwrap(),
            "{\n    \"children\": [\n    ],\n    \"data\": {\n    },\n    \"list\": [\n        1,\n        {\n            \"a\": true\n        }\n    ]\n}"
        );
    }

    #[test]
    fn snapshot_icount_column() {
        let sn = |icount| SnapshotInfo {
            icount,
            vm_clock_nsec: 0,
            name: "s1".into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_sec: 0,
            id: "1".into(),
            vm_state_size: 0,
        };
        let rows = snapshot_table(&[sn(Some(0)), sn(None)]);
        assert!(rows[1].ends_with("0000:00:00.000          0"), "{rows:?}");
        assert!(rows[2].ends_with("0000:00:00.000         --"), "{rows:?}");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }
}
