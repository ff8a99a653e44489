//! A finding as the bytes of its JSON line: the detector's fields, then its output row as
//! an object in column order.
//!
//! Written straight from the plugin's answer. Building a `serde_json::Value` first (a map
//! entry and a copied string per column, for rows of ~100 columns) and dropping it again
//! was a sizeable share of committing a pass with a hundred findings.

use lookout_plugin_sdk::abi::FindingRef;
use lookout_plugin_sdk::{Cell, CellRef, Manifest};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashSet;

/// The JSON line of finding `fid` (without its newline). `names` is the pass's check for
/// a column name written twice (a JSON object keeps the last).
pub fn finding_json<'a>(
    fid: &str,
    manifest: &Manifest,
    detected_at: &str,
    f: &'a FindingRef<'a>,
    names: &mut NameCheck<'a>,
) -> serde_json::Result<Vec<u8>> {
    let row = if names.has_duplicates(&f.row) { Row::Merged(merged(&f.row)) } else { Row::Columns(&f.row) };
    serde_json::to_vec(&Line {
        finding_id: fid,
        detector: &manifest.name,
        detector_version: &manifest.version,
        detected_at,
        title: &manifest.title,
        severity: &manifest.severity,
        mitre: &manifest.mitre,
        device_id: f.device_id,
        device_name: f.device_name,
        row,
    })
}

#[derive(Serialize)]
struct Line<'a> {
    finding_id: &'a str,
    detector: &'a str,
    detector_version: &'a str,
    detected_at: &'a str,
    title: &'a str,
    severity: &'a str,
    mitre: &'a [String],
    device_id: &'a str,
    device_name: &'a str,
    row: Row<'a>,
}

/// The output row: its columns as they are, or — when a detector named a column twice —
/// an object in which the later value replaces the earlier one in its place, as a JSON
/// object can hold a name once.
enum Row<'a> {
    Columns(&'a [(&'a str, CellRef<'a>)]),
    Merged(Map<String, Value>),
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Row::Merged(map) => map.serialize(s),
            Row::Columns(columns) => {
                let mut map = s.serialize_map(Some(columns.len()))?;
                for (name, cell) in *columns {
                    map.serialize_entry(name, &CellJson(cell))?;
                }
                map.end()
            }
        }
    }
}

/// A cell as [`Cell::to_json`] makes it, without the copy.
struct CellJson<'a>(&'a CellRef<'a>);

impl Serialize for CellJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self.0 {
            CellRef::Null => s.serialize_unit(),
            CellRef::Bool(b) => s.serialize_bool(b),
            CellRef::Int(i) => s.serialize_i64(i),
            CellRef::Float(f) if f.is_finite() => s.serialize_f64(f),
            CellRef::Float(_) => s.serialize_unit(),
            CellRef::Str(text) => s.serialize_str(text),
            // Nested JSON kept as text: parsed to be embedded (rare; `to_json` does the same).
            json @ CellRef::Json(_) => Cell::from(json).to_json().serialize(s),
        }
    }
}

/// Whether rows have a column name twice, remembering the last column list it checked: a
/// detector's findings nearly always share one, and comparing a row's names with it costs
/// a fraction of hashing them again (which was 3% of an attack-dense pass).
#[derive(Default)]
pub struct NameCheck<'a> {
    last: Option<(&'a [(&'a str, CellRef<'a>)], bool)>,
}

impl<'a> NameCheck<'a> {
    pub fn has_duplicates(&mut self, row: &'a [(&'a str, CellRef<'a>)]) -> bool {
        let same =
            |prev: &[(&str, CellRef<'_>)]| prev.len() == row.len() && prev.iter().zip(row).all(|(a, b)| a.0 == b.0);
        let duplicates = match self.last {
            Some((prev, duplicates)) if same(prev) => duplicates,
            _ => has_duplicate_names(row),
        };
        self.last = Some((row, duplicates));
        duplicates
    }
}

fn has_duplicate_names(columns: &[(&str, CellRef<'_>)]) -> bool {
    // xxh3, not SipHash: eighty-odd names a finding, hashed once each.
    let mut seen = HashSet::with_capacity_and_hasher(columns.len(), xxhash_rust::xxh3::Xxh3Builder::new());
    !columns.iter().all(|(name, _)| seen.insert(*name))
}

fn merged(columns: &[(&str, CellRef<'_>)]) -> Map<String, Value> {
    let mut row = Map::new();
    for (name, cell) in columns {
        row.insert(name.to_string(), Cell::from(*cell).to_json());
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use lookout_plugin_sdk::FindingOut;

    /// What the line was before it was written directly: a `Value` built and serialised.
    fn through_value(fid: &str, m: &Manifest, detected_at: &str, f: &FindingOut) -> Vec<u8> {
        let mut o = Map::new();
        o.insert("finding_id".into(), fid.into());
        o.insert("detector".into(), m.name.clone().into());
        o.insert("detector_version".into(), m.version.clone().into());
        o.insert("detected_at".into(), detected_at.into());
        o.insert("title".into(), m.title.clone().into());
        o.insert("severity".into(), m.severity.clone().into());
        o.insert("mitre".into(), m.mitre.clone().into());
        o.insert("device_id".into(), f.device_id.clone().into());
        o.insert("device_name".into(), f.device_name.clone().into());
        o.insert("row".into(), Value::Object(merged(&FindingRef::from(f).row)));
        serde_json::to_vec(&Value::Object(o)).unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            name: "d".into(),
            version: "1.0.0".into(),
            title: "A \"quoted\" title".into(),
            description: String::new(),
            severity: "high".into(),
            mitre: vec!["T1021.006".into(), "T1053".into()],
            inputs: Vec::new(),
            parameters: Vec::new(),
            indexes: Vec::new(),
        }
    }

    fn finding(row: Vec<(&str, Cell)>) -> FindingOut {
        FindingOut {
            inputs: Vec::new(),
            device_id: "dev\u{e9}".into(),
            device_name: "host\n1".into(),
            row: row.into_iter().map(|(n, c)| (n.to_string(), c)).collect(),
        }
    }

    #[test]
    fn the_line_is_the_one_a_value_gives_for_every_kind_of_cell() {
        let f = finding(vec![
            ("Timestamp", Cell::Str("2025-05-07T10:00:00Z".into())),
            ("ReportId", Cell::Int(-42)),
            ("Ratio", Cell::Float(0.1)),
            ("NotANumber", Cell::Float(f64::NAN)),
            ("Infinite", Cell::Float(f64::INFINITY)),
            ("Flag", Cell::Bool(true)),
            ("Missing", Cell::Null),
            ("Escaped", Cell::Str("a \"b\" \\ \u{1}".into())),
            ("Nested", Cell::Json(r#"{"a":[1,2.5,"x"]}"#.into())),
            ("NotJson", Cell::Json("{not json".into())),
            ("Big", Cell::Json("18446744073709551615".into())),
        ]);
        let m = manifest();
        let line =
            finding_json("f1", &m, "2025-05-08T00:00:00.0000000Z", &FindingRef::from(&f), &mut NameCheck::default())
                .unwrap();
        assert_eq!(
            String::from_utf8(line).unwrap(),
            String::from_utf8(through_value("f1", &m, "2025-05-08T00:00:00.0000000Z", &f)).unwrap()
        );
    }

    #[test]
    fn a_column_named_twice_keeps_its_first_place_and_its_last_value() {
        let f = finding(vec![("A", Cell::Int(1)), ("B", Cell::Int(2)), ("A", Cell::Int(3))]);
        let m = manifest();
        let line = finding_json("f2", &m, "now", &FindingRef::from(&f), &mut NameCheck::default()).unwrap();
        assert_eq!(line, through_value("f2", &m, "now", &f));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(serde_json::to_string(&v["row"]).unwrap(), r#"{"A":3,"B":2}"#);
    }

    #[test]
    fn a_repeated_name_is_found_whether_or_not_the_row_before_had_the_same_names() {
        let row = |names: &[&'static str]| -> Vec<(&'static str, CellRef<'static>)> {
            names.iter().map(|n| (*n, CellRef::Int(1))).collect()
        };
        let (unique, twice, other) = (row(&["a", "b", "c"]), row(&["a", "b", "a"]), row(&["a", "b", "d"]));
        let (unique2, twice2) = (unique.clone(), twice.clone());
        let mut check = NameCheck::default();
        assert!(!check.has_duplicates(&unique));
        assert!(!check.has_duplicates(&unique2), "the same names again");
        assert!(check.has_duplicates(&twice), "the same length, other names");
        assert!(check.has_duplicates(&twice2), "the same names again, with a repeat");
        assert!(!check.has_duplicates(&other));
        assert!(!check.has_duplicates(&unique[..2]), "a shorter row");
    }
}
