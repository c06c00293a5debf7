//! `qemu-img create -o encryption=...,encrypt.*=...`: the encryption of a
//! new image, kept as given (QEMU echoes the values in its `Formatting`
//! line and checks them only afterwards), resolved at creation into a LUKS
//! cipher and a passphrase from the secret store.

use super::error::OptionError;
use super::parse::{escape_option_value, parse_bool_onoff};
use crate::crypto::cipher::CipherSpec;
use crate::crypto::luks::LuksCreateSpec;
use crate::crypto::{CryptoError, Secret, SecretStore};

/// QEMU's default `encrypt.iter-time` (milliseconds of PBKDF2).
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// The `encryption`/`encrypt.*` creation options as given (`None`: not given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptOptions {
    /// `encryption=on|off` (deprecated alias of `encrypt.format=aes`).
    pub encryption: Option<String>,
    /// `encrypt.format` (`luks` or `aes`).
    pub format: Option<String>,
    /// `encrypt.key-secret`: the id of the secret with the passphrase.
    pub key_secret: Option<String>,
    /// `encrypt.cipher-alg` (default `aes-256`).
    pub cipher_alg: Option<String>,
    /// `encrypt.cipher-mode` (default `xts`).
    pub cipher_mode: Option<String>,
    /// `encrypt.ivgen-alg` (default `plain64`).
    pub ivgen_alg: Option<String>,
    /// `encrypt.ivgen-hash-alg` (default `sha256` for `essiv`).
    pub ivgen_hash_alg: Option<String>,
    /// `encrypt.hash-alg` (default `sha256`).
    pub hash_alg: Option<String>,
    /// `encrypt.iter-time` in milliseconds (default 2000).
    pub iter_time: Option<String>,
}

/// QEMU's `QCryptoCipherAlgo` names.
const CIPHER_ALGS: &[&str] = &[
    "aes-128",
    "aes-192",
    "aes-256",
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
];
/// QEMU's `QCryptoCipherMode` names.
const CIPHER_MODES: &[&str] = &["ecb", "cbc", "xts", "ctr"];
/// QEMU's `QCryptoIVGenAlgo` names.
const IVGEN_ALGS: &[&str] = &["plain", "plain64", "essiv"];
/// QEMU's `QCryptoHashAlgo` names.
const HASH_ALGS: &[&str] = &[
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "ripemd160",
    "sm3",
];

/// What [`EncryptOptions::resolve`] gives: the LUKS volume to format and
/// its passphrase.
#[derive(Debug)]
pub struct LuksToCreate {
    /// Cipher, hash and iteration time.
    pub spec: LuksCreateSpec,
    /// The passphrase (zeroed when dropped).
    pub password: Secret,
    /// The secret's id (the new image opens with it).
    pub key_secret: String,
}

impl EncryptOptions {
    /// Takes one `-o` key if it is an encryption option; `Ok(false)` if not.
    ///
    /// # Errors
    /// [`OptionError::BadBool`] for `encryption=` other than on/off,
    /// [`OptionError::BadNumber`] / [`OptionError::NumberTooLarge`] for
    /// `encrypt.iter-time`.
    pub(crate) fn apply(&mut self, key: &str, value: &str) -> Result<bool, OptionError> {
        let slot = match key {
            "encryption" => {
                parse_bool_onoff(key, value)?;
                &mut self.encryption
            }
            "encrypt.format" => &mut self.format,
            "encrypt.key-secret" => &mut self.key_secret,
            "encrypt.cipher-alg" => &mut self.cipher_alg,
            "encrypt.cipher-mode" => &mut self.cipher_mode,
            "encrypt.ivgen-alg" => &mut self.ivgen_alg,
            "encrypt.ivgen-hash-alg" => &mut self.ivgen_hash_alg,
            "encrypt.hash-alg" => &mut self.hash_alg,
            "encrypt.iter-time" => {
                // A number option: refused while parsing, as in QEMU.
                super::parse::parse_number(key, value)?;
                &mut self.iter_time
            }
            _ => return Ok(false),
        };
        *slot = Some(value.to_owned());
        Ok(true)
    }

    /// The `key=value` items of the `Formatting` line, in QEMU's order
    /// (they come before `cluster_size`).
    pub(crate) fn formatting_items(&self) -> Vec<(&'static str, String)> {
        [
            ("encryption", &self.encryption),
            ("encrypt.format", &self.format),
            ("encrypt.key-secret", &self.key_secret),
            ("encrypt.cipher-alg", &self.cipher_alg),
            ("encrypt.cipher-mode", &self.cipher_mode),
            ("encrypt.ivgen-alg", &self.ivgen_alg),
            ("encrypt.ivgen-hash-alg", &self.ivgen_hash_alg),
            ("encrypt.hash-alg", &self.hash_alg),
            ("encrypt.iter-time", &self.iter_time),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, escape_option_value(v))))
        .collect()
    }

    /// Whether the new image is to be encrypted at all.
    pub fn is_requested(&self) -> bool {
        self.format.is_some()
            || self
                .encryption
                .as_deref()
                .is_some_and(|v| parse_bool_onoff("encryption", v).unwrap_or(false))
    }

    /// Resolves the options into the LUKS volume to create, with QEMU's
    /// checks in QEMU's order (the QAPI values, then the secret). `None`
    /// when no encryption was asked for.
    ///
    /// # Errors
    /// `'encrypt.format' and its alias 'encryption' can't be used at the
    /// same time`; `Parameter 'X' does not accept value 'V'` for unknown
    /// formats, algorithms, modes, IV generators and hashes; a bad
    /// `iter-time`; the legacy `aes` format (not created); [`CryptoError`]s
    /// for algorithms qcow2kit does not implement, a missing `key-secret`
    /// (`Parameter 'encrypt.key-secret' is required for cipher`), an unknown
    /// secret, a secret that is not UTF-8.
    pub fn resolve(&self, secrets: &SecretStore) -> crate::Result<Option<LuksToCreate>> {
        let invalid = |e: OptionError| crate::Error::InvalidArgument(e.to_string());
        if !self.is_requested() {
            return Ok(None);
        }
        if self.format.is_some() && self.encryption.is_some() {
            return Err(crate::Error::InvalidArgument(
                "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
            ));
        }
        let format = self.format.as_deref().unwrap_or("aes");
        let pick = |given: &Option<String>,
                    names: &'static [&'static str],
                    option: &'static str,
                    default: &'static str| {
            let v = given.as_deref().unwrap_or(default);
            names.iter().copied().find(|n| *n == v).ok_or_else(|| {
                invalid(OptionError::BadEnumValue {
                    option,
                    value: v.to_owned(),
                })
            })
        };
        match format {
            "luks" => {}
            "aes" => {
                return Err(crate::Error::InvalidArgument(
                    "Creating images with the legacy AES-CBC encryption (encrypt.format=aes) \
                     is not supported; use encrypt.format=luks"
                        .into(),
                ))
            }
            other => {
                return Err(invalid(OptionError::BadEnumValue {
                    option: "format",
                    value: other.to_owned(),
                }))
            }
        }
        let cipher_alg = pick(&self.cipher_alg, CIPHER_ALGS, "cipher-alg", "aes-256")?;
        let cipher_mode = pick(&self.cipher_mode, CIPHER_MODES, "cipher-mode", "xts")?;
        let ivgen_alg = pick(&self.ivgen_alg, IVGEN_ALGS, "ivgen-alg", "plain64")?;
        let ivgen_hash_alg = match (&self.ivgen_hash_alg, ivgen_alg) {
            (Some(_), _) => Some(pick(&self.ivgen_hash_alg, HASH_ALGS, "ivgen-hash-alg", "")?),
            (None, "essiv") => Some("sha256"),
            (None, _) => None,
        };
        let hash_alg = pick(&self.hash_alg, HASH_ALGS, "hash-alg", "sha256")?;
        let iter_time_ms = match &self.iter_time {
            None => DEFAULT_ITER_TIME_MS,
            Some(v) => super::parse::parse_number("iter-time", v).map_err(invalid)?,
        };
        let Some(id) = self.key_secret.as_deref() else {
            return Err(crate::Error::EncryptionKeyRequired);
        };
        let secret = secrets
            .get(id)
            .ok_or_else(|| CryptoError::SecretNotFound { id: id.to_owned() })?;
        let password = Secret::new(secret.as_utf8(id)?.as_bytes());
        let spec = LuksCreateSpec {
            cipher: CipherSpec {
                cipher_alg,
                cipher_mode,
                ivgen_alg,
                ivgen_hash_alg,
            },
            hash_alg,
            iter_time_ms,
        };
        Ok(Some(LuksToCreate {
            spec,
            password,
            key_secret: id.to_owned(),
        }))
    }
}
