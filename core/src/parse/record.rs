//! Parsing one JSON document and unwrapping what it holds into rows: a flat
//! advanced-hunting row, a Streaming-API envelope (`{"time","tenantId","operationName",
//! "category":"AdvancedHunting-<Table>","properties":{row}}`), or an Event Hub batch
//! (`{"records":[envelope, ...]}`).
//!
//! Objects that become rows are parsed straight into a `Vec` of (column, value) in input
//! order, not into `serde_json::Map`: with order preserved that map is an index map that
//! hashes every column name, which cost a quarter of ingestion (perf). Column names and
//! string values are borrowed from the line when they hold no escape, and scalars are not
//! made `serde_json::Value`s: a row of ~40 columns used to cost ~80 allocations here.

use super::{Reject, RejectKind};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// A row's columns in input order.
pub type Columns<'a> = Vec<(Cow<'a, str>, Raw<'a>)>;

/// A column's value as parsed: scalars as they are (strings borrowed from the line when
/// they hold no escape), arrays and objects whole.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw<'a> {
    Null,
    Bool(bool),
    /// An integer that fits an i64.
    Int(i64),
    /// An integer above i64's range.
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    Nested(Value),
}

impl Raw<'_> {
    /// A non-negative integer as JSON gives it: `Int` while it fits an i64.
    pub(super) fn from_u64(v: u64) -> Raw<'static> {
        i64::try_from(v).map_or(Raw::UInt(v), Raw::Int)
    }

    pub fn into_value(self) -> Value {
        match self {
            Raw::Null => Value::Null,
            Raw::Bool(b) => Value::Bool(b),
            Raw::Int(i) => Value::from(i),
            Raw::UInt(u) => Value::from(u),
            Raw::Float(f) => Value::from(f),
            Raw::Str(s) => Value::String(s.into_owned()),
            Raw::Nested(v) => v,
        }
    }

    /// What kind of JSON value it is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Raw::Null => "null",
            Raw::Bool(_) => "a bool",
            Raw::Int(_) | Raw::UInt(_) | Raw::Float(_) => "a number",
            Raw::Str(_) => "a string",
            Raw::Nested(v) => kind_of(v),
        }
    }

    /// A number as JSON writes it (for messages).
    pub fn number_text(&self) -> String {
        match self {
            Raw::Int(i) => i.to_string(),
            Raw::UInt(u) => u.to_string(),
            Raw::Float(f) => serde_json::Number::from_f64(*f).map_or_else(|| f.to_string(), |n| n.to_string()),
            other => other.kind().to_string(),
        }
    }
}

impl<'a> From<Value> for Raw<'a> {
    fn from(v: Value) -> Self {
        match v {
            Value::Null => Raw::Null,
            Value::Bool(b) => Raw::Bool(b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Raw::Int(i),
                (None, Some(u), _) => Raw::UInt(u),
                (None, None, Some(f)) => Raw::Float(f),
                (None, None, None) => Raw::Nested(Value::Number(n)),
            },
            Value::String(s) => Raw::Str(Cow::Owned(s)),
            nested => Raw::Nested(nested),
        }
    }
}

/// One row and the table its envelope named, if any.
pub struct Unwrapped<'a> {
    pub category_table: Option<String>,
    pub row: Columns<'a>,
}

/// A parsed top-level JSON document.
pub enum Document<'a> {
    Object(Object<'a>),
    Other(Value),
}

/// A top-level object: its fields as a row's columns, in order, with those kept parsed
/// for unwrapping (a `properties` object, a `records` array) aside, each at its place
/// (where the columns hold a null until it is put back as a nested value). A flat line's
/// fields are its row as they are: no second list of every column is built.
pub struct Object<'a> {
    columns: Columns<'a>,
    kept: Vec<(usize, Field<'a>)>,
}

impl<'a> Object<'a> {
    /// The columns of an object with nothing kept aside for unwrapping.
    #[cfg(test)]
    pub(super) fn into_flat_columns(self) -> Option<Columns<'a>> {
        self.kept.is_empty().then_some(self.columns)
    }

    /// The fields as plain columns: what was kept aside goes back as a nested value.
    fn into_columns(mut self) -> Columns<'a> {
        for (at, field) in self.kept {
            self.columns[at].1 = field.into_raw();
        }
        self.columns
    }
}

/// A value inside a top-level object. `properties` objects and `records` arrays are kept
/// parsed for unwrapping; everything else is a plain value.
pub enum Field<'a> {
    Value(Raw<'a>),
    Object(Columns<'a>),
    Documents(Vec<Document<'a>>),
}

pub(super) const CATEGORY_PREFIX: &str = "AdvancedHunting-";

/// Parses one JSON document (a line, or an array element's text): a flat row by
/// [`super::flat`]'s scanner, anything else (and anything it declines) by serde_json.
pub fn parse_document(bytes: &[u8]) -> Result<Document<'_>, serde_json::Error> {
    if let Some(columns) = std::str::from_utf8(bytes).ok().and_then(super::flat::parse_flat) {
        return Ok(Document::Object(Object { columns, kept: Vec::new() }));
    }
    parse_document_with_serde(bytes)
}

/// Parses one JSON document with serde_json: envelopes, batches, nested values, and the
/// words of every error.
pub(super) fn parse_document_with_serde(bytes: &[u8]) -> Result<Document<'_>, serde_json::Error> {
    // One check of the whole line is cheaper than serde_json's check of every string it
    // borrows from a byte slice (one call per string, most of them short); a line that is
    // not UTF-8 is parsed from bytes, so the error says where the JSON broke.
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let doc = DocumentSeed.deserialize(&mut de)?;
            de.end()?;
            Ok(doc)
        }
        Err(_) => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let doc = DocumentSeed.deserialize(&mut de)?;
            de.end()?;
            Ok(doc)
        }
    }
}

impl Document<'_> {
    fn into_value(self) -> Value {
        match self {
            Document::Object(object) => Value::Object(
                object.into_columns().into_iter().map(|(k, raw)| (k.into_owned(), raw.into_value())).collect(),
            ),
            Document::Other(v) => v,
        }
    }
}

impl<'a> Field<'a> {
    /// The field as one column's value: a `properties` object or `records` array that
    /// did not make an envelope is a nested value like any other.
    fn into_raw(self) -> Raw<'a> {
        match self {
            Field::Value(v) => v,
            Field::Object(cols) => {
                Raw::Nested(Value::Object(cols.into_iter().map(|(k, v)| (k.into_owned(), v.into_value())).collect()))
            }
            Field::Documents(docs) => Raw::Nested(Value::Array(docs.into_iter().map(Document::into_value).collect())),
        }
    }
}

/// Unwraps one document into its rows (an Event Hub batch gives several, each of which
/// may be rejected on its own).
pub fn unwrap_document(doc: Document<'_>) -> Vec<Result<Unwrapped<'_>, Reject>> {
    match doc {
        Document::Object(mut object) => {
            if object.columns.len() == 1
                && object.columns[0].0 == "records"
                && matches!(object.kept.first(), Some((0, Field::Documents(_))))
            {
                let Some((_, Field::Documents(records))) = object.kept.pop() else { return Vec::new() };
                records.into_iter().enumerate().map(|(i, r)| unwrap_batch_record(i, r)).collect()
            } else {
                vec![Ok(unwrap_envelope(object))]
            }
        }
        Document::Other(other) => {
            vec![Err(Reject::new(RejectKind::NotAnObject, format!("document is {}, not an object", kind_of(&other))))]
        }
    }
}

/// Record `i` of a `{"records":[…]}` batch: an envelope (or a flat row), or rejected.
pub fn unwrap_batch_record(i: usize, record: Document<'_>) -> Result<Unwrapped<'_>, Reject> {
    match record {
        Document::Object(o) => Ok(unwrap_envelope(o)),
        Document::Other(other) => {
            Err(Reject::new(RejectKind::NotAnObject, format!("records[{i}] is {}, not an object", kind_of(&other))))
        }
    }
}

/// The records of a `{"records":[…]}` batch as their text, when the batch as a whole
/// could not be read (one record with a number out of range, a lone surrogate, nesting
/// too deep): taking a value's text checks its syntax only, so each record is then read
/// on its own. `None` when `text` is not such a batch (one key, `records`, an array).
pub fn batch_record_texts(text: &str) -> Option<Vec<&str>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch<'a> {
        #[serde(borrow)]
        records: Vec<&'a serde_json::value::RawValue>,
    }
    let batch: Batch<'_> = serde_json::from_str(text).ok()?;
    Some(batch.records.into_iter().map(serde_json::value::RawValue::get).collect())
}

fn unwrap_envelope(mut object: Object<'_>) -> Unwrapped<'_> {
    let category = object.columns.iter().position(|(k, v)| k == "category" && matches!(v, Raw::Str(_)));
    let properties =
        object.kept.iter().position(|(at, f)| object.columns[*at].0 == "properties" && matches!(f, Field::Object(_)));
    if let (Some(c), Some(p)) = (category, properties) {
        let Raw::Str(category) = std::mem::replace(&mut object.columns[c].1, Raw::Null) else {
            unreachable!("checked above")
        };
        let Field::Object(row) = object.kept.swap_remove(p).1 else { unreachable!("checked above") };
        let table = category.strip_prefix(CATEGORY_PREFIX).unwrap_or(&category).to_string();
        return Unwrapped { category_table: Some(table), row };
    }
    Unwrapped { category_table: None, row: object.into_columns() }
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

/// A column name, borrowed from the line when it holds no escape.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// Any value as a [`Raw`].
struct RawSeed;

impl<'de> DeserializeSeed<'de> for RawSeed {
    type Value = Raw<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Raw<'de>, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Raw<'de>, E> {
        Ok(Raw::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Raw<'de>, E> {
        Ok(Raw::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Raw<'de>, E> {
        Ok(Raw::from_u64(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Raw<'de>, E> {
        Ok(Raw::Float(v))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Raw<'de>, E> {
        Ok(Raw::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Raw<'de>, A::Error> {
        Ok(Raw::Nested(Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Raw<'de>, A::Error> {
        Ok(Raw::Nested(Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?))
    }
}

/// Reads one JSON document (a line, or an element of an array export).
pub(crate) struct DocumentSeed;

impl<'de> DeserializeSeed<'de> for DocumentSeed {
    type Value = Document<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Document<'de>, D::Error> {
        d.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document<'de>, A::Error> {
        let mut columns = Vec::with_capacity(map.size_hint().unwrap_or(48));
        let mut kept = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let field = match key.as_ref() {
                "properties" => map.next_value_seed(PropertiesSeed)?,
                "records" => map.next_value_seed(RecordsSeed)?,
                _ => Field::Value(map.next_value_seed(RawSeed)?),
            };
            match field {
                Field::Value(raw) => columns.push((key, raw)),
                aside => {
                    kept.push((columns.len(), aside));
                    columns.push((key, Raw::Null));
                }
            }
        }
        Ok(Document::Object(Object { columns, kept }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Document<'de>, A::Error> {
        Ok(Document::Other(Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Document<'de>, E> {
        Ok(Document::Other(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Document<'de>, E> {
        Ok(Document::Other(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Document<'de>, E> {
        Ok(Document::Other(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Document<'de>, E> {
        Ok(Document::Other(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Document<'de>, E> {
        Ok(Document::Other(Value::String(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Document<'de>, E> {
        Ok(Document::Other(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<Document<'de>, E> {
        Ok(Document::Other(Value::Null))
    }
}

/// `properties`: an object becomes a row's columns; anything else stays a value.
struct PropertiesSeed;

impl<'de> DeserializeSeed<'de> for PropertiesSeed {
    type Value = Field<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field<'de>, D::Error> {
        match DocumentSeed.deserialize(d)? {
            Document::Object(object) => Ok(Field::Object(object.into_columns())),
            Document::Other(v) => Ok(Field::Value(Raw::from(v))),
        }
    }
}

/// `records`: an array becomes documents; anything else stays a value.
struct RecordsSeed;

impl<'de> DeserializeSeed<'de> for RecordsSeed {
    type Value = Field<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field<'de>, D::Error> {
        d.deserialize_any(RecordsVisitor)
    }
}

struct RecordsVisitor;

impl<'de> Visitor<'de> for RecordsVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'de>, A::Error> {
        let mut docs = Vec::new();
        while let Some(d) = seq.next_element_seed(DocumentSeed)? {
            docs.push(d);
        }
        Ok(Field::Documents(docs))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<'de>, A::Error> {
        Ok(Field::Value(Raw::Nested(DocumentVisitor.visit_map(map)?.into_value())))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
        Ok(Field::Value(Raw::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Field<'de>, E> {
        Ok(Field::Value(Raw::Int(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
        Ok(Field::Value(Raw::from_u64(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Field<'de>, E> {
        Ok(Field::Value(Raw::Float(v)))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Value(Raw::Str(Cow::Borrowed(v))))
    }

    fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Value(Raw::Str(Cow::Owned(v.to_owned()))))
    }

    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Value(Raw::Null))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Vec<Result<Unwrapped<'_>, Reject>> {
        unwrap_document(parse_document(text.as_bytes()).unwrap())
    }

    #[test]
    fn flat_envelope_and_records_keep_column_order() {
        let r = rows(r#"{"b":1,"a":{"x":[1,2]},"c":null}"#);
        let u = r.into_iter().next().unwrap().unwrap();
        assert_eq!(u.category_table, None);
        let names: Vec<&str> = u.row.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert_eq!(u.row[1].1, Raw::Nested(serde_json::json!({"x":[1,2]})));
        assert_eq!((&u.row[0].1, &u.row[2].1), (&Raw::Int(1), &Raw::Null));

        let r = rows(r#"{"time":"t","category":"AdvancedHunting-DeviceFileEvents","properties":{"z":1,"y":2}}"#);
        let u = r.into_iter().next().unwrap().unwrap();
        assert_eq!(u.category_table.as_deref(), Some("DeviceFileEvents"));
        assert_eq!(u.row.iter().map(|(k, _)| k.as_ref()).collect::<Vec<_>>(), ["z", "y"]);

        let r = rows(r#"{"records":[{"category":"AdvancedHunting-DeviceFileEvents","properties":{"a":1}},5]}"#);
        assert_eq!(r.len(), 2);
        assert!(r[0].is_ok());
        assert_eq!(r[1].as_ref().err().map(|e| e.kind), Some(RejectKind::NotAnObject));
    }

    /// Names and strings without escapes are borrowed from the line; escaped ones are
    /// unescaped; numbers keep their kind.
    #[test]
    fn strings_are_borrowed_unless_escaped_and_numbers_keep_their_kind() {
        let line = br#"{"a":"plain","b\u0041":"C:\\x","c":-3,"d":18446744073709551615,"e":1.5,"f":true}"#;
        let u = unwrap_document(parse_document(line).unwrap()).into_iter().next().unwrap().unwrap();
        assert!(matches!(&u.row[0], (Cow::Borrowed("a"), Raw::Str(Cow::Borrowed("plain")))));
        assert!(matches!(&u.row[1], (Cow::Owned(k), Raw::Str(Cow::Owned(v))) if k == "bA" && v == "C:\\x"));
        let values: Vec<&Raw> = u.row[2..].iter().map(|(_, v)| v).collect();
        assert_eq!(values, [&Raw::Int(-3), &Raw::UInt(u64::MAX), &Raw::Float(1.5), &Raw::Bool(true)]);
        assert_eq!(Raw::UInt(u64::MAX).number_text(), "18446744073709551615");
        assert_eq!(Raw::Float(1.5).number_text(), "1.5");
    }

    #[test]
    fn properties_and_records_that_are_not_envelopes_stay_columns() {
        let u = rows(r#"{"properties":{"a":1},"records":[1]}"#).into_iter().next().unwrap().unwrap();
        assert_eq!(u.row[0], (Cow::Borrowed("properties"), Raw::Nested(serde_json::json!({"a":1}))));
        assert_eq!(u.row[1], (Cow::Borrowed("records"), Raw::Nested(serde_json::json!([1]))));
        assert!(parse_document(b"[1,2] x").is_err());
        assert!(matches!(parse_document(b"[1,2]").unwrap(), Document::Other(Value::Array(_))));
    }
}
