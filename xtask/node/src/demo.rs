//! `cargo xtask demo`: nodeproxy working on one machine with the tutorials' canary YAML.
//! Builds the binary, starts two tiny backends (v1, v2) on loopback, runs nodeproxy with
//! `config/canary.yaml` (service port moved to 10080 so no privileges are needed), sends
//! traffic, prints the live split, then shows analysis catching the missing-DestinationRule
//! outage. Everything it starts is stopped by PID.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use xtask::{cargo, exec, repo_root};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A backend answering `name` to every request, on its own thread.
fn backend(addr: &str, name: &'static str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind demo backend {addr}"))?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s, name));
        }
    });
    Ok(())
}

fn serve(mut s: TcpStream, name: &str) {
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{name}",
                name.len()
            );
            if s.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    }
}

fn get(addr: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: reviews.canary.svc.cluster.local\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.rsplit("\r\n\r\n").next().unwrap_or("").to_string())
}

/// Run the demo: the eBPF node demo as root (through sudo when available), else on loopback.
pub fn run() -> anyhow::Result<()> {
    // The workspace's feature resolution, as the tests build it: neither rebuilds the other's.
    exec(cargo().args(["build", "--quiet", "--workspace", "--bins"]))?;
    let root = repo_root();
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if is_root {
        return crate::demo_node::run(&root);
    }
    if Command::new("sudo")
        .arg("-n")
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
    {
        let exe = std::env::current_exe()?;
        return exec(
            Command::new("sudo")
                .arg("-E")
                .arg(exe)
                .arg("demo")
                .current_dir(&root),
        );
    }
    println!(
        "(not root and no sudo: showing the loopback demo; run as root for the eBPF node demo)\n"
    );
    let bin = root.join("target/debug/nodeproxy");
    let dir = std::env::temp_dir().join(format!("nodeproxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let canary = std::fs::read_to_string(root.join("config/canary.yaml"))?
        .replace("number: 80,", "number: 10080,");
    let cfg = dir.join("canary.yaml");
    std::fs::write(&cfg, canary)?;

    println!("== 1. two backends: v1 on 127.0.10.11:8080, v2 on 127.0.10.12:8080");
    backend("127.0.10.11:8080", "v1")?;
    backend("127.0.10.12:8080", "v2")?;

    println!("== 2. nodeproxy run --config config/canary.yaml  (VirtualService: 80% v1, 20% v2)");
    let admin = "127.0.0.1:15990";
    // The proxy logs to a file, so its lines never land between the demo's steps.
    let log = std::env::temp_dir().join(format!("nodeproxy-demo-{}.log", std::process::id()));
    let proxy = Kill(
        Command::new(&bin)
            .args(["run", "--capture", "none", "--admin", admin, "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("create the proxy log")?)
            .spawn()
            .context("start nodeproxy")?,
    );
    println!("   (proxy log: {})", log.display());
    let vip = "127.0.10.1:10080";
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(vip).is_err() {
        if Instant::now() > deadline {
            bail!("nodeproxy did not start listening on {vip}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    println!("== 3. 1000 requests to the service address {vip}");
    let (mut v1, mut v2, mut other) = (0, 0, 0);
    for i in 1..=1000 {
        match get(vip)?.as_str() {
            "v1" => v1 += 1,
            "v2" => v2 += 1,
            _ => other += 1,
        }
        if i % 250 == 0 {
            println!(
                "   after {i:>4}: v1 {v1:>4} ({:>5.1}%)  v2 {v2:>4} ({:>5.1}%)  errors {other}",
                100.0 * v1 as f64 / i as f64,
                100.0 * v2 as f64 / i as f64
            );
        }
    }

    validate_demo(&root)?;
    println!("\n== tearing down");
    drop(proxy);
    std::fs::remove_dir_all(&dir)?;
    println!("   nodeproxy stopped, its config directory removed; nothing else was changed");
    if other > 0 {
        bail!("{other} requests failed");
    }
    Ok(())
}

/// The analysis part of the demo.
pub(crate) fn validate_demo(root: &Path) -> anyhow::Result<()> {
    let bin = root.join("target/debug/nodeproxy");
    println!("\n== nodeproxy simulate: which rule would a request take?");
    exec(
        Command::new(&bin)
            .args([
                "simulate",
                "config/header-routing.yaml",
                "--host",
                "reviews.headers.svc.cluster.local",
                "-H",
                "end-user: jason",
            ])
            .current_dir(root),
    )?;
    println!("\n== nodeproxy validate: the missing-DestinationRule outage, caught before it ships");
    let status = Command::new(&bin)
        .args(["validate", "tests/fixtures/war-story.yaml"])
        .current_dir(root)
        .status()?;
    if status.success() {
        bail!("the war-story file should fail validation");
    }
    println!("(exit status {}: rejected)", status.code().unwrap_or(-1));
    Ok(())
}
