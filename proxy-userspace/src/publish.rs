//! Publishing: turn config paths into the snapshot in force and keep it current.
//!
//! [`build`] runs load → analyze → compile. A [`Publisher`] holds the snapshot in an
//! `ArcSwap` (readers never block) plus the status the admin API shows. [`FileSource`] watches
//! the paths (inotify through `notify`, and SIGHUP) on its own thread, debounces bursts of
//! events, and publishes each good set; a set with errors is rejected whole, its diagnostics are
//! logged and kept, and the last good snapshot stays in force.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::analyze::analyze;
use crate::compile::{Snapshot, compile};
use crate::config::ConfigSet;
use crate::diagnostic::{Diagnostic, Severity, has_errors};

mod files;
pub use files::{FileSource, Reload, SETTLE, WRITE_WAIT, WatchGuard};

/// How long to wait for more file events before reloading (editors write in bursts).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// The source name of the first load, whose rejection stops the process.
pub const STARTUP: &str = "startup";

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
                // At startup the caller refuses to start and prints the diagnostics itself.
                if source != STARTUP {
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
                }
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
        let mut source = FileSource::new(vec![file.clone()], publisher.clone());
        assert!(matches!(source.reload("startup"), Reload::Published(1)));
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
