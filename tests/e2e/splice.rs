//! The sk_msg splice (`--sockmap`, off by default) under connection edge cases, for issue 25's
//! matrix: a client that half-closes after sending still gets the server's answer through both
//! spliced legs; a server that resets mid-transfer ends the client's connection (no hang) and the proxy
//! serves on; thousands of short spliced connections leave no entry in the sockhash.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use nodeproxy::test_util::require_root;
use nodeproxy_tests::eventually;

use super::SERIAL;
use super::capture::{blocking, scene};

/// Entries in the sockhash now (bpftool's dump, one `key` per entry).
fn sockhash_entries() -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "name", "np_sock_hash"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array().map(|a| a.len()).unwrap_or(0)
}

/// A server answering each connection with the number of bytes it read before the client's
/// FIN.
fn count_server(l: std::net::TcpListener) {
    l.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).is_ok() {
                    let _ = s.write_all(buf.len().to_string().as_bytes());
                }
            });
        }
    });
}

/// A server that sends 1 MiB of a promised 16 and then resets the connection.
fn reset_server(l: std::net::TcpListener) {
    l.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.write_all(&vec![b'x'; 1 << 20]);
                std::thread::sleep(Duration::from_millis(50));
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            });
        }
    });
}

/// Before the fix in `sockops.bpf.c` (a spliced end leaves the splice when it sends its FIN),
/// the half-close lost the answer within the first few connections; without `--sockmap` it
/// never did.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spliced_connections_half_close_reset_and_leave_no_map_entries() {
    if !require_root("spliced_connections_half_close_reset_and_leave_no_map_entries") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = std::sync::Arc::new(scene("splice").await);
    let other = &s.node.pods[s.other];
    count_server(other.listen(9101));
    reset_server(other.listen(9102));
    let other_ip = other.ip;
    let (count_vip, reset_vip) = (s.node.vip(5), s.node.vip(6));
    let cfg = s.dir.0.join("mesh.yaml");
    let mut yaml = std::fs::read_to_string(&cfg).unwrap();
    for (name, vip, port) in [("count", count_vip, 9101), ("reset", reset_vip, 9102)] {
        // Connection limits keep them in the proxy (off the kernel fast path): spliced.
        yaml.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}.default.svc.cluster.local]\n  addresses: [{vip}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 7000, name: tcp, protocol: TCP, targetPort: {port}}}]\n  endpoints: [{{address: {other_ip}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\nspec:\n  host: {name}.default.svc.cluster.local\n  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 10000}}}}}}\n"
        ));
    }
    std::fs::write(&cfg, yaml).unwrap();
    let baseline = sockhash_entries();
    let _proxy = s.start_proxy_with(&["--sockmap"]);
    let redirects = s.counter("sockmap_redirect");
    let count = SocketAddr::new(count_vip.into(), 7000);
    // Half-close: the client sends 64 KiB, shuts its sending side, then reads the answer.
    let s2 = s.clone();
    let answers = blocking(move || {
        (0..1000)
            .map(|i| {
                let mut c = s2.node.pods[s2.client]
                    .connect(count, Duration::from_secs(3))
                    .expect("connect");
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                c.write_all(&vec![b'y'; 65536]).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut out = Vec::new();
                if let Err(e) = c.read_to_end(&mut out) {
                    panic!("connection {i}: no answer after half-close ({e}), got {out:?}");
                }
                String::from_utf8_lossy(&out).to_string()
            })
            .collect::<Vec<_>>()
    })
    .await;
    assert!(answers.iter().all(|a| a == "65536"), "{:?}", &answers[..3]);
    assert!(
        s.counter("sockmap_redirect") > redirects,
        "the connections were spliced"
    );
    // A reset mid-transfer ends the client's connection, not hangs it.
    let reset = SocketAddr::new(reset_vip.into(), 7000);
    let s2 = s.clone();
    let got = blocking(move || {
        let mut c = s2.node.pods[s2.client]
            .connect(reset, Duration::from_secs(3))
            .expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut n = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            match c.read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err(format!("hung after {n} bytes"));
                }
                Err(_) => return Ok(n),
            }
        }
    })
    .await;
    let n = got.expect("the reset reaches the client");
    assert!(n <= 1 << 20, "no more than the server sent: {n}");
    // The proxy serves on after the reset.
    let s2 = s.clone();
    let after = blocking(move || {
        let mut c = s2.node.pods[s2.client]
            .connect(count, Duration::from_secs(3))
            .expect("connect");
        c.write_all(b"abc").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    })
    .await;
    assert_eq!(after, "3");
    // No entry outlives its socket.
    eventually(
        "the sockhash back to its size before",
        Duration::from_secs(10),
        || (sockhash_entries() <= baseline).then_some(()),
    );
}
