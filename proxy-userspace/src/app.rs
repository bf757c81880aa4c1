//! Wiring: configuration source, publisher, admin API and the data plane, started together
//! and stopped together. `main.rs` and the in-process integration tests both use [`start`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::task::JoinHandle;

pub mod args;
pub mod handover;

use crate::admin::{Admin, spawn_admin};
use crate::inspect::diagnostics_text;
use crate::proxy::{ProxyOptions, Shared, listener};
use crate::publish::{FileSource, Publisher, Reload, WatchGuard};

/// What to run.
#[derive(Clone)]
pub struct Options {
    /// Config files or directories.
    pub config: Vec<PathBuf>,
    /// Admin API address (port 0: any).
    pub admin: SocketAddr,
    /// Gateway listen address.
    pub gateway_ip: IpAddr,
    /// Mirror Host `-shadow` suffix.
    pub shadow_host_suffix: bool,
    /// Gateway `credentialName` directory.
    pub credentials_dir: PathBuf,
    /// Allow a non-loopback admin address.
    pub admin_public: bool,
    /// Run-time log filter control for `/logging`.
    pub log: Option<crate::admin::LogControl>,
    /// eBPF capture (None: `--capture none`, the proxy binds service addresses itself).
    pub capture: Option<crate::dataplane::Options>,
    /// The node's locality, `region/zone/subzone`.
    pub locality: Option<String>,
    /// Data-plane runtimes: the caller's plus `workers - 1` single-threaded ones that are
    /// handed accepted connections (0 or 1: only the caller's).
    pub workers: usize,
    /// `--cpu-affinity auto`: runtime `i` pinned to the `i`-th CPU of this plan; `None`: the
    /// runtimes float.
    pub cpu_plan: Option<crate::proxy::affinity::CpuPlan>,
    /// Read configuration from the Kubernetes API instead of `config` files.
    pub kubernetes: Option<KubeRun>,
    /// Downstream HTTP/1 time limits.
    pub timeouts: crate::proxy::Timeouts,
    /// Node ranges upstreams may reach with `--capture ebpf` (`--allow-upstream-cidr`).
    pub allow_upstream: Vec<ipnet::IpNet>,
    /// The cluster domain short host names expand into.
    pub cluster_domain: crate::config::ClusterDomain,
    /// Downstream connection cap (`None`: half the open-file limit, each proxied connection
    /// needing a second descriptor upstream).
    pub max_connections: Option<usize>,
    /// With eBPF capture, when another instance holds the pin directory: take over from it
    /// (else fail).
    pub takeover: bool,
    /// Remove the kernel state when this (not handed over) instance stops.
    pub uninstall_on_exit: bool,
}

/// `--source kubernetes`: the client and the source's settings.
#[derive(Clone)]
pub struct KubeRun {
    /// API client.
    pub client: kube::Client,
    /// Source settings (node name for enrollment, debounce).
    pub options: crate::kubernetes::Options,
}

/// The configuration source in use; dropping it stops watching.
enum SourceGuard {
    Files(#[allow(dead_code)] WatchGuard),
    Kubernetes(#[allow(dead_code)] crate::kubernetes::KubeSource),
}

/// A running proxy; dropping it stops the data plane and the config watch.
pub struct Running {
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// The publisher (snapshot in force, status).
    pub publisher: Arc<Publisher>,
    /// Data-plane state.
    pub shared: Arc<Shared>,
    _source: SourceGuard,
    dataplane: JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Set to the successor's pid when one took over (see [`handover`]).
    pub handed_over: tokio::sync::watch::Receiver<Option<u32>>,
    /// The predecessor this instance took over from.
    pub took_over_from: Option<u32>,
    uninstall_on_exit: bool,
}

impl Running {
    /// Drain before stopping: `/ready` fails, HTTP/1 responses close their connections, and
    /// this returns when no downstream connection is left or after `limit`, whichever is first.
    /// Returns the connections still open at the end.
    pub async fn drain(&self, limit: std::time::Duration) -> usize {
        self.shared.start_draining();
        let deadline = tokio::time::Instant::now() + limit;
        while self.shared.active_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.shared.active_connections()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.dataplane.abort();
        self.stop.send_replace(true);
        if let Some(k) = &self.shared.kernel
            && self.uninstall_on_exit
            && !k.is_handed_over()
            && let Err(e) = k.uninstall()
        {
            tracing::error!(error = %format!("{e:#}"), "uninstall the eBPF data path");
        }
    }
}

/// Load the configuration (refusing to start on errors), start watching it, serve the admin
/// API on its own thread, and start the data plane on the current Tokio runtime.
pub async fn start(opts: Options) -> anyhow::Result<Running> {
    let publisher = Publisher::new();
    let mut watch = None;
    if opts.kubernetes.is_none() {
        let mut source = FileSource::new(opts.config.clone(), publisher.clone())
            .with_cluster_domain(opts.cluster_domain.clone())
            .with_credentials_dir(opts.credentials_dir.clone());
        if let Reload::Rejected(diags) = source.reload(crate::publish::STARTUP) {
            bail!(
                "configuration rejected, nothing to serve:\n{}",
                diagnostics_text(&diags)
            );
        }
        watch = Some(source.spawn_watch().context("watch configuration")?);
    }
    if crate::admin::is_public(opts.admin) && !opts.admin_public {
        bail!(
            "admin address {} is not a loopback address: pass --admin-public to expose the admin API",
            opts.admin
        );
    }
    let sockets = Arc::new(crate::sockets::Sockets::default());
    let mut taken = None;
    let kernel = match &opts.capture {
        Some(c) => {
            let (c, snap, takeover) = (c.clone(), publisher.load(), opts.takeover);
            let (k, t) = tokio::task::spawn_blocking(move || load_kernel(&c, &snap, takeover))
                .await
                .context("load eBPF")??;
            if let Some(mut t) = t {
                tracing::info!(
                    predecessor = t.from,
                    sockets = t.sockets.len(),
                    "taking over"
                );
                sockets.inherit(std::mem::take(&mut t.sockets));
                taken = Some(t);
            }
            let k = Arc::new(k);
            match k.events() {
                Ok(ring) => {
                    tokio::spawn(crate::dataplane::spawn_events(ring));
                }
                Err(e) => tracing::warn!(error = %e, "kernel events unavailable"),
            }
            Some(k)
        }
        None => None,
    };
    let shared = Shared::new(
        publisher.load(),
        ProxyOptions {
            gateway_ip: opts.gateway_ip,
            shadow_host_suffix: opts.shadow_host_suffix,
            credentials_dir: opts.credentials_dir.clone(),
            locality: opts.locality.clone(),
            timeouts: opts.timeouts,
            allow_upstream: opts.allow_upstream.clone(),
            max_connections: opts.max_connections.unwrap_or_else(default_max_connections),
            sockets: sockets.clone(),
        },
        kernel,
    );
    let admin = Admin {
        publisher: publisher.clone(),
        shared: Some(shared.clone()),
        log: opts.log.clone(),
    };
    let admin_addr = spawn_admin(opts.admin, admin)
        .with_context(|| format!("bind admin API on {}", opts.admin))?;
    // Never dial the admin API (a ServiceEntry endpoint pointing at it would hand it to pods).
    shared.guard.add_base(admin_addr);
    let source = match (&opts.kubernetes, watch) {
        (Some(k), _) => {
            let enrollment = shared.kernel.as_ref().map(|k| {
                (
                    k.clone() as Arc<dyn crate::kubernetes::enroll::Enroller>,
                    Box::new(crate::kubernetes::enroll::ProcLocator::host())
                        as Box<dyn crate::kubernetes::enroll::NetnsLocator>,
                )
            });
            let mut versions = publisher.subscribe();
            let src = crate::kubernetes::KubeSource::start(
                k.client.clone(),
                publisher.clone(),
                crate::kubernetes::Options {
                    cluster_domain: opts.cluster_domain.clone(),
                    credentials_dir: Some(opts.credentials_dir.clone()),
                    ..k.options.clone()
                },
                enrollment,
            )
            .await?;
            // The admin API already answers (`/healthz` 200, `/ready` 503 until this is done), so
            // a slow API server does not get the pod restarted by its liveness probe.
            tracing::info!("waiting for the first complete list from the Kubernetes API");
            versions
                .wait_for(|v| *v > 0)
                .await
                .context("Kubernetes source stopped before the first snapshot")?;
            SourceGuard::Kubernetes(src)
        }
        (None, Some(w)) => SourceGuard::Files(w),
        (None, None) => unreachable!("file source started above"),
    };
    let dataplane = tokio::spawn(listener::run(shared.clone(), publisher.clone()));
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut queues = Vec::new();
    for i in 1..opts.workers.max(1) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        queues.push(tx);
        let (shared, mut stop_rx) = (shared.clone(), stop.subscribe());
        let plan = opts.cpu_plan.clone();
        std::thread::Builder::new()
            .name(format!("dataplane-{i}"))
            .spawn(move || {
                let mut rt = tokio::runtime::Builder::new_current_thread();
                if let Some(plan) = plan {
                    plan.pin_runtime(i);
                    rt.on_thread_start(move || plan.unpin_current());
                }
                let rt = rt.enable_all().build().expect("worker runtime");
                rt.block_on(async move {
                    tokio::select! {
                        _ = listener::run_worker(shared, rx) => {}
                        _ = stop_rx.wait_for(|s| *s) => {}
                    }
                });
            })?;
    }
    shared.set_workers(queues);
    // The primary runtime is this thread: pinned last, so the threads started above (admin,
    // publisher, workers) did not inherit its CPU.
    if let Some(plan) = &opts.cpu_plan {
        plan.pin_runtime(0);
    }
    // A predecessor stops accepting once this instance serves what it passed on.
    let took_over_from = match taken {
        Some(t) => {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            while shared.applied_version() == 0 {
                if tokio::time::Instant::now() > deadline {
                    bail!("the data plane did not start within 30 s; the predecessor serves on");
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Some(t.ready()?)
        }
        None => None,
    };
    let (done, handed_over) = tokio::sync::watch::channel(None);
    if let Some(k) = &shared.kernel {
        let (kernel, p) = (k.clone(), publisher.clone());
        handover::serve(handover::Holder {
            pin_dir: k.pin_dir().to_path_buf(),
            kernel: k.clone(),
            sockets,
            resync: Box::new(move || {
                if let Err(e) = kernel.sync(&p.load()) {
                    tracing::error!(error = %e, "kernel maps not re-synced");
                }
            }),
            done,
        })
        .context("start the handover listener")?;
    }
    Ok(Running {
        admin_addr,
        publisher,
        shared,
        _source: source,
        dataplane,
        stop,
        handed_over,
        took_over_from,
        uninstall_on_exit: opts.uninstall_on_exit,
    })
}

/// Lock the pin directory (taking it over from the instance holding it, when allowed) and
/// load the data path.
fn load_kernel(
    c: &crate::dataplane::Options,
    snap: &crate::compile::Snapshot,
    takeover: bool,
) -> anyhow::Result<(crate::dataplane::Kernel, Option<handover::Taken>)> {
    use crate::dataplane::{Error, Kernel, pinlock::LockError};
    let (lock, taken) = match Kernel::lock(c) {
        Ok(lock) => (lock, None),
        Err(Error::PinLock(LockError::Busy { holder, dir })) if takeover => {
            let (lock, t) = handover::take_over(&dir, holder)?;
            (lock, Some(t))
        }
        Err(e) => return Err(e.into()),
    };
    Ok((Kernel::load(c, lock, snap)?, taken))
}

/// Half the open-file limit: a proxied connection holds a descriptor downstream and one
/// upstream, and the rest (listeners, pools, files) must fit too.
fn default_max_connections() -> usize {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| (soft / 2) as usize)
        .unwrap_or(512)
        .max(64)
}
