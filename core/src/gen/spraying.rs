//! Rows for `password-spraying` (FalconFriday 0xFF-0044): background DeviceLogonEvents,
//! domain controllers seen through DeviceNetworkEvents (lsass.exe accepting Kerberos on
//! port 88), one password spray per attack (one source IP against one device, more than
//! 20 accounts, one or two tries each) and near misses that must not fire.

use super::{stable_hex, Gen};
use lookout_plugin_sdk::time::{format_timestamp, TICKS_PER_SEC};
use rand::Rng;
use serde_json::{json, Map, Value};

const DETECTOR: &str = "password-spraying";
const LOGONS: &str = "DeviceLogonEvents";
const NETWORK: &str = "DeviceNetworkEvents";
const MINUTE: i64 = 60 * TICKS_PER_SEC;
const HOUR: i64 = 60 * MINUTE;

/// Background users: far fewer than the 20 distinct accounts a spray needs.
const USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin", "frank", "svc_backup", "svc_sql"];
const DCS: &[&str] = &["dc01.corp.example.com", "dc02.corp.example.com"];

/// A device of the logon: (DeviceId, DeviceName).
type Device = (String, String);

struct Logon<'a> {
    action: &'a str,
    logon_type: &'a str,
    account: &'a str,
    remote_ip: &'a str,
    remote_device: &'a str,
    ip_type: &'a str,
}

fn logon_row(g: &mut Gen, device: &Device, at: i64, l: &Logon<'_>) -> Map<String, Value> {
    let failed = l.action == "LogonFailed";
    let remote = !l.remote_ip.is_empty() && l.ip_type != "Loopback";
    let (process, folder) = match l.logon_type {
        "Interactive" | "Unlock" | "CachedInteractive" => ("winlogon.exe", "c:\\windows\\system32\\winlogon.exe"),
        _ => ("lsass.exe", "c:\\windows\\system32\\lsass.exe"),
    };
    let mut m = Map::new();
    m.insert("Timestamp".into(), format_timestamp(at).into());
    m.insert("DeviceId".into(), device.0.clone().into());
    m.insert("DeviceName".into(), device.1.clone().into());
    m.insert("ActionType".into(), l.action.into());
    m.insert("LogonType".into(), l.logon_type.into());
    m.insert("AccountDomain".into(), "corp".into());
    m.insert("AccountName".into(), l.account.into());
    m.insert(
        "AccountSid".into(),
        if failed {
            String::new()
        } else {
            format!("S-1-5-21-1004336348-1177238915-682003330-{}", 1100 + l.account.len())
        }
        .into(),
    );
    m.insert("Protocol".into(), if remote { "NTLM" } else { "Negotiate" }.into());
    m.insert("FailureReason".into(), if failed { "InvalidUserNameOrPassword" } else { "" }.into());
    m.insert("IsLocalAdmin".into(), (!failed && l.account.starts_with("svc_")).into());
    m.insert("LogonId".into(), g.rng.gen_range(100_000..9_000_000i64).into());
    m.insert("RemoteDeviceName".into(), l.remote_device.into());
    m.insert("RemoteIP".into(), l.remote_ip.into());
    m.insert("RemoteIPType".into(), l.ip_type.into());
    m.insert(
        "RemotePort".into(),
        if l.remote_ip.is_empty() { Value::Null } else { g.rng.gen_range(49_152..65_535i64).into() },
    );
    m.insert("InitiatingProcessAccountDomain".into(), "nt authority".into());
    m.insert("InitiatingProcessAccountName".into(), "system".into());
    m.insert("InitiatingProcessAccountSid".into(), "S-1-5-18".into());
    m.insert("InitiatingProcessFileName".into(), process.into());
    m.insert("InitiatingProcessFolderPath".into(), folder.into());
    m.insert("InitiatingProcessId".into(), g.rng.gen_range(500..1200i64).into());
    m.insert("InitiatingProcessCommandLine".into(), process.into());
    m.insert("InitiatingProcessSHA1".into(), stable_hex(&format!("sha1{process}"), 20).into());
    m.insert("InitiatingProcessIntegrityLevel".into(), "System".into());
    m.insert("InitiatingProcessTokenElevation".into(), "TokenElevationTypeDefault".into());
    m.insert("AdditionalFields".into(), json!({"IsLocalLogon": !remote}).to_string().into());
    m.insert("ReportId".into(), g.next_report().into());
    m.insert("AppGuardContainerId".into(), "".into());
    m.insert("MachineGroup".into(), "Servers".into());
    m
}

fn network_row(g: &mut Gen, device: &Device, at: i64, remote_ip: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("Timestamp".into(), format_timestamp(at).into());
    m.insert("DeviceId".into(), device.0.clone().into());
    m.insert("DeviceName".into(), device.1.clone().into());
    m.insert("ActionType".into(), "InboundConnectionAccepted".into());
    m.insert("RemoteIP".into(), remote_ip.into());
    m.insert("RemotePort".into(), g.rng.gen_range(49_152..65_535i64).into());
    m.insert("RemoteUrl".into(), "".into());
    m.insert("LocalIP".into(), "10.0.0.10".into());
    m.insert("LocalPort".into(), 88.into());
    m.insert("Protocol".into(), "Tcp".into());
    m.insert("LocalIPType".into(), "Private".into());
    m.insert("RemoteIPType".into(), "Private".into());
    m.insert("InitiatingProcessFileName".into(), "lsass.exe".into());
    m.insert("InitiatingProcessFolderPath".into(), "c:\\windows\\system32\\lsass.exe".into());
    m.insert("InitiatingProcessId".into(), 812.into());
    m.insert("InitiatingProcessCommandLine".into(), "lsass.exe".into());
    m.insert("InitiatingProcessAccountDomain".into(), "nt authority".into());
    m.insert("InitiatingProcessAccountName".into(), "system".into());
    m.insert("ReportId".into(), g.next_report().into());
    m.insert("AppGuardContainerId".into(), "".into());
    m.insert("MachineGroup".into(), "Domain Controllers".into());
    m
}

/// Failed (and successful) network logons from `ip` against `device`: `accounts`
/// accounts, `tries` failures each, `successes` successes, from `start` on a few seconds
/// apart. Returns the first failure's time.
#[allow(clippy::too_many_arguments)]
fn spray(
    g: &mut Gen,
    device: &Device,
    ip: &str,
    start: i64,
    accounts: usize,
    tries: usize,
    successes: usize,
    logon_type: &str,
    ip_type: &str,
) -> i64 {
    let mut at = start;
    for a in 0..accounts {
        let account = format!("user{:03}", a + 1);
        for _ in 0..tries {
            let l = Logon {
                action: "LogonFailed",
                logon_type,
                account: &account,
                remote_ip: ip,
                remote_device: "",
                ip_type,
            };
            let row = logon_row(g, device, at, &l);
            g.push(LOGONS, row);
            at += g.rng.gen_range(1..20) * TICKS_PER_SEC;
        }
    }
    for s in 0..successes {
        let account = format!("user{:03}", s + 1);
        let l =
            Logon { action: "LogonSuccess", logon_type, account: &account, remote_ip: ip, remote_device: "", ip_type };
        let row = logon_row(g, device, at, &l);
        g.push(LOGONS, row);
        at += g.rng.gen_range(1..20) * TICKS_PER_SEC;
    }
    start
}

pub(super) fn generate(g: &mut Gen) {
    let dcs: Vec<Device> = DCS.iter().map(|n| (stable_hex(&format!("dc{n}"), 20), n.to_string())).collect();

    // Domain controllers: Kerberos accepted by lsass.exe on port 88.
    for dc in &dcs {
        for _ in 0..4 {
            let at = g.time_in_window(3);
            let ip = format!("10.0.{}.{}", g.rng.gen_range(1..4), g.rng.gen_range(2..250));
            let row = network_row(g, dc, at, &ip);
            g.push(NETWORK, row);
        }
    }

    // Background: workstation and server logons, a few failures (too few accounts to
    // look like a spray: the users list is short).
    for _ in 0..g.spec.events / 20 {
        let device = g.skewed_device();
        let device = g.devices[device].clone();
        let at = g.time_in_window(2);
        let user = USERS[g.rng.gen_range(0..USERS.len())];
        let action = if g.rng.gen_bool(0.1) { "LogonFailed" } else { "LogonSuccess" };
        let ip = format!("10.0.{}.{}", g.rng.gen_range(1..4), g.rng.gen_range(2..250));
        let l = match g.rng.gen_range(0..10) {
            0..=3 => Logon {
                action,
                logon_type: "Network",
                account: user,
                remote_ip: &ip,
                remote_device: "",
                ip_type: "Private",
            },
            4 => Logon {
                action,
                logon_type: "RemoteInteractive",
                account: user,
                remote_ip: &ip,
                remote_device: "ws-jump.corp.example.com",
                ip_type: "Private",
            },
            5 | 6 => Logon {
                action,
                logon_type: "Interactive",
                account: user,
                remote_ip: "",
                remote_device: "",
                ip_type: "",
            },
            7 => Logon {
                action,
                logon_type: "Interactive",
                account: user,
                remote_ip: "127.0.0.1",
                remote_device: "",
                ip_type: "Loopback",
            },
            8 => Logon { action, logon_type: "Unlock", account: user, remote_ip: "", remote_device: "", ip_type: "" },
            _ => Logon {
                action: "LogonSuccess",
                logon_type: "Service",
                account: "svc_backup",
                remote_ip: "",
                remote_device: "",
                ip_type: "",
            },
        };
        let row = logon_row(g, &device, at, &l);
        g.push(LOGONS, row);
    }

    if g.spec.attacks == 0 {
        return;
    }
    // The sprays: one source IP (its own, in 198.51.100.0/24) against one device; 21 to
    // 40 accounts, one or two tries each, at most a couple of successes.
    for i in 0..g.spec.attacks {
        let device = g.devices[g.rng.gen_range(0..g.devices.len())].clone();
        let ip = format!("198.51.100.{}", 10 + i % 240);
        let accounts = g.rng.gen_range(21..=40);
        let tries = if i % 2 == 0 { 1 } else { 2 };
        let successes = i % 3;
        let start = g.spec.base_time - g.rng.gen_range(HOUR..30 * HOUR);
        let first = spray(g, &device, &ip, start, accounts, tries, successes, "Network", "Public");
        g.expect(
            DETECTOR,
            &[
                ("IPAddress", ip),
                ("DeviceName", device.1.clone()),
                ("DeviceId", device.0.clone()),
                ("FirstFailed", format_timestamp(first)),
            ],
        );
    }

    // Near misses, each from its own IP (203.0.113.0/24), one condition off.
    let target = g.devices[g.rng.gen_range(0..g.devices.len())].clone();
    let start = g.spec.base_time - 5 * HOUR;
    // A spray against a domain controller, its DeviceName in another case (`in~`).
    let dc = (dcs[0].0.clone(), dcs[0].1.to_uppercase());
    spray(g, &dc, "203.0.113.10", start, 30, 1, 0, "Network", "Public");
    // Exactly 20 accounts: not more than 20.
    spray(g, &target, "203.0.113.11", start, 20, 1, 0, "Network", "Public");
    // Three tries for every account: Unique*3 is not more than Failed.
    spray(g, &target, "203.0.113.12", start, 21, 3, 0, "Network", "Public");
    // Too many successes: 11*2 is not less than 21 failures.
    spray(g, &target, "203.0.113.13", start, 21, 1, 11, "Network", "Public");
    // Screen unlocks and loopback logons do not count.
    spray(g, &target, "203.0.113.14", start, 30, 1, 0, "Unlock", "Public");
    spray(g, &target, "203.0.113.15", start, 30, 1, 0, "Network", "Loopback");
}
