//! Config safety under load: what editors, shells and ConfigMap mounts do to watched files
//! never black-holes traffic. Each test runs a bounded request loop against the canary while
//! it does one file operation, then counts failures and checks which configuration serves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::proxy::{self, Scenario, TempDir, client, get};

/// A request loop against `vip` until stopped (at most 60 s): requests and failures
/// (anything but 200).
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(vip: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (st, se, fa) = (stop.clone(), sent.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let c = client();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                let r = get(&c, &vip, "/", &[]).await;
                se.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 {
                    fa.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Load {
            stop,
            sent,
            failed,
            task,
        }
    }

    /// Stop; (sent, failed).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task");
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The canary with every request to `version`.
fn all_to(yaml: &str, version: &str) -> String {
    let (w1, w2) = if version == "v1" { (100, 0) } else { (0, 100) };
    yaml.replace("weight: 80", &format!("weight: {w1}"))
        .replace("weight: 20", &format!("weight: {w2}"))
}

/// Which backend answers, once `version` is the only one that does.
async fn wait_for_backend(vip: &str, version: &str) {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = true;
        for _ in 0..20 {
            all &= get(&c, vip, "/", &[]).await.body == version;
        }
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "{version} never served alone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Setup {
    s: Scenario,
    p: nodeproxy::app::Running,
    _b: (Backend, Backend),
}

async fn setup() -> Setup {
    let s = Scenario::from_config("canary.yaml");
    let b1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let b2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let p = proxy::start(&s, None).await;
    Setup { s, p, _b: (b1, b2) }
}

/// Runs `op` under load, waits `after`, and checks: no failed request, and the version in
/// force is `want_version`.
async fn under_load(t: &Setup, after: Duration, op: impl AsyncFnOnce(), want_version: u64) {
    let load = Load::start(t.s.vip());
    tokio::time::sleep(Duration::from_millis(200)).await;
    op().await;
    tokio::time::sleep(after).await;
    let (sent, failed) = load.finish().await;
    assert!(sent > 50, "the load loop ran ({sent} requests)");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    assert_eq!(t.p.publisher.status().version, want_version);
}

fn rejected_codes(p: &nodeproxy::app::Running) -> Vec<&'static str> {
    p.publisher
        .status()
        .rejected
        .map(|r| {
            r.diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| d.code.id)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_the_file_is_refused_and_traffic_stays() {
    let t = setup().await;
    let path = t.s.path.clone();
    under_load(
        &t,
        Duration::from_millis(1500),
        async || {
            std::fs::File::create(&path).expect("truncate");
        },
        1,
    )
    .await;
    assert_eq!(rejected_codes(&t.p), ["NP0006"]);
    let (_, body) = nodeproxy_tests::http_get(&t.p.admin_addr.to_string(), "/diagnostics")
        .expect("diagnostics");
    assert!(body.contains("delete the file"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_an_empty_file_over_it_is_refused() {
    let t = setup().await;
    let path = t.s.path.clone();
    under_load(
        &t,
        Duration::from_millis(1500),
        async || {
            let tmp = path.with_extension("new");
            std::fs::write(&tmp, "# nothing here yet\n").unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        },
        1,
    )
    .await;
    assert_eq!(rejected_codes(&t.p), ["NP0006"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_writer_is_read_once_whole() {
    let t = setup().await;
    let path = t.s.path.clone();
    let new = all_to(&t.s.yaml, "v2");
    // Three parts at document boundaries, so each prefix is itself a valid, smaller config:
    // only waiting for the writer (or the shrink guard) keeps it from being applied.
    let cuts: Vec<usize> = new.match_indices("\n---\n").map(|(i, _)| i + 1).collect();
    let parts = [&new[..cuts[0]], &new[cuts[0]..cuts[1]], &new[cuts[1]..]];
    under_load(
        &t,
        Duration::from_millis(300),
        async || {
            let mut f = std::fs::File::create(&path).expect("open");
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                f.write_all(part.as_bytes()).unwrap();
            }
            drop(f);
            wait_for_backend(&t.s.vip(), "v2").await;
        },
        2,
    )
    .await;
    assert_eq!(t.p.publisher.status().rejections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_redirect_from_a_slow_command_is_read_once_whole() {
    let t = setup().await;
    let path = t.s.path.clone();
    let src = t.s.path.with_extension("src");
    std::fs::write(&src, all_to(&t.s.yaml, "v2")).unwrap();
    under_load(
        &t,
        Duration::from_millis(300),
        async || {
            let status = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "{{ sleep 0.5; cat '{}'; }} > '{}'",
                    src.display(),
                    path.display()
                ))
                .status()
                .await
                .unwrap();
            assert!(status.success());
            wait_for_backend(&t.s.vip(), "v2").await;
        },
        2,
    )
    .await;
}

/// A Kubernetes ConfigMap volume: `<dir>/..<stamp>/canary.yaml`, `..data -> ..<stamp>`,
/// `canary.yaml -> ..data/canary.yaml`; an update writes a new stamp directory, points a
/// temporary link at it, renames the link over `..data` and removes the old directory.
struct ConfigMap {
    dir: PathBuf,
    current: Option<PathBuf>,
    n: u32,
}

impl ConfigMap {
    fn new(dir: &Path, yaml: &str) -> ConfigMap {
        let mut m = ConfigMap {
            dir: dir.to_path_buf(),
            current: None,
            n: 0,
        };
        m.update(yaml);
        std::os::unix::fs::symlink("..data/canary.yaml", dir.join("canary.yaml")).unwrap();
        m
    }

    fn update(&mut self, yaml: &str) {
        self.n += 1;
        let stamp = self.dir.join(format!(
            "..2026_12_07_10_00_{:02}.{}",
            self.n,
            1000 + self.n
        ));
        std::fs::create_dir(&stamp).unwrap();
        std::fs::write(stamp.join("canary.yaml"), yaml).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(stamp.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.replace(stamp) {
            std::fs::remove_dir_all(old).unwrap();
        }
    }
}

async fn configmap_swaps(watch_dir: bool) {
    let s = Scenario::from_config("canary.yaml");
    let _b1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let _b2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let dir = TempDir::new();
    let mut cm = ConfigMap::new(&dir.0, &s.yaml);
    let config = if watch_dir {
        dir.0.clone()
    } else {
        dir.0.join("canary.yaml")
    };
    let p = proxy::start_custom(&s, None, dir.0.clone(), |o| o.config = vec![config]).await;
    let load = Load::start(s.vip());
    for i in 0..5u64 {
        let version = if i % 2 == 0 { "v2" } else { "v1" };
        cm.update(&all_to(&s.yaml, version));
        wait_for_backend(&s.vip(), version).await;
        assert_eq!(p.publisher.status().version, 2 + i, "swap {i}");
    }
    let (sent, failed) = load.finish().await;
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    assert_eq!(p.publisher.status().rejections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_swaps_of_a_linked_file_reload_every_time() {
    configmap_swaps(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_swaps_of_a_watched_directory_reload_every_time() {
    configmap_swaps(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_growing_in_a_watched_directory_never_reloads() {
    let s = Scenario::from_config("canary.yaml");
    let b1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let b2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let dir = s.path.parent().unwrap().to_path_buf();
    let p = proxy::start_custom(&s, None, dir.clone(), |o| o.config = vec![dir]).await;
    let t = Setup { s, p, _b: (b1, b2) };
    let log = t.s.path.with_file_name("proxy.log");
    under_load(
        &t,
        Duration::ZERO,
        async || {
            let mut f = std::fs::File::create(&log).unwrap();
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                writeln!(f, "a log line").unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
        1,
    )
    .await;
    assert_eq!(t.p.publisher.status().reloads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_objects_by_a_finished_edit_applies_after_it_settles() {
    // Removing a document is a real edit: it is applied, once the file has been quiet.
    let t = setup().await;
    let yaml = t.s.yaml.clone();
    let vs = yaml.rfind("\n---\n").expect("three documents");
    // The VirtualService goes: plain round robin between v1 and v2.
    std::fs::write(&t.s.path, &yaml[..vs + 1]).unwrap();
    let started = Instant::now();
    proxy::applied(&t.p, 2).await;
    assert!(started.elapsed() >= Duration::from_millis(500));
}

/// A snapshot that breaks an invariant the compiler guarantees (a weighted route with nothing
/// to pick): the request that meets it panics inside the proxy. That request fails alone; the
/// listener, other connections and the process go on, and a good snapshot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_fails_alone_and_the_listener_lives() {
    use nodeproxy::compile::{HttpAction, WeightedClusters};
    let t = setup().await;
    let good = t.p.publisher.load();
    let mut bad = (*good).clone();
    for table in &mut bad.http_tables {
        for vh in &mut table.vhosts {
            for rule in &mut vh.rules {
                rule.action = HttpAction::Route(WeightedClusters {
                    clusters: Vec::new(),
                    total: 0,
                });
            }
        }
    }
    let built = |s| nodeproxy::publish::Built {
        snapshot: Some(s),
        diagnostics: Vec::new(),
    };
    let v = t.p.publisher.publish(built(bad), "test").unwrap();
    proxy::applied(&t.p, v).await;
    for _ in 0..20 {
        // Each attempt is one request on a new connection: it fails (closed or 5xx), nothing
        // else does.
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            client().request(
                http::Request::get(format!("http://{}/", t.s.vip()))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            ),
        )
        .await
        .expect("an answer or a close, never a hang");
        if let Ok(resp) = r {
            assert!(resp.status().is_server_error(), "{}", resp.status());
        }
    }
    let v =
        t.p.publisher
            .publish(built((*good).clone()), "test")
            .unwrap();
    proxy::applied(&t.p, v).await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &t.s.vip(), "/", &[]).await.status, 200);
    }
}

/// A service address another socket holds: not ready (and why) until it is free, then the
/// proxy binds it by itself and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_every_listener_and_binding_is_retried() {
    let s = Scenario::from_config("canary.yaml");
    let _b1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let _b2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let holder = std::net::TcpListener::bind(s.vip()).expect("hold the service address");
    let p = proxy::start(&s, None).await;
    let admin = p.admin_addr.to_string();
    let (status, body) = nodeproxy_tests::http_get(&admin, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&s.vip()) && body.contains("in use"), "{body}");
    let (_, diag) = nodeproxy_tests::http_get(&admin, "/diagnostics").unwrap();
    let v: serde_json::Value = serde_json::from_str(&diag).unwrap();
    assert_eq!(v["unboundListeners"][0]["address"], s.vip(), "{diag}");
    let out = nodeproxy_tests::nodeproxy(&["proxy-config", "listeners", "--admin", &admin]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("NOT BOUND"), "{table}");

    drop(holder);
    let freed = Instant::now();
    nodeproxy_tests::eventually("ready", Duration::from_secs(5), || {
        let (status, _) = nodeproxy_tests::http_get(&admin, "/ready")?;
        (status == 200).then_some(())
    });
    assert!(
        freed.elapsed() < Duration::from_secs(2),
        "{:?}",
        freed.elapsed()
    );
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &s.vip(), "/", &[]).await.status, 200);
    }
}
