//! `cargo xtask`: project tasks that are more than one cargo command.

use std::process::{Command, ExitCode};

mod bench;
mod build_ebpf;
mod demo;
mod demo_node;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "nodeproxy project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the test suites as CI does: unit, integration, (as root) end-to-end, then the
    /// Kubernetes manifests and image build steps (tests/kind/validate.sh).
    Test,
    /// Build the eBPF objects into target/bpf/ and list their programs and maps.
    BuildEbpf,
    /// Benchmark nodeproxy side by side with HAProxy, nginx and direct (not part of CI).
    Bench(bench::Options),
    /// nodeproxy on one machine: the tutorials' 80/20 canary with live traffic, a routing
    /// simulation, and the missing-DestinationRule outage caught by validation.
    Demo,
}

/// Run a command; fail with its full command line.
fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("start {line}"))?;
    if !status.success() {
        bail!("{line} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Test => exec(cargo().args(["test", "--workspace", "--all-targets"])).and_then(|()| {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            exec(Command::new("bash").arg(root.join("tests/kind/validate.sh")))
        }),
        Task::Demo => demo::run(),
        Task::BuildEbpf => build_ebpf::run(),
        Task::Bench(o) => bench::run(o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
