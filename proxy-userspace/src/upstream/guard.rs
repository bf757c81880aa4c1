//! What the proxy may dial. It runs in the node's network namespace, so an endpoint on
//! loopback, on a node address or on link-local is the *node's* (kubelet, the admin API, the
//! cloud metadata service), not a pod's as with a sidecar: a ServiceEntry endpoint or a DNS
//! answer must not turn captured traffic into a request to them (SSRF).
//!
//! Always refused: the proxy's own sockets (admin API, capture listener, service listeners),
//! which would loop into the proxy. With `--capture ebpf` also refused: 127.0.0.0/8, ::1,
//! 169.254.0.0/16, fe80::/10 and every address of the node's interfaces, unless
//! `--allow-upstream-cidr` lets a range through. A refusal is a connect failure (503 UF, the
//! reason in the body and the log), counted in `nodeproxy_upstream_refused_total`.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::RwLock;

use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;

/// The dial policy of one proxy (held by its cluster states).
pub struct DialGuard {
    /// The proxy's own listening addresses: the fixed ones (admin, capture), then the
    /// service listeners of the snapshot in force.
    base: RwLock<Vec<SocketAddr>>,
    own: RwLock<HashSet<SocketAddr>>,
    /// Ranges refused (empty with `--capture none`).
    deny: Vec<IpNet>,
    /// Ranges let through although `deny` covers them.
    allow: Vec<IpNet>,
    refused: Counter,
    /// SO_MARK of upstream sockets (0: none). Set with eBPF capture, as a second guard
    /// (besides netns enrollment) against capturing the proxy's own connects.
    pub(crate) mark: u32,
    /// Called with each new upstream connection before its first byte (the kernel splice).
    pub(crate) hook: Option<super::pool::ConnectHook>,
}

impl std::fmt::Debug for DialGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialGuard")
            .field("deny", &self.deny)
            .field("allow", &self.allow)
            .field("mark", &self.mark)
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

impl DialGuard {
    /// Upstream sockets get SO_MARK `mark` and go through `hook` (eBPF capture).
    pub fn with_socket(mut self, mark: u32, hook: Option<super::pool::ConnectHook>) -> DialGuard {
        self.mark = mark;
        self.hook = hook;
        self
    }

    /// A guard; `node` is whether the node's own ranges are refused (`--capture ebpf`).
    pub fn new(node: bool, allow: Vec<IpNet>, refused: Counter) -> DialGuard {
        let mut deny: Vec<IpNet> = Vec::new();
        if node {
            for r in [
                "127.0.0.0/8",
                "::1/128",
                "169.254.0.0/16",
                "fe80::/10",
                "::ffff:127.0.0.0/104",
            ] {
                deny.push(r.parse().expect("a CIDR"));
            }
            deny.extend(node_addresses().into_iter().map(IpNet::from));
        }
        DialGuard {
            base: RwLock::default(),
            own: RwLock::default(),
            deny,
            allow,
            refused,
            mark: 0,
            hook: None,
        }
    }

    /// Add a fixed address of the proxy's own (admin API, capture listener).
    pub fn add_base(&self, addr: SocketAddr) {
        self.base.write().expect("guard lock").push(addr);
        self.own.write().expect("guard lock").insert(addr);
    }

    /// The service listeners bound now (replacing the previous set).
    pub fn set_listeners(&self, listeners: impl IntoIterator<Item = SocketAddr>) {
        let base = self.base.read().expect("guard lock");
        *self.own.write().expect("guard lock") = base.iter().copied().chain(listeners).collect();
    }

    /// A guard that refuses nothing (unit tests of the pool and the LB).
    pub fn open() -> DialGuard {
        DialGuard::new(false, Vec::new(), Counter::default())
    }

    /// `Err(reason)` when `addr` must not be dialled.
    pub fn check(&self, addr: SocketAddr) -> Result<(), String> {
        let own = {
            let own = self.own.read().expect("guard lock");
            own.contains(&addr)
                || own.iter().any(|o| {
                    o.ip().is_unspecified() && o.port() == addr.port() && self.is_node(addr.ip())
                })
        };
        let reason = if own {
            Some("it is one of the proxy's own sockets")
        } else if self.deny.iter().any(|n| n.contains(&addr.ip()))
            && !self.allow.iter().any(|n| n.contains(&addr.ip()))
        {
            Some(
                "it is the node's own (loopback, link-local or a node address); --allow-upstream-cidr lets a range through",
            )
        } else {
            None
        };
        match reason {
            None => Ok(()),
            Some(why) => {
                self.refused.inc();
                tracing::warn!(%addr, why, "upstream refused");
                Err(format!("destination {addr} refused: {why}"))
            }
        }
    }

    fn is_node(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.deny.iter().any(|n| n.contains(&ip))
    }
}

/// Every address of the node's interfaces.
fn node_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|s| {
            if let Some(v4) = s.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ranges_are_refused_with_capture_unless_allowed() {
        let g = DialGuard::new(
            true,
            vec!["127.0.0.5/32".parse().unwrap()],
            Counter::default(),
        );
        for bad in [
            "127.0.0.1:15000",
            "169.254.169.254:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(g.check(bad.parse().unwrap()).is_err(), "{bad}");
        }
        assert!(g.check("127.0.0.5:80".parse().unwrap()).is_ok());
        assert!(
            g.check("10.1.2.3:80".parse().unwrap()).is_ok()
                || node_addresses().contains(&"10.1.2.3".parse().unwrap())
        );
        let open = DialGuard::new(false, Vec::new(), Counter::default());
        assert!(open.check("127.0.0.1:8080".parse().unwrap()).is_ok());
        open.add_base("127.0.0.1:15000".parse().unwrap());
        assert!(open.check("127.0.0.1:15000".parse().unwrap()).is_err());
        assert_eq!(open.refused.get(), 1);
    }
}
