//! Run nodeproxy in process on a test-unique loopback /24, with a scenario from `config/`
//! rewritten to that network, and send requests through it.

#[cfg(feature = "in-process")]
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The service port used in tests (the scenarios' port 80 needs root; any port works on a
/// test-unique address).
pub const SERVICE_PORT: u16 = 10080;

/// A loopback /24 no other test in this process uses: `127.<pid-derived>.<counter>.0/24`.
pub fn unique_net() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("127.{}.{}.", 100 + std::process::id() % 150, n % 250)
}

/// A scenario file rewritten onto a unique network.
pub struct Scenario {
    /// Network prefix, e.g. `127.123.4.` (append the host part).
    pub net: String,
    /// The YAML.
    pub yaml: String,
    /// Where it is written (watched by the proxy).
    pub path: PathBuf,
    _dir: TempDir,
}

impl Scenario {
    /// Load `config/<file>`, move its `127.0.X.` addresses to a unique /24 and port 80 to
    /// [`SERVICE_PORT`].
    pub fn from_config(file: &str) -> Scenario {
        let text = std::fs::read_to_string(crate::repo_path(&format!("config/{file}")))
            .expect("read scenario");
        let net = unique_net();
        let re_from = scenario_net(&text);
        let yaml = text
            .replace(&re_from, &net)
            .replace("number: 80,", &format!("number: {SERVICE_PORT},"));
        Scenario::from_yaml_on(yaml, net)
    }

    /// A scenario from YAML already using `net`.
    pub fn from_yaml_on(yaml: String, net: String) -> Scenario {
        let dir = TempDir::new();
        let path = dir.0.join("config.yaml");
        std::fs::write(&path, &yaml).expect("write config");
        Scenario {
            net,
            yaml,
            path,
            _dir: dir,
        }
    }

    /// `net` + host part.
    pub fn ip(&self, host: u8) -> String {
        format!("{}{host}", self.net)
    }

    /// The service address `net.1:SERVICE_PORT`.
    pub fn vip(&self) -> String {
        format!("{}:{SERVICE_PORT}", self.ip(1))
    }

    /// Replace the YAML (the proxy's watch picks it up).
    pub fn rewrite(&mut self, yaml: String) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, &yaml).expect("write");
        std::fs::rename(&tmp, &self.path).expect("rename");
        self.yaml = yaml;
    }
}

fn scenario_net(text: &str) -> String {
    // The first `127.0.X.` with X != 0 (comments may mention 127.0.0.1).
    text.match_indices("127.0.")
        .filter_map(|(i, _)| {
            let rest = &text[i + 6..];
            let octet = &rest[..rest.find('.')?];
            (octet != "0" && octet.bytes().all(|b| b.is_ascii_digit()))
                .then(|| format!("127.0.{octet}."))
        })
        .next()
        .expect("scenario has a 127.0.X. network")
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Create one.
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "nodeproxy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(feature = "in-process")]
/// Start nodeproxy in process on the scenario.
pub async fn start(s: &Scenario, gateway_ip: Option<&str>) -> nodeproxy::app::Running {
    start_with(s, gateway_ip, s.path.parent().expect("dir").to_path_buf()).await
}

#[cfg(feature = "in-process")]
/// Start with a credentials directory for Gateway TLS.
pub async fn start_with(
    s: &Scenario,
    gateway_ip: Option<&str>,
    credentials_dir: PathBuf,
) -> nodeproxy::app::Running {
    start_custom(s, gateway_ip, credentials_dir, |_| {}).await
}

#[cfg(feature = "in-process")]
/// Start with options adjusted by `f`.
pub async fn start_custom(
    s: &Scenario,
    gateway_ip: Option<&str>,
    credentials_dir: PathBuf,
    f: impl FnOnce(&mut nodeproxy::app::Options),
) -> nodeproxy::app::Running {
    let mut opts = nodeproxy::app::Options {
        config: vec![s.path.clone()],
        admin: "127.0.0.1:0".parse().unwrap(),
        gateway_ip: gateway_ip.unwrap_or("127.0.0.1").parse::<IpAddr>().unwrap(),
        shadow_host_suffix: false,
        credentials_dir,
        admin_public: false,
        log: None,
        capture: None,
        locality: None,
        workers: 2,
        cpu_plan: None,
        kubernetes: None,
        timeouts: Default::default(),
        allow_upstream: Vec::new(),
        cluster_domain: Default::default(),
        max_connections: None,
        takeover: false,
        uninstall_on_exit: false,
    };
    f(&mut opts);
    let running = nodeproxy::app::start(opts).await.expect("proxy starts");
    // Wait until the first listener accepts.
    let snap = running.publisher.load();
    if let Some(l) = snap.listeners.iter().find(|l| l.address.is_some()) {
        let a = SocketAddr::new(l.address.unwrap(), l.port);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(a).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    running
}

#[cfg(feature = "in-process")]
/// Wait until the data plane has applied snapshot `version`. Publication alone is not enough:
/// the primary runtime installs a published snapshot a moment later.
pub async fn applied(p: &nodeproxy::app::Running, version: u64) {
    for _ in 0..1000 {
        if p.shared.applied_version() >= version {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("snapshot {version} not applied within 10 s");
}

/// An HTTP client (keep-alive pool).
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A collected response.
pub struct Resp {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: String,
}

impl Resp {
    /// A header's value or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Send `req` and collect the answer.
pub async fn send(c: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Resp {
    let r: Response<_> = tokio::time::timeout(Duration::from_secs(30), c.request(req))
        .await
        .expect("response in time")
        .expect("request sent");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = String::from_utf8_lossy(
        &r.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default(),
    )
    .into_owned();
    Resp {
        status,
        headers,
        body,
    }
}

/// GET `http://addr/path` with extra headers.
pub async fn get(
    c: &Client<HttpConnector, Full<Bytes>>,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let mut b = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(c, b.body(Full::new(Bytes::new())).unwrap()).await
}
