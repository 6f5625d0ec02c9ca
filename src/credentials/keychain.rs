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

use super::dockerconfig::{AuthEntry, DockerConfig};
use super::Credential;
use crate::protocol::key_pattern::{canonical_host, split_host_port, strip_scheme, Pattern};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Secret;
    use crate::protocol::key_pattern::DOCKER_HUB_HOST;

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
