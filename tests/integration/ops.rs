//! Operating the proxy: Prometheus metrics, diagnostics of a rejected config, endpoint ejection
//! state through the admin API and `nodeproxy proxy-config`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::proxy::{self, Scenario, client, get};
use nodeproxy_tests::{http_get, nodeproxy};

pub(crate) fn scrape(admin: &str) -> prometheus_parse::Scrape {
    let (status, body) = http_get(admin, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("the metrics page parses as Prometheus text")
}

pub(crate) fn counter(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(c)
        | prometheus_parse::Value::Gauge(c)
        | prometheus_parse::Value::Untyped(c) => *c,
        other => panic!("not a counter: {other:?}"),
    }
}

#[tokio::test]
async fn requests_total_by_version_adds_up() {
    let s = Scenario::from_config("canary.yaml");
    let _v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let _v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let p = proxy::start(&s, None).await;
    let c = client();
    let n = 500;
    for _ in 0..n {
        assert_eq!(get(&c, &s.vip(), "/", &[]).await.status, 200);
    }
    // Bodies end (and metrics are recorded) as the client reads them; give the last one a beat.
    let admin = p.admin_addr.to_string();
    let mut by_version: HashMap<String, f64> = HashMap::new();
    for _ in 0..50 {
        by_version.clear();
        for sample in scrape(&admin)
            .samples
            .iter()
            .filter(|s| s.metric == "istio_requests_total")
        {
            assert_eq!(sample.labels.get("reporter"), Some("source"));
            assert_eq!(sample.labels.get("response_code"), Some("200"));
            assert_eq!(sample.labels.get("response_flags"), Some("-"));
            assert_eq!(
                sample.labels.get("destination_service"),
                Some("reviews.canary.svc.cluster.local")
            );
            assert_eq!(
                sample.labels.get("destination_service_name"),
                Some("reviews")
            );
            assert_eq!(sample.labels.get("destination_app"), Some("reviews"));
            *by_version
                .entry(
                    sample
                        .labels
                        .get("destination_version")
                        .unwrap_or("")
                        .to_string(),
                )
                .or_default() += counter(&sample.value);
        }
        if by_version.values().sum::<f64>() == n as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(by_version.values().sum::<f64>(), n as f64, "{by_version:?}");
    assert!(
        by_version["v1"] > by_version["v2"] && by_version["v2"] > 0.0,
        "{by_version:?}"
    );
    let scrape = scrape(&admin);
    let durations = scrape
        .samples
        .iter()
        .find(|s| s.metric == "istio_request_duration_milliseconds")
        .expect("duration histogram");
    assert!(matches!(
        durations.value,
        prometheus_parse::Value::Histogram(_)
    ));
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "nodeproxy_snapshot_version" && counter(&s.value) == 1.0)
    );
}

#[tokio::test]
async fn fault_aborts_and_overflows_carry_codes_and_flags() {
    let s = Scenario::from_config("fault-abort.yaml");
    let yaml = s.yaml.replace("value: 50}", "value: 100}");
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let p = proxy::start(&s, None).await;
    let c = client();
    for _ in 0..7 {
        assert_eq!(get(&c, &s.vip(), "/", &[]).await.status, 503);
    }
    let sc = scrape(&p.admin_addr.to_string());
    let fi: f64 = sc
        .samples
        .iter()
        .filter(|x| {
            x.metric == "istio_requests_total"
                && x.labels.get("response_code") == Some("503")
                && x.labels.get("response_flags") == Some("FI")
        })
        .map(|x| counter(&x.value))
        .sum();
    assert_eq!(fi, 7.0);
    let dest = sc
        .samples
        .iter()
        .find(|x| x.metric == "istio_requests_total")
        .unwrap();
    assert_eq!(
        dest.labels.get("destination_workload"),
        Some("unknown"),
        "no endpoint reached on FI"
    );
}

#[tokio::test]
async fn rejected_config_shows_in_diagnostics_while_traffic_flows() {
    let mut s = Scenario::from_config("canary.yaml");
    let _v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let _v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let p = proxy::start(&s, None).await;
    let admin = p.admin_addr.to_string();
    let broken = s.yaml.replace("subset: v2}", "subset: v3}");
    s.rewrite(broken);
    nodeproxy_tests::eventually("rejection recorded", Duration::from_secs(10), || {
        (p.publisher.status().rejections > 0).then_some(())
    });
    let (status, body) = http_get(&admin, "/diagnostics").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], 1);
    let rejected = &v["rejected"]["diagnostics"];
    let err = rejected
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["severity"] == "ERROR")
        .expect("an error");
    assert_eq!(err["code"]["id"], "IST0101");
    assert!(err["message"].as_str().unwrap().contains("subset `v3`"));
    // Traffic keeps flowing on the previous snapshot (v2 still exists there).
    let c = client();
    for _ in 0..50 {
        assert_eq!(get(&c, &s.vip(), "/", &[]).await.status, 200);
    }
    let sc = scrape(&admin);
    assert!(
        sc.samples
            .iter()
            .any(|x| x.metric == "nodeproxy_config_rejections_total" && counter(&x.value) == 1.0)
    );
}

#[tokio::test]
async fn ejected_endpoint_shows_in_endpoints_and_proxy_config() {
    let s = Scenario::from_config("circuit-breaking.yaml");
    let yaml = s.yaml.replace(
        "      tcp:\n        maxConnections: 1\n      http:\n        http1MaxPendingRequests: 1\n        maxRequestsPerConnection: 1\n",
        "      tcp:\n        maxConnections: 100\n",
    );
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let bad = Backend::start(&format!("{}:8080", s.ip(11)), "bad").await;
    let _good = Backend::start(&format!("{}:8080", s.ip(12)), "good").await;
    bad.behaviour.status.store(500, Ordering::SeqCst);
    let p = proxy::start(&s, None).await;
    let c = client();
    for _ in 0..20 {
        get(&c, &s.vip(), "/", &[]).await;
    }
    let admin = p.admin_addr.to_string();
    let (_, body) = http_get(&admin, "/endpoints").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let eps = v[0]["endpoints"].as_array().unwrap();
    let bad_ep = eps
        .iter()
        .find(|e| e["address"] == format!("{}:8080", s.ip(11)))
        .unwrap();
    assert_eq!(bad_ep["health"], "EJECTED");
    assert!(bad_ep["ejectedUntil"].as_str().unwrap().ends_with('Z'));
    assert!(
        bad_ep["ejectedForMs"].as_u64().unwrap() > 20_000,
        "base ejection 30 s"
    );
    let good_ep = eps
        .iter()
        .find(|e| e["address"] == format!("{}:8080", s.ip(12)))
        .unwrap();
    assert_eq!(good_ep["health"], "HEALTHY");
    let out = tokio::task::spawn_blocking(move || {
        nodeproxy(&["proxy-config", "endpoints", "--admin", &admin])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{}:8080", s.ip(11))))
        .expect("bad endpoint row");
    assert!(
        line.contains("EJECTED for ") && line.contains("until 20"),
        "{line}"
    );
    assert!(line.contains("ejections=1"), "{line}");
    let clusters = nodeproxy(&[
        "proxy-config",
        "clusters",
        "--admin",
        &p.admin_addr.to_string(),
    ]);
    assert!(
        String::from_utf8_lossy(&clusters.stdout)
            .contains("outbound|10080||httpbin.circuit.svc.cluster.local")
    );
}

#[tokio::test]
async fn admin_refuses_public_address_without_flag() {
    let s = Scenario::from_config("canary.yaml");
    let r = nodeproxy::app::start(nodeproxy::app::Options {
        config: vec![s.path.clone()],
        admin: "0.0.0.0:0".parse().unwrap(),
        gateway_ip: "127.0.0.1".parse().unwrap(),
        shadow_host_suffix: false,
        credentials_dir: s.path.parent().unwrap().to_path_buf(),
        admin_public: false,
        log: None,
        capture: None,
        locality: None,
        workers: 1,
        cpu_plan: None,
        kubernetes: None,
        timeouts: Default::default(),
        allow_upstream: Vec::new(),
        cluster_domain: Default::default(),
        max_connections: None,
        takeover: false,
        uninstall_on_exit: false,
    })
    .await;
    let err = r.err().expect("refused").to_string();
    assert!(err.contains("--admin-public"), "{err}");
}

/// The DaemonSet upgrades by takeover: the new pod starts beside the old one (maxSurge 1,
/// maxUnavailable 0, no host port that would keep the two apart), the old one waits for its
/// deletion after handing over, and the grace period covers the drain.
#[test]
fn the_daemonset_rolls_by_takeover() {
    let text =
        std::fs::read_to_string(nodeproxy_tests::repo_path("deploy/daemonset.yaml")).unwrap();
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"].as_u64(), Some(1), "{rolling:?}");
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0), "{rolling:?}");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert!(
        c["ports"].is_null(),
        "hostNetwork ports are host ports: {:?}",
        c["ports"]
    );
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--after-handover=wait"), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--takeover=never")));
    let drain = args
        .iter()
        .find_map(|a| a.strip_prefix("--drain-time="))
        .map(|d| std::time::Duration::from_secs(d.trim_end_matches('s').parse().unwrap()))
        .expect("--drain-time in seconds");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        std::time::Duration::from_secs(grace) > drain,
        "grace {grace}s must cover the drain {drain:?}"
    );
    // The flags are `run`'s.
    let out = std::process::Command::new(nodeproxy_tests::nodeproxy_bin())
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
