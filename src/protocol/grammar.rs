//! The distribution-spec grammar for repository names, tags and digests.
//!
//! Every value a client sends is validated here once; the rest of the proxy only ever sees the
//! validated types, so a path outside the cache directory or an unexpected upstream path cannot
//! be built from client input.

use std::fmt;
use std::str::FromStr;

use super::error::{ErrorCode, OciError};

/// Longest repository name distribution accepts (`reference.RepositoryNameTotalLengthMax`).
pub const MAX_NAME_LEN: usize = 255;

/// A validated repository name, e.g. `library/alpine`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

impl Repository {
    pub fn parse(s: &str) -> Result<Self, OciError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(is_name_component) {
            return Err(OciError::new(
                ErrorCode::NameInvalid,
                format!("invalid repository name {:?}", truncate(s)),
            ));
        }
        Ok(Repository(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path segments of the name.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_name_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || !is_lower_alnum(b[0]) || !is_lower_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_lower_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or one or more '-'.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_lower_alnum(b[i]) {
            return false;
        }
    }
    true
}

/// Whether a path segment names a registry host by the client rules (docker,
/// go-containerregistry): a valid host name that contains a dot or a port, or is `localhost`.
/// Routing applies it to client paths, the catalog to the locations its objects name.
pub fn names_registry_host(segment: &str) -> bool {
    is_registry_host(segment)
        && (segment.contains('.')
            || segment.contains(':')
            || segment.eq_ignore_ascii_case("localhost"))
}

/// A registry host as it may appear as the first path segment: `host[:port]`, where host is
/// dot-separated labels of `[a-zA-Z0-9-]` (not starting or ending with `-`).
pub fn is_registry_host(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A validated tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        ok.then(|| Tag(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Digest algorithms the proxy can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated content digest `algorithm:hex`, hex lower-case and of the algorithm's length.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let invalid = || {
            OciError::new(
                ErrorCode::DigestInvalid,
                format!("invalid digest {:?}", truncate(s)),
            )
        };
        let (alg, hex) = s.split_once(':').ok_or_else(invalid)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(invalid()),
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(invalid());
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// The digest of `bytes` with sha256.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(sha2::Sha256::digest(bytes)),
        }
    }

    /// Builds a digest from an algorithm and raw hash output.
    pub fn from_raw(algorithm: Algorithm, raw: &[u8]) -> Self {
        Digest {
            algorithm,
            hex: hex::encode(raw),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded part, lower-case hex. Safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Whether `bytes` hash to this digest.
    pub fn verify(&self, bytes: &[u8]) -> bool {
        use sha2::Digest as _;
        let raw = match self.algorithm {
            Algorithm::Sha256 => sha2::Sha256::digest(bytes).to_vec(),
            Algorithm::Sha512 => sha2::Sha512::digest(bytes).to_vec(),
        };
        hex::encode(raw) == self.hex
    }
}

/// A running hash of a blob's bytes in the digest's algorithm (sha256 or sha512): fed as the
/// bytes pass, then compared with the digest. Lives next to [`Digest`] so every module that
/// verifies content (fills, the shared tier, pass-through streams) depends on the grammar
/// only, not on each other.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(alg: Algorithm) -> Hasher {
        use sha2::Digest as _;
        match alg {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, b: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }

    /// Whether the bytes fed so far hash to `digest`.
    pub fn matches(self, digest: &Digest) -> bool {
        use sha2::Digest as _;
        let raw = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        Digest::from_raw(digest.algorithm(), &raw) == *digest
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// Parses a manifest reference. `None` for anything that is neither a valid tag nor a
    /// digest-shaped string; a digest-shaped string with a bad encoding is `DIGEST_INVALID`.
    pub fn parse(s: &str) -> Result<Option<Self>, OciError> {
        if s.contains(':') {
            return Digest::parse(s).map(|d| Some(Reference::Digest(d)));
        }
        Ok(Tag::parse(s).map(Reference::Tag))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Shortens client input before it is echoed in an error message.
pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(128) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "library/alpine",
            "a.b_c__d---e/f0",
            "team/app/blobs/manifests",
        ] {
            assert!(Repository::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "a..b", "a___b", "-a", "a-", "..", "a/../b", "a b",
        ] {
            assert!(Repository::parse(bad).is_err(), "{bad}");
        }
        assert!(Repository::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn hosts() {
        for ok in [
            "localhost:5000",
            "127.0.0.1:5001",
            "registry.example.com",
            "Reg-1.io",
        ] {
            assert!(is_registry_host(ok), "{ok}");
        }
        for bad in [
            "", "a:", ":5", "a:x", "-a.io", "a..b", "a/b", "a:123456", "a:65536",
        ] {
            assert!(!is_registry_host(bad), "{bad}");
        }
    }

    #[test]
    fn tags() {
        assert!(Tag::parse("v1.0_rc-1").is_some());
        assert!(Tag::parse("_x").is_some());
        assert!(Tag::parse(".INVALID_MANIFEST_NAME").is_none());
        assert!(Tag::parse(&"a".repeat(129)).is_none());
        assert!(Tag::parse(&"a".repeat(128)).is_some());
    }

    #[test]
    fn digests() {
        let d = Digest::sha256_of(b"hello world");
        assert_eq!(
            d.to_string(),
            "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert!(d.verify(b"hello world"));
        assert!(!d.verify(b"hello world!"));
        for bad in [
            "sha256:totallywrong",
            "sha256:B94D27B9934D3E08A52E52D7DA7DABFAC484EFE37A5380EE9088F7ACE2EFCDE9",
            "md5:abc",
            "sha256",
            "sha256:../../etc",
        ] {
            let e = Digest::parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::DigestInvalid, "{bad}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!(
            Reference::parse("v1"),
            Ok(Some(Reference::Tag(_)))
        ));
        assert!(matches!(Reference::parse(".bad"), Ok(None)));
        assert!(Reference::parse("sha256:baddigeststring").is_err());
    }
}
