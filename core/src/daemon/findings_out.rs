//! Writing the findings to the findings file from a long-running process (`lookout run`,
//! a Kafka node). A failure of the file's own (a folder in its place, its permissions, its
//! own disk full) does not stop the work: the findings are kept in the database (on a
//! node, out of the findings topic too), ingestion and detection go on, and the write
//! is tried again a second later, then after a wait that doubles up to 16 s, until it
//! succeeds. A failure of the store's is returned, as any store failure is.

use super::metrics::Metrics;
use crate::error::{Chain, StoreError};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct FindingsOut {
    /// When to try again after a failure of the file's; `None` while it writes.
    retry_at: Option<Instant>,
    failures: u32,
    said_at: Option<Instant>,
}

impl FindingsOut {
    /// Whether the file failed and the time to try it again has come.
    pub fn retry_due(&self) -> bool {
        self.retry_at.is_some_and(|at| at <= Instant::now())
    }

    /// When the file is to be tried again, while it fails.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether the last write failed (the file is to be tried again).
    pub fn failing(&self) -> bool {
        self.retry_at.is_some()
    }

    /// Whether the file failed and the time to try it again has not come.
    pub fn waiting(&self) -> bool {
        self.failing() && !self.retry_due()
    }

    /// Makes the next write try the file whatever the wait (a stop's last try).
    pub fn retry_now(&mut self) {
        if self.retry_at.is_some() {
            self.retry_at = Some(Instant::now());
        }
    }

    /// Writes with `flush` (which returns how many findings it wrote), unless waiting to
    /// try the file again: then nothing is tried and 0 returned. `unwritten` counts the
    /// findings waiting, for `/metrics`, while the file fails. While it fails, a store with
    /// nothing waiting is not written with (its flush, touching nothing, would prove
    /// nothing of the file).
    pub fn write<S: ?Sized>(
        &mut self,
        path: &Path,
        metrics: &Mutex<Metrics>,
        store: &mut S,
        flush: impl FnOnce(&mut S) -> Result<u64, StoreError>,
        unwritten: impl Fn(&S) -> u64,
    ) -> Result<u64, StoreError> {
        if self.failing() {
            let waiting = unwritten(store);
            if !self.retry_due() {
                metrics.lock().unwrap_or_else(|p| p.into_inner()).findings_unwritten = waiting;
                return Ok(0);
            }
            if waiting == 0 {
                // Nothing of this store's waits: the failure is over for it, though the
                // file was not tried. The next write with something to write tries it
                // (a failure then waits longer, and is not said again within the minute).
                self.retry_at = None;
                return Ok(0);
            }
        }
        match flush(store) {
            Ok(written) => {
                if self.retry_at.take().is_some() {
                    tracing::info!(file = %path.display(), findings = written, "the findings file is written again");
                }
                metrics.lock().unwrap_or_else(|p| p.into_inner()).findings_unwritten = 0;
                self.failures = 0;
                Ok(written)
            }
            Err(e) if crate::findings::is_file_failure(&e) => {
                self.failures = self.failures.saturating_add(1);
                let wait = Duration::from_secs(1 << self.failures.min(5).saturating_sub(1));
                self.retry_at = Some(Instant::now() + wait);
                let unwritten = unwritten(store);
                {
                    let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
                    m.findings_write_failures += 1;
                    m.findings_unwritten = unwritten;
                }
                // Said at once, then at most once a minute while it lasts.
                if self.failures == 1 || self.said_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    self.said_at = Some(Instant::now());
                    tracing::error!(
                        file = %path.display(),
                        unwritten,
                        error = %Chain(&e),
                        "cannot write the findings file; they are kept in the database and written once it \
                         can be (ingestion and detection go on)"
                    );
                }
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_failure() -> StoreError {
        StoreError::Io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"))
    }

    #[test]
    fn a_file_failure_waits_a_growing_time_and_a_store_failure_is_returned() {
        let metrics = Mutex::new(Metrics::default());
        let path = Path::new("findings.jsonl");
        let mut out = FindingsOut::default();
        assert_eq!(out.write(path, &metrics, &mut (), |_| Ok(3), |_| 0).unwrap(), 3);
        assert!(!out.failing());
        assert_eq!(out.write(path, &metrics, &mut (), |_| Err(file_failure()), |_| 7).unwrap(), 0);
        assert!(out.failing() && !out.retry_due());
        assert_eq!(metrics.lock().unwrap().findings_unwritten, 7);
        assert_eq!(metrics.lock().unwrap().findings_write_failures, 1);
        // Waiting: not tried, counted.
        assert_eq!(out.write(path, &metrics, &mut (), |_| panic!("tried while waiting"), |_| 8).unwrap(), 0);
        assert_eq!(metrics.lock().unwrap().findings_unwritten, 8);
        let first_wait = out.retry_at().unwrap();
        // Due: tried, fails again, waits longer.
        out.retry_at = Some(Instant::now());
        assert_eq!(out.write(path, &metrics, &mut (), |_| Err(file_failure()), |_| 9).unwrap(), 0);
        assert!(out.retry_at().unwrap() > first_wait);
        assert_eq!(metrics.lock().unwrap().findings_write_failures, 2);
        out.retry_at = Some(Instant::now());
        assert_eq!(out.write(path, &metrics, &mut (), |_| Ok(9), |_| 9).unwrap(), 9);
        assert!(!out.failing());
        assert_eq!(metrics.lock().unwrap().findings_unwritten, 0);
        let store_failure = out.write(path, &metrics, &mut (), |_| Err(StoreError::Unusable("locked".into())), |_| 0);
        assert!(store_failure.is_err());
        assert!(!out.failing());
        // While failing, a store with nothing waiting is not written with: it would end
        // the failure without the file being tried.
        assert_eq!(out.write(path, &metrics, &mut (), |_| Err(file_failure()), |_| 4).unwrap(), 0);
        out.retry_now();
        assert_eq!(out.write(path, &metrics, &mut (), |_| panic!("nothing to write"), |_| 0).unwrap(), 0);
        // Nor does it stay due (a loop that waits for it would spin): the next write with
        // something to write tries the file, and a failure then waits longer.
        assert!(!out.failing() && !out.retry_due());
        let failures = out.failures;
        assert_eq!(out.write(path, &metrics, &mut (), |_| Err(file_failure()), |_| 4).unwrap(), 0);
        assert_eq!(out.failures, failures + 1, "the wait grows on");
        out.retry_now();
        assert_eq!(out.write(path, &metrics, &mut (), |_| Ok(4), |_| 4).unwrap(), 4);
        assert!(!out.failing());
    }
}
