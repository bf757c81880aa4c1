//! Property: every configuration that validates compiles, and every request decision the
//! data path takes from it (rule match, weighted pick, fault draw, retry back-off, deadlines,
//! mirror draw, load-balancer pick with and without a hash) runs without a panic.
//!
//! The generator aims at the edges: int32 and uint32 limits, negative values, percentages
//! above 100, durations up to protobuf's maximum, huge ring and pool sizes. CI runs the
//! default number of cases; a longer run on demand:
//! `PROPTEST_CASES=20000 cargo test -p nodeproxy --lib panic_free`.

use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use rand::{Rng, SeedableRng};

use crate::compile::{ClusterRef, HttpAction, RequestView, RuleMatch, SourceInfo, match_http};
use crate::config::ConfigSet;
use crate::publish::build_set;
use crate::upstream::{Clusters, lb};

fn int() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("0".to_string()),
        1 => Just("1".to_string()),
        1 => Just("-1".to_string()),
        1 => Just("2147483647".to_string()),
        1 => Just("4294967295".to_string()),
        1 => Just("9223372036854775807".to_string()),
        // Mostly ordinary values, so that most sets validate and reach the data path.
        40 => (0u32..2000).prop_map(|v| v.to_string()),
    ]
}

fn percent() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("0".to_string()),
        1 => Just("0.0001".to_string()),
        1 => Just("100".to_string()),
        1 => Just("100.5".to_string()),
        1 => Just("-3".to_string()),
        40 => (0u32..100).prop_map(|v| v.to_string()),
    ]
}

fn duration() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("0s".to_string()),
        1 => Just("1ns".to_string()),
        1 => Just("1ms".to_string()),
        1 => Just("0.5s".to_string()),
        1 => Just("1h".to_string()),
        1 => Just("87600h".to_string()),
        1 => Just("315576000000s".to_string()),
        40 => (1u32..5000).prop_map(|v| format!("{v}ms")),
    ]
}

fn opt<S: Strategy<Value = String>>(s: S, key: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        s.prop_map(move |v| format!("{key}: {v}, "))
    ]
}

fn load_balancer() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        prop_oneof![
            Just("ROUND_ROBIN"),
            Just("RANDOM"),
            Just("LEAST_REQUEST"),
            Just("PASSTHROUGH")
        ]
        .prop_map(|s| format!("loadBalancer: {{simple: {s}}}, ")),
        int().prop_map(|n| format!(
            "loadBalancer: {{consistentHash: {{httpHeaderName: x-user, ringHash: {{minimumRingSize: {n}}}}}}}, "
        )),
        int().prop_map(|n| format!(
            "loadBalancer: {{consistentHash: {{useSourceIp: true, minimumRingSize: {n}}}}}, "
        )),
        prop_oneof![Just("2"), Just("3"), Just("65537"), Just("4"), Just("5000011")].prop_map(
            |n| format!(
                "loadBalancer: {{consistentHash: {{httpQueryParameterName: q, maglev: {{tableSize: {n}}}}}}}, "
            )
        ),
    ]
}

prop_compose! {
    fn traffic_policy()(
        lb in load_balancer(),
        max_conn in opt(int(), "maxConnections"),
        pending in opt(int(), "http1MaxPendingRequests"),
        per_conn in opt(int(), "maxRequestsPerConnection"),
        max_retries in opt(int(), "maxRetries"),
        errors in opt(int(), "consecutive5xxErrors"),
        interval in opt(duration(), "interval"),
        ejection in opt(duration(), "baseEjectionTime"),
        max_eject in opt(int(), "maxEjectionPercent"),
    ) -> String {
        format!(
            "{{{lb}connectionPool: {{tcp: {{{max_conn}}}, http: {{{pending}{per_conn}{max_retries}}}}}, outlierDetection: {{{errors}{interval}{ejection}{max_eject}}}}}"
        )
    }
}

prop_compose! {
    fn http_route()(
        prefix in prop_oneof![Just(String::new()), Just("match: [{uri: {prefix: /x}}], ".to_string()), Just("match: [{headers: {x-user: {exact: a}}}], ".to_string())],
        w1 in int(),
        w2 in int(),
        two in any::<bool>(),
        delay in prop_oneof![Just(String::new()), (percent(), duration()).prop_map(|(p, d)| format!("delay: {{percentage: {{value: {p}}}, fixedDelay: {d}}}, "))],
        abort in prop_oneof![Just(String::new()), (percent(), prop_oneof![Just(200), Just(503), Just(599), Just(600), Just(0), Just(-1)]).prop_map(|(p, s)| format!("abort: {{percentage: {{value: {p}}}, httpStatus: {s}}}, "))],
        retries in prop_oneof![Just(String::new()), (int(), duration(), duration()).prop_map(|(a, t, b)| format!("retries: {{attempts: {a}, perTryTimeout: {t}, retryOn: 5xx, backoff: {b}}}, "))],
        timeout in opt(duration(), "timeout"),
        mirror in prop_oneof![Just(String::new()), percent().prop_map(|p| format!("mirror: {{host: svc.example, subset: b}}, mirrorPercentage: {{value: {p}}}, "))],
    ) -> String {
        let route = if two {
            format!("[{{destination: {{host: svc.example, subset: a}}, weight: {w1}}}, {{destination: {{host: svc.example, subset: b}}, weight: {w2}}}]")
        } else {
            format!("[{{destination: {{host: svc.example}}, weight: {w1}}}]")
        };
        let fault = if delay.is_empty() && abort.is_empty() { String::new() } else { format!("fault: {{{delay}{abort}}}, ") };
        format!("  - {{{prefix}{fault}{retries}{timeout}{mirror}route: {route}}}\n")
    }
}

prop_compose! {
    fn config_set()(
        resolution in prop_oneof![Just("STATIC"), Just("DNS")],
        endpoints in prop::collection::vec((any::<bool>(), opt(int(), "weight")), 0..4),
        policy in traffic_policy(),
        subset_policy in prop_oneof![Just(String::new()), traffic_policy().prop_map(|p| format!(", trafficPolicy: {p}"))],
        routes in prop::collection::vec(http_route(), 1..4),
    ) -> String {
        let eps: Vec<String> = endpoints
            .iter()
            .enumerate()
            .map(|(i, (a, w))| {
                format!("{{{w}address: 10.9.0.{}, labels: {{v: {}}}}}", i + 11, if *a { "a" } else { "b" })
            })
            .collect();
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc, namespace: ns}}
spec:
  hosts: [svc.example]
  addresses: [10.9.0.1]
  resolution: {resolution}
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc, namespace: ns}}
spec:
  host: svc.example
  trafficPolicy: {policy}
  subsets: [{{name: a, labels: {{v: a}}{subset_policy}}}, {{name: b, labels: {{v: b}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc, namespace: ns}}
spec:
  hosts: [svc.example]
  http:
{}",
            eps.join(", "),
            routes.concat()
        )
    }
}

/// Every decision the data path takes for a few requests, on every rule of `snap`.
fn drive(snap: crate::compile::Snapshot, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let view = Clusters::new(None, Arc::new(crate::upstream::guard::DialGuard::open()))
        .sync(Arc::new(snap));
    let snap = &view.snapshot;
    let source = SourceInfo::default();
    for table in &snap.http_tables {
        for vh in &table.vhosts {
            for (path, user) in [("/", None), ("/x/y", Some("a")), ("/x?q=1", Some("b"))] {
                let mut headers = HeaderMap::new();
                if let Some(u) = user {
                    headers.insert("x-user", u.parse().unwrap());
                }
                let req = RequestView {
                    method: "GET",
                    scheme: "http",
                    authority: "svc.example",
                    path_and_query: path,
                    headers: &headers,
                    source: &source,
                };
                let RuleMatch::Matched { rule, .. } = match_http(&vh.rules, &req) else {
                    continue;
                };
                let rule = &vh.rules[rule];
                let now = Instant::now();
                if let Some(f) = &rule.fault {
                    if let Some((d, ppm)) = f.delay {
                        let _ = rng.random_range(0..1_000_000) < ppm;
                        let _ = now + d;
                    }
                    if let Some((_, ppm)) = &f.abort {
                        let _ = rng.random_range(0..1_000_000) < *ppm;
                    }
                }
                if let Some(t) = rule.timeout {
                    let _ = now + t;
                }
                if let Some(t) = rule.retry.per_try_timeout {
                    let _ = now + t;
                }
                for attempt in 2..=rule.retry.num_retries.saturating_add(1).min(20) {
                    let _ = rule.retry.backoff(attempt, |k| rng.random_range(0..k));
                }
                for m in &rule.mirrors {
                    let _ = rng.random_range(0..1_000_000) < m.per_million;
                }
                let HttpAction::Route(wc) = &rule.action else {
                    continue;
                };
                // The proxy draws in [0, total): a validated route always has weight.
                let picked = wc.pick(rng.random_range(0..wc.total));
                let _ = wc.pick(wc.total - 1);
                let ClusterRef::Cluster(id) = picked.cluster else {
                    continue;
                };
                let state = &view.clusters[id];
                let policy = state.policy.load();
                let set = state.lb_set_for_request();
                for hash in [None, Some(rng.random::<u64>())] {
                    let _ = lb::pick(&state.lb, &policy.lb.algorithm, &set, hash, &[]);
                }
            }
        }
    }
}

/// Load, analyze, compile; when the set validates, drive it.
fn check(yaml: &str, seed: u64) {
    let mut set = ConfigSet::default();
    let mut diags = Vec::new();
    set.load_str(std::path::Path::new("gen.yaml"), yaml, &mut diags);
    if let Some(snap) = build_set(&set, diags).snapshot {
        drive(snap, seed);
    }
}

/// Runs on a thread with a large stack: the generator's nested strategies take more than a
/// test thread's 2 MiB in a debug build (the code under test does not).
#[test]
fn panic_free_for_every_config_that_validates() {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            // PROPTEST_CASES sets the number of cases (256 by default).
            let mut runner = TestRunner::new(ProptestConfig::default());
            let result = runner.run(&(config_set(), any::<u64>()), |(yaml, seed)| {
                check(&yaml, seed);
                Ok(())
            });
            if let Err(e) = result {
                panic!("{e}");
            }
        })
        .expect("spawn")
        .join()
        .expect("no panic");
}

#[test]
fn the_generator_reaches_valid_sets() {
    // A property over sets that never validate proves nothing: most generated sets must.
    let (valid, total) = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            let mut runner = TestRunner::deterministic();
            let strategy = config_set();
            let (mut valid, total) = (0, 200);
            for _ in 0..total {
                let yaml = strategy.new_tree(&mut runner).unwrap().current();
                let mut set = ConfigSet::default();
                let mut diags = Vec::new();
                set.load_str(std::path::Path::new("gen.yaml"), &yaml, &mut diags);
                valid += usize::from(build_set(&set, diags).snapshot.is_some());
            }
            (valid, total)
        })
        .expect("spawn")
        .join()
        .expect("no panic");
    assert!(
        valid * 10 >= total,
        "{valid} of {total} generated sets validate"
    );
}
