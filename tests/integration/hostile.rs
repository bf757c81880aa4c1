//! Hostile clients and config, each test with the attack as its input: framing the proxy
//! must refuse (RFC 9112/9110), slow and idle clients, hop-by-hop smuggling through
//! `Connection`, and a ServiceEntry aimed at the proxy's own admin API.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodeproxy_tests::proxy::{self, Scenario, unique_net};

use crate::http1_wire::{exchange, scenario};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that records every request head it receives and answers 200.
struct Recorder {
    heads: Arc<std::sync::Mutex<Vec<String>>>,
    connections: Arc<AtomicU64>,
}

impl Recorder {
    async fn start(addr: &str) -> Recorder {
        let l = TcpListener::bind(addr).await.unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let (h, c) = (heads.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            h.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&buf[..end]).into());
                            buf.drain(..end + 4);
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                });
            }
        });
        Recorder { heads, connections }
    }
}

#[tokio::test]
async fn framing_the_proxy_cannot_forward_faithfully_is_a_400_and_reaches_no_backend() {
    let s = scenario();
    let up = Recorder::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = proxy::start(&s, None).await;
    let vip = s.vip();
    let cases: [(&str, &[u8]); 11] = [
        (
            "a coding the proxy would drop",
            b"POST /x HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "identity before chunked",
            b"POST /x HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "chunked twice in one field",
            b"POST /x HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "chunked in two fields",
            b"POST /x HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "HTTP/1.0 with Transfer-Encoding, a request pipelined after it",
            b"POST /x HTTP/1.0\r\nHost: raw.example\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: raw.example\r\n\r\n",
        ),
        (
            "two Host fields",
            b"GET /x HTTP/1.1\r\nHost: raw.example\r\nHost: other.example\r\n\r\n",
        ),
        ("no Host in HTTP/1.1", b"GET /x HTTP/1.1\r\nAccept: */*\r\n\r\n"),
        (
            "an absolute-form target naming another authority than Host",
            b"GET http://other.example/x HTTP/1.1\r\nHost: raw.example\r\n\r\n",
        ),
        (
            "a chunk size with a sign",
            b"POST /x HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "a chunk size with spaces around it",
            b"POST /x HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: chunked\r\n\r\n 5 \r\nhello\r\n0\r\n\r\n",
        ),
        (
            "a chunk size line with a bare CR",
            b"POST /x HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: chunked\r\n\r\n5\rX\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    for (what, raw) in cases {
        let text = exchange(&vip, raw).await;
        assert!(
            text.starts_with("HTTP/1.1 400 Bad Request\r\n") && text.contains("connection: close"),
            "{what}: {text}"
        );
        assert_eq!(
            text.matches("HTTP/1.1 ").count(),
            1,
            "{what}: one answer, then close"
        );
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        0,
        "the backend received nothing"
    );
    // The well-formed neighbours still pass.
    let ok = exchange(
        &vip,
        b"POST /x HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
}

#[tokio::test]
async fn fields_named_in_connection_are_not_forwarded() {
    let s = scenario();
    let up = Recorder::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = proxy::start(&s, None).await;
    let text = exchange(
        &s.vip(),
        b"GET /x HTTP/1.1\r\nHost: raw.example\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n\r\nGET /y HTTP/1.1\r\nHost: raw.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    let heads = up.heads.lock().unwrap().clone();
    let first = heads[0].to_ascii_lowercase();
    assert!(first.contains("x-kept: 2"), "{first}");
    assert!(!first.contains("x-secret"), "{first}");
}

async fn with_timeouts(s: &Scenario, t: nodeproxy::proxy::Timeouts) -> nodeproxy::app::Running {
    proxy::start_custom(s, None, s.path.parent().unwrap().to_path_buf(), |o| {
        o.timeouts = t
    })
    .await
}

const SHORT: nodeproxy::proxy::Timeouts = nodeproxy::proxy::Timeouts {
    request_head: Duration::from_secs(1),
    idle: Duration::from_secs(1),
    body_idle: Duration::from_secs(1),
};

#[tokio::test]
async fn a_trickled_head_gets_408_and_is_closed_by_the_head_timeout() {
    let s = scenario();
    let _up = Recorder::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = with_timeouts(&s, SHORT).await;
    let mut sock = TcpStream::connect(s.vip()).await.unwrap();
    let start = Instant::now();
    // One byte every 100 ms, never finishing the head.
    let trickle = async {
        for b in b"GET /x HTTP/1.1\r\nHost: raw.example\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        {
            if sock.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(2500), trickle).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), sock.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_silent_or_idle_connection_is_closed_and_a_stalled_body_gets_408() {
    let s = scenario();
    let _up = Recorder::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = with_timeouts(&s, SHORT).await;
    // Connected, silent: closed without an answer.
    let mut silent = TcpStream::connect(s.vip()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut got))
        .await
        .expect("closed by the head timeout")
        .unwrap();
    assert!(got.is_empty());
    // Kept alive after a request, then idle: closed.
    let mut idle = TcpStream::connect(s.vip()).await.unwrap();
    idle.write_all(b"GET /x HTTP/1.1\r\nHost: raw.example\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), idle.read_to_end(&mut got))
        .await
        .expect("closed by the idle timeout")
        .unwrap();
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // A body that stops arriving: 408.
    let mut body = TcpStream::connect(s.vip()).await.unwrap();
    body.write_all(b"POST /x HTTP/1.1\r\nHost: raw.example\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), body.read_to_end(&mut got))
        .await
        .expect("closed by the body timeout")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408 Request Timeout"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

/// A ServiceEntry whose endpoint is the proxy's own admin API: refused before any connection
/// (the proxy never dials its own sockets), and a mutating admin call that did arrive through
/// the proxy would be refused by the admin API too.
#[tokio::test]
async fn the_proxy_never_dials_its_own_admin_api() {
    let net = unique_net();
    let admin_port = nodeproxy_tests::free_port();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: sneaky}}
spec:
  hosts: [sneaky.example]
  addresses: [{net}1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP, targetPort: {admin_port}}}]
  endpoints: [{{address: 127.0.0.1}}]
",
        port = proxy::SERVICE_PORT
    );
    let s = Scenario::from_yaml_on(yaml, net);
    let p = proxy::start_custom(&s, None, s.path.parent().unwrap().to_path_buf(), |o| {
        o.admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    })
    .await;
    let admin = p.admin_addr.to_string();
    let text = exchange(
        &s.vip(),
        b"POST /logging?level=trace HTTP/1.1\r\nHost: sneaky.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("refused"), "{text}");
    let sc = crate::ops::scrape(&admin);
    assert!(
        sc.samples
            .iter()
            .any(|x| x.metric == "nodeproxy_upstream_refused_total"
                && crate::ops::counter(&x.value) >= 1.0),
        "counted"
    );
    // The admin API's own check: a mutating call carrying the proxy's forwarding header.
    let mut sock = TcpStream::connect(&admin).await.unwrap();
    sock.write_all(
        b"POST /logging?level=debug HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: http\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    sock.read_to_end(&mut got).await.unwrap();
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 403"));
}

/// The fuzz corpus (`fuzz/corpus/<target>/`) through each fuzz entry point, on the stable
/// toolchain: every seed and every input a fuzzing run added stays a regression test.
#[test]
fn the_fuzz_corpus_runs_clean() {
    let mut ran = 0;
    for (name, target) in nodeproxy::fuzz::TARGETS {
        let dir = nodeproxy_tests::repo_path(&format!("fuzz/corpus/{name}"));
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            target(&std::fs::read(&path).unwrap());
            ran += 1;
        }
    }
    assert!(ran >= 12, "{ran} corpus inputs");
}

/// 5,000 slow partial heads against a proxy limited to 4,096 descriptors: when accept runs
/// out of them, connections waiting for a head give theirs back, and a normal request made
/// during the attack is answered in under a second; the rest are closed by the head timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_that_exhaust_descriptors_cannot_stop_normal_clients() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // This process holds the attack's 5,000 sockets.
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= 6000,
        "the test needs 6000 descriptors, the hard limit is {hard}"
    );
    let s = scenario();
    let _up = Recorder::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let admin = format!("127.0.0.1:{}", nodeproxy_tests::free_port());
    let bin = nodeproxy_tests::nodeproxy_bin().display().to_string();
    let _proxy = nodeproxy_tests::ChildGuard(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 4096 && exec '{bin}' run --capture none --admin {admin} --access-log off --request-head-timeout 4s --config '{}'",
                s.path.display()
            ))
            .env("RUST_LOG", "error")
            .spawn()
            .unwrap(),
    );
    nodeproxy_tests::eventually("ready", Duration::from_secs(20), || {
        nodeproxy_tests::http_get(&admin, "/ready").filter(|(st, _)| *st == 200)
    });
    let vip = s.vip();
    let mut attack = Vec::new();
    for _ in 0..5000 {
        if let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(&vip)).await
        {
            let _ = c
                .write_all(b"GET /slow HTTP/1.1\r\nHost: raw.example\r\nX-A: ")
                .await;
            attack.push(c);
        }
    }
    assert!(
        attack.len() > 4096,
        "the attack holds more connections than the proxy has fds"
    );
    answered_within_a_second(&vip).await;
    // Every attack connection ends: shed, or closed by the 4 s head timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    for mut c in attack {
        let mut sink = Vec::new();
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, c.read_to_end(&mut sink))
            .await
            .expect("closed by the head timeout")
            .ok();
    }
}

/// The canary scenario with all traffic to v1 and `policy` as the DestinationRule's
/// trafficPolicy.
fn canary_v1_only(policy: &str) -> Scenario {
    let s = Scenario::from_config("canary.yaml");
    let yaml = s
        .yaml
        .replace("      weight: 80\n", "      weight: 100\n")
        .replace("      weight: 20\n", "      weight: 0\n")
        .replace(
            "  host: reviews\n",
            &format!("  host: reviews\n  trafficPolicy: {policy}\n"),
        );
    assert!(yaml.contains(policy), "{yaml}");
    Scenario::from_yaml_on(yaml, s.net.clone())
}

/// Read `sock` to its end, which must come within `within` but not before a 1 s timeout could
/// have fired (900 ms: timer slack); what was read, and how the read ended.
async fn closed_after_a_timeout(
    sock: &mut TcpStream,
    within: Duration,
    what: &str,
) -> (Vec<u8>, std::io::Result<usize>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, sock.read_to_end(&mut got))
        .await
        .expect(what);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    (got, read)
}

/// A normal request made during an attack is answered 200 within a second.
async fn answered_within_a_second(vip: &str) {
    let start = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        exchange(
            vip,
            b"GET /ok HTTP/1.1\r\nHost: raw.example\r\nConnection: close\r\n\r\n",
        ),
    )
    .await
    .expect("answered during the attack");
    let took = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(took < Duration::from_secs(1), "answered in {took:?}");
}

/// Ask for an upgrade; the head of the answer and the connection.
async fn upgrade(vip: &str) -> (String, TcpStream) {
    let mut sock = TcpStream::connect(vip).await.unwrap();
    sock.write_all(
        b"GET /ws HTTP/1.1\r\nHost: reviews\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    (String::from_utf8_lossy(&head).into_owned(), sock)
}

/// Upgraded connections count against maxConnections (503 UO past it, the backend never
/// dialled) and are closed by tcp.idleTimeout; they bypassed both before.
#[tokio::test]
async fn upgrades_count_against_max_connections_and_honour_the_idle_timeout() {
    let s = canary_v1_only("{connectionPool: {tcp: {maxConnections: 1, idleTimeout: 1s}}}");
    let accepted = nodeproxy_tests::backend::upgrade_echo(&format!("{}:8080", s.ip(11))).await;
    let _p = proxy::start(&s, None).await;
    let (head, mut first) = upgrade(&s.vip()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    first.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    first.read_exact(&mut echo).await.unwrap();
    // The first upgrade holds the only connection: the second is refused, not dialled.
    let (head, _second) = upgrade(&s.vip()).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Silent for longer than idleTimeout: closed.
    closed_after_a_timeout(
        &mut first,
        Duration::from_secs(5),
        "closed by the idle timeout",
    )
    .await
    .1
    .unwrap();
    // Its slot is free again: a new upgrade goes through.
    let vip = s.vip();
    nodeproxy_tests::eventually_async(Duration::from_secs(5), || {
        let vip = vip.clone();
        async move {
            let (head, _c) = upgrade(&vip).await;
            head.starts_with("HTTP/1.1 101").then_some(())
        }
    })
    .await;
}

/// The downstream connection cap: 600 slow partial heads against a proxy capped at 100
/// connections (head timeout 30 s, so only shedding can end them): accepts at the cap shed
/// the connections waiting for a head, a normal request made during the attack is answered in
/// under a second, the slow connections are closed long before their head timeout, and the
/// sheds are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_sheds_slow_heads_before_normal_clients() {
    let s = scenario();
    let _up = Recorder::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let p = proxy::start_custom(&s, None, s.path.parent().unwrap().to_path_buf(), |o| {
        o.max_connections = Some(100);
        o.timeouts.request_head = Duration::from_secs(30);
    })
    .await;
    let vip = s.vip();
    let mut attack = Vec::new();
    for _ in 0..600 {
        let mut c = TcpStream::connect(&vip).await.expect("connect");
        c.write_all(b"GET /slow HTTP/1.1\r\nHost: raw.example\r\nX-A: ")
            .await
            .unwrap();
        attack.push(c);
    }
    // Past the shed grace, so the waiting heads are the ones to go.
    tokio::time::sleep(Duration::from_millis(400)).await;
    answered_within_a_second(&vip).await;
    // The slow heads are shed, not left to their 30 s head timeout.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut closed = 0;
    for mut c in attack {
        let mut sink = [0u8; 64];
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(left, c.read(&mut sink)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 450,
        "{closed} of 600 slow heads closed within 5 s"
    );
    assert!(
        p.shared.active_connections() <= 200,
        "{} connections left",
        p.shared.active_connections()
    );
    let metrics = nodeproxy_tests::http_get(&p.admin_addr.to_string(), "/stats/prometheus")
        .expect("metrics")
        .1;
    let shed = metrics
        .lines()
        .find(|l| l.starts_with("nodeproxy_downstream_cx_shed_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(shed > 0, "sheds counted:\n{metrics}");
}

/// HTTP/2 gets HTTP/1's time limits: a connection that sends the preface and nothing more is
/// shut down after the head timeout, one whose streams are done after the idle timeout, and a
/// request body that stalls fails its stream with 408 (the backend gets nothing).
#[tokio::test]
async fn h2c_connections_and_bodies_have_timeouts_too() {
    let s = scenario();
    let up = Recorder::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = with_timeouts(&s, SHORT).await;
    // The preface and an empty SETTINGS frame, then silence: GOAWAY and close.
    let mut silent = TcpStream::connect(s.vip()).await.unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let sink = closed_after_a_timeout(
        &mut silent,
        Duration::from_secs(4),
        "a silent h2c connection is closed",
    )
    .await
    .0;
    // A GOAWAY frame (type 7) came before the close.
    assert!(
        sink.windows(4).any(|w| w[3] == 7 && w[..3] == [0, 0, 8]),
        "{sink:?}"
    );

    // One request, then idle: the connection ends after the idle timeout.
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(s.vip()).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/ok", s.vip()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(4), conn)
        .await
        .expect("an idle h2c connection is closed")
        .unwrap()
        .ok();
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );

    // A body that sends a few bytes and stalls: 408.
    let seen = up.heads.lock().unwrap().len();
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(s.vip()).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(1);
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"part",
    ))))
    .await
    .unwrap();
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let req = http::Request::post(format!("http://{}/stall", s.vip()))
        .body(body)
        .unwrap();
    let start = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(4), send.send_request(req))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(resp.status(), 408);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        up.heads.lock().unwrap().len(),
        seen,
        "the backend got nothing"
    );
    drop(tx);
}

/// A stream of the frames a channel receives.
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Upgrades feed outlier detection: an endpoint that answers upgrade requests with 503 is
/// ejected after `consecutive5xxErrors` of them, and the next plain request finds no healthy
/// upstream (without the upgrades' outcomes it would reach the endpoint).
#[tokio::test]
async fn failed_upgrades_eject_their_endpoint() {
    let s = canary_v1_only(
        "{outlierDetection: {consecutive5xxErrors: 2, interval: 50ms, baseEjectionTime: 30s, maxEjectionPercent: 100}}",
    );
    let backend =
        nodeproxy_tests::backend::Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    backend.behaviour.status.store(503, Ordering::SeqCst);
    let _p = proxy::start(&s, None).await;
    for _ in 0..2 {
        let (head, _c) = upgrade(&s.vip()).await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    }
    let served = backend.count();
    let vip = s.vip();
    let answer = nodeproxy_tests::eventually_async(Duration::from_secs(5), || {
        let vip = vip.clone();
        async move {
            let a = exchange(
                &vip,
                b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
            )
            .await;
            a.ends_with("no healthy upstream").then_some(a)
        }
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(
        backend.count(),
        served,
        "the ejected endpoint got no request"
    );
}
