//! What Lookout knows about Defender tables: which tables it accepts and the types of
//! their well-known columns (for `null` → `""` normalisation and type checks).

use lookout_plugin_sdk::tables::{FILE_EVENTS, FILE_PROFILE, IDENTITY_LOGONS, IMAGE_LOADS};
use std::collections::HashMap;
use std::sync::OnceLock;

pub use lookout_plugin_sdk::schema::ColumnType;

/// How a table's rows are identified and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// Device* event tables: keyed by (table, SHA1, DeviceId, Timestamp, ReportId).
    Event,
    /// The FileProfile feed: keyed by SHA1, newest wins.
    Profile,
}

/// The kind of a table name, or why it is not accepted.
pub fn table_kind(name: &str) -> Result<TableKind, String> {
    if name == FILE_PROFILE {
        Ok(TableKind::Profile)
    } else if name == IMAGE_LOADS || name == FILE_EVENTS || name == IDENTITY_LOGONS || is_generic_device_table(name) {
        Ok(TableKind::Event)
    } else {
        Err(format!("unknown table '{name}' (accepted: Device* tables, IdentityLogonEvents and FileProfile)"))
    }
}

fn is_generic_device_table(name: &str) -> bool {
    name.len() > "Device".len()
        && name.len() <= 64
        && name.starts_with("Device")
        && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The table a file name implies (`DeviceFileEvents-2025-05-07.json` → `DeviceFileEvents`).
pub fn table_from_file_name(file_name: &str) -> Option<String> {
    for table in [FILE_PROFILE, IDENTITY_LOGONS] {
        if file_name.starts_with(table) {
            return Some(table.to_string());
        }
    }
    // Table names are letters only: `DeviceFileEvents20250507.jsonl` is DeviceFileEvents.
    let prefix: String = file_name.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
    is_generic_device_table(&prefix).then_some(prefix)
}

/// A table's column types by name. Every cell of every row is looked up here, and the
/// keys are Lookout's own column names, so the hash is the cheapest that spreads them
/// ([`NameHasher`]), not one that resists chosen keys.
pub type ColumnTypes = HashMap<&'static str, ColumnType, std::hash::BuildHasherDefault<NameHasher>>;

/// FxHash (rustc's): a rotate, xor and multiply per 8 bytes. xxh3's streaming hasher,
/// which a `HashMap` drives for a `&str`, was 3.5% of a 1M-row ingest's samples (perf)
/// for names of 10–30 bytes.
#[derive(Default, Clone, Copy)]
pub struct NameHasher(u64);

impl NameHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type TableColumns = HashMap<&'static str, ColumnTypes>;

/// The per-table column types, built once from the SDK's schema reference.
fn tables() -> &'static TableColumns {
    static TABLE_COLUMNS: OnceLock<TableColumns> = OnceLock::new();
    TABLE_COLUMNS.get_or_init(|| {
        lookout_plugin_sdk::schema::tables()
            .map(|table| {
                let columns = lookout_plugin_sdk::schema::columns(table).unwrap_or_default().into_iter().collect();
                (table, columns)
            })
            .collect()
    })
}

/// The declared type of a column of `table`, if Lookout knows it (Microsoft's schema for
/// the tables of `lookout_plugin_sdk::schema`; other Device* tables get the columns every Device* table
/// shares). Unknown columns are kept verbatim.
pub fn column_type(table: &str, column: &str) -> Option<ColumnType> {
    column_types(table).and_then(|c| c.get(column)).copied()
}

/// The column types of `table` (see [`column_type`]), looked up once for a whole row.
pub fn column_types(table: &str) -> Option<&'static ColumnTypes> {
    let all = tables();
    all.get(table).or_else(|| all.get("DeviceImageLoadEvents"))
}

/// The columns a row's key is read from as their type: a value of the wrong type there
/// cannot be kept (the row could not be keyed or found again), so the row is rejected.
/// Anything else is kept as sent — ReportId too, whose text (whatever its type) is the
/// key's last part.
pub fn is_key_column(column: &str) -> bool {
    matches!(column, "Timestamp" | "DeviceId" | "SHA1")
}

/// Columns a row of this table must have to be stored (Defender for Identity rows name no
/// device id).
pub fn required_columns(table: &str, kind: TableKind) -> &'static [&'static str] {
    match kind {
        TableKind::Event if table == IDENTITY_LOGONS => &["Timestamp"],
        TableKind::Event => &["DeviceId", "Timestamp"],
        TableKind::Profile => &["SHA1"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables() {
        assert_eq!(table_kind("DeviceFileEvents"), Ok(TableKind::Event));
        assert_eq!(table_kind("DeviceProcessEvents"), Ok(TableKind::Event));
        assert_eq!(table_kind("FileProfile"), Ok(TableKind::Profile));
        assert!(table_kind("SigninLogs").unwrap_err().contains("unknown table 'SigninLogs'"));
        assert!(table_kind("Device").is_err());
        assert_eq!(table_from_file_name("DeviceFileEvents-01.jsonl.gz").as_deref(), Some("DeviceFileEvents"));
        assert_eq!(table_from_file_name("FileProfile_feed.json").as_deref(), Some("FileProfile"));
        assert_eq!(table_from_file_name("export.json"), None);
        assert_eq!(table_kind("IdentityLogonEvents"), Ok(TableKind::Event));
        assert_eq!(table_from_file_name("IdentityLogonEvents_1.json").as_deref(), Some("IdentityLogonEvents"));
    }

    /// Types per table, as Microsoft's schema has them: the same name can differ.
    #[test]
    fn column_types_are_per_table() {
        use ColumnType::*;
        assert_eq!(column_type("DeviceProcessEvents", "InitiatingProcessLogonId"), Some(Long));
        assert_eq!(column_type("DeviceProcessEvents", "InitiatingProcessCommandLine"), Some(String));
        assert_eq!(column_type("DeviceProcessEvents", "ProcessId"), Some(Long));
        assert_eq!(column_type("DeviceNetworkEvents", "LocalPort"), Some(Long));
        assert_eq!(column_type("DeviceNetworkEvents", "SHA1"), None, "network events carry no file");
        assert_eq!(column_type("DeviceLogonEvents", "IsLocalAdmin"), Some(Bool));
        assert_eq!(column_type("DeviceFileCertificateInfo", "CertificateCountersignatureTime"), Some(DateTime));
        assert_eq!(column_type("IdentityLogonEvents", "ReportId"), Some(String), "a string in Identity tables");
        assert_eq!(column_type("DeviceFileEvents", "ReportId"), Some(Long));
        assert_eq!(column_type("FileProfile", "GlobalPrevalence"), Some(Long));
        assert_eq!(column_type("DeviceEvents", "InitiatingProcessId"), Some(Long), "another Device* table");
        assert_eq!(column_type("DeviceProcessEvents", "SomethingNew"), None);
    }
}
