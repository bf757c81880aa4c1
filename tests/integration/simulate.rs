//! `nodeproxy simulate` against the live proxy: every scenario in `config/` (and two that
//! exercise gateway redirects and the fallback virtual host) runs in process with a backend on
//! every endpoint; requests derived from each rule's match blocks, plus a plain one and one
//! for a Host no virtual host names, go through the proxy, and each answer must be one of the
//! outcomes `simulate` reports for that request.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use nodeproxy::compile::{EndpointAddress, HttpMatch, Snapshot, StrMatch};
use nodeproxy::inspect::{SimOutcome, SimRequest, simulate};
use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::proxy::{self, Resp, Scenario, client, send};

/// One request to compare.
#[derive(Debug, Clone)]
struct Probe {
    /// Where the client connects.
    addr: SocketAddr,
    host: String,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

/// A request that satisfies what can be satisfied of a match block (exact and prefix values;
/// a regex gets none, which still makes a request worth comparing).
fn probe_for(addr: SocketAddr, host: &str, m: Option<&HttpMatch>) -> Probe {
    let value = |s: &StrMatch| match s {
        StrMatch::Exact(v) | StrMatch::Prefix(v) => Some(v.clone()),
        StrMatch::Present => Some("x".into()),
        StrMatch::Regex(_) => None,
    };
    let mut p = Probe {
        addr,
        host: host.to_string(),
        method: "GET".into(),
        path: "/".into(),
        headers: Vec::new(),
    };
    let Some(m) = m else { return p };
    if let Some(v) = m
        .uri
        .as_ref()
        .and_then(value)
        .filter(|v| v.starts_with('/'))
    {
        p.path = v;
    }
    for (name, s) in &m.headers {
        if let Some(v) = value(s) {
            p.headers.push((name.to_string(), v));
        }
    }
    let rare = m.rare();
    if let Some(v) = rare.method.as_ref().and_then(value) {
        p.method = v;
    }
    let query: Vec<String> = rare
        .query_params
        .iter()
        .filter_map(|(k, s)| value(s).map(|v| format!("{k}={v}")))
        .collect();
    if !query.is_empty() {
        p.path = format!("{}?{}", p.path, query.join("&"));
    }
    p
}

/// A concrete host for a virtual host domain (`*.x` → `probe.x`, `*` → a made-up name).
fn concrete(domain: &str) -> String {
    match domain.strip_prefix('*') {
        Some("") => "anything.example".into(),
        Some(suffix) => format!("probe{suffix}"),
        None => domain.to_string(),
    }
}

/// Requests for every listener with a route table: each virtual host's rules' blocks, `/`,
/// and a Host nobody names.
fn probes(snap: &Snapshot, gateway_ip: IpAddr) -> Vec<Probe> {
    let mut out = Vec::new();
    for l in &snap.listeners {
        let Some(t) = l.http else { continue };
        let ip = match (&l.kind, l.address) {
            (nodeproxy::compile::ListenerKind::Gateway { .. }, _) => gateway_ip,
            (_, Some(a)) => a,
            // A listener on every address (no service address): nothing to connect to here.
            (_, None) => continue,
        };
        let addr = SocketAddr::new(ip, l.port);
        for vh in &snap.http_tables[t].vhosts {
            let Some(domain) = vh.domains.iter().find(|d| !d.contains(':')) else {
                continue;
            };
            let host = concrete(domain);
            out.push(probe_for(addr, &host, None));
            for rule in vh.rules.iter().chain(&vh.default_rules) {
                for m in &rule.matches {
                    out.push(probe_for(addr, &host, Some(m)));
                }
            }
        }
        out.push(probe_for(addr, "no-such-host.example", None));
    }
    out
}

/// Does the live answer fit this outcome?
fn fits(o: &SimOutcome, r: &Resp, endpoints: &BTreeMap<String, BTreeSet<String>>) -> bool {
    match (&o.cluster, o.status) {
        (Some(cluster), _) => {
            let eps = &endpoints[cluster];
            // Served by one of the cluster's endpoints (each backend answers with its address).
            (r.status == 200 && eps.contains(&r.body))
                // A cluster with no endpoint the test could start: the proxy's own failure.
                || (eps.is_empty()
                    && matches!(r.status, 502..=504)
                    && r.header("server") == "envoy")
        }
        (None, Some(status)) => {
            r.status == status
                && o.location
                    .as_deref()
                    .is_none_or(|l| r.header("location") == l)
        }
        (None, None) => false,
    }
}

async fn compare(s: &Scenario) -> usize {
    let built = nodeproxy::publish::build(std::slice::from_ref(&s.path));
    let snap = built
        .snapshot
        .unwrap_or_else(|| panic!("{:#?}", built.diagnostics));
    // A backend on every IP endpoint, answering with its address.
    let mut endpoints: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut backends = BTreeMap::new();
    for c in &snap.clusters {
        let set = endpoints.entry(c.name.clone()).or_default();
        for e in &c.endpoints {
            let EndpointAddress::Ip(ip) = e.address else {
                continue;
            };
            let a = SocketAddr::new(ip, e.port).to_string();
            if !backends.contains_key(&a) {
                backends.insert(a.clone(), Backend::start(&a, &a).await);
            }
            set.insert(a);
        }
    }
    let gateway_ip = s.ip(250);
    let _p = proxy::start(s, Some(&gateway_ip)).await;
    let c = client();
    let probes = probes(&snap, gateway_ip.parse().unwrap());
    for p in &probes {
        let sim = simulate(
            &snap,
            &SimRequest {
                host: p.host.clone(),
                port: Some(p.addr.port()),
                address: Some(p.addr.ip()),
                path: p.path.clone(),
                method: p.method.clone(),
                headers: p.headers.clone(),
                source_labels: BTreeMap::new(),
                source_namespace: None,
            },
        )
        .unwrap_or_else(|e| panic!("{}: simulate {p:?}: {e}", s.path.display()));
        // Several outcomes (weights, fault percentages): a few draws, each must be one of them.
        let tries = if sim.outcomes.len() > 1 { 4 } else { 1 };
        for _ in 0..tries {
            let mut b = Request::builder()
                .method(p.method.as_str())
                .uri(format!("http://{}{}", p.addr, p.path))
                .header("host", &p.host);
            for (k, v) in &p.headers {
                b = b.header(k, v);
            }
            let r = send(&c, b.body(Full::new(Bytes::new())).unwrap()).await;
            assert!(
                sim.outcomes.iter().any(|o| fits(o, &r, &endpoints)),
                "{}: {p:?}\nproxy answered {} {:?} (location {:?})\nsimulate said {:#?}",
                s.path.display(),
                r.status,
                r.body,
                r.header("location"),
                sim.outcomes
            );
        }
    }
    probes.len()
}

/// Fault delays shortened: the comparison is about the decision, not the wait.
fn quick(s: Scenario) -> Scenario {
    let mut yaml = String::new();
    let mut rest = s.yaml.as_str();
    while let Some(i) = rest.find("fixedDelay:") {
        let (before, after) = rest.split_at(i + "fixedDelay:".len());
        yaml.push_str(before);
        yaml.push_str(" 20ms");
        let end = after.find([',', '}', '\n']).unwrap_or(after.len());
        rest = &after[end..];
    }
    yaml.push_str(rest);
    Scenario::from_yaml_on(yaml, s.net.clone())
}

#[tokio::test]
async fn simulate_agrees_with_the_proxy_on_every_scenario() {
    let mut files: Vec<String> = std::fs::read_dir(nodeproxy_tests::repo_path("config"))
        .expect("config/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    let mut total = 0;
    for f in &files {
        total += tokio::time::timeout(
            Duration::from_secs(60),
            compare(&quick(Scenario::from_config(f))),
        )
        .await
        .unwrap_or_else(|_| panic!("{f}: timed out"));
    }
    assert!(total >= 40, "{total} requests compared");
}

#[tokio::test]
async fn simulate_agrees_on_https_redirect_and_the_fallback_virtual_host() {
    let s = Scenario::from_config("gateway.yaml");
    let yaml = format!(
        "{}\n---\napiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: redirect, namespace: gateway}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 8081, name: http, protocol: HTTP}}
    hosts: [shop.example.com]
    tls: {{httpsRedirect: true}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: gateway}}
spec:
  hosts: [shop.example.com]
  gateways: [redirect]
  http:
  - route: [{{destination: {{host: frontend, subset: v1}}}}]
",
        s.yaml
    );
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    assert!(compare(&s).await >= 5);
}
