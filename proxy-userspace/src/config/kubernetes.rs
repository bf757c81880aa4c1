//! The parts of Kubernetes `Pod` and `EndpointSlice` the registry needs. They are read from the
//! API server by the Kubernetes source and may also sit in files (a `kubectl get -o yaml` dump),
//! so both sources share one model. Unknown fields are ignored: these are API objects with far
//! more in them than nodeproxy uses.

use serde::{Deserialize, Serialize};

/// `Pod.spec` fields nodeproxy uses.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubePodSpec {
    /// Node the pod is scheduled on.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Host-network pods share the node's namespace and are never captured.
    #[serde(default)]
    pub host_network: Option<bool>,
}

/// `Pod.status` fields nodeproxy uses.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubePodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Primary pod IP.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// All pod IPs (dual stack).
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<KubePodIp>,
}

/// One entry of `status.podIPs`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct KubePodIp {
    /// The address.
    #[serde(default)]
    pub ip: String,
}

/// A `Pod` (its spec and status; labels, uid and annotations live on the [`super::Object`]).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct KubePod {
    /// `spec`.
    #[serde(default)]
    pub spec: KubePodSpec,
    /// `status`.
    #[serde(default)]
    pub status: KubePodStatus,
}

impl KubePod {
    /// The pod's addresses: `podIPs`, else `podIP`.
    pub fn ips(&self) -> Vec<std::net::IpAddr> {
        let mut out: Vec<std::net::IpAddr> = self
            .status
            .pod_ips
            .iter()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if out.is_empty()
            && let Some(ip) = self.status.pod_ip.as_deref().and_then(|s| s.parse().ok())
        {
            out.push(ip);
        }
        out
    }

    /// Terminal pods (`Succeeded`, `Failed`) hold no traffic and no enrollment.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// An `EndpointSlice` (discovery.k8s.io/v1). Unlike most kinds its payload is top-level, not
/// under `spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeEndpointSlice {
    /// `IPv4`, `IPv6` or `FQDN` (FQDN slices are ignored).
    #[serde(default)]
    pub address_type: Option<String>,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<KubeSliceEndpoint>,
    /// Ports (by name; the name matches the Service port's name).
    #[serde(default)]
    pub ports: Vec<KubeSlicePort>,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeSliceEndpoint {
    /// Addresses (one per endpoint in practice).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Readiness.
    #[serde(default)]
    pub conditions: KubeSliceConditions,
    /// The pod behind the endpoint.
    #[serde(default)]
    pub target_ref: Option<KubeObjectReference>,
    /// Node of the endpoint.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Zone of the endpoint.
    #[serde(default)]
    pub zone: Option<String>,
}

/// `conditions` of a slice endpoint.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeSliceConditions {
    /// Unset means ready (the API's documented default).
    #[serde(default)]
    pub ready: Option<bool>,
    /// Terminating endpoints take no new traffic.
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// A reference to the object behind an endpoint.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeObjectReference {
    /// `Pod` for pod endpoints.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// One port of a slice.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeSlicePort {
    /// Name (empty for a single unnamed port).
    #[serde(default)]
    pub name: Option<String>,
    /// Endpoint port.
    #[serde(default)]
    pub port: Option<u32>,
    /// `TCP` (default), `UDP`, `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// The label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
