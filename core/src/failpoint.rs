//! Crash injection for tests: `LOOKOUT_FAILPOINT=<name>` makes the process abort (as
//! abruptly as `kill -9`) when it reaches the named point. Used by the crash-recovery
//! tests; costs one cached environment read otherwise.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Whether `name` is the armed failpoint.
pub fn armed(name: &str) -> bool {
    ARMED.get_or_init(|| std::env::var("LOOKOUT_FAILPOINT").ok()).as_deref() == Some(name)
}

/// Aborts the process if `name` is the armed failpoint.
pub fn hit(name: &str) {
    if armed(name) {
        eprintln!("lookout: failpoint {name} hit, aborting");
        std::process::abort();
    }
}
