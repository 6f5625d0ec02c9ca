//! Request path → operation. STUB: to be implemented (see the doc comments for the contract).

use http::Method;

use super::error::OciError;
use super::grammar::{Digest, Reference};

/// What the client asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `GET|HEAD /v2/`
    Ping,
    /// `GET|HEAD /v2/<name>/manifests/<reference>`
    Manifest(Reference),
    /// `GET|HEAD /v2/<name>/blobs/<digest>`
    Blob(Digest),
    /// `GET /v2/<name>/tags/list[?n=&last=]`
    Tags { n: Option<usize>, last: Option<String> },
    /// `GET /v2/<name>/referrers/<digest>[?artifactType=]`
    Referrers { digest: Digest, artifact_type: Option<String> },
}

/// A routed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub op: Op,
    /// True for HEAD.
    pub head: bool,
    /// Everything between `/v2/` and the endpoint keyword, validated: each segment is a name
    /// component, except that the first may be a registry host (`host[:port]`). Empty for Ping.
    pub name: String,
    /// containerd's `ns=` query parameter, validated as a registry host.
    pub ns: Option<String>,
}

/// Routes a request.
pub fn route(_method: &Method, _path: &str, _query: Option<&str>) -> Result<Route, OciError> {
    todo!()
}
