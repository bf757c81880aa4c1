//! The crate's top-level modules depend on each other one way only. Every `crate::<module>`
//! path in a module's files (its own file and its directory, tests included) must name a
//! module of a lower layer; so there is no import cycle either. Run it with
//! `cargo test -p nodeproxy --lib layering`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. A module may use the modules of the layers below its own, nothing else.
const LAYERS: &[&[&str]] = &[
    // Shared vocabulary: no dependency on any other module.
    &[
        "diagnostic",
        "alloc",
        "body",
        "http1",
        "sockets",
        "test_util",
    ],
    &["reply"],
    &["config"],
    &["compile"],
    &["analyze"],
    &["publish"],
    &["telemetry"],
    &["upstream"],
    &["dataplane"],
    &["proxy"],
    &["inspect", "kubernetes", "admin"],
    &["app"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules named by `crate::` paths in `src`, `crate::{a, b::c}` included.
fn uses(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in src.match_indices("crate::") {
        let rest = &src[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: after `{` and after each `,` at depth 0.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_ascii_alphabetic() || c == '_') => {
                        out.insert(ident(&group[j..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn module_sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            module_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn layering_modules_depend_downward_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    module_sources(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("name")
            .trim_end_matches(".rs")
            .to_string();
        if matches!(
            top.as_str(),
            "lib" | "main" | "panic_free_tests" | "layering_tests"
        ) {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("read");
        for used in uses(&text) {
            if used != top {
                edges.entry(top.clone()).or_default().insert(used);
            }
        }
    }
    assert!(edges.len() >= 10, "{edges:?}");
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        let Some(lf) = layer(from) else {
            wrong.push(format!("{from} is in no layer of LAYERS"));
            continue;
        };
        for to in tos {
            match layer(to) {
                Some(lt) if lt < lf => {}
                Some(_) => wrong.push(format!("{from} uses {to}, which is not below it")),
                None => wrong.push(format!("{from} uses {to}, which is in no layer")),
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn layering_scanner_reads_grouped_paths() {
    let u = uses("use crate::{config::{self, X}, body::Y};\nlet a = crate::proxy::z();");
    assert_eq!(
        u,
        ["body", "config", "proxy"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}
