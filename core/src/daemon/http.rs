//! The daemon's local endpoint: `/metrics` (Prometheus text), `/status` (the JSON of
//! `lookout status --json`), `/rejects?n=N` (the first rejected records kept, as JSON)
//! and, on a Kafka node, `/status/kafka` (its partitions alone, cheap to poll). Only one process can open the database, so this is how other
//! `lookout` commands see a running daemon.

use super::metrics::{render, Metrics, CONTENT_TYPE};
use super::DaemonError;
use crate::error::Chain;
use crate::status::status_of;
use crate::store::{Counters, StoreReader};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

/// Connections served at once; more are closed as they come. The endpoint is for a
/// scraper and the odd `lookout status`: a client that opens many cannot take the
/// daemon's threads or memory.
const MAX_CONNECTIONS: usize = 8;
/// How long a connection may take to send its request, or to take its answer: a client
/// that stops half-way holds a connection this long, not for good.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a request's line and headers may take.
const MAX_HEAD: usize = 8 << 10;
/// The most rejected records one `/rejects` answer lists.
const MAX_REJECTS: usize = 10_000;

/// What the endpoint reports: the figures behind `/metrics` and `/status`.
pub trait Observe: Send + Sync {
    /// The store's counters; `None` while they cannot be read (the last ones stand).
    fn counters(&self) -> Option<Counters>;
    /// `/status`, or the HTTP code and text of why not.
    fn status(&self) -> Result<crate::status::Status, (u16, String)>;
    /// `/rejects`: the first `limit` rejected records kept, or the HTTP code and text of
    /// why not.
    fn rejects(&self, _limit: usize) -> Result<Vec<crate::store::RejectRecord>, (u16, String)> {
        Err((404, "rejected records are not served here: see `lookout status --rejects` per partition\n".into()))
    }
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

    fn rejects(&self, limit: usize) -> Result<Vec<crate::store::RejectRecord>, (u16, String)> {
        match self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            None => Err((503, "the database is being reopened after an error; retry\n".into())),
            Some(db) => db.rejects(limit).map_err(|e| (500, format!("rejects failed: {}\n", Chain(&e)))),
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
        let listener = TcpListener::bind(listen)
            .map_err(|source| DaemonError::Listen { addr: listen.to_string(), source: Box::new(source) })?;
        let addr = listener
            .local_addr()
            .map_err(|source| DaemonError::Listen { addr: listen.to_string(), source: Box::new(source) })?;
        let shared = Arc::new(Shared {
            data: identity_of(data_dir),
            observe,
            metrics,
            last_counters: Mutex::new(Counters::default()),
            open: AtomicUsize::new(0),
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("lookout-http".into())
            .spawn(move || accept(&listener, &shared, &stop))
            .map_err(DaemonError::EndpointThread)?;
        Ok(Endpoint { stopping, thread: Some(thread), addr })
    }

    /// Stops taking connections. Answers under way end on their own (within
    /// [`IO_TIMEOUT`]); a stop does not wait for a client that does not read.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // The accepting thread is woken by a connection of its own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// What the connections' threads share.
struct Shared {
    data: String,
    observe: Arc<dyn Observe>,
    metrics: Arc<Mutex<Metrics>>,
    /// The last counters read: they stand while the database is being reopened.
    last_counters: Mutex<Counters>,
    /// Connections being served.
    open: AtomicUsize,
}

/// How a data directory is named between a daemon and a command asking it: its
/// canonical path (as given, if it cannot be resolved).
fn identity_of(data_dir: &Path) -> String {
    std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()).to_string_lossy().into_owned()
}

/// Takes connections until `stop`, each served on a thread of its own, at most
/// [`MAX_CONNECTIONS`] at once.
fn accept(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: not a reason to spin.
                tracing::debug!(error = %e, "cannot take a connection to the endpoint");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.open.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        // Given back when the connection is done, however its thread ends (a panic too),
        // or if the thread cannot start.
        let slot = Slot(shared.clone());
        let _ = std::thread::Builder::new().name("lookout-http-conn".into()).spawn(move || {
            serve(stream, &slot.0);
            drop(slot);
        });
    }
}

/// A connection's place among the [`MAX_CONNECTIONS`], given back when dropped.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request and answers it; the connection is closed after. The request and the
/// answer have [`IO_TIMEOUT`] each in all (not per read or write: a client sending a byte
/// now and then does not hold its connection for longer).
fn serve(mut stream: TcpStream, shared: &Shared) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let (code, ctype, body) = match read_head(&mut stream, deadline) {
        Ok(head) => answer(&head, shared),
        Err(HeadError::TooLarge) => (431, TEXT, "request header fields too large\n".to_string()),
        Err(HeadError::Malformed) => (400, TEXT, "bad request\n".to_string()),
        Err(HeadError::Gone) => return,
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{DATA_HEADER}: {}\r\nConnection: close\r\n\r\n",
        body.len(),
        shared.data
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    let _ = write_by(&mut stream, head.as_bytes(), deadline)
        .and_then(|()| write_by(&mut stream, body.as_bytes(), deadline));
}

/// Writes all of `bytes` before `deadline`, or fails.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
        let left = left.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

const TEXT: &str = "text/plain; charset=utf-8";

enum HeadError {
    TooLarge,
    Malformed,
    /// The client went, or sent nothing in time.
    Gone,
}

/// The request line and headers (up to the blank line), at most [`MAX_HEAD`] bytes, read
/// before `deadline`.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<String, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or(HeadError::Gone)?;
        stream.set_read_timeout(Some(left)).map_err(|_| HeadError::Gone)?;
        let n = stream.read(&mut buf).map_err(|_| HeadError::Gone)?;
        if n == 0 {
            return Err(HeadError::Gone);
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_blank_line(&head) {
            head.truncate(end);
            return String::from_utf8(head).map_err(|_| HeadError::Malformed);
        }
        if head.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Where the blank line ending a request's head starts (`\r\n\r\n` or `\n\n`).
fn find_blank_line(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = b.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The answer to a request's head: code, content type and body.
fn answer(head: &str, shared: &Shared) -> (u16, &'static str, String) {
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return (400, TEXT, "bad request\n".to_string());
    };
    if method != "GET" {
        return (405, TEXT, "only GET is served\n".to_string());
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/rejects" => {
            // `?n=N`: how many (20 if not said).
            let n = query.split('&').find_map(|kv| kv.strip_prefix("n=")).map(str::parse::<usize>);
            // At most MAX_REJECTS: one answer is held whole in memory.
            match n.unwrap_or(Ok(20)).map(|n| n.min(MAX_REJECTS)) {
                Err(_) => (400, TEXT, "n must be a count: /rejects?n=20\n".to_string()),
                Ok(n) => match shared.observe.rejects(n).map(|r| serde_json::to_string(&r)) {
                    Ok(Ok(json)) => (200, "application/json", json),
                    Ok(Err(e)) => (500, TEXT, format!("rejects failed: {e}\n")),
                    Err((code, text)) => (code, TEXT, text),
                },
            }
        }
        "/metrics" => {
            let counters = {
                let mut last = shared.last_counters.lock().unwrap_or_else(|p| p.into_inner());
                // While the database is being reopened, the last counters seen stand.
                if let Some(c) = shared.observe.counters() {
                    *last = c;
                }
                last.clone()
            };
            let m = shared.metrics.lock().map(|m| m.clone()).unwrap_or_default();
            let mut text = render(&m, &counters);
            let extra = shared.observe.extra_metrics();
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
        "/status" => match shared.observe.status().map(|s| serde_json::to_string(&s)) {
            Ok(Ok(json)) => (200, "application/json", json),
            Ok(Err(e)) => (500, TEXT, format!("status failed: {e}\n")),
            Err((code, text)) => (code, TEXT, text),
        },
        "/status/kafka" => match shared.observe.kafka() {
            Some(k) => match serde_json::to_string(&serde_json::json!({ "kafka": k })) {
                Ok(json) => (200, "application/json", json),
                Err(e) => (500, TEXT, format!("status failed: {e}\n")),
            },
            None => (404, TEXT, "not a Kafka node: try /status\n".to_string()),
        },
        _ => (404, TEXT, "not found: try /metrics, /status or /rejects?n=20\n".to_string()),
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
        // Another data directory's daemon, or not a Lookout at all (a stale address whose
        // port another server took since): every answer of a daemon names its data.
        Some((_, data, _)) if data.as_deref() != Some(identity_of(data_dir).as_str()) => Answer::NoDaemon,
        Some((200, _, body)) => Answer::Ok(body),
        Some((code, _, body)) => Answer::Failed(code, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address left behind whose port another HTTP server has taken: not a daemon.
    #[test]
    fn a_stale_address_answered_by_another_server_is_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        std::fs::write(addr_file(dir.path()), listener.local_addr().unwrap().to_string()).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").unwrap();
        });
        assert!(matches!(ask(dir.path(), "/status"), Answer::NoDaemon));
        server.join().unwrap();
    }

    struct Stub;

    impl Observe for Stub {
        fn counters(&self) -> Option<Counters> {
            Some(Counters::default())
        }
        fn status(&self) -> Result<crate::status::Status, (u16, String)> {
            Err((503, "stub\n".into()))
        }
    }

    fn endpoint(dir: &Path) -> Endpoint {
        Endpoint::start_with("127.0.0.1:0", dir, Arc::new(Stub), Arc::default()).unwrap()
    }

    /// A request as `ask` sends it: (code, body), or `None` without an answer.
    fn get(addr: SocketAddr, request: &[u8]) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(request).ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        Some((head.split_whitespace().nth(1)?.parse().ok()?, body.to_string()))
    }

    /// Clients that connect and send nothing, or send more than a request's head may
    /// be, neither take a thread each nor keep the endpoint from answering: it still
    /// answers at once, and a stop does not wait for them.
    #[test]
    fn idle_and_oversized_clients_do_not_hold_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let e = endpoint(dir.path());
        // A client that sends its request a byte a second is cut off after IO_TIMEOUT in
        // all, not kept while each byte comes within the timeout.
        let addr = e.addr;
        let trickle = std::thread::spawn(move || {
            let started = Instant::now();
            let Ok(mut s) = TcpStream::connect(addr) else { return Duration::ZERO };
            while started.elapsed() < Duration::from_secs(15) && s.write_all(b"G").is_ok() {
                std::thread::sleep(Duration::from_millis(500));
            }
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(200));
        let idle: Vec<TcpStream> = (0..50).filter_map(|_| TcpStream::connect(e.addr).ok()).collect();
        assert_eq!(idle.len(), 50);
        // The first MAX_CONNECTIONS hold their slots until IO_TIMEOUT; the rest were closed.
        std::thread::sleep(IO_TIMEOUT + Duration::from_millis(500));
        let cut_after = trickle.join().unwrap();
        assert!(cut_after > Duration::ZERO && cut_after < IO_TIMEOUT + Duration::from_secs(3), "{cut_after:?}");
        let started = Instant::now();
        let (code, body) = get(e.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("an answer");
        assert_eq!(code, 200);
        assert!(body.contains("lookout_duplicates_skipped_total 0"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut huge = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        huge.extend(std::iter::repeat_n(b'x', 64 << 10));
        let answered = get(e.addr, &huge);
        assert!(answered.as_ref().is_none_or(|(code, _)| *code == 431), "{answered:?}");
        assert_eq!(get(e.addr, b"POST /metrics HTTP/1.0\r\n\r\n").map(|a| a.0), Some(405));
        assert_eq!(get(e.addr, b"GET /nothing HTTP/1.0\r\n\r\n").map(|a| a.0), Some(404));
        assert_eq!(get(e.addr, b"GET /status HTTP/1.0\r\n\r\n").map(|a| a.0), Some(503));
        let _more_idle: Vec<TcpStream> = (0..20).filter_map(|_| TcpStream::connect(e.addr).ok()).collect();
        let stopping = Instant::now();
        e.stop();
        assert!(stopping.elapsed() < Duration::from_secs(2), "{:?}", stopping.elapsed());
        drop(idle);
    }
}
