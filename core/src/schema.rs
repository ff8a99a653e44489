//! What Lookout knows about Defender tables: which tables it accepts and the types of
//! their well-known columns (for `null` → `""` normalisation and type checks).

use lookout_plugin_sdk::tables::{FILE_EVENTS, FILE_PROFILE, IMAGE_LOADS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    String,
    Long,
    Bool,
    DateTime,
    /// Anything (Defender's `dynamic`).
    Dynamic,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::String => "string",
            ColumnType::Long => "long",
            ColumnType::Bool => "bool",
            ColumnType::DateTime => "datetime",
            ColumnType::Dynamic => "dynamic",
        }
    }
}

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
    } else if name == IMAGE_LOADS || name == FILE_EVENTS || is_generic_device_table(name) {
        Ok(TableKind::Event)
    } else {
        Err(format!("unknown table '{name}' (accepted: Device* tables and FileProfile)"))
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
    if file_name.starts_with(FILE_PROFILE) {
        return Some(FILE_PROFILE.to_string());
    }
    // Table names are letters only: `DeviceFileEvents20250507.jsonl` is DeviceFileEvents.
    let prefix: String = file_name.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
    is_generic_device_table(&prefix).then_some(prefix)
}

/// The declared type of a column, if Lookout knows it. Unknown columns are kept verbatim.
pub fn column_type(table_kind: TableKind, column: &str) -> Option<ColumnType> {
    use ColumnType::*;
    let t = match column {
        "Timestamp"
        | "TimeGenerated"
        | "InitiatingProcessCreationTime"
        | "InitiatingProcessParentCreationTime"
        | "GlobalFirstSeen"
        | "GlobalLastSeen" => DateTime,
        "FileSize"
        | "InitiatingProcessId"
        | "InitiatingProcessParentId"
        | "ReportId"
        | "RequestSourcePort"
        | "InitiatingProcessFileSize"
        | "InitiatingProcessSessionId"
        | "GlobalPrevalence" => Long,
        "IsAzureInfoProtectionApplied"
        | "IsInitiatingProcessRemoteSession"
        | "IsCertificateValid"
        | "IsRootSignerMicrosoft"
        | "IsExecutable" => Bool,
        "AdditionalFields" => Dynamic,
        "TenantId"
        | "ActionType"
        | "AppGuardContainerId"
        | "DeviceId"
        | "DeviceName"
        | "FileName"
        | "FolderPath"
        | "FileOriginIP"
        | "FileOriginReferrerUrl"
        | "FileOriginUrl"
        | "MD5"
        | "SHA1"
        | "SHA256"
        | "MachineGroup"
        | "PreviousFileName"
        | "PreviousFolderPath"
        | "RequestAccountDomain"
        | "RequestAccountName"
        | "RequestAccountSid"
        | "RequestProtocol"
        | "RequestSourceIP"
        | "SensitivityLabel"
        | "SensitivitySubLabel"
        | "ShareName"
        | "SourceSystem"
        | "Type"
        | "Signer"
        | "Issuer"
        | "SignerHash"
        | "SignatureState"
        | "ThreatName"
        | "Publisher"
        | "SoftwareName"
        | "ProfileAvailability" => String,
        c if c.starts_with("InitiatingProcess") => String,
        _ => return None,
    };
    // FileProfile has its own columns; only those it shares with events are typed there.
    let _ = table_kind;
    Some(t)
}

/// Columns a row of this kind must have to be stored.
pub fn required_columns(kind: TableKind) -> &'static [&'static str] {
    match kind {
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
    }
}
