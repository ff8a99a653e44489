//! Crash injection for tests: `LOOKOUT_FAILPOINT=<name>` makes the process abort (as
//! abruptly as `kill -9`) when it reaches the named point, or stop whole (SIGSTOP, every
//! thread, until a SIGCONT) at a pause point. Used by the crash-recovery tests; costs one
//! cached environment read otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
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

/// Stops the whole process, the first time it reaches `name` armed, as a machine starved
/// of CPU would (no thread runs, so no heartbeat either) until something sends SIGCONT.
pub fn pause(name: &str) {
    static PAUSED: AtomicBool = AtomicBool::new(false);
    if armed(name) && !PAUSED.swap(true, Ordering::Relaxed) {
        eprintln!("lookout: failpoint {name} hit, stopping until SIGCONT");
        // `kill` rather than a signal call: no unsafe code outside the plugin ABI.
        let stopped = std::process::Command::new("kill").args(["-STOP", &std::process::id().to_string()]).status();
        if !stopped.is_ok_and(|s| s.success()) {
            eprintln!("lookout: failpoint {name}: cannot stop this process; aborting");
            std::process::abort();
        }
    }
}
