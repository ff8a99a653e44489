//! Parsing one JSON document and unwrapping what it holds into rows: a flat
//! advanced-hunting row, a Streaming-API envelope (`{"time","tenantId","operationName",
//! "category":"AdvancedHunting-<Table>","properties":{row}}`), or an Event Hub batch
//! (`{"records":[envelope, ...]}`).
//!
//! Objects that become rows are parsed straight into a `Vec` of (column, value) in input
//! order, not into `serde_json::Map`: with order preserved that map is an index map that
//! hashes every column name, which cost a quarter of ingestion (perf).

use super::{Reject, RejectKind};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

/// A row's columns in input order.
pub type Columns = Vec<(String, Value)>;

/// One row and the table its envelope named, if any.
pub struct Unwrapped {
    pub category_table: Option<String>,
    pub row: Columns,
}

/// A parsed top-level JSON document.
pub enum Document {
    Object(Vec<(String, Field)>),
    Other(Value),
}

/// A value inside a top-level object. `properties` objects and `records` arrays are kept
/// parsed for unwrapping; everything else is a plain value.
pub enum Field {
    Value(Value),
    Object(Columns),
    Documents(Vec<Document>),
}

const CATEGORY_PREFIX: &str = "AdvancedHunting-";

/// Parses one JSON document (a line, or an array element's text).
pub fn parse_document(bytes: &[u8]) -> Result<Document, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let doc = DocumentSeed.deserialize(&mut de)?;
    de.end()?;
    Ok(doc)
}

impl Document {
    /// The document as a plain JSON value (for array elements already parsed as values).
    pub fn from_value(v: Value) -> Document {
        match v {
            Value::Object(m) => Document::Object(m.into_iter().map(|(k, v)| (k, Field::Value(v))).collect()),
            other => Document::Other(other),
        }
    }

    fn into_value(self) -> Value {
        match self {
            Document::Object(fields) => Value::Object(fields.into_iter().map(|(k, f)| (k, f.into_value())).collect()),
            Document::Other(v) => v,
        }
    }
}

impl Field {
    fn into_value(self) -> Value {
        match self {
            Field::Value(v) => v,
            Field::Object(cols) => Value::Object(cols.into_iter().collect()),
            Field::Documents(docs) => Value::Array(docs.into_iter().map(Document::into_value).collect()),
        }
    }
}

/// Unwraps one document into its rows (an Event Hub batch gives several, each of which
/// may be rejected on its own).
pub fn unwrap_document(doc: Document) -> Vec<Result<Unwrapped, Reject>> {
    match doc {
        Document::Object(mut fields) => {
            if fields.len() == 1 && fields[0].0 == "records" && matches!(fields[0].1, Field::Documents(_)) {
                let Some((_, Field::Documents(records))) = fields.pop() else { return Vec::new() };
                records
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| match r {
                        Document::Object(o) => Ok(unwrap_envelope(o)),
                        Document::Other(other) => Err(Reject::new(
                            RejectKind::NotAnObject,
                            format!("records[{i}] is {}, not an object", kind_of(&other)),
                        )),
                    })
                    .collect()
            } else {
                vec![Ok(unwrap_envelope(fields))]
            }
        }
        Document::Other(other) => {
            vec![Err(Reject::new(RejectKind::NotAnObject, format!("document is {}, not an object", kind_of(&other))))]
        }
    }
}

fn unwrap_envelope(mut fields: Vec<(String, Field)>) -> Unwrapped {
    let category = fields.iter().position(|(k, f)| k == "category" && matches!(f, Field::Value(Value::String(_))));
    let properties = fields.iter().position(|(k, f)| k == "properties" && matches!(f, Field::Object(_)));
    if let (Some(c), Some(p)) = (category, properties) {
        let Field::Value(Value::String(category)) = std::mem::replace(&mut fields[c].1, Field::Value(Value::Null))
        else {
            unreachable!("checked above")
        };
        let Field::Object(row) = std::mem::replace(&mut fields[p].1, Field::Value(Value::Null)) else {
            unreachable!("checked above")
        };
        let table = category.strip_prefix(CATEGORY_PREFIX).unwrap_or(&category).to_string();
        return Unwrapped { category_table: Some(table), row };
    }
    Unwrapped { category_table: None, row: fields.into_iter().map(|(k, f)| (k, f.into_value())).collect() }
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

struct DocumentSeed;

impl<'de> DeserializeSeed<'de> for DocumentSeed {
    type Value = Document;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Document, D::Error> {
        d.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(48));
        while let Some(key) = map.next_key::<String>()? {
            let field = match key.as_str() {
                "properties" => map.next_value_seed(PropertiesSeed)?,
                "records" => map.next_value_seed(RecordsSeed)?,
                _ => Field::Value(map.next_value::<Value>()?),
            };
            fields.push((key, field));
        }
        Ok(Document::Object(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Document, A::Error> {
        Ok(Document::Other(serde::de::value::SeqAccessDeserializer::new(seq).deserialize_any(ValueVisitor)?))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Document, E> {
        Ok(Document::Other(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Document, E> {
        Ok(Document::Other(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Document, E> {
        Ok(Document::Other(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Document, E> {
        Ok(Document::Other(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Document, E> {
        Ok(Document::Other(Value::String(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Document, E> {
        Ok(Document::Other(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<Document, E> {
        Ok(Document::Other(Value::Null))
    }
}

/// Deserializes any value as a `serde_json::Value` (through `Value`'s own visitor).
struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element::<Value>()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
}

/// `properties`: an object becomes a row's columns; anything else stays a value.
struct PropertiesSeed;

impl<'de> DeserializeSeed<'de> for PropertiesSeed {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        match DocumentSeed.deserialize(d)? {
            Document::Object(fields) => {
                Ok(Field::Object(fields.into_iter().map(|(k, f)| (k, f.into_value())).collect()))
            }
            Document::Other(v) => Ok(Field::Value(v)),
        }
    }
}

/// `records`: an array becomes documents; anything else stays a value.
struct RecordsSeed;

impl<'de> DeserializeSeed<'de> for RecordsSeed {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_any(RecordsVisitor)
    }
}

struct RecordsVisitor;

impl<'de> Visitor<'de> for RecordsVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
        let mut docs = Vec::new();
        while let Some(d) = seq.next_element_seed(DocumentSeed)? {
            docs.push(d);
        }
        Ok(Field::Documents(docs))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field, A::Error> {
        Ok(Field::Value(Document::into_value(DocumentVisitor.visit_map(map)?)))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Field, E> {
        Ok(Field::Value(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Field, E> {
        Ok(Field::Value(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Field, E> {
        Ok(Field::Value(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Field, E> {
        Ok(Field::Value(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Field, E> {
        Ok(Field::Value(Value::String(v.to_string())))
    }

    fn visit_unit<E>(self) -> Result<Field, E> {
        Ok(Field::Value(Value::Null))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Vec<Result<Unwrapped, Reject>> {
        unwrap_document(parse_document(text.as_bytes()).unwrap())
    }

    #[test]
    fn flat_envelope_and_records_keep_column_order() {
        let r = rows(r#"{"b":1,"a":{"x":[1,2]},"c":null}"#);
        let u = r.into_iter().next().unwrap().unwrap();
        assert_eq!(u.category_table, None);
        let names: Vec<&str> = u.row.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert_eq!(u.row[1].1, serde_json::json!({"x":[1,2]}));

        let r = rows(r#"{"time":"t","category":"AdvancedHunting-DeviceFileEvents","properties":{"z":1,"y":2}}"#);
        let u = r.into_iter().next().unwrap().unwrap();
        assert_eq!(u.category_table.as_deref(), Some("DeviceFileEvents"));
        assert_eq!(u.row.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["z", "y"]);

        let r = rows(r#"{"records":[{"category":"AdvancedHunting-DeviceFileEvents","properties":{"a":1}},5]}"#);
        assert_eq!(r.len(), 2);
        assert!(r[0].is_ok());
        assert_eq!(r[1].as_ref().err().map(|e| e.kind), Some(RejectKind::NotAnObject));
    }

    #[test]
    fn properties_and_records_that_are_not_envelopes_stay_columns() {
        let u = rows(r#"{"properties":{"a":1},"records":[1]}"#).into_iter().next().unwrap().unwrap();
        assert_eq!(u.row[0], ("properties".to_string(), serde_json::json!({"a":1})));
        assert_eq!(u.row[1], ("records".to_string(), serde_json::json!([1])));
        assert!(parse_document(b"[1,2] x").is_err());
        assert!(matches!(parse_document(b"[1,2]").unwrap(), Document::Other(Value::Array(_))));
    }
}
