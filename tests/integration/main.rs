//! Integration suite: the real `nodeproxy` binary against real files and sockets on loopback.
//! One test binary; one module per topic.

mod behaviour;
mod cli;
mod delegation;
mod export_to;
mod hostile;
mod http1_wire;
mod kube_watch;
mod kubernetes;
mod l4;
mod ops;
mod readme;
mod reload;
mod simulate;
mod tls_origination;
mod traffic;
mod wildcard;
