//! What `cargo xtask` and `xtask-node` share: the machine set-up and how they run commands.
//! This crate compiles without clang or anything else the project installs, so `cargo xtask`
//! can check the machine before the build that needs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub mod setup;

/// Run a command; fail with its full command line.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let line = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("start {line}"))?;
    if !status.success() {
        bail!("{line} failed: {status}");
    }
    Ok(())
}

/// The cargo that runs this task, with the environment a user's own `cargo` would have.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    clean_env(&mut c);
    c
}

/// Remove what `cargo run` and `cargo test` set for the program they run
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), so that a nested cargo sees the environment a
/// user's own cargo would. Build scripts that declare `rerun-if-env-changed` on them (ring's
/// does, for `CARGO_MANIFEST_DIR` and `CARGO_PKG_NAME`) would otherwise see other values in
/// each nested cargo, and their crates (ring, rustls, kube, nodeproxy) would be rebuilt back
/// and forth: a second `cargo xtask test` rebuilt them.
pub fn clean_env(c: &mut Command) -> &mut Command {
    const SET_FOR_PROGRAMS: [&str; 7] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if SET_FOR_PROGRAMS.contains(&k.as_ref())
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
        {
            c.env_remove(&key);
        }
    }
    c
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}
