//! `cargo xtask build-ebpf`: build the eBPF objects (through `proxy-userspace/build.rs`), copy
//! them to `target/bpf/`, and list their programs and maps.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use xtask::cargo;

/// Run the task.
pub fn run() -> anyhow::Result<()> {
    let out = cargo()
        .args([
            "build",
            "--package",
            "nodeproxy",
            "--message-format",
            "json",
        ])
        .output()
        .context("run cargo build")?;
    if !out.status.success() {
        bail!(
            "cargo build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The build script's OUT_DIR, from cargo's JSON messages.
    let out_dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "build-script-executed"
                && m["package_id"]
                    .as_str()
                    .is_some_and(|p| p.contains("proxy-userspace") || p.contains("nodeproxy@"))
        })
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
        .context("no build-script output for nodeproxy in cargo's messages")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dest = root.join("target/bpf");
    std::fs::create_dir_all(&dest)?;
    for name in ["connect", "sockops", "getsockopt", "sk_msg", "xdp_guard"] {
        let src = out_dir.join(format!("{name}.bpf.o"));
        let dst = dest.join(format!("{name}.bpf.o"));
        std::fs::copy(&src, &dst).with_context(|| format!("copy {}", src.display()))?;
        println!(
            "{} ({} bytes)",
            dst.display(),
            std::fs::metadata(&dst)?.len()
        );
        let objdump = ["llvm-objdump-19", "llvm-objdump"]
            .into_iter()
            .find(|t| Command::new(t).arg("--version").output().is_ok());
        let Some(objdump) = objdump else {
            println!("  (install llvm-19 to list sections and maps)");
            continue;
        };
        let syms = Command::new(objdump).arg("-t").arg(&dst).output()?;
        let text = String::from_utf8_lossy(&syms.stdout);
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let (section, symbol) = (f[f.len() - 3], f[f.len() - 1]);
            if section == ".maps" {
                println!("  map      {symbol}");
            } else if f.contains(&"F") && !section.starts_with(".text") {
                println!("  program  {symbol:<16} section {section}");
            }
        }
    }
    Ok(())
}
