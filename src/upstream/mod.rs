//! Talking to upstream registries.

pub mod challenge;
pub mod token;

pub use challenge::Challenge;
pub use token::{check_realm, fetch_token, RealmTrust, Token, TokenCache, TokenError, TokenKey};
