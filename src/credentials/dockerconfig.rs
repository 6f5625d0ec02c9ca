//! Docker config files and Kubernetes pull Secrets: parsing `.dockerconfigjson` (`{"auths": {..}}`),
//! legacy `.dockercfg` (the bare map) and `config.json` into [`DockerConfig`], decoding each entry
//! into an [`AuthEntry`] the way docker/cli and go-containerregistry do, and the Lifecycle Manager
//! "named Secret" rule that a Secret names exactly one registry ([`DockerConfig::single_registry`]).
//!
//! Field names are matched case-insensitively (Go's `encoding/json` does), unknown fields and
//! other top-level keys (`credsStore`, `credHelpers`, ...) are ignored, empty strings count as
//! absent. Errors name the problem and where it is, never a value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::{Credential, Secret};
use crate::protocol::key_pattern::{starts_with_ignore_case, strip_scheme};

/// `data` key of a `kubernetes.io/dockerconfigjson` Secret.
pub(crate) const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
/// `data` key of a legacy `kubernetes.io/dockercfg` Secret.
pub(crate) const DOCKER_CFG_KEY: &str = ".dockercfg";
/// Secret type carrying [`DOCKER_CONFIG_JSON_KEY`].
pub(crate) const SECRET_TYPE_DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
/// Secret type carrying [`DOCKER_CFG_KEY`].
pub(crate) const SECRET_TYPE_DOCKERCFG: &str = "kubernetes.io/dockercfg";

/// One `auths` entry, decoded. `auth` (base64 `user:pass`) has already overridden
/// `username`/`password`. Debug output redacts every secret part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthEntry {
    pub username: Option<String>,
    pub password: Option<Secret<String>>,
    pub identity_token: Option<Secret<String>>,
    pub registry_token: Option<Secret<String>>,
}

impl AuthEntry {
    /// registry_token > identity_token > username/password (Basic) > Anonymous.
    ///
    /// Basic needs a non-empty username; a missing password is sent as empty.
    pub fn credential(&self) -> Credential {
        if let Some(t) = &self.registry_token {
            return Credential::RegistryToken(t.clone());
        }
        if let Some(t) = &self.identity_token {
            return Credential::IdentityToken(t.clone());
        }
        match &self.username {
            Some(u) if !u.is_empty() => Credential::Basic {
                username: u.clone(),
                password: self
                    .password
                    .clone()
                    .unwrap_or_else(|| Secret::new(String::new())),
            },
            _ => Credential::Anonymous,
        }
    }
}

/// The `auths` map of a docker config, keys exactly as written in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DockerConfig {
    pub auths: BTreeMap<String, AuthEntry>,
}

/// What went wrong reading a docker config. Messages name the place (registry key, field), never
/// a value, so they are safe to log.
#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    #[error("docker config is not valid JSON: {category} at line {line}, column {column}")]
    Json {
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("docker config: {what} must be a JSON object, found {found}")]
    NotAnObject { what: String, found: &'static str },
    #[error("docker config entry {key:?}: field {field:?} must be a string, found {found}")]
    FieldType {
        key: String,
        field: String,
        found: &'static str,
    },
    #[error("docker config entry {key:?}: field \"auth\" is not valid base64")]
    AuthBase64 { key: String },
    #[error(
        "docker config entry {key:?}: field \"auth\" must be base64 of \"username:password\" \
         (UTF-8, with a ':' and a non-empty username)"
    )]
    AuthFormat { key: String },
    #[error("cannot read docker config {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("docker config must name exactly one registry in \"auths\", found {count}")]
    RegistryCount { count: usize },
    #[error("docker config \"auths\" key {key:?} is not a registry (host[:port][/path])")]
    InvalidRegistry { key: String },
}

impl DockerConfig {
    /// Parses `.dockerconfigjson` / `config.json` content: `{"auths": {...}}`. Other top-level
    /// keys (`credsStore`, `credHelpers`, ...) are ignored; a missing or null `auths` is empty.
    pub fn from_dockerconfigjson(bytes: &[u8]) -> Result<Self, DockerConfigError> {
        let root = parse_json(bytes)?;
        let root = as_object(&root, "the top level")?;
        match field(root, "auths") {
            None | Some(Value::Null) => Ok(DockerConfig::default()),
            Some(auths) => Self::from_auths_value(auths, "\"auths\""),
        }
    }

    /// Parses legacy `.dockercfg` content: the bare `{"<registry>": {...}}` map.
    pub fn from_dockercfg(bytes: &[u8]) -> Result<Self, DockerConfigError> {
        let root = parse_json(bytes)?;
        Self::from_auths_value(&root, "the top level")
    }

    /// Reads a docker `config.json` file.
    pub fn load(path: &Path) -> Result<Self, DockerConfigError> {
        let bytes = std::fs::read(path).map_err(|source| DockerConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_dockerconfigjson(&bytes)
    }

    /// The contribution of one Kubernetes Secret, as go-containerregistry's `NewFromPullSecrets`:
    /// `kubernetes.io/dockerconfigjson` with a non-empty `.dockerconfigjson`, or
    /// `kubernetes.io/dockercfg` with a non-empty `.dockercfg`. Any other Secret gives `None`.
    /// A key in `stringData` (plain) wins over the same key in `data`, as the API server
    /// merges them (a Secret read from a file may still carry `stringData`).
    pub fn from_kubernetes_secret(
        secret: &k8s_openapi::api::core::v1::Secret,
    ) -> Result<Option<Self>, DockerConfigError> {
        let data = |key: &str| {
            let plain = secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(String::as_bytes);
            plain
                .or_else(|| {
                    secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .map(|b| b.0.as_slice())
                })
                .filter(|b| !b.is_empty())
        };
        match secret.type_.as_deref() {
            Some(SECRET_TYPE_DOCKER_CONFIG_JSON) => data(DOCKER_CONFIG_JSON_KEY)
                .map(Self::from_dockerconfigjson)
                .transpose(),
            Some(SECRET_TYPE_DOCKERCFG) => {
                data(DOCKER_CFG_KEY).map(Self::from_dockercfg).transpose()
            }
            _ => Ok(None),
        }
    }

    /// Named-Secret mode (Lifecycle Manager `--oci-registry-cred-secret`): exactly one `auths`
    /// key, which is the registry base. `http://` means insecure; the scheme and trailing '/'
    /// are trimmed; the rest may carry a path.
    pub fn single_registry(&self) -> Result<RegistryBase, DockerConfigError> {
        if self.auths.len() != 1 {
            return Err(DockerConfigError::RegistryCount {
                count: self.auths.len(),
            });
        }
        let Some(key) = self.auths.keys().next() else {
            return Err(DockerConfigError::RegistryCount { count: 0 });
        };
        RegistryBase::parse(key)
    }

    fn from_auths_value(auths: &Value, what: &str) -> Result<Self, DockerConfigError> {
        let auths = as_object(auths, what)?;
        let mut out = BTreeMap::new();
        for (key, entry) in auths {
            out.insert(key.clone(), parse_entry(key, entry)?);
        }
        Ok(DockerConfig { auths: out })
    }
}

/// A registry base from a named Secret: where Lifecycle Manager's modules live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryBase {
    /// `host[:port]`, lower-case.
    pub host: String,
    /// `""` or `a/b` (no leading or trailing '/').
    pub path: String,
    /// The key was written with `http://`.
    pub insecure: bool,
}

impl RegistryBase {
    /// Parses an `auths` key as Lifecycle Manager's `NewOCIRegistry` reads it.
    pub fn parse(key: &str) -> Result<Self, DockerConfigError> {
        let invalid = || DockerConfigError::InvalidRegistry {
            key: key.to_string(),
        };
        let trimmed = key.trim();
        let insecure = starts_with_ignore_case(trimmed, "http://");
        let rest = strip_scheme(trimmed).trim_end_matches('/');
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = host.to_ascii_lowercase();
        if !crate::protocol::grammar::is_registry_host(&host)
            || (!path.is_empty()
                && path
                    .split('/')
                    .any(|s| s.is_empty() || s.chars().any(char::is_whitespace)))
        {
            return Err(invalid());
        }
        Ok(RegistryBase {
            host,
            path: path.to_string(),
            insecure,
        })
    }

    /// Appends Lifecycle Manager's `--modules-repository-subpath`
    /// (`TrimRight(base,"/") + "/" + TrimLeft(sub,"/")`); an empty subpath changes nothing.
    pub fn with_subpath(&self, subpath: &str) -> RegistryBase {
        let sub = subpath.trim_start_matches('/').trim_end_matches('/');
        let path = match (self.path.is_empty(), sub.is_empty()) {
            (_, true) => self.path.clone(),
            (true, false) => sub.to_string(),
            (false, false) => format!("{}/{}", self.path, sub),
        };
        RegistryBase {
            host: self.host.clone(),
            path,
            insecure: self.insecure,
        }
    }
}

impl fmt::Display for RegistryBase {
    /// `host[:port][/path]`, without scheme.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.host)
        } else {
            write!(f, "{}/{}", self.host, self.path)
        }
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, DockerConfigError> {
    serde_json::from_slice(bytes).map_err(|e| DockerConfigError::Json {
        category: match e.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "data error",
            serde_json::error::Category::Eof => "unexpected end of input",
        },
        line: e.line(),
        column: e.column(),
    })
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn as_object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, DockerConfigError> {
    v.as_object().ok_or_else(|| DockerConfigError::NotAnObject {
        what: what.to_string(),
        found: json_type(v),
    })
}

/// Go `encoding/json` field lookup: the exact name first, else a case-insensitive match.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn string_field(
    key: &str,
    obj: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, DockerConfigError> {
    match field(obj, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(DockerConfigError::FieldType {
            key: key.to_string(),
            field: name.to_string(),
            found: json_type(other),
        }),
    }
}

fn parse_entry(key: &str, entry: &Value) -> Result<AuthEntry, DockerConfigError> {
    let obj = match entry {
        Value::Null => return Ok(AuthEntry::default()),
        other => as_object(other, &format!("entry {key:?}"))?,
    };
    let mut username = string_field(key, obj, "username")?;
    let mut password = string_field(key, obj, "password")?;
    if let Some(auth) = string_field(key, obj, "auth")? {
        let (u, p) = decode_auth(key, &auth)?;
        username = Some(u);
        password = Some(p);
    }
    Ok(AuthEntry {
        username,
        password: password.filter(|p| !p.is_empty()).map(Secret::new),
        identity_token: string_field(key, obj, "identitytoken")?.map(Secret::new),
        registry_token: string_field(key, obj, "registrytoken")?.map(Secret::new),
    })
}

/// Standard alphabet, padding optional (docker/cli pads, ggcr also accepts unpadded).
const AUTH_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// docker/cli `decodeAuth`: base64 of `user:pass`, split on the first ':', user required,
/// NULs trimmed from both ends of the password.
fn decode_auth(key: &str, auth: &str) -> Result<(String, String), DockerConfigError> {
    let decoded = AUTH_BASE64
        .decode(auth.trim())
        .map_err(|_| DockerConfigError::AuthBase64 {
            key: key.to_string(),
        })?;
    let format = || DockerConfigError::AuthFormat {
        key: key.to_string(),
    };
    let decoded = String::from_utf8(decoded).map_err(|_| format())?;
    match decoded.split_once(':') {
        Some((user, pass)) if !user.is_empty() => {
            Ok((user.to_string(), pass.trim_matches('\0').to_string()))
        }
        _ => Err(format()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn one(json: &str) -> AuthEntry {
        let cfg = DockerConfig::from_dockerconfigjson(json.as_bytes()).unwrap();
        assert_eq!(cfg.auths.len(), 1, "{cfg:?}");
        cfg.auths.into_values().next().unwrap()
    }

    fn basic(entry: &AuthEntry) -> (String, String) {
        match entry.credential() {
            Credential::Basic { username, password } => (username, password.expose().clone()),
            other => panic!("expected basic, got {}", other.kind()),
        }
    }

    /// `.dockerconfigjson` of the Lifecycle Manager test Secret
    /// (`pkg/test_samples/auth_secret.yaml`, shared testdata `secret-oci-registry-cred-labeled.yaml`).
    const SAMPLE_SECRET_B64: &str = "eyJhdXRocyI6eyJ0ZXN0LnJlZ2lzdHJ5LmlvIjp7InVzZXJuYW1lIjoidGVzdF91c2VyIiwicGFzc3dvcmQiOiJ0ZXN0X3Bhc3MiLCJhdXRoIjoiZEdWemRGOTFjMlZ5T25SbGMzUmZjR0Z6Y3c9PSJ9fX0=";

    #[test]
    fn kyma_sample_secret_payload() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(SAMPLE_SECRET_B64)
            .unwrap();
        let cfg = DockerConfig::from_dockerconfigjson(&bytes).unwrap();
        let entry = &cfg.auths["test.registry.io"];
        assert_eq!(basic(entry), ("test_user".into(), "test_pass".into()));
        let base = cfg.single_registry().unwrap();
        assert_eq!(
            base,
            RegistryBase {
                host: "test.registry.io".into(),
                path: String::new(),
                insecure: false
            }
        );
    }

    #[test]
    fn kubernetes_secret_types() {
        use k8s_openapi::api::core::v1::Secret as K8sSecret;
        use k8s_openapi::ByteString;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(SAMPLE_SECRET_B64)
            .unwrap();
        let mk = |ty: &str, key: &str, data: &[u8]| K8sSecret {
            type_: Some(ty.into()),
            data: Some([(key.to_string(), ByteString(data.to_vec()))].into()),
            ..Default::default()
        };
        let s = mk(
            SECRET_TYPE_DOCKER_CONFIG_JSON,
            DOCKER_CONFIG_JSON_KEY,
            &bytes,
        );
        let cfg = DockerConfig::from_kubernetes_secret(&s).unwrap().unwrap();
        assert!(cfg.auths.contains_key("test.registry.io"));
        // wrong type, wrong key, empty data: nothing
        for s in [
            mk("Opaque", DOCKER_CONFIG_JSON_KEY, &bytes),
            mk(SECRET_TYPE_DOCKER_CONFIG_JSON, DOCKER_CFG_KEY, &bytes),
            mk(SECRET_TYPE_DOCKER_CONFIG_JSON, DOCKER_CONFIG_JSON_KEY, b""),
        ] {
            assert_eq!(DockerConfig::from_kubernetes_secret(&s).unwrap(), None);
        }
        let legacy = format!(r#"{{"r.io":{{"auth":"{}"}}}}"#, b64("a:b"));
        let s = mk(SECRET_TYPE_DOCKERCFG, DOCKER_CFG_KEY, legacy.as_bytes());
        let cfg = DockerConfig::from_kubernetes_secret(&s).unwrap().unwrap();
        assert_eq!(basic(&cfg.auths["r.io"]), ("a".into(), "b".into()));
        let bad = mk(SECRET_TYPE_DOCKER_CONFIG_JSON, DOCKER_CONFIG_JSON_KEY, b"{");
        assert!(DockerConfig::from_kubernetes_secret(&bad).is_err());
    }

    #[test]
    fn auth_overrides_username_password() {
        let e = one(&format!(
            r#"{{"auths":{{"r.io":{{"username":"u1","password":"p1","auth":"{}"}}}}}}"#,
            b64("u2:p2")
        ));
        assert_eq!(basic(&e), ("u2".into(), "p2".into()));
    }

    #[test]
    fn username_password_without_auth() {
        let e = one(r#"{"auths":{"r.io":{"username":"u","password":"p","email":"x@y"}}}"#);
        assert_eq!(basic(&e), ("u".into(), "p".into()));
        // username only: Basic with an empty password
        let e = one(r#"{"auths":{"r.io":{"username":"u"}}}"#);
        assert_eq!(basic(&e), ("u".into(), String::new()));
        // password only: no username, anonymous
        let e = one(r#"{"auths":{"r.io":{"password":"p"}}}"#);
        assert_eq!(e.credential(), Credential::Anonymous);
    }

    #[test]
    fn auth_splits_on_first_colon_and_trims_nuls() {
        let e = one(&format!(
            r#"{{"auths":{{"r.io":{{"auth":"{}"}}}}}}"#,
            b64("user:pa:ss\0\0")
        ));
        assert_eq!(basic(&e), ("user".into(), "pa:ss".into()));
        let e = one(&format!(
            r#"{{"auths":{{"r.io":{{"auth":"{}"}}}}}}"#,
            b64("user:")
        ));
        assert_eq!(basic(&e), ("user".into(), String::new()));
    }

    #[test]
    fn auth_padded_and_unpadded() {
        // "ab:c" -> "YWI6Yw==" padded
        let padded = b64("ab:c");
        assert!(padded.ends_with("=="));
        let unpadded = padded.trim_end_matches('=').to_string();
        for a in [padded, unpadded] {
            let e = one(&format!(r#"{{"auths":{{"r.io":{{"auth":"{a}"}}}}}}"#));
            assert_eq!(basic(&e), ("ab".into(), "c".into()));
        }
    }

    #[test]
    fn auth_errors_name_the_key_not_the_secret() {
        // no colon
        let secret = "hunter2hunter2";
        let cases = [
            (b64(secret), "username:password"),
            (b64(":hunter2hunter2"), "username:password"),
            ("hunter2hunter2!!".to_string(), "base64"),
        ];
        for (auth, expect) in cases {
            let json = format!(r#"{{"auths":{{"r.io":{{"auth":"{auth}"}}}}}}"#);
            let err = DockerConfig::from_dockerconfigjson(json.as_bytes()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(expect), "{msg}");
            assert!(msg.contains("r.io"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
            assert!(!format!("{err:?}").contains("hunter2"));
            assert!(!msg.contains(&auth), "{msg}");
        }
    }

    #[test]
    fn tokens_and_precedence() {
        let e = one(r#"{"auths":{"r.io":{"username":"u","password":"p","identitytoken":"it"}}}"#);
        assert_eq!(
            e.credential(),
            Credential::IdentityToken(Secret::new("it".into()))
        );
        let e = one(
            r#"{"auths":{"r.io":{"username":"u","password":"p","identitytoken":"it","registrytoken":"rt"}}}"#,
        );
        assert_eq!(
            e.credential(),
            Credential::RegistryToken(Secret::new("rt".into()))
        );
        // empty strings count as absent
        let e = one(
            r#"{"auths":{"r.io":{"username":"u","password":"p","identitytoken":"","registrytoken":""}}}"#,
        );
        assert_eq!(basic(&e), ("u".into(), "p".into()));
        let e = one(r#"{"auths":{"r.io":{}}}"#);
        assert_eq!(e, AuthEntry::default());
        assert_eq!(e.credential(), Credential::Anonymous);
        let e = one(r#"{"auths":{"r.io":null}}"#);
        assert_eq!(e.credential(), Credential::Anonymous);
    }

    #[test]
    fn field_names_case_insensitive_like_go() {
        let e = one(r#"{"Auths":{"r.io":{"Username":"u","PASSWORD":"p","identityToken":"it"}}}"#);
        assert_eq!(e.username.as_deref(), Some("u"));
        assert_eq!(e.password.as_ref().map(|p| p.expose().as_str()), Some("p"));
        assert_eq!(
            e.credential(),
            Credential::IdentityToken(Secret::new("it".into()))
        );
    }

    #[test]
    fn other_top_level_keys_ignored_and_missing_auths_is_empty() {
        let cfg = DockerConfig::from_dockerconfigjson(
            br#"{"credsStore":"desktop","credHelpers":{"gcr.io":"gcloud"},"auths":{"a.io":{},"b.io":{"username":"u"}}}"#,
        )
        .unwrap();
        assert_eq!(cfg.auths.keys().collect::<Vec<_>>(), ["a.io", "b.io"]);
        let cfg = DockerConfig::from_dockerconfigjson(br#"{"credsStore":"desktop"}"#).unwrap();
        assert!(cfg.auths.is_empty());
        let cfg = DockerConfig::from_dockerconfigjson(br#"{"auths":null}"#).unwrap();
        assert!(cfg.auths.is_empty());
    }

    #[test]
    fn keys_kept_as_written() {
        let cfg = DockerConfig::from_dockerconfigjson(
            br#"{"auths":{"https://index.docker.io/v1/":{"username":"u"},"HTTP://Reg.IO:5000/x/":{}}}"#,
        )
        .unwrap();
        assert!(cfg.auths.contains_key("https://index.docker.io/v1/"));
        assert!(cfg.auths.contains_key("HTTP://Reg.IO:5000/x/"));
    }

    #[test]
    fn legacy_dockercfg() {
        let json = format!(
            r#"{{"https://r.io":{{"auth":"{}","email":"e@x"}},"q.io":{{"username":"u","password":"p"}}}}"#,
            b64("a:b")
        );
        let cfg = DockerConfig::from_dockercfg(json.as_bytes()).unwrap();
        assert_eq!(basic(&cfg.auths["https://r.io"]), ("a".into(), "b".into()));
        assert_eq!(basic(&cfg.auths["q.io"]), ("u".into(), "p".into()));
        // the legacy parser does not look for "auths"
        let err = DockerConfig::from_dockercfg(br#"{"auths":{"r.io":{}}}"#);
        // "auths" is a registry key there, and its value {"r.io":{}} an entry: fine, no creds
        assert_eq!(err.unwrap().auths["auths"], AuthEntry::default());
    }

    #[test]
    fn malformed_json_errors_contain_no_secret() {
        let cases: [(&[u8], &str); 6] = [
            (
                br#"{"auths":{"r.io":{"password":"hunter2"}"#,
                "unexpected end",
            ),
            (br#"{"auths":{"r.io":{"password":"hunter2",}}}"#, "syntax"),
            (
                br#"["hunter2"]"#,
                "top level must be a JSON object, found an array",
            ),
            (
                br#"{"auths":"hunter2"}"#,
                "\"auths\" must be a JSON object, found a string",
            ),
            (
                br#"{"auths":{"r.io":"hunter2"}}"#,
                "entry \"r.io\" must be a JSON object",
            ),
            (
                br#"{"auths":{"r.io":{"password":["hunter2"]}}}"#,
                "field \"password\" must be a string, found an array",
            ),
        ];
        for (json, expect) in cases {
            let err = DockerConfig::from_dockerconfigjson(json).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(expect), "{msg:?} should contain {expect:?}");
            assert!(!msg.contains("hunter2"), "{msg}");
            assert!(!format!("{err:?}").contains("hunter2"));
        }
        let err = DockerConfig::from_dockercfg(b"\"hunter2\"").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn debug_redacts_secrets() {
        let json = format!(
            r#"{{"auths":{{"a.io":{{"auth":"{}"}},"b.io":{{"identitytoken":"tok-ident-9"}},"c.io":{{"registrytoken":"tok-reg-9"}}}}}}"#,
            b64("user:pw-secret-9")
        );
        let cfg = DockerConfig::from_dockerconfigjson(json.as_bytes()).unwrap();
        let dbg = format!(
            "{cfg:?} {:?}",
            cfg.auths
                .values()
                .map(|e| e.credential())
                .collect::<Vec<_>>()
        );
        for s in ["pw-secret-9", "tok-ident-9", "tok-reg-9"] {
            assert!(!dbg.contains(s), "{dbg}");
        }
        assert!(dbg.contains("user"));
    }

    #[test]
    fn load_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"ghcr.io":{{"auth":"{}"}}}}}}"#, b64("me:pw")),
        )
        .unwrap();
        let cfg = DockerConfig::load(&path).unwrap();
        assert_eq!(basic(&cfg.auths["ghcr.io"]), ("me".into(), "pw".into()));
        let err = DockerConfig::load(&dir.path().join("missing.json")).unwrap_err();
        assert!(matches!(err, DockerConfigError::Io { .. }));
        assert!(err.to_string().contains("missing.json"));
    }

    #[test]
    fn single_registry_named_secret_mode() {
        let base = |key: &str| {
            let mut cfg = DockerConfig::default();
            cfg.auths.insert(key.into(), AuthEntry::default());
            cfg.single_registry()
        };
        assert_eq!(
            base("http://private-oci-reg.localhost:5000").unwrap(),
            RegistryBase {
                host: "private-oci-reg.localhost:5000".into(),
                path: String::new(),
                insecure: true
            }
        );
        let b = base("https://europe-west3-docker.pkg.dev/proj/repo/").unwrap();
        assert_eq!(b.host, "europe-west3-docker.pkg.dev");
        assert_eq!(b.path, "proj/repo");
        assert!(!b.insecure);
        assert_eq!(b.to_string(), "europe-west3-docker.pkg.dev/proj/repo");
        let b = base("Reg.IO/a").unwrap();
        assert_eq!(
            (b.host.as_str(), b.path.as_str(), b.insecure),
            ("reg.io", "a", false)
        );
        for bad in ["", "http://", "https:///x", "bad host/x", "r.io//x"] {
            assert!(
                matches!(base(bad), Err(DockerConfigError::InvalidRegistry { .. })),
                "{bad:?}"
            );
        }
        let none = DockerConfig::default().single_registry().unwrap_err();
        assert!(matches!(
            none,
            DockerConfigError::RegistryCount { count: 0 }
        ));
        let mut two = DockerConfig::default();
        two.auths.insert("a.io".into(), AuthEntry::default());
        two.auths.insert("b.io".into(), AuthEntry::default());
        assert!(matches!(
            two.single_registry(),
            Err(DockerConfigError::RegistryCount { count: 2 })
        ));
    }

    #[test]
    fn subpath_join() {
        let b = RegistryBase::parse("r.io/base").unwrap();
        assert_eq!(b.with_subpath("/mods/").to_string(), "r.io/base/mods");
        assert_eq!(b.with_subpath("").to_string(), "r.io/base");
        let b = RegistryBase::parse("http://r.io").unwrap();
        let s = b.with_subpath("mods");
        assert_eq!((s.path.as_str(), s.insecure), ("mods", true));
    }
}
