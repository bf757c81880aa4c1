//! nodeproxy: a sidecar-less service-mesh data plane for one Linux node.
//!
//! Configuration flows one way: [`config`] (Istio YAML or Kubernetes objects) → [`analyze`]
//! (diagnostics) → [`compile`] (an immutable [`compile::Snapshot`]) → the proxy, the kernel maps
//! and the admin API, each reading the snapshot lock-free.

#![warn(missing_docs)]

pub mod admin;
pub mod alloc;
pub mod analyze;
pub mod app;
pub mod compile;
pub mod config;
pub mod dataplane;
pub mod diagnostic;
pub mod http1;
pub mod inspect;
pub mod kubernetes;
pub mod proxy;
pub mod publish;
pub mod telemetry;
#[doc(hidden)]
pub mod test_util;
pub mod upstream;

#[cfg(test)]
mod panic_free_tests;
