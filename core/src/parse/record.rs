//! Unwrapping what a JSON document holds into rows: a flat advanced-hunting row, a
//! Streaming-API envelope (`{"time","tenantId","operationName","category":
//! "AdvancedHunting-<Table>","properties":{row}}`), or an Event Hub batch
//! (`{"records":[envelope, ...]}`).

use super::{Reject, RejectKind};
use serde_json::{Map, Value};

/// One row and the table its envelope named, if any.
pub struct Unwrapped {
    pub category_table: Option<String>,
    pub row: Map<String, Value>,
}

const CATEGORY_PREFIX: &str = "AdvancedHunting-";

/// Unwraps one JSON document into its rows (an Event Hub batch gives several, each of
/// which may be rejected on its own).
pub fn unwrap_document(doc: Value) -> Vec<Result<Unwrapped, Reject>> {
    match doc {
        Value::Object(mut obj) => {
            if obj.len() == 1 && matches!(obj.get("records"), Some(Value::Array(_))) {
                let Some(Value::Array(records)) = obj.remove("records") else { return Vec::new() };
                records
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| match r {
                        Value::Object(o) => Ok(unwrap_envelope(o)),
                        other => Err(Reject::new(
                            RejectKind::NotAnObject,
                            format!("records[{i}] is {}, not an object", kind_of(&other)),
                        )),
                    })
                    .collect()
            } else {
                vec![Ok(unwrap_envelope(obj))]
            }
        }
        other => {
            vec![Err(Reject::new(RejectKind::NotAnObject, format!("document is {}, not an object", kind_of(&other))))]
        }
    }
}

fn unwrap_envelope(mut obj: Map<String, Value>) -> Unwrapped {
    let is_envelope = matches!(obj.get("properties"), Some(Value::Object(_)))
        && matches!(obj.get("category"), Some(Value::String(_)));
    if !is_envelope {
        return Unwrapped { category_table: None, row: obj };
    }
    let category = match obj.remove("category") {
        Some(Value::String(c)) => c,
        _ => String::new(),
    };
    let row = match obj.remove("properties") {
        Some(Value::Object(p)) => p,
        _ => Map::new(),
    };
    let table = category.strip_prefix(CATEGORY_PREFIX).unwrap_or(&category).to_string();
    Unwrapped { category_table: Some(table), row }
}

pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
