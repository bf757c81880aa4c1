//! Istio configuration as typed serde structs, and loading it from YAML files.
//!
//! Input: paths to files or directories of `.yaml`/`.yml` (multi-document). Output: a
//! [`ConfigSet`] holding every Istio networking object (any of `v1alpha3`, `v1beta1`, `v1`) and
//! the Kubernetes Services found beside them, plus load diagnostics: parse errors naming file,
//! line, object and field path; one info line per skipped kind; a warning per [later] field.
//! Objects without a namespace are in `default`.

pub mod common;
pub mod destination_rule;
mod files;
pub mod gateway;
pub mod kubernetes;
mod later;
pub mod service_entry;
pub mod virtual_service;

pub use files::{collect_files, document_count, is_config_name, read_files};
use later::report_later_fields;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use self::common::*;
pub use self::destination_rule::*;
pub use self::gateway::*;
pub use self::kubernetes::*;
pub use self::service_entry::*;
pub use self::virtual_service::*;
use crate::diagnostic::{Diagnostic, ObjectRef, Severity, Source, codes};

/// The namespace of objects that do not name one.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Istio's API group for traffic management.
pub const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";
/// Versions of the group that share one schema.
pub const ISTIO_VERSIONS: [&str; 3] = ["v1alpha3", "v1beta1", "v1"];

/// `metadata` of an object, the fields nodeproxy uses.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// `metadata.name`.
    #[serde(default)]
    pub name: String,
    /// `metadata.namespace` (default `default`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The API server's unique id (objects read from Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// RFC 3339 creation time; orders conflicting VirtualServices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

/// One object of the set: its identity, where it came from, and its spec.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Object<T> {
    /// `metadata.name`.
    pub name: String,
    /// Namespace, `default` when unset.
    pub namespace: String,
    /// Labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Kubernetes uid, when read from the API server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Creation time if the object carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// File and line it was read from.
    pub source: Source,
    /// The typed spec.
    pub spec: T,
}

impl<T> Object<T> {
    /// `kind/namespace/name` for diagnostics.
    pub fn object_ref(&self, kind: &str) -> ObjectRef {
        ObjectRef {
            kind: kind.to_string(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// Every object nodeproxy uses, in load order (file order, then document order).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigSet {
    /// VirtualServices.
    pub virtual_services: Vec<Object<VirtualService>>,
    /// DestinationRules.
    pub destination_rules: Vec<Object<DestinationRule>>,
    /// Gateways.
    pub gateways: Vec<Object<Gateway>>,
    /// ServiceEntries.
    pub service_entries: Vec<Object<ServiceEntry>>,
    /// WorkloadEntries.
    pub workload_entries: Vec<Object<WorkloadEntry>>,
    /// Kubernetes Services (registry entries with `<name>.<ns>.svc.<cluster domain>` hosts).
    pub kube_services: Vec<Object<KubeService>>,
    /// Kubernetes EndpointSlices (a Service's endpoints).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoint_slices: Vec<Object<KubeEndpointSlice>>,
    /// Kubernetes Pods (labels of endpoints and clients, selector targets without slices).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<Object<KubePod>>,
    /// The cluster domain short host names expand into (`--cluster-domain`).
    #[serde(skip)]
    pub cluster_domain: ClusterDomain,
    /// Where `credentialName` certificates are read (`--credentials-dir`); None for
    /// `validate` and `simulate`, which read no certificates.
    #[serde(skip)]
    pub credentials_dir: Option<std::path::PathBuf>,
}

/// A Kubernetes namespace or other DNS-1123 label: 1-63 of `a-z0-9-`, alphanumeric at both
/// ends.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The Kubernetes cluster domain (`<name>.<ns>.svc.<domain>`), `cluster.local` by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDomain(String);

/// The cluster domain used when none is set.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

impl Default for ClusterDomain {
    fn default() -> Self {
        ClusterDomain(DEFAULT_CLUSTER_DOMAIN.into())
    }
}

impl ClusterDomain {
    /// A cluster domain: a DNS name (dots around it dropped, lowercased).
    pub fn new(domain: &str) -> Result<ClusterDomain, String> {
        let d = domain.trim_matches('.').to_ascii_lowercase();
        if d.is_empty() || d.split('.').any(|l| l.is_empty() || l.len() > 63) {
            return Err(format!("cluster domain `{domain}` is not a DNS name"));
        }
        Ok(ClusterDomain(d))
    }

    /// The domain.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ClusterDomain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ClusterDomain::new(s)
    }
}

/// Istio kinds nodeproxy models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `VirtualService`.
    VirtualService,
    /// `DestinationRule`.
    DestinationRule,
    /// `Gateway`.
    Gateway,
    /// `ServiceEntry`.
    ServiceEntry,
    /// `WorkloadEntry`.
    WorkloadEntry,
    /// Kubernetes `Service` (core/v1).
    KubeService,
    /// Kubernetes `EndpointSlice` (discovery.k8s.io/v1).
    EndpointSlice,
    /// Kubernetes `Pod` (core/v1).
    Pod,
}

impl Kind {
    /// The `kind:` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::KubeService => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }

    /// The kind of an object with this `apiVersion` and `kind` (`None`: not used by nodeproxy).
    pub fn from_api(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
        if let Some(version) = api_version.strip_prefix("networking.istio.io/") {
            let k = match kind {
                "VirtualService" => Kind::VirtualService,
                "DestinationRule" => Kind::DestinationRule,
                "Gateway" => Kind::Gateway,
                "ServiceEntry" => Kind::ServiceEntry,
                "WorkloadEntry" => Kind::WorkloadEntry,
                _ => return Ok(None),
            };
            if !ISTIO_VERSIONS.contains(&version) {
                return Err(format!(
                    "unknown apiVersion `{api_version}` (expected one of networking.istio.io/v1alpha3, v1beta1, v1)"
                ));
            }
            return Ok(Some(k));
        }
        Ok(match (api_version, kind) {
            ("v1", "Service") => Some(Kind::KubeService),
            ("v1", "Pod") => Some(Kind::Pod),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            _ => None,
        })
    }
}

impl ConfigSet {
    /// Append every object of `other`.
    pub fn extend(&mut self, other: ConfigSet) {
        self.virtual_services.extend(other.virtual_services);
        self.destination_rules.extend(other.destination_rules);
        self.gateways.extend(other.gateways);
        self.service_entries.extend(other.service_entries);
        self.workload_entries.extend(other.workload_entries);
        self.kube_services.extend(other.kube_services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.pods.extend(other.pods);
    }

    /// Keep the objects for which `keep(kind, namespace, name)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str, &str) -> bool) {
        fn each<T>(
            v: &mut Vec<Object<T>>,
            kind: Kind,
            keep: &mut impl FnMut(&str, &str, &str) -> bool,
        ) {
            v.retain(|o| keep(kind.as_str(), &o.namespace, &o.name));
        }
        each(&mut self.virtual_services, Kind::VirtualService, &mut keep);
        each(
            &mut self.destination_rules,
            Kind::DestinationRule,
            &mut keep,
        );
        each(&mut self.gateways, Kind::Gateway, &mut keep);
        each(&mut self.service_entries, Kind::ServiceEntry, &mut keep);
        each(&mut self.workload_entries, Kind::WorkloadEntry, &mut keep);
        each(&mut self.kube_services, Kind::KubeService, &mut keep);
        each(&mut self.endpoint_slices, Kind::EndpointSlice, &mut keep);
        each(&mut self.pods, Kind::Pod, &mut keep);
    }

    /// Load every path (file or directory, recursively, `.yaml`/`.yml` in name order).
    /// Returns what could be loaded and the diagnostics; an unreadable path is an error
    /// diagnostic, never a panic.
    pub fn load(paths: &[PathBuf]) -> (ConfigSet, Vec<Diagnostic>) {
        let (texts, mut diags) = read_files(paths);
        let (set, load_diags) = ConfigSet::load_texts(&texts);
        diags.extend(load_diags);
        (set, diags)
    }

    /// Load files already read (`(path, text)` in order), as [`ConfigSet::load`] does.
    pub fn load_texts(texts: &[(PathBuf, String)]) -> (ConfigSet, Vec<Diagnostic>) {
        let mut diags = Vec::new();
        // Documents are independent: parse them on every core (10k services are 20k documents),
        // then merge in file and document order so objects and diagnostics keep that order.
        let docs: Vec<(Source, &str)> = texts
            .iter()
            .flat_map(|(file, text)| {
                // A UTF-8 byte-order mark (Windows editors) is not part of the first document.
                split_documents(text)
                    .into_iter()
                    .enumerate()
                    .map(move |(document, (line, doc))| {
                        let source = Source {
                            file: file.clone(),
                            line,
                            document,
                        };
                        (source, doc)
                    })
            })
            .collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(docs.len() / 256 + 1);
        let chunk = docs.len().div_ceil(threads).max(1);
        let parts: Vec<(ConfigSet, Vec<Diagnostic>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = docs
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        let mut set = ConfigSet::default();
                        let mut diags = Vec::new();
                        for (source, doc) in part {
                            set.load_document(doc, source.clone(), &mut diags);
                        }
                        (set, diags)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("config loader thread"))
                .collect()
        });
        let mut set = ConfigSet::default();
        for (part, part_diags) in parts {
            set.extend(part);
            diags.extend(part_diags);
        }
        set.check_duplicates(&mut diags);
        (set, diags)
    }

    /// Load a multi-document YAML text as if read from `file`.
    pub fn load_str(&mut self, file: &Path, text: &str, diags: &mut Vec<Diagnostic>) {
        for (index, (line, doc)) in split_documents(text).into_iter().enumerate() {
            let source = Source {
                file: file.to_path_buf(),
                line,
                document: index,
            };
            self.load_document(doc, source, diags);
        }
    }

    /// Load one object as the API server returns it (JSON). `source` names where it came from
    /// (`kubernetes`, with the document index unused).
    pub fn load_json(
        &mut self,
        value: &serde_json::Value,
        source: Source,
        diags: &mut Vec<Diagnostic>,
    ) {
        match serde_yaml::to_value(value) {
            Ok(v) => self.load_value(
                Doc {
                    text: None,
                    value: &v,
                },
                source,
                diags,
            ),
            Err(e) => diags.push(
                Diagnostic::new(
                    codes::PARSE_ERROR,
                    Severity::Error,
                    format!("invalid object: {e}"),
                )
                .on(
                    ObjectRef {
                        kind: "<unknown>".into(),
                        namespace: String::new(),
                        name: String::new(),
                    },
                    source,
                ),
            ),
        }
    }

    /// Parse one document; on failure record a diagnostic and load nothing from it.
    fn load_document(&mut self, doc: &str, source: Source, diags: &mut Vec<Diagnostic>) {
        let value: serde_yaml::Value = match serde_yaml::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                let mut src = source.clone();
                if let Some(loc) = e.location() {
                    src.line += loc.line().saturating_sub(1);
                }
                let mut d = Diagnostic::new(
                    codes::PARSE_ERROR,
                    Severity::Error,
                    format!("invalid YAML: {e}"),
                );
                d.source = Some(src);
                diags.push(d);
                return;
            }
        };
        self.load_value(
            Doc {
                text: Some(doc),
                value: &value,
            },
            source,
            diags,
        );
    }

    fn load_value(&mut self, doc: Doc<'_>, source: Source, diags: &mut Vec<Diagnostic>) {
        let value = doc.value;
        if value.is_null() {
            return; // empty document (comments only, trailing `---`)
        }
        let str_at = |k: &str| {
            value
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let api_version = str_at("apiVersion");
        let kind_name = str_at("kind");
        let meta = value.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_string();
        let obj = ObjectRef {
            kind: if kind_name.is_empty() {
                "<no kind>".into()
            } else {
                kind_name.clone()
            },
            namespace,
            name: if name.is_empty() {
                "<no name>".into()
            } else {
                name.clone()
            },
        };
        if kind_name == "List" && api_version == "v1" {
            if let Some(items) = value.get("items").and_then(|v| v.as_sequence()) {
                for item in items {
                    let item = Doc {
                        text: None,
                        value: item,
                    };
                    self.load_value(item, source.clone(), diags);
                }
            }
            return;
        }
        let kind = match Kind::from_api(&api_version, &kind_name) {
            Ok(Some(k)) => k,
            Ok(None) => {
                let what = if api_version.is_empty() && kind_name.is_empty() {
                    "document has no apiVersion/kind, skipped".to_string()
                } else {
                    format!("{api_version} {kind_name} is not used by nodeproxy, skipped")
                };
                diags.push(
                    Diagnostic::new(codes::SKIPPED_KIND, Severity::Info, what).on(obj, source),
                );
                return;
            }
            Err(msg) => {
                diags.push(
                    Diagnostic::new(codes::PARSE_ERROR, Severity::Error, msg)
                        .on(obj, source)
                        .at("apiVersion"),
                );
                return;
            }
        };
        if name.is_empty() {
            diags.push(
                Diagnostic::new(
                    codes::PARSE_ERROR,
                    Severity::Error,
                    "object has no metadata.name",
                )
                .on(obj.clone(), source.clone())
                .at("metadata.name"),
            );
            return;
        }
        let (o, s) = (&obj, &source);
        let ok = match kind {
            Kind::VirtualService => {
                push::<Spec<_>, _>(doc, o, s, diags, &mut self.virtual_services)
            }
            Kind::DestinationRule => {
                push::<Spec<_>, _>(doc, o, s, diags, &mut self.destination_rules)
            }
            Kind::Gateway => push::<Spec<_>, _>(doc, o, s, diags, &mut self.gateways),
            Kind::ServiceEntry => push::<Spec<_>, _>(doc, o, s, diags, &mut self.service_entries),
            Kind::WorkloadEntry => push::<Spec<_>, _>(doc, o, s, diags, &mut self.workload_entries),
            Kind::KubeService => push::<Spec<_>, _>(doc, o, s, diags, &mut self.kube_services),
            Kind::EndpointSlice => push::<Whole<_>, _>(doc, o, s, diags, &mut self.endpoint_slices),
            Kind::Pod => push::<Whole<_>, _>(doc, o, s, diags, &mut self.pods),
        };
        if ok && !matches!(kind, Kind::KubeService | Kind::EndpointSlice | Kind::Pod) {
            report_later_fields(kind, value, &obj, &source, diags);
        }
    }

    /// Two objects with one identity: the later one is reported (Kubernetes would have
    /// replaced it; silently keeping both hides a mistake).
    fn check_duplicates(&self, diags: &mut Vec<Diagnostic>) {
        fn check<T>(kind: &str, objs: &[Object<T>], diags: &mut Vec<Diagnostic>) {
            let mut seen: BTreeMap<(&str, &str), &Source> = BTreeMap::new();
            for o in objs {
                if let Some(first) = seen.insert((&o.namespace, &o.name), &o.source) {
                    diags.push(
                        Diagnostic::new(
                            codes::DUPLICATE_OBJECT,
                            Severity::Error,
                            format!("defined twice (first at {first})"),
                        )
                        .on(o.object_ref(kind), o.source.clone()),
                    );
                }
            }
        }
        check("VirtualService", &self.virtual_services, diags);
        check("DestinationRule", &self.destination_rules, diags);
        check("Gateway", &self.gateways, diags);
        check("ServiceEntry", &self.service_entries, diags);
        check("WorkloadEntry", &self.workload_entries, diags);
        check("Service", &self.kube_services, diags);
        check("EndpointSlice", &self.endpoint_slices, diags);
        check("Pod", &self.pods, diags);
    }
}

/// One document, parsed; with its text when read from a file (errors then name their line).
#[derive(Clone, Copy)]
struct Doc<'a> {
    text: Option<&'a str>,
    value: &'a serde_yaml::Value,
}

/// How an object's payload sits in the document.
trait Envelope<T>: DeserializeOwned {
    fn parts(self) -> (ObjectMeta, T);
}

/// Istio kinds and Services: the payload is `spec`.
#[derive(Deserialize)]
struct Spec<T> {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default = "Option::default")]
    spec: Option<T>,
}

impl<T: DeserializeOwned + Default> Envelope<T> for Spec<T> {
    fn parts(self) -> (ObjectMeta, T) {
        (self.metadata, self.spec.unwrap_or_default())
    }
}

/// Pods and EndpointSlices: the payload is the whole object (`spec` + `status`, `endpoints`).
#[derive(Deserialize)]
struct Whole<T> {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(flatten)]
    body: T,
}

impl<T: DeserializeOwned> Envelope<T> for Whole<T> {
    fn parts(self) -> (ObjectMeta, T) {
        (self.metadata, self.body)
    }
}

/// Deserialize `doc` through envelope `E` with field-path tracking; push on success.
fn push<E: Envelope<T>, T>(
    doc: Doc<'_>,
    obj: &ObjectRef,
    source: &Source,
    diags: &mut Vec<Diagnostic>,
    into: &mut Vec<Object<T>>,
) -> bool {
    // The document is already parsed: deserialize from the value (no second YAML scan). Only
    // when that fails is it deserialized again with path tracking, from the text when there is
    // one, so the error names the field and its line.
    let parsed = match E::deserialize(doc.value) {
        Ok(env) => Ok(env),
        Err(_) => match doc.text {
            Some(text) => {
                serde_path_to_error::deserialize::<_, E>(serde_yaml::Deserializer::from_str(text))
            }
            None => serde_path_to_error::deserialize::<_, E>(doc.value),
        },
    };
    match parsed {
        Ok(env) => {
            let (meta, spec) = env.parts();
            into.push(Object {
                name: meta.name,
                namespace: meta
                    .namespace
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
                labels: meta.labels,
                annotations: meta.annotations,
                uid: meta.uid,
                creation_timestamp: meta.creation_timestamp,
                source: source.clone(),
                spec,
            });
            true
        }
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut src = source.clone();
            if let Some(loc) = inner.location() {
                src.line += loc.line().saturating_sub(1);
            }
            // serde_yaml appends " at line L column C" (relative to the document); we report the
            // absolute line in the prefix instead.
            let msg = inner.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            diags.push(
                Diagnostic::new(codes::PARSE_ERROR, Severity::Error, msg)
                    .on(obj.clone(), src)
                    .at(path),
            );
            false
        }
    }
}

/// Split a multi-document YAML text on `---` lines; returns (1-based first line, text).
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    // A UTF-8 byte-order mark (editors on Windows write one) is not part of the YAML.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        let is_sep =
            trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---\t");
        if is_sep {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (ConfigSet, Vec<Diagnostic>) {
        let mut set = ConfigSet::default();
        let mut diags = Vec::new();
        set.load_str(Path::new("t.yaml"), text, &mut diags);
        (set, diags)
    }

    #[test]
    fn all_three_versions_load_alike() {
        for v in ISTIO_VERSIONS {
            let (set, diags) = load(&format!(
                "apiVersion: networking.istio.io/{v}\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: v1}}\n"
            ));
            assert!(diags.is_empty(), "{diags:?}");
            assert_eq!(set.virtual_services[0].namespace, "default");
            assert_eq!(
                set.virtual_services[0].spec.http[0].route[0]
                    .destination
                    .subset
                    .as_deref(),
                Some("v1")
            );
        }
    }

    #[test]
    fn errors_name_file_line_object_and_field() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n  namespace: shop\nspec:\n  hosts: [reviews]\n  http:\n  - retries:\n      attempts: 3\n      retryon: 5xx\n";
        let (set, diags) = load(text);
        assert!(set.virtual_services.is_empty());
        let skipped: Vec<_> = diags
            .iter()
            .filter(|d| d.code == codes::SKIPPED_KIND)
            .collect();
        assert_eq!(skipped.len(), 1);
        let err = diags.iter().find(|d| d.is_error()).expect("an error");
        let text = err.to_string();
        assert!(
            text.starts_with("t.yaml:15: ERROR NP0001 VirtualService/shop/r:"),
            "{text}"
        );
        assert!(text.contains("retryon"), "{text}");
        assert_eq!(err.field.as_deref(), Some("spec.http[0].retries.retryon"));
    }

    #[test]
    fn bad_duration_is_an_error_with_path() {
        let (_, diags) = load(
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [a]\n  http:\n  - timeout: 3x\n    route: [{destination: {host: a}}]\n",
        );
        let err = diags.iter().find(|d| d.is_error()).expect("error");
        assert_eq!(err.field.as_deref(), Some("spec.http[0].timeout"));
        assert!(err.message.contains("3x"), "{}", err.message);
    }

    #[test]
    fn later_fields_are_warned_not_rejected() {
        let (set, diags) = load(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: a\n  trafficPolicy:\n    tls: {mode: SIMPLE, caCrl: /crl.pem}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s}\n",
        );
        assert_eq!(set.destination_rules.len(), 1);
        let fields: Vec<_> = diags.iter().filter_map(|d| d.field.clone()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.trafficPolicy.tls.caCrl",
                "spec.subsets[0].trafficPolicy.loadBalancer.warmupDurationSecs"
            ]
        );
        assert!(diags.iter().all(|d| d.severity == Severity::Warning));
    }

    #[test]
    fn a_byte_order_mark_before_the_first_document_is_ignored() {
        let (set, diags) = load(
            "\u{feff}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec:\n  host: r\n  workloadSelector: {matchLabels: {app: web}}\n",
        );
        assert!(
            diags.iter().all(|d| d.severity != Severity::Error),
            "{diags:#?}"
        );
        assert_eq!(set.destination_rules.len(), 1);
        let sel = set.destination_rules[0]
            .spec
            .workload_selector
            .as_ref()
            .unwrap();
        assert_eq!(sel.match_labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn documents_split_with_lines() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- # c\nc: 3\n");
        assert_eq!(docs.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 3, 5]);
    }

    #[test]
    fn unknown_istio_version_is_an_error() {
        let (_, diags) = load(
            "apiVersion: networking.istio.io/v2\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n",
        );
        assert!(diags[0].is_error());
    }
}
