//! The callbacks a plugin makes into the host during `lookout_evaluate`: row fetches,
//! (table, SHA1, DeviceId) look-ups and FileProfile, answered from the store.

// One of the three modules allowed `unsafe` (the workspace denies it): the callbacks are
// called by the plugin with raw pointers.
#![allow(unsafe_code)]

use crate::error::StoreError;
use crate::store::Store;
use lookout_plugin_sdk::abi::{self, LookoutBuf, LookoutHostApi, RC_ERROR, RC_OK};
use lookout_plugin_sdk::{HostRequest, HostResponse};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

struct HostCtx<'a> {
    store: &'a Store,
}

/// Runs `f` with a host API table that answers from `store`; the table is only valid
/// inside `f`.
pub fn with_host_api<R>(store: &Store, f: impl FnOnce(&LookoutHostApi) -> R) -> R {
    let mut ctx = HostCtx { store };
    let api = LookoutHostApi { ctx: (&mut ctx as *mut HostCtx<'_>).cast::<c_void>(), call: host_call, free: host_free };
    f(&api)
}

fn answer(store: &Store, req: HostRequest) -> HostResponse {
    let result = match req {
        HostRequest::GetRows(keys) => keys
            .iter()
            .filter_map(|k| store.get_row(k).transpose())
            .collect::<Result<Vec<_>, StoreError>>()
            .map(HostResponse::Rows),
        HostRequest::GetRowsWhere { keys, filter } => keys
            .iter()
            .filter_map(|k| store.get_row_where(k, &filter).transpose())
            .collect::<Result<Vec<_>, StoreError>>()
            .map(HostResponse::Rows),
        HostRequest::GetColumnsWhere { keys, filter, columns } => keys
            .iter()
            .filter_map(|k| store.get_columns_where(k, &filter, &columns).transpose())
            .collect::<Result<Vec<_>, StoreError>>()
            .map(HostResponse::Rows),
        HostRequest::Lookup { table, sha1, device_id } => {
            store.lookup(&table, &sha1, device_id.as_deref()).map(HostResponse::Rows)
        }
        HostRequest::LookupWhere { table, sha1, device_id, filter } => {
            store.lookup_where(&table, &sha1, device_id.as_deref(), &filter).map(HostResponse::Rows)
        }
        HostRequest::LookupBy { table, key, filter } => store.lookup_by(&table, &key, &filter).map(HostResponse::Rows),
        HostRequest::Profile(sha1) => store.profile(&sha1).map(HostResponse::Profile),
        HostRequest::Profiles(sha1s) => {
            sha1s.iter().map(|s| store.profile(s)).collect::<Result<Vec<_>, StoreError>>().map(HostResponse::Profiles)
        }
    };
    result.unwrap_or_else(|e| HostResponse::Error(format!("store error: {}", crate::error::Chain(&e))))
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
        let req: HostRequest = abi::decode(input)?;
        abi::encode(&answer(ctx.store, req))
    }));
    let (rc, bytes) = match result {
        Ok(Ok(bytes)) => (RC_OK, bytes),
        Ok(Err(msg)) => (RC_ERROR, msg.into_bytes()),
        Err(_) => (RC_ERROR, b"host panicked answering the request".to_vec()),
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
