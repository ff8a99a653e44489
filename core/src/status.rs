//! The status report shared by `lookout status`, `--json` and the daemon's `/status`.

use crate::store::{keys, Store};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct TableStatus {
    pub rows: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub path: String,
    pub offset: u64,
    pub unit: &'static str,
    pub compressed: bool,
}

#[derive(Debug, Clone, Serialize)]
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

pub fn status(store: &Store) -> Result<Status> {
    let c = store.counters();
    let sources = store
        .sources()?
        .into_iter()
        .map(|s| SourceStatus {
            path: s.path,
            offset: s.offset,
            unit: match s.unit {
                crate::store::OffsetUnit::Bytes => "bytes",
                crate::store::OffsetUnit::ArrayElements => "array_elements",
            },
            compressed: s.compressed,
        })
        .collect();
    Ok(Status {
        data_dir: store.data_dir().display().to_string(),
        tables: c.rows.iter().map(|(t, n)| (t.clone(), TableStatus { rows: *n })).collect(),
        duplicates_skipped: c.duplicates,
        rejected: c.rejected.values().sum(),
        rejected_by_reason: c.rejected.clone(),
        sources,
        findings: store.db().scan_prefix([keys::FINDING]).count() as u64,
        database_bytes: store.size_on_disk(),
    })
}
