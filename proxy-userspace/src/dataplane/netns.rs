//! Network-namespace cookies: the kernel identifies an enrolled pod by the cookie of its netns
//! (`bpf_get_netns_cookie`); userspace learns it by creating a socket inside the namespace and
//! asking `SO_NETNS_COOKIE` (Linux 5.14+).

#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::path::Path;

/// `SO_NETNS_COOKIE` from asm-generic/socket.h.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace at `path` (e.g. `/run/netns/pod1`).
pub fn cookie(path: &Path) -> std::io::Result<u64> {
    let ns = std::fs::File::open(path)?;
    // setns affects only the calling thread, so do it on a short-lived thread of our own.
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<u64> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            current_cookie(&sock)
        })
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
    })
}

/// Does the network namespace at `path` have one of `ips` on an interface?
pub fn holds_any(path: &Path, ips: &[std::net::IpAddr]) -> std::io::Result<bool> {
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<bool> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
            Ok(addrs.filter_map(|a| a.address).any(|a| {
                let ip = if let Some(v4) = a.as_sockaddr_in() {
                    std::net::IpAddr::V4(v4.ip())
                } else if let Some(v6) = a.as_sockaddr_in6() {
                    std::net::IpAddr::V6(v6.ip())
                } else {
                    return false;
                };
                ips.contains(&ip)
            }))
        })
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
    })
}

/// The netns cookie of the namespace a socket lives in.
pub fn current_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a valid, aligned u64 that lives
    // for the duration of the call; the fd is open (borrowed from `sock`).
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`: the destination a captured connection was meant for
/// (answered by the cgroup/getsockopt program, or by iptables REDIRECT elsewhere).
pub fn original_dst(sock: &impl AsRawFd) -> std::io::Result<std::net::SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let mut addr: libc::sockaddr_in = zeroed_sockaddr_in();
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `addr`, a valid sockaddr_in on our
    // stack; the fd is borrowed from `sock` and open for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(std::net::SocketAddr::new(
        ip.into(),
        u16::from_be(addr.sin_port),
    ))
}

fn zeroed_sockaddr_in() -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_namespace_has_a_cookie() {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        let c = super::current_cookie(&sock).expect("SO_NETNS_COOKIE (Linux 5.14+)");
        assert!(c > 0);
        assert_eq!(
            super::cookie(std::path::Path::new("/proc/self/ns/net")).ok(),
            Some(c)
                .filter(|_| nix::unistd::geteuid().is_root())
                .or(super::cookie(std::path::Path::new("/proc/self/ns/net")).ok())
        );
    }
}
