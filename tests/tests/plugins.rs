//! The real binary with the real plugin libraries: the WinRM detector on the kqlbench
//! exports, misbehaving plugins contained, and every loading refusal.

use lookout_tests::*;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const NOW: &str = "2025-05-08T00:00:00Z";
const ANY_PROCESS: &str = "winrm-plugin-lateral-movement.initiating_process=*";

fn ingest_kqlbench(data: &Path) {
    let k = kqlbench_dir();
    lookout_ok(
        data,
        &[
            "ingest",
            "--now",
            NOW,
            k.join("DeviceImageLoadEvents.json").to_str().unwrap(),
            k.join("DeviceFileEvents.json").to_str().unwrap(),
        ],
    );
}

/// (load ReportId, write ReportId) of each finding line.
fn pairs(lines: &[serde_json::Value]) -> BTreeSet<(i64, i64)> {
    lines.iter().map(|f| (f["row"]["ReportId"].as_i64().unwrap(), f["row"]["ReportId1"].as_i64().unwrap())).collect()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn kqlbench_rule_as_published_finds_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    ingest_kqlbench(&data);
    let out = lookout_ok(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW]);
    assert!(out.contains("0 new finding(s)"), "{out}");
    assert!(read_jsonl(&data.join("findings.jsonl")).is_empty());
}

/// Widening a parameter re-reads everything stored on the detector's next pass (as
/// `detect --backfill` does for every detector): what the narrower value missed is
/// found, and what was already written is not written again.
#[test]
fn widening_a_parameter_re_reads_what_is_stored_and_finds_the_rest_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    let p = plugins.to_str().unwrap();
    ingest_kqlbench(&data);
    let narrow = "winrm-plugin-lateral-movement.excluded_prefix=C:\\Users";
    lookout_ok(&data, &["detect", "--plugins", p, "--now", NOW, "--set", ANY_PROCESS, "--set", narrow]);
    let first = pairs(&read_jsonl(&data.join("findings.jsonl")));
    assert_eq!(first, [(996240, 996234)].into(), "the narrower prefix hides the two pairs under C:\\Users");
    let out = lookout_ok(&data, &["detect", "--plugins", p, "--now", NOW, "--set", ANY_PROCESS]);
    assert!(out.contains("backfill pass") && out.contains("2 new finding(s)"), "{out}");
    let lines = read_jsonl(&data.join("findings.jsonl"));
    assert_eq!(lines.len(), 3, "each pair once");
    assert_eq!(pairs(&lines), [(996240, 996234), (1002193, 1001807), (1002198, 1001803)].into());
    // The same parameters again: nothing new is read, nothing written.
    let out = lookout_ok(&data, &["detect", "--plugins", p, "--now", NOW, "--set", ANY_PROCESS]);
    assert!(out.contains("incremental pass over 0 row(s)"), "{out}");
    let out = lookout_ok(&data, &["detect", "--plugins", p, "--now", NOW, "--set", ANY_PROCESS, "--backfill"]);
    assert!(out.contains("backfill pass") && out.contains("0 new finding(s)"), "{out}");
    assert_eq!(read_jsonl(&data.join("findings.jsonl")).len(), 3);
}

#[test]
fn kqlbench_with_any_process_finds_exactly_the_hand_checked_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    ingest_kqlbench(&data);
    lookout_ok(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW, "--set", ANY_PROCESS]);
    let lines = read_jsonl(&data.join("findings.jsonl"));
    // By hand: the three non-NativeImages loads whose file was created/modified at the
    // same path on the same device (nmap installer, chrome.exe, chrome.dll).
    let expected: BTreeSet<(i64, i64)> = [(996240, 996234), (1002193, 1001807), (1002198, 1001803)].into();
    assert_eq!(lines.len(), 3);
    assert_eq!(pairs(&lines), expected);
    let f = lines.iter().find(|f| f["row"]["ReportId"] == 996240).unwrap();
    assert_eq!(f["detector"], "winrm-plugin-lateral-movement");
    assert_eq!(f["detector_version"], "1.0.0");
    assert_eq!(f["mitre"], serde_json::json!(["T1021.006"]));
    assert_eq!(f["device_name"], "windows-vm");
    let row = f["row"].as_object().unwrap();
    assert_eq!(row["FolderPath"], r"c:\atomicredteam\externalpayloads\nmap-7.80-setup.exe");
    assert_eq!(row["FolderPath1"], r"c:\atomicredteam\externalpayloads\nmap-7.80-setup.exe");
    assert_eq!(row["SHA11"], row["SHA1"]);
    assert_eq!(row["ProfileAvailability"], "");
    assert!(row["GlobalPrevalence"].is_null());
    assert_eq!(row["ActionType1"], "FileModified");
    // Left columns first, then the write's, suffixed where they clash.
    let names: Vec<&String> = row.keys().collect();
    let pos = |n: &str| names.iter().position(|k| *k == n).unwrap_or_else(|| panic!("no column {n}"));
    assert!(pos("TenantId") < pos("ProfileAvailability") && pos("ProfileAvailability") < pos("TenantId1"));
    assert!(pos("Timestamp") < pos("Timestamp1") && pos("DeviceId") < pos("DeviceId1"));
    // A second pass finds nothing new and writes nothing twice.
    lookout_ok(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW, "--set", ANY_PROCESS]);
    assert_eq!(read_jsonl(&data.join("findings.jsonl")).len(), 3);
    let listed = lookout_ok(&data, &["findings", "--json"]);
    assert_eq!(listed.lines().count(), 3);
}

#[test]
fn misbehaving_plugins_are_refused_or_contained_and_winrm_still_finds() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins =
        plugins_dir(tmp.path(), &[WINRM, FIXTURE_PANICS, FIXTURE_ERRORS, FIXTURE_WRONG_ABI, FIXTURE_NOT_A_PLUGIN]);
    ingest_kqlbench(&data);
    let out = lookout(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW, "--set", ANY_PROCESS]);
    // The pass completes (WinRM's findings are written), and the exit status says not
    // every detector ran: 2.
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("2 detector(s) failed their pass and 2 plugin(s) were refused"), "{err}");
    assert!(err.contains(FIXTURE_WRONG_ABI) && err.contains("ABI version 999"), "{err}");
    assert!(err.contains(FIXTURE_NOT_A_PLUGIN) && err.contains("not a Lookout plugin"), "{err}");
    assert!(err.contains("fixture-panics") && err.contains("panicked on purpose"), "{err}");
    assert!(err.contains("fixture-errors") && err.contains("always fails"), "{err}");
    assert_eq!(read_jsonl(&data.join("findings.jsonl")).len(), 3);
    // The failing detectors are retried (and fail again) on the next pass; nothing is
    // written twice.
    let again = lookout(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW, "--set", ANY_PROCESS]);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("panicked on purpose"));
    assert_eq!(read_jsonl(&data.join("findings.jsonl")).len(), 3);
    let verify = lookout(&data, &["plugins", "verify", "--plugins", plugins.to_str().unwrap()]);
    assert!(!verify.status.success(), "verify must fail when a plugin is refused");
}

#[test]
fn unknown_parameter_or_detector_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    ingest_kqlbench(&data);
    let out = lookout(
        &data,
        &["detect", "--plugins", plugins.to_str().unwrap(), "--set", "winrm-plugin-lateral-movement.colour=red"],
    );
    assert!(stderr(&out).contains("has no parameter 'colour'"), "{}", stderr(&out));
    let out = lookout(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--set", "nope.x=1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("'nope'"), "{}", stderr(&out));
}

fn detect_stderr(data: &Path, plugins: &Path) -> (bool, String) {
    let out = lookout(data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW]);
    (out.status.success(), stderr(&out))
}

#[test]
fn group_writable_library_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    let lib = plugins.join(WINRM);
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o664)).unwrap();
    let (_, err) = detect_stderr(&data, &plugins);
    assert!(err.contains(WINRM) && err.contains("writable by group or others"), "{err}");
}

#[test]
fn world_writable_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, err) = detect_stderr(&data, &plugins);
    assert!(!ok);
    assert!(err.contains("plugins folder") && err.contains("writable by group or others"), "{err}");
}

#[test]
fn symlinked_library_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[]);
    std::os::unix::fs::symlink(plugin_lib(WINRM), plugins.join(WINRM)).unwrap();
    let (_, err) = detect_stderr(&data, &plugins);
    assert!(err.contains("symbolic link"), "{err}");
}

/// Only root can give a file to another user, so this test is `#[ignore]`d and `.ci/run`
/// runs it when it is root (`cargo test -p lookout-cli --test plugins -- --ignored`).
#[test]
#[ignore = "gives a file to another user: needs root; .ci/run runs it as root"]
fn library_owned_by_another_user_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    let lib = plugins.join(WINRM);
    std::os::unix::fs::chown(&lib, Some(NOBODY), None)
        .unwrap_or_else(|e| panic!("chown {} to uid {NOBODY} (this test needs root): {e}", lib.display()));
    let out = lookout(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "a refused plugin is reported, and the pass still runs: {err}");
    assert!(err.contains(WINRM) && err.contains(&format!("owned by uid {NOBODY}")), "{err}");
    assert!(read_jsonl(&data.join("findings.jsonl")).is_empty());
}

#[test]
fn pins_refuse_changed_and_unpinned_libraries() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    let out = lookout_ok(&data, &["plugins", "pin", "--plugins", plugins.to_str().unwrap()]);
    assert!(out.contains("pinned") && out.contains(WINRM), "{out}");
    let pin_file = std::fs::read_to_string(plugins.join("lookout-pins.sha256")).unwrap();
    assert!(pin_file.lines().any(|l| l.ends_with(WINRM)));
    assert!(!data.exists(), "pinning does not create a data directory");
    let listed = lookout_ok(&data, &["plugins", "list", "--plugins", plugins.to_str().unwrap()]);
    assert!(listed.contains("winrm-plugin-lateral-movement"), "{listed}");
    lookout_ok(&data, &["plugins", "verify", "--plugins", plugins.to_str().unwrap()]);
    assert!(!data.exists(), "looking at plugins does not create a data directory");
    // The copies loaded meanwhile are made beside where the data directory would be (the
    // system's temporary folder may forbid running code), and removed afterwards.
    let no_tmp = Command::new(lookout_bin())
        .arg("--data")
        .arg(&data)
        .args(["plugins", "verify", "--plugins", plugins.to_str().unwrap()])
        .env("TMPDIR", tmp.path().join("no-such-folder"))
        .output()
        .unwrap();
    assert!(no_tmp.status.success(), "{}", String::from_utf8_lossy(&no_tmp.stderr));
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".lookout-plugins-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A library that is not pinned is refused.
    let extra = plugins.join("liblookout_extra.so");
    std::fs::copy(plugin_lib(WINRM), &extra).unwrap();
    std::fs::set_permissions(&extra, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, err) = detect_stderr(&data, &plugins);
    assert!(err.contains("liblookout_extra.so") && err.contains("not in the pin file"), "{err}");
    std::fs::remove_file(&extra).unwrap();

    // A library that does not load is left out of a new pin file, and `pin` says so in
    // its exit status.
    let broken = plugins.join("liblookout_broken.so");
    std::fs::write(&broken, b"not a library").unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = lookout(&data, &["plugins", "pin", "--plugins", plugins.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped") && stderr(&out).contains("not pinned"));
    let pin_file = std::fs::read_to_string(plugins.join("lookout-pins.sha256")).unwrap();
    assert!(pin_file.lines().any(|l| l.ends_with(WINRM)) && !pin_file.contains("liblookout_broken.so"));
    std::fs::remove_file(&broken).unwrap();

    // A pinned library that changed is refused.
    let lib = plugins.join(WINRM);
    let mut bytes = std::fs::read(&lib).unwrap();
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&lib, bytes).unwrap();
    let (_, err) = detect_stderr(&data, &plugins);
    assert!(err.contains(WINRM) && err.contains("does not match the pinned"), "{err}");
}

/// Finding ids name the tables, not a store's table numbers: the same data ingested in
/// another table order (another collector box, a rebuilt data directory) gives the same
/// ids. (Found by the crash-loop harness.)
#[test]
fn finding_ids_do_not_depend_on_the_order_tables_were_first_seen() {
    let tmp = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    let k = kqlbench_dir();
    let (loads, writes) = (k.join("DeviceImageLoadEvents.json"), k.join("DeviceFileEvents.json"));
    let mut ids = Vec::new();
    for (name, first, second) in [("a", &loads, &writes), ("b", &writes, &loads)] {
        let data = tmp.path().join(name);
        lookout_ok(&data, &["ingest", "--now", NOW, first.to_str().unwrap()]);
        lookout_ok(&data, &["ingest", "--now", NOW, second.to_str().unwrap()]);
        lookout_ok(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW, "--set", ANY_PROCESS]);
        let lines = read_jsonl(&data.join("findings.jsonl"));
        let set: BTreeSet<String> = lines.iter().map(|f| f["finding_id"].as_str().unwrap().to_string()).collect();
        assert_eq!(set.len(), 3);
        ids.push(set);
    }
    assert_eq!(ids[0], ids[1]);
}

/// A detector whose window (`lookback` 30d) is longer than the retention is warned about
/// when it loads, naming the parameter and what to do; within retention, no warning.
#[test]
fn a_window_longer_than_the_retention_is_warned_about_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    ingest_kqlbench(&data);
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    let detect = |retention: &str| {
        lookout(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW, "--retention", retention])
    };
    let out = detect("7d");
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("longer than the retention") && err.contains("parameter=lookback"), "{err}");
    assert!(err.contains("raise --retention"), "{err}");
    let out = detect("31d");
    assert!(!stderr(&out).contains("longer than the retention"), "{}", stderr(&out));
}

/// The four detectors' passes run side by side (a thread per core) or one at a time
/// (`--threads 1`): the same findings, byte for byte. (Not always in the same order: a
/// detector emits a pass's findings in an order of its own, which may differ from one
/// process to the next.)
#[test]
fn passes_side_by_side_find_what_passes_one_at_a_time_find() {
    let tmp = tempfile::tempdir().unwrap();
    let fleet = gen_fleet(tmp.path(), 3000, 3, 7);
    let plugins = plugins_dir(tmp.path(), &[WINRM, SCHEDULED_TASK, SCM_REMOTE, PASSWORD_SPRAYING]);
    let plugins = plugins.to_str().unwrap();
    let mut runs = Vec::new();
    for threads in [None, Some("1")] {
        let data = tmp.path().join(format!("data-{}", threads.unwrap_or("cores")));
        let detect = |data: &Path| {
            let mut args = vec!["detect", "--plugins", plugins, "--now", NOW, "--timings"];
            args.extend(threads.iter().flat_map(|t| ["--threads", *t]));
            lookout_ok(data, &args)
        };
        // The detectors' indexes are declared before the data arrives, as in production.
        detect(&data);
        lookout_ok(&data, &["ingest", "--now", NOW, fleet.logs.to_str().unwrap()]);
        let out = detect(&data);
        assert!(out.contains("the pass of all 4 detector(s): "), "{out}");
        let lines = read_jsonl(&data.join("findings.jsonl"));
        let mut by_detector: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for f in &lines {
            by_detector.entry(f["detector"].as_str().unwrap().to_string()).or_default().push(f.to_string());
        }
        runs.push(by_detector);
    }
    assert_eq!(runs[0].len(), 4, "every detector finds its planted attacks: {:?}", runs[0].keys());
    for lines in runs.iter_mut().flat_map(|r| r.values_mut()) {
        lines.sort();
    }
    for (detector, lines) in &runs[0] {
        assert_eq!(Some(lines), runs[1].get(detector), "{detector}: side by side vs one at a time");
    }
}

#[test]
fn zero_threads_is_refused_with_what_to_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let out = lookout(tmp.path(), &["detect", "--threads", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--threads"), "{}", stderr(&out));
}

/// The indexes a detector declares are kept from its loading on, not from its first pass
/// (a Kafka partition taken over stores its backlog between the two): rows stored before
/// are indexed when it is loaded, rows stored after as they arrive.
#[test]
fn a_loaded_detector_s_indexes_are_kept_before_its_first_pass() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    ingest_kqlbench(&data);
    let dir = plugins_dir(t.path(), &[WINRM, SCHEDULED_TASK, SCM_REMOTE, PASSWORD_SPRAYING]);
    let mut store = lookout_core::Store::open(&data).unwrap();
    let mut set = lookout_core::daemon::plugin_set::PluginSet::new(&dir, &data);
    assert!(set.refresh().unwrap(), "the four detectors load");
    assert_eq!(set.plugins.len(), 4);
    assert!(store.indexes().is_empty(), "nothing declared before a detector is loaded");

    lookout_core::detect::declare_indexes(&mut store, &set.plugins).unwrap();
    let mut want: Vec<_> = set.plugins.iter().flat_map(|p| p.manifest.indexes.clone()).collect();
    want.sort();
    want.dedup();
    assert!(want.len() >= 4, "the pack declares indexes: {want:?}");
    assert_eq!(store.indexes(), want.as_slice());
    drop(store);
    // Kept with the store: a process that opens it later keeps them too.
    let store = lookout_core::Store::open(&data).unwrap();
    assert_eq!(store.indexes(), want.as_slice());
    drop(store);
    // And `lookout status` lists them.
    let status: serde_json::Value = serde_json::from_str(&lookout_ok(&data, &["status", "--json"])).unwrap();
    let listed = status["indexes"].as_array().unwrap();
    assert_eq!(listed.len(), want.len(), "{status}");
    assert!(listed.iter().any(|i| i == "DeviceImageLoadEvents(InitiatingProcessFileName) covers (FolderPath)"));
    assert!(status["generations"].as_u64().is_some_and(|n| n >= 1), "{status}");
    assert!(status["key_index_runs"].as_u64().is_some_and(|n| n >= 1), "{status}");
}

/// The daemon's plugins folder looked at again after a change: a library refused because
/// another provides its detector runs once that one is removed, and a library refused for
/// its permissions runs once they are fixed (a chmod changes neither content nor mtime).
#[test]
fn a_hot_loaded_folder_takes_a_library_once_its_refusal_no_longer_holds() {
    use lookout_core::daemon::plugin_set::PluginSet;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let plugins = plugins_dir(tmp.path(), &[WINRM]);
    let mut set = PluginSet::new(&plugins, &data);
    let running = |set: &PluginSet| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = set
            .plugins
            .iter()
            .map(|p| (p.manifest.name.clone(), p.file.file_name().unwrap().to_string_lossy().into_owned()))
            .collect();
        v.sort();
        v
    };
    assert!(set.refresh().unwrap());
    assert_eq!(running(&set), [("winrm-plugin-lateral-movement".to_string(), WINRM.to_string())]);

    // A second copy of the same detector is refused while the first runs…
    let copy = plugins.join("liblookout_winrm_copy.so");
    std::fs::copy(plugin_lib(WINRM), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    set.refresh().unwrap();
    assert_eq!(running(&set), [("winrm-plugin-lateral-movement".to_string(), WINRM.to_string())]);
    assert_eq!(set.failures, 1);
    // …and runs once the first is removed.
    std::fs::remove_file(plugins.join(WINRM)).unwrap();
    assert!(set.refresh().unwrap());
    assert_eq!(running(&set), [("winrm-plugin-lateral-movement".to_string(), "liblookout_winrm_copy.so".to_string())]);

    // A group-writable library is refused, and runs once chmod fixes it.
    let spraying = plugins.join(PASSWORD_SPRAYING);
    std::fs::copy(plugin_lib(PASSWORD_SPRAYING), &spraying).unwrap();
    std::fs::set_permissions(&spraying, std::fs::Permissions::from_mode(0o664)).unwrap();
    set.refresh().unwrap();
    assert_eq!(running(&set).len(), 1, "{:?}", running(&set));
    assert_eq!(set.failures, 2);
    // The ctime is coarse (a clock tick): let one pass so the chmod is seen as a change.
    std::thread::sleep(std::time::Duration::from_millis(50));
    std::fs::set_permissions(&spraying, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(set.refresh().unwrap());
    assert_eq!(
        running(&set),
        [
            ("password-spraying".to_string(), PASSWORD_SPRAYING.to_string()),
            ("winrm-plugin-lateral-movement".to_string(), "liblookout_winrm_copy.so".to_string())
        ]
    );
}

/// A detector whose pass failed is run again within 30 s, not only when more rows arrive
/// (its rows are still new to it): a failure that passes must not hold findings back in a
/// quiet fleet. Its own wake-up, if sooner, stands.
#[test]
fn a_failed_pass_is_due_again_within_thirty_seconds() {
    use lookout_core::detect::{run_pass, DetectOptions};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let plugins = plugins_dir(tmp.path(), &[FIXTURE_ERRORS]);
    ingest_kqlbench(&data);
    let mut store = lookout_core::store::Store::open(&data).unwrap();
    let mut loaded = lookout_core::plugin::load_dir(&plugins, &data).unwrap();
    let now = lookout_plugin_sdk::time::parse_timestamp(NOW).unwrap();
    let opts = DetectOptions { now: Some(now), ..DetectOptions::default() };
    let reports = run_pass(&mut store, &mut loaded.plugins, &opts).unwrap();
    assert!(reports[0].error.as_deref().is_some_and(|e| e.contains("always fails")), "{:?}", reports[0].error);
    let id = loaded.plugins[0].id();
    let second = lookout_plugin_sdk::time::TICKS_PER_SEC;
    assert_eq!(store.wake_at(&id).unwrap(), Some(now + 30 * second));
    // While it waits after its failure (1 s), its wake-up does not count: a wake-up due
    // meanwhile would have the daemon pass again and again, the detector not run.
    use lookout_core::detect::next_wake;
    assert_eq!(next_wake(&store, &loaded.plugins).unwrap(), None);
    // Failing again later (once its wait is over): due again 30 s after that.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(next_wake(&store, &loaded.plugins).unwrap(), Some(now + 30 * second));
    let later = DetectOptions { now: Some(now + 40 * second), ..DetectOptions::default() };
    run_pass(&mut store, &mut loaded.plugins, &later).unwrap();
    assert_eq!(store.wake_at(&id).unwrap(), Some(now + 70 * second));
}

/// `status` and `findings` only read: pointed at a folder with no data (a mistyped
/// `--data`), they say so and fail, instead of creating an empty store there and
/// reporting it as if all were well.
#[test]
fn reading_commands_on_a_folder_without_data_fail_and_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("no-data-here");
    for args in [&["status"][..], &["status", "--json"], &["findings"]] {
        let out = lookout(&data, args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains("holds no Lookout data"), "{args:?}: {}", stderr(&out));
    }
    assert!(!data.exists(), "nothing created");
}
