//! Publishing: turn config paths into the snapshot in force and keep it current.
//!
//! [`build`] runs load → analyze → compile. A [`Publisher`] holds the snapshot in an
//! `ArcSwap` (readers never block) plus the status the admin API shows. [`FileSource`] watches
//! the paths (inotify through `notify`, and SIGHUP) on its own thread, debounces bursts of
//! events, and publishes each good set; a set with errors is rejected whole, its diagnostics are
//! logged and kept, and the last good snapshot stays in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::analyze::analyze;
use crate::compile::{Snapshot, compile};
use crate::config::ConfigSet;
use crate::diagnostic::{Diagnostic, Severity, has_errors};

/// How long to wait for more file events before reloading (editors write in bursts).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// Result of building a config set.
#[derive(Debug)]
pub struct Built {
    /// The snapshot, when the set had no errors.
    pub snapshot: Option<Snapshot>,
    /// Everything loading, analysis and compilation said.
    pub diagnostics: Vec<Diagnostic>,
}

/// Load, analyze and compile `paths`.
pub fn build(paths: &[PathBuf]) -> Built {
    let (set, diags) = ConfigSet::load(paths);
    build_set(&set, diags)
}

/// Analyze and compile an already loaded set (`diags` are the load diagnostics).
pub fn build_set(set: &ConfigSet, mut diags: Vec<Diagnostic>) -> Built {
    diags.extend(analyze(set));
    if has_errors(&diags) {
        return Built {
            snapshot: None,
            diagnostics: diags,
        };
    }
    match compile(set) {
        Ok(s) => Built {
            snapshot: Some(s),
            diagnostics: diags,
        },
        Err(errs) => {
            diags.extend(errs);
            Built {
                snapshot: None,
                diagnostics: diags,
            }
        }
    }
}

/// What the admin API shows about configuration.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Version of the snapshot in force (0: none yet).
    pub version: u64,
    /// When it was published.
    pub last_change: Option<SystemTime>,
    /// What triggered it (`startup`, `file change`, `SIGHUP`...).
    pub last_change_source: String,
    /// Diagnostics of the snapshot in force.
    pub diagnostics: Vec<Diagnostic>,
    /// The last rejected attempt, if it came after the snapshot in force.
    pub rejected: Option<Rejected>,
    /// Reloads accepted since start.
    pub reloads: u64,
    /// Reloads rejected since start.
    pub rejections: u64,
}

/// A rejected config set.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejected {
    /// When.
    pub at: SystemTime,
    /// Trigger.
    pub source: String,
    /// Why (all diagnostics, errors included).
    pub diagnostics: Vec<Diagnostic>,
}

/// The snapshot in force and its status; shared by the proxy, the dataplane and admin.
pub struct Publisher {
    snapshot: ArcSwap<Snapshot>,
    status: Mutex<Status>,
    version_tx: watch::Sender<u64>,
}

impl Publisher {
    /// A publisher with an empty snapshot (version 0: not ready).
    pub fn new() -> Arc<Self> {
        let (version_tx, _) = watch::channel(0);
        Arc::new(Publisher {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            status: Mutex::new(Status::default()),
            version_tx,
        })
    }

    /// The snapshot in force (lock-free).
    pub fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// A copy of the status.
    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    /// Subscribe to version changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    /// Publish a built set, or record its rejection. Returns the new version when accepted.
    /// The building's garbage and the replaced snapshot go back to the OS on the way out.
    pub fn publish(&self, built: Built, source: &str) -> Option<u64> {
        let version = self.swap_in(built, source);
        crate::alloc::release_freed_memory();
        version
    }

    fn swap_in(&self, built: Built, source: &str) -> Option<u64> {
        let mut status = self.status.lock().expect("status lock");
        match built.snapshot {
            Some(mut snap) => {
                status.version += 1;
                snap.version = status.version;
                self.snapshot.store(Arc::new(snap));
                status.last_change = Some(SystemTime::now());
                status.last_change_source = source.to_string();
                status.diagnostics = built.diagnostics;
                status.rejected = None;
                status.reloads += 1;
                let v = status.version;
                drop(status);
                self.version_tx.send_replace(v);
                tracing::info!(version = v, source, "configuration published");
                Some(v)
            }
            None => {
                for d in built
                    .diagnostics
                    .iter()
                    .filter(|d| d.severity == Severity::Error)
                {
                    tracing::error!("{d}");
                }
                tracing::error!(
                    source,
                    version = status.version,
                    "configuration rejected, previous snapshot stays in force"
                );
                status.rejected = Some(Rejected {
                    at: SystemTime::now(),
                    source: source.to_string(),
                    diagnostics: built.diagnostics,
                });
                status.rejections += 1;
                None
            }
        }
    }
}

/// Watches configuration files and directories and republishes on change or SIGHUP.
pub struct FileSource {
    paths: Vec<PathBuf>,
    publisher: Arc<Publisher>,
    debounce: Duration,
}

impl FileSource {
    /// A source for `paths` publishing into `publisher`.
    pub fn new(paths: Vec<PathBuf>, publisher: Arc<Publisher>) -> Self {
        FileSource {
            paths,
            publisher,
            debounce: DEFAULT_DEBOUNCE,
        }
    }

    /// Build and publish once. Returns the diagnostics when the set is rejected.
    pub fn reload(&self, source: &str) -> Result<u64, Vec<Diagnostic>> {
        let built = build(&self.paths);
        let diags = built.diagnostics.clone();
        self.publisher.publish(built, source).ok_or(diags)
    }

    /// Watch on a thread of its own (off the data-plane runtime). The thread ends when the
    /// returned guard is dropped.
    pub fn spawn_watch(self) -> std::io::Result<WatchGuard> {
        use notify::{RecursiveMode, Watcher};
        let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
        let watched: Vec<PathBuf> = self
            .paths
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect();
        let files = watched.clone();
        let ev_tx = tx.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if ev.kind.is_access() {
                    return;
                }
                let relevant = ev
                    .paths
                    .iter()
                    .any(|p| files.iter().any(|w| p.starts_with(w) || p == w));
                if relevant {
                    let _ = ev_tx.send("file change");
                }
            }
        })
        .map_err(std::io::Error::other)?;
        for p in &watched {
            // Watch a file's directory: editors replace files by rename, which would end a
            // watch on the file itself.
            let (target, mode) = if p.is_dir() {
                (p.as_path(), RecursiveMode::Recursive)
            } else {
                (
                    p.parent().unwrap_or(Path::new("/")),
                    RecursiveMode::NonRecursive,
                )
            };
            watcher.watch(target, mode).map_err(std::io::Error::other)?;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        spawn_sighup(tx.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("config-watch".into())
            .spawn(move || {
                let _watcher = watcher;
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut reason) = rx.recv_timeout(Duration::from_millis(200)) else {
                        continue;
                    };
                    // Debounce: keep draining until the burst is over.
                    while let Ok(r) = rx.recv_timeout(self.debounce) {
                        if r == "SIGHUP" {
                            reason = r;
                        }
                    }
                    if let Err(diags) = self.reload(reason) {
                        tracing::warn!(
                            errors = diags.iter().filter(|d| d.is_error()).count(),
                            "reload rejected"
                        );
                    }
                }
            })?;
        Ok(WatchGuard {
            stop,
            thread: Some(thread),
        })
    }
}

fn spawn_sighup(
    tx: std::sync::mpsc::Sender<&'static str>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let _ = std::thread::Builder::new()
        .name("config-sighup".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(mut hup) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                else {
                    return;
                };
                loop {
                    tokio::select! {
                        r = hup.recv() => {
                            if r.is_none() || tx.send("SIGHUP").is_err() { return; }
                        }
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {
                            if stop.load(std::sync::atomic::Ordering::Relaxed) { return; }
                        }
                    }
                }
            });
        });
}

/// Stops the watch thread when dropped.
pub struct WatchGuard {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec:\n  hosts: [a.example]\n  addresses: [127.0.40.1]\n  resolution: STATIC\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints: [{address: 127.0.40.11}]\n";

    #[tokio::test]
    async fn edits_republish_and_broken_edits_keep_the_last_good_snapshot() {
        let dir = std::env::temp_dir().join(format!("np-publish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let publisher = Publisher::new();
        let source = FileSource::new(vec![file.clone()], publisher.clone());
        assert_eq!(source.reload("startup").expect("good config"), 1);
        let mut versions = publisher.subscribe();
        let _guard = source.spawn_watch().expect("watch");

        std::fs::write(&file, GOOD.replace("127.0.40.1]", "127.0.40.2]")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), versions.wait_for(|v| *v >= 2))
            .await
            .expect("reload seen")
            .unwrap();
        let snap = publisher.load();
        assert_eq!(snap.version, 2);
        assert!(
            snap.mesh_listener("127.0.40.2:80".parse().unwrap())
                .is_some()
        );

        std::fs::write(
            &file,
            GOOD.replace("resolution: STATIC", "resolution: [oops"),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while publisher.status().rejections == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "rejection not recorded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = publisher.status();
        assert_eq!(status.version, 2, "previous snapshot stays");
        assert!(
            status
                .rejected
                .expect("rejected")
                .diagnostics
                .iter()
                .any(|d| d.is_error())
        );
        assert_eq!(publisher.load().version, 2);
        std::fs::remove_dir_all(&dir).ok();
    }
}
