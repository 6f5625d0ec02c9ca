//! The OCI distribution protocol as the proxy speaks it to clients: the grammar of names, tags
//! and digests, the routes, media types, and the error body. Pure functions only: no I/O.

pub(crate) mod error;
pub mod grammar;
pub(crate) mod key_pattern;
pub(crate) mod media;
pub(crate) mod range;
pub(crate) mod route;
pub(crate) mod tags;

pub use error::{ErrorCode, OciError};
pub use grammar::{Digest, Reference, Repository, Tag};
pub use range::{ByteRange, RangeSpec};
pub use route::{route, Op, Route};
pub use tags::TagList;
