//! `WWW-Authenticate` challenges: parsing (RFC 7235 §4.1 / RFC 6750 §3) and choosing the one
//! the proxy answers.
//!
//! Grammar handled:
//!
//! ```text
//! WWW-Authenticate = 1#challenge
//! challenge        = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
//! auth-param       = token BWS "=" BWS ( token / quoted-string )
//! token68          = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
//! ```
//!
//! Several challenges may arrive as several header values or comma-separated in one value; a
//! comma followed by `token` that is *not* followed by `=` starts a new challenge. Schemes and
//! parameter names are case-insensitive; quoted strings honour backslash escapes. Malformed
//! parts are skipped up to the next comma: the parser never fails and never panics.

use http::header::{HeaderMap, WWW_AUTHENTICATE};

/// One challenge the proxy understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// HTTP Basic (`realm` is informational only).
    Basic { realm: Option<String> },
    /// Bearer token auth (distribution token spec). Only produced when `realm` is present and
    /// non-empty: without a realm there is nowhere to fetch a token from.
    Bearer {
        realm: String,
        service: Option<String>,
        /// Space-separated scope list as sent by the registry (see [`Challenge::scopes`]).
        scope: Option<String>,
        /// RFC 6750 error code, e.g. `invalid_token` or `insufficient_scope`.
        error: Option<String>,
    },
    /// Any other scheme (Digest, Negotiate, ...), with the scheme as sent.
    Other { scheme: String },
}

/// Parses every challenge in every header value. Never panics on junk; malformed parts are
/// skipped, and a Bearer challenge without a realm is dropped.
pub(crate) fn parse(values: &[&str]) -> Vec<Challenge> {
    let mut out = Vec::new();
    for value in values {
        for raw in parse_raw(value) {
            if let Some(c) = raw.into_challenge() {
                out.push(c);
            }
        }
    }
    out
}

/// Parses every `WWW-Authenticate` value of a response (values that are not valid UTF-8 are
/// read lossily).
pub(crate) fn from_headers(headers: &HeaderMap) -> Vec<Challenge> {
    let values: Vec<String> = headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    parse(&refs)
}

/// The challenge to answer: the first Bearer, else the first Basic; `None` if neither.
pub(crate) fn pick(challenges: &[Challenge]) -> Option<Challenge> {
    challenges
        .iter()
        .find(|c| matches!(c, Challenge::Bearer { .. }))
        .or_else(|| {
            challenges
                .iter()
                .find(|c| matches!(c, Challenge::Basic { .. }))
        })
        .cloned()
}

/// A challenge as written: scheme plus lowercased parameters (first occurrence wins).
#[derive(Debug, Default)]
struct RawChallenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl RawChallenge {
    fn param(&self, name: &str) -> Option<String> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn push_param(&mut self, name: &str, value: String) {
        let name = name.to_ascii_lowercase();
        if !self.params.iter().any(|(k, _)| *k == name) {
            self.params.push((name, value));
        }
    }

    fn into_challenge(self) -> Option<Challenge> {
        if self.scheme.eq_ignore_ascii_case("basic") {
            Some(Challenge::Basic {
                realm: self.param("realm"),
            })
        } else if self.scheme.eq_ignore_ascii_case("bearer") {
            let realm = self.param("realm").filter(|r| !r.is_empty())?;
            Some(Challenge::Bearer {
                realm,
                service: self.param("service"),
                scope: self.param("scope"),
                error: self.param("error"),
            })
        } else {
            Some(Challenge::Other {
                scheme: self.scheme,
            })
        }
    }
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 7235 token68 characters (without the trailing `=` padding).
fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

/// A byte cursor over one header value. Every slice boundary it produces lies next to an
/// ASCII byte, so slicing the `&str` is always on a char boundary.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    /// Skips optional whitespace (SP / HTAB).
    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Skips whitespace and list separators.
    fn skip_ows_and_commas(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.pos += 1;
        }
    }

    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }

    /// A quoted-string starting at the current `"`; `None` (cursor unspecified) if it is not
    /// terminated.
    fn quoted_string(&mut self) -> Option<String> {
        if self.peek() != Some(b'"') {
            return None;
        }
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.s[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Some(out);
                }
                '\\' => match chars.next() {
                    Some((_, escaped)) => out.push(escaped),
                    None => break,
                },
                c => out.push(c),
            }
        }
        self.pos = self.s.len();
        None
    }

    /// Skips to the next top-level comma (or the end), stepping over quoted strings.
    fn skip_to_comma(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b',' => return,
                b'"' => {
                    // Consumes the quoted string, terminated or not.
                    let _ = self.quoted_string();
                }
                _ => self.pos += 1,
            }
        }
    }

    /// Whether an auth-param (`token BWS "="`) starts here, without consuming anything.
    fn at_auth_param(&self) -> bool {
        let mut probe = Cursor {
            s: self.s,
            pos: self.pos,
        };
        if probe.token().is_empty() {
            return false;
        }
        probe.skip_ows();
        probe.peek() == Some(b'=')
    }

    /// Whether a new challenge starts here: a token followed by whitespace, a comma or the
    /// end, and not by `BWS "="` (that would be an auth-param).
    fn at_challenge_start(&self) -> bool {
        let mut probe = Cursor {
            s: self.s,
            pos: self.pos,
        };
        !probe.token().is_empty()
            && matches!(probe.peek(), None | Some(b' ' | b'\t' | b','))
            && !self.at_auth_param()
    }

    /// Parses `token BWS "=" BWS ( token / quoted-string )`.
    fn auth_param(&mut self) -> Option<(&'a str, String)> {
        let name = self.token();
        if name.is_empty() {
            return None;
        }
        self.skip_ows();
        if self.peek() != Some(b'=') {
            return None;
        }
        self.pos += 1;
        self.skip_ows();
        let value = if self.peek() == Some(b'"') {
            self.quoted_string()?
        } else {
            let v = self.token();
            // An empty token, or one glued to non-token text (an unquoted URL), is invalid:
            // better no value than a truncated one.
            if v.is_empty() || !matches!(self.peek(), None | Some(b' ' | b'\t' | b',')) {
                return None;
            }
            v.to_owned()
        };
        Some((name, value))
    }

    /// Parses a token68 followed by the end of the challenge (OWS then `,` or end).
    fn token68(&mut self) -> Option<&'a str> {
        let start = self.pos;
        while self.peek().is_some_and(is_token68_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        while self.peek() == Some(b'=') {
            self.pos += 1;
        }
        let end = self.pos;
        self.skip_ows();
        if self.at_end() || self.peek() == Some(b',') {
            Some(&self.s[start..end])
        } else {
            None
        }
    }
}

/// Splits one header value into raw challenges.
fn parse_raw(value: &str) -> Vec<RawChallenge> {
    let mut cur = Cursor { s: value, pos: 0 };
    let mut out = Vec::new();
    loop {
        cur.skip_ows_and_commas();
        if cur.at_end() {
            break;
        }
        let scheme = cur.token();
        if scheme.is_empty() {
            // Not a challenge: skip this list element (and make progress on a lone quote).
            let before = cur.pos;
            cur.skip_to_comma();
            if cur.pos == before {
                cur.pos += 1;
            }
            continue;
        }
        let mut challenge = RawChallenge {
            scheme: scheme.to_owned(),
            params: Vec::new(),
        };
        match cur.peek() {
            None | Some(b',') => {
                out.push(challenge);
                continue;
            }
            Some(b' ' | b'\t') => cur.skip_ows(),
            Some(_) => {
                // `Scheme<junk>`: not a valid challenge.
                cur.skip_to_comma();
                continue;
            }
        }
        // A token68 is accepted only when the text is not an auth-param.
        if !cur.at_auth_param() {
            let before = cur.pos;
            if cur.token68().is_none() {
                cur.pos = before;
                cur.skip_to_comma();
            }
            out.push(challenge);
            continue;
        }
        parse_params(&mut cur, &mut challenge);
        out.push(challenge);
    }
    out
}

/// Parses the `#auth-param` list of one challenge, stopping before the next challenge.
fn parse_params(cur: &mut Cursor<'_>, challenge: &mut RawChallenge) {
    loop {
        match cur.auth_param() {
            Some((name, value)) => challenge.push_param(name, value),
            None => cur.skip_to_comma(),
        }
        cur.skip_ows();
        if cur.peek() != Some(b',') {
            // Junk after a value: drop it up to the next comma.
            cur.skip_to_comma();
        }
        loop {
            cur.skip_ows_and_commas();
            if cur.at_end() || cur.at_challenge_start() {
                return;
            }
            if cur.at_auth_param() {
                break;
            }
            // A list element that is neither: skip it and keep reading parameters.
            cur.skip_to_comma();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bearer(realm: &str, service: Option<&str>, scope: Option<&str>) -> Challenge {
        Challenge::Bearer {
            realm: realm.into(),
            service: service.map(Into::into),
            scope: scope.map(Into::into),
            error: None,
        }
    }

    #[test]
    fn docker_hub() {
        let got = parse(&[
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        ]);
        assert_eq!(
            got,
            vec![bearer(
                "https://auth.docker.io/token",
                Some("registry.docker.io"),
                Some("repository:library/alpine:pull")
            )]
        );
    }

    #[test]
    fn distribution_token_with_error() {
        let got = parse(&[
            r#"Bearer realm="http://127.0.0.1:5002/token",service="test-registry",scope="repository:a/b:pull",error="insufficient_scope""#,
        ]);
        assert_eq!(
            got,
            vec![Challenge::Bearer {
                realm: "http://127.0.0.1:5002/token".into(),
                service: Some("test-registry".into()),
                scope: Some("repository:a/b:pull".into()),
                error: Some("insufficient_scope".into()),
            }]
        );
    }

    #[test]
    fn htpasswd_basic() {
        assert_eq!(
            parse(&[r#"Basic realm="basic-realm""#]),
            vec![Challenge::Basic {
                realm: Some("basic-realm".into())
            }]
        );
        assert_eq!(parse(&["Basic"]), vec![Challenge::Basic { realm: None }]);
    }

    #[test]
    fn case_insensitive_scheme_and_names_with_bws_and_token_values() {
        assert_eq!(
            parse(&["bEaReR  REALM = \"https://r.example/t\" , Service=svc"]),
            vec![bearer("https://r.example/t", Some("svc"), None)]
        );
        // An unquoted URL is not a token: the realm is dropped rather than truncated.
        assert_eq!(
            parse(&["Bearer realm=https://r.example/t,service=svc"]),
            vec![]
        );
    }

    #[test]
    fn several_challenges_in_one_line_and_across_lines() {
        let got = parse(&[
            r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#,
            r#"Negotiate abc+/==, Bearer realm="https://a/t",scope="x:y:pull push", Digest"#,
        ]);
        assert_eq!(
            got,
            vec![
                Challenge::Other {
                    scheme: "Newauth".into()
                },
                Challenge::Basic {
                    realm: Some("simple".into())
                },
                Challenge::Other {
                    scheme: "Negotiate".into()
                },
                bearer("https://a/t", None, Some("x:y:pull push")),
                Challenge::Other {
                    scheme: "Digest".into()
                },
            ]
        );
    }

    #[test]
    fn escaped_quotes_and_commas_inside_quotes() {
        assert_eq!(
            parse(&[r#"Bearer realm="https://a/t?x=\"q\",y",service="s\\v""#]),
            vec![bearer(r#"https://a/t?x="q",y"#, Some(r"s\v"), None)]
        );
    }

    #[test]
    fn first_duplicate_param_wins() {
        assert_eq!(
            parse(&[r#"Bearer realm="https://a/t", realm="https://evil/t""#]),
            vec![bearer("https://a/t", None, None)]
        );
    }

    #[test]
    fn bearer_without_realm_is_skipped() {
        assert_eq!(parse(&[r#"Bearer service="s""#]), vec![]);
        assert_eq!(parse(&[r#"Bearer realm="""#]), vec![]);
        assert_eq!(parse(&["Bearer"]), vec![]);
    }

    #[test]
    fn garbage_is_skipped_but_good_parts_survive() {
        assert_eq!(parse(&[""]), vec![]);
        assert_eq!(parse(&[",,, ,"]), vec![]);
        assert_eq!(parse(&["\"unterminated"]), vec![]);
        assert_eq!(parse(&["=== ;;; \u{e9}\u{1F600}"]), vec![]);
        // Unterminated quote eats the realm: no usable Bearer.
        assert_eq!(parse(&[r#"Bearer realm="https://a/t"#]), vec![]);
        // Junk parameter between good ones.
        assert_eq!(
            parse(&[r#"Bearer realm="https://a/t", @@@, service="s" junk, scope="p""#]),
            vec![bearer("https://a/t", Some("s"), Some("p"))]
        );
        // Junk list element before a good challenge.
        assert_eq!(
            parse(&[r#"@bad, Basic realm="r""#]),
            vec![Challenge::Basic {
                realm: Some("r".into())
            }]
        );
        // Scheme glued to junk.
        assert_eq!(parse(&[r#"Basic"realm", Bearer;x"#]), vec![]);
    }

    #[test]
    fn from_headers_reads_every_value() {
        let mut h = HeaderMap::new();
        h.append(WWW_AUTHENTICATE, "Basic realm=\"r\"".parse().unwrap());
        h.append(
            WWW_AUTHENTICATE,
            "Bearer realm=\"https://a/t\"".parse().unwrap(),
        );
        let got = from_headers(&h);
        assert_eq!(got.len(), 2);
        assert_eq!(pick(&got), Some(bearer("https://a/t", None, None)));
    }

    #[test]
    fn pick_prefers_bearer_then_basic() {
        let basic = Challenge::Basic { realm: None };
        let other = Challenge::Other {
            scheme: "Digest".into(),
        };
        let b = bearer("https://a/t", None, None);
        assert_eq!(
            pick(&[other.clone(), basic.clone(), b.clone()]),
            Some(b.clone())
        );
        assert_eq!(pick(&[other.clone(), basic.clone()]), Some(basic));
        assert_eq!(pick(&[other]), None);
        assert_eq!(pick(&[]), None);
    }

    proptest! {
        #[test]
        fn never_panics_on_random_input(s in any::<String>(), t in "[ ,=\"\\\\a-zA-Z0-9]{0,40}") {
            let _ = parse(&[&s, &t]);
        }

        #[test]
        fn bearer_realm_round_trips(realm in "[ -~]{1,40}") {
            let escaped = realm.replace('\\', "\\\\").replace('"', "\\\"");
            let header = format!("Bearer realm=\"{escaped}\",service=\"s\"");
            prop_assert_eq!(parse(&[&header]), vec![bearer(&realm, Some("s"), None)]);
        }
    }
}
