//! The README's main command, `cargo xtask demo`, as the README writes it.

use nodeproxy::test_util::require_root;

use super::SERIAL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_demo_command_runs_and_tears_the_node_down() {
    if !require_root("the_readme_demo_command_runs_and_tears_the_node_down") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let readme = std::fs::read_to_string(nodeproxy_tests::repo_path("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo xtask demo"))
        .expect("the README's demo command");
    let cmd = line.split('#').next().unwrap().trim().to_string();
    let out = tokio::task::spawn_blocking(move || {
        // As a user's shell would run it, without what `cargo test` set for this process.
        xtask::clean_env(
            std::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .current_dir(nodeproxy_tests::repo_root()),
        )
        .output()
        .expect("run the demo")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "after 1000:",
        "errors 0",
        "network namespaces: 4 removed",
        "pinned maps: /sys/fs/bpf/nodeproxy removed",
        "left in place: the bpffs mount",
        "(exit status 1: rejected)",
    ] {
        assert!(
            text.contains(needle),
            "`{needle}` missing from the demo:\n{text}"
        );
    }
    // Numbered steps only: the proxy's log went to its file.
    assert!(
        !text.contains(" INFO "),
        "proxy log lines in the demo:\n{text}"
    );
}
