//! Results, statistics and the report: `results.json`, `report.md` (tables with ratios against
//! `direct` and against the best peer) and PNG bar charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// One measured run of one target on one workload.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Measurement {
    /// Workload name.
    pub workload: String,
    /// Target name.
    pub target: String,
    /// Repetition index.
    pub rep: usize,
    /// Requests per second (or connections per second).
    pub rps: f64,
    /// Latency percentiles, ms.
    pub p50_ms: Option<f64>,
    /// p99, ms.
    pub p99_ms: Option<f64>,
    /// p99.9, ms.
    pub p999_ms: Option<f64>,
    /// Proxy CPU per request, µs (None for `direct`).
    pub cpu_us_per_req: Option<f64>,
    /// Proxy RSS at the end, KiB.
    pub rss_kib: Option<u64>,
    /// Bytes per second (TCP bulk).
    pub bytes_per_s: Option<f64>,
    /// Free-form extra figure (e.g. compile ms, KiB per idle connection).
    pub extra: BTreeMap<String, f64>,
}

/// Median and spread of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

/// Median (mean of the middle two for even counts) with min and max; None when empty.
pub fn stat(values: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// Peers (the alternatives a user would pick); the `-netns` ones run as node proxies in the
/// netns node, reached explicitly by the client pod.
pub const PEERS: [&str; 6] = [
    "haproxy",
    "nginx",
    "haproxy-l4",
    "nginx-l4",
    "haproxy-netns",
    "nginx-netns",
];

/// Per workload and target: medians of every metric.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Target.
    pub target: String,
    /// Req/s.
    pub rps: Stat,
    /// p50.
    pub p50: Option<Stat>,
    /// p99.
    pub p99: Option<Stat>,
    /// p99.9.
    pub p999: Option<Stat>,
    /// CPU µs/request.
    pub cpu: Option<Stat>,
    /// RSS KiB.
    pub rss: Option<Stat>,
    /// Bytes/s.
    pub bytes: Option<Stat>,
    /// Extras.
    pub extra: BTreeMap<String, Stat>,
}

/// Rows of a workload, in first-seen target order.
pub fn summarize(ms: &[Measurement], workload: &str) -> Vec<Row> {
    let mut targets: Vec<String> = Vec::new();
    for m in ms.iter().filter(|m| m.workload == workload) {
        if !targets.contains(&m.target) {
            targets.push(m.target.clone());
        }
    }
    targets
        .into_iter()
        .filter_map(|t| {
            let of: Vec<&Measurement> = ms
                .iter()
                .filter(|m| m.workload == workload && m.target == t)
                .collect();
            let col = |f: &dyn Fn(&Measurement) -> Option<f64>| {
                stat(&of.iter().filter_map(|m| f(m)).collect::<Vec<_>>())
            };
            let mut extra = BTreeMap::new();
            let keys: Vec<String> = of.iter().flat_map(|m| m.extra.keys().cloned()).collect();
            for k in keys {
                if let Some(s) = stat(
                    &of.iter()
                        .filter_map(|m| m.extra.get(&k).copied())
                        .collect::<Vec<_>>(),
                ) {
                    extra.insert(k, s);
                }
            }
            Some(Row {
                rps: col(&|m| Some(m.rps))?,
                p50: col(&|m| m.p50_ms),
                p99: col(&|m| m.p99_ms),
                p999: col(&|m| m.p999_ms),
                cpu: col(&|m| m.cpu_us_per_req),
                rss: col(&|m| m.rss_kib.map(|v| v as f64)),
                bytes: col(&|m| m.bytes_per_s),
                extra,
                target: t,
            })
        })
        .collect()
}

/// Ratio of `row` to the `direct` row of the same workload, and to the best peer's req/s.
pub fn ratios(rows: &[Row], row: &Row) -> (Option<f64>, Option<f64>) {
    let metric = |r: &Row| r.bytes.map(|b| b.median).unwrap_or(r.rps.median);
    let direct = rows
        .iter()
        .find(|r| r.target.starts_with("direct"))
        .map(metric);
    let best_peer = rows
        .iter()
        .filter(|r| PEERS.contains(&r.target.as_str()))
        .map(metric)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    let me = metric(row);
    (
        direct.filter(|d| *d > 0.0).map(|d| me / d),
        best_peer.filter(|p| *p > 0.0).map(|p| me / p),
    )
}

fn fmt_stat(s: Option<Stat>, digits: usize) -> String {
    match s {
        Some(s) if s.max > s.min => {
            format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
        }
        Some(s) => format!("{:.d$}", s.median, d = digits),
        None => "–".into(),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "–".into())
}

/// The Markdown report.
pub fn markdown(ms: &[Measurement], header: &str, workloads: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}\n");
    out.push_str(&targets(ms));
    for w in workloads {
        let rows = summarize(ms, w);
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "## {w}\n");
        let bytes = rows.iter().any(|r| r.bytes.is_some());
        let extras: Vec<String> = rows
            .iter()
            .flat_map(|r| r.extra.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut head = String::from(if bytes {
            "| target | MB/s"
        } else {
            "| target | req/s"
        });
        head.push_str(
            " | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | RSS MiB | ÷ direct | ÷ best peer |",
        );
        for e in &extras {
            head.push_str(&format!(" {e} |"));
        }
        let _ = writeln!(out, "{head}");
        let _ = writeln!(out, "|{}", "---|".repeat(9 + extras.len()));
        for r in &rows {
            let (d, p) = ratios(&rows, r);
            let main = if bytes {
                fmt_stat(
                    r.bytes.map(|s| Stat {
                        median: s.median / 1e6,
                        min: s.min / 1e6,
                        max: s.max / 1e6,
                    }),
                    0,
                )
            } else {
                fmt_stat(Some(r.rps), 0)
            };
            let mut line = format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.target,
                main,
                fmt_stat(r.p50, 2),
                fmt_stat(r.p99, 2),
                fmt_stat(r.p999, 2),
                fmt_stat(r.cpu, 1),
                fmt_stat(
                    r.rss.map(|s| Stat {
                        median: s.median / 1024.0,
                        min: s.min / 1024.0,
                        max: s.max / 1024.0
                    }),
                    1
                ),
                fmt_ratio(d),
                fmt_ratio(p)
            );
            for e in &extras {
                line.push_str(&format!(" {} |", fmt_stat(r.extra.get(e).copied(), 2)));
            }
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out);
    }
    out
}

/// One metric of `target` in `workload` over the repetitions.
fn stat_of(
    ms: &[Measurement],
    workload: &str,
    target: &str,
    f: impl Fn(&Row) -> Option<Stat>,
) -> Option<Stat> {
    summarize(ms, workload)
        .iter()
        .find(|r| r.target == target)
        .and_then(f)
}

/// Median of one metric of `target` in `workload`.
fn median_of(
    ms: &[Measurement],
    workload: &str,
    target: &str,
    f: impl Fn(&Row) -> Option<Stat>,
) -> Option<f64> {
    stat_of(ms, workload, target, f).map(|s| s.median)
}

/// The peer with the best (highest, or lowest with `lower`) median of a metric in `workload`,
/// with that metric over its repetitions.
fn best_peer(
    ms: &[Measurement],
    workload: &str,
    f: impl Fn(&Row) -> Option<Stat>,
    lower: bool,
) -> Option<(String, Stat)> {
    summarize(ms, workload)
        .iter()
        .filter(|r| PEERS.contains(&r.target.as_str()))
        .filter_map(|r| f(r).map(|s| (r.target.clone(), s)))
        .reduce(|a, b| {
            if (b.1.median < a.1.median) == lower {
                b
            } else {
                a
            }
        })
}

/// nodeproxy's metric in `workload`, with the best peer's name and metric.
fn vs_best_peer_stat(
    ms: &[Measurement],
    workload: &str,
    f: impl Fn(&Row) -> Option<Stat> + Copy,
    lower: bool,
) -> Option<(Stat, String, Stat)> {
    let me = stat_of(ms, workload, "nodeproxy", f)?;
    let (peer, best) = best_peer(ms, workload, f, lower)?;
    Some((me, peer, best))
}

/// A nodeproxy target's median of a metric in `workload`, with the best peer's name and median.
fn target_vs_best_peer(
    ms: &[Measurement],
    workload: &str,
    target: &str,
    f: impl Fn(&Row) -> Option<Stat> + Copy,
    lower: bool,
) -> Option<(f64, String, f64)> {
    let me = median_of(ms, workload, target, f)?;
    let (peer, best) = best_peer(ms, workload, f, lower)?;
    Some((me, peer, best.median))
}

/// nodeproxy's median of a metric in `workload`, with the best peer's name and median.
fn vs_best_peer(
    ms: &[Measurement],
    workload: &str,
    f: impl Fn(&Row) -> Option<Stat> + Copy,
    lower: bool,
) -> Option<(f64, String, f64)> {
    target_vs_best_peer(ms, workload, "nodeproxy", f, lower)
}

/// "no" for a lower-is-better metric whose median is above the peer's, qualified when the
/// repetitions overlap (nodeproxy's best repetition at or below the peer's worst): the medians
/// differ by less than the run-to-run spread, so the miss is not established by this run.
fn lower_is_met(me: Stat, best: Stat) -> String {
    if me.median <= best.median {
        "yes".into()
    } else if me.min <= best.max {
        format!(
            "no, within the spread ({:.2}–{:.2} vs {:.2}–{:.2})",
            me.min, me.max, best.min, best.max
        )
    } else {
        "no".into()
    }
}

fn yes_no(ok: bool) -> String {
    if ok { "yes" } else { "no" }.to_string()
}

/// A target row for nodeproxy's median against the best peer's (`found`): req/s must be
/// ≥ 1.10 × the peer's, proxy CPU per request (`cpu`) ≤ 0.8 ×.
fn peer_ratio_row(
    what: String,
    found: Option<(f64, String, f64)>,
    cpu: bool,
) -> Option<[String; 4]> {
    let (me, peer, best) = found?;
    let r = me / best;
    Some(if cpu {
        [
            what,
            "≤ 0.8 × best peer".into(),
            format!("{r:.2} × {peer} ({me:.1} vs {best:.1} µs)"),
            yes_no(r <= 0.8),
        ]
    } else {
        [
            what,
            "≥ 1.10 × best peer".into(),
            format!("{r:.2} × {peer} ({me:.0} vs {best:.0})"),
            yes_no(r >= 1.10),
        ]
    })
}

/// The benchmark goals for nodeproxy, checked against this run's medians (rows without data, e.g.
/// under `--only`, are left out).
pub fn targets(ms: &[Measurement]) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let rps = |r: &Row| Some(r.rps);
    let cpu = |r: &Row| r.cpu;
    let p99 = |r: &Row| r.p99;
    for (w, label) in [("h1-keepalive", "HTTP/1.1 keep-alive"), ("h2c", "h2c")] {
        rows.extend(peer_ratio_row(
            format!("{label} req/s"),
            vs_best_peer(ms, w, rps, false),
            false,
        ));
        rows.extend(peer_ratio_row(
            format!("{label} proxy CPU / request"),
            vs_best_peer(ms, w, cpu, true),
            true,
        ));
    }
    for (w, label) in [
        ("h1-keepalive", "HTTP/1.1 keep-alive p99"),
        ("h2c", "h2c p99"),
        ("latency-10k", "p99 at 10k req/s"),
    ] {
        if let Some((me, peer, best)) = vs_best_peer_stat(ms, w, p99, true) {
            rows.push([
                label.into(),
                "≤ best peer".into(),
                format!("{:.2} vs {:.2} ms ({peer})", me.median, best.median),
                lower_is_met(me, best),
            ]);
        }
    }
    rows.extend(peer_ratio_row(
        "new connection per request (loopback)".into(),
        vs_best_peer(ms, "h1-newconn", rps, false),
        false,
    ));
    for (w, label) in [
        ("netns h1-keepalive", "keep-alive"),
        ("netns h1-newconn", "new connections"),
    ] {
        // Through capture, against the peers run as node proxies in the same netns node.
        for (target, how) in [
            ("nodeproxy-captured", "captured"),
            ("nodeproxy-captured-sockmap", "captured + `--sockmap`"),
        ] {
            rows.extend(peer_ratio_row(
                format!("netns {label} req/s, {how}"),
                target_vs_best_peer(ms, w, target, rps, false),
                false,
            ));
            rows.extend(peer_ratio_row(
                format!("netns {label} proxy CPU / request, {how}"),
                target_vs_best_peer(ms, w, target, cpu, true),
                true,
            ));
        }
        let direct = median_of(ms, w, "direct-netns", rps);
        if let (Some(fast), Some(d)) = (median_of(ms, w, "nodeproxy-fastpath", rps), direct) {
            let r = fast / d;
            rows.push([
                format!("fast path vs direct, {label}"),
                "≥ 0.97".into(),
                format!("{r:.2} ({fast:.0} vs {d:.0})"),
                yes_no(r >= 0.97),
            ]);
        }
        if let (Some(c), Some(e)) = (
            median_of(ms, w, "nodeproxy-captured", rps),
            median_of(ms, w, "nodeproxy-explicit", rps),
        ) {
            let r = c / e;
            rows.push([
                format!("capture vs `--capture none`, {label}"),
                "within 3%".into(),
                format!("{r:.2} ({c:.0} vs {e:.0})"),
                yes_no((r - 1.0).abs() <= 0.03),
            ]);
        }
    }
    let scale = |n: u32| format!("nodeproxy-{n}");
    let compile = |r: &Row| r.extra.get("load+analyze+compile ms").copied();
    if let Some(ms10k) = median_of(ms, "route-scale", &scale(10_000), compile) {
        rows.push([
            "10k services load + analyze + compile".into(),
            "< 1 s".into(),
            format!("{:.2} s", ms10k / 1000.0),
            yes_no(ms10k < 1000.0),
        ]);
    }
    // The goal is that size costs nothing: 10k services better than 10 by more than 5% is
    // run-to-run noise (more routes cannot make a request cheaper), said as such, not a miss.
    for (what, f, higher_is_better) in [
        ("req/s", &rps as &dyn Fn(&Row) -> Option<Stat>, true),
        ("p99", &p99, false),
    ] {
        if let (Some(a), Some(b)) = (
            median_of(ms, "route-scale", &scale(10), f),
            median_of(ms, "route-scale", &scale(10_000), f),
        ) {
            let change = b / a - 1.0;
            let worse = if higher_is_better { -change } else { change };
            rows.push([
                format!("route scale {what}, 10 → 10k services"),
                "flat within 5%".into(),
                format!("{a:.2} → {b:.2} ({:+.1}%)", change * 100.0),
                if worse < -0.05 {
                    "yes (better at 10k: noise between repetitions)".into()
                } else {
                    yes_no(worse <= 0.05)
                },
            ]);
        }
    }
    let idle = |r: &Row| r.extra.get("KiB per idle connection").copied();
    if let Some(k) = median_of(ms, "idle-memory", "nodeproxy", idle) {
        rows.push([
            "RSS per idle proxied connection".into(),
            "≤ 16 KiB".into(),
            format!("{k:.1} KiB"),
            yes_no(k <= 16.0),
        ]);
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "## Against the targets\n\n| target | goal | measured (medians) | met |\n|---|---|---|---|\n",
    );
    for [a, b, c, d] in rows {
        let _ = writeln!(out, "| {a} | {b} | {c} | {d} |");
    }
    out.push('\n');
    out
}

/// One PNG bar chart of median req/s (or MB/s) per target for a workload.
pub fn bar_chart(ms: &[Measurement], workload: &str, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let rows = summarize(ms, workload);
    if rows.is_empty() {
        return Ok(());
    }
    let bytes = rows.iter().any(|r| r.bytes.is_some());
    let vals: Vec<(String, f64)> = rows
        .iter()
        .map(|r| {
            (
                r.target.clone(),
                if bytes {
                    r.bytes.map(|b| b.median / 1e6).unwrap_or(0.0)
                } else {
                    r.rps.median
                },
            )
        })
        .collect();
    let max = vals.iter().map(|v| v.1).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{workload}: {} (median)",
                if bytes { "MB/s" } else { "req/s" }
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..vals.len(), 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(vals.len())
        .x_label_formatter(&|i| vals.get(*i).map(|v| v.0.clone()).unwrap_or_default())
        .draw()?;
    for (i, (name, v)) in vals.iter().enumerate() {
        let color = if name.starts_with("nodeproxy") {
            BLUE.mix(0.8)
        } else if name.starts_with("direct") {
            BLACK.mix(0.5)
        } else {
            RED.mix(0.6)
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(i, 0.0), (i + 1, *v)],
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{v:.0}"),
            (i, *v),
            ("sans-serif", 15),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// Register a TrueType font for the charts (plotters' ab_glyph backend needs one).
pub fn register_font() -> anyhow::Result<()> {
    for p in [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ] {
        if let Ok(bytes) = std::fs::read(p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
                .map_err(|_| anyhow::anyhow!("bad font {p}"))?;
            return Ok(());
        }
    }
    anyhow::bail!("no TrueType font found (apt-get install fonts-dejavu-core)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(workload: &str, target: &str, rep: usize, rps: f64) -> Measurement {
        Measurement {
            workload: workload.into(),
            target: target.into(),
            rep,
            rps,
            p50_ms: Some(1.0),
            p99_ms: Some(2.0),
            p999_ms: None,
            cpu_us_per_req: None,
            rss_kib: None,
            bytes_per_s: None,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn route_scale_is_judged_on_degradation() {
        let run = |p99_10: f64, p99_10k: f64, rps_10k: f64| {
            let mut ms = Vec::new();
            for (n, rps, p99) in [(10, 70.0, p99_10), (10_000, rps_10k, p99_10k)] {
                let mut x = m("route-scale", &format!("nodeproxy-{n}"), 0, rps);
                x.p99_ms = Some(p99);
                ms.push(x);
            }
            targets(&ms)
        };
        let t = run(1.26, 1.16, 70.0);
        assert!(
            t.contains(
                "| route scale p99, 10 → 10k services | flat within 5% | 1.26 → 1.16 (-7.9%) | yes (better at 10k: noise between repetitions) |"
            ),
            "{t}"
        );
        let t = run(1.16, 1.26, 66.0);
        assert!(t.contains("| 1.16 → 1.26 (+8.6%) | no |"), "{t}");
        assert!(t.contains("| 70.00 → 66.00 (-5.7%) | no |"), "{t}");
        let t = run(1.20, 1.25, 74.0);
        assert!(t.contains("| 1.20 → 1.25 (+4.2%) | yes |"), "{t}");
        assert!(
            t.contains(
                "| 70.00 → 74.00 (+5.7%) | yes (better at 10k: noise between repetitions) |"
            ),
            "{t}"
        );
    }

    #[test]
    fn a_p99_miss_inside_the_spread_of_repetitions_says_so() {
        // Three repetitions each: medians 2.78 vs 2.71, ranges 2.69–2.87 and 2.69–2.77 overlap.
        let run = |np: [f64; 3], peer: [f64; 3]| {
            let mut ms = Vec::new();
            for rep in 0..3 {
                for (target, p99) in [("nodeproxy", np[rep]), ("haproxy", peer[rep])] {
                    let mut x = m("latency-10k", target, rep, 10_000.0);
                    x.p99_ms = Some(p99);
                    ms.push(x);
                }
            }
            targets(&ms)
        };
        let t = run([2.78, 2.69, 2.87], [2.71, 2.69, 2.77]);
        assert!(
            t.contains(
                "| p99 at 10k req/s | ≤ best peer | 2.78 vs 2.71 ms (haproxy) | no, within the spread (2.69–2.87 vs 2.69–2.77) |"
            ),
            "{t}"
        );
        // Every nodeproxy repetition above every peer repetition: a plain miss.
        let t = run([2.95, 2.90, 3.00], [2.71, 2.69, 2.77]);
        assert!(t.contains("| 2.95 vs 2.71 ms (haproxy) | no |"), "{t}");
        // At or below the peer's median: met.
        let t = run([2.70, 2.60, 2.90], [2.71, 2.69, 2.77]);
        assert!(t.contains("| 2.70 vs 2.71 ms (haproxy) | yes |"), "{t}");
    }

    #[test]
    fn targets_are_checked_against_the_medians() {
        let mut ms = Vec::new();
        for (target, rps, cpu, p99) in [
            ("nodeproxy", 66.0, 14.5, 1.41),
            ("nodeproxy-floating", 68.0, 14.3, 4.40),
            ("haproxy", 67.0, 14.7, 1.39),
            ("nginx", 69.0, 13.3, 1.29),
        ] {
            let mut x = m("h1-keepalive", target, 0, rps);
            x.cpu_us_per_req = Some(cpu);
            x.p99_ms = Some(p99);
            ms.push(x);
        }
        for (target, rps, cpu) in [
            ("direct-netns", 100.0, None),
            ("nodeproxy-explicit", 60.0, Some(14.0)),
            ("nodeproxy-captured", 61.0, Some(14.2)),
            ("nodeproxy-fastpath", 96.0, Some(0.0)),
            ("nodeproxy-captured-sockmap", 80.0, Some(10.5)),
            ("haproxy-netns", 64.0, Some(13.5)),
            ("nginx-netns", 62.0, Some(13.0)),
        ] {
            let mut x = m("netns h1-keepalive", target, 0, rps);
            x.cpu_us_per_req = cpu;
            ms.push(x);
        }
        for (n, rps, compile) in [(10, 68.5, 18.0), (10_000, 68.4, 726.0)] {
            let mut x = m("route-scale", &format!("nodeproxy-{n}"), 0, rps);
            x.extra.insert("load+analyze+compile ms".into(), compile);
            ms.push(x);
        }
        let mut idle = m("idle-memory", "nodeproxy", 0, 0.0);
        idle.extra.insert("KiB per idle connection".into(), 4.29);
        ms.push(idle);
        let t = targets(&ms);
        for line in [
            "| HTTP/1.1 keep-alive req/s | ≥ 1.10 × best peer | 0.96 × nginx (66 vs 69) | no |",
            "| HTTP/1.1 keep-alive proxy CPU / request | ≤ 0.8 × best peer | 1.09 × nginx (14.5 vs 13.3 µs) | no |",
            "| HTTP/1.1 keep-alive p99 | ≤ best peer | 1.41 vs 1.29 ms (nginx) | no |",
            "| fast path vs direct, keep-alive | ≥ 0.97 | 0.96 (96 vs 100) | no |",
            "| capture vs `--capture none`, keep-alive | within 3% | 1.02 (61 vs 60) | yes |",
            "| netns keep-alive req/s, captured | ≥ 1.10 × best peer | 0.95 × haproxy-netns (61 vs 64) | no |",
            "| netns keep-alive req/s, captured + `--sockmap` | ≥ 1.10 × best peer | 1.25 × haproxy-netns (80 vs 64) | yes |",
            "| netns keep-alive proxy CPU / request, captured + `--sockmap` | ≤ 0.8 × best peer | 0.81 × nginx-netns (10.5 vs 13.0 µs) | no |",
            "| 10k services load + analyze + compile | < 1 s | 0.73 s | yes |",
            "| route scale req/s, 10 → 10k services | flat within 5% | 68.50 → 68.40 (-0.1%) | yes |",
            "| route scale p99, 10 → 10k services | flat within 5% | 2.00 → 2.00 (+0.0%) | yes |",
            "| RSS per idle proxied connection | ≤ 16 KiB | 4.3 KiB | yes |",
        ] {
            assert!(t.contains(line), "missing {line:?} in\n{t}");
        }
        // No data, no row: nothing was run for h2c, new connections or the 10k rate.
        assert!(
            !t.contains("h2c") && !t.contains("new connection per") && !t.contains("10k req/s")
        );
        assert!(targets(&[]).is_empty());
        // With h2c data (p99 from h2load's per-request log) the h2c rows appear.
        let mut h2 = Vec::new();
        for (target, rps, p99) in [
            ("nodeproxy", 71.0, 9.5),
            ("haproxy", 81.0, 8.0),
            ("nginx", 60.0, 12.0),
        ] {
            let mut x = m("h2c", target, 0, rps);
            x.p99_ms = Some(p99);
            h2.push(x);
        }
        let t = targets(&h2);
        for line in [
            "| h2c req/s | ≥ 1.10 × best peer | 0.88 × haproxy (71 vs 81) | no |",
            "| h2c p99 | ≤ best peer | 9.50 vs 8.00 ms (haproxy) | no |",
        ] {
            assert!(t.contains(line), "missing {line:?} in\n{t}");
        }
    }

    #[test]
    fn median_and_spread() {
        assert_eq!(
            stat(&[3.0, 1.0, 2.0]),
            Some(Stat {
                median: 2.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(stat(&[4.0, 1.0]).unwrap().median, 2.5);
        assert_eq!(stat(&[]), None);
    }

    #[test]
    fn ratios_against_direct_and_best_peer() {
        let ms = vec![
            m("w", "direct", 0, 100.0),
            m("w", "nodeproxy", 0, 60.0),
            m("w", "nodeproxy", 1, 54.0),
            m("w", "nodeproxy", 2, 58.0),
            m("w", "haproxy", 0, 50.0),
            m("w", "nginx", 0, 40.0),
        ];
        let rows = summarize(&ms, "w");
        assert_eq!(rows.len(), 4);
        let np = rows.iter().find(|r| r.target == "nodeproxy").unwrap();
        assert_eq!(
            np.rps,
            Stat {
                median: 58.0,
                min: 54.0,
                max: 60.0
            }
        );
        let (d, p) = ratios(&rows, np);
        assert!((d.unwrap() - 0.58).abs() < 1e-9);
        assert!((p.unwrap() - 1.16).abs() < 1e-9);
        let md = markdown(&ms, "# t", &["w".into()]);
        assert!(md.contains("| nodeproxy | 58 (54–60) |"), "{md}");
        assert!(md.contains("| 0.58 | 1.16 |"), "{md}");
    }
}
