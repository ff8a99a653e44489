//! Encoding of stored row values: a schema id (the column names, stored once per
//! distinct column list), the ingestion time, and the cells. Column names are not
//! repeated per row, which keeps the database smaller than the JSON it came from.

use anyhow::{anyhow, Result};
use lookout_plugin_sdk::Cell;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct StoredRowRef<'a> {
    schema: u32,
    ingested_at: i64,
    cells: &'a [Cell],
}

#[derive(Deserialize)]
pub struct StoredRow {
    pub schema: u32,
    pub ingested_at: i64,
    pub cells: Vec<Cell>,
}

pub fn encode(schema: u32, ingested_at: i64, cells: &[Cell]) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(StoredRowRef { schema, ingested_at, cells }, bincode::config::standard())
        .map_err(|e| anyhow!("cannot encode row: {e}"))
}

pub fn decode(bytes: &[u8]) -> Result<StoredRow> {
    Ok(bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| anyhow!("corrupt stored row: {e}"))?
        .0)
}

/// Same schema and cells (the ingestion time may differ).
pub fn same_content(a: &[u8], b: &[u8]) -> bool {
    match (decode(a), decode(b)) {
        (Ok(a), Ok(b)) => a.schema == b.schema && a.cells == b.cells,
        _ => false,
    }
}
