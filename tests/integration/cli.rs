//! The istioctl-like commands: validate, routes, simulate, and `run`'s admin API.

use std::time::Duration;

use nodeproxy_tests::{eventually, free_port, http_get, nodeproxy, spawn_nodeproxy};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn validate_example_configs_exits_zero_with_nothing_above_info() {
    let out = nodeproxy(&["validate", "config/"]);
    assert!(
        out.status.success(),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(
        !text.contains("ERROR") && !text.contains("WARNING"),
        "{text}"
    );
}

#[test]
fn validate_war_story_fails_naming_subset_host_and_virtual_service() {
    let out = nodeproxy(&["validate", "tests/fixtures/war-story.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.contains("ERROR"))
        .expect("an error line");
    assert!(line.starts_with("tests/fixtures/war-story.yaml:"), "{line}");
    for needle in [
        "IST0101",
        "VirtualService/default/reviews-canary",
        "subset `v2`",
        "reviews.default.svc.cluster.local",
    ] {
        assert!(line.contains(needle), "{needle} missing in: {line}");
    }
    let json = nodeproxy(&[
        "validate",
        "--output",
        "json",
        "tests/fixtures/war-story.yaml",
    ]);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json output");
    let errors: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["severity"] == "ERROR")
        .collect();
    assert_eq!(errors[0]["code"]["id"], "IST0101");
    assert_eq!(errors[0]["object"]["name"], "reviews-canary");
}

#[test]
fn validate_tutorial_directory_loads_as_is() {
    let out = nodeproxy(&["validate", "tests/fixtures/tutorial"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("apps/v1 Deployment is not used by nodeproxy, skipped"),
        "{text}"
    );
}

#[test]
fn routes_shows_the_canary_split() {
    let out = nodeproxy(&["routes", "config/canary.yaml", "--port", "80"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("outbound|80|v1|reviews.canary.svc.cluster.local 80%"),
        "{text}"
    );
    assert!(
        text.contains("outbound|80|v2|reviews.canary.svc.cluster.local 20%"),
        "{text}"
    );
    let json = nodeproxy(&["routes", "config/canary.yaml", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(
        v["httpTables"][0]["vhosts"][0]["rules"][0]["action"]["route"]["total"],
        100
    );
}

#[test]
fn simulate_explains_header_routing() {
    let out = nodeproxy(&[
        "simulate",
        "config/header-routing.yaml",
        "--host",
        "reviews.headers.svc.cluster.local",
        "-H",
        "user-agent: Mobile Safari",
    ]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("rule:          #2 `mobile`"), "{text}");
    assert!(
        text.contains("100.0000%  outbound|80|v2|reviews.headers.svc.cluster.local"),
        "{text}"
    );
    let plain = stdout(&nodeproxy(&[
        "simulate",
        "config/header-routing.yaml",
        "--host",
        "reviews.headers",
    ]));
    assert!(
        plain.contains("`default`") && plain.contains("v1|reviews.headers"),
        "{plain}"
    );
    let fault = stdout(&nodeproxy(&[
        "simulate",
        "config/fault-header-scoped.yaml",
        "--host",
        "127.0.17.1",
        "-H",
        "end-user: jason",
        "-o",
        "json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&fault).expect("json");
    assert_eq!(v["rule"]["fault"]["abort"][0]["http"], 500);
    assert_eq!(v["rule"]["fault"]["abort"][1], 1_000_000);
}

#[test]
fn simulate_bad_header_is_a_clear_error() {
    let out = nodeproxy(&[
        "simulate",
        "config/canary.yaml",
        "--host",
        "x",
        "-H",
        "no-colon",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-H `no-colon`: expected `name: value`"));
}

/// `nodeproxy run --capture none --admin ADMIN --config CONFIG EXTRA...`, once `/ready` is 200.
fn run_ready(admin: &str, config: &str, extra: &[&str]) -> nodeproxy_tests::ChildGuard {
    let mut args = vec![
        "run",
        "--capture",
        "none",
        "--admin",
        admin,
        "--config",
        config,
    ];
    args.extend_from_slice(extra);
    let proxy = spawn_nodeproxy(&args);
    eventually("admin /ready", Duration::from_secs(20), || {
        http_get(admin, "/ready").filter(|(s, _)| *s == 200)
    });
    proxy
}

#[test]
fn run_serves_ready_and_config_dump() {
    let port = free_port();
    let admin = format!("127.0.0.1:{port}");
    let _proxy = run_ready(&admin, "config/canary.yaml", &[]);
    let (status, body) = http_get(&admin, "/config_dump").expect("config_dump");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json dump");
    assert_eq!(v["version"], 1);
    assert_eq!(v["lastChangeSource"], "startup");
    assert_eq!(
        v["snapshot"]["registry"]["services"][0]["host"],
        "reviews.canary.svc.cluster.local"
    );
}

/// The `Cpus_allowed_list` of the thread whose /proc directory is `dir`.
fn cpus_allowed(dir: &std::path::Path) -> String {
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `(thread name, CPUs it may run on)` for every thread of process `pid`.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let dir = t.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        out.push((comm.trim().to_string(), cpus_allowed(&dir)));
    }
    out
}

#[test]
fn cpu_affinity_auto_pins_each_runtime_and_leaves_other_threads_floating() {
    let all = cpus_allowed(std::path::Path::new("/proc/thread-self"));
    let cpus: Vec<usize> = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect()
        })
        .expect("own CPU set");
    let port = free_port();
    let admin = format!("127.0.0.1:{port}");
    let proxy = run_ready(
        &admin,
        "config/canary.yaml",
        &["--workers", "3", "--cpu-affinity", "auto"],
    );
    let pid = proxy.0.id();
    // The primary runtime (the main thread) pins itself once everything else has started.
    let main = std::path::PathBuf::from(format!("/proc/{pid}/task/{pid}"));
    eventually("main thread pinned", Duration::from_secs(10), || {
        (cpus_allowed(&main) == cpus[0].to_string()).then_some(())
    });
    let threads = thread_cpus(pid);
    let of = |name: &str| {
        threads
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no thread {name} in {threads:?}"))
            .1
            .clone()
    };
    assert_eq!(of("dataplane-1"), cpus[1 % cpus.len()].to_string());
    assert_eq!(of("dataplane-2"), cpus[2 % cpus.len()].to_string());
    assert_eq!(of("admin"), all, "the admin thread floats");
    // And the proxy serves.
    let (status, _) = http_get(&admin, "/ready").expect("ready");
    assert_eq!(status, 200);
}

#[test]
fn cpu_affinity_rejects_an_unknown_mode() {
    let err = run_refused(&["--config", "config/canary.yaml", "--cpu-affinity", "all"]);
    assert!(
        err.contains("invalid value 'all' for '--cpu-affinity"),
        "{err}"
    );
}

/// `nodeproxy run --capture none --admin 127.0.0.1:0 ARGS`, expected to fail: its stderr.
fn run_refused(args: &[&str]) -> String {
    let mut all = vec!["run", "--capture", "none", "--admin", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let out = nodeproxy(&all);
    assert!(!out.status.success(), "nodeproxy {all:?} did not fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_refuses_a_broken_config() {
    let err = run_refused(&["--config", "tests/fixtures/war-story.yaml"]);
    assert!(
        err.contains("IST0101") && err.contains("configuration rejected"),
        "{err}"
    );
}

/// SIGTERM drains: `/ready` turns 503 at once, a request in flight finishes (with
/// `Connection: close`, so its keep-alive client leaves), and the process exits when no
/// connection is left, well before `--drain-time`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    use nodeproxy_tests::backend::Backend;
    use nodeproxy_tests::proxy::Scenario;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let s = Scenario::from_config("canary.yaml");
    let v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    for b in [&v1, &v2] {
        b.behaviour
            .delay_ms
            .store(1500, std::sync::atomic::Ordering::Relaxed);
    }
    let admin = format!("127.0.0.1:{}", free_port());
    let path = s.path.display().to_string();
    let mut proxy = run_ready(&admin, &path, &["--drain-time", "20s"]);
    let vip = s.vip();
    let conn = eventually("service listener", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&vip).ok()
    });
    conn.set_nonblocking(true).unwrap();
    let mut conn = tokio::net::TcpStream::from_std(conn).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        .await
        .unwrap();
    eventually("request reaches a backend", Duration::from_secs(5), || {
        (v1.in_flight.load(std::sync::atomic::Ordering::Relaxed)
            + v2.in_flight.load(std::sync::atomic::Ordering::Relaxed)
            > 0)
        .then_some(())
    });
    let pid = nix::unistd::Pid::from_raw(proxy.0.id() as i32);
    let sent = std::time::Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let (status, body) = eventually(
        "/ready fails while draining",
        Duration::from_secs(2),
        || http_get(&admin, "/ready").filter(|(s, _)| *s == 503),
    );
    assert_eq!((status, body.as_str()), (503, "draining\n"));

    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut response))
        .await
        .expect("the in-flight response arrives and the connection closes")
        .unwrap();
    let response = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(response.contains("connection: close"), "{response}");

    let status = eventually("nodeproxy exits", Duration::from_secs(10), || {
        proxy.0.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "exited when the last connection closed, not at --drain-time"
    );
}

/// The access log goes to `--access-log-file` in batches: a routed request's line (status,
/// route, cluster, upstream host) appears within a second while the proxy runs, a failed
/// request's line carries its response flag, and lines still buffered at SIGTERM are written
/// before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_file_gets_each_request_and_is_flushed_at_exit() {
    use nodeproxy_tests::backend::Backend;
    use nodeproxy_tests::proxy::{Scenario, TempDir};
    use std::io::{Read, Write};

    let s = Scenario::from_config("canary.yaml");
    let v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let dir = TempDir::new();
    let log = dir.0.join("access.log");
    let admin = format!("127.0.0.1:{}", free_port());
    let (path, log_arg) = (s.path.display().to_string(), log.display().to_string());
    let mut proxy = run_ready(&admin, &path, &["--access-log-file", &log_arg]);
    let vip = s.vip();
    let request = |host: &str| {
        let mut c = std::net::TcpStream::connect(&vip).expect("connect to the service");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            c,
            "GET /ping?x=1 HTTP/1.1\r\nHost: {host}\r\nUser-Agent: alog-test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(request("reviews").starts_with("HTTP/1.1 200"));
    let line = eventually("the routed request's line", Duration::from_secs(5), || {
        read_log()
            .lines()
            .find(|l| l.contains("/ping"))
            .map(str::to_string)
    });
    assert!(line.contains("\"GET /ping?x=1 HTTP/1.1\" 200 - "), "{line}");
    for needle in [
        "\"alog-test\"",
        "\"reviews\"",
        "reviews.canary.svc.cluster.local",
        "VirtualService/canary/reviews",
    ] {
        assert!(line.contains(needle), "{needle} missing in: {line}");
    }
    assert!(
        line.contains(&format!("\"{}:8080\"", s.ip(11)))
            || line.contains(&format!("\"{}:8080\"", s.ip(12))),
        "upstream host missing in: {line}"
    );
    // With the backends gone: 503 with a flag (connection refused or closed), then SIGTERM
    // at once.
    drop((v1, v2));
    let r = request("gone");
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    let pid = nix::unistd::Pid::from_raw(proxy.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = eventually("nodeproxy exits", Duration::from_secs(10), || {
        proxy.0.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
    let text = read_log();
    let uf = text
        .lines()
        .find(|l| l.contains("\"gone\""))
        .unwrap_or_else(|| panic!("no line for the refused request in:\n{text}"));
    // UF when the connect is refused; UC when a pooled connection to the stopped backend
    // was tried first.
    let (_, after) = uf
        .split_once("\" 503 ")
        .unwrap_or_else(|| panic!("not a 503: {uf}"));
    let flags = after.split(' ').next().unwrap();
    assert!(flags.split(',').any(|f| f == "UF" || f == "UC"), "{uf}");
    // The upstream host is the last one tried, as Envoy's %UPSTREAM_HOST%.
    assert!(
        [s.ip(11), s.ip(12)]
            .iter()
            .any(|ip| uf.contains(&format!("\"{ip}:8080\""))),
        "upstream host missing in: {uf}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("/ping")).count(),
        2,
        "{text}"
    );
}

#[test]
fn access_log_file_that_cannot_be_opened_is_refused_by_name() {
    let err = run_refused(&[
        "--config",
        "config/canary.yaml",
        "--access-log-file",
        "/nonexistent-dir/access.log",
    ]);
    assert!(
        err.contains("--access-log-file") && err.contains("/nonexistent-dir/access.log"),
        "{err}"
    );
}

#[test]
fn weights_that_overflow_are_rejected_by_validate_and_run() {
    let file = "tests/fixtures/hostile/weights-overflow.yaml";
    let out = nodeproxy(&["validate", file]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("weight 4294967295 is out of range") && text.contains("IST0106"),
        "{text}"
    );
    let routes = nodeproxy(&["routes", file]);
    assert!(!routes.status.success(), "routes prints no table for it");
    let err = run_refused(&["--config", file]);
    assert!(err.contains("weight 4294967295 is out of range"), "{err}");
}

#[test]
fn a_missing_config_file_is_reported_once_and_logs_have_no_colour() {
    let err = run_refused(&["--config", "tests/fixtures/no-such-file.yaml"]);
    assert_eq!(
        err.matches("no-such-file.yaml").count(),
        1,
        "reported once: {err}"
    );
    assert!(err.contains("cannot read"), "{err}");
    // stderr is a pipe here, not a terminal: no ANSI escapes.
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

#[test]
fn config_takes_several_paths_after_one_flag() {
    let admin = format!("127.0.0.1:{}", free_port());
    let _proxy = run_ready(
        &admin,
        "config/canary.yaml",
        &["config/header-routing.yaml"],
    );
    let (_, dump) = http_get(&admin, "/config_dump").unwrap();
    for host in [
        "reviews.canary.svc.cluster.local",
        "reviews.headers.svc.cluster.local",
    ] {
        assert!(dump.contains(host), "{host} loaded");
    }
}

#[test]
fn simulate_for_a_host_no_service_has_fails_naming_the_known_hosts() {
    let out = nodeproxy(&["simulate", "config/canary.yaml", "--host", "unknown"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no service has host `unknown`")
            && err.contains("reviews.canary.svc.cluster.local"),
        "{err}"
    );
}

#[test]
fn logging_refuses_a_filter_that_names_no_level() {
    let admin = format!("127.0.0.1:{}", free_port());
    let _proxy = run_ready(&admin, "config/canary.yaml", &[]);
    let post = |q: &str| {
        let mut s = std::net::TcpStream::connect(&admin).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "POST /logging?level={q} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let bad = post("bogus");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    assert!(bad.contains("names no level"), "{bad}");
    let good = post("debug");
    assert!(good.starts_with("HTTP/1.1 200"), "{good}");
}
