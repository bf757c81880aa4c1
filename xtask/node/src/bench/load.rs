//! Load generators: wrk (HTTP/1.1), h2load (h2c), an open-loop fixed-rate generator for latency
//! without coordinated omission, TCP bulk, and idle connections.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// Throughput and latency of one load run.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Requests per second.
    pub rps: f64,
    /// Requests done.
    pub requests: u64,
    /// p50, ms.
    pub p50: Option<f64>,
    /// p99, ms.
    pub p99: Option<f64>,
    /// p99.9, ms.
    pub p999: Option<f64>,
    /// Non-2xx or failed.
    pub errors: u64,
    /// Mean latency, ms (h2load's summary).
    pub mean: Option<f64>,
}

fn parse_ms(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// Parse wrk's output (`--latency`).
pub fn parse_wrk(out: &str) -> anyhow::Result<LoadResult> {
    let mut r = LoadResult::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("wrk Requests/sec")?;
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50 = parse_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99 = parse_ms(v);
        } else if let Some(v) = t.strip_prefix(P999_LINE) {
            r.p999 = parse_ms(v);
        } else if t.contains("requests in") {
            r.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if t.starts_with("Socket errors:") {
            r.errors += t
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if r.rps == 0.0 {
        bail!("wrk printed no Requests/sec:\n{out}");
    }
    Ok(r)
}

/// Parse h2load's summary.
pub fn parse_h2load(out: &str) -> anyhow::Result<LoadResult> {
    let mut r = LoadResult::default();
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("finished in") {
            r.rps = t
                .split(',')
                .nth(1)
                .and_then(|p| p.split_whitespace().next()?.parse().ok())
                .context("h2load req/s")?;
        } else if let Some(v) = t.strip_prefix("requests:") {
            let nums: Vec<u64> = v
                .split(',')
                .filter_map(|p| p.split_whitespace().next()?.parse().ok())
                .collect();
            if nums.len() >= 6 {
                r.requests = nums[3];
                r.errors = nums[4] + nums[5];
            }
        } else if let Some(v) = t.strip_prefix("time for request:") {
            let f: Vec<&str> = v.split_whitespace().collect();
            // min max mean sd +/-sd: h2load gives no percentiles, only the mean.
            r.mean = f.get(2).and_then(|m| parse_ms(m));
        }
    }
    if r.rps == 0.0 {
        bail!("h2load printed no req/s:\n{out}");
    }
    Ok(r)
}

/// Untimed load before a freshly started target's first measured repetition: one second of
/// keep-alive wrk, so repetition 0 measures the same steady state as the others (connections
/// to the backend open, the process's memory touched). Nothing is recorded.
pub fn warm_up(url: &str, netns: Option<&str>) -> anyhow::Result<()> {
    wrk(url, WARM_UP_SECS, 50, false, netns).map(drop)
}

/// Length of [`warm_up`], seconds.
const WARM_UP_SECS: u64 = 1;

/// What [`WRK_SCRIPT`] prints before the p99.9 latency.
const P999_LINE: &str = "p99.9 latency:";

/// wrk's `--latency` table stops at p99; this `done` hook adds p99.9 from the same histogram.
/// A script with no `request`/`response` function leaves wrk on its static-request path.
const WRK_SCRIPT: &str = "done = function(summary, latency, requests)\n  \
    io.write(string.format(\"p99.9 latency: %dus\\n\", latency:percentile(99.9)))\nend\n";

/// The script's path (written once per process; one fixed name, so runs leave one file).
fn wrk_script() -> anyhow::Result<&'static std::path::Path> {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = PATH.get() {
        return Ok(p);
    }
    let p = std::env::temp_dir().join("nodeproxy-bench-wrk-p999.lua");
    std::fs::write(&p, WRK_SCRIPT).with_context(|| format!("write {}", p.display()))?;
    Ok(PATH.get_or_init(|| p))
}

/// `wrk -t2 -c{conns} -d{secs}s --latency -s <p99.9 script> URL` (optionally through
/// `nsenter --net=NS`, which keeps the mount namespace, so the script's path holds).
pub fn wrk(
    url: &str,
    secs: u64,
    conns: u32,
    close: bool,
    netns: Option<&str>,
) -> anyhow::Result<LoadResult> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={ns}")).arg("wrk");
            c
        }
        None => Command::new("wrk"),
    };
    cmd.args([
        "-t2",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
        "--timeout",
        "5s",
        "-s",
    ]);
    cmd.arg(wrk_script()?);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().context("run wrk")?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// `h2load -c50 -m10 -t2 -D secs --log-file=... URL` (h2c prior knowledge). h2load's summary
/// has no percentiles; they come from its per-request log.
pub fn h2load(url: &str, secs: u64) -> anyhow::Result<LoadResult> {
    let log =
        std::env::temp_dir().join(format!("nodeproxy-bench-h2load-{}.log", std::process::id()));
    // h2load appends to the log.
    let _ = std::fs::remove_file(&log);
    let out = Command::new("h2load")
        .args(["-c50", "-m10", "-t2", "-D", &secs.to_string()])
        .arg(format!("--log-file={}", log.display()))
        .arg(url)
        .output()
        .context("run h2load")?;
    let mut r = parse_h2load(&String::from_utf8_lossy(&out.stdout))?;
    let text = std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()));
    let _ = std::fs::remove_file(&log);
    let (p50, p99, p999) = h2load_percentiles(&text?)?;
    (r.p50, r.p99, r.p999) = (Some(p50), Some(p99), Some(p999));
    Ok(r)
}

/// p50, p99 and p99.9 (ms) of the completed requests in an h2load `--log-file` (tab-separated:
/// start µs since the epoch, status, µs until the end of the response; status -1: failed).
pub fn h2load_percentiles(log: &str) -> anyhow::Result<(f64, f64, f64)> {
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for line in log.lines() {
        let mut f = line.split('\t');
        let (Some(_), Some(status), Some(us)) = (f.next(), f.next(), f.next()) else {
            bail!("h2load log line {line:?}: expected three tab-separated columns");
        };
        if status.trim() == "-1" {
            continue;
        }
        let us: u64 = us
            .trim()
            .parse()
            .with_context(|| format!("h2load log line {line:?}: duration"))?;
        hist.record(us.max(1))?;
    }
    if hist.is_empty() {
        bail!("h2load log has no completed request");
    }
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    Ok((q(0.5), q(0.99), q(0.999)))
}

/// Open loop: `rate` requests/s spread over `conns` keep-alive connections for `secs`; each
/// latency counts from the request's scheduled start, so a stall is not hidden (no coordinated
/// omission).
pub fn open_loop(addr: &str, rate: u64, secs: u64, conns: usize) -> anyhow::Result<LoadResult> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
        let total = rate * secs;
        let start = Instant::now() + Duration::from_millis(100);
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..conns {
            let addr = addr.to_string();
            let errors = errors.clone();
            tasks.push(tokio::spawn(async move {
                let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .expect("histogram");
                let stream = tokio::net::TcpStream::connect(&addr)
                    .await
                    .expect("connect");
                let _ = stream.set_nodelay(true);
                let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
                    hyper_util::rt::TokioIo::new(stream),
                )
                .await
                .expect("handshake");
                tokio::spawn(conn);
                let mut k = c as u64;
                while k < total {
                    let due = start + interval * k as u32;
                    tokio::time::sleep_until(due.into()).await;
                    let req = hyper::Request::get("/")
                        .header("host", addr.as_str())
                        .body(Empty::new())
                        .expect("request");
                    let ok = match send.send_request(req).await {
                        Ok(r) => {
                            let good = r.status().is_success();
                            let _ = r.into_body().collect().await;
                            good
                        }
                        Err(_) => false,
                    };
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = hist.record(due.elapsed().as_micros() as u64);
                    k += conns as u64;
                }
                hist
            }));
        }
        let mut all = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for t in tasks {
            all.add(t.await?)?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let q = |p: f64| Some(all.value_at_quantile(p) as f64 / 1000.0);
        Ok(LoadResult {
            rps: all.len() as f64 / elapsed,
            requests: all.len(),
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
            errors: errors.load(Ordering::Relaxed),
            mean: None,
        })
    })
}

/// Push bytes through `addr` on `conns` connections for `secs`: bytes/s.
pub fn tcp_bulk(addr: &str, secs: u64, conns: usize) -> anyhow::Result<f64> {
    use std::io::Write;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let total = Arc::new(AtomicU64::new(0));
    let buf = vec![0x5au8; 64 * 1024];
    std::thread::scope(|s| {
        for _ in 0..conns {
            let (total, buf) = (total.clone(), &buf);
            s.spawn(move || {
                let Ok(mut c) = std::net::TcpStream::connect(addr) else {
                    return;
                };
                while Instant::now() < deadline {
                    match c.write(buf) {
                        Ok(n) => {
                            total.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    Ok(total.load(Ordering::Relaxed) as f64 / secs as f64)
}

/// A TCP sink on `addr` (reads and discards), on its own threads.
pub fn spawn_sink(addr: &str) -> anyhow::Result<()> {
    use std::io::Read;
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("bind sink {addr}"))?;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 50 connections\n  Latency Distribution\n     50%  410.00us\n     75%  600.00us\n     90%    1.20ms\n     99%    3.50ms\n  245000 requests in 5.00s, 30.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  49000.12\nTransfer/sec:      6.00MB\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.rps, 49000.12);
        assert_eq!(r.requests, 245000);
        assert_eq!(r.p50, Some(0.41));
        assert_eq!(r.p99, Some(3.5));
        assert_eq!(r.p999, None, "no script output");
        assert_eq!(r.errors, 3);
        let with_script = format!("{out}p99.9 latency: 7250us\n");
        assert_eq!(parse_wrk(&with_script).unwrap().p999, Some(7.25));
    }

    #[test]
    fn wrk_script_prints_what_the_parser_reads() {
        assert!(WRK_SCRIPT.contains("io.write(string.format(\"p99.9 latency: %dus"));
        assert!(WRK_SCRIPT.contains(P999_LINE));
        assert!(
            !WRK_SCRIPT.contains("request ="),
            "keeps wrk's static request"
        );
    }

    #[test]
    fn h2load_log_gives_percentiles_of_completed_requests() {
        // 1000 requests of 1..=1000 µs, one failed stream that must not count, one slow one.
        let mut log: String = (1..=1000u64)
            .map(|us| format!("1700000000{us:06}\t200\t{us}\n"))
            .collect();
        log.push_str("1700000001000000\t-1\t999999\n");
        let (p50, p99, p999) = h2load_percentiles(&log).unwrap();
        assert!((p50 - 0.5).abs() < 0.002, "p50 {p50}");
        assert!((p99 - 0.99).abs() < 0.002, "p99 {p99}");
        assert!((p999 - 0.999).abs() < 0.002, "p999 {p999}");
        assert!(h2load_percentiles("").is_err(), "empty log");
        assert!(h2load_percentiles("1\t200\n").is_err(), "short line");
        assert!(h2load_percentiles("1\t-1\t5\n").is_err(), "only failures");
    }

    #[test]
    fn parses_h2load_output() {
        let out = "finished in 5.00s, 80000.50 req/s, 2.00MB/s\nrequests: 400000 total, 400000 started, 400000 done, 399990 succeeded, 10 failed, 0 errored, 0 timeout\ntime for request:      200us     20.00ms      5.00ms      2.00ms    80.00%\n";
        let r = parse_h2load(out).unwrap();
        assert_eq!(r.rps, 80000.5);
        assert_eq!(r.requests, 399990, "succeeded requests");
        assert_eq!(r.errors, 10);
        assert_eq!(r.mean, Some(5.0));
        assert_eq!(r.p50, None);
    }
}
