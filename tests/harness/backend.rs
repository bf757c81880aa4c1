//! Tiny HTTP/1.1 + h2c backends for tests: answer with their name, count requests, track
//! concurrency, and misbehave on demand (fail the first N requests, answer slowly, always 500).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What a backend does; shared with the test so it can change behaviour live.
#[derive(Default, Debug)]
pub struct Behaviour {
    /// Answer 503 to this many requests first.
    pub fail_first: AtomicU32,
    /// Status for every request (0: 200).
    pub status: AtomicU32,
    /// Delay before answering, ms.
    pub delay_ms: AtomicU64,
    /// Before answering, GET this URL (through the proxy) and answer with its status.
    pub call: std::sync::Mutex<Option<String>>,
}

/// A running backend.
pub struct Backend {
    /// Bound address.
    pub addr: SocketAddr,
    /// Name returned in the body and `x-backend`.
    pub name: String,
    /// Requests seen.
    pub requests: Arc<AtomicU64>,
    /// Requests being served now.
    pub in_flight: Arc<AtomicU32>,
    /// Highest concurrency seen.
    pub max_in_flight: Arc<AtomicU32>,
    /// Behaviour knobs.
    pub behaviour: Arc<Behaviour>,
    /// Last request's headers, as `name: value` lines.
    pub last_headers: Arc<std::sync::Mutex<String>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Start a backend named `name` on `addr` (port 0 picks one).
    pub async fn start(addr: &str, name: &str) -> Backend {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind backend {addr}: {e}"));
        Backend::serve(listener, name)
    }

    /// Serve on an already bound (non-blocking) listener, e.g. one bound inside a pod netns.
    pub fn from_std(listener: std::net::TcpListener, name: &str) -> Backend {
        Backend::serve(
            TcpListener::from_std(listener).expect("tokio listener"),
            name,
        )
    }

    fn serve(listener: TcpListener, name: &str) -> Backend {
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicU64::new(0));
        let in_flight = Arc::new(AtomicU32::new(0));
        let max_in_flight = Arc::new(AtomicU32::new(0));
        let behaviour = Arc::new(Behaviour::default());
        let last_headers = Arc::new(std::sync::Mutex::new(String::new()));
        let state = Arc::new(Served {
            requests: requests.clone(),
            in_flight: in_flight.clone(),
            max_in_flight: max_in_flight.clone(),
            behaviour: behaviour.clone(),
            last_headers: last_headers.clone(),
            name: name.to_string(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            requests,
            in_flight,
            max_in_flight,
            behaviour,
            last_headers,
            task,
        }
    }

    /// Requests seen so far.
    pub fn count(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// What one backend's requests update (the `Backend`'s counters and knobs, shared).
struct Served {
    requests: Arc<AtomicU64>,
    in_flight: Arc<AtomicU32>,
    max_in_flight: Arc<AtomicU32>,
    behaviour: Arc<Behaviour>,
    last_headers: Arc<std::sync::Mutex<String>>,
    name: String,
}

async fn handle(
    st: Arc<Served>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    *st.last_headers.lock().unwrap() = format!("version: {:?}\n", req.version())
        + &req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("")))
            .collect::<String>();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let _ = req.into_body().collect().await;
    let delay = st.behaviour.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut status = match st.behaviour.status.load(Ordering::SeqCst) {
        0 => 200,
        s => s as u16,
    };
    let call = st.behaviour.call.lock().unwrap().clone();
    if let Some(url) = call {
        let c = crate::proxy::client();
        let r = c
            .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
            .await;
        status = r.map(|r| r.status().as_u16()).unwrap_or(502);
    }
    if st
        .behaviour
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| x.checked_sub(1))
        .is_ok()
    {
        status = 503;
    }
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
    Ok::<_, Infallible>(
        Response::builder()
            .status(status)
            .header("x-backend", st.name.as_str())
            .header("x-path", path)
            .body(Full::new(Bytes::from(st.name.clone())))
            .unwrap(),
    )
}

/// An upstream that answers every request with `101 Switching Protocols` and then echoes what
/// it receives; returns how many connections it accepted.
pub async fn upgrade_echo(addr: &str) -> Arc<AtomicU64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind upgrade echo");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
                    .await;
                loop {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || sock.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    accepted
}
