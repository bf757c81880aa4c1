//! `restart`: how long the node proxy (release build, `--capture ebpf`, 1,000 services) takes
//! from exec to serving, three ways: a fresh start (nothing pinned), a restart after kill -9
//! (adopting the pinned maps and links), and a takeover from a running instance (to the
//! moment the old one hands over). Also how long the old instance then takes to exit.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::report::Measurement;
use super::{Ctx, nodeproxy_bin};

const ADMIN: &str = "127.0.0.1:15190";
const CAPTURE: &str = "127.0.0.1:15191";
const SERVICES: usize = 1000;

fn config(path: &Path) -> anyhow::Result<()> {
    let mut yaml = String::with_capacity(SERVICES * 600);
    for i in 0..SERVICES {
        let (a, b) = (i / 250, i % 250 + 1);
        // One in four plain TCP (kernel fast path), the rest HTTP with a route each.
        let (proto, name) = if i % 4 == 0 {
            ("TCP", "tcp")
        } else {
            ("HTTP", "http")
        };
        yaml.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{i}}}\nspec:\n  hosts: [s{i}.restart.local]\n  addresses: [10.97.{a}.{b}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: {name}, protocol: {proto}}}]\n  endpoints: [{{address: 10.98.{a}.{b}}}, {{address: 10.99.{a}.{b}}}]\n---\n"
        ));
        if proto == "HTTP" {
            yaml.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: s{i}}}\nspec:\n  hosts: [s{i}.restart.local]\n  http:\n  - match: [{{uri: {{prefix: /v2/}}}}]\n    route: [{{destination: {{host: s{i}.restart.local}}}}]\n    timeout: 2s\n  - route: [{{destination: {{host: s{i}.restart.local}}}}]\n---\n"
            ));
        }
    }
    std::fs::write(path, yaml).context("write the restart config")
}

fn spawn(ctx: &Ctx, cfg: &Path, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(nodeproxy_bin(&ctx.root))
        .args(["run", "--capture", "ebpf", "--capture-listen", CAPTURE])
        .args([
            "--admin",
            ADMIN,
            "--access-log",
            "off",
            "--drain-time",
            "1s",
        ])
        .arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start nodeproxy")
}

fn ready() -> bool {
    nodeproxy_tests::http_get(ADMIN, "/ready").is_some_and(|(s, _)| s == 200)
}

/// Poll `f` every millisecond for up to 30 s; the time it first held.
fn until(what: &str, t0: Instant, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    while t0.elapsed() < Duration::from_secs(30) {
        if f() {
            return Ok(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("{what}: not within 30 s")
}

fn uninstall(ctx: &Ctx) {
    let _ = Command::new(nodeproxy_bin(&ctx.root))
        .arg("uninstall")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn stop(mut c: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = c.wait();
}

/// The workload.
pub fn restart(ctx: &mut Ctx) -> anyhow::Result<()> {
    println!("== restart ({SERVICES} services, --capture ebpf)");
    let dir = ctx.out.join("restart");
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("services.yaml");
    config(&cfg)?;
    let reps = ctx.reps.max(5);
    for rep in 0..reps {
        uninstall(ctx);
        let t0 = Instant::now();
        let mut first = spawn(ctx, &cfg, &dir.join("fresh.log"))?;
        let fresh = until("fresh start ready", t0, ready)?;
        // kill -9, then a restart that adopts what is pinned.
        first.kill()?;
        first.wait()?;
        let t0 = Instant::now();
        let old = spawn(ctx, &cfg, &dir.join("old.log"))?;
        let adopt = until("restart after kill -9 ready", t0, ready)?;
        // A takeover of that one: until it says it handed over, then until it exits.
        let t0 = Instant::now();
        let new = spawn(ctx, &cfg, &dir.join("new.log"))?;
        let old_log = dir.join("old.log");
        let took = until("takeover", t0, || {
            std::fs::read_to_string(&old_log).is_ok_and(|l| l.contains("handed over to pid"))
        })?;
        let mut old = old;
        let exited = until("old instance exits", t0, || {
            matches!(old.try_wait(), Ok(Some(_)))
        })?;
        stop(new);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "  rep {rep}: fresh start {:.0} ms, restart after kill -9 {:.0} ms, takeover {:.0} ms (old exited at {:.0} ms)",
            ms(fresh),
            ms(adopt),
            ms(took),
            ms(exited)
        );
        for (target, d) in [
            ("fresh start", fresh),
            ("restart after kill -9", adopt),
            ("takeover", took),
        ] {
            let mut extra = std::collections::BTreeMap::new();
            extra.insert("exec to ready ms".into(), ms(d));
            if target == "takeover" {
                extra.insert("old instance exit ms".into(), ms(exited));
            }
            ctx.results.push(Measurement {
                workload: "restart".into(),
                target: target.into(),
                rep,
                rps: 0.0,
                p50_ms: None,
                p99_ms: None,
                p999_ms: None,
                cpu_us_per_req: None,
                rss_kib: None,
                bytes_per_s: None,
                extra,
            });
        }
    }
    uninstall(ctx);
    Ok(())
}
