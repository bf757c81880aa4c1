//! Header operations (`headers.request|response.set|add|remove`) as Istio validates them:
//! names not empty, no `:` pseudo-header (except `:authority` set or added on the request), no
//! `Host` removed or set on the response; values without control characters and with `%` only
//! as `%%` or around an Envoy variable (`%VAR%`, `%VAR(args)%`); the authority rewritten in one
//! place only. Envoy substitutes variables; nodeproxy does not: a value with one is sent as
//! written, and said so.

use super::*;
use crate::config::{HeaderOperations, Headers};

/// Check one `headers` block at `field`; `rewrite_authority`: the rule's `rewrite.authority`.
pub(super) fn check_headers(
    e: &Emit<'_>,
    field: &str,
    h: Option<&Headers>,
    rewrite_authority: Option<&str>,
) {
    let Some(h) = h else { return };
    let mut authority = rewrite_authority.map(str::to_string);
    for (side, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        check_ops(
            e,
            &format!("{field}.{side}"),
            ops,
            side == "request",
            &mut authority,
        );
    }
}

fn check_ops(
    e: &Emit<'_>,
    field: &str,
    ops: &HeaderOperations,
    request: bool,
    authority: &mut Option<String>,
) {
    for (op, list) in [("set", &ops.set), ("add", &ops.add)] {
        for (name, value) in list {
            let f = format!("{field}.{op}.{name}");
            let lower = name.to_ascii_lowercase();
            let is_authority = lower == ":authority" || lower == "host";
            if name.is_empty() {
                e.error(codes::SCHEMA, f.clone(), "header name cannot be empty");
            } else if request && is_authority {
                if let Some(current) = authority.replace(value.clone()) {
                    e.error(codes::SCHEMA, f.clone(), format!("authority header cannot be set multiple times: have {current:?}, attempting to set {value:?}"));
                }
            } else if !request && lower == "host" {
                e.error(
                    codes::SCHEMA,
                    f.clone(),
                    format!("invalid header {name:?}: cannot set Host header"),
                );
            } else if name.starts_with(':') {
                e.error(
                    codes::SCHEMA,
                    f.clone(),
                    format!("invalid header {name:?}: header cannot have \":\" prefix"),
                );
            }
            match crate::compile::envoy_header_value(value) {
                Err(why) => e.error(codes::SCHEMA, f, format!("header value configuration: {why}")),
                Ok(true) => e.warn(codes::UNSUPPORTED_FIELD, f, format!("{value:?} names an Envoy variable (%VAR%), which nodeproxy does not substitute: the value is sent as written")),
                Ok(false) => {}
            }
        }
    }
    for (i, name) in ops.remove.iter().enumerate() {
        let f = format!("{field}.remove[{i}]");
        if name.is_empty() {
            e.error(codes::SCHEMA, f, "header name cannot be empty");
        } else if name.eq_ignore_ascii_case("host") {
            e.error(
                codes::SCHEMA,
                f,
                format!("invalid header {name:?}: cannot set Host header"),
            );
        } else if name.starts_with(':') {
            e.error(
                codes::SCHEMA,
                f,
                format!("invalid header {name:?}: header cannot have \":\" prefix"),
            );
        }
    }
}
