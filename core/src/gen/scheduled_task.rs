//! Rows for FalconFriday 0xFF-0082 "Persistence Via Scheduled Tasks"
//! (`scheduled-task-persistence`): DeviceProcessEvents and FileProfile.
//!
//! - Background (about `events / 40` rows): the Task Scheduler (`svchost.exe -k netsvcs
//!   -p -s Schedule`) launching well-known binaries every day on many devices (the same
//!   SHA1 everywhere, prevalent worldwide in FileProfile), and ordinary process creations
//!   under other parents (Explorer, WMI's `-s Winmgmt` svchost, services).
//! - Attacks (`attacks`): a rare binary first run as a scheduled task within the last two
//!   days; some with a FileProfile (low or no prevalence), some with an upper-case parent
//!   command line, some run several times, some on two devices (a finding per device).
//! - Near misses, one per row of the rule's semantics where it makes sense: another
//!   ActionType, another svchost service, no `-p`, a binary the device already ran as a
//!   task earlier in the lookback, one only run before the timeframe, a prevalent one, one
//!   at exactly the prevalence threshold, FileProfile unavailable ("Error"), an upper-case
//!   SHA1 (lowercased by the query, it never joins).
//! - One execution with an empty SHA1 (Defender failed to hash it): the rule reports it.

use super::{hex_of, stable_hex, Gen};
use lookout_plugin_sdk::time::{format_timestamp, TICKS_PER_SEC};
use rand::Rng;
use serde_json::{Map, Value};

const DETECTOR: &str = "scheduled-task-persistence";
const TABLE: &str = "DeviceProcessEvents";
const HOUR: i64 = 3600 * TICKS_PER_SEC;
const DAY: i64 = 24 * HOUR;
/// The Task Scheduler service host, as Defender records it.
const SCHEDULER: &str = "svchost.exe -k netsvcs -p -s Schedule";

/// Binaries the Task Scheduler runs on every Windows device: (path, arguments).
const TASK_BINARIES: &[(&str, &str)] = &[
    (r"C:\Windows\System32\taskhostw.exe", ""),
    (r"C:\Windows\System32\MusNotification.exe", ""),
    (r"C:\Windows\System32\usoclient.exe", "StartScan"),
    (r"C:\Program Files (x86)\Microsoft\EdgeUpdate\MicrosoftEdgeUpdate.exe", "/ua /installsource scheduler"),
    (r"C:\Program Files\Google\Update\GoogleUpdate.exe", "/ua /installsource scheduler"),
    (r"C:\Program Files\Microsoft OneDrive\OneDriveStandaloneUpdater.exe", "/reporting"),
    (r"C:\Windows\System32\rundll32.exe", "Startupscan.dll,SusRunTask"),
    (r"C:\Windows\System32\defrag.exe", "-c -h -o -$"),
    (r"C:\Windows\System32\wermgr.exe", "-upload"),
    (r"C:\Windows\System32\sihclient.exe", "/cv 9nH1cmYYaEmmPBhG.1"),
];

/// Ordinary process creations: (parent command line, parent, child path).
const OTHER_PROCESSES: &[(&str, &str, &str)] = &[
    (r"C:\Windows\Explorer.EXE", "explorer.exe", r"C:\Program Files\Google\Chrome\Application\chrome.exe"),
    (r"C:\Windows\Explorer.EXE", "explorer.exe", r"C:\Windows\System32\cmd.exe"),
    ("svchost.exe -k netsvcs -p -s Winmgmt", "svchost.exe", r"C:\Windows\System32\wbem\WmiPrvSE.exe"),
    ("svchost.exe -k DcomLaunch -p", "svchost.exe", r"C:\Windows\System32\RuntimeBroker.exe"),
    (r"C:\Windows\system32\services.exe", "services.exe", r"C:\Windows\System32\svchost.exe"),
];

/// Near-miss kinds; one of each at least.
const NEAR_MISSES: usize = 9;

/// Everything but the parent and the binary of one execution.
struct Exec<'a> {
    device: usize,
    at: i64,
    action: &'a str,
    parent: &'a str,
    path: &'a str,
    args: &'a str,
    sha1: &'a str,
}

/// A DeviceProcessEvents row as Defender exports it.
fn execution(g: &mut Gen, e: &Exec<'_>) -> Map<String, Value> {
    let file = e.path.rsplit('\\').next().unwrap_or(e.path).to_string();
    let mut m = g.event(e.device, e.at, e.action);
    m.insert("FileName".into(), file.clone().into());
    m.insert("FolderPath".into(), e.path.into());
    m.insert("SHA1".into(), e.sha1.into());
    m.insert("SHA256".into(), stable_hex(&format!("256{}{}", e.sha1, e.path), 32).into());
    m.insert("MD5".into(), stable_hex(&format!("md5{}{}", e.sha1, e.path), 16).into());
    m.insert("FileSize".into(), (40_000 + (e.sha1.len() as i64) * 1_000).into());
    m.insert("ProcessVersionInfoCompanyName".into(), "".into());
    m.insert("ProcessVersionInfoProductName".into(), "".into());
    m.insert("ProcessVersionInfoProductVersion".into(), "".into());
    m.insert("ProcessVersionInfoInternalFileName".into(), "".into());
    m.insert("ProcessVersionInfoOriginalFileName".into(), file.clone().into());
    m.insert("ProcessVersionInfoFileDescription".into(), "".into());
    m.insert("ProcessId".into(), g.rng.gen_range(1000..30000).into());
    let cmd = if e.args.is_empty() { format!("\"{file}\"") } else { format!("\"{file}\" {}", e.args) };
    m.insert("ProcessCommandLine".into(), cmd.into());
    m.insert("ProcessIntegrityLevel".into(), "System".into());
    m.insert("ProcessTokenElevation".into(), "TokenElevationTypeDefault".into());
    m.insert("ProcessCreationTime".into(), format_timestamp(e.at).into());
    m.insert("AccountDomain".into(), "nt authority".into());
    m.insert("AccountName".into(), "system".into());
    m.insert("AccountSid".into(), "S-1-5-18".into());
    m.insert("AccountUpn".into(), "".into());
    m.insert("AccountObjectId".into(), "".into());
    m.insert("LogonId".into(), 999.into());
    let process = if e.parent.to_ascii_lowercase().starts_with("svchost.exe") { "svchost.exe" } else { "services.exe" };
    g.process_columns(&mut m, process, "system");
    m.insert("InitiatingProcessAccountDomain".into(), "nt authority".into());
    m.insert("InitiatingProcessAccountSid".into(), "S-1-5-18".into());
    m.insert("InitiatingProcessAccountUpn".into(), "".into());
    m.insert("InitiatingProcessCommandLine".into(), e.parent.into());
    m.insert("InitiatingProcessCreationTime".into(), format_timestamp(g.spec.base_time - 9 * DAY).into());
    m.insert("AdditionalFields".into(), "".into());
    m.insert("AppGuardContainerId".into(), "".into());
    m.insert("MachineGroup".into(), "Workstations".into());
    m
}

fn push(g: &mut Gen, e: &Exec<'_>) {
    let row = execution(g, e);
    g.push(TABLE, row);
}

fn expect(g: &mut Gen, sha1: &str, device: usize) {
    let device_id = g.devices[device].0.clone();
    g.expect(DETECTOR, &[("SHA1", sha1.to_string()), ("DeviceId", device_id)]);
}

/// A time in the last `hours` hours, at least a minute ago.
fn within_hours(g: &mut Gen, hours: i64) -> i64 {
    g.spec.base_time - g.rng.gen_range(60 * TICKS_PER_SEC..hours * HOUR)
}

pub(super) fn generate(g: &mut Gen) {
    background(g);
    if g.spec.attacks == 0 {
        return;
    }
    for i in 0..g.spec.attacks {
        attack(g, i);
    }
    for k in 0..g.spec.attacks.max(NEAR_MISSES) {
        near_miss(g, k);
    }
    // Defender could not hash the binary: the empty SHA1 is a group like any other, no
    // profile says it is common, and the rule reports it.
    let device = g.rng.gen_range(0..g.devices.len());
    let at = within_hours(g, 40);
    let path = r"C:\Users\Public\Downloads\stager.exe";
    push(g, &Exec { device, at, action: "ProcessCreated", parent: SCHEDULER, path, args: "", sha1: "" });
    expect(g, "", device);
}

fn background(g: &mut Gen) {
    let binaries: Vec<(String, &str, &str)> =
        TASK_BINARIES.iter().map(|(path, args)| (stable_hex(&format!("schtask{path}"), 20), *path, *args)).collect();
    for (i, (sha1, _, _)) in binaries.iter().enumerate() {
        g.profile(sha1, Some(2_000_000 + 37 * i as i64), "Available");
    }
    for _ in 0..g.spec.events / 40 {
        let device = g.skewed_device();
        let at = g.time_in_window(7);
        if g.rng.gen_bool(0.6) {
            let (sha1, path, args) = binaries[g.rng.gen_range(0..binaries.len())].clone();
            push(g, &Exec { device, at, action: "ProcessCreated", parent: SCHEDULER, path, args, sha1: &sha1 });
        } else {
            let (parent, _, path) = OTHER_PROCESSES[g.rng.gen_range(0..OTHER_PROCESSES.len())];
            let sha1 = stable_hex(&format!("proc{path}"), 20);
            push(g, &Exec { device, at, action: "ProcessCreated", parent, path, args: "", sha1: &sha1 });
        }
    }
}

/// A rare binary first run as a scheduled task within the timeframe.
fn attack(g: &mut Gen, i: usize) {
    let device = g.rng.gen_range(0..g.devices.len());
    let sha1 = hex_of(&mut g.rng, 20);
    let names = ["OneDriveUpdate", "svchost32", "MicrosoftEdgeUpdateCore", "WinDefendHelper"];
    let path = match i % 3 {
        0 => format!(r"C:\Users\Public\Libraries\{}{i}.exe", names[i % names.len()]),
        1 => format!(r"C:\ProgramData\Microsoft\Windows\Caches\{}{i}.exe", names[i % names.len()]),
        _ => format!(r"C:\Windows\Temp\{}{i}.exe", names[i % names.len()]),
    };
    let first = within_hours(g, 44);
    // The hourly task's earlier runs go back two hours more: 46 h, still in the timeframe.
    let parent = if i % 4 == 1 { "SVCHOST.EXE -k netsvcs -p -s schedule" } else { SCHEDULER };
    let exec = |device, at| Exec { device, at, action: "ProcessCreated", parent, path: &path, args: "", sha1: &sha1 };
    match i % 4 {
        0 => push(g, &exec(device, first)),
        1 => {
            push(g, &exec(device, first));
            g.profile(&sha1, Some(3), "Available");
        }
        2 => {
            // An hourly task: the latest run is the finding's row.
            for h in 0..3 {
                push(g, &exec(device, first - h * HOUR));
            }
            g.profile(&sha1, None, "Available");
        }
        _ => {
            // The same task pushed to a second device: a finding per device.
            let other = (device + 1 + g.rng.gen_range(0..g.devices.len() - 1)) % g.devices.len();
            push(g, &exec(device, first));
            push(g, &exec(other, first + HOUR));
            expect(g, &sha1, other);
        }
    }
    expect(g, &sha1, device);
}

/// The same shape as an attack, one condition off.
fn near_miss(g: &mut Gen, k: usize) {
    let device = g.rng.gen_range(0..g.devices.len());
    let sha1 = hex_of(&mut g.rng, 20);
    let path = format!(r"C:\ProgramData\NearMiss{k}\task{k}.exe");
    let at = within_hours(g, 40);
    let base = g.spec.base_time;
    let mut exec = Exec { device, at, action: "ProcessCreated", parent: SCHEDULER, path: &path, args: "", sha1: &sha1 };
    match k % NEAR_MISSES {
        0 => exec.action = "ProcessCreatedUsingWmiQuery",
        1 => exec.parent = "svchost.exe -k netsvcs -p -s BITS",
        2 => exec.parent = "svchost.exe -k netsvcs -s Schedule",
        3 => {
            // Already run as a task on this device five days ago: not new.
            let earlier = Exec { at: base - 5 * DAY, ..exec };
            push(g, &earlier);
        }
        // Only run before the timeframe.
        4 => exec.at = base - 3 * DAY,
        5 => g.profile(&sha1, Some(5000), "Available"),
        6 => g.profile(&sha1, Some(100), "Available"),
        7 => g.profile(&sha1, None, "Error"),
        _ => {
            let upper = sha1.to_uppercase();
            push(g, &Exec { sha1: &upper, ..exec });
            return;
        }
    }
    push(g, &exec);
}

#[cfg(test)]
mod tests {
    use super::super::{generate, FleetSpec};

    #[test]
    fn plants_a_finding_per_attack_device_and_the_empty_sha1() {
        let fleet = generate(&FleetSpec { devices: 10, events: 4000, attacks: 8, ..Default::default() });
        let mine: Vec<_> = fleet.expected.iter().filter(|e| e.detector == super::DETECTOR).collect();
        // 8 attacks, two of them on two devices, and the empty SHA1.
        assert_eq!(mine.len(), 8 + 2 + 1, "{mine:?}");
        let rows = &fleet.tables[super::TABLE];
        assert!(rows.len() >= 4000 / 40, "{}", rows.len());
    }
}
