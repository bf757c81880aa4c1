//! `ServiceEntry` and `WorkloadEntry`: the service registry of the embedded mode, and a
//! Kubernetes `Service` read from the same files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::WorkloadSelector;

/// `ServiceEntry.spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    /// DNS names (used literally).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// VIPs or CIDRs.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Service ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `MESH_EXTERNAL` (default) or `MESH_INTERNAL`.
    #[serde(default)]
    pub location: Option<String>,
    /// `NONE` (default), `STATIC`, `DNS`, `DNS_ROUND_ROBIN`, `DYNAMIC_DNS`.
    #[serde(default)]
    pub resolution: Option<String>,
    /// Static endpoints.
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    /// Endpoints from WorkloadEntries with these labels.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Namespaces the service is visible to.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// SANs the server certificate must match when TLS is originated to the entry and the
    /// DestinationRule names none.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// ServiceEntry `Port{number, protocol, name, targetPort}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Service port.
    pub number: u32,
    /// Protocol; unset means sniffing.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Unique port name.
    #[serde(default)]
    pub name: String,
    /// Endpoint port (default `number`).
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// `WorkloadEntry.spec`, also the shape of a ServiceEntry endpoint.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    /// IP, FQDN (DNS resolution) or `unix://` path.
    #[serde(default)]
    pub address: String,
    /// Port overrides by ServiceEntry port name.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels used by subsets and sourceLabels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Network name.
    #[serde(default)]
    pub network: Option<String>,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub locality: Option<String>,
    /// LB weight (0/unset = 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Service account.
    #[serde(default)]
    pub service_account: Option<String>,
}

/// The parts of a Kubernetes `Service` the registry needs (files may hold them beside the Istio
/// objects, as the tutorials' files do).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeService {
    /// Pod (and WorkloadEntry) selector.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<KubeServicePort>,
    /// ClusterIP (`None` for headless).
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `ClusterIP` (default), `NodePort`, `LoadBalancer`, `ExternalName`.
    #[serde(default, rename = "type")]
    pub service_type: Option<String>,
}

/// A Kubernetes `ServicePort`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeServicePort {
    /// Port name (`http-*`, `grpc`, `tcp-*`... selects the protocol).
    #[serde(default)]
    pub name: Option<String>,
    /// Service port.
    pub port: u32,
    /// Endpoint port (number; named target ports are taken as `port`).
    #[serde(default)]
    pub target_port: Option<serde_yaml::Value>,
    /// Explicit application protocol.
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// `TCP` (default), `UDP`, `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}
