//! Field conversions from the Istio API to compiled form (match blocks, faults, CORS, header
//! operations); `analyze` uses them too, so what validates is what compiles.

use super::*;

/// A block matching everything a catch-all would (`uri: prefix: /` and nothing else).
pub fn is_catch_all_block(m: &HttpMatch) -> bool {
    let only_root = matches!(&m.uri, None | Some(StrMatch::Prefix(_)))
        && matches!(&m.uri, Some(StrMatch::Prefix(p)) if p == "/");
    only_root && m.headers.is_empty() && m.rare().is_empty()
}

/// Compile one match block; errors carry the field below the block.
pub fn compile_match(m: &config::HttpMatchRequest) -> Result<HttpMatch, (String, String)> {
    let sm = |f: &str, v: Option<&config::StringMatch>| {
        v.map(StrMatch::compile)
            .transpose()
            .map_err(|e| (f.to_string(), e))
    };
    let hdrs = |f: &str,
                v: &BTreeMap<String, config::StringMatch>|
     -> Result<Vec<(HeaderName, StrMatch)>, (String, String)> {
        v.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "uri" | "scheme" | "method" | "authority"))
            .map(|(k, x)| {
                let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| (format!("{f}.{k}"), format!("invalid header name `{k}`")))?;
                Ok((
                    name,
                    StrMatch::compile(x).map_err(|e| (format!("{f}.{k}"), e))?,
                ))
            })
            .collect()
    };
    Ok(HttpMatch {
        name: m.name.clone(),
        uri: sm("uri", m.uri.as_ref())?,
        headers: hdrs("headers", &m.headers)?,
        ignore_uri_case: m.ignore_uri_case,
        rare: RareMatch {
            scheme: sm("scheme", m.scheme.as_deref())?,
            method: sm("method", m.method.as_deref())?,
            authority: sm("authority", m.authority.as_deref())?,
            without_headers: hdrs("withoutHeaders", &m.without_headers)?,
            query_params: m
                .query_params
                .iter()
                .map(|(k, x)| {
                    Ok((
                        k.clone(),
                        StrMatch::compile(x).map_err(|e| (format!("queryParams.{k}"), e))?,
                    ))
                })
                .collect::<Result<_, (String, String)>>()?,
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
        }
        .boxed(),
    })
}

/// gRPC status names Istio accepts in `abort.grpcStatus`.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub(super) fn compile_fault(f: &config::HttpFaultInjection) -> Result<Fault, String> {
    let delay = match &f.delay {
        Some(d) => {
            let per_million = match (d.percentage, d.percent) {
                (Some(p), _) => p.per_million(),
                (None, Some(p)) => (p.clamp(0, 100) as u32) * 10_000,
                (None, None) => 0,
            };
            d.fixed_delay.map(|fd| (fd.get(), per_million))
        }
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            let per_million = a.percentage.map(|p| p.per_million()).unwrap_or(0);
            let status = if let Some(code) = a.http_status {
                AbortStatus::Http(code.clamp(0, 999) as u16)
            } else if let Some(g) = &a.grpc_status {
                let idx = GRPC_STATUS_NAMES
                    .iter()
                    .position(|n| n == g)
                    .ok_or_else(|| format!("unknown grpcStatus `{g}`"))?;
                AbortStatus::Grpc(idx as u32)
            } else {
                return Err("abort needs httpStatus or grpcStatus".into());
            };
            Some((status, per_million))
        }
        None => None,
    };
    Ok(Fault { delay, abort })
}

pub(super) fn compile_cors(c: &config::CorsPolicy) -> Result<Cors, String> {
    let mut allow_origins = c
        .allow_origins
        .iter()
        .map(StrMatch::compile)
        .collect::<Result<Vec<_>, _>>()?;
    allow_origins.extend(c.allow_origin.iter().map(|o| StrMatch::Exact(o.clone())));
    Ok(Cors {
        allow_origins,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c.max_age.map(|d| d.get().as_secs()),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        forward_unmatched_preflights: c.unmatched_preflights.as_deref() != Some("IGNORE"),
    })
}

/// Compile `headers:`; `host`/`:authority` in request set/add becomes an authority rewrite;
/// other pseudo-headers and `host` removals are dropped, as istiod does.
pub fn header_rules(h: Option<&config::Headers>) -> Result<HeaderRules, String> {
    let mut out = HeaderMutations::default();
    let Some(h) = h else {
        return Ok(HeaderRules::default());
    };
    let ops = |o: Option<&config::HeaderOperations>,
               authority: &mut Option<String>,
               is_request: bool|
     -> Result<HeaderOps, String> {
        let mut r = HeaderOps::default();
        let Some(o) = o else { return Ok(r) };
        let pair = |k: &String, v: &String| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("invalid header name `{k}`"))?,
                // `%%` is Envoy's literal `%` (a value with a variable is sent as written).
                HeaderValue::from_str(&match envoy_header_value(v) {
                    Ok(false) => v.replace("%%", "%"),
                    _ => v.clone(),
                })
                .map_err(|_| format!("invalid value for header `{k}`"))?,
            ))
        };
        for (list, dst) in [(&o.set, &mut r.set), (&o.add, &mut r.add)] {
            for (k, v) in list {
                let lk = k.to_ascii_lowercase();
                if is_request && (lk == "host" || lk == ":authority") {
                    *authority = Some(v.clone());
                } else if !lk.starts_with(':') {
                    dst.push(pair(k, v)?);
                }
            }
        }
        for k in &o.remove {
            let lk = k.to_ascii_lowercase();
            if lk == "host" || lk.starts_with(':') {
                continue;
            }
            r.remove.push(
                HeaderName::from_bytes(lk.as_bytes())
                    .map_err(|_| format!("invalid header name `{k}`"))?,
            );
        }
        Ok(r)
    };
    let mut authority = None;
    out.request = ops(h.request.as_ref(), &mut authority, true)?;
    out.response = ops(h.response.as_ref(), &mut authority, false)?;
    out.authority = authority;
    Ok(HeaderRules::new(out))
}

/// Is the value valid for Envoy's header formatter, and does it use a variable? `%%` is a
/// literal `%`; `%NAME%` and `%NAME(args)%` are variables; any other `%` is an error.
pub fn envoy_header_value(v: &str) -> Result<bool, String> {
    if v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(format!("{v:?} has control characters"));
    }
    let b = v.as_bytes();
    let mut i = 0;
    let mut variables = false;
    while i < b.len() {
        if b[i] != b'%' {
            i += 1;
            continue;
        }
        if b.get(i + 1) == Some(&b'%') {
            i += 2;
            continue;
        }
        // A variable: a name, optional (args), then the closing %.
        let start = i + 1;
        let mut j = start;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        if j == start {
            return Err("invalid header configuration. Un-escaped %".into());
        }
        if b.get(j) == Some(&b'(') {
            match v[j..].find(")%") {
                Some(end) => j += end + 1,
                None => return Err("invalid header configuration. Missing ')'".into()),
            }
        }
        if b.get(j) != Some(&b'%') {
            return Err("invalid header configuration. Un-terminated variable expression".into());
        }
        variables = true;
        i = j + 1;
    }
    Ok(variables)
}

pub(super) fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

#[cfg(test)]
mod header_value_tests {
    use super::envoy_header_value as header_value;

    #[test]
    fn values_as_envoy_parses_them() {
        assert_eq!(header_value("foo"), Ok(false));
        assert_eq!(header_value("100%%"), Ok(false));
        assert_eq!(header_value("%HOSTNAME%"), Ok(true));
        assert_eq!(header_value("prefix %HOSTNAME% suffix"), Ok(true));
        assert_eq!(header_value("%START_TIME(%s)%"), Ok(true));
        assert!(header_value("abc%123").is_err());
        assert!(header_value("%START_TIME%%").is_err());
        assert!(header_value("50%").is_err());
        assert!(header_value("a\nb").is_err());
    }
}
