//! STUB

pub mod kube;
