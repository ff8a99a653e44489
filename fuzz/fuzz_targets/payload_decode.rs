//! The plugin payload decoder (and the stored-row and key decoders) on arbitrary bytes:
//! garbage from a plugin must be an error, never a panic or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lookout_plugin_sdk::abi::{decode, decode_borrowed, encode, EvalResponseRef};
use lookout_plugin_sdk::{EvalRequest, EvalResponse, HostRequest, HostResponse, InitRequest, InitResponse, Manifest};

fn check<T: serde::Serialize + serde::de::DeserializeOwned>(data: &[u8]) {
    if let Ok(v) = decode::<T>(data) {
        // What decodes re-encodes to bytes that decode and re-encode to themselves
        // (compared as bytes: a decoded NaN is never equal to itself).
        let again = encode(&v).expect("re-encode");
        let back = decode::<T>(&again).expect("decode re-encoded");
        assert_eq!(encode(&back).expect("re-encode again"), again);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<EvalRequest>(data);
    check::<EvalResponse>(data);
    // The host reads a pass's answer in place: what decodes so must decode owned too.
    if decode_borrowed::<EvalResponseRef<'_>>(data).is_ok() {
        assert!(decode::<EvalResponse>(data).is_ok(), "an answer read in place but not owned");
    }
    check::<HostRequest>(data);
    check::<HostResponse>(data);
    check::<InitRequest>(data);
    check::<InitResponse>(data);
    check::<Manifest>(data);
    let _ = lookout_core::store::codec::decode_view(data);
    let _ = lookout_core::store::detectors::row_key_sha1_device(data);
});
