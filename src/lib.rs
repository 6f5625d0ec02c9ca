//! oci-proxy: an authenticating OCI pull-through proxy with a digest-verified cache.
//!
//! Follow one request: [`server`] accepts it and [`protocol::route`]s it to an operation;
//! [`routing`] picks the upstream and repository; [`credentials`] (with the module [`catalog`])
//! picks the credential; [`pull`] decides what the pull may be served, from the [`cache`] or
//! by filling it from [`upstream`], which authenticates. [`prewarm`] walks the same path
//! without a client, to fill the cache ahead of Lifecycle Manager or for the `prewarm` command.

//!
//! The public face is what the binary and the integration tests drive: the config model,
//! the server, the module catalog and the routing grammar. Everything else is `pub(crate)`,
//! so the compiler reports what nothing uses (`unreachable_pub` and `dead_code`).

pub(crate) mod cache;
pub mod catalog;
pub mod config;
pub(crate) mod credentials;
pub(crate) mod error;
pub mod import;
pub(crate) mod metrics;
pub mod prewarm;
pub mod protocol;
pub(crate) mod pull;
pub(crate) mod routing;
pub mod server;
pub(crate) mod upstream;

pub use cache::gc;
pub use credentials::Credential;
