//! The callbacks a plugin makes into the host during `lookout_evaluate`: row fetches,
//! (table, SHA1, DeviceId) look-ups and FileProfile, answered from the store.

// One of the three modules allowed `unsafe` (the workspace denies it): the callbacks are
// called by the plugin with raw pointers.
#![allow(unsafe_code)]

use crate::error::StoreError;
use crate::store::Store;
use lookout_plugin_sdk::abi::{self, LookoutBuf, LookoutHostApi, RC_ERROR, RC_OK};
use lookout_plugin_sdk::wire::{self, RowBytes};
use lookout_plugin_sdk::{HostRequest, HostResponse};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct HostCtx<'a> {
    store: &'a Store,
    /// The first store failure met answering the plugin, not counting requests the store
    /// refuses as invalid (the plugin's own fault, which it is told of). A Mutex, not a
    /// Cell: the context is reached through a shared pointer, from whatever thread calls.
    failed: std::sync::Mutex<Option<HostFailure>>,
    /// Nanoseconds spent answering the plugin's calls (`detect --timings` tells a
    /// detector's own work from its reads of the store). Atomic for the reason `failed`
    /// is a Mutex.
    answering_ns: AtomicU64,
}

/// Runs `f` with a host API table that answers from `store`; the table is only valid
/// inside `f`. Returns what `f` returned, or the first store failure met answering the
/// plugin's calls: the plugin was told, but what it did with that (say, took a failed
/// look-up for no rows) cannot be trusted, so the pass must not commit. Adds to
/// `answering` the time spent answering the plugin's calls (decoding each request,
/// reading the store, encoding the answer).
pub fn with_host_api<R>(
    store: &Store,
    answering: &mut Duration,
    f: impl FnOnce(&LookoutHostApi) -> R,
) -> Result<R, HostFailure> {
    let mut ctx = HostCtx { store, failed: std::sync::Mutex::new(None), answering_ns: AtomicU64::new(0) };
    let api = LookoutHostApi { ctx: (&mut ctx as *mut HostCtx<'_>).cast::<c_void>(), call: host_call, free: host_free };
    let out = f(&api);
    *answering += Duration::from_nanos(ctx.answering_ns.into_inner());
    match ctx.failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Why a detector's answer cannot be trusted: the host failed it during the call.
#[derive(Debug, thiserror::Error)]
pub enum HostFailure {
    /// The store failed: the whole pass stops, as after any store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The host panicked answering one of the detector's calls (a bug of the host's, or
    /// stored bytes it did not expect): that detector's pass fails and is retried after
    /// its wait; the others go on.
    #[error("the host panicked answering a detector's call: {0}")]
    Panicked(String),
}

fn answer(ctx: &HostCtx<'_>, req: HostRequest) -> Result<Vec<u8>, String> {
    let store = ctx.store;
    #[cfg(test)]
    if tests::PANIC_ANSWERING.with(|p| p.replace(false)) {
        panic!("a host bug met answering a detector (test)");
    }
    let result = match req {
        HostRequest::GetRows(keys) => store.get_rows_where(&keys, &[]).map(|r| wire::rows_answer(&r)),
        HostRequest::GetRowsWhere { keys, filter } => {
            store.get_rows_where(&keys, &filter).map(|r| wire::rows_answer(&r))
        }
        HostRequest::GetColumnsWhere { keys, filter, columns } => {
            store.get_columns_where(&keys, &filter, &columns).map(|r| wire::rows_answer(&r))
        }
        HostRequest::Lookup { table, sha1, device_id } => {
            store.lookup(&table, &sha1, device_id.as_deref()).map(|r| wire::rows_answer(&r))
        }
        HostRequest::LookupWhere { table, sha1, device_id, filter } => {
            store.lookup_where(&table, &sha1, device_id.as_deref(), &filter).map(|r| wire::rows_answer(&r))
        }
        HostRequest::LookupMany { table, keys, filter } => {
            store.lookup_many(&table, &keys, &filter).map(|sets| wire::row_sets_answer(&sets))
        }
        HostRequest::LookupBy { table, key, filter } => {
            store.lookup_by(&table, &key, &filter).map(|r| wire::rows_answer(&r))
        }
        HostRequest::Profile(sha1) => store.profile(&sha1).map(|p| wire::profile_answer(p.as_ref())),
        HostRequest::Profiles(sha1s) => sha1s
            .iter()
            .map(|s| store.profile(s))
            .collect::<Result<Vec<Option<RowBytes>>, StoreError>>()
            .map(|p| wire::profiles_answer(&p)),
    };
    result.or_else(|e| {
        let told = abi::encode(&HostResponse::Error(format!("store error: {}", crate::error::Chain(&e))));
        if !e.is_invalid_request() {
            tracing::error!(error = %crate::error::Chain(&e), "store failed answering a detector; its pass is not committed");
            ctx.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(HostFailure::Store(e));
        }
        told
    })
}

/// # Safety
/// `out` must be null or point to a writable `LookoutBuf`.
unsafe fn give(bytes: Vec<u8>, out: *mut LookoutBuf) {
    if out.is_null() {
        return;
    }
    let boxed = bytes.into_boxed_slice();
    let len = boxed.len();
    let ptr = Box::into_raw(boxed).cast::<u8>();
    // SAFETY: `out` is non-null and points to the plugin's LookoutBuf for this call.
    unsafe { *out = LookoutBuf { ptr, len } };
}

/// `LookoutHostApi::call`.
///
/// # Safety
/// As documented on `LookoutHostApi::call`: `ctx` is the table's context (a `HostCtx`
/// made by [`with_host_api`], or null), `input` null or `len` readable bytes, `out` null
/// or a writable `LookoutBuf`, all during the evaluate call the table was made for.
unsafe extern "C" fn host_call(ctx: *mut c_void, input: *const u8, len: usize, out: *mut LookoutBuf) -> i32 {
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| {
        if ctx.is_null() {
            return Err("null host context".to_string());
        }
        // SAFETY: `ctx` is the HostCtx created by `with_host_api`, alive for the whole
        // evaluate call during which the plugin may call back.
        let ctx = unsafe { &*(ctx as *const HostCtx<'_>) };
        let input = if input.is_null() || len == 0 {
            &[][..]
        } else {
            // SAFETY: the plugin passes `len` readable bytes at `input` for this call.
            unsafe { std::slice::from_raw_parts(input, len) }
        };
        let req: HostRequest = wire::decode_host_request(input)?;
        let answered = answer(ctx, req);
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        ctx.answering_ns.fetch_add(ns, Ordering::Relaxed);
        answered
    }));
    let (rc, bytes) = match result {
        Ok(Ok(bytes)) => (RC_OK, bytes),
        Ok(Err(msg)) => (RC_ERROR, msg.into_bytes()),
        Err(payload) => {
            // A bug of the host's (or damaged stored bytes it did not expect): the plugin
            // is told, but what it does with that (take it for no rows, say) cannot be
            // trusted, so the pass must not commit, as after a store failure.
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string());
            tracing::error!(panic = %what, "the host panicked answering a detector; its pass is not committed");
            if !ctx.is_null() {
                // SAFETY: as above: the HostCtx made by `with_host_api`, alive for the
                // whole evaluate call; only its mutex is touched.
                let ctx = unsafe { &*(ctx as *const HostCtx<'_>) };
                ctx.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(HostFailure::Panicked(what));
            }
            (RC_ERROR, b"host panicked answering the request".to_vec())
        }
    };
    // SAFETY: `out` is null or the plugin's writable LookoutBuf, per this function's contract.
    unsafe { give(bytes, out) };
    rc
}

/// `LookoutHostApi::free`.
///
/// # Safety
/// `ptr`/`len` must be exactly a buffer [`host_call`] wrote, not yet freed.
unsafe extern "C" fn host_free(ptr: *mut u8, len: usize) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: the plugin returns a buffer `give` leaked as a Box<[u8]> of this length.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::normalise::{normalise, TableHints};
    use lookout_plugin_sdk::tables::FILE_EVENTS;
    use lookout_plugin_sdk::{Condition, Row};

    fn write(report: i64, sha1: &str, device: &str, action: &str) -> crate::parse::normalise::NormalRow {
        let text = format!(
            r#"{{"Timestamp":"2025-05-07T16:55:49Z","DeviceId":"{device}","SHA1":"{sha1}","ReportId":{report},"ActionType":"{action}"}}"#
        );
        let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
        normalise(obj, Some(FILE_EVENTS), &TableHints::default()).unwrap()
    }

    /// A `LookupMany` answers exactly what one `LookupWhere` per (SHA1, DeviceId) would, in
    /// the order asked, with an empty set for a look-up that finds nothing.
    #[test]
    fn lookup_many_answers_each_lookup_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut b = store.batch();
        for (i, (sha1, device, action)) in [
            ("s1", "d1", "FileCreated"),
            ("s1", "d1", "FileDeleted"),
            ("s1", "d2", "FileModified"),
            ("s2", "d1", "FileRenamed"),
        ]
        .into_iter()
        .enumerate()
        {
            b.add_row(&write(i as i64, sha1, device, action), 0).unwrap();
        }
        b.commit().unwrap();
        let filter = vec![Condition::In {
            column: "ActionType".into(),
            any_of: vec!["filecreated".into(), "FileModified".into(), "FileRenamed".into()],
        }];
        let keys: Vec<(String, Option<String>)> = vec![
            ("s2".into(), Some("d1".into())),
            ("s1".into(), None),
            ("nope".into(), None),
            ("s1".into(), Some("d1".into())),
        ];
        // The answer is the payload a plugin decodes.
        let ctx = HostCtx { store: &store, failed: Default::default(), answering_ns: AtomicU64::new(0) };
        let payload = answer(
            &ctx,
            HostRequest::LookupMany { table: FILE_EVENTS.into(), keys: keys.clone(), filter: filter.clone() },
        )
        .unwrap();
        let HostResponse::RowSets(sets) = abi::decode(&payload).unwrap() else { panic!("not a RowSets answer") };
        let one_by_one: Vec<Vec<Row>> =
            keys.iter().map(|(s, d)| store.lookup_where(FILE_EVENTS, s, d.as_deref(), &filter).unwrap()).collect();
        assert_eq!(sets, one_by_one);
        let reports = |rows: &[Row]| rows.iter().map(|r| r.get("ReportId").cloned()).collect::<Vec<_>>();
        use lookout_plugin_sdk::Cell::Int;
        assert_eq!(reports(&sets[0]), vec![Some(Int(3))]);
        assert_eq!(sets[1].len(), 2, "both devices' matching writes, not the deletion");
        assert!(sets[2].is_empty());
        assert_eq!(reports(&sets[3]), vec![Some(Int(0))]);
    }

    thread_local! {
        /// Makes this thread's next [`answer`] panic, as a host bug would.
        pub(super) static PANIC_ANSWERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Calls `api` with `request` as a plugin does: the return code and the answer.
    fn call(api: &LookoutHostApi, request: &[u8]) -> (i32, Vec<u8>) {
        let mut out = LookoutBuf { ptr: std::ptr::null_mut(), len: 0 };
        // SAFETY: the table's own context, a readable request and a writable buffer,
        // during the call the table was made for; the buffer is freed by `free`.
        let rc = unsafe { (api.call)(api.ctx, request.as_ptr(), request.len(), &mut out) };
        // SAFETY: `out` is exactly the buffer `call` wrote, read and then freed once.
        let bytes = unsafe {
            let bytes = std::slice::from_raw_parts(out.ptr, out.len).to_vec();
            (api.free)(out.ptr, out.len);
            bytes
        };
        (rc, bytes)
    }

    /// A panic of the host's answering a call is told to the plugin and fails the pass: a
    /// plugin that took the failed call for no rows must not have its answer committed.
    #[test]
    fn a_host_panic_answering_a_call_fails_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let request = wire::encode_host_request(&HostRequest::Profile("s1".into())).unwrap();
        let outcome = with_host_api(&store, &mut Duration::default(), |api| {
            PANIC_ANSWERING.with(|p| p.set(true));
            call(api, &request)
        });
        let e = outcome.expect_err("a host panic fails the pass");
        assert!(matches!(e, HostFailure::Panicked(_)), "the detector's failure, not the store's: {e:?}");
        assert!(e.to_string().contains("the host panicked answering a detector"), "{e}");
        // Without the panic, the same call answers and the pass stands.
        let (rc, _) = with_host_api(&store, &mut Duration::default(), |api| call(api, &request)).expect("no failure");
        assert_eq!(rc, RC_OK);
    }

    /// The time spent answering a plugin's calls is counted apart from the plugin's own
    /// work (`detect --timings`), and added to what a pass counted before (its chunks).
    #[test]
    fn the_time_answering_calls_is_counted_apart_from_the_plugin_s_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let request = wire::encode_host_request(&HostRequest::Profile("s1".into())).unwrap();
        let own = Duration::from_millis(20);
        let mut answering = Duration::ZERO;
        let started = Instant::now();
        with_host_api(&store, &mut answering, |api| {
            call(api, &request);
            std::thread::sleep(own);
        })
        .unwrap();
        let whole = started.elapsed();
        assert!(answering > Duration::ZERO, "the call was timed");
        assert!(answering + own <= whole, "the plugin's own {own:?} are not counted: {answering:?} of {whole:?}");
        let before = answering;
        with_host_api(&store, &mut answering, |api| call(api, &request)).unwrap();
        assert!(answering > before, "added to, not replaced");
        let mut none = Duration::ZERO;
        with_host_api(&store, &mut none, |_| std::thread::sleep(own)).unwrap();
        assert_eq!(none, Duration::ZERO, "no call, nothing counted");
    }

    /// A request the store refuses as invalid (a look-up on an index no detector declared)
    /// is answered with the error and does not fail the pass: the plugin asked wrongly,
    /// the store is fine.
    #[test]
    fn an_invalid_request_is_told_to_the_plugin_and_does_not_fail_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let request = wire::encode_host_request(&HostRequest::LookupBy {
            table: FILE_EVENTS.into(),
            key: vec![("FileName".into(), "a.exe".into())],
            filter: Vec::new(),
        })
        .unwrap();
        let outcome = with_host_api(&store, &mut Duration::default(), |api| call(api, &request));
        let (rc, bytes) = outcome.expect("an invalid request does not fail the pass");
        assert_eq!(rc, RC_OK);
        let HostResponse::Error(message) = abi::decode(&bytes).unwrap() else { panic!("not an error answer") };
        assert!(message.contains("declare it"), "{message}");
    }
}
