//! The README's commands, run the way the README writes them: its fenced blocks are parsed
//! here, so a change to the README that breaks a command breaks this test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::proxy::{Scenario, client, get};
use nodeproxy_tests::{ChildGuard, eventually, free_port, http_get, nodeproxy_bin, repo_path};

/// A fenced block: its info string and lines.
struct Block {
    lang: String,
    /// The fence's indentation (blocks inside list items), removed from every line.
    indent: usize,
    lines: Vec<String>,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match current.take() {
                Some(b) => out.push(b),
                None => {
                    current = Some(Block {
                        lang: info.trim().to_string(),
                        indent: line.len() - trimmed.len(),
                        lines: Vec::new(),
                    })
                }
            }
        } else if let Some(b) = &mut current {
            let strip = b.indent.min(line.len() - trimmed.len());
            b.lines.push(line[strip..].to_string());
        }
    }
    out
}

fn readme() -> Vec<Block> {
    blocks(&std::fs::read_to_string(repo_path("README.md")).expect("README.md"))
}

/// `sh -c line` in the repository root with `nodeproxy` on PATH, as the README tells users.
fn sh(line: &str, env: &[(&str, &str)]) -> Output {
    let bin_dir = nodeproxy_bin().parent().expect("bin dir").to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(line)
        .current_dir(nodeproxy_tests::repo_root());
    c.env("PATH", path);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run sh")
}

#[test]
fn the_readme_console_examples_print_what_the_readme_shows() {
    let consoles: Vec<Block> = readme()
        .into_iter()
        .filter(|b| b.lang == "console")
        .collect();
    assert!(!consoles.is_empty(), "the README has console examples");
    let mut commands = 0;
    for block in consoles {
        // `$ cmd` lines, each followed by its expected output.
        let mut cmds: Vec<(String, Vec<String>)> = Vec::new();
        for line in block.lines {
            match line.strip_prefix("$ ") {
                Some(cmd) => cmds.push((cmd.to_string(), Vec::new())),
                None => cmds
                    .last_mut()
                    .expect("a console block starts with `$ `")
                    .1
                    .push(line),
            }
        }
        for (cmd, expected) in cmds {
            commands += 1;
            let out = sh(&cmd, &[]);
            let got = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                got.trim_end(),
                expected.join("\n").trim_end(),
                "`{cmd}` (stderr: {})",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // validate, routes and simulate at least.
    assert!(commands >= 3, "{commands} console commands");
}

/// The shell block that mentions `needle`.
fn sh_block(needle: &str) -> Vec<String> {
    readme()
        .into_iter()
        .find(|b| b.lang == "sh" && b.lines.iter().any(|l| l.contains(needle)))
        .unwrap_or_else(|| panic!("a sh block with `{needle}`"))
        .lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_canary_pipeline_counts_requests_per_version_and_code() {
    let s = Scenario::from_config("canary.yaml");
    let _v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let _v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let admin = format!("127.0.0.1:{}", free_port());
    let cfg = s.path.to_str().unwrap().to_string();
    let _proxy = ChildGuard(
        Command::new(nodeproxy_bin())
            .args([
                "run",
                "--capture",
                "none",
                "--admin",
                &admin,
                "--access-log",
                "off",
                "--config",
                &cfg,
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("proxy ready", Duration::from_secs(20), || {
        http_get(&admin, "/ready").filter(|(st, _)| *st == 200)
    });
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, &s.vip(), "/", &[]).await.status, 200);
    }
    let block = sh_block("istio_requests_total");
    let counts = sh(
        &block[0].replace("localhost:15000", &admin),
        &[("NODEPROXY_ADMIN", &admin)],
    );
    let text = String::from_utf8_lossy(&counts.stdout).to_string();
    let rows: Vec<(u64, String, String)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "`count version code`: {l}");
            (f[0].parse().expect("a count"), f[1].into(), f[2].into())
        })
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.0).sum::<u64>(),
        100,
        "the counts add up to the requests sent: {text}"
    );
    for v in ["v1", "v2"] {
        assert!(
            rows.iter().any(|r| r.1 == v && r.2 == "200" && r.0 > 0),
            "{v} served: {text}"
        );
    }
    // The second line of the block, against the same proxy.
    let endpoints = sh(&block[1], &[("NODEPROXY_ADMIN", &admin)]);
    assert!(endpoints.status.success());
    let table = String::from_utf8_lossy(&endpoints.stdout);
    assert!(table.contains(&format!("{}:8080", s.ip(11))), "{table}");
}

#[test]
fn the_readme_try_it_by_hand_block_runs_as_written() {
    if !nodeproxy::test_util::require_root("the_readme_try_it_by_hand_block_runs_as_written") {
        return;
    }
    let block = sh_block("nodeproxy run --capture none --config config/canary.yaml");
    let run = block[0].trim_end().trim_end_matches('&').trim();
    let curl = block[1].split('#').next().unwrap().trim();
    // `&` in the README: started in the background; here as a child the test stops.
    let bin_dir: PathBuf = nodeproxy_bin().parent().unwrap().to_path_buf();
    let _proxy = ChildGuard(
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec {run}"))
            .current_dir(nodeproxy_tests::repo_root())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("proxy ready", Duration::from_secs(20), || {
        http_get("127.0.0.1:15000", "/ready").filter(|(st, _)| *st == 200)
    });
    // No backends listen: the README says 503 UF.
    let out = sh(&format!("{curl} -s -w ' %{{http_code}}'"), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("upstream connect error") && text.ends_with(" 503"),
        "{text}"
    );
}

/// Every map the eBPF programs declare is in proxy-ebpf/README.md's map table.
#[test]
fn the_ebpf_readme_lists_every_map() {
    let readme = std::fs::read_to_string(repo_path("proxy-ebpf/README.md")).unwrap();
    let mut maps = Vec::new();
    let mut stack = vec![repo_path("proxy-ebpf")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if is_c(&p) {
                let text = std::fs::read_to_string(&p).unwrap();
                for l in text.lines() {
                    if let Some(rest) = l.trim().strip_prefix("} ")
                        && let Some(name) = rest.strip_suffix(" SEC(\".maps\");")
                    {
                        maps.push(name.to_string());
                    }
                }
            }
        }
    }
    assert!(maps.len() >= 10, "{maps:?}");
    for m in maps {
        assert!(
            readme.contains(&format!("| `{m}` |")),
            "{m} is not in the map table"
        );
    }
}

fn is_c(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("c" | "h"))
}

/// Every document's links and repository paths name files that exist, and no document
/// names an issue number (they are the tracker's, not the reader's).
#[test]
fn docs_name_only_files_that_exist_and_no_issue_numbers() {
    let root = nodeproxy_tests::repo_root();
    let out = Command::new("git")
        .args(["ls-files", "*.md"])
        .current_dir(&root)
        .output()
        .expect("git ls-files");
    let docs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert!(docs.len() >= 5, "{docs:?}");
    const TOP: [&str; 9] = [
        "proxy-userspace/",
        "proxy-ebpf/",
        "tests/",
        "xtask/",
        "deploy/",
        "config/",
        "docs/",
        "fuzz/",
        ".ci/",
    ];
    let mut missing = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        let dir = root.join(doc).parent().unwrap().to_path_buf();
        if let Some(m) = names_an_issue(&text) {
            missing.push(format!("{doc}: names an issue (`{m}`)"));
        }
        // Markdown links to relative paths, and `code` spans that start at a top-level dir.
        let mut paths: Vec<String> = text
            .split("](")
            .skip(1)
            .filter_map(|r| r.split(')').next())
            .filter(|l| !l.contains("://") && !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split('#').next().unwrap().to_string())
            .collect();
        paths.extend(
            text.split('`')
                .skip(1)
                .step_by(2)
                .filter(|t| TOP.iter().any(|p| t.starts_with(p)))
                .filter(|t| !t.contains(' ') && !t.contains('*') && !t.contains('<'))
                .map(|t| t.split(':').next().unwrap().to_string()),
        );
        for p in paths {
            if !root.join(&p).exists() && !dir.join(&p).exists() {
                missing.push(format!("{doc}: `{p}` does not exist"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// `issue 12`, `Issue #12`, `issues 3`: a document naming an issue of the tracker.
fn names_an_issue(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    lower.match_indices("issue").find_map(|(i, _)| {
        let rest = lower[i + 5..].trim_start_matches('s');
        let rest = rest.strip_prefix(' ')?.trim_start_matches('#');
        rest.starts_with(|c: char| c.is_ascii_digit())
            .then(|| text[i..(i + 12).min(text.len())].to_string())
    })
}
