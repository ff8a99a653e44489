//! `lookout demo`, the README's first command, run as the real binary: it generates the
//! default fleet (50 devices, 20,000 events, 12 attacks with near misses), ingests it,
//! loads the WinRM detector library built next to the binary, and says whether the
//! findings match the generator's ground truth. The test checks that line and the exit
//! status, and compares the findings file with the ground truth itself.

use lookout_tests::*;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

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
    assert!(out.stdout.contains("3. loaded plugin(s) winrm-plugin-lateral-movement@1.0.0"), "{}", out.stdout);
    assert!(!out.stderr.contains("plugin refused"), "{}", out.stderr);
    // What the demo prints when its findings equal the generator's ground truth (an
    // attack's load may join more than one write: the truth counts pairs).
    let truth = truth_pairs(&kept.join("fleet/ground-truth.json"));
    assert!(truth.len() >= 12, "12 attacks give at least 12 pairs: {truth:?}");
    let verdict = format!(
        "5. findings match the ground truth: {n}/{n} attacks found, 0 false positives, 0 duplicates",
        n = truth.len()
    );
    assert!(out.stdout.lines().any(|l| l == verdict), "no {verdict:?} in:\n{}", out.stdout);

    // The same comparison, made here from the files the demo kept.
    let lines = read_jsonl(&kept.join("data/findings.jsonl"));
    let found: BTreeSet<Pair> = lines.iter().map(finding_pair).collect();
    assert_eq!(lines.len(), found.len(), "a finding is written twice");
    assert_eq!(found, truth, "the findings file differs from the ground truth");

    let entries: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(entries, ["demo"], "the demo wrote outside its --keep folder");
}
