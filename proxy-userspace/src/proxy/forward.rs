//! Forwarding a planned request: the retry loop (back off, pick another host, stay within the
//! route deadline and the maxRetries breaker) around single attempts (breakers, load balancer,
//! connection pool, send), and mirrors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full};
use rand::Rng;

use super::decide::Passthrough;
use super::headers::{GRPC_STATUS, X_ENVOY_OVERLOADED, X_ENVOY_RATELIMITED};
use crate::compile::policy::{ClusterPolicy, HashKey, LbAlgorithm};
use crate::compile::{Protocol, RetryOn, RetryPolicy};
use crate::reply::{BODY_NO_HEALTHY, BODY_OVERFLOW, BODY_TIMEOUT, Flags, LocalReply};
use crate::upstream::h1::{RequestHead, Reset, ResponseBody};
use crate::upstream::outlier::{self, Outcome};
use crate::upstream::pool::{self, Lease, PoolError};
use crate::upstream::{ClusterState, EndpointState, Target, lb};

/// A buffered request to send upstream (possibly several times).
#[derive(Clone)]
pub struct UpstreamRequest {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Host/`:authority`.
    pub authority: String,
    /// Headers (hop-by-hop removed).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl UpstreamRequest {
    /// The request as hyper sends it (HTTP/2 and upgrades).
    pub fn build(&self, h2: bool, attempt: u32) -> Request<pool::ReqBody> {
        let uri: Uri = if h2 {
            format!("http://{}{}", self.authority, self.path).parse()
        } else {
            self.path.parse()
        }
        .unwrap_or_else(|_| Uri::from_static("/"));
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .version(if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            });
        if let Some(h) = req.headers_mut() {
            *h = self.headers.clone();
            if !h2 && let Ok(v) = HeaderValue::from_str(&self.authority) {
                h.insert(header::HOST, v);
            }
            h.insert("x-envoy-attempt-count", HeaderValue::from(attempt));
        }
        req.body(Full::new(self.body.clone()))
            .expect("upstream request")
    }
}

/// An upstream response with the guards its body keeps alive and the route deadline.
pub type Streaming = (Response<ResponseBody>, Guards, Option<Instant>);

/// What forwarding produced.
pub struct Forwarded {
    /// The response, or the local reply that replaces it (flags included).
    pub response: Result<Streaming, LocalReply>,
    /// Flags forwarding added (URX, and the failure's).
    pub flags: Flags,
    /// The endpoint that served, or was tried last.
    pub ep: Option<Arc<EndpointState>>,
    /// Milliseconds from the request's start to the response head.
    pub upstream_ms: u128,
}

/// Decrements one of `T`'s counters on drop.
pub struct CounterGuard<T: Send + Sync + 'static>(Arc<T>, fn(&T) -> &AtomicU32);

impl<T: Send + Sync + 'static> Drop for CounterGuard<T> {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::Relaxed);
    }
}

/// The circuit-breaker and load-balancer counters an upstream response holds until its body
/// ends: the cluster's and the endpoint's active requests, and the maxRetries slot of a retried
/// request. One value, no allocation (it was a `Vec` of three boxes per request).
#[derive(Default)]
pub struct Guards {
    _request: Option<CounterGuard<ClusterState>>,
    _endpoint: Option<CounterGuard<EndpointState>>,
    retry: Option<CounterGuard<ClusterState>>,
}

/// Why one attempt failed.
enum AttemptError {
    Overflow,
    NoHealthy,
    Connect(String),
    Reset(String),
    /// The upstream's response was not valid HTTP (502 UPE).
    Protocol,
    Timeout,
    Passthrough,
}

impl AttemptError {
    /// A failure of the endpoint itself (outlier detection's local-origin failures).
    fn is_endpoint_failure(&self) -> bool {
        matches!(
            self,
            AttemptError::Connect(_)
                | AttemptError::Reset(_)
                | AttemptError::Protocol
                | AttemptError::Timeout
        )
    }

    fn retriable(&self, on: &RetryOn) -> bool {
        match self {
            AttemptError::Connect(_) => {
                on.connect_failure
                    || on.five_xx
                    || on.gateway_error
                    || on.reset
                    || on.reset_before_request
            }
            AttemptError::Reset(_) | AttemptError::Protocol | AttemptError::Timeout => {
                on.five_xx || on.gateway_error || on.reset
            }
            AttemptError::Overflow | AttemptError::NoHealthy | AttemptError::Passthrough => false,
        }
    }

    /// Envoy's local reply for a request whose last attempt failed this way.
    fn reply(self, retried: bool) -> LocalReply {
        match self {
            AttemptError::Overflow => {
                let mut r = LocalReply::new(503, BODY_OVERFLOW, Flags::UO);
                r.overloaded = true;
                r
            }
            AttemptError::NoHealthy => LocalReply::new(503, BODY_NO_HEALTHY, Flags::UH),
            AttemptError::Timeout => LocalReply::new(504, BODY_TIMEOUT, Flags::UT),
            AttemptError::Passthrough => LocalReply::new(
                503,
                "passthrough to the original destination needs --capture ebpf",
                Flags::UF,
            ),
            AttemptError::Connect(reason) => LocalReply::new(
                503,
                reset_body(
                    retried,
                    &format!("remote connection failure, transport failure reason: {reason}"),
                ),
                Flags::UF,
            ),
            AttemptError::Reset(reason) => {
                LocalReply::new(503, reset_body(retried, &reason), Flags::UC)
            }
            AttemptError::Protocol => {
                LocalReply::new(502, reset_body(retried, "protocol error"), Flags::UPE)
            }
        }
    }
}

/// Is this response retriable under `on`? (`x-envoy-overloaded` never is.)
fn response_retriable(on: &RetryOn, resp: &Response<ResponseBody>) -> bool {
    let s = resp.status().as_u16();
    let by_policy = (on.five_xx && s >= 500)
        || (on.gateway_error && matches!(s, 502..=504))
        || (on.retriable_4xx && s == 409)
        || on.status_codes.contains(&s)
        || (on.envoy_ratelimited && resp.headers().contains_key(&X_ENVOY_RATELIMITED))
        || (!on.grpc_codes.is_empty()
            && resp
                .headers()
                .get(&GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|code| on.grpc_codes.contains(&code)));
    // Looked up last: most responses are not retriable anyway.
    by_policy && !resp.headers().contains_key(&X_ENVOY_OVERLOADED)
}

/// Envoy's local-reply body for a connect failure or reset, before or after retries.
pub fn reset_body(retried: bool, reason: &str) -> String {
    let what = if retried {
        "retried and the latest reset reason"
    } else {
        "reset reason"
    };
    format!("upstream connect error or disconnect/reset before headers. {what}: {reason}")
}

fn is_consistent_hash(a: &LbAlgorithm) -> bool {
    matches!(a, LbAlgorithm::RingHash { .. } | LbAlgorithm::Maglev { .. })
}

/// What to send and how: the parts of a plan forwarding needs.
#[derive(Clone, Copy)]
pub struct Route<'a> {
    /// Where endpoints come from.
    pub passthrough: Passthrough,
    /// Retry policy.
    pub retry: &'a RetryPolicy,
    /// Route timeout (from the moment forwarding starts).
    pub timeout: Option<Duration>,
    /// HTTP/2 upstream.
    pub h2: bool,
    /// Consistent-hash key.
    pub hash: Option<u64>,
}

/// The state of one request's retries.
struct Retries<'a> {
    state: &'a Arc<ClusterState>,
    policy: Arc<ClusterPolicy>,
    retry: &'a RetryPolicy,
    deadline: Option<Instant>,
    tried: Vec<Target>,
    flags: Flags,
    /// The maxRetries slot held by the retry in flight.
    slot: Option<CounterGuard<ClusterState>>,
    last_ep: Option<Arc<EndpointState>>,
    attempt: u32,
}

impl Retries<'_> {
    /// Take a slot of the maxRetries breaker for the next retry; false: the retry is skipped.
    fn take_slot(&mut self) -> bool {
        let state = self.state;
        let n = state.active_retries.fetch_add(1, Ordering::Relaxed);
        if n >= self.policy.pool.max_retries {
            state.active_retries.fetch_sub(1, Ordering::Relaxed);
            state
                .stats
                .upstream_rq_retry_overflow
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.slot = Some(CounterGuard(state.clone(), |c: &ClusterState| {
            &c.active_retries
        }));
        state
            .stats
            .upstream_rq_retry
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Retry after an answer or failure that is `retriable`? (URX when the limit stops one.)
    fn again(&mut self, retriable: bool) -> bool {
        if retriable && self.attempt <= self.retry.num_retries && self.take_slot() {
            return true;
        }
        if retriable && self.retry.num_retries > 0 {
            self.flags = self.flags.with(Flags::URX);
        }
        false
    }

    /// Remember a host the next attempts should avoid (`retryRemoteLocalities` aside,
    /// Envoy's previous-hosts predicate; not under consistent hashing).
    fn avoid(&mut self, ep: &EndpointState) {
        if !is_consistent_hash(&self.policy.lb.algorithm) && self.retry.ignore_previous_hosts {
            self.tried.push(ep.target.clone());
        }
    }

    /// Back off before a retry; `Err` when the route deadline comes first (slept until it).
    async fn backoff(&self) -> Result<(), AttemptError> {
        let sleep = self
            .retry
            .backoff(self.attempt, |k| rand::rng().random_range(0..k));
        if let Some(d) = self.deadline
            && Instant::now() + sleep >= d
        {
            tokio::time::sleep_until(d.into()).await;
            return Err(AttemptError::Timeout);
        }
        tokio::time::sleep(sleep).await;
        Ok(())
    }

    /// An answer: recorded for outlier detection; true when it is to be retried (URX when a
    /// retriable answer ran out of retries). The caller keeps `ep` as the last one tried.
    fn retry_answer(&mut self, resp: &Response<ResponseBody>, ep: &Arc<EndpointState>) -> bool {
        outlier::record(self.state, ep, Outcome::Status(resp.status().as_u16()));
        let retriable = response_retriable(&self.retry.retry_on, resp);
        if retriable && self.deadline.is_none_or(|d| Instant::now() < d) && self.again(true) {
            self.avoid(ep);
            return true;
        }
        if retriable && self.retry.num_retries > 0 {
            // The retry limit (or budget) was reached with a retriable answer.
            self.flags = self.flags.with(Flags::URX);
        }
        false
    }

    /// A failed attempt: recorded; `Some` when it ends the request (no retry left, or the
    /// route timeout fired), `None` to retry.
    fn failed(
        &mut self,
        e: AttemptError,
        ep: Option<Arc<EndpointState>>,
        per_try: Option<Instant>,
    ) -> Option<AttemptError> {
        if let Some(ep) = &ep {
            if e.is_endpoint_failure() {
                outlier::record(self.state, ep, Outcome::LocalFailure);
            }
            self.avoid(ep);
        }
        self.last_ep = ep.or(self.last_ep.take());
        if matches!(e, AttemptError::Timeout) {
            self.state
                .stats
                .upstream_rq_timeout
                .fetch_add(1, Ordering::Relaxed);
            if per_try == self.deadline {
                return Some(e);
            }
        }
        if self.again(e.retriable(&self.retry.retry_on)) {
            return None;
        }
        Some(e)
    }

    /// This attempt's deadline: the per-try timeout within the route's.
    fn per_try_deadline(&self) -> Option<Instant> {
        match (self.retry.per_try_timeout, self.deadline) {
            (Some(p), Some(d)) => Some((Instant::now() + p).min(d)),
            (Some(p), None) => Some(Instant::now() + p),
            (None, d) => d,
        }
    }
}

/// The retry loop: pick an endpoint, pass the breakers, send, classify; back off and retry on
/// another host while the policy allows and the route deadline has not passed.
pub async fn forward(
    state: &Arc<ClusterState>,
    route: Route<'_>,
    req: &UpstreamRequest,
    start: Instant,
) -> Forwarded {
    let mut r = Retries {
        state,
        policy: state.policy.load_full(),
        retry: route.retry,
        // The route timeout starts once the whole downstream request is here (now), after faults.
        deadline: route.timeout.map(|t| Instant::now() + t),
        tried: Vec::new(),
        flags: Flags::NONE,
        slot: None,
        last_ep: None,
        attempt: 0,
    };
    let last_err = loop {
        r.attempt += 1;
        if r.attempt > 1
            && let Err(e) = r.backoff().await
        {
            break e;
        }
        let per_try = r.per_try_deadline();
        let attempt = attempt_once(
            state,
            route.passthrough,
            &r.policy,
            req,
            (route.h2, route.hash),
            &r.tried,
            per_try,
            r.attempt,
        )
        .await;
        match attempt {
            Ok((resp, ep, mut guards)) => {
                if r.retry_answer(&resp, &ep) {
                    r.last_ep = Some(ep);
                    continue;
                }
                guards.retry = r.slot.take();
                return Forwarded {
                    response: Ok((resp, guards, r.deadline)),
                    flags: r.flags,
                    ep: Some(ep),
                    upstream_ms: start.elapsed().as_millis(),
                };
            }
            Err((e, ep)) => {
                if let Some(e) = r.failed(e, ep, per_try) {
                    break e;
                }
            }
        }
    };
    let mut reply = last_err.reply(r.attempt > 1);
    reply.flags = reply.flags.with(r.flags);
    Forwarded {
        flags: reply.flags,
        response: Err(reply),
        ep: r.last_ep,
        upstream_ms: start.elapsed().as_millis(),
    }
}

type AttemptOk = (Response<ResponseBody>, Arc<EndpointState>, Guards);

/// One attempt: the http2MaxRequests breaker, an endpoint (or the original destination), a
/// pooled connection, the exchange; all within `deadline`.
#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    state: &Arc<ClusterState>,
    passthrough: Passthrough,
    policy: &ClusterPolicy,
    req: &UpstreamRequest,
    (h2, hash): (bool, Option<u64>),
    tried: &[Target],
    deadline: Option<Instant>,
    attempt: u32,
) -> Result<AttemptOk, (AttemptError, Option<Arc<EndpointState>>)> {
    if passthrough == Passthrough::Unavailable {
        return Err((AttemptError::Passthrough, None));
    }
    // Circuit breaker on concurrent requests (http2MaxRequests): immediate 503 UO.
    let n = state.active_requests.fetch_add(1, Ordering::Relaxed);
    let req_guard = CounterGuard(state.clone(), |c: &ClusterState| &c.active_requests);
    if n >= policy.pool.max_requests {
        state
            .stats
            .upstream_rq_pending_overflow
            .fetch_add(1, Ordering::Relaxed);
        return Err((AttemptError::Overflow, None));
    }
    let ep = match passthrough {
        // resolution NONE / PASSTHROUGH: the destination the client asked for (captured).
        Passthrough::To(addr) => Arc::new(EndpointState::transient(addr)),
        // A wildcard DNS entry: the requested host, if it is under the wildcard.
        Passthrough::Resolve(port) => {
            let host = crate::compile::strip_port(&req.authority).to_ascii_lowercase();
            if !crate::compile::registry::host_matches(&state.key.host, &host) {
                return Err((
                    AttemptError::Connect(format!(
                        "host `{host}` is not under `{}`",
                        state.key.host
                    )),
                    None,
                ));
            }
            Arc::new(EndpointState::transient_name(host, port))
        }
        _ => {
            let set = state.lb_set_for_request();
            let Some(ep) = lb::pick(&state.lb, &policy.lb.algorithm, &set, hash, tried) else {
                return Err((AttemptError::NoHealthy, None));
            };
            ep
        }
    };
    ep.active_requests.fetch_add(1, Ordering::Relaxed);
    let ep_guard = CounterGuard(ep.clone(), |e: &EndpointState| &e.active_requests);
    let work = exchange(state, &ep, req, h2, deadline, attempt);
    // One pinned `work` for both arms: awaited by value in each, the state machine would hold
    // two copies of it.
    let r = {
        tokio::pin!(work);
        match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), &mut work).await {
                Ok(r) => r,
                Err(_) => Err(AttemptError::Timeout),
            },
            None => work.await,
        }
    };
    match r {
        Ok(resp) => {
            // The body returns an HTTP/1 connection to its pool itself when it ends.
            let guards = Guards {
                _request: Some(req_guard),
                _endpoint: Some(ep_guard),
                retry: None,
            };
            Ok((resp, ep, guards))
        }
        Err(e) => Err((e, Some(ep))),
    }
}

/// A pooled connection to `ep` and one request–response exchange on it.
async fn exchange(
    state: &Arc<ClusterState>,
    ep: &Arc<EndpointState>,
    req: &UpstreamRequest,
    h2: bool,
    deadline: Option<Instant>,
    attempt: u32,
) -> Result<Response<ResponseBody>, AttemptError> {
    let lease = pool::acquire(state, ep, h2, deadline)
        .await
        .map_err(|e| match e {
            PoolError::Overflow => AttemptError::Overflow,
            PoolError::Connect(r) => AttemptError::Connect(r),
            PoolError::ConnectTimeout => AttemptError::Connect("connection timeout".into()),
            PoolError::Deadline => AttemptError::Timeout,
        })?;
    match lease {
        Lease::H1(conn) => {
            let head = RequestHead {
                method: &req.method,
                path: &req.path,
                authority: &req.authority,
                headers: &req.headers,
                attempt,
            };
            conn.send(&head, &req.body)
                .await
                .map(|r| r.map(ResponseBody::H1))
                .map_err(|e| match e {
                    Reset::Terminated => AttemptError::Reset("connection termination".into()),
                    Reset::Protocol(detail) => {
                        tracing::debug!(endpoint = %ep.target, %detail, "upstream protocol error");
                        AttemptError::Protocol
                    }
                })
        }
        // Boxed: hyper's HTTP/2 futures would otherwise size every request's state.
        Lease::H2(mut send) => {
            Box::pin(async move {
                if send.ready().await.is_err() {
                    return Err(AttemptError::Reset("connection termination".into()));
                }
                send.send_request(req.build(true, attempt))
                    .await
                    .map(|r| r.map(ResponseBody::H2))
                    .map_err(|e| AttemptError::Reset(reset_reason(&e)))
            })
            .await
        }
    }
}

/// Envoy's reset reason for a hyper error.
pub fn reset_reason(e: &hyper::Error) -> String {
    if e.is_canceled() || e.is_incomplete_message() || e.is_closed() {
        "connection termination".into()
    } else {
        format!("protocol error: {e}")
    }
}

/// Send one mirrored request and discard the answer.
pub async fn send_mirror(state: Arc<ClusterState>, protocol: Protocol, req: UpstreamRequest) {
    let policy = state.policy.load_full();
    let h2 = matches!(protocol, Protocol::Http2 | Protocol::Grpc) || policy.pool.h2_upgrade;
    let deadline = Some(Instant::now() + Duration::from_secs(30));
    if let Ok((resp, _, guards)) = attempt_once(
        &state,
        Passthrough::No,
        &policy,
        &req,
        (h2, None),
        &[],
        deadline,
        1,
    )
    .await
    {
        let _ = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect()).await;
        drop(guards);
    }
}

/// The consistent-hash key of a request, and a `set-cookie` value when one was generated.
pub fn hash_key(
    alg: &LbAlgorithm,
    headers: &HeaderMap,
    path: &str,
    peer: SocketAddr,
) -> Option<(u64, Option<String>)> {
    let key = match alg {
        LbAlgorithm::RingHash { key, .. } | LbAlgorithm::Maglev { key, .. } => key,
        _ => return None,
    };
    match key {
        HashKey::Header(name) => headers
            .get(name.as_str())
            .map(|v| (lb::hash64(v.as_bytes()), None)),
        HashKey::SourceIp => Some((lb::hash64(peer.ip()), None)),
        HashKey::QueryParameter(q) => path.split_once('?').and_then(|(_, qs)| {
            qs.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == q).then(|| (lb::hash64(v), None))
            })
        }),
        HashKey::Cookie {
            name,
            path: cpath,
            ttl,
        } => {
            let existing = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then(|| v.to_string())
                });
            match (existing, ttl) {
                (Some(v), _) => Some((lb::hash64(v.as_str()), None)),
                (None, Some(ttl)) => Some(new_cookie(name, cpath.as_deref(), *ttl, peer)),
                (None, None) => None,
            }
        }
    }
}

/// Envoy generates the cookie and hashes this request with it, so the client sticks to the
/// endpoint chosen now.
fn new_cookie(
    name: &str,
    path: Option<&str>,
    ttl: Duration,
    peer: SocketAddr,
) -> (u64, Option<String>) {
    let value = format!("{:016x}", lb::hash64((peer, rand::rng().random::<u64>())));
    let mut cookie = format!("{name}=\"{value}\"");
    if ttl.as_secs() > 0 {
        cookie.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if let Some(p) = path {
        cookie.push_str(&format!("; Path={p}"));
    }
    cookie.push_str("; HttpOnly");
    (lb::hash64(format!("\"{value}\"").as_str()), Some(cookie))
}
