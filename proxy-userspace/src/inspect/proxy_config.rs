//! `nodeproxy proxy-config`: a running proxy's admin API read over plain HTTP/1.1 and shown
//! as tables (like `istioctl proxy-config`).

use super::render;

/// GET `path` from the admin API at `admin` (plain HTTP/1.1, for `nodeproxy proxy-config`).
pub fn admin_get(admin: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).map_err(|e| {
        format!("connect to the admin API at {admin}: {e} (is nodeproxy running? use --admin)")
    })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("read from {admin}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed admin response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("0");
    // The admin server may answer chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    if status != "200" {
        return Err(format!("{path}: HTTP {status}: {}", body.trim()));
    }
    Ok(body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `nodeproxy proxy-config endpoints` table from `/endpoints` JSON.
pub fn endpoints_table(v: &serde_json::Value) -> String {
    let mut rows = vec![[
        "ENDPOINT".to_string(),
        "STATUS".into(),
        "OUTLIER CHECK".into(),
        "ACTIVE RQ".into(),
        "CX".into(),
        "WEIGHT".into(),
        "CLUSTER".into(),
    ]];
    for c in v.as_array().into_iter().flatten() {
        for e in c["endpoints"].as_array().into_iter().flatten() {
            let status = match e["ejectedForMs"].as_u64() {
                Some(ms) => format!(
                    "EJECTED for {:.1}s (until {})",
                    ms as f64 / 1000.0,
                    e["ejectedUntil"].as_str().unwrap_or("")
                ),
                None => e["health"].as_str().unwrap_or("").to_string(),
            };
            let outlier = if e["ejections"].as_u64().unwrap_or(0) > 0
                || e["consecutive5xx"].as_u64().unwrap_or(0) > 0
            {
                format!("ejections={} 5xx={}", e["ejections"], e["consecutive5xx"])
            } else {
                "OK".into()
            };
            rows.push([
                e["address"].as_str().unwrap_or("").to_string(),
                status,
                outlier,
                e["activeRequests"].to_string(),
                e["activeConnections"].to_string(),
                e["weight"].to_string(),
                c["cluster"].as_str().unwrap_or("").to_string(),
            ]);
        }
    }
    render(&rows)
}

/// `nodeproxy proxy-config listeners` table from `/listeners` JSON.
pub fn listeners_table(v: &serde_json::Value) -> String {
    let mut rows = vec![["LISTENER".to_string(), "STATE".into()]];
    for l in v.as_array().into_iter().flatten() {
        rows.push([
            l["address"].as_str().unwrap_or("").to_string(),
            match l["error"].as_str() {
                Some(e) => format!("NOT BOUND: {e} (retrying)"),
                None => "listening".into(),
            },
        ]);
    }
    render(&rows)
}

/// `nodeproxy proxy-config clusters` table from `/clusters` JSON.
pub fn clusters_table(v: &serde_json::Value) -> String {
    let mut rows = vec![[
        "CLUSTER".to_string(),
        "SERVICE".into(),
        "ENDPOINTS".into(),
        "LB".into(),
        "ACTIVE RQ".into(),
        "PENDING".into(),
        "CX".into(),
        "OVERFLOWS".into(),
    ]];
    for c in v.as_array().into_iter().flatten() {
        let lb = c["policy"]["lb"]["algorithm"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                c["policy"]["lb"]["algorithm"]
                    .as_object()
                    .and_then(|o| o.keys().next().cloned())
                    .unwrap_or_default()
            });
        rows.push([
            c["name"].as_str().unwrap_or("").to_string(),
            c["service"].as_str().unwrap_or("").to_string(),
            format!("{}/{}", c["healthyEndpoints"], c["endpoints"]),
            lb,
            c["activeRequests"].to_string(),
            c["pendingRequests"].to_string(),
            c["activeConnections"].to_string(),
            c["stats"]["upstream_rq_pending_overflow"].to_string(),
        ]);
    }
    render(&rows)
}

/// `nodeproxy proxy-config routes` table from `/routes` JSON.
pub fn routes_table(v: &serde_json::Value) -> String {
    let mut rows = vec![[
        "TABLE".to_string(),
        "VIRTUAL HOST".into(),
        "MATCHES".into(),
        "DESTINATIONS".into(),
        "VIRTUAL SERVICE".into(),
    ]];
    for t in v["httpTables"].as_array().into_iter().flatten() {
        for vh in t["vhosts"].as_array().into_iter().flatten() {
            for r in vh["rules"].as_array().into_iter().flatten() {
                let matches = r["matches"]
                    .as_array()
                    .map(|m| {
                        if m.is_empty() {
                            "*".to_string()
                        } else {
                            serde_json::to_string(m).unwrap_or_default()
                        }
                    })
                    .unwrap_or_default();
                let dests = match &r["action"]["route"]["clusters"] {
                    serde_json::Value::Array(cs) => {
                        let total = r["action"]["route"]["total"].as_f64().unwrap_or(1.0);
                        cs.iter()
                            .map(|c| {
                                format!(
                                    "{} {:.0}%",
                                    c["name"].as_str().unwrap_or(""),
                                    100.0 * c["weight"].as_f64().unwrap_or(0.0) / total
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                    _ => r["action"]
                        .as_object()
                        .and_then(|o| o.keys().next().cloned())
                        .unwrap_or_default(),
                };
                rows.push([
                    t["name"].as_str().unwrap_or("").to_string(),
                    vh["name"].as_str().unwrap_or("").to_string(),
                    matches,
                    dests,
                    r["origin"].as_str().unwrap_or("").to_string(),
                ]);
            }
        }
    }
    render(&rows)
}
