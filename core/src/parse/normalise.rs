//! Telling a row's table and normalising its columns: `null` in a string column becomes
//! `""` (KQL strings are never null), typed columns are checked, timestamps validated,
//! unknown columns kept verbatim, and the row's identity computed.

use super::record::Raw;
use super::{Reject, RejectKind};
use crate::schema::{column_types, is_key_column, required_columns, table_kind, ColumnType, TableKind};
use crate::store::codec::{ContentNames, EncodedCells};
use lookout_plugin_sdk::time::parse_timestamp;
use lookout_plugin_sdk::{Cell, CellRef};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// A row ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalRow {
    pub table: String,
    pub kind: TableKind,
    /// The column names in input order, shared by the rows that have the same list.
    pub names: Arc<Vec<String>>,
    /// The cells, already in the store's encoding (with the row's content hash): the
    /// parser thread does that work, not the storing one.
    pub cells: EncodedCells,
    pub sha1: String,
    pub device_id: String,
    /// Timestamp in ticks (0 for FileProfile rows).
    pub timestamp: i64,
    /// ReportId as text, or a content hash for rows without one.
    pub identity: String,
    /// Values of a type their column does not have, kept as sent (counted, not dropped).
    pub unexpected_types: u32,
}

/// Where else the table may come from, after the envelope and the `Type` column.
#[derive(Debug, Clone, Default)]
pub struct TableHints {
    pub file_table: Option<String>,
    pub explicit: Option<String>,
}

pub fn normalise<'a, K: Into<Cow<'a, str>>, V: Into<Raw<'a>>>(
    row: impl IntoIterator<Item = (K, V)>,
    category_table: Option<&str>,
    hints: &TableHints,
) -> Result<NormalRow, Reject> {
    normalise_columns(row.into_iter().map(|(k, v)| (k.into(), v.into())).collect(), category_table, hints)
}

/// [`normalise`] of the parser's columns as they come (an identity `collect` of them, in
/// place, still moved every column: 4% of an ingest's CPU).
pub fn normalise_columns<'a>(
    row: Vec<(Cow<'a, str>, Raw<'a>)>,
    category_table: Option<&str>,
    hints: &TableHints,
) -> Result<NormalRow, Reject> {
    let type_column = match row.iter().find(|(k, _)| k == "Type").map(|(_, v)| v) {
        Some(Raw::Str(t)) if !t.is_empty() => Some(t.as_ref()),
        _ => None,
    };
    let table = category_table
        .or(type_column)
        .or(hints.file_table.as_deref())
        .or(hints.explicit.as_deref())
        .ok_or_else(|| {
            Reject::new(
                RejectKind::NoTable,
                "cannot tell the table: no envelope category, no Type column, the file name does not start \
                 with a table name, and no --table was given",
            )
        })?
        .to_string();
    let layout = layout(&table, &row)?;

    let mut cells = Vec::with_capacity(row.len());
    let mut unexpected_types = 0;
    for (i, (name, value)) in row.into_iter().enumerate() {
        let cell = match layout.types[i] {
            None | Some(ColumnType::Dynamic) => Val::from_raw(value),
            Some(t) => match typed_cell(&name, t, value) {
                Typed::Cell(c) => c,
                // A key column must be what the key is made of; any other is kept.
                Typed::Unexpected(reject, _) if layout.key_column[i] => return Err(reject),
                Typed::Unexpected(_, value) => {
                    unexpected_types += 1;
                    Val::from_raw(value)
                }
            },
        };
        cells.push(cell);
    }
    let get = |at: Option<usize>| at.map(|i| &cells[i]);
    for (required, at) in &layout.required {
        match get(*at) {
            Some(Val::Null) | None => {
                return Err(Reject::new(RejectKind::MissingColumn, format!("column {required} is missing or null")))
            }
            Some(Val::Str(s)) if s.is_empty() => {
                return Err(Reject::new(RejectKind::MissingColumn, format!("column {required} is empty")))
            }
            _ => {}
        }
    }
    let kind = layout.kind;
    let sha1 = get(layout.sha1).map(Val::as_str).unwrap_or("").to_string();
    let device_id = get(layout.device_id).map(Val::as_str).unwrap_or("").to_string();
    let timestamp = match (kind, get(layout.timestamp)) {
        (TableKind::Event, Some(Val::Str(s))) => parse_timestamp(s).unwrap_or(0),
        _ => 0,
    };
    let identity = match get(layout.report_id) {
        Some(Val::Int(i)) => i.to_string(),
        Some(Val::Str(s)) if !s.is_empty() => s.to_string(),
        _ => {
            let columns: Vec<(String, Cell)> =
                layout.names.iter().zip(&cells).map(|(n, c)| (n.clone(), c.to_cell())).collect();
            content_hash(&columns)
        }
    };
    let refs: Vec<CellRef<'_>> = cells.iter().map(Val::as_ref).collect();
    let cells = EncodedCells::new(&layout.content, &refs);
    Ok(NormalRow {
        table,
        kind,
        names: layout.names.clone(),
        cells,
        sha1,
        device_id,
        timestamp,
        identity,
        unexpected_types,
    })
}

/// What normalising a row needs to know about its table and column list, worked out
/// once for both: the rows of a file nearly always share them, and looking up ~40
/// column types and scanning for the key columns per row was a quarter of parsing.
pub(super) struct Layout {
    pub(super) table: String,
    pub(super) kind: TableKind,
    /// The column names, shared by every row with this layout (and so with the store,
    /// which finds a row's schema by this pointer).
    pub(super) names: Arc<Vec<String>>,
    /// Each column's type (`None`: a column the schema does not know).
    pub(super) types: Vec<Option<ColumnType>>,
    /// Whether a column is one the row's key is made of.
    pub(super) key_column: Vec<bool>,
    /// The required columns and where they are.
    pub(super) required: Vec<(&'static str, Option<usize>)>,
    pub(super) sha1: Option<usize>,
    pub(super) device_id: Option<usize>,
    pub(super) timestamp: Option<usize>,
    pub(super) report_id: Option<usize>,
    /// Where the first `Type` column is (the row's table, when it is a non-empty string).
    pub(super) type_at: Option<usize>,
    /// Whether a column is one of the required ones (see `required`).
    pub(super) required_column: Vec<bool>,
    /// No name holds a quote, a backslash or a control character: each is written in a
    /// line exactly as it is, so a line's name can be compared with it byte for byte.
    pub(super) plain_names: bool,
    /// The encoded size of the last row read straight into this layout: the next row's
    /// buffer is made a little larger than it, not as large as its line (rows wait in
    /// the parser's channel, so their spare capacity is memory held).
    pub(super) last_size: std::cell::Cell<usize>,
    pub(super) content: ContentNames,
}

/// Layouts kept per thread: a table's rows come in a few shapes (Defender leaves columns
/// out by action type), often interleaved, and working a layout out again for every
/// change of shape was a quarter of parsing such a file.
const LAYOUTS_KEPT: usize = 16;

thread_local! {
    static KEPT: RefCell<Vec<Rc<Layout>>> = const { RefCell::new(Vec::new()) };
}

/// The layout of the last row normalised on this thread.
pub(super) fn recent_layout() -> Option<Rc<Layout>> {
    KEPT.with(|kept| kept.borrow().first().cloned())
}

/// This thread's recent layouts of `table`, the most recently used first.
pub(super) fn layouts_of(table: &str) -> Vec<Rc<Layout>> {
    KEPT.with(|kept| kept.borrow().iter().filter(|l| l.table == table).cloned().collect())
}

/// The layout of `row` in `table`: one of the last few rows' on this thread when the
/// table and the column names are the same, else worked out (and kept for the next rows).
fn layout(table: &str, row: &[(Cow<'_, str>, Raw<'_>)]) -> Result<Rc<Layout>, Reject> {
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        let same = |l: &Layout| {
            l.table == table && l.names.len() == row.len() && l.names.iter().zip(row).all(|(a, (b, _))| a == b)
        };
        if let Some(i) = kept.iter().position(|l| same(l)) {
            // The most recent first: a file of one shape finds it at once.
            if i > 0 {
                let l = kept.remove(i);
                kept.insert(0, l);
            }
            return Ok(kept[0].clone());
        }
        let kind = table_kind(table).map_err(|e| Reject::new(RejectKind::UnknownTable, e))?;
        let names: Vec<String> = row.iter().map(|(n, _)| n.to_string()).collect();
        let types = column_types(table);
        let at = |column: &str| names.iter().position(|n| n == column);
        let layout = Layout {
            table: table.to_string(),
            kind,
            types: names.iter().map(|n| types.and_then(|t| t.get(n.as_str())).copied()).collect(),
            key_column: names.iter().map(|n| is_key_column(n)).collect(),
            required: required_columns(table, kind).iter().map(|c| (*c, at(c))).collect(),
            sha1: at("SHA1"),
            device_id: at("DeviceId"),
            timestamp: at("Timestamp"),
            report_id: at("ReportId"),
            type_at: at("Type"),
            required_column: names.iter().map(|n| required_columns(table, kind).contains(&n.as_str())).collect(),
            plain_names: names.iter().all(|n| n.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\')),
            last_size: std::cell::Cell::new(0),
            content: ContentNames::new(&names),
            names: Arc::new(names),
        };
        let layout = Rc::new(layout);
        kept.truncate(LAYOUTS_KEPT - 1);
        kept.insert(0, layout.clone());
        Ok(layout)
    })
}

impl NormalRow {
    /// The row's columns, decoded again (for tests and diagnostics; storing uses the
    /// encoding as it is).
    pub fn columns(&self) -> Vec<(String, Cell)> {
        let cells = self.cells.cells().unwrap_or_default();
        self.names.iter().cloned().zip(cells).collect()
    }
}

/// A cell being normalised: strings still borrowed from the line where they can be.
#[derive(Debug)]
enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Json(Cow<'a, str>),
}

impl<'a> Val<'a> {
    /// A value of a column without a type (or not of its type), as [`Cell::from_json`]
    /// makes it: nested values and integers above i64's range as their JSON text.
    fn from_raw(v: Raw<'a>) -> Val<'a> {
        match v {
            Raw::Null => Val::Null,
            Raw::Bool(b) => Val::Bool(b),
            Raw::Int(i) => Val::Int(i),
            Raw::UInt(u) => Val::Json(Cow::Owned(u.to_string())),
            Raw::Float(f) => Val::Float(f),
            Raw::Str(s) => Val::Str(s),
            Raw::Nested(v) => Val::Json(Cow::Owned(v.to_string())),
        }
    }

    fn as_ref(&self) -> CellRef<'_> {
        match self {
            Val::Null => CellRef::Null,
            Val::Bool(b) => CellRef::Bool(*b),
            Val::Int(i) => CellRef::Int(*i),
            Val::Float(f) => CellRef::Float(*f),
            Val::Str(s) => CellRef::Str(s),
            Val::Json(s) => CellRef::Json(s),
        }
    }

    fn as_str(&self) -> &str {
        self.as_ref().as_str()
    }

    fn to_cell(&self) -> Cell {
        match self {
            Val::Null => Cell::Null,
            Val::Bool(b) => Cell::Bool(*b),
            Val::Int(i) => Cell::Int(*i),
            Val::Float(f) => Cell::Float(*f),
            Val::Str(s) => Cell::Str(s.to_string()),
            Val::Json(s) => Cell::Json(s.to_string()),
        }
    }
}

/// A value read as its column's type, or why it is not one (with the value, kept as sent
/// unless the column is part of the key).
enum Typed<'a> {
    Cell(Val<'a>),
    Unexpected(Reject, Raw<'a>),
}

fn typed_cell<'a>(name: &str, t: ColumnType, value: Raw<'a>) -> Typed<'a> {
    let wrong = |v: Raw<'a>| {
        let reason = format!("column {name}: expected {}, got {}", t.name(), v.kind());
        Typed::Unexpected(Reject::new(RejectKind::WrongType, reason), v)
    };
    match (t, value) {
        (ColumnType::String, Raw::Null) => Typed::Cell(Val::Str(Cow::Borrowed(""))),
        (ColumnType::String, Raw::Str(s)) => Typed::Cell(Val::Str(s)),
        (_, Raw::Null) => Typed::Cell(Val::Null),
        (ColumnType::Long, Raw::Int(i)) => Typed::Cell(Val::Int(i)),
        (ColumnType::Long, n @ (Raw::UInt(_) | Raw::Float(_))) => {
            let reason = format!("column {name}: {} is not a 64-bit integer", n.number_text());
            Typed::Unexpected(Reject::new(RejectKind::WrongType, reason), n)
        }
        // Exports write longs as text too (CSV-born JSON, some SIEM forwarders).
        (ColumnType::Long, Raw::Str(s)) => match s.trim().parse::<i64>() {
            Ok(i) => Typed::Cell(Val::Int(i)),
            Err(_) => wrong(Raw::Str(s)),
        },
        (ColumnType::Bool, Raw::Bool(b)) => Typed::Cell(Val::Bool(b)),
        (ColumnType::DateTime, Raw::Str(s)) => {
            if parse_timestamp(&s).is_none() {
                let shown: String = s.chars().take(64).collect();
                let reason =
                    format!("column {name}: '{shown}' is not an ISO-8601 UTC timestamp with 0-7 fractional digits");
                return Typed::Unexpected(Reject::new(RejectKind::BadTimestamp, reason), Raw::Str(s));
            }
            Typed::Cell(Val::Str(s))
        }
        (_, v) => wrong(v),
    }
}

fn content_hash(columns: &[(String, Cell)]) -> String {
    let mut h = Sha256::new();
    for (n, c) in columns {
        h.update(n.as_bytes());
        h.update([0]);
        h.update(c.to_json().to_string().as_bytes());
        h.update([0]);
    }
    format!("h{}", hex::encode(&h.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn obj(v: Value) -> serde_json::Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => unreachable!(),
        }
    }

    #[test]
    fn nulls_become_empty_strings_and_unknown_columns_are_kept() {
        let r = normalise(
            obj(json!({"Timestamp":"2025-05-07T16:16:24.55Z","DeviceId":"d","SHA1":null,"ReportId":7,"Custom":{"a":1},"FileSize":null})),
            Some("DeviceFileEvents"),
            &TableHints::default(),
        )
        .unwrap();
        let columns = r.columns();
        assert_eq!(columns[2], ("SHA1".to_string(), Cell::Str(String::new())));
        assert_eq!(columns[4], ("Custom".to_string(), Cell::Json("{\"a\":1}".into())));
        assert_eq!(columns[5], ("FileSize".to_string(), Cell::Null));
        assert_eq!(r.identity, "7");
    }

    /// Rows of several shapes, interleaved, and of two tables with the same columns: each
    /// row is normalised with its own table's layout of its own columns.
    #[test]
    fn interleaved_shapes_each_keep_their_own_layout() {
        let hints = TableHints::default();
        let a = || obj(json!({"Timestamp":"2025-05-07T16:16:24Z","DeviceId":"d","SHA1":"s","ReportId":1}));
        let b = || obj(json!({"DeviceId":"e","Timestamp":"2025-05-07T16:16:25Z","ReportId":2,"FileName":"x"}));
        for _ in 0..3 {
            for (row, table, identity, device) in [
                (a(), "DeviceFileEvents", "1", "d"),
                (b(), "DeviceFileEvents", "2", "e"),
                (a(), "DeviceProcessEvents", "1", "d"),
                (b(), "DeviceProcessEvents", "2", "e"),
            ] {
                let names: Vec<String> = row.keys().cloned().collect();
                let r = normalise(row, Some(table), &hints).unwrap();
                assert_eq!((r.table.as_str(), r.identity.as_str(), r.device_id.as_str()), (table, identity, device));
                assert_eq!(r.columns().into_iter().map(|(n, _)| n).collect::<Vec<_>>(), names);
            }
        }
        // More shapes than are kept: still each its own.
        for i in 0..(LAYOUTS_KEPT + 3) {
            let mut row = a();
            row.insert(format!("Extra{i}"), json!(i));
            let r = normalise(row, Some("DeviceFileEvents"), &hints).unwrap();
            assert_eq!(r.columns().last().map(|(n, _)| n.clone()), Some(format!("Extra{i}")));
        }
    }

    #[test]
    fn table_order_envelope_type_file_explicit() {
        let row = || obj(json!({"Timestamp":"2025-05-07T16:16:24Z","DeviceId":"d","Type":"DeviceImageLoadEvents"}));
        let hints =
            TableHints { file_table: Some("DeviceProcessEvents".into()), explicit: Some("DeviceNetworkEvents".into()) };
        assert_eq!(normalise(row(), Some("DeviceFileEvents"), &hints).unwrap().table, "DeviceFileEvents");
        assert_eq!(normalise(row(), None, &hints).unwrap().table, "DeviceImageLoadEvents");
        let mut untyped = row();
        untyped.remove("Type");
        assert_eq!(normalise(untyped.clone(), None, &hints).unwrap().table, "DeviceProcessEvents");
        let only_explicit = TableHints { file_table: None, explicit: Some("DeviceNetworkEvents".into()) };
        assert_eq!(normalise(untyped.clone(), None, &only_explicit).unwrap().table, "DeviceNetworkEvents");
        assert_eq!(normalise(untyped, None, &TableHints::default()).unwrap_err().kind, RejectKind::NoTable);
    }

    #[test]
    fn wrong_types_and_bad_timestamps_are_rejected_with_the_column() {
        let hints = TableHints::default();
        let e = normalise(
            obj(json!({"Timestamp":"2025-05-07T16:16:24Z","DeviceId":7,"FileSize":"big"})),
            Some("DeviceFileEvents"),
            &hints,
        )
        .unwrap_err();
        assert_eq!(e.kind, RejectKind::WrongType);
        assert!(e.reason.contains("DeviceId") && e.reason.contains("expected string"), "{}", e.reason);
        let e = normalise(obj(json!({"Timestamp":"yesterday","DeviceId":"d"})), Some("DeviceFileEvents"), &hints)
            .unwrap_err();
        assert_eq!(e.kind, RejectKind::BadTimestamp);
        let e =
            normalise(obj(json!({"Timestamp":"2025-05-07T16:16:24Z"})), Some("DeviceFileEvents"), &hints).unwrap_err();
        assert_eq!(e.kind, RejectKind::MissingColumn);
        let e = normalise(obj(json!({"x":1})), Some("SigninLogs"), &hints).unwrap_err();
        assert_eq!(e.kind, RejectKind::UnknownTable);
    }

    /// Outside the key, a value of an unexpected type is kept as sent and counted; a
    /// numeric string in a long column is a long; real process events (a numeric
    /// InitiatingProcessLogonId) are stored.
    #[test]
    fn unexpected_types_outside_the_key_are_kept_and_counted() {
        let hints = TableHints::default();
        let r = normalise(
            obj(json!({"Timestamp":"2025-05-07T16:16:24Z","DeviceId":"d","FileSize":"big","ReportId":"12",
                "InitiatingProcessLogonId":999,"InitiatingProcessCreationTime":"soon","ProcessId":"4242"})),
            Some("DeviceProcessEvents"),
            &hints,
        )
        .unwrap();
        let columns = r.columns();
        let get = |n: &str| columns.iter().find(|(c, _)| c == n).map(|(_, v)| v.clone());
        assert_eq!(get("FileSize"), Some(Cell::Str("big".into())));
        assert_eq!(get("ReportId"), Some(Cell::Int(12)));
        assert_eq!(r.identity, "12");
        assert_eq!(get("InitiatingProcessLogonId"), Some(Cell::Int(999)));
        assert_eq!(get("InitiatingProcessCreationTime"), Some(Cell::Str("soon".into())));
        assert_eq!(get("ProcessId"), Some(Cell::Int(4242)));
        assert_eq!(r.unexpected_types, 2, "FileSize and InitiatingProcessCreationTime");
        // Identity rows carry no DeviceId; their ReportId is a string.
        let id = normalise(
            obj(json!({"Timestamp":"2025-05-07T16:16:24Z","ReportId":"abc-1","IPAddress":"10.0.0.1","Port":"445"})),
            Some("IdentityLogonEvents"),
            &hints,
        )
        .unwrap();
        assert_eq!(id.identity, "abc-1");
        assert_eq!(id.device_id, "");
        assert_eq!(id.unexpected_types, 0);
    }
}
