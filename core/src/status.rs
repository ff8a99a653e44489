//! The status report shared by `lookout status`, `--json` and the daemon's `/status`.

use crate::error::StoreError;
use crate::store::{dec, keys, Counters, SourceState, Store};
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
}

pub fn status(store: &Store) -> Result<Status, StoreError> {
    status_of(store.db(), store.data_dir())
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
    })
}
