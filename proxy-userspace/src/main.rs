//! `nodeproxy`: the node proxy binary and its istioctl-like inspection commands.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nodeproxy::app::args::{AccessLogMode, AfterHandover, Host, RunArgs};
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
        /// The routes clients of this namespace see (`exportTo`).
        #[arg(long = "source-namespace")]
        source_namespace: Option<String>,
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
        /// Client namespace: what it sees by `exportTo` and `sourceNamespace` matches.
        #[arg(long = "source-namespace")]
        source_namespace: Option<String>,
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
    /// Detach the eBPF programs and remove every pinned map and link (refused while a
    /// `nodeproxy run` holds the pin directory).
    Uninstall {
        /// bpffs mount point.
        #[arg(long, default_value = nodeproxy::dataplane::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
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
            source_namespace,
            output,
        } => {
            let all = snapshot_or_report(&paths)?;
            let snap = match source_namespace
                .as_deref()
                .and_then(|ns| all.scope_of_namespace(ns))
            {
                Some(i) => &*all.scoped[i].snapshot,
                None => &all,
            };
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
                Output::Text => {
                    print!("{}", inspect::routes_text(snap, host.as_deref(), port));
                    if source_namespace.is_none() {
                        for s in &all.scoped {
                            println!(
                                "clients of namespace(s) {} see other routes (exportTo): --source-namespace {}",
                                s.namespaces.join(", "),
                                s.namespaces[0]
                            );
                        }
                    }
                }
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
            source_namespace,
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
                source_namespace,
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
        Command::Uninstall { bpffs } => {
            if nodeproxy::dataplane::uninstall(&bpffs)? {
                println!(
                    "nodeproxy: eBPF programs detached, pins under {} removed",
                    nodeproxy::dataplane::Kernel::pin_dir_of(&bpffs).display()
                );
            } else {
                println!("nodeproxy: nothing installed under {}", bpffs.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let plan = args.plan(&Host::detect())?;
            // Installed even when off: `POST /logging` can switch it on later. Dropped last
            // (declared first), so lines of draining requests are written.
            let _access_log = nodeproxy::telemetry::access::install(
                &plan.access_log_file,
                plan.access_log_format,
            )
            .context("--access-log-file")?;
            raise_nofile_limit();
            let mut options = plan.options;
            options.log = Some(log);
            if plan.pin_cpus {
                options.cpu_plan = Some(
                    nodeproxy::proxy::affinity::CpuPlan::from_current()
                        .context("--cpu-affinity auto: read this process's CPU set")?,
                );
            }
            // One single-threaded runtime per core: this thread's (which owns the listeners)
            // plus workers - 1 that are handed accepted connections.
            let mut rt = tokio::runtime::Builder::new_current_thread();
            if let Some(cpus) = options.cpu_plan.clone() {
                // This thread becomes the pinned primary runtime; its blocking-pool threads float.
                rt.on_thread_start(move || cpus.unpin_current());
            }
            let rt = rt.enable_all().build()?;
            rt.block_on(async {
                if let Some(k) = plan.kubernetes {
                    options.kubernetes = Some(nodeproxy::app::KubeRun {
                        client: nodeproxy::kubernetes::client().await?,
                        options: k,
                    });
                }
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let running = nodeproxy::app::start(options).await?;
                match running.took_over_from {
                    Some(pid) => eprintln!(
                        "nodeproxy: serving (took over from pid {pid}), admin API on http://{}",
                        running.admin_addr
                    ),
                    None => eprintln!(
                        "nodeproxy: serving, admin API on http://{}",
                        running.admin_addr
                    ),
                }
                let mut handed = running.handed_over.clone();
                let successor = tokio::select! {
                    _ = tokio::signal::ctrl_c() => None,
                    _ = term.recv() => None,
                    Ok(pid) = handed.wait_for(|p| p.is_some()) => *pid,
                };
                if let Some(pid) = successor {
                    eprintln!("nodeproxy: handed over to pid {pid}; no longer accepting");
                    running.shared.stop_accepting();
                }
                let drain_time = plan.drain_time;
                if !drain_time.is_zero() {
                    eprintln!(
                        "nodeproxy: draining for up to {}",
                        humantime::format_duration(drain_time)
                    );
                    let left = running.drain(drain_time).await;
                    eprintln!("nodeproxy: drained ({left} connections still open)");
                }
                if successor.is_some() && plan.after_handover == AfterHandover::Wait {
                    eprintln!("nodeproxy: drained; waiting for SIGTERM (--after-handover wait)");
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                drop(running);
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
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
