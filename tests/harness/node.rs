//! A node made of network namespaces, for end-to-end tests of the eBPF data path: a node netns
//! with a bridge, pods as netns on veth pairs, the proxy started inside the node netns. Every
//! namespace (and with it every link) and every process is removed on drop, also when a test
//! fails. Names and address ranges are unique per process and node.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::ChildGuard;

/// Run `ip ARGS`, panicking with the command line on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` on a thread that has entered the network namespace at `ns`.
pub fn in_netns<T: Send>(ns: &Path, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display()));
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Where the proxy mounts bpffs by default.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The proxy's pin directory under the default bpffs.
pub const PIN_DIR: &str = "/sys/fs/bpf/nodeproxy";

/// A network namespace removed on drop.
pub struct Netns {
    /// Name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Create a namespace (removed on drop).
    pub fn new_public(name: String) -> Netns {
        Netns::new(name)
    }

    fn new(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A pod: a netns on the node's bridge.
pub struct Pod {
    /// Its namespace.
    pub ns: Netns,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address.
    pub ip6: std::net::Ipv6Addr,
}

impl Pod {
    /// The netns path (for `--enroll-netns`).
    pub fn path(&self) -> PathBuf {
        self.ns.path()
    }

    /// Bind a TCP listener inside the pod (for a backend).
    pub fn listen(&self, port: u16) -> std::net::TcpListener {
        let addr = SocketAddr::new(IpAddr::V4(self.ip), port);
        let l = in_netns(&self.path(), || std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in pod: {e}"));
        l.set_nonblocking(true).expect("nonblocking");
        l
    }

    /// Connect from inside the pod (the socket belongs to the pod's netns, so capture applies).
    pub fn connect(
        &self,
        to: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<std::net::TcpStream> {
        in_netns(&self.path(), || {
            std::net::TcpStream::connect_timeout(&to, timeout)
        })
    }

    /// One HTTP/1.1 GET from inside the pod: (status, body).
    pub fn http_get(
        &self,
        to: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = self.connect(to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {to}\r\n"));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((
            status,
            out.split_once("\r\n\r\n")
                .map(|x| x.1.to_string())
                .unwrap_or_default(),
        ))
    }

    /// Run a command inside the pod's netns (`nsenter --net`, which keeps the cgroup mount).
    pub fn exec(&self, cmd: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .args(cmd)
            .output()
            .expect("nsenter")
    }
}

/// The node: a netns with a bridge and the pods around it.
pub struct Node {
    /// Node namespace (the proxy runs here).
    pub ns: Netns,
    prefix: String,
    net: (u8, u8),
    next_host: u8,
    /// Pods (dropped before the node).
    pub pods: Vec<Pod>,
}

static NODES: AtomicU32 = AtomicU32::new(0);

impl Node {
    /// A fresh node for `test`.
    pub fn new(test: &str) -> Node {
        let n = NODES.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let prefix = format!("np{}{}", pid % 10000, n);
        let net = (200 + (n % 50) as u8, (pid % 250) as u8);
        let ns = Netns::new(format!("{prefix}-node"));
        let node = &ns.name;
        ip(&["-n", node, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("10.{}.{}.1/24", net.0, net.1),
            "dev",
            "br0",
        ]);
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("fd00:{:x}:{:x}::1/64", net.0, net.1),
            "dev",
            "br0",
            "nodad",
        ]);
        ip(&["-n", node, "link", "set", "br0", "up"]);
        // Forwarding on, and mesh VIPs unreachable from the node: a connect that is not rewritten
        // fails fast (ICMP unreachable) instead of hanging.
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .args(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .status();
        ip(&["-n", node, "route", "add", "unreachable", "10.96.0.0/16"]);
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .args(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
            .status();
        ip(&[
            "-n",
            node,
            "-6",
            "route",
            "add",
            "unreachable",
            "fd00:96::/32",
        ]);
        eprintln!("{test}: node {node} on 10.{}.{}.0/24", net.0, net.1);
        Node {
            ns,
            prefix,
            net,
            next_host: 10,
            pods: Vec::new(),
        }
    }

    /// The node's bridge address (capture address host part).
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net.0, self.net.1, 1)
    }

    /// The node's bridge IPv6 address.
    pub fn ip6(&self) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd00, self.net.0.into(), self.net.1.into(), 0, 0, 0, 0, 1)
    }

    /// An IPv6 mesh service address in the unreachable VIP range, unique to this node.
    pub fn vip6(&self, host: u8) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd00, 0x96, self.net.0.into(), 0, 0, 0, 0, host.into())
    }

    /// A mesh service address in the unreachable VIP range, unique to this node.
    pub fn vip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, self.net.0, host)
    }

    /// Add a pod; returns its index in `pods`.
    pub fn add_pod(&mut self, name: &str) -> usize {
        let host = self.next_host;
        self.next_host += 1;
        let ns = Netns::new(format!("{}-{name}", self.prefix));
        let (a, b) = (
            format!("{}v{host}", self.prefix),
            format!("{}p{host}", self.prefix),
        );
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ip(&["link", "set", &a, "netns", &self.ns.name]);
        ip(&["link", "set", &b, "netns", &ns.name]);
        ip(&[
            "-n",
            &self.ns.name,
            "link",
            "set",
            &a,
            "master",
            "br0",
            "up",
        ]);
        ip(&["-n", &ns.name, "link", "set", &b, "name", "eth0"]);
        let addr = Ipv4Addr::new(10, self.net.0, self.net.1, host);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        let addr6 = std::net::Ipv6Addr::new(
            0xfd00,
            self.net.0.into(),
            self.net.1.into(),
            0,
            0,
            0,
            0,
            host.into(),
        );
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{addr6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", &ns.name, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            &self.ip().to_string(),
        ]);
        ip(&[
            "-n",
            &ns.name,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.ip6().to_string(),
        ]);
        self.pods.push(Pod {
            ns,
            ip: addr,
            ip6: addr6,
        });
        self.pods.len() - 1
    }

    /// Start `nodeproxy ARGS` inside the node netns. The guard stops it with SIGTERM (SIGKILL
    /// after 5 s) and then runs `nodeproxy uninstall`, which removes the kernel state unless
    /// another instance holds it: each test starts from a clean kernel.
    pub fn spawn_proxy(&self, args: &[&str]) -> ProxyGuard {
        self.spawn_proxy_bin(crate::nodeproxy_bin(), args)
    }

    /// As [`Node::spawn_proxy`] with a given binary (e.g. a release build).
    pub fn spawn_proxy_bin(&self, bin: &Path, args: &[&str]) -> ProxyGuard {
        self.spawn_proxy_io(bin, args, Stdio::inherit())
    }

    /// As [`Node::spawn_proxy`], its log (stderr) appended to `log` instead of this process's.
    pub fn spawn_proxy_logged(&self, args: &[&str], log: &Path) -> ProxyGuard {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the proxy log");
        self.spawn_proxy_io(crate::nodeproxy_bin(), args, Stdio::from(file))
    }

    fn spawn_proxy_io(&self, bin: &Path, args: &[&str], stderr: Stdio) -> ProxyGuard {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path().display()))
            .arg(bin)
            .args(args)
            .current_dir(crate::repo_root())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn nodeproxy in the node netns");
        ProxyGuard(ChildGuard(child))
    }

    /// GET from inside the node netns (e.g. the admin API on 127.0.0.1).
    pub fn http_get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        let (addr, path) = (addr.to_string(), path.to_string());
        in_netns(&self.ns.path(), move || crate::http_get(&addr, &path))
    }
}

/// A proxy process stopped cleanly on drop.
pub struct ProxyGuard(pub ChildGuard);

impl ProxyGuard {
    /// Process id of the proxy (nsenter execs it, so this is the proxy itself).
    pub fn pid(&self) -> u32 {
        self.0.0.id()
    }

    /// Send SIGTERM and wait for the exit (SIGKILL after 5 s). Returns whether it exited by itself.
    pub fn terminate(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if matches!(self.0.0.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.0.kill();
        let _ = self.0.0.wait();
        false
    }

    /// SIGKILL (no cleanup runs).
    pub fn kill(&mut self) {
        let _ = self.0.0.kill();
        let _ = self.0.0.wait();
    }
}

impl Drop for ProxyGuard {
    fn drop(&mut self) {
        if matches!(self.0.0.try_wait(), Ok(None)) {
            self.terminate();
        }
        // Refused while another instance (a successor, a restarted proxy) holds the pin
        // directory: only the last proxy's guard removes the kernel state.
        let _ = Command::new(crate::nodeproxy_bin())
            .arg("uninstall")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.pods.clear();
    }
}
