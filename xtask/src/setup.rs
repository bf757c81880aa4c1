//! What each task needs from the machine, checked before anything is compiled, and installed
//! through the system package manager when it is missing: the one list of the project's system
//! requirements (`.ci/run` calls `cargo xtask setup test` rather than keeping its own copy).
//!
//! A requirement is satisfied by what the build actually uses: a command on `PATH` or a file
//! (headers). Missing ones are installed with `apt-get` as root, with one line saying what and
//! why; without root the task stops at once and prints the command to run. PyPI tools
//! (`kubernetes-validate`) are installed with `python3 -m pip`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The task a requirement is for (`cargo xtask setup <TASK>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum For {
    /// Compiling nodeproxy (its build script compiles the eBPF programs).
    Build,
    /// `cargo xtask build-ebpf`: the build, plus llvm-objdump to list programs and maps.
    BuildEbpf,
    /// `cargo xtask demo`: the build, plus the netns node's tools.
    Demo,
    /// `cargo xtask test` (and CI): everything the suites run.
    Test,
    /// `cargo xtask bench`: the test tools plus the peers and load generators.
    Bench,
    /// `cargo xtask fuzz`: cargo-fuzz, the nightly toolchain, a C++ compiler (libFuzzer).
    Fuzz,
}

/// How a requirement is looked for.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// Any of these commands on `PATH`.
    Command(&'static [&'static str]),
    /// This file, below the system root.
    File(&'static str),
    /// A rustup toolchain that runs (`rustup run NAME rustc --version`).
    Toolchain(&'static str),
}

/// Where a missing requirement comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A Debian package.
    Apt(&'static str),
    /// A PyPI requirement.
    Pip(&'static str),
    /// A crate with a binary, `cargo install --locked` (no root needed: ~/.cargo/bin).
    Cargo(&'static str),
    /// Nothing this machine's registries have: the message says where to get it.
    Manual(&'static str),
}

struct Need {
    probe: Probe,
    source: Source,
    why: &'static str,
    tasks: &'static [For],
}

use For::*;

const BUILDS: &[For] = &[Build, BuildEbpf, Demo, Test, Bench];
const NODE: &[For] = &[Demo, Test, Bench];
const FUZZ: &[For] = &[Test, Fuzz];

/// Every system requirement of the project.
const NEEDS: &[Need] = &[
    Need {
        // proxy-userspace/build.rs takes $CLANG, clang, or clang-21 .. clang-14.
        probe: Probe::Command(&[
            "clang-19", "clang-21", "clang-20", "clang-18", "clang-17", "clang-16", "clang-15",
            "clang-14", "clang",
        ]),
        source: Source::Apt("clang-19"),
        why: "compiles the eBPF programs",
        tasks: BUILDS,
    },
    Need {
        probe: Probe::File("usr/include/bpf/bpf_helpers.h"),
        source: Source::Apt("libbpf-dev"),
        why: "the eBPF programs' helper headers",
        tasks: BUILDS,
    },
    Need {
        probe: Probe::Command(&["cc"]),
        source: Source::Apt("gcc"),
        why: "ring and mimalloc compile C",
        tasks: BUILDS,
    },
    Need {
        probe: Probe::Command(&["llvm-objdump-19", "llvm-objdump"]),
        source: Source::Apt("llvm-19"),
        why: "lists the eBPF objects' programs and maps",
        tasks: &[BuildEbpf],
    },
    Need {
        probe: Probe::Command(&["ip"]),
        source: Source::Apt("iproute2"),
        why: "network namespaces, veth and bridges of the test node; ss",
        tasks: NODE,
    },
    Need {
        probe: Probe::Command(&["nsenter"]),
        source: Source::Apt("util-linux"),
        why: "runs pod processes inside their network namespace",
        tasks: NODE,
    },
    Need {
        probe: Probe::Command(&["bpftool"]),
        source: Source::Apt("bpftool"),
        why: "the end-to-end tests inspect attached programs and maps",
        tasks: &[Test, Bench],
    },
    Need {
        probe: Probe::Command(&["curl"]),
        source: Source::Apt("curl"),
        why: "a real HTTP client inside test pods",
        tasks: &[Test, Bench],
    },
    Need {
        probe: Probe::Command(&["kubectl"]),
        source: Source::Manual(
            "kubectl is not in Debian's archive: install it from https://kubernetes.io/docs/tasks/tools/ (it renders deploy/ with kustomize)",
        ),
        why: "renders the Kubernetes manifests",
        tasks: &[Test],
    },
    Need {
        probe: Probe::Command(&["kubernetes-validate"]),
        source: Source::Pip("kubernetes-validate==1.37.0"),
        why: "validates the Kubernetes manifests against Kubernetes' schemas",
        tasks: &[Test],
    },
    Need {
        probe: Probe::Toolchain("nightly"),
        source: Source::Manual(
            "the nightly toolchain is missing: `rustup toolchain install nightly` (cargo-fuzz needs it for the sanitizers)",
        ),
        why: "builds the fuzz targets",
        tasks: FUZZ,
    },
    Need {
        probe: Probe::Command(&["c++", "g++"]),
        source: Source::Apt("g++"),
        why: "libFuzzer is C++",
        tasks: FUZZ,
    },
    Need {
        probe: Probe::Command(&["cargo-fuzz"]),
        source: Source::Cargo("cargo-fuzz"),
        why: "runs the fuzz targets",
        tasks: FUZZ,
    },
    Need {
        probe: Probe::Command(&["haproxy"]),
        source: Source::Apt("haproxy"),
        why: "a peer proxy",
        tasks: &[Bench],
    },
    Need {
        probe: Probe::Command(&["nginx"]),
        source: Source::Apt("nginx-light"),
        why: "the backend and a peer proxy",
        tasks: &[Bench],
    },
    Need {
        probe: Probe::File("usr/lib/nginx/modules/ngx_stream_module.so"),
        source: Source::Apt("libnginx-mod-stream"),
        why: "nginx as a TCP peer",
        tasks: &[Bench],
    },
    Need {
        probe: Probe::Command(&["wrk"]),
        source: Source::Apt("wrk"),
        why: "HTTP/1.1 load",
        tasks: &[Bench],
    },
    Need {
        probe: Probe::Command(&["h2load"]),
        source: Source::Apt("nghttp2-client"),
        why: "HTTP/2 load",
        tasks: &[Bench],
    },
    Need {
        probe: Probe::File("usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        source: Source::Apt("fonts-dejavu-core"),
        why: "the report's charts",
        tasks: &[Bench],
    },
];

/// The machine as setup sees it: where commands are looked for, the root of the file probes,
/// and whether it may install.
#[derive(Debug, Clone)]
pub struct Host {
    /// Directories searched for commands (as `PATH`); installers are run with this `PATH`.
    pub path: OsString,
    /// Prefix of the file probes (`/`).
    pub sysroot: PathBuf,
    /// Running as root (may install).
    pub root: bool,
}

impl Host {
    /// This process's machine.
    pub fn current() -> Self {
        Self {
            path: std::env::var_os("PATH").unwrap_or_default(),
            sysroot: PathBuf::from("/"),
            root: Command::new("id")
                .arg("-u")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
        }
    }

    fn find(&self, name: &str) -> Option<PathBuf> {
        std::env::split_paths(&self.path)
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
    }

    fn has(&self, probe: Probe) -> bool {
        match probe {
            Probe::Command(names) => names.iter().any(|n| self.find(n).is_some()),
            Probe::File(rel) => self.sysroot.join(rel).exists(),
            Probe::Toolchain(name) => self
                .command("rustup")
                .args(["run", name, "rustc", "--version"])
                .output()
                .is_ok_and(|o| o.status.success()),
        }
    }

    fn command(&self, name: &str) -> Command {
        let mut c = Command::new(self.find(name).unwrap_or_else(|| PathBuf::from(name)));
        c.env("PATH", &self.path);
        c
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What is missing for `task`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Debian packages, with why.
    pub apt: Vec<(&'static str, &'static str)>,
    /// PyPI requirements, with why.
    pub pip: Vec<(&'static str, &'static str)>,
    /// Crates to `cargo install`, with why.
    pub cargo: Vec<(&'static str, &'static str)>,
    /// What no registry here has: how to get it.
    pub manual: Vec<&'static str>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.apt.is_empty()
            && self.pip.is_empty()
            && self.cargo.is_empty()
            && self.manual.is_empty()
    }

    fn apt_names(&self) -> Vec<&'static str> {
        let set: BTreeSet<_> = self.apt.iter().map(|(p, _)| *p).collect();
        set.into_iter().collect()
    }

    fn pip_names(&self) -> Vec<&'static str> {
        self.pip.iter().map(|(p, _)| *p).collect()
    }

    fn apt_command(&self) -> String {
        format!("apt-get install -y {}", self.apt_names().join(" "))
    }

    fn pip_command(&self) -> String {
        format!("python3 -m pip install {}", self.pip_names().join(" "))
    }

    /// One line: what, and why.
    fn describe(&self) -> String {
        describe(self.apt.iter().chain(&self.pip).chain(&self.cargo))
    }
}

fn describe<'a>(needs: impl IntoIterator<Item = &'a (&'static str, &'static str)>) -> String {
    needs
        .into_iter()
        .map(|(p, why)| format!("{p} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `task` lacks on `host`.
pub fn plan(task: For, host: &Host) -> Plan {
    let mut plan = Plan::default();
    for need in NEEDS.iter().filter(|n| n.tasks.contains(&task)) {
        if host.has(need.probe) {
            continue;
        }
        match need.source {
            Source::Apt(p) => plan.apt.push((p, need.why)),
            Source::Pip(p) => plan.pip.push((p, need.why)),
            Source::Cargo(c) => plan.cargo.push((c, need.why)),
            Source::Manual(m) => plan.manual.push(m),
        }
    }
    plan
}

/// Make sure `task` can run on `host`: install what is missing (as root), or fail at once with
/// the commands to run. Quiet when nothing is missing.
pub fn ensure(task: For, host: &Host) -> anyhow::Result<()> {
    let plan = plan(task, host);
    if plan.is_empty() {
        return Ok(());
    }
    if !plan.manual.is_empty() {
        bail!(
            "cannot set up this machine:\n  {}",
            plan.manual.join("\n  ")
        );
    }
    // Crates install into ~/.cargo/bin: no root needed.
    if !plan.cargo.is_empty() {
        println!("xtask: installing with cargo: {}", describe(&plan.cargo));
        for (c, _) in &plan.cargo {
            run(host.command("cargo").args(["install", "--locked", c]))?;
        }
    }
    if plan.apt.is_empty() && plan.pip.is_empty() {
        return recheck(task, host);
    }
    if !host.root {
        let mut cmds = Vec::new();
        if !plan.apt.is_empty() {
            cmds.push(format!(
                "sudo apt-get update && sudo {}",
                plan.apt_command()
            ));
        }
        if !plan.pip.is_empty() {
            cmds.push(plan.pip_command());
        }
        bail!(
            "missing: {}\nnot root, so nothing was installed; run:\n  {}",
            plan.describe(),
            cmds.join("\n  ")
        );
    }
    if !plan.apt.is_empty() {
        if host.find("apt-get").is_none() {
            bail!(
                "missing: {}; no apt-get on PATH: install the equivalent packages of your distribution",
                plan.describe()
            );
        }
        println!("xtask: installing with apt-get: {}", describe(&plan.apt));
        run(host.command("apt-get").args(["update", "-qq"]))?;
        run(host
            .command("apt-get")
            .args(["install", "-y", "-qq"])
            .args(plan.apt_names())
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !plan.pip.is_empty() {
        println!("xtask: installing with pip: {}", describe(&plan.pip));
        run(host
            .command("python3")
            .args(["-m", "pip", "install", "-q", "--root-user-action=ignore"])
            .args(plan.pip_names()))?;
    }
    recheck(task, host)
}

/// After installing: fail if anything is still missing (an exit status is not proof).
fn recheck(task: For, host: &Host) -> anyhow::Result<()> {
    let left = self::plan(task, host);
    if !left.is_empty() {
        bail!("still missing after installing: {}", left.describe());
    }
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("start {line}"))?;
    if !status.success() {
        bail!("{line} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with fake tools: each records its arguments in `calls` and exits 0. One at
    /// a time in this process: a script being written while another test forks can fail to
    /// execute (ETXTBSY, the writer's descriptor inherited by the child until its exec).
    struct Fake {
        dir: PathBuf,
        _one: std::sync::MutexGuard<'static, ()>,
    }

    static ONE_FAKE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    impl Fake {
        fn new(tools: &[&str]) -> Self {
            use std::os::unix::fs::PermissionsExt;
            let one = ONE_FAKE.lock().unwrap_or_else(|e| e.into_inner());
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "xtask-setup-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("bin")).unwrap();
            for t in tools {
                let p = dir.join("bin").join(t);
                // A probe (`rustup run nightly rustc --version`) is not an install: not recorded.
                let record = if *t == "rustup" {
                    String::new()
                } else {
                    format!("echo \"{t} $*\" >> '{}'\n", dir.join("calls").display())
                };
                std::fs::write(&p, format!("#!/bin/sh\n{record}")).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            Self { dir, _one: one }
        }

        fn host(&self, root: bool) -> Host {
            // The fake bin directory, then /bin for the shell the fakes run under (it has no
            // clang: clang lives in /usr/bin on Debian, and /bin is a link to it only on
            // merged-/usr systems, so the sysroot and PATH below are what the probes see).
            Host {
                path: self.dir.join("bin").into_os_string(),
                sysroot: self.dir.join("root"),
                root,
            }
        }

        fn calls(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.join("calls"))
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn installs_what_the_build_lacks_with_the_package_manager() {
        let fake = Fake::new(&["apt-get", "cc"]);
        let err = ensure(For::Build, &fake.host(true)).unwrap_err();
        assert_eq!(
            fake.calls(),
            [
                "apt-get update -qq",
                "apt-get install -y -qq clang-19 libbpf-dev"
            ]
        );
        // The fake installed nothing, and setup checks again rather than trusting the exit code.
        assert!(
            err.to_string()
                .starts_with("still missing after installing: clang-19"),
            "{err}"
        );
    }

    #[test]
    fn the_test_task_installs_the_suites_tools_and_the_pip_validator() {
        let fake = Fake::new(&[
            "apt-get", "python3", "cargo", "rustup", "kubectl", "cc", "clang-14", "ip",
        ]);
        let _ = ensure(For::Test, &fake.host(true));
        assert_eq!(
            fake.calls(),
            [
                "cargo install --locked cargo-fuzz",
                "apt-get update -qq",
                "apt-get install -y -qq bpftool curl g++ libbpf-dev util-linux",
                "python3 -m pip install -q --root-user-action=ignore kubernetes-validate==1.37.0",
            ]
        );
    }

    #[test]
    fn without_root_nothing_runs_and_the_error_is_the_command() {
        let fake = Fake::new(&["apt-get", "cc"]);
        let err = ensure(For::Build, &fake.host(false))
            .unwrap_err()
            .to_string();
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
        assert!(
            err.contains("sudo apt-get update && sudo apt-get install -y clang-19 libbpf-dev"),
            "{err}"
        );
        assert!(
            err.contains("clang-19 (compiles the eBPF programs)"),
            "{err}"
        );
    }

    #[test]
    fn nothing_missing_runs_nothing() {
        let fake = Fake::new(&["apt-get", "cc", "clang-19"]);
        std::fs::create_dir_all(fake.dir.join("root/usr/include/bpf")).unwrap();
        std::fs::write(fake.dir.join("root/usr/include/bpf/bpf_helpers.h"), "").unwrap();
        ensure(For::Build, &fake.host(false)).unwrap();
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn a_tool_no_registry_has_is_named_with_where_to_get_it() {
        let fake = Fake::new(&["apt-get"]);
        let err = ensure(For::Test, &fake.host(true)).unwrap_err().to_string();
        assert!(err.contains("kubectl is not in Debian's archive"), "{err}");
        assert!(fake.calls().is_empty());
    }
}
