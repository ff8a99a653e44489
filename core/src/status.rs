//! The status report shared by `lookout status`, `--json` and the daemon's `/status`.

use crate::error::StoreError;
use crate::store::{Store, StoreReader, Summary};
use lookout_plugin_sdk::time::format_timestamp;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TableStatus {
    pub rows: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SourceStatus {
    pub path: String,
    pub offset: u64,
    pub unit: String,
    pub compressed: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub data_dir: String,
    pub tables: BTreeMap<String, TableStatus>,
    pub duplicates_skipped: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub sources: Vec<SourceStatus>,
    pub findings: u64,
    pub database_bytes: u64,
    /// Rows are kept while their Timestamp ≥ this (RFC 3339); absent: kept forever.
    #[serde(default)]
    pub retention_horizon: Option<String>,
    /// The oldest Timestamp of an event row within retention.
    #[serde(default)]
    pub oldest_kept: Option<String>,
    /// Event rows that arrived already past the horizon (counted, not stored).
    #[serde(default)]
    pub expired: u64,
    /// Rows dropped by retention after being stored.
    #[serde(default)]
    pub removed: u64,
    /// Database bytes per row within retention.
    #[serde(default)]
    pub bytes_per_row: Option<f64>,
    /// Key-index runs: after a large ingest, or while merges are behind, many; a merge
    /// turns eight of a size into one, in the background.
    #[serde(default)]
    pub key_index_runs: u64,
    /// Generations of the data (folders under `gens/`), the unit retention deletes.
    #[serde(default)]
    pub generations: u64,
    /// The column indexes kept, as `table(columns) covers (columns)`: those the detectors
    /// loaded so far declared.
    #[serde(default)]
    pub indexes: Vec<String>,
    /// A Kafka node's owned partitions (`lookout run --kafka`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaStatus>,
}

impl Status {
    /// An empty status of `data_dir` (a Kafka node's, before its partitions are added).
    pub fn empty(data_dir: &Path) -> Status {
        Status {
            data_dir: data_dir.display().to_string(),
            tables: BTreeMap::new(),
            duplicates_skipped: 0,
            rejected: 0,
            rejected_by_reason: BTreeMap::new(),
            sources: Vec::new(),
            findings: 0,
            database_bytes: 0,
            retention_horizon: None,
            oldest_kept: None,
            expired: 0,
            removed: 0,
            bytes_per_row: None,
            key_index_runs: 0,
            generations: 0,
            indexes: Vec::new(),
            kafka: None,
        }
    }

    /// Adds another store's figures (a Kafka node's partitions, one store each).
    pub fn add(&mut self, s: Status) {
        for (t, n) in s.tables {
            self.tables.entry(t).or_insert(TableStatus { rows: 0 }).rows += n.rows;
        }
        self.duplicates_skipped += s.duplicates_skipped;
        self.rejected += s.rejected;
        for (k, v) in s.rejected_by_reason {
            *self.rejected_by_reason.entry(k).or_insert(0) += v;
        }
        self.sources.extend(s.sources);
        self.findings += s.findings;
        self.database_bytes += s.database_bytes;
        self.retention_horizon = self.retention_horizon.take().or(s.retention_horizon);
        // RFC 3339 UTC timestamps of one format: the smaller string is the older time.
        self.oldest_kept = match (self.oldest_kept.take(), s.oldest_kept) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.expired += s.expired;
        self.removed += s.removed;
        self.key_index_runs += s.key_index_runs;
        self.generations += s.generations;
        for i in s.indexes {
            if !self.indexes.contains(&i) {
                self.indexes.push(i);
            }
        }
        let rows: u64 = self.tables.values().map(|t| t.rows).sum();
        self.bytes_per_row = (rows > 0).then(|| self.database_bytes as f64 / rows as f64);
    }
}

/// The partition stores of a stopped Kafka node (`<data>/partitions/*`), by folder name;
/// empty when `data` is not a node's data directory.
pub fn partition_stores(data: &Path) -> Vec<(String, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(data.join("partitions")) else { return Vec::new() };
    let mut out: Vec<(String, std::path::PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().join("db").is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    out.sort();
    out
}

/// What a Kafka node owns and how far behind it is.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct KafkaStatus {
    pub topic: String,
    pub group: String,
    pub partitions: Vec<PartitionStatus>,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The next offset to store (committed with the rows); `None` before the first.
    pub next_offset: Option<i64>,
    /// The partition's end as last seen.
    pub high_watermark: i64,
    /// Messages not yet stored.
    pub lag: i64,
    /// Still catching up with where the partition ended when it was assigned.
    pub replaying: bool,
    /// Rows stored since it was assigned.
    pub rows_stored: u64,
    /// Rows are stored that the detectors have not run over yet.
    #[serde(default)]
    pub detection_pending: bool,
    /// Findings written to the node's JSONL since it was assigned.
    pub findings_written: u64,
}

/// The status with counts of rows within retention (exact: blocks that straddle the
/// horizon are read).
pub fn status(store: &Store) -> Result<Status, StoreError> {
    let mut s = status_of(&store.reader(), store.data_dir())?;
    let kept = store.retained()?;
    s.tables = kept.rows.iter().map(|(t, n)| (t.clone(), TableStatus { rows: *n })).collect();
    s.oldest_kept = kept.oldest.map(format_timestamp);
    let rows: u64 = kept.rows.values().sum();
    s.bytes_per_row = (rows > 0).then(|| s.database_bytes as f64 / rows as f64);
    Ok(s)
}

/// The status from what was last committed (the daemon's endpoint holds only a reader):
/// rows per table are those stored, including any past the horizon whose block is not
/// removed yet (the daemon removes them within a poll or two).
pub fn status_of(reader: &StoreReader, data_dir: &Path) -> Result<Status, StoreError> {
    let Summary { counters: c, sources, findings, bytes_on_disk, horizon, key_index_runs, generations, indexes } =
        reader.summary()?;
    let sources = sources
        .into_iter()
        .map(|s| SourceStatus {
            path: s.path,
            offset: s.offset,
            unit: match s.unit {
                crate::store::OffsetUnit::Bytes => "bytes",
                crate::store::OffsetUnit::ArrayElements => "array_elements",
            }
            .to_string(),
            compressed: s.compressed,
        })
        .collect();
    Ok(Status {
        data_dir: data_dir.display().to_string(),
        tables: c.rows.iter().map(|(t, n)| (t.clone(), TableStatus { rows: *n })).collect(),
        duplicates_skipped: c.duplicates,
        rejected: c.rejected.values().sum(),
        rejected_by_reason: c.rejected.clone(),
        sources,
        findings,
        database_bytes: bytes_on_disk,
        retention_horizon: horizon.map(format_timestamp),
        oldest_kept: None,
        expired: c.expired,
        removed: c.removed,
        bytes_per_row: None,
        key_index_runs,
        generations,
        indexes: indexes.iter().map(index_text).collect(),
        kafka: None,
    })
}

/// An index as the status shows it: `table(columns)`, and ` covers (columns)` if any.
fn index_text(i: &lookout_plugin_sdk::IndexDecl) -> String {
    let mut s = format!("{}({})", i.table, i.columns.join(", "));
    if !i.covers.is_empty() {
        s.push_str(&format!(" covers ({})", i.covers.join(", ")));
    }
    s
}
