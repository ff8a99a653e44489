/*
 * lookout_plugin.h: the C ABI of a Lookout detector plugin.
 *
 * The contract is defined in Rust, in lookout-plugin-sdk's src/abi.rs; this header
 * declares the same thing for plugins written in C (or any language that reads C
 * headers). A test of the SDK (tests/c_header.rs) checks every constant, type and
 * prototype here against abi.rs, and compiles a plugin skeleton against it.
 *
 * A plugin is a shared library exporting the five functions below. Payloads are
 * [LOOKOUT_PAYLOAD_VERSION] followed by bincode 2 (standard configuration) of the
 * payload types in abi.rs; each side frees what it allocated.
 *
 * Threads: the host calls one library's exports one at a time, but not always from the
 * same thread (it initialises detectors on one and runs their passes on a thread per
 * core), so keep nothing in thread-local storage between calls; a buffer you returned
 * may be freed from another thread than the one it was returned on.
 */
#ifndef LOOKOUT_PLUGIN_H
#define LOOKOUT_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * ABI version: major << 16 | minor. The host loads a plugin of its own major and a
 * minor no newer than its own.
 */
#define LOOKOUT_ABI_VERSION_MAJOR 0
#define LOOKOUT_ABI_VERSION_MINOR 1
#define LOOKOUT_ABI_VERSION ((uint32_t)((LOOKOUT_ABI_VERSION_MAJOR << 16) | LOOKOUT_ABI_VERSION_MINOR))

/* The first byte of every payload. */
#define LOOKOUT_PAYLOAD_VERSION 6

/* Return codes. On anything but LOOKOUT_RC_OK, `out` holds a UTF-8 message. */
#define LOOKOUT_RC_OK 0
/* The detector returned an error. */
#define LOOKOUT_RC_ERROR 1
/* The detector panicked; the host re-initialises it before the next call. */
#define LOOKOUT_RC_PANIC 2
/* A payload could not be decoded. */
#define LOOKOUT_RC_BAD_PAYLOAD 3
/* lookout_evaluate was called before a successful lookout_init. */
#define LOOKOUT_RC_NOT_INITIALISED 4

/* A byte buffer handed across the boundary; freed by the side that allocated it. */
typedef struct LookoutBuf {
    uint8_t *ptr;
    size_t len;
} LookoutBuf;

/* The host's callback table, valid for the duration of one lookout_evaluate call. */
typedef struct LookoutHostApi {
    void *ctx;
    /* Answers a HostRequest payload with a HostResponse payload in *out. */
    int32_t (*call)(void *ctx, const uint8_t *input, size_t len, LookoutBuf *out);
    /* Frees a buffer that call wrote into *out. */
    void (*free)(uint8_t *ptr, size_t len);
} LookoutHostApi;

/* Returns LOOKOUT_ABI_VERSION. */
uint32_t lookout_abi_version(void);
/* out: Manifest. */
int32_t lookout_manifest(LookoutBuf *out);
/* input: InitRequest; out: InitResponse. */
int32_t lookout_init(const uint8_t *input, size_t len, LookoutBuf *out);
/* input: EvalRequest; out: EvalResponse. The plugin may call host->call meanwhile. */
int32_t lookout_evaluate(const LookoutHostApi *host, const uint8_t *input, size_t len, LookoutBuf *out);
/* Frees a buffer this library returned through an `out`. */
void lookout_free(uint8_t *ptr, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* LOOKOUT_PLUGIN_H */
