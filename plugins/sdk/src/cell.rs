//! Column values and rows as they cross the plugin boundary and as they are stored.

use crate::CellRef;
use serde::{Deserialize, Serialize};

/// One column value. Mirrors JSON, but is encodable by bincode (which cannot carry
/// `serde_json::Value`). Nested objects and arrays are kept as their JSON text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Nested JSON (object, array, or a number outside i64/f64), kept verbatim.
    Json(String),
}

impl Cell {
    /// The string value, or `""` for anything that is not a string (KQL strings are never
    /// null, so a missing string column reads as empty).
    pub fn as_str(&self) -> &str {
        match self {
            Cell::Str(s) => s,
            _ => "",
        }
    }

    /// The integer value, if this is an integer.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Cell::Int(v) => Some(*v),
            _ => None,
        }
    }

    /// Converts to a JSON value (nested JSON is re-parsed; if that fails it stays a string).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Cell::Null => Value::Null,
            Cell::Bool(b) => Value::Bool(*b),
            Cell::Int(i) => Value::from(*i),
            Cell::Float(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
            Cell::Str(s) => Value::String(s.clone()),
            Cell::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        }
    }

    /// Converts from a JSON value, keeping nested values as JSON text.
    pub fn from_json(v: &serde_json::Value) -> Cell {
        use serde_json::Value;
        match v {
            Value::Null => Cell::Null,
            Value::Bool(b) => Cell::Bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Cell::Int(i)
                } else if n.is_u64() {
                    Cell::Json(n.to_string())
                } else {
                    n.as_f64().map(Cell::Float).unwrap_or(Cell::Json(n.to_string()))
                }
            }
            Value::String(s) => Cell::Str(s.clone()),
            other => Cell::Json(other.to_string()),
        }
    }
}

/// A stored row: its table, its storage key (its identity), when Lookout ingested it
/// (100 ns ticks since the Unix epoch) and its columns in their original order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub table: String,
    pub key: Vec<u8>,
    pub ingested_at: i64,
    pub columns: Vec<(String, Cell)>,
}

impl Row {
    /// The value of a column, if present.
    pub fn get(&self, name: &str) -> Option<&Cell> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// A string column, `""` when missing or not a string.
    pub fn str(&self, name: &str) -> &str {
        self.get(name).map(Cell::as_str).unwrap_or("")
    }
}

/// A row read in place from the bytes of a host's answer ([`crate::wire::RowSet`]): its
/// table, key, column names and string cells borrowed, nothing copied. For a pass that
/// looks at a few columns of each row once, as a [`Row`] would copy every one of them.
#[derive(Debug, Clone, PartialEq)]
pub struct RowView<'a> {
    pub table: &'a str,
    pub key: &'a [u8],
    pub ingested_at: i64,
    pub columns: Vec<(&'a str, CellRef<'a>)>,
}

impl<'a> RowView<'a> {
    /// The value of a column, if present.
    pub fn get(&self, name: &str) -> Option<CellRef<'a>> {
        self.columns.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
    }

    /// A string column, `""` when missing or not a string.
    pub fn str(&self, name: &str) -> &'a str {
        self.get(name).map_or("", CellRef::as_str)
    }

    /// The row, copied.
    pub fn to_row(&self) -> Row {
        Row {
            table: self.table.to_string(),
            key: self.key.to_vec(),
            ingested_at: self.ingested_at,
            columns: self.columns.iter().map(|(n, c)| (n.to_string(), Cell::from(*c))).collect(),
        }
    }
}

/// What a condition reads of a row: [`Row`] and [`RowView`] alike.
pub trait Cells {
    /// The value of a column, if present.
    fn cell(&self, name: &str) -> Option<CellRef<'_>>;
    /// When Lookout ingested the row (ticks), for `ingestion_time()`.
    fn ingested_at(&self) -> i64;

    /// A string column, `""` when missing or not a string.
    fn str(&self, name: &str) -> &str {
        self.cell(name).map_or("", CellRef::as_str)
    }
}

impl Cells for Row {
    fn cell(&self, name: &str) -> Option<CellRef<'_>> {
        self.get(name).map(CellRef::from)
    }

    fn ingested_at(&self) -> i64 {
        self.ingested_at
    }
}

impl Cells for RowView<'_> {
    fn cell(&self, name: &str) -> Option<CellRef<'_>> {
        self.get(name)
    }

    fn ingested_at(&self) -> i64 {
        self.ingested_at
    }
}
