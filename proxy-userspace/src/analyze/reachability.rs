//! Unreachable rules and ineffective match blocks of a VirtualService, as Istio's validation
//! finds them (reported by `istioctl analyze` as IST0130, a warning, and IST0131, info): a rule
//! after one without matches; a rule without matches after another; a block equal to an earlier
//! one (every block of a rule: the rule is unreachable); for HTTP, a `uri.prefix` block covered
//! by an earlier block whose prefix is a prefix of it, on the same port, method, authority,
//! headers, query parameters and withoutHeaders. For `http`, `tcp` and `tls` rules alike.

use std::collections::BTreeMap;

use super::*;
use crate::config::{HttpMatchRequest, StringMatch};

/// The rule's name as Istio prints it: its `name`, quoted, else `#index`.
fn rule_name(name: Option<&str>, i: usize) -> String {
    match name {
        Some(n) if !n.is_empty() => format!("{n:?}"),
        _ => format!("#{i}"),
    }
}

/// A rule as the check sees it: its name and its blocks (each with its name).
type Rule<'a, M> = (Option<&'a str>, Vec<(Option<&'a str>, &'a M)>);

/// Report unreachable rules and duplicate blocks of one rule list (blocks compared as a
/// whole).
fn blocks<M: PartialEq>(e: &Emit<'_>, kind: &str, rules: &[Rule<'_, M>]) {
    let mut seen: Vec<(&M, usize)> = Vec::new();
    let mut empty_at: Option<usize> = None;
    for (i, (name, matches)) in rules.iter().enumerate() {
        let rn = rule_name(*name, i);
        let field = format!("spec.{kind}[{i}]");
        if matches.is_empty() {
            if empty_at.is_some() {
                e.warn(
                    codes::UNREACHABLE_RULE,
                    field,
                    format!(
                        "virtualService rule {rn} not used (only the last rule can have no matches)"
                    ),
                );
            }
            empty_at = Some(i);
            continue;
        }
        let mut duplicates = 0;
        for (j, (mname, m)) in matches.iter().enumerate() {
            if empty_at.is_some() {
                e.warn(
                    codes::UNREACHABLE_RULE,
                    field.clone(),
                    format!(
                        "virtualService rule {rn} not used (route without matches defined before)"
                    ),
                );
                continue;
            }
            match seen.iter().find(|(s, _)| *s == *m) {
                Some((_, d)) => {
                    e.info(codes::INEFFECTIVE_MATCH, format!("{field}.match[{j}]"), format!("virtualService rule {rn} match {} is not used (duplicate/overlapping match in rule {})", rule_name(*mname, j), rule_name(rules[*d].0, *d)));
                    duplicates += 1;
                }
                None => seen.push((m, i)),
            }
        }
        if duplicates == matches.len() {
            e.warn(
                codes::UNREACHABLE_RULE,
                field,
                format!("virtualService rule {rn} not used (all matches used by prior rules)"),
            );
        }
    }
}

/// An `exact:`/`prefix:` form of a string match (Istio's overlap check ignores regexes).
fn tagged(m: Option<&StringMatch>) -> String {
    match m {
        Some(StringMatch { exact: Some(x), .. }) if !x.is_empty() => format!("exact:{x}"),
        Some(StringMatch {
            prefix: Some(p), ..
        }) if !p.is_empty() => format!("prefix:{p}"),
        _ => String::new(),
    }
}

/// One `uri.prefix` block in the shape Istio's overlap check compares.
struct PrefixBlock {
    rule: String,
    block: String,
    field: String,
    prefix: String,
    port: Option<u32>,
    method: String,
    authority: String,
    headers: BTreeMap<String, String>,
    query: BTreeMap<String, String>,
    without: BTreeMap<String, String>,
}

fn tag_map(m: &BTreeMap<String, StringMatch>) -> BTreeMap<String, String> {
    m.iter()
        .map(|(k, v)| (k.clone(), tagged(Some(v))))
        .collect()
}

/// Is every value of `a` equal to `b`'s, or has it `b`'s as a prefix (Istio's comparison)?
fn maps_cover(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    a.len() == b.len()
        && a.iter().all(|(k, v)| {
            b.get(k)
                .is_some_and(|w| v == w || v.starts_with(w.as_str()))
        })
}

fn covers(a: &PrefixBlock, b: &PrefixBlock) -> bool {
    b.prefix.starts_with(&a.prefix)
        && a.port == b.port
        && (a.method == b.method || a.method.starts_with(&b.method))
        && (a.authority == b.authority || a.authority.starts_with(&b.authority))
        && maps_cover(&a.headers, &b.headers)
        && maps_cover(&a.query, &b.query)
        && maps_cover(&a.without, &b.without)
}

impl Analyzer<'_> {
    /// The rules of `vs`: HTTP, TCP and TLS.
    pub(super) fn reachability(&self, e: &Emit<'_>, vs: &VirtualService) {
        let http: Vec<_> = vs
            .http
            .iter()
            .map(|r| {
                (
                    r.name.as_deref(),
                    r.matches.iter().map(|m| (m.name.as_deref(), m)).collect(),
                )
            })
            .collect();
        blocks::<HttpMatchRequest>(e, "http", &http);
        let tcp: Vec<_> = vs
            .tcp
            .iter()
            .map(|r| (None, r.matches.iter().map(|m| (None, m)).collect()))
            .collect();
        blocks(e, "tcp", &tcp);
        let tls: Vec<_> = vs
            .tls
            .iter()
            .map(|r| (None, r.matches.iter().map(|m| (None, m)).collect()))
            .collect();
        blocks(e, "tls", &tls);
        // Overlapping `uri.prefix` blocks (after exact duplicates, which are reported above).
        let mut seen: Vec<&HttpMatchRequest> = Vec::new();
        let mut prefixes: Vec<PrefixBlock> = Vec::new();
        for (i, r) in vs.http.iter().enumerate() {
            for (j, m) in r.matches.iter().enumerate() {
                if seen.contains(&m) {
                    continue;
                }
                seen.push(m);
                let Some(prefix) = m.uri.as_ref().and_then(|u| u.prefix.clone()) else {
                    continue;
                };
                if prefix.is_empty() {
                    continue;
                }
                let method = match tagged(m.method.as_deref()) {
                    s if s.is_empty() => "exact:GET".to_string(),
                    s => s,
                };
                prefixes.push(PrefixBlock {
                    rule: rule_name(r.name.as_deref(), i),
                    block: rule_name(m.name.as_deref(), j),
                    field: format!("spec.http[{i}].match[{j}]"),
                    prefix,
                    port: m.port,
                    method,
                    authority: tagged(m.authority.as_deref()),
                    headers: tag_map(&m.headers),
                    query: tag_map(&m.query_params),
                    without: tag_map(&m.without_headers),
                });
            }
        }
        for (a_i, a) in prefixes.iter().enumerate() {
            for b in &prefixes[a_i + 1..] {
                if b.prefix != a.prefix && covers(a, b) {
                    e.info(codes::INEFFECTIVE_MATCH, b.field.clone(), format!("virtualService rule {} match {} of prefix {} is not used (duplicate/overlapping match in rule {} of prefix {} on {})", b.rule, b.block, b.prefix, a.block, a.prefix, a.rule));
                }
            }
        }
    }
}
