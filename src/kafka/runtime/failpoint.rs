//! Crash injection points for the kill-9 tests.

/// Crash injection for tests: `SECUREFORMS_FAILPOINT=<handler>:<point>:<n>` aborts the process the
/// n-th time `handler` reaches `point` (`before-commit`, `after-commit`, `after-produce`). Unset in
/// production; read once.
pub(super) fn failpoint(handler: &str, point: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SPEC: OnceLock<Option<(String, String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("SECUREFORMS_FAILPOINT").ok()?;
        let mut parts = v.splitn(3, ':');
        Some((parts.next()?.to_string(), parts.next()?.to_string(), parts.next()?.parse().ok()?))
    });
    if let Some((h, p, n)) = spec
        && h == handler
        && p == point
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
    {
        eprintln!("failpoint {handler}:{point}:{n} reached; aborting");
        std::process::abort();
    }
}
