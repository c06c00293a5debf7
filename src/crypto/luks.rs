//! LUKS1 key slots: unlocking the master key with a passphrase (QEMU's
//! `qcrypto_block_luks_load_key`/`find_key`) and formatting a new header
//! with one active slot (`qcrypto_block_luks_create`).

use super::cipher::{CipherSpec, SectorCipher};
use super::hash::{af_merge, af_split, HashAlg};
use super::CryptoError;
use crate::format::luks::{
    key_material_len, LuksHeader, LuksKeySlot, LUKS_DIGEST_LEN, LUKS_KEY_SLOT_OFFSET,
    LUKS_NUM_KEY_SLOTS, LUKS_SALT_LEN, LUKS_SECTOR_SIZE, LUKS_STRIPES,
};
use zeroize::Zeroizing;

/// QEMU's floor for key slot PBKDF2 iterations.
const MIN_SLOT_KEY_ITERS: u64 = 1000;
/// QEMU's floor for the master key digest's iterations.
const MIN_MASTER_KEY_ITERS: u64 = 1000;
/// Largest master key of a supported cipher (AES-256-XTS).
const MAX_MASTER_KEY_LEN: usize = 64;

/// The cipher spec a validated header names.
pub fn header_spec(h: &LuksHeader) -> CipherSpec {
    CipherSpec {
        cipher_alg: h.cipher_alg,
        cipher_mode: h.cipher_mode,
        ivgen_alg: h.ivgen_alg,
        ivgen_hash_alg: h.ivgen_hash_alg,
    }
}

/// Unlocks the master key of `h` with `password`, trying the active slots
/// in order as QEMU does; `read` reads `buf.len()` bytes of the LUKS volume
/// at a byte offset from its start (the key material).
///
/// Returns the payload cipher, keyed.
///
/// # Errors
/// [`CryptoError::InvalidPassword`] when no slot opens;
/// [`CryptoError::Unsupported`] for a cipher or hash qcow2kit does not
/// implement; errors of `read`.
pub fn unlock(
    h: &LuksHeader,
    password: &[u8],
    read: &mut dyn FnMut(u64, &mut [u8]) -> crate::Result<()>,
) -> crate::Result<SectorCipher> {
    let spec = header_spec(h);
    let hash = HashAlg::from_name(h.hash_alg)?;
    let key_len = usize::try_from(h.master_key_len).unwrap_or(usize::MAX);
    if key_len == 0 || key_len > MAX_MASTER_KEY_LEN || spec.key_len()? != key_len {
        return Err(CryptoError::Unsupported(format!(
            "{} {} with a master key of {} bytes",
            h.cipher_alg, h.cipher_mode, h.master_key_len
        ))
        .into());
    }
    let stripes = usize::try_from(LUKS_STRIPES).unwrap_or(usize::MAX);
    let split_len = key_len * stripes;
    let mut split = Zeroizing::new(vec![0u8; split_len]);
    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    let mut master = Zeroizing::new(vec![0u8; key_len]);
    for slot in h.slots.iter().filter(|s| s.active) {
        read(slot.key_offset, &mut split)?;
        hash.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        let slot_cipher = SectorCipher::new(&spec, &slot_key)?;
        slot_cipher.decrypt(&mut split, 0)?;
        af_merge(hash, &split, &mut master);
        let mut digest = [0u8; LUKS_DIGEST_LEN];
        hash.pbkdf2(&master, &h.master_key_salt, h.master_key_iters, &mut digest);
        if digest == h.master_key_digest {
            return Ok(SectorCipher::new(&spec, &master)?);
        }
    }
    Err(CryptoError::InvalidPassword.into())
}

/// What to create: QEMU's `encrypt.*` creation options, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksCreateSpec {
    /// The payload cipher (QEMU's default: `aes-256`, `xts`, `plain64`).
    pub cipher: CipherSpec,
    /// The PBKDF2 and anti-forensic hash (default `sha256`).
    pub hash_alg: &'static str,
    /// Milliseconds PBKDF2 should take (default 2000).
    pub iter_time_ms: u64,
}

/// A formatted LUKS volume header: the header and slot 0's key material,
/// at their byte offsets from the start of the volume.
pub struct LuksFormatted {
    /// The header (592 bytes at offset 0 once encoded).
    pub header: LuksHeader,
    /// Slot 0's encrypted key material, at `header.slots[0].key_offset`.
    pub key_material: Zeroizing<Vec<u8>>,
    /// Bytes of the volume up to the payload (what the qcow2 header
    /// extension's length says).
    pub len: u64,
    /// The payload cipher, keyed with the new master key.
    pub cipher: SectorCipher,
}

impl std::fmt::Debug for LuksFormatted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksFormatted")
            .field("header", &self.header)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// PBKDF2 iterations per second of `hash` on this machine for a key of
/// `out_len` bytes (QEMU's `qcrypto_pbkdf2_count_iters`, measured for a
/// tenth of a second instead of half a second).
fn iters_per_second(hash: HashAlg, password: &[u8], out_len: usize) -> u64 {
    let salt = [0u8; LUKS_SALT_LEN];
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let mut iters: u32 = 1 << 10;
    loop {
        let start = std::time::Instant::now();
        hash.pbkdf2(password, &salt, iters, &mut out);
        let ms = start.elapsed().as_millis() as u64;
        if ms >= 100 || iters >= 1 << 30 {
            return u64::from(iters) * 1000 / ms.max(1);
        }
        iters = iters.saturating_mul(if ms == 0 { 10 } else { 2 });
    }
}

/// The master key length of `cipher_alg` in `cipher_mode` (QEMU's
/// `qcrypto_cipher_get_key_len`, doubled for XTS), for every algorithm
/// QEMU names, including those qcow2kit cannot encrypt with: sizing a
/// volume is arithmetic only.
///
/// # Errors
/// [`CryptoError::Unsupported`] for a name QEMU does not know.
pub fn master_key_len(cipher_alg: &str, cipher_mode: &str) -> Result<u32, CryptoError> {
    let len = match cipher_alg {
        "des" => 8,
        "aes-128" | "cast5-128" | "serpent-128" | "twofish-128" | "sm4" => 16,
        "aes-192" | "3des" | "serpent-192" | "twofish-192" => 24,
        "aes-256" | "serpent-256" | "twofish-256" => 32,
        other => {
            return Err(CryptoError::Unsupported(format!(
                "cipher algorithm '{other}'"
            )))
        }
    };
    Ok(if cipher_mode == "xts" { len * 2 } else { len })
}

/// The bytes a new LUKS volume with a `master_key_len`-byte key takes
/// before its payload, as QEMU lays it out (the fixed header, then eight
/// key slots each rounded to 4 KiB): the payload offset of [`format()`],
/// what `qemu-img measure` counts (`qcrypto_block_calculate_payload_offset`).
pub fn volume_len(master_key_len: u32) -> u64 {
    LUKS_KEY_SLOT_OFFSET + key_material_len(master_key_len) * LUKS_NUM_KEY_SLOTS as u64
}

/// Formats a LUKS1 volume protected by `password` in slot 0, as QEMU lays
/// it out (key material from 4 KiB on, each slot rounded to 4 KiB, the
/// payload after the eighth slot; random master key, salts and UUID;
/// iteration counts calibrated against `iter_time_ms`).
///
/// # Errors
/// [`CryptoError::Unsupported`] for a cipher or hash qcow2kit does not
/// implement; [`CryptoError::Random`] when the random source fails.
pub fn format(spec: &LuksCreateSpec, password: &[u8]) -> Result<LuksFormatted, CryptoError> {
    let hash = HashAlg::from_name(spec.hash_alg)?;
    let key_len = spec.cipher.key_len()?;
    let stripes = usize::try_from(LUKS_STRIPES).unwrap_or(usize::MAX);
    if (key_len * stripes) % super::cipher::SECTOR_SIZE != 0 {
        // QEMU 10 aborts on an assertion creating such a volume (and
        // cannot open one): refused rather than made unreadable there.
        return Err(CryptoError::Unsupported(format!(
            "{} {} (its key material, {} bytes, is not whole 512-byte sectors)",
            spec.cipher.cipher_alg,
            spec.cipher.cipher_mode,
            key_len * stripes
        )));
    }
    let mut master = Zeroizing::new(vec![0u8; key_len]);
    super::random(&mut master)?;
    // Fails early for what is not implemented (ESSIV hashes, ...).
    let cipher = SectorCipher::new(&spec.cipher, &master)?;
    let mk_len = u32::try_from(key_len).unwrap_or(u32::MAX);

    let mut master_key_salt = [0u8; LUKS_SALT_LEN];
    super::random(&mut master_key_salt)?;
    let per_sec = iters_per_second(hash, &master, LUKS_DIGEST_LEN);
    let mk_iters = (per_sec.saturating_mul(spec.iter_time_ms) / 1000 / 8).max(MIN_MASTER_KEY_ITERS);
    let master_key_iters = u32::try_from(mk_iters).unwrap_or(u32::MAX);
    let mut master_key_digest = [0u8; LUKS_DIGEST_LEN];
    hash.pbkdf2(
        &master,
        &master_key_salt,
        master_key_iters,
        &mut master_key_digest,
    );

    let material = key_material_len(mk_len);
    let first = LUKS_KEY_SLOT_OFFSET;
    let mut slots = [LuksKeySlot {
        active: false,
        iterations: 0,
        key_offset: 0,
        stripes: LUKS_STRIPES,
        salt: [0; LUKS_SALT_LEN],
    }; LUKS_NUM_KEY_SLOTS];
    for (i, s) in slots.iter_mut().enumerate() {
        s.key_offset = first + material * i as u64;
    }
    let payload_offset = volume_len(mk_len);

    let mut salt = [0u8; LUKS_SALT_LEN];
    super::random(&mut salt)?;
    let per_sec = iters_per_second(hash, password, key_len);
    let slot_iters = (per_sec.saturating_mul(spec.iter_time_ms) / 1000).max(MIN_SLOT_KEY_ITERS);
    let slot_iters = u32::try_from(slot_iters).unwrap_or(u32::MAX);
    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    hash.pbkdf2(password, &salt, slot_iters, &mut slot_key);
    let mut key_material = Zeroizing::new(vec![0u8; key_len * stripes]);
    af_split(hash, &master, &mut key_material)?;
    SectorCipher::new(&spec.cipher, &slot_key)?.encrypt(&mut key_material, 0)?;
    if let Some(s) = slots.first_mut() {
        s.active = true;
        s.iterations = slot_iters;
        s.salt = salt;
    }

    let mut uuid = [0u8; 16];
    super::random(&mut uuid)?;
    // RFC 4122 version 4, variant 1.
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    let header = LuksHeader {
        cipher_alg: spec.cipher.cipher_alg,
        cipher_mode: spec.cipher.cipher_mode,
        ivgen_alg: spec.cipher.ivgen_alg,
        ivgen_hash_alg: spec.cipher.ivgen_hash_alg,
        hash_alg: spec.hash_alg,
        payload_offset,
        master_key_len: mk_len,
        master_key_iters,
        uuid,
        slots,
        master_key_digest,
        master_key_salt,
    };
    debug_assert_eq!(payload_offset % LUKS_SECTOR_SIZE, 0);
    Ok(LuksFormatted {
        header,
        key_material,
        len: payload_offset,
        cipher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(f: &LuksFormatted) -> Vec<u8> {
        let mut v = vec![0u8; f.len as usize];
        v[..592].copy_from_slice(&f.header.encode().unwrap());
        let at = f.header.slots[0].key_offset as usize;
        v[at..at + f.key_material.len()].copy_from_slice(&f.key_material);
        v
    }

    fn spec(
        alg: &'static str,
        mode: &'static str,
        iv: &'static str,
        hash: &'static str,
    ) -> LuksCreateSpec {
        LuksCreateSpec {
            cipher: CipherSpec {
                cipher_alg: alg,
                cipher_mode: mode,
                ivgen_alg: iv,
                ivgen_hash_alg: (iv == "essiv").then_some("sha256"),
            },
            hash_alg: hash,
            iter_time_ms: 1,
        }
    }

    #[test]
    fn formatted_volumes_unlock_with_their_password_only() {
        for s in [
            spec("aes-256", "xts", "plain64", "sha256"),
            spec("aes-128", "cbc", "essiv", "sha1"),
            spec("aes-256", "cbc", "plain", "sha512"),
            spec("aes-192", "xts", "plain64", "sha224"),
        ] {
            let f = format(&s, b"pw").unwrap();
            let v = volume(&f);
            let h = LuksHeader::decode(&v).unwrap();
            assert_eq!(h, f.header);
            let mut read = |off: u64, buf: &mut [u8]| {
                let off = off as usize;
                buf.copy_from_slice(&v[off..off + buf.len()]);
                Ok(())
            };
            let c = unlock(&h, b"pw", &mut read).unwrap();
            let mut a = vec![9u8; 1024];
            let mut b = a.clone();
            c.encrypt(&mut a, 77).unwrap();
            f.cipher.encrypt(&mut b, 77).unwrap();
            assert_eq!(a, b, "same master key");
            let e = unlock(&h, b"wrong", &mut read).unwrap_err();
            assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
        }
    }

    #[test]
    fn key_material_of_partial_sectors_is_refused() {
        let e = format(&spec("aes-192", "cbc", "plain", "sha256"), b"pw").unwrap_err();
        assert!(e.to_string().contains("not whole 512-byte sectors"), "{e}");
    }

    #[test]
    fn qemu_layout_for_the_default_cipher() {
        let f = format(&spec("aes-256", "xts", "plain64", "sha256"), b"pw").unwrap();
        assert_eq!(f.header.payload_offset, 2_068_480);
        assert_eq!(
            volume_len(master_key_len("aes-256", "xts").unwrap()),
            2_068_480
        );
        // What qemu-img measure adds for aes-192-xts and aes-128-ecb (64 KiB clusters).
        assert_eq!(
            volume_len(master_key_len("aes-192", "xts").unwrap()),
            1_544_192
        );
        assert_eq!(
            volume_len(master_key_len("aes-128", "ecb").unwrap()),
            528_384
        );
        assert_eq!(f.header.slots[1].key_offset, 262_144);
        assert_eq!(f.header.slots[7].key_offset, 1_810_432);
        assert!(f.header.slots[0].iterations >= 1000);
        assert!(f.header.master_key_iters >= 1000);
    }
}
