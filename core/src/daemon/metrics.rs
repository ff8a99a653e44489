//! What the daemon counts, and its exposition in the Prometheus text format (0.0.4),
//! encoded by `prometheus-client`.
//!
//! Two histograms are kept as they happen: the duration of each detector pass, and the
//! latency from reading to writing a finding (see [`Metrics::observe_findings`]). The rest
//! are figures the daemon or the database already holds (rows per table, rejects by reason,
//! bytes behind per file, …), turned into metric families at each scrape.

use crate::store::Counters;
use crate::tail::Behind;
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::time::Duration;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A detector's labels: its manifest name and version, apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct DetectorLabels {
    pub detector: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableLabel {
    table: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PathLabel {
    path: String,
}

/// Upper bounds (seconds) of the pass duration buckets: a pass over a few new rows takes
/// milliseconds, a backfill over millions of rows tens of seconds.
const PASS_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Upper bounds (seconds) of the finding latency buckets: normally well under a second
/// (a notification, a read, a pass, a write), up to the rescan interval when a
/// notification is missed, longer when the daemon is behind.
const LATENCY_BUCKETS: [f64; 15] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

type HistogramFamily = Family<DetectorLabels, Histogram, fn() -> Histogram>;

fn pass_histogram() -> Histogram {
    Histogram::new(PASS_BUCKETS)
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A detector's running totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DetectorTotals {
    pub rows: u64,
    pub findings: u64,
    pub failures: u64,
}

/// Daemon-side figures (the row and reject counters come from the database).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub detectors: BTreeMap<DetectorLabels, DetectorTotals>,
    /// Seconds per detector pass. Shared by clones (the endpoint renders a clone).
    pass_seconds: HistogramFamily,
    /// Seconds from reading to writing a finding (see [`Metrics::observe_findings`]).
    finding_latency: HistogramFamily,
    pub plugin_load_failures: u64,
    /// Rows stored by this process, per table (a counter: it only goes up, from 0 at
    /// start; what the store holds, which retention brings down, is a gauge).
    pub ingested: BTreeMap<String, u64>,
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
    /// Detectors loaded from the plugins folder now.
    pub detectors_loaded: u64,
    /// Times writing the findings file failed (the file's own failure; the findings are
    /// kept and written later).
    pub findings_write_failures: u64,
    /// Findings committed and not in the findings file, as of the last failed write (0
    /// once it writes again).
    pub findings_unwritten: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            detectors: BTreeMap::new(),
            pass_seconds: Family::new_with_constructor(pass_histogram),
            finding_latency: Family::new_with_constructor(latency_histogram),
            plugin_load_failures: 0,
            ingested: BTreeMap::new(),
            behind: Vec::new(),
            polls: 0,
            skipped_files: BTreeMap::new(),
            restarts: 0,
            disk_space_low: false,
            disk_space_pauses: 0,
            detectors_loaded: 0,
            findings_write_failures: 0,
            findings_unwritten: 0,
        }
    }
}

impl Metrics {
    /// Counts the rows a look or a round stored.
    pub fn observe_stored(&mut self, new_rows: &BTreeMap<String, u64>) {
        for (table, n) in new_rows {
            *self.ingested.entry(table.clone()).or_insert(0) += n;
        }
    }

    /// One detector pass: its duration, rows handed over, new findings, and whether it failed.
    pub fn observe_pass(
        &mut self,
        detector: &DetectorLabels,
        elapsed: Duration,
        rows: u64,
        findings: u64,
        failed: bool,
    ) {
        self.pass_seconds.get_or_create(detector).observe(elapsed.as_secs_f64());
        let totals = self.detectors.entry(detector.clone()).or_default();
        totals.rows += rows;
        totals.findings += findings;
        totals.failures += u64::from(failed);
    }

    /// `count` finding lines of `detector` were just written to the findings file,
    /// `latency` after the look at the logs folder that read the rows they were found in
    /// began (see `lookout_finding_latency_seconds` in [`render`]).
    pub fn observe_findings(&mut self, detector: &DetectorLabels, count: u64, latency: Duration) {
        let histogram = self.finding_latency.get_or_create(detector);
        for _ in 0..count {
            histogram.observe(latency.as_secs_f64());
        }
    }
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn gauge(value: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

fn counters<L, I>(values: I) -> Family<L, Counter>
where
    L: EncodeLabelSet + Clone + Eq + std::hash::Hash + std::fmt::Debug,
    I: IntoIterator<Item = (L, u64)>,
{
    let family = Family::<L, Counter>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).inc_by(value);
    }
    family
}

fn gauges<L, I>(values: I) -> Family<L, Gauge>
where
    L: EncodeLabelSet + Clone + Eq + std::hash::Hash + std::fmt::Debug,
    I: IntoIterator<Item = (L, u64)>,
{
    let family = Family::<L, Gauge>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).set(i64::try_from(value).unwrap_or(i64::MAX));
    }
    family
}

/// Renders the metrics page (Prometheus text format 0.0.4; see [`CONTENT_TYPE`]).
pub fn render(m: &Metrics, c: &Counters) -> String {
    let mut r = Registry::with_prefix("lookout");
    let table = |t: &String| TableLabel { table: t.clone() };
    let reason = |r: &String| ReasonLabel { reason: r.clone() };
    r.register(
        "rows_ingested",
        "Rows stored by this process since it started, per table",
        counters(m.ingested.iter().map(|(t, n)| (table(t), *n))),
    );
    r.register(
        "rows_stored",
        "Rows the store holds, per table (retention removes the oldest)",
        gauges(c.rows.iter().map(|(t, n)| (table(t), *n))),
    );
    r.register("duplicates_skipped", "Rows not stored because they were stored already", counter(c.duplicates));
    r.register(
        "rows_expired",
        "Rows not stored because they were already older than the retention when they arrived",
        counter(c.expired),
    );
    r.register("rows_removed", "Stored rows removed by retention", counter(c.removed));
    r.register(
        "rows_rejected",
        "Bad records kept aside, per reason",
        counters(c.rejected.iter().map(|(k, n)| (reason(k), *n))),
    );
    r.register(
        "source_bytes_behind",
        "Bytes of a log file not yet read",
        gauges(m.behind.iter().map(|b| (PathLabel { path: b.path.clone() }, b.bytes))),
    );
    r.register(
        "detector_pass_duration_seconds",
        "Duration of detector passes (the _count is the number of passes)",
        m.pass_seconds.clone(),
    );
    r.register(
        "finding_latency_seconds",
        "Seconds from the start of the look at the logs folder that read a finding's newest rows \
         to the finding's line being written to the findings file, per detector (findings of passes \
         that follow a look that stored no rows, e.g. after a plugin was added, are not counted)",
        m.finding_latency.clone(),
    );
    let per_detector = |f: fn(&DetectorTotals) -> u64| counters(m.detectors.iter().map(|(d, t)| (d.clone(), f(t))));
    r.register("detector_rows", "Rows handed to the detector", per_detector(|t| t.rows));
    r.register("findings", "New findings, per detector", per_detector(|t| t.findings));
    r.register("detector_failures", "Failed passes (error or panic), per detector", per_detector(|t| t.failures));
    r.register("plugin_load_failures", "Plugin libraries refused or failing to load", counter(m.plugin_load_failures));
    r.register(
        "files_skipped",
        "Entries of the logs folder that are not read, per reason",
        gauges(m.skipped_files.iter().map(|(k, n)| (reason(k), *n))),
    );
    r.register("work_restarts", "Times the work loop failed (e.g. disk full) and was restarted", counter(m.restarts));
    r.register(
        "disk_space_low",
        "1 while ingestion and detection are paused because the data directory's disk is nearly full",
        gauge(u64::from(m.disk_space_low)),
    );
    r.register(
        "disk_space_pauses",
        "Times ingestion and detection paused for disk space",
        counter(m.disk_space_pauses),
    );
    r.register("polls", "Looks at the logs directory", counter(m.polls));
    r.register("detectors_loaded", "Detectors loaded from the plugins folder", gauge(m.detectors_loaded));
    r.register(
        "findings_write_failures",
        "Times writing the findings file failed (its folder, permissions or disk); the findings are kept \
         in the database and written once it can be",
        counter(m.findings_write_failures),
    );
    r.register(
        "findings_unwritten",
        "Findings kept in the database and not yet in the findings file, as of the last failed write \
         (0 while it writes)",
        gauge(m.findings_unwritten),
    );
    // Per detector, its longest call running now (none: no series).
    let mut running: BTreeMap<DetectorLabels, u64> = BTreeMap::new();
    for (call, ran) in crate::plugin::running::now_running() {
        let labels = DetectorLabels { detector: call.detector, version: call.version };
        let longest = running.entry(labels).or_default();
        *longest = (*longest).max(ran.as_secs());
    }
    r.register(
        "detector_call_running_seconds",
        "Seconds the detector's longest call (init or evaluate) running now has run; a value that \
         keeps growing is a detector stuck in its own code, holding up its pass",
        gauges(running),
    );
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would be a bug, shown on the page.
    if let Err(e) = prometheus_text::encode(&mut out, &r) {
        out.push_str(&format!("# encoding the metrics failed: {e}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A promtool-style look at the page: every family has HELP and TYPE, every sample
    /// belongs to a declared family, counters end in _total, histograms have cumulative
    /// buckets ending at +Inf and a _sum and _count per series.
    fn check(text: &str) -> Result<BTreeMap<String, String>, String> {
        let mut types = BTreeMap::new();
        let mut helps = BTreeSet::new();
        let mut buckets: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
        let mut sums = BTreeSet::new();
        let mut counts: BTreeMap<String, f64> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').ok_or(format!("HELP without text: {line}"))?;
                if help.trim().is_empty() || !helps.insert(name.to_string()) {
                    return Err(format!("empty or second HELP: {line}"));
                }
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or(format!("TYPE without kind: {line}"))?;
                if !helps.contains(name) {
                    return Err(format!("TYPE before HELP: {line}"));
                }
                if kind == "counter" && !name.ends_with("_total") {
                    return Err(format!("counter without _total: {line}"));
                }
                types.insert(name.to_string(), kind.to_string());
            } else {
                let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
                let value: f64 = value.parse().map_err(|_| format!("bad value: {line}"))?;
                let (name, labels) = series.split_once('{').unwrap_or((series, ""));
                let family = |suffix: &str| {
                    name.strip_suffix(suffix).filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                };
                // A histogram series: its family and labels other than `le`.
                let series_of = |f: &str, labels: &str| format!("{f}{{{}}}", labels.trim_end_matches(['}', ',']));
                if let Some(f) = family("_bucket") {
                    let (rest, le) = labels.rsplit_once("le=\"").ok_or(format!("bucket without le: {line}"))?;
                    let le = le.trim_end_matches("\"}").to_string();
                    buckets.entry(series_of(f, rest)).or_default().push((le, value));
                } else if let Some(f) = family("_sum") {
                    sums.insert(series_of(f, labels));
                } else if let Some(f) = family("_count") {
                    counts.insert(series_of(f, labels), value);
                } else if !types.contains_key(name) {
                    return Err(format!("sample without TYPE: {line}"));
                }
            }
        }
        for (series, b) in &buckets {
            if b.last().map(|(le, _)| le.as_str()) != Some("+Inf") {
                return Err(format!("{series}: buckets do not end at +Inf"));
            }
            if b.windows(2).any(|w| w[0].1 > w[1].1) {
                return Err(format!("{series}: buckets are not cumulative"));
            }
            let count = counts.get(series).ok_or(format!("{series}: no _count"))?;
            if b.last().map(|l| l.1) != Some(*count) || !sums.contains(series) {
                return Err(format!("{series}: _count or _sum missing or not the +Inf bucket"));
            }
        }
        Ok(types)
    }

    #[test]
    fn the_page_is_prometheus_text_with_histograms_and_separate_detector_labels() {
        let mut m = Metrics::default();
        let winrm = DetectorLabels { detector: "winrm".into(), version: "1.0.0".into() };
        m.observe_pass(&winrm, Duration::from_millis(3), 10, 2, false);
        m.observe_pass(&winrm, Duration::from_secs(2), 5, 0, true);
        m.observe_findings(&winrm, 2, Duration::from_millis(40));
        m.behind = vec![Behind { path: "odd \"name\\\n".into(), bytes: 7 }];
        m.disk_space_low = true;
        m.ingested.insert("DeviceFileEvents".into(), 15);
        let mut c = Counters::default();
        c.rows.insert("DeviceFileEvents".into(), 12);
        c.rejected.insert("malformed_json".into(), 1);
        (c.expired, c.removed, m.detectors_loaded) = (3, 4, 2);
        let call = crate::plugin::running::enter("metrics-test-stuck", "2.0.0", "evaluate");
        let page = render(&m, &c);
        drop(call);
        let types = check(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
        for (family, kind) in [
            ("lookout_rows_ingested_total", "counter"),
            ("lookout_rows_stored", "gauge"),
            ("lookout_rows_rejected_total", "counter"),
            ("lookout_source_bytes_behind", "gauge"),
            ("lookout_detector_pass_duration_seconds", "histogram"),
            ("lookout_finding_latency_seconds", "histogram"),
            ("lookout_detector_rows_total", "counter"),
            ("lookout_findings_total", "counter"),
            ("lookout_detector_failures_total", "counter"),
            ("lookout_plugin_load_failures_total", "counter"),
            ("lookout_disk_space_low", "gauge"),
            ("lookout_rows_expired_total", "counter"),
            ("lookout_rows_removed_total", "counter"),
            ("lookout_detectors_loaded", "gauge"),
            ("lookout_detector_call_running_seconds", "gauge"),
        ] {
            assert_eq!(types.get(family).map(String::as_str), Some(kind), "{family}\n{page}");
        }
        let has = |line: &str| page.lines().any(|l| l == line);
        assert!(has(r#"lookout_detector_pass_duration_seconds_count{detector="winrm",version="1.0.0"} 2"#), "{page}");
        assert!(has(r#"lookout_detector_pass_duration_seconds_bucket{detector="winrm",version="1.0.0",le="0.005"} 1"#));
        assert!(has(r#"lookout_finding_latency_seconds_bucket{detector="winrm",version="1.0.0",le="0.05"} 2"#));
        assert!(has(r#"lookout_findings_total{detector="winrm",version="1.0.0"} 2"#));
        assert!(has(r#"lookout_detector_failures_total{detector="winrm",version="1.0.0"} 1"#));
        assert!(has(r#"lookout_detector_rows_total{detector="winrm",version="1.0.0"} 15"#));
        assert!(has(r#"lookout_rows_ingested_total{table="DeviceFileEvents"} 15"#));
        assert!(has(r#"lookout_rows_stored{table="DeviceFileEvents"} 12"#));
        assert!(has(r#"lookout_source_bytes_behind{path="odd \"name\\\n"} 7"#), "label values are escaped\n{page}");
        assert!(has("lookout_disk_space_low 1"));
        assert!(has("lookout_rows_expired_total 3") && has("lookout_rows_removed_total 4"), "{page}");
        assert!(has("lookout_detectors_loaded 2"), "{page}");
        assert!(
            has(r#"lookout_detector_call_running_seconds{detector="metrics-test-stuck",version="2.0.0"} 0"#),
            "{page}"
        );
        assert!(!render(&m, &c).contains("metrics-test-stuck"), "a call that ended has no series");
        // A clone (what the endpoint renders) shares the histograms.
        let clone = m.clone();
        m.observe_pass(&winrm, Duration::from_millis(1), 0, 0, false);
        assert!(render(&clone, &c)
            .contains(r#"lookout_detector_pass_duration_seconds_count{detector="winrm",version="1.0.0"} 3"#));
    }

    #[test]
    fn the_checker_rejects_a_histogram_without_count() {
        let bad = "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\n";
        assert!(check(bad).is_err());
        let ok = "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n";
        check(ok).unwrap();
    }
}
