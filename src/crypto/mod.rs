//! Encryption of guest data: secrets, LUKS1 key slots and sector ciphers.
//!
//! An encrypted qcow2 image (`crypt_method` 2) keeps a LUKS1 volume header in
//! the clusters named by its full disk encryption header extension
//! ([`crate::format::luks`]). Opening it with a key
//! ([`OpenOptions::key_secret`](crate::OpenOptions::key_secret) naming a
//! secret of [`OpenOptions::secrets`](crate::OpenOptions::secrets)) unlocks
//! the master key from a key slot (PBKDF2, the anti-forensic merge, the
//! master key digest check); guest data clusters are then encrypted sector by
//! sector (512 bytes) with the volume's cipher, each sector's IV derived from
//! its **host** offset in the data file, as QEMU does for LUKS
//! (`crypt_physical_offset`). Compressed clusters are stored unencrypted and
//! zero or unallocated clusters read as zeroes without decryption, as in QEMU.
//! The legacy `aes` format (`crypt_method` 1) is read and written too:
//! AES-128-CBC keyed with the first 16 bytes of the password, `plain64` IVs
//! of **guest** sectors, no key check (QEMU's `crypto/block-qcow.c`).
//!
//! The primitives are RustCrypto's (`aes`, `xts-mode`, `cbc`, `pbkdf2`,
//! `sha1`, `sha2`); keys and secrets are zeroed when dropped (`zeroize`).

pub mod cipher;
pub mod hash;
pub mod luks;
pub mod secret;

pub use cipher::{CipherSpec, SectorCipher};
pub use secret::{Secret, SecretError, SecretStore};

/// What went wrong with a key or a cipher. `Display` is QEMU's text where
/// QEMU has one; no variant carries secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// `encrypt.key-secret` names a secret that was not given.
    #[error("No secret with id '{id}'")]
    SecretNotFound {
        /// The id.
        id: String,
    },
    /// The secret is not UTF-8 (LUKS passphrases are text in QEMU).
    #[error("Data from secret {id} is not valid UTF-8")]
    SecretNotUtf8 {
        /// The id.
        id: String,
    },
    /// No active key slot opens with the passphrase.
    #[error("Invalid password, cannot unlock any keyslot")]
    InvalidPassword,
    /// `encrypt.format` disagrees with the image's `crypt_method`.
    #[error("Header reported '{header}' encryption format but options specify '{options}'")]
    FormatMismatch {
        /// What the header says (`aes`, `luks`).
        header: &'static str,
        /// What the options say.
        options: String,
    },
    /// A cipher, mode, IV generator or hash that qcow2kit does not implement
    /// (QEMU may; the image is refused rather than misread).
    #[error("qcow2kit does not support {0} for encryption")]
    Unsupported(String),
    /// Data to transform is not whole cipher blocks (a bug in the caller).
    #[error("encryption request of {len} bytes at sector {sector} is not whole blocks")]
    Unaligned {
        /// First sector of the request.
        sector: u64,
        /// Its length.
        len: u64,
    },
    /// The system's random source failed (creating a key).
    #[error("Unable to read random bytes: {0}")]
    Random(String),
}

/// Fills `buf` from the system's random source.
///
/// # Errors
/// [`CryptoError::Random`].
pub(crate) fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}
