//! The store against a model: a `BTreeMap` of the distinct rows ever added, with the
//! batch each was stored by. Look-ups, duplicate detection, "new since batch N" and
//! retention must agree with it after any sequence of batches, clock moves and reopens.
//! Plus the retention figures a collector lives by: 40 days at a constant rate with 7
//! days kept leaves exactly the last 7 days visible and the disk flat.

use super::*;
use crate::parse::normalise::{normalise, TableHints};
use lookout_plugin_sdk::time::TICKS_PER_SEC;
use lookout_plugin_sdk::Row;
use proptest::prelude::*;
use std::collections::BTreeSet;

const TABLE: &str = "DeviceFileEvents";
/// Where the forty-day test puts its row from ahead of the clock.
const AHEAD_TABLE: &str = "DeviceProcessEvents";
const DAY: i64 = 86_400 * TICKS_PER_SEC;
const BASE: i64 = 20_000 * DAY;

/// A row: (sha1, device, day, report, variant); the variant changes only the content.
type ModelRow = (u8, u8, i64, u8, u8);

fn normal(r: ModelRow, pad: usize) -> NormalRow {
    let (sha1, device, day, report, variant) = r;
    let ts = lookout_plugin_sdk::time::format_timestamp(BASE + day * DAY + i64::from(report) * TICKS_PER_SEC);
    let text = format!(
        r#"{{"Timestamp":"{ts}","DeviceId":"dev{device}","SHA1":"sha{sha1}","ReportId":{report},"FolderPath":"C:\\x{variant}","Pad":"{}"}}"#,
        "p".repeat(pad)
    );
    let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
    normalise(obj, Some(TABLE), &TableHints::default()).unwrap()
}

fn day_of(r: &Row) -> i64 {
    let ts = lookout_plugin_sdk::time::parse_timestamp(r.str("Timestamp")).unwrap();
    (ts - BASE).div_euclid(DAY)
}

#[derive(Debug, Clone)]
enum Op {
    Batch(Vec<ModelRow>),
    Clock(i64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let row = (0u8..3, 0u8..2, 0i64..12, 0u8..3, 0u8..2);
    prop_oneof![
        4 => proptest::collection::vec(row, 1..12).prop_map(Op::Batch),
        1 => (0i64..16).prop_map(Op::Clock),
        1 => Just(Op::Reopen),
    ]
}

/// The model: each distinct row with the batch that stored it; the duplicates seen.
#[derive(Default)]
struct Model {
    rows: BTreeMap<ModelRow, u64>,
    duplicates: u64,
    expired: u64,
    horizon_day: Option<i64>,
}

impl Model {
    fn visible(&self, r: &ModelRow) -> bool {
        self.horizon_day.is_none_or(|h| r.2 >= h)
    }
}

fn check(store: &Store, model: &Model) {
    // Look-ups by (SHA1, DeviceId) and by SHA1.
    for sha1 in 0u8..3 {
        for device in [None, Some(0u8), Some(1)] {
            let dev = device.map(|d| format!("dev{d}"));
            let mut got: Vec<(u8, i64, String)> = store
                .lookup::<Row>(TABLE, &format!("sha{sha1}"), dev.as_deref())
                .unwrap()
                .iter()
                .map(|r| (r.str("DeviceId").as_bytes()[3] - b'0', day_of(r), r.str("FolderPath").to_string()))
                .collect();
            got.sort();
            let mut want: Vec<(u8, i64, String)> = model
                .rows
                .keys()
                .filter(|r| r.0 == sha1 && device.is_none_or(|d| r.1 == d) && model.visible(r))
                .map(|r| (r.1, r.2, format!("C:\\x{}", r.4)))
                .collect();
            want.sort();
            assert_eq!(got, want, "look-up sha{sha1} {dev:?}");
        }
    }
    // New since every batch.
    let head = store.head_seq();
    for since in 0..=head {
        let got = store.new_row_keys(TABLE, since + 1, head).unwrap().len();
        let want = model.rows.iter().filter(|(r, seq)| **seq > since && model.visible(r)).count();
        assert_eq!(got, want, "new since batch {since}");
    }
    let visible = model.rows.keys().filter(|r| model.visible(r)).count() as u64;
    let kept = store.retained().unwrap();
    assert_eq!(kept.rows.get(TABLE).copied().unwrap_or(0), visible, "rows within retention");
    assert_eq!(store.counters().duplicates, model.duplicates);
    assert_eq!(store.counters().expired, model.expired);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..14)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.set_retention(Some(3 * DAY));
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Batch(rows) => {
                    let seq = store.next_journal_seq();
                    let mut b = store.batch();
                    let mut pending = BTreeSet::new();
                    for r in rows {
                        let added = b.add_row(&normal(r, 8), 0).unwrap();
                        let want = if !model.visible(&r) {
                            model.expired += 1;
                            Added::Expired
                        } else if model.rows.contains_key(&r) || !pending.insert(r) {
                            model.duplicates += 1;
                            Added::Duplicate
                        } else {
                            Added::New
                        };
                        prop_assert_eq!(added, want, "{:?}", r);
                    }
                    b.commit().unwrap();
                    for r in pending {
                        model.rows.insert(r, seq);
                    }
                }
                Op::Clock(day) => {
                    // The horizon is `now − 3 days`, and only moves forward.
                    store.advance_clock(BASE + (day + 3) * DAY).unwrap();
                    model.horizon_day = Some(model.horizon_day.map_or(day, |h| h.max(day)));
                    store.expire_all().unwrap();
                }
                Op::Reopen => {
                    store.flush().unwrap();
                    drop(store);
                    store = Store::open(dir.path()).unwrap();
                    store.set_retention(Some(3 * DAY));
                }
            }
            check(&store, &model);
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}

/// 40 simulated days of a constant rate with 7 days kept: the visible rows are exactly
/// those of the last 7 days, the items stored and the data directory stay within ±15% of
/// their size at day 8, and sled never writes a blob. A row stamped a year ahead (a
/// device with a wrong clock) stays visible and keeps no generation alive. `LOOKOUT_TEST_ROWS_PER_DAY` runs it at
/// another rate (10,000 by default; 100,000 is the long variant).
#[test]
fn forty_days_with_seven_kept_stay_flat() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.set_retention(Some(7 * DAY));
    // A detector's column index, as on a collector (its entries expire with their batches).
    store.declare_indexes(&[super::process_index(TABLE)]).unwrap();
    const BATCH: u32 = 1_000;
    let per_day: u32 = std::env::var("LOOKOUT_TEST_ROWS_PER_DAY").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let mut at_day_8 = 0u64;
    let mut live_at_day_8 = 0u64;
    let mut sizes = Vec::new();
    let mut lives = Vec::new();
    for day in 0..40i64 {
        for chunk in 0..(per_day / BATCH) {
            let mut b = store.batch();
            for i in 0..BATCH {
                let n = chunk * BATCH + i;
                // Distinct rows: the report number carries the day and the row.
                let text = format!(
                    r#"{{"Timestamp":"{}","DeviceId":"dev{}","SHA1":"{:040x}","ReportId":{},"FolderPath":"C:\\Windows\\System32\\f{}.dll","ActionType":"FileCreated","InitiatingProcessFileName":"svchost.exe"}}"#,
                    lookout_plugin_sdk::time::format_timestamp(
                        BASE + day * DAY + i64::from(n) * (DAY / i64::from(per_day))
                    ),
                    n % 50,
                    (day as u64) << 32 | u64::from(n),
                    day * 100_000 + i64::from(n),
                    n % 97
                );
                let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
                b.add_row(&normalise(obj, Some(TABLE), &TableHints::default()).unwrap(), 0).unwrap();
            }
            if day == 1 && chunk == 0 {
                let text = format!(
                    r#"{{"Timestamp":"{}","DeviceId":"skewed","SHA1":"{:040x}","ReportId":1,"FileName":"a.exe"}}"#,
                    lookout_plugin_sdk::time::format_timestamp(BASE + 400 * DAY),
                    7
                );
                let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
                let row = normalise(obj, Some(AHEAD_TABLE), &TableHints::default()).unwrap();
                assert_eq!(b.add_row(&row, 0).unwrap(), Added::New);
            }
            b.commit().unwrap();
        }
        // End of the day: the clock moves, expired blocks go.
        store.advance_clock(BASE + (day + 1) * DAY).unwrap();
        store.expire_all().unwrap();
        store.flush().unwrap();
        let size = dir_bytes(dir.path());
        // What Lookout keeps (sled's items), apart from how sled lays them out in its file.
        let live: u64 = store.space_by_part().unwrap().iter().map(|p| p.2).sum();
        if day == 8 {
            at_day_8 = size;
            live_at_day_8 = live;
        }
        if day >= 8 {
            sizes.push((day, size));
            lives.push((day, live));
        }
        let kept = store.retained().unwrap();
        let want = u64::from(per_day) * (day.min(6) as u64 + 1);
        assert_eq!(kept.rows.get(TABLE).copied().unwrap_or(0), want, "day {day}: the last 7 days are visible");
        assert_eq!(kept.oldest.map(|t| (t - BASE).div_euclid(DAY)), Some((day - 6).max(0)), "day {day}");
        if day >= 1 {
            assert_eq!(kept.rows.get(AHEAD_TABLE).copied(), Some(1), "day {day}: the row from ahead is kept");
        }
    }
    // The items Lookout keeps stay within ±15% of day 8: expired rows' blocks go, and so
    // do their key-index entries (event runs merge only within an eighth of the
    // retention, so a run is dropped soon after its rows expire).
    for (day, live) in &lives {
        let ratio = *live as f64 / live_at_day_8 as f64;
        assert!(
            (0.85..=1.15).contains(&ratio),
            "day {day}: {live} live bytes, {ratio:.2}x day 8's {live_at_day_8}: {lives:?}"
        );
    }
    // So does the directory: a day's rows are in a generation of their own (the clock moves
    // a day at a time, more than an eighth of the retention), which is deleted whole once
    // they are past the horizon; sled's file for the rest (directory entries, run
    // metadata, counters) is small.
    eprintln!("data directory by day (bytes): {sizes:?}");
    eprintln!("stored items by day (bytes): {lives:?}");
    for (day, size) in &sizes {
        let ratio = *size as f64 / at_day_8 as f64;
        assert!((0.85..=1.15).contains(&ratio), "day {day}: {size} bytes, {ratio:.2}x day 8's {at_day_8}: {sizes:?}");
    }
    // One a day (the clock moves a day at a time, more than an eighth of 7 days), 7 kept.
    assert_eq!(store.generation_count(), 7, "generations for 7 days kept");
    let mut dbs = vec![dir.path().join("db")];
    dbs.extend(std::fs::read_dir(dir.path().join("gens")).unwrap().flatten().map(|e| e.path()));
    for db in dbs {
        let blob_files = std::fs::read_dir(db.join("blobs")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(blob_files, 0, "sled wrote blob files in {}", db.display());
    }
}

/// Every stored key of [`TABLE`] with its key-index entry.
fn key_entries(store: &Store) -> Vec<(Vec<u8>, KeyEntry)> {
    let keys = store.new_row_keys(TABLE, 0, u64::MAX).unwrap();
    keys.into_iter()
        .map(|k| {
            let e = store.key_entry(&k).unwrap().expect("every stored key is in the key index");
            (k, e)
        })
        .collect()
}

/// A batch's own event run is held in memory, not written (no chunk of it in any
/// database), and made again from its blocks' key frames when the store opens: every key
/// is where it was, with its content hash, so a row sent again is a duplicate and one
/// that differs only in content is another row.
#[test]
fn a_batch_s_own_run_is_held_and_made_again_from_its_key_frames() {
    let dir = tempfile::tempdir().unwrap();
    // Over a block's 512 rows, so the run spans two blocks' key frames.
    let rows: Vec<ModelRow> = (0..700u32).map(|i| ((i % 250) as u8, (i / 250) as u8, 0, 0, 0)).collect();
    let before = {
        let mut store = Store::open(dir.path()).unwrap();
        let mut b = store.batch();
        for r in &rows {
            assert_eq!(b.add_row(&normal(*r, 8), 0).unwrap(), Added::New);
        }
        b.commit().unwrap();
        let mut b = store.batch();
        assert_eq!(b.add_row(&normal((0, 0, 0, 0, 1), 8), 0).unwrap(), Added::New, "another content, another row");
        b.commit().unwrap();
        assert_eq!(store.runs.held_count(), 2);
        for db in store.gens.all_dbs() {
            assert_eq!(db.scan_prefix([keys::RUN_CHUNK]).count(), 0, "a held run writes no chunk");
        }
        let before = key_entries(&store);
        assert_eq!(before.len(), 701);
        store.flush().unwrap();
        before
    };
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(store.runs.held_count(), 2, "held again on open");
    assert_eq!(key_entries(&store), before, "each key where it was, with its content");
    let mut b = store.batch();
    for r in rows.iter().chain([&(0, 0, 0, 0, 1)]) {
        assert_eq!(b.add_row(&normal(*r, 8), 0).unwrap(), Added::Duplicate, "{r:?} again");
    }
    assert_eq!(b.add_row(&normal((0, 0, 0, 0, 2), 8), 0).unwrap(), Added::New, "a third content");
    b.commit().unwrap();
}

/// Where runs come slowly, a generation is left with fewer runs than a merge takes; past
/// [`runs::MAX_HELD`] held runs the oldest are merged (or written) however few, so memory
/// stays bounded, and every key stays where it was, before and after reopening.
#[test]
fn held_runs_stay_bounded_when_generations_end_with_few_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.set_retention(Some(80 * DAY));
    let mut most_held = 0;
    let mut n = 0u32;
    // A generation spans 10 days of store clock: three batches each.
    for generation in 0..8i64 {
        store.advance_clock(BASE + generation * 10 * DAY + DAY).unwrap();
        for _ in 0..3 {
            let mut b = store.batch();
            for _ in 0..20 {
                let r = ((n % 250) as u8, (n / 250 % 250) as u8, 0, (n / 62_500) as u8, 0);
                assert_eq!(b.add_row(&normal(r, 8), 0).unwrap(), Added::New);
                n += 1;
            }
            b.commit().unwrap();
            store.finish_merge();
            most_held = most_held.max(store.runs.held_count());
        }
    }
    assert!(store.gens.count() >= 8, "a generation per three batches: {}", store.gens.count());
    assert!(most_held <= runs::MAX_HELD, "{most_held} held");
    assert!(store.runs.run_count() > store.runs.held_count(), "some were merged or written");
    let before = key_entries(&store);
    assert_eq!(before.len(), n as usize);
    store.flush().unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(key_entries(&store), before);
}

/// A store keeping 7 days, with one row of TABLE stamped at each of `days` (after BASE),
/// each stored by a batch of its own.
fn seven_days_kept_with_rows_of_days(dir: &std::path::Path, days: &[i64]) -> Store {
    let mut store = Store::open(dir).unwrap();
    store.set_retention(Some(7 * DAY));
    for (report, day) in (1..).zip(days) {
        let text = format!(
            r#"{{"Timestamp":"{}","DeviceId":"dev","SHA1":"{:040x}","ReportId":{report},"FileName":"a.exe"}}"#,
            lookout_plugin_sdk::time::format_timestamp(BASE + day * DAY),
            report
        );
        let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
        let mut b = store.batch();
        b.add_row(&normalise(obj, Some(TABLE), &TableHints::default()).unwrap(), 0).unwrap();
        b.commit().unwrap();
    }
    store
}

/// A generation whose last blocks were removed while its key-index run was not dropped
/// (the process ended in between, or the run was being merged) is deleted once the run
/// goes: after a restart, the first expiry step drops the run and then the generation.
/// It used to be kept for good: the step found no block to remove, kept the generation
/// for its run, and looked no more until the horizon passed a block still there.
#[test]
fn a_generation_whose_run_outlived_its_blocks_is_deleted_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let row = |report: i64, day: i64| {
        let text = format!(
            r#"{{"Timestamp":"{}","DeviceId":"dev","SHA1":"{report:040x}","ReportId":{report},"FileName":"a.exe"}}"#,
            lookout_plugin_sdk::time::format_timestamp(BASE + day * DAY),
        );
        let serde_json::Value::Object(obj) = serde_json::from_str(&text).unwrap() else { unreachable!() };
        normalise(obj, Some(TABLE), &TableHints::default()).unwrap()
    };
    {
        let mut store = Store::open(dir.path()).unwrap();
        store.set_retention(Some(7 * DAY));
        store.advance_clock(BASE).unwrap();
        for (report, day) in [(1, 0), (2, 10)] {
            store.advance_clock(BASE + day * DAY).unwrap();
            // The first row's run outlives this commit's upkeep too.
            store.skip_next_run_drop = true;
            let mut b = store.batch();
            b.add_row(&row(report, day), 0).unwrap();
            b.commit().unwrap();
        }
        assert_eq!(store.generation_count(), 2);
        assert_eq!(store.runs.run_count(), 2);
        store.advance_clock(BASE + 12 * DAY).unwrap();
        store.skip_next_run_drop = true;
        assert_eq!(store.expire_step(64).unwrap(), 1);
        assert_eq!(store.generation_count(), 2, "kept for its run, as a crash before the run's drop leaves it");
        store.flush().unwrap();
    }
    let mut store = Store::open(dir.path()).unwrap();
    store.set_retention(Some(7 * DAY));
    store.advance_clock(BASE + 12 * DAY).unwrap();
    assert_eq!(store.expire_step(64).unwrap(), 0);
    assert_eq!(store.generation_count(), 1, "the generation with nothing left goes");
    assert_eq!(store.retained().unwrap().rows.get(TABLE).copied(), Some(1));
}

/// An expiry step whose commit fails leaves nothing behind for the next one: the next
/// call removes the expired blocks (it used to take them for gone, and wait until the
/// horizon passed the newest block it meant to keep).
#[test]
fn an_expiry_that_failed_is_taken_up_by_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = seven_days_kept_with_rows_of_days(dir.path(), &[0, 30]);
    store.advance_clock(BASE + 31 * DAY).unwrap();
    assert_eq!(store.retained().unwrap().invisible, 1);
    store.fail_next_main_commit = true;
    assert!(store.expire_step(64).is_err());
    assert_eq!(store.expire_step(64).unwrap(), 1, "the block the failed step meant to remove");
    let kept = store.retained().unwrap();
    assert_eq!((kept.invisible, kept.rows.get(TABLE).copied()), (0, Some(1)));
}

/// The space figure of the row blocks in block files is of the blocks kept: expired
/// blocks' frames stay in their file until the generation goes, and are not counted as
/// live (the figure used to be the files' length).
#[test]
fn expired_frames_in_a_block_file_are_not_counted_as_live() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = seven_days_kept_with_rows_of_days(dir.path(), &[0, 5]);
    let in_files = |store: &Store| {
        let parts = store.space_by_part().unwrap();
        let (_, blocks, bytes) = *parts.iter().find(|p| p.0.starts_with("row blocks")).unwrap();
        (blocks, bytes)
    };
    let (blocks, before) = in_files(&store);
    assert_eq!(blocks, 2);
    store.advance_clock(BASE + 8 * DAY).unwrap();
    assert_eq!(store.expire_all().unwrap(), 1);
    assert_eq!(store.generation_count(), 1, "the kept row's generation holds the expired frames too");
    let (blocks, after) = in_files(&store);
    assert_eq!(blocks, 1);
    assert!(after < before && after > 0, "{before} -> {after}");
}
