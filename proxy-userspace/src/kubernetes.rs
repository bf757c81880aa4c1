//! The Kubernetes configuration source: watches the API server and feeds the same
//! `ConfigSet` → analyze → compile → publish path as the file source.
//!
//! One watcher per resource (Services, EndpointSlices, Pods, Namespaces and the five Istio kinds
//! of `networking.istio.io` at the group's preferred served version) sends its events to one
//! task that owns a [`Store`]. The store keeps every object already parsed into the config model,
//! so a change re-parses one object and updates the set in place; the set is recompiled after a quiet
//! period (debounce) and published. Nothing is published before every watcher has listed once;
//! after that a failing watch backs off and resumes (the watcher re-lists on `410 Gone`) while
//! the last good snapshot keeps serving. An invalid object is left out with a warning instead of
//! rejecting the cluster's whole configuration: one team's typo must not freeze everyone else's
//! routing (Istio's validation webhook keeps such objects out; nodeproxy has no webhook).
//!
//! The same task reconciles enrollment ([`enroll`]) of this node's pods after each batch and on
//! a timer (a pod's network namespace appears a little after the pod object).

pub mod enroll;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroup;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{ConfigSet, ISTIO_NETWORKING_GROUP, Kind};
use crate::diagnostic::{Diagnostic, ObjectRef, Severity, Source};
use crate::publish::{Built, Publisher, build_set};

use self::enroll::{Enroller, Enrollment, NetnsLocator};

/// The Istio kinds watched, with their resource (plural) names.
pub const ISTIO_KINDS: [(Kind, &str); 5] = [
    (Kind::VirtualService, "virtualservices"),
    (Kind::DestinationRule, "destinationrules"),
    (Kind::Gateway, "gateways"),
    (Kind::ServiceEntry, "serviceentries"),
    (Kind::WorkloadEntry, "workloadentries"),
];

/// A watched resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// A kind of the config model.
    Config(Kind),
    /// Namespaces (labels for enrollment).
    Namespace,
}

impl Resource {
    /// The resource of an object with this `apiVersion` and `kind` (`None`: not watched).
    pub fn of(api_version: &str, kind: &str) -> Option<Resource> {
        if api_version == "v1" && kind == "Namespace" {
            return Some(Resource::Namespace);
        }
        Kind::from_api(api_version, kind)
            .ok()
            .flatten()
            .map(Resource::Config)
    }

    /// The resource of a JSON object from its own `apiVersion` and `kind`.
    pub fn of_json(value: &serde_json::Value) -> Option<Resource> {
        let s = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or("");
        Resource::of(s("apiVersion"), s("kind"))
    }
}

/// Source settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's name (`spec.nodeName` of the pods to enroll); `None`: enroll nothing.
    pub node_name: Option<String>,
    /// Quiet time after a change before recompiling.
    pub debounce: Duration,
    /// Longest a change waits while events keep coming.
    pub max_delay: Duration,
    /// How often pods still waiting for their network namespace are retried.
    pub enroll_retry: Duration,
    /// The cluster domain of service hosts.
    pub cluster_domain: crate::config::ClusterDomain,
    /// Where `credentialName` certificates are read.
    pub credentials_dir: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_name: None,
            debounce: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            enroll_retry: Duration::from_secs(2),
            cluster_domain: Default::default(),
            credentials_dir: None,
        }
    }
}

/// What one watched object contributed: how many objects of its kind it parsed into (0 when it
/// did not parse, else 1) and what loading it said.
#[derive(Debug, Clone, Default)]
struct Entry {
    count: usize,
    diagnostics: Vec<Diagnostic>,
}

type Key = (Kind, String, String);

/// Every object the source has seen, parsed, by resource and `namespace/name`.
///
/// The parsed objects live in one [`ConfigSet`], each kind's list in key order (the order a
/// fresh load of the objects sorted by key would give), and are updated in place: a build
/// borrows the set instead of assembling a copy of every object (at 10k services the copy
/// took ~40 ms of a ~280 ms rebuild, and held the whole configuration twice).
#[derive(Debug, Default)]
pub struct Store {
    objects: BTreeMap<Key, Entry>,
    set: ConfigSet,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Objects buffered during a (re)list, swapped in at its end.
    relisting: BTreeMap<Resource, Vec<serde_json::Value>>,
    synced: BTreeSet<Resource>,
}

/// `$body` with `$list` bound to `$set`'s list of `$kind` (`&mut Vec<Object<_>>`) and `$parsed`
/// to `$from`'s list of the same kind (moved out).
macro_rules! with_list {
    ($kind:expr, $set:expr, $from:expr, |$list:ident, $parsed:ident| $body:expr) => {
        match $kind {
            Kind::VirtualService => {
                let ($list, $parsed) = (&mut $set.virtual_services, $from.virtual_services);
                $body
            }
            Kind::DestinationRule => {
                let ($list, $parsed) = (&mut $set.destination_rules, $from.destination_rules);
                $body
            }
            Kind::Gateway => {
                let ($list, $parsed) = (&mut $set.gateways, $from.gateways);
                $body
            }
            Kind::ServiceEntry => {
                let ($list, $parsed) = (&mut $set.service_entries, $from.service_entries);
                $body
            }
            Kind::WorkloadEntry => {
                let ($list, $parsed) = (&mut $set.workload_entries, $from.workload_entries);
                $body
            }
            Kind::KubeService => {
                let ($list, $parsed) = (&mut $set.kube_services, $from.kube_services);
                $body
            }
            Kind::EndpointSlice => {
                let ($list, $parsed) = (&mut $set.endpoint_slices, $from.endpoint_slices);
                $body
            }
            Kind::Pod => {
                let ($list, $parsed) = (&mut $set.pods, $from.pods);
                $body
            }
        }
    };
}

/// A change the watchers report.
#[derive(Debug)]
pub enum Change {
    /// Added or modified.
    Apply(Resource, serde_json::Value),
    /// Deleted.
    Delete(Resource, serde_json::Value),
    /// A (re)list starts.
    Init(Resource),
    /// An object of the (re)list.
    InitApply(Resource, serde_json::Value),
    /// The (re)list is complete: it replaces everything known of the resource.
    InitDone(Resource),
}

fn meta_str<'a>(value: &'a serde_json::Value, key: &str) -> &'a str {
    value
        .get("metadata")
        .and_then(|m| m.get(key))
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

fn kube_source(kind: Kind, ns: &str, name: &str) -> Source {
    Source {
        file: PathBuf::from(format!("kubernetes:{}/{ns}/{name}", kind.as_str())),
        line: 0,
        document: 0,
    }
}

impl Store {
    /// Apply one change; returns whether anything changed.
    pub fn change(&mut self, change: Change) -> bool {
        match change {
            Change::Apply(r, v) => self.apply(r, &v),
            Change::Delete(r, v) => self.delete(r, &v),
            Change::Init(r) => {
                self.relisting.insert(r, Vec::new());
                false
            }
            Change::InitApply(r, v) => {
                self.relisting.entry(r).or_default().push(v);
                false
            }
            Change::InitDone(r) => {
                let items = self.relisting.remove(&r).unwrap_or_default();
                self.replace_all(r, items);
                self.synced.insert(r);
                true
            }
        }
    }

    /// Add or replace one object (JSON as the API server returns it).
    pub fn apply(&mut self, resource: Resource, value: &serde_json::Value) -> bool {
        let (ns, name) = (meta_str(value, "namespace"), meta_str(value, "name"));
        match resource {
            Resource::Namespace => {
                let labels: BTreeMap<String, String> = value
                    .get("metadata")
                    .and_then(|m| m.get("labels"))
                    .and_then(|l| serde_json::from_value(l.clone()).ok())
                    .unwrap_or_default();
                let old = self.namespaces.insert(name.to_string(), labels.clone());
                old.as_ref() != Some(&labels)
            }
            Resource::Config(kind) => {
                let key = (kind, ns.to_string(), name.to_string());
                let at = self.offset(&key);
                let old = self.objects.get(&key).map_or(0, |e| e.count);
                self.put(key, value, at, old);
                true
            }
        }
    }

    /// Parse `value` as the object of `key` and put what it gives in place of the `old`
    /// objects at `at` in its kind's list; returns how many objects it gave.
    fn put(&mut self, key: Key, value: &serde_json::Value, at: usize, old: usize) -> usize {
        let mut parsed = ConfigSet::default();
        let mut diagnostics = Vec::new();
        parsed.load_json(value, kube_source(key.0, &key.1, &key.2), &mut diagnostics);
        let count = with_list!(key.0, self.set, parsed, |list, parsed| {
            let n = parsed.len();
            list.splice(at..at + old, parsed);
            n
        });
        self.objects.insert(key, Entry { count, diagnostics });
        count
    }

    /// Where the objects of `key` start in their kind's list: after those of every smaller key
    /// of the same kind.
    fn offset(&self, key: &Key) -> usize {
        let first = (key.0, String::new(), String::new());
        self.objects
            .range(first..key.clone())
            .map(|(_, e)| e.count)
            .sum()
    }

    /// Remove one object.
    pub fn delete(&mut self, resource: Resource, value: &serde_json::Value) -> bool {
        let (ns, name) = (meta_str(value, "namespace"), meta_str(value, "name"));
        match resource {
            Resource::Namespace => self.namespaces.remove(name).is_some(),
            Resource::Config(kind) => {
                let key = (kind, ns.to_string(), name.to_string());
                let Some(entry) = self.objects.remove(&key) else {
                    return false;
                };
                let at = self.offset(&key);
                with_list!(kind, self.set, ConfigSet::default(), |list, _none| {
                    list.drain(at..at + entry.count);
                });
                true
            }
        }
    }

    /// Replace everything known of `resource` with a fresh list.
    pub fn replace_all(&mut self, resource: Resource, items: Vec<serde_json::Value>) {
        match resource {
            Resource::Namespace => {
                self.namespaces.clear();
                for item in &items {
                    self.apply(resource, item);
                }
            }
            Resource::Config(kind) => {
                self.objects.retain(|(k, _, _), _| *k != kind);
                with_list!(kind, self.set, ConfigSet::default(), |list, _none| list
                    .clear());
                // Parsed in key order and appended: one pass, not a positioned insert each.
                let mut sorted: BTreeMap<Key, &serde_json::Value> = BTreeMap::new();
                for item in &items {
                    let (ns, name) = (meta_str(item, "namespace"), meta_str(item, "name"));
                    sorted.insert((kind, ns.to_string(), name.to_string()), item);
                }
                let mut at = 0;
                for (key, item) in sorted {
                    at += self.put(key, item, at, 0);
                }
            }
        }
    }

    /// Has every resource in `expected` been listed at least once?
    pub fn synced(&self, expected: &BTreeSet<Resource>) -> bool {
        expected.is_subset(&self.synced)
    }

    /// Every Pod known.
    pub fn pods(&self) -> impl Iterator<Item = &crate::config::Object<crate::config::KubePod>> {
        self.set.pods.iter()
    }

    /// Labels of a namespace, if it is known.
    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(ns)
    }

    /// The objects as one config set, with what loading them said.
    pub fn config_set(&self) -> (&ConfigSet, Vec<Diagnostic>) {
        let diags = self
            .objects
            .values()
            .flat_map(|e| e.diagnostics.iter().cloned())
            .collect();
        (&self.set, diags)
    }

    /// Load, analyze and compile. Objects with errors are left out (and reported as warnings),
    /// so the rest of the cluster's configuration still applies; the set is rejected only when
    /// an error names no object.
    pub fn build(&self) -> Built {
        let (set, diags) = self.config_set();
        build_leaving_out_invalid(set, diags)
    }
}

/// Build `set`; while errors name objects, leave those objects out and build again (an object
/// left out can only remove references, so a few rounds settle; the bound is defensive).
/// The set is copied only when an object has to be left out.
pub fn build_leaving_out_invalid(set: &ConfigSet, load_diags: Vec<Diagnostic>) -> Built {
    let mut ignored: Vec<Diagnostic> = Vec::new();
    let mut diags = load_diags;
    let mut reduced: Option<ConfigSet> = None;
    for _ in 0..4 {
        let built = build_set(reduced.as_ref().unwrap_or(set), diags.clone());
        if built.snapshot.is_some() {
            return with_ignored(built, ignored);
        }
        let bad: BTreeSet<ObjectRef> = built
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .filter_map(|d| d.object.clone())
            .collect();
        let unnamed = built
            .diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error && d.object.is_none());
        if bad.is_empty() || unnamed {
            return with_ignored(built, ignored);
        }
        for d in built
            .diagnostics
            .into_iter()
            .filter(|d| d.severity == Severity::Error)
        {
            let mut d = d;
            d.severity = Severity::Warning;
            d.message = format!("object left out: {}", d.message);
            ignored.push(d);
        }
        reduced
            .get_or_insert_with(|| set.clone())
            .retain(|kind, ns, name| {
                !bad.contains(&ObjectRef {
                    kind: kind.to_string(),
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            });
        diags.retain(|d| d.severity != Severity::Error);
    }
    build_set(reduced.as_ref().unwrap_or(set), diags)
}

fn with_ignored(mut built: Built, ignored: Vec<Diagnostic>) -> Built {
    built.diagnostics.extend(ignored);
    built
}

/// Convert a watched object to JSON with its `apiVersion` and `kind` set (list items come
/// without them).
fn to_json<K: Serialize>(obj: &K, api_version: &str, kind: &str) -> Option<serde_json::Value> {
    let mut v = serde_json::to_value(obj).ok()?;
    let m = v.as_object_mut()?;
    m.insert("apiVersion".into(), api_version.into());
    m.insert("kind".into(), kind.into());
    Some(v)
}

/// Watch one resource, forwarding its events until the receiver is gone. Errors are logged and
/// retried with the watcher's backoff; the stream itself resumes from the last resourceVersion
/// (or re-lists when the server says it is too old).
async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    resource: Resource,
    api_version: String,
    kind: String,
    tx: mpsc::UnboundedSender<Change>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
    K: Send + 'static,
{
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(item) = stream.next().await {
        let json = |o: &K| to_json(o, &api_version, &kind);
        let change = match item {
            Ok(Event::Apply(o)) => json(&o).map(|v| Change::Apply(resource, v)),
            Ok(Event::Delete(o)) => json(&o).map(|v| Change::Delete(resource, v)),
            Ok(Event::Init) => Some(Change::Init(resource)),
            Ok(Event::InitApply(o)) => json(&o).map(|v| Change::InitApply(resource, v)),
            Ok(Event::InitDone) => {
                tracing::debug!(kind = %kind, "listed");
                Some(Change::InitDone(resource))
            }
            Err(e) => {
                tracing::warn!(kind = %kind, error = %e, "watch failed, retrying");
                None
            }
        };
        if let Some(c) = change
            && tx.send(c).is_err()
        {
            return;
        }
    }
}

/// The served version of `networking.istio.io` to watch (its preferred version), or `None`
/// when the group is not installed.
pub async fn istio_version(client: &Client) -> Result<Option<String>, kube::Error> {
    let req = http::Request::get(format!("/apis/{ISTIO_NETWORKING_GROUP}"))
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    match client.request::<APIGroup>(req).await {
        Ok(group) => Ok(group
            .preferred_version
            .map(|v| v.version)
            .or_else(|| group.versions.first().map(|v| v.version.clone()))),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// A running Kubernetes source; dropping it stops the watchers.
pub struct KubeSource {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Start watching. Returns once the watchers are started; the first snapshot is published
    /// when every resource has been listed (see [`Publisher::subscribe`]).
    pub async fn start(
        client: Client,
        publisher: Arc<Publisher>,
        opts: Options,
        enrollment: Option<(Arc<dyn Enroller>, Box<dyn NetnsLocator>)>,
    ) -> anyhow::Result<KubeSource> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        let mut expected = BTreeSet::new();
        let wc = watcher::Config::default;
        macro_rules! spawn_watch {
            ($ty:ty, $res:expr, $av:expr, $kind:expr, $cfg:expr) => {{
                expected.insert($res);
                tasks.push(tokio::spawn(watch::<$ty>(
                    Api::all(client.clone()),
                    $cfg,
                    $res,
                    $av.to_string(),
                    $kind.to_string(),
                    tx.clone(),
                )));
            }};
        }
        spawn_watch!(
            Service,
            Resource::Config(Kind::KubeService),
            "v1",
            "Service",
            wc()
        );
        spawn_watch!(
            EndpointSlice,
            Resource::Config(Kind::EndpointSlice),
            "discovery.k8s.io/v1",
            "EndpointSlice",
            wc().labels("kubernetes.io/service-name")
        );
        spawn_watch!(Pod, Resource::Config(Kind::Pod), "v1", "Pod", wc());
        spawn_watch!(Namespace, Resource::Namespace, "v1", "Namespace", wc());
        let version = loop {
            match istio_version(&client).await {
                Ok(v) => break v,
                Err(e) => {
                    tracing::warn!(error = %e, "API server discovery failed, retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        match version {
            Some(version) => {
                tracing::info!(%version, "watching {ISTIO_NETWORKING_GROUP}");
                for (kind, plural) in ISTIO_KINDS {
                    let gvk =
                        GroupVersionKind::gvk(ISTIO_NETWORKING_GROUP, &version, kind.as_str());
                    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
                    let res = Resource::Config(kind);
                    expected.insert(res);
                    tasks.push(tokio::spawn(watch::<DynamicObject>(
                        Api::all_with(client.clone(), &ar),
                        wc(),
                        res,
                        format!("{ISTIO_NETWORKING_GROUP}/{version}"),
                        kind.as_str().to_string(),
                        tx.clone(),
                    )));
                }
            }
            None => tracing::warn!(
                "{ISTIO_NETWORKING_GROUP} is not served (Istio CRDs not installed): only \
                 Kubernetes Services are routed; install deploy/crds.yaml and restart"
            ),
        }
        drop(tx);
        let enrollment = enrollment.and_then(|(enroller, locator)| {
            let node = opts.node_name.clone()?;
            Some(Enrollment::new(node, enroller, locator))
        });
        tasks.push(tokio::spawn(run_store(
            rx, expected, publisher, opts, enrollment,
        )));
        Ok(KubeSource { tasks })
    }
}

/// Own the store: apply changes, recompile after a quiet period, publish, reconcile enrollment.
async fn run_store(
    mut rx: mpsc::UnboundedReceiver<Change>,
    expected: BTreeSet<Resource>,
    publisher: Arc<Publisher>,
    opts: Options,
    mut enrollment: Option<Enrollment>,
) {
    let mut store = Store::default();
    store.set.cluster_domain = opts.cluster_domain.clone();
    store.set.credentials_dir = opts.credentials_dir.clone();
    let mut retry = tokio::time::interval(opts.enroll_retry);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => return,
            },
            _ = retry.tick() => {
                if store.synced(&expected) && let Some(e) = enrollment.as_mut() {
                    e.reconcile(&store);
                }
                continue;
            }
        };
        let mut dirty = store.change(first);
        // Debounce: take more changes until a quiet period or the longest wait.
        let deadline = tokio::time::Instant::now() + opts.max_delay;
        loop {
            let quiet = tokio::time::Instant::now() + opts.debounce;
            match tokio::time::timeout_at(quiet.min(deadline), rx.recv()).await {
                Ok(Some(c)) => dirty |= store.change(c),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        if !dirty || !store.synced(&expected) {
            continue;
        }
        let built = store.build();
        publisher.publish(built, "kubernetes");
        if let Some(e) = enrollment.as_mut() {
            e.reconcile(&store);
        }
    }
}

/// A client for `--source kubernetes`: in-cluster config, else `KUBECONFIG`/`~/.kube/config`.
pub async fn client() -> anyhow::Result<Client> {
    use anyhow::Context;
    let config = kube::Config::infer()
        .await
        .context("Kubernetes client configuration (in-cluster service account or KUBECONFIG)")?;
    Client::try_from(config).context("Kubernetes client")
}
