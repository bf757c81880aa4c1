//! `cargo xtask`: project tasks that are more than one cargo command.
//!
//! This binary is light on purpose: it checks (and installs) what the machine needs before
//! anything that needs it is compiled. The tasks that drive a built node (demo, bench) live in
//! the `xtask-node` package, which this one runs once the machine is ready.

use std::ffi::OsString;
use std::process::{Command, ExitCode, Stdio};

use clap::{Parser, Subcommand};
use xtask::setup::{self, For, Host};
use xtask::{cargo, exec, repo_root};

mod build_ebpf;
mod fuzz;

#[derive(Parser)]
#[command(name = "xtask", about = "nodeproxy project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Everything CI runs: set-up, `cargo fmt --check`, clippy (warnings are errors), the test
    /// suites (unit, integration, end-to-end as root), the Kubernetes manifests and image
    /// build steps (tests/kind/validate.sh).
    Test,
    /// Build the eBPF objects into target/bpf/ and list their programs and maps.
    BuildEbpf,
    /// Benchmark nodeproxy side by side with HAProxy, nginx and direct (not part of CI).
    /// `cargo xtask bench --help` lists its options.
    #[command(disable_help_flag = true)]
    Bench {
        /// Options of the bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// nodeproxy on one machine: the tutorials' 80/20 canary with live traffic, a routing
    /// simulation, and the missing-DestinationRule outage caught by validation.
    Demo,
    /// Run the fuzz targets (fuzz/, cargo-fuzz on nightly) for a bounded time each; new inputs
    /// go to target/fuzz-corpus/, crashes to fuzz/artifacts/. CI runs each for 20 s (--dev).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only this target (request_head, response_head, chunked, config).
        #[arg(long)]
        target: Option<String>,
        /// Unoptimised build: compiles much faster, runs slower (what CI uses).
        #[arg(long)]
        dev: bool,
    },
    /// Check what a task needs from this machine and install what is missing (root), or print
    /// the command to run. Every other task runs this first.
    Setup {
        /// The task to set up for.
        #[arg(value_enum, default_value = "test")]
        task: For,
    },
}

/// Run `xtask-node` (demo, bench) with these arguments.
fn node(args: &[OsString]) -> anyhow::Result<()> {
    exec(
        cargo()
            .args(["run", "--quiet", "--package", "xtask-node", "--"])
            .args(args)
            .current_dir(repo_root()),
    )
}

/// `cargo xtask test`: what CI runs, in order, stopping at the first failure.
fn test() -> anyhow::Result<()> {
    let root = repo_root();
    exec(
        cargo()
            .args(["fmt", "--all", "--", "--check"])
            .current_dir(&root),
    )?;
    exec(
        cargo()
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(&root),
    )?;
    // The bench's command line parses (the bench itself is not part of CI).
    exec(
        cargo()
            .args([
                "run",
                "--quiet",
                "--package",
                "xtask-node",
                "--",
                "bench",
                "--help",
            ])
            .current_dir(&root)
            .stdout(Stdio::null()),
    )?;
    exec(
        cargo()
            .args(["test", "--workspace", "--all-targets"])
            .current_dir(&root),
    )?;
    fuzz::run(fuzz::CI_SECONDS, None, true)?;
    exec(xtask::clean_env(
        Command::new("bash").arg(root.join("tests/kind/validate.sh")),
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let host = Host::current();
    let result = match cli.command {
        Task::Setup { task } => setup::ensure(task, &host),
        Task::Test => setup::ensure(For::Test, &host).and_then(|()| test()),
        Task::Demo => setup::ensure(For::Demo, &host).and_then(|()| node(&["demo".into()])),
        Task::Fuzz { time, target, dev } => {
            setup::ensure(For::Fuzz, &host).and_then(|()| fuzz::run(time, target.as_deref(), dev))
        }
        Task::BuildEbpf => setup::ensure(For::BuildEbpf, &host).and_then(|()| build_ebpf::run()),
        Task::Bench { args } => {
            let help = args.iter().any(|a| a == "--help" || a == "-h");
            // `bench --help` only needs the build.
            let task = if help { For::Build } else { For::Bench };
            setup::ensure(task, &host).and_then(|()| {
                let mut all = vec![OsString::from("bench")];
                all.extend(args);
                node(&all)
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
