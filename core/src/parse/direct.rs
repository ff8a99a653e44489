//! A line turned into its [`NormalRow`]s straight from its text: a flat row with the
//! column names of the last row normalised on this thread, or a Streaming-API envelope
//! (alone or in a `{"records":[…]}` batch, as a Kafka node stores them) whose row has the
//! names of a recent row of its category's table. Each value is typed by its column as it
//! is read and written into the stored encoding at once. Building the parsed columns,
//! then the typed cells, then the encoding from them, and matching the layout name by
//! name, was most of what a row cost the parser thread; the rows of a file nearly always
//! have the same columns as the row before.
//!
//! It gives what [`super::record`] and [`super::normalise`] give together, or nothing: a
//! line with other columns or another table, a value that is not of its column's type, a
//! column the row may not be without, a row with no `ReportId` (its identity is a hash of
//! its content), nested values, an envelope with fields other than strings around its row
//! — anything but the plain case makes it answer `None`, and the general path reads the
//! line (and rejects what it must). Property tests hold the two to the same rows.

use super::flat::Scanner;
use super::normalise::{layouts_of, recent_layout, Layout, NormalRow, TableHints};
use super::record::CATEGORY_PREFIX;
use crate::schema::{ColumnType, TableKind};
use crate::store::codec::EncodedCells;
use lookout_plugin_sdk::time::parse_timestamp;
use lookout_plugin_sdk::wire::cell_tag::{BOOL, INT, NULL, STR};
use lookout_plugin_sdk::wire::{put_varint, zigzag};
use std::borrow::Cow;

/// The rows of `text` when it is a flat row with the columns of the last row normalised
/// on this thread, an envelope, or a `{"records":[…]}` batch of envelopes, whose rows have
/// the columns of a recent row of their table (see the module's comment).
pub fn normalise_line(text: &str, hints: &TableHints) -> Option<Vec<NormalRow>> {
    let mut s = Scanner::new(text);
    s.spaces();
    let start = s.i;
    s.expect(b'{')?;
    s.spaces();
    s.expect(b'"')?;
    let rows = if s.plain_name(b"records") {
        s.spaces();
        s.expect(b':')?;
        s.spaces();
        s.expect(b'[')?;
        let mut rows = Vec::new();
        loop {
            s.spaces();
            rows.push(envelope(&mut s, hints)?);
            s.spaces();
            match s.next()? {
                b',' => continue,
                b']' => break,
                _ => return None,
            }
        }
        s.spaces();
        // A batch is an object with nothing but its records.
        s.expect(b'}')?;
        rows
    } else {
        s.i = start;
        match recent_layout().and_then(|layout| flat_row(&mut s, &layout, hints)) {
            Some(row) => vec![row],
            None => {
                s.i = start;
                vec![envelope(&mut s, hints)?]
            }
        }
    };
    s.spaces();
    s.at_end().then_some(rows)
}

/// A flat row in `layout`, its table told by its `Type` column or the hints.
fn flat_row(s: &mut Scanner<'_>, layout: &Layout, hints: &TableHints) -> Option<NormalRow> {
    let scanned = scan_row(s, layout)?;
    finish(layout, scanned, None, hints)
}

/// A Streaming-API envelope (`{…,"category":"AdvancedHunting-<Table>",…,"properties":{row}}`)
/// whose row has the columns of a recent row of its table. Its other fields must be
/// strings, the category must come before the row, and neither may come twice.
fn envelope(s: &mut Scanner<'_>, hints: &TableHints) -> Option<NormalRow> {
    s.expect(b'{')?;
    let mut category: Option<Cow<'_, str>> = None;
    let mut row = None;
    loop {
        s.spaces();
        s.expect(b'"')?;
        let key = s.string()?;
        s.spaces();
        s.expect(b':')?;
        s.spaces();
        match key.as_ref() {
            "category" if category.is_none() => {
                s.expect(b'"')?;
                category = Some(s.string()?);
            }
            "properties" if row.is_none() => {
                let category = category.as_deref()?;
                let table = category.strip_prefix(CATEGORY_PREFIX).unwrap_or(category);
                // Each of the table's recent layouts in turn: a table's rows come in a few shapes.
                let at = s.i;
                row = layouts_of(table).into_iter().find_map(|layout| {
                    s.i = at;
                    let scanned = scan_row(s, &layout)?;
                    finish(&layout, scanned, Some(table), hints)
                });
                row.as_ref()?;
            }
            "category" | "properties" => return None,
            _ => {
                s.expect(b'"')?;
                s.string()?;
            }
        }
        s.spaces();
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    row
}

/// A row's cells in their stored encoding, as read from its object.
struct Scanned {
    bytes: Vec<u8>,
    starts: Vec<u32>,
    spans: Spans,
    report_id: Option<i64>,
}

/// Reads the object at the scanner as a row with `layout`'s columns, each value typed by
/// its column and written into the stored encoding; the scanner is left after it.
fn scan_row(s: &mut Scanner<'_>, layout: &Layout) -> Option<Scanned> {
    if layout.required.iter().any(|(_, at)| at.is_none()) {
        return None;
    }
    let names = &layout.names;
    let last = layout.last_size.get();
    let mut bytes = Vec::with_capacity(if last > 0 { last + last / 4 } else { 64 * names.len() });
    let mut starts = Vec::with_capacity(names.len());
    put_varint(&mut bytes, names.len() as u64);
    // Where the string cells the row's key and identity are made of lie in `bytes`.
    let mut spans = Spans::default();
    let mut report_id: Option<i64> = None;
    s.expect(b'{')?;
    for (i, name) in names.iter().enumerate() {
        s.spaces();
        if i > 0 {
            s.expect(b',')?;
            s.spaces();
        }
        s.expect(b'"')?;
        if !(layout.plain_names && s.plain_name(name.as_bytes())) && s.string()? != name.as_str() {
            return None;
        }
        s.spaces();
        s.expect(b':')?;
        s.spaces();
        starts.push(u32::try_from(bytes.len()).ok()?);
        let typed = layout.types[i];
        let required = layout.required_column[i];
        match s.peek()? {
            b'"' => {
                s.i += 1;
                bytes.push(STR);
                let at = s.string_into(&mut bytes)?;
                let span = (at, bytes.len());
                match typed {
                    None | Some(ColumnType::String | ColumnType::Dynamic) => {}
                    Some(ColumnType::DateTime) if parse_timestamp(text_at(&bytes, span)?).is_some() => {}
                    // A long or a bool sent as text, a timestamp that is not one: the general path.
                    _ => return None,
                }
                if required && span.0 == span.1 {
                    return None;
                }
                spans.note(layout, i, span);
            }
            b'n' => {
                s.i += 1;
                s.word(b"ull")?;
                if required {
                    return None;
                }
                // KQL strings are never null.
                if typed == Some(ColumnType::String) {
                    bytes.extend_from_slice(&[STR, 0]);
                    spans.note(layout, i, (bytes.len(), bytes.len()));
                } else {
                    bytes.push(NULL);
                }
            }
            c @ (b't' | b'f') => {
                s.i += 1;
                let (rest, value): (&[u8], bool) = if c == b't' { (b"rue", true) } else { (b"alse", false) };
                s.word(rest)?;
                if !matches!(typed, None | Some(ColumnType::Bool | ColumnType::Dynamic)) {
                    return None;
                }
                bytes.extend_from_slice(&[BOOL, u8::from(value)]);
            }
            b'-' | b'0'..=b'9' => {
                let negative = s.peek() == Some(b'-');
                if negative {
                    s.i += 1;
                }
                let digits = s.integer()?;
                // serde_json: `-0` is a float, and so is anything below i64::MIN; above
                // i64::MAX it is a u64 kept as JSON text. The general path for all three.
                let value = match (negative, digits) {
                    (true, 0) => return None,
                    (true, d) if d <= 1 << 63 => (d as i64).wrapping_neg(),
                    (false, d) => i64::try_from(d).ok()?,
                    _ => return None,
                };
                if !matches!(typed, None | Some(ColumnType::Long | ColumnType::Dynamic)) {
                    return None;
                }
                bytes.push(INT);
                put_varint(&mut bytes, zigzag(value));
                if layout.report_id == Some(i) {
                    report_id = Some(value);
                }
            }
            // Nested values: the general path.
            _ => return None,
        }
    }
    s.spaces();
    s.expect(b'}')?;
    layout.last_size.set(bytes.len());
    Some(Scanned { bytes, starts, spans, report_id })
}

/// The row made of a scanned object: its table told as the general path tells it (an
/// envelope's category, else a non-empty `Type` column, else the file's or `--table`'s),
/// which must be its layout's.
fn finish(layout: &Layout, scanned: Scanned, category: Option<&str>, hints: &TableHints) -> Option<NormalRow> {
    let Scanned { bytes, starts, spans, report_id } = scanned;
    let type_value = match spans.type_column {
        Some(span) => text_at(&bytes, span)?,
        None => "",
    };
    let table = category
        .or(Some(type_value).filter(|t| !t.is_empty()))
        .or(hints.file_table.as_deref())
        .or(hints.explicit.as_deref())?;
    if table != layout.table {
        return None;
    }
    let text_of = |span: Option<(usize, usize)>| span.and_then(|span| text_at(&bytes, span)).unwrap_or("").to_string();
    let timestamp = match (layout.kind, spans.timestamp) {
        (TableKind::Event, Some(span)) => text_at(&bytes, span).and_then(parse_timestamp).unwrap_or(0),
        _ => 0,
    };
    let identity = match (report_id, spans.report_id.and_then(|span| text_at(&bytes, span))) {
        (Some(i), _) => i.to_string(),
        (None, Some(s)) if !s.is_empty() => s.to_string(),
        // No ReportId: the identity is a hash of the row's content (the general path).
        _ => return None,
    };
    let (sha1, device_id) = (text_of(spans.sha1), text_of(spans.device_id));
    Some(NormalRow {
        table: layout.table.clone(),
        kind: layout.kind,
        names: layout.names.clone(),
        cells: EncodedCells::from_encoded(&layout.content, bytes, starts),
        sha1,
        device_id,
        timestamp,
        identity,
        unexpected_types: 0,
    })
}

/// Where the string cells a row's key, identity and table are read from lie in its
/// encoding (start and end of the string's bytes).
#[derive(Default)]
struct Spans {
    sha1: Option<(usize, usize)>,
    device_id: Option<(usize, usize)>,
    timestamp: Option<(usize, usize)>,
    report_id: Option<(usize, usize)>,
    type_column: Option<(usize, usize)>,
}

impl Spans {
    fn note(&mut self, layout: &Layout, i: usize, span: (usize, usize)) {
        let at = Some(i);
        if layout.sha1 == at {
            self.sha1 = Some(span);
        }
        if layout.device_id == at {
            self.device_id = Some(span);
        }
        if layout.timestamp == at {
            self.timestamp = Some(span);
        }
        if layout.report_id == at {
            self.report_id = Some(span);
        }
        if layout.type_at == at {
            self.type_column = Some(span);
        }
    }
}

/// A string cell's text: its bytes came from a `&str`, cut at quotes (or unescaped), so
/// the check cannot fail; it is a short one (ids, hashes, timestamps).
fn text_at(bytes: &[u8], (start, end): (usize, usize)) -> Option<&str> {
    std::str::from_utf8(bytes.get(start..end)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::record::{parse_document_with_serde, unwrap_document};
    use crate::parse::Reject;
    use proptest::prelude::*;

    /// A DeviceFileEvents row as the generator writes it, with a `Type` column.
    const ROW: &str = r#"{"Timestamp":"2025-05-04T09:10:59.9195773Z","DeviceId":"15e164408e6ba5e3c6f07d3e48cff6638e387810","DeviceName":"ws-0010.corp.example.com","ActionType":"FileCreated","FileName":"84c66de1.tmp","FolderPath":"C:\\Users\\carol\\AppData\\Local\\Temp\\84c66de1.tmp","SHA1":"106769b7be363c82ad793594dd431d65c09b4d18","FileSize":6003021,"InitiatingProcessCommandLine":"\"OneDrive.exe\" -k netsvcs -p","InitiatingProcessId":16561,"InitiatingProcessFileSize":null,"IsInitiatingProcessRemoteSession":false,"AdditionalFields":"{}","Extra":"x","Type":"DeviceFileEvents","ReportId":1234}"#;

    /// The general path: serde, unwrapping, normalising.
    fn general(text: &str, hints: &TableHints) -> Vec<Result<NormalRow, Reject>> {
        match parse_document_with_serde(text.as_bytes()) {
            Ok(doc) => unwrap_document(doc)
                .into_iter()
                .map(|u| {
                    u.and_then(|u| {
                        super::super::normalise::normalise_columns(u.row, u.category_table.as_deref(), hints)
                    })
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Whether the rows made here are, one for one, the rows the general path makes.
    fn same(direct: &[NormalRow], general: &[Result<NormalRow, Reject>]) -> bool {
        direct.len() == general.len() && direct.iter().zip(general).all(|(d, g)| g.as_ref().is_ok_and(|g| g == d))
    }

    fn hints(file: Option<&str>) -> TableHints {
        TableHints { file_table: file.map(str::to_string), explicit: None }
    }

    /// `row` as a Streaming-API envelope of `table`.
    fn envelope_of(table: &str, row: &str) -> String {
        format!(
            r#"{{"time":"2025-05-04T09:11:00Z","tenantId":"t","operationName":"Publish","category":"AdvancedHunting-{table}","properties":{row}}}"#
        )
    }

    #[test]
    fn a_row_with_the_last_row_s_columns_is_normalised_here() {
        let h = hints(None);
        assert!(matches!(general(ROW, &h).as_slice(), [Ok(_)]));
        let next = ROW.replace("FileCreated", "FileModified").replace("1234", "1235");
        let direct = normalise_line(&next, &h).expect("the same columns as the row before");
        assert!(same(&direct, &general(&next, &h)));
        assert_eq!(direct[0].identity, "1235");
        assert_eq!(direct[0].sha1, "106769b7be363c82ad793594dd431d65c09b4d18");
        // Other columns, or the same columns in another order: not here.
        assert!(normalise_line(&ROW.replace("\"Extra\"", "\"Other\""), &h).is_none());
        assert!(normalise_line(r#"{"ReportId":1}"#, &h).is_none());
    }

    /// Envelopes alone and in batches, of two tables in turn: each row in a recent layout
    /// of its own table; the category, not the `Type` column, tells the table.
    #[test]
    fn envelopes_and_batches_of_several_tables() {
        let h = hints(None);
        let loads = ROW.replace(r#""Type":"DeviceFileEvents","#, "");
        let files = envelope_of("DeviceFileEvents", ROW);
        let images = envelope_of("DeviceImageLoadEvents", &loads);
        for line in [&files, &images] {
            assert!(matches!(general(line, &h).as_slice(), [Ok(_)]), "{line}");
        }
        let batch = format!(r#"{{"records":[{files},{images},{}]}}"#, images.replace("1234", "77"));
        let direct = normalise_line(&batch, &h).expect("both tables have a recent layout");
        assert!(same(&direct, &general(&batch, &h)));
        let tables: Vec<&str> = direct.iter().map(|r| r.table.as_str()).collect();
        assert_eq!(tables, ["DeviceFileEvents", "DeviceImageLoadEvents", "DeviceImageLoadEvents"]);
        let single = normalise_line(&images, &h).expect("an envelope alone");
        assert!(same(&single, &general(&images, &h)));
        // Not read here: a category after its row, a record that is not an envelope, a
        // batch with other fields, a nested field, an empty batch.
        let late = format!(r#"{{"properties":{loads},"category":"AdvancedHunting-DeviceImageLoadEvents"}}"#);
        for line in [
            late,
            format!(r#"{{"records":[{files},5]}}"#),
            format!(r#"{{"records":[{files}],"x":"y"}}"#),
            files.replace(r#""tenantId":"t""#, r#""tenantId":{"a":1}"#),
            r#"{"records":[]}"#.to_string(),
        ] {
            assert!(normalise_line(&line, &h).is_none(), "{line}");
        }
    }

    /// A string's length is written before it: one byte below 251, three, five or nine
    /// from there (and an escape is two bytes of the line, one of the string).
    #[test]
    fn long_strings_with_and_without_escapes() {
        let h = hints(None);
        for len in [249, 250, 251, 252, 300, 65_535, 65_536, 70_000] {
            for escaped in [false, true] {
                let value = if escaped { format!("\\\\{}", "x".repeat(len - 1)) } else { "x".repeat(len) };
                // A column read back from where it lies (the device) and one that is not.
                let line = ROW
                    .replace(r#""\"OneDrive.exe\" -k netsvcs -p""#, &format!("\"{value}\""))
                    .replace("15e164408e6ba5e3c6f07d3e48cff6638e387810", &value);
                assert_ne!(line, ROW);
                assert!(matches!(general(ROW, &h).as_slice(), [Ok(_)]));
                let direct = normalise_line(&line, &h).expect("read here");
                assert!(same(&direct, &general(&line, &h)), "{len} {escaped}");
            }
        }
    }

    /// Values of every kind, in and out of each column's type.
    fn json_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"\"".to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("0".to_string()),
            Just("-0".to_string()),
            Just("1.5".to_string()),
            Just("\"42\"".to_string()),
            Just("\"2025-05-04T09:10:59Z\"".to_string()),
            Just("\"2025-13-04T09:10:59Z\"".to_string()),
            Just("\"DeviceNetworkEvents\"".to_string()),
            Just("\"C:\\\\x\\\"y\\\"\"".to_string()),
            Just("\"\\u0041\"".to_string()),
            Just("{\"a\":1}".to_string()),
            Just("[1]".to_string()),
            Just("18446744073709551615".to_string()),
            Just("9223372036854775808".to_string()),
            Just("-9223372036854775808".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "\"[a-z0-9 ]{0,8}\"",
        ]
    }

    /// The row's fields, in the order `ROW` has them, as (name, JSON text).
    fn fields_of(row: &str) -> Result<Vec<(String, String)>, TestCaseError> {
        Ok(serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(row)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect())
    }

    fn object(fields: &[(String, String)]) -> String {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
        format!("{{{}}}", body.join(","))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Whatever row is made here, the general path makes the same one.
        #[test]
        fn rows_made_here_are_the_general_path_s(
            changes in prop::collection::vec((0..16usize, json_value()), 0..4),
            file in prop::sample::select(vec![None, Some("DeviceFileEvents"), Some("DeviceProcessEvents")]),
            drop_type in any::<bool>(),
        ) {
            let mut fields = fields_of(ROW)?;
            if drop_type {
                fields.retain(|(k, _)| k != "Type");
            }
            let h = hints(file);
            // The first row sets the layout; the changed one follows it.
            let first = object(&fields);
            prop_assume!(matches!(general(&first, &h).as_slice(), [Ok(_)]));
            for (at, value) in changes {
                let n = fields.len();
                fields[at % n].1 = value;
            }
            let changed = object(&fields);
            if let Some(direct) = normalise_line(&changed, &h) {
                let expected = general(&changed, &h);
                prop_assert!(same(&direct, &expected), "{:?} made here, {:?} by the general path, of {}", direct, expected, changed);
            }
        }

        /// The same for batches of envelopes of two tables, rows changed anywhere.
        #[test]
        fn batches_made_here_are_the_general_path_s(
            tables in prop::collection::vec(any::<bool>(), 1..4),
            changes in prop::collection::vec((0..4usize, 0..16usize, json_value()), 0..4),
            category in prop::sample::select(vec!["AdvancedHunting-", "", "AdvancedHunting-Nope"]),
        ) {
            let h = hints(None);
            let files = fields_of(ROW)?;
            let loads: Vec<(String, String)> = files.iter().filter(|(k, _)| k != "Type").cloned().collect();
            // Layouts for both tables first.
            for (table, row) in [("DeviceFileEvents", &files), ("DeviceImageLoadEvents", &loads)] {
                prop_assume!(matches!(general(&envelope_of(table, &object(row)), &h).as_slice(), [Ok(_)]));
            }
            let mut records: Vec<(&str, Vec<(String, String)>)> = tables
                .iter()
                .map(|&f| if f { ("DeviceFileEvents", files.clone()) } else { ("DeviceImageLoadEvents", loads.clone()) })
                .collect();
            for (r, at, value) in changes {
                let n = records.len();
                let row = &mut records[r % n].1;
                let m = row.len();
                row[at % m].1 = value;
            }
            let body: Vec<String> = records
                .iter()
                .map(|(table, row)| envelope_of(table, &object(row)).replace("AdvancedHunting-", category))
                .collect();
            let batch = format!(r#"{{"records":[{}]}}"#, body.join(","));
            if let Some(direct) = normalise_line(&batch, &h) {
                let expected = general(&batch, &h);
                prop_assert!(same(&direct, &expected), "{:?} made here, {:?} by the general path, of {}", direct, expected, batch);
            }
        }
    }
}
