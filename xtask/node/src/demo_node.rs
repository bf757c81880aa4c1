//! The root demo: a throw-away node of network namespaces (client pod, v1 and v2 pods), nodeproxy
//! with the canary config capturing the client pod with eBPF, live traffic from the pod, the
//! split and the kernel counters. All namespaces and processes are removed at the end.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::node::Node;

const ADMIN: &str = "127.0.0.1:15000";

/// Run it (as root).
pub fn run(root: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!("== 1. a node of network namespaces: client pod, reviews-v1 pod, reviews-v2 pod");
        let mut node = Node::new("demo");
        let client = node.add_pod("client");
        let v1 = node.add_pod("v1");
        let v2 = node.add_pod("v2");
        let _b1 = Backend::from_std(node.pods[v1].listen(8080), "v1");
        let _b2 = Backend::from_std(node.pods[v2].listen(8080), "v2");
        let vip = node.vip(1);
        let canary = std::fs::read_to_string(root.join("config/canary.yaml"))?
            .replace("127.0.10.11", &node.pods[v1].ip.to_string())
            .replace("127.0.10.12", &node.pods[v2].ip.to_string())
            .replace("127.0.10.1]", &format!("{vip}]"));
        let dir = nodeproxy_tests::proxy::TempDir::new();
        let cfg = dir.0.join("canary.yaml");
        std::fs::write(&cfg, canary)?;
        println!("   service reviews.canary at {vip}:80 (a virtual address: nothing listens there)");

        println!("== 2. nodeproxy run --capture ebpf --enroll-netns <client pod>  (config/canary.yaml: 80% v1, 20% v2)");
        let capture = format!("{}:15001", node.ip());
        let client_ns = node.pods[client].path();
        let _proxy = node.spawn_proxy(&[
            "run", "--capture", "ebpf", "--capture-listen", &capture, "--admin", ADMIN, "--config", cfg.to_str().context("path")?,
            "--enroll-netns", client_ns.to_str().context("path")?, "--access-log", "off",
        ]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.http_get(ADMIN, "/ready").is_none_or(|(s, _)| s != 200) {
            if Instant::now() > deadline {
                bail!("nodeproxy did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        println!("== 3. from inside the client pod: 1000 x GET http://{vip}/  (the pod is not changed in any way)");
        let target = SocketAddr::new(vip.into(), 80);
        let (mut n1, mut n2, mut errors) = (0, 0, 0);
        for i in 1..=1000 {
            match node.pods[client].http_get(target, "/", &[]) {
                Ok((200, b)) if b == "v1" => n1 += 1,
                Ok((200, b)) if b == "v2" => n2 += 1,
                _ => errors += 1,
            }
            if i % 250 == 0 {
                println!("   after {i:>4}: v1 {n1:>4} ({:>5.1}%)  v2 {n2:>4} ({:>5.1}%)  errors {errors}", 100.0 * n1 as f64 / i as f64, 100.0 * n2 as f64 / i as f64);
            }
        }
        println!("\n== 4. kernel counters (GET /kernel)");
        if let Some((_, body)) = node.http_get(ADMIN, "/kernel") {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            for (k, c) in v["counters"].as_object().into_iter().flatten() {
                if c.as_u64().unwrap_or(0) > 0 {
                    println!("   {k:<22} {c}");
                }
            }
            for a in v["attached"].as_array().into_iter().flatten() {
                println!("   attached: {}", a.as_str().unwrap_or(""));
            }
        }
        println!("\n== 5. tearing the node down");
        if errors > 0 {
            bail!("{errors} requests failed");
        }
        anyhow::Ok(())
    })
}
