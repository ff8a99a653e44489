//! The detector template, used as a plugin author outside this repository would: copied
//! to a folder of its own, its SDK dependency pointed at this checkout, built with its own
//! `cargo build`, dropped into a plugins folder, and run by the real `lookout` binary.

use lookout_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const NOW: &str = "2025-05-08T00:00:00Z";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the cli crate is in the repository").to_path_buf()
}

/// Copies the template, pointing its SDK dependency at this checkout.
fn copy_template(dst: &Path) {
    let src = repo_root().join("plugins/sdk/template");
    std::fs::create_dir_all(dst.join("src")).unwrap();
    std::fs::copy(src.join("src/lib.rs"), dst.join("src/lib.rs")).unwrap();
    let sdk = repo_root().join("plugins/sdk");
    let manifest = std::fs::read_to_string(src.join("Cargo.toml")).unwrap();
    let from = r#"lookout-plugin-sdk = { path = ".." }"#;
    assert!(manifest.contains(from), "the template names its SDK dependency as `{from}`");
    let manifest =
        manifest.replace(from, &format!("lookout-plugin-sdk = {{ path = {:?} }}", sdk.display().to_string()));
    std::fs::write(dst.join("Cargo.toml"), manifest).unwrap();
    // The versions this checkout was tested with, so the build needs no network.
    std::fs::copy(repo_root().join("Cargo.lock"), dst.join("Cargo.lock")).unwrap();
}

fn process_row(report: i64, file: &str, cmd: &str) -> String {
    serde_json::json!({
        "Timestamp": "2025-05-07T10:00:00Z", "DeviceId": "dev-1", "DeviceName": "ws-1",
        "ActionType": "ProcessCreated", "FileName": file, "ProcessCommandLine": cmd,
        "SHA1": "", "ReportId": report, "InitiatingProcessLogonId": 999,
    })
    .to_string()
}

#[test]
fn a_plugin_built_from_the_template_outside_the_repository_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("my-detector");
    copy_template(&project);
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--offline", "--quiet"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", project.join("target"))
        .env_remove("RUSTFLAGS");
    let built = run_bounded(build, Duration::from_secs(600));
    assert!(built.status.success(), "cargo build of the template failed:\n{}", built.stderr);
    let lib = project.join("target/debug/liblookout_encoded_powershell.so");
    assert!(lib.is_file(), "{} was not built", lib.display());

    // Dropped into a plugins folder with safe permissions, next to nothing else.
    let plugins = plugins_dir(tmp.path(), &[]);
    let dropped = plugins.join("liblookout_encoded_powershell.so");
    std::fs::copy(&lib, &dropped).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dropped, std::fs::Permissions::from_mode(0o644)).unwrap();

    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let rows = [
        process_row(1, "powershell.exe", "powershell.exe -NoProfile -EncodedCommand SQBFAFgA"),
        process_row(2, "PowerShell.EXE", "powershell -enc SQBFAFgA"),
        process_row(3, "powershell.exe", "powershell.exe -File backup.ps1 -encoding utf8"),
        process_row(4, "cmd.exe", "cmd.exe /c echo -enc"),
    ];
    std::fs::write(logs.join("DeviceProcessEvents.jsonl"), rows.join("\n") + "\n").unwrap();
    let data = tmp.path().join("data");
    let ingested = lookout_ok(&data, &["ingest", "--now", NOW, logs.to_str().unwrap()]);
    assert!(ingested.contains("new rows DeviceProcessEvents: 4"), "{ingested}");

    let listed = lookout_ok(&data, &["plugins", "list", "--plugins", plugins.to_str().unwrap()]);
    assert!(listed.contains("encoded-powershell"), "{listed}");
    lookout_ok(&data, &["detect", "--plugins", plugins.to_str().unwrap(), "--now", NOW]);
    let findings = read_jsonl(&data.join("findings.jsonl"));
    let mut reports: Vec<i64> = findings.iter().map(|f| f["row"]["ReportId"].as_i64().unwrap()).collect();
    reports.sort();
    assert_eq!(reports, [1, 2], "{findings:#?}");
    assert!(findings.iter().all(|f| f["detector"] == "encoded-powershell" && f["mitre"][0] == "T1059.001"));
}
