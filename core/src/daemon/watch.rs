//! Filesystem notifications for the logs and plugins folders. They only say "look now";
//! the daemon also looks every rescan interval, so a missed or overflowed event costs
//! latency, never data.

use notify::{RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
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

/// How long to keep collecting events after the first, so a burst is one look.
const DEBOUNCE: Duration = Duration::from_millis(15);

impl Watch {
    pub fn new(logs: &Path, plugins: &Path) -> Result<Watch, WatchError> {
        let (tx, rx) = channel();
        let logs_dir: PathBuf = logs.to_path_buf();
        let plugins_dir: PathBuf = plugins.to_path_buf();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let c = match res {
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

    /// Waits up to `timeout` for changes, then gathers the rest of the burst.
    pub fn wait(&self, timeout: Duration) -> Changes {
        let mut c = match self.rx.recv_timeout(timeout) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => return Changes::default(),
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(timeout);
                return Changes::default();
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
