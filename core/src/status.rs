//! The status report shared by `lookout status`, `--json` and the daemon's `/status`.

use crate::error::StoreError;
use crate::store::{dec, keys, Counters, SourceState, Store};
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
}

/// The status with counts of rows within retention (exact: blocks that straddle the
/// horizon are read).
pub fn status(store: &Store) -> Result<Status, StoreError> {
    let mut s = status_of(store.db(), store.data_dir())?;
    let kept = store.retained()?;
    s.tables = kept.rows.iter().map(|(t, n)| (t.clone(), TableStatus { rows: *n })).collect();
    s.oldest_kept = kept.oldest.map(format_timestamp);
    let rows: u64 = kept.rows.values().sum();
    s.bytes_per_row = (rows > 0).then(|| s.database_bytes as f64 / rows as f64);
    Ok(s)
}

/// The status read straight from the database (the daemon's endpoint holds only a handle).
pub fn status_of(db: &sled::Db, data_dir: &Path) -> Result<Status, StoreError> {
    let c: Counters = match db.get([keys::COUNTERS])? {
        Some(v) => dec(&v)?,
        None => Counters::default(),
    };
    let sources: Vec<SourceState> =
        db.scan_prefix([keys::SOURCE]).map(|kv| dec(&kv?.1)).collect::<Result<_, StoreError>>()?;
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
        findings: db.scan_prefix([keys::FINDING]).count() as u64,
        database_bytes: db.size_on_disk().unwrap_or(0),
        retention_horizon: db
            .get(keys::named_key(keys::META, "horizon"))?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes))
            .map(format_timestamp),
        oldest_kept: None,
        expired: c.expired,
        removed: c.removed,
        bytes_per_row: None,
    })
}
