//! The process's memory settings that Lookout's figures depend on, shared by the
//! `lookout` binary and the benchmark binaries so that both measure the same process.

/// Turns transparent huge pages off for this process. mimalloc asks for them on its
/// arenas, and every first touch of one then costs the kernel zeroing 2 MiB (with
/// compaction stalls when memory is fragmented): on the 1M-row fleet a `detect
/// --backfill` took 82–110 ms with them and 52–64 ms without, a tick 1.8–7.7 ms and
/// 2.0–2.5 ms, ingest the same, peak RSS a quarter lower (BENCHMARKS.md).
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(error = %e, "cannot turn transparent huge pages off; running with them");
    }
}
