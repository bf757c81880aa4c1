//! Envoy-visible behaviour beyond routing: timeouts across a call chain, DNS endpoints,
//! listeners following the config, HTTP/2, gRPC local replies, upgrades, source labels.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use nodeproxy_tests::backend::Backend;
use nodeproxy_tests::proxy::{self, SERVICE_PORT, Scenario, client, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn callee_delay_trips_caller_timeout_as_in_bookinfo() {
    // reviews (caller route: timeout 200 ms) calls ratings through the proxy; ratings' own route
    // injects a 300 ms delay. The delay is outside ratings' route but inside reviews' timeout.
    let s = Scenario::from_config("timeout.yaml");
    let yaml = s
        .yaml
        .replace("timeout: 0.5s", "timeout: 200ms")
        .replace("fixedDelay: 2s", "fixedDelay: 300ms");
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let reviews = Backend::start(&format!("{}:8080", s.ip(12)), "reviews-v2").await;
    *reviews.behaviour.call.lock().unwrap() =
        Some(format!("http://{}:{SERVICE_PORT}/ratings", s.ip(2)));
    let ratings = Backend::start(&format!("{}:8080", s.ip(21)), "ratings").await;
    let _p = proxy::start(&s, None).await;
    let c = client();
    // Direct call to ratings: delayed, but its route has no timeout.
    let t = Instant::now();
    assert_eq!(
        get(&c, &format!("{}:{SERVICE_PORT}", s.ip(2)), "/", &[])
            .await
            .status,
        200
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
    // Through reviews: the caller's 200 ms timeout fires first.
    let r = get(&c, &s.vip(), "/", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (504, "upstream request timeout")
    );
    assert!(ratings.count() >= 1);
}

#[tokio::test]
async fn external_service_entry_resolves_dns_endpoints() {
    let s = Scenario::from_config("external-api.yaml");
    let backend = Backend::start("127.0.0.1:0", "payments").await;
    let yaml = s.yaml.replace(
        "targetPort: 18024",
        &format!("targetPort: {}", backend.addr.port()),
    );
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let _p = proxy::start(&s, None).await;
    let r = get(
        &client(),
        &s.vip(),
        "/v1/charge",
        &[("host", "api.payments.example")],
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "payments"));
    assert!(
        backend
            .last_headers
            .lock()
            .unwrap()
            .contains("host: api.payments.example")
    );
    // gateway-error retries: the first 503 is retried.
    backend.behaviour.fail_first.store(1, Ordering::SeqCst);
    assert_eq!(
        get(
            &client(),
            &s.vip(),
            "/",
            &[("host", "api.payments.example")]
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn listeners_follow_the_config() {
    let mut s = Scenario::from_config("canary.yaml");
    let v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let _v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let p = proxy::start(&s, None).await;
    let mut versions = p.publisher.subscribe();
    let c = client();
    let extra_vip = format!("{}:{SERVICE_PORT}", s.ip(3));
    assert!(tokio::net::TcpStream::connect(&extra_vip).await.is_err());
    // Add a ServiceEntry: its address is served without a restart.
    let extra = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: extra, namespace: canary}}\nspec:\n  hosts: [extra.canary.svc.cluster.local]\n  addresses: [{}]\n  resolution: STATIC\n  ports: [{{number: {SERVICE_PORT}, name: http, protocol: HTTP, targetPort: 8080}}]\n  endpoints: [{{address: {}}}]\n",
        s.ip(3),
        s.ip(11)
    );
    let base = s.yaml.clone();
    s.rewrite(format!("{base}{extra}"));
    tokio::time::timeout(Duration::from_secs(10), versions.wait_for(|v| *v >= 2))
        .await
        .unwrap()
        .unwrap();
    let r = nodeproxy_tests::eventually_async(Duration::from_secs(5), || {
        let (c, vip) = (c.clone(), extra_vip.clone());
        async move {
            tokio::net::TcpStream::connect(&vip).await.ok()?;
            Some(get(&c, &vip, "/", &[]).await)
        }
    })
    .await;
    assert_eq!(r.body, "v1");
    // Remove it while a slow request is in flight: the request finishes, then the port closes.
    v1.behaviour.delay_ms.store(400, Ordering::SeqCst);
    let in_flight = tokio::spawn({
        let (c, vip) = (c.clone(), extra_vip.clone());
        async move { get(&c, &vip, "/", &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.rewrite(base);
    tokio::time::timeout(Duration::from_secs(10), versions.wait_for(|v| *v >= 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        in_flight.await.unwrap().status,
        200,
        "in-flight request completes"
    );
    nodeproxy_tests::eventually_async(Duration::from_secs(5), || {
        let vip = extra_vip.clone();
        async move {
            tokio::net::TcpStream::connect(&vip)
                .await
                .is_err()
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn http2_prior_knowledge_both_ways() {
    let s = Scenario::from_config("canary.yaml");
    let yaml = s.yaml.replace("protocol: HTTP,", "protocol: HTTP2,");
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let _p = proxy::start(&s, None).await;
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for _ in 0..20 {
        let r = c
            .get(format!("http://{}/", s.vip()).parse().unwrap())
            .await
            .expect("h2c request");
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        let _ = r.into_body().collect().await;
    }
    let seen = format!(
        "{}{}",
        v1.last_headers.lock().unwrap(),
        v2.last_headers.lock().unwrap()
    );
    assert!(
        seen.contains("version: HTTP/2.0"),
        "HTTP2 port: HTTP/2 upstream: {seen}"
    );
}

#[tokio::test]
async fn grpc_requests_get_grpc_local_replies() {
    let s = Scenario::from_config("fault-header-scoped.yaml");
    let _b = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let _p = proxy::start(&s, None).await;
    let r = get(
        &client(),
        &s.vip(),
        "/pkg.Svc/Method",
        &[("end-user", "jason"), ("content-type", "application/grpc")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("grpc-status"),
        "2",
        "HTTP 500 maps to UNKNOWN (Envoy)"
    );
    assert_eq!(r.header("grpc-message"), "fault filter abort");
}

#[tokio::test]
async fn upgrade_passes_through() {
    let s = Scenario::from_config("canary.yaml");
    let yaml = s
        .yaml
        .replace("      weight: 80\n", "      weight: 100\n")
        .replace("      weight: 20\n", "      weight: 0\n");
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    // An upgrade-speaking echo server as v1.
    nodeproxy_tests::backend::upgrade_echo(&format!("{}:8080", s.ip(11))).await;
    let _p = proxy::start(&s, None).await;
    let mut sock = tokio::net::TcpStream::connect(s.vip()).await.unwrap();
    sock.write_all(
        b"GET /ws HTTP/1.1\r\nHost: reviews\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the 101");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    sock.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), sock.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echo, b"ping");
}

#[tokio::test]
async fn source_labels_select_rules_per_client() {
    let net = nodeproxy_tests::proxy::unique_net();
    let s = Scenario::from_config("canary.yaml");
    let yaml = s.yaml.replace(&s.net, &net).replace(
        "  http:\n  - route:\n",
        "  http:\n  - match: [{sourceLabels: {app: tester}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route:\n",
    ) + &format!("---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: tester, namespace: canary}}\nspec:\n  address: {net}50\n  labels: {{app: tester}}\n");
    let s = Scenario::from_yaml_on(yaml, net.clone());
    let _v1 = Backend::start(&format!("{net}11:8080"), "v1").await;
    let _v2 = Backend::start(&format!("{net}12:8080"), "v2").await;
    let _p = proxy::start(&s, None).await;
    for _ in 0..10 {
        // From the tester workload's address: always v2.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{net}50:0").parse().unwrap()).unwrap();
        let mut stream = sock.connect(s.vip().parse().unwrap()).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nHost: reviews.canary.svc.cluster.local\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        assert!(out.ends_with("v2"), "{out}");
    }
}

#[tokio::test]
async fn cors_preflight_is_answered_and_actual_requests_get_headers() {
    let s = Scenario::from_config("canary.yaml");
    let yaml = s.yaml.replace(
        "  http:\n  - route:\n",
        "  http:\n  - corsPolicy:\n      allowOrigins: [{exact: \"https://shop.example\"}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-token]\n      maxAge: 24h\n      allowCredentials: true\n    route:\n",
    );
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    let _p = proxy::start(&s, None).await;
    let c = client();
    let pre = http::Request::builder()
        .method("OPTIONS")
        .uri(format!("http://{}/", s.vip()))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = proxy::send(&c, pre).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        "https://shop.example"
    );
    assert_eq!(r.header("access-control-allow-methods"), "GET,POST");
    assert_eq!(r.header("access-control-max-age"), "86400");
    assert_eq!(
        v1.count() + v2.count(),
        0,
        "preflight answered by the proxy"
    );
    let r = get(&c, &s.vip(), "/", &[("origin", "https://shop.example")]).await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        "https://shop.example"
    );
    assert_eq!(r.header("access-control-allow-credentials"), "true");
    let r = get(&c, &s.vip(), "/", &[("origin", "https://evil.example")]).await;
    assert_eq!(r.header("access-control-allow-origin"), "");
}

#[tokio::test]
async fn cookie_affinity_sets_and_honours_the_cookie() {
    let s = Scenario::from_config("consistent-hash.yaml");
    let yaml = s.yaml.replace(
        "        httpHeaderName: x-user\n",
        "        httpCookie: {name: session, path: /, ttl: 60s}\n",
    );
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let _a = Backend::start(&format!("{}:8080", s.ip(11)), "a").await;
    let _b = Backend::start(&format!("{}:8080", s.ip(12)), "b").await;
    let _c = Backend::start(&format!("{}:8080", s.ip(13)), "c").await;
    let _p = proxy::start(&s, None).await;
    let c = client();
    for _ in 0..5 {
        let first = get(&c, &s.vip(), "/", &[]).await;
        let cookie = first.header("set-cookie").to_string();
        assert!(
            cookie.starts_with("session=\"")
                && cookie.contains("Max-Age=60")
                && cookie.contains("Path=/")
                && cookie.contains("HttpOnly"),
            "{cookie}"
        );
        let value = cookie.split(';').next().unwrap().to_string();
        for _ in 0..5 {
            let r = get(&c, &s.vip(), "/", &[("cookie", &value)]).await;
            assert_eq!(
                r.body, first.body,
                "the cookie sticks to the endpoint chosen when it was set"
            );
            assert_eq!(r.header("set-cookie"), "");
        }
    }
}

#[tokio::test]
async fn locality_failover_keeps_traffic_local_until_it_fails() {
    let s = Scenario::from_config("circuit-breaking.yaml");
    let yaml = s
        .yaml
        .replace("      tcp:\n        maxConnections: 1\n      http:\n        http1MaxPendingRequests: 1\n        maxRequestsPerConnection: 1\n", "      tcp:\n        maxConnections: 100\n")
        .replace(&format!("{}11, labels: {{app: httpbin, version: v1}}}}", s.net), &format!("{}11, locality: us-west/a/1, labels: {{app: httpbin, version: v1}}}}", s.net))
        .replace(&format!("{}12, labels: {{app: httpbin, version: v1}}}}", s.net), &format!("{}12, locality: us-east/b/1, labels: {{app: httpbin, version: v1}}}}", s.net));
    assert!(yaml.contains("locality: us-west/a/1"), "{yaml}");
    let s = Scenario::from_yaml_on(yaml, s.net.clone());
    let local = Backend::start(&format!("{}:8080", s.ip(11)), "local").await;
    let _remote = Backend::start(&format!("{}:8080", s.ip(12)), "remote").await;
    let creds = s.path.parent().unwrap().to_path_buf();
    let _p =
        proxy::start_custom(&s, None, creds, |o| o.locality = Some("us-west/a/1".into())).await;
    let c = client();
    for _ in 0..50 {
        assert_eq!(
            get(&c, &s.vip(), "/", &[]).await.body,
            "local",
            "same locality while healthy"
        );
    }
    // The local endpoint fails: ejected after 3 errors, traffic fails over to the other region.
    local.behaviour.status.store(500, Ordering::SeqCst);
    for _ in 0..10 {
        get(&c, &s.vip(), "/", &[]).await;
    }
    for _ in 0..20 {
        assert_eq!(get(&c, &s.vip(), "/", &[]).await.body, "remote");
    }
}

#[tokio::test]
async fn grpc_timeout_header_is_honoured() {
    let s = Scenario::from_config("canary.yaml");
    let v1 = Backend::start(&format!("{}:8080", s.ip(11)), "v1").await;
    let v2 = Backend::start(&format!("{}:8080", s.ip(12)), "v2").await;
    v1.behaviour.delay_ms.store(1000, Ordering::SeqCst);
    v2.behaviour.delay_ms.store(1000, Ordering::SeqCst);
    let _p = proxy::start(&s, None).await;
    let t = Instant::now();
    let r = get(
        &client(),
        &s.vip(),
        "/pkg.S/M",
        &[
            ("content-type", "application/grpc"),
            ("grpc-timeout", "150m"),
        ],
    )
    .await;
    assert_eq!(
        (r.status, r.header("grpc-status")),
        (200, "14"),
        "504 as gRPC UNAVAILABLE"
    );
    assert!(t.elapsed() < Duration::from_millis(800));
}

#[tokio::test]
async fn tcp_idle_timeout_and_max_connection_duration() {
    let net = proxy::unique_net();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db}}\nspec:\n  hosts: [db.example]\n  addresses: [{net}1]\n  resolution: STATIC\n  ports: [{{number: 10090, name: tcp, protocol: TCP, targetPort: 9000}}]\n  endpoints: [{{address: {net}11}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: db}}\nspec:\n  host: db.example\n  trafficPolicy:\n    connectionPool:\n      tcp: {{idleTimeout: 300ms, maxConnectionDuration: 1s, tcpKeepalive: {{time: 60s, interval: 10s, probes: 3}}}}\n"
    );
    let s = Scenario::from_yaml_on(yaml, net.clone());
    // An echo backend that never closes on its own.
    let l = tokio::net::TcpListener::bind(format!("{net}11:9000"))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let _p = proxy::start(&s, None).await;
    let vip = format!("{net}1:10090");
    // Idle: closed after 300 ms without traffic.
    let mut c = tokio::net::TcpStream::connect(&vip).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
        .await
        .expect("closed by the proxy")
        .unwrap();
    assert_eq!(n, 0);
    assert!(t.elapsed() >= Duration::from_millis(250));
    // Busy but old: closed at maxConnectionDuration even while bytes flow.
    let mut c = tokio::net::TcpStream::connect(&vip).await.unwrap();
    let t = Instant::now();
    let closed = loop {
        if c.write_all(b"y").await.is_err() {
            break t.elapsed();
        }
        match tokio::time::timeout(Duration::from_millis(500), c.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break t.elapsed(),
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not closed at maxConnectionDuration"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        closed >= Duration::from_millis(900),
        "closed after {closed:?}"
    );
}
