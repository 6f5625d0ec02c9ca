//! How registries are named outside OCI paths, for matching credentials and checking config:
//! docker config keys and host patterns with go-containerregistry's rules (per-label globs,
//! ports compared as strings, Docker Hub aliases folded), and `host:port` authorities of
//! token realm entries.
//!
//! Pure string rules, kept here (below `config`, `credentials` and `upstream`) so that config
//! validation and the code that applies a rule use one definition without importing each other.

use url::Url;

/// The one host all Docker Hub aliases are folded into (go-containerregistry's default registry).
pub(crate) const DOCKER_HUB_HOST: &str = "index.docker.io";

const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

pub(crate) fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// Drops a leading `http://` or `https://` (any case).
pub(crate) fn strip_scheme(s: &str) -> &str {
    for scheme in ["https://", "http://"] {
        if starts_with_ignore_case(s, scheme) {
            return &s[scheme.len()..];
        }
    }
    s
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
pub(crate) struct Pattern {
    /// Lower-case host (may hold glob characters), without port.
    host: String,
    /// Port as written, "" when absent.
    port: String,
    /// "" or "/a/b" (no trailing '/').
    path: String,
}

impl Pattern {
    pub(crate) fn from_key(raw: &str) -> Option<Pattern> {
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
    pub(crate) fn matches(&self, host: &str, port: &str, path: &str) -> bool {
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
pub(crate) fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        DOCKER_HUB_HOST.to_string()
    } else {
        host
    }
}

/// Go's `net.SplitHostPort` as ggcr uses it: on failure the whole string is the host and the
/// port is "".
pub(crate) fn split_host_port(s: &str) -> (&str, &str) {
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

/// A `token_realm_hosts` entry as `host:port` (as the upstream guard compares them), with `default_port`
/// when it names none.
pub(crate) fn realm_entry_authority(entry: &str, default_port: Option<u16>) -> Option<String> {
    let entry = entry.trim();
    let (host, port) = match entry.strip_prefix('[') {
        Some(rest) => {
            let (inner, tail) = rest.split_once(']')?;
            (format!("[{inner}]"), tail.strip_prefix(':'))
        }
        None => match entry.split_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (entry.to_owned(), None),
        },
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok()?,
        None => default_port?,
    };
    // Normalised as a URL host is (lower case, IPv4 forms, IPv6 compressed).
    let url = Url::parse(&format!("http://{host}/")).ok()?;
    let host = url.host_str()?.trim_end_matches('.').to_owned();
    if host.is_empty() {
        return None;
    }
    Some(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn realm_entries() {
        assert_eq!(
            realm_entry_authority("Auth.Example", Some(443)).as_deref(),
            Some("auth.example:443")
        );
        assert_eq!(
            realm_entry_authority("auth.example:80", Some(443)).as_deref(),
            Some("auth.example:80")
        );
        assert_eq!(
            realm_entry_authority("[::1]:5000", None).as_deref(),
            Some("[::1]:5000")
        );
        assert_eq!(realm_entry_authority("auth.example:x", Some(443)), None);
        assert_eq!(realm_entry_authority("auth.example", None), None);
    }
}
