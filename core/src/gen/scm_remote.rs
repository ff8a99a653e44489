//! Rows for `scm-remote-process` (FalconFriday 0xFF-0083, Remote Process Invocation Via
//! SCM): inbound connections accepted by services.exe, services.exe children (service
//! starts) and the certificates of the signed ones; attacks that must fire and near misses
//! (one per row of the rule's semantics table where it makes sense) that must not.
//!
//! Exactness: background rows use each device's own services.exe process id, and every
//! background child is a signed binary with a certificate row (or `msiexec.exe /V`), so a
//! background pair, which happens whenever a service starts within ten seconds of an
//! inbound connection, never fires. Every attack and near miss has a services.exe process
//! id and a SHA1 of its own, so the only pairs it forms are the ones built here; each
//! attack forms exactly one pair, and its finding is expected.

use super::{hex_of, stable_hex, Gen};
use lookout_plugin_sdk::time::{format_timestamp, TICKS_PER_SEC};
use rand::Rng;
use serde_json::{Map, Value};

const NETWORK: &str = "DeviceNetworkEvents";
const PROCESS: &str = "DeviceProcessEvents";
const CERTIFICATES: &str = "DeviceFileCertificateInfo";
const DETECTOR: &str = "scm-remote-process";
const SEC: i64 = TICKS_PER_SEC;
const SERVICES: &str = "services.exe";

/// Signed service binaries the background starts: (file name, folder, command line).
const SERVICE_BINARIES: &[(&str, &str, &str)] = &[
    ("svchost.exe", r"C:\Windows\System32", r"C:\Windows\system32\svchost.exe -k netsvcs -p"),
    ("TrustedInstaller.exe", r"C:\Windows\servicing", r"C:\Windows\servicing\TrustedInstaller.exe"),
    ("sppsvc.exe", r"C:\Windows\System32", r"C:\Windows\system32\sppsvc.exe"),
    ("VSSVC.exe", r"C:\Windows\System32", r"C:\Windows\system32\vssvc.exe"),
    ("WmiApSrv.exe", r"C:\Windows\System32\wbem", r"C:\Windows\system32\wbem\WmiApSrv.exe"),
    ("msiexec.exe", r"C:\Windows\System32", "msiexec.exe /V"),
    (
        "elevation_service.exe",
        r"C:\Program Files (x86)\Microsoft\Edge\Application\120.0.2210.91",
        "\"elevation_service.exe\"",
    ),
    ("GoogleUpdate.exe", r"C:\Program Files (x86)\Google\Update", "\"GoogleUpdate.exe\" /svc"),
];

/// Other processes' network events on the same devices (never services.exe inbound).
const OTHER_NETWORK: &[(&str, &str, i64)] = &[
    ("svchost.exe", "InboundConnectionAccepted", 135),
    ("System", "InboundConnectionAccepted", 445),
    ("chrome.exe", "ConnectionSuccess", 443),
    ("MsMpEng.exe", "ConnectionSuccess", 443),
    ("services.exe", "ListeningConnectionCreated", 49668),
];

/// A services.exe process: its id and start time (`InitiatingProcessCreationTime`).
#[derive(Clone, Copy)]
struct Scm {
    name: &'static str,
    pid: Option<i64>,
    started: Option<i64>,
}

impl Gen {
    /// Each device's own services.exe (started at boot, days ago).
    fn scm_device(&self, device: usize) -> Scm {
        let d = device as i64;
        let boot = self.spec.base_time - (1 + d % 9) * 86_400 * SEC - d * 613 * SEC;
        Scm { name: SERVICES, pid: Some(600 + (d * 13) % 250), started: Some(boot) }
    }

    /// The initiating-process columns of a services.exe (or another process) row.
    fn scm_columns(&mut self, m: &mut Map<String, Value>, scm: Scm) {
        self.process_columns(m, scm.name, "system");
        let lower = scm.name.to_ascii_lowercase();
        m.insert("InitiatingProcessAccountDomain".into(), "nt authority".into());
        m.insert("InitiatingProcessAccountSid".into(), "S-1-5-18".into());
        m.insert("InitiatingProcessAccountUpn".into(), "".into());
        m.insert("InitiatingProcessCommandLine".into(), format!("C:\\Windows\\system32\\{lower}").into());
        m.insert("InitiatingProcessFolderPath".into(), format!("c:\\windows\\system32\\{lower}").into());
        m.insert("InitiatingProcessId".into(), scm.pid.map_or(Value::Null, Value::from));
        m.insert(
            "InitiatingProcessCreationTime".into(),
            scm.started.map_or(Value::Null, |t| format_timestamp(t).into()),
        );
        m.insert("InitiatingProcessParentFileName".into(), "wininit.exe".into());
        m.insert("InitiatingProcessParentId".into(), 560.into());
        m.insert("InitiatingProcessSHA1".into(), stable_hex(&format!("sha1{lower}"), 20).into());
        m.insert("InitiatingProcessMD5".into(), stable_hex(&format!("md5{lower}"), 16).into());
        m.insert("InitiatingProcessSHA256".into(), stable_hex(&format!("sha256{lower}"), 32).into());
    }

    /// A network event of `scm` (an inbound connection when `action` says so); its
    /// ReportId.
    fn scm_connection(&mut self, device: usize, at: i64, scm: Scm, action: &str, local_port: i64) -> i64 {
        let mut m = self.event(device, at, action);
        let remote =
            format!("10.{}.{}.{}", self.rng.gen_range(0..4), self.rng.gen_range(0..255), self.rng.gen_range(2..250));
        let inbound = action.eq_ignore_ascii_case("InboundConnectionAccepted");
        m.insert("RemoteIP".into(), remote.into());
        m.insert("RemotePort".into(), if inbound { self.rng.gen_range(49152..65535i64) } else { local_port }.into());
        m.insert("RemoteUrl".into(), "".into());
        m.insert("LocalIP".into(), format!("10.1.{}.{}", device / 250, device % 250 + 2).into());
        m.insert("LocalPort".into(), if inbound { local_port } else { self.rng.gen_range(49152..65535i64) }.into());
        m.insert("Protocol".into(), "Tcp".into());
        m.insert("LocalIPType".into(), "Private".into());
        m.insert("RemoteIPType".into(), "Private".into());
        self.scm_columns(&mut m, scm);
        m.insert("AppGuardContainerId".into(), "".into());
        m.insert("AdditionalFields".into(), Value::Null);
        m.insert("MachineGroup".into(), "Servers".into());
        let report = m.get("ReportId").and_then(Value::as_i64).unwrap_or(0);
        self.push(NETWORK, m);
        report
    }

    /// A process `scm` created; its (Timestamp text, SHA1).
    #[allow(clippy::too_many_arguments)]
    fn scm_child(
        &mut self,
        device: usize,
        at: i64,
        scm: Scm,
        action: &str,
        folder: &str,
        file: &str,
        sha1: &str,
        command_line: &str,
    ) -> String {
        let mut m = self.event(device, at, action);
        m.insert("FileName".into(), file.into());
        m.insert("FolderPath".into(), format!("{folder}\\{file}").into());
        m.insert("SHA1".into(), sha1.into());
        m.insert("SHA256".into(), stable_hex(&format!("256{sha1}"), 32).into());
        m.insert("MD5".into(), stable_hex(&format!("md5{sha1}"), 16).into());
        m.insert("FileSize".into(), self.rng.gen_range(30_000..3_000_000i64).into());
        m.insert("ProcessVersionInfoCompanyName".into(), "".into());
        m.insert("ProcessVersionInfoProductName".into(), "".into());
        m.insert("ProcessVersionInfoProductVersion".into(), "".into());
        m.insert("ProcessVersionInfoInternalFileName".into(), "".into());
        m.insert("ProcessVersionInfoOriginalFileName".into(), "".into());
        m.insert("ProcessVersionInfoFileDescription".into(), "".into());
        m.insert("ProcessId".into(), self.rng.gen_range(1000..30000i64).into());
        m.insert("ProcessCommandLine".into(), command_line.into());
        m.insert("ProcessIntegrityLevel".into(), "System".into());
        m.insert("ProcessTokenElevation".into(), "TokenElevationTypeDefault".into());
        m.insert("ProcessCreationTime".into(), format_timestamp(at).into());
        m.insert("AccountDomain".into(), "nt authority".into());
        m.insert("AccountName".into(), "system".into());
        m.insert("AccountSid".into(), "S-1-5-18".into());
        m.insert("AccountUpn".into(), "".into());
        m.insert("AccountObjectId".into(), "".into());
        m.insert("LogonId".into(), 999.into());
        self.scm_columns(&mut m, scm);
        m.insert("AppGuardContainerId".into(), "".into());
        m.insert("AdditionalFields".into(), Value::Null);
        m.insert("MachineGroup".into(), "Servers".into());
        self.push(PROCESS, m);
        format_timestamp(at)
    }

    /// A certificate row for `sha1` seen on `device`.
    fn scm_certificate(&mut self, device: usize, at: i64, sha1: &str, signer: &str) {
        let mut m = self.event(device, at, "");
        m.remove("ActionType");
        let microsoft = signer.starts_with("Microsoft");
        m.insert("SHA1".into(), sha1.into());
        m.insert("IsSigned".into(), true.into());
        m.insert("SignatureType".into(), if microsoft { "Catalog" } else { "Embedded" }.into());
        m.insert("Signer".into(), signer.into());
        m.insert("SignerHash".into(), stable_hex(&format!("signer{signer}"), 20).into());
        let issuer = if microsoft {
            "Microsoft Windows Production PCA 2011"
        } else {
            "DigiCert SHA2 Assured ID Code Signing CA"
        };
        m.insert("Issuer".into(), issuer.into());
        m.insert("IssuerHash".into(), stable_hex(&format!("issuer{issuer}"), 20).into());
        m.insert("CertificateSerialNumber".into(), stable_hex(&format!("serial{signer}"), 19).into());
        m.insert(
            "CrlDistributionPointUrls".into(),
            "[\"http://crl.microsoft.com/pki/crl/products/MicWinProPCA2011_2011-10-19.crl\"]".into(),
        );
        m.insert("CertificateCreationTime".into(), format_timestamp(self.spec.base_time - 200 * 86_400 * SEC).into());
        m.insert("CertificateExpirationTime".into(), format_timestamp(self.spec.base_time + 160 * 86_400 * SEC).into());
        m.insert(
            "CertificateCountersignatureTime".into(),
            format_timestamp(self.spec.base_time - 90 * 86_400 * SEC).into(),
        );
        m.insert("IsTrusted".into(), true.into());
        m.insert("IsRootSignerMicrosoft".into(), microsoft.into());
        m.insert("MachineGroup".into(), "Servers".into());
        self.push(CERTIFICATES, m);
    }

    /// A time in the last 100 minutes, on a whole second.
    fn scm_time(&mut self) -> i64 {
        let secs = self.rng.gen_range(120..6000i64);
        (self.spec.base_time / SEC - secs) * SEC
    }

    fn scm_expect(&mut self, device: usize, report: i64, child_at: String, sha1: &str) {
        let device_id = self.devices[device].0.clone();
        self.expect(
            DETECTOR,
            &[
                ("DeviceId", device_id),
                ("ReportId", report.to_string()),
                ("TimestampChild", child_at),
                ("SHA1", sha1.to_string()),
            ],
        );
    }
}

pub(super) fn generate(g: &mut Gen) {
    background(g);
    for i in 0..g.spec.attacks {
        attack(g, i);
    }
    near_misses(g);
}

/// About `events / 40` rows: services.exe inbound connections, service starts of signed
/// binaries (some right after a connection: pairs that never fire), their certificates,
/// and other processes' network events.
fn background(g: &mut Gen) {
    let total = (g.spec.events / 40).max(8);
    let mut certified = std::collections::BTreeSet::new();
    let mut rows = 0;
    while rows < total {
        let device = g.skewed_device();
        let scm = g.scm_device(device);
        let at = g.scm_time() + g.rng.gen_range(0..SEC);
        match g.rng.gen_range(0..10) {
            0..=3 => {
                let port = if g.rng.gen_bool(0.7) { 135 } else { 445 };
                g.scm_connection(device, at, scm, "InboundConnectionAccepted", port);
                rows += 1;
                if g.rng.gen_bool(0.5) {
                    // A remote administrator starting a signed service: a pair.
                    let later = at + g.rng.gen_range(0..10 * SEC);
                    rows += service_start(g, device, later, scm, &mut certified);
                }
            }
            4..=6 => rows += service_start(g, device, at, scm, &mut certified),
            _ => {
                let (process, action, port) = OTHER_NETWORK[g.rng.gen_range(0..OTHER_NETWORK.len())];
                let other = Scm { name: process, pid: Some(g.rng.gen_range(900..9000)), started: scm.started };
                g.scm_connection(device, at, other, action, port);
                rows += 1;
            }
        }
    }
}

/// A signed service binary started by the device's services.exe, with its certificate the
/// first time the device runs it; the rows it added.
fn service_start(
    g: &mut Gen,
    device: usize,
    at: i64,
    scm: Scm,
    certified: &mut std::collections::BTreeSet<(usize, usize)>,
) -> usize {
    let b = g.rng.gen_range(0..SERVICE_BINARIES.len());
    let (file, folder, cmd) = SERVICE_BINARIES[b];
    let sha1 = stable_hex(&format!("scm-signed-{file}"), 20);
    g.scm_child(device, at, scm, "ProcessCreated", folder, file, &sha1, cmd);
    if certified.insert((device, b)) {
        let signer = if file.starts_with("Google") { "Google LLC" } else { "Microsoft Windows" };
        let cert_at = at - g.rng.gen_range(1..3600) * SEC;
        g.scm_certificate(device, cert_at, &sha1, signer);
        return 2;
    }
    1
}

/// An attack's own services.exe: a process id no background row uses.
fn own_scm(g: &Gen, device: usize, pid: i64) -> Scm {
    Scm { pid: Some(pid), ..g.scm_device(device) }
}

/// One remote service start that must fire: an inbound connection to services.exe, then
/// its child within ten seconds (by whole-second boundaries).
fn attack(g: &mut Gen, i: usize) {
    let device = g.rng.gen_range(0..g.devices.len());
    let t = g.scm_time();
    let pid = 30_000 + i as i64 * 7;
    let sha1 = hex_of(&mut g.rng, 20);
    let scm = own_scm(g, device, pid);
    let name = format!("{}svc.exe", &hex_of(&mut g.rng, 4));
    let folder = r"C:\Windows";
    let (report, child_at) = match i % 4 {
        // A rare binary (PsExec style) three seconds after the connection.
        0 => {
            let report = g.scm_connection(device, t + SEC / 4, scm, "InboundConnectionAccepted", 445);
            let cmd = format!("{folder}\\{name}");
            (report, g.scm_child(device, t + 3 * SEC + SEC / 2, scm, "ProcessCreated", folder, &name, &sha1, &cmd))
        }
        // A LOLBIN (any case) fires although it is signed, at exactly 10 whole seconds.
        1 => {
            let file = ["cmd.exe", "Cmd.exe", "CMD.EXE"][(i / 4) % 3];
            let report = g.scm_connection(device, t, scm, "InboundConnectionAccepted", 445);
            let cmd = format!("{file} /Q /c echo whoami ^> \\\\127.0.0.1\\C$\\__output 2^>^&1");
            let child_at = g.scm_child(
                device,
                t + 10 * SEC + 9 * SEC / 10,
                scm,
                "ProcessCreated",
                r"C:\Windows\System32",
                file,
                &sha1,
                &cmd,
            );
            g.scm_certificate(device, t - 3600 * SEC, &sha1, "Microsoft Windows");
            (report, child_at)
        }
        // The child 0.8 s before the connection, in the same second: datetime_diff is 0.
        2 => {
            let report = g.scm_connection(device, t + 9 * SEC / 10, scm, "InboundConnectionAccepted", 135);
            let cmd = format!("{folder}\\{name} -service");
            (report, g.scm_child(device, t + SEC / 10, scm, "ProcessCreated", folder, &name, &sha1, &cmd))
        }
        // msiexec with more than "/V" (a LOLBIN, not the excluded command line), with
        // services.exe started 60.5 s before the connection (61 whole seconds).
        _ => {
            let scm = Scm { started: Some(t - 60 * SEC - SEC / 2), ..scm };
            let report = g.scm_connection(device, t, scm, "InboundConnectionAccepted", 135);
            let cmd = "msiexec.exe /V /qn";
            (
                report,
                g.scm_child(
                    device,
                    t + 2 * SEC,
                    scm,
                    "ProcessCreated",
                    r"C:\Windows\System32",
                    "msiexec.exe",
                    &sha1,
                    cmd,
                ),
            )
        }
    };
    g.scm_expect(device, report, child_at, &sha1);
}

/// Near misses, each with its own services.exe process id and SHA1: none may fire.
fn near_misses(g: &mut Gen) {
    let inbound = "InboundConnectionAccepted";
    let created = "ProcessCreated";
    let folder = r"C:\Windows";
    for kind in 0..11 {
        let device = g.rng.gen_range(0..g.devices.len());
        let t = g.scm_time();
        let scm = own_scm(g, device, 40_000 + kind);
        let sha1 = hex_of(&mut g.rng, 20);
        let name = format!("near{kind}.exe");
        let cmd = format!("{folder}\\{name}");
        match kind {
            // Join keys are case-sensitive: Services.exe vs services.exe.
            0 => {
                g.scm_connection(device, t, Scm { name: "Services.exe", ..scm }, inbound, 445);
                g.scm_child(device, t + 2 * SEC, scm, created, folder, &name, &sha1, &cmd);
            }
            // 11 whole seconds after.
            1 => {
                g.scm_connection(device, t + 9 * SEC / 10, scm, inbound, 445);
                g.scm_child(device, t + 11 * SEC, scm, created, folder, &name, &sha1, &cmd);
            }
            // 0.2 s before, across a second boundary: -1.
            2 => {
                g.scm_connection(device, t + SEC / 10, scm, inbound, 445);
                g.scm_child(device, t - SEC / 10, scm, created, folder, &name, &sha1, &cmd);
            }
            // services.exe started 60 whole seconds before the connection (not > 60).
            3 => {
                let scm = Scm { started: Some(t - 60 * SEC), ..scm };
                g.scm_connection(device, t + 9 * SEC / 10, scm, inbound, 445);
                g.scm_child(device, t + 2 * SEC, scm, created, folder, &name, &sha1, &cmd);
            }
            // No InitiatingProcessCreationTime on the child.
            4 => {
                g.scm_connection(device, t, scm, inbound, 445);
                g.scm_child(device, t + 2 * SEC, Scm { started: None, ..scm }, created, folder, &name, &sha1, &cmd);
            }
            // No InitiatingProcessId on the connection.
            5 => {
                g.scm_connection(device, t, Scm { pid: None, ..scm }, inbound, 445);
                g.scm_child(device, t + 2 * SEC, scm, created, folder, &name, &sha1, &cmd);
            }
            // A rare binary with a certificate row (seen on another device).
            6 => {
                g.scm_connection(device, t, scm, inbound, 445);
                g.scm_child(device, t + 2 * SEC, scm, created, folder, &name, &sha1, &cmd);
                let other = (device + 1) % g.devices.len();
                g.scm_certificate(other, t - 7200 * SEC, &sha1, "Contoso Ltd");
            }
            // msiexec.exe /V (whole string, any case): a LOLBIN, but excluded.
            7 => {
                g.scm_connection(device, t, scm, inbound, 135);
                let sys = r"C:\Windows\System32";
                g.scm_child(device, t + 2 * SEC, scm, created, sys, "msiexec.exe", &sha1, "msiexec.exe /V");
                g.scm_child(device, t + 3 * SEC, scm, created, sys, "MSIEXEC.EXE", &sha1, "MSIEXEC.EXE /v");
            }
            // 100 pairs of one SHA1: 10 connections in one second × 10 children 1..10 s
            // later. count_ = 100 is not < 100.
            8 => {
                for k in 0..10 {
                    g.scm_connection(device, t + k * SEC / 10, scm, inbound, 445);
                }
                for k in 1..=10 {
                    g.scm_child(device, t + k * SEC + SEC / 2, scm, created, folder, &name, &sha1, &cmd);
                }
            }
            // Not an inbound connection.
            9 => {
                g.scm_connection(device, t, scm, "ConnectionSuccess", 443);
                g.scm_child(device, t + 2 * SEC, scm, created, folder, &name, &sha1, &cmd);
            }
            // The child on another device.
            _ => {
                let other = (device + 1) % g.devices.len();
                g.scm_connection(device, t, scm, inbound, 445);
                g.scm_child(other, t + 2 * SEC, scm, created, folder, &name, &sha1, &cmd);
            }
        }
    }
}
