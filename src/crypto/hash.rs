//! The hashes LUKS names (`sha1`, `sha224`, `sha256`, `sha384`, `sha512`):
//! digests for the anti-forensic splitter and ESSIV, HMAC-PBKDF2 for keys.

use super::CryptoError;
use sha2::Digest;

/// A hash algorithm by QEMU's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// The hash QEMU calls `name`.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for hashes qcow2kit does not implement
    /// (`md5`, `ripemd160`).
    pub fn from_name(name: &str) -> Result<HashAlg, CryptoError> {
        Ok(match name {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            other => {
                return Err(CryptoError::Unsupported(format!(
                    "hash algorithm '{other}'"
                )))
            }
        })
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// Hashes the concatenation of `parts` into the start of `out` (at
    /// least [`HashAlg::digest_len`] bytes); returns the digest length.
    pub fn digest(self, parts: &[&[u8]], out: &mut [u8]) -> usize {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) -> usize {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            let r = d.finalize();
            let n = r.len().min(out.len());
            if let (Some(dst), Some(src)) = (out.get_mut(..n), r.get(..n)) {
                dst.copy_from_slice(src);
            }
            n
        }
        match self {
            HashAlg::Sha1 => run::<sha1::Sha1>(parts, out),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts, out),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts, out),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts, out),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts, out),
        }
    }

    /// PBKDF2 with HMAC over this hash: fills `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
        }
    }
}

/// cryptsetup's (and QEMU's `qcrypto_afsplit_hash`) diffusion: each
/// digest-sized block `i` of `block` becomes `H(be32(i) || block_i)`, a
/// trailing partial block the same truncated.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let len = hash.digest_len();
    let mut out = [0u8; 64];
    for (i, chunk) in block.chunks_mut(len).enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
        hash.digest(&[&index, chunk], &mut out);
        let n = chunk.len();
        chunk.copy_from_slice(out.get(..n).unwrap_or_default());
    }
    zeroize::Zeroize::zeroize(&mut out);
}

/// The anti-forensic merge (cryptsetup's `AF_merge`): recovers the
/// `key.len()`-byte key from `stripes` stripes of split material.
pub fn af_merge(hash: HashAlg, split: &[u8], key: &mut [u8]) {
    let n = key.len();
    key.fill(0);
    let stripes: Vec<&[u8]> = split.chunks_exact(n).collect();
    let Some((last, rest)) = stripes.split_last() else {
        return;
    };
    for stripe in rest {
        for (k, s) in key.iter_mut().zip(stripe.iter()) {
            *k ^= s;
        }
        diffuse(hash, key);
    }
    for (k, s) in key.iter_mut().zip(last.iter()) {
        *k ^= s;
    }
}

/// The anti-forensic split (cryptsetup's `AF_split`): fills `split`
/// (`stripes * key.len()` bytes) so that [`af_merge`] gives `key` back; all
/// stripes but the last are random.
///
/// # Errors
/// [`CryptoError::Random`] when the system's random source fails.
pub fn af_split(hash: HashAlg, key: &[u8], split: &mut [u8]) -> Result<(), CryptoError> {
    let n = key.len();
    let mut block = zeroize::Zeroizing::new(vec![0u8; n]);
    let count = split.len() / n;
    for (i, stripe) in split.chunks_exact_mut(n).enumerate() {
        if i + 1 == count {
            for ((s, b), k) in stripe.iter_mut().zip(block.iter()).zip(key.iter()) {
                *s = b ^ k;
            }
        } else {
            super::random(stripe)?;
            for (b, s) in block.iter_mut().zip(stripe.iter()) {
                *b ^= s;
            }
            diffuse(hash, &mut block);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6070 test vector 2 (PBKDF2-HMAC-SHA1, 2 iterations) and a
    /// SHA-256 vector (RFC 7914 §11, "passwd"/"salt", 1 iteration).
    #[test]
    fn pbkdf2_known_answers() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
        let mut out = [0u8; 16];
        HashAlg::Sha256.pbkdf2(b"passwd", b"salt", 1, &mut out);
        assert_eq!(
            out,
            [
                0x55, 0xac, 0x04, 0x6e, 0x56, 0xe3, 0x08, 0x9f, 0xec, 0x16, 0x91, 0xc2, 0x25, 0x44,
                0xb6, 0x05
            ]
        );
    }

    #[test]
    fn af_split_merges_back() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let key: Vec<u8> = (0..64u8).collect();
            let mut split = vec![0u8; 64 * 4000];
            af_split(hash, &key, &mut split).unwrap();
            let mut back = [0u8; 64];
            af_merge(hash, &split, &mut back);
            assert_eq!(back.to_vec(), key);
            // One flipped byte in any stripe changes the key.
            split[100] ^= 1;
            af_merge(hash, &split, &mut back);
            assert_ne!(back.to_vec(), key);
        }
    }
}
