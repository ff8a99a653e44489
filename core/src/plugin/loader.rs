//! The host side of the C ABI (see `lookout_plugin_sdk::abi` for the contract). All
//! calls into a library go through here.

use lookout_plugin_sdk::abi::{
    self, AbiVersionFn, EvaluateFn, FreeFn, InitFn, LookoutBuf, LookoutHostApi, ManifestFn, ABI_VERSION, RC_OK,
    RC_PANIC,
};
use lookout_plugin_sdk::{EvalRequest, EvalResponse, InitRequest, InitResponse, Manifest};
use std::path::Path;

/// A loaded library's exports. The library is never unloaded (its code may still be
/// referenced by thread-locals or statics), so the function pointers stay valid.
pub struct PluginLib {
    manifest: ManifestFn,
    init: InitFn,
    evaluate: EvaluateFn,
    free: FreeFn,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    pub panicked: bool,
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Loads the library at `path` (a verified private copy) and checks the handshake.
pub fn load(path: &Path) -> Result<PluginLib, String> {
    // SAFETY: loading runs the library's initialisers. The file is a private copy whose
    // bytes were verified by `guard` (ownership, permissions, optional pin) just before.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("cannot load: {e}"))?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    // SAFETY: the symbol, if present, is declared by the SDK with exactly this signature;
    // a library that exports it with another type is not a Lookout plugin and is refused
    // below by the version check before anything else is called.
    let version: AbiVersionFn = unsafe { lib.get::<AbiVersionFn>(abi::SYM_ABI_VERSION) }
        .map(|s| *s)
        .map_err(|_| "not a Lookout plugin: it exports no lookout_abi_version (build it with lookout_plugin_sdk::export_detector!)".to_string())?;
    // SAFETY: `lookout_abi_version` takes no arguments and returns a u32 by contract.
    let v = unsafe { version() };
    if v != ABI_VERSION {
        return Err(format!(
            "speaks plugin ABI version {v}, this Lookout speaks {ABI_VERSION}; rebuild it against the matching lookout-plugin-sdk"
        ));
    }
    let sym = |name: &[u8]| -> Result<(), String> {
        // SAFETY: only checks presence; the pointer is not called here.
        unsafe { lib.get::<*const ()>(name) }
            .map(|_| ())
            .map_err(|_| format!("missing symbol {}: not a complete Lookout plugin", String::from_utf8_lossy(name)))
    };
    sym(abi::SYM_MANIFEST)?;
    sym(abi::SYM_INIT)?;
    sym(abi::SYM_EVALUATE)?;
    sym(abi::SYM_FREE)?;
    // SAFETY: the ABI version matched, so these symbols have the SDK's signatures.
    unsafe {
        Ok(PluginLib {
            manifest: *lib.get::<ManifestFn>(abi::SYM_MANIFEST).map_err(|e| e.to_string())?,
            init: *lib.get::<InitFn>(abi::SYM_INIT).map_err(|e| e.to_string())?,
            evaluate: *lib.get::<EvaluateFn>(abi::SYM_EVALUATE).map_err(|e| e.to_string())?,
            free: *lib.get::<FreeFn>(abi::SYM_FREE).map_err(|e| e.to_string())?,
        })
    }
}

impl PluginLib {
    /// Calls an export that fills a buffer, copies the buffer and hands it back to the
    /// library's allocator.
    fn call(&self, f: impl FnOnce(*mut LookoutBuf) -> i32) -> (i32, Vec<u8>) {
        let mut out = LookoutBuf::empty();
        let rc = f(&mut out);
        let bytes = if out.ptr.is_null() {
            Vec::new()
        } else {
            // SAFETY: the plugin filled `out` with `len` initialised bytes it allocated;
            // they stay valid until we pass them to its `lookout_free`, right after copying.
            let b = unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec();
            // SAFETY: returning the plugin's own buffer to it, once.
            unsafe { (self.free)(out.ptr, out.len) };
            b
        };
        (rc, bytes)
    }

    fn error(rc: i32, bytes: &[u8]) -> CallError {
        let msg = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned();
        CallError {
            panicked: rc == RC_PANIC,
            message: if msg.is_empty() { format!("failed with code {rc}") } else { msg },
        }
    }

    pub fn manifest(&self) -> Result<Manifest, String> {
        // SAFETY: `lookout_manifest` writes one buffer into `out`, per the ABI.
        let (rc, bytes) = self.call(|out| unsafe { (self.manifest)(out) });
        if rc != RC_OK {
            return Err(format!("manifest failed: {}", Self::error(rc, &bytes)));
        }
        abi::decode::<Manifest>(&bytes).map_err(|e| format!("manifest is garbage: {e}"))
    }

    pub fn init(&self, req: &InitRequest) -> Result<InitResponse, CallError> {
        let input = abi::encode(req).map_err(|m| CallError { panicked: false, message: m })?;
        // SAFETY: `input` is live for the call; the plugin writes one buffer into `out`.
        let (rc, bytes) = self.call(|out| unsafe { (self.init)(input.as_ptr(), input.len(), out) });
        if rc != RC_OK {
            return Err(Self::error(rc, &bytes));
        }
        abi::decode::<InitResponse>(&bytes).map_err(|e| CallError {
            panicked: false,
            message: format!("init returned a response that does not decode: {e}"),
        })
    }

    pub fn evaluate(&self, host: &LookoutHostApi, req: &EvalRequest) -> Result<EvalResponse, CallError> {
        let input = abi::encode(req).map_err(|m| CallError { panicked: false, message: m })?;
        // SAFETY: `host` and `input` outlive the call; the plugin writes one buffer.
        let (rc, bytes) = self.call(|out| unsafe { (self.evaluate)(host, input.as_ptr(), input.len(), out) });
        if rc != RC_OK {
            return Err(Self::error(rc, &bytes));
        }
        abi::decode::<EvalResponse>(&bytes).map_err(|e| CallError {
            panicked: false,
            message: format!("returned a response that does not decode: {e}"),
        })
    }
}
