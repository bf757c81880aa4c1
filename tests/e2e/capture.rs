//! Capture through cgroup/connect4 + sockops, the kernel fast path, enrollment, lifecycle.

use std::net::SocketAddr;
use std::time::Duration;

use nodeproxy::test_util::require_root;
use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::eventually;
use nodeproxy_tests::node::Node;
use nodeproxy_tests::proxy::TempDir;
use tokio::io::AsyncWriteExt;

use super::SERIAL;

pub(super) const ADMIN: &str = "127.0.0.1:15000";

pub(super) struct Scene {
    pub(super) node: Node,
    pub(super) client: usize,
    pub(super) other: usize,
    /// The pod of the v2 backend (`end-user: jason` goes there).
    v2: usize,
    pub(super) dir: TempDir,
    _backends: Vec<Backend>,
    _echo: tokio::task::JoinHandle<()>,
}

fn config(node: &Node, v1: &str, v2: &str, echo: &str, weights: (u32, u32)) -> String {
    let (reviews, db) = (node.vip(1), node.vip(2));
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  addresses: [{reviews}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints:
  - {{address: {v1}, labels: {{app: reviews, version: v1}}}}
  - {{address: {v2}, labels: {{app: reviews, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - match: [{{headers: {{x-fault: {{exact: abort}}}}}}]
    fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]
  - route:
    - {{destination: {{host: reviews, subset: v1}}, weight: {}}}
    - {{destination: {{host: reviews, subset: v2}}, weight: {}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db}}
spec:
  hosts: [db.default.svc.cluster.local]
  addresses: [{db}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 5432, name: tcp, protocol: TCP, targetPort: 9000}}]
  endpoints: [{{address: {echo}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: v1-pod}}
spec:
  hosts: [v1.pods.local]
  addresses: [{v1}]
  resolution: NONE
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
",
        weights.0, weights.1
    )
}

/// A node with a client pod (enrolled), another pod (not enrolled), v1/v2 backends and a TCP
/// backend that answers with the address it sees as its peer.
pub(super) async fn scene(test: &str) -> Scene {
    let mut node = Node::new(test);
    let client = node.add_pod("client");
    let other = node.add_pod("other");
    let v1 = node.add_pod("v1");
    let v2 = node.add_pod("v2");
    let echo = node.add_pod("db");
    let backends = vec![
        Backend::from_std(node.pods[v1].listen(8080), "v1"),
        Backend::from_std(node.pods[v2].listen(8080), "v2"),
    ];
    let l = tokio::net::TcpListener::from_std(node.pods[echo].listen(9000)).unwrap();
    let echo_task = tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    let dir = TempDir::new();
    let yaml = config(
        &node,
        &node.pods[v1].ip.to_string(),
        &node.pods[v2].ip.to_string(),
        &node.pods[echo].ip.to_string(),
        (80, 20),
    );
    std::fs::write(dir.0.join("mesh.yaml"), yaml).unwrap();
    Scene {
        node,
        client,
        other,
        v2,
        dir,
        _backends: backends,
        _echo: echo_task,
    }
}

impl Scene {
    pub(super) fn start_proxy(&self) -> nodeproxy_tests::node::ProxyGuard {
        self.start_proxy_with(&[])
    }

    pub(super) fn start_proxy_with(&self, extra: &[&str]) -> nodeproxy_tests::node::ProxyGuard {
        let p = self.spawn_proxy(extra);
        eventually("proxy ready", Duration::from_secs(30), || {
            self.node
                .http_get(ADMIN, "/ready")
                .filter(|(s, _)| *s == 200)
        });
        p
    }

    /// Start the proxy without waiting for it.
    pub(super) fn spawn_proxy(&self, extra: &[&str]) -> nodeproxy_tests::node::ProxyGuard {
        let cfg = self.dir.0.join("mesh.yaml");
        let capture = format!("{}:15001", self.node.ip());
        let client_ns = self.node.pods[self.client].path();
        let mut args = vec![
            "run",
            "--capture",
            "ebpf",
            "--capture-listen",
            &capture,
            "--admin",
            ADMIN,
            "--config",
            cfg.to_str().unwrap(),
            "--enroll-netns",
            client_ns.to_str().unwrap(),
            "--access-log",
            "off",
        ];
        args.extend_from_slice(extra);
        self.node.spawn_proxy(&args)
    }

    pub(super) fn kernel(&self) -> serde_json::Value {
        let (s, body) = self.node.http_get(ADMIN, "/kernel").expect("admin /kernel");
        assert_eq!(s, 200, "{body}");
        serde_json::from_str(&body).expect("kernel json")
    }

    pub(super) fn counter(&self, reason: &str) -> u64 {
        self.kernel()["counters"][reason].as_u64().unwrap_or(0)
    }

    /// The server sockets on `port` in `pod` are open and no payload crossed TCP on them, either
    /// way (`ss -ti` counts only TCP bytes): they were spliced from the first byte.
    fn assert_spliced_server(&self, pod: usize, port: u16) {
        let sport = format!("= :{port}");
        let out =
            self.node.pods[pod].exec(&["ss", "-tin", "state", "established", "sport", &sport]);
        let ss = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && ss.contains(&format!(":{port}")),
            "upstream connection open: {ss}"
        );
        assert!(
            !ss.contains("bytes_received") && !ss.contains("bytes_acked"),
            "the server received and sent through the splice, not TCP: {ss}"
        );
    }

    /// Connect from the client pod to `to` and read until the server closes.
    fn read_from_client(&self, to: SocketAddr) -> String {
        use std::io::Read;
        let mut c = self.node.pods[self.client]
            .connect(to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect {to} from the client pod: {e}"));
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    pub(super) fn vip(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.node.vip(host).into(), port)
    }
}

pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

fn bpftool_mentions_ours() -> Option<String> {
    let mut found = String::new();
    for what in [["prog", "show"], ["link", "show"]] {
        let out = std::process::Command::new("bpftool")
            .args(what)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        for l in text.lines().filter(|l| {
            l.contains("np_connect") || l.contains("np_sockops") || l.contains("np_xdp")
        }) {
            found.push_str(l);
            found.push('\n');
        }
    }
    Some(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capture_split_routing_fastpath_and_cleanup() {
    if !require_root("capture_split_routing_fastpath_and_cleanup") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = std::sync::Arc::new(scene("capture").await);
    let mut proxy = s.start_proxy();
    let vip = s.vip(1, 80);

    // 80/20 through capture, with no change to the pod (it just connects to the VIP).
    let s2 = s.clone();
    let bodies = blocking(move || {
        (0..400)
            .map(|_| {
                s2.node.pods[s2.client]
                    .http_get(vip, "/", &[])
                    .expect("request through capture")
            })
            .collect::<Vec<_>>()
    })
    .await;
    assert!(bodies.iter().all(|(st, _)| *st == 200));
    let v2 = bodies.iter().filter(|(_, b)| b == "v2").count() as f64;
    let sd = (400.0f64 * 0.2 * 0.8).sqrt();
    assert!((v2 - 80.0).abs() <= 3.29 * sd + 1.0, "v2 got {v2}/400");
    assert!(s.counter("redirect_proxy") >= 400);

    // curl from the pod, unmodified.
    let out = s.node.pods[s.client].exec(&[
        "curl",
        "-s",
        "-H",
        "end-user: jason",
        &format!("http://{vip}/"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "v2",
        "header routing through capture (curl: {})",
        String::from_utf8_lossy(&out.stderr)
    );
    let s2 = s.clone();
    let (st, body) = blocking(move || {
        s2.node.pods[s2.client]
            .http_get(vip, "/", &[("x-fault", "abort")])
            .unwrap()
    })
    .await;
    assert_eq!(
        (st, body.as_str()),
        (503, "fault filter abort"),
        "fault through capture"
    );

    // The TCP-only service takes the fast path: the backend sees the pod's own address and the
    // proxy never sees the connection.
    let before_redirects = s.counter("redirect_proxy");
    let s2 = s.clone();
    let db = s.vip(2, 5432);
    let seen = blocking(move || s2.read_from_client(db)).await;
    assert_eq!(
        seen,
        s.node.pods[s.client].ip.to_string(),
        "fast path: no proxy hop"
    );
    assert!(s.counter("fastpath") >= 1);
    assert_eq!(
        s.counter("redirect_proxy"),
        before_redirects,
        "the proxy's counters show no connection"
    );
    let k = s.kernel();
    assert_eq!(k["services"][db.to_string()]["mode"], "fastpath");
    assert_eq!(k["services"][vip.to_string()]["mode"], "proxy");

    // resolution NONE: captured, then forwarded to the address the client asked for.
    let before = s.counter("redirect_proxy");
    let pod_v1 = SocketAddr::new(s.node.pods[2].ip.into(), 8080);
    let s2 = s.clone();
    assert_eq!(
        blocking(move || s2.node.pods[s2.client].http_get(pod_v1, "/", &[]).unwrap()).await,
        (200, "v1".to_string())
    );
    assert_eq!(
        s.counter("redirect_proxy"),
        before + 1,
        "went through the proxy"
    );

    // A pod that is not enrolled is untouched: its connect to the VIP is not rewritten and fails.
    let s2 = s.clone();
    let not_enrolled =
        blocking(move || s2.node.pods[s2.other].connect(vip, Duration::from_secs(2))).await;
    assert!(
        not_enrolled.is_err(),
        "a non-enrolled pod's connect to a VIP must not be captured"
    );
    assert!(s.counter("not_enrolled") >= 1);

    // Enrolled at run time through the admin API: now captured.
    let other_ns = s.node.pods[s.other].path();
    let (st, body) = nodeproxy_tests::node::in_netns(&s.node.ns.path(), || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(ADMIN).unwrap();
        write!(c, "POST /enroll?netns={} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", other_ns.display()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        (out.split_whitespace().nth(1).unwrap_or("").to_string(), out)
    });
    assert_eq!(st, "200", "{body}");
    let s2 = s.clone();
    assert_eq!(
        blocking(move || s2.node.pods[s2.other]
            .http_get(vip, "/", &[("end-user", "jason")])
            .unwrap())
        .await
        .1,
        "v2"
    );

    // A config change moves new connections to the new rule.
    let yaml = config(
        &s.node,
        &s.node.pods[2].ip.to_string(),
        &s.node.pods[3].ip.to_string(),
        &s.node.pods[4].ip.to_string(),
        (0, 100),
    );
    std::fs::write(s.dir.0.join("mesh.yaml"), yaml).unwrap();
    eventually("version 2", Duration::from_secs(10), || {
        s.node
            .http_get(ADMIN, "/config_dump")
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .filter(|v| v["version"] == 2)
    });
    let s2 = s.clone();
    let after = blocking(move || {
        (0..50)
            .map(|_| s2.node.pods[s2.client].http_get(vip, "/", &[]).unwrap().1)
            .collect::<Vec<_>>()
    })
    .await;
    assert!(after.iter().all(|b| b == "v2"), "{after:?}");

    // A connection to the capture port without an original destination is refused (no relay).
    let capture: SocketAddr = format!("{}:15001", s.node.ip()).parse().unwrap();
    let s2 = s.clone();
    let (st, _) = blocking(move || {
        s2.node.pods[s2.other]
            .http_get(capture, "/", &[])
            .unwrap_or((0, String::new()))
    })
    .await;
    assert_eq!(
        st, 0,
        "direct connection to the capture port is closed without an answer"
    );

    // SIGTERM drains and exits; the programs stay attached through their pinned links, so a
    // pod's fast-path service keeps working with no proxy; `nodeproxy uninstall` removes all.
    assert!(proxy.terminate(), "proxy exits on SIGTERM");
    assert!(
        std::path::Path::new("/sys/fs/bpf/nodeproxy/links/np_connect4").exists(),
        "links stay pinned after SIGTERM"
    );
    let s2 = s.clone();
    let db = s.vip(2, 5432);
    let seen = blocking(move || {
        use std::io::Read;
        let mut c = s2.node.pods[s2.client]
            .connect(db, Duration::from_secs(2))
            .expect("fast path without a proxy");
        let mut b = String::new();
        c.read_to_string(&mut b).unwrap();
        b
    })
    .await;
    assert!(!seen.is_empty());
    let out = std::process::Command::new(nodeproxy_tests::nodeproxy_bin())
        .arg("uninstall")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/nodeproxy").exists(),
        "pins removed"
    );
    // Programs are freed a moment after their last link goes.
    for _ in 0..100 {
        if bpftool_mentions_ours().is_none_or(|l| l.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(left) = bpftool_mentions_ours() {
        assert!(
            left.is_empty(),
            "bpftool still lists our programs/links:\n{left}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xdp_guard_drops_outside_traffic_to_proxy_ports_and_denied_sources() {
    if !require_root("xdp_guard_drops_outside_traffic_to_proxy_ports_and_denied_sources") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = scene("xdp").await;
    // An "outside" namespace on the node's uplink.
    let outside = nodeproxy_tests::node::Netns::new_public(format!(
        "{}-out",
        s.node.ns.name.trim_end_matches("-node")
    ));
    let (up, peer) = (
        format!("{}u", &s.node.ns.name[..s.node.ns.name.len().min(10)]),
        format!("{}o", &s.node.ns.name[..s.node.ns.name.len().min(10)]),
    );
    let ip = nodeproxy_tests::node::ip;
    ip(&["link", "add", &up, "type", "veth", "peer", "name", &peer]);
    ip(&["link", "set", &up, "netns", &s.node.ns.name]);
    ip(&["link", "set", &peer, "netns", &outside.name]);
    ip(&[
        "-n",
        &s.node.ns.name,
        "addr",
        "add",
        "192.168.250.1/29",
        "dev",
        &up,
    ]);
    ip(&["-n", &s.node.ns.name, "link", "set", &up, "up"]);
    ip(&[
        "-n",
        &outside.name,
        "addr",
        "add",
        "192.168.250.2/29",
        "dev",
        &peer,
    ]);
    ip(&[
        "-n",
        &outside.name,
        "addr",
        "add",
        "192.168.250.3/29",
        "dev",
        &peer,
    ]);
    ip(&["-n", &outside.name, "link", "set", &peer, "up"]);
    let node_net = format!(
        "10.{}.0/24",
        s.node.ip().octets()[1..3]
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join(".")
    );
    ip(&[
        "-n",
        &outside.name,
        "route",
        "add",
        &node_net,
        "via",
        "192.168.250.1",
    ]);
    // Something allowed to be reached from outside: a plain listener in the node.
    let open = nodeproxy_tests::node::in_netns(&s.node.ns.path(), || {
        std::net::TcpListener::bind("192.168.250.1:9999").unwrap()
    });
    std::thread::spawn(move || for _c in open.incoming() {});
    let capture = format!("{}:15001", s.node.ip());
    let _proxy = s.start_proxy_with(&["--uplink", &up, "--deny-cidr", "192.168.250.3/32"]);
    let connect_from = |src: &'static str, to: String| {
        nodeproxy_tests::node::in_netns(&outside.path(), move || {
            let sock = socket_from(src);
            sock.connect_timeout(
                &to.parse::<SocketAddr>().unwrap().into(),
                Duration::from_millis(700),
            )
            .is_ok()
        })
    };
    assert!(
        connect_from("192.168.250.2", "192.168.250.1:9999".into()),
        "other ports stay reachable"
    );
    assert!(
        !connect_from("192.168.250.2", capture.clone()),
        "the capture port is dropped at the uplink"
    );
    assert!(
        !connect_from("192.168.250.3", "192.168.250.1:9999".into()),
        "denied source CIDR is dropped"
    );
    assert!(s.counter("xdp_drop_port") >= 1);
    assert!(s.counter("xdp_drop_cidr") >= 1);
    assert!(s.counter("xdp_pass") >= 1);
    let k = s.kernel();
    assert!(
        k["attached"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains("np_xdp_guard"))
    );
    // What the guard cannot read a port from is dropped, not passed (raw packets, as an
    // attacker writes them): a later IPv4 fragment of a TCP segment, a first fragment cut off
    // inside the TCP header (ports still readable: checked), and an IPv6 segment behind an
    // extension header.
    let node_ip = s.node.ip();
    let (frag, port, bad) = (
        s.counter("xdp_drop_frag"),
        s.counter("xdp_drop_port"),
        s.counter("xdp_drop_malformed"),
    );
    nodeproxy_tests::node::in_netns(&outside.path(), || {
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(255)),
        )
        .expect("raw socket");
        let to: SocketAddr = SocketAddr::new(node_ip.into(), 0);
        let ipv4 = |frag_off: u16, payload: &[u8]| {
            let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34];
            p.extend_from_slice(&frag_off.to_be_bytes());
            p.extend_from_slice(&[64, 6, 0, 0, 192, 168, 250, 2]);
            p.extend_from_slice(&node_ip.octets());
            p.extend_from_slice(payload);
            p
        };
        // Offset 8 bytes, no port in it.
        raw.send_to(&ipv4(0x0001, &[0u8; 24]), &to.into()).unwrap();
        // First fragment (more fragments), 8 bytes of TCP header: ports 12345 → 15001.
        let mut tcp8 = 12345u16.to_be_bytes().to_vec();
        tcp8.extend_from_slice(&15001u16.to_be_bytes());
        tcp8.extend_from_slice(&[0, 0, 0, 1]);
        raw.send_to(&ipv4(0x2000, &tcp8), &to.into()).unwrap();
        // Cut off before the ports: 2 bytes of TCP.
        raw.send_to(&ipv4(0x2000, &[0x30, 0x39]), &to.into())
            .unwrap();
    });
    ip(&[
        "-n",
        &s.node.ns.name,
        "addr",
        "add",
        "fd99::1/64",
        "dev",
        &up,
        "nodad",
    ]);
    ip(&[
        "-n",
        &outside.name,
        "addr",
        "add",
        "fd99::2/64",
        "dev",
        &peer,
        "nodad",
    ]);
    nodeproxy_tests::node::in_netns(&outside.path(), || {
        // Destination options (nexthdr 60, 8 bytes of padding), then a TCP SYN to 15001.
        let raw = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(60)),
        )
        .expect("raw IPv6 socket");
        let mut p = vec![6, 0, 1, 4, 0, 0, 0, 0];
        p.extend_from_slice(&12345u16.to_be_bytes());
        p.extend_from_slice(&15001u16.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        let to: SocketAddr = "[fd99::1]:0".parse().unwrap();
        raw.send_to(&p, &to.into()).unwrap();
    });
    // A VLAN-tagged SYN to the capture port (802.1Q, id 100), as a raw Ethernet frame on
    // the outside link: parsed through the tag.
    let mac = |ns: &str, dev: &str| -> [u8; 6] {
        let out = std::process::Command::new("ip")
            .args(["-n", ns, "-j", "link", "show", dev])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let text = v[0]["address"].as_str().unwrap().to_string();
        let b: Vec<u8> = text
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        b.try_into().unwrap()
    };
    let (dst_mac, src_mac) = (mac(&s.node.ns.name, &up), mac(&outside.name, &peer));
    let mut frame = dst_mac.to_vec();
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x81, 0x00, 0x00, 100, 0x08, 0x00]);
    frame.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 192, 168, 250, 2]);
    frame.extend_from_slice(&node_ip.octets());
    frame.extend_from_slice(&12345u16.to_be_bytes());
    frame.extend_from_slice(&15001u16.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    let ifname = peer.clone();
    nodeproxy_tests::node::in_netns(&outside.path(), move || send_frame(&ifname, &frame));
    eventually(
        "fragments and extension headers counted",
        Duration::from_secs(5),
        || {
            (s.counter("xdp_drop_frag") > frag
                && s.counter("xdp_drop_port") >= port + 3
                && s.counter("xdp_drop_malformed") > bad)
                .then_some(())
        },
    );
}

/// HTTP/1.1 server for `sockmap_splice_carries_captured_traffic`: GET /N sends N bytes, POST
/// answers the number of body bytes it read. Argument: the address to listen on (port 8081).
const BULK_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        n = int(self.path.strip("/") or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk = b"x" * 65536
        while n > 0:
            k = min(n, len(chunk))
            self.wfile.write(chunk[:k])
            n -= k
    def do_POST(self):
        n, got = int(self.headers["Content-Length"]), 0
        while got < n:
            b = self.rfile.read(min(65536, n - got))
            if not b:
                break
            got += len(b)
        body = str(got).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], 8081), H).serve_forever()
"#;

/// 200 requests from the client pod to `to` with Host `host` go through the proxy and split
/// 80/20 between v1 and v2 (within 3.29 standard deviations), and `end-user: jason` goes to v2.
async fn split_and_header_route(s: &std::sync::Arc<Scene>, to: SocketAddr, host: &'static str) {
    let before = s.counter("redirect_proxy");
    let s2 = s.clone();
    let bodies = blocking(move || {
        (0..200)
            .map(|_| {
                s2.node.pods[s2.client]
                    .http_get(to, "/", &[("host", host)])
                    .unwrap_or_else(|e| panic!("request to {to}: {e}"))
            })
            .collect::<Vec<_>>()
    })
    .await;
    assert!(bodies.iter().all(|(st, _)| *st == 200), "{bodies:?}");
    let v2 = bodies.iter().filter(|(_, b)| b == "v2").count() as f64;
    let sd = (200.0f64 * 0.2 * 0.8).sqrt();
    assert!((v2 - 40.0).abs() <= 3.29 * sd + 1.0, "v2 got {v2}/200");
    assert!(
        s.counter("redirect_proxy") >= before + 200,
        "through the proxy"
    );
    // An L7 rule applies: the header route.
    let s2 = s.clone();
    let (_, body) = blocking(move || {
        s2.node.pods[s2.client]
            .http_get(to, "/", &[("host", host), ("end-user", "jason")])
            .unwrap()
    })
    .await;
    assert_eq!(body, "v2");
}

/// The `ratings6` ServiceEntry: HTTP on port 80 at IPv6 address `vip`, with `endpoints`
/// (YAML after `endpoints:`).
fn ratings6(vip: std::net::Ipv6Addr, endpoints: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings6}}
spec:
  hosts: [ratings6.default.svc.cluster.local]
  addresses: [\"{vip}\"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints: {endpoints}
"
    )
}

/// Send one raw Ethernet frame on `ifname` (AF_PACKET).
#[allow(unsafe_code)]
fn send_frame(ifname: &str, frame: &[u8]) {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: plain system calls on a socket this function owns and closes; `addr` is a fully
    // initialised sockaddr_ll passed with its size; `frame` outlives the call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(n, frame.len() as isize, "send frame: {err}");
    }
}

fn socket_from(src: &str) -> socket2::Socket {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{src}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sockmap_splice_carries_captured_traffic() {
    if !require_root("sockmap_splice_carries_captured_traffic") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = std::sync::Arc::new(scene("sockmap").await);
    // Connection limits keep `db` (a server-first TCP protocol: the echo pod writes at once)
    // off the kernel fast path, so it goes through the proxy.
    let cfg = s.dir.0.join("mesh.yaml");
    let mut yaml = std::fs::read_to_string(&cfg).unwrap();
    yaml.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: db}\nspec:\n  host: db.default.svc.cluster.local\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 100}}}\n",
    );
    // `bulk`: a server in the (not enrolled) `other` pod that sends and receives large bodies,
    // for back-pressure through both spliced legs.
    let other_ip = s.node.pods[s.other].ip;
    let bulk_vip = s.node.vip(3);
    yaml.push_str(&format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: bulk}}\nspec:\n  hosts: [bulk.default.svc.cluster.local]\n  addresses: [{bulk_vip}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8081}}]\n  endpoints: [{{address: {other_ip}}}]\n"
    ));
    std::fs::write(&cfg, yaml).unwrap();
    let _bulk = nodeproxy_tests::ChildGuard(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", s.node.pods[s.other].path().display()))
            .args(["python3", "-c", BULK_SERVER, &other_ip.to_string()])
            .spawn()
            .expect("python3"),
    );
    let _proxy = s.start_proxy_with(&["--sockmap"]);
    let vip = s.vip(1, 80);
    let s2 = s.clone();
    let bodies = blocking(move || {
        (0..50)
            .map(|_| {
                s2.node.pods[s2.client]
                    .http_get(vip, "/", &[("end-user", "jason")])
                    .expect("request")
            })
            .collect::<Vec<_>>()
    })
    .await;
    assert!(
        bodies.iter().all(|(st, b)| *st == 200 && b == "v2"),
        "{bodies:?}"
    );
    assert!(
        s.counter("sockmap_add") >= 100,
        "both ends of each captured connection are in the sockhash"
    );
    assert!(
        s.counter("sockmap_redirect") >= 50,
        "sends were spliced: {}",
        s.counter("sockmap_redirect")
    );
    // The upstream leg: the backend pod is on this node, so its accepted socket joined the
    // splice at ESTABLISHED and the proxy added its end before the first request. Its requests
    // then never travelled TCP: the backend's sockets received no payload segment.
    assert!(
        s.counter("sockmap_upstream") >= 1,
        "the backend's end of an upstream connection joined the splice"
    );
    s.assert_spliced_server(s.v2, 8080);
    // A server-first protocol is never spliced on the upstream leg: the echo pod's end joins
    // the sockhash (it cannot know the protocol), the proxy does not add its own, and what the
    // server sends at once still arrives whole, by TCP.
    let before = s.counter("sockmap_upstream");
    let db = s.vip(2, 5432);
    let s2 = s.clone();
    let greetings =
        blocking(move || (0..5).map(|_| s2.read_from_client(db)).collect::<Vec<_>>()).await;
    // Through both spliced legs (the client pod's socket and the proxy's, the proxy's upstream
    // and the bulk server's), 32 MiB down and 6 MiB up (the proxy buffers request bodies up to
    // 8 MiB), far beyond the socket buffers: every byte arrives.
    const BULK: usize = 32 << 20;
    const UP: usize = 6 << 20;
    let url = format!("http://{bulk_vip}/{BULK}");
    let client = &s.node.pods[s.client];
    let down = client.exec(&[
        "curl",
        "-sS",
        "-m",
        "60",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{http_code}",
        &url,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&down.stdout),
        format!("{BULK} 200"),
        "download: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    let up = client.exec(&[
        "sh",
        "-c",
        &format!("head -c {UP} /dev/zero | curl -sS -m 60 --data-binary @- -H 'Content-Type: application/octet-stream' {url}"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&up.stdout),
        UP.to_string(),
        "upload (the server answers the byte count it read): {}",
        String::from_utf8_lossy(&up.stderr)
    );
    s.assert_spliced_server(s.other, 8081);
    let node_ip = s.node.ip().to_string();
    assert!(
        greetings.iter().all(|g| *g == node_ip),
        "the echo pod saw the proxy (the node address) each time: {greetings:?}"
    );
    assert!(
        s.counter("sockmap_upstream") >= before + 5,
        "the echo pod's ends joined the sockhash"
    );
}

/// SSRF: a service whose endpoint is the node's loopback (here the proxy's own admin API) is
/// refused for captured traffic before any connection is made: 503 UF, counted; the admin
/// API's log level (a mutating call through it) does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_pointing_at_the_nodes_loopback_is_refused_for_pods() {
    if !require_root("a_service_pointing_at_the_nodes_loopback_is_refused_for_pods") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = std::sync::Arc::new(scene("ssrf").await);
    let admin_vip = s.node.vip(3);
    let mut yaml = std::fs::read_to_string(s.dir.0.join("mesh.yaml")).unwrap();
    yaml.push_str(&format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: sneaky}}
spec:
  hosts: [sneaky.default.svc.cluster.local]
  addresses: [{admin_vip}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 15000}}]
  endpoints: [{{address: 127.0.0.1}}]
"
    ));
    std::fs::write(s.dir.0.join("mesh.yaml"), yaml).unwrap();
    let _proxy = s.start_proxy();
    let target = std::net::SocketAddr::new(admin_vip.into(), 80);
    let s2 = s.clone();
    let (status, body) = blocking(move || {
        s2.node.pods[s2.client]
            .http_get(target, "/config_dump", &[])
            .expect("an answer")
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("refused"), "{body}");
    assert!(!body.contains("snapshot"), "no config dump leaked: {body}");
    let (_, metrics) = s.node.http_get(ADMIN, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nodeproxy_upstream_refused_total ") && !l.ends_with(" 0")),
        "counted"
    );
}

/// A dual-stack socket connecting to `::ffff:<VIP>` (only connect6 runs) is captured and split
/// like an IPv4 connect, and the L4 fast path balances it too; before, the IPv6 key missed the
/// IPv4 service and the connection escaped capture and every L7 rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_v4_mapped_connect_from_a_dual_stack_socket_is_captured() {
    if !require_root("a_v4_mapped_connect_from_a_dual_stack_socket_is_captured") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = std::sync::Arc::new(scene("mapped").await);
    let _proxy = s.start_proxy();
    let mapped = |host: u8, port: u16| {
        std::net::SocketAddr::new(s.node.vip(host).to_ipv6_mapped().into(), port)
    };
    let vip = mapped(1, 80);
    split_and_header_route(&s, vip, "reviews.default.svc.cluster.local").await;
    // The fast path: the TCP service's backend sees the pod itself.
    let s2 = s.clone();
    let db = mapped(2, 5432);
    let seen = blocking(move || s2.read_from_client(db)).await;
    assert_eq!(seen, s.node.pods[s.client].ip.to_string());
}

/// An IPv6 service address that needs the proxy, with a capture listener of IPv4 only: the
/// pod's connect is refused (EPERM, counted), never let through to the address itself, where
/// a listener in the pod stands for whatever would answer there without the mesh's rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ipv6_service_without_an_ipv6_capture_address_fails_closed() {
    if !require_root("an_ipv6_service_without_an_ipv6_capture_address_fails_closed") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = std::sync::Arc::new(scene("v6closed").await);
    let v6: std::net::Ipv6Addr = "fd00:6e70::1".parse().unwrap();
    let cfg = s.dir.0.join("mesh.yaml");
    let mut yaml = std::fs::read_to_string(&cfg).unwrap();
    yaml.push_str(&ratings6(
        v6,
        &format!("[{{address: {}}}]", s.node.pods[s.v2].ip),
    ));
    yaml.push_str(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings6}
spec:
  hosts: [ratings6.default.svc.cluster.local]
  http:
  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: ratings6.default.svc.cluster.local}}]
",
    );
    std::fs::write(&cfg, yaml).unwrap();
    // Whatever answers at the service address without the mesh: here, a listener in the pod.
    let pod = &s.node.pods[s.client];
    let out = pod.exec(&["ip", "-6", "addr", "add", &format!("{v6}/128"), "dev", "lo"]);
    assert!(out.status.success(), "{out:?}");
    pod.exec(&["ip", "link", "set", "lo", "up"]);
    let addr = std::net::SocketAddr::new(v6.into(), 80);
    let _escape = nodeproxy_tests::node::in_netns(&pod.path(), || {
        std::net::TcpListener::bind(addr).expect("listen on the v6 service address")
    });
    let _proxy = s.start_proxy();
    let before = s.counter("no_capture_addr");
    let ns = pod.path();
    let r = blocking(move || {
        nodeproxy_tests::node::in_netns(&ns, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
    })
    .await;
    let e = r.expect_err("the connect must not reach the service address");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    assert!(s.counter("no_capture_addr") > before);
}

/// IPv6 end to end: with a capture address per family, a pod's connect to an IPv6 service
/// address is captured and routed by the proxy (weighted split and a header route), and an
/// IPv6 TCP service is balanced in the kernel to an IPv6 endpoint that sees the pod itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ipv6_service_is_captured_split_and_fast_pathed() {
    if !require_root("an_ipv6_service_is_captured_split_and_fast_pathed") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = std::sync::Arc::new(scene("v6").await);
    let (vip, db) = (s.node.vip6(1), s.node.vip6(2));
    let echo = &s.node.pods[s.node.pods.len() - 1];
    // The TCP echo answers on the pod's IPv6 address too.
    let l6 = nodeproxy_tests::node::in_netns(&echo.path(), || {
        std::net::TcpListener::bind(SocketAddr::new(echo.ip6.into(), 9000))
    })
    .expect("listen on the pod's IPv6 address");
    l6.set_nonblocking(true).unwrap();
    let l6 = tokio::net::TcpListener::from_std(l6).unwrap();
    let _echo6 = tokio::spawn(async move {
        while let Ok((mut c, peer)) = l6.accept().await {
            let _ = c.write_all(peer.ip().to_string().as_bytes()).await;
            let _ = c.shutdown().await;
        }
    });
    let cfg = s.dir.0.join("mesh.yaml");
    let mut yaml = std::fs::read_to_string(&cfg).unwrap();
    yaml.push_str(&ratings6(
        vip,
        &format!(
            "\n  - {{address: {}, labels: {{version: v1}}}}\n  - {{address: {}, labels: {{version: v2}}}}",
            s.node.pods[s.node.pods.len() - 3].ip,
            s.node.pods[s.v2].ip
        ),
    ));
    yaml.push_str(&format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings6}}
spec:
  host: ratings6.default.svc.cluster.local
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings6}}
spec:
  hosts: [ratings6.default.svc.cluster.local]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: ratings6.default.svc.cluster.local, subset: v2}}}}]
  - route:
    - {{destination: {{host: ratings6.default.svc.cluster.local, subset: v1}}, weight: 80}}
    - {{destination: {{host: ratings6.default.svc.cluster.local, subset: v2}}, weight: 20}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db6}}
spec:
  hosts: [db6.default.svc.cluster.local]
  addresses: [\"{db}\"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 5432, name: tcp, protocol: TCP, targetPort: 9000}}]
  endpoints: [{{address: \"{e6}\"}}]
",
        e6 = echo.ip6,
    ));
    std::fs::write(&cfg, yaml).unwrap();
    let capture6 = format!("[{}]:15001", s.node.ip6());
    let _proxy = s.start_proxy_with(&["--capture-listen", &capture6]);
    let to = SocketAddr::new(vip.into(), 80);
    split_and_header_route(&s, to, "ratings6.default.svc.cluster.local").await;
    // The fast path: the IPv6 endpoint sees the pod's own IPv6 address.
    let before = s.counter("fastpath");
    let s2 = s.clone();
    let seen = blocking(move || s2.read_from_client(SocketAddr::new(db.into(), 5432))).await;
    assert_eq!(seen, s.node.pods[s.client].ip6.to_string());
    assert!(s.counter("fastpath") > before);
}
