//! `cargo xtask fuzz`: each cargo-fuzz target of `fuzz/` for a bounded time, with the seeds of
//! `fuzz/corpus/<target>/` and new inputs kept in `target/fuzz-corpus/<target>/` (so a run
//! does not change the repository). A crash fails the run and names its input.

use std::process::Stdio;

use anyhow::{Context, bail};

use xtask::{clean_env, repo_root};

/// Seconds per target in `cargo xtask test` (and so in CI).
pub const CI_SECONDS: u64 = 20;

/// The targets, as in fuzz/Cargo.toml (and `nodeproxy::fuzz::TARGETS`).
const TARGETS: [&str; 4] = ["request_head", "response_head", "chunked", "config"];

/// Run every target (or `only`) for `seconds` each; `dev`: an unoptimised build (compiles in
/// a fraction of the time, runs slower: CI's smoke run).
pub fn run(seconds: u64, only: Option<&str>, dev: bool) -> anyhow::Result<()> {
    if let Some(t) = only
        && !TARGETS.contains(&t)
    {
        bail!("unknown fuzz target `{t}` (one of {})", TARGETS.join(", "));
    }
    let root = repo_root();
    for target in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        let work = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work)?;
        let seeds = root.join("fuzz/corpus").join(target);
        println!("fuzz: {target} for {seconds} s");
        // rustup's `cargo` (not `$CARGO`, a toolchain's own binary): `+nightly` selects.
        let mut cmd = std::process::Command::new("cargo");
        let out = clean_env(&mut cmd)
            .args(["+nightly", "fuzz", "run"])
            .args(dev.then_some("--dev"))
            .arg(target)
            .arg(&work)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
            ])
            .current_dir(&root)
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .context("run cargo fuzz")?;
        let log = String::from_utf8_lossy(&out.stderr);
        // libFuzzer's last words: `Done N runs in S second(s)` and the final stats.
        for line in log
            .lines()
            .filter(|l| l.starts_with("Done ") || l.starts_with("stat::number_of_executed_units"))
        {
            println!("fuzz: {target}: {line}");
        }
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            bail!(
                "fuzz target {target} failed ({}); inputs that crash are in fuzz/artifacts/{target}/:\n{}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    Ok(())
}
