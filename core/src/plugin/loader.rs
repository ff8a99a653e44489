//! The host side of the C ABI (see `lookout_plugin_sdk::abi` for the contract). All
//! calls into a library go through here.

// One of the three modules allowed `unsafe` (the workspace denies it): loading a library
// and calling its exports cannot be done without it.
#![allow(unsafe_code)]

use super::error::Refused;
use lookout_plugin_sdk::abi::EvalResponseRef;
use lookout_plugin_sdk::abi::{
    self, AbiVersionFn, EvaluateFn, FreeFn, InitFn, LookoutBuf, LookoutHostApi, ManifestFn, ABI_VERSION, RC_OK,
    RC_PANIC,
};
use lookout_plugin_sdk::{EvalRequest, InitRequest, InitResponse, Manifest};
use std::path::Path;

/// A loaded library's exports. The library is never unloaded (its code may still be
/// referenced by thread-locals or statics), so the function pointers stay valid.
pub struct PluginLib {
    manifest: ManifestFn,
    init: InitFn,
    evaluate: EvaluateFn,
    free: FreeFn,
}

/// Why a call failed: the plugin's own message (or what was wrong with its answer).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub panicked: bool,
    pub message: String,
}

/// Loads the library at `path` (a verified private copy) and checks the handshake: the
/// library must speak an ABI this host accepts (`abi::host_accepts`).
pub fn load(path: &Path) -> Result<PluginLib, Refused> {
    // Every symbol bound now (`RTLD_NOW`): a library that needs one no library provides
    // (a C plugin with a typo, a library it forgot to link) is refused here, instead of
    // the dynamic loader ending the whole process at its first call.
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
    // SAFETY: loading runs the library's initialisers. The file is a private copy whose
    // bytes were verified by `guard` (ownership, permissions, complete, optional pin) just
    // before.
    let lib = unsafe { libloading::os::unix::Library::open(Some(path), flags) }.map_err(Refused::Load)?;
    let lib: &'static libloading::Library = Box::leak(Box::new(libloading::Library::from(lib)));
    // SAFETY: trusts that a library exporting this name was built with the SDK, which
    // declares it with exactly this signature: an export of that name with another type
    // would be called as this function. Only the guard's checks (who may write the
    // folder and the file, the optional pin) stand between an arbitrary library and this
    // call, as they do before its initialisers ran above.
    let version: AbiVersionFn =
        unsafe { lib.get::<AbiVersionFn>(abi::SYM_ABI_VERSION) }.map(|s| *s).map_err(|_| Refused::NotAPlugin)?;
    // SAFETY: `lookout_abi_version` takes no arguments and returns a u32 by contract.
    let v = unsafe { version() };
    if !abi::host_accepts(ABI_VERSION, v) {
        return Err(Refused::AbiVersion { plugin: v, host: ABI_VERSION });
    }
    let sym = |name: &[u8]| -> Result<(), Refused> {
        // SAFETY: only checks presence; the pointer is not called here.
        unsafe { lib.get::<*const ()>(name) }
            .map(|_| ())
            .map_err(|_| Refused::MissingSymbol(String::from_utf8_lossy(name).into_owned()))
    };
    sym(abi::SYM_MANIFEST)?;
    sym(abi::SYM_INIT)?;
    sym(abi::SYM_EVALUATE)?;
    sym(abi::SYM_FREE)?;
    // SAFETY: the ABI version is one this host accepts, so these symbols have the SDK's
    // signatures.
    unsafe {
        Ok(PluginLib {
            manifest: *lib.get::<ManifestFn>(abi::SYM_MANIFEST).map_err(Refused::Load)?,
            init: *lib.get::<InitFn>(abi::SYM_INIT).map_err(Refused::Load)?,
            evaluate: *lib.get::<EvaluateFn>(abi::SYM_EVALUATE).map_err(Refused::Load)?,
            free: *lib.get::<FreeFn>(abi::SYM_FREE).map_err(Refused::Load)?,
        })
    }
}

/// A buffer a library filled, handed back to the library's allocator when dropped (also
/// when reading it panics).
struct Answer {
    free: FreeFn,
    buf: LookoutBuf,
}

impl Answer {
    fn bytes(&self) -> &[u8] {
        // No allocation is longer than isize::MAX: such a length is garbage, and a slice
        // of it undefined behaviour even over a valid pointer. It reads as no answer.
        if self.buf.ptr.is_null() || self.buf.len > isize::MAX as usize {
            return &[];
        }
        // SAFETY: the plugin filled the buffer with `len` initialised bytes it allocated;
        // they stay valid until `drop` hands them back, and `&self` outlives no drop.
        unsafe { std::slice::from_raw_parts(self.buf.ptr, self.buf.len) }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if !self.buf.ptr.is_null() {
            // SAFETY: returning the plugin's own buffer to it, exactly as it was handed
            // over, once (this guard is its only owner). The library is never unloaded.
            unsafe { (self.free)(self.buf.ptr, self.buf.len) };
        }
    }
}

/// A pass's answer, read in place: findings, state and the rest borrow from the library's
/// buffer (megabytes for a pass with many findings) instead of being copied out of it.
pub struct EvalAnswer(Answer);

impl EvalAnswer {
    pub fn response(&self) -> Result<EvalResponseRef<'_>, CallError> {
        lookout_plugin_sdk::wire::decode_eval_response(self.0.bytes()).map_err(|e| CallError {
            panicked: false,
            message: format!("returned a response that does not decode: {e}"),
        })
    }
}

impl PluginLib {
    /// Calls an export that fills a buffer; the buffer goes back to the library when the
    /// answer is dropped.
    fn fill(&self, f: impl FnOnce(*mut LookoutBuf) -> i32) -> (i32, Answer) {
        let mut answer = Answer { free: self.free, buf: LookoutBuf::empty() };
        let rc = f(&mut answer.buf);
        (rc, answer)
    }

    /// Calls an export that fills a buffer and hands the buffer to `read` in place.
    fn call<R>(&self, f: impl FnOnce(*mut LookoutBuf) -> i32, read: impl FnOnce(i32, &[u8]) -> R) -> R {
        let (rc, answer) = self.fill(f);
        read(rc, answer.bytes())
    }

    fn error(rc: i32, bytes: &[u8]) -> CallError {
        let msg = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned();
        CallError {
            panicked: rc == RC_PANIC,
            message: if msg.is_empty() { format!("failed with code {rc}") } else { msg },
        }
    }

    /// A call's answer: the plugin's error, or its payload decoded (`what` says which
    /// call answered, for the message).
    fn answer<T: serde::de::DeserializeOwned>(rc: i32, bytes: &[u8], what: &str) -> Result<T, CallError> {
        if rc != RC_OK {
            return Err(Self::error(rc, bytes));
        }
        abi::decode_small::<T>(bytes)
            .map_err(|e| CallError { panicked: false, message: format!("{what} a response that does not decode: {e}") })
    }

    pub fn manifest(&self) -> Result<Manifest, Refused> {
        // SAFETY: `lookout_manifest` writes one buffer into `out`, per the ABI.
        self.call(
            |out| unsafe { (self.manifest)(out) },
            |rc, bytes| {
                if rc != RC_OK {
                    return Err(Refused::Manifest(Self::error(rc, bytes)));
                }
                let manifest = abi::decode_small::<Manifest>(bytes).map_err(Refused::ManifestGarbage)?;
                check_manifest(&manifest).map_err(Refused::ManifestGarbage)?;
                Ok(manifest)
            },
        )
    }

    pub fn init(&self, req: &InitRequest) -> Result<InitResponse, CallError> {
        let input = abi::encode(req).map_err(|m| CallError { panicked: false, message: m })?;
        // SAFETY: `input` is live for the call; the plugin writes one buffer into `out`.
        self.call(
            |out| unsafe { (self.init)(input.as_ptr(), input.len(), out) },
            |rc, bytes| Self::answer(rc, bytes, "init returned"),
        )
    }

    /// A pass: the plugin's answer, to be read with [`EvalAnswer::response`].
    pub fn evaluate(&self, host: &LookoutHostApi, req: &EvalRequest) -> Result<EvalAnswer, CallError> {
        let input = lookout_plugin_sdk::wire::encode_eval_request(req);
        // SAFETY: `host` and `input` outlive the call; the plugin writes one buffer.
        let (rc, answer) = self.fill(|out| unsafe { (self.evaluate)(host, input.as_ptr(), input.len(), out) });
        if rc != RC_OK {
            return Err(Self::error(rc, answer.bytes()));
        }
        Ok(EvalAnswer(answer))
    }
}

/// What the host needs of a manifest beyond its decoding: a name to key its cursor and
/// state by, and indexes it can build. Refused at load, a bad declaration never reaches
/// the store, where it would fail the pass of every detector.
fn check_manifest(m: &Manifest) -> Result<(), String> {
    if m.name.trim().is_empty() {
        return Err("the detector has no name".into());
    }
    // A detector's cursor, state and wake-up are kept under `name@version`: with no `@`
    // in the name, two detectors cannot share them.
    if m.name.contains('@') || m.name.chars().any(char::is_control) {
        return Err(format!("the detector's name {:?} has an `@` or a control character; rename it", m.name));
    }
    for (i, decl) in m.indexes.iter().enumerate() {
        if decl.table.is_empty() || decl.columns.is_empty() || decl.columns.iter().any(|c| c.is_empty()) {
            return Err(format!(
                "index {i} ({decl:?}) needs a table and at least one named column; fix the detector's `indexes`"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_manifest;
    use lookout_plugin_sdk::{IndexDecl, Manifest};

    fn manifest(indexes: Vec<IndexDecl>) -> Manifest {
        Manifest {
            name: "a-detector".into(),
            version: "1.0.0".into(),
            title: String::new(),
            description: String::new(),
            severity: "low".into(),
            mitre: Vec::new(),
            inputs: vec!["DeviceProcessEvents".into()],
            parameters: Vec::new(),
            indexes,
        }
    }

    fn index(table: &str, columns: &[&str]) -> IndexDecl {
        IndexDecl { table: table.into(), columns: columns.iter().map(|c| c.to_string()).collect(), covers: Vec::new() }
    }

    #[test]
    fn a_bad_name_or_an_index_without_a_table_or_a_column_is_refused_at_load() {
        assert_eq!(check_manifest(&manifest(vec![index("DeviceProcessEvents", &["SHA1", "DeviceId"])])), Ok(()));
        for bad in
            [index("DeviceProcessEvents", &[]), index("", &["SHA1"]), index("DeviceProcessEvents", &["SHA1", ""])]
        {
            let err = check_manifest(&manifest(vec![index("DeviceProcessEvents", &["SHA1"]), bad])).unwrap_err();
            assert!(err.starts_with("index 1 ("), "{err}");
        }
        for name in [" ", "a@b", "@wake:x", "a\nb"] {
            let mut bad = manifest(Vec::new());
            bad.name = name.into();
            assert!(check_manifest(&bad).is_err(), "{name:?}");
        }
    }
}
