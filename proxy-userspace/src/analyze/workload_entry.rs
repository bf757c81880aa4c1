//! WorkloadEntries, and ServiceEntry endpoints (which have their shape), as Istio validates
//! them: an address (IP, `unix://` path, or a DNS name where names are allowed), ports named
//! as the service names them and in range, and Kubernetes-valid labels.

use super::*;

impl Analyzer<'_> {
    pub(super) fn workload_entry(&mut self, we: &Object<config::WorkloadEntry>) {
        let e = Emit::new(we.object_ref("WorkloadEntry"), &we.source);
        endpoint_fields(&e, "spec", &we.spec, true, None);
        self.out.extend(e.finish());
    }
}

/// The checks of one WorkloadEntry-shaped object at `base`: `allow_names` lets the address
/// be a DNS name; `service_ports`, the port names of the ServiceEntry it belongs to.
pub(super) fn endpoint_fields(
    e: &Emit<'_>,
    base: &str,
    we: &config::WorkloadEntry,
    allow_names: bool,
    service_ports: Option<&HashSet<String>>,
) {
    let addr = we.address.as_str();
    let mut unix = false;
    if addr.is_empty() {
        match &we.network {
            None => e.error(
                codes::SCHEMA,
                format!("{base}.address"),
                "address is required",
            ),
            Some(n) => e.warn(
                codes::SCHEMA_WARNING,
                format!("{base}.address"),
                format!("address is unset with network {n:?}"),
            ),
        }
    } else if let Some(path) = addr.strip_prefix("unix://") {
        unix = true;
        if !path.starts_with('/') || path.len() > 107 {
            e.error(
                codes::SCHEMA,
                format!("{base}.address"),
                format!("`{addr}`: a unix address needs an absolute path of at most 107 bytes"),
            );
        }
        if !we.ports.is_empty() {
            e.error(
                codes::SCHEMA,
                format!("{base}.ports"),
                format!("unix endpoint {addr} must not include ports"),
            );
        }
    } else if addr.parse::<std::net::IpAddr>().is_err() {
        if !allow_names {
            e.error(
                codes::SCHEMA,
                format!("{base}.address"),
                format!("endpoint address {addr:?} is not a valid IP address"),
            );
        } else if !is_fqdn(addr) {
            e.error(
                codes::SCHEMA,
                format!("{base}.address"),
                format!("endpoint address {addr:?} is not a valid FQDN or an IP address"),
            );
        }
    }
    for (name, port) in &we.ports {
        if service_ports.is_some_and(|s| !s.contains(name)) {
            e.error(
                codes::SCHEMA,
                format!("{base}.ports.{name}"),
                format!("endpoint port {port} is not defined by the service entry"),
            );
        }
        if !crate::config::is_dns1123_label(name) {
            e.error(
                codes::SCHEMA,
                format!("{base}.ports.{name}"),
                format!("invalid port name `{name}`"),
            );
        }
        if *port == 0 || *port > 65535 {
            e.error(
                codes::SCHEMA,
                format!("{base}.ports.{name}"),
                format!("port number {port} must be in the range 1..65535"),
            );
        }
    }
    for (k, v) in &we.labels {
        if let Err(why) = label(k, v) {
            e.error(codes::SCHEMA, format!("{base}.labels.{k}"), why);
        }
    }
    if unix && service_ports.is_some_and(|s| s.len() != 1) {
        e.error(
            codes::SCHEMA,
            format!("{base}.address"),
            "exactly 1 service port required for unix endpoints",
        );
    }
}

/// A DNS name: labels of `a-z0-9-` (any case), none empty or over 63, 255 in all; a trailing
/// dot allowed.
pub(super) fn is_fqdn(name: &str) -> bool {
    let n = name.strip_suffix('.').unwrap_or(name);
    !n.is_empty()
        && n.len() <= 255
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A Kubernetes label: key `[prefix/]name` (prefix a DNS subdomain, name up to 63 of
/// alphanumerics, `-`, `_`, `.`, alphanumeric at both ends); value empty or the same shape.
pub(super) fn label(key: &str, value: &str) -> Result<(), String> {
    fn name_ok(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
    }
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if prefix.is_some_and(|p| p.len() > 253 || !is_fqdn(p)) || !name_ok(name) {
        return Err(format!("invalid label key `{key}`"));
    }
    if !value.is_empty() && !name_ok(value) {
        return Err(format!("invalid label value `{value}` of `{key}`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        assert!(is_fqdn("api.example.com") && is_fqdn("a.") && !is_fqdn("-a.com"));
        assert!(!is_fqdn("a..b") && !is_fqdn("under_score.com"));
        assert!(label("app", "reviews").is_ok());
        assert!(label("app.kubernetes.io/name", "x_y.z-1").is_ok());
        assert!(label("app", "").is_ok());
        assert!(label("-app", "x").is_err());
        assert!(label("app", "bad value").is_err());
        assert!(label(&"k".repeat(64), "x").is_err());
    }
}
