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
        // Outlives the node: the proxy's log stays readable after the teardown.
        let log = std::env::temp_dir().join(format!("nodeproxy-demo-{}.log", std::process::id()));
        let dir = nodeproxy_tests::proxy::TempDir::new();
        let cfg = dir.0.join("canary.yaml");
        std::fs::write(&cfg, canary)?;
        println!("   service reviews.canary at {vip}:80 (a virtual address: nothing listens there)");

        println!("== 2. nodeproxy run --capture ebpf --enroll-netns <client pod>  (config/canary.yaml: 80% v1, 20% v2)");
        let capture = format!("{}:15001", node.ip());
        let client_ns = node.pods[client].path();
        // The proxy logs to a file, so its lines never land between the demo's steps.
        let proxy = node.spawn_proxy_logged(&[
            "run", "--capture", "ebpf", "--capture-listen", &capture, "--admin", ADMIN, "--config", cfg.to_str().context("path")?,
            "--enroll-netns", client_ns.to_str().context("path")?, "--access-log", "off",
            // A try-out leaves nothing behind: the kernel state goes with the proxy.
            "--uninstall-on-exit",
        ], &log);
        println!("   (proxy log: {})", log.display());
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
        crate::demo::validate_demo(root)?;
        println!("\n== 5. tearing the node down");
        let names: Vec<String> = std::iter::once(node.ns.name.clone())
            .chain(node.pods.iter().map(|p| p.ns.name.clone()))
            .collect();
        drop(proxy); // SIGTERM: drain, detach the programs, remove the pins
        drop(node); // the pods' and the node's namespaces
        teardown_report(&names)?;
        if errors > 0 {
            bail!("{errors} requests failed");
        }
        anyhow::Ok(())
    })
}

/// Check that nothing the demo made is left, and say what stays.
fn teardown_report(namespaces: &[String]) -> anyhow::Result<()> {
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let listed = String::from_utf8_lossy(&netns.stdout);
    let left: Vec<&String> = namespaces
        .iter()
        .filter(|n| {
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n.as_str()))
        })
        .collect();
    if !left.is_empty() {
        bail!("network namespaces left behind: {left:?}");
    }
    println!("   network namespaces: {} removed", namespaces.len());
    let progs = std::process::Command::new("bpftool")
        .args(["prog", "show"])
        .output();
    match progs {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("np_") => {
            bail!("nodeproxy programs still loaded (bpftool prog show)")
        }
        Ok(_) => println!("   eBPF programs: none of nodeproxy's loaded (bpftool prog show)"),
        Err(_) => {
            println!("   eBPF programs: detached with the proxy (bpftool not installed to check)")
        }
    }
    let pins = Path::new(nodeproxy_tests::node::PIN_DIR);
    if pins.exists() {
        bail!("pinned maps left in {}", pins.display());
    }
    println!("   pinned maps: {} removed", pins.display());
    println!(
        "   left in place: the bpffs mount at {} (a system mount other eBPF tools share; `umount {}` if you want it gone)",
        nodeproxy_tests::node::BPFFS,
        nodeproxy_tests::node::BPFFS
    );
    Ok(())
}
