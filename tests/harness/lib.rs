//! Test harness for nodeproxy's integration suites: find (or build) the binary, run it,
//! wait for conditions, and clean up processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A path relative to the repository root.
pub fn repo_path(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

/// The `nodeproxy` binary: `$NODEPROXY_BIN`, else built once with `cargo build` (a no-op when
/// `cargo test --workspace` already built it; it keeps a stale binary from being tested when
/// only this package's tests are run).
pub fn nodeproxy_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("NODEPROXY_BIN") {
            return PathBuf::from(p);
        }
        // Without the variables `cargo test` set for this process (`xtask::clean_env`).
        // `--workspace --bins`, not `-p nodeproxy`: the same feature resolution as the
        // workspace's other builds, so the two never rebuild each other's dependencies.
        let status = xtask::cargo()
            .args(["build", "--quiet", "--workspace", "--bins"])
            .current_dir(repo_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of nodeproxy failed");
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>/nodeproxy
        exe.parent()
            .and_then(|deps| deps.parent())
            .map(|d| d.join("nodeproxy"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| repo_path("target/debug/nodeproxy"))
    })
}

/// Run `nodeproxy ARGS` from the repository root and collect its output.
pub fn nodeproxy(args: &[&str]) -> Output {
    Command::new(nodeproxy_bin())
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run nodeproxy")
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `nodeproxy ARGS` in the background (stderr inherited for debugging failures).
pub fn spawn_nodeproxy(args: &[&str]) -> ChildGuard {
    let child = Command::new(nodeproxy_bin())
        .args(args)
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn nodeproxy");
    ChildGuard(child)
}

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A blocking HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A raw HTTP/1.1 answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RawReply {
    /// Status code.
    pub status: u16,
    /// Status line and headers, as received.
    pub head: String,
    /// Body.
    pub body: String,
}

/// GET `path` with Host `host` on `dst`, from source address `src` when given (its port
/// picked by the kernel); None when refused or closed without an answer.
pub async fn get_from(src: Option<&str>, dst: &str, host: &str, path: &str) -> Option<RawReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    if let Some(src) = src {
        sock.bind(format!("{src}:0").parse().ok()?).ok()?;
    }
    let mut s = sock.connect(dst.parse().ok()?).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some(RawReply {
        status: head.split_whitespace().nth(1)?.parse().ok()?,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}

pub mod apiserver;
pub mod backend;
pub mod node;
pub mod proxy;
pub mod tls;

/// Poll an async `f` until it returns `Some`, or panic after `timeout`.
pub async fn eventually_async<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
