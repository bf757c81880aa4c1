//! `Gateway`: listeners of a gateway proxy, bound to VirtualServices by name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `Gateway.spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gateway {
    /// Labels of the gateway workloads; the node proxy serves every Gateway it is given.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Listeners.
    #[serde(default)]
    pub servers: Vec<Server>,
}

/// `Server{port, hosts, tls}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    /// Listener port.
    pub port: GatewayPort,
    /// `[namespace/]dnsName` entries.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// TLS settings.
    #[serde(default)]
    pub tls: Option<ServerTlsSettings>,
    /// Listen address. [later]
    #[serde(default)]
    pub bind: Option<serde_yaml::Value>,
    /// Server name for stats. [later]
    #[serde(default)]
    pub name: Option<serde_yaml::Value>,
    /// Default endpoint. [later]
    #[serde(default)]
    pub default_endpoint: Option<serde_yaml::Value>,
}

/// Gateway `Port{number, protocol, name}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayPort {
    /// Port number.
    pub number: u32,
    /// `HTTP`, `HTTPS`, `HTTP2`, `GRPC`, `TCP`, `TLS`, ...
    #[serde(default)]
    pub protocol: String,
    /// Unique name within the Gateway.
    #[serde(default)]
    pub name: String,
    /// Rejected by Istio.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// `ServerTLSSettings.TLSCertificate`: one of a server's certificates (Istio allows an RSA
/// and an ECDSA one).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsCertificate {
    /// Certificate chain file.
    #[serde(default)]
    pub server_certificate: String,
    /// Private key file.
    #[serde(default)]
    pub private_key: String,
    /// Client CA bundle (MUTUAL).
    #[serde(default)]
    pub ca_certificates: Option<String>,
}

/// `ServerTLSSettings`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTlsSettings {
    /// Plain HTTP server answers 301 to https.
    #[serde(default)]
    pub https_redirect: bool,
    /// `PASSTHROUGH` (default), `SIMPLE`, `MUTUAL`, ...
    #[serde(default)]
    pub mode: Option<String>,
    /// Secret name: `<name>.crt`/`<name>.key` in the credentials directory.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Several secrets. [later]
    #[serde(default)]
    pub credential_names: Vec<String>,
    /// Certificate file path.
    #[serde(default)]
    pub server_certificate: Option<String>,
    /// Key file path.
    #[serde(default)]
    pub private_key: Option<String>,
    /// CA for client certificates.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// Certificate list. [later]
    #[serde(default)]
    pub tls_certificates: Vec<TlsCertificate>,
    /// CRL. [later]
    #[serde(default)]
    pub ca_crl: Option<serde_yaml::Value>,
    /// CA secret. [later]
    #[serde(default)]
    pub ca_cert_credential_name: Option<serde_yaml::Value>,
    /// Allowed client SANs. [later]
    #[serde(default)]
    pub subject_alt_names: Option<serde_yaml::Value>,
    /// SPKI pins. [later]
    #[serde(default)]
    pub verify_certificate_spki: Option<serde_yaml::Value>,
    /// Hash pins. [later]
    #[serde(default)]
    pub verify_certificate_hash: Option<serde_yaml::Value>,
    /// Minimum TLS version. [later]
    #[serde(default)]
    pub min_protocol_version: Option<serde_yaml::Value>,
    /// Maximum TLS version. [later]
    #[serde(default)]
    pub max_protocol_version: Option<serde_yaml::Value>,
    /// Cipher suites. [later]
    #[serde(default)]
    pub cipher_suites: Option<serde_yaml::Value>,
}
