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

/// The cargo that runs this task.
pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}
