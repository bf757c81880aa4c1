//! Compile the eBPF programs in `../proxy-ebpf` with clang into `OUT_DIR`, so a plain
//! `cargo build` embeds them. This file alone knows the flags.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// clang candidates: `$CLANG`, then `clang`, then versioned names.
fn find_clang() -> anyhow::Result<String> {
    let mut candidates: Vec<String> = std::env::var("CLANG").into_iter().collect();
    candidates.push("clang".into());
    candidates.extend((14..=21).rev().map(|v| format!("clang-{v}")));
    for c in &candidates {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(c.clone());
        }
    }
    bail!(
        "no clang found (tried {}): install clang-19 and libbpf-dev (`.ci/run` does), or set $CLANG",
        candidates.join(", ")
    )
}

fn main() -> anyhow::Result<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    println!("cargo:rerun-if-env-changed=CLANG");
    for dir in [src.clone(), src.join("include"), src.join("lib")] {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let p = entry?.path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("c" | "h")) {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    println!("cargo:rustc-env=NP_MAP_ABI={:016x}", map_abi(&src)?);
    let clang = find_clang()?;
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let (target_arch, multiarch) = match arch.as_str() {
        "aarch64" => ("arm64", "aarch64-linux-gnu"),
        _ => ("x86", "x86_64-linux-gnu"),
    };
    for prog in ["connect", "sockops", "getsockopt", "sk_msg", "xdp_guard"] {
        let input = src.join(format!("{prog}.bpf.c"));
        let output = out.join(format!("{prog}.bpf.o"));
        // -g keeps BTF (aya refuses BTF-defined maps without it); the multiarch include dir is
        // where Debian keeps asm/types.h for <linux/bpf.h>.
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-D__TARGET_ARCH_{target_arch}"))
            .arg(format!("-I/usr/include/{multiarch}"))
            .arg("-I")
            .arg(src.join("include"))
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(&input)
            .arg("-o")
            .arg(&output)
            .status()
            .with_context(|| format!("run {clang}"))?;
        if !status.success() {
            bail!(
                "{clang} failed to compile {} ({status}); is libbpf-dev installed?",
                input.display()
            );
        }
    }
    Ok(())
}

/// The maps' ABI: a hash (FNV-1a, 64 bits) of the two headers that define the pinned maps and
/// the structs in them. Pinned maps live in a directory named after it, so a proxy adopts the
/// maps of a predecessor built from the same headers and creates fresh ones otherwise.
fn map_abi(src: &Path) -> anyhow::Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in ["lib/common.h", "include/abi.h"] {
        let bytes = std::fs::read(src.join(f)).with_context(|| format!("read {f}"))?;
        for b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(h)
}
