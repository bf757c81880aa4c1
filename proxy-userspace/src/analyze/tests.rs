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
    // A missing gateway: IST0101, and (as Istio) IST0132, since it has no host.
    assert_eq!(
        codes_of(&d),
        vec![
            ("IST0101", Severity::Error),
            ("IST0132", Severity::Warning),
            ("IST0101", Severity::Error)
        ]
    );
    assert!(d[0].message.contains("default/ingress"));
    assert!(d[2].message.contains("nowhere.default.svc.cluster.local"));
}

#[test]
fn two_mesh_virtual_services_for_one_host_conflict() {
    let vs = |n: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {n}}}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews}}}}]\n"
        )
    };
    let d = run(&format!("{REGISTRY}{}---\n{}", vs("a"), vs("b")));
    // As Istio, each VirtualService of the conflict is reported.
    assert_eq!(
        codes_of(&d),
        vec![("IST0109", Severity::Error), ("IST0109", Severity::Error)]
    );
    assert!(d[0].message.contains("default/b") && d[1].message.contains("default/a"));
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
    // No caCertificates: Istio's IST0128 (top level) and IST0129 (port level) warnings.
    assert_eq!(
        codes_of(&dr("{mode: SIMPLE, sni: reviews.example}")),
        vec![("IST0128", Severity::Warning)]
    );
    assert!(dr("{mode: SIMPLE, caCertificates: /ca.pem}").is_empty());
    let port = run(&format!(
        "{REGISTRY}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\nspec:\n  host: reviews\n  trafficPolicy:\n    portLevelSettings:\n    - port: {{number: 80}}\n      tls: {{mode: SIMPLE}}\n"
    ));
    assert_eq!(codes_of(&port), vec![("IST0129", Severity::Warning)]);
    let mutual = dr("{mode: MUTUAL, caCertificates: /ca.pem}");
    assert_eq!(codes_of(&mutual), vec![("IST0106", Severity::Error)]);
    assert!(
        mutual[0].message.contains("clientCertificate"),
        "{mutual:?}"
    );
    let both = dr("{mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: [a]}");
    assert!(
        codes_of(&both).contains(&("IST0106", Severity::Error)),
        "{both:?}"
    );
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

/// The codes (with severity) of a YAML's analysis; load diagnostics allowed.
fn verdict(yaml: &str) -> Vec<(&'static str, Severity)> {
    let mut set = ConfigSet::default();
    let mut diags = Vec::new();
    set.load_str(Path::new("t.yaml"), yaml, &mut diags);
    let mut out = codes_of(&diags);
    out.extend(codes_of(&analyze(&set)));
    out
}

const GW_HTTPS: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: NAME}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [HOSTS]
    tls: TLS
";

fn gw(name: &str, hosts: &str, tls: &str) -> String {
    GW_HTTPS
        .replace("NAME", name)
        .replace("HOSTS", hosts)
        .replace("TLS", tls)
}

#[test]
fn gateways_of_one_selector_conflict_on_a_host_and_share_certificates() {
    let a = gw(
        "a",
        "a.example.com",
        "{mode: SIMPLE, credentialName: a-cert}",
    );
    let b = gw(
        "b",
        "a.example.com",
        "{mode: SIMPLE, credentialName: b-cert}",
    );
    let d = verdict(&format!("{a}---\n{b}"));
    assert_eq!(
        d.iter().filter(|c| c.0 == "IST0145").count(),
        2,
        "both gateways reported: {d:?}"
    );
    assert!(d.iter().all(|c| c.0 != "IST0138"), "{d:?}");
    let c = gw(
        "c",
        "c.example.com",
        "{mode: SIMPLE, credentialName: a-cert}",
    );
    let d = verdict(&format!("{a}---\n{c}"));
    assert!(d.iter().all(|c| c.0 != "IST0145"), "other hosts: {d:?}");
    assert!(
        d.contains(&("IST0138", Severity::Warning)),
        "one certificate in two gateways: {d:?}"
    );
    // Another selector: another workload, no conflict.
    let other = b.replace("istio: ingressgateway", "istio: other");
    assert!(
        verdict(&format!("{a}---\n{other}"))
            .iter()
            .all(|c| c.0 != "IST0145")
    );
}

#[test]
fn gateway_certificate_sources_as_istio_validates_them() {
    let ok = |tls: &str| {
        let d = verdict(&gw("a", "a.example.com", tls));
        assert!(d.iter().all(|c| c.1 != Severity::Error), "{tls}: {d:?}");
        d
    };
    let bad = |tls: &str| {
        let d = verdict(&gw("a", "a.example.com", tls));
        assert!(d.contains(&("IST0106", Severity::Error)), "{tls}: {d:?}");
    };
    ok("{mode: SIMPLE, credentialNames: [rsa, ecdsa]}");
    ok("{mode: SIMPLE, tlsCertificates: [{serverCertificate: /c.pem, privateKey: /k.pem}]}");
    ok("{mode: MUTUAL, credentialName: a}");
    ok("{mode: MUTUAL, serverCertificate: /c.pem, privateKey: /k.pem, caCertificates: /ca.pem}");
    bad("{mode: SIMPLE}");
    bad("{mode: SIMPLE, credentialName: a, serverCertificate: /c.pem, privateKey: /k.pem}");
    bad("{mode: MUTUAL, serverCertificate: /c.pem, privateKey: /k.pem}");
    bad("{mode: SIMPLE, tlsCertificates: [{serverCertificate: /c.pem}]}");
    bad("{mode: ISTIO_MUTUAL, credentialName: a}");
    let d = ok("{mode: PASSTHROUGH, credentialName: a}");
    assert!(d.contains(&("IST0133", Severity::Warning)), "{d:?}");
}

#[test]
fn service_port_names_as_istio_reads_them() {
    let svc = |ty: &str, port: &str| {
        verdict(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: shop}}\nspec:\n  type: {ty}\n  selector: {{app: s}}\n  ports: [{port}]\n"
        ))
    };
    assert!(svc("ClusterIP", "{name: http-web, port: 80}").is_empty());
    assert!(svc("ClusterIP", "{name: web, port: 80, appProtocol: http}").is_empty());
    assert!(
        svc("ClusterIP", "{name: db, port: 3306}").is_empty(),
        "well-known port"
    );
    assert!(svc("ClusterIP", "{name: dns, port: 5353, protocol: UDP}").is_empty());
    assert_eq!(
        svc("ClusterIP", "{name: web, port: 80}"),
        vec![("IST0118", Severity::Info)]
    );
    assert_eq!(
        svc("ExternalName", "{name: tcp, port: 80}"),
        vec![("IST0150", Severity::Warning)]
    );
}

#[test]
fn deprecated_fields_are_reported() {
    let d = verdict(&format!(
        "{REGISTRY}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: r}}
spec:
  hosts: [reviews]
  http:
  - fault: {{delay: {{fixedDelay: 1s, percent: 10}}}}
    mirror: {{host: reviews}}
    mirrorPercent: 5
    route: [{{destination: {{host: reviews}}}}]
"
    ));
    assert!(d.contains(&("IST0002", Severity::Warning)), "{d:?}");
    assert!(d.contains(&("IST0133", Severity::Warning)), "{d:?}");
    assert!(d.iter().all(|c| c.1 != Severity::Error), "{d:?}");
}

#[test]
fn workload_entries_are_validated_as_istio_does() {
    let we = |spec: &str| {
        verdict(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w}}\nspec: {spec}\n"
        ))
    };
    let errs = |spec: &str| we(spec).iter().filter(|c| c.1 == Severity::Error).count();
    assert_eq!(
        errs("{address: 10.0.0.1, labels: {app: a}, ports: {http: 8080}}"),
        0
    );
    assert_eq!(
        errs("{address: vm1.example.com}"),
        0,
        "a DNS name is allowed"
    );
    assert_eq!(errs("{address: 'unix:///var/run/a.sock'}"), 0);
    assert_eq!(errs("{labels: {app: a}}"), 1, "address required");
    assert_eq!(
        we("{network: n1}"),
        vec![("IST0133", Severity::Warning)],
        "no address on another network: a warning"
    );
    assert_eq!(errs("{address: 'unix://rel.sock'}"), 1);
    assert_eq!(errs("{address: 'unix:///a.sock', ports: {http: 80}}"), 1);
    assert_eq!(errs("{address: bad_name!}"), 1);
    assert_eq!(errs("{address: 10.0.0.1, ports: {Http: 80}}"), 1);
    assert_eq!(errs("{address: 10.0.0.1, ports: {http: 70000}}"), 1);
    assert_eq!(errs("{address: 10.0.0.1, labels: {'-bad': x}}"), 1);
    // ServiceEntry endpoints: ports named as the entry's ports; names only with DNS.
    let se = |res: &str, ep: &str| {
        verdict(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s}}\nspec:\n  hosts: [s.example.com]\n  addresses: [10.9.9.9]\n  resolution: {res}\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints: [{ep}]\n"
        ))
        .iter()
        .filter(|c| c.1 == Severity::Error)
        .count()
    };
    assert_eq!(se("STATIC", "{address: 10.0.0.1, ports: {http: 8080}}"), 0);
    assert_eq!(se("STATIC", "{address: 10.0.0.1, ports: {grpc: 8080}}"), 1);
    assert_eq!(se("STATIC", "{address: a.example.com}"), 1);
    assert_eq!(se("DNS", "{address: a.example.com}"), 0);
}

/// Istio's unreachable-rule and ineffective-match findings (IST0130 warning, IST0131 info),
/// for http, tcp and tls rules.
#[test]
fn unreachable_rules_and_ineffective_matches_as_istio_finds_them() {
    let vs = |rules: &str| {
        let d = verdict(&format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: s}}
spec:
  hosts: [s.example.com]
  addresses: [10.8.0.1]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 5432, name: tcp, protocol: TCP}}, {{number: 443, name: tls, protocol: TLS}}]
  endpoints: [{{address: 10.8.0.2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: v}}
spec:
  hosts: [s.example.com]
{rules}"
        ));
        let mut found: Vec<&str> = d
            .iter()
            .filter(|c| c.0 == "IST0130" || c.0 == "IST0131")
            .map(|c| c.0)
            .collect();
        found.sort();
        found
    };
    let to = "route: [{destination: {host: s.example.com, port: {number: 80}}}]";
    let tcp_to = "route: [{destination: {host: s.example.com, port: {number: 5432}}}]";
    let tls_to = "route: [{destination: {host: s.example.com, port: {number: 443}}}]";
    let cases: Vec<(String, Vec<&str>)> = vec![
        // A rule after one without matches, each of its blocks.
        (
            format!(
                "  http:\n  - {to}\n  - match: [{{uri: {{prefix: /a}}}}, {{uri: {{prefix: /b}}}}]\n    {to}\n"
            ),
            vec!["IST0130", "IST0130"],
        ),
        // Two rules without matches.
        (format!("  http:\n  - {to}\n  - {to}\n"), vec!["IST0130"]),
        // A duplicate block; the whole rule duplicated: also unreachable.
        (
            format!(
                "  http:\n  - match: [{{uri: {{exact: /a}}}}]\n    {to}\n  - match: [{{uri: {{exact: /a}}}}]\n    {to}\n"
            ),
            vec!["IST0130", "IST0131"],
        ),
        (
            format!(
                "  http:\n  - match: [{{uri: {{exact: /a}}}}]\n    {to}\n  - match: [{{uri: {{exact: /a}}}}, {{uri: {{exact: /b}}}}]\n    {to}\n"
            ),
            vec!["IST0131"],
        ),
        // Named blocks differ from unnamed ones (Istio compares the whole block).
        (
            format!(
                "  http:\n  - match: [{{uri: {{exact: /a}}}}]\n    {to}\n  - match: [{{name: n, uri: {{exact: /a}}}}]\n    {to}\n"
            ),
            vec![],
        ),
        // A prefix covering a longer one with the same conditions; not with other headers.
        (
            format!(
                "  http:\n  - match: [{{uri: {{prefix: /api}}}}]\n    {to}\n  - match: [{{uri: {{prefix: /api/v2}}}}]\n    {to}\n"
            ),
            vec!["IST0131"],
        ),
        (
            format!(
                "  http:\n  - match: [{{uri: {{prefix: /api}}}}]\n    {to}\n  - match: [{{uri: {{prefix: /api/v2}}, headers: {{x: {{exact: '1'}}}}}}]\n    {to}\n"
            ),
            vec![],
        ),
        (
            format!(
                "  http:\n  - match: [{{uri: {{prefix: /api/v2}}}}]\n    {to}\n  - match: [{{uri: {{prefix: /api}}}}]\n    {to}\n"
            ),
            vec![],
        ),
        // A catch-all prefix is not a rule without matches: later prefixes are covered.
        (
            format!(
                "  http:\n  - match: [{{uri: {{prefix: /}}}}]\n    {to}\n  - match: [{{uri: {{prefix: /x}}}}]\n    {to}\n"
            ),
            vec!["IST0131"],
        ),
        // tcp and tls.
        (
            format!(
                "  tcp:\n  - match: [{{port: 5432}}]\n    {tcp_to}\n  - match: [{{port: 5432}}]\n    {tcp_to}\n"
            ),
            vec!["IST0130", "IST0131"],
        ),
        (
            format!("  tcp:\n  - {tcp_to}\n  - match: [{{port: 5432}}]\n    {tcp_to}\n"),
            vec!["IST0130"],
        ),
        (
            format!(
                "  tls:\n  - match: [{{sniHosts: [s.example.com]}}]\n    {tls_to}\n  - match: [{{sniHosts: [s.example.com]}}]\n    {tls_to}\n"
            ),
            vec!["IST0130", "IST0131"],
        ),
    ];
    for (rules, want) in cases {
        assert_eq!(vs(&rules), want, "{rules}");
    }
}

#[test]
fn host_rules_of_service_entries_and_virtual_services() {
    let se = |hosts: &str, res: &str, ports: &str| {
        verdict(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s}}\nspec:\n  hosts: {hosts}\n  addresses: [10.7.0.1]\n  resolution: {res}\n  ports: {ports}\n"
        ))
        .iter()
        .filter(|c| c.1 == Severity::Error)
        .count()
    };
    let http = "[{number: 80, name: http, protocol: HTTP}]";
    let tcp = "[{number: 5432, name: tcp, protocol: TCP}]";
    assert_eq!(se("[api.example.com]", "DNS", http), 0);
    assert_eq!(se("['*.example.com']", "DNS", http), 0);
    assert_eq!(
        se("[api]", "DNS", http),
        1,
        "DNS without endpoints needs an FQDN"
    );
    assert_eq!(se("[api]", "STATIC", http), 0);
    assert_eq!(se("['foo.*.com']", "NONE", http), 1);
    assert_eq!(se("[a.example.com, b.example.com]", "DNS", tcp), 1);
    assert_eq!(se("[a.example.com, b.example.com]", "NONE", tcp), 0);
    assert_eq!(se("[a.example.com, b.example.com]", "DNS", http), 0);
    let vs = |hosts: &str| {
        verdict(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: {hosts}\n  gateways: [gw]\n  http: [{{directResponse: {{status: 200}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ['*']}}]\n"
        ))
        .iter()
        .filter(|c| c.1 == Severity::Error)
        .count()
    };
    assert_eq!(vs("[a.foo.com, b.foo.com]"), 0);
    assert_eq!(vs("[a.foo.com, a.foo.com]"), 1);
    assert_eq!(vs("['*.foo.com', a.foo.com]"), 1);
    assert_eq!(vs("['*.com', '*.foo.com']"), 1);
}

#[test]
fn cors_policies_are_validated_as_istio_does() {
    let cors = |policy: &str| {
        verdict(&format!(
            "{REGISTRY}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:\n  - corsPolicy: {policy}\n    route: [{{destination: {{host: reviews}}}}]\n"
        ))
        .iter()
        .filter(|c| c.1 == Severity::Error)
        .count()
    };
    assert_eq!(
        cors(
            "{allowOrigins: [{exact: 'https://a.example'}], allowMethods: [GET, POST, '*'], allowHeaders: [x-a, '*'], exposeHeaders: [x-b], maxAge: 24h}"
        ),
        0
    );
    assert_eq!(cors("{allowMethods: [get]}"), 1);
    assert_eq!(cors("{allowMethods: [FETCH]}"), 1);
    assert_eq!(cors("{allowHeaders: ['bad header']}"), 1);
    assert_eq!(cors("{exposeHeaders: ['']}"), 1);
    assert_eq!(cors("{maxAge: 1.5s}"), 1);
}

#[test]
fn header_operations_as_istio_validates_them() {
    let ops = |headers: &str, rewrite: &str| {
        verdict(&format!(
            "{REGISTRY}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r}}\nspec:\n  hosts: [reviews]\n  http:\n  - headers: {headers}\n    {rewrite}route: [{{destination: {{host: reviews}}}}]\n"
        ))
    };
    let errors = |h: &str, rw: &str| ops(h, rw).iter().filter(|c| c.1 == Severity::Error).count();
    assert_eq!(
        errors("{request: {set: {x-a: '100%%'}, remove: [x-b]}}", ""),
        0
    );
    assert_eq!(errors("{request: {set: {x-a: 'abc%123'}}}", ""), 1);
    assert_eq!(errors("{request: {set: {':path': /x}}}", ""), 1);
    assert_eq!(errors("{request: {remove: [host]}}", ""), 1);
    assert_eq!(errors("{response: {set: {host: a}}}", ""), 1);
    assert_eq!(errors("{request: {set: {':authority': a.example}}}", ""), 0);
    assert_eq!(
        errors(
            "{request: {set: {host: a.example}}}",
            "rewrite: {authority: b.example}\n    "
        ),
        1,
        "the authority rewritten twice"
    );
    let variable = ops("{request: {set: {x-host: '%HOSTNAME%'}}}", "");
    assert!(
        variable.contains(&("NP0003", Severity::Warning)),
        "{variable:?}"
    );
}

/// Cross-object findings as Istio's analyzers make them: destinations exist for the
/// namespaces that use them; gateway hosts by `ns/host` scope, per gateway; every
/// ServiceEntry of a protocol conflict.
#[test]
fn cross_object_findings_as_istio_makes_them() {
    let count = |yaml: &str, code: &str| verdict(yaml).iter().filter(|c| c.0 == code).count();
    // A Service exported to another namespace only is not a destination here.
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: details, namespace: default, annotations: {networking.istio.io/exportTo: banana}}\nspec:\n  ports: [{port: 9080, name: http}]\n  selector: {app: details}\n---\n";
    let vs = |ns: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: d, namespace: {ns}}}\nspec:\n  hosts: [details]\n  http: [{{route: [{{destination: {{host: details.default.svc.cluster.local}}}}]}}]\n"
        )
    };
    assert_eq!(count(&format!("{svc}{}", vs("istio-system")), "IST0101"), 1);
    assert_eq!(count(&format!("{svc}{}", vs("banana")), "IST0101"), 0);
    // `./host` on a Gateway: only VirtualServices of the Gateway's namespace.
    let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\nspec:\n  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [./a.example.com]}]\n---\n";
    let bound = |ns: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: {ns}}}\nspec:\n  hosts: [a.example.com]\n  gateways: [istio-system/gw]\n  http: [{{directResponse: {{status: 200}}}}]\n"
        )
    };
    assert_eq!(
        count(&format!("{gw}{}", bound("istio-system")), "IST0132"),
        0
    );
    assert_eq!(count(&format!("{gw}{}", bound("default")), "IST0132"), 1);
    // Two ServiceEntries, one host and port, two protocols: both reported.
    let se = |n: &str, proto: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {n}}}\nspec:\n  hosts: [api.example.com]\n  ports: [{{number: 443, name: p, protocol: {proto}}}]\n  resolution: DNS\n"
        )
    };
    assert_eq!(
        count(
            &format!("{}{}", se("a", "HTTPS"), se("b", "TLS")),
            "IST0177"
        ),
        2
    );
    assert_eq!(
        count(&format!("{}{}", se("a", "TLS"), se("b", "TLS")), "IST0177"),
        0
    );
}
