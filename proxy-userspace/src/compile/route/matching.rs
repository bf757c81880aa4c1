//! Request matching: string matchers with RE2 full-match regexes, the request as matching
//! sees it, HTTP match blocks, and the L4 (TCP/TLS) matches.

use super::*;

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

    pub(in crate::compile) fn query_param(&self, name: &str) -> Option<&str> {
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
                        .any(|h| crate::compile::registry::host_matches(h, &s))
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
