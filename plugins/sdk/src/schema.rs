//! The Defender tables' columns and their types, from Microsoft's Defender XDR advanced
//! hunting schema reference: what the host types cells by, and what a detector needs to
//! be faithful to KQL where a stored row lacks a column (KQL's table has every column of
//! its schema, a missing one empty or null).

use crate::tables::{FILE_CERTIFICATES, LOGON_EVENTS, NETWORK_EVENTS, REGISTRY_EVENTS};

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

/// Columns every Device* event table shares, as Microsoft's schema reference types them.
const DEVICE_COMMON: &str = "Timestamp:datetime DeviceId DeviceName ActionType ReportId:long \
    AppGuardContainerId AdditionalFields:dynamic MachineGroup TenantId Type SourceSystem TimeGenerated:datetime";

/// The initiating process block most Device* tables carry.
const INITIATING_PROCESS: &str = "InitiatingProcessAccountDomain InitiatingProcessAccountName \
    InitiatingProcessAccountSid InitiatingProcessAccountUpn InitiatingProcessAccountObjectId \
    InitiatingProcessMD5 InitiatingProcessSHA1 InitiatingProcessSHA256 InitiatingProcessFileName \
    InitiatingProcessFileSize:long InitiatingProcessFolderPath InitiatingProcessId:long \
    InitiatingProcessCommandLine InitiatingProcessCreationTime:datetime InitiatingProcessIntegrityLevel \
    InitiatingProcessTokenElevation InitiatingProcessParentId:long InitiatingProcessParentFileName \
    InitiatingProcessParentCreationTime:datetime InitiatingProcessLogonId:long \
    InitiatingProcessVersionInfoCompanyName InitiatingProcessVersionInfoProductName \
    InitiatingProcessVersionInfoProductVersion InitiatingProcessVersionInfoInternalFileName \
    InitiatingProcessVersionInfoOriginalFileName InitiatingProcessVersionInfoFileDescription \
    InitiatingProcessSessionId:long IsInitiatingProcessRemoteSession:bool \
    InitiatingProcessRemoteSessionDeviceName InitiatingProcessRemoteSessionIP \
    InitiatingProcessSignerType InitiatingProcessSignatureStatus";

/// File columns of the file-centred tables.
const FILE_COLUMNS: &str = "FileName FolderPath SHA1 SHA256 MD5 FileSize:long";

/// Each table's own columns (beside [`DEVICE_COMMON`] and [`INITIATING_PROCESS`]
/// where it has them): `Name` is a string, `Name:type` anything else. From Microsoft's
/// Defender XDR advanced hunting schema reference.
const TABLES: &[(&str, bool, &str)] = &[
    (
        "DeviceProcessEvents",
        true,
        "ProcessVersionInfoCompanyName ProcessVersionInfoProductName ProcessVersionInfoProductVersion \
         ProcessVersionInfoInternalFileName ProcessVersionInfoOriginalFileName ProcessVersionInfoFileDescription \
         ProcessId:long ProcessCommandLine ProcessIntegrityLevel ProcessTokenElevation \
         ProcessCreationTime:datetime AccountDomain AccountName AccountSid AccountUpn AccountObjectId \
         LogonId:long ProcessRemoteSessionDeviceName ProcessRemoteSessionIP CreatedProcessSessionId:long \
         IsProcessRemoteSession:bool",
    ),
    (
        "DeviceNetworkEvents",
        true,
        "RemoteIP RemotePort:long RemoteUrl LocalIP LocalPort:long Protocol LocalIPType RemoteIPType",
    ),
    (
        "DeviceLogonEvents",
        true,
        "LogonType AccountDomain AccountName AccountSid Protocol FailureReason IsLocalAdmin:bool \
         LogonId:long RemoteDeviceName RemoteIP RemoteIPType RemotePort:long",
    ),
    (
        "DeviceRegistryEvents",
        true,
        "RegistryKey RegistryValueType RegistryValueName RegistryValueData PreviousRegistryKey \
         PreviousRegistryValueName PreviousRegistryValueData",
    ),
    (
        "DeviceFileCertificateInfo",
        false,
        "SHA1 IsSigned:bool SignatureType Signer SignerHash Issuer IssuerHash CertificateSerialNumber \
         CrlDistributionPointUrls CertificateCreationTime:datetime CertificateExpirationTime:datetime \
         CertificateCountersignatureTime:datetime IsTrusted:bool IsRootSignerMicrosoft:bool",
    ),
    (
        "DeviceFileEvents",
        true,
        "PreviousFileName PreviousFolderPath FileOriginUrl FileOriginReferrerUrl FileOriginIP ShareName \
         SensitivityLabel SensitivitySubLabel IsAzureInfoProtectionApplied:bool RequestProtocol \
         RequestSourceIP RequestSourcePort:long RequestAccountName RequestAccountDomain RequestAccountSid",
    ),
    ("DeviceImageLoadEvents", true, ""),
    (
        "IdentityLogonEvents",
        false,
        "Timestamp:datetime ActionType Application LogonType Protocol FailureReason AccountName AccountDomain \
         AccountUpn AccountSid AccountObjectId AccountDisplayName DeviceName DeviceType OSPlatform IPAddress \
         Port DestinationDeviceName DestinationIPAddress DestinationPort:long TargetDeviceName \
         TargetAccountDisplayName Location ISP ReportId AdditionalFields:dynamic TenantId Type SourceSystem \
         TimeGenerated:datetime",
    ),
    (
        "FileProfile",
        false,
        "SHA1 SHA256 MD5 FileSize:long GlobalPrevalence:long GlobalFirstSeen:datetime GlobalLastSeen:datetime \
         Signer Issuer SignerHash IsCertificateValid:bool IsRootSignerMicrosoft:bool SignatureState \
         IsExecutable:bool ThreatName Publisher SoftwareName ProfileAvailability",
    ),
];

fn parse_type(t: &str) -> ColumnType {
    match t {
        "long" => ColumnType::Long,
        "bool" => ColumnType::Bool,
        "datetime" => ColumnType::DateTime,
        _ => ColumnType::Dynamic,
    }
}

/// The columns of `table` as the schema reference lists them — the columns every Device*
/// table shares, its initiating process block and file columns where it has them, then its
/// own — with their types; `None` for a table not listed here.
pub fn columns(table: &str) -> Option<Vec<(&'static str, ColumnType)>> {
    let (_, device, own) = TABLES.iter().find(|(t, _, _)| *t == table)?;
    let mut specs: Vec<&'static str> = Vec::new();
    if *device {
        specs.extend([DEVICE_COMMON, INITIATING_PROCESS]);
        if ![NETWORK_EVENTS, LOGON_EVENTS, REGISTRY_EVENTS].contains(&table) {
            specs.push(FILE_COLUMNS);
        }
    } else if table == FILE_CERTIFICATES {
        specs.push(DEVICE_COMMON);
    }
    specs.push(own);
    let mut out: Vec<(&'static str, ColumnType)> = Vec::new();
    for c in specs.into_iter().flat_map(str::split_whitespace) {
        let (name, t) = match c.split_once(':') {
            Some((n, t)) => (n, parse_type(t)),
            None => (c, ColumnType::String),
        };
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, t));
        }
    }
    Some(out)
}

/// The tables [`columns`] knows.
pub fn tables() -> impl Iterator<Item = &'static str> {
    TABLES.iter().map(|(t, _, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tables_columns_come_in_schema_order_each_once() {
        let network = columns(NETWORK_EVENTS).unwrap();
        let names: Vec<&str> = network.iter().map(|(n, _)| *n).collect();
        assert_eq!(names[..3], ["Timestamp", "DeviceId", "DeviceName"]);
        assert!(names.contains(&"InitiatingProcessCommandLine") && names.contains(&"RemoteIP"));
        assert!(!names.contains(&"SHA1"), "network events carry no file");
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert!(network.contains(&("LocalPort", ColumnType::Long)));
        assert_eq!(columns("SigninLogs"), None);
    }
}
