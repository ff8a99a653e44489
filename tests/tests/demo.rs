//! `lookout demo`, the README's first command, run as the real binary: it generates the
//! default fleet (50 devices, 20,000 events, 12 attacks with near misses), ingests it,
//! loads the four detector libraries built next to the binary, and says, per detector,
//! whether the findings match the generator's ground truth. The test checks that line and the exit
//! status, and compares the findings file with the ground truth itself.

use lookout_core::gen;
use lookout_tests::*;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

/// The detector pack: each has its planted findings in `expected-findings.json`.
const PACK: [&str; 3] = ["scheduled-task-persistence", "scm-remote-process", "password-spraying"];

#[test]
fn demo_findings_match_the_ground_truth() {
    let tmp = tempfile::tempdir().unwrap();
    // `--keep` puts the fleet, database and plugins folder here, and the working directory
    // is here too: nothing is written into the repository.
    let kept = tmp.path().join("demo");
    let mut cmd = Command::new(lookout_bin());
    cmd.arg("demo").arg("--keep").arg(&kept).current_dir(tmp.path());
    let out = run_bounded(cmd, Duration::from_secs(600));
    eprintln!("lookout demo took {:?}", out.took);
    assert!(
        out.status.success(),
        "lookout demo exited with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains(", 12 attacks with near misses"), "{}", out.stdout);
    for detector in PACK.iter().chain([&"winrm-plugin-lateral-movement"]) {
        assert!(out.stdout.contains(&format!("{detector}@1.0.0")), "{detector} not loaded:\n{}", out.stdout);
    }
    assert!(!out.stderr.contains("plugin refused"), "{}", out.stderr);
    // What the demo prints when its findings equal the generator's ground truth (an
    // attack's load may join more than one write: the truth counts pairs).
    let truth = truth_pairs(&kept.join("fleet/ground-truth.json"));
    assert!(truth.len() >= 12, "12 attacks give at least 12 pairs: {truth:?}");
    let verdict =
        |detector: &str, n: usize| format!("   {detector}: {n}/{n} planted findings, 0 missing, 0 unexpected");
    let printed = |line: String| assert!(out.stdout.lines().any(|l| l == line), "no {line:?} in:\n{}", out.stdout);
    printed(verdict("winrm-plugin-lateral-movement", truth.len()));
    printed("   every planted attack found, no near miss fired, no finding written twice".to_string());

    // The same comparison, made here from the files the demo kept.
    let lines = read_jsonl(&kept.join("data/findings.jsonl"));
    let winrm: Vec<&serde_json::Value> =
        lines.iter().filter(|f| f["detector"] == "winrm-plugin-lateral-movement").collect();
    let found: BTreeSet<Pair> = winrm.iter().map(|f| finding_pair(f)).collect();
    assert_eq!(winrm.len(), found.len(), "a finding is written twice");
    assert_eq!(found, truth, "the findings file differs from the ground truth");
    let expected = gen::read_expected(&kept.join("fleet").join(gen::EXPECTED_FILE)).unwrap();
    for detector in PACK {
        let planted: BTreeSet<gen::Expected> = expected.iter().filter(|e| e.detector == detector).cloned().collect();
        assert!(planted.len() >= 12, "{detector}: 12 attacks give at least 12 findings: {planted:?}");
        printed(verdict(detector, planted.len()));
        let columns: Vec<String> = planted.iter().next().unwrap().identity.iter().map(|(c, _)| c.clone()).collect();
        let mine: Vec<&serde_json::Value> = lines.iter().filter(|f| f["detector"] == detector).collect();
        let found: BTreeSet<gen::Expected> = mine.iter().filter_map(|f| gen::expected_of(f, &columns)).collect();
        assert_eq!(mine.len(), found.len(), "{detector}: a finding is written twice");
        assert_eq!(found, planted, "{detector}: the findings file differs from the ground truth");
    }

    let entries: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(entries, ["demo"], "the demo wrote outside its --keep folder");
}
