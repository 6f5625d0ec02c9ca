//! oci-proxy: an authenticating OCI pull-through proxy with a digest-verified cache.
//!
//! Follow one request: [`server`] accepts it and [`protocol::route`]s it to an operation;
//! [`routing`] picks the upstream and repository; [`credentials`] (with the module [`catalog`])
//! picks the credential; [`pull`] decides what the pull may be served, from the [`cache`] or
//! by filling it from [`upstream`], which authenticates. [`prewarm`] walks the same path
//! without a client, to fill the cache ahead of Lifecycle Manager or for the `prewarm` command.

pub mod cache;
pub mod catalog;
pub mod config;
pub mod credentials;
pub mod error;
pub mod metrics;
pub mod prewarm;
pub mod protocol;
pub mod pull;
pub mod routing;
pub mod server;
pub mod upstream;
