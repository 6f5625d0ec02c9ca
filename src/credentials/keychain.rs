//! go-containerregistry's keyring (`pkg/authn/kubernetes` `NewFromPullSecrets` + `Resolve`):
//! which docker config entry, if any, authenticates a pull of `<registry>/<repository>`.
//!
//! Keys are normalised as ggcr does (`https://` assumed, `/v1/` or `/v2/` path prefix stripped,
//! scheme dropped, key = host + path or host), plus: host lower-cased, trailing '/' of the path
//! dropped, and Docker Hub's aliases (`docker.io`, `index.docker.io`, `registry-1.docker.io`)
//! folded into one host. Keys are tried in reverse lexicographic order ("more specific first");
//! a key matches when ports are equal as strings, the hosts have as many dot-separated labels
//! and each label matches as a Go `filepath.Match` glob, and the key path is a plain string
//! prefix of the repository path. The first entry added under the first matching key wins.

use std::collections::BTreeMap;

use super::dockerconfig::{strip_scheme, AuthEntry, DockerConfig};
use super::Credential;

/// The one host all Docker Hub aliases are folded into (go-containerregistry's default registry).
pub(crate) const DOCKER_HUB_HOST: &str = "index.docker.io";

const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Credentials from any number of docker configs, indexed by normalised key.
#[derive(Clone, Debug, Default)]
pub struct Keychain {
    keys: BTreeMap<String, KeyEntries>,
}

#[derive(Clone, Debug)]
struct KeyEntries {
    pattern: Pattern,
    /// In the order added; the first one is used.
    entries: Vec<(String, AuthEntry)>,
}

/// The outcome of [`Keychain::resolve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeychainMatch {
    /// The normalised key that matched, e.g. `ghcr.io/org` or `*.example.com`.
    pub key: String,
    /// Where the entry came from, as given to [`Keychain::add`].
    pub source: String,
    pub credential: Credential,
}

impl Keychain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every auths entry of `config`; `source` names where it came from for explanations,
    /// e.g. "secret kcp-system/regcred" or "docker config". Entries accumulate across calls;
    /// for a key already present the earlier entry keeps winning. Keys without a host are
    /// skipped.
    pub fn add(&mut self, source: &str, config: &DockerConfig) {
        for (raw, entry) in &config.auths {
            let Some(pattern) = Pattern::from_key(raw) else {
                tracing::debug!(source, key = %raw, "docker config key has no host, ignored");
                continue;
            };
            let key = pattern.to_string();
            tracing::debug!(source, key = %key, kind = entry.credential().kind(), "keychain entry added");
            self.keys
                .entry(key)
                .or_insert_with(|| KeyEntries {
                    pattern,
                    entries: Vec::new(),
                })
                .entries
                .push((source.to_string(), entry.clone()));
        }
    }

    /// go-containerregistry's Resolve for the repository `<registry>/<repository>`:
    /// the first matching key in reverse-sorted order, its first AuthEntry. `None` means no key
    /// matched (anonymous). `registry` is `host[:port]` (a scheme is tolerated); `repository`
    /// is the path on that registry as the upstream sees it (Docker Hub's `library/` included).
    pub fn resolve(&self, registry: &str, repository: &str) -> Option<KeychainMatch> {
        // Tolerate a registry given with a base path: it belongs to the repository path.
        let registry_url = strip_scheme(registry.trim()).trim_end_matches('/');
        let (authority, base) = registry_url.split_once('/').unwrap_or((registry_url, ""));
        let (host, port) = split_host_port(authority);
        let host = canonical_host(host);
        let repository = repository.trim_start_matches('/');
        let path = if base.is_empty() {
            format!("/{repository}")
        } else {
            format!("/{base}/{repository}")
        };
        let found = self.keys.iter().rev().find_map(|(key, e)| {
            e.pattern
                .matches(&host, port, &path)
                .then(|| {
                    e.entries
                        .first()
                        .map(|(source, entry)| (key, source, entry))
                })
                .flatten()
        });
        match found {
            Some((key, source, entry)) => {
                let credential = entry.credential();
                tracing::debug!(registry, repository, key = %key, source = %source, kind = credential.kind(), "keychain match");
                Some(KeychainMatch {
                    key: key.clone(),
                    source: source.clone(),
                    credential,
                })
            }
            None => {
                tracing::debug!(registry, repository, "no keychain match");
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The number of distinct normalised keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// `(key, source, credential kind)` of the winning entry of every key, in the order
    /// [`Keychain::resolve`] tries them. For explanations; reveals no secret.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, &'static str)> + '_ {
        self.keys.iter().rev().filter_map(|(key, e)| {
            e.entries
                .first()
                .map(|(source, entry)| (key.as_str(), source.as_str(), entry.credential().kind()))
        })
    }
}

/// A host pattern with the docker config key rules (per-label globs, ports compared as
/// strings, Docker Hub aliases folded): the `hosts` of the ambient credential sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostPattern(Pattern);

impl HostPattern {
    /// `None` when `raw` has no host or has a path.
    pub(crate) fn parse(raw: &str) -> Option<HostPattern> {
        Pattern::from_key(raw)
            .filter(|p| p.path.is_empty())
            .map(HostPattern)
    }

    /// Whether `registry` (`host[:port]`) matches.
    pub(crate) fn matches(&self, registry: &str) -> bool {
        let authority = strip_scheme(registry.trim());
        let authority = authority.split('/').next().unwrap_or(authority);
        let (host, port) = split_host_port(authority);
        self.0.matches(&canonical_host(host), port, "/")
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A parsed, normalised key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    /// Lower-case host (may hold glob characters), without port.
    host: String,
    /// Port as written, "" when absent.
    port: String,
    /// "" or "/a/b" (no trailing '/').
    path: String,
}

impl Pattern {
    fn from_key(raw: &str) -> Option<Pattern> {
        // Unlike Go's url.Parse, '?' is not a query separator here: it is a glob character.
        let rest = strip_scheme(raw.trim());
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = split_host_port(authority);
        if host.is_empty() {
            return None;
        }
        let path = if path.starts_with("/v2/") || path.starts_with("/v1/") {
            &path[3..]
        } else {
            path
        };
        Some(Pattern {
            host: canonical_host(host),
            port: port.to_string(),
            path: path.trim_end_matches('/').to_string(),
        })
    }

    /// ggcr `urlsMatch`: ports equal as strings, equal label counts, per-label globs, key path a
    /// string prefix of the target path. A malformed glob matches nothing.
    fn matches(&self, host: &str, port: &str, path: &str) -> bool {
        if self.port != port || !path.starts_with(&self.path) {
            return false;
        }
        let globs: Vec<&str> = self.host.split('.').collect();
        let labels: Vec<&str> = host.split('.').collect();
        globs.len() == labels.len()
            && globs
                .iter()
                .zip(&labels)
                .all(|(g, l)| glob_match(g, l).unwrap_or(false))
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') && !self.host.starts_with('[') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        f.write_str(&self.path)
    }
}

/// Lower-cases and folds Docker Hub's aliases into [`DOCKER_HUB_HOST`].
fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        DOCKER_HUB_HOST.to_string()
    } else {
        host
    }
}

/// Go's `net.SplitHostPort` as ggcr uses it: on failure the whole string is the host and the
/// port is "".
fn split_host_port(s: &str) -> (&str, &str) {
    if let Some(inner) = s.strip_prefix('[') {
        if let Some((h, after)) = inner.split_once(']') {
            if let Some(port) = after.strip_prefix(':') {
                if !port.contains(':') {
                    return (h, port);
                }
            }
        }
        return (s, "");
    }
    match s.split_once(':') {
        Some((h, p)) if !p.contains(':') => (h, p),
        _ => (s, ""),
    }
}

/// A malformed glob (Go's `filepath.ErrBadPattern`).
#[derive(Debug, PartialEq, Eq)]
struct BadPattern;

const SEPARATOR: char = '/';

/// Go's `path/filepath.Match` (Unix): `*` any run of non-'/' characters, `?` one non-'/'
/// character, `[...]` a class (`^` negates, `a-z` ranges, `\` escapes), `\x` a literal `x`.
fn glob_match(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let mut pattern = pattern.as_slice();
    let mut name = name.as_slice();
    'outer: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            // A trailing * matches the rest unless it has a separator.
            return Ok(!name.contains(&SEPARATOR));
        }
        let (t, ok, err) = match match_chunk(chunk, name) {
            Ok(Some(t)) => (t, true, false),
            Ok(None) => (name, false, false),
            Err(BadPattern) => (name, false, true),
        };
        if ok && (t.is_empty() || !pattern.is_empty()) {
            name = t;
            continue;
        }
        if err {
            return Err(BadPattern);
        }
        if star {
            let mut i = 0;
            while i < name.len() && name[i] != SEPARATOR {
                if let Some(t) = match_chunk(chunk, &name[i + 1..])? {
                    if pattern.is_empty() && !t.is_empty() {
                        i += 1;
                        continue;
                    }
                    name = t;
                    continue 'outer;
                }
                i += 1;
            }
        }
        // Report a malformed remainder rather than a plain mismatch.
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(pattern);
            pattern = rest;
            match_chunk(chunk, &[])?;
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

/// Splits off leading stars and the following chunk up to the next unbracketed `*`.
fn scan_chunk(pattern: &[char]) -> (bool, &[char], &[char]) {
    let mut p = pattern;
    let mut star = false;
    while p.first() == Some(&'*') {
        p = &p[1..];
        star = true;
    }
    let mut in_range = false;
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' if i + 1 < p.len() => i += 1,
            '[' => in_range = true,
            ']' => in_range = false,
            '*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    (star, &p[..i], &p[i..])
}

/// Matches `chunk` (no stars) at the start of `s`: `Some(rest)` on a match. The whole chunk is
/// checked for well-formedness even after a mismatch.
fn match_chunk<'a>(chunk: &[char], s: &'a [char]) -> Result<Option<&'a [char]>, BadPattern> {
    let mut chunk = chunk;
    let mut s = s;
    let mut failed = false;
    while let Some(&c) = chunk.first() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match c {
            '[' => {
                let r = if failed {
                    None
                } else {
                    let r = s[0];
                    s = &s[1..];
                    Some(r)
                };
                chunk = &chunk[1..];
                let negated = chunk.first() == Some(&'^');
                if negated {
                    chunk = &chunk[1..];
                }
                let mut matched = false;
                let mut nrange = 0;
                loop {
                    if chunk.first() == Some(&']') && nrange > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let (lo, rest) = get_esc(chunk)?;
                    chunk = rest;
                    let mut hi = lo;
                    if chunk.first() == Some(&'-') {
                        let (h, rest) = get_esc(&chunk[1..])?;
                        hi = h;
                        chunk = rest;
                    }
                    if r.is_some_and(|r| lo <= r && r <= hi) {
                        matched = true;
                    }
                    nrange += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            '?' => {
                if !failed {
                    if s[0] == SEPARATOR {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
            _ => {
                if c == '\\' {
                    chunk = &chunk[1..];
                    if chunk.is_empty() {
                        return Err(BadPattern);
                    }
                }
                if !failed {
                    if chunk[0] != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
        }
    }
    Ok((!failed).then_some(s))
}

/// One possibly escaped character of a class; the class must go on after it.
fn get_esc(chunk: &[char]) -> Result<(char, &[char]), BadPattern> {
    let mut chunk = chunk;
    match chunk.first() {
        None | Some('-') | Some(']') => return Err(BadPattern),
        Some('\\') => {
            chunk = &chunk[1..];
            if chunk.is_empty() {
                return Err(BadPattern);
            }
        }
        _ => {}
    }
    let r = chunk[0];
    let rest = &chunk[1..];
    if rest.is_empty() {
        return Err(BadPattern);
    }
    Ok((r, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Secret;

    /// A docker config key as the keychain normalises it: `None` when it has no host.
    fn normalize_key(raw: &str) -> Option<String> {
        Pattern::from_key(raw).map(|p| p.to_string())
    }

    fn user(u: &str) -> AuthEntry {
        AuthEntry {
            username: Some(u.into()),
            password: Some(Secret::new(format!("pw-of-{u}"))),
            ..Default::default()
        }
    }

    fn config(entries: &[(&str, &str)]) -> DockerConfig {
        DockerConfig {
            auths: entries
                .iter()
                .map(|(k, u)| (k.to_string(), user(u)))
                .collect(),
        }
    }

    fn keychain(entries: &[(&str, &str)]) -> Keychain {
        let mut kc = Keychain::new();
        kc.add("test", &config(entries));
        kc
    }

    /// The username that resolve picks, or None.
    fn who(kc: &Keychain, registry: &str, repo: &str) -> Option<String> {
        kc.resolve(registry, repo).map(|m| match m.credential {
            Credential::Basic { username, .. } => username,
            other => other.kind().to_string(),
        })
    }

    #[test]
    fn key_normalisation() {
        let cases = [
            ("ghcr.io", Some("ghcr.io")),
            ("https://ghcr.io", Some("ghcr.io")),
            ("http://ghcr.io/", Some("ghcr.io")),
            ("https://ghcr.io/v1/", Some("ghcr.io")),
            ("https://ghcr.io/v2/", Some("ghcr.io")),
            ("ghcr.io/v2/org/", Some("ghcr.io/org")),
            ("ghcr.io/v1/org/repo", Some("ghcr.io/org/repo")),
            ("ghcr.io/org/", Some("ghcr.io/org")),
            ("ghcr.io/v2", Some("ghcr.io/v2")),
            ("ghcr.io/v3/x", Some("ghcr.io/v3/x")),
            ("GHCR.io/Org", Some("ghcr.io/Org")),
            ("HTTPS://reg.io:5000/v2/a", Some("reg.io:5000/a")),
            ("user@reg.io:5000", Some("reg.io:5000")),
            ("reg?.io/a", Some("reg?.io/a")),
            ("[::1]:5000/a", Some("[::1]:5000/a")),
            ("*.example.com", Some("*.example.com")),
            ("https://index.docker.io/v1/", Some("index.docker.io")),
            ("docker.io", Some("index.docker.io")),
            (
                "registry-1.docker.io/library",
                Some("index.docker.io/library"),
            ),
            ("", None),
            ("https://", None),
            ("http:///v2/", None),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_key(raw).as_deref(), want, "{raw:?}");
        }
    }

    #[test]
    fn kyma_e2e_http_key_matches_host_with_port() {
        let kc = keychain(&[("http://private-oci-reg.localhost:5000", "e2e")]);
        assert_eq!(
            who(
                &kc,
                "private-oci-reg.localhost:5000",
                "component-descriptors/kyma-project.io/module/template-operator"
            )
            .as_deref(),
            Some("e2e")
        );
        assert_eq!(who(&kc, "private-oci-reg.localhost", "x"), None);
    }

    #[test]
    fn ports_compare_as_strings() {
        let kc = keychain(&[("reg.io", "noport")]);
        assert_eq!(who(&kc, "reg.io", "a").as_deref(), Some("noport"));
        assert_eq!(who(&kc, "reg.io:443", "a"), None);
        let kc = keychain(&[("reg.io:443", "p443")]);
        assert_eq!(who(&kc, "reg.io", "a"), None);
        assert_eq!(who(&kc, "reg.io:443", "a").as_deref(), Some("p443"));
        assert_eq!(who(&kc, "https://reg.io:443", "a").as_deref(), Some("p443"));
        assert_eq!(who(&kc, "reg.io:5000", "a"), None);
        // a base path on the registry argument counts as repository path
        let kc = keychain(&[("reg.io/base/x", "x")]);
        assert_eq!(
            who(&kc, "https://reg.io/base/", "x/y").as_deref(),
            Some("x")
        );
        assert_eq!(who(&kc, "reg.io", "x/y"), None);
    }

    #[test]
    fn label_count_and_globs() {
        let kc = keychain(&[("*.example.com", "star")]);
        assert_eq!(who(&kc, "a.example.com", "r").as_deref(), Some("star"));
        assert_eq!(who(&kc, "example.com", "r"), None, "fewer labels");
        assert_eq!(who(&kc, "a.b.example.com", "r"), None, "more labels");
        assert_eq!(who(&kc, "a.example.org", "r"), None);

        let kc = keychain(&[("reg?.example.com", "q")]);
        assert_eq!(who(&kc, "reg1.example.com", "r").as_deref(), Some("q"));
        assert_eq!(who(&kc, "reg.example.com", "r"), None);
        assert_eq!(who(&kc, "reg12.example.com", "r"), None);

        let kc = keychain(&[("reg[0-2].example.com", "class")]);
        assert_eq!(who(&kc, "reg2.example.com", "r").as_deref(), Some("class"));
        assert_eq!(who(&kc, "reg3.example.com", "r"), None);

        let kc = keychain(&[("reg[^0-2].example.com", "neg")]);
        assert_eq!(who(&kc, "reg3.example.com", "r").as_deref(), Some("neg"));
        assert_eq!(who(&kc, "reg1.example.com", "r"), None);

        let kc = keychain(&[("europe-*-docker.pkg.dev", "gar")]);
        assert_eq!(
            who(&kc, "europe-west3-docker.pkg.dev", "p/r").as_deref(),
            Some("gar")
        );
        assert_eq!(who(&kc, "us-east1-docker.pkg.dev", "p/r"), None);

        // a malformed glob matches nothing
        let kc = keychain(&[("reg[.example.com", "bad")]);
        assert_eq!(who(&kc, "reg[.example.com", "r"), None);
    }

    #[test]
    fn go_filepath_match_semantics() {
        let ok = |p: &str, n: &str| glob_match(p, n);
        // from Go's filepath match_test.go
        assert_eq!(ok("abc", "abc"), Ok(true));
        assert_eq!(ok("*", "abc"), Ok(true));
        assert_eq!(ok("*c", "abc"), Ok(true));
        assert_eq!(ok("a*", "a"), Ok(true));
        assert_eq!(ok("a*", "abc"), Ok(true));
        assert_eq!(ok("a*", "ab/c"), Ok(false));
        assert_eq!(ok("a*/b", "abc/b"), Ok(true));
        assert_eq!(ok("a*b*c*d*e*/f", "axbxcxdxe/f"), Ok(true));
        assert_eq!(ok("a*b*c*d*e*/f", "axbxcxdxexxx/fff"), Ok(false));
        assert_eq!(ok("a*b?c*x", "abxbbxdbxebxczzx"), Ok(true));
        assert_eq!(ok("a*b?c*x", "abxbbxdbxebxczzy"), Ok(false));
        assert_eq!(ok("ab[c]", "abc"), Ok(true));
        assert_eq!(ok("ab[b-d]", "abc"), Ok(true));
        assert_eq!(ok("ab[e-g]", "abc"), Ok(false));
        assert_eq!(ok("ab[^c]", "abc"), Ok(false));
        assert_eq!(ok("ab[^b-d]", "abc"), Ok(false));
        assert_eq!(ok("ab[^e-g]", "abc"), Ok(true));
        assert_eq!(ok("a\\*b", "a*b"), Ok(true));
        assert_eq!(ok("a\\*b", "ab"), Ok(false));
        assert_eq!(ok("a?b", "a☺b"), Ok(true));
        assert_eq!(ok("a[^a]b", "a☺b"), Ok(true));
        assert_eq!(ok("a???b", "a☺b"), Ok(false));
        assert_eq!(ok("a[^a][^a][^a]b", "a☺b"), Ok(false));
        assert_eq!(ok("[a-ζ]*", "α"), Ok(true));
        assert_eq!(ok("*[a-ζ]", "A"), Ok(false));
        assert_eq!(ok("a?b", "a/b"), Ok(false));
        assert_eq!(ok("a*b", "a/b"), Ok(false));
        assert_eq!(ok("[\\]a]", "]"), Ok(true));
        assert_eq!(ok("[\\-]", "-"), Ok(true));
        assert_eq!(ok("[x\\-]", "x"), Ok(true));
        assert_eq!(ok("[x\\-]", "-"), Ok(true));
        assert_eq!(ok("[x\\-]", "z"), Ok(false));
        assert_eq!(ok("[\\-x]", "x"), Ok(true));
        assert_eq!(ok("[\\-x]", "-"), Ok(true));
        assert_eq!(ok("[\\-x]", "a"), Ok(false));
        assert_eq!(ok("[]a]", "]"), Err(BadPattern));
        assert_eq!(ok("[-]", "-"), Err(BadPattern));
        assert_eq!(ok("[x-]", "x"), Err(BadPattern));
        assert_eq!(ok("[x-]", "-"), Err(BadPattern));
        assert_eq!(ok("[x-]", "z"), Err(BadPattern));
        assert_eq!(ok("[-x]", "x"), Err(BadPattern));
        assert_eq!(ok("[a-b-c]", "a"), Err(BadPattern));
        assert_eq!(ok("[", "a"), Err(BadPattern));
        assert_eq!(ok("[^", "a"), Err(BadPattern));
        assert_eq!(ok("[^bc", "a"), Err(BadPattern));
        assert_eq!(ok("a[", "a"), Err(BadPattern));
        assert_eq!(ok("a[", "ab"), Err(BadPattern));
        assert_eq!(ok("a[", "x"), Err(BadPattern));
        assert_eq!(ok("a/b[", "x"), Err(BadPattern));
        assert_eq!(ok("*x", "xxx"), Ok(true));
        assert_eq!(ok("\\", "a"), Err(BadPattern));
    }

    #[test]
    fn path_is_a_plain_string_prefix() {
        let kc = keychain(&[("reg.io/org", "org"), ("reg.io", "host")]);
        assert_eq!(who(&kc, "reg.io", "org/app").as_deref(), Some("org"));
        assert_eq!(who(&kc, "reg.io", "org").as_deref(), Some("org"));
        // not segment-aware, as ggcr
        assert_eq!(
            who(&kc, "reg.io", "organisation/app").as_deref(),
            Some("org")
        );
        assert_eq!(who(&kc, "reg.io", "other/app").as_deref(), Some("host"));
        // path is case-sensitive, host is not
        assert_eq!(who(&kc, "REG.io", "Org/app").as_deref(), Some("host"));
        let kc = keychain(&[("reg.io/org", "org")]);
        assert_eq!(who(&kc, "reg.io", "other"), None);
    }

    #[test]
    fn more_specific_first_reverse_sorted() {
        let kc = keychain(&[
            ("reg.io", "host"),
            ("reg.io/a", "a"),
            ("reg.io/a/b", "ab"),
            ("*.io", "glob"),
        ]);
        assert_eq!(who(&kc, "reg.io", "a/b/c").as_deref(), Some("ab"));
        assert_eq!(who(&kc, "reg.io", "a/c").as_deref(), Some("a"));
        assert_eq!(who(&kc, "reg.io", "c").as_deref(), Some("host"));
        assert_eq!(who(&kc, "other.io", "c").as_deref(), Some("glob"));
        // "*.io" sorts before "reg.io", so reg.io is tried first
        let order: Vec<&str> = kc.entries().map(|(k, _, _)| k).collect();
        assert_eq!(order, ["reg.io/a/b", "reg.io/a", "reg.io", "*.io"]);
        let kc = keychain(&[("*.reg.io", "glob"), ("x.reg.io", "exact")]);
        assert_eq!(who(&kc, "x.reg.io", "r").as_deref(), Some("exact"));
        // a glob that sorts after the exact key wins: ggcr compares the strings only
        let kc = keychain(&[("x?.reg.io", "glob"), ("x1.reg.io", "exact")]);
        assert_eq!(who(&kc, "x1.reg.io", "r").as_deref(), Some("glob"));
    }

    #[test]
    fn docker_hub_aliases_are_one_identity() {
        for key in [
            "https://index.docker.io/v1/",
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://Registry-1.Docker.IO/v2/",
        ] {
            let kc = keychain(&[(key, "hub")]);
            for registry in [
                "docker.io",
                "index.docker.io",
                "registry-1.docker.io",
                "DOCKER.IO",
            ] {
                let m = kc.resolve(registry, "library/ubuntu").unwrap();
                assert_eq!(m.key, DOCKER_HUB_HOST, "{key} / {registry}");
            }
            assert_eq!(who(&kc, "docker.com", "library/ubuntu"), None);
        }
        // two aliases in one file fold into one key
        let kc = keychain(&[("https://index.docker.io/v1/", "a"), ("docker.io", "b")]);
        assert_eq!(kc.len(), 1);
    }

    #[test]
    fn first_entry_added_wins_and_sources_are_kept() {
        let mut kc = Keychain::new();
        kc.add("secret kcp-system/one", &config(&[("reg.io", "first")]));
        kc.add(
            "secret kcp-system/two",
            &config(&[("https://reg.io/v2/", "second"), ("other.io", "o")]),
        );
        assert_eq!(kc.len(), 2);
        let m = kc.resolve("reg.io", "a").unwrap();
        assert_eq!(m.source, "secret kcp-system/one");
        assert_eq!(m.key, "reg.io");
        assert_eq!(
            m.credential,
            Credential::Basic {
                username: "first".into(),
                password: Secret::new("pw-of-first".into())
            }
        );
        assert_eq!(
            kc.resolve("other.io", "a").unwrap().source,
            "secret kcp-system/two"
        );
    }

    #[test]
    fn empty_keychain_and_skipped_keys() {
        let mut kc = Keychain::new();
        assert!(kc.is_empty());
        assert_eq!(kc.resolve("reg.io", "a"), None);
        kc.add("x", &config(&[("", "nohost"), ("https://", "nohost")]));
        assert!(kc.is_empty());
        assert_eq!(kc.len(), 0);
    }

    #[test]
    fn token_entries_resolve_to_token_credentials() {
        let mut cfg = DockerConfig::default();
        cfg.auths.insert(
            "a.io".into(),
            AuthEntry {
                identity_token: Some(Secret::new("ident-secret-7".into())),
                ..Default::default()
            },
        );
        cfg.auths.insert(
            "b.io".into(),
            AuthEntry {
                registry_token: Some(Secret::new("reg-secret-7".into())),
                ..Default::default()
            },
        );
        let mut kc = Keychain::new();
        kc.add("docker config", &cfg);
        assert_eq!(
            kc.resolve("a.io", "r").unwrap().credential.kind(),
            "identity-token"
        );
        assert_eq!(
            kc.resolve("b.io", "r").unwrap().credential.kind(),
            "registry-token"
        );
        // an entry with nothing in it still matches: it is anonymous, as ggcr's FromConfig
        cfg.auths.insert("c.io".into(), AuthEntry::default());
        kc.add("docker config", &cfg);
        assert_eq!(
            kc.resolve("c.io", "r").unwrap().credential,
            Credential::Anonymous
        );
    }

    #[test]
    fn debug_reveals_no_secret() {
        let mut kc = keychain(&[("reg.io", "alice")]);
        let mut cfg = DockerConfig::default();
        cfg.auths.insert(
            "t.io".into(),
            AuthEntry {
                identity_token: Some(Secret::new("ident-secret-7".into())),
                registry_token: Some(Secret::new("reg-secret-7".into())),
                ..Default::default()
            },
        );
        kc.add("s", &cfg);
        let m1 = kc.resolve("reg.io", "x").unwrap();
        let m2 = kc.resolve("t.io", "x").unwrap();
        let dbg = format!(
            "{kc:?} {m1:?} {m2:?} {:?}",
            kc.entries().collect::<Vec<_>>()
        );
        for s in ["pw-of-alice", "ident-secret-7", "reg-secret-7"] {
            assert!(!dbg.contains(s), "{dbg}");
        }
        assert!(dbg.contains("alice"));
    }

    #[test]
    fn host_patterns() {
        let p = |s: &str| HostPattern::parse(s).unwrap();
        assert!(p("*.pkg.dev").matches("europe-west3-docker.pkg.dev"));
        assert!(!p("*.pkg.dev").matches("pkg.dev"));
        assert!(p("gcr.io").matches("GCR.io"));
        assert!(!p("gcr.io").matches("gcr.io:443"));
        assert!(p("*.gcr.io").matches("eu.gcr.io"));
        let ecr = p("*.dkr.ecr.*.amazonaws.com");
        assert!(ecr.matches("123456789012.dkr.ecr.eu-west-1.amazonaws.com"));
        assert!(!ecr.matches("123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.io"));
        assert!(!ecr.matches("dkr.ecr.eu-west-1.amazonaws.com"));
        assert!(p("127.0.0.1:5000").matches("127.0.0.1:5000"));
        assert!(!p("127.0.0.1:5000").matches("127.0.0.1:5001"));
        assert_eq!(HostPattern::parse("gcr.io/project"), None);
        assert_eq!(HostPattern::parse(""), None);
    }

    #[test]
    fn kyma_sample_secret_resolves() {
        let bytes = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            "eyJhdXRocyI6eyJ0ZXN0LnJlZ2lzdHJ5LmlvIjp7InVzZXJuYW1lIjoidGVzdF91c2VyIiwicGFzc3dvcmQiOiJ0ZXN0X3Bhc3MiLCJhdXRoIjoiZEdWemRGOTFjMlZ5T25SbGMzUmZjR0Z6Y3c9PSJ9fX0=",
        )
        .unwrap();
        let cfg = DockerConfig::from_dockerconfigjson(&bytes).unwrap();
        let mut kc = Keychain::new();
        kc.add("secret default/oci-registry-cred", &cfg);
        let m = kc
            .resolve(
                "test.registry.io",
                "component-descriptors/kyma-project.io/module/x",
            )
            .unwrap();
        assert_eq!(m.key, "test.registry.io");
        assert_eq!(
            m.credential,
            Credential::Basic {
                username: "test_user".into(),
                password: Secret::new("test_pass".into())
            }
        );
        assert_eq!(kc.resolve("other.registry.io", "x"), None);
    }
}
