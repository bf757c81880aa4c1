//! The Kubernetes source without an API server: objects as the API server returns them (JSON,
//! `tests/fixtures/kubernetes/cluster.json`: the tutorials' backend v1/v2 behind a Service with
//! its EndpointSlice and Pods, a frontend, the DestinationRule and VirtualService) turned into
//! the registry, route tables and enrollment decisions, then updated and deleted. The watch
//! protocol itself is tested in `kube_watch` against a scripted list/watch server.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nodeproxy::compile::Snapshot;
use nodeproxy::compile::registry::EndpointAddress;
use nodeproxy::inspect::{SimRequest, describe_action, simulate};
use nodeproxy::kubernetes::enroll::{Decision, Enroller, Enrollment, NetnsLocator, decide};
use nodeproxy::kubernetes::{Resource, Store};
use serde_json::Value;

pub const NODE: &str = "kind-worker";
pub const HOST: &str = "backend.demo.svc.cluster.local";

pub fn cluster() -> Vec<Value> {
    let text = std::fs::read_to_string(nodeproxy_tests::repo_path(
        "tests/fixtures/kubernetes/cluster.json",
    ))
    .expect("fixture");
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn find(objs: &[Value], kind: &str, name: &str) -> Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} in fixture"))
        .clone()
}

fn store_of(objs: &[Value]) -> Store {
    let mut store = Store::default();
    for o in objs {
        let r = Resource::of_json(o).expect("watched kind");
        store.apply(r, o);
    }
    store
}

fn apply(store: &mut Store, o: &Value) {
    store.apply(Resource::of_json(o).unwrap(), o);
}

fn delete(store: &mut Store, o: &Value) {
    assert!(store.delete(Resource::of_json(o).unwrap(), o), "deleted");
}

fn snapshot(store: &Store) -> Snapshot {
    let built = store.build();
    let errors: Vec<_> = built
        .diagnostics
        .iter()
        .filter(|d| d.severity == nodeproxy::diagnostic::Severity::Error)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    built.snapshot.expect("snapshot")
}

/// The action of the route a request for `host` with `headers` takes.
pub fn route(snap: &Snapshot, host: &str, headers: &[(&str, &str)]) -> String {
    let r = simulate(
        snap,
        &SimRequest {
            host: host.into(),
            port: Some(80),
            address: None,
            path: "/".into(),
            method: "GET".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            source_labels: BTreeMap::new(),
            source_namespace: None,
        },
    )
    .expect("simulate");
    let rule = r.rule.expect("a rule matched");
    let fault = if rule.fault.is_some() { " +fault" } else { "" };
    format!("{}{fault}", describe_action(&rule))
}

fn cluster_endpoints(snap: &Snapshot, subset: &str) -> Vec<String> {
    let c = snap
        .clusters
        .iter()
        .find(|c| c.name == format!("outbound|80|{subset}|{HOST}"))
        .unwrap_or_else(|| panic!("cluster {subset}"));
    c.endpoints
        .iter()
        .map(|e| match &e.address {
            EndpointAddress::Ip(ip) => format!("{ip}:{}", e.port),
            EndpointAddress::Dns(d) => format!("{d}:{}", e.port),
        })
        .collect()
}

#[test]
fn api_objects_become_registry_and_routes() {
    let objs = cluster();
    let mut store = store_of(&objs);
    let snap = snapshot(&store);

    let svc = &snap.registry.services[snap.registry.by_host(HOST).expect("backend service")];
    assert_eq!(
        svc.addresses,
        vec!["10.96.12.34".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(svc.ports.len(), 1);
    assert!(svc.ports[0].protocol.is_http(), "port named `http` is HTTP");
    // The not-ready endpoint is left out; the named targetPort resolves through the slice.
    assert_eq!(cluster_endpoints(&snap, "v1"), ["10.244.1.11:5678"]);
    assert_eq!(cluster_endpoints(&snap, "v2"), ["10.244.1.12:5678"]);
    assert_eq!(
        cluster_endpoints(&snap, ""),
        ["10.244.1.11:5678", "10.244.1.12:5678"]
    );
    assert!(
        snap.registry
            .by_host("backend-headless.demo.svc.cluster.local")
            .is_none(),
        "headless Services have no VIP to route"
    );
    // Pods are workloads by IP: sourceLabels see the frontend's labels.
    let w = snap
        .registry
        .workload("10.244.1.14".parse().unwrap())
        .expect("frontend pod");
    assert_eq!(w.labels.get("app").map(String::as_str), Some("frontend"));

    let split = format!("outbound|80|v1|{HOST} 80%, outbound|80|v2|{HOST} 20%");
    for name in [
        "backend",
        "backend.demo",
        "backend.demo.svc",
        HOST,
        "10.96.12.34",
    ] {
        assert_eq!(route(&snap, name, &[]), split, "host {name}");
    }
    assert_eq!(
        route(&snap, "backend", &[("x-fault", "abort")]),
        format!("outbound|80|v1|{HOST} 100% +fault")
    );

    // Update: the VirtualService shifts to 50/50.
    let mut vs = find(&objs, "VirtualService", "backend");
    vs["spec"]["http"][1]["route"][0]["weight"] = 50.into();
    vs["spec"]["http"][1]["route"][1]["weight"] = 50.into();
    apply(&mut store, &vs);
    let snap = snapshot(&store);
    assert_eq!(
        route(&snap, "backend", &[]),
        format!("outbound|80|v1|{HOST} 50%, outbound|80|v2|{HOST} 50%")
    );

    // Update and delete: v2's pod goes away and the slice loses its endpoint.
    delete(
        &mut store,
        &find(&objs, "Pod", "backend-v2-5c8b7d6f9-fghij"),
    );
    let mut slice = find(&objs, "EndpointSlice", "backend-x7k2p");
    slice["endpoints"].as_array_mut().unwrap().remove(1);
    apply(&mut store, &slice);
    let snap = snapshot(&store);
    assert!(cluster_endpoints(&snap, "v2").is_empty());
    assert_eq!(cluster_endpoints(&snap, "v1"), ["10.244.1.11:5678"]);

    // A broken object is left out with a warning; the rest still applies. Deleting the
    // DestinationRule leaves the VirtualService naming unknown subsets.
    delete(&mut store, &find(&objs, "DestinationRule", "backend"));
    let built = store.build();
    let snap = built
        .snapshot
        .expect("the rest of the cluster still publishes");
    assert!(
        built
            .diagnostics
            .iter()
            .any(|d| d.message.starts_with("object left out")
                && d.object
                    .as_ref()
                    .is_some_and(|o| o.kind == "VirtualService")),
        "{:#?}",
        built.diagnostics
    );
    assert_eq!(
        route(&snap, "backend", &[]),
        format!("outbound|80||{HOST} 100%")
    );

    // Deleting the Service removes it from the registry.
    delete(&mut store, &find(&objs, "Service", "backend"));
    let snap = store.build().snapshot.expect("snapshot");
    assert!(snap.registry.by_host(HOST).is_none());
}

#[test]
fn enrollment_decisions_follow_ambient_labels() {
    let objs = cluster();
    let mut store = store_of(&objs);
    let decisions = |store: &Store| -> BTreeMap<String, Decision> {
        store
            .pods()
            .map(|p| {
                (
                    p.name.clone(),
                    decide(p, store.namespace_labels(&p.namespace), NODE),
                )
            })
            .collect()
    };
    let d = decisions(&store);
    let captured = |d: &BTreeMap<String, Decision>| -> Vec<String> {
        d.iter()
            .filter(|(_, v)| **v == Decision::Capture)
            .map(|(k, _)| k.clone())
            .collect()
    };
    assert_eq!(
        captured(&d),
        [
            "backend-v1-6d4f9c7b8-abcde",
            "backend-v2-5c8b7d6f9-fghij",
            "frontend-7b9c8d6e5-klmno",
            "tagged-3b4c5d6e7-zzzzz",
        ]
    );
    let reason = |name: &str| match d[name] {
        Decision::Skip(r) => r,
        Decision::Capture => "captured",
    };
    assert!(reason("batch-5d6e7f8a9-optout").contains("opted out"));
    assert!(reason("sidecar-4c5d6e7f8-pqrst").contains("sidecar"));
    assert!(reason("frontend-7b9c8d6e5-uvwxy").contains("another node"));
    assert!(reason("web-6f7a8b9c0-plain").contains("not in the mesh"));
    assert!(reason("node-agent-hostnet").contains("hostNetwork"));

    // The namespace label moves: `plain` joins, `demo` leaves (its pods without a pod label
    // leave with it).
    let mut plain = find(&objs, "Namespace", "plain");
    plain["metadata"]["labels"]["istio.io/dataplane-mode"] = "ambient".into();
    apply(&mut store, &plain);
    let mut demo = find(&objs, "Namespace", "demo");
    demo["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("istio.io/dataplane-mode");
    apply(&mut store, &demo);
    assert_eq!(
        captured(&decisions(&store)),
        ["tagged-3b4c5d6e7-zzzzz", "web-6f7a8b9c0-plain"]
    );
}

/// Records enrollments like the kernel map: key → netns.
#[derive(Default)]
pub struct FakeKernel(pub Mutex<BTreeMap<PathBuf, PathBuf>>);

impl Enroller for FakeKernel {
    fn enroll(&self, key: &Path, netns: &Path) -> Result<u64, String> {
        let mut m = self.0.lock().unwrap();
        m.insert(key.to_path_buf(), netns.to_path_buf());
        Ok(m.len() as u64)
    }
    fn unenroll(&self, key: &Path) -> Result<bool, String> {
        Ok(self.0.lock().unwrap().remove(key).is_some())
    }
}

/// Finds every pod's namespace at `/netns/<uid>`, except uids listed as not started yet.
pub struct FakeLocator(pub Arc<Mutex<Vec<String>>>);

impl NetnsLocator for FakeLocator {
    fn locate(&self, uid: &str, _ips: &[IpAddr]) -> Option<PathBuf> {
        let pending = self.0.lock().unwrap();
        (!pending.iter().any(|p| p == uid)).then(|| PathBuf::from(format!("/netns/{uid}")))
    }
}

#[test]
fn enrollment_follows_pods_and_churn_leaves_nothing() {
    let objs = cluster();
    let mut store = store_of(&objs);
    let kernel = Arc::new(FakeKernel::default());
    let not_started = Arc::new(Mutex::new(vec![
        "7e1f0000-0004-4b2c-9d3e-000000000014".to_string(), // frontend: sandbox not up yet
    ]));
    let mut enrollment = Enrollment::new(
        NODE.into(),
        kernel.clone(),
        Box::new(FakeLocator(not_started.clone())),
    );
    enrollment.reconcile(&store);
    let keys = |k: &FakeKernel| -> Vec<String> {
        k.0.lock()
            .unwrap()
            .keys()
            .map(|p| p.display().to_string())
            .collect()
    };
    assert_eq!(
        keys(&kernel),
        [
            "pod/demo/backend-v1-6d4f9c7b8-abcde/7e1f0000-0001-4b2c-9d3e-000000000011",
            "pod/demo/backend-v2-5c8b7d6f9-fghij/7e1f0000-0002-4b2c-9d3e-000000000012",
            "pod/plain/tagged-3b4c5d6e7-zzzzz/7e1f0000-0009-4b2c-9d3e-000000000019",
        ]
    );
    // The frontend's namespace appears: the next reconcile (timer) enrolls it.
    not_started.lock().unwrap().clear();
    enrollment.reconcile(&store);
    assert_eq!(kernel.0.lock().unwrap().len(), 4);

    // Deleted and finished pods leave capture.
    delete(
        &mut store,
        &find(&objs, "Pod", "backend-v1-6d4f9c7b8-abcde"),
    );
    let mut done = find(&objs, "Pod", "tagged-3b4c5d6e7-zzzzz");
    done["status"]["phase"] = "Succeeded".into();
    apply(&mut store, &done);
    enrollment.reconcile(&store);
    assert_eq!(kernel.0.lock().unwrap().len(), 2);

    // Churn: 200 pods come and go (a new uid each time, as a Deployment's pods do).
    let template = find(&objs, "Pod", "frontend-7b9c8d6e5-klmno");
    for i in 0..200 {
        let mut p = template.clone();
        p["metadata"]["name"] = format!("churn-{i}").into();
        p["metadata"]["uid"] = format!("churn-uid-{i}").into();
        p["status"]["podIP"] = format!("10.244.3.{}", i % 250).into();
        apply(&mut store, &p);
        if i % 7 == 0 {
            enrollment.reconcile(&store);
        }
        if i >= 3 {
            let mut old = template.clone();
            old["metadata"]["name"] = format!("churn-{}", i - 3).into();
            delete(&mut store, &old);
        }
    }
    for i in 197..200 {
        let mut old = template.clone();
        old["metadata"]["name"] = format!("churn-{i}").into();
        delete(&mut store, &old);
    }
    enrollment.reconcile(&store);
    assert_eq!(
        keys(&kernel),
        [
            "pod/demo/backend-v2-5c8b7d6f9-fghij/7e1f0000-0002-4b2c-9d3e-000000000012",
            "pod/demo/frontend-7b9c8d6e5-klmno/7e1f0000-0004-4b2c-9d3e-000000000014",
        ],
        "churned pods leave no kernel entry"
    );
    assert_eq!(enrollment.enrolled().len(), 2);
}

#[test]
fn service_entry_workload_selector_picks_pods() {
    let mut objs = cluster();
    objs.push(serde_json::json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "backend-mesh", "namespace": "demo", "uid": "se-1", "resourceVersion": "9"},
        "spec": {
            "hosts": ["backend.mesh.internal"], "addresses": ["10.97.0.1"],
            "location": "MESH_INTERNAL", "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 5678}],
            "workloadSelector": {"labels": {"app": "backend", "version": "v2"}}
        }
    }));
    let store = store_of(&objs);
    let snap = snapshot(&store);
    let c = snap
        .clusters
        .iter()
        .find(|c| c.name == "outbound|80||backend.mesh.internal")
        .expect("cluster");
    let eps: Vec<String> = c
        .endpoints
        .iter()
        .map(|e| match &e.address {
            EndpointAddress::Ip(ip) => format!("{ip}:{}", e.port),
            EndpointAddress::Dns(d) => d.clone(),
        })
        .collect();
    assert_eq!(eps, ["10.244.1.12:5678"]);
}

/// The store updates its one config set in place (no copy per build): after any sequence of
/// applies, modifications, deletes and invalid objects it must hold exactly what a fresh list
/// of the surviving objects gives (`replace_all`, which sorts and appends), in the same order,
/// with the same load diagnostics.
#[test]
fn store_updated_in_place_equals_a_fresh_list() {
    let mut objs: Vec<Value> = cluster()
        .into_iter()
        .filter(|o| o["kind"] != "Namespace")
        .collect();
    // More than one object per kind and namespace, on both sides of the fixture's names.
    for name in ["aaa", "mmm", "zzz"] {
        let mut vs = find(&objs, "VirtualService", "backend");
        vs["metadata"]["name"] = name.into();
        objs.push(vs);
        let mut pod = find(&objs, "Pod", "frontend-7b9c8d6e5-klmno");
        pod["metadata"]["name"] = format!("{name}-pod").into();
        pod["metadata"]["namespace"] = "other".into();
        objs.push(pod);
    }
    let mut store = Store::default();
    let mut expected: BTreeMap<(String, String, String), Value> = BTreeMap::new();
    let key = |o: &Value| {
        (
            o["kind"].as_str().unwrap().to_string(),
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            o["metadata"]["name"].as_str().unwrap().to_string(),
        )
    };
    // Applied in reverse order: every insert lands before what is already there.
    for o in objs.iter().rev() {
        apply(&mut store, o);
        expected.insert(key(o), o.clone());
    }
    // A modification in the middle of a kind's list.
    let mut vs = find(&objs, "VirtualService", "mmm");
    vs["metadata"]["labels"] = serde_json::json!({"changed": "yes"});
    apply(&mut store, &vs);
    expected.insert(key(&vs), vs);
    // An object that does not parse (kept with its diagnostic, contributes no object), then
    // fixed; another that stays invalid.
    let mut bad = find(&objs, "VirtualService", "aaa");
    bad["spec"]["http"] = "not a list".into();
    apply(&mut store, &bad);
    apply(&mut store, &find(&objs, "VirtualService", "aaa"));
    let mut bad2 = find(&objs, "VirtualService", "backend");
    bad2["metadata"]["name"] = "broken".into();
    bad2["spec"]["http"] = "not a list".into();
    apply(&mut store, &bad2);
    expected.insert(key(&bad2), bad2);
    // Deletes at the front, middle and end of lists.
    for (kind, name) in [
        ("VirtualService", "aaa"),
        ("Pod", "mmm-pod"),
        ("Pod", "zzz-pod"),
        ("Service", "backend-headless"),
    ] {
        let o = find(&objs, kind, name);
        delete(&mut store, &o);
        expected.remove(&key(&o));
    }
    // A relist of one kind among the others.
    let pods: Vec<Value> = expected
        .values()
        .filter(|o| o["kind"] == "Pod")
        .cloned()
        .collect();
    store.replace_all(Resource::of_json(&pods[0]).unwrap(), pods);

    let mut fresh = Store::default();
    let mut by_resource: BTreeMap<Resource, Vec<Value>> = BTreeMap::new();
    for o in expected.values().rev() {
        by_resource
            .entry(Resource::of_json(o).unwrap())
            .or_default()
            .push(o.clone());
    }
    for (r, items) in by_resource {
        fresh.replace_all(r, items);
    }
    let (got, got_diags) = store.config_set();
    let (want, want_diags) = fresh.config_set();
    assert_eq!(got, want);
    assert_eq!(got_diags, want_diags);
    assert!(
        !got_diags.is_empty(),
        "the invalid object's diagnostic is kept"
    );
    assert_eq!(got.virtual_services.len(), 3, "backend, mmm, zzz");
    let vs_names: Vec<&str> = got
        .virtual_services
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(vs_names, ["backend", "mmm", "zzz"]);
    assert_eq!(got.pods.len(), 10, "9 fixture pods and aaa-pod");
    // And it builds like the fresh one.
    assert_eq!(
        store.build().snapshot.is_some(),
        fresh.build().snapshot.is_some()
    );
}
