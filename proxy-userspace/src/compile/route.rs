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

/// Index of a cluster in [`super::Snapshot::clusters`].
pub type ClusterId = usize;

/// A regex compiled with RE2 full-match semantics; serialized as its source.
#[derive(Debug, Clone)]
pub struct FullRegex {
    source: String,
    re: Regex,
}

impl FullRegex {
    /// Compile `pattern` anchored at both ends (Envoy `safe_regex` is a full match).
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        Ok(FullRegex {
            source: pattern.to_string(),
            re: Regex::new(&format!("^(?:{pattern})$"))?,
        })
    }

    /// Compile `pattern` unanchored (for `uriRegexRewrite`, which substitutes every match).
    pub fn unanchored(pattern: &str) -> Result<Self, regex::Error> {
        Ok(FullRegex {
            source: pattern.to_string(),
            re: Regex::new(pattern)?,
        })
    }

    /// Whole-input match (for anchored patterns).
    pub fn is_match(&self, s: &str) -> bool {
        self.re.is_match(s)
    }

    /// Replace every match, with Envoy's `\1`..`\9` group references in `sub`.
    pub fn replace_all(&self, s: &str, sub: &str) -> String {
        let mut rust_sub = String::with_capacity(sub.len());
        let mut chars = sub.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                    rust_sub.push_str("${");
                    rust_sub.push(chars.next().expect("peeked"));
                    rust_sub.push('}');
                }
                '$' => rust_sub.push_str("$$"),
                other => rust_sub.push(other),
            }
        }
        self.re.replace_all(s, rust_sub.as_str()).into_owned()
    }
}

impl PartialEq for FullRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for FullRegex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// A compiled `StringMatch`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StrMatch {
    /// Equality.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Full RE2 match.
    Regex(Box<FullRegex>),
    /// Present (any value).
    Present,
}

impl StrMatch {
    /// Compile a `StringMatch`; `"*"` regex means presence (Istio special case).
    pub fn compile(m: &StringMatch) -> Result<Self, String> {
        let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set > 1 {
            return Err("only one of exact, prefix, regex may be set".into());
        }
        Ok(if let Some(e) = &m.exact {
            StrMatch::Exact(e.clone())
        } else if let Some(p) = &m.prefix {
            StrMatch::Prefix(p.clone())
        } else if let Some(r) = &m.regex {
            if r == "*" {
                StrMatch::Present
            } else {
                if r.len() > 1024 {
                    return Err(format!("regex is {} characters long (limit 1024)", r.len()));
                }
                StrMatch::Regex(Box::new(
                    FullRegex::new(r).map_err(|e| format!("invalid regex `{r}`: {e}"))?,
                ))
            }
        } else {
            StrMatch::Present
        })
    }

    /// Match a value (`None` = absent: only `withoutHeaders` treats absence as empty).
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
            StrMatch::Present => true,
        }
    }

    /// Case-insensitive variant for `ignoreUriCase` (exact and prefix only).
    fn matches_ignore_case(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => {
                v.len() >= p.len()
                    && v.is_char_boundary(p.len())
                    && v[..p.len()].eq_ignore_ascii_case(p)
            }
            other => other.matches(v),
        }
    }
}

/// Who is asking: the client workload as the registry knows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceInfo {
    /// Client IP.
    pub ip: Option<IpAddr>,
    /// Client workload labels (empty when unknown).
    pub labels: BTreeMap<String, String>,
    /// Client namespace, when known.
    pub namespace: Option<String>,
}

/// What matching looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:scheme`.
    pub scheme: &'a str,
    /// `:authority`/Host as sent.
    pub authority: &'a str,
    /// Path including the query string.
    pub path_and_query: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Client identity.
    pub source: &'a SourceInfo,
}

impl RequestView<'_> {
    /// Path without the query string.
    pub fn path(&self) -> &str {
        self.path_and_query.split('?').next().unwrap_or("")
    }

    fn header(&self, name: &HeaderName) -> Option<String> {
        let mut values = self
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let first = values.next()?;
        // Envoy compares several values of one header as the comma-joined string.
        let mut joined = first.to_string();
        for v in values {
            joined.push(',');
            joined.push_str(v);
        }
        Some(joined)
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        let query = self.path_and_query.split_once('?')?.1;
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

/// A compiled `HTTPMatchRequest`: all conditions must hold. The conditions most blocks use
/// (path, headers) are inline; the rest are boxed and present only when one is set, which
/// keeps a route table of 100k rules ~18 MB smaller (a block is 96 bytes instead of 280).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// Match name (route stats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<StrMatch>,
    /// Headers that must match.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "ser_header_matches"
    )]
    pub headers: Vec<(HeaderName, StrMatch)>,
    /// Case-insensitive uri.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    /// The rarer conditions, when any is set (serialized inline, as before).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub rare: Option<Box<RareMatch>>,
}

/// The conditions of a match block few configurations use.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RareMatch {
    /// Scheme.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StrMatch>,
    /// Method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<StrMatch>,
    /// Authority as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<StrMatch>,
    /// Headers that must not match.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "ser_header_matches"
    )]
    pub without_headers: Vec<(HeaderName, StrMatch)>,
    /// Query parameters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<(String, StrMatch)>,
    /// Client labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Client namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

impl RareMatch {
    /// No condition set.
    pub fn is_empty(&self) -> bool {
        self == &NO_RARE_MATCH
    }

    /// Boxed, or `None` when empty.
    pub fn boxed(self) -> Option<Box<RareMatch>> {
        (!self.is_empty()).then(|| Box::new(self))
    }
}

static NO_RARE_MATCH: RareMatch = RareMatch {
    scheme: None,
    method: None,
    authority: None,
    without_headers: Vec::new(),
    query_params: Vec::new(),
    source_labels: BTreeMap::new(),
    source_namespace: None,
};

fn ser_header_matches<S: Serializer>(
    v: &[(HeaderName, StrMatch)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(v.len()))?;
    for (k, x) in v {
        m.serialize_entry(k.as_str(), x)?;
    }
    m.end()
}

impl HttpMatch {
    /// The rarer conditions (all unset when none is).
    pub fn rare(&self) -> &RareMatch {
        self.rare.as_deref().unwrap_or(&NO_RARE_MATCH)
    }

    /// Does the client pass this block's source checks (the "static" filter of Istio)?
    pub fn source_applies(&self, src: &SourceInfo) -> bool {
        self.rare
            .as_ref()
            .is_none_or(|r| source_ok(src, &r.source_labels, &r.source_namespace))
    }

    /// Runtime match of every condition (source checks excluded).
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches_ignore_case(req.path())
            } else {
                u.matches(req.path())
            };
            if !ok {
                return false;
            }
        }
        for (name, m) in &self.headers {
            match req.header(name) {
                Some(v) if m.matches(&v) => {}
                _ => return false,
            }
        }
        match &self.rare {
            Some(r) => r.matches(req),
            None => true,
        }
    }
}

impl RareMatch {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        if self.method.as_ref().is_some_and(|m| !m.matches(req.method))
            || self.scheme.as_ref().is_some_and(|m| !m.matches(req.scheme))
            || self
                .authority
                .as_ref()
                .is_some_and(|m| !m.matches(req.authority))
        {
            return false;
        }
        for (name, m) in &self.without_headers {
            let hit = match req.header(name) {
                Some(v) => m.matches(&v),
                // Absent counts as "" for value forms; the presence form is then not matched.
                None => !matches!(m, StrMatch::Present) && m.matches(""),
            };
            if hit {
                return false;
            }
        }
        for (name, m) in &self.query_params {
            match req.query_param(name) {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        true
    }
}

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

/// Header mutations for one direction.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOps {
    /// Replace.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "ser_header_pairs"
    )]
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "ser_header_pairs"
    )]
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Delete.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "ser_header_names"
    )]
    pub remove: Vec<HeaderName>,
}

fn ser_header_pairs<S: Serializer>(
    v: &[(HeaderName, HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(v.len()))?;
    for (k, x) in v {
        m.serialize_entry(k.as_str(), x.to_str().unwrap_or("<binary>"))?;
    }
    m.end()
}

fn ser_header_names<S: Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|h| h.as_str()))
}

impl HeaderOps {
    const NONE: HeaderOps = HeaderOps {
        set: Vec::new(),
        add: Vec::new(),
        remove: Vec::new(),
    };

    /// Apply to a header map: remove, then set, then add.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }

    /// Nothing to do?
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Request and response header mutations, plus an authority override taken from `set: {host}`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMutations {
    /// On the upstream request.
    pub request: HeaderOps,
    /// On the downstream response.
    pub response: HeaderOps,
    /// Host rewrite from `request.set/add` of `host`/`:authority`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// What a rule without header mutations shows.
static NO_HEADER_MUTATIONS: HeaderMutations = HeaderMutations {
    request: HeaderOps::NONE,
    response: HeaderOps::NONE,
    authority: None,
};

/// The header mutations of a rule or a destination, boxed and only when there are any: most
/// have none, and a route table holds one per rule and per destination (100k rules at 10k
/// services; inline, the empty mutations were 168 of a rule's ~1.8 KB).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderRules(Option<Box<HeaderMutations>>);

impl HeaderRules {
    /// Box `m` unless it does nothing.
    pub fn new(m: HeaderMutations) -> Self {
        let empty = m.request.is_empty() && m.response.is_empty() && m.authority.is_none();
        HeaderRules((!empty).then(|| Box::new(m)))
    }

    /// The mutations (empty ones when there are none).
    pub fn get(&self) -> &HeaderMutations {
        self.0.as_deref().unwrap_or(&NO_HEADER_MUTATIONS)
    }

    /// Apply the request mutations.
    #[inline]
    pub fn apply_request(&self, headers: &mut HeaderMap) {
        if let Some(m) = &self.0 {
            m.request.apply(headers);
        }
    }

    /// Apply the response mutations.
    #[inline]
    pub fn apply_response(&self, headers: &mut HeaderMap) {
        if let Some(m) = &self.0 {
            m.response.apply(headers);
        }
    }

    /// The authority rewrite.
    pub fn authority(&self) -> Option<&String> {
        self.0.as_ref().and_then(|m| m.authority.as_ref())
    }
}

impl Serialize for HeaderRules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(s)
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

/// A compiled L4 match (TCP and TLS rules).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    /// SNI hosts (TLS rules only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    /// Original destination subnets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<IpNet>,
    /// Client labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Client namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

/// `sourceLabels` and `sourceNamespace` of a match block (HTTP or L4) against the client.
fn source_ok(
    src: &SourceInfo,
    labels: &BTreeMap<String, String>,
    namespace: &Option<String>,
) -> bool {
    labels_match(labels, &src.labels)
        && namespace
            .as_ref()
            .is_none_or(|ns| src.namespace.as_deref() == Some(ns.as_str()))
}

impl L4Match {
    /// Does a connection to `dst` from `src` with `sni` match?
    pub fn matches(&self, dst: Option<IpAddr>, src: &SourceInfo, sni: Option<&str>) -> bool {
        source_ok(src, &self.source_labels, &self.source_namespace)
            && (self.destination_subnets.is_empty()
                || dst.is_some_and(|ip| self.destination_subnets.iter().any(|n| n.contains(&ip))))
            && (self.sni_hosts.is_empty()
                || sni.is_some_and(|s| {
                    let s = s.to_ascii_lowercase();
                    self.sni_hosts
                        .iter()
                        .any(|h| super::registry::host_matches(h, &s))
                }))
    }
}

/// A compiled `tcp[]` or `tls[]` rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Rule {
    /// `kind/ns/name` of the VirtualService.
    pub origin: String,
    /// Match blocks (empty = catch-all).
    pub matches: Vec<L4Match>,
    /// Destinations, picked per connection.
    pub route: WeightedClusters,
}

/// First matching L4 rule.
pub fn match_l4<'a>(
    rules: &'a [L4Rule],
    dst: Option<IpAddr>,
    src: &SourceInfo,
    sni: Option<&str>,
) -> Option<&'a L4Rule> {
    rules
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(dst, src, sni)))
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
