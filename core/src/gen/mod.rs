//! A deterministic synthetic Defender fleet: image loads and file events with realistic
//! columns and skew (a few busy devices, shared system DLLs), injected WinRM-plugin
//! attacks, near misses that must not fire, a FileProfile feed, and the ground truth —
//! the (load, write) pairs the rule must find.
//!
//! The detector pack's rules each have a module here that adds their tables' background,
//! attacks and near misses (one per row of the rule's semantics table) and the findings
//! they must produce ([`Expected`]): `scheduled_task`, `scm_remote`, `spraying`.

mod scheduled_task;
mod scm_remote;
mod spraying;

use lookout_plugin_sdk::time::{format_timestamp, parse_timestamp, TICKS_PER_SEC};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Advanced-hunting rows, one JSON object per line.
    Jsonl,
    /// Streaming-API storage envelopes with CRLF line ends.
    Envelope,
    /// Log Analytics style pretty-printed JSON array.
    Array,
}

#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub devices: usize,
    /// Background events (loads + writes), attacks and near misses come on top.
    pub events: usize,
    pub attacks: usize,
    pub seed: u64,
    /// The fleet's "now": events lie in the days before it.
    pub base_time: i64,
}

/// The default evaluation time of generated fleets.
pub const DEFAULT_BASE_TIME: &str = "2025-05-08T00:00:00Z";

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            devices: 50,
            events: 20_000,
            attacks: 12,
            seed: 1,
            base_time: parse_timestamp(DEFAULT_BASE_TIME).unwrap_or(0),
        }
    }
}

/// A finding the rule must produce.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TruthPair {
    pub device_id: String,
    pub load_report_id: i64,
    pub write_report_id: i64,
}

/// A finding one of the detector pack's rules must produce: the detector, and the values
/// (as text) of the finding row's columns that make its finding identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Expected {
    pub detector: String,
    pub identity: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub loads: Vec<Map<String, Value>>,
    pub writes: Vec<Map<String, Value>>,
    pub profiles: Vec<Map<String, Value>>,
    pub truth: Vec<TruthPair>,
    /// Rows of the detector pack's tables, by table name.
    pub tables: BTreeMap<String, Vec<Map<String, Value>>>,
    /// What the detector pack must find.
    pub expected: Vec<Expected>,
}

impl Fleet {
    pub fn rows(&self) -> usize {
        self.loads.len() + self.writes.len() + self.profiles.len() + self.tables.values().map(Vec::len).sum::<usize>()
    }
}

const SYSTEM_DLLS: &[&str] = &[
    "kernel32.dll",
    "ntdll.dll",
    "user32.dll",
    "advapi32.dll",
    "combase.dll",
    "rpcrt4.dll",
    "wsmsvc.dll",
    "wsmauto.dll",
    "WsmRes.dll",
    "mi.dll",
    "miutils.dll",
    "wmidcom.dll",
    "bcrypt.dll",
    "crypt32.dll",
    "msvcrt.dll",
    "sechost.dll",
    "ws2_32.dll",
    "clbcatq.dll",
    "oleaut32.dll",
    "shell32.dll",
];
const PROCESSES: &[&str] = &[
    "svchost.exe",
    "svchost.exe",
    "svchost.exe",
    "explorer.exe",
    "chrome.exe",
    "msedge.exe",
    "powershell.exe",
    "MsMpEng.exe",
    "taskhostw.exe",
    "wsmprovhost.exe",
    "OneDrive.exe",
    "Teams.exe",
];
const USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin", "frank", "svc_backup", "wipro"];
const WRITE_ACTIONS: &[(&str, u32)] =
    &[("FileCreated", 70), ("FileModified", 15), ("FileDeleted", 10), ("FileRenamed", 5)];

struct Gen {
    rng: ChaCha8Rng,
    spec: FleetSpec,
    devices: Vec<(String, String)>,
    report_id: i64,
    fleet: Fleet,
}

fn hex_of(rng: &mut ChaCha8Rng, bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
}

/// A hex string derived from `seed`: the same file has the same hash on every device.
fn stable_hex(seed: &str, bytes: usize) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(seed.as_bytes())[..bytes])
}

impl Gen {
    fn new(spec: FleetSpec) -> Gen {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let devices = (0..spec.devices.max(2))
            .map(|i| (hex_of(&mut rng, 20), format!("ws-{:04}.corp.example.com", i + 1)))
            .collect();
        Gen { rng, spec, devices, report_id: 1000, fleet: Fleet::default() }
    }

    /// Adds a row of one of the detector pack's tables.
    fn push(&mut self, table: &str, row: Map<String, Value>) {
        self.fleet.tables.entry(table.to_string()).or_default().push(row);
    }

    /// Records a finding `detector` must produce, by its identity columns.
    fn expect(&mut self, detector: &str, identity: &[(&str, String)]) {
        let identity = identity.iter().map(|(c, v)| (c.to_string(), v.clone())).collect();
        self.fleet.expected.push(Expected { detector: detector.to_string(), identity });
    }

    /// A row's common columns: Timestamp, DeviceId, DeviceName, ActionType, ReportId.
    fn event(&mut self, device: usize, at: i64, action: &str) -> Map<String, Value> {
        let (device_id, device_name) = self.devices[device].clone();
        let mut m = Map::new();
        m.insert("Timestamp".into(), format_timestamp(at).into());
        m.insert("DeviceId".into(), device_id.into());
        m.insert("DeviceName".into(), device_name.into());
        m.insert("ActionType".into(), action.into());
        m.insert("ReportId".into(), self.next_report().into());
        m
    }

    /// Busy devices produce most events (a squared-uniform skew).
    fn skewed_device(&mut self) -> usize {
        let u: f64 = self.rng.gen();
        ((u * u) * self.devices.len() as f64) as usize % self.devices.len()
    }

    fn time_in_window(&mut self, days: i64) -> i64 {
        self.spec.base_time - self.rng.gen_range(60 * TICKS_PER_SEC..days * 86_400 * TICKS_PER_SEC)
    }

    fn next_report(&mut self) -> i64 {
        self.report_id += self.rng.gen_range(1..40);
        self.report_id
    }

    fn process_columns(&mut self, m: &mut Map<String, Value>, process: &str, user: &str) {
        let pid = self.rng.gen_range(400..20000);
        m.insert("InitiatingProcessAccountDomain".into(), "corp".into());
        m.insert("InitiatingProcessAccountName".into(), user.into());
        m.insert(
            "InitiatingProcessAccountSid".into(),
            format!("S-1-5-21-1004336348-1177238915-682003330-{}", 1000 + user.len()).into(),
        );
        m.insert("InitiatingProcessAccountUpn".into(), format!("{user}@corp.example.com").into());
        m.insert("InitiatingProcessAccountObjectId".into(), "".into());
        m.insert("InitiatingProcessCommandLine".into(), format!("\"{process}\" -k netsvcs -p").into());
        m.insert("InitiatingProcessFileName".into(), process.into());
        m.insert(
            "InitiatingProcessFolderPath".into(),
            format!("c:\\windows\\system32\\{}", process.to_lowercase()).into(),
        );
        m.insert("InitiatingProcessId".into(), pid.into());
        m.insert("InitiatingProcessIntegrityLevel".into(), "System".into());
        m.insert("InitiatingProcessMD5".into(), stable_hex(&format!("md5{process}"), 16).into());
        m.insert("InitiatingProcessSHA1".into(), stable_hex(&format!("sha1{process}"), 20).into());
        m.insert("InitiatingProcessSHA256".into(), stable_hex(&format!("sha256{process}"), 32).into());
        m.insert("InitiatingProcessParentFileName".into(), "services.exe".into());
        m.insert("InitiatingProcessParentId".into(), 700.into());
        m.insert("InitiatingProcessTokenElevation".into(), "TokenElevationTypeDefault".into());
        m.insert("InitiatingProcessFileSize".into(), Value::Null);
        m.insert("InitiatingProcessSessionId".into(), 0.into());
        m.insert("IsInitiatingProcessRemoteSession".into(), false.into());
    }

    #[allow(clippy::too_many_arguments)]
    fn load(&mut self, device: usize, process: &str, folder: &str, sha1: &str, at: i64) -> i64 {
        let (device_id, device_name) = self.devices[device].clone();
        let report = self.next_report();
        let file_name = folder.rsplit('\\').next().unwrap_or(folder).to_string();
        let mut m = Map::new();
        m.insert("Timestamp".into(), format_timestamp(at).into());
        m.insert("DeviceId".into(), device_id.into());
        m.insert("DeviceName".into(), device_name.into());
        m.insert("ActionType".into(), "ImageLoaded".into());
        m.insert("FileName".into(), file_name.into());
        m.insert("FolderPath".into(), folder.into());
        m.insert("SHA1".into(), sha1.into());
        m.insert("SHA256".into(), stable_hex(&format!("256{sha1}"), 32).into());
        m.insert("MD5".into(), stable_hex(&format!("md5{sha1}"), 16).into());
        m.insert("FileSize".into(), self.rng.gen_range(20_000..4_000_000).into());
        let user = USERS[self.rng.gen_range(0..USERS.len())];
        self.process_columns(&mut m, process, user);
        m.insert("ReportId".into(), report.into());
        m.insert("AppGuardContainerId".into(), "".into());
        m.insert("MachineGroup".into(), "Workstations".into());
        self.fleet.loads.push(m);
        report
    }

    fn write(&mut self, device: usize, action: &str, folder: &str, sha1: &str, at: i64) -> i64 {
        let (device_id, device_name) = self.devices[device].clone();
        let report = self.next_report();
        let file_name = folder.rsplit('\\').next().unwrap_or(folder).to_string();
        let mut m = Map::new();
        m.insert("Timestamp".into(), format_timestamp(at).into());
        m.insert("DeviceId".into(), device_id.into());
        m.insert("DeviceName".into(), device_name.into());
        m.insert("ActionType".into(), action.into());
        m.insert("FileName".into(), file_name.into());
        m.insert("FolderPath".into(), folder.into());
        m.insert("SHA1".into(), sha1.into());
        m.insert("SHA256".into(), stable_hex(&format!("256{sha1}"), 32).into());
        m.insert("MD5".into(), stable_hex(&format!("md5{sha1}"), 16).into());
        m.insert("FileSize".into(), self.rng.gen_range(1_000..9_000_000).into());
        m.insert("FileOriginUrl".into(), "".into());
        m.insert("FileOriginReferrerUrl".into(), "".into());
        m.insert("FileOriginIP".into(), "".into());
        m.insert("PreviousFolderPath".into(), "".into());
        m.insert("PreviousFileName".into(), "".into());
        let user = USERS[self.rng.gen_range(0..USERS.len())];
        let process = PROCESSES[self.rng.gen_range(0..PROCESSES.len())];
        self.process_columns(&mut m, process, user);
        m.insert("RequestProtocol".into(), "Local".into());
        m.insert("RequestSourceIP".into(), "".into());
        m.insert("RequestSourcePort".into(), Value::Null);
        m.insert("RequestAccountName".into(), user.into());
        m.insert("RequestAccountDomain".into(), "corp".into());
        m.insert("RequestAccountSid".into(), "".into());
        m.insert("ShareName".into(), "".into());
        m.insert("SensitivityLabel".into(), "".into());
        m.insert("SensitivitySubLabel".into(), "".into());
        m.insert("IsAzureInfoProtectionApplied".into(), Value::Null);
        m.insert("AdditionalFields".into(), json!({"FileType": "PortableExecutable"}).to_string().into());
        m.insert("ReportId".into(), report.into());
        m.insert("AppGuardContainerId".into(), "".into());
        m.insert("MachineGroup".into(), "Workstations".into());
        self.fleet.writes.push(m);
        report
    }

    fn profile(&mut self, sha1: &str, prevalence: Option<i64>, availability: &str) {
        let mut m = Map::new();
        m.insert("SHA1".into(), sha1.into());
        m.insert("SHA256".into(), stable_hex(&format!("256{sha1}"), 32).into());
        m.insert("GlobalPrevalence".into(), prevalence.map_or(Value::Null, Value::from));
        m.insert("GlobalFirstSeen".into(), format_timestamp(self.spec.base_time - 400 * 86_400 * TICKS_PER_SEC).into());
        m.insert("GlobalLastSeen".into(), format_timestamp(self.spec.base_time - 86_400 * TICKS_PER_SEC).into());
        let signed = prevalence.is_some_and(|p| p > 1000);
        m.insert("Signer".into(), if signed { "Microsoft Windows" } else { "" }.into());
        m.insert("Issuer".into(), if signed { "Microsoft Windows Production PCA 2011" } else { "" }.into());
        m.insert("SignatureState".into(), if signed { "SignedValid" } else { "Unsigned" }.into());
        m.insert("IsCertificateValid".into(), signed.into());
        m.insert("ProfileAvailability".into(), availability.into());
        self.fleet.profiles.push(m);
    }

    fn background(&mut self) {
        // System DLLs are shared by every device (same SHA1), loaded by many processes,
        // and very prevalent.
        for dll in SYSTEM_DLLS {
            let sha1 = stable_hex(&format!("sys{dll}"), 20);
            self.profile(&sha1, Some(5_000_000 + dll.len() as i64), "Available");
        }
        let loads = self.spec.events * 45 / 100;
        for _ in 0..loads {
            let device = self.skewed_device();
            let process = PROCESSES[self.rng.gen_range(0..PROCESSES.len())];
            let at = self.time_in_window(5);
            if process == "wsmprovhost.exe" && self.rng.gen_bool(0.6) {
                // The .NET native images a PowerShell remoting session always loads.
                let n = self.rng.gen_range(0..6);
                let folder = format!(
                    "C:\\Windows\\assembly\\NativeImages_v4.0.30319_64\\System{n}\\{}\\System{n}.ni.dll",
                    stable_hex(&format!("ni{n}"), 16)
                );
                let sha1 = stable_hex(&format!("ni{n}"), 20);
                self.load(device, process, &folder, &sha1, at);
            } else {
                let dll = SYSTEM_DLLS[self.rng.gen_range(0..SYSTEM_DLLS.len())];
                let sha1 = stable_hex(&format!("sys{dll}"), 20);
                self.load(device, process, &format!("C:\\Windows\\System32\\{dll}"), &sha1, at);
            }
        }
        for _ in loads..self.spec.events {
            let device = self.skewed_device();
            let mut pick = self.rng.gen_range(0..100);
            let action = WRITE_ACTIONS
                .iter()
                .find(|(_, w)| {
                    let hit = pick < *w;
                    pick = pick.saturating_sub(*w);
                    hit
                })
                .map_or("FileCreated", |(a, _)| a);
            let user = USERS[self.rng.gen_range(0..USERS.len())];
            let at = self.time_in_window(5);
            let (folder, sha1) = if self.rng.gen_bool(0.05) {
                // Windows Update rewriting a system DLL: same SHA1 as the loads, but the
                // file is everywhere, so FileProfile says it is prevalent.
                let dll = SYSTEM_DLLS[self.rng.gen_range(0..SYSTEM_DLLS.len())];
                (format!("C:\\Windows\\System32\\{dll}"), stable_hex(&format!("sys{dll}"), 20))
            } else {
                let name = hex_of(&mut self.rng, 4);
                (format!("C:\\Users\\{user}\\AppData\\Local\\Temp\\{name}.tmp"), hex_of(&mut self.rng, 20))
            };
            self.write(device, action, &folder, &sha1, at);
        }
    }

    /// One attack: a rare DLL written to disk, then loaded by wsmprovhost.exe; plus one
    /// near miss of a kind chosen by `i`.
    fn attack(&mut self, i: usize) {
        let device = self.rng.gen_range(0..self.devices.len());
        let other = (device + 1) % self.devices.len();
        let sha1 = hex_of(&mut self.rng, 20);
        let dir = if i.is_multiple_of(2) {
            "C:\\Windows\\System32".to_string()
        } else {
            format!("C:\\ProgramData\\Vendor{i}")
        };
        let path = format!("{dir}\\WinRMPlugin{i}.dll");
        let written = self.time_in_window(3);
        let loaded = written + self.rng.gen_range(1..600) * TICKS_PER_SEC;
        // The write's path differs in case: the rule lowercases both sides.
        let w = self.write(device, "FileCreated", &path.to_uppercase(), &sha1, written);
        let process = if i.is_multiple_of(3) { "WsmProvHost.exe" } else { "wsmprovhost.exe" };
        let l = self.load(device, process, &path, &sha1, loaded);
        let device_id = self.devices[device].0.clone();
        self.fleet.truth.push(TruthPair { device_id: device_id.clone(), load_report_id: l, write_report_id: w });
        if i % 4 == 1 {
            // Overwritten later: a second pair.
            let w2 = self.write(device, "FileModified", &path, &sha1, written + TICKS_PER_SEC);
            self.fleet.truth.push(TruthPair { device_id, load_report_id: l, write_report_id: w2 });
        }
        match i % 3 {
            0 => {}
            1 => self.profile(&sha1, Some(3), "Available"),
            _ => self.profile(&sha1, None, "Available"),
        }

        // The near miss: same shape, one condition off.
        let nsha1 = hex_of(&mut self.rng, 20);
        let npath = format!("C:\\ProgramData\\Near{i}\\plugin.dll");
        let at = self.time_in_window(3);
        match i % 10 {
            0 => {
                self.write(other, "FileCreated", &npath, &nsha1, at);
                self.load(device, "wsmprovhost.exe", &npath, &nsha1, at + TICKS_PER_SEC);
            }
            1 => {
                self.write(device, "FileCreated", &format!("{npath}.bak"), &nsha1, at);
                self.load(device, "wsmprovhost.exe", &npath, &nsha1, at + TICKS_PER_SEC);
            }
            2 => {
                self.write(device, "FileDeleted", &npath, &nsha1, at);
                self.load(device, "wsmprovhost.exe", &npath, &nsha1, at + TICKS_PER_SEC);
            }
            3 => {
                self.write(device, "FileCreated", &npath, &nsha1, at);
                self.load(device, "svchost.exe", &npath, &nsha1, at + TICKS_PER_SEC);
            }
            4 => {
                let ni = format!("C:\\Windows\\assembly\\NativeImages_v4.0.30319_64\\Evil{i}\\evil.ni.dll");
                self.write(device, "FileCreated", &ni, &nsha1, at);
                self.load(device, "wsmprovhost.exe", &ni, &nsha1, at + TICKS_PER_SEC);
            }
            5 => {
                self.write(device, "FileCreated", &npath, &nsha1, at);
                self.load(device, "wsmprovhost.exe", &npath, &nsha1, at + TICKS_PER_SEC);
                self.profile(&nsha1, Some(500), "Available");
            }
            6 => {
                self.write(device, "FileCreated", &npath, &nsha1, at);
                self.load(device, "wsmprovhost.exe", &npath, &nsha1, at + TICKS_PER_SEC);
                self.profile(&nsha1, None, "Error");
            }
            7 => {
                let old = self.spec.base_time - 40 * 86_400 * TICKS_PER_SEC;
                self.write(device, "FileCreated", &npath, &nsha1, old);
                self.load(device, "wsmprovhost.exe", &npath, &nsha1, at);
            }
            8 => {
                // SHA1 in another case: `in~` lets it through, the join does not.
                self.write(device, "FileCreated", &npath, &nsha1.to_uppercase(), at);
                self.load(device, "wsmprovhost.exe", &npath, &nsha1, at + TICKS_PER_SEC);
            }
            _ => {
                self.write(device, "FileCreated", &npath, &nsha1, at);
                self.load(device, "wsmprovhost.exe", &npath, &nsha1, at + TICKS_PER_SEC);
                self.profile(&nsha1, Some(100), "Available");
            }
        }
    }
}

/// Generates a fleet; the same spec always gives the same fleet.
pub fn generate(spec: &FleetSpec) -> Fleet {
    let mut g = Gen::new(spec.clone());
    g.background();
    for i in 0..spec.attacks {
        g.attack(i);
    }
    scheduled_task::generate(&mut g);
    scm_remote::generate(&mut g);
    spraying::generate(&mut g);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x7ab1e5);
    for rows in g.fleet.tables.values_mut() {
        shuffle(rows, &mut rng);
    }
    g.fleet.expected.sort();
    // Interleave attacks with the background, as they would arrive.
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x5eed);
    shuffle(&mut g.fleet.loads, &mut rng);
    shuffle(&mut g.fleet.writes, &mut rng);
    g.fleet.truth.sort();
    g.fleet
}

fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    use rand::seq::SliceRandom;
    v.shuffle(rng);
}

/// Files a written fleet consists of.
pub struct FleetFiles {
    pub loads: PathBuf,
    pub writes: PathBuf,
    pub profiles: PathBuf,
    pub truth: PathBuf,
    pub bytes: u64,
}

pub const TRUTH_FILE: &str = "ground-truth.json";
/// The detector pack's expected findings, beside [`TRUTH_FILE`].
pub const EXPECTED_FILE: &str = "expected-findings.json";

/// Where the log files of a fleet written to `dir` are (the ground truth is beside them,
/// not among them, so `lookout ingest <dir>/logs` reads only data).
pub fn logs_dir(dir: &Path) -> PathBuf {
    dir.join("logs")
}

/// Why a fleet could not be written, or a ground-truth file read.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a ground-truth file", path.display())]
    NotTruth {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> GenError {
    let path = path.to_path_buf();
    move |source| GenError::Io { action, path, source }
}

/// Writes a fleet into `dir`: the tables under `logs/` in `format` (file names carry the
/// table, so any format is ingestible without `--table`) and `ground-truth.json`.
pub fn write_fleet(fleet: &Fleet, out: &Path, format: Format) -> Result<FleetFiles, GenError> {
    let dir = &logs_dir(out);
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let ext = match format {
        Format::Jsonl | Format::Envelope => "jsonl",
        Format::Array => "json",
    };
    let mut bytes = 0;
    let mut write_table = |table: &str, rows: &[Map<String, Value>]| -> Result<PathBuf, GenError> {
        let path = dir.join(format!("{table}.{ext}"));
        let f = std::fs::File::create(&path).map_err(io_err("create", &path))?;
        let write = |f| -> std::io::Result<u64> {
            let mut out = std::io::BufWriter::new(f);
            match format {
                Format::Jsonl => {
                    for r in rows {
                        serde_json::to_writer(&mut out, r)?;
                        out.write_all(b"\n")?;
                    }
                }
                Format::Envelope => {
                    for r in rows {
                        let time = r.get("Timestamp").cloned().unwrap_or(Value::Null);
                        let env = json!({
                            "time": time,
                            "tenantId": "8a1f3c2e-0000-4bfc-9424-13aa153c5b27",
                            "operationName": "Publish",
                            "category": format!("AdvancedHunting-{table}"),
                            "properties": r,
                        });
                        serde_json::to_writer(&mut out, &env)?;
                        out.write_all(b"\r\n")?;
                    }
                }
                Format::Array => {
                    let typed: Vec<Value> = rows
                        .iter()
                        .map(|r| {
                            let mut r = r.clone();
                            r.insert("Type".into(), table.into());
                            Value::Object(r)
                        })
                        .collect();
                    serde_json::to_writer_pretty(&mut out, &typed)?;
                }
            }
            out.flush()?;
            Ok(std::fs::metadata(&path)?.len())
        };
        bytes += write(f).map_err(io_err("write", &path))?;
        Ok(path)
    };
    let profiles = write_table("FileProfile", &fleet.profiles)?;
    let loads = write_table("DeviceImageLoadEvents", &fleet.loads)?;
    let writes = write_table("DeviceFileEvents", &fleet.writes)?;
    for (table, rows) in &fleet.tables {
        write_table(table, rows)?;
    }
    let expected_path = out.join(EXPECTED_FILE);
    let json = serde_json::to_vec_pretty(&fleet.expected)
        .map_err(std::io::Error::from)
        .map_err(io_err("write", &expected_path))?;
    std::fs::write(&expected_path, json).map_err(io_err("write", &expected_path))?;
    let truth = out.join(TRUTH_FILE);
    let json =
        serde_json::to_vec_pretty(&fleet.truth).map_err(std::io::Error::from).map_err(io_err("write", &truth))?;
    std::fs::write(&truth, json).map_err(io_err("write", &truth))?;
    Ok(FleetFiles { loads, writes, profiles, truth, bytes })
}

pub fn read_truth(path: &Path) -> Result<Vec<TruthPair>, GenError> {
    let text = std::fs::read(path).map_err(io_err("read", path))?;
    serde_json::from_slice(&text).map_err(|source| GenError::NotTruth { path: path.to_path_buf(), source })
}

pub fn read_expected(path: &Path) -> Result<Vec<Expected>, GenError> {
    let text = std::fs::read(path).map_err(io_err("read", path))?;
    serde_json::from_slice(&text).map_err(|source| GenError::NotTruth { path: path.to_path_buf(), source })
}

/// The identity of a finding (a line of `findings.jsonl`) as an [`Expected`]: its
/// detector and the text of the given columns of its row (a JSON string as it is, any
/// other value as JSON). `None` when the row lacks one of them.
pub fn expected_of(finding: &Value, columns: &[String]) -> Option<Expected> {
    let row = finding.get("row")?;
    let identity = columns
        .iter()
        .map(|c| {
            let v = row.get(c)?;
            Some((c.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Expected { detector: finding.get("detector")?.as_str()?.to_string(), identity })
}
