//! `cargo xtask bench`: nodeproxy side by side with HAProxy, nginx and direct, on the same
//! backend with the same load generators, interleaved repetitions, medians and spread.
//!
//! Everything binds to loopback or to the bench's own network namespaces; every run is bounded
//! in time; every process started is stopped by PID.

mod load;
mod procs;
pub mod report;
mod restart;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use self::load::LoadResult;
use self::procs::{Proc, write};
use self::report::Measurement;
use xtask::{cargo, exec, repo_root};

/// Options of `cargo xtask bench`.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// One repetition of 3-second runs (under 4 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Run only this workload (h1-keepalive, h1-newconn, h2c, latency-10k, tcp-bulk,
    /// route-scale, idle-memory, netns, restart).
    #[arg(long)]
    pub only: Option<String>,
    /// Output directory (default target/bench/<timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const WORKLOADS: [&str; 9] = [
    "h1-keepalive",
    "h1-newconn",
    "h2c",
    "latency-10k",
    "tcp-bulk",
    "route-scale",
    "idle-memory",
    "netns",
    "restart",
];

const BACKEND_V1: u16 = 18081;
const BACKEND_V2: u16 = 18082;
const BACKEND_H2: u16 = 18083;
const SINK: u16 = 18090;

/// (target, h1 addr, h2c addr, tcp addr)
const TARGETS: [(&str, &str, &str, &str); 5] = [
    (
        "direct",
        "127.0.0.1:18081",
        "127.0.0.1:18083",
        "127.0.0.1:18090",
    ),
    (
        "nodeproxy",
        "127.0.50.1:18180",
        "127.0.50.1:18180",
        "127.0.50.1:18190",
    ),
    // nodeproxy's default thread placement (no `--cpu-affinity`), keep-alive and latency only.
    (
        "nodeproxy-floating",
        "127.0.50.2:18180",
        "127.0.50.2:18180",
        "127.0.50.2:18190",
    ),
    (
        "haproxy",
        "127.0.0.1:18280",
        "127.0.0.1:18281",
        "127.0.0.1:18290",
    ),
    (
        "nginx",
        "127.0.0.1:18380",
        "127.0.0.1:18381",
        "127.0.0.1:18390",
    ),
];

struct Ctx {
    out: PathBuf,
    root: PathBuf,
    secs: u64,
    reps: usize,
    results: Vec<Measurement>,
}

impl Ctx {
    fn record(
        &mut self,
        workload: &str,
        target: &str,
        rep: usize,
        r: &LoadResult,
        proc_cpu: Option<f64>,
        rss: Option<u64>,
    ) {
        let cpu_us = proc_cpu
            .filter(|_| r.requests > 0)
            .map(|c| c * 1e6 / r.requests as f64);
        let mut extra = BTreeMap::new();
        if r.errors > 0 {
            extra.insert("errors".into(), r.errors as f64);
        }
        if let Some(m) = r.mean {
            extra.insert("mean ms".into(), m);
        }
        println!(
            "  {workload:<13} {target:<20} rep {rep}: {:>9.0} req/s  p50 {:>6}  p99 {:>6}  p99.9 {:>6}  cpu {:>6} µs/req{}",
            r.rps,
            r.p50.map(|v| format!("{v:.2}")).unwrap_or("-".into()),
            r.p99.map(|v| format!("{v:.2}")).unwrap_or("-".into()),
            r.p999.map(|v| format!("{v:.2}")).unwrap_or("-".into()),
            cpu_us.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
            if r.errors > 0 {
                format!("  ({} errors)", r.errors)
            } else {
                String::new()
            }
        );
        self.results.push(Measurement {
            workload: workload.into(),
            target: target.into(),
            rep,
            rps: r.rps,
            p50_ms: r.p50,
            p99_ms: r.p99,
            p999_ms: r.p999,
            cpu_us_per_req: cpu_us,
            rss_kib: rss,
            bytes_per_s: None,
            extra,
        });
    }
}

/// Raise the open-files limit (inherited by every process the bench starts); returns it.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = 200_000;
    // Root may raise the hard limit too (up to fs.nr_open).
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

fn nginx_module_line() -> &'static str {
    if Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists() {
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    } else {
        ""
    }
}

fn backend_conf(dir: &Path) -> String {
    format!(
        "worker_processes 1;\npid {d}/backend.pid;\nerror_log {d}/backend.err warn;\nevents {{ worker_connections 65535; }}\nhttp {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n  server {{ listen 127.0.0.1:{BACKEND_V1} reuseport backlog=4096; location / {{ return 200 \"v1\"; }} }}\n  server {{ listen 127.0.0.1:{BACKEND_V2} reuseport backlog=4096; location / {{ return 200 \"v2\"; }} }}\n  server {{ listen 127.0.0.1:{BACKEND_H2} http2; location / {{ return 200 \"v1\"; }} }}\n}}\n",
        d = dir.display()
    )
}

fn nginx_proxy_conf(dir: &Path) -> String {
    format!(
        "{m}\nworker_processes 2;\nworker_cpu_affinity auto;\npid {d}/proxy.pid;\nerror_log {d}/proxy.err warn;\nworker_rlimit_nofile 100000;\nevents {{ worker_connections 65535; }}\nhttp {{\n  access_log off;\n  keepalive_requests 100000000;\n  upstream be {{ server 127.0.0.1:{BACKEND_V1} weight=80; server 127.0.0.1:{BACKEND_V2} weight=20; keepalive 512; keepalive_requests 100000000; }}\n  server {{ listen 127.0.0.1:18380 backlog=4096; listen 127.0.0.1:18381 http2; location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\nstream {{ server {{ listen 127.0.0.1:18390; proxy_pass 127.0.0.1:{SINK}; }} }}\n",
        m = nginx_module_line(),
        d = dir.display()
    )
}

fn haproxy_conf(nofile: u64) -> String {
    // HAProxy needs about two descriptors per connection.
    let maxconn = (nofile / 2).saturating_sub(200).max(1000);
    format!(
        "global\n  maxconn {maxconn}\n  nbthread 2\n  cpu-map auto:1/1-2 0-1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\nfrontend h1\n  bind 127.0.0.1:18280\n  bind 127.0.0.1:18281 proto h2\n  default_backend be\nbackend be\n  balance roundrobin\n  server v1 127.0.0.1:{BACKEND_V1} weight 80\n  server v2 127.0.0.1:{BACKEND_V2} weight 20\nfrontend tcp\n  mode tcp\n  bind 127.0.0.1:18290\n  default_backend tcpbe\nbackend tcpbe\n  mode tcp\n  server s1 127.0.0.1:{SINK}\n"
    )
}

/// The bench's Istio config: 80/20 over the two backend ports, and a TCP service to the sink.
fn nodeproxy_conf(address: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench}}
spec:
  hosts: [bench.local]
  addresses: [{address}]
  resolution: STATIC
  location: MESH_INTERNAL
  ports: [{{number: 18180, name: http, protocol: HTTP}}, {{number: 18190, name: tcp, protocol: TCP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {BACKEND_V1}, tcp: {SINK}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {BACKEND_V2}, tcp: {SINK}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: bench}}
spec:
  host: bench.local
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench}}
spec:
  hosts: [bench.local]
  http:
  - route:
    - {{destination: {{host: bench.local, subset: v1, port: {{number: 18180}}}}, weight: 80}}
    - {{destination: {{host: bench.local, subset: v2, port: {{number: 18180}}}}, weight: 20}}
"
    )
}

fn nodeproxy_bin(root: &Path) -> PathBuf {
    root.join("target/release/nodeproxy")
}

/// Every proxy runs one thread per core, each pinned to its core (HAProxy `cpu-map`, nginx
/// `worker_cpu_affinity`, nodeproxy `--cpu-affinity auto`); `nodeproxy-floating` shows
/// nodeproxy's default, unpinned placement.
fn start_nodeproxy(
    ctx: &Ctx,
    config: &Path,
    admin: &str,
    ready: &str,
    pinned: bool,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(nodeproxy_bin(&ctx.root));
    cmd.args([
        "run",
        "--capture",
        "none",
        "--access-log",
        "off",
        "--admin",
        admin,
    ]);
    if pinned {
        cmd.args(["--cpu-affinity", "auto"]);
    }
    cmd.arg("--config").arg(config).env("RUST_LOG", "warn");
    Proc::start("nodeproxy", &mut cmd, ready)
}

/// Run the bench.
pub fn run(opts: Options) -> anyhow::Result<()> {
    if let Some(w) = &opts.only
        && !WORKLOADS.contains(&w.as_str())
    {
        bail!("unknown workload `{w}` (one of {})", WORKLOADS.join(", "));
    }
    let started = Instant::now();
    let nofile = raise_nofile();
    let root = repo_root().canonicalize()?;
    println!("building nodeproxy (release) ...");
    exec(cargo().args(["build", "--release", "--quiet", "--package", "nodeproxy"]))?;
    let stamp = Command::new("date")
        .arg("+%Y%m%d-%H%M%S")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "now".into());
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench").join(&stamp));
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let mut ctx = Ctx {
        out: out.clone(),
        root: root.clone(),
        secs: if opts.quick { 3 } else { 5 },
        reps: if opts.quick { 1 } else { 3 },
        results: Vec::new(),
    };
    let run_it = |w: &str| opts.only.as_deref().is_none_or(|o| o == w);

    // The backend every target uses.
    write(&out.join("backend.conf"), &backend_conf(&out))?;
    let _backend = Proc::start(
        "backend nginx",
        &mut nginx_cmd(&out, "backend.conf"),
        &format!("127.0.0.1:{BACKEND_V1}"),
    )?;
    load::spawn_sink(&format!("127.0.0.1:{SINK}"))?;
    write(&out.join("nodeproxy.yaml"), &nodeproxy_conf("127.0.50.1"))?;
    write(
        &out.join("nodeproxy-floating.yaml"),
        &nodeproxy_conf("127.0.50.2"),
    )?;
    write(&out.join("haproxy.cfg"), &haproxy_conf(nofile))?;
    write(&out.join("nginx-proxy.conf"), &nginx_proxy_conf(&out))?;

    let http_workloads = [
        "h1-keepalive",
        "h1-newconn",
        "h2c",
        "latency-10k",
        "tcp-bulk",
    ];
    let np = if http_workloads.iter().any(|w| run_it(w)) || run_it("idle-memory") {
        Some(start_nodeproxy(
            &ctx,
            &out.join("nodeproxy.yaml"),
            "127.0.0.1:15990",
            "127.0.50.1:18180",
            true,
        )?)
    } else {
        None
    };
    if let Some(np) = np
        .as_ref()
        .filter(|_| http_workloads.iter().any(|w| run_it(w)))
    {
        let ha = Proc::start(
            "haproxy",
            Command::new("haproxy")
                .arg("-f")
                .arg(out.join("haproxy.cfg"))
                .arg("-db"),
            "127.0.0.1:18280",
        )?;
        let ngx = Proc::start(
            "nginx",
            &mut nginx_cmd(&out, "nginx-proxy.conf"),
            "127.0.0.1:18380",
        )?;
        let floating = if run_it("h1-keepalive") || run_it("latency-10k") {
            Some(start_nodeproxy(
                &ctx,
                &out.join("nodeproxy-floating.yaml"),
                "127.0.0.1:15989",
                "127.0.50.2:18180",
                false,
            )?)
        } else {
            None
        };
        let mut procs: BTreeMap<&str, &Proc> =
            [("nodeproxy", np), ("haproxy", &ha), ("nginx", &ngx)]
                .into_iter()
                .collect();
        if let Some(f) = &floating {
            procs.insert("nodeproxy-floating", f);
        }
        if http_workloads.iter().any(|w| run_it(w)) {
            for (target, h1, _, _) in TARGETS {
                if target != "nodeproxy-floating" || floating.is_some() {
                    load::warm_up(&format!("http://{h1}/"), None)?;
                }
            }
        }
        for w in http_workloads.into_iter().filter(|w| run_it(w)) {
            println!("== {w}");
            for rep in 0..ctx.reps {
                for (target, h1, h2, tcp) in TARGETS {
                    if target == "nodeproxy-floating"
                        && !matches!(w, "h1-keepalive" | "latency-10k")
                    {
                        continue;
                    }
                    let p = procs.get(target).copied();
                    let cpu0 = p.map(|p| p.cpu_seconds());
                    let name = if w == "tcp-bulk" && target != "direct" && target != "nodeproxy" {
                        format!("{target}-l4")
                    } else {
                        target.to_string()
                    };
                    let r = match w {
                        "h1-keepalive" => {
                            load::wrk(&format!("http://{h1}/"), ctx.secs, 50, false, None)?
                        }
                        "h1-newconn" => {
                            load::wrk(&format!("http://{h1}/"), ctx.secs, 50, true, None)?
                        }
                        "h2c" => load::h2load(&format!("http://{h2}/"), ctx.secs)?,
                        "latency-10k" => load::open_loop(h1, 10_000, ctx.secs, 50)?,
                        _ => {
                            let bps = load::tcp_bulk(tcp, ctx.secs, 4)?;
                            let cpu = p.map(|p| p.cpu_seconds()).zip(cpu0).map(|(a, b)| a - b);
                            println!(
                                "  {w:<13} {name:<20} rep {rep}: {:>9.0} MB/s  cpu {:.2}s",
                                bps / 1e6,
                                cpu.unwrap_or(0.0)
                            );
                            let mut extra = BTreeMap::new();
                            if let Some(c) = cpu {
                                extra.insert(
                                    "proxy CPU s/GB".into(),
                                    c / (bps * ctx.secs as f64 / 1e9),
                                );
                            }
                            ctx.results.push(Measurement {
                                workload: w.into(),
                                target: name,
                                rep,
                                rps: 0.0,
                                p50_ms: None,
                                p99_ms: None,
                                p999_ms: None,
                                cpu_us_per_req: None,
                                rss_kib: p.map(|p| p.rss_kib()),
                                bytes_per_s: Some(bps),
                                extra,
                            });
                            continue;
                        }
                    };
                    let cpu = p.map(|p| p.cpu_seconds()).zip(cpu0).map(|(a, b)| a - b);
                    ctx.record(w, &name, rep, &r, cpu, p.map(|p| p.rss_kib()));
                }
            }
        }
    }
    if let Some(np) = &np
        && run_it("idle-memory")
    {
        idle_memory(&mut ctx, np)?;
    }
    drop(np);
    if run_it("route-scale") {
        route_scale(&mut ctx, opts.quick)?;
    }
    if run_it("netns") {
        if nix::unistd::geteuid().is_root() {
            netns_workloads(&mut ctx)?;
        } else {
            println!("== netns: skipped (needs root for network namespaces and eBPF)");
        }
    }
    if run_it("restart") {
        if nix::unistd::geteuid().is_root() {
            restart::restart(&mut ctx)?;
        } else {
            println!("== restart: skipped (needs root for eBPF)");
        }
    }

    // Results.
    let workloads: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for m in &ctx.results {
            if !v.contains(&m.workload) {
                v.push(m.workload.clone());
            }
        }
        v
    };
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&ctx.results)?,
    )?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let header = format!(
        "# nodeproxy benchmark\n\nDate: {stamp}. Machine: {} cores, {cpu}, kernel {kernel}. Command: `cargo xtask bench{}{}`.\n{} repetition(s) of {} s per target and workload, targets interleaved within each repetition, each target warmed by 1 s of untimed keep-alive load after it starts; cells are the median (min–max). Ratios: the target's median ÷ `direct`'s, and ÷ the best peer's (HAProxy or nginx). Proxy CPU is user+system time of the proxy's processes (/proc/PID/stat) over the run ÷ requests. Load: wrk -t2 -c50 (HTTP/1.1; `Connection: close` for new connections; p99.9 from wrk's histogram by a `done` script), h2load -c50 -m10 -t2 (h2c; percentiles from its per-request `--log-file`; closed loop, like wrk), an open-loop 10k req/s generator over 50 connections (latency from each request's scheduled time: no coordinated omission), 4 TCP streams for bulk. Backend: one nginx worker returning a fixed 200 on two ports (v1/v2, split 80/20 by every proxy). Every proxy runs two threads, each pinned to its own core (HAProxy `cpu-map auto:1/1-2 0-1`, nginx `worker_cpu_affinity auto`, nodeproxy `--cpu-affinity auto`); `nodeproxy-floating` is nodeproxy without pinning, its default.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if opts.quick { " --quick" } else { "" },
        opts.only
            .as_ref()
            .map(|o| format!(" --only {o}"))
            .unwrap_or_default(),
        ctx.reps,
        ctx.secs
    );
    std::fs::write(
        out.join("report.md"),
        report::markdown(&ctx.results, &header, &workloads),
    )?;
    match report::register_font() {
        Ok(()) => {
            for w in &workloads {
                if let Err(e) = report::bar_chart(&ctx.results, w, &out.join(format!("{w}.png"))) {
                    eprintln!("plot {w}: {e:#}");
                }
            }
        }
        Err(e) => eprintln!("no plots: {e:#}"),
    }
    println!(
        "\nwrote {}/results.json, report.md and *.png in {:.0}s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn idle_memory(ctx: &mut Ctx, np: &Proc) -> anyhow::Result<()> {
    println!("== idle-memory (nodeproxy)");
    let n = 10_000usize;
    std::thread::sleep(Duration::from_millis(500));
    let before = np.rss_kib();
    let mut conns = Vec::with_capacity(n);
    for chunk in 0..n / 500 {
        let batch: Vec<std::net::TcpStream> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..500)
                .map(|_| {
                    s.spawn(|| -> Option<std::net::TcpStream> {
                        use std::io::{Read, Write};
                        let mut c = std::net::TcpStream::connect("127.0.50.1:18180").ok()?;
                        c.write_all(b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n")
                            .ok()?;
                        let mut buf = [0u8; 512];
                        let _ = c.read(&mut buf).ok()?;
                        Some(c)
                    })
                })
                .collect();
            hs.into_iter()
                .filter_map(|h| h.join().ok().flatten())
                .collect()
        });
        if batch.len() < 500 {
            eprintln!("  only {} of 500 connections in batch {chunk}", batch.len());
        }
        conns.extend(batch);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = np.rss_kib();
    let per = (after.saturating_sub(before)) as f64 / conns.len().max(1) as f64;
    println!(
        "  {} idle connections: RSS {before} KiB -> {after} KiB: {per:.2} KiB per connection",
        conns.len()
    );
    let mut extra = BTreeMap::new();
    extra.insert("KiB per idle connection".into(), per);
    extra.insert("connections".into(), conns.len() as f64);
    ctx.results.push(Measurement {
        workload: "idle-memory".into(),
        target: "nodeproxy".into(),
        rep: 0,
        rps: 0.0,
        p50_ms: None,
        p99_ms: None,
        p999_ms: None,
        cpu_us_per_req: None,
        rss_kib: Some(after),
        bytes_per_s: None,
        extra,
    });
    drop(conns);
    Ok(())
}

/// N services x 10 routes: load + analyze + compile time, then req/s and p99 against the last service.
fn route_scale(ctx: &mut Ctx, quick: bool) -> anyhow::Result<()> {
    println!("== route-scale");
    let sizes: &[usize] = if quick {
        &[10, 1000]
    } else {
        &[10, 1000, 10000]
    };
    // One proxy per size, all running at once on their own address ranges (127.70/8,
    // 127.71/8, ...), measured interleaved like the other workloads: run one after another,
    // drift of the machine had read as a cost of size (a run with 1,000 services measured
    // below 10,000).
    let mut procs = Vec::new();
    for (k, &n) in sizes.iter().enumerate() {
        let net = 70 + k;
        let mut yaml = String::with_capacity(n * 900);
        for i in 0..n {
            let (a, b) = (i / 250, i % 250 + 1);
            yaml.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{i}}}\nspec:\n  hosts: [s{i}.scale.local]\n  addresses: [127.{net}.{a}.{b}]\n  resolution: STATIC\n  ports: [{{number: 18480, name: http, protocol: HTTP}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {BACKEND_V1}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: s{i}}}\nspec:\n  hosts: [s{i}.scale.local]\n  http:\n"
            ));
            for r in 0..9 {
                yaml.push_str(&format!("  - match: [{{uri: {{prefix: /r{r}/}}}}]\n    route: [{{destination: {{host: s{i}.scale.local}}}}]\n"));
            }
            yaml.push_str(&format!(
                "  - route: [{{destination: {{host: s{i}.scale.local}}}}]\n---\n"
            ));
        }
        let path = ctx.out.join(format!("scale-{n}.yaml"));
        write(&path, &yaml)?;
        // Load + analyze + compile with the release binary (`validate` runs exactly the reload
        // path up to the snapshot; the swap itself is one atomic pointer store).
        let t = Instant::now();
        let ok = Command::new(nodeproxy_bin(&ctx.root))
            .arg("validate")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .status()?
            .success();
        let compile_ms = t.elapsed().as_secs_f64() * 1000.0;
        if !ok {
            bail!("scale config with {n} services was rejected");
        }
        let last = format!("127.{net}.{}.{}:18480", (n - 1) / 250, (n - 1) % 250 + 1);
        let t = Instant::now();
        let admin = format!("127.0.0.1:{}", 15991 + k);
        let np = start_nodeproxy(ctx, &path, &admin, &last, true)?;
        let startup_ms = t.elapsed().as_secs_f64() * 1000.0;
        // A fresh process: its first repetition would also measure opening the backend
        // connections and first touching its memory.
        load::warm_up(&format!("http://{last}/"), None)?;
        println!(
            "  {n} services x 10 routes: load + analyze + compile {compile_ms:.0} ms, start to listening {startup_ms:.0} ms"
        );
        procs.push((n, last, np, compile_ms, startup_ms));
    }
    for rep in 0..ctx.reps {
        for (n, last, np, compile_ms, startup_ms) in &procs {
            let cpu0 = np.cpu_seconds();
            let r = load::wrk(&format!("http://{last}/"), ctx.secs, 50, false, None)?;
            let cpu = np.cpu_seconds() - cpu0;
            ctx.record(
                "route-scale",
                &format!("nodeproxy-{n}"),
                rep,
                &r,
                Some(cpu),
                Some(np.rss_kib()),
            );
            if let Some(m) = ctx.results.last_mut() {
                m.extra
                    .insert("load+analyze+compile ms".into(), *compile_ms);
                m.extra.insert("start to listening ms".into(), *startup_ms);
            }
        }
    }
    Ok(())
}

/// In a node of network namespaces: a client pod, a backend pod (nginx), and the proxies in the
/// node netns. Targets: direct (pod to pod), nodeproxy reached explicitly (`--capture none` on the
/// node address), nodeproxy through eBPF capture (client connects to the service VIP), with and
/// without the sk_msg splice (`--sockmap`), the kernel fast path (TCP service VIP, load-balanced
/// in connect()), and HAProxy and nginx as node proxies (on the node address, reached explicitly:
/// what a user would run instead).
fn netns_workloads(ctx: &mut Ctx) -> anyhow::Result<()> {
    use nodeproxy_tests::node::Node;
    println!("== netns (eBPF capture and fast path)");
    let mut node = Node::new("bench");
    let client = node.add_pod("client");
    // A new connection per request from one client to one backend address cycles the ephemeral
    // ports: measured without this, the third repetition of direct and fast-path new
    // connections fell from ~24k to 5–17k req/s as TIME_WAIT sockets piled up (the proxied
    // targets, whose connections land on other addresses, did not). The client pod reuses
    // TIME_WAIT ports (timestamps make it safe) from the whole range, as a loaded client would.
    let out = node.pods[client].exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65535",
    ]);
    if !out.status.success() {
        bail!(
            "client pod sysctls: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let backend = node.add_pod("backend");
    let bip = node.pods[backend].ip;
    let dir = ctx.out.join("netns");
    std::fs::create_dir_all(&dir)?;
    let conf = format!(
        "worker_processes 1;\npid {d}/b.pid;\nerror_log {d}/b.err warn;\nevents {{ worker_connections 65535; }}\nhttp {{ access_log off; keepalive_requests 100000000; server {{ listen {bip}:80 backlog=4096; location / {{ return 200 \"v1\"; }} }} }}\n",
        d = dir.display()
    );
    write(&dir.join("backend.conf"), &conf)?;
    let backend_ns = format!("--net={}", node.pods[backend].path().display());
    let _nginx = spawn_in(&backend_ns, &mut nginx_cmd(&dir, "backend.conf"))?;
    let (vip_http, vip_tcp) = (node.vip(1), node.vip(2));
    let node_ip = node.ip();
    let mesh = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: web}}\nspec:\n  hosts: [web.bench]\n  addresses: [{vip_http}]\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints: [{{address: {bip}}}]\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: raw}}\nspec:\n  hosts: [raw.bench]\n  addresses: [{vip_tcp}]\n  resolution: STATIC\n  ports: [{{number: 8080, name: tcp, protocol: TCP, targetPort: 80}}]\n  endpoints: [{{address: {bip}}}]\n"
    );
    let explicit = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: web}}\nspec:\n  hosts: [web.bench]\n  addresses: [{node_ip}]\n  resolution: STATIC\n  ports: [{{number: 18180, name: http, protocol: HTTP, targetPort: 80}}]\n  endpoints: [{{address: {bip}}}]\n"
    );
    write(&dir.join("mesh.yaml"), &mesh)?;
    write(&dir.join("explicit.yaml"), &explicit)?;
    let bin = nodeproxy_bin(&ctx.root);
    let client_ns = node.pods[client].path();
    let (capture_listen, mesh_path) = (
        format!("{node_ip}:15001"),
        dir.join("mesh.yaml").to_str().context("path")?.to_owned(),
    );
    let client_ns_arg = client_ns.to_str().context("path")?.to_owned();
    // The captured proxy, with or without the sk_msg splice.
    let spawn_captured = |extra: &[&str]| {
        let mut args = vec!["run", "--capture", "ebpf", "--cpu-affinity", "auto"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "--capture-listen",
            &capture_listen,
            "--admin",
            "127.0.0.1:15000",
            "--access-log",
            "off",
            "--config",
            &mesh_path,
            "--enroll-netns",
            &client_ns_arg,
        ]);
        node.spawn_proxy_bin(&bin, &args)
    };
    // Wait for every admin address to answer /ready.
    let wait_ready = |admins: &[&str], what: &str| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while admins
            .iter()
            .any(|a| node.http_get(a, "/ready").is_none_or(|(s, _)| s != 200))
        {
            if Instant::now() > deadline {
                bail!("{what} did not become ready");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    let explicit_p = node.spawn_proxy_bin(
        &bin,
        &[
            "run",
            "--capture",
            "none",
            "--cpu-affinity",
            "auto",
            "--admin",
            "127.0.0.1:15002",
            "--access-log",
            "off",
            "--config",
            dir.join("explicit.yaml").to_str().context("path")?,
        ],
    );
    wait_ready(&["127.0.0.1:15002"], "the explicit proxy in the netns node")?;
    // The peers as a node proxy would be run with them: in the node netns, on the node address,
    // reached explicitly by the pods (they cannot capture), pinned like every proxy here.
    let node_ns = format!("--net={}", node.ns.path().display());
    let (ha_addr, ngx_addr) = (format!("{node_ip}:18280"), format!("{node_ip}:18380"));
    write(
        &dir.join("haproxy.cfg"),
        &haproxy_netns_conf(raise_nofile(), &ha_addr, &format!("{bip}:80")),
    )?;
    write(
        &dir.join("nginx-proxy.conf"),
        &nginx_netns_conf(&dir, &ngx_addr, &format!("{bip}:80")),
    )?;
    let haproxy = spawn_in(
        &node_ns,
        Command::new("haproxy")
            .arg("-f")
            .arg(dir.join("haproxy.cfg"))
            .arg("-db"),
    )?;
    let nginx = spawn_in(&node_ns, &mut nginx_cmd(&dir, "nginx-proxy.conf"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for addr in [&ha_addr, &ngx_addr] {
        while node.http_get(addr, "/").is_none_or(|(s, _)| s != 200) {
            if Instant::now() > deadline {
                bail!("the peer proxy at {addr} in the netns node did not answer 200");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let ns = client_ns.display().to_string();
    let measure = |ctx: &mut Ctx,
                   w: &str,
                   name: &str,
                   url: &str,
                   pid: Option<u32>,
                   close: bool,
                   rep: usize|
     -> anyhow::Result<()> {
        let cpu_of = |p: u32| {
            procs::tree(p)
                .iter()
                .map(|q| procs::cpu_of(*q))
                .sum::<f64>()
        };
        let cpu0 = pid.map(cpu_of);
        let r = load::wrk(url, ctx.secs, 50, close, Some(&ns))?;
        let cpu = pid.map(cpu_of).zip(cpu0).map(|(a, b)| a - b);
        ctx.record(w, name, rep, &r, cpu, pid.map(procs::rss_of));
        Ok(())
    };
    let workloads = [("netns h1-keepalive", false), ("netns h1-newconn", true)];
    let vip_url = format!("http://{vip_http}:80/");
    // Only one eBPF proxy can be attached at a time, so each repetition runs twice: the
    // captured proxy with every other target interleaved, then the same proxy with `--sockmap`
    // (a fresh start each time, warmed like every target). Drift between the halves hits every
    // repetition alike.
    for rep in 0..ctx.reps {
        let captured = spawn_captured(&[]);
        wait_ready(&["127.0.0.1:15000"], "the captured proxy")?;
        let targets: [(&str, String, Option<u32>); 6] = [
            ("direct-netns", format!("http://{bip}:80/"), None),
            (
                "nodeproxy-explicit",
                format!("http://{node_ip}:18180/"),
                Some(explicit_p.pid()),
            ),
            ("nodeproxy-captured", vip_url.clone(), Some(captured.pid())),
            (
                "nodeproxy-fastpath",
                format!("http://{vip_tcp}:8080/"),
                Some(captured.pid()),
            ),
            (
                "haproxy-netns",
                format!("http://{ha_addr}/"),
                Some(haproxy.0.id()),
            ),
            (
                "nginx-netns",
                format!("http://{ngx_addr}/"),
                Some(nginx.0.id()),
            ),
        ];
        for (name, url, _) in &targets {
            if rep == 0 || name.starts_with("nodeproxy-c") || name.starts_with("nodeproxy-f") {
                load::warm_up(url, Some(&ns))?;
            }
        }
        for (w, close) in workloads {
            for (name, url, pid) in &targets {
                measure(ctx, w, name, url, *pid, close, rep)?;
            }
        }
        drop(captured);
        let sockmap = spawn_captured(&["--sockmap"]);
        wait_ready(&["127.0.0.1:15000"], "the --sockmap proxy")?;
        load::warm_up(&vip_url, Some(&ns))?;
        for (w, close) in workloads {
            measure(
                ctx,
                w,
                "nodeproxy-captured-sockmap",
                &vip_url,
                Some(sockmap.pid()),
                close,
                rep,
            )?;
        }
    }
    Ok(())
}

/// HAProxy in the netns node: HTTP mode, keep-alive to the backend pod (as on loopback).
fn haproxy_netns_conf(nofile: u64, listen: &str, backend: &str) -> String {
    let maxconn = (nofile / 2).saturating_sub(200).max(1000);
    format!(
        "global\n  maxconn {maxconn}\n  nbthread 2\n  cpu-map auto:1/1-2 0-1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\nfrontend h1\n  bind {listen}\n  default_backend be\nbackend be\n  server b1 {backend}\n"
    )
}

/// nginx in the netns node: two pinned workers, keepalive upstream (as on loopback).
fn nginx_netns_conf(dir: &Path, listen: &str, backend: &str) -> String {
    format!(
        "worker_processes 2;\nworker_cpu_affinity auto;\npid {d}/proxy.pid;\nerror_log {d}/proxy.err warn;\nworker_rlimit_nofile 100000;\nevents {{ worker_connections 65535; }}\nhttp {{\n  access_log off;\n  keepalive_requests 100000000;\n  upstream be {{ server {backend}; keepalive 512; keepalive_requests 100000000; }}\n  server {{ listen {listen} backlog=4096; location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
        d = dir.display()
    )
}

/// nginx in the foreground with `dir/conf`, its paths relative to `dir`.
fn nginx_cmd(dir: &Path, conf: &str) -> Command {
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(dir.join(conf))
        .arg("-p")
        .arg(dir)
        .args(["-g", "daemon off;"]);
    cmd
}

fn spawn_in(netns_arg: &str, cmd: &mut Command) -> anyhow::Result<procs::NsProc> {
    let mut c = Command::new("nsenter");
    c.arg(netns_arg).arg(cmd.get_program()).args(cmd.get_args());
    let child = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("nsenter")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(procs::NsProc(child))
}
