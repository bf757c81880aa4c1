//! Helpers for tests (unit tests here and the suites in `tests/`); not part of the API.

/// For tests that need root: true when root. Without root, panics when `CI` is set (a skip would
/// look like a pass) and otherwise prints `skipped: needs root` and returns false.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI is set: refusing to skip"
    );
    eprintln!("{test}: skipped: needs root");
    false
}
