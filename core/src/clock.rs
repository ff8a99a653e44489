//! The one place Lookout reads the wall clock, so `--now` can fix it everywhere.

use lookout_plugin_sdk::time::TICKS_PER_SEC;

/// The current time in 100 ns ticks since the Unix epoch.
pub fn now_ticks() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_secs() as i64 * TICKS_PER_SEC + i64::from(d.subsec_nanos() / 100)
}

/// A fixed time when given, the clock otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    fixed: Option<i64>,
}

impl Clock {
    pub fn new(fixed: Option<i64>) -> Self {
        Clock { fixed }
    }

    pub fn now(&self) -> i64 {
        self.fixed.unwrap_or_else(now_ticks)
    }
}
