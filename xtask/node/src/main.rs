//! `xtask-node`: the tasks that drive a built nodeproxy, `demo` and `bench`. Run through
//! `cargo xtask demo` and `cargo xtask bench`, which set the machine up first.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod demo_node;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "nodeproxy tasks that drive a built node"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Benchmark nodeproxy side by side with HAProxy, nginx and direct (not part of CI).
    Bench(bench::Options),
    /// nodeproxy on one machine: the tutorials' 80/20 canary with live traffic, a routing
    /// simulation, and the missing-DestinationRule outage caught by validation.
    Demo,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Task::Demo => demo::run(),
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
