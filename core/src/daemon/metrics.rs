//! What the daemon counts, and its rendering in the Prometheus text exposition format.

use crate::store::Counters;
use crate::tail::Behind;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Default)]
pub struct DetectorMetrics {
    pub passes: u64,
    pub rows: u64,
    pub findings: u64,
    pub failures: u64,
    pub last_pass_seconds: f64,
}

/// Daemon-side figures (the row and reject counters come from the database).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub detectors: BTreeMap<String, DetectorMetrics>,
    pub plugin_load_failures: u64,
    pub behind: Vec<Behind>,
    pub polls: u64,
    /// Files in the logs folder not read, per reason (symlink, not_a_regular_file, …).
    pub skipped_files: BTreeMap<String, u64>,
    /// Times the work loop failed (e.g. disk full) and was restarted.
    pub restarts: u64,
    /// Whether ingestion and detection are paused for lack of disk space.
    pub disk_space_low: bool,
    /// Times they were paused for lack of disk space.
    pub disk_space_pauses: u64,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, label: Option<(&str, &str)>, value: f64) {
        match label {
            Some((k, v)) => {
                let _ = writeln!(self.out, "{name}{{{k}=\"{}\"}} {value}", escape(v));
            }
            None => {
                let _ = writeln!(self.out, "{name} {value}");
            }
        }
    }
}

/// Renders the metrics page.
pub fn render(m: &Metrics, c: &Counters) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    f.header("lookout_rows_ingested_total", "counter", "Rows stored, per table.");
    for (t, n) in &c.rows {
        f.sample("lookout_rows_ingested_total", Some(("table", t)), *n as f64);
    }
    f.header("lookout_duplicates_skipped_total", "counter", "Rows not stored because they were stored already.");
    f.sample("lookout_duplicates_skipped_total", None, c.duplicates as f64);
    f.header("lookout_rows_rejected_total", "counter", "Bad records kept aside, per reason.");
    for (r, n) in &c.rejected {
        f.sample("lookout_rows_rejected_total", Some(("reason", r)), *n as f64);
    }
    f.header("lookout_source_bytes_behind", "gauge", "Bytes of a log file not yet read.");
    for b in &m.behind {
        f.sample("lookout_source_bytes_behind", Some(("path", &b.path)), b.bytes as f64);
    }
    f.header("lookout_detector_passes_total", "counter", "Detection passes run, per detector.");
    for (d, dm) in &m.detectors {
        f.sample("lookout_detector_passes_total", Some(("detector", d)), dm.passes as f64);
    }
    f.header("lookout_detector_pass_duration_seconds", "gauge", "Duration of the detector's last pass.");
    for (d, dm) in &m.detectors {
        f.sample("lookout_detector_pass_duration_seconds", Some(("detector", d)), dm.last_pass_seconds);
    }
    f.header("lookout_detector_rows_total", "counter", "New rows handed to the detector.");
    for (d, dm) in &m.detectors {
        f.sample("lookout_detector_rows_total", Some(("detector", d)), dm.rows as f64);
    }
    f.header("lookout_findings_total", "counter", "New findings, per detector.");
    for (d, dm) in &m.detectors {
        f.sample("lookout_findings_total", Some(("detector", d)), dm.findings as f64);
    }
    f.header("lookout_detector_failures_total", "counter", "Failed passes (error or panic), per detector.");
    for (d, dm) in &m.detectors {
        f.sample("lookout_detector_failures_total", Some(("detector", d)), dm.failures as f64);
    }
    f.header("lookout_plugin_load_failures_total", "counter", "Plugin libraries refused or failing to load.");
    f.sample("lookout_plugin_load_failures_total", None, m.plugin_load_failures as f64);
    f.header("lookout_files_skipped", "gauge", "Entries of the logs folder that are not read, per reason.");
    for (r, n) in &m.skipped_files {
        f.sample("lookout_files_skipped", Some(("reason", r)), *n as f64);
    }
    f.header(
        "lookout_work_restarts_total",
        "counter",
        "Times the work loop failed (e.g. disk full) and was restarted.",
    );
    f.sample("lookout_work_restarts_total", None, m.restarts as f64);
    f.header(
        "lookout_disk_space_low",
        "gauge",
        "1 while ingestion and detection are paused because the data directory's disk is nearly full.",
    );
    f.sample("lookout_disk_space_low", None, if m.disk_space_low { 1.0 } else { 0.0 });
    f.header("lookout_disk_space_pauses_total", "counter", "Times ingestion and detection paused for disk space.");
    f.sample("lookout_disk_space_pauses_total", None, m.disk_space_pauses as f64);
    f.header("lookout_polls_total", "counter", "Looks at the logs directory.");
    f.sample("lookout_polls_total", None, m.polls as f64);
    out
}
