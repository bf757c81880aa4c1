//! A scripted stand-in for the Kubernetes API server's list and watch protocol over plain HTTP.
//! There is no real API server in this build environment; this speaks just enough of the
//! protocol for a client-go-style watcher: `GET <collection>` answers a `<Kind>List` with a
//! `resourceVersion` (items without `apiVersion`/`kind`, as the real server sends them);
//! `GET <collection>?watch=true` opens a chunked stream of `{"type","object"}` lines that the
//! test feeds event by event and may cut ([`FakeApiServer::drop_watch`]) or refuse with
//! `410 Gone`; `GET /apis/<group>` answers API group discovery. Every request is recorded.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;

/// The collection path of an object: `/api/v1/pods`, `/apis/networking.istio.io/v1/...`.
pub fn collection_of(obj: &Value) -> String {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let plural = match kind {
        "EndpointSlice" => "endpointslices".to_string(),
        "ServiceEntry" => "serviceentries".to_string(),
        "WorkloadEntry" => "workloadentries".to_string(),
        k => format!("{}s", k.to_ascii_lowercase()),
    };
    if api_version == "v1" {
        format!("/api/v1/{plural}")
    } else {
        format!("/apis/{api_version}/{plural}")
    }
}

#[derive(Default)]
struct State {
    /// Collection path → list kind and objects by `namespace/name`.
    collections: BTreeMap<String, (String, BTreeMap<String, Value>)>,
    /// API group discovery documents by path.
    groups: HashMap<String, Value>,
    /// The open watch per collection.
    watches: HashMap<String, mpsc::UnboundedSender<Bytes>>,
    /// Collections whose next watch is refused with 410 Gone.
    gone_next: Vec<String>,
    /// Answer every request with 503 (the API server is down).
    unavailable: bool,
    resource_version: u64,
    requests: Vec<String>,
}

/// The fake server; dropped, it stops accepting and closes every watch.
pub struct FakeApiServer {
    /// Where it listens (`http://` URL base).
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        self.state.lock().unwrap().watches.clear();
    }
}

fn key(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("")
    )
}

impl FakeApiServer {
    /// Serve `objects` (each with `apiVersion` and `kind`). Every Istio networking kind is
    /// served at the version the objects use (empty when none is given), as with installed CRDs.
    pub async fn start(objects: &[Value]) -> FakeApiServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        FakeApiServer::start_on(listener, objects)
    }

    /// As [`FakeApiServer::start`] on a bound listener (e.g. one inside a network namespace).
    pub fn start_on(listener: std::net::TcpListener, objects: &[Value]) -> FakeApiServer {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let mut st = State {
            resource_version: 1000,
            ..Default::default()
        };
        for o in objects {
            let list_kind = format!("{}List", o["kind"].as_str().unwrap());
            st.collections
                .entry(collection_of(o))
                .or_insert_with(|| (list_kind, BTreeMap::new()))
                .1
                .insert(key(o), o.clone());
        }
        let versions: Vec<String> = st
            .collections
            .keys()
            .filter_map(|p| p.strip_prefix("/apis/networking.istio.io/"))
            .filter_map(|rest| rest.split('/').next().map(String::from))
            .collect();
        if let Some(v) = versions.first() {
            for kind in [
                "VirtualService",
                "DestinationRule",
                "Gateway",
                "ServiceEntry",
                "WorkloadEntry",
            ] {
                let path = collection_of(&json!({
                    "apiVersion": format!("networking.istio.io/{v}"), "kind": kind,
                }));
                st.collections
                    .entry(path)
                    .or_insert_with(|| (format!("{kind}List"), BTreeMap::new()));
            }
            st.groups.insert(
                "/apis/networking.istio.io".into(),
                json!({
                    "kind": "APIGroup", "apiVersion": "v1", "name": "networking.istio.io",
                    "versions": [{"groupVersion": format!("networking.istio.io/{v}"), "version": v}],
                    "preferredVersion": {"groupVersion": format!("networking.istio.io/{v}"), "version": v},
                }),
            );
        }
        let state = Arc::new(Mutex::new(st));
        let addr = listener.local_addr().unwrap();
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(&s, req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeApiServer { addr, state, task }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file's text pointing at this server (no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\n\
             contexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// Every request so far, as `path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Is a watch open on `collection`?
    pub fn watching(&self, collection: &str) -> bool {
        self.state.lock().unwrap().watches.contains_key(collection)
    }

    /// Change the stored object and send `ADDED`/`MODIFIED`/`DELETED` on the open watch (if
    /// any). Returns the resourceVersion given to the event.
    pub fn event(&self, kind: &str, obj: &Value) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.resource_version += 1;
        let rv = st.resource_version;
        let mut obj = obj.clone();
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        let path = collection_of(&obj);
        let list_kind = format!("{}List", obj["kind"].as_str().unwrap());
        let coll = &mut st
            .collections
            .entry(path.clone())
            .or_insert_with(|| (list_kind, BTreeMap::new()))
            .1;
        if kind == "DELETED" {
            coll.remove(&key(&obj));
        } else {
            coll.insert(key(&obj), obj.clone());
        }
        if let Some(tx) = st.watches.get(&path) {
            let line = format!("{}\n", json!({"type": kind, "object": obj}));
            let _ = tx.send(Bytes::from(line));
        }
        rv
    }

    /// Change the stored object without telling any watch: an event the client missed (it is
    /// seen only by a re-list).
    pub fn change_unseen(&self, kind: &str, obj: &Value) {
        let tx = self
            .state
            .lock()
            .unwrap()
            .watches
            .remove(&collection_of(obj));
        self.event(kind, obj);
        if let Some(tx) = tx {
            self.state
                .lock()
                .unwrap()
                .watches
                .insert(collection_of(obj), tx);
        }
    }

    /// Cut the open watch on `collection` (the stream ends, as when a connection drops).
    pub fn drop_watch(&self, collection: &str) {
        self.state.lock().unwrap().watches.remove(collection);
    }

    /// Refuse the next watch on `collection` with `410 Gone` (resourceVersion too old).
    pub fn gone_next_watch(&self, collection: &str) {
        self.state.lock().unwrap().gone_next.push(collection.into());
    }

    /// Take the server down (every request 503, every watch cut) or bring it back.
    pub fn set_unavailable(&self, down: bool) {
        let mut st = self.state.lock().unwrap();
        st.unavailable = down;
        if down {
            st.watches.clear();
        }
    }
}

fn full(status: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn handle(state: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let mut st = state.lock().unwrap();
    st.requests.push(format!("{path}?{query}"));
    if st.unavailable {
        return status(503, "ServiceUnavailable", "the server is down");
    }
    if let Some(g) = st.groups.get(&path) {
        return full(200, g.clone());
    }
    let Some((list_kind, items)) = st.collections.get(&path).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    if !watch {
        let items: Vec<Value> = items
            .into_values()
            .map(|mut o| {
                let m = o.as_object_mut().unwrap();
                m.remove("apiVersion");
                m.remove("kind");
                o
            })
            .collect();
        let api_version = if path.starts_with("/api/v1/") {
            "v1".to_string()
        } else {
            path.trim_start_matches("/apis/")
                .rsplit_once('/')
                .map(|(gv, _)| gv.to_string())
                .unwrap_or_default()
        };
        return full(
            200,
            json!({"apiVersion": api_version, "kind": list_kind,
                   "metadata": {"resourceVersion": st.resource_version.to_string()},
                   "items": items}),
        );
    }
    if let Some(i) = st.gone_next.iter().position(|p| *p == path) {
        st.gone_next.remove(i);
        // A watch from a too-old resourceVersion: the real server answers 200 and sends one
        // ERROR event carrying a 410 Status, then ends the stream.
        let line = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version"}});
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!("{line}\n"))).boxed())
            .unwrap();
    }
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    st.watches.insert(path, tx);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}
