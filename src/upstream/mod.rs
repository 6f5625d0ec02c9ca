//! Talking to upstream registries.

pub mod challenge;
pub mod token;
