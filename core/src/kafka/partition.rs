//! One owned partition: its own store under `<data>/partitions/<topic>-<n>/`, its own
//! detector instances (private library copies in that store's folder) and its findings.
//!
//! A partition is the unit of work that moves between nodes, so everything it needs to
//! move is in that folder and nothing outside it depends on it: dropping a partition is
//! dropping the folder. Its progress is the next input offset, committed in the same
//! sled batch as the rows read up to it ([`Partition::store_messages`]).

use super::spare_detectors::SpareHome;
use super::KafkaError;
use crate::daemon::plugin_set::PluginSet;
use crate::ingest::{IngestOptions, IngestReport};
use crate::parse::lines::{LineEnd, LineInfo};
use crate::parse::normalise::TableHints;
use crate::parse::pipeline::{parse_line, LineOutcome};
use crate::store::{Added, RejectRecord, Store};
use crate::tail::Tailer;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The stored value of a partition's progress (version 1): the next offset to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct StreamOffset {
    version: u8,
    next: i64,
}

const OFFSET_NAME: &str = "kafka:next-offset";
/// The longest a partition that stays behind its end goes without a detector pass.
const MAX_PASS_DELAY: std::time::Duration = std::time::Duration::from_secs(5);
/// The outbox sequence from which findings are still to be produced to the topic.
const TOPIC_CURSOR_NAME: &str = "kafka:findings-topic-cursor";

/// Where a partition's store lives.
pub fn partition_dir(data: &Path, topic: &str, partition: i32) -> PathBuf {
    // Topic names are [a-zA-Z0-9._-]: safe as a folder name.
    data.join("partitions").join(format!("{topic}-{partition}"))
}

/// What a partition's folder is renamed to before it is deleted. `~` is not allowed in
/// topic names, so no partition's own folder can end like this.
const REMOVING_SUFFIX: &str = "~removing";

/// Removes a partition's folder in a way a crash cannot leave half done under the
/// partition's name (a store missing a generation, say, that would then fail to open
/// every time the partition came back): renamed aside in one step, then deleted; what a
/// crash leaves aside goes with [`remove_interrupted`].
pub fn remove_partition_dir(dir: &Path) -> Result<(), KafkaError> {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KafkaError {
        let path = path.to_path_buf();
        move |source| KafkaError::Io { what, path, source }
    }
    let mut aside = dir.as_os_str().to_owned();
    aside.push(REMOVING_SUFFIX);
    let aside = PathBuf::from(aside);
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(io("remove", &aside))?;
    }
    std::fs::rename(dir, &aside).map_err(io("rename", dir))?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io("sync", parent))?;
    }
    std::fs::remove_dir_all(&aside).map_err(io("remove", &aside))
}

/// Deletes the folders under `root` whose removal a crash interrupted.
pub fn remove_interrupted(root: &Path) -> Result<(), KafkaError> {
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(()) };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(REMOVING_SUFFIX) {
            let path = entry.path();
            tracing::info!(dir = %path.display(), "removing what an interrupted removal left");
            std::fs::remove_dir_all(&path).map_err(|source| KafkaError::Io { what: "remove", path, source })?;
        }
    }
    Ok(())
}

/// Cuts a torn last line from the node's findings JSONL before anything writes to it.
/// A crash mid-write leaves the line of whichever partition was being flushed, and only
/// that partition's store recognises it as its own ([`crate::findings::cut_torn_tail`]),
/// when the node takes the partition over again. If it goes to another node, the next
/// flush of any partition here would end the line with a newline and leave it in the
/// file for good. So a file that does not end with a newline is offered to every
/// partition store kept here, until one recognises the line.
pub fn cut_torn_findings_line(data: &Path, findings: &Path) -> Result<(), KafkaError> {
    fn ends_torn(path: &Path) -> Result<bool, KafkaError> {
        use std::os::unix::fs::FileExt;
        let io = |source| KafkaError::Io { what: "read", path: path.to_path_buf(), source };
        // Opened to write, as the cut would be: a file that can be read and not written
        // is said once here, not once for each partition store kept.
        let file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                // Nor can it be written now: the node starts all the same, its findings
                // wait for the file (out of the topic too) (a line torn then is kept, and a
                // partition's findings in it are written again whole).
                tracing::warn!(file = %path.display(), error = %e, "cannot open the findings file; a torn last line is not looked for");
                return Ok(false);
            }
        };
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Ok(false);
        }
        let mut last = [0u8; 1];
        file.read_exact_at(&mut last, len - 1).map_err(io)?;
        Ok(last[0] != b'\n')
    }
    if !ends_torn(findings)? {
        return Ok(());
    }
    let root = data.join("partitions");
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(()) };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.to_string_lossy().ends_with(REMOVING_SUFFIX))
        .collect();
    dirs.sort();
    for dir in dirs {
        let store = Store::open(&dir)?;
        crate::findings::cut_torn_tail(&store, findings)?;
        drop(store);
        if !ends_torn(findings)? {
            return Ok(());
        }
    }
    tracing::warn!(file = %findings.display(), "the findings file ends with a line no partition store here wrote; left as it is");
    Ok(())
}

pub struct Partition {
    pub topic: String,
    pub partition: i32,
    pub dir: PathBuf,
    pub store: Store,
    pub plugins: PluginSet,
    /// The folder of `plugins`' private copies when it is not the partition's own (a set
    /// loaded ahead of the take-over, `spare_detectors`): removed with the partition.
    pub plugins_home: Option<SpareHome>,
    /// The file feed (FileProfile) read into this partition's store.
    pub tailer: Option<Tailer>,
    /// The next offset to store: the stored one, or where a partition with nothing stored
    /// was started (the retention horizon); `None` only before it is started.
    pub next_offset: Option<i64>,
    /// The partition's end when it was assigned: replaying until `next_offset` reaches it.
    pub replay_target: i64,
    pub replay_started: Instant,
    /// When the replay reached its target, if it has.
    pub replay_done: Option<Instant>,
    /// Whether the detectors have run over the replayed rows (logged once).
    pub replay_detected: bool,
    /// Finding ids the findings topic's partition held when read (at assignment, and at
    /// a take-back): what an earlier owner emitted is not produced again. What this node
    /// produces itself is not added (the topic cursor moves past it).
    pub emitted: HashSet<String>,
    /// The ids it held when this node took the partition over: found by a previous owner,
    /// so not written to this node's JSONL either.
    pub emitted_before: HashSet<String>,
    /// Rows stored since the last detector pass (or the pass a new partition owes).
    pub needs_pass: bool,
    /// Taken over, its detectors not loaded yet: they are once the assignment is taken.
    pub detectors_due: bool,
    /// When the last message arrived, and when the detectors last ran.
    pub last_message_at: Instant,
    pub last_pass_at: Option<Instant>,
    /// Total rows stored since assigned (progress).
    pub stored: u64,
    /// Findings written to the node's JSONL since assigned.
    pub findings_written: u64,
    /// The offset of the findings topic's partition up to which `emitted` was read.
    pub findings_read_to: i64,
    /// The partition's end as last asked.
    pub high_watermark: i64,
}

impl Partition {
    /// Opens (or creates) the partition's store and its detectors' folder.
    pub fn open(data: &Path, topic: &str, partition: i32, plugins_dir: &Path) -> Result<Partition, KafkaError> {
        let dir = partition_dir(data, topic, partition);
        std::fs::create_dir_all(&dir).map_err(|source| KafkaError::Io { what: "create", path: dir.clone(), source })?;
        let store = Store::open(&dir)?;
        let next_offset = store.meta_value::<StreamOffset>(OFFSET_NAME)?.map(|o| o.next);
        Ok(Partition {
            topic: topic.to_string(),
            partition,
            // Private library copies per partition, not per node: a detector library holds
            // one instance (the SDK's export), and partitions sharing a copy would share it.
            plugins: PluginSet::new(plugins_dir, &dir),
            plugins_home: None,
            dir,
            store,
            tailer: None,
            next_offset,
            replay_target: 0,
            replay_started: Instant::now(),
            replay_done: None,
            replay_detected: false,
            emitted: HashSet::new(),
            emitted_before: HashSet::new(),
            needs_pass: true,
            detectors_due: false,
            last_message_at: Instant::now(),
            last_pass_at: None,
            stored: 0,
            findings_written: 0,
            findings_read_to: 0,
            high_watermark: 0,
        })
    }

    /// The next offset committed with the rows in this partition's store (`None` until a
    /// batch is stored; `next_offset` may already hold where reading was started).
    pub fn stored_offset(&self) -> Result<Option<i64>, KafkaError> {
        Ok(self.store.meta_value::<StreamOffset>(OFFSET_NAME)?.map(|o| o.next))
    }

    /// The source name rejects of this partition are kept under.
    pub fn source_name(&self) -> String {
        format!("kafka:{}/{}", self.topic, self.partition)
    }

    /// Whether the detectors should run now over what is stored: not while the partition
    /// is behind its end (a replay or a backlog: one pass over it all instead of one per
    /// batch) unless `MAX_PASS_DELAY` has gone by since the last pass (or since the
    /// replay started: a partition just taken over stores its backlog before its first
    /// pass, not after its first round), and only once no message has arrived for
    /// `quiet` (0 in service: every round).
    pub fn pass_due(&self, quiet: std::time::Duration) -> bool {
        let behind = self.next_offset.is_some_and(|n| n < self.high_watermark.max(self.replay_target));
        let waited = self.last_pass_at.unwrap_or(self.replay_started).elapsed() >= MAX_PASS_DELAY;
        self.last_message_at.elapsed() >= quiet && (!behind || waited)
    }

    /// Whether this partition's store is still catching up with where the partition
    /// ended when it was assigned.
    pub fn replaying(&self) -> bool {
        self.replay_done.is_none()
    }

    /// The outbox sequence findings are still to be produced from.
    pub fn topic_cursor(&self) -> Result<u64, KafkaError> {
        Ok(self.store.meta_value::<u64>(TOPIC_CURSOR_NAME)?.unwrap_or(1))
    }

    /// Records that findings before outbox sequence `next` are in the findings topic.
    /// Durable with the next flush; if lost, the ids read from the topic when the
    /// partition is next assigned keep them from being produced twice.
    pub fn set_topic_cursor(&self, next: u64) -> Result<(), KafkaError> {
        Ok(self.store.put_meta_value(TOPIC_CURSOR_NAME, &next)?)
    }

    /// Stores `messages` ((offset, payload), in offset order) in one batch with the offset
    /// after the last of them.
    pub fn store_messages(
        &mut self,
        opts: &IngestOptions,
        now: i64,
        messages: &[(i64, &[u8])],
    ) -> Result<IngestReport, KafkaError> {
        let mut report = IngestReport::default();
        let Some(&(last, _)) = messages.last() else { return Ok(report) };
        if crate::disk::low(&self.dir) {
            return Err(crate::ingest::IngestError::DiskSpaceLow(crate::disk::DiskSpaceLow(
                self.dir.display().to_string(),
            ))
            .into());
        }
        let source = self.source_name();
        let hints = TableHints::default();
        let mut batch = self.store.batch();
        for &(offset, payload) in messages {
            let info = LineInfo {
                start: offset as u64,
                end: offset as u64 + 1,
                ending: LineEnd::Newline,
                too_long: (payload.len() > opts.max_line).then_some(payload.len() as u64),
            };
            let payload: &[u8] = if info.too_long.is_some() { &[] } else { payload };
            let outcome = parse_line(payload, &info, opts.max_line, &hints);
            let (records, raw) = match outcome {
                LineOutcome::Blank => continue,
                LineOutcome::Rejected(reject, raw) => (vec![Err(reject)], raw),
                LineOutcome::Records(records, raw) => (records, raw),
            };
            for record in records {
                match record {
                    Ok(row) => {
                        report.unexpected_types += u64::from(row.unexpected_types);
                        match batch.add_row(&row, now)? {
                            Added::New => *report.new_rows.entry(row.table).or_insert(0) += 1,
                            Added::Replaced => report.replaced += 1,
                            Added::Duplicate => report.duplicates += 1,
                            Added::Expired => report.expired += 1,
                        }
                    }
                    Err(reject) => {
                        *report.rejected.entry(reject.kind.as_str().to_string()).or_insert(0) += 1;
                        batch.add_reject(RejectRecord {
                            file: source.clone(),
                            // The offset is the message's place in the partition.
                            line: offset as u64,
                            offset: offset as u64,
                            kind: reject.kind.as_str().to_string(),
                            reason: reject.reason,
                            excerpt: String::from_utf8_lossy(&raw[..raw.len().min(256)]).into_owned(),
                        })?;
                    }
                }
            }
        }
        batch.set_meta_value(OFFSET_NAME, &StreamOffset { version: 1, next: last + 1 })?;
        batch.commit()?;
        // The rows and their offset are durable together; a kill here re-reads nothing
        // twice (the Kafka offset commit that follows is only for lag monitoring).
        if crate::failpoint::armed("kafka-after-store-commit") {
            // Durable first, as a kill after sled's next flush would find it.
            self.store.flush()?;
            crate::failpoint::hit("kafka-after-store-commit");
        }
        self.next_offset = Some(last + 1);
        self.stored += report.total_new();
        if report.changed() {
            self.needs_pass = true;
        }
        Ok(report)
    }

    /// Drops the partition: closes its store and removes its folder.
    pub fn drop_files(mut self) -> Result<(), KafkaError> {
        let dir = self.dir.clone();
        let plugins_home = self.plugins_home.take();
        drop(self);
        if let Some(home) = plugins_home {
            // Only copies of libraries already loaded: one left behind is removed at the
            // node's next start. Its number is given back once its set is gone (now).
            if let Err(e) = std::fs::remove_dir_all(&home.path) {
                tracing::debug!(folder = %home.path.display(), error = %e, "cannot remove a partition's detector copies");
            }
        }
        remove_partition_dir(&dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line torn by a crash, of a partition this node no longer owns, is cut before the
    /// partitions it owns now write after it.
    #[test]
    fn a_torn_line_of_a_partition_owned_elsewhere_is_cut_at_start() {
        let data = tempfile::tempdir().unwrap();
        let out = data.path().join("findings.jsonl");
        let finding = |store: &Store, id: &str| {
            let mut pass = store.pass_batch();
            pass.put_finding(id, format!(r#"{{"finding_id":"{id}"}}"#).into_bytes());
            pass.commit().unwrap();
        };
        let mut gone = Store::open(&partition_dir(data.path(), "rows", 0)).unwrap();
        finding(&gone, "a1");
        crate::findings::flush_outbox(&mut gone, &out).unwrap();
        // Its next line, half written when the node was killed.
        finding(&gone, "a2");
        let elsewhere = data.path().join("elsewhere.jsonl");
        crate::findings::flush_outbox(&mut gone, &elsewhere).unwrap();
        let written = std::fs::read_to_string(&elsewhere).unwrap();
        let line = written.lines().last().unwrap().as_bytes();
        let mut file = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        std::io::Write::write_all(&mut file, &line[..line.len() / 2]).unwrap();
        drop(gone);

        let mut owned = Store::open(&partition_dir(data.path(), "rows", 1)).unwrap();
        finding(&owned, "b1");
        drop(owned);
        cut_torn_findings_line(data.path(), &out).unwrap();
        owned = Store::open(&partition_dir(data.path(), "rows", 1)).unwrap();
        crate::findings::flush_outbox(&mut owned, &out).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {text}")))
            .map(|v| v["finding_id"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(ids, ["a1", "b1"]);
    }

    #[test]
    fn a_partition_behind_its_end_passes_once_caught_up_or_after_the_delay_since_its_replay_began() {
        let data = tempfile::tempdir().unwrap();
        let plugins = tempfile::tempdir().unwrap();
        let mut p = Partition::open(data.path(), "rows", 0, plugins.path()).unwrap();
        p.replay_target = 100;
        p.next_offset = Some(40);
        p.last_message_at = Instant::now() - std::time::Duration::from_secs(1);
        assert!(!p.pass_due(std::time::Duration::ZERO), "just taken over and behind: storing first");
        p.replay_started = Instant::now() - MAX_PASS_DELAY;
        assert!(p.pass_due(std::time::Duration::ZERO), "behind for the whole delay: a pass");
        p.last_pass_at = Some(Instant::now());
        assert!(!p.pass_due(std::time::Duration::ZERO), "a pass just ran: the next waits for the delay");
        p.next_offset = Some(100);
        assert!(p.pass_due(std::time::Duration::ZERO), "caught up: a pass at once");
        assert!(!p.pass_due(std::time::Duration::from_secs(5)), "but not before the quiet time");
    }

    #[test]
    fn a_removed_partition_folder_leaves_nothing_and_an_interrupted_removal_is_finished() {
        let data = tempfile::tempdir().unwrap();
        let dir = partition_dir(data.path(), "rows", 3);
        std::fs::create_dir_all(dir.join("gens").join("1")).unwrap();
        std::fs::write(dir.join("gens").join("1").join("db"), b"x").unwrap();
        remove_partition_dir(&dir).unwrap();
        let root = data.path().join("partitions");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "nothing left under partitions/");
        // A crash between the rename and the delete leaves the folder aside, never a
        // partial store under the partition's name; the sweep deletes it, and only it.
        let aside = root.join(format!("rows-4{REMOVING_SUFFIX}"));
        std::fs::create_dir_all(aside.join("db")).unwrap();
        let kept = partition_dir(data.path(), "rows", 5);
        std::fs::create_dir_all(&kept).unwrap();
        remove_interrupted(&root).unwrap();
        assert!(!aside.exists());
        assert!(kept.exists(), "a partition's own folder is not touched");
    }
}
