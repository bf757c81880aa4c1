//! `nodeproxy run`'s flags, and the rules that turn them into [`Options`]: what each default
//! is on this machine, which combinations are refused and why. Kept apart from `main.rs` so
//! each rule has a unit test.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::ValueEnum;

use super::Options;

/// `--access-log`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum AccessLogMode {
    /// One line per request/connection on stderr.
    On,
    /// No access log.
    Off,
}

/// `--access-log-format`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum AccessLogFormat {
    /// Envoy-like text line.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--source`: where configuration comes from.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum SourceKind {
    /// Istio YAML files (`--config`), watched.
    Files,
    /// The Kubernetes API server.
    Kubernetes,
}

/// `--capture`: how pods' traffic reaches the proxy.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Capture {
    /// Listen on every service address and port (no privileges needed).
    None,
    /// Transparent capture of enrolled pods with eBPF (root).
    Ebpf,
}

/// `--takeover`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Takeover {
    /// Take the listening sockets and the kernel state over from the instance holding the
    /// pin directory; it drains and exits.
    Auto,
    /// Fail when another instance holds the pin directory.
    Never,
}

/// `--after-handover`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum AfterHandover {
    /// Exit once drained.
    Exit,
    /// Wait for SIGTERM once drained (a Kubernetes container that exits by itself is
    /// restarted, and would take over back).
    Wait,
}

/// `--cpu-affinity`.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum CpuAffinity {
    /// The scheduler places the data-plane threads (best on a node shared with busy pods).
    None,
    /// Data-plane thread `i` pinned to the `i`-th CPU this process may use (its cpuset).
    Auto,
}

/// `nodeproxy run` flags.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Files or directories of Istio YAML (watched; SIGHUP reloads), several after one
    /// `--config` or the flag repeated. Needed with `--source files`.
    #[arg(long = "config", value_name = "PATH", num_args = 1..)]
    pub config: Vec<PathBuf>,
    /// Where configuration comes from: `files` (--config) or `kubernetes` (the API server:
    /// in-cluster service account, else KUBECONFIG).
    #[arg(long, value_enum, default_value = "files")]
    pub source: SourceKind,
    /// This node's name (pods on it in the ambient mesh are captured; `--source kubernetes`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubernetes cluster domain of service hosts (`<name>.<ns>.svc.<domain>`).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = crate::config::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: crate::config::ClusterDomain,
    /// Traffic capture mode (default: ebpf as root, none otherwise).
    #[arg(long, value_enum)]
    pub capture: Option<Capture>,
    /// Admin API address.
    #[arg(long, default_value = crate::admin::DEFAULT_ADMIN_ADDR)]
    pub admin: SocketAddr,
    /// Address for Gateway server ports.
    #[arg(long, default_value = "0.0.0.0")]
    pub gateway_ip: IpAddr,
    /// Append `-shadow` to the Host of mirrored requests (Istio <= 1.27 behaviour).
    #[arg(long)]
    pub shadow_host_suffix: bool,
    /// Directory of Gateway `credentialName` secrets as `<name>.crt` and `<name>.key`.
    #[arg(long, default_value = crate::proxy::DEFAULT_CREDENTIALS_DIR)]
    pub credentials_dir: PathBuf,
    /// Allow a non-loopback --admin address.
    #[arg(long)]
    pub admin_public: bool,
    /// Where captured connections arrive (default: the node's primary address, port 15001);
    /// give it twice, an IPv4 and an IPv6 address with one port, to capture both families.
    #[arg(long)]
    pub capture_listen: Vec<SocketAddr>,
    /// Enroll this network namespace at start (repeatable), e.g. /run/netns/pod1.
    #[arg(long = "enroll-netns")]
    pub enroll_netns: Vec<PathBuf>,
    /// Guard this uplink interface with the XDP program (repeatable).
    #[arg(long)]
    pub uplink: Vec<String>,
    /// Source CIDR the XDP guard drops (repeatable, IPv4).
    #[arg(long = "deny-cidr")]
    pub deny_cidr: Vec<ipnet::Ipv4Net>,
    /// Data-plane threads, each a single-threaded runtime (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// Data-plane threads' CPUs: `none` (the scheduler places them) or `auto` (thread `i`
    /// pinned to the `i`-th CPU of the process's CPU set).
    #[arg(long, value_enum, default_value_t = CpuAffinity::None)]
    pub cpu_affinity: CpuAffinity,
    /// Splice node-local bytes in the kernel with sockops + sk_msg: captured client<->proxy,
    /// and proxy<->endpoint when the endpoint is a socket on this node (HTTP/1 upstreams).
    /// Off by default.
    #[arg(long)]
    pub sockmap: bool,
    /// The node's locality, `region/zone/subzone` (locality-aware load balancing).
    #[arg(long)]
    pub locality: Option<String>,
    /// bpffs mount point for the pinned maps (mounted when needed).
    #[arg(long, default_value = crate::dataplane::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// With --capture ebpf, upstream endpoints on the node itself (loopback, link-local,
    /// the node's addresses) are refused; this lets a range through (repeatable).
    #[arg(long = "allow-upstream-cidr", value_name = "CIDR")]
    pub allow_upstream_cidr: Vec<ipnet::IpNet>,
    /// Downstream connections past which those waiting for a request (slow heads, idle
    /// keep-alives) are closed; past twice this, new connections are closed at accept
    /// (default: half the open-file limit).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_downstream_connections: Option<u64>,
    /// HTTP/1: longest time from a connection's accept, or a request's first byte, to its
    /// complete head (then 408 and close).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_head_timeout: std::time::Duration,
    /// HTTP/1: how long a keep-alive connection may wait for its next request.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// HTTP/1: longest wait between two reads of a request body (then 408 and close).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_idle_timeout: std::time::Duration,
    /// After SIGTERM/SIGINT or a handover, how long in-flight connections get to finish
    /// (0: stop at once).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_time: std::time::Duration,
    /// When another instance holds the pin directory (--capture ebpf): `auto` takes its
    /// listening sockets and kernel state over (it drains and exits), `never` fails.
    #[arg(long, value_enum, default_value = "auto")]
    pub takeover: Takeover,
    /// After handing over to a successor and draining: `exit`, or `wait` for SIGTERM.
    #[arg(long, value_enum, default_value = "exit")]
    pub after_handover: AfterHandover,
    /// On SIGTERM/SIGINT, after draining, detach the eBPF programs and remove the pins. By
    /// default they stay: enrolled pods keep the kernel fast path while no proxy runs, and
    /// the next start adopts them (`nodeproxy uninstall` removes them).
    #[arg(long)]
    pub uninstall_on_exit: bool,
    /// Access log: `on` (default) or `off`.
    #[arg(long, value_enum, default_value = "on")]
    pub access_log: AccessLogMode,
    /// Where the access log goes: `/dev/stderr` (default), `/dev/stdout` (Istio's
    /// `accessLogFile`), or a file path (appended to).
    #[arg(long, default_value = "/dev/stderr")]
    pub access_log_file: crate::telemetry::access::Destination,
    /// Access log format.
    #[arg(long, value_enum, default_value = "text")]
    pub access_log_format: AccessLogFormat,
}

/// What the machine says, for the defaults that depend on it (tests pass their own).
#[derive(Debug, Clone)]
pub struct Host {
    /// Running as root (capture defaults to eBPF).
    pub root: bool,
    /// The source address of the default route (the capture listener's default address).
    pub primary_address: Option<IpAddr>,
    /// CPUs available (the default number of data-plane threads).
    pub cpus: usize,
}

impl Host {
    /// This machine.
    pub fn detect() -> Host {
        Host {
            root: nix::unistd::geteuid().is_root(),
            primary_address: primary_address(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
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

/// `run` planned: the options, and what `main` still has to make (the Kubernetes client, the
/// CPU plan, the access log, the log control).
pub struct RunPlan {
    /// Options, with `kubernetes`, `cpu_plan` and `log` unset.
    pub options: Options,
    /// `--source kubernetes`: the source's settings.
    pub kubernetes: Option<crate::kubernetes::Options>,
    /// `--cpu-affinity auto`.
    pub pin_cpus: bool,
    /// `--drain-time`.
    pub drain_time: Duration,
    /// `--after-handover`.
    pub after_handover: AfterHandover,
    /// Where the access log goes.
    pub access_log_file: crate::telemetry::access::Destination,
    /// Its format.
    pub access_log_format: crate::telemetry::access::Format,
}

impl RunArgs {
    /// Check the flags together and fill the defaults that depend on `host`.
    pub fn plan(self, host: &Host) -> anyhow::Result<RunPlan> {
        match self.source {
            SourceKind::Files if self.config.is_empty() => {
                bail!("--source files needs at least one --config file or directory")
            }
            SourceKind::Kubernetes if !self.config.is_empty() => bail!(
                "--config is for --source files; with --source kubernetes the configuration comes from the API server"
            ),
            _ => {}
        }
        let capture = self.capture(host)?;
        if capture.is_none() && self.uninstall_on_exit {
            bail!("--uninstall-on-exit needs --capture ebpf (there is nothing to uninstall)");
        }
        let kubernetes = match self.source {
            SourceKind::Files => None,
            SourceKind::Kubernetes => {
                if capture.is_some() && self.node_name.is_none() {
                    tracing::warn!("no --node-name (NODE_NAME): no pod will be enrolled");
                }
                Some(crate::kubernetes::Options {
                    node_name: self.node_name,
                    cluster_domain: self.cluster_domain.clone(),
                    ..Default::default()
                })
            }
        };
        Ok(RunPlan {
            options: Options {
                config: self.config,
                admin: self.admin,
                gateway_ip: self.gateway_ip,
                shadow_host_suffix: self.shadow_host_suffix,
                credentials_dir: self.credentials_dir,
                admin_public: self.admin_public,
                log: None,
                capture,
                locality: self.locality,
                // One single-threaded runtime per core by default.
                workers: self.workers.map(usize::from).unwrap_or(host.cpus),
                cpu_plan: None,
                kubernetes: None,
                timeouts: crate::proxy::Timeouts {
                    request_head: self.request_head_timeout,
                    idle: self.idle_timeout,
                    body_idle: self.body_idle_timeout,
                },
                allow_upstream: self.allow_upstream_cidr,
                cluster_domain: self.cluster_domain,
                max_connections: self.max_downstream_connections.map(|n| n as usize),
                takeover: self.takeover == Takeover::Auto,
                uninstall_on_exit: self.uninstall_on_exit,
            },
            kubernetes,
            pin_cpus: self.cpu_affinity == CpuAffinity::Auto,
            drain_time: self.drain_time,
            after_handover: self.after_handover,
            access_log_file: self.access_log_file,
            access_log_format: match self.access_log_format {
                AccessLogFormat::Text => crate::telemetry::access::Format::Text,
                AccessLogFormat::Json => crate::telemetry::access::Format::Json,
            },
        })
    }

    /// The capture: eBPF as root unless `--capture none`; its listener defaults to the primary
    /// address; the XDP guard protects it, and the admin port when that is not on loopback.
    fn capture(&self, host: &Host) -> anyhow::Result<Option<crate::dataplane::Options>> {
        let mode = self.capture.unwrap_or(if host.root {
            Capture::Ebpf
        } else {
            Capture::None
        });
        if mode == Capture::None {
            if !self.enroll_netns.is_empty() || !self.uplink.is_empty() {
                bail!("--enroll-netns and --uplink need --capture ebpf");
            }
            return Ok(None);
        }
        let (listen, alt) = match self.capture_listen.as_slice() {
            [] => (
                SocketAddr::new(
                    host.primary_address.context(
                        "--capture-listen not given and no primary address found (no default route?)",
                    )?,
                    crate::dataplane::DEFAULT_CAPTURE_PORT,
                ),
                None,
            ),
            [a] => (*a, None),
            [a, b] if a.is_ipv4() != b.is_ipv4() && a.port() == b.port() => (*a, Some(*b)),
            _ => bail!(
                "--capture-listen: at most one IPv4 and one IPv6 address, with the same port"
            ),
        };
        let mut guard_ports = vec![listen.port()];
        if !self.admin.ip().is_loopback() {
            guard_ports.push(self.admin.port());
        }
        Ok(Some(crate::dataplane::Options {
            capture: listen,
            capture_alt: alt,
            enroll: self.enroll_netns.clone(),
            uplinks: self.uplink.clone(),
            guard_ports,
            deny_cidrs: self.deny_cidr.clone(),
            bpffs: self.bpffs.clone(),
            sockmap: self.sockmap,
        }))
    }
}

#[cfg(test)]
mod tests;
