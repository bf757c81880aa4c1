//! Telemetry: Istio's standard metrics plus `nodeproxy_*` internals (Prometheus, through
//! prometheus-client) and the access log.

pub mod access;
pub mod metrics;
pub mod request;

pub use access::{AccessLog, TcpAccess};
pub use metrics::Metrics;
