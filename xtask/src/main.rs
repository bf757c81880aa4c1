//! `cargo xtask`: project tasks that are more than one cargo command.

use std::process::{Command, ExitCode};

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
    /// Run the test suites as CI does: unit tests and the integration suite.
    Test,
    /// Validate the example configuration and print its route table: the quick look at what
    /// nodeproxy does with the tutorials' YAML (the netns demo comes with the eBPF data path).
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
        Task::Test => exec(cargo().args(["test", "--workspace", "--all-targets"])),
        Task::Demo => demo(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> anyhow::Result<()> {
    exec(cargo().args(["build", "--quiet", "--package", "nodeproxy"]))?;
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nodeproxy");
    println!("== nodeproxy validate config/  (every tutorial scenario, analyzed)");
    exec(Command::new(&bin).args(["validate", "config/"]))?;
    println!("\n== nodeproxy routes config/canary.yaml  (the compiled 80/20 canary)");
    exec(Command::new(&bin).args(["routes", "config/canary.yaml"]))?;
    println!("\n== nodeproxy simulate config/header-routing.yaml -H 'end-user: jason'");
    exec(Command::new(&bin).args([
        "simulate",
        "config/header-routing.yaml",
        "--host",
        "reviews.headers.svc.cluster.local",
        "-H",
        "end-user: jason",
    ]))?;
    println!(
        "\n== nodeproxy validate tests/fixtures/war-story.yaml  (the missing-DestinationRule outage, caught)"
    );
    let status = Command::new(&bin)
        .args(["validate", "tests/fixtures/war-story.yaml"])
        .status()?;
    if status.success() {
        bail!("the war-story file should fail validation");
    }
    println!(
        "(exit status {}: rejected, as it should be)",
        status.code().unwrap_or(-1)
    );
    Ok(())
}
