//! Compiled routing rules: HTTP matches and actions, TCP and TLS rules, and their evaluation
//! against a request. Evaluation lives here so the proxy and `nodeproxy simulate` share it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use regex::Regex;
use serde::{Serialize, Serializer};

use crate::config::{StringMatch, labels_match};

mod headers;
mod matching;

pub use headers::*;
pub use matching::*;

/// Index of a cluster in [`super::Snapshot::clusters`].
pub type ClusterId = usize;

/// A fault's abort status.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AbortStatus {
    /// HTTP status.
    Http(u16),
    /// gRPC status code.
    Grpc(u32),
}

/// Compiled fault injection.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// (delay, parts per million).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<(Duration, u32)>,
    /// (status, parts per million).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<(AbortStatus, u32)>,
}

/// Retry conditions (Envoy `retry_on`).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetryOn {
    /// `5xx`.
    pub five_xx: bool,
    /// `gateway-error`.
    pub gateway_error: bool,
    /// `reset`.
    pub reset: bool,
    /// `reset-before-request`.
    pub reset_before_request: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `refused-stream`.
    pub refused_stream: bool,
    /// `retriable-4xx`.
    pub retriable_4xx: bool,
    /// `retriable-status-codes` with these codes.
    pub status_codes: Vec<u16>,
    /// gRPC statuses in response headers (`cancelled` 1, `deadline-exceeded` 4,
    /// `resource-exhausted` 8, `internal` 13, `unavailable` 14).
    pub grpc_codes: Vec<u32>,
    /// `envoy-ratelimited`.
    pub envoy_ratelimited: bool,
}

/// Every `retryOn` token Istio accepts.
pub const RETRY_ON_TOKENS: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Istio's default `retryOn` when a route sets none.
pub const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

impl RetryOn {
    /// The policy as Envoy/Istio tokens (`5xx,connect-failure,503`).
    pub fn tokens(&self) -> String {
        let mut t: Vec<String> = [
            (self.five_xx, "5xx"),
            (self.gateway_error, "gateway-error"),
            (self.reset, "reset"),
            (self.reset_before_request, "reset-before-request"),
            (self.connect_failure, "connect-failure"),
            (self.refused_stream, "refused-stream"),
            (self.retriable_4xx, "retriable-4xx"),
            (self.envoy_ratelimited, "envoy-ratelimited"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| n.to_string())
        .collect();
        for c in &self.grpc_codes {
            let name = match c {
                1 => "cancelled",
                4 => "deadline-exceeded",
                8 => "resource-exhausted",
                13 => "internal",
                _ => "unavailable",
            };
            t.push(name.into());
        }
        t.extend(self.status_codes.iter().map(|c| c.to_string()));
        t.join(",")
    }

    /// Parse a comma list of policies and bare status codes.
    pub fn parse(list: &str) -> Result<RetryOn, String> {
        let mut r = RetryOn::default();
        for token in list.split(',') {
            match token {
                "5xx" => r.five_xx = true,
                "gateway-error" => r.gateway_error = true,
                "reset" => r.reset = true,
                "reset-before-request" => r.reset_before_request = true,
                "connect-failure" => r.connect_failure = true,
                "refused-stream" => r.refused_stream = true,
                "retriable-4xx" => r.retriable_4xx = true,
                "envoy-ratelimited" => r.envoy_ratelimited = true,
                "cancelled" => r.grpc_codes.push(1),
                "deadline-exceeded" => r.grpc_codes.push(4),
                "resource-exhausted" => r.grpc_codes.push(8),
                "internal" => r.grpc_codes.push(13),
                "unavailable" => r.grpc_codes.push(14),
                "retriable-status-codes" | "retriable-headers" | "http3-post-connect-failure" => {}
                code => match code.parse::<u16>() {
                    Ok(c) if (100..600).contains(&c) => r.status_codes.push(c),
                    _ => return Err(format!("unknown retryOn value `{code}`")),
                },
            }
        }
        Ok(r)
    }
}

/// Compiled retry policy of a route.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub num_retries: u32,
    /// Deadline per try.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Conditions.
    pub retry_on: RetryOn,
    /// Back-off base (max is 10x).
    pub backoff_base: Duration,
    /// Avoid already tried hosts.
    pub ignore_previous_hosts: bool,
}

impl RetryPolicy {
    /// The wait before try `attempt` (2, 3, ...): Envoy's fully jittered exponential back-off,
    /// uniform in `[0, (2^n - 1) × base)` with `n = attempt - 1`, capped at 10 × base.
    /// `draw(k)` returns a uniform value in `[0, k)`, `k > 0`. Saturating: no base overflows.
    pub fn backoff(&self, attempt: u32, draw: impl FnOnce(u64) -> u64) -> Duration {
        let n = attempt.saturating_sub(1).clamp(1, 16);
        let cap = self.backoff_base.saturating_mul(10);
        let upper = self.backoff_base.saturating_mul((1u32 << n) - 1).min(cap);
        match u64::try_from(upper.as_nanos()).unwrap_or(u64::MAX) {
            0 => Duration::ZERO,
            nanos => Duration::from_nanos(draw(nanos)),
        }
    }
}

impl Default for RetryPolicy {
    /// Istio's default policy: 2 retries on connect-failure, refused-stream, unavailable,
    /// cancelled; 25 ms back-off; other hosts preferred.
    fn default() -> Self {
        RetryPolicy {
            num_retries: 2,
            per_try_timeout: None,
            retry_on: RetryOn::parse(DEFAULT_RETRY_ON).expect("default retryOn parses"),
            backoff_base: Duration::from_millis(25),
            ignore_previous_hosts: true,
        }
    }
}

/// Where a route destination points.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ClusterRef {
    /// An existing cluster.
    Cluster(ClusterId),
    /// A cluster that does not exist (undefined subset or unknown host): 503 NC.
    Missing(String),
}

/// A route weight as Envoy takes it: an int32 at least 0 (analysis rejects the rest with a
/// diagnostic; this only keeps an unchecked set from wrapping).
pub fn weight(w: Option<i64>) -> u32 {
    w.unwrap_or(0).clamp(0, i64::from(i32::MAX)) as u32
}

/// One weighted destination.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedCluster {
    /// Target.
    pub cluster: ClusterRef,
    /// `outbound|port|subset|host`.
    pub name: String,
    /// Relative weight (>0 when several).
    pub weight: u32,
    /// Per-destination header mutations.
    pub headers: HeaderRules,
}

/// Weighted destinations of a rule: a fresh draw per request (per connection for TCP).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedClusters {
    /// Destinations with weight > 0 (or the single destination).
    pub clusters: Vec<WeightedCluster>,
    /// Sum of weights (in 64 bits: no set of `u32` weights can overflow it).
    pub total: u64,
}

impl WeightedClusters {
    /// The destinations (weights above 0) and their total.
    pub fn new(clusters: Vec<WeightedCluster>) -> Self {
        let total = clusters.iter().map(|c| u64::from(c.weight)).sum();
        WeightedClusters { clusters, total }
    }

    /// The index of the destination for `r` uniform in `[0, total)`.
    pub fn index(&self, r: u64) -> usize {
        let mut acc = 0u64;
        for (i, c) in self.clusters.iter().enumerate() {
            acc += u64::from(c.weight);
            if r < acc {
                return i;
            }
        }
        self.clusters.len().saturating_sub(1)
    }

    /// The destination for `r` uniform in `[0, total)`.
    pub fn pick(&self, r: u64) -> &WeightedCluster {
        &self.clusters[self.index(r)]
    }

    /// Each destination's probability.
    pub fn probabilities(&self) -> Vec<(&WeightedCluster, f64)> {
        self.clusters
            .iter()
            .map(|c| (c, c.weight as f64 / self.total.max(1) as f64))
            .collect()
    }
}

/// Rewrite before forwarding.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// Replacement for the matched prefix (or whole path for exact/regex/no uri match).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Regex substitution (pattern is unanchored, all matches replaced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri_regex: Option<(FullRegex, String)>,
    /// Host sent upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// A redirect answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// Whole-path replacement.
    pub uri: Option<String>,
    /// Matched-prefix replacement.
    pub prefix_rewrite: Option<String>,
    /// Host replacement.
    pub authority: Option<String>,
    /// Explicit port.
    pub port: Option<u16>,
    /// Use the listener port.
    pub from_request_port: bool,
    /// Scheme replacement.
    pub scheme: Option<String>,
    /// 301, 302, 303, 307, 308.
    pub code: u16,
}

/// Compiled CORS policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cors {
    /// Allowed origins.
    pub allow_origins: Vec<StrMatch>,
    /// Joined methods.
    pub allow_methods: String,
    /// Joined headers.
    pub allow_headers: String,
    /// Joined exposed headers.
    pub expose_headers: String,
    /// Seconds.
    pub max_age: Option<u64>,
    /// Credentials allowed.
    pub allow_credentials: bool,
    /// Forward unmatched preflights upstream (default) instead of answering without CORS.
    pub forward_unmatched_preflights: bool,
}

/// What a matched rule does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HttpAction {
    /// Forward to weighted clusters.
    Route(WeightedClusters),
    /// Answer with a redirect.
    Redirect(Box<Redirect>),
    /// Answer with a fixed response.
    DirectResponse {
        /// Status.
        status: u16,
        /// Body.
        body: Vec<u8>,
    },
}

/// A mirror target.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Target cluster.
    pub cluster: ClusterRef,
    /// Cluster name.
    pub name: String,
    /// Parts per million mirrored.
    pub per_million: u32,
}

/// A compiled `http[]` rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    /// Rule name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `kind/ns/name` of the VirtualService (or `default` for the implicit route).
    pub origin: String,
    /// Match blocks (empty = catch-all).
    pub matches: Vec<HttpMatch>,
    /// Action.
    pub action: HttpAction,
    /// Fault injection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Box<Fault>>,
    /// Route timeout (None = no timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Mirrors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    /// CORS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<Box<Cors>>,
    /// Rule-level header mutations.
    pub headers: HeaderRules,
    /// Rewrite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Box<Rewrite>>,
}

impl HttpRule {
    /// Drop spare capacity: rules live as long as their snapshot, 100k of them at 10k services,
    /// and a list built by `push` keeps room for four (the destination list's spare room was a
    /// third of a rule's memory).
    pub fn shrink_to_fit(&mut self) {
        self.matches.shrink_to_fit();
        self.mirrors.shrink_to_fit();
        if let HttpAction::Route(w) = &mut self.action {
            w.clusters.shrink_to_fit();
        }
    }
}

/// The result of matching a request against a list of rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RuleMatch {
    /// Rule `rule` matched through block `block` (`None` = catch-all rule).
    Matched {
        /// Index of the rule.
        rule: usize,
        /// Index of the block.
        block: Option<usize>,
    },
    /// Rules exist for this client but none matched: 404 NR.
    NoMatch,
    /// Every rule was excluded by source checks: use the default route.
    NoneApply,
}

/// First-match-wins evaluation (ISTIO-API.md §2.2).
pub fn match_http(rules: &[HttpRule], req: &RequestView<'_>) -> RuleMatch {
    let mut any_applies = false;
    for (i, rule) in rules.iter().enumerate() {
        if rule.matches.is_empty() {
            return RuleMatch::Matched {
                rule: i,
                block: None,
            };
        }
        for (j, block) in rule.matches.iter().enumerate() {
            if !block.source_applies(req.source) {
                continue;
            }
            any_applies = true;
            if block.matches(req) {
                return RuleMatch::Matched {
                    rule: i,
                    block: Some(j),
                };
            }
        }
    }
    if any_applies || rules.is_empty() {
        RuleMatch::NoMatch
    } else {
        RuleMatch::NoneApply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_rewrite_uses_envoy_group_syntax() {
        let re = FullRegex::unanchored("^/service/([^/]+)(/.*)$").unwrap();
        assert_eq!(
            re.replace_all("/service/foo/v1/api", "\\2/instance/\\1"),
            "/v1/api/instance/foo"
        );
        let re = FullRegex::unanchored("a").unwrap();
        assert_eq!(re.replace_all("banana", "$"), "b$n$n$");
    }

    #[test]
    fn regex_is_full_match() {
        let m = StrMatch::compile(&StringMatch {
            regex: Some("v[0-9]".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(m.matches("v1"));
        assert!(
            !m.matches("xv1"),
            "implicitly anchored like Envoy safe_regex"
        );
        assert!(
            StrMatch::compile(&StringMatch {
                regex: Some("(".into()),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn without_headers_absent_counts_as_empty() {
        let src = SourceInfo::default();
        let headers = HeaderMap::new();
        let req = RequestView {
            method: "GET",
            scheme: "http",
            authority: "a",
            path_and_query: "/",
            headers: &headers,
            source: &src,
        };
        let block = HttpMatch {
            rare: RareMatch {
                without_headers: vec![(HeaderName::from_static("x"), StrMatch::Exact("a".into()))],
                ..Default::default()
            }
            .boxed(),
            ..Default::default()
        };
        assert!(block.matches(&req));
        let presence = HttpMatch {
            rare: RareMatch {
                without_headers: vec![(HeaderName::from_static("x"), StrMatch::Present)],
                ..Default::default()
            }
            .boxed(),
            ..Default::default()
        };
        assert!(
            presence.matches(&req),
            "presence inverted: header must be absent"
        );
    }

    #[test]
    fn rare_conditions_are_dumped_inline_and_only_when_set() {
        let plain = HttpMatch {
            uri: Some(StrMatch::Prefix("/api".into())),
            ..Default::default()
        };
        assert!(plain.rare.is_none());
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"uri": {"prefix": "/api"}})
        );
        let m = HttpMatch {
            uri: Some(StrMatch::Prefix("/api".into())),
            rare: RareMatch {
                method: Some(StrMatch::Exact("GET".into())),
                source_labels: [("app".to_string(), "x".to_string())].into(),
                ..Default::default()
            }
            .boxed(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({
                "uri": {"prefix": "/api"},
                "method": {"exact": "GET"},
                "sourceLabels": {"app": "x"}
            })
        );
        assert!(RareMatch::default().boxed().is_none());
    }

    #[test]
    fn retry_on_parses_codes_and_rejects_unknown() {
        let r = RetryOn::parse("5xx,503,retriable-status-codes,unavailable").unwrap();
        assert!(r.five_xx);
        assert_eq!(r.status_codes, vec![503]);
        assert_eq!(r.grpc_codes, vec![14]);
        assert!(
            RetryOn::parse("5xx, 503").is_err(),
            "Istio splits without trimming"
        );
        assert!(RetryOn::parse("sometimes").is_err());
    }

    #[test]
    fn query_params_first_value_and_bare_key() {
        let src = SourceInfo::default();
        let headers = HeaderMap::new();
        let req = RequestView {
            method: "GET",
            scheme: "http",
            authority: "a",
            path_and_query: "/p?a=1&flag&a=2",
            headers: &headers,
            source: &src,
        };
        assert_eq!(req.query_param("a"), Some("1"));
        assert_eq!(req.query_param("flag"), Some(""));
        assert_eq!(req.query_param("b"), None);
        assert_eq!(req.path(), "/p");
    }
}
