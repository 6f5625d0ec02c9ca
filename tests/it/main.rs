//! The integration tests, one binary (so `tests/support` compiles once): each module is one
//! area of the proxy, with its own docs; everything runs against real parts on 127.0.0.1.

// A test binary exports nothing: `pub` in its modules means "shared between test modules".
#![allow(unreachable_pub)]

#[path = "../support/mod.rs"]
mod support;

mod attack_integrity;
mod attack_limits;
mod attack_secrets;
mod attack_ssrf;
mod cache;
mod catalog_files;
mod catalog_kube;
mod cli;
mod cloud_identity;
mod deploy;
mod disk_full;
mod fixtures;
mod import;
mod module_graph;
mod modules;
mod monitoring;
mod prewarm;
mod proxy_core;
mod read_rule;
mod reload_state;
mod router_props;
mod s3;
mod serving;
