//! The LUKS1 header of a LUKS-encrypted qcow2 image (`crypt_method` 2).
//!
//! The full disk encryption header extension (`0x0537be77`) names a
//! cluster-aligned host range that holds a LUKS1 header (cryptsetup's
//! on-disk format 1.2.1) followed by its key material; guest data is
//! encrypted with the master key that the key slots protect. qcow2kit does
//! not decrypt (yet): [`LuksHeader::decode`] only validates and describes the
//! header, with QEMU 10's checks (`qcrypto_block_luks_check_header`,
//! `qcrypto_block_luks_parse_header`) and messages, which is what `qemu-img
//! info` shows without a key.
//!
//! | Offset | Size | Field |
//! |---|---|---|
//! | 0 | 6 | magic `LUKS\xba\xbe` |
//! | 6 | 2 | version (1) |
//! | 8 | 32 | cipher name (`aes`, NUL-terminated) |
//! | 40 | 32 | cipher mode (`xts-plain64`, `cbc-essiv:sha256`, NUL-terminated) |
//! | 72 | 32 | hash spec (`sha256`, NUL-terminated) |
//! | 104 | 4 | payload offset, in 512-byte sectors |
//! | 108 | 4 | master key length in bytes |
//! | 112 | 20 | master key digest |
//! | 132 | 32 | master key digest salt |
//! | 164 | 4 | master key digest iterations |
//! | 168 | 40 | UUID (ASCII, NUL-padded) |
//! | 208 | 8 × 48 | key slots: state (4), iterations (4), salt (32), key material offset in sectors (4), stripes (4) |
//!
//! All integers are big-endian. The header is 592 bytes.

use super::{be_u16, be_u32, FormatError, FormatErrorKind, Structure};

/// Size of the LUKS1 header (key slots included, key material excluded).
pub const LUKS_HEADER_LEN: usize = 592;
/// Number of key slots of a LUKS1 header.
pub const LUKS_NUM_KEY_SLOTS: usize = 8;
/// Length of the master key digest.
pub const LUKS_DIGEST_LEN: usize = 20;
/// Length of the salts (master key digest, key slots).
pub const LUKS_SALT_LEN: usize = 32;
/// The anti-forensic stripe count of every key slot (QEMU requires it).
pub const LUKS_STRIPES: u32 = STRIPES;
/// LUKS sectors are 512 bytes (key material offsets, the payload offset).
pub const LUKS_SECTOR_SIZE: u64 = SECTOR_SIZE;

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const VERSION: u16 = 1;
const SECTOR_SIZE: u64 = 512;
/// Key material starts at or after this byte offset.
const KEY_SLOT_OFFSET: u64 = 4096;
/// The anti-forensic stripe count QEMU requires.
const STRIPES: u32 = 4000;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;

const CIPHER_NAME: usize = 8;
const CIPHER_MODE: usize = 40;
const HASH_SPEC: usize = 72;
const STRING_LEN: usize = 32;
const PAYLOAD_OFFSET: usize = 104;
const KEY_BYTES: usize = 108;
const MK_DIGEST: usize = 112;
const MK_SALT: usize = 132;
const MASTER_KEY_ITERS: usize = 164;
const UUID: usize = 168;
const UUID_LEN: usize = 40;
const SLOTS: usize = 208;
const SLOT_LEN: usize = 48;

/// One key slot as `qemu-img info` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksKeySlot {
    /// The slot holds a key (state `0x00ac71f3`); otherwise it is disabled.
    pub active: bool,
    /// PBKDF2 iterations of the slot's key.
    pub iterations: u32,
    /// Byte offset of the slot's key material from the start of the header.
    pub key_offset: u64,
    /// Anti-forensic stripes (always 4000 in a header that decodes).
    pub stripes: u32,
    /// PBKDF2 salt of the slot's key.
    pub salt: [u8; LUKS_SALT_LEN],
}

/// A validated LUKS1 header, with its algorithm names resolved to QEMU's
/// names (`aes-256`, `xts`, `plain64`, `sha256`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher algorithm, with the key size (`aes-256`, `serpent-128`, ...).
    pub cipher_alg: &'static str,
    /// Cipher mode (`ecb`, `cbc`, `xts`, `ctr`).
    pub cipher_mode: &'static str,
    /// IV generator (`plain`, `plain64`, `essiv`).
    pub ivgen_alg: &'static str,
    /// The hash after `:` in the cipher mode string, if any (used only by
    /// `essiv`; `qemu-img info` shows it only then).
    pub ivgen_hash_alg: Option<&'static str>,
    /// Hash of the key derivation (`sha256`, ...).
    pub hash_alg: &'static str,
    /// Byte offset of the encrypted payload from the start of the header.
    pub payload_offset: u64,
    /// Master key length in bytes.
    pub master_key_len: u32,
    /// PBKDF2 iterations of the master key digest.
    pub master_key_iters: u32,
    /// The UUID text (up to the first NUL, at most 40 bytes).
    pub uuid: String,
    /// The eight key slots.
    pub slots: [LuksKeySlot; LUKS_NUM_KEY_SLOTS],
    /// PBKDF2 digest of the master key (checks a candidate master key).
    pub master_key_digest: [u8; LUKS_DIGEST_LEN],
    /// PBKDF2 salt of the master key digest.
    pub master_key_salt: [u8; LUKS_SALT_LEN],
}

/// QEMU's `QCryptoHashAlgo` names and digest lengths.
const HASHES: [(&str, u64); 7] = [
    ("md5", 16),
    ("sha1", 20),
    ("sha224", 28),
    ("sha256", 32),
    ("sha384", 48),
    ("sha512", 64),
    ("ripemd160", 20),
];
/// QEMU's `QCryptoCipherMode` names.
const CIPHER_MODES: [&str; 4] = ["ecb", "cbc", "xts", "ctr"];
/// QEMU's `QCryptoIVGenAlgo` names.
const IVGENS: [&str; 3] = ["plain", "plain64", "essiv"];
/// The LUKS cipher names QEMU maps, with (key bytes, algorithm) pairs.
const CIPHERS: [(&str, &[(u32, &str)]); 4] = [
    ("aes", &[(16, "aes-128"), (24, "aes-192"), (32, "aes-256")]),
    ("cast5", &[(16, "cast5-128")]),
    (
        "serpent",
        &[
            (16, "serpent-128"),
            (24, "serpent-192"),
            (32, "serpent-256"),
        ],
    ),
    (
        "twofish",
        &[
            (16, "twofish-128"),
            (24, "twofish-192"),
            (32, "twofish-256"),
        ],
    ),
];

fn invalid(reason: String) -> FormatError {
    FormatError::invalid(Structure::LuksHeader, Some(0), reason)
}

fn unsupported(reason: String) -> FormatError {
    FormatError::new(
        FormatErrorKind::Unsupported,
        Structure::LuksHeader,
        Some(0),
        reason,
    )
}

/// A field as a C string: the bytes up to the first NUL.
fn c_str(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(field.get(..end).unwrap_or_default()).into_owned()
}

/// QEMU prints some unsigned fields with `%d`.
fn as_c_int(v: u32) -> i32 {
    i32::from_ne_bytes(v.to_ne_bytes())
}

fn lookup(names: &[&'static str], name: &str, what: &str) -> Result<&'static str, FormatError> {
    names
        .iter()
        .copied()
        .find(|&n| n == name)
        .ok_or_else(|| unsupported(format!("{what} '{name}' not supported")))
}

fn hash_lookup(name: &str) -> Result<&'static str, FormatError> {
    HASHES
        .iter()
        .map(|&(n, _)| n)
        .find(|&n| n == name)
        .ok_or_else(|| unsupported(format!("Hash algorithm '{name}' not supported")))
}

fn digest_len(hash: &str) -> u64 {
    HASHES
        .iter()
        .find(|&&(n, _)| n == hash)
        .map_or(0, |&(_, l)| l)
}

fn key_len(cipher: &str) -> u64 {
    CIPHERS
        .iter()
        .flat_map(|(_, sizes)| sizes.iter())
        .find(|&&(_, n)| n == cipher)
        .map_or(0, |&(k, _)| u64::from(k))
}

/// QEMU's `qcrypto_block_luks_essiv_cipher`: the cipher ESSIV uses has a key
/// as long as the hash digest.
fn check_essiv_cipher(cipher: &'static str, hash: &str) -> Result<(), FormatError> {
    let digest = digest_len(hash);
    if digest == key_len(cipher) {
        return Ok(());
    }
    let family = CIPHERS
        .iter()
        .find(|(_, sizes)| sizes.iter().any(|&(_, n)| n == cipher));
    let (label, sizes) = match family {
        Some(("aes", sizes)) => ("AES", *sizes),
        Some(("serpent", sizes)) => ("Serpent", *sizes),
        Some(("twofish", sizes)) => ("Twofish", *sizes),
        _ => {
            return Err(unsupported(format!(
                "Cipher {cipher} not supported with essiv"
            )))
        }
    };
    if sizes.iter().any(|&(k, _)| u64::from(k) == digest) {
        Ok(())
    } else {
        Err(unsupported(format!(
            "No {label} cipher with key size {digest} available"
        )))
    }
}

/// QEMU's `qcrypto_block_luks_splitkeylen_sectors`: sectors of a slot's key
/// material, rounded up to whole 4 KiB (the C code multiplies in 32 bits).
fn splitkey_sectors(master_key_len: u32, stripes: u32) -> u32 {
    let header_sectors = KEY_SLOT_OFFSET / SECTOR_SIZE;
    let bytes = u64::from(master_key_len.wrapping_mul(stripes));
    let sectors = bytes.div_ceil(SECTOR_SIZE);
    let rounded = sectors.div_ceil(header_sectors) * header_sectors;
    u32::try_from(rounded).unwrap_or(u32::MAX)
}

/// QEMU's `ranges_overlap` on 64-bit values.
fn ranges_overlap(first1: u64, len1: u64, first2: u64, len2: u64) -> bool {
    let last1 = first1.wrapping_add(len1).wrapping_sub(1);
    let last2 = first2.wrapping_add(len2).wrapping_sub(1);
    !(last2 < first1 || last1 < first2)
}

impl LuksHeader {
    /// Decodes and validates a LUKS1 header (`buf` holds at least
    /// [`LUKS_HEADER_LEN`] bytes; bytes beyond a short file read as zero).
    ///
    /// # Errors
    /// QEMU's message for the first problem, in QEMU's order: `Volume is not
    /// in LUKS format`, `LUKS version N is not supported`, unterminated
    /// strings, a payload or key slot overlapping the header, zero iteration
    /// counts, corrupt key slots, overlapping key slots, then unknown cipher,
    /// cipher mode, hash or IV generator names.
    pub fn decode(buf: &[u8]) -> Result<LuksHeader, FormatError> {
        let buf = match buf.get(..LUKS_HEADER_LEN) {
            Some(b) => b,
            None => {
                return Err(invalid(
                    "Request for data outside of extension header".into(),
                ))
            }
        };
        let field = |pos: usize, len: usize| buf.get(pos..pos + len).unwrap_or_default();
        let u32_at = |pos: usize| be_u32(buf, pos).unwrap_or(0);

        // qcrypto_block_luks_check_header
        if field(0, MAGIC.len()) != MAGIC {
            return Err(invalid("Volume is not in LUKS format".into()));
        }
        let version = be_u16(buf, 6).unwrap_or(0);
        if version != VERSION {
            return Err(unsupported(format!(
                "LUKS version {version} is not supported"
            )));
        }
        for (pos, what) in [
            (CIPHER_NAME, "cipher name"),
            (CIPHER_MODE, "cipher mode"),
            (HASH_SPEC, "hash spec"),
        ] {
            if !field(pos, STRING_LEN).contains(&0) {
                return Err(invalid(format!("LUKS header {what} is not NUL terminated")));
            }
        }
        let payload_sectors = u32_at(PAYLOAD_OFFSET);
        // The fixed header and key slot area end at 4 KiB: 8 sectors.
        const HEADER_SECTORS: u32 = 8;
        const _: () = assert!(KEY_SLOT_OFFSET / SECTOR_SIZE == HEADER_SECTORS as u64);
        let header_sectors = HEADER_SECTORS;
        if payload_sectors < header_sectors {
            return Err(invalid(
                "LUKS payload is overlapping with the header".into(),
            ));
        }
        let master_key_len = u32_at(KEY_BYTES);
        let master_key_iters = u32_at(MASTER_KEY_ITERS);
        if master_key_iters == 0 {
            return Err(invalid("LUKS key iteration count is zero".into()));
        }
        let raw_slot = |i: usize| {
            let base = SLOTS + i * SLOT_LEN;
            (
                u32_at(base),      // state
                u32_at(base + 4),  // iterations
                u32_at(base + 40), // key material offset (sectors)
                u32_at(base + 44), // stripes
            )
        };
        for i in 0..LUKS_NUM_KEY_SLOTS {
            let (state, iterations, start1, stripes) = raw_slot(i);
            let len1 = splitkey_sectors(master_key_len, stripes);
            if stripes != STRIPES {
                return Err(invalid(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    as_c_int(stripes)
                )));
            }
            if state != SLOT_DISABLED && state != SLOT_ENABLED {
                return Err(invalid(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if state == SLOT_ENABLED && iterations == 0 {
                return Err(invalid(format!("Keyslot {i} iteration count is zero")));
            }
            if start1 < header_sectors {
                return Err(invalid(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            // Unsigned 32-bit arithmetic, as in QEMU.
            if start1.wrapping_add(len1) > payload_sectors {
                return Err(invalid(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for j in i + 1..LUKS_NUM_KEY_SLOTS {
                let (_, _, start2, stripes2) = raw_slot(j);
                let len2 = splitkey_sectors(master_key_len, stripes2);
                if ranges_overlap(
                    u64::from(start1),
                    u64::from(len1),
                    u64::from(start2),
                    u64::from(len2),
                ) {
                    return Err(invalid(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }

        // qcrypto_block_luks_parse_header
        let mode_spec = c_str(field(CIPHER_MODE, STRING_LEN));
        let Some((mode_name, ivgen_spec)) = mode_spec.split_once('-') else {
            return Err(invalid(format!(
                "Unexpected cipher mode string format '{mode_spec}'"
            )));
        };
        let (ivgen_name, ivgen_hash_alg) = match ivgen_spec.split_once(':') {
            Some((ivgen, hash)) => (ivgen, Some(hash_lookup(hash)?)),
            None => (ivgen_spec, None),
        };
        let cipher_mode = lookup(&CIPHER_MODES, mode_name, "Cipher mode")?;
        let cipher_name = c_str(field(CIPHER_NAME, STRING_LEN));
        let key_bytes = if cipher_mode == "xts" {
            master_key_len / 2
        } else {
            master_key_len
        };
        let cipher_alg = CIPHERS
            .iter()
            .filter(|(n, _)| *n == cipher_name)
            .flat_map(|(_, sizes)| sizes.iter())
            .find(|&&(k, _)| k == key_bytes)
            .map(|&(_, alg)| alg)
            .ok_or_else(|| {
                unsupported(format!(
                    "Algorithm '{cipher_name}' with key size {} bytes not supported",
                    as_c_int(key_bytes)
                ))
            })?;
        let hash_alg = hash_lookup(&c_str(field(HASH_SPEC, STRING_LEN)))?;
        let ivgen_alg = lookup(&IVGENS, ivgen_name, "IV generator")?;
        if ivgen_alg == "essiv" {
            let Some(hash) = ivgen_hash_alg else {
                return Err(invalid("Missing IV generator hash specification".into()));
            };
            check_essiv_cipher(cipher_alg, hash)?;
        }

        let bytes = |pos: usize| {
            let mut out = [0u8; LUKS_SALT_LEN];
            if let Some(src) = buf.get(pos..pos + LUKS_SALT_LEN) {
                out.copy_from_slice(src);
            }
            out
        };
        let slots = std::array::from_fn(|i| {
            let (state, iterations, start, stripes) = raw_slot(i);
            LuksKeySlot {
                active: state == SLOT_ENABLED,
                iterations,
                key_offset: u64::from(start) * SECTOR_SIZE,
                stripes,
                salt: bytes(SLOTS + i * SLOT_LEN + 8),
            }
        });
        let mut master_key_digest = [0u8; LUKS_DIGEST_LEN];
        if let Some(src) = buf.get(MK_DIGEST..MK_DIGEST + LUKS_DIGEST_LEN) {
            master_key_digest.copy_from_slice(src);
        }
        Ok(LuksHeader {
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash_alg,
            hash_alg,
            payload_offset: u64::from(payload_sectors) * SECTOR_SIZE,
            master_key_len,
            master_key_iters,
            uuid: c_str(field(UUID, UUID_LEN)),
            slots,
            master_key_digest,
            master_key_salt: bytes(MK_SALT),
        })
    }

    /// The cipher name as the header stores it (`aes` for `aes-256`).
    pub fn cipher_name(&self) -> &'static str {
        CIPHERS
            .iter()
            .find(|(_, sizes)| sizes.iter().any(|&(_, n)| n == self.cipher_alg))
            .map_or("", |(name, _)| *name)
    }

    /// Encodes the header (the 592 bytes [`LuksHeader::decode`] reads):
    /// QEMU's spellings of the cipher mode (`xts-plain64`,
    /// `cbc-essiv:sha256`), disabled slots as `0x0000dead`.
    ///
    /// # Errors
    /// A name that does not fit its 31-byte field, a payload or key
    /// material offset that is not a whole number of sectors or does not
    /// fit 32 bits.
    pub fn encode(&self) -> Result<[u8; LUKS_HEADER_LEN], FormatError> {
        let mut b = [0u8; LUKS_HEADER_LEN];
        let put = |b: &mut [u8; LUKS_HEADER_LEN], pos: usize, src: &[u8]| {
            if let Some(dst) = b.get_mut(pos..pos + src.len()) {
                dst.copy_from_slice(src);
            }
        };
        let sectors = |bytes: u64, what: &str| -> Result<[u8; 4], FormatError> {
            if !bytes.is_multiple_of(SECTOR_SIZE) {
                return Err(invalid(format!("{what} is not a whole number of sectors")));
            }
            u32::try_from(bytes / SECTOR_SIZE)
                .map(u32::to_be_bytes)
                .map_err(|_| invalid(format!("{what} is too large")))
        };
        let mode = match self.ivgen_hash_alg {
            Some(h) => format!("{}-{}:{h}", self.cipher_mode, self.ivgen_alg),
            None => format!("{}-{}", self.cipher_mode, self.ivgen_alg),
        };
        for (pos, text, len) in [
            (CIPHER_NAME, self.cipher_name(), STRING_LEN),
            (CIPHER_MODE, mode.as_str(), STRING_LEN),
            (HASH_SPEC, self.hash_alg, STRING_LEN),
            (UUID, self.uuid.as_str(), UUID_LEN),
        ] {
            if text.len() >= len {
                return Err(invalid(format!("LUKS header field '{text}' is too long")));
            }
            put(&mut b, pos, text.as_bytes());
        }
        put(&mut b, 0, MAGIC);
        put(&mut b, 6, &VERSION.to_be_bytes());
        put(
            &mut b,
            PAYLOAD_OFFSET,
            &sectors(self.payload_offset, "payload offset")?,
        );
        put(&mut b, KEY_BYTES, &self.master_key_len.to_be_bytes());
        put(&mut b, MK_DIGEST, &self.master_key_digest);
        put(&mut b, MK_SALT, &self.master_key_salt);
        put(
            &mut b,
            MASTER_KEY_ITERS,
            &self.master_key_iters.to_be_bytes(),
        );
        for (i, slot) in self.slots.iter().enumerate() {
            let base = SLOTS + i * SLOT_LEN;
            let state = if slot.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            put(&mut b, base, &state.to_be_bytes());
            put(&mut b, base + 4, &slot.iterations.to_be_bytes());
            put(&mut b, base + 8, &slot.salt);
            put(
                &mut b,
                base + 40,
                &sectors(slot.key_offset, "key material offset")?,
            );
            put(&mut b, base + 44, &slot.stripes.to_be_bytes());
        }
        Ok(b)
    }
}

/// Bytes of one key slot's (anti-forensically split) key material, rounded
/// up to whole 4 KiB as QEMU lays it out
/// (`qcrypto_block_luks_splitkeylen_sectors`), in bytes.
pub fn key_material_len(master_key_len: u32) -> u64 {
    u64::from(splitkey_sectors(master_key_len, STRIPES)) * SECTOR_SIZE
}

/// The first byte of key material, after the fixed header.
pub const LUKS_KEY_SLOT_OFFSET: u64 = KEY_SLOT_OFFSET;

#[cfg(test)]
mod tests {
    use super::*;

    /// The header `qemu-img create -o encrypt.format=luks` writes (defaults:
    /// aes-256 xts-plain64 sha256, slot 0 active), with the salts and
    /// digests left zero.
    fn qemu_like() -> Vec<u8> {
        let mut b = vec![0u8; LUKS_HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[CIPHER_NAME..CIPHER_NAME + 3].copy_from_slice(b"aes");
        b[CIPHER_MODE..CIPHER_MODE + 11].copy_from_slice(b"xts-plain64");
        b[HASH_SPEC..HASH_SPEC + 6].copy_from_slice(b"sha256");
        b[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&4040u32.to_be_bytes());
        b[KEY_BYTES..KEY_BYTES + 4].copy_from_slice(&64u32.to_be_bytes());
        b[MASTER_KEY_ITERS..MASTER_KEY_ITERS + 4].copy_from_slice(&9929u32.to_be_bytes());
        let uuid = b"1b92e618-452a-4823-9eb8-cd6bb341a975";
        b[UUID..UUID + uuid.len()].copy_from_slice(uuid);
        for i in 0..LUKS_NUM_KEY_SLOTS {
            let base = SLOTS + i * SLOT_LEN;
            let (state, iters) = if i == 0 {
                (SLOT_ENABLED, 39009u32)
            } else {
                (SLOT_DISABLED, 0)
            };
            b[base..base + 4].copy_from_slice(&state.to_be_bytes());
            b[base + 4..base + 8].copy_from_slice(&iters.to_be_bytes());
            // 64 * 4000 bytes = 500 sectors, rounded to 504.
            let start = 8 + 504 * i as u32;
            b[base + 40..base + 44].copy_from_slice(&start.to_be_bytes());
            b[base + 44..base + 48].copy_from_slice(&STRIPES.to_be_bytes());
        }
        b
    }

    fn set_str(b: &mut [u8], pos: usize, s: &[u8]) {
        b[pos..pos + STRING_LEN].fill(0);
        b[pos..pos + s.len()].copy_from_slice(s);
    }

    fn set32(b: &mut [u8], pos: usize, v: u32) {
        b[pos..pos + 4].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn decodes_qemu_defaults() {
        let h = LuksHeader::decode(&qemu_like()).unwrap();
        assert_eq!(h.cipher_alg, "aes-256");
        assert_eq!(h.cipher_mode, "xts");
        assert_eq!(h.ivgen_alg, "plain64");
        assert_eq!(h.ivgen_hash_alg, None);
        assert_eq!(h.hash_alg, "sha256");
        assert_eq!(h.payload_offset, 2_068_480);
        assert_eq!(h.master_key_iters, 9929);
        assert_eq!(h.uuid, "1b92e618-452a-4823-9eb8-cd6bb341a975");
        assert!(h.slots[0].active);
        assert_eq!(h.slots[0].iterations, 39009);
        assert_eq!(h.slots[0].key_offset, 4096);
        assert_eq!(h.slots[7].key_offset, 1_810_432);
        assert!(!h.slots[7].active);
    }

    #[test]
    fn encode_is_the_inverse_of_decode() {
        let mut b = qemu_like();
        // Salts and the digest survive too.
        b[MK_DIGEST..MK_DIGEST + 20].fill(0x11);
        b[MK_SALT..MK_SALT + 32].fill(0x22);
        b[SLOTS + 8..SLOTS + 40].fill(0x33);
        let h = LuksHeader::decode(&b).unwrap();
        assert_eq!(h.encode().unwrap().to_vec(), b);
        set_str(&mut b, CIPHER_MODE, b"cbc-essiv:sha256");
        set32(&mut b, KEY_BYTES, 16);
        let h = LuksHeader::decode(&b).unwrap();
        assert_eq!(h.cipher_name(), "aes");
        assert_eq!(h.encode().unwrap().to_vec(), b);
        let mut odd = h.clone();
        odd.payload_offset += 1;
        assert!(odd.encode().is_err(), "not whole sectors");
    }

    #[test]
    fn essiv_and_other_ciphers() {
        let mut b = qemu_like();
        set_str(&mut b, CIPHER_MODE, b"cbc-essiv:sha256");
        set32(&mut b, KEY_BYTES, 16);
        let h = LuksHeader::decode(&b).unwrap();
        assert_eq!((h.cipher_alg, h.cipher_mode), ("aes-128", "cbc"));
        assert_eq!((h.ivgen_alg, h.ivgen_hash_alg), ("essiv", Some("sha256")));
        set_str(&mut b, CIPHER_NAME, b"twofish");
        set32(&mut b, KEY_BYTES, 24);
        assert_eq!(LuksHeader::decode(&b).unwrap().cipher_alg, "twofish-192");
    }

    #[test]
    fn rejections_have_qemu_messages() {
        type Edit = fn(&mut Vec<u8>);
        let cases: &[(&str, Edit, &str)] = &[
            (
                "short",
                |b| b.truncate(100),
                "Request for data outside of extension header",
            ),
            ("magic", |b| b[0] = b'X', "Volume is not in LUKS format"),
            ("version", |b| b[7] = 2, "LUKS version 2 is not supported"),
            (
                "cipher name",
                |b| b[CIPHER_NAME..CIPHER_NAME + 32].fill(b'a'),
                "LUKS header cipher name is not NUL terminated",
            ),
            (
                "hash spec",
                |b| b[HASH_SPEC..HASH_SPEC + 32].fill(b'a'),
                "LUKS header hash spec is not NUL terminated",
            ),
            (
                "payload",
                |b| set32(b, PAYLOAD_OFFSET, 7),
                "LUKS payload is overlapping with the header",
            ),
            (
                "mk iters",
                |b| set32(b, MASTER_KEY_ITERS, 0),
                "LUKS key iteration count is zero",
            ),
            (
                "stripes",
                |b| set32(b, SLOTS + 48 + 44, u32::MAX),
                "Keyslot 1 is corrupted (stripes -1 != 4000)",
            ),
            (
                "state",
                |b| set32(b, SLOTS + 2 * 48, 1),
                "Keyslot 2 state (active/disable) is corrupted",
            ),
            (
                "slot iters",
                |b| set32(b, SLOTS + 4, 0),
                "Keyslot 0 iteration count is zero",
            ),
            (
                "slot in header",
                |b| set32(b, SLOTS + 40, 7),
                "Keyslot 0 is overlapping with the LUKS header",
            ),
            (
                "slot in payload",
                |b| set32(b, SLOTS + 7 * 48 + 40, 4000),
                "Keyslot 7 is overlapping with the encrypted payload",
            ),
            (
                "slots overlap",
                |b| set32(b, SLOTS + 3 * 48 + 40, 8 + 504 * 2 + 8),
                "Keyslots 2 and 3 are overlapping in the header",
            ),
            (
                "mode format",
                |b| set_str(b, CIPHER_MODE, b"xts"),
                "Unexpected cipher mode string format 'xts'",
            ),
            (
                "mode",
                |b| set_str(b, CIPHER_MODE, b"gcm-plain64"),
                "Cipher mode 'gcm' not supported",
            ),
            (
                "iv hash",
                |b| set_str(b, CIPHER_MODE, b"cbc-essiv:sha3"),
                "Hash algorithm 'sha3' not supported",
            ),
            (
                "cipher",
                |b| set_str(b, CIPHER_NAME, b"sm4"),
                "Algorithm 'sm4' with key size 32 bytes not supported",
            ),
            (
                "hash",
                |b| set_str(b, HASH_SPEC, b"whirlpool"),
                "Hash algorithm 'whirlpool' not supported",
            ),
            (
                "ivgen",
                |b| set_str(b, CIPHER_MODE, b"xts-benbi"),
                "IV generator 'benbi' not supported",
            ),
            (
                "essiv hash",
                |b| set_str(b, CIPHER_MODE, b"xts-essiv"),
                "Missing IV generator hash specification",
            ),
            (
                "essiv size",
                |b| set_str(b, CIPHER_MODE, b"xts-essiv:sha384"),
                "No AES cipher with key size 48 available",
            ),
        ];
        for (name, edit, want) in cases {
            let mut b = qemu_like();
            edit(&mut b);
            let e = LuksHeader::decode(&b).expect_err(name);
            assert_eq!(e.reason, *want, "{name}");
            assert_eq!(e.what, Structure::LuksHeader, "{name}");
        }
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut b = qemu_like();
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let pos = (seed % LUKS_HEADER_LEN as u64) as usize;
            b[pos] = (seed >> 32) as u8;
            let _ = LuksHeader::decode(&b);
        }
    }
}
