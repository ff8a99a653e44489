//! The daemon's local endpoint: `/metrics` (Prometheus text) and `/status` (the JSON of
//! `lookout status --json`). Only one process can open the database, so this is how
//! other `lookout` commands see a running daemon.

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

/// The database handle the endpoint reads; empty while the work loop restarts (the
/// database can only be reopened once every handle to it is dropped).
pub type SharedDb = Arc<RwLock<Option<StoreReader>>>;

pub struct Endpoint {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Endpoint {
    pub fn start(
        listen: &str,
        db: SharedDb,
        data_dir: &Path,
        metrics: Arc<Mutex<Metrics>>,
    ) -> Result<Endpoint, DaemonError> {
        let server = tiny_http::Server::http(listen)
            .map_err(|source| DaemonError::Listen { addr: listen.to_string(), source })?;
        let addr = server.server_addr().to_ip().ok_or_else(|| DaemonError::NotIp(listen.to_string()))?;
        let server = Arc::new(server);
        let data_dir = data_dir.to_path_buf();
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("lookout-http".into())
            .spawn(move || serve(&s, &db, &data_dir, &metrics))
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

fn serve(server: &tiny_http::Server, db: &SharedDb, data_dir: &Path, metrics: &Mutex<Metrics>) {
    let mut last_counters = Counters::default();
    for req in server.incoming_requests() {
        let guard = db.read().unwrap_or_else(|p| p.into_inner());
        let (code, ctype, body) = match (req.method(), req.url()) {
            (tiny_http::Method::Get, "/metrics") => {
                // While the database is being reopened, the last counters seen stand.
                if let Some(c) = guard.as_ref().and_then(|r| r.counters().ok()) {
                    last_counters = c;
                }
                let m = metrics.lock().map(|m| m.clone()).unwrap_or_default();
                (200, CONTENT_TYPE, render(&m, &last_counters))
            }
            (tiny_http::Method::Get, "/status") => match guard.as_ref() {
                None => {
                    (503, "text/plain; charset=utf-8", "the database is being reopened after an error; retry\n".into())
                }
                Some(db) => match status_of(db, data_dir).map(|s| serde_json::to_string(&s)) {
                    Ok(Ok(json)) => (200, "application/json", json),
                    Ok(Err(e)) => (500, "text/plain; charset=utf-8", format!("status failed: {}\n", Chain(&e))),
                    Err(e) => {
                        (500, "text/plain; charset=utf-8", format!("status failed: {}\n", crate::error::Chain(&e)))
                    }
                },
            },
            _ => (404, "text/plain; charset=utf-8", "not found: try /metrics or /status\n".to_string()),
        };
        drop(guard);
        let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes());
        let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
        if let Ok(h) = header {
            resp = resp.with_header(h);
        }
        let _ = req.respond(resp);
    }
}

pub fn addr_file(data_dir: &Path) -> PathBuf {
    data_dir.join(ADDR_FILE)
}

/// Asks the daemon holding `data_dir` for `path` (e.g. `/status`); `None` when no daemon
/// answers.
pub fn ask_daemon(data_dir: &Path, path: &str) -> Option<String> {
    let addr = std::fs::read_to_string(addr_file(data_dir)).ok()?;
    let addr = addr.trim().to_socket_addrs().ok()?.next()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.split_whitespace().nth(1).filter(|c| *c == "200")?;
    Some(body.to_string())
}
