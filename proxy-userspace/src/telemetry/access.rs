//! Access log: one line per HTTP request (written when the response body ends) and per TCP
//! connection, in an Envoy-like text format with response flags, or JSON.
//!
//! Lines are formatted on the data-plane thread and appended to one shared buffer; a writer
//! thread writes the buffer out in batches, at most [`LINGER`] after its first line or as soon
//! as it holds [`BATCH`] bytes (Envoy's access-log manager does the same with its flush thread).
//! The data path makes no system call per request: at 60k requests/s, one `write(2)` per line
//! on stderr cost more CPU than proxying the request. A destination that does not keep up
//! costs lines, never the data path: past [`MAX_PENDING`] bytes waiting, lines are dropped and
//! the count is reported.
//!
//! The log is switched by the `nodeproxy::access` tracing target (so `--access-log off`,
//! `RUST_LOG` and the admin API's `POST /logging` keep working) and needs [`install`]ed output.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{Request, Response, StatusCode};

use crate::body::OnEnd;
use crate::reply::Flags;

/// How long a line may wait in the buffer.
pub const LINGER: Duration = Duration::from_millis(100);
/// Pending bytes that make the writer flush at once.
pub const BATCH: usize = 64 * 1024;
/// Pending bytes past which lines are dropped (and counted) instead of buffered.
pub const MAX_PENDING: usize = 16 << 20;

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The process's standard error (the default, as before batching).
    Stderr,
    /// The process's standard output (Istio's `accessLogFile: /dev/stdout`).
    Stdout,
    /// A file, appended to (created if missing).
    File(PathBuf),
}

impl std::str::FromStr for Destination {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "/dev/stderr" | "stderr" => Destination::Stderr,
            "/dev/stdout" | "stdout" | "-" => Destination::Stdout,
            path => Destination::File(PathBuf::from(path)),
        })
    }
}

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Envoy-like text line.
    Text,
    /// One JSON object per line.
    Json,
}

/// The installed output: the shared buffer the writer thread drains.
struct Sink {
    format: Format,
    pending: Mutex<Pending>,
    /// Signals the writer: the buffer got its first line, reached [`BATCH`], or is closing.
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// Lines dropped since the last report (the buffer was full).
    dropped: u64,
    /// [`BATCH`] reached: flush without lingering.
    urgent: bool,
    closing: bool,
}

static SINK: OnceLock<Sink> = OnceLock::new();

thread_local! {
    /// Per-thread formatting space: lines are formatted outside the buffer's lock.
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The writer thread; dropping it writes what is pending and stops it.
pub struct Writer {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(sink) = SINK.get() {
            sink.pending.lock().expect("access log lock").closing = true;
            sink.wake.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Open `dest` and start the writer thread. Once per process: a second call fails.
pub fn install(dest: &Destination, format: Format) -> std::io::Result<Writer> {
    let mut out: Box<dyn Write + Send> = match dest {
        Destination::Stderr => Box::new(std::io::stderr()),
        Destination::Stdout => Box::new(std::io::stdout()),
        Destination::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("access log {}: {e}", path.display()))
                })?,
        ),
    };
    SINK.set(Sink {
        format,
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
    })
    .map_err(|_| std::io::Error::other("the access log is already installed"))?;
    let thread = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_loop(SINK.get().expect("installed above"), &mut *out))?;
    Ok(Writer {
        thread: Some(thread),
    })
}

/// Drain the shared buffer into `out` until closed: wait for a first line, linger up to
/// [`LINGER`] (or until [`BATCH`] bytes) so lines go out in batches, swap buffers, write.
fn write_loop(sink: &Sink, out: &mut dyn Write) {
    let mut spare: Vec<u8> = Vec::new();
    let mut failed = false;
    loop {
        let mut p = sink.pending.lock().expect("access log lock");
        p = sink
            .wake
            .wait_while(p, |p| p.buf.is_empty() && !p.closing)
            .expect("access log lock");
        p = sink
            .wake
            .wait_timeout_while(p, LINGER, |p| !p.urgent && !p.closing)
            .expect("access log lock")
            .0;
        std::mem::swap(&mut p.buf, &mut spare);
        p.urgent = false;
        let dropped = std::mem::take(&mut p.dropped);
        let closing = p.closing;
        drop(p);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "access log: lines dropped, the destination does not keep up"
            );
        }
        match out.write_all(&spare).and_then(|()| out.flush()) {
            Ok(()) => failed = false,
            // Reported once per failure streak, not per batch.
            Err(e) if !failed => {
                failed = true;
                tracing::error!(error = %e, "access log: write failed; lines are lost");
            }
            Err(_) => {}
        }
        // Keep the capacity of a normal batch, not of a burst.
        spare.clear();
        spare.shrink_to(BATCH * 2);
        if closing {
            return;
        }
    }
}

/// Whether entries are recorded: output installed and the `nodeproxy::access` target enabled.
fn enabled() -> Option<&'static Sink> {
    SINK.get()
        .filter(|_| tracing::enabled!(target: "nodeproxy::access", tracing::Level::INFO))
}

/// Format a line with `f` in this thread's scratch space and append it to the shared buffer.
fn append(sink: &Sink, f: impl FnOnce(&mut Vec<u8>)) {
    LINE.with_borrow_mut(|line| {
        line.clear();
        f(line);
        line.push(b'\n');
        let mut p = sink.pending.lock().expect("access log lock");
        if p.buf.len() + line.len() > MAX_PENDING {
            p.dropped += 1;
            return;
        }
        let first = p.buf.is_empty();
        p.buf.extend_from_slice(line);
        let urgent = !p.urgent && p.buf.len() >= BATCH;
        p.urgent |= urgent;
        drop(p);
        // At most one wake-up per batch: the first line starts the linger, BATCH ends it.
        if first || urgent {
            sink.wake.notify_one();
        }
        if line.capacity() > 4096 {
            line.shrink_to(1024);
        }
    });
}

/// A JSON value that is `Display` output.
struct Shown<T>(T);

impl<T: std::fmt::Display> serde::Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// An access-log entry being filled in.
#[derive(Debug, Clone)]
pub struct AccessLog {
    sink: &'static Sink,
    at: SystemTime,
    start: Instant,
    method: String,
    path: String,
    protocol: &'static str,
    authority: String,
    user_agent: String,
    request_id: String,
    peer: SocketAddr,
    flags: Flags,
    route: Option<String>,
    cluster: Option<String>,
    upstream: Option<String>,
    status: u16,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("format", &self.format)
            .finish()
    }
}

impl AccessLog {
    /// Start an entry for a request; `None` when the access log is off (nothing is allocated).
    pub fn start<B>(req: &Request<B>, peer: std::net::SocketAddr) -> Option<Self> {
        let sink = enabled()?;
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        Some(AccessLog {
            sink,
            at: SystemTime::now(),
            start: Instant::now(),
            method: req.method().to_string(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "/".into()),
            protocol: match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| h("host")),
            user_agent: h("user-agent"),
            request_id: h("x-request-id"),
            peer,
            flags: Flags::NONE,
            route: None,
            cluster: None,
            upstream: None,
            status: 0,
        })
    }

    /// An entry for a request refused before it could be parsed (method and path unknown).
    pub fn unparsed(peer: std::net::SocketAddr) -> Option<Self> {
        let mut req = Request::new(());
        *req.version_mut() = http::Version::HTTP_11;
        Self::start(&req, peer).map(|mut log| {
            log.method = "-".into();
            log.path = "-".into();
            log
        })
    }

    /// Log a reply sent without a response object (a refused request).
    pub fn finish_status(mut self, status: StatusCode, flags: Flags) {
        self.status = status.as_u16();
        self.flags = flags;
        self.emit(0, true);
    }

    /// Record routing results.
    pub fn set(
        &mut self,
        flags: Flags,
        route: Option<String>,
        cluster: Option<String>,
        upstream: Option<String>,
    ) {
        self.flags = flags;
        self.route = route;
        self.cluster = cluster;
        self.upstream = upstream;
    }

    /// Record the status sent downstream.
    pub fn set_status(&mut self, s: StatusCode) {
        self.status = s.as_u16();
    }

    /// Log a local reply now (`upstream`: the last host tried, if any).
    pub fn finish_local<B>(
        &mut self,
        resp: &Response<B>,
        flags: Flags,
        route: Option<&str>,
        cluster: Option<&str>,
        upstream: Option<String>,
    ) {
        self.flags = flags;
        self.route = route.map(str::to_string);
        self.cluster = cluster.map(str::to_string);
        self.upstream = upstream;
        self.status = resp.status().as_u16();
        let len = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.emit(len, true);
    }

    /// Write the entry: `bytes` sent downstream, `complete` false when the response was cut
    /// (flag DC added).
    pub fn emit(&self, bytes: u64, complete: bool) {
        let flags = if complete {
            self.flags
        } else {
            self.flags.with(Flags::DC)
        };
        let duration = self.start.elapsed().as_millis() as u64;
        match self.sink.format {
            Format::Json => append(self.sink, |out| self.json(out, flags, bytes, duration)),
            Format::Text => append(self.sink, |out| self.text(out, flags, bytes, duration)),
        }
    }

    /// `[start] "METHOD PATH PROTOCOL" status flags bytes_sent duration_ms "user-agent"
    /// "x-request-id" "authority" "upstream_host" upstream_cluster route_name downstream_peer`.
    fn text(&self, out: &mut Vec<u8>, flags: Flags, bytes: u64, duration: u64) {
        let _ = write!(
            out,
            "[{}] \"{} {} {}\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" {} {} {}",
            humantime::format_rfc3339_millis(self.at),
            self.method,
            self.path,
            self.protocol,
            self.status,
            flags,
            bytes,
            duration,
            self.user_agent,
            self.request_id,
            self.authority,
            self.upstream.as_deref().unwrap_or("-"),
            self.cluster.as_deref().unwrap_or("-"),
            self.route.as_deref().unwrap_or("-"),
            self.peer,
        );
    }

    fn json(&self, out: &mut Vec<u8>, flags: Flags, bytes: u64, duration: u64) {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            start_time: Shown<humantime::Rfc3339Timestamp>,
            method: &'a str,
            path: &'a str,
            protocol: &'a str,
            response_code: u16,
            response_flags: Shown<Flags>,
            bytes_sent: u64,
            duration: u64,
            user_agent: &'a str,
            request_id: &'a str,
            authority: &'a str,
            upstream_host: Option<&'a str>,
            upstream_cluster: Option<&'a str>,
            route_name: Option<&'a str>,
            downstream_remote_address: Shown<SocketAddr>,
        }
        let line = Line {
            start_time: Shown(humantime::format_rfc3339_millis(self.at)),
            method: &self.method,
            path: &self.path,
            protocol: self.protocol,
            response_code: self.status,
            response_flags: Shown(flags),
            bytes_sent: bytes,
            duration,
            user_agent: &self.user_agent,
            request_id: &self.request_id,
            authority: &self.authority,
            upstream_host: self.upstream.as_deref(),
            upstream_cluster: self.cluster.as_deref(),
            route_name: self.route.as_deref(),
            downstream_remote_address: Shown(self.peer),
        };
        let _ = serde_json::to_writer(out, &line);
    }
}

impl OnEnd for AccessLog {
    fn on_end(self: Box<Self>, bytes: u64, complete: bool) {
        self.emit(bytes, complete);
    }
}

/// One TCP connection's access-log entry: `[start] TCP peer -> destination sni=NAME flags
/// bytes_received bytes_sent duration_ms "upstream_host" upstream_cluster` (text), or the same
/// fields as JSON.
pub struct TcpAccess<'a> {
    /// The downstream peer.
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub dst: SocketAddr,
    /// TLS server name, when routed by SNI.
    pub sni: Option<&'a str>,
    /// Upstream cluster.
    pub cluster: Option<&'a str>,
    /// Upstream host.
    pub upstream: Option<&'a str>,
    /// Response flags.
    pub flags: Flags,
    /// Bytes sent downstream.
    pub sent: u64,
    /// Bytes received from downstream.
    pub received: u64,
    /// When the connection was accepted.
    pub start: Instant,
}

impl TcpAccess<'_> {
    /// Record the entry (when the access log is on).
    pub fn log(&self) {
        if let Some(sink) = enabled() {
            self.write(sink);
        }
    }

    fn write(&self, sink: &Sink) {
        let TcpAccess {
            peer,
            dst,
            sni,
            cluster,
            upstream,
            flags,
            sent,
            received,
            start,
        } = *self;
        let at = humantime::format_rfc3339_millis(
            SystemTime::now()
                .checked_sub(start.elapsed())
                .unwrap_or_else(SystemTime::now),
        );
        let duration = start.elapsed().as_millis() as u64;
        match sink.format {
            Format::Text => append(sink, |out| {
                let _ = write!(
                    out,
                    "[{at}] TCP {peer} -> {dst} sni={} {flags} {received} {sent} {duration} \"{}\" {}",
                    sni.unwrap_or("-"),
                    upstream.unwrap_or("-"),
                    cluster.unwrap_or("-"),
                );
            }),
            Format::Json => append(sink, |out| {
                #[derive(serde::Serialize)]
                struct Line<'a> {
                    start_time: Shown<humantime::Rfc3339Timestamp>,
                    protocol: &'static str,
                    downstream_remote_address: Shown<SocketAddr>,
                    downstream_local_address: Shown<SocketAddr>,
                    requested_server_name: Option<&'a str>,
                    response_flags: Shown<Flags>,
                    bytes_received: u64,
                    bytes_sent: u64,
                    duration: u64,
                    upstream_host: Option<&'a str>,
                    upstream_cluster: Option<&'a str>,
                }
                let _ = serde_json::to_writer(
                    out,
                    &Line {
                        start_time: Shown(at),
                        protocol: "TCP",
                        downstream_remote_address: Shown(peer),
                        downstream_local_address: Shown(dst),
                        requested_server_name: sni,
                        response_flags: Shown(flags),
                        bytes_received: received,
                        bytes_sent: sent,
                        duration,
                        upstream_host: upstream,
                        upstream_cluster: cluster,
                    },
                );
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(format: Format) -> &'static Sink {
        Box::leak(Box::new(Sink {
            format,
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        }))
    }

    fn entry(sink: &'static Sink) -> AccessLog {
        AccessLog {
            sink,
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            start: Instant::now(),
            method: "GET".into(),
            path: "/reviews?x=1".into(),
            protocol: "HTTP/1.1",
            authority: "reviews:9080".into(),
            user_agent: "curl/8".into(),
            request_id: "-".into(),
            peer: "10.0.0.7:40000".parse().unwrap(),
            flags: Flags::UF.with(Flags::URX),
            route: Some("VirtualService/default/reviews".into()),
            cluster: Some("outbound|9080|v2|reviews.default.svc.cluster.local".into()),
            upstream: Some("10.0.1.2:9080".into()),
            status: 503,
        }
    }

    fn pending(sink: &Sink) -> String {
        String::from_utf8(sink.pending.lock().unwrap().buf.clone()).unwrap()
    }

    #[test]
    fn text_line_has_envoy_fields_in_order() {
        let s = sink(Format::Text);
        entry(s).emit(19, false);
        let line = pending(s);
        let expected_prefix =
            "[2023-11-14T22:13:20.123Z] \"GET /reviews?x=1 HTTP/1.1\" 503 UF,DC,URX 19 ";
        assert!(line.starts_with(expected_prefix), "{line}");
        assert!(
            line.ends_with(
                " \"curl/8\" \"-\" \"reviews:9080\" \"10.0.1.2:9080\" outbound|9080|v2|reviews.default.svc.cluster.local VirtualService/default/reviews 10.0.0.7:40000\n"
            ),
            "{line}"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn json_line_is_one_object_per_line() {
        let s = sink(Format::Json);
        let mut e = entry(s);
        e.upstream = None;
        e.user_agent = "quote\"in agent".into();
        e.emit(0, true);
        tcp_access_to(s);
        let text = pending(s);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["response_code"], 503);
        assert_eq!(lines[0]["response_flags"], "UF,URX");
        assert_eq!(lines[0]["user_agent"], "quote\"in agent");
        assert_eq!(lines[0]["upstream_host"], serde_json::Value::Null);
        assert_eq!(lines[0]["start_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(lines[1]["protocol"], "TCP");
        assert_eq!(lines[1]["bytes_received"], 5);
        assert_eq!(lines[1]["requested_server_name"], "api.example.com");
        assert_eq!(lines[1]["downstream_local_address"], "10.96.0.10:443");
        assert_eq!(lines[1]["upstream_host"], serde_json::Value::Null);
        assert_eq!(lines[1]["response_flags"], "-");
    }

    #[test]
    fn tcp_text_line() {
        let s = sink(Format::Text);
        tcp_access_to(s);
        let line = pending(s);
        let (_, rest) = line.split_once("] ").unwrap();
        assert_eq!(
            rest,
            "TCP 10.0.0.7:40001 -> 10.96.0.10:443 sni=api.example.com - 5 7 0 \"-\" outbound|443||api.example.com\n"
        );
    }

    fn tcp_access_to(sink: &'static Sink) {
        TcpAccess {
            peer: "10.0.0.7:40001".parse().unwrap(),
            dst: "10.96.0.10:443".parse().unwrap(),
            sni: Some("api.example.com"),
            cluster: Some("outbound|443||api.example.com"),
            upstream: None,
            flags: Flags::NONE,
            sent: 7,
            received: 5,
            start: Instant::now(),
        }
        .write(sink);
    }

    #[test]
    fn a_full_buffer_drops_and_counts_lines() {
        let s = sink(Format::Text);
        s.pending.lock().unwrap().buf = vec![b'x'; MAX_PENDING - 10];
        entry(s).emit(0, true);
        entry(s).emit(0, true);
        let p = s.pending.lock().unwrap();
        assert_eq!(p.buf.len(), MAX_PENDING - 10);
        assert_eq!(p.dropped, 2);
        assert!(p.urgent || p.buf.len() >= BATCH);
    }

    /// A writer that records each `write_all` batch.
    #[derive(Clone, Default)]
    struct Batches(std::sync::Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Batches {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_writer_batches_lines_within_the_linger_and_flushes_on_close() {
        let s = sink(Format::Text);
        let out = Batches::default();
        let writer = {
            let mut out = out.clone();
            std::thread::spawn(move || write_loop(s, &mut out))
        };
        for _ in 0..50 {
            entry(s).emit(1, true);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.0.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no batch written");
            std::thread::sleep(Duration::from_millis(5));
        }
        {
            let batches = out.0.lock().unwrap();
            // Lines written in one go (one write for the 50, unless the writer woke between).
            let lines: usize = batches
                .iter()
                .map(|b| b.iter().filter(|c| **c == b'\n').count())
                .sum();
            assert_eq!(lines, 50);
            assert!(batches.len() <= 2, "{} writes for 50 lines", batches.len());
        }
        entry(s).emit(2, true);
        s.pending.lock().unwrap().closing = true;
        s.wake.notify_one();
        writer.join().unwrap();
        let all: Vec<u8> = out.0.lock().unwrap().concat();
        assert_eq!(
            all.iter().filter(|c| **c == b'\n').count(),
            51,
            "the last line is written on close"
        );
    }
}
