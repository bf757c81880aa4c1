//! Processes under test: start, stop by PID, and read their CPU time and RSS from /proc.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A started process (and its children), stopped by PID on drop.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Start `cmd`, wait until `ready` accepts TCP connections.
    pub fn start(name: &str, cmd: &mut Command, ready: &str) -> anyhow::Result<Proc> {
        // Readiness is "something accepts on `ready`": a leftover process there would be
        // measured in this one's place (its own bind failing unseen).
        if std::net::TcpStream::connect(ready).is_ok() {
            bail!(
                "start {name}: {ready} already accepts connections (a leftover bench or by-hand process?); stop it first"
            );
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {name}: {cmd:?}"))?;
        let mut p = Proc { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(ready).is_err() {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!("{name} exited ({status}) before listening on {ready}");
            }
            if Instant::now() > deadline {
                bail!("{name} did not start listening on {ready}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // nginx binds what it can and exits on the first failure; still running means all bound.
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(Some(status)) = p.child.try_wait() {
            bail!("{name} exited ({status}) right after it started listening on {ready}");
        }
        Ok(p)
    }

    /// PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) of the process and its children processes.
    pub fn cpu_seconds(&self) -> f64 {
        tree(self.pid()).iter().map(|p| cpu_of(*p)).sum()
    }

    /// RSS KiB of the process tree.
    pub fn rss_kib(&self) -> u64 {
        tree(self.pid()).iter().map(|p| rss_of(*p)).sum()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let kids = tree(self.pid());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for k in kids.into_iter().skip(1) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(k as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `pid` and its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    while i < out.len() {
        let parent = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    out
}

fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// utime + stime of one process, seconds.
pub fn cpu_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, after)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the comm: state(0) ppid(1) ... utime(11) stime(12).
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / clk_tck()
}

/// VmRSS of one process, KiB.
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Write a file, creating parents.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// A process started in a namespace; killed with its tree on drop.
pub struct NsProc(pub std::process::Child);

impl Drop for NsProc {
    fn drop(&mut self) {
        for p in tree(self.0.id()).into_iter().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.0.wait();
    }
}
