//! End-to-end tests of the eBPF data path on a node built from network namespaces. They need
//! root (CI runs as root and must not skip them) and run one at a time: one node proxy attaches
//! to the cgroup root at once.

mod capture;
mod demo;
mod egress;
mod kubernetes;
mod lifecycle;
mod splice;
mod wildcard;

/// One proxy attaches to the cgroup root at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
