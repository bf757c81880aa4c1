//! The decision, table-tested: each case is a small configuration, a connection, a request
//! head and the decision expected (with scripted dice where a draw is made).

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};

use super::*;
use crate::compile::Snapshot;
use crate::proxy::{ConnInfo, ListenerRef};

const VIP: &str = "127.0.60.1:80";

const BASE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  addresses: [127.0.60.1]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  endpoints:
  - {address: 127.0.60.11, labels: {version: v1}}
  - {address: 127.0.60.12, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
";

fn snap(vs: &str) -> Snapshot {
    snap_raw(&format!("{BASE}{vs}"))
}

fn snap_raw(yaml: &str) -> Snapshot {
    let mut set = crate::config::ConfigSet::default();
    let mut diags = Vec::new();
    set.load_str(std::path::Path::new("t.yaml"), yaml, &mut diags);
    let built = crate::publish::build_set(&set, diags);
    built
        .snapshot
        .unwrap_or_else(|| panic!("{:#?}", built.diagnostics))
}

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
{http}"
    )
}

fn mesh(dst: &str) -> ConnInfo {
    let dst: SocketAddr = dst.parse().unwrap();
    ConnInfo::new(
        "10.1.1.9:40000".parse().unwrap(),
        dst,
        dst,
        ListenerRef::Mesh(dst),
    )
}

/// A request: method, authority, path, headers.
struct Req {
    method: Method,
    authority: &'static str,
    path: &'static str,
    headers: HeaderMap,
    version: Version,
}

fn get(authority: &'static str, path: &'static str) -> Req {
    Req {
        method: Method::GET,
        authority,
        path,
        headers: HeaderMap::new(),
        version: Version::HTTP_11,
    }
}

impl Req {
    fn header(mut self, k: &'static str, v: &'static str) -> Req {
        self.headers
            .append(HeaderName::from_static(k), HeaderValue::from_static(v));
        self
    }

    fn head(&self) -> Head<'_> {
        Head {
            method: &self.method,
            version: self.version,
            authority: self.authority,
            path_and_query: self.path,
            headers: &self.headers,
        }
    }
}

/// Dice that answer from a script (panics when a draw is not scripted: the test says which
/// draws a decision makes).
struct Script(Vec<u32>);

impl Dice for Script {
    fn fires(&mut self, _: u32) -> bool {
        assert!(!self.0.is_empty(), "unexpected draw");
        self.0.remove(0) == 1
    }

    fn pick(&mut self, _: &WeightedClusters) -> usize {
        assert!(!self.0.is_empty(), "unexpected pick");
        self.0.remove(0) as usize
    }
}

fn decide_with<'a>(s: &'a Snapshot, c: &ConnInfo, r: &Req, dice: &[u32]) -> Decision<'a> {
    let mut d = Script(dice.to_vec());
    let out = decide(s, c, &r.head(), &mut d);
    assert!(d.0.is_empty(), "draws left: {:?}", d.0);
    out
}

fn forwarded<'a, 'd>(d: &'d Decision<'a>) -> &'d Plan<'a> {
    match &d.action {
        Action::Forward(p) => p,
        Action::Reply(r) => panic!("expected a forward, got {r:?}"),
    }
}

fn replied<'a, 'd>(d: &'d Decision<'a>) -> &'d Reply<'a> {
    match &d.action {
        Action::Reply(r) => r,
        Action::Forward(p) => panic!("expected a reply, got a forward to {}", p.dest.name),
    }
}

#[test]
fn no_listener_for_the_address_is_404_nr() {
    let s = snap("");
    let d = decide_with(&s, &mesh("127.0.99.1:80"), &get("x", "/"), &[]);
    assert_eq!(replied(&d), &Reply::NoRoute);
    assert!(d.table.is_none() && d.vhost.is_none());
}

#[test]
fn the_services_default_route_without_virtual_service() {
    let s = snap("");
    let d = decide_with(&s, &mesh(VIP), &get("reviews", "/"), &[]);
    let p = forwarded(&d);
    assert_eq!(
        p.dest.name,
        "outbound|80||reviews.default.svc.cluster.local"
    );
    assert_eq!(p.path, "/");
    assert_eq!(p.authority, "reviews");
    assert_eq!(p.passthrough, Passthrough::No);
    assert!(!p.h2 && p.mirrors.is_empty() && p.timeout.is_none());
}

#[test]
fn an_unknown_host_on_a_service_address_uses_that_services_virtual_host() {
    let s = snap(&vs(
        "  - route: [{destination: {host: reviews, subset: v2}}]\n",
    ));
    let d = decide_with(&s, &mesh(VIP), &get("not-a-known-host.example", "/"), &[]);
    assert_eq!(
        forwarded(&d).dest.name,
        "outbound|80|v2|reviews.default.svc.cluster.local"
    );
}

#[test]
fn header_match_first_match_wins_and_no_match_is_404() {
    let s = snap(&vs("  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: mobile
    match: [{headers: {user-agent: {prefix: Mobile}}}]
    route: [{destination: {host: reviews, subset: v1}}]
"));
    let c = mesh(VIP);
    let d = decide_with(
        &s,
        &c,
        &get("reviews", "/").header("end-user", "jason"),
        &[],
    );
    assert_eq!(d.rule.unwrap().route_name(), "jason");
    assert!(forwarded(&d).dest.name.contains("|v2|"));
    let d = decide_with(
        &s,
        &c,
        &get("reviews", "/").header("user-agent", "Mobile Safari"),
        &[],
    );
    assert_eq!((d.rule.unwrap().index, d.rule.unwrap().block), (1, Some(0)));
    let d = decide_with(&s, &c, &get("reviews", "/"), &[]);
    assert_eq!(replied(&d), &Reply::NoRoute);
    assert!(d.vhost.is_some() && d.rule.is_none());
    assert!(d.summary().contains("none matches"), "{}", d.summary());
}

#[test]
fn weighted_destinations_draw_once_and_enumerate_to_their_weights() {
    let s = snap(&vs("  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"));
    let c = mesh(VIP);
    let r = get("reviews", "/");
    assert!(
        forwarded(&decide_with(&s, &c, &r, &[1]))
            .dest
            .name
            .contains("|v2|")
    );
    assert!(
        forwarded(&decide_with(&s, &c, &r, &[0]))
            .dest
            .name
            .contains("|v1|")
    );
    let all = enumerate(100, |b| decide(&s, &c, &r.head(), b).summary());
    assert_eq!(
        all,
        vec![
            (
                0.8,
                "route to outbound|80|v1|reviews.default.svc.cluster.local".to_string()
            ),
            (
                0.2,
                "route to outbound|80|v2|reviews.default.svc.cluster.local".to_string()
            ),
        ]
    );
}

#[test]
fn fault_delay_then_abort_each_its_own_draw() {
    let s = snap(&vs("  - fault:
      delay: {fixedDelay: 2s, percentage: {value: 100}}
      abort: {httpStatus: 503, percentage: {value: 25}}
    route: [{destination: {host: reviews, subset: v1}}]
"));
    let c = mesh(VIP);
    let r = get("reviews", "/");
    // 100% delay: no draw; the abort draws once.
    let d = decide_with(&s, &c, &r, &[1]);
    assert_eq!(d.delay, Some(Duration::from_secs(2)));
    assert_eq!(replied(&d), &Reply::Abort(AbortStatus::Http(503)));
    let d = decide_with(&s, &c, &r, &[0]);
    assert_eq!(d.delay, Some(Duration::from_secs(2)));
    forwarded(&d);
    let all = enumerate(100, |b| decide(&s, &c, &r.head(), b).summary());
    assert_eq!(all.len(), 2);
    assert!(
        (all[0].0 - 0.25).abs() < 1e-9 && all[0].1.starts_with("503 FI"),
        "{all:?}"
    );
    assert!(all[1].1.ends_with("after a 2s fault delay"), "{all:?}");
}

#[test]
fn grpc_abort_keeps_its_grpc_status() {
    let s = snap(&vs(
        "  - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: reviews}}]
",
    ));
    let d = decide_with(&s, &mesh(VIP), &get("reviews", "/"), &[]);
    assert_eq!(replied(&d), &Reply::Abort(AbortStatus::Grpc(14)));
}

#[test]
fn redirect_replaces_the_matched_prefix_and_keeps_the_query() {
    let s = snap(&vs("  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 308}
  - match: [{uri: {prefix: /v1}}]
    redirect: {authority: other.example, scheme: https}
"));
    let c = mesh(VIP);
    let d = decide_with(&s, &c, &get("reviews:80", "/v1/x?y=1"), &[]);
    assert_eq!(
        replied(&d),
        &Reply::Redirect {
            code: 301,
            location: "https://other.example/v1/x?y=1".into()
        }
    );
    let d = decide_with(&s, &c, &get("reviews", "/old/a?b"), &[]);
    assert_eq!(
        replied(&d),
        &Reply::Redirect {
            code: 308,
            location: "http://reviews/new".into()
        }
    );
}

#[test]
fn direct_response_answers_with_its_body() {
    let s = snap(&vs(
        "  - directResponse: {status: 418, body: {string: teapot}}\n",
    ));
    let d = decide_with(&s, &mesh(VIP), &get("reviews", "/"), &[]);
    let Reply::Direct { status, body, .. } = replied(&d) else {
        panic!()
    };
    assert_eq!((*status, *body), (418, &b"teapot"[..]));
}

#[test]
fn an_undefined_subset_is_503_nc() {
    let mut s = snap(&vs(
        "  - route: [{destination: {host: reviews, subset: v1}}]\n",
    ));
    // A subset removed from the DestinationRule after the VirtualService named it.
    if let Some(r) = s
        .http_tables
        .iter_mut()
        .flat_map(|t| &mut t.vhosts)
        .flat_map(|v| &mut v.rules)
        .next()
        && let HttpAction::Route(wc) = &mut r.action
    {
        wc.clusters[0].cluster = ClusterRef::Missing("no subset v9".into());
    }
    let d = decide_with(&s, &mesh(VIP), &get("reviews", "/"), &[]);
    assert!(matches!(replied(&d), Reply::NoCluster(_)));
}

#[test]
fn cors_preflight_is_answered_here_and_a_simple_request_carries_the_origin() {
    let s = snap(&vs("  - corsPolicy:
      allowOrigins: [{exact: 'https://a.example'}]
      allowMethods: [GET]
    route: [{destination: {host: reviews}}]
"));
    let c = mesh(VIP);
    let mut pre = get("reviews", "/")
        .header("origin", "https://a.example")
        .header("access-control-request-method", "GET");
    pre.method = Method::OPTIONS;
    let d = decide_with(&s, &c, &pre, &[]);
    assert!(matches!(
        replied(&d),
        Reply::Preflight { allowed: true, .. }
    ));
    // An origin the policy does not allow: the preflight goes upstream (Envoy's default).
    let mut other = get("reviews", "/")
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET");
    other.method = Method::OPTIONS;
    assert!(
        forwarded(&decide_with(&s, &c, &other, &[]))
            .cors_origin
            .is_none()
    );
    let simple = get("reviews", "/").header("origin", "https://a.example");
    let d = decide_with(&s, &c, &simple, &[]);
    assert_eq!(
        forwarded(&d).cors_origin.as_ref().unwrap(),
        "https://a.example"
    );
}

#[test]
fn rewrite_of_prefix_and_authority() {
    let s = snap(&vs("  - match: [{uri: {prefix: /api/v1}}]
    rewrite: {uri: /v1, authority: backend.internal}
    route: [{destination: {host: reviews}}]
"));
    let d = decide_with(&s, &mesh(VIP), &get("reviews", "/api/v1/users?id=3"), &[]);
    let p = forwarded(&d);
    assert_eq!(
        (p.path.as_str(), p.authority.as_str()),
        ("/v1/users?id=3", "backend.internal")
    );
}

#[test]
fn timeout_is_the_lower_of_the_route_and_grpc_timeout() {
    let s = snap(&vs("  - timeout: 2s
    route: [{destination: {host: reviews}}]
"));
    let c = mesh(VIP);
    let r = get("reviews", "/").header("grpc-timeout", "500m");
    assert_eq!(
        forwarded(&decide_with(&s, &c, &r, &[])).timeout,
        Some(Duration::from_millis(500))
    );
    let r = get("reviews", "/").header("grpc-timeout", "5S");
    assert_eq!(
        forwarded(&decide_with(&s, &c, &r, &[])).timeout,
        Some(Duration::from_secs(2))
    );
}

#[test]
fn mirrors_fire_by_their_percentage() {
    let s = snap(&vs(
        "  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 50}
",
    ));
    let c = mesh(VIP);
    let r = get("reviews", "/");
    assert_eq!(forwarded(&decide_with(&s, &c, &r, &[1])).mirrors, vec![0]);
    assert!(forwarded(&decide_with(&s, &c, &r, &[0])).mirrors.is_empty());
}

#[test]
fn https_redirect_answers_before_any_rule() {
    let s = snap(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: [shop.example.com]
    tls: {httpsRedirect: true}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: [shop.example.com]
  gateways: [gw]
  http:
  - route: [{destination: {host: reviews}}]
",
    );
    let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let c = ConnInfo::new(
        "10.1.1.9:1".parse().unwrap(),
        addr,
        addr,
        ListenerRef::Gateway(8080),
    );
    let d = decide_with(&s, &c, &get("shop.example.com:8080", "/cart?x=1"), &[]);
    assert_eq!(
        replied(&d),
        &Reply::HttpsRedirect("https://shop.example.com/cart?x=1".into())
    );
}

#[test]
fn rules_excluded_for_the_source_fall_back_to_the_default_route() {
    let s = snap(&vs("  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews, subset: v2}}]
"));
    let c = mesh(VIP);
    let d = decide_with(&s, &c, &get("reviews", "/"), &[]);
    assert!(d.rule.unwrap().default);
    assert_eq!(
        forwarded(&d).dest.name,
        "outbound|80||reviews.default.svc.cluster.local"
    );
}

#[test]
fn grpc_clusters_go_over_http2() {
    let base = BASE.replace("name: http, protocol: HTTP,", "name: grpc, protocol: GRPC,");
    let s = snap_raw(&format!(
        "{base}{}",
        vs("  - route: [{destination: {host: reviews}}]\n")
    ));
    let d = decide_with(&s, &mesh(VIP), &get("reviews", "/"), &[]);
    assert!(forwarded(&d).h2);
}

#[test]
fn grpc_timeouts_parse() {
    assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
    assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
    assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_grpc_timeout("123456789m"), None, "at most 8 digits");
    assert_eq!(parse_grpc_timeout("5x"), None);
    assert_eq!(parse_grpc_timeout("m"), None);
}

#[test]
fn redirect_builds_location() {
    let rd = Redirect {
        uri: Some("/v1/".into()),
        prefix_rewrite: None,
        authority: None,
        port: None,
        from_request_port: false,
        scheme: None,
        code: 301,
    };
    assert_eq!(
        redirect_location(&rd, "http", "a.b:80", "/old?x=1", None, 80),
        "http://a.b/v1/"
    );
    let rd = Redirect {
        uri: None,
        prefix_rewrite: Some("/new".into()),
        authority: Some("c.d".into()),
        port: Some(8080),
        from_request_port: false,
        scheme: Some("https".into()),
        code: 302,
    };
    assert_eq!(
        redirect_location(&rd, "http", "a.b", "/old/x?y", Some("/old"), 80),
        "https://c.d:8080/new/x?y"
    );
}

#[test]
fn enumeration_stops_at_its_limit() {
    let s = snap(&vs("  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v2}, weight: 50}
"));
    let c = mesh(VIP);
    let r = get("reviews", "/");
    assert_eq!(
        enumerate(1, |b| decide(&s, &c, &r.head(), b).summary()).len(),
        1
    );
}
