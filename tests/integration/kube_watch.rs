//! The Kubernetes source's watch path end to end: `KubeSource` with a real `kube` client against
//! a scripted list/watch server (`nodeproxy_tests::apiserver`; there is no real API server in
//! this build environment, so the server speaks the protocol from a fixed script of events).
//! Covers: the first snapshot after every list; an update through the watch; a dropped watch
//! resuming from the last resourceVersion; `410 Gone` forcing a re-list that picks up a missed
//! delete; pod deletion unenrolling; the last good snapshot serving while the server is down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodeproxy::kubernetes::{KubeSource, Options};
use nodeproxy::publish::Publisher;
use nodeproxy_tests::apiserver::FakeApiServer;
use nodeproxy_tests::eventually_async;

use super::kubernetes::{FakeKernel, FakeLocator, HOST, NODE, cluster, find, route};

const VS: &str = "/apis/networking.istio.io/v1/virtualservices";
const WAIT: Duration = Duration::from_secs(15);

fn watches_of(server: &FakeApiServer, path: &str) -> Vec<String> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.starts_with(&format!("{path}?")) && r.contains("watch=true"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_updates_resumes_relists_and_survives_an_outage() {
    let objs = cluster();
    let server = FakeApiServer::start(&objs).await;
    let client =
        kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).expect("client");
    let publisher = Publisher::new();
    let kernel = Arc::new(FakeKernel::default());
    let opts = Options {
        node_name: Some(NODE.into()),
        debounce: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        enroll_retry: Duration::from_millis(200),
        cluster_domain: Default::default(),
        credentials_dir: None,
    };
    let _source = KubeSource::start(
        client,
        publisher.clone(),
        opts,
        Some((
            kernel.clone(),
            Box::new(FakeLocator(Arc::new(Mutex::new(Vec::new())))),
        )),
    )
    .await
    .expect("source starts");

    // First snapshot once everything is listed: the tutorial's 80/20 and its enrolled pods.
    let mut versions = publisher.subscribe();
    tokio::time::timeout(WAIT, versions.wait_for(|v| *v > 0))
        .await
        .expect("first snapshot")
        .unwrap();
    let split = |a: u32, b: u32| format!("outbound|80|v1|{HOST} {a}%, outbound|80|v2|{HOST} {b}%");
    assert_eq!(route(&publisher.load(), "backend", &[]), split(80, 20));
    eventually_async(WAIT, || async {
        (kernel.0.lock().unwrap().len() == 4).then_some(())
    })
    .await;

    // An update through the open watch.
    eventually_async(WAIT, || async { server.watching(VS).then_some(()) }).await;
    let mut vs = find(&objs, "VirtualService", "backend");
    vs["spec"]["http"][1]["route"][0]["weight"] = 50.into();
    vs["spec"]["http"][1]["route"][1]["weight"] = 50.into();
    let rv = server.event("MODIFIED", &vs);
    let p = publisher.clone();
    eventually_async(WAIT, || {
        let p = p.clone();
        async move { (route(&p.load(), "backend", &[]) == split(50, 50)).then_some(()) }
    })
    .await;

    // The watch drops: the watcher resumes from the last resourceVersion it saw (no re-list).
    let lists_before = server.requests().len();
    server.drop_watch(VS);
    let resumed = eventually_async(WAIT, || async {
        watches_of(&server, VS)
            .into_iter()
            .skip(1)
            .find(|r| r.contains(&format!("resourceVersion={rv}")))
    })
    .await;
    assert!(resumed.contains("watch=true"), "{resumed}");
    assert!(
        !server.requests()[lists_before..]
            .iter()
            .any(|r| r.starts_with(&format!("{VS}?")) && !r.contains("watch=true")),
        "a dropped watch resumes without re-listing"
    );
    eventually_async(WAIT, || async { server.watching(VS).then_some(()) }).await;
    vs["spec"]["http"][1]["route"][0]["weight"] = 0.into();
    vs["spec"]["http"][1]["route"][1]["weight"] = 100.into();
    server.event("MODIFIED", &vs);
    eventually_async(WAIT, || {
        let p = p.clone();
        async move {
            (route(&p.load(), "backend", &[]) == format!("outbound|80|v2|{HOST} 100%"))
                .then_some(())
        }
    })
    .await;

    // A pod deleted through the watch leaves capture and the endpoints.
    let v1 = find(&objs, "Pod", "backend-v1-6d4f9c7b8-abcde");
    eventually_async(WAIT, || async {
        server.watching("/api/v1/pods").then_some(())
    })
    .await;
    server.event("DELETED", &v1);
    eventually_async(WAIT, || async {
        (kernel.0.lock().unwrap().len() == 3).then_some(())
    })
    .await;

    // The VirtualService is deleted while the client is not looking, and its next watch is
    // answered `410 Gone`: the watcher re-lists and the re-list replaces what it knew.
    server.change_unseen("DELETED", &vs);
    server.gone_next_watch(VS);
    server.drop_watch(VS);
    eventually_async(WAIT, || {
        let p = p.clone();
        async move {
            (route(&p.load(), "backend", &[]) == format!("outbound|80||{HOST} 100%")).then_some(())
        }
    })
    .await;

    // The API server goes away: the last good snapshot keeps serving, nothing is republished.
    let version = publisher.status().version;
    server.set_unavailable(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(publisher.status().version, version);
    assert_eq!(
        route(&publisher.load(), "backend", &[]),
        format!("outbound|80||{HOST} 100%")
    );
    assert_eq!(kernel.0.lock().unwrap().len(), 3, "enrollment untouched");
    // It comes back: watches resume and changes apply again.
    server.set_unavailable(false);
    eventually_async(Duration::from_secs(60), || async {
        server.watching(VS).then_some(())
    })
    .await;
    vs["spec"]["http"][1]["route"][0]["weight"] = 80.into();
    vs["spec"]["http"][1]["route"][1]["weight"] = 20.into();
    server.event("ADDED", &vs);
    eventually_async(WAIT, || {
        let p = p.clone();
        async move { (route(&p.load(), "backend", &[]) == split(80, 20)).then_some(()) }
    })
    .await;
}
