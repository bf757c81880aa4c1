//! Fields of the Istio API nodeproxy does not implement yet ([later] in ISTIO-API.md): loaded,
//! and warned about by path, never silently ignored.

use super::*;

/// Fields of the [later] tier, as paths below the object (`[]` = every element).
pub(super) fn later_fields(kind: Kind) -> Vec<String> {
    let policy = [
        "loadBalancer.zoneAwareLbSetting",
        "loadBalancer.warmup",
        "loadBalancer.warmupDurationSecs",
        "connectionPool.http.maxConcurrentStreams",
        "connectionPool.http.http2KeepAlive",
        "outlierDetection.outlierDetectionHttpErrorCodes",
        "loadBalancer.consistentHash.httpCookie.attributes",
        "tls.caCrl",
    ];
    let policy_only = ["tunnel", "proxyProtocol", "retryBudget"];
    let mut out = Vec::new();
    match kind {
        Kind::VirtualService => {
            out.extend(
                [
                    "spec.http[].match[].statPrefix",
                    "spec.http[].retries.retryRemoteLocalities",
                    "spec.tcp[].match[].sourceSubnet",
                ]
                .map(String::from),
            );
        }
        Kind::DestinationRule => {
            out.push("spec.workloadSelector".into());
            for base in ["spec.trafficPolicy", "spec.subsets[].trafficPolicy"] {
                for f in policy.iter().chain(policy_only.iter()) {
                    out.push(format!("{base}.{f}"));
                }
                for f in policy {
                    out.push(format!("{base}.portLevelSettings[].{f}"));
                }
            }
        }
        Kind::Gateway => {
            for f in [
                "bind",
                "name",
                "defaultEndpoint",
                "tls.caCrl",
                "tls.caCertCredentialName",
                "tls.subjectAltNames",
                "tls.verifyCertificateSpki",
                "tls.verifyCertificateHash",
                "tls.minProtocolVersion",
                "tls.maxProtocolVersion",
                "tls.cipherSuites",
            ] {
                out.push(format!("spec.servers[].{f}"));
            }
        }
        Kind::ServiceEntry => {}
        Kind::WorkloadEntry | Kind::KubeService | Kind::EndpointSlice | Kind::Pod => {}
    }
    out
}

pub(super) fn report_later_fields(
    kind: Kind,
    value: &serde_yaml::Value,
    obj: &ObjectRef,
    source: &Source,
    diags: &mut Vec<Diagnostic>,
) {
    for pattern in later_fields(kind) {
        let mut found = Vec::new();
        find_paths(value, &pattern, String::new(), &mut found);
        for path in found {
            diags.push(
                Diagnostic::new(
                    codes::UNSUPPORTED_FIELD,
                    Severity::Warning,
                    "field is not supported by nodeproxy, ignored",
                )
                .on(obj.clone(), source.clone())
                .at(path),
            );
        }
    }
}

/// Walk `value` along a dotted pattern (`a.b[].c`), collecting concrete paths that exist.
pub(super) fn find_paths(
    value: &serde_yaml::Value,
    pattern: &str,
    prefix: String,
    out: &mut Vec<String>,
) {
    let (head, rest) = match pattern.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (pattern, None),
    };
    let (key, each) = match head.strip_suffix("[]") {
        Some(k) => (k, true),
        None => (head, false),
    };
    let Some(child) = value.get(key) else { return };
    if child.is_null() {
        return;
    }
    let here = if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    };
    if each {
        if let Some(items) = child.as_sequence() {
            for (i, item) in items.iter().enumerate() {
                let p = format!("{here}[{i}]");
                match rest {
                    Some(r) => find_paths(item, r, p, out),
                    None => out.push(p),
                }
            }
        }
    } else {
        match rest {
            Some(r) => find_paths(child, r, here, out),
            None => out.push(here),
        }
    }
}
