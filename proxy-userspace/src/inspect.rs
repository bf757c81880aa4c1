//! Read-only views of a compiled snapshot for people: `nodeproxy validate`, `routes` and
//! `simulate` (istioctl-like tables, or JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use std::net::{IpAddr, SocketAddr};

use crate::compile::{
    AbortStatus, HttpAction, HttpMatch, HttpRule, ListenerKind, Snapshot, SourceInfo, StrMatch,
};
use crate::diagnostic::Diagnostic;
use crate::proxy::decide::{Action, Decision, Head, Reply, decide, enumerate};
use crate::proxy::{ConnInfo, ListenerRef};

mod proxy_config;
pub use proxy_config::*;

/// Text lines for diagnostics, most severe first.
pub fn diagnostics_text(diags: &[Diagnostic]) -> String {
    let mut sorted: Vec<&Diagnostic> = diags.iter().collect();
    sorted.sort_by_key(|d| std::cmp::Reverse(d.severity));
    let mut out = String::new();
    for d in sorted {
        let _ = writeln!(out, "{d}");
    }
    out
}

fn str_match(m: &StrMatch) -> String {
    match m {
        StrMatch::Exact(v) => format!("={v}"),
        StrMatch::Prefix(v) => format!("^{v}"),
        StrMatch::Regex(r) => format!(
            "~{}",
            serde_json::to_string(r)
                .unwrap_or_default()
                .trim_matches('"')
        ),
        StrMatch::Present => "present".into(),
    }
}

/// One match block as `uri^/api, end-user=jason, method=GET`.
pub fn describe_match(m: &HttpMatch) -> String {
    let mut parts = Vec::new();
    if let Some(u) = &m.uri {
        parts.push(format!(
            "uri{}{}",
            str_match(u),
            if m.ignore_uri_case { " (any case)" } else { "" }
        ));
    }
    let r = m.rare();
    for (name, v) in [
        ("method", &r.method),
        ("scheme", &r.scheme),
        ("authority", &r.authority),
    ] {
        if let Some(x) = v {
            parts.push(format!("{name}{}", str_match(x)));
        }
    }
    for (k, v) in &m.headers {
        parts.push(format!("{k}{}", str_match(v)));
    }
    for (k, v) in &r.without_headers {
        parts.push(format!("!{k}{}", str_match(v)));
    }
    for (k, v) in &r.query_params {
        parts.push(format!("?{k}{}", str_match(v)));
    }
    for (k, v) in &r.source_labels {
        parts.push(format!("source {k}={v}"));
    }
    if parts.is_empty() {
        "*".into()
    } else {
        parts.join(", ")
    }
}

/// The action of a rule as `outbound|80|v1|reviews... 80%, ...`.
pub fn describe_action(r: &HttpRule) -> String {
    match &r.action {
        HttpAction::Route(wc) => wc
            .probabilities()
            .iter()
            .map(|(c, p)| format!("{} {:.4}%", c.name, p * 100.0).replace(".0000%", "%"))
            .collect::<Vec<_>>()
            .join(", "),
        HttpAction::Redirect(rd) => format!(
            "redirect {} {}",
            rd.code,
            rd.uri
                .as_deref()
                .or(rd.prefix_rewrite.as_deref())
                .unwrap_or("")
        ),
        HttpAction::DirectResponse { status, .. } => format!("direct response {status}"),
    }
}

/// `nodeproxy routes`: the route tables as a table.
pub fn routes_text(snap: &Snapshot, host: Option<&str>, port: Option<u16>) -> String {
    let mut rows = vec![[
        "TABLE".to_string(),
        "VIRTUAL HOST".into(),
        "DOMAINS".into(),
        "MATCH".into(),
        "ACTION".into(),
        "VIRTUAL SERVICE".into(),
    ]];
    for table in &snap.http_tables {
        if port.is_some_and(|p| table.name != p.to_string() && table.name != format!("gateway:{p}"))
        {
            continue;
        }
        let only = host.map(|h| table.vhost(h));
        for (i, vh) in table.vhosts.iter().enumerate() {
            if only.is_some_and(|o| o != Some(i)) {
                continue;
            }
            let domains = if vh.domains.len() > 3 {
                format!(
                    "{} +{} more",
                    vh.domains[..2].join(", "),
                    vh.domains.len() - 2
                )
            } else {
                vh.domains.join(", ")
            };
            if vh.https_redirect && vh.rules.is_empty() {
                rows.push([
                    table.name.clone(),
                    vh.name.clone(),
                    domains.clone(),
                    "*".into(),
                    "301 to https".into(),
                    "-".into(),
                ]);
            }
            for r in &vh.rules {
                let m = if r.matches.is_empty() {
                    "*".to_string()
                } else {
                    r.matches
                        .iter()
                        .map(describe_match)
                        .collect::<Vec<_>>()
                        .join(" | ")
                };
                rows.push([
                    table.name.clone(),
                    vh.name.clone(),
                    domains.clone(),
                    m,
                    describe_action(r),
                    r.origin.clone(),
                ]);
            }
        }
    }
    let mut out = render(&rows);
    let l4: Vec<_> = snap
        .listeners
        .iter()
        .filter(|l| !l.tcp.is_empty() || !l.tls.is_empty())
        .filter(|l| port.is_none_or(|p| l.port == p))
        .collect();
    if !l4.is_empty() {
        let mut rows = vec![[
            "LISTENER".to_string(),
            "KIND".into(),
            "MATCH".into(),
            "ACTION".into(),
            "VIRTUAL SERVICE".into(),
        ]];
        for l in l4 {
            let addr = match (l.address, &l.kind) {
                (Some(a), _) => format!("{a}:{}", l.port),
                (None, ListenerKind::Gateway { .. }) => format!("gateway:{}", l.port),
                (None, _) => format!("*:{}", l.port),
            };
            for (kind, rules) in [("tcp", &l.tcp), ("tls", &l.tls)] {
                for r in rules {
                    let m = if r.matches.is_empty() {
                        "*".to_string()
                    } else {
                        r.matches
                            .iter()
                            .map(|m| {
                                if m.sni_hosts.is_empty() {
                                    format!("{:?}", m.destination_subnets)
                                } else {
                                    format!("sni {}", m.sni_hosts.join(","))
                                }
                            })
                            .collect::<Vec<_>>()
                            .join(" | ")
                    };
                    let action = r
                        .route
                        .probabilities()
                        .iter()
                        .map(|(c, p)| format!("{} {:.0}%", c.name, p * 100.0))
                        .collect::<Vec<_>>()
                        .join(", ");
                    rows.push([addr.clone(), kind.into(), m, action, r.origin.clone()]);
                }
            }
        }
        out.push('\n');
        out.push_str(&render(&rows));
    }
    out
}

fn render<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == N {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Input of `nodeproxy simulate`.
#[derive(Debug, Clone, Default)]
pub struct SimRequest {
    /// Host header.
    pub host: String,
    /// Port (default: the service's only port, else 80).
    pub port: Option<u16>,
    /// The address the client connects to (default: the host's service address).
    pub address: Option<IpAddr>,
    /// Path and query.
    pub path: String,
    /// Method.
    pub method: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Client labels.
    pub source_labels: BTreeMap<String, String>,
    /// Client namespace (what it sees by `exportTo`; `sourceNamespace` matches).
    pub source_namespace: Option<String>,
}

/// What `simulate` found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimResult {
    /// Route table used.
    pub table: Option<String>,
    /// Virtual host.
    pub virtual_host: Option<String>,
    /// The most likely outcome (`route to ...`, `404 NR...`).
    pub outcome: String,
    /// Every outcome with its probability (fault and weight draws), most likely first.
    pub outcomes: Vec<SimOutcome>,
    /// The matched rule.
    pub rule: Option<HttpRule>,
    /// Its index.
    pub rule_index: Option<usize>,
    /// Matching block, described.
    pub matched: Option<String>,
}

/// One outcome of a simulated request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimOutcome {
    /// Probability (0..1).
    pub probability: f64,
    /// In words.
    pub outcome: String,
    /// The status the proxy answers with itself (None: forwarded).
    pub status: Option<u16>,
    /// The cluster forwarded to.
    pub cluster: Option<String>,
    /// `Location` of a redirect.
    pub location: Option<String>,
    /// A fault delay before the outcome.
    #[serde(with = "humantime_serde_opt")]
    pub delay: Option<std::time::Duration>,
}

mod humantime_serde_opt {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// Why no route table takes `host` on `port`: no service has the host at all, or it has no
/// HTTP route table on that port (with the ports that do).
fn unknown_host(snap: &Snapshot, host: &str, port: u16) -> String {
    let ports: Vec<String> = snap
        .http_tables
        .iter()
        .filter(|t| t.vhost(host).is_some())
        .map(|t| t.name.clone())
        .collect();
    if ports.is_empty() {
        let mut known: Vec<&str> = snap
            .http_tables
            .iter()
            .flat_map(|t| t.vhosts.iter().flat_map(|v| v.domains.iter()))
            .map(String::as_str)
            .filter(|d| d.contains('.') && !d.contains(':'))
            .collect();
        known.sort_unstable();
        known.dedup();
        known.truncate(10);
        return format!(
            "no service has host `{host}` (HTTP hosts in this configuration: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    format!(
        "`{host}` has no HTTP route table on port {port}; it has one on {} (use --port)",
        ports.join(", ")
    )
}

/// The listener a client reaches for `req` on `port`: the address given, the host when it
/// is an address, the host's service address, a mesh listener on the port whose route table
/// knows the host, else the gateway port.
fn sim_listener(snap: &Snapshot, req: &SimRequest, port: u16) -> Result<ListenerRef, String> {
    let host = crate::compile::strip_port(&req.host).to_ascii_lowercase();
    // An address given that no mesh listener has: a gateway's, when one serves the port.
    if let Some(a) = req.address
        && snap.mesh_listener(SocketAddr::new(a, port)).is_none()
        && snap.gateway_listener(port).is_some()
    {
        return Ok(ListenerRef::Gateway(port));
    }
    let address = req.address.or_else(|| host.parse().ok()).or_else(|| {
        snap.registry
            .services
            .iter()
            .filter(|s| s.port(port).is_some())
            .find(|s| {
                crate::compile::registry::kube_aliases(&s.host, &snap.registry.cluster_domain)
                    .contains(&host)
            })
            .and_then(|s| s.addresses.first().copied())
    });
    if let Some(a) = address {
        return Ok(ListenerRef::Mesh(SocketAddr::new(a, port)));
    }
    let mesh = snap.listeners.iter().find(|l| {
        l.port == port
            && matches!(l.kind, ListenerKind::Mesh { .. })
            && l.http
                .is_some_and(|t| snap.http_tables[t].vhost(&req.host).is_some())
    });
    if let Some(l) = mesh {
        let ip = l.address.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        return Ok(ListenerRef::Mesh(SocketAddr::new(ip, port)));
    }
    if snap.gateway_listener(port).is_some() {
        return Ok(ListenerRef::Gateway(port));
    }
    Err(unknown_host(snap, &req.host, port))
}

/// Evaluate a request against the snapshot without sending anything: the proxy's own decision
/// (`proxy::decide`), every fault and weight draw enumerated.
pub fn simulate(snap: &Snapshot, req: &SimRequest) -> Result<SimResult, String> {
    let snap = match req
        .source_namespace
        .as_deref()
        .and_then(|ns| snap.scope_of_namespace(ns))
    {
        Some(i) => &*snap.scoped[i].snapshot,
        None => snap,
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("invalid header name `{k}`"))?;
        let value = HeaderValue::from_str(v.trim())
            .map_err(|_| format!("invalid value for header `{k}`"))?;
        headers.append(name, value);
    }
    let method = http::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| format!("invalid method `{}`", req.method))?;
    let port = req.port.unwrap_or_else(|| {
        let host = crate::compile::strip_port(&req.host).to_ascii_lowercase();
        snap.registry
            .services
            .iter()
            .find(|s| {
                crate::compile::registry::kube_aliases(&s.host, &snap.registry.cluster_domain)
                    .contains(&host)
            })
            .filter(|s| s.ports.len() == 1)
            .map(|s| s.ports[0].number)
            .unwrap_or(80)
    });
    let listener = sim_listener(snap, req, port)?;
    let dst = match listener {
        ListenerRef::Mesh(a) => a,
        ListenerRef::Gateway(p) => SocketAddr::new(IpAddr::from([0, 0, 0, 0]), p),
    };
    let conn = ConnInfo::new(
        SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0),
        dst,
        dst,
        listener,
    );
    let _ = conn.source_info.set(SourceInfo {
        ip: None,
        labels: req.source_labels.clone(),
        namespace: req.source_namespace.clone(),
    });
    let head = Head {
        method: &method,
        version: http::Version::HTTP_11,
        authority: &req.host,
        path_and_query: if req.path.is_empty() { "/" } else { &req.path },
        headers: &headers,
    };
    let mut all = enumerate(1024, |dice| decide(snap, &conn, &head, dice));
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let first = &all[0].1;
    Ok(SimResult {
        table: first.table.map(|t| t.name.clone()),
        virtual_host: first.vhost.map(|v| v.name.clone()),
        outcome: first.summary(),
        outcomes: all.iter().map(|(p, d)| sim_outcome(*p, d)).collect(),
        matched: first.rule.map(|m| {
            m.block
                .map(|b| describe_match(&m.rule.matches[b]))
                .unwrap_or_else(|| "* (catch-all)".into())
        }),
        rule: first.rule.map(|m| m.rule.clone()),
        rule_index: first.rule.map(|m| m.index),
    })
}

fn sim_outcome(probability: f64, d: &Decision<'_>) -> SimOutcome {
    let (status, cluster, location) = match &d.action {
        Action::Forward(p) => (None, Some(p.dest.name.clone()), None),
        Action::Reply(r) => match r {
            Reply::NoRoute => (Some(404), None, None),
            Reply::HttpsRedirect(l) => (Some(301), None, Some(l.clone())),
            Reply::Redirect { code, location } => (Some(*code), None, Some(location.clone())),
            Reply::Direct { status, .. } => (Some(*status), None, None),
            Reply::Preflight { .. } => (Some(200), None, None),
            Reply::Abort(AbortStatus::Http(s)) => (Some(*s), None, None),
            Reply::Abort(AbortStatus::Grpc(_)) => (Some(200), None, None),
            Reply::NoCluster(_) => (Some(503), None, None),
        },
    };
    SimOutcome {
        probability,
        outcome: d.summary(),
        status,
        cluster,
        location,
        delay: d.delay,
    }
}

/// `simulate` as text.
pub fn simulate_text(r: &SimResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "route table:   {}", r.table.as_deref().unwrap_or("-"));
    let _ = writeln!(
        out,
        "virtual host:  {}",
        r.virtual_host.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "outcome:       {}", r.outcome);
    if r.outcomes.len() > 1 {
        let _ = writeln!(out, "outcomes:");
        for o in &r.outcomes {
            let _ = writeln!(out, "  {:>8.4}%  {}", o.probability * 100.0, o.outcome);
        }
    }
    let Some(rule) = &r.rule else { return out };
    let _ = writeln!(
        out,
        "rule:          #{} {} of {}",
        r.rule_index.unwrap_or(0),
        rule.name
            .as_deref()
            .map(|n| format!("`{n}`"))
            .unwrap_or_default(),
        rule.origin
    );
    let _ = writeln!(
        out,
        "matched by:    {}",
        r.matched.as_deref().unwrap_or("-")
    );
    match &rule.action {
        HttpAction::Route(wc) => {
            let _ = writeln!(out, "destinations:");
            for (c, p) in wc.probabilities() {
                let missing = matches!(c.cluster, crate::compile::ClusterRef::Missing(_));
                let _ = writeln!(
                    out,
                    "  {:>8.4}%  {}{}",
                    p * 100.0,
                    c.name,
                    if missing {
                        "  (cluster does not exist: 503 NC)"
                    } else {
                        ""
                    }
                );
            }
        }
        HttpAction::Redirect(rd) => {
            let _ = writeln!(
                out,
                "redirect:      {} uri={:?} prefix={:?} authority={:?} scheme={:?}",
                rd.code, rd.uri, rd.prefix_rewrite, rd.authority, rd.scheme
            );
        }
        HttpAction::DirectResponse { status, body } => {
            let _ = writeln!(out, "direct:        {status} ({} byte body)", body.len());
        }
    }
    if let Some(f) = &rule.fault {
        if let Some((d, ppm)) = f.delay {
            let _ = writeln!(
                out,
                "fault delay:   {:?} for {}% of requests",
                d,
                ppm as f64 / 10_000.0
            );
        }
        if let Some((s, ppm)) = f.abort {
            let status = match s {
                AbortStatus::Http(c) => format!("HTTP {c}"),
                AbortStatus::Grpc(c) => format!("gRPC {c}"),
            };
            let _ = writeln!(
                out,
                "fault abort:   {status} for {}% of requests",
                ppm as f64 / 10_000.0
            );
        }
    }
    let _ = writeln!(
        out,
        "timeout:       {}",
        rule.timeout
            .map(|t| format!("{t:?}"))
            .unwrap_or_else(|| "none".into())
    );
    let rt = &rule.retry;
    let _ = writeln!(
        out,
        "retries:       {} (perTryTimeout {}, retryOn {})",
        rt.num_retries,
        rt.per_try_timeout
            .map(|t| format!("{t:?}"))
            .unwrap_or_else(|| "none".into()),
        rt.retry_on.tokens()
    );
    for m in &rule.mirrors {
        let _ = writeln!(
            out,
            "mirror:        {} for {}% of requests",
            m.name,
            m.per_million as f64 / 10_000.0
        );
    }
    if let Some(rw) = &rule.rewrite {
        let _ = writeln!(
            out,
            "rewrite:       uri={:?} authority={:?}",
            rw.uri, rw.authority
        );
    }
    out
}
