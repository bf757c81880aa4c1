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
pub mod body;
pub mod compile;
pub mod config;
pub mod dataplane;
pub mod diagnostic;
pub mod http1;
pub mod inspect;
pub mod kubernetes;
pub mod proxy;
pub mod publish;
pub mod reply;
pub mod sockets;
pub mod telemetry;
#[doc(hidden)]
pub mod test_util;
pub mod upstream;

#[cfg(test)]
mod layering_tests;
#[cfg(test)]
mod panic_free_tests;

/// Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): each takes arbitrary bytes and
/// runs one parser the way the proxy does. Not an API.
#[doc(hidden)]
pub mod fuzz {
    /// Request heads (pipelined), as the downstream HTTP/1 server parses them.
    pub fn request_head(data: &[u8]) {
        crate::proxy::h1server::fuzz_request_heads(data);
    }

    /// Response heads (1xx skipped) and a chunked body after one, as the upstream client
    /// parses them; the first byte picks a response to HEAD or not.
    pub fn response_head(data: &[u8]) {
        if let Some((first, rest)) = data.split_first() {
            crate::upstream::h1::fuzz_response(rest, first & 1 == 1);
        }
    }

    /// Chunked transfer decoding.
    pub fn chunked(data: &[u8]) {
        let mut buf = bytes::BytesMut::from(data);
        crate::http1::fuzz_chunked_from(&mut buf, crate::http1::Chunk::Size);
    }

    /// A YAML/JSON config file through load, analyze and compile.
    pub fn config(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let mut set = crate::config::ConfigSet::default();
        let mut diags = Vec::new();
        set.load_str(std::path::Path::new("fuzz.yaml"), text, &mut diags);
        let _ = crate::publish::build_set(&set, diags);
    }

    /// A fuzz entry point.
    pub type Target = fn(&[u8]);

    /// Every target, by name (`cargo xtask fuzz` and the corpus test use the same list).
    pub const TARGETS: [(&str, Target); 4] = [
        ("request_head", request_head),
        ("response_head", response_head),
        ("chunked", chunked),
        ("config", config),
    ];
}
