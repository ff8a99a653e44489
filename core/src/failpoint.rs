//! Crash injection for tests: `LOOKOUT_FAILPOINT=<name>` makes the process abort (as
//! abruptly as `kill -9`) when it reaches the named point. Used by the crash-recovery
//! tests; costs one cached environment read otherwise.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Aborts the process if `name` is the armed failpoint.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var("LOOKOUT_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("lookout: failpoint {name} hit, aborting");
        std::process::abort();
    }
}
