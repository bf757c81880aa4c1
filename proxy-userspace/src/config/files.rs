//! Reading configuration files: directories walked, YAML files found, documents counted.

use super::*;

/// Read every file under `paths` (see [`collect_files`]), in order; unreadable ones are error
/// diagnostics.
pub fn read_files(paths: &[PathBuf]) -> (Vec<(PathBuf, String)>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut texts = Vec::new();
    for path in paths {
        match collect_files(path) {
            Ok(files) => {
                for file in files {
                    match std::fs::read_to_string(&file) {
                        Ok(text) => texts.push((file, text)),
                        Err(e) => diags.push(read_error(&file, &e)),
                    }
                }
            }
            Err(e) => diags.push(read_error(path, &e)),
        }
    }
    (texts, diags)
}

/// How many documents of a YAML text hold anything but blank lines and comments: the number
/// of objects the file declares (a document that fails to parse still counts).
pub fn document_count(text: &str) -> usize {
    split_documents(text)
        .iter()
        .filter(|(_, doc)| {
            doc.lines().any(|l| {
                let l = l.trim();
                !l.is_empty() && !l.starts_with('#') && l != "..."
            })
        })
        .count()
}

/// Whether a directory entry is configuration: `.yaml`/`.yml`, and not hidden. Hidden names
/// are editors' lock and swap files (`.#canary.yaml`) and the versioned directories of a
/// Kubernetes ConfigMap mount (`..2026_12_07_…/`, `..data`), whose files are reached through
/// the visible links beside them; reading both would load every object twice.
pub fn is_config_name(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Files under `path`: the file itself, or every `.yaml`/`.yml` below a directory, sorted
/// (hidden entries skipped: [`is_config_name`]).
pub fn collect_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    collect_below(path, 0)
}

pub(super) fn collect_below(path: &Path, depth: usize) -> std::io::Result<Vec<PathBuf>> {
    if depth > 16 {
        return Err(std::io::Error::other(
            "more than 16 directory levels (a link loop?)",
        ));
    }
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let p = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // Follows links: a link to a directory is read as the directory.
        if std::fs::metadata(&p).is_ok_and(|m| m.is_dir()) {
            out.extend(collect_below(&p, depth + 1)?);
        } else if is_config_name(&entry.file_name()) {
            out.push(p);
        }
    }
    Ok(out)
}

pub(super) fn read_error(path: &Path, e: &std::io::Error) -> Diagnostic {
    let mut d = Diagnostic::new(
        codes::READ_ERROR,
        Severity::Error,
        format!("cannot read: {e}"),
    );
    d.source = Some(Source {
        file: path.to_path_buf(),
        line: 0,
        document: 0,
    });
    d
}
