//! The plugin side of the C ABI: the bodies behind the symbols [`crate::export_detector!`]
//! generates. This is the only place in the SDK with `unsafe`: raw buffers in and out.

use crate::abi::{
    self, EvalRequest, EvalResponse, InitRequest, InitResponse, LookoutBuf, LookoutHostApi, RC_BAD_PAYLOAD, RC_ERROR,
    RC_NOT_INITIALISED, RC_OK, RC_PANIC,
};
use crate::context::Context;
use crate::detector::Detector;
use crate::params::Params;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

/// Hands `bytes` to the caller through `out`; the caller returns it via `lookout_free`.
fn give(bytes: Vec<u8>, out: *mut LookoutBuf) {
    if out.is_null() {
        return;
    }
    let boxed = bytes.into_boxed_slice();
    let len = boxed.len();
    let ptr = Box::into_raw(boxed) as *mut u8;
    // SAFETY: `out` is non-null and, per the ABI contract, points to a writable LookoutBuf
    // owned by the caller for the duration of the call.
    unsafe {
        *out = LookoutBuf { ptr, len };
    }
}

/// Frees a buffer this library handed out through [`give`].
///
/// # Safety
/// `ptr`/`len` must come from a `LookoutBuf` this library returned, and be freed once.
pub unsafe fn free_buf(ptr: *mut u8, len: usize) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: the caller guarantees ptr/len came from `give`, which leaked a Box<[u8]> of
    // exactly this length.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
}

/// Copies a buffer the host returned and hands it back to the host's allocator.
pub(crate) fn take_host_buf(host: &LookoutHostApi, out: &LookoutBuf) -> Vec<u8> {
    if out.ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: the host filled `out` with a buffer of `len` initialised bytes that stays
    // valid until we pass it to `host.free`, which we do right after copying.
    let bytes = unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec();
    (host.free)(out.ptr, out.len);
    bytes
}

fn fail(rc: i32, msg: String, out: *mut LookoutBuf) -> i32 {
    give(msg.into_bytes(), out);
    rc
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("detector panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("detector panicked: {s}")
    } else {
        "detector panicked".to_string()
    }
}

/// Body of `lookout_manifest`.
pub fn run_manifest<D: Detector>(out: *mut LookoutBuf) -> i32 {
    match catch_unwind(|| abi::encode(&D::manifest())) {
        Ok(Ok(bytes)) => {
            give(bytes, out);
            RC_OK
        }
        Ok(Err(e)) => fail(RC_ERROR, e, out),
        Err(p) => fail(RC_PANIC, panic_message(p), out),
    }
}

/// Body of `lookout_init`.
///
/// # Safety
/// `input` must point to `len` readable bytes for the duration of the call.
pub unsafe fn run_init<D: Detector>(
    slot: &Mutex<Option<D>>,
    input: *const u8,
    len: usize,
    out: *mut LookoutBuf,
) -> i32 {
    // SAFETY: guaranteed by the caller (the host passes a live buffer of `len` bytes).
    let input = unsafe { slice_or_empty(input, len) };
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<D, (i32, String)> {
        let req: InitRequest = abi::decode(input).map_err(|e| (RC_BAD_PAYLOAD, e))?;
        let params = Params::resolve(&D::manifest(), &req.params).map_err(|e| (RC_ERROR, e))?;
        D::init(&params, &req.state).map_err(|e| (RC_ERROR, e))
    }));
    let mut guard = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match result {
        Ok(Ok(detector)) => {
            let response = InitResponse { inputs: detector.inputs() };
            match abi::encode(&response) {
                Ok(bytes) => {
                    *guard = Some(detector);
                    give(bytes, out);
                    RC_OK
                }
                Err(e) => {
                    *guard = None;
                    fail(RC_ERROR, e, out)
                }
            }
        }
        Ok(Err((rc, msg))) => {
            *guard = None;
            fail(rc, msg, out)
        }
        Err(p) => {
            *guard = None;
            fail(RC_PANIC, panic_message(p), out)
        }
    }
}

/// Body of `lookout_evaluate`.
///
/// # Safety
/// `host` must point to a host API table valid for the call, and `input` to `len`
/// readable bytes.
pub unsafe fn run_evaluate<D: Detector>(
    slot: &Mutex<Option<D>>,
    host: *const LookoutHostApi,
    input: *const u8,
    len: usize,
    out: *mut LookoutBuf,
) -> i32 {
    // SAFETY: guaranteed by the caller.
    let input = unsafe { slice_or_empty(input, len) };
    // SAFETY: the host passes either null or a table that outlives this call.
    let host = unsafe { host.as_ref() };
    let mut guard = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(detector) = guard.as_mut() else {
        return fail(RC_NOT_INITIALISED, "evaluate called before a successful init".into(), out);
    };
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<u8>, (i32, String)> {
        let req: EvalRequest = abi::decode(input).map_err(|e| (RC_BAD_PAYLOAD, e))?;
        let mut ctx = Context::new(host, req.now);
        detector.evaluate(&req, &mut ctx).map_err(|e| (RC_ERROR, e))?;
        let resp = EvalResponse { findings: ctx.findings, state: ctx.state, inputs: ctx.inputs };
        abi::encode(&resp).map_err(|e| (RC_ERROR, e))
    }));
    match result {
        Ok(Ok(bytes)) => {
            give(bytes, out);
            RC_OK
        }
        Ok(Err((rc, msg))) => fail(rc, msg, out),
        Err(p) => {
            // The instance may be half-updated: drop it so the host must re-init it from
            // the committed state.
            *guard = None;
            fail(RC_PANIC, panic_message(p), out)
        }
    }
}

/// # Safety
/// `ptr` must be null (then `len` is ignored) or point to `len` readable bytes.
unsafe fn slice_or_empty<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: non-null and `len` readable bytes, per the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// Exports a [`Detector`] type as a Lookout plugin library.
///
/// ```ignore
/// lookout_plugin_sdk::export_detector!(MyDetector);
/// ```
#[macro_export]
macro_rules! export_detector {
    ($ty:ty) => {
        static __LOOKOUT_INSTANCE: ::std::sync::Mutex<Option<$ty>> = ::std::sync::Mutex::new(None);

        #[no_mangle]
        pub extern "C" fn lookout_abi_version() -> u32 {
            $crate::abi::ABI_VERSION
        }

        #[no_mangle]
        pub extern "C" fn lookout_manifest(out: *mut $crate::abi::LookoutBuf) -> i32 {
            $crate::export::run_manifest::<$ty>(out)
        }

        /// # Safety
        /// Called by the Lookout host with a live input buffer.
        #[no_mangle]
        pub unsafe extern "C" fn lookout_init(input: *const u8, len: usize, out: *mut $crate::abi::LookoutBuf) -> i32 {
            // SAFETY: the host passes `len` readable bytes at `input` and a writable `out`.
            unsafe { $crate::export::run_init::<$ty>(&__LOOKOUT_INSTANCE, input, len, out) }
        }

        /// # Safety
        /// Called by the Lookout host with a live host table and input buffer.
        #[no_mangle]
        pub unsafe extern "C" fn lookout_evaluate(
            host: *const $crate::abi::LookoutHostApi,
            input: *const u8,
            len: usize,
            out: *mut $crate::abi::LookoutBuf,
        ) -> i32 {
            // SAFETY: the host passes a table valid for the call, `len` readable bytes at
            // `input` and a writable `out`.
            unsafe { $crate::export::run_evaluate::<$ty>(&__LOOKOUT_INSTANCE, host, input, len, out) }
        }

        /// # Safety
        /// `ptr`/`len` must be a buffer this library returned.
        #[no_mangle]
        pub unsafe extern "C" fn lookout_free(ptr: *mut u8, len: usize) {
            // SAFETY: the host only frees buffers this library gave it, once.
            unsafe { $crate::export::free_buf(ptr, len) }
        }
    };
}
