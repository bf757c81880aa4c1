//! The file source: `--config` paths, watched, published through a [`Publisher`].
//!
//! What an editor, a shell or a ConfigMap mount does to a file must never reach the data path
//! half done, so a reload happens only when the files are whole:
//!
//! - **Written, then closed.** A file modified since it was last closed (inotify `MODIFY`
//!   without `CLOSE_WRITE`: `cmd > canary.yaml` while `cmd` runs, a slow writer) is waited
//!   for, up to [`WRITE_WAIT`] after its last change; then the burst is debounced.
//! - **Emptied is not deleted.** A file that declared objects and now declares none (`: >
//!   canary.yaml`, an empty file renamed over it) is an error diagnostic (NP0006) and the set
//!   is refused: a file source that suddenly serves nothing is almost always an accident.
//!   Objects are removed by deleting the file (or their documents); deleting every file
//!   removes everything, as Istio would.
//! - **Shrunk while fresh is not believed yet.** A file that lost objects and changed less
//!   than [`SETTLE`] ago (written in parts, each part closed) is read again once it has been
//!   quiet that long.
//! - **Same bytes, same version.** A read whose files are byte-for-byte the last accepted
//!   ones publishes nothing.
//!
//! What is watched follows every link: the directory of each configured path (recursively
//! for a directory), and the directory of every link and final target met on the way to
//! each file, re-armed after each reload. A Kubernetes ConfigMap mount (`canary.yaml ->
//! ..data/canary.yaml`, `..data -> ..2026_12_07_…`, updated by renaming `..data`) therefore
//! reloads on every swap. Events for names that cannot be configuration (`.log`, hidden
//! files, our own reads) are dropped before they wake anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};

use super::{DEFAULT_DEBOUNCE, Publisher, build_set};
use crate::config::{ConfigSet, collect_files, document_count, is_config_name, read_files};
use crate::diagnostic::{Diagnostic, Severity, Source, codes};

/// How long a file modified and not yet closed is waited for before it is read anyway.
pub const WRITE_WAIT: Duration = Duration::from_secs(2);

/// How long a file that lost objects must be quiet before the loss is believed.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What one file held at the last accepted read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileRead {
    objects: usize,
    digest: u64,
}

/// What a reload did.
#[derive(Debug)]
pub enum Reload {
    /// A new snapshot is in force.
    Published(u64),
    /// The files are the ones in force, byte for byte: nothing to do.
    Unchanged,
    /// A file lost objects while it was still changing: read again after this long.
    Deferred(Duration),
    /// Refused; the previous snapshot stays. Every diagnostic of the attempt.
    Rejected(Vec<Diagnostic>),
}

/// Watches configuration files and directories and republishes on change or SIGHUP.
pub struct FileSource {
    paths: Vec<PathBuf>,
    publisher: Arc<Publisher>,
    debounce: Duration,
    /// Per file, what the snapshot in force was built from.
    accepted: Option<BTreeMap<PathBuf, FileRead>>,
    cluster_domain: crate::config::ClusterDomain,
    credentials_dir: Option<PathBuf>,
}

impl FileSource {
    /// A source for `paths` publishing into `publisher`.
    pub fn new(paths: Vec<PathBuf>, publisher: Arc<Publisher>) -> Self {
        FileSource {
            paths,
            publisher,
            debounce: DEFAULT_DEBOUNCE,
            accepted: None,
            cluster_domain: Default::default(),
            credentials_dir: None,
        }
    }

    /// Read `credentialName` certificates (DestinationRule TLS) from `dir`.
    pub fn with_credentials_dir(mut self, dir: PathBuf) -> Self {
        self.credentials_dir = Some(dir);
        self
    }

    /// Expand short host names into `domain` instead of `cluster.local`.
    pub fn with_cluster_domain(mut self, domain: crate::config::ClusterDomain) -> Self {
        self.cluster_domain = domain;
        self
    }

    /// Read, check against the last accepted read, build and publish.
    pub fn reload(&mut self, source: &str) -> Reload {
        let (texts, mut diags) = read_files(&self.paths);
        let files: BTreeMap<PathBuf, FileRead> = texts
            .iter()
            .map(|(p, text)| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                text.hash(&mut h);
                (
                    p.clone(),
                    FileRead {
                        objects: document_count(text),
                        digest: h.finish(),
                    },
                )
            })
            .collect();
        if diags.is_empty() && self.accepted.as_ref() == Some(&files) {
            return Reload::Unchanged;
        }
        for (path, now) in &files {
            let before = self.accepted.as_ref().and_then(|a| a.get(path));
            match before {
                Some(b) if now.objects == 0 && b.objects > 0 => diags.push(file_diagnostic(
                    codes::EMPTIED_FILE,
                    Severity::Error,
                    path,
                    format!(
                        "the file declared {} object(s) and is now empty: nothing was applied and the previous configuration stays in force. To remove its objects, delete the file (or their documents) instead of emptying it",
                        b.objects
                    ),
                )),
                Some(b) if now.objects < b.objects => {
                    if let Some(age) = modified_ago(path)
                        && age < SETTLE
                    {
                        return Reload::Deferred(SETTLE - age);
                    }
                }
                _ if now.objects == 0 => diags.push(file_diagnostic(
                    codes::EMPTY_FILE,
                    Severity::Warning,
                    path,
                    "the file declares no objects".into(),
                )),
                _ => {}
            }
        }
        let (mut set, load_diags) = ConfigSet::load_texts(&texts);
        set.cluster_domain = self.cluster_domain.clone();
        set.credentials_dir = self.credentials_dir.clone();
        diags.extend(load_diags);
        let built = build_set(&set, diags);
        let all = built.diagnostics.clone();
        match self.publisher.publish(built, source) {
            Some(v) => {
                self.accepted = Some(files);
                Reload::Published(v)
            }
            None => Reload::Rejected(all),
        }
    }

    /// Watch on a thread of its own (off the data-plane runtime). The thread ends when the
    /// returned guard is dropped.
    pub fn spawn_watch(self) -> std::io::Result<WatchGuard> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let ev_tx = tx.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && interesting(&ev.kind)
            {
                let _ = ev_tx.send(Msg::Event(ev));
            }
        })
        .map_err(std::io::Error::other)?;
        let mut state = WatchState {
            source: self,
            rx,
            watcher,
            armed: BTreeMap::new(),
            links: BTreeSet::new(),
            writing: HashMap::new(),
            pending: None,
        };
        state.arm();
        let stop = Arc::new(AtomicBool::new(false));
        spawn_sighup(tx, stop.clone());
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("config-watch".into())
            .spawn(move || state.run(&stop2))?;
        Ok(WatchGuard {
            stop,
            thread: Some(thread),
        })
    }
}

fn file_diagnostic(
    code: crate::diagnostic::Code,
    severity: Severity,
    path: &Path,
    message: String,
) -> Diagnostic {
    let mut d = Diagnostic::new(code, severity, message);
    d.source = Some(Source {
        file: path.to_path_buf(),
        line: 0,
        document: 0,
    });
    d
}

fn modified_ago(path: &Path) -> Option<Duration> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(SystemTime::now().duration_since(m).unwrap_or_default())
}

enum Msg {
    Event(notify::Event),
    Hup,
}

/// Events that can mean a change: writes, closes after writing, creations, removals,
/// renames. Opens and reads (ours included) never wake the watcher.
fn interesting(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

struct WatchState {
    source: FileSource,
    rx: mpsc::Receiver<Msg>,
    watcher: notify::RecommendedWatcher,
    /// Directories watched, and how.
    armed: BTreeMap<PathBuf, RecursiveMode>,
    /// Every path met on the way to a configuration file: configured paths, links, targets.
    links: BTreeSet<PathBuf>,
    /// Files modified and not closed since, with their last modification.
    writing: HashMap<PathBuf, Instant>,
    /// A reload is due at this instant, for this reason.
    pending: Option<(Instant, &'static str)>,
}

impl WatchState {
    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = self
                .pending
                .map_or(Duration::from_millis(200), |(at, _)| {
                    at.saturating_duration_since(now)
                })
                .min(Duration::from_millis(200));
            match self.rx.recv_timeout(wait).ok() {
                Some(Msg::Hup) => self.schedule("SIGHUP"),
                Some(Msg::Event(ev)) => self.on_event(&ev),
                None => {}
            }
            let Some((at, reason)) = self.pending else {
                continue;
            };
            let now = Instant::now();
            if now < at {
                continue;
            }
            // A writer still holds a file: wait for its close, within reason.
            self.writing
                .retain(|_, last| now.duration_since(*last) < WRITE_WAIT);
            if let Some(last) = self.writing.values().max() {
                self.pending = Some((*last + WRITE_WAIT, reason));
                continue;
            }
            self.pending = None;
            match self.source.reload(reason) {
                Reload::Published(v) => tracing::debug!(version = v, reason, "reloaded"),
                Reload::Unchanged => tracing::debug!(reason, "files unchanged"),
                Reload::Deferred(d) => self.pending = Some((Instant::now() + d, reason)),
                Reload::Rejected(diags) => tracing::warn!(
                    errors = diags.iter().filter(|d| d.is_error()).count(),
                    "reload rejected"
                ),
            }
            self.arm();
        }
    }

    /// Reload after the debounce; SIGHUP names the reason over file changes.
    fn schedule(&mut self, reason: &'static str) {
        let reason = match self.pending {
            Some((_, "SIGHUP")) => "SIGHUP",
            _ => reason,
        };
        self.pending = Some((Instant::now() + self.source.debounce, reason));
    }

    fn on_event(&mut self, ev: &notify::Event) {
        let relevant: Vec<&PathBuf> = ev.paths.iter().filter(|p| self.relevant(p)).collect();
        if relevant.is_empty() {
            return;
        }
        match ev.kind {
            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                for p in relevant {
                    self.writing.insert(p.clone(), Instant::now());
                }
            }
            EventKind::Access(_) | EventKind::Remove(_) => {
                for p in relevant {
                    self.writing.remove(p);
                }
            }
            _ => {}
        }
        self.schedule("file change");
    }

    /// Whether a change to `p` can change the configuration.
    fn relevant(&self, p: &Path) -> bool {
        if self.links.contains(p) {
            return true;
        }
        let Some(name) = p.file_name() else {
            return false;
        };
        if is_config_name(name) {
            return true;
        }
        // A directory appearing or going away (a configured directory's subdirectory); files
        // of any other name never hold configuration.
        !name.to_string_lossy().starts_with('.')
            && p.extension().is_none()
            && std::fs::metadata(p).map_or(true, |m| m.is_dir())
    }

    /// Watch what the configured paths go through now; drop what they no longer do.
    fn arm(&mut self) {
        let mut want: BTreeMap<PathBuf, RecursiveMode> = BTreeMap::new();
        let mut links = BTreeSet::new();
        for configured in &self.source.paths {
            let configured = absolute(configured);
            links.insert(configured.clone());
            if std::fs::metadata(&configured).is_ok_and(|m| m.is_dir()) {
                want.insert(configured.clone(), RecursiveMode::Recursive);
            } else if let Some(parent) = configured.parent() {
                want.entry(parent.to_path_buf())
                    .or_insert(RecursiveMode::NonRecursive);
            }
            let files = collect_files(&configured).unwrap_or_default();
            for file in files.iter().chain(std::iter::once(&configured)) {
                for hop in resolution(file) {
                    if let Some(parent) = hop.parent() {
                        want.entry(parent.to_path_buf())
                            .or_insert(RecursiveMode::NonRecursive);
                    }
                    links.insert(hop);
                }
            }
        }
        // A directory below a recursively watched one is covered already.
        let recursive: Vec<PathBuf> = want
            .iter()
            .filter(|(_, m)| **m == RecursiveMode::Recursive)
            .map(|(p, _)| p.clone())
            .collect();
        want.retain(|p, m| {
            *m == RecursiveMode::Recursive || !recursive.iter().any(|r| p.starts_with(r))
        });
        for (dir, mode) in &self.armed {
            if want.get(dir) != Some(mode) {
                let _ = self.watcher.unwatch(dir);
            }
        }
        let mut armed = BTreeMap::new();
        for (dir, mode) in want {
            if self.armed.get(&dir) == Some(&mode) {
                armed.insert(dir, mode);
                continue;
            }
            match self.watcher.watch(&dir, mode) {
                Ok(()) => {
                    armed.insert(dir, mode);
                }
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch"),
            }
        }
        self.armed = armed;
        self.links = links;
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
    }
}

/// Every path met while resolving `path`: the path itself, each link (as written, before it
/// is followed) and the final target. Stops after 40 links (a loop).
fn resolution(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![absolute(path)];
    let start = absolute(path);
    let mut rest: Vec<PathBuf> = start
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = rest.pop() {
        if c.as_os_str() == ".." {
            cur.pop();
            continue;
        }
        if c.as_os_str() == "." {
            continue;
        }
        let next = cur.join(&c);
        match std::fs::read_link(&next) {
            Ok(target) if hops < 40 => {
                hops += 1;
                out.push(next.clone());
                let target = if target.is_absolute() {
                    target
                } else {
                    cur.join(target)
                };
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                rest.extend(
                    target
                        .components()
                        .rev()
                        .filter(|c| !matches!(c, Component::RootDir))
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            _ => cur = next,
        }
    }
    out.push(cur);
    out.dedup();
    out
}

fn spawn_sighup(tx: mpsc::Sender<Msg>, stop: Arc<AtomicBool>) {
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
                            if r.is_none() || tx.send(Msg::Hup).is_err() { return; }
                        }
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {
                            if stop.load(Ordering::Relaxed) { return; }
                        }
                    }
                }
            });
        });
}

/// Stops the watch thread when dropped.
pub struct WatchGuard {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
