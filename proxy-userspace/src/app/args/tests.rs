//! Each rule of `run`'s flags: the flags as a user types them, the machine as `Host`.

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn args(flags: &str) -> RunArgs {
    Cli::try_parse_from(std::iter::once("run").chain(flags.split_whitespace()))
        .unwrap_or_else(|e| panic!("{flags}: {e}"))
        .run
}

fn parse_error(flags: &str) -> String {
    match Cli::try_parse_from(std::iter::once("run").chain(flags.split_whitespace())) {
        Ok(_) => panic!("{flags}: accepted"),
        Err(e) => e.to_string(),
    }
}

fn root() -> Host {
    Host {
        root: true,
        primary_address: Some("10.0.0.5".parse().unwrap()),
        cpus: 8,
    }
}

fn user() -> Host {
    Host {
        root: false,
        ..root()
    }
}

fn plan(flags: &str, host: &Host) -> RunPlan {
    args(flags)
        .plan(host)
        .unwrap_or_else(|e| panic!("{flags}: {e:#}"))
}

fn refused(flags: &str, host: &Host) -> String {
    match args(flags).plan(host) {
        Ok(_) => panic!("{flags}: accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn files_need_a_config_and_kubernetes_refuses_one() {
    assert!(refused("", &user()).contains("needs at least one --config"));
    assert!(
        refused("--source kubernetes --config a.yaml", &user())
            .contains("--config is for --source files")
    );
    let p = plan("--source kubernetes --node-name n1", &user());
    let k = p.kubernetes.expect("kubernetes options");
    assert_eq!(k.node_name.as_deref(), Some("n1"));
    assert!(p.options.config.is_empty());
}

#[test]
fn capture_defaults_to_ebpf_as_root_only() {
    assert!(plan("--config a.yaml", &user()).options.capture.is_none());
    let c = plan("--config a.yaml", &root())
        .options
        .capture
        .expect("ebpf as root");
    assert_eq!(
        c.capture,
        "10.0.0.5:15001".parse().unwrap(),
        "primary address, port 15001"
    );
    assert!(
        plan("--config a.yaml --capture none", &root())
            .options
            .capture
            .is_none()
    );
}

#[test]
fn capture_without_a_primary_address_needs_capture_listen() {
    let host = Host {
        primary_address: None,
        ..root()
    };
    assert!(refused("--config a.yaml", &host).contains("--capture-listen not given"));
    let c = plan("--config a.yaml --capture-listen 192.168.1.2:15006", &host)
        .options
        .capture
        .unwrap();
    assert_eq!(c.capture.port(), 15006);
}

#[test]
fn enrollment_and_uplinks_need_ebpf_capture() {
    assert!(
        refused("--config a.yaml --enroll-netns /run/netns/p1", &user())
            .contains("need --capture ebpf")
    );
    assert!(
        refused("--config a.yaml --capture none --uplink eth0", &root())
            .contains("need --capture ebpf")
    );
    let c = plan(
        "--config a.yaml --enroll-netns /run/netns/p1 --uplink eth0",
        &root(),
    )
    .options
    .capture
    .unwrap();
    assert_eq!(
        (c.enroll.len(), c.uplinks.as_slice()),
        (1, &["eth0".to_string()][..])
    );
}

#[test]
fn the_xdp_guard_covers_a_public_admin_port() {
    let c = plan("--config a.yaml", &root()).options.capture.unwrap();
    assert_eq!(c.guard_ports, vec![15001], "loopback admin: not guarded");
    let c = plan(
        "--config a.yaml --admin 0.0.0.0:15000 --admin-public",
        &root(),
    )
    .options
    .capture
    .unwrap();
    assert_eq!(c.guard_ports, vec![15001, 15000]);
}

#[test]
fn workers_default_to_the_cpus() {
    assert_eq!(plan("--config a.yaml", &user()).options.workers, 8);
    assert_eq!(
        plan("--config a.yaml --workers 3", &user()).options.workers,
        3
    );
    assert!(parse_error("--config a.yaml --workers 0").contains("--workers"));
}

#[test]
fn timeouts_and_drain_time_are_durations() {
    let p = plan(
        "--config a.yaml --request-head-timeout 2s --idle-timeout 90s --body-idle-timeout 500ms --drain-time 0s",
        &user(),
    );
    let t = p.options.timeouts;
    assert_eq!(
        (t.request_head, t.idle, t.body_idle),
        (
            Duration::from_secs(2),
            Duration::from_secs(90),
            Duration::from_millis(500)
        )
    );
    assert!(p.drain_time.is_zero());
    assert_eq!(
        plan("--config a.yaml", &user()).options.timeouts,
        crate::proxy::Timeouts::default()
    );
    assert!(parse_error("--config a.yaml --idle-timeout soon").contains("--idle-timeout"));
}

#[test]
fn cluster_domain_is_checked_and_reaches_both_sources() {
    assert!(parse_error("--config a.yaml --cluster-domain a..b").contains("is not a DNS name"));
    let p = plan("--config a.yaml --cluster-domain Corp.Example.", &user());
    assert_eq!(p.options.cluster_domain.as_str(), "corp.example");
    let p = plan("--source kubernetes --cluster-domain corp.example", &user());
    assert_eq!(
        p.kubernetes.unwrap().cluster_domain.as_str(),
        "corp.example"
    );
}

#[test]
fn cpu_affinity_access_log_and_sockmap() {
    let p = plan(
        "--config a.yaml --cpu-affinity auto --access-log-format json --sockmap",
        &root(),
    );
    assert!(p.pin_cpus);
    assert_eq!(p.access_log_format, crate::telemetry::access::Format::Json);
    assert!(p.options.capture.unwrap().sockmap);
    assert!(!plan("--config a.yaml", &user()).pin_cpus);
}

#[test]
fn upstream_cidrs_are_parsed() {
    let p = plan(
        "--config a.yaml --allow-upstream-cidr 127.0.0.0/8 --allow-upstream-cidr ::1/128",
        &root(),
    );
    assert_eq!(p.options.allow_upstream.len(), 2);
    assert!(
        parse_error("--config a.yaml --allow-upstream-cidr 10.0.0.0/33")
            .contains("--allow-upstream-cidr")
    );
}

#[test]
fn the_connection_cap_defaults_to_the_descriptor_limit() {
    assert_eq!(
        plan("--config a.yaml", &user()).options.max_connections,
        None
    );
    let p = plan("--config a.yaml --max-downstream-connections 5000", &user());
    assert_eq!(p.options.max_connections, Some(5000));
    assert!(
        parse_error("--config a.yaml --max-downstream-connections 0")
            .contains("--max-downstream-connections")
    );
}

#[test]
fn one_capture_address_per_family_with_one_port() {
    let c = plan(
        "--config a.yaml --capture-listen 10.0.0.5:15001 --capture-listen [fd00::5]:15001",
        &root(),
    )
    .options
    .capture
    .unwrap();
    assert_eq!(c.capture_alt, Some("[fd00::5]:15001".parse().unwrap()));
    assert!(
        refused(
            "--config a.yaml --capture-listen 10.0.0.5:15001 --capture-listen 10.0.0.6:15001",
            &root()
        )
        .contains("one IPv4 and one IPv6")
    );
    assert!(
        refused(
            "--config a.yaml --capture-listen 10.0.0.5:15001 --capture-listen [fd00::5]:15002",
            &root()
        )
        .contains("same port")
    );
}

#[test]
fn takeover_is_the_default_and_uninstalling_needs_ebpf() {
    let p = plan("--config a.yaml", &root());
    assert!(
        p.options.takeover,
        "a second instance takes over by default"
    );
    assert!(
        !p.options.uninstall_on_exit,
        "kernel state stays by default"
    );
    assert_eq!(p.after_handover, AfterHandover::Exit);
    let p = plan(
        "--config a.yaml --takeover never --uninstall-on-exit --after-handover wait",
        &root(),
    );
    assert!(!p.options.takeover);
    assert!(p.options.uninstall_on_exit);
    assert_eq!(p.after_handover, AfterHandover::Wait);
    assert!(
        refused("--config a.yaml --uninstall-on-exit", &user()).contains("needs --capture ebpf")
    );
    assert!(parse_error("--config a.yaml --takeover maybe").contains("maybe"));
}
