//! The plugin side of the C ABI: the bodies behind the symbols [`crate::export_detector!`]
//! generates, and the calls into the host's callback table. This is the only place in the
//! SDK with `unsafe`: raw buffers in and out.

// The one SDK module allowed `unsafe` (the workspace denies it): the C ABI is raw pointers.
#![allow(unsafe_code)]

use crate::abi::{
    self, EvalRequest, InitRequest, InitResponse, LookoutBuf, LookoutHostApi, RC_BAD_PAYLOAD, RC_ERROR,
    RC_NOT_INITIALISED, RC_OK, RC_PANIC,
};
use crate::context::Context;
use crate::detector::Detector;
use crate::params::Params;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

/// Hands `bytes` to the caller through `out`; the caller returns it via `lookout_free`.
///
/// # Safety
/// `out` must be null or point to a writable `LookoutBuf`.
unsafe fn give(bytes: Vec<u8>, out: *mut LookoutBuf) {
    if out.is_null() {
        return;
    }
    let boxed = bytes.into_boxed_slice();
    let len = boxed.len();
    let ptr = Box::into_raw(boxed) as *mut u8;
    // SAFETY: `out` is non-null and, per this function's contract, points to a writable
    // LookoutBuf owned by the caller for the duration of the call.
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

/// Sends one request payload to the host and hands its return code and answer to `read`,
/// in place (decoded from the host's buffer, not copied first: an answer of thousands of
/// rows is megabytes, and a copy is that much fresh memory); the buffer then goes back to
/// the host's allocator, also if `read` panics.
///
/// Safe to call because of a crate invariant: a [`Context`] holds a host table only when
/// [`run_evaluate`] made it from the table the host passed to `lookout_evaluate`, and the
/// context does not outlive that call (`Context::new` is crate-private).
pub(crate) fn call_host<R>(host: &LookoutHostApi, input: &[u8], read: impl FnOnce(i32, &[u8]) -> R) -> R {
    /// Hands the host's buffer back when dropped.
    struct HostBuf<'h> {
        host: &'h LookoutHostApi,
        buf: LookoutBuf,
    }
    impl Drop for HostBuf<'_> {
        fn drop(&mut self) {
            if !self.buf.ptr.is_null() {
                // SAFETY: returning the host's own buffer, exactly as it was handed over,
                // once (this guard is its only owner).
                unsafe { (self.host.free)(self.buf.ptr, self.buf.len) };
            }
        }
    }
    let mut answer = HostBuf { host, buf: LookoutBuf::empty() };
    // SAFETY: `host` is the table of the `lookout_evaluate` call in progress (see above),
    // so `host.ctx` is the host's context for it; `input` is a live slice of `len` bytes
    // and `answer.buf` a writable LookoutBuf owned by this frame.
    let rc = unsafe { (host.call)(host.ctx, input.as_ptr(), input.len(), &mut answer.buf) };
    if answer.buf.ptr.is_null() {
        return read(rc, &[]);
    }
    // SAFETY: the host filled the buffer with `len` initialised bytes that stay valid
    // until `answer` hands them back, after `read`.
    let bytes = unsafe { std::slice::from_raw_parts(answer.buf.ptr, answer.buf.len) };
    read(rc, bytes)
}

/// Writes the answer of an export to `out` (the payload on success, a UTF-8 message on
/// failure) and returns its code.
///
/// # Safety
/// `out` must be null or point to a writable `LookoutBuf`.
unsafe fn answer(out: *mut LookoutBuf, (rc, bytes): (i32, Vec<u8>)) -> i32 {
    // SAFETY: passed on from this function's contract.
    unsafe { give(bytes, out) };
    rc
}

fn failed(rc: i32, msg: String) -> (i32, Vec<u8>) {
    (rc, msg.into_bytes())
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
///
/// # Safety
/// `out` must be null or point to a writable `LookoutBuf`.
pub unsafe fn run_manifest<D: Detector>(out: *mut LookoutBuf) -> i32 {
    let result = match catch_unwind(|| abi::encode(&D::manifest())) {
        Ok(Ok(bytes)) => (RC_OK, bytes),
        Ok(Err(e)) => failed(RC_ERROR, e),
        Err(p) => failed(RC_PANIC, panic_message(p)),
    };
    // SAFETY: `out` is null or writable, per this function's contract.
    unsafe { answer(out, result) }
}

/// Body of `lookout_init`.
///
/// # Safety
/// `input` must be null or point to `len` readable bytes for the duration of the call,
/// and `out` must be null or point to a writable `LookoutBuf`.
pub unsafe fn run_init<D: Detector>(
    slot: &Mutex<Option<D>>,
    input: *const u8,
    len: usize,
    out: *mut LookoutBuf,
) -> i32 {
    // SAFETY: guaranteed by the caller (the host passes a live buffer of `len` bytes).
    let input = unsafe { slice_or_empty(input, len) };
    let mut guard = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let old = guard.take();
    // Everything of the author's runs inside: the old instance's `Drop`, `init` and
    // `inputs`. A panic unwinding out of an `extern "C"` function aborts the host.
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<(D, Vec<u8>), (i32, String)> {
        drop(old);
        let req: InitRequest = abi::decode(input).map_err(|e| (RC_BAD_PAYLOAD, e))?;
        let params = Params::resolve(&D::manifest(), &req.params).map_err(|e| (RC_ERROR, e))?;
        let detector = D::init(&params, &req.state).map_err(|e| (RC_ERROR, e))?;
        let bytes = abi::encode(&InitResponse { inputs: detector.inputs() }).map_err(|e| (RC_ERROR, e))?;
        Ok((detector, bytes))
    }));
    let result = match result {
        Ok(Ok((detector, bytes))) => {
            *guard = Some(detector);
            (RC_OK, bytes)
        }
        Ok(Err((rc, msg))) => failed(rc, msg),
        Err(p) => failed(RC_PANIC, panic_message(p)),
    };
    // SAFETY: `out` is null or writable, per this function's contract.
    unsafe { answer(out, result) }
}

/// Body of `lookout_evaluate`.
///
/// # Safety
/// `host` must be null or point to a host API table valid for the call (see
/// [`LookoutHostApi`]), `input` must be null or point to `len` readable bytes, and `out`
/// must be null or point to a writable `LookoutBuf`.
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
    let result = match guard.as_mut() {
        None => failed(RC_NOT_INITIALISED, "evaluate called before a successful init".into()),
        Some(detector) => {
            let result = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<u8>, (i32, String)> {
                let req: EvalRequest = crate::wire::decode_eval_request(input).map_err(|e| (RC_BAD_PAYLOAD, e))?;
                // The table is this call's: the context lives only inside it (see `call_host`).
                let mut ctx = Context::new(host, req.now);
                detector.evaluate(&req, &mut ctx).map_err(|e| (RC_ERROR, e))?;
                crate::wire::eval_response(ctx.findings, &ctx.state, &ctx.inputs, ctx.wake_at)
                    .map_err(|e| (RC_ERROR, e))
            }));
            match result {
                Ok(Ok(bytes)) => (RC_OK, bytes),
                Ok(Err((rc, msg))) => failed(rc, msg),
                Err(p) => {
                    // The instance may be half-updated: drop it so the host must re-init
                    // it from the committed state (its `Drop` may panic too).
                    let broken = guard.take();
                    let _ = catch_unwind(AssertUnwindSafe(|| drop(broken)));
                    failed(RC_PANIC, panic_message(p))
                }
            }
        }
    };
    // SAFETY: `out` is null or writable, per this function's contract.
    unsafe { answer(out, result) }
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

        // Each export carries `allow(unsafe_code)`: `#[no_mangle]` and the unsafe calls
        // into the SDK's `export` module are the C ABI itself, and the plugin crate
        // expanding this macro may deny `unsafe_code` (Lookout's workspace does).
        #[allow(unsafe_code)]
        #[no_mangle]
        pub extern "C" fn lookout_abi_version() -> u32 {
            $crate::abi::ABI_VERSION
        }

        /// # Safety
        /// Called by the Lookout host with a writable `out`.
        #[allow(unsafe_code)]
        #[no_mangle]
        pub unsafe extern "C" fn lookout_manifest(out: *mut $crate::abi::LookoutBuf) -> i32 {
            // SAFETY: the host passes a writable `out`.
            unsafe { $crate::export::run_manifest::<$ty>(out) }
        }

        /// # Safety
        /// Called by the Lookout host with a live input buffer.
        #[allow(unsafe_code)]
        #[no_mangle]
        pub unsafe extern "C" fn lookout_init(input: *const u8, len: usize, out: *mut $crate::abi::LookoutBuf) -> i32 {
            // SAFETY: the host passes `len` readable bytes at `input` and a writable `out`.
            unsafe { $crate::export::run_init::<$ty>(&__LOOKOUT_INSTANCE, input, len, out) }
        }

        /// # Safety
        /// Called by the Lookout host with a live host table and input buffer.
        #[allow(unsafe_code)]
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
        #[allow(unsafe_code)]
        #[no_mangle]
        pub unsafe extern "C" fn lookout_free(ptr: *mut u8, len: usize) {
            // SAFETY: the host only frees buffers this library gave it, once.
            unsafe { $crate::export::free_buf(ptr, len) }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{InputSpec, RC_PANIC};

    /// A detector whose `inputs` panics, and whose instances panic when dropped.
    struct Unruly;

    impl Drop for Unruly {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("dropped on purpose");
            }
        }
    }

    impl Detector for Unruly {
        fn manifest() -> crate::Manifest {
            crate::Manifest {
                name: "unruly".into(),
                version: "0.1.0".into(),
                title: String::new(),
                description: String::new(),
                severity: "low".into(),
                mitre: Vec::new(),
                inputs: vec!["DeviceFileEvents".into()],
                parameters: Vec::new(),
                indexes: Vec::new(),
            }
        }
        fn init(_: &Params, _: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
            Ok(Unruly)
        }
        fn inputs(&self) -> Vec<InputSpec> {
            panic!("inputs panicked on purpose")
        }
        fn evaluate(&mut self, _: &crate::EvalRequest, _: &mut Context<'_>) -> Result<(), String> {
            Ok(())
        }
    }

    /// A panic in the author's `inputs` or `Drop` comes back as `RC_PANIC` with its
    /// message, like one in `init` (unwinding out of the export would abort the host).
    #[test]
    fn a_panic_in_inputs_or_in_drop_is_an_answer_not_an_abort() {
        let slot: Mutex<Option<Unruly>> = Mutex::new(None);
        let req = abi::encode(&InitRequest { params: Vec::new(), state: Vec::new() }).unwrap();
        let init = |slot: &Mutex<Option<Unruly>>| {
            let mut out = LookoutBuf::empty();
            // SAFETY: `req` is live for the call and `out` is a writable LookoutBuf.
            let rc = unsafe { run_init::<Unruly>(slot, req.as_ptr(), req.len(), &mut out) };
            // SAFETY: `out` was filled by `run_init` (give) and is freed once, here.
            let message = unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec();
            // SAFETY: as above.
            unsafe { free_buf(out.ptr, out.len) };
            (rc, String::from_utf8_lossy(&message).into_owned())
        };
        let (rc, message) = init(&slot);
        assert_eq!(rc, RC_PANIC);
        assert!(message.contains("inputs panicked on purpose"), "{message}");
        // An instance in the slot whose drop panics, replaced by a new init.
        *slot.lock().unwrap() = Some(Unruly);
        let (rc, message) = init(&slot);
        assert_eq!(rc, RC_PANIC);
        assert!(message.contains("dropped on purpose"), "{message}");
        assert!(slot.lock().unwrap().is_none());
    }
}
