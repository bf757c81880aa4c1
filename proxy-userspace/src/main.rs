//! `nodeproxy`: the node proxy binary and its istioctl-like inspection commands.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nodeproxy::diagnostic::has_errors;
use nodeproxy::inspect;

/// mimalloc (see `nodeproxy::alloc`).
#[global_allocator]
static GLOBAL: nodeproxy::alloc::MiMalloc = nodeproxy::alloc::MiMalloc;
use nodeproxy::publish::build;

#[derive(Parser)]
#[command(
    name = "nodeproxy",
    version,
    about = "Sidecar-less service-mesh node proxy with Istio traffic management"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum ProxyConfigKind {
    /// HTTP route tables.
    Routes,
    /// Clusters with policy and load.
    Clusters,
    /// Endpoints with health, ejection and load.
    Endpoints,
    /// Listeners, and why one is not bound.
    Listeners,
    /// eBPF programs, maps and counters.
    Kernel,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum AccessLogMode {
    /// One line per request/connection on stderr.
    On,
    /// No access log.
    Off,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum AccessLogFormat {
    /// Envoy-like text line.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum SourceKind {
    /// Istio YAML files (`--config`), watched.
    Files,
    /// The Kubernetes API server.
    Kubernetes,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Capture {
    /// Listen on every service address and port (no privileges needed).
    None,
    /// Transparent capture of enrolled pods with eBPF (root).
    Ebpf,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum CpuAffinity {
    /// The scheduler places the data-plane threads (best on a node shared with busy pods).
    None,
    /// Data-plane thread `i` pinned to the `i`-th CPU this process may use (its cpuset).
    Auto,
}

#[derive(Subcommand)]
enum Command {
    /// Validate Istio YAML files or directories; exit 1 on any error.
    Validate {
        /// Files or directories of .yaml/.yml.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the compiled route tables.
    Routes {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Only the virtual host serving this Host.
        #[arg(long)]
        host: Option<String>,
        /// Only this port.
        #[arg(long)]
        port: Option<u16>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show which rule a request would match and what would happen to it (no traffic sent).
    Simulate {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Host header.
        #[arg(long)]
        host: String,
        /// Service or gateway port.
        #[arg(long)]
        port: Option<u16>,
        /// The address the client connects to (default: the host's service address).
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Path and query.
        #[arg(long, default_value = "/")]
        path: String,
        /// Method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request header `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Client workload label `k=v` (repeatable).
        #[arg(long = "source-label")]
        source_labels: Vec<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Inspect a running proxy through its admin API (like `istioctl proxy-config`).
    ProxyConfig {
        /// What to show.
        #[arg(value_enum)]
        what: ProxyConfigKind,
        /// Admin API address of the running proxy.
        #[arg(long, env = "NODEPROXY_ADMIN", default_value = nodeproxy::admin::DEFAULT_ADMIN_ADDR)]
        admin: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "text")]
        output: Output,
    },
    /// Run the proxy.
    Run(Box<RunArgs>),
}

/// `nodeproxy run` flags.
#[derive(clap::Args)]
struct RunArgs {
    /// Files or directories of Istio YAML (watched; SIGHUP reloads), several after one
    /// `--config` or the flag repeated. Needed with `--source files`.
    #[arg(long = "config", value_name = "PATH", num_args = 1..)]
    config: Vec<PathBuf>,
    /// Where configuration comes from: `files` (--config) or `kubernetes` (the API server:
    /// in-cluster service account, else KUBECONFIG).
    #[arg(long, value_enum, default_value = "files")]
    source: SourceKind,
    /// This node's name (pods on it in the ambient mesh are captured; `--source kubernetes`).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Kubernetes cluster domain of service hosts (`<name>.<ns>.svc.<domain>`).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = nodeproxy::compile::registry::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Traffic capture mode (default: ebpf as root, none otherwise).
    #[arg(long, value_enum)]
    capture: Option<Capture>,
    /// Admin API address.
    #[arg(long, default_value = nodeproxy::admin::DEFAULT_ADMIN_ADDR)]
    admin: SocketAddr,
    /// Address for Gateway server ports.
    #[arg(long, default_value = "0.0.0.0")]
    gateway_ip: IpAddr,
    /// Append `-shadow` to the Host of mirrored requests (Istio <= 1.27 behaviour).
    #[arg(long)]
    shadow_host_suffix: bool,
    /// Directory of Gateway `credentialName` secrets as `<name>.crt` and `<name>.key`.
    #[arg(long, default_value = nodeproxy::proxy::DEFAULT_CREDENTIALS_DIR)]
    credentials_dir: PathBuf,
    /// Allow a non-loopback --admin address.
    #[arg(long)]
    admin_public: bool,
    /// Where captured connections arrive (default: the node's primary address, port 15001).
    #[arg(long)]
    capture_listen: Option<SocketAddr>,
    /// Enroll this network namespace at start (repeatable), e.g. /run/netns/pod1.
    #[arg(long = "enroll-netns")]
    enroll_netns: Vec<PathBuf>,
    /// Guard this uplink interface with the XDP program (repeatable).
    #[arg(long)]
    uplink: Vec<String>,
    /// Source CIDR the XDP guard drops (repeatable, IPv4).
    #[arg(long = "deny-cidr")]
    deny_cidr: Vec<ipnet::Ipv4Net>,
    /// Data-plane threads, each a single-threaded runtime (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// Data-plane threads' CPUs: `none` (the scheduler places them) or `auto` (thread `i`
    /// pinned to the `i`-th CPU of the process's CPU set).
    #[arg(long, value_enum, default_value_t = CpuAffinity::None)]
    cpu_affinity: CpuAffinity,
    /// Splice node-local bytes in the kernel with sockops + sk_msg: captured client<->proxy,
    /// and proxy<->endpoint when the endpoint is a socket on this node (HTTP/1 upstreams).
    /// Off by default.
    #[arg(long)]
    sockmap: bool,
    /// The node's locality, `region/zone/subzone` (locality-aware load balancing).
    #[arg(long)]
    locality: Option<String>,
    /// bpffs mount point for the pinned maps (mounted when needed).
    #[arg(long, default_value = nodeproxy::dataplane::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// With --capture ebpf, upstream endpoints on the node itself (loopback, link-local,
    /// the node's addresses) are refused; this lets a range through (repeatable).
    #[arg(long = "allow-upstream-cidr", value_name = "CIDR")]
    allow_upstream_cidr: Vec<ipnet::IpNet>,
    /// HTTP/1: longest time from a connection's accept, or a request's first byte, to its
    /// complete head (then 408 and close).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_head_timeout: std::time::Duration,
    /// HTTP/1: how long a keep-alive connection may wait for its next request.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
    /// HTTP/1: longest wait between two reads of a request body (then 408 and close).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    body_idle_timeout: std::time::Duration,
    /// After SIGTERM/SIGINT, how long in-flight connections get to finish (0: stop at once).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_time: std::time::Duration,
    /// Access log: `on` (default) or `off`.
    #[arg(long, value_enum, default_value = "on")]
    access_log: AccessLogMode,
    /// Where the access log goes: `/dev/stderr` (default), `/dev/stdout` (Istio's
    /// `accessLogFile`), or a file path (appended to).
    #[arg(long, default_value = "/dev/stderr")]
    access_log_file: nodeproxy::telemetry::access::Destination,
    /// Access log format.
    #[arg(long, value_enum, default_value = "text")]
    access_log_format: AccessLogFormat,
}

/// Every service port is a listening socket and every proxied connection two more: lift the
/// soft descriptor limit to the hard one (systemd and container runtimes often leave 1024).
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "read the open-file limit"),
    }
}

fn main() -> ExitCode {
    // No transparent huge pages for this process (inherited by every thread it starts): where
    // THP is `always`, first touches of a large heap (10k services' route tables) made the
    // kernel zero 2 MiB pages inline, measured as up to ~1 s of extra system time in a config
    // load, and latency spikes in the data plane. A proxy's hot set is small; it does not need
    // them.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::parse();
    let default_filter = match &cli.command {
        Command::Run(r) if r.access_log == AccessLogMode::Off => "info,nodeproxy::access=off",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only for a terminal: a log file or a pipe gets plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let log: nodeproxy::admin::LogControl = std::sync::Arc::new(move |level: &str| {
        let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        reload.reload(f).map_err(|e| e.to_string())
    });
    match run(cli, log) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, log: nodeproxy::admin::LogControl) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { paths, output } => {
            let built = build(&paths);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&built.diagnostics)?),
                Output::Text => print!("{}", inspect::diagnostics_text(&built.diagnostics)),
            }
            Ok(if has_errors(&built.diagnostics) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Routes {
            paths,
            host,
            port,
            output,
        } => {
            let snap = snapshot_or_report(&paths)?;
            match output {
                Output::Json => {
                    let tables: Vec<_> = snap
                        .http_tables
                        .iter()
                        .filter(|t| {
                            port.is_none_or(|p| {
                                t.name == p.to_string() || t.name == format!("gateway:{p}")
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &serde_json::json!({ "httpTables": tables, "listeners": snap.listeners })
                        )?
                    )
                }
                Output::Text => print!("{}", inspect::routes_text(&snap, host.as_deref(), port)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            paths,
            host,
            port,
            address,
            path,
            method,
            headers,
            source_labels,
            output,
        } => {
            let snap = snapshot_or_report(&paths)?;
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("-H `{h}`: expected `name: value`"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let source_labels = source_labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--source-label `{l}`: expected `key=value`"))
                })
                .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
            let req = inspect::SimRequest {
                host,
                port,
                address,
                path,
                method,
                headers,
                source_labels,
            };
            let result = inspect::simulate(&snap, &req).map_err(anyhow::Error::msg)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&result)?),
                Output::Text => print!("{}", inspect::simulate_text(&result)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ProxyConfig {
            what,
            admin,
            output,
        } => {
            let path = match what {
                ProxyConfigKind::Routes => "/routes",
                ProxyConfigKind::Clusters => "/clusters",
                ProxyConfigKind::Endpoints => "/endpoints",
                ProxyConfigKind::Listeners => "/listeners",
                ProxyConfigKind::Kernel => "/kernel",
            };
            let body = inspect::admin_get(&admin, path).map_err(anyhow::Error::msg)?;
            if output == Output::Json || what == ProxyConfigKind::Kernel {
                println!("{body}");
                return Ok(ExitCode::SUCCESS);
            }
            let v: serde_json::Value =
                serde_json::from_str(&body).with_context(|| format!("{path}: not JSON"))?;
            print!(
                "{}",
                match what {
                    ProxyConfigKind::Routes => inspect::routes_table(&v),
                    ProxyConfigKind::Clusters => inspect::clusters_table(&v),
                    ProxyConfigKind::Listeners => inspect::listeners_table(&v),
                    _ => inspect::endpoints_table(&v),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let RunArgs {
                config,
                source,
                node_name,
                cluster_domain,
                capture,
                admin,
                gateway_ip,
                shadow_host_suffix,
                credentials_dir,
                admin_public,
                access_log: _,
                access_log_file,
                access_log_format,
                capture_listen,
                enroll_netns,
                uplink,
                deny_cidr,
                bpffs,
                locality,
                sockmap,
                workers,
                cpu_affinity,
                drain_time,
                request_head_timeout,
                idle_timeout,
                body_idle_timeout,
                allow_upstream_cidr,
            } = *args;
            nodeproxy::compile::registry::set_cluster_domain(&cluster_domain)
                .map_err(|e| anyhow::anyhow!("--cluster-domain: {e}"))?;
            match source {
                SourceKind::Files if config.is_empty() => {
                    bail!("--source files needs at least one --config file or directory")
                }
                SourceKind::Kubernetes if !config.is_empty() => {
                    bail!(
                        "--config is for --source files; with --source kubernetes the configuration comes from the API server"
                    )
                }
                _ => {}
            }
            // Installed even when off: `POST /logging` can switch it on later. Dropped last
            // (declared first), so lines of draining requests are written.
            let _access_log = nodeproxy::telemetry::access::install(
                &access_log_file,
                match access_log_format {
                    AccessLogFormat::Text => nodeproxy::telemetry::access::Format::Text,
                    AccessLogFormat::Json => nodeproxy::telemetry::access::Format::Json,
                },
            )
            .context("--access-log-file")?;
            let root = nix::unistd::geteuid().is_root();
            let capture = match capture.unwrap_or(if root { Capture::Ebpf } else { Capture::None })
            {
                Capture::None => {
                    if !enroll_netns.is_empty() || !uplink.is_empty() {
                        bail!("--enroll-netns and --uplink need --capture ebpf");
                    }
                    None
                }
                Capture::Ebpf => {
                    let listen = match capture_listen {
                        Some(a) => a,
                        None => SocketAddr::new(primary_address().context("--capture-listen not given and no primary address found (no default route?)")?, nodeproxy::dataplane::DEFAULT_CAPTURE_PORT),
                    };
                    let mut guard_ports = vec![listen.port()];
                    if !admin.ip().is_loopback() {
                        guard_ports.push(admin.port());
                    }
                    Some(nodeproxy::dataplane::Options {
                        capture: listen,
                        enroll: enroll_netns,
                        uplinks: uplink,
                        guard_ports,
                        deny_cidrs: deny_cidr,
                        bpffs,
                        sockmap,
                    })
                }
            };
            // One single-threaded runtime per core: this thread's (which owns the listeners)
            // plus workers - 1 that are handed accepted connections.
            let workers = workers.map(usize::from).unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            raise_nofile_limit();
            let cpu_plan = match cpu_affinity {
                CpuAffinity::None => None,
                CpuAffinity::Auto => Some(
                    nodeproxy::proxy::affinity::CpuPlan::from_current()
                        .context("--cpu-affinity auto: read this process's CPU set")?,
                ),
            };
            let mut rt = tokio::runtime::Builder::new_current_thread();
            if let Some(plan) = cpu_plan.clone() {
                // This thread becomes the pinned primary runtime; its blocking-pool threads float.
                rt.on_thread_start(move || plan.unpin_current());
            }
            let rt = rt.enable_all().build()?;
            rt.block_on(async {
                let kubernetes = match source {
                    SourceKind::Files => None,
                    SourceKind::Kubernetes => {
                        if capture.is_some() && node_name.is_none() {
                            tracing::warn!("no --node-name (NODE_NAME): no pod will be enrolled");
                        }
                        Some(nodeproxy::app::KubeRun {
                            client: nodeproxy::kubernetes::client().await?,
                            options: nodeproxy::kubernetes::Options {
                                node_name,
                                ..Default::default()
                            },
                        })
                    }
                };
                let running = nodeproxy::app::start(nodeproxy::app::Options {
                    kubernetes,
                    config,
                    admin,
                    gateway_ip,
                    shadow_host_suffix,
                    credentials_dir,
                    admin_public,
                    log: Some(log.clone()),
                    capture,
                    locality,
                    workers,
                    cpu_plan,
                    timeouts: nodeproxy::proxy::Timeouts {
                        request_head: request_head_timeout,
                        idle: idle_timeout,
                        body_idle: body_idle_timeout,
                    },
                    allow_upstream: allow_upstream_cidr,
                })
                .await?;
                eprintln!(
                    "nodeproxy: serving, admin API on http://{}",
                    running.admin_addr
                );
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                if !drain_time.is_zero() {
                    eprintln!(
                        "nodeproxy: draining for up to {}",
                        humantime::format_duration(drain_time)
                    );
                    let left = running.drain(drain_time).await;
                    eprintln!("nodeproxy: drained ({left} connections still open)");
                }
                drop(running);
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The node's primary address: the source address of the default route (no packet is sent).
fn primary_address() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    s.local_addr()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
}

/// Build or print the diagnostics and fail.
fn snapshot_or_report(paths: &[PathBuf]) -> anyhow::Result<nodeproxy::compile::Snapshot> {
    let built = build(paths);
    match built.snapshot {
        Some(s) => Ok(s),
        None => {
            eprint!("{}", inspect::diagnostics_text(&built.diagnostics));
            bail!("configuration has errors")
        }
    }
}
