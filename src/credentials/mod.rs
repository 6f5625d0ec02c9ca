//! Upstream credentials: what they are, where they come from (docker config files, Kubernetes
//! pull Secrets, and the workload's own cloud identity: GKE Workload Identity / Google
//! service-account keys and AWS ECR), and go-containerregistry's rules for picking one for a
//! repository.

pub(crate) mod ambient;
pub(crate) mod chain;
pub(crate) mod dockerconfig;
pub(crate) mod ecr;
pub(crate) mod google;
pub(crate) mod keychain;
pub(crate) mod refresh;
pub(crate) mod secret;

use std::fmt;

pub(crate) use secret::Secret;

/// A credential for one upstream registry. Every secret part is a [`Secret`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Credential {
    #[default]
    Anonymous,
    /// Username and password: HTTP Basic, or the Basic credentials of a token exchange.
    Basic {
        username: String,
        password: Secret<String>,
    },
    /// An OAuth2 refresh token, exchanged with `grant_type=refresh_token`.
    IdentityToken(Secret<String>),
    /// A ready bearer token, sent as is.
    RegistryToken(Secret<String>),
}

impl Credential {
    /// A short name for logs and `resolve` output: `anonymous`, `basic`, `identity-token`,
    /// `registry-token`.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Anonymous => "anonymous",
            Credential::Basic { .. } => "basic",
            Credential::IdentityToken(_) => "identity-token",
            Credential::RegistryToken(_) => "registry-token",
        }
    }

    /// A fingerprint of the credential, used in token cache keys (a rotated credential never
    /// reuses a token obtained with the old one) and in logs and `resolve` output (which
    /// Secret's credential was used). It is an HMAC-SHA256 under a key drawn at random once per
    /// process: stable within the process, different in every other one, and useless for
    /// guessing a weak password offline (there is no key to test guesses against).
    pub fn id(&self) -> CredentialId {
        let mut ctx = ring::hmac::Context::with_key(id_key());
        ctx.update(b"oci-proxy credential id v2\0");
        ctx.update(self.kind().as_bytes());
        ctx.update(&[0]);
        match self {
            Credential::Anonymous => {}
            Credential::Basic { username, password } => {
                ctx.update(username.as_bytes());
                ctx.update(&[0]);
                ctx.update(password.expose().as_bytes());
            }
            Credential::IdentityToken(t) | Credential::RegistryToken(t) => {
                ctx.update(t.expose().as_bytes())
            }
        }
        CredentialId(hex::encode(&ctx.sign().as_ref()[..12]))
    }
}

/// The per-process key of [`Credential::id`].
fn id_key() -> &'static ring::hmac::Key {
    static KEY: std::sync::OnceLock<ring::hmac::Key> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        // A failing system RNG leaves no safe fallback for a secret key: better to stop.
        #[allow(clippy::expect_used)]
        ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .expect("the system random number generator failed")
    })
}

/// Fingerprint of a [`Credential`]; see [`Credential::id`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialId(String);

impl CredentialId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialId({})", self.0)
    }
}

impl fmt::Display for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_changes_with_password_and_hides_it() {
        let a = Credential::Basic {
            username: "u".into(),
            password: Secret::new("p1".into()),
        };
        let b = Credential::Basic {
            username: "u".into(),
            password: Secret::new("p2".into()),
        };
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id(), a.clone().id());
        assert_ne!(Credential::Anonymous.id(), a.id());
        assert!(!format!("{a:?}").contains("p1"));
    }
}
