//! Secrets, as QEMU's `secret` objects: named byte strings that options
//! refer to by id (`encrypt.key-secret=ID`), never part of an option string.
//!
//! A [`Secret`] zeroes its bytes when dropped (the `zeroize` crate) and never
//! shows them: its `Debug` output is redacted, and no error of this crate
//! carries secret bytes. A [`SecretStore`] maps ids to secrets; it is cheap to
//! clone (shared, copy on write) and its `Debug` output lists ids only.

use std::collections::BTreeMap;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Errors of the `--object secret,...` syntax and of reading a secret's
/// file, with QEMU's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// `--object` names another type than `secret`.
    #[error("Parameter 'qom-type' does not accept value '{0}'")]
    ObjectType(String),
    /// No `id=`.
    #[error("Parameter 'id' is missing")]
    MissingId,
    /// Both `data=` and `file=`.
    #[error("'file' and 'data' are mutually exclusive")]
    DataAndFile,
    /// Neither `data=` nor `file=`.
    #[error("Either 'file' or 'data' must be provided")]
    NoData,
    /// `format=` other than `raw` or `base64`.
    #[error("Parameter 'format' does not accept value '{0}'")]
    Format(String),
    /// A property QEMU's secret object does not have (or qcow2kit does not
    /// support, such as `keyid`/`iv` for secrets encrypted by another).
    #[error("Property 'secret.{0}' not found")]
    UnknownProperty(String),
    /// `format=base64` with characters outside the base64 alphabet.
    #[error("Base64 data contains invalid characters")]
    InvalidBase64,
    /// The `file=` could not be read (GLib's text, as QEMU prints it).
    #[error("Unable to read {path}: Failed to open file “{path}”: {reason}")]
    File {
        /// The path given.
        path: String,
        /// The operating system's reason.
        reason: String,
    },
}

/// A secret's bytes, zeroed when dropped; `Debug` shows `Secret(..)` only.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret holding `bytes` as they are (QEMU's `format=raw`: a
    /// trailing newline is part of the secret).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(Zeroizing::new(bytes.into()))
    }

    /// A secret given in base64 (QEMU's `format=base64`; padding optional,
    /// as GLib decodes).
    ///
    /// # Errors
    /// [`SecretError::InvalidBase64`] for characters outside the alphabet.
    pub fn from_base64(text: &[u8]) -> Result<Secret, SecretError> {
        use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
        use base64::Engine as _;
        const ENGINE: GeneralPurpose = GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            GeneralPurposeConfig::new()
                .with_decode_allow_trailing_bits(true)
                .with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        let text = Zeroizing::new(text.to_vec());
        ENGINE
            .decode(&*text)
            .map(Secret::new)
            .map_err(|_| SecretError::InvalidBase64)
    }

    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8 (QEMU's `qcrypto_secret_lookup_as_utf8`: LUKS
    /// passphrases and AES keys must be text).
    pub(crate) fn as_utf8(&self, id: &str) -> Result<&str, crate::crypto::CryptoError> {
        std::str::from_utf8(&self.0)
            .map_err(|_| crate::crypto::CryptoError::SecretNotUtf8 { id: id.to_owned() })
    }
}

/// Secrets by id, as QEMU's `--object secret,id=ID,...` objects. Cloning
/// shares the secrets; `Debug` lists the ids only.
///
/// ```
/// use qcow2kit::crypto::{Secret, SecretStore};
///
/// let mut store = SecretStore::new();
/// store.insert("sec0", Secret::new("abc"));
/// assert!(store.get("sec0").is_some());
/// assert_eq!(format!("{store:?}"), r#"SecretStore { ids: ["sec0"] }"#);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretStore(Arc<BTreeMap<String, Secret>>);

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore")
            .field("ids", &self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretStore {
    /// An empty store.
    pub fn new() -> SecretStore {
        SecretStore::default()
    }

    /// Adds (or replaces) the secret `id`.
    pub fn insert(&mut self, id: impl Into<String>, secret: Secret) {
        Arc::make_mut(&mut self.0).insert(id.into(), secret);
    }

    /// The secret `id`, if any.
    pub fn get(&self, id: &str) -> Option<&Secret> {
        self.0.get(id)
    }

    /// Whether the store holds no secret.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds the secret an `--object` argument defines
    /// (`secret,id=ID,data=STRING|file=PATH[,format=raw|base64]`), reading
    /// `file=` now, as QEMU does when it creates the object.
    ///
    /// ```
    /// use qcow2kit::crypto::SecretStore;
    ///
    /// let mut store = SecretStore::new();
    /// store.add_object("secret,id=k,data=YWJj,format=base64")?;
    /// assert_eq!(store.get("k").map(|s| s.as_bytes()), Some(&b"abc"[..]));
    /// # Ok::<(), qcow2kit::crypto::SecretError>(())
    /// ```
    ///
    /// # Errors
    /// QEMU's messages ([`SecretError`]) for the syntax, the format and an
    /// unreadable file.
    pub fn add_object(&mut self, spec: &str) -> Result<(), SecretError> {
        let (id, secret) = parse_object(spec)?;
        self.insert(id, secret);
        Ok(())
    }
}

/// Parses an `--object secret,...` argument into its id and secret.
fn parse_object(spec: &str) -> Result<(String, Secret), SecretError> {
    let mut parts = spec.splitn(2, ',');
    let first = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();
    let (typ, rest) = match first.split_once('=') {
        Some(("qom-type", t)) => (t, rest),
        Some(_) => return Err(SecretError::ObjectType(String::new())),
        None => (first, rest),
    };
    if typ != "secret" {
        return Err(SecretError::ObjectType(typ.to_owned()));
    }
    let (mut id, mut data, mut file, mut format) = (None, None::<Zeroizing<Vec<u8>>>, None, None);
    for pair in split_commas(rest) {
        let (key, value) = pair.split_once('=').unwrap_or((pair.as_str(), ""));
        match key {
            "id" => id = Some(value.to_owned()),
            "data" => data = Some(Zeroizing::new(value.as_bytes().to_vec())),
            "file" => file = Some(value.to_owned()),
            "format" => format = Some(value.to_owned()),
            "" => {}
            other => return Err(SecretError::UnknownProperty(other.to_owned())),
        }
    }
    let id = id.ok_or(SecretError::MissingId)?;
    let base64 = match format.as_deref() {
        None | Some("raw") => false,
        Some("base64") => true,
        Some(other) => return Err(SecretError::Format(other.to_owned())),
    };
    let raw = match (data, file) {
        (Some(_), Some(_)) => return Err(SecretError::DataAndFile),
        (None, None) => return Err(SecretError::NoData),
        (Some(d), None) => d,
        (None, Some(path)) => {
            Zeroizing::new(std::fs::read(&path).map_err(|e| SecretError::File {
                reason: crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO)),
                path,
            })?)
        }
    };
    let secret = if base64 {
        Secret::from_base64(&raw)?
    } else {
        Secret::new(raw.to_vec())
    };
    Ok((id, secret))
}

/// QemuOpts' splitting: `,,` is a literal comma.
fn split_commas(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_parse_like_qemu() {
        let mut s = SecretStore::new();
        s.add_object("secret,id=a,data=abc").unwrap();
        s.add_object("secret,id=b,data=x,,y").unwrap();
        s.add_object("secret,id=c,data=YWJjMTIz,format=base64")
            .unwrap();
        assert_eq!(s.get("a").unwrap().as_bytes(), b"abc");
        assert_eq!(s.get("b").unwrap().as_bytes(), b"x,y");
        assert_eq!(s.get("c").unwrap().as_bytes(), b"abc123");
        let err = |spec: &str| SecretStore::new().add_object(spec).unwrap_err().to_string();
        assert_eq!(
            err("secret,id=s"),
            "Either 'file' or 'data' must be provided"
        );
        assert_eq!(err("secret,data=abc"), "Parameter 'id' is missing");
        assert_eq!(
            err("secret,id=s,data=a,file=b"),
            "'file' and 'data' are mutually exclusive"
        );
        assert_eq!(
            err("secret,id=s,data=a,format=hex"),
            "Parameter 'format' does not accept value 'hex'"
        );
        assert_eq!(
            err("bogus,id=s"),
            "Parameter 'qom-type' does not accept value 'bogus'"
        );
        assert_eq!(
            err("secret,id=s,file=/nonexistent/nosuch.txt"),
            "Unable to read /nonexistent/nosuch.txt: Failed to open file “/nonexistent/nosuch.txt”: No such file or directory"
        );
    }

    #[test]
    fn secrets_never_show() {
        let mut s = SecretStore::new();
        s.add_object("secret,id=k,data=hunter2").unwrap();
        let shown = format!("{s:?} {:?}", s.get("k").unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        // base64 "abc123" is not UTF-8 once decoded (QEMU's message at use).
        s.add_object("secret,id=u,data=abc123,format=base64")
            .unwrap();
        let e = s.get("u").unwrap().as_utf8("u").unwrap_err();
        assert_eq!(e.to_string(), "Data from secret u is not valid UTF-8");
    }
}
