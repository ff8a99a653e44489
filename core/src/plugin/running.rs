//! Which detector calls (`init`, `evaluate`) are running now, process-wide, and a watch
//! that says so when one runs long.
//!
//! A detector stuck in its own code (a loop that never ends) cannot be stopped from the
//! outside: its pass never returns, and the work loop that runs it — ingestion included —
//! waits with it. Nothing else would name the detector; this does, in the log and on
//! `/metrics` (`lookout_detector_call_running_seconds`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One call in progress.
#[derive(Debug, Clone)]
pub struct Call {
    pub detector: String,
    pub version: String,
    /// `init` or `evaluate`.
    pub what: &'static str,
    pub since: Instant,
}

static CALLS: Mutex<BTreeMap<u64, Call>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Marks a call as running until it is dropped (also when the call panics).
#[must_use = "the call counts as running only while the guard lives"]
pub struct CallGuard(u64);

impl Drop for CallGuard {
    fn drop(&mut self) {
        calls().remove(&self.0);
    }
}

fn calls() -> std::sync::MutexGuard<'static, BTreeMap<u64, Call>> {
    CALLS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Notes that `detector`'s `what` call starts now.
pub fn enter(detector: &str, version: &str, what: &'static str) -> CallGuard {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let call = Call { detector: detector.to_string(), version: version.to_string(), what, since: Instant::now() };
    calls().insert(id, call);
    CallGuard(id)
}

/// The calls running now, with how long each has run.
pub fn now_running() -> Vec<(Call, Duration)> {
    calls().values().map(|c| (c.clone(), c.since.elapsed())).collect()
}

/// How often the watch looks, and how long a call runs before it is said to run long.
#[derive(Debug, Clone, Copy)]
pub struct WatchTimes {
    pub every: Duration,
    pub long: Duration,
}

impl Default for WatchTimes {
    fn default() -> Self {
        WatchTimes { every: Duration::from_secs(5), long: Duration::from_secs(60) }
    }
}

/// The thread [`watch`] started: stopped and joined when dropped.
pub struct WatchThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WatchThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Starts a thread that warns about each call running longer than `times.long` (once as
/// it passes that, then every ten times as long), for as long as the handle lives.
pub fn watch(times: WatchTimes) -> std::io::Result<WatchThread> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let handle = std::thread::Builder::new().name("lookout-call-watch".into()).spawn(move || {
        let mut said = BTreeMap::new();
        while !stopped.load(Ordering::Relaxed) {
            for (call, ran) in running_long(&mut said, times.long) {
                tracing::warn!(
                    detector = %call.detector,
                    version = %call.version,
                    call = call.what,
                    seconds = ran.as_secs(),
                    "a detector's call has run long: it holds up its pass, and the work that waits for the \
                     pass (a daemon's ingestion too). If it never returns, the detector is stuck: a second \
                     SIGTERM ends the process at once (nothing committed is lost); remove its library \
                     before starting again"
                );
            }
            // Slept in short steps: a stop is seen at once.
            let until = Instant::now() + times.every;
            while Instant::now() < until && !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50).min(times.every));
            }
        }
    })?;
    Ok(WatchThread { stop, handle: Some(handle) })
}

/// The calls to say now have run long: each once as it passes `long`, then every ten
/// times `long` more. `said` keeps, per call, how long it had run when last said.
fn running_long(said: &mut BTreeMap<u64, Duration>, long: Duration) -> Vec<(Call, Duration)> {
    let running: Vec<(u64, Call, Duration)> =
        calls().iter().map(|(id, c)| (*id, c.clone(), c.since.elapsed())).collect();
    said.retain(|id, _| running.iter().any(|(r, _, _)| r == id));
    let mut out = Vec::new();
    for (id, call, ran) in running {
        let due = match said.get(&id) {
            None => ran >= long,
            Some(last) => ran >= *last + long * 10,
        };
        if due {
            said.insert(id, ran);
            out.push((call, ran));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_counts_as_running_while_its_guard_lives() {
        let name = "running-test-detector";
        let mine = || now_running().into_iter().filter(|(c, _)| c.detector == name).count();
        assert_eq!(mine(), 0);
        let guard = enter(name, "1.0.0", "evaluate");
        let second = enter(name, "1.0.0", "init");
        assert_eq!(mine(), 2);
        drop(guard);
        assert_eq!(mine(), 1);
        // A panic inside the call still ends it.
        let caught = std::panic::catch_unwind(|| {
            let _call = enter(name, "1.0.0", "evaluate");
            panic!("the detector panicked");
        });
        assert!(caught.is_err());
        assert_eq!(mine(), 1);
        drop(second);
        assert_eq!(mine(), 0);
    }

    #[test]
    fn a_call_running_long_is_said_once_then_every_ten_times_as_long() {
        let name = "running-long-test-detector";
        let long = Duration::from_millis(40);
        let mut said = BTreeMap::new();
        let mine = |said: &mut BTreeMap<u64, Duration>| {
            running_long(said, long).into_iter().filter(|(c, _)| c.detector == name).count()
        };
        let call = enter(name, "1.0.0", "evaluate");
        assert_eq!(mine(&mut said), 0, "not long yet");
        std::thread::sleep(long);
        assert_eq!(mine(&mut said), 1);
        assert_eq!(mine(&mut said), 0, "said once");
        std::thread::sleep(long * 10);
        assert_eq!(mine(&mut said), 1, "said again ten times as long after");
        drop(call);
        assert_eq!(mine(&mut said), 0);
    }
}
