use std::path::{Path, PathBuf};

use super::*;
use crate::diagnostic::Severity;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn run(yaml: &str) -> Vec<Diagnostic> {
    let mut set = ConfigSet::default();
    let mut diags = Vec::new();
    set.load_str(Path::new("t.yaml"), yaml, &mut diags);
    assert!(diags.is_empty(), "load: {diags:#?}");
    analyze(&set)
}

fn codes_of(d: &[Diagnostic]) -> Vec<(&'static str, Severity)> {
    d.iter().map(|d| (d.code.id, d.severity)).collect()
}

const REGISTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  addresses: [127.0.50.1]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - {address: 127.0.50.11, labels: {version: v1}}
  - {address: 127.0.50.12, labels: {version: v2}}
---
";

#[test]
fn every_example_config_has_nothing_above_info() {
    let mut n = 0;
    for entry in std::fs::read_dir(config_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        n += 1;
        let (set, mut diags) = ConfigSet::load(std::slice::from_ref(&path));
        diags.extend(analyze(&set));
        let bad: Vec<_> = diags
            .iter()
            .filter(|d| d.severity > Severity::Info)
            .collect();
        assert!(bad.is_empty(), "{}: {bad:#?}", path.display());
        crate::compile::compile(&set).unwrap_or_else(|e| panic!("{}: {e:#?}", path.display()));
    }
    assert!(n >= 14, "expected every scenario file, found {n}");
    // The whole directory together, as `nodeproxy validate config/` sees it.
    let (set, mut diags) = ConfigSet::load(&[config_dir()]);
    diags.extend(analyze(&set));
    assert!(
        diags.iter().all(|d| d.severity == Severity::Info),
        "{diags:#?}"
    );
}

#[test]
fn war_story_names_subset_host_and_virtual_service() {
    let (set, mut diags) = ConfigSet::load(&[fixtures().join("war-story.yaml")]);
    diags.extend(analyze(&set));
    let errors: Vec<_> = diags.iter().filter(|d| d.is_error()).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = errors[0];
    assert_eq!(e.code.id, "IST0101");
    let text = e.to_string();
    assert!(text.contains("subset `v2`"), "{text}");
    assert!(text.contains("reviews.default.svc.cluster.local"), "{text}");
    assert!(
        text.contains("VirtualService/default/reviews-canary"),
        "{text}"
    );
    assert_eq!(
        e.field.as_deref(),
        Some("spec.http[0].route[0].destination.subset")
    );
    assert!(text.contains("war-story.yaml:"), "{text}");
}

#[test]
fn tutorial_files_load_as_they_are() {
    let (set, load_diags) = ConfigSet::load(&[fixtures().join("tutorial")]);
    assert!(
        !crate::diagnostic::has_errors(&load_diags),
        "{load_diags:#?}"
    );
    let skipped = load_diags.iter().filter(|d| d.code.id == "NP0002").count();
    assert_eq!(
        skipped, 3,
        "one info line per Deployment/ServiceAccount: {load_diags:#?}"
    );
    assert_eq!(set.kube_services.len(), 2);
    let diags = analyze(&set);
    assert!(!crate::diagnostic::has_errors(&diags), "{diags:#?}");
    crate::compile::compile(&set).expect("compiles");
}

#[test]
fn missing_host_and_gateway_are_errors() {
    let d = run(&format!(
        "{REGISTRY}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  gateways: [mesh, ingress]\n  http:\n  - route:\n    - destination: {{host: nowhere}}\n"
    ));
    assert_eq!(
        codes_of(&d),
        vec![("IST0101", Severity::Error), ("IST0101", Severity::Error)]
    );
    assert!(d[0].message.contains("default/ingress"));
    assert!(d[1].message.contains("nowhere.default.svc.cluster.local"));
}

#[test]
fn two_mesh_virtual_services_for_one_host_conflict() {
    let vs = |n: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {n}}}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews}}}}]\n"
        )
    };
    let d = run(&format!("{REGISTRY}{}---\n{}", vs("a"), vs("b")));
    assert_eq!(codes_of(&d), vec![("IST0109", Severity::Error)]);
    assert!(d[0].message.contains("default/a"));
}

#[test]
fn destination_rule_checks() {
    let d = run(&format!(
        "{REGISTRY}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\nspec:\n  host: reviews\n  subsets:\n  - {{name: v3, labels: {{version: v3}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: ghost}}\nspec:\n  host: ghost\n"
    ));
    assert_eq!(
        codes_of(&d),
        vec![
            ("IST0173", Severity::Warning),
            ("IST0174", Severity::Warning)
        ]
    );
}

#[test]
fn rule_level_checks() {
    let d = run(&format!(
        "{REGISTRY}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:
  - match: [{{uri: {{regex: '/a(['}}}}]
    route: [{{destination: {{host: reviews}}}}]
  - match: [{{uri: {{prefix: /w}}}}]
    route:
    - {{destination: {{host: reviews}}, weight: 0}}
    - {{destination: {{host: reviews}}, weight: 0}}
  - match: [{{uri: {{prefix: /r}}}}]
    timeout: 1s
    retries: {{attempts: 3, perTryTimeout: 500ms}}
    fault:
      delay: {{fixedDelay: 1s}}
      abort: {{httpStatus: 503, percentage: {{value: 120}}}}
    route: [{{destination: {{host: reviews}}}}]
  - match: [{{uri: {{prefix: /t}}}}]
    timeout: 0.0001s
    route: [{{destination: {{host: reviews}}}}]
"
    ));
    let got = codes_of(&d);
    assert_eq!(
        got,
        vec![
            ("IST0106", Severity::Error),  // invalid regex
            ("IST0106", Severity::Error),  // weights sum to 0
            ("NP1001", Severity::Warning), // 4 x 500ms > 1s
            ("NP1002", Severity::Info),    // delay without percentage
            ("IST0106", Severity::Error),  // percentage 120
            ("IST0106", Severity::Error),  // duration below 1ms
        ],
        "{d:#?}"
    );
    assert_eq!(d[0].field.as_deref(), Some("spec.http[0].match[0].uri"));
    assert!(d[1].message.contains("sum to 0"));
}

#[test]
fn unreachable_rule_after_catch_all() {
    let d = run(&format!(
        "{REGISTRY}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews}}}}]\n  - match: [{{uri: {{prefix: /x}}}}]\n    route: [{{destination: {{host: reviews}}}}]\n"
    ));
    assert_eq!(codes_of(&d), vec![("IST0130", Severity::Warning)]);
}

#[test]
fn an_ip_in_sni_hosts_is_a_warning_as_in_istio() {
    let d = run("apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [api.example.com]
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ext}
spec:
  hosts: [api.example.com]
  tls:
  - match: [{port: 443, sniHosts: [api.example.com, 10.1.2.3]}]
    route: [{destination: {host: api.example.com}}]
");
    let ip: Vec<_> = d
        .iter()
        .filter(|x| x.message.contains("10.1.2.3"))
        .map(|x| x.severity)
        .collect();
    assert_eq!(ip, vec![Severity::Warning], "{d:#?}");
    assert!(d.iter().all(|x| x.severity != Severity::Error), "{d:#?}");
}

#[test]
fn destination_rule_tls_as_istio_validates_it() {
    let dr = |tls: &str| {
        run(&format!(
            "{REGISTRY}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\nspec:\n  host: reviews\n  trafficPolicy:\n    tls: {tls}\n"
        ))
    };
    assert!(dr("{mode: SIMPLE, sni: reviews.example}").is_empty());
    let mutual = dr("{mode: MUTUAL, caCertificates: /ca.pem}");
    assert_eq!(codes_of(&mutual), vec![("IST0106", Severity::Error)]);
    assert!(
        mutual[0].message.contains("clientCertificate"),
        "{mutual:?}"
    );
    let both = dr("{mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: [a]}");
    assert_eq!(codes_of(&both), vec![("IST0106", Severity::Error)]);
    let istio = dr("{mode: ISTIO_MUTUAL}");
    assert_eq!(codes_of(&istio).len(), 1);
    assert_eq!(istio[0].severity, Severity::Warning);
    assert!(istio[0].message.contains("without TLS"), "{istio:?}");
}

#[test]
fn export_to_values_are_checked_as_istio_does() {
    let vs = |export: &str| {
        format!(
            "{REGISTRY}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: r}}
spec:
  hosts: [reviews]
  exportTo: {export}
  http: [{{route: [{{destination: {{host: reviews}}}}]}}]
"
        )
    };
    for (export, ok) in [
        ("[.]", true),
        ("['*']", true),
        ("[., team1]", true),
        ("[., default]", false),
        ("[team1, team1]", false),
        ("['*', team1]", false),
        ("['~']", false),
        ("[Team1]", false),
        ("[-x]", false),
    ] {
        let d = run(&vs(export));
        let errors: Vec<_> = d.iter().filter(|d| d.severity == Severity::Error).collect();
        assert_eq!(errors.is_empty(), ok, "{export}: {errors:#?}");
    }
    let se = |export: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: x}}
spec:
  hosts: [x.example.com]
  exportTo: {export}
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP}}]
"
        )
    };
    assert!(
        run(&se("['~']"))
            .iter()
            .all(|d| d.severity != Severity::Error)
    );
    assert!(
        run(&se("['~', a]"))
            .iter()
            .any(|d| d.severity == Severity::Error)
    );
    let dr = |export: &str| {
        format!(
            "{REGISTRY}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: r}}
spec:
  host: reviews
  workloadSelector: {{matchLabels: {{app: a}}}}
  exportTo: {export}
"
        )
    };
    let run_dr = |export: &str| {
        let mut set = ConfigSet::default();
        let mut diags = Vec::new();
        set.load_str(Path::new("t.yaml"), &dr(export), &mut diags);
        analyze(&set).iter().any(|d| d.severity == Severity::Error)
    };
    assert!(!run_dr("[.]"));
    assert!(run_dr("[other]"));
    assert!(run_dr("[., other]"));
}
