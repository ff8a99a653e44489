//! Filesystem notifications for the logs and plugins folders. They only say "look now";
//! the daemon also looks every rescan interval, so a missed or overflowed event costs
//! latency, never data.

use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub logs: bool,
    pub plugins: bool,
}

pub struct Watch {
    /// `None` when the logs folder cannot be watched: every wait then lasts its timeout.
    _watcher: Option<notify::RecommendedWatcher>,
    rx: Receiver<Changes>,
}

/// How long to keep collecting events after the first, so the writes of one flush are
/// one look. Every millisecond here is a millisecond of latency from append to finding
/// (a longer burst is read by the next look, which its later events bring).
const DEBOUNCE: Duration = Duration::from_millis(1);
/// How often a wait looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

impl Watch {
    /// Watches both folders. Notifications only shorten the wait for a look, so a logs
    /// folder that cannot be watched (inotify's limits reached: `No space left on device`)
    /// is said once and looked at every rescan interval instead; before, it stopped the
    /// work loop, again at every restart, and nothing was read at all.
    pub fn new(logs: &Path, plugins: &Path) -> Watch {
        let (tx, rx) = channel();
        let logs_dir: PathBuf = logs.to_path_buf();
        let plugins_dir: PathBuf = plugins.to_path_buf();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let c = match res {
                // Reads (the daemon's own among them: every look opens and reads each log
                // file) change nothing; taken as "look now", they woke the loop again and
                // again, about 60 looks a second with nothing to do.
                Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => return,
                Ok(ev) if ev.need_rescan() => Changes { logs: true, plugins: true },
                Ok(ev) => Changes {
                    logs: ev.paths.iter().any(|p| p.starts_with(&logs_dir)),
                    plugins: ev.paths.iter().any(|p| p.starts_with(&plugins_dir)),
                },
                // An error (e.g. queue overflow): look at everything.
                Err(_) => Changes { logs: true, plugins: true },
            };
            let _ = tx.send(c);
        })
        .and_then(|mut w| w.watch(logs, RecursiveMode::NonRecursive).map(|()| w));
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(
                    folder = %logs.display(),
                    error = %e,
                    "cannot watch the logs folder: looking at it every rescan interval instead (on Linux, \
                     raise fs.inotify.max_user_instances and fs.inotify.max_user_watches if they are reached)"
                );
                return Watch { _watcher: None, rx };
            }
        };
        if plugins.is_dir() {
            // Not a reason to stop reading the logs: the folder is looked at every rescan
            // interval anyway (and a folder that cannot be read is reported there).
            if let Err(e) = watcher.watch(plugins, RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %plugins.display(), error = %e, "cannot watch the plugins folder; looking at it every rescan interval");
            }
        }
        Watch { _watcher: Some(watcher), rx }
    }

    /// Waits up to `timeout` for changes, then gathers the rest of the burst. Returns
    /// early, with no changes, once `stop` is set: a signal only sets the flag, and a
    /// long rescan interval must not hold up a SIGTERM.
    pub fn wait(&self, timeout: Duration, stop: &AtomicBool) -> Changes {
        let until = Instant::now() + timeout;
        let mut c = loop {
            if stop.load(Ordering::Relaxed) {
                return Changes::default();
            }
            let Some(left) = until.checked_duration_since(Instant::now()) else { return Changes::default() };
            let slice = left.min(STOP_CHECK);
            match self.rx.recv_timeout(slice) {
                Ok(c) => break c,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(slice),
            }
        };
        let until = Instant::now() + DEBOUNCE;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(more) => {
                    c.logs |= more.logs;
                    c.plugins |= more.plugins;
                }
                Err(_) => break,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A logs folder that cannot be watched gives a watch all the same, whose waits last
    /// their timeout (the work loop then looks every rescan interval).
    #[test]
    fn a_folder_that_cannot_be_watched_leaves_waits_of_their_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-there");
        let watch = Watch::new(&missing, &missing);
        assert!(watch._watcher.is_none());
        let started = Instant::now();
        let c = watch.wait(Duration::from_millis(150), &AtomicBool::new(false));
        assert_eq!(c, Changes::default());
        assert!(started.elapsed() >= Duration::from_millis(150));
    }
}
