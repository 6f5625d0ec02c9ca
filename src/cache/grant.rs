//! Grants: under which credential source an upstream confirmed that a repository holds an
//! object.
//!
//! A link (and a cached tag) records the grant of the request whose upstream answer created
//! it. At read time a link counts only when the request gets the same grant now: when a
//! module, its Secret or the Secret's grant for a repository goes away (or the credential
//! changes), the grant changes and the cached content must be confirmed upstream again with
//! the credential the repository gets now — anonymously, a private upstream refuses.
//!
//! A grant is an HMAC-SHA256 (truncated to 128 bits) over the credential's source and
//! identity, keyed with 32 random bytes kept in `grant.key` in the cache dir (and, with a
//! shared tier, one key in the bucket so replicas agree). Links persist across restarts, so
//! the key must too; keyed, a grant in a journal or bucket is not an offline-guessable hash
//! of a password for anyone who does not also hold the key.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Length of the key in bytes.
pub(super) const KEY_LEN: usize = 32;

/// The key grants are computed with.
#[derive(Clone)]
pub(crate) struct GrantKey([u8; KEY_LEN]);

impl fmt::Debug for GrantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GrantKey([redacted])")
    }
}

/// A grant fingerprint (see the module docs). Never contains secret material.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grant([u8; 16]);

impl Grant {
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Grant> {
        let raw = hex::decode(s).ok()?;
        Some(Grant(raw.try_into().ok()?))
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Grant({})", self.to_hex())
    }
}

impl GrantKey {
    pub(crate) fn from_bytes(raw: &[u8]) -> Option<GrantKey> {
        Some(GrantKey(raw.try_into().ok()?))
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// 32 bytes from the operating system's random source.
    pub(crate) fn random() -> io::Result<GrantKey> {
        let mut k = [0u8; KEY_LEN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
        Ok(GrantKey(k))
    }

    /// Reads `grant.key` under `dir`, creating it (mode 0600) when absent (blocking). A key
    /// file of the wrong length is an error: replacing it would silently void every link,
    /// which is safe, but an operator should know.
    pub(crate) fn load_or_create(dir: &Path) -> io::Result<GrantKey> {
        let path = dir.join("grant.key");
        match std::fs::read(&path) {
            Ok(raw) => GrantKey::from_bytes(&raw).ok_or_else(|| {
                io::Error::other(format!(
                    "{} is not a {KEY_LEN}-byte key; remove it to start with a new one",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = GrantKey::random()?;
                let tmp = path.with_extension("key.tmp");
                {
                    let mut opts = std::fs::OpenOptions::new();
                    opts.write(true).create(true).truncate(true);
                    #[cfg(unix)]
                    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                    let mut f = opts.open(&tmp)?;
                    f.write_all(&key.0)?;
                    f.sync_all()?;
                }
                std::fs::rename(&tmp, &path)?;
                Ok(key)
            }
            Err(e) => Err(e),
        }
    }

    /// The grant of `parts` (each length-prefixed, so no two lists collide).
    pub(crate) fn grant(&self, parts: &[&[u8]]) -> Grant {
        let mut msg = Vec::new();
        msg.extend_from_slice(b"oci-proxy grant v1\0");
        for p in parts {
            msg.extend_from_slice(&(p.len() as u64).to_be_bytes());
            msg.extend_from_slice(p);
        }
        let mac = hmac_sha256(&self.0, &msg);
        let mut g = [0u8; 16];
        g.copy_from_slice(&mac[..16]);
        Grant(g)
    }
}

/// HMAC-SHA256 (RFC 2104) with a key of at most one block.
fn hmac_sha256(key: &[u8; KEY_LEN], msg: &[u8]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_openssl_and_key_persists() {
        // Expected value from `openssl dgst -sha256 -mac HMAC -macopt hexkey:0b0b...` (32 bytes).
        let key = [0x0bu8; 32];
        let mac = hmac_sha256(&key, b"Hi There");
        assert_eq!(
            hex::encode(mac),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
        let dir = tempfile::tempdir().unwrap();
        let k1 = GrantKey::load_or_create(dir.path()).unwrap();
        let k2 = GrantKey::load_or_create(dir.path()).unwrap();
        assert_eq!(k1.bytes(), k2.bytes());
        let g = k1.grant(&[b"src", b"pw"]);
        assert_eq!(g, k2.grant(&[b"src", b"pw"]));
        assert_ne!(g, k1.grant(&[b"srcp", b"w"]), "parts are length-prefixed");
        assert_ne!(g, GrantKey::random().unwrap().grant(&[b"src", b"pw"]));
        assert_eq!(Grant::from_hex(&g.to_hex()), Some(g));
        std::fs::write(dir.path().join("grant.key"), b"short").unwrap();
        assert!(GrantKey::load_or_create(dir.path()).is_err());
    }
}
