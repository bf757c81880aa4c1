//! `#[repr(C)]` mirrors of `proxy-ebpf/include/abi.h`. Keep in sync with that header; the
//! layout test below compiles `proxy-ebpf/abi_layout.c` and compares every size and offset.

#![allow(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `NP_PROXY_MARK`: SO_MARK of the proxy's upstream sockets.
pub const NP_PROXY_MARK: u32 = 0x4e50;
/// `NP_MAX_BACKENDS`: endpoints the kernel scans per fast-path service.
pub const NP_MAX_BACKENDS: usize = 64;
/// `NP_MODE_PROXY`.
pub const NP_MODE_PROXY: u32 = 1;
/// `NP_MODE_FASTPATH`.
pub const NP_MODE_FASTPATH: u32 = 2;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// `enum np_reason`, in order. Keep in sync with proxy-ebpf/include/abi.h.
pub const REASONS: [&str; 18] = [
    "not_tcp",
    "not_enrolled",
    "proxy_mark",
    "no_service",
    "redirect_proxy",
    "fastpath",
    "no_backend",
    "orig_dst_full",
    "established_tracked",
    "xdp_drop_port",
    "xdp_drop_cidr",
    "xdp_pass",
    "no_capture_addr",
    "sockmap_add",
    "sockmap_redirect",
    "sockmap_upstream",
    "xdp_drop_frag",
    "xdp_drop_malformed",
];
/// Index of `NP_R_FASTPATH`.
pub const R_FASTPATH: usize = 5;

/// `struct np_addr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NpAddr {
    /// Network order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// Network order.
    pub port: u16,
    /// 2 or 10.
    pub family: u16,
}

/// `struct np_svc_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NpSvcVal {
    /// `enum np_mode`.
    pub mode: u32,
    /// Key prefix in `np_backends`.
    pub backend_base: u32,
    /// Number of endpoints.
    pub backend_count: u32,
    /// Sum of weights.
    pub total_weight: u32,
}

/// `struct np_backend_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NpBackendKey {
    /// Service's base.
    pub base: u32,
    /// Index.
    pub index: u32,
}

/// `struct np_backend_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NpBackendVal {
    /// Endpoint.
    pub addr: NpAddr,
    /// Cumulative weight.
    pub weight_end: u32,
}

/// `struct np_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NpEvent {
    /// `enum np_reason`.
    pub reason: u32,
    /// Process id.
    pub pid: u32,
    /// Network namespace cookie.
    pub netns_cookie: u64,
    /// Original destination.
    pub orig: NpAddr,
    /// Rewritten destination, when any.
    pub target: NpAddr,
}

/// `struct np_sock_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NpSockKey {
    /// Network order.
    pub local_ip: u32,
    /// Network order.
    pub remote_ip: u32,
    /// Host order.
    pub local_port: u32,
    /// Host order.
    pub remote_port: u32,
}

/// `struct np_lpm4` (key data after the prefix length).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NpLpm4 {
    /// Prefix length.
    pub prefixlen: u32,
    /// Network order.
    pub addr: u32,
}

const _: () = assert!(size_of::<NpAddr>() == 20);
const _: () = assert!(size_of::<NpSvcVal>() == 16);
const _: () = assert!(size_of::<NpBackendKey>() == 8);
const _: () = assert!(size_of::<NpBackendVal>() == 24);
const _: () = assert!(size_of::<NpEvent>() == 56);
const _: () = assert!(size_of::<NpLpm4>() == 8);
const _: () = assert!(size_of::<NpSockKey>() == 16);

// SAFETY: plain #[repr(C)] structs of integers with no padding (checked above and by the layout
// test), valid for any bit pattern.
unsafe impl aya::Pod for NpAddr {}
// SAFETY: as above.
unsafe impl aya::Pod for NpSvcVal {}
// SAFETY: as above.
unsafe impl aya::Pod for NpBackendKey {}
// SAFETY: as above.
unsafe impl aya::Pod for NpBackendVal {}
// SAFETY: as above.
unsafe impl aya::Pod for NpEvent {}
// SAFETY: as above.
unsafe impl aya::Pod for NpSockKey {}

impl NpSockKey {
    /// The key of a socket by its own addresses (IPv4 only: the splice is IPv4).
    pub fn of(local: SocketAddr, remote: SocketAddr) -> Option<NpSockKey> {
        match (local, remote) {
            (SocketAddr::V4(l), SocketAddr::V4(r)) => Some(NpSockKey {
                local_ip: u32::from_ne_bytes(l.ip().octets()),
                remote_ip: u32::from_ne_bytes(r.ip().octets()),
                local_port: l.port().into(),
                remote_port: r.port().into(),
            }),
            _ => None,
        }
    }
}

impl NpAddr {
    /// From a socket address (IPv4-mapped IPv6 becomes IPv4, as connect4 sees it).
    pub fn from_socket(sa: SocketAddr) -> NpAddr {
        let port = sa.port().to_be();
        match sa.ip() {
            IpAddr::V4(v4) => NpAddr {
                addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
                port,
                family: AF_INET,
            },
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => NpAddr {
                    addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
                    port,
                    family: AF_INET,
                },
                None => {
                    let o = v6.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    NpAddr {
                        addr: [w(0), w(4), w(8), w(12)],
                        port,
                        family: AF_INET6,
                    }
                }
            },
        }
    }

    /// Back to a socket address.
    pub fn to_socket(self) -> Option<SocketAddr> {
        let port = u16::from_be(self.port);
        match self.family {
            AF_INET => Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(self.addr[0].to_ne_bytes())),
                port,
            )),
            AF_INET6 => {
                let mut o = [0u8; 16];
                for (i, w) in self.addr.iter().enumerate() {
                    o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                }
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
            }
            _ => None,
        }
    }
}

/// The bytes of an event, to fill it from a ring-buffer record.
pub fn event_bytes_mut(ev: &mut NpEvent) -> &mut [u8] {
    // SAFETY: NpEvent is #[repr(C)], 56 bytes with no padding (asserted above), and every bit
    // pattern is a valid NpEvent; the slice borrows `ev` exclusively for its lifetime.
    unsafe {
        std::slice::from_raw_parts_mut((ev as *mut NpEvent).cast::<u8>(), size_of::<NpEvent>())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::mem::offset_of;
    use std::path::Path;
    use std::process::Command;

    use super::*;

    #[test]
    fn addresses_round_trip_in_network_order() {
        let sa: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let a = NpAddr::from_socket(sa);
        assert_eq!(
            a.addr[0].to_ne_bytes(),
            [10, 1, 2, 3],
            "network order in memory, as user_ip4"
        );
        assert_eq!(a.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(a.to_socket(), Some(sa));
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(NpAddr::from_socket(v6).to_socket(), Some(v6));
    }

    /// Compile `proxy-ebpf/abi_layout.c` with the host C compiler and compare with the mirrors.
    #[test]
    fn layout_matches_the_c_header() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
        let exe = std::env::temp_dir().join(format!("np-abi-layout-{}", std::process::id()));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let st = Command::new(&cc)
            .arg("-I")
            .arg(root.join("include"))
            .arg(root.join("abi_layout.c"))
            .arg("-o")
            .arg(&exe)
            .status()
            .unwrap_or_else(|e| panic!("run {cc}: {e}"));
        assert!(st.success(), "{cc} failed on abi_layout.c");
        let out = Command::new(&exe).output().expect("run abi_layout");
        let _ = std::fs::remove_file(&exe);
        let c: HashMap<String, usize> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split_once(' ')
                    .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            })
            .collect();
        let rust: [(&str, usize); 33] = [
            ("np_addr", size_of::<NpAddr>()),
            ("np_addr.addr", offset_of!(NpAddr, addr)),
            ("np_addr.port", offset_of!(NpAddr, port)),
            ("np_addr.family", offset_of!(NpAddr, family)),
            ("np_svc_val", size_of::<NpSvcVal>()),
            ("np_svc_val.mode", offset_of!(NpSvcVal, mode)),
            (
                "np_svc_val.backend_base",
                offset_of!(NpSvcVal, backend_base),
            ),
            (
                "np_svc_val.backend_count",
                offset_of!(NpSvcVal, backend_count),
            ),
            (
                "np_svc_val.total_weight",
                offset_of!(NpSvcVal, total_weight),
            ),
            ("np_backend_key", size_of::<NpBackendKey>()),
            ("np_backend_key.base", offset_of!(NpBackendKey, base)),
            ("np_backend_key.index", offset_of!(NpBackendKey, index)),
            ("np_backend_val", size_of::<NpBackendVal>()),
            ("np_backend_val.addr", offset_of!(NpBackendVal, addr)),
            (
                "np_backend_val.weight_end",
                offset_of!(NpBackendVal, weight_end),
            ),
            ("np_event", size_of::<NpEvent>()),
            ("np_event.reason", offset_of!(NpEvent, reason)),
            ("np_event.pid", offset_of!(NpEvent, pid)),
            ("np_event.netns_cookie", offset_of!(NpEvent, netns_cookie)),
            ("np_event.orig", offset_of!(NpEvent, orig)),
            ("np_event.target", offset_of!(NpEvent, target)),
            ("np_sock_key", size_of::<NpSockKey>()),
            ("np_sock_key.local_ip", offset_of!(NpSockKey, local_ip)),
            ("np_sock_key.remote_ip", offset_of!(NpSockKey, remote_ip)),
            ("np_sock_key.local_port", offset_of!(NpSockKey, local_port)),
            (
                "np_sock_key.remote_port",
                offset_of!(NpSockKey, remote_port),
            ),
            ("np_lpm4", size_of::<NpLpm4>()),
            ("np_lpm4.prefixlen", offset_of!(NpLpm4, prefixlen)),
            ("np_lpm4.addr", offset_of!(NpLpm4, addr)),
            ("NP_PROXY_MARK", NP_PROXY_MARK as usize),
            ("NP_MAX_BACKENDS", NP_MAX_BACKENDS),
            ("NP_R_MAX", REASONS.len()),
            ("np_addr", 20),
        ];
        for (name, v) in rust {
            assert_eq!(
                c.get(name),
                Some(&v),
                "{name}: C says {:?}, Rust {v}",
                c.get(name)
            );
        }
    }
}
