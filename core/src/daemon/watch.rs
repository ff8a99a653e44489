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

/// A folder cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {what}")]
pub struct WatchError {
    /// `files`, `logs folder /var/log/defender`, …
    pub what: String,
    #[source]
    pub source: notify::Error,
}

pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    rx: Receiver<Changes>,
}

/// How long to keep collecting events after the first, so the writes of one flush are
/// one look. Every millisecond here is a millisecond of latency from append to finding
/// (a longer burst is read by the next look, which its later events bring).
const DEBOUNCE: Duration = Duration::from_millis(1);
/// How often a wait looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

impl Watch {
    pub fn new(logs: &Path, plugins: &Path) -> Result<Watch, WatchError> {
        let (tx, rx) = channel();
        let logs_dir: PathBuf = logs.to_path_buf();
        let plugins_dir: PathBuf = plugins.to_path_buf();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
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
        .map_err(|source| WatchError { what: "files".into(), source })?;
        watcher
            .watch(logs, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError { what: format!("logs folder {}", logs.display()), source })?;
        if plugins.is_dir() {
            // Not a reason to stop reading the logs: the folder is looked at every rescan
            // interval anyway (and a folder that cannot be read is reported there).
            if let Err(e) = watcher.watch(plugins, RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %plugins.display(), error = %e, "cannot watch the plugins folder; looking at it every rescan interval");
            }
        }
        Ok(Watch { _watcher: watcher, rx })
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
