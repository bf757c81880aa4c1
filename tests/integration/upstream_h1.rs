//! The proxy's own HTTP/1.1 client against a scripted upstream that answers with exact bytes:
//! response framing (content-length, chunked, until close, HEAD, 1xx), keep-alive reuse,
//! upstream-closed idle connections, large request bodies and invalid responses.

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

fn scenario() -> Scenario {
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
