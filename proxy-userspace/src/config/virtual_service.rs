//! `VirtualService` (networking.istio.io v1alpha3/v1beta1/v1): routing rules for hosts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Destination, Duration, Headers, Percent, StringMatch};

/// `VirtualService.spec`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    /// Hosts the rules apply to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways (and the reserved `mesh`) the rules are installed on; empty means `mesh`.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Ordered HTTP rules, first match wins.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// Ordered TLS (SNI) rules for non-terminated TLS.
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    /// Ordered L4 rules.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// Namespaces the rule is visible to.
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// `http[].delegate`: the VirtualService whose rules replace a root rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delegate {
    /// Its name.
    pub name: String,
    /// Its namespace (default: the root's).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// One `http[]` rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// Route name for logs and stats.
    #[serde(default)]
    pub name: Option<String>,
    /// Match blocks, ORed; absent means catch-all.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    /// Answer with a redirect.
    #[serde(default)]
    pub redirect: Option<Box<HttpRedirect>>,
    /// Answer locally with a fixed response.
    #[serde(default)]
    pub direct_response: Option<Box<HttpDirectResponse>>,
    /// Replace this rule by the rules of another VirtualService (one without hosts).
    #[serde(default)]
    pub delegate: Option<Delegate>,
    /// Set on a rule merged in from a delegate: the delegate's `ns/name` (not YAML).
    #[serde(skip)]
    pub delegated_from: Option<String>,
    /// Rewrite the path or authority before forwarding.
    #[serde(default)]
    pub rewrite: Option<Box<HttpRewrite>>,
    /// Overall request timeout (default: none).
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Retry policy (default: Istio's two retries).
    #[serde(default)]
    pub retries: Option<Box<HttpRetry>>,
    /// Fault injection.
    #[serde(default)]
    pub fault: Option<Box<HttpFaultInjection>>,
    /// Single mirror destination.
    #[serde(default)]
    pub mirror: Option<Box<Destination>>,
    /// Share of requests mirrored to `mirror` (default 100%).
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer percentage for `mirror`.
    #[serde(default)]
    pub mirror_percent: Option<u32>,
    /// Several mirror destinations.
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// CORS policy.
    #[serde(default)]
    pub cors_policy: Option<Box<CorsPolicy>>,
    /// Header operations at rule level.
    #[serde(default)]
    pub headers: Option<Box<Headers>>,
}

/// One `match[]` block of an HTTP rule: all conditions must hold. Rarely used parts are boxed:
/// a 10k-service configuration holds ~100k of these (and the Kubernetes source keeps them).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequest {
    /// Name appended to the route name.
    #[serde(default)]
    pub name: Option<String>,
    /// Path match (query excluded for exact and regex).
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// `:scheme` match.
    #[serde(default)]
    pub scheme: Option<Box<StringMatch>>,
    /// `:method` match.
    #[serde(default)]
    pub method: Option<Box<StringMatch>>,
    /// `:authority`/Host as sent, port included.
    #[serde(default)]
    pub authority: Option<Box<StringMatch>>,
    /// Request header matches.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Listener port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Client workload labels.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways this block applies to (overrides the top level).
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Query parameter matches.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Case-insensitive uri exact/prefix.
    #[serde(default)]
    pub ignore_uri_case: bool,
    /// Headers that must not match.
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Client namespace.
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// Envoy per-route stats prefix. [later]
    #[serde(default)]
    pub stat_prefix: Option<Box<serde_yaml::Value>>,
}

/// `HTTPRouteDestination{destination, weight, headers}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    /// Target service (an empty one is reported by analysis, as Istio's analyzer does).
    #[serde(default)]
    pub destination: Destination,
    /// Relative weight.
    #[serde(default)]
    pub weight: Option<i64>,
    /// Header operations when this destination is picked.
    #[serde(default)]
    pub headers: Option<Box<Headers>>,
}

/// `HTTPRedirect`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirect {
    /// Replace the whole path.
    #[serde(default)]
    pub uri: Option<String>,
    /// Replace the matched prefix.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Replace the host.
    #[serde(default)]
    pub authority: Option<String>,
    /// Explicit port.
    #[serde(default)]
    pub port: Option<u32>,
    /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT`.
    #[serde(default)]
    pub derive_port: Option<String>,
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// 301 (default), 302, 303, 307, 308.
    #[serde(default)]
    pub redirect_code: Option<u32>,
}

/// `HTTPDirectResponse`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDirectResponse {
    /// Status 200..599.
    pub status: u32,
    /// Optional body.
    #[serde(default)]
    pub body: Option<HttpBody>,
}

/// `HTTPBody{string | bytes}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBody {
    /// Text body.
    #[serde(default)]
    pub string: Option<String>,
    /// Base64 body.
    #[serde(default)]
    pub bytes: Option<String>,
}

/// `HTTPRewrite`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    /// Replacement for the matched part of the path.
    #[serde(default)]
    pub uri: Option<String>,
    /// Host/`:authority` sent upstream.
    #[serde(default)]
    pub authority: Option<String>,
    /// Regex substitution on the path.
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// `RegexRewrite{match, rewrite}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    /// RE2 pattern.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Substitution with `\1`..`\9`.
    pub rewrite: String,
}

/// `HTTPRetry`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    /// Number of retries (tries = 1 + attempts).
    #[serde(default)]
    pub attempts: i64,
    /// Deadline of each try.
    #[serde(default)]
    pub per_try_timeout: Option<Duration>,
    /// Comma list of retry policies and status codes.
    #[serde(default)]
    pub retry_on: Option<String>,
    /// Prefer other localities on retry. [later]
    #[serde(default)]
    pub retry_remote_localities: Option<serde_yaml::Value>,
    /// Avoid already tried hosts (default true).
    #[serde(default)]
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base back-off interval (default 25ms).
    #[serde(default)]
    pub backoff: Option<Duration>,
}

/// `HTTPFaultInjection`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFaultInjection {
    /// Delay before forwarding.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Local abort.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// `HTTPFaultInjection.Delay`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// How long to wait.
    #[serde(default)]
    pub fixed_delay: Option<Duration>,
    /// Rejected by Istio validation.
    #[serde(default)]
    pub exponential_delay: Option<serde_yaml::Value>,
    /// Share of requests delayed; absent means never.
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    #[serde(default)]
    pub percent: Option<i64>,
}

/// `HTTPFaultInjection.Abort`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// HTTP status to answer with.
    #[serde(default)]
    pub http_status: Option<i64>,
    /// gRPC status name to answer with.
    #[serde(default)]
    pub grpc_status: Option<String>,
    /// Rejected by Istio validation.
    #[serde(default)]
    pub http2_error: Option<serde_yaml::Value>,
    /// Share of requests aborted; absent means never.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// `HTTPMirrorPolicy{destination, percentage}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMirrorPolicy {
    /// Mirror target.
    pub destination: Destination,
    /// Share mirrored (default 100%).
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// `CorsPolicy`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    /// Allowed origins.
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated exact origins.
    #[serde(default)]
    pub allow_origin: Vec<String>,
    /// Allowed methods.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Allowed request headers.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Headers exposed to the browser.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Preflight cache time.
    #[serde(default)]
    pub max_age: Option<Duration>,
    /// `access-control-allow-credentials`.
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    /// `FORWARD` (default) or `IGNORE`.
    #[serde(default)]
    pub unmatched_preflights: Option<String>,
}

/// One `tcp[]` rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    /// L4 match blocks, ORed.
    #[serde(default, rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// One `tls[]` rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    /// SNI match blocks, ORed.
    #[serde(default, rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// `L4MatchAttributes`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4MatchAttributes {
    /// Original destination IP within one of these CIDRs.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// Listener port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Client workload labels.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Client namespace.
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// Hidden field in the proto. [later]
    #[serde(default)]
    pub source_subnet: Option<serde_yaml::Value>,
}

/// `TLSMatchAttributes`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsMatchAttributes {
    /// SNI values, wildcards allowed.
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    /// Original destination IP within one of these CIDRs.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// Listener port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Client workload labels.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Client namespace.
    #[serde(default)]
    pub source_namespace: Option<String>,
}

/// `RouteDestination{destination, weight}` for TCP and TLS.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    /// Target service.
    pub destination: Destination,
    /// Relative weight.
    #[serde(default)]
    pub weight: Option<i64>,
}
