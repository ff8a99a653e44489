//! The daemon's local endpoint: `/metrics` (Prometheus text), `/status` (the JSON of
//! `lookout status --json`) and, on a Kafka node, `/status/kafka` (its partitions alone,
//! cheap to poll). Only one process can open the database, so this is how other
//! `lookout` commands see a running daemon.

use super::metrics::{render, Metrics, CONTENT_TYPE};
use super::DaemonError;
use crate::error::Chain;
use crate::status::status_of;
use crate::store::{Counters, StoreReader};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The file in the data directory where a running daemon records its address.
pub const ADDR_FILE: &str = "daemon.addr";

/// The header every answer names the daemon's data directory in (canonical): a copy of a
/// data directory carries the address file of the daemon it was copied from, and an
/// address can be taken over by another daemon; [`ask_daemon`] asks only its own.
const DATA_HEADER: &str = "X-Lookout-Data";

/// The database handle the endpoint reads; empty while the work loop restarts (the
/// database can only be reopened once every handle to it is dropped).
pub type SharedDb = Arc<RwLock<Option<StoreReader>>>;

pub struct Endpoint {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

/// What the endpoint reports: the figures behind `/metrics` and `/status`.
pub trait Observe: Send + Sync {
    /// The store's counters; `None` while they cannot be read (the last ones stand).
    fn counters(&self) -> Option<Counters>;
    /// `/status`, or the HTTP code and text of why not.
    fn status(&self) -> Result<crate::status::Status, (u16, String)>;
    /// More Prometheus text after the daemon's own (a Kafka node's partitions).
    fn extra_metrics(&self) -> String {
        String::new()
    }
    /// `/status/kafka`: a Kafka node's partitions alone, read from memory (`None`: not a
    /// node). `/status` sums up every partition's store, which costs a scan of each; this
    /// is for whatever polls a node's progress often.
    fn kafka(&self) -> Option<crate::status::KafkaStatus> {
        None
    }
}

/// A daemon with one store.
struct OneStore {
    db: SharedDb,
    data_dir: PathBuf,
}

impl Observe for OneStore {
    fn counters(&self) -> Option<Counters> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|r| r.counters().ok())
    }

    fn status(&self) -> Result<crate::status::Status, (u16, String)> {
        match self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            None => Err((503, "the database is being reopened after an error; retry\n".into())),
            Some(db) => status_of(db, &self.data_dir).map_err(|e| (500, format!("status failed: {}\n", Chain(&e)))),
        }
    }
}

impl Endpoint {
    pub fn start(
        listen: &str,
        db: SharedDb,
        data_dir: &Path,
        metrics: Arc<Mutex<Metrics>>,
    ) -> Result<Endpoint, DaemonError> {
        Endpoint::start_with(listen, data_dir, Arc::new(OneStore { db, data_dir: data_dir.to_path_buf() }), metrics)
    }

    /// An endpoint reporting what `observe` sees.
    pub fn start_with(
        listen: &str,
        data_dir: &Path,
        observe: Arc<dyn Observe>,
        metrics: Arc<Mutex<Metrics>>,
    ) -> Result<Endpoint, DaemonError> {
        let data = identity_of(data_dir);
        let server = tiny_http::Server::http(listen)
            .map_err(|source| DaemonError::Listen { addr: listen.to_string(), source })?;
        let addr = server.server_addr().to_ip().ok_or_else(|| DaemonError::NotIp(listen.to_string()))?;
        let server = Arc::new(server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("lookout-http".into())
            .spawn(move || serve(&s, &data, observe.as_ref(), &metrics))
            .map_err(DaemonError::EndpointThread)?;
        Ok(Endpoint { server, thread: Some(thread), addr })
    }

    pub fn stop(mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a data directory is named between a daemon and a command asking it: its
/// canonical path (as given, if it cannot be resolved).
fn identity_of(data_dir: &Path) -> String {
    std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()).to_string_lossy().into_owned()
}

fn serve(server: &tiny_http::Server, data: &str, observe: &dyn Observe, metrics: &Mutex<Metrics>) {
    let mut last_counters = Counters::default();
    for req in server.incoming_requests() {
        let (code, ctype, body) = match (req.method(), req.url()) {
            (tiny_http::Method::Get, "/metrics") => {
                // While the database is being reopened, the last counters seen stand.
                if let Some(c) = observe.counters() {
                    last_counters = c;
                }
                let m = metrics.lock().map(|m| m.clone()).unwrap_or_default();
                let mut text = render(&m, &last_counters);
                let extra = observe.extra_metrics();
                if !extra.is_empty() {
                    // The exposition ends with `# EOF`: the node's figures go before it.
                    let body = text.strip_suffix("# EOF\n").map(str::to_string);
                    text = match body {
                        Some(b) => format!("{b}{extra}# EOF\n"),
                        None => format!("{text}{extra}"),
                    };
                }
                (200, CONTENT_TYPE, text)
            }
            (tiny_http::Method::Get, "/status") => match observe.status().map(|s| serde_json::to_string(&s)) {
                Ok(Ok(json)) => (200, "application/json", json),
                Ok(Err(e)) => (500, "text/plain; charset=utf-8", format!("status failed: {e}\n")),
                Err((code, text)) => (code, "text/plain; charset=utf-8", text),
            },
            (tiny_http::Method::Get, "/status/kafka") => match observe.kafka() {
                Some(k) => match serde_json::to_string(&serde_json::json!({ "kafka": k })) {
                    Ok(json) => (200, "application/json", json),
                    Err(e) => (500, "text/plain; charset=utf-8", format!("status failed: {e}\n")),
                },
                None => (404, "text/plain; charset=utf-8", "not a Kafka node: try /status\n".to_string()),
            },
            _ => (404, "text/plain; charset=utf-8", "not found: try /metrics or /status\n".to_string()),
        };
        let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
        for (name, value) in [("Content-Type", ctype), (DATA_HEADER, data)] {
            if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
                resp = resp.with_header(h);
            }
        }
        let _ = req.respond(resp);
    }
}

pub fn addr_file(data_dir: &Path) -> PathBuf {
    data_dir.join(ADDR_FILE)
}

/// What the daemon holding a data directory answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// No daemon of this data directory answers (none runs; or the address file is
    /// another's: a copied data directory's, a reused address).
    NoDaemon,
    /// The body of its 200 answer.
    Ok(String),
    /// It answered otherwise (its database being reopened after an error, say): the
    /// code and its text.
    Failed(u16, String),
}

/// Asks the daemon holding `data_dir` for `path` (e.g. `/status`); `None` unless it
/// answers 200.
pub fn ask_daemon(data_dir: &Path, path: &str) -> Option<String> {
    match ask(data_dir, path) {
        Answer::Ok(body) => Some(body),
        _ => None,
    }
}

/// Asks the daemon holding `data_dir` for `path`.
pub fn ask(data_dir: &Path, path: &str) -> Answer {
    let asked = || -> Option<(u16, Option<String>, String)> {
        let addr = std::fs::read_to_string(addr_file(data_dir)).ok()?;
        let addr = addr.trim().to_socket_addrs().ok()?.next()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        let mut lines = head.split("\r\n");
        let status = lines.next().filter(|l| l.starts_with("HTTP/1."))?;
        let code = status.split_whitespace().nth(1)?.parse().ok()?;
        let data = lines.find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim().eq_ignore_ascii_case(DATA_HEADER).then(|| value.trim().to_string())
        });
        Some((code, data, body.to_string()))
    };
    match asked() {
        None => Answer::NoDaemon,
        // Another data directory's daemon (a daemon of an earlier version names none).
        Some((_, Some(data), _)) if data != identity_of(data_dir) => Answer::NoDaemon,
        Some((200, _, body)) => Answer::Ok(body),
        Some((code, _, body)) => Answer::Failed(code, body),
    }
}
