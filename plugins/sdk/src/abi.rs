//! The whole plugin contract in one place.
//!
//! # Exports every plugin library provides (all `extern "C"`)
//!
//! ```c
//! uint32_t lookout_abi_version(void);                  // must equal ABI_VERSION
//! int32_t  lookout_manifest(LookoutBuf *out);          // out: Manifest
//! int32_t  lookout_init(const uint8_t *in, size_t len, LookoutBuf *out);
//!                                                      // in: InitRequest, out: InitResponse
//! int32_t  lookout_evaluate(const LookoutHostApi *host, const uint8_t *in, size_t len,
//!                           LookoutBuf *out);          // in: EvalRequest, out: EvalResponse
//! void     lookout_free(uint8_t *ptr, size_t len);     // frees a buffer the plugin returned
//! ```
//!
//! Return codes: [`RC_OK`], or an error code with `out` holding a UTF-8 message.
//! During `lookout_evaluate` the plugin may call back into the host through
//! `host->call(host->ctx, in, len, &out)` with a [`HostRequest`]; the host answers with a
//! [`HostResponse`] and the plugin hands the buffer back with `host->free`.
//!
//! # Payloads
//!
//! Every payload is `[PAYLOAD_VERSION] ++ bincode2(standard config, value)`. A payload
//! with another version byte is refused, not guessed at.

use crate::cell::{Cell, Row};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::ffi::c_void;

/// Bumped on any change to the exported symbols or their calling convention.
pub const ABI_VERSION: u32 = 1;
/// Bumped on any change to the payload types below.
pub const PAYLOAD_VERSION: u8 = 3;

pub const RC_OK: i32 = 0;
/// The detector returned an error.
pub const RC_ERROR: i32 = 1;
/// The detector panicked; the host must re-initialise it before the next call.
pub const RC_PANIC: i32 = 2;
/// A payload could not be decoded.
pub const RC_BAD_PAYLOAD: i32 = 3;
/// `lookout_evaluate` was called before a successful `lookout_init`.
pub const RC_NOT_INITIALISED: i32 = 4;

pub const SYM_ABI_VERSION: &[u8] = b"lookout_abi_version";
pub const SYM_MANIFEST: &[u8] = b"lookout_manifest";
pub const SYM_INIT: &[u8] = b"lookout_init";
pub const SYM_EVALUATE: &[u8] = b"lookout_evaluate";
pub const SYM_FREE: &[u8] = b"lookout_free";

/// A byte buffer handed across the boundary; freed by the side that allocated it.
#[repr(C)]
#[derive(Debug)]
pub struct LookoutBuf {
    pub ptr: *mut u8,
    pub len: usize,
}

impl LookoutBuf {
    pub const fn empty() -> Self {
        LookoutBuf { ptr: std::ptr::null_mut(), len: 0 }
    }
}

/// The host's callback table, valid for the duration of one `lookout_evaluate` call.
#[repr(C)]
pub struct LookoutHostApi {
    pub ctx: *mut c_void,
    pub call: extern "C" fn(ctx: *mut c_void, input: *const u8, len: usize, out: *mut LookoutBuf) -> i32,
    pub free: extern "C" fn(ptr: *mut u8, len: usize),
}

// The host's view of the exports: all `unsafe` to call, since they come from a library.
pub type AbiVersionFn = unsafe extern "C" fn() -> u32;
pub type ManifestFn = unsafe extern "C" fn(out: *mut LookoutBuf) -> i32;
pub type InitFn = unsafe extern "C" fn(input: *const u8, len: usize, out: *mut LookoutBuf) -> i32;
pub type EvaluateFn =
    unsafe extern "C" fn(host: *const LookoutHostApi, input: *const u8, len: usize, out: *mut LookoutBuf) -> i32;
pub type FreeFn = unsafe extern "C" fn(ptr: *mut u8, len: usize);

/// What a detector is: shown by `lookout plugins list`, copied into every finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub title: String,
    pub description: String,
    pub severity: String,
    /// MITRE ATT&CK technique ids, e.g. `T1021.006`.
    pub mitre: Vec<String>,
    /// Tables whose new rows the detector wants to see.
    pub inputs: Vec<String>,
    pub parameters: Vec<Parameter>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parameter {
    pub name: String,
    pub default: String,
    pub description: String,
}

/// Sent once after loading (and again after a panic or a failed pass).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitRequest {
    /// Parameter overrides; unknown names are an init error.
    pub params: Vec<(String, String)>,
    /// The detector's persisted state, as committed with its last successful pass.
    pub state: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What `init` answers: how the detector wants its inputs handed over, now that its
/// parameters are known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct InitResponse {
    /// One entry per input table that is not simply "every new row, and every stored row
    /// on a backfill" (the default for the manifest's inputs not listed here).
    pub inputs: Vec<InputSpec>,
}

/// How the rows of one input table reach the detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// One of the manifest's `inputs`.
    pub table: String,
    /// Hand over only rows meeting every condition (none: every row). The host applies
    /// them before a row reaches the detector; an `In` on a column it keeps an index of is
    /// answered from the index, so rows that cannot match are never read.
    pub only_where: Vec<Condition>,
    /// Whether a backfill hands over this table's stored rows. `false` for a table the
    /// detector reaches through look-ups from its other inputs (the write side of a join
    /// keyed on the other side's SHA1): its new rows still come in incremental passes.
    pub on_backfill: bool,
}

/// A condition on a string column that the host checks before a row crosses the
/// boundary. Comparisons ignore ASCII case, like KQL's `~` operators; a missing or
/// non-string column reads as `""`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    /// `column in~ (any_of)`
    In { column: String, any_of: Vec<String> },
    /// `column !startswith prefix`
    NotStartsWith { column: String, prefix: String },
}

impl Condition {
    pub fn column(&self) -> &str {
        match self {
            Condition::In { column, .. } | Condition::NotStartsWith { column, .. } => column,
        }
    }

    /// Whether a column value meets the condition.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Condition::In { any_of, .. } => any_of.iter().any(|a| a.eq_ignore_ascii_case(value)),
            Condition::NotStartsWith { prefix, .. } => {
                !(value.len() >= prefix.len()
                    && value.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes()))
            }
        }
    }
}

/// A reference to a newly stored row: enough for cheap filtering without decoding it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRef {
    pub table: String,
    pub sha1: String,
    pub device_id: String,
    pub key: Vec<u8>,
}

/// One detection pass over the rows that are new since the detector's cursor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRequest {
    /// The evaluation time (ticks); fixed for the whole pass.
    pub now: i64,
    /// Whether this pass hands over stored rows rather than new ones (the detector's first
    /// pass, one after its cursor fell behind the pruned journal, or `detect --backfill`).
    pub backfill: bool,
    pub rows: Vec<RowRef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindingOut {
    /// The keys of the input rows; with the detector name and version they make the
    /// finding id, so the same pair found twice is one finding.
    pub inputs: Vec<Vec<u8>>,
    pub device_id: String,
    pub device_name: String,
    /// The output row, in column order.
    pub row: Vec<(String, Cell)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StateOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EvalResponse {
    pub findings: Vec<FindingOut>,
    /// Changes to the detector's state, committed atomically with the findings and cursor.
    pub state: Vec<StateOp>,
    /// New input specs (as `init` answers them), used from the next pass on: a detector
    /// whose interest depends on its state (the SHA1s it joins on) narrows what it is
    /// handed as that state changes.
    pub inputs: Option<Vec<InputSpec>>,
}

/// Requests a plugin may make of the host during a pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostRequest {
    /// Fetch rows by key (keys not found are left out).
    GetRows(Vec<Vec<u8>>),
    /// Fetch only the rows, among these keys, that meet every condition. The host
    /// filters before shipping rows, so a selective filter costs a look at the row
    /// instead of a copy across the ABI.
    GetRowsWhere { keys: Vec<Vec<u8>>, filter: Vec<Condition> },
    /// All stored rows of `table` with exactly this SHA1, on `device_id` if given.
    Lookup { table: String, sha1: String, device_id: Option<String> },
    /// Like `Lookup`, keeping only rows that meet every condition; filtered by the host.
    LookupWhere { table: String, sha1: String, device_id: Option<String>, filter: Vec<Condition> },
    /// The FileProfile row with exactly this SHA1.
    Profile(String),
    /// The FileProfile rows of several SHA1s in one call, in the same order.
    Profiles(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostResponse {
    Rows(Vec<Row>),
    Profile(Option<Row>),
    Profiles(Vec<Option<Row>>),
    Error(String),
}

/// Encodes a payload: version byte, then bincode.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let mut out = vec![PAYLOAD_VERSION];
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| format!("cannot encode payload: {e}"))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a payload, refusing another version or trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.first() {
        None => Err("empty payload".to_string()),
        Some(&v) if v != PAYLOAD_VERSION => Err(format!("payload version {v}, expected {PAYLOAD_VERSION}")),
        Some(_) => {
            let (value, used) = bincode::serde::decode_from_slice::<T, _>(&bytes[1..], limits())
                .map_err(|e| format!("cannot decode payload: {e}"))?;
            if used + 1 != bytes.len() {
                return Err(format!("payload has {} trailing bytes", bytes.len() - used - 1));
            }
            Ok(value)
        }
    }
}

// A garbage length prefix must not make the decoder allocate gigabytes.
fn limits() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ 1 << 30 }>,
> {
    bincode::config::standard().with_limit::<{ 1 << 30 }>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_ignore_ascii_case() {
        let c = Condition::In { column: "C".into(), any_of: vec!["WsmProvHost.exe".into()] };
        assert!(c.matches("wsmprovhost.EXE"));
        assert!(!c.matches("wsmprovhost.exe "));
        let n = Condition::NotStartsWith { column: "C".into(), prefix: r"C:\Windows\Assembly".into() };
        assert!(!n.matches(r"c:\windows\assembly\x.dll"));
        assert!(n.matches(r"c:\windows\assembl"));
        assert!(n.matches(""));
    }

    #[test]
    fn round_trip_and_version_check() {
        let req = EvalRequest {
            now: 42,
            backfill: false,
            rows: vec![RowRef { table: "T".into(), sha1: "a".into(), device_id: "d".into(), key: vec![1, 2] }],
        };
        let bytes = encode(&req).unwrap();
        assert_eq!(decode::<EvalRequest>(&bytes).unwrap(), req);
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert!(decode::<EvalRequest>(&wrong).unwrap_err().contains("version 9"));
        let mut trailing = bytes;
        trailing.push(0);
        assert!(decode::<EvalRequest>(&trailing).unwrap_err().contains("trailing"));
        assert!(decode::<EvalRequest>(&[PAYLOAD_VERSION, 0xff, 0xff, 0xff]).is_err());
    }
}
