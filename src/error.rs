//! The proxy's request error, and the one place where every failure becomes an OCI error.

use http::StatusCode;

use crate::protocol::{ErrorCode, OciError};
use crate::upstream::UpstreamError;

/// What a client asked for, so "not found" upstream becomes the right code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subject {
    Manifest,
    Blob,
    Tags,
    Referrers,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The request itself is invalid (bad name, digest, method...).
    #[error(transparent)]
    Request(#[from] OciError),
    #[error("{source}")]
    Upstream {
        subject: Subject,
        #[source]
        source: UpstreamError,
    },
    /// The module catalog refuses to supply credentials (e.g. its selector matches no Secret).
    #[error("{0}")]
    Denied(String),
    #[error("upstream {upstream} served content that does not match digest {digest}")]
    DigestMismatch { upstream: String, digest: String },
    #[error("upstream {upstream} sent a manifest larger than {limit} bytes")]
    ManifestTooLarge { upstream: String, limit: usize },
    /// The blob is larger than `limits.max_blob_size` (the message says by how much).
    #[error("{0}")]
    BlobTooLarge(String),
    #[error("upstream {upstream} sent an invalid response: {message}")]
    BadUpstreamResponse { upstream: String, message: String },
    #[error("the manifest's media type {media_type} is not in the request's Accept header")]
    NotAcceptable { media_type: String },
    /// The ambient identity for the upstream has no valid token (e.g. the GKE metadata server
    /// is down and the cached token expired).
    #[error("{0}")]
    CredentialsUnavailable(String),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

impl From<crate::credentials::chain::ChooseError> for Error {
    fn from(e: crate::credentials::chain::ChooseError) -> Error {
        use crate::credentials::chain::ChooseError;
        match e {
            ChooseError::Denied(m) => Error::Denied(m),
            e @ ChooseError::Unavailable { .. } => Error::CredentialsUnavailable(e.to_string()),
        }
    }
}

impl Error {
    pub(crate) fn upstream(subject: Subject) -> impl FnOnce(UpstreamError) -> Error {
        move |source| Error::Upstream { subject, source }
    }

    /// The error the fetch behind a cache fill met (see `crate::pull::blob`), carried through
    /// the cache as it is: the client error and label are that error's, whichever request
    /// started the fill.
    fn fetched(&self) -> Option<&Error> {
        match self {
            Error::Cache(crate::cache::CacheError::Fetch(f)) => f.downcast_ref::<Error>(),
            _ => None,
        }
    }

    /// Bounded label for metrics and logs.
    pub(crate) fn metric_label(&self) -> &'static str {
        if let Some(e) = self.fetched() {
            return e.metric_label();
        }
        match self {
            Error::Request(_) => "bad_request",
            Error::Upstream { source, .. } => source.metric_label(),
            Error::Denied(_) => "denied",
            Error::DigestMismatch { .. } => "digest_mismatch",
            Error::ManifestTooLarge { .. } => "manifest_too_large",
            Error::BlobTooLarge(_) => "blob_too_large",
            Error::BadUpstreamResponse { .. } => "bad_upstream_response",
            Error::NotAcceptable { .. } => "not_acceptable",
            Error::CredentialsUnavailable(_) => "credentials_unavailable",
            Error::Cache(_) => "cache",
        }
    }

    /// The error as the client sees it. Messages name upstreams, never credentials, Secrets
    /// or catalog objects.
    pub(crate) fn to_oci(&self) -> OciError {
        if let Some(e) = self.fetched() {
            return e.to_oci();
        }
        let msg = self.to_string();
        match self {
            Error::Request(e) => e.clone(),
            Error::Upstream { subject, source } => match source {
                UpstreamError::NotFound { .. } => {
                    let code = match subject {
                        Subject::Manifest => ErrorCode::ManifestUnknown,
                        Subject::Blob => ErrorCode::BlobUnknown,
                        Subject::Tags | Subject::Referrers => ErrorCode::NameUnknown,
                    };
                    OciError::new(code, msg)
                }
                UpstreamError::Unauthorized { .. } => OciError::new(ErrorCode::Unauthorized, msg),
                UpstreamError::Denied { .. } => OciError::new(ErrorCode::Denied, msg),
                UpstreamError::TooManyRequests { retry_after, .. } => {
                    OciError::new(ErrorCode::TooManyRequests, msg)
                        .with_retry_after(retry_after.clone())
                }
                UpstreamError::Token { source: t, .. } if t.is_auth_failure() => {
                    OciError::new(ErrorCode::Unauthorized, msg)
                }
                UpstreamError::Token { .. } => OciError::new(ErrorCode::Unavailable, msg)
                    .with_status(StatusCode::BAD_GATEWAY),
                UpstreamError::Status { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE => {
                    OciError::new(ErrorCode::Unavailable, msg)
                }
                UpstreamError::Status { .. } => {
                    OciError::new(ErrorCode::Unavailable, msg).with_status(StatusCode::BAD_GATEWAY)
                }
                UpstreamError::Unreachable { .. } => {
                    OciError::new(ErrorCode::Unavailable, msg).with_status(StatusCode::BAD_GATEWAY)
                }
                // The target and the reason go to the log only (see `Upstream::send`).
                UpstreamError::Refused { upstream, refusal } => OciError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "upstream {upstream} redirected the request to a target the proxy refuses \
                         to contact ({})",
                        refusal.metric_label()
                    ),
                )
                .with_status(StatusCode::BAD_GATEWAY),
                UpstreamError::Busy { busy, .. } => OciError::new(ErrorCode::TooManyRequests, msg)
                    .with_status(StatusCode::SERVICE_UNAVAILABLE)
                    .with_retry_after(http::HeaderValue::from_str(&busy.retry_after.to_string()).ok()),
            },
            // The catalog's reason names Secrets and modules; it goes to the log (the
            // handlers' `dispatch`) and `resolve`, never to the (anonymous) client.
            Error::Denied(_) => OciError::new(
                ErrorCode::Denied,
                "no credentials may be used for this repository; the proxy's operator can see \
                 why with `oci-proxy resolve`",
            ),
            // A limit of the proxy's, not a credential decision: the message is the size.
            Error::BlobTooLarge(_) => OciError::new(ErrorCode::Denied, msg),
            Error::DigestMismatch { .. }
            | Error::ManifestTooLarge { .. }
            | Error::BadUpstreamResponse { .. } => {
                OciError::new(ErrorCode::Unavailable, msg).with_status(StatusCode::BAD_GATEWAY)
            }
            Error::NotAcceptable { media_type } => OciError::new(
                ErrorCode::ManifestUnknown,
                format!("manifest of type {media_type} found, but the Accept header does not include it"),
            ),
            Error::CredentialsUnavailable(_) => {
                OciError::new(ErrorCode::Unavailable, msg)
            }
            Error::Cache(_) => {
                OciError::new(ErrorCode::Unavailable, msg).with_status(StatusCode::BAD_GATEWAY)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_bodies_name_no_catalog_object() {
        let reason = "ModuleTemplate kcp-system/orphan: credential selector \
                      operator.kyma-project.io/oci-registry-cred=orphan matches no Secret";
        let e = Error::Denied(reason.into());
        let body = e.to_oci().body();
        assert_eq!(e.to_oci().status(), StatusCode::FORBIDDEN);
        assert!(body.contains("DENIED"), "{body}");
        for leak in ["kcp-system", "orphan", "oci-registry-cred", "Secret "] {
            assert!(!body.contains(leak), "{leak} in {body}");
        }
        // The log (Display) keeps the reason.
        assert!(e.to_string().contains("kcp-system/orphan"));
    }

    #[test]
    fn refused_redirects_are_bad_gateway_without_the_target() {
        let e = Error::Upstream {
            subject: Subject::Manifest,
            source: UpstreamError::Refused {
                upstream: "evil.test".into(),
                refusal: crate::upstream::Refusal::Address {
                    target: "127.0.0.1:6379".into(),
                    class: "loopback, private or internal",
                },
            },
        };
        let oci = e.to_oci();
        assert_eq!(oci.status(), StatusCode::BAD_GATEWAY);
        assert!(oci.message.contains("evil.test") && !oci.message.contains("6379"));
    }
}
