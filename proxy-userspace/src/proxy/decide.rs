//! What to do with a request, decided once, without I/O or a clock: listener → virtual host →
//! rule → CORS preflight → fault delay and abort → redirect, direct response or a forward plan
//! (cluster, rewritten path and authority, timeout, protocol, mirrors).
//!
//! The proxy executes the [`Decision`] (`http.rs`); `nodeproxy simulate` calls the same
//! function with an enumerating [`Dice`] ([`enumerate`]) and reports every outcome with its
//! probability, so the two cannot disagree.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Version, header};

use super::ConnInfo;
use crate::compile::{
    AbortStatus, ClusterId, ClusterRef, Cors, HttpAction, HttpRule, HttpTable, Protocol, Redirect,
    RequestView, RuleMatch, Snapshot, StrMatch, VirtualHost, WeightedCluster, WeightedClusters,
    match_http, strip_port,
};

/// The randomness a decision draws on: fault percentages, weighted destinations, mirror
/// percentages. The proxy draws from the thread's generator ([`ThreadDice`]); `simulate`
/// enumerates every branch ([`enumerate`]); tests script it.
pub trait Dice {
    /// True with probability `per_million / 1_000_000`; called only for `0 < per_million <
    /// 1_000_000` (the certain cases are decided without a draw).
    fn fires(&mut self, per_million: u32) -> bool;
    /// The index of one of `wc`'s destinations, each with probability `weight / total`;
    /// called only when there are several.
    fn pick(&mut self, wc: &WeightedClusters) -> usize;
}

/// The proxy's dice: the thread-local generator.
pub struct ThreadDice;

impl Dice for ThreadDice {
    fn fires(&mut self, per_million: u32) -> bool {
        use rand::Rng;
        rand::rng().random_range(0..1_000_000) < per_million
    }

    fn pick(&mut self, wc: &WeightedClusters) -> usize {
        use rand::Rng;
        wc.index(rand::rng().random_range(0..wc.total))
    }
}

fn fires(dice: &mut impl Dice, per_million: u32) -> bool {
    match per_million {
        0 => false,
        1_000_000.. => true,
        p => dice.fires(p),
    }
}

/// What a decision reads of a request: its head only (the body is not needed to decide).
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    /// Method.
    pub method: &'a Method,
    /// Downstream protocol version.
    pub version: Version,
    /// `:authority` or `Host`, as sent (port included).
    pub authority: &'a str,
    /// Path and query (`/` when the request has none).
    pub path_and_query: &'a str,
    /// Header fields.
    pub headers: &'a HeaderMap,
}

/// A decision: where the request matched, a fault delay to wait first, and what to do.
#[derive(Debug)]
pub struct Decision<'a> {
    /// The route table of the listener, when it has one.
    pub table: Option<&'a HttpTable>,
    /// The virtual host chosen (by Host, else the listener's fallback).
    pub vhost: Option<&'a VirtualHost>,
    /// The rule that matched.
    pub rule: Option<Matched<'a>>,
    /// Fault delay that fired (flag DI): wait this long before the action.
    pub delay: Option<Duration>,
    /// What to do.
    pub action: Action<'a>,
}

/// The matched rule.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'a> {
    /// The rule.
    pub rule: &'a HttpRule,
    /// Its index (in the virtual host's rules, or its default rules when `default`).
    pub index: usize,
    /// The match block that matched (`None`: a catch-all rule).
    pub block: Option<usize>,
    /// From the default rules (every rule was excluded for this client by source checks).
    pub default: bool,
}

impl<'a> Matched<'a> {
    /// The route name for logs: the rule's name, else its origin.
    pub fn route_name(&self) -> &'a str {
        self.rule.name.as_deref().unwrap_or(&self.rule.origin)
    }
}

/// The action of a decision. Not boxed: a forward plan is what most requests get, and an
/// allocation per request costs more than moving the larger enum.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Action<'a> {
    /// Answer here.
    Reply(Reply<'a>),
    /// Forward upstream.
    Forward(Plan<'a>),
}

/// A response made by the proxy itself.
#[derive(Debug, PartialEq)]
pub enum Reply<'a> {
    /// No listener, route table, virtual host or rule takes the request: 404 NR.
    NoRoute,
    /// A virtual host with Gateway `httpsRedirect`: 301 to this location.
    HttpsRedirect(String),
    /// A rule's `redirect`.
    Redirect {
        /// Status (301, 302, 303, 307, 308).
        code: u16,
        /// `Location`.
        location: String,
    },
    /// A rule's `directResponse` (with the rule's response header mutations).
    Direct {
        /// Status.
        status: u16,
        /// Body.
        body: &'a [u8],
        /// The rule (for its response header mutations).
        rule: &'a HttpRule,
    },
    /// A CORS preflight answered here (`allowed`: with the policy's headers).
    Preflight {
        /// The policy.
        cors: &'a Cors,
        /// The request's `Origin`.
        origin: HeaderValue,
        /// Did the origin match the policy?
        allowed: bool,
    },
    /// A fault abort (flag FI).
    Abort(AbortStatus),
    /// The chosen destination is not a cluster (undefined subset, unknown host): 503 NC.
    NoCluster(&'a str),
}

/// Where and how to forward a request.
#[derive(Debug)]
pub struct Plan<'a> {
    /// The destination picked.
    pub dest: &'a WeightedCluster,
    /// Its cluster.
    pub cluster: ClusterId,
    /// Path and query to send (after `rewrite`).
    pub path: String,
    /// `Host` / `:authority` to send (after `rewrite.authority` and header `set` of `:authority`).
    pub authority: String,
    /// Route timeout, or the client's `grpc-timeout` when lower (None: none).
    pub timeout: Option<Duration>,
    /// Send over HTTP/2.
    pub h2: bool,
    /// Where the endpoint comes from.
    pub passthrough: Passthrough,
    /// The mirrors that fire for this request (indices into the rule's mirrors).
    pub mirrors: Vec<usize>,
    /// The CORS origin to answer with (the request's `Origin` matched the policy).
    pub cors_origin: Option<HeaderValue>,
}

/// Whether (and where) a request goes to its original destination instead of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough {
    /// Load-balance over the cluster's endpoints.
    No,
    /// Forward to the captured connection's original destination.
    To(SocketAddr),
    /// A passthrough cluster reached without capture: there is no original destination.
    Unavailable,
    /// Resolve the request's own host, at this port (a wildcard DNS ServiceEntry).
    Resolve(u16),
}

impl<'a> Decision<'a> {
    fn reply(r: Reply<'a>) -> Decision<'a> {
        Decision {
            table: None,
            vhost: None,
            rule: None,
            delay: None,
            action: Action::Reply(r),
        }
    }

    /// One line for `simulate` and logs: `route outbound|80|v1|reviews...`, `404 NR`, ...
    pub fn summary(&self) -> String {
        let delay = self
            .delay
            .map(|d| format!(" after a {d:?} fault delay"))
            .unwrap_or_default();
        let what = match &self.action {
            Action::Forward(p) => format!("route to {}", p.dest.name),
            Action::Reply(r) => match r {
                Reply::NoRoute => match (self.vhost, self.rule) {
                    (None, _) => "404 NR: no virtual host takes the Host".into(),
                    (Some(_), None) => "404 NR: the virtual host has rules but none matches".into(),
                    _ => "404 NR".into(),
                },
                Reply::HttpsRedirect(l) => format!("301 to {l} (httpsRedirect)"),
                Reply::Redirect { code, location } => format!("{code} redirect to {location}"),
                Reply::Direct { status, body, .. } => {
                    format!("{status} direct response ({} byte body)", body.len())
                }
                Reply::Preflight { allowed, .. } => format!(
                    "200 CORS preflight ({})",
                    if *allowed {
                        "origin allowed"
                    } else {
                        "origin not allowed"
                    }
                ),
                Reply::Abort(AbortStatus::Http(s)) => format!("{s} FI (fault abort)"),
                Reply::Abort(AbortStatus::Grpc(g)) => format!("gRPC status {g} FI (fault abort)"),
                Reply::NoCluster(name) => format!("503 NC: cluster {name} does not exist"),
            },
        };
        format!("{what}{delay}")
    }
}

/// Decide what to do with a request that arrived on `conn`. The decision borrows from the
/// snapshot only, so the request can be taken apart while it is carried out.
pub fn decide<'a>(
    snap: &'a Snapshot,
    conn: &ConnInfo,
    head: &Head<'_>,
    dice: &mut impl Dice,
) -> Decision<'a> {
    let Some(listener) = conn.listener.lookup(snap) else {
        return Decision::reply(Reply::NoRoute);
    };
    let Some(table) = listener.http.map(|t| &snap.http_tables[t]) else {
        return Decision::reply(Reply::NoRoute);
    };
    let mut d = Decision::reply(Reply::NoRoute);
    d.table = Some(table);
    let Some(vi) = table.vhost(head.authority).or(listener.fallback_vhost) else {
        return d;
    };
    let vhost = &table.vhosts[vi];
    d.vhost = Some(vhost);
    if vhost.https_redirect {
        let host = strip_port(head.authority);
        d.action = Action::Reply(Reply::HttpsRedirect(format!(
            "https://{host}{}",
            head.path_and_query
        )));
        return d;
    }
    let view = RequestView {
        method: head.method.as_str(),
        scheme: conn.scheme,
        authority: head.authority,
        path_and_query: head.path_and_query,
        headers: head.headers,
        source: conn.source_info(snap),
    };
    let (rules, m, default) = match match_http(&vhost.rules, &view) {
        RuleMatch::NoneApply => (
            &vhost.default_rules,
            match_http(&vhost.default_rules, &view),
            true,
        ),
        m => (&vhost.rules, m, false),
    };
    let RuleMatch::Matched { rule: index, block } = m else {
        return d;
    };
    let rule = &rules[index];
    d.rule = Some(Matched {
        rule,
        index,
        block,
        default,
    });
    d.action = act(snap, rule, block, conn, head, &mut d.delay, dice);
    d
}

/// A matched rule's action: CORS preflight, fault delay and abort, then its action.
fn act<'a>(
    snap: &'a Snapshot,
    rule: &'a HttpRule,
    block: Option<usize>,
    conn: &ConnInfo,
    head: &Head<'_>,
    delay: &mut Option<Duration>,
    dice: &mut impl Dice,
) -> Action<'a> {
    let mut cors_origin = None;
    if let Some(cors) = &rule.cors
        && let Some(origin) = head.headers.get(header::ORIGIN)
        && let Ok(o) = origin.to_str()
    {
        let allowed = cors.allow_origins.iter().any(|m| m.matches(o));
        let preflight = *head.method == Method::OPTIONS
            && head
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight && (allowed || !cors.forward_unmatched_preflights) {
            return Action::Reply(Reply::Preflight {
                cors,
                origin: origin.clone(),
                allowed,
            });
        }
        cors_origin = allowed.then(|| origin.clone());
    }
    // Fault injection: delay (outside the route timeout), then abort, each its own draw.
    if let Some(f) = &rule.fault {
        if let Some((d, ppm)) = f.delay
            && fires(dice, ppm)
        {
            *delay = Some(d);
        }
        if let Some((status, ppm)) = f.abort
            && fires(dice, ppm)
        {
            return Action::Reply(Reply::Abort(status));
        }
    }
    let wc = match &rule.action {
        HttpAction::DirectResponse { status, body } => {
            return Action::Reply(Reply::Direct {
                status: *status,
                body,
                rule,
            });
        }
        HttpAction::Redirect(rd) => {
            let matched_prefix = block.and_then(|b| match &rule.matches[b].uri {
                Some(StrMatch::Prefix(p)) => Some(p.as_str()),
                _ => None,
            });
            return Action::Reply(Reply::Redirect {
                code: rd.code,
                location: redirect_location(
                    rd,
                    conn.scheme,
                    head.authority,
                    head.path_and_query,
                    matched_prefix,
                    conn.port(),
                ),
            });
        }
        HttpAction::Route(wc) => wc,
    };
    let dest = match wc.clusters.len() {
        1 => &wc.clusters[0],
        _ => &wc.clusters[dice.pick(wc).min(wc.clusters.len() - 1)],
    };
    let ClusterRef::Cluster(cluster) = dest.cluster else {
        return Action::Reply(Reply::NoCluster(&dest.name));
    };
    let mut p = plan(rule, block, dest, cluster, conn, head, cors_origin, dice);
    p.for_cluster(&snap.clusters[cluster], head.version);
    Action::Forward(p)
}

/// The forward plan for `dest`: rewritten path and authority, timeout, protocol, mirrors.
#[allow(clippy::too_many_arguments)]
fn plan<'a>(
    rule: &'a HttpRule,
    block: Option<usize>,
    dest: &'a WeightedCluster,
    cluster: ClusterId,
    conn: &ConnInfo,
    head: &Head<'_>,
    cors_origin: Option<HeaderValue>,
    dice: &mut impl Dice,
) -> Plan<'a> {
    let mut authority: Option<&str> = None;
    let path = match &rule.rewrite {
        Some(rw) => {
            authority = rw.authority.as_deref();
            rewrite_path(rw, rule, block, head.path_and_query)
        }
        None => head.path_and_query.to_string(),
    };
    if let Some(a) = dest.headers.authority().or(rule.headers.authority()) {
        authority = Some(a.as_str());
    }
    // gRPC: the client's grpc-timeout is honoured, capped by the route timeout when there is one.
    let grpc_timeout = head
        .headers
        .get(&super::headers::GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let timeout = match (rule.timeout, grpc_timeout) {
        (Some(r), Some(g)) => Some(r.min(g)),
        (r, g) => r.or(g),
    };
    let mirrors = rule
        .mirrors
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.cluster, ClusterRef::Cluster(_)) && fires(dice, m.per_million))
        .map(|(i, _)| i)
        .collect();
    Plan {
        dest,
        cluster,
        path,
        authority: authority.unwrap_or(head.authority).to_string(),
        timeout,
        h2: false,
        passthrough: if conn.original_dst != conn.local {
            Passthrough::To(conn.original_dst)
        } else {
            Passthrough::Unavailable
        },
        mirrors,
        cors_origin,
    }
}

impl Plan<'_> {
    /// Complete the plan with what the cluster says: HTTP/2 or not, passthrough or not.
    fn for_cluster(&mut self, c: &crate::compile::Cluster, downstream: Version) {
        let pool = &c.policy.pool;
        self.h2 = match c.protocol {
            Protocol::Http2 | Protocol::Grpc => {
                !pool.use_client_protocol || downstream == Version::HTTP_2
            }
            _ if pool.use_client_protocol => downstream == Version::HTTP_2,
            _ => pool.h2_upgrade,
        };
        if let Some(port) = c.resolve_requested_host {
            self.passthrough = Passthrough::Resolve(port);
        } else if !c.passthrough {
            self.passthrough = Passthrough::No;
        }
    }
}

/// `grpc-timeout` (gRPC over HTTP/2 spec): up to 8 digits and a unit H M S m u n.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The path after `rewrite.uri` (replacing the matched prefix, or the whole path for exact,
/// regex or no uri match; query kept) or `uriRegexRewrite`.
pub fn rewrite_path(
    rw: &crate::compile::Rewrite,
    rule: &HttpRule,
    block: Option<usize>,
    path_and_query: &str,
) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let new_path = if let Some(u) = &rw.uri {
        match block.and_then(|b| rule.matches[b].uri.as_ref()) {
            Some(StrMatch::Prefix(p)) => {
                let n = if rule.matches[block.unwrap_or(0)].ignore_uri_case {
                    p.len().min(path.len())
                } else {
                    p.len()
                };
                format!("{u}{}", &path[n.min(path.len())..])
            }
            Some(_) => u.clone(),
            // No uri match: the matched prefix is `/` (Envoy prefix_rewrite on a `/` match).
            None => format!("{u}{}", path.strip_prefix('/').unwrap_or(path)),
        }
    } else if let Some((re, sub)) = &rw.uri_regex {
        re.replace_all(path, sub)
    } else {
        path.to_string()
    };
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

/// A redirect's `Location`.
pub fn redirect_location(
    rd: &Redirect,
    scheme: &str,
    authority: &str,
    path_and_query: &str,
    matched_prefix: Option<&str>,
    listener_port: u16,
) -> String {
    let scheme = rd.scheme.as_deref().unwrap_or(scheme);
    let host = rd
        .authority
        .clone()
        .unwrap_or_else(|| strip_port(authority).to_string());
    let port = rd
        .port
        .or(rd.from_request_port.then_some(listener_port))
        .filter(|p| !((scheme == "http" && *p == 80) || (scheme == "https" && *p == 443)));
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    if let Some(u) = &rd.uri {
        // `uri` replaces the whole path and the query.
        return format!("{scheme}://{host}{port}{u}");
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let path = match (&rd.prefix_rewrite, matched_prefix) {
        (Some(pr), Some(mp)) => format!("{pr}{}", path.get(mp.len()..).unwrap_or("")),
        _ => path.to_string(),
    };
    let q = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{path}{q}")
}

/// Dice that walk every branch of a decision, one run per combination of draws.
pub struct Branches {
    /// The choice made at each draw of the current run.
    path: Vec<usize>,
    /// Each draw's alternatives' probabilities in the current run.
    odds: Vec<Vec<f64>>,
    /// Draws made so far in the current run.
    at: usize,
}

impl Branches {
    fn choose(&mut self, odds: Vec<f64>) -> usize {
        if self.at == self.path.len() {
            self.path.push(0);
        }
        let i = self.path[self.at];
        self.odds.truncate(self.at);
        self.odds.push(odds);
        self.at += 1;
        i
    }

    /// Move to the next combination; false when every one was run.
    fn advance(&mut self) -> bool {
        self.path.truncate(self.at);
        while let Some(last) = self.path.pop() {
            let odds = &self.odds[self.path.len()];
            if let Some(next) = (last + 1..odds.len()).find(|&i| odds[i] > 0.0) {
                self.path.push(next);
                return true;
            }
        }
        false
    }
}

impl Dice for Branches {
    fn fires(&mut self, per_million: u32) -> bool {
        let p = f64::from(per_million) / 1e6;
        self.choose(vec![p, 1.0 - p]) == 0
    }

    fn pick(&mut self, wc: &WeightedClusters) -> usize {
        let total = wc.total.max(1) as f64;
        self.choose(
            wc.clusters
                .iter()
                .map(|c| c.weight as f64 / total)
                .collect(),
        )
    }
}

/// Run `f` once for each combination of its draws; each result with its probability. At most
/// `limit` combinations (the rest are left out; their probability is what the results lack).
pub fn enumerate<T>(limit: usize, mut f: impl FnMut(&mut Branches) -> T) -> Vec<(f64, T)> {
    let mut b = Branches {
        path: Vec::new(),
        odds: Vec::new(),
        at: 0,
    };
    let mut out = Vec::new();
    loop {
        b.at = 0;
        let r = f(&mut b);
        let p: f64 = b.path[..b.at]
            .iter()
            .zip(&b.odds)
            .map(|(i, o)| o[*i])
            .product();
        out.push((p, r));
        if out.len() >= limit || !b.advance() {
            return out;
        }
    }
}

#[cfg(test)]
mod tests;
