//! The proxy's own HTTP/1.1 client and server against scripted peers that speak exact bytes:
//! response framing (content-length, chunked, until close, HEAD, 1xx), keep-alive reuse,
//! upstream-closed idle connections, invalid responses; and downstream pipelining, chunked
//! uploads, `Expect: 100-continue`, HTTP/1.0 clients and malformed or oversized requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use nodeproxy_tests::proxy::{self, Scenario, client, get, send, unique_net};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that answers each request by its path with fixed bytes.
struct RawUpstream {
    connections: Arc<AtomicU64>,
}

impl RawUpstream {
    async fn start(addr: &str) -> RawUpstream {
        let listener = TcpListener::bind(addr).await.expect("bind raw upstream");
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(sock));
            }
        });
        RawUpstream { connections }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Read one request (head and content-length body); `None` at end of stream.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String, usize)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut first = lines.next()?.split(' ');
            let method = first.next()?.to_string();
            let path = first.next()?.to_string();
            let len: usize = lines
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim().parse().expect("content-length"))
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 65536];
                let n = sock.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return Some((method, path, len));
        }
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve(mut sock: TcpStream) {
    let mut buf = Vec::new();
    while let Some((method, path, len)) = read_request(&mut sock, &mut buf).await {
        let pieces: Vec<String> = match path.as_str() {
            "/cl" if method == "HEAD" => {
                vec!["HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".into()]
            }
            "/cl" => vec!["HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".into()],
            "/chunked" => vec![
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n\
                 6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"
                    .into(),
            ],
            // The same body in pieces that split the size line, the data and the CRLFs.
            "/chunked-split" => [
                "HTTP/1.1 200 OK\r\ntransfer-e",
                "ncoding: chunked\r\n\r\n",
                "5\r",
                "\nhel",
                "lo\r",
                "\n6\r\n wor",
                "ld",
                "\r\n0\r",
                "\n\r\n",
            ]
            .map(String::from)
            .to_vec(),
            "/continue" => vec![
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    .into(),
            ],
            "/echo-len" => {
                let body = len.to_string();
                vec![format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )]
            }
            "/until-close" => vec!["HTTP/1.1 200 OK\r\n\r\nuntil close".into()],
            "/http10" => vec!["HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok".into()],
            "/bye" => vec!["HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye".into()],
            "/conflicting-length" => {
                vec![
                    "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello".into(),
                ]
            }
            "/garbage" => vec!["NOT-HTTP nonsense\r\n\r\n".into()],
            // "/nothing" and anything else: close without answering.
            _ => return,
        };
        for (i, p) in pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if sock.write_all(p.as_bytes()).await.is_err() {
                return;
            }
        }
        match path.as_str() {
            "/until-close" | "/http10" => return,
            "/bye" => {
                // Close while idle, as a keep-alive timeout does (no `Connection: close`).
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            _ => {}
        }
    }
}

pub(crate) fn scenario() -> Scenario {
    let net = unique_net();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: raw}}
spec:
  hosts: [raw.example]
  addresses: [{net}1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: {net}11}}
",
        port = proxy::SERVICE_PORT
    );
    Scenario::from_yaml_on(yaml, net)
}

#[tokio::test]
async fn response_framing_and_keep_alive_reuse() {
    let s = scenario();
    let up = RawUpstream::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = proxy::start(&s, None).await;
    let c = client();
    let vip = s.vip();
    for _ in 0..3 {
        let r = get(&c, &vip, "/cl", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
    }
    let head = send(
        &c,
        Request::head(format!("http://{vip}/cl"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(head.header("content-length"), "5");
    for path in ["/chunked", "/chunked-split"] {
        let r = get(&c, &vip, path, &[]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "hello world"), "{path}");
        assert_eq!(r.header("transfer-encoding"), "chunked", "{path}");
    }
    let r = get(&c, &vip, "/continue", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    // A body larger than one write, sent whole and counted by the upstream.
    let big = vec![b'x'; 300 * 1024];
    let r = send(
        &c,
        Request::post(format!("http://{vip}/echo-len"))
            .body(Full::new(Bytes::from(big)))
            .unwrap(),
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "307200"));
    let r = get(&c, &vip, "/cl", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "hello"));
    // Every exchange above left the connection reusable: one upstream connection served all.
    assert_eq!(up.connections(), 1);

    // Bodies delimited by the connection's end: the connection is not reused.
    let r = get(&c, &vip, "/until-close", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "until close"));
    let r = get(&c, &vip, "/http10", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let r = get(&c, &vip, "/cl", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "hello"));
    assert_eq!(up.connections(), 3);
}

#[tokio::test]
async fn upstream_closing_an_idle_connection_is_not_a_failure() {
    let s = scenario();
    let up = RawUpstream::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = proxy::start(&s, None).await;
    let c = client();
    let vip = s.vip();
    for round in 0..3 {
        let r = get(&c, &vip, "/bye", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "bye"), "round {round}");
        // The upstream closes the idle connection after 50 ms; the next request must open a
        // new one instead of failing on the dead one.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(up.connections(), 3);
}

#[tokio::test]
async fn invalid_responses_are_502_upe_and_resets_503_uc() {
    let s = scenario();
    let _up = RawUpstream::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = proxy::start(&s, None).await;
    let c = client();
    let vip = s.vip();
    for path in ["/conflicting-length", "/garbage"] {
        let r = get(&c, &vip, path, &[]).await;
        assert_eq!(r.status, 502, "{path}");
        assert_eq!(
            r.body,
            "upstream connect error or disconnect/reset before headers. reset reason: protocol error",
            "{path}"
        );
    }
    let r = get(&c, &vip, "/nothing", &[]).await;
    assert_eq!(r.status, 503);
    assert!(
        r.body.ends_with("reset reason: connection termination"),
        "{}",
        r.body
    );
    // The proxy still serves after those.
    let r = get(&c, &vip, "/cl", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "hello"));
}

/// Write `raw` to the proxy, then read until the proxy closes the connection.
pub(crate) async fn exchange(vip: &str, raw: &[u8]) -> String {
    let mut sock = TcpStream::connect(vip).await.expect("connect to the proxy");
    sock.write_all(raw).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got))
        .await
        .expect("the proxy closes in time")
        .expect("read");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn downstream_pipelining_uploads_and_http10() {
    let s = scenario();
    let _up = RawUpstream::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = proxy::start(&s, None).await;
    let vip = s.vip();
    // Three pipelined requests in one write, the last closing: three answers, in order.
    let text = exchange(
        &vip,
        b"GET /cl HTTP/1.1\r\nHost: raw.example\r\n\r\n\
          POST /echo-len HTTP/1.1\r\nHost: raw.example\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n3;ext=x\r\nabc\r\n0\r\ntrailer: dropped\r\n\r\n\
          GET /cl HTTP/1.1\r\nHost: raw.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answers: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "{text}");
    assert!(
        answers[0].starts_with("200 OK") && answers[0].ends_with("\r\n\r\nhello"),
        "{text}"
    );
    // The chunked upload arrived whole: 8 bytes.
    assert!(
        answers[1].starts_with("200 OK") && answers[1].ends_with("\r\n\r\n8"),
        "{text}"
    );
    assert!(answers[2].contains("connection: close\r\n"), "{text}");

    // HTTP/1.0 without keep-alive: one answer, then the proxy closes; a chunked upstream
    // body reaches a 1.0 client delimited by the close, not chunk-encoded.
    let text = exchange(&vip, b"GET /chunked HTTP/1.0\r\nHost: raw.example\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(!text.contains("transfer-encoding"), "{text}");
    assert!(text.ends_with("\r\n\r\nhello world"), "{text}");
}

#[tokio::test]
async fn downstream_expect_continue_and_bad_requests() {
    let s = scenario();
    let _up = RawUpstream::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let p = proxy::start(&s, None).await;
    let vip = s.vip();
    // Expect: 100-continue: the interim answer comes before the body is sent.
    let mut sock = TcpStream::connect(&vip).await.unwrap();
    sock.write_all(
        b"POST /echo-len HTTP/1.1\r\nHost: raw.example\r\nContent-Length: 5\r\n\
          Expect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), sock.read_exact(&mut interim))
        .await
        .expect("100 Continue in time")
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    sock.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 200 OK") && rest.ends_with("\r\n\r\n5"),
        "{rest}"
    );

    // Both framings at once (request smuggling): 400, and the connection closes.
    let text = exchange(
        &vip,
        b"POST /cl HTTP/1.1\r\nHost: raw.example\r\nContent-Length: 3\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    // Not HTTP at all.
    let text = exchange(&vip, b"\x01\x02 nonsense\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    // Over the 8 MiB buffering limit: 413 without reading the body, then close.
    let text = exchange(
        &vip,
        b"POST /echo-len HTTP/1.1\r\nHost: raw.example\r\nContent-Length: 9437184\r\n\r\n",
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{text}"
    );
    assert!(text.ends_with("request body too large to buffer"), "{text}");
    // Too many header fields: 431.
    let many: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let text = exchange(
        &vip,
        format!("GET /cl HTTP/1.1\r\nHost: raw.example\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    // The refused ones are counted as Envoy counts codec errors: their code and flag DPE.
    let sc = crate::ops::scrape(&p.admin_addr.to_string());
    let refused = |code: &str| -> f64 {
        sc.samples
            .iter()
            .filter(|x| {
                x.metric == "istio_requests_total"
                    && x.labels.get("response_code") == Some(code)
                    && x.labels.get("response_flags") == Some("DPE")
            })
            .map(|x| crate::ops::counter(&x.value))
            .sum()
    };
    assert_eq!((refused("400"), refused("431")), (2.0, 1.0));
}

/// A new connection is read before the proxy waits on it (`Accepted`): a client that connects
/// and speaks only later, in pieces, is served all the same, and so is one whose request is
/// there at once.
#[tokio::test]
async fn late_and_split_first_requests_are_served() {
    let s = scenario();
    let _up = RawUpstream::start(&format!("{}:{}", s.ip(11), proxy::SERVICE_PORT)).await;
    let _p = proxy::start(&s, None).await;
    let vip = s.vip();
    let mut sock = TcpStream::connect(&vip)
        .await
        .expect("connect to the proxy");
    tokio::time::sleep(Duration::from_millis(150)).await;
    sock.write_all(b"GET /cl HTTP/1.1\r\nHost: raw")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    sock.write_all(b".example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut got))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200 OK") && text.ends_with("\r\n\r\nhello"),
        "{text}"
    );
    let text = exchange(
        &vip,
        b"GET /cl HTTP/1.1\r\nHost: raw.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.1 200 OK") && text.ends_with("\r\n\r\nhello"),
        "{text}"
    );
}
