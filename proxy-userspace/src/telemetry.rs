//! Telemetry: Istio's standard metrics plus `nodeproxy_*` internals (Prometheus, through
//! prometheus-client) and the access log.

pub mod access;
pub mod metrics;

pub use access::{AccessLog, tcp_access};
pub use metrics::Metrics;
