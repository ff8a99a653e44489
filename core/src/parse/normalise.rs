//! Telling a row's table and normalising its columns: `null` in a string column becomes
//! `""` (KQL strings are never null), typed columns are checked, timestamps validated,
//! unknown columns kept verbatim, and the row's identity computed.

use super::record::kind_of;
use super::{Reject, RejectKind};
use crate::schema::{column_types, is_key_column, required_columns, table_kind, ColumnType, TableKind};
use lookout_plugin_sdk::time::parse_timestamp;
use lookout_plugin_sdk::Cell;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A row ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalRow {
    pub table: String,
    pub kind: TableKind,
    pub columns: Vec<(String, Cell)>,
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

pub fn normalise(
    row: impl IntoIterator<Item = (String, Value)>,
    category_table: Option<&str>,
    hints: &TableHints,
) -> Result<NormalRow, Reject> {
    // A Vec comes through as itself (in-place collect); a Map is laid out in order.
    let row: Vec<(String, Value)> = row.into_iter().collect();
    let type_column = match row.iter().find(|(k, _)| k == "Type").map(|(_, v)| v) {
        Some(Value::String(t)) if !t.is_empty() => Some(t.as_str()),
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
    let kind = table_kind(&table).map_err(|e| Reject::new(RejectKind::UnknownTable, e))?;

    let mut columns = Vec::with_capacity(row.len());
    let mut unexpected_types = 0;
    let types = column_types(&table);
    for (name, value) in row {
        let cell = match types.and_then(|t| t.get(name.as_str())).copied() {
            None | Some(ColumnType::Dynamic) => Cell::from_json(&value),
            Some(t) => match typed_cell(&name, t, value) {
                Typed::Cell(c) => c,
                // A key column must be what the key is made of; any other is kept.
                Typed::Unexpected(reject, _) if is_key_column(&name) => return Err(reject),
                Typed::Unexpected(_, value) => {
                    unexpected_types += 1;
                    Cell::from_json(&value)
                }
            },
        };
        columns.push((name, cell));
    }
    for required in required_columns(&table, kind) {
        match columns.iter().find(|(n, _)| n == required) {
            Some((_, Cell::Null)) | None => {
                return Err(Reject::new(RejectKind::MissingColumn, format!("column {required} is missing or null")))
            }
            Some((_, Cell::Str(s))) if s.is_empty() => {
                return Err(Reject::new(RejectKind::MissingColumn, format!("column {required} is empty")))
            }
            _ => {}
        }
    }
    let get = |name: &str| columns.iter().find(|(n, _)| n == name).map(|(_, c)| c);
    let sha1 = get("SHA1").map(Cell::as_str).unwrap_or("").to_string();
    let device_id = get("DeviceId").map(Cell::as_str).unwrap_or("").to_string();
    let timestamp = match (kind, get("Timestamp")) {
        (TableKind::Event, Some(Cell::Str(s))) => parse_timestamp(s).unwrap_or(0),
        _ => 0,
    };
    let identity = match get("ReportId") {
        Some(Cell::Int(i)) => i.to_string(),
        Some(Cell::Str(s)) if !s.is_empty() => s.clone(),
        _ => content_hash(&columns),
    };
    Ok(NormalRow { table, kind, columns, sha1, device_id, timestamp, identity, unexpected_types })
}

/// A value read as its column's type, or why it is not one (with the value, kept as sent
/// unless the column is part of the key).
enum Typed {
    Cell(Cell),
    Unexpected(Reject, Value),
}

fn typed_cell(name: &str, t: ColumnType, value: Value) -> Typed {
    let wrong = |v: Value| {
        let reason = format!("column {name}: expected {}, got {}", t.name(), kind_of(&v));
        Typed::Unexpected(Reject::new(RejectKind::WrongType, reason), v)
    };
    match (t, value) {
        (ColumnType::String, Value::Null) => Typed::Cell(Cell::Str(String::new())),
        (ColumnType::String, Value::String(s)) => Typed::Cell(Cell::Str(s)),
        (_, Value::Null) => Typed::Cell(Cell::Null),
        (ColumnType::Long, Value::Number(n)) => match n.as_i64() {
            Some(i) => Typed::Cell(Cell::Int(i)),
            None => {
                let reason = format!("column {name}: {n} is not a 64-bit integer");
                Typed::Unexpected(Reject::new(RejectKind::WrongType, reason), Value::Number(n))
            }
        },
        // Exports write longs as text too (CSV-born JSON, some SIEM forwarders).
        (ColumnType::Long, Value::String(s)) => match s.trim().parse::<i64>() {
            Ok(i) => Typed::Cell(Cell::Int(i)),
            Err(_) => wrong(Value::String(s)),
        },
        (ColumnType::Bool, Value::Bool(b)) => Typed::Cell(Cell::Bool(b)),
        (ColumnType::DateTime, Value::String(s)) => {
            if parse_timestamp(&s).is_none() {
                let shown: String = s.chars().take(64).collect();
                let reason =
                    format!("column {name}: '{shown}' is not an ISO-8601 UTC timestamp with 0-7 fractional digits");
                return Typed::Unexpected(Reject::new(RejectKind::BadTimestamp, reason), Value::String(s));
            }
            Typed::Cell(Cell::Str(s))
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
    use serde_json::json;

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
        assert_eq!(r.columns[2], ("SHA1".to_string(), Cell::Str(String::new())));
        assert_eq!(r.columns[4], ("Custom".to_string(), Cell::Json("{\"a\":1}".into())));
        assert_eq!(r.columns[5], ("FileSize".to_string(), Cell::Null));
        assert_eq!(r.identity, "7");
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
        let get = |n: &str| r.columns.iter().find(|(c, _)| c == n).map(|(_, v)| v.clone());
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
