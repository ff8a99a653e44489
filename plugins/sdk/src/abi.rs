//! The whole plugin contract in one place.
//!
//! # Exports every plugin library provides (all `extern "C"`)
//!
//! ```c
//! uint32_t lookout_abi_version(void);                  // ABI_VERSION: major << 16 | minor
//! int32_t  lookout_manifest(LookoutBuf *out);          // out: Manifest
//! int32_t  lookout_init(const uint8_t *in, size_t len, LookoutBuf *out);
//!                                                      // in: InitRequest, out: InitResponse
//! int32_t  lookout_evaluate(const LookoutHostApi *host, const uint8_t *in, size_t len,
//!                           LookoutBuf *out);          // in: EvalRequest, out: EvalResponse
//! void     lookout_free(uint8_t *ptr, size_t len);     // frees a buffer the plugin returned
//! ```
//!
//! The same declarations, for plugins written in C (or anything that reads C headers), are
//! in `include/lookout_plugin.h` beside this crate's sources; a test checks it against
//! this file.
//!
//! Return codes: [`RC_OK`], or an error code with `out` holding a UTF-8 message.
//! During `lookout_evaluate` the plugin may call back into the host through
//! `host->call(host->ctx, in, len, &out)` with a [`HostRequest`]; the host answers with a
//! [`HostResponse`] and the plugin hands the buffer back with `host->free`.
//!
//! Threads: the host calls one library's exports one at a time, but not always from the
//! same thread (it initialises detectors on one and runs their passes on a thread per
//! core), so a plugin keeps nothing in thread-local storage between calls; buffers it
//! returned may be freed from another thread than the one they were returned on.
//!
//! # Payloads
//!
//! Every payload is `[PAYLOAD_VERSION] ++ bincode2(standard config, value)`. A payload
//! with another version byte is refused, not guessed at.

use crate::cell::{Cell, Row};
use crate::condition::CellRef;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::ffi::c_void;

/// The plugin ABI version: the symbols, their signatures and calling convention, the C
/// layout of [`LookoutBuf`] and [`LookoutHostApi`], and the return codes.
///
/// It is `major << 16 | minor` in the `u32` that `lookout_abi_version` returns:
///
/// - **major** changes when a plugin built for the old version could be misread or
///   miscalled by a new host (a signature, a struct layout or a return code changes
///   meaning). A host loads only plugins of its own major.
/// - **minor** changes when the contract grows without breaking what was there (say, a
///   new optional export that the host calls only for plugins that declare that minor or
///   later). A host loads plugins of its own major with any minor up to its own: it knows
///   every older minor, but not what a newer one may expect of it.
///
/// See [`host_accepts`]. Version 1, the only one before this scheme existed, reads as
/// 0.1, so plugins built before it still load. (The payloads inside the buffers have
/// their own [`PAYLOAD_VERSION`].)
pub const ABI_VERSION_MAJOR: u16 = 0;
/// See [`ABI_VERSION_MAJOR`].
pub const ABI_VERSION_MINOR: u16 = 1;
/// What this SDK's `lookout_abi_version` returns (see [`ABI_VERSION_MAJOR`]).
pub const ABI_VERSION: u32 = abi_version(ABI_VERSION_MAJOR, ABI_VERSION_MINOR);

/// Encodes an ABI version: `major << 16 | minor`.
pub const fn abi_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}

/// The (major, minor) of an encoded ABI version.
pub const fn abi_version_parts(version: u32) -> (u16, u16) {
    ((version >> 16) as u16, (version & 0xffff) as u16)
}

/// An encoded ABI version as `major.minor`.
pub fn abi_version_string(version: u32) -> String {
    let (major, minor) = abi_version_parts(version);
    format!("{major}.{minor}")
}

/// Whether a host speaking ABI `host` loads a plugin declaring ABI `plugin`: the same
/// major, and a minor no newer than the host's.
pub const fn host_accepts(host: u32, plugin: u32) -> bool {
    let (host_major, host_minor) = abi_version_parts(host);
    let (plugin_major, plugin_minor) = abi_version_parts(plugin);
    host_major == plugin_major && plugin_minor <= host_minor
}

/// Bumped on any change to the payload types below.
pub const PAYLOAD_VERSION: u8 = 6;

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
///
/// Both callbacks are `unsafe` to call: they dereference the raw pointers they are given.
#[repr(C)]
pub struct LookoutHostApi {
    pub ctx: *mut c_void,
    /// Answers a [`HostRequest`] payload with a [`HostResponse`] payload in `out`.
    ///
    /// # Safety
    /// `ctx` must be this table's `ctx`, `input` must point to `len` readable bytes, `out`
    /// to a writable `LookoutBuf`; only during the `lookout_evaluate` call that was handed
    /// this table. The buffer written to `out` must be returned through `free`, once.
    pub call: unsafe extern "C" fn(ctx: *mut c_void, input: *const u8, len: usize, out: *mut LookoutBuf) -> i32,
    /// Frees a buffer `call` wrote into `out`.
    ///
    /// # Safety
    /// `ptr`/`len` must be exactly a buffer `call` returned, not yet freed.
    pub free: unsafe extern "C" fn(ptr: *mut u8, len: usize),
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
    /// Look-up keys the detector needs the host to keep: the host builds each index over
    /// the rows stored so far when the detector is first loaded, and maintains it as rows
    /// arrive (no engine build for a new detector).
    pub indexes: Vec<IndexDecl>,
}

/// An index the host keeps for a detector: the rows of `table` by the values of `columns`
/// (compared ignoring ASCII case, values cut to 256 bytes and re-checked), each entry
/// carrying the values of `covers` so conditions on them are checked without the row.
/// A one-column index also answers an `In` condition of an [`InputSpec`] on that column.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IndexDecl {
    pub table: String,
    pub columns: Vec<String>,
    pub covers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parameter {
    pub name: String,
    pub default: String,
    pub description: String,
}

impl Parameter {
    /// A parameter with its default value and what it means (shown by `lookout plugins
    /// list`).
    pub fn new(name: &str, default: &str, description: &str) -> Parameter {
        Parameter { name: name.into(), default: default.into(), description: description.into() }
    }
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

pub use crate::condition::{Cmp, Condition, INGESTION_TIME};

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
    /// Whether this is the pass's last call: the new rows of one pass may come in several
    /// calls, and a rule whose result is not monotone in its input (a threshold, a
    /// suppression list, a `top`) evaluates once all of them are in.
    pub last: bool,
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

/// [`EvalResponse`] read in place: the form the host decodes a plugin's answer in, its
/// strings and bytes borrowed from the payload. A pass with a hundred findings of ~100
/// columns each no longer allocates a string per name and value only to write them out
/// again as the finding's JSON line.
#[derive(Debug, Deserialize)]
pub struct EvalResponseRef<'a> {
    #[serde(borrow)]
    pub findings: Vec<FindingRef<'a>>,
    #[serde(borrow)]
    pub state: Vec<StateOpRef<'a>>,
    pub inputs: Option<Vec<InputSpec>>,
    pub wake_at: Option<i64>,
}

/// [`FindingOut`] read in place.
#[derive(Debug, Deserialize)]
pub struct FindingRef<'a> {
    #[serde(borrow)]
    pub inputs: Vec<&'a [u8]>,
    pub device_id: &'a str,
    pub device_name: &'a str,
    #[serde(borrow)]
    pub row: Vec<(&'a str, CellRef<'a>)>,
}

impl<'a> From<&'a FindingOut> for FindingRef<'a> {
    fn from(f: &'a FindingOut) -> Self {
        FindingRef {
            inputs: f.inputs.iter().map(Vec::as_slice).collect(),
            device_id: &f.device_id,
            device_name: &f.device_name,
            row: f.row.iter().map(|(n, c)| (n.as_str(), CellRef::from(c))).collect(),
        }
    }
}

/// [`StateOp`] read in place.
#[derive(Debug, Deserialize)]
pub enum StateOpRef<'a> {
    Put(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
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
    /// When the clock alone can next change this detector's results (a window edge
    /// passing: a row ageing out of `ago(x)`), in ticks: the host runs a pass at or after
    /// that time even if no row arrives. `None`: only new rows can. Committed with the
    /// pass; each pass's answer replaces the last.
    pub wake_at: Option<i64>,
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
    /// Like `GetRowsWhere`, with only the named columns of each row (in stored order; a
    /// column the row lacks is left out): a detector that needs a few columns of wide
    /// rows does not pay for copying and decoding the others.
    GetColumnsWhere { keys: Vec<Vec<u8>>, filter: Vec<Condition>, columns: Vec<String> },
    /// All stored rows of `table` with exactly this SHA1, on `device_id` if given.
    Lookup { table: String, sha1: String, device_id: Option<String> },
    /// Like `Lookup`, keeping only rows that meet every condition; filtered by the host.
    LookupWhere { table: String, sha1: String, device_id: Option<String>, filter: Vec<Condition> },
    /// Rows of `table` whose columns equal these values (ignoring ASCII case), from an
    /// index the detector declared on exactly these columns, meeting every condition.
    LookupBy { table: String, key: Vec<(String, String)>, filter: Vec<Condition> },
    /// Many `LookupWhere`s on one table with one filter, in one call: one row set per
    /// (SHA1, DeviceId), in the same order (answered with `RowSets`). A pass that looks up
    /// the partners of many rows pays one boundary crossing, not one per row.
    LookupMany { table: String, keys: Vec<(String, Option<String>)>, filter: Vec<Condition> },
    /// The FileProfile row with exactly this SHA1.
    Profile(String),
    /// The FileProfile rows of several SHA1s in one call, in the same order.
    Profiles(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostResponse {
    Rows(Vec<Row>),
    /// One row set per look-up of a `LookupMany`, in its order.
    RowSets(Vec<Vec<Row>>),
    Profile(Option<Row>),
    Profiles(Vec<Option<Row>>),
    Error(String),
}

/// Encodes a payload: version byte, then bincode.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    // Sized first, then written once into a buffer of exactly that size: a payload of
    // thousands of rows grown by doubling, then copied behind the version byte, touched
    // three to four times its size in fresh memory (in a new process, mostly the kernel
    // zeroing pages).
    let config = bincode::config::standard();
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config).map_err(|e| format!("cannot encode payload: {e}"))?;
    let mut out = Vec::with_capacity(1 + size.bytes_written);
    out.push(PAYLOAD_VERSION);
    bincode::serde::encode_into_std_write(value, &mut out, config)
        .map_err(|e| format!("cannot encode payload: {e}"))?;
    Ok(out)
}

/// Appends `value` in bincode's layout (no version byte): for a payload written partly by
/// hand ([`crate::wire`]).
pub(crate) fn encode_body_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
        .map(|_| ())
        .map_err(|e| format!("cannot encode payload: {e}"))
}

/// Decodes a payload, refusing another version or trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let body = payload_body(bytes)?;
    whole(bincode::serde::decode_from_slice::<T, _>(body, limits()), body)
}

/// Like [`decode`], for what a plugin sends the host that is never large (a manifest, an
/// init answer, a host request other than a fetch's keys; a look-up of many keys or a
/// FileProfile request of many SHA1s is some hundreds of thousands of them within it): a
/// garbage length prefix in it cannot make the host allocate more than [`SMALL_LIMIT`]
/// bytes.
pub fn decode_small<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let body = payload_body(bytes)?;
    whole(bincode::serde::decode_from_slice::<T, _>(body, small_limits()), body)
}

/// Decodes a payload into a type that borrows from it (such as [`EvalResponseRef`]), with
/// the same checks as [`decode`].
pub fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let body = payload_body(bytes)?;
    whole(bincode::serde::borrow_decode_from_slice::<T, _>(body, limits()), body)
}

/// Decodes the bytes after a payload's version byte into a borrowing type, refusing
/// trailing bytes: a small part of a payload a plugin sent, read partly by hand
/// ([`crate::wire`]), with [`decode_small`]'s limit.
pub(crate) fn decode_body_small<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    whole(bincode::serde::borrow_decode_from_slice::<T, _>(body, small_limits()), body)
}

/// What follows the version byte, if it is this one.
pub(crate) fn payload_body(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes.first() {
        None => Err("empty payload".to_string()),
        Some(&v) if v != PAYLOAD_VERSION => Err(format!("payload version {v}, expected {PAYLOAD_VERSION}")),
        Some(_) => Ok(&bytes[1..]),
    }
}

/// A decoded value, if it took all of `body`.
fn whole<T>(decoded: Result<(T, usize), bincode::error::DecodeError>, body: &[u8]) -> Result<T, String> {
    let (value, used) = decoded.map_err(|e| format!("cannot decode payload: {e}"))?;
    if used != body.len() {
        return Err(format!("payload has {} trailing bytes", body.len() - used));
    }
    Ok(value)
}

// A garbage length prefix must not make the decoder allocate gigabytes.
fn limits() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ 1 << 30 }>,
> {
    bincode::config::standard().with_limit::<{ 1 << 30 }>()
}

/// The most a small payload from a plugin may decode to ([`decode_small`]): bincode counts
/// every length and value against it, so it bounds the whole payload, any length prefix
/// in it included.
pub const SMALL_LIMIT: usize = 16 << 20;

fn small_limits() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<SMALL_LIMIT>,
> {
    bincode::config::standard().with_limit::<SMALL_LIMIT>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small payload whose string claims 100 MiB is refused at its length prefix, before
    /// anything is allocated for it (the general limit would allocate it, then find the
    /// bytes missing).
    #[test]
    fn a_small_payload_claiming_a_huge_string_is_refused_at_its_length() {
        let mut bytes = encode(&String::new()).unwrap();
        bytes.truncate(bytes.len() - 1);
        // bincode's varint for a u64: 253, then 8 bytes little-endian.
        bytes.push(253);
        bytes.extend_from_slice(&(100u64 << 20).to_le_bytes());
        let small = decode_small::<String>(&bytes).unwrap_err();
        assert!(small.contains("Limit"), "{small}");
        let general = decode::<String>(&bytes).unwrap_err();
        assert!(!general.contains("Limit"), "{general}");
    }

    #[test]
    fn abi_versions_of_the_same_major_and_an_older_or_equal_minor_are_accepted() {
        assert_eq!(ABI_VERSION, 1, "the version before major.minor existed reads as 0.1");
        assert_eq!(abi_version_parts(ABI_VERSION), (ABI_VERSION_MAJOR, ABI_VERSION_MINOR));
        assert_eq!(abi_version(3, 7), 0x0003_0007);
        assert_eq!(abi_version_string(abi_version(3, 7)), "3.7");
        let host = abi_version(2, 5);
        for minor in 0..=5 {
            assert!(host_accepts(host, abi_version(2, minor)), "2.{minor}");
        }
        assert!(!host_accepts(host, abi_version(2, 6)), "a newer minor may expect what the host lacks");
        assert!(!host_accepts(host, abi_version(1, 5)), "an older major");
        assert!(!host_accepts(host, abi_version(3, 0)), "a newer major");
        assert!(!host_accepts(host, abi_version(1, 0xffff)));
        assert!(host_accepts(ABI_VERSION, ABI_VERSION));
        assert!(host_accepts(ABI_VERSION, 1), "plugins built before major.minor still load");
        // The wrong-abi fixture's version.
        assert!(!host_accepts(ABI_VERSION, 999 << 16));
    }

    #[test]
    fn an_answer_read_in_place_is_the_answer_encoded() {
        let resp = EvalResponse {
            findings: vec![FindingOut {
                inputs: vec![vec![1, 2, 3], vec![0; 300]],
                device_id: "dev".into(),
                device_name: "host \u{e9}".into(),
                row: vec![
                    ("A".into(), Cell::Null),
                    ("B".into(), Cell::Bool(true)),
                    ("C".into(), Cell::Int(-1 << 40)),
                    ("D".into(), Cell::Float(0.5)),
                    ("E".into(), Cell::Str("x".repeat(70_000))),
                    ("F".into(), Cell::Json("[1]".into())),
                ],
            }],
            state: vec![StateOp::Put(vec![9; 260], vec![]), StateOp::Delete(vec![4])],
            inputs: Some(vec![InputSpec { table: "T".into(), only_where: Vec::new(), on_backfill: true }]),
            wake_at: Some(-5),
        };
        let bytes = encode(&resp).unwrap();
        let read: EvalResponseRef<'_> = decode_borrowed(&bytes).unwrap();
        let f = &read.findings[0];
        let want = FindingRef::from(&resp.findings[0]);
        assert_eq!(
            (&f.inputs, f.device_id, f.device_name, &f.row),
            (&want.inputs, want.device_id, want.device_name, &want.row)
        );
        assert!(matches!(read.state[0], StateOpRef::Put(k, v) if k == [9; 260].as_slice() && v.is_empty()));
        assert!(matches!(read.state[1], StateOpRef::Delete(k) if k == [4]));
        assert_eq!(read.inputs, resp.inputs);
        assert_eq!(read.wake_at, Some(-5));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_borrowed::<EvalResponseRef<'_>>(&trailing).unwrap_err().contains("trailing"));
        assert!(decode_borrowed::<EvalResponseRef<'_>>(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn round_trip_and_version_check() {
        let req = EvalRequest {
            now: 42,
            backfill: false,
            rows: vec![RowRef { table: "T".into(), sha1: "a".into(), device_id: "d".into(), key: vec![1, 2] }],
            last: true,
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
