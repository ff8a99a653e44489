//! How long a service's work loop waits before it starts again after a failure.
//!
//! A failure that keeps coming back (a full disk, a broker down) is retried less and less
//! often, up to a cap. A failure after a long healthy run is a new one: it is retried
//! after the first wait again, not after whatever the last incident had grown the wait
//! to (a daemon with a few transient failures behind it would otherwise stop ingesting for
//! the cap's 30 s at each new one).

use std::time::Duration;

/// A run of work at least this long before it fails counts as healthy.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff { first, cap, next: first }
    }

    /// The wait before starting again after a failure of work that ran for `ran` (zero
    /// for a retry that failed at once): the first wait after a healthy run, else the
    /// last wait doubled, at most the cap.
    pub fn after_failure(&mut self, ran: Duration) -> Duration {
        if ran >= HEALTHY_RUN {
            self.next = self.first;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.cap);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_wait_longer_and_a_healthy_run_starts_again() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(250), Duration::from_secs(30));
        let waits: Vec<Duration> = (0..10).map(|_| b.after_failure(Duration::ZERO)).collect();
        assert_eq!(&waits[..4], &[ms(250), ms(500), ms(1000), ms(2000)]);
        assert_eq!(waits[9], Duration::from_secs(30), "capped");
        // Short runs between failures are the same incident.
        assert_eq!(b.after_failure(HEALTHY_RUN - ms(1)), Duration::from_secs(30));
        // A failure after a healthy run is a new one.
        assert_eq!(b.after_failure(HEALTHY_RUN), ms(250));
        assert_eq!(b.after_failure(Duration::ZERO), ms(500));
    }
}
