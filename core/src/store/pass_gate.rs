//! Background work stepping aside while detectors run.
//!
//! A key-index merge runs on a thread of its own after the batches that made its runs.
//! In the daemon those batches are a look's rows, and the detection pass over them starts
//! as soon as they are stored: the merge and the pass's threads then share the cores, and
//! a tick's pass took two to four times as long as the same pass with the cores to
//! itself. A merge is never urgent (look-ups read unmerged runs as well), so it waits
//! while a pass runs, a chunk at a time and never longer than [`MAX_WAIT`] at once: passes
//! back to back cannot hold it off for good.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The longest a merge waits for passes at one step before it goes on anyway.
pub const MAX_WAIT: Duration = Duration::from_millis(200);

/// How many detection passes are running on a store, for its background work to wait on.
#[derive(Default)]
pub struct PassGate {
    active: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

/// A pass in progress: the gate opens again when every such guard is dropped.
pub struct Detecting {
    gate: Arc<PassGate>,
}

impl PassGate {
    /// Marks a pass as running until the guard is dropped.
    pub fn enter(gate: &Arc<PassGate>) -> Detecting {
        gate.active.fetch_add(1, Ordering::SeqCst);
        Detecting { gate: Arc::clone(gate) }
    }

    /// Whether a pass is running.
    pub fn busy(&self) -> bool {
        self.active.load(Ordering::SeqCst) > 0
    }

    /// Waits until no pass runs, or `max` has passed; returns at once when none runs.
    pub fn wait_idle(&self, max: Duration) {
        if !self.busy() {
            return;
        }
        let until = Instant::now() + max;
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.busy() {
            let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
            guard = self.idle.wait_timeout(guard, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Drop for Detecting {
    fn drop(&mut self) {
        if self.gate.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Under the lock, so a waiter between its check and its wait cannot miss it.
            let _guard = self.gate.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.gate.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_goes_on_when_the_last_pass_ends_or_after_the_longest_wait() {
        let gate = Arc::new(PassGate::default());
        let started = Instant::now();
        gate.wait_idle(Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(1), "no pass: no wait");

        let first = PassGate::enter(&gate);
        let second = PassGate::enter(&gate);
        let waiter = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                let started = Instant::now();
                gate.wait_idle(Duration::from_secs(30));
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "one pass still runs");
        drop(second);
        let waited = waiter.join().unwrap();
        assert!(waited >= Duration::from_millis(100) && waited < Duration::from_secs(10), "waited {waited:?}");

        let _running = PassGate::enter(&gate);
        let started = Instant::now();
        gate.wait_idle(Duration::from_millis(100));
        assert!(started.elapsed() >= Duration::from_millis(100), "a pass that does not end is waited for at most max");
    }
}
