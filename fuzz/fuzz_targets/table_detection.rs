//! Table detection: envelope category, `Type` column, file name, `--table`, in that
//! order. The input is split on NUL into those four strings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lookout_core::parse::normalise::{normalise, TableHints};
use lookout_core::schema::{table_from_file_name, table_kind};
use serde_json::{json, Map, Value};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let category = parts.next().filter(|s| !s.is_empty());
    let type_col = parts.next().unwrap_or("");
    let file_name = parts.next().unwrap_or("");
    let explicit = parts.next().filter(|s| !s.is_empty());
    if let Some(t) = table_from_file_name(file_name) {
        assert!(file_name.starts_with(&t));
        assert!(table_kind(&t).is_ok(), "a file name gave an unacceptable table {t:?}");
    }
    let hints = TableHints { file_table: table_from_file_name(file_name), explicit: explicit.map(str::to_string) };
    let mut row = Map::new();
    row.insert("Timestamp".into(), json!("2025-05-07T16:55:49.7268426Z"));
    row.insert("DeviceId".into(), json!("d"));
    row.insert("SHA1".into(), json!("s"));
    if !type_col.is_empty() {
        row.insert("Type".into(), Value::String(type_col.to_string()));
    }
    match normalise(row, category, &hints) {
        Ok(r) => {
            let expected = category
                .or((!type_col.is_empty()).then_some(type_col))
                .or(hints.file_table.as_deref())
                .or(explicit);
            assert_eq!(Some(r.table.as_str()), expected);
            assert!(table_kind(&r.table).is_ok());
        }
        Err(reject) => assert!(!reject.reason.is_empty()),
    }
});
