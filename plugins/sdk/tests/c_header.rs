//! `include/lookout_plugin.h` declares what `src/abi.rs` defines: the same constants, the
//! same five exports, the same struct layouts. Checked by reading the header, and (where a
//! C compiler is installed) by compiling a plugin skeleton against it with the layouts
//! Rust computes.

use lookout_plugin_sdk::abi::{self, LookoutBuf, LookoutHostApi};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

fn header_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include").join("lookout_plugin.h")
}

fn header() -> String {
    std::fs::read_to_string(header_path()).expect("include/lookout_plugin.h is readable")
}

/// `#define LOOKOUT_X <integer>` lines.
fn integer_defines(text: &str) -> BTreeMap<String, i64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("#define "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            parts.next().is_none().then(|| (name.to_string(), value))
        })
        .collect()
}

/// The header text with comments removed and whitespace runs made single spaces.
fn normalised(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        rest = rest[start..].find("*/").map_or("", |end| &rest[start + end + 2..]);
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The C prototype of each export, keyed by the symbol name abi.rs exports it under.
fn exports() -> [(&'static [u8], &'static str); 5] {
    [
        (abi::SYM_ABI_VERSION, "uint32_t lookout_abi_version(void);"),
        (abi::SYM_MANIFEST, "int32_t lookout_manifest(LookoutBuf *out);"),
        (abi::SYM_INIT, "int32_t lookout_init(const uint8_t *input, size_t len, LookoutBuf *out);"),
        (
            abi::SYM_EVALUATE,
            "int32_t lookout_evaluate(const LookoutHostApi *host, const uint8_t *input, size_t len, LookoutBuf *out);",
        ),
        (abi::SYM_FREE, "void lookout_free(uint8_t *ptr, size_t len);"),
    ]
}

/// The Rust types the prototypes above translate, spelled out: if abi.rs changes a
/// signature, this stops compiling, and the header (and `exports`) must follow.
#[allow(dead_code)]
fn rust_signatures(
    version: abi::AbiVersionFn,
    manifest: abi::ManifestFn,
    init: abi::InitFn,
    evaluate: abi::EvaluateFn,
    free: abi::FreeFn,
    host: LookoutHostApi,
) {
    let _: unsafe extern "C" fn() -> u32 = version;
    let _: unsafe extern "C" fn(*mut LookoutBuf) -> i32 = manifest;
    let _: unsafe extern "C" fn(*const u8, usize, *mut LookoutBuf) -> i32 = init;
    let _: unsafe extern "C" fn(*const LookoutHostApi, *const u8, usize, *mut LookoutBuf) -> i32 = evaluate;
    let _: unsafe extern "C" fn(*mut u8, usize) = free;
    let LookoutHostApi { ctx, call, free } = host;
    let _: *mut c_void = ctx;
    let _: unsafe extern "C" fn(*mut c_void, *const u8, usize, *mut LookoutBuf) -> i32 = call;
    let _: unsafe extern "C" fn(*mut u8, usize) = free;
    let LookoutBuf { ptr, len } = LookoutBuf::empty();
    let _: (*mut u8, usize) = (ptr, len);
}

#[test]
fn header_constants_are_abi_rs_constants() {
    let defines = integer_defines(&header());
    let want: [(&str, i64); 8] = [
        ("LOOKOUT_ABI_VERSION_MAJOR", abi::ABI_VERSION_MAJOR.into()),
        ("LOOKOUT_ABI_VERSION_MINOR", abi::ABI_VERSION_MINOR.into()),
        ("LOOKOUT_PAYLOAD_VERSION", abi::PAYLOAD_VERSION.into()),
        ("LOOKOUT_RC_OK", abi::RC_OK.into()),
        ("LOOKOUT_RC_ERROR", abi::RC_ERROR.into()),
        ("LOOKOUT_RC_PANIC", abi::RC_PANIC.into()),
        ("LOOKOUT_RC_BAD_PAYLOAD", abi::RC_BAD_PAYLOAD.into()),
        ("LOOKOUT_RC_NOT_INITIALISED", abi::RC_NOT_INITIALISED.into()),
    ];
    for (name, value) in want {
        assert_eq!(defines.get(name), Some(&value), "{name} in lookout_plugin.h");
    }
    assert_eq!(defines.len(), want.len(), "a constant in the header that this test does not check: {defines:?}");
    let text = normalised(&header());
    assert!(
        text.contains(
            "#define LOOKOUT_ABI_VERSION ((uint32_t)((LOOKOUT_ABI_VERSION_MAJOR << 16) | LOOKOUT_ABI_VERSION_MINOR))"
        ),
        "LOOKOUT_ABI_VERSION is major << 16 | minor, as abi::abi_version encodes it"
    );
}

#[test]
fn header_declares_the_five_exports_and_both_structs() {
    let text = normalised(&header());
    for (symbol, prototype) in exports() {
        let name = std::str::from_utf8(symbol).unwrap();
        assert!(prototype.contains(&format!(" {name}(")), "{prototype} is {name}");
        assert!(text.contains(prototype), "lookout_plugin.h lacks `{prototype}`");
        assert_eq!(text.matches(&format!("{name}(")).count(), 1, "{name} declared once");
    }
    assert!(text.contains("typedef struct LookoutBuf { uint8_t *ptr; size_t len; } LookoutBuf;"));
    assert!(text.contains(
        "typedef struct LookoutHostApi { void *ctx; \
         int32_t (*call)(void *ctx, const uint8_t *input, size_t len, LookoutBuf *out); \
         void (*free)(uint8_t *ptr, size_t len); } LookoutHostApi;"
    ));
}

/// A plugin skeleton in C: each export defined with the header's prototype (a mismatch
/// is a compile error), the struct layouts asserted against Rust's.
const SKELETON: &str = r#"
#include "lookout_plugin.h"

_Static_assert(sizeof(LookoutBuf) == RUST_SIZEOF_BUF, "LookoutBuf size");
_Static_assert(offsetof(LookoutBuf, ptr) == RUST_OFFSET_BUF_PTR, "LookoutBuf.ptr");
_Static_assert(offsetof(LookoutBuf, len) == RUST_OFFSET_BUF_LEN, "LookoutBuf.len");
_Static_assert(sizeof(LookoutHostApi) == RUST_SIZEOF_HOST, "LookoutHostApi size");
_Static_assert(offsetof(LookoutHostApi, ctx) == RUST_OFFSET_HOST_CTX, "LookoutHostApi.ctx");
_Static_assert(offsetof(LookoutHostApi, call) == RUST_OFFSET_HOST_CALL, "LookoutHostApi.call");
_Static_assert(offsetof(LookoutHostApi, free) == RUST_OFFSET_HOST_FREE, "LookoutHostApi.free");
_Static_assert(LOOKOUT_ABI_VERSION == RUST_ABI_VERSION, "ABI version");

uint32_t lookout_abi_version(void) { return LOOKOUT_ABI_VERSION; }

int32_t lookout_manifest(LookoutBuf *out) {
    out->ptr = NULL;
    out->len = 0;
    return LOOKOUT_RC_ERROR;
}

int32_t lookout_init(const uint8_t *input, size_t len, LookoutBuf *out) {
    (void)input;
    (void)len;
    return lookout_manifest(out);
}

int32_t lookout_evaluate(const LookoutHostApi *host, const uint8_t *input, size_t len, LookoutBuf *out) {
    LookoutBuf answer = { NULL, 0 };
    int32_t rc = host->call(host->ctx, input, len, &answer);
    host->free(answer.ptr, answer.len);
    out->ptr = NULL;
    out->len = 0;
    return rc == LOOKOUT_RC_OK ? LOOKOUT_RC_OK : LOOKOUT_RC_ERROR;
}

void lookout_free(uint8_t *ptr, size_t len) {
    (void)ptr;
    (void)len;
}
"#;

#[test]
fn a_c_plugin_skeleton_compiles_against_the_header_with_rusts_layouts() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    // Rust links with the C toolchain on Linux, so one is there wherever the tests build.
    let found = Command::new(&cc).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "no C compiler ({cc}, or set CC): it compiles the header against Rust's layouts");
    let dir = tempfile_dir();
    let source = dir.join("skeleton.c");
    std::fs::write(&source, SKELETON).unwrap();
    let defines = [
        ("RUST_SIZEOF_BUF", size_of::<LookoutBuf>()),
        ("RUST_OFFSET_BUF_PTR", offset_of!(LookoutBuf, ptr)),
        ("RUST_OFFSET_BUF_LEN", offset_of!(LookoutBuf, len)),
        ("RUST_SIZEOF_HOST", size_of::<LookoutHostApi>()),
        ("RUST_OFFSET_HOST_CTX", offset_of!(LookoutHostApi, ctx)),
        ("RUST_OFFSET_HOST_CALL", offset_of!(LookoutHostApi, call)),
        ("RUST_OFFSET_HOST_FREE", offset_of!(LookoutHostApi, free)),
        ("RUST_ABI_VERSION", abi::ABI_VERSION as usize),
    ];
    let include = header_path().parent().unwrap().to_path_buf();
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fPIC", "-shared", "-o"])
        .arg(dir.join("libskeleton.so"))
        .arg("-I")
        .arg(&include)
        .args(defines.iter().map(|(k, v)| format!("-D{k}={v}u")))
        .arg(&source)
        .output()
        .unwrap();
    assert!(out.status.success(), "{cc} failed on the skeleton:\n{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory under the target's temporary folder (no tempfile dependency here).
fn tempfile_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("c_header-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
