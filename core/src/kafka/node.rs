//! `lookout run --kafka`: one node of a consumer group.
//!
//! The group's partitions are shared out by Kafka (no coordinator of Lookout's own). For
//! each partition it is assigned, a node:
//!
//! 1. opens that partition's store ([`Partition`]); one with no state starts at
//!    `offsetsForTimes(now − retention)` (the partition's end when every message is
//!    older, the beginning when the broker cannot say), one with state at the offset
//!    committed with its rows — the Kafka group's committed offsets are only for lag
//!    monitoring. The store of a partition the node holds nothing of, and the detectors
//!    of every partition taken over, are opened once the assignment is handed to
//!    librdkafka, so its first fetches overlap them;
//! 2. reads the ids the findings topic's partition already holds, so a finding the
//!    previous owner emitted is not emitted again;
//! 3. stores messages in batches, each with the partition's next offset in the same sled
//!    batch, runs the detectors over what is new, appends findings to the node's JSONL
//!    and produces them to the findings topic.
//!
//! On revocation it stops working on the partition at once (everything it stored is
//! committed; what it read and did not store is read again by the next owner). When the
//! next assignment does not give the partition back, its folder is removed.

use super::findings_topic::produce_new;
use super::partition::{partition_dir, remove_interrupted, remove_partition_dir, Partition};
use super::reader::PartitionReader;
use super::spare_detectors::SpareDetectors;
use super::split::{producer, Deliveries};
use super::watermarks::Watermarks;
use super::{KafkaError, KafkaSettings, CALL_TIMEOUT};
use crate::daemon::backoff::Backoff;
use crate::daemon::findings_out::FindingsOut;
use crate::daemon::http::{Endpoint, Observe};
use crate::daemon::metrics::Metrics;
use crate::detect::{run_pass, DetectOptions};
use crate::error::Chain;
use crate::findings::flush_outbox_except;
use crate::ingest::{IngestOptions, IngestReport};
use crate::status::{KafkaStatus, PartitionStatus, Status};
use crate::store::{Counters, StoreReader};
use crate::tail::Tailer;
use lookout_plugin_sdk::time::TICKS_PER_SEC;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaRespErr as RespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data: PathBuf,
    pub kafka: KafkaSettings,
    pub topic: String,
    pub group: String,
    pub findings_topic: String,
    pub plugins: PathBuf,
    /// The node's findings JSONL.
    pub findings: PathBuf,
    /// The FileProfile feed, read into every partition's store.
    pub logs: Option<PathBuf>,
    pub listen: String,
    /// `DETECTOR.PARAM=VALUE` overrides.
    pub params: Vec<(String, String, String)>,
    pub ingest: IngestOptions,
    /// Fixes the evaluation time of every pass.
    pub now: Option<i64>,
    pub retention: Option<i64>,
    /// Whether `retention` was given (`--retention` or the config file): if not, the one
    /// the data directory recorded is kept ([`super::node_retention`]).
    pub retention_given: bool,
    /// How many of a partition's detectors pass at once (0: one per core).
    pub detect_threads: usize,
    /// Look at the file feed and the plugins folder at least this often.
    pub rescan: Duration,
    /// Messages per stored batch, at most.
    pub batch_messages: usize,
    /// Payload bytes per stored batch, at most (a message of many records counts whole):
    /// what bounds a round's memory when `split` packs tens of rows into a message.
    pub batch_bytes: usize,
    /// Run a partition's detectors only once no message has arrived for this long (0:
    /// every round). Rules with thresholds or suppressions decide on what a pass sees, so
    /// a topic filled in bursts gets one pass per burst, not one per part of it.
    pub quiet_before_pass: Duration,
}

/// The partitions a node holds, shared between its work loop and the rebalance callback
/// (which runs inside the loop's `poll`, on the same thread).
#[derive(Default)]
struct Owned {
    partitions: BTreeMap<i32, Partition>,
    /// Revoked: not worked on; kept only if the next assignment gives them back.
    revoked: BTreeMap<i32, Partition>,
    /// Assigned partitions with nothing of them here, their start decided: their stores
    /// are opened once the assignment is taken, in the same callback.
    opening: BTreeMap<i32, FreshTakeOver>,
    /// A failure inside the rebalance callback, for the loop to return.
    failure: Option<KafkaError>,
    /// How many times the rebalance callback has run: messages read before it last ran
    /// are for an assignment that is over, and are not stored.
    rebalances: u64,
    /// Detector sets loaded ahead, for partitions taken over (`spare_detectors`).
    spares: SpareDetectors,
}

/// A partition assigned to a node that holds nothing of it, between deciding where it
/// starts and opening its store.
struct FreshTakeOver {
    /// When its start was decided: its replay's clock.
    began: Instant,
    /// The finding ids its findings partition holds, and the offset they were read to.
    findings: (HashSet<String>, i64),
    /// Where it is read from (the retention horizon) and its end when assigned.
    start: i64,
    high: i64,
}

struct NodeContext {
    cfg: NodeConfig,
    /// The node's stop: a partition store's long work (building an index a detector
    /// declared) ends early once it is set, as the daemon's does.
    stop: Arc<AtomicBool>,
    owned: Mutex<Owned>,
    /// Reads the findings topic (and a message's timestamp) for the rebalance callback;
    /// made at the first assignment that needs it.
    reader: Mutex<Option<PartitionReader>>,
}

impl ClientContext for NodeContext {}

impl ConsumerContext for NodeContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RespErr, tpl: &mut TopicPartitionList) {
        let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        // Read, not stored: whoever owns a partition next reads it again.
        owned.rebalances += 1;
        match err {
            RespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let began = Instant::now();
                let wanted: BTreeSet<i32> =
                    tpl.elements_for_topic(&self.cfg.topic).iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?wanted, "partitions assigned");
                // An assignment replaces the last one whole (the eager protocol revokes
                // first); anything still held goes through the same checks as a revoked one.
                for (n, p) in std::mem::take(&mut owned.partitions) {
                    owned.revoked.insert(n, p);
                }
                if let Err(e) = self.drop_others(&mut owned, &wanted) {
                    owned.failure.get_or_insert(e);
                }
                // One reader of partitions by hand, kept from one assignment to the next.
                let mut kept_reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
                if kept_reader.is_none() && !wanted.is_empty() {
                    match PartitionReader::new(&self.cfg.kafka) {
                        Ok(r) => *kept_reader = Some(r),
                        Err(e) => {
                            owned.failure.get_or_insert(e);
                        }
                    }
                }
                let reader = kept_reader.as_ref().filter(|_| !wanted.is_empty());
                // The findings partitions of all of them, read together; one that cannot
                // be is read again on its own as it is opened (and fails there, if it must).
                let mut findings = reader
                    .map(|reader| {
                        let from: Vec<(i32, i64)> = wanted
                            .iter()
                            .map(|n| (*n, owned.revoked.get(n).map_or(0, |p| p.findings_read_to)))
                            .collect();
                        reader.finding_ids_of(&self.cfg.findings_topic, &from).unwrap_or_else(|e| {
                            tracing::debug!(error = %Chain(&e), "the findings partitions are read one by one");
                            Default::default()
                        })
                    })
                    .unwrap_or_default();
                for &n in &wanted {
                    let read = findings.remove(&n);
                    // After one partition failed, the work loop rejoins the group and all
                    // this is done again: the others are not read (each read may wait).
                    let reader = reader.filter(|_| owned.failure.is_none());
                    let start =
                        reader.and_then(|reader| match self.open_assigned(consumer, reader, &mut owned, n, read) {
                            Ok(start) => Some(start),
                            Err(e) => {
                                // The work loop returns the failure: the node leaves the group
                                // and rejoins, and is assigned the partition afresh.
                                tracing::error!(partition = n, error = %Chain(&e), "cannot take the partition over");
                                owned.failure.get_or_insert(e);
                                None
                            }
                        });
                    let start = start.unwrap_or(Offset::Beginning);
                    if let Err(e) = tpl.set_partition_offset(&self.cfg.topic, n, start) {
                        owned.failure.get_or_insert(KafkaError::kafka("cannot set a start offset")(e));
                    }
                }
                if let Some(reader) = reader {
                    reader.release();
                }
                drop(kept_reader);
                let opened = began.elapsed();
                if let Err(e) = consumer.assign(tpl) {
                    owned.failure.get_or_insert(KafkaError::kafka("cannot take the assignment")(e));
                }
                let assigned = began.elapsed();
                // The stores of the partitions new to this node are opened, and the
                // detectors of every partition taken over loaded, now that the assignment
                // is taken: librdkafka's threads fetch the partitions meanwhile (a replay's
                // first messages took 5–45 ms to arrive after `assign`; opening a store took
                // 0.4–13 ms, loading four detectors 4–11 ms a partition without a set loaded
                // ahead), and nothing is stored before this callback returns.
                self.open_planned_all(&mut owned);
                let Owned { partitions, spares, failure, .. } = &mut *owned;
                for p in partitions.values_mut().filter(|p| p.detectors_due) {
                    if !p.plugins.looked() {
                        // Nothing loaded for it yet: a set loaded ahead, if one is ready.
                        if let Some(spare) = spares.take() {
                            tracing::info!(
                                partition = p.partition,
                                "partition taken over with its detectors loaded ahead"
                            );
                            p.plugins = spare.set;
                            p.plugins_home = Some(spare.home);
                        }
                    }
                    if let Err(e) = load_detectors(p) {
                        if e.is_interrupted() {
                            tracing::info!(
                                partition = p.partition,
                                "stopping: the detectors' index build is left for the next start"
                            );
                        } else {
                            tracing::error!(partition = p.partition, error = %Chain(&e), "cannot load the partition's detectors");
                        }
                        failure.get_or_insert(e);
                        break;
                    }
                }
                tracing::debug!(?opened, ?assigned, took = ?began.elapsed(), "assignment taken");
            }
            RespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = tpl.elements_for_topic(&self.cfg.topic).iter().map(|e| e.partition()).collect();
                let lost = consumer.assignment_lost();
                tracing::info!(partitions = ?revoked, lost, "partitions revoked");
                for n in revoked {
                    if let Some(p) = owned.partitions.remove(&n) {
                        owned.revoked.insert(n, p);
                    }
                }
                if let Err(e) = consumer.unassign() {
                    owned.failure.get_or_insert(KafkaError::kafka("cannot give the partitions back")(e));
                }
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error; giving the partitions back");
                let all: Vec<i32> = owned.partitions.keys().copied().collect();
                for n in all {
                    if let Some(p) = owned.partitions.remove(&n) {
                        owned.revoked.insert(n, p);
                    }
                }
                let _ = consumer.unassign();
            }
        }
    }
}

impl NodeContext {
    /// Drops the partitions (and folders) this node holds that are not in `wanted`.
    fn drop_others(&self, owned: &mut Owned, wanted: &BTreeSet<i32>) -> Result<(), KafkaError> {
        let gone: Vec<i32> = owned.revoked.keys().filter(|n| !wanted.contains(n)).copied().collect();
        for n in gone {
            if let Some(p) = owned.revoked.remove(&n) {
                tracing::info!(partition = n, "partition moved to another node; its rows are dropped here");
                p.drop_files()?;
            }
        }
        // Folders left by an earlier run of this node for partitions it no longer owns,
        // and what a removal cut short by a crash left aside.
        let root = self.cfg.data.join("partitions");
        remove_interrupted(&root)?;
        let Ok(entries) = std::fs::read_dir(&root) else { return Ok(()) };
        let prefix = format!("{}-", self.cfg.topic);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix(&prefix).and_then(|n| n.parse::<i32>().ok()) else { continue };
            if wanted.contains(&n) || owned.partitions.contains_key(&n) {
                continue;
            }
            let path = partition_dir(&self.cfg.data, &self.cfg.topic, n);
            tracing::info!(partition = n, dir = %path.display(), "removing the rows of a partition owned before");
            remove_partition_dir(&path)?;
        }
        Ok(())
    }

    /// Makes assigned partition `n` an owned one; returns where to start reading it.
    fn open_assigned(
        &self,
        consumer: &BaseConsumer<Self>,
        reader: &PartitionReader,
        owned: &mut Owned,
        n: i32,
        findings: Option<(HashSet<String>, i64)>,
    ) -> Result<Offset, KafkaError> {
        let Some(mut p) = owned.revoked.remove(&n) else {
            let dir = partition_dir(&self.cfg.data, &self.cfg.topic, n);
            // Only a folder known to be absent: one that cannot be looked at is an error,
            // never taken for a partition with nothing stored.
            let here = dir.try_exists().map_err(|source| KafkaError::Io { what: "look for", path: dir, source })?;
            if !here {
                // Nothing of it here: where to start needs no store, which is opened once
                // the assignment is taken ([`Self::open_planned`]).
                let plan = self.plan_fresh(consumer, reader, n, findings)?;
                let start = plan.start;
                owned.opening.insert(n, plan);
                return Ok(Offset::Offset(start));
            }
            let (p, start) = self.take_over(consumer, reader, n, findings)?;
            owned.partitions.insert(n, p);
            return Ok(start);
        };
        match self.reopen(consumer, reader, &mut p, n, findings) {
            Ok(start) => {
                owned.partitions.insert(n, p);
                Ok(start)
            }
            Err(e) => {
                owned.revoked.insert(n, p);
                Err(e)
            }
        }
    }

    /// Takes back partition `n`, which this node held before; returns where to read on.
    /// Another node may have owned it in between, after a lost assignment or even an
    /// orderly revocation (a member slow to rejoin is assigned partitions in its absence,
    /// and the group moves on without it): what the findings topic gained since this node
    /// last read it is not produced (or written) again.
    fn reopen(
        &self,
        consumer: &BaseConsumer<Self>,
        reader: &PartitionReader,
        p: &mut Partition,
        n: i32,
        findings: Option<(HashSet<String>, i64)>,
    ) -> Result<Offset, KafkaError> {
        let (ids, end) = match findings {
            Some(read) => read,
            None => reader.finding_ids(&self.cfg.findings_topic, n, p.findings_read_to)?,
        };
        // What this node produced before it gave the partition up is among them: passed
        // over as emitted, it is written and produced already.
        let new: Vec<String> = ids.into_iter().filter(|id| !p.emitted.contains(id)).collect();
        if !new.is_empty() {
            tracing::info!(
                partition = n,
                findings = new.len(),
                "partition given back; findings emitted to its findings topic since it was last read are passed over"
            );
        }
        p.emitted_before.extend(new.iter().cloned());
        p.emitted.extend(new);
        p.findings_read_to = end;
        if let Some(stored) = p.stored_offset()? {
            // The topic may have been deleted and created again meanwhile.
            let (low, high) = self.watermarks(consumer, n)?;
            self.check_stored_offset(p, n, stored, low, high)?;
            return Ok(Offset::Offset(stored));
        }
        // Given up before it stored anything: started afresh (the horizon and the
        // partition's end have moved since).
        let (low, high) = self.watermarks(consumer, n)?;
        Ok(Offset::Offset(self.start_fresh(consumer, reader, p, n, low, high)?))
    }

    /// Refuses a store whose next offset is past the partition's end (the topic was
    /// created again: offsets from 0 would be taken as stored already and skipped), and
    /// says so when retention deleted messages before they were read.
    fn check_stored_offset(&self, p: &Partition, n: i32, stored: i64, low: i64, high: i64) -> Result<(), KafkaError> {
        if stored > high {
            return Err(KafkaError::PastTheEnd {
                topic: self.cfg.topic.clone(),
                partition: n,
                end: high,
                stored,
                dir: p.dir.clone(),
            });
        }
        if stored < low {
            tracing::warn!(
                partition = n,
                stored,
                first_kept = low,
                "messages after this node's last one were deleted by the topic's retention before it read them"
            );
        }
        Ok(())
    }

    /// Opens a newly assigned partition: its store, the ids already in the findings
    /// topic (`findings`, if read already, with where they were read to), its end (the
    /// replay's target) and where to start reading.
    fn take_over(
        &self,
        consumer: &BaseConsumer<Self>,
        reader: &PartitionReader,
        n: i32,
        findings: Option<(HashSet<String>, i64)>,
    ) -> Result<(Partition, Offset), KafkaError> {
        let cfg = &self.cfg;
        let began = Instant::now();
        let mut p = Partition::open(&cfg.data, &cfg.topic, n, &cfg.plugins)?;
        p.store.interrupt_on(self.stop.clone());
        // A crash while this partition's findings were being written (this node's last
        // run) can leave its line torn at the end of the JSONL, and a store recognises only
        // its own torn line: cut now, before the other partitions opened with it write.
        crate::findings::cut_torn_tail(&p.store, &cfg.findings)?;
        let opened = began.elapsed();
        let findings = match findings {
            Some(read) => read,
            None => reader.finding_ids(&cfg.findings_topic, n, 0)?,
        };
        self.prepare(&mut p, findings);
        let findings_read = began.elapsed();
        let (low, high) = self.watermarks(consumer, n)?;
        if let Some(stored) = p.next_offset {
            self.check_stored_offset(&p, n, stored, low, high)?;
        }
        let start = match p.next_offset {
            Some(o) => {
                p.replay_target = high;
                if o >= high {
                    p.replay_done = Some(Instant::now());
                }
                o
            }
            None => self.start_fresh(consumer, reader, &mut p, n, low, high)?,
        };
        tracing::info!(partition = n, start, end = high, findings_in_topic = p.emitted.len(), "partition taken over");
        // Where a take-over's time goes (a failover's replay counts it).
        tracing::debug!(partition = n, ?opened, ?findings_read, took = ?began.elapsed(), "take-over");
        Ok((p, Offset::Offset(start)))
    }

    /// What a partition taken over gets before its start is set: its retention, the file
    /// feed, the finding ids its findings partition holds (`findings`, with where they
    /// were read to), and its detectors due (loaded once the assignment is taken,
    /// [`load_detectors`]).
    fn prepare(&self, p: &mut Partition, findings: (HashSet<String>, i64)) {
        let cfg = &self.cfg;
        p.store.set_retention(cfg.retention);
        if let Some(logs) = &cfg.logs {
            let opts = IngestOptions { only_tables: Some(vec!["FileProfile".to_string()]), ..cfg.ingest.clone() };
            p.tailer = Some(Tailer::new(logs, opts));
        }
        (p.emitted, p.findings_read_to) = findings;
        p.emitted_before = p.emitted.clone();
        p.detectors_due = true;
    }

    /// Decides where partition `n`, of which this node holds nothing, starts: the
    /// retention horizon (no store is needed for that). Its replay's clock starts once
    /// that is decided.
    fn plan_fresh(
        &self,
        consumer: &BaseConsumer<Self>,
        reader: &PartitionReader,
        n: i32,
        findings: Option<(HashSet<String>, i64)>,
    ) -> Result<FreshTakeOver, KafkaError> {
        let findings = match findings {
            Some(read) => read,
            None => reader.finding_ids(&self.cfg.findings_topic, n, 0)?,
        };
        let (low, high) = self.watermarks(consumer, n)?;
        let start = self.horizon_offset(consumer, reader, n, low, high)?;
        // The replay's clock starts where `start_fresh` starts it on the other paths.
        Ok(FreshTakeOver { began: Instant::now(), findings, start, high })
    }

    /// Opens the partitions planned by [`Self::plan_fresh`]; a failure is kept for the work
    /// loop to return (the node leaves the group and rejoins).
    fn open_planned_all(&self, owned: &mut Owned) {
        for (n, plan) in std::mem::take(&mut owned.opening) {
            match self.open_planned(n, plan) {
                Ok(p) => {
                    owned.partitions.insert(n, p);
                }
                Err(e) => {
                    tracing::error!(partition = n, error = %Chain(&e), "cannot take the partition over");
                    owned.failure.get_or_insert(e);
                }
            }
        }
    }

    /// Opens the store of a partition planned by [`Self::plan_fresh`], started where the
    /// plan says; its detectors are due.
    fn open_planned(&self, n: i32, plan: FreshTakeOver) -> Result<Partition, KafkaError> {
        let cfg = &self.cfg;
        let opening = Instant::now();
        let mut p = Partition::open(&cfg.data, &cfg.topic, n, &cfg.plugins)?;
        p.store.interrupt_on(self.stop.clone());
        let opened = opening.elapsed();
        if let Some(stored) = p.next_offset {
            // Planned as new, but its store holds rows (its folder appeared meanwhile):
            // never read from the horizon over them. The node rejoins, and takes it over
            // from the offset stored with them.
            return Err(KafkaError::Io {
                what: "take over as a partition with nothing stored",
                path: p.dir.clone(),
                source: std::io::Error::other(format!("its store holds rows up to offset {stored}")),
            });
        }
        self.prepare(&mut p, plan.findings);
        p.next_offset = Some(plan.start);
        p.replay_target = plan.high;
        p.replay_started = plan.began;
        p.replay_done = (plan.start >= plan.high).then(Instant::now);
        p.replay_detected = false;
        tracing::info!(
            partition = n,
            start = plan.start,
            end = plan.high,
            findings_in_topic = p.emitted.len(),
            "partition taken over"
        );
        tracing::debug!(partition = n, ?opened, "take-over of a partition new here");
        Ok(p)
    }

    /// Partition `n`'s first kept offset and its end.
    fn watermarks(&self, consumer: &BaseConsumer<Self>, n: i32) -> Result<(i64, i64), KafkaError> {
        consumer.fetch_watermarks(&self.cfg.topic, n, CALL_TIMEOUT).map_err(KafkaError::kafka(format!(
            "cannot read the end of {} partition {n} (does the topic exist, with this partition?)",
            self.cfg.topic
        )))
    }

    /// Starts partition `n`, with nothing stored, at the retention horizon: that offset is
    /// its next one at once (lag, `/status` and the group's offsets follow it before a
    /// message arrives), and it is replayed up to `high`.
    fn start_fresh(
        &self,
        consumer: &BaseConsumer<Self>,
        reader: &PartitionReader,
        p: &mut Partition,
        n: i32,
        low: i64,
        high: i64,
    ) -> Result<i64, KafkaError> {
        let start = self.horizon_offset(consumer, reader, n, low, high)?;
        p.next_offset = Some(start);
        p.replay_target = high;
        p.replay_started = Instant::now();
        p.replay_done = (start >= high).then(Instant::now);
        p.replay_detected = false;
        Ok(start)
    }

    /// The first offset within retention, given the partition's first kept offset `low`
    /// and its end `high` as read before asking (a message produced since is within
    /// retention, and must not be skipped).
    ///
    /// Kafka looks up by a message's own time (when `split` produced it), the store keeps a
    /// row by its event time, which may lie ahead of that (a device whose clock runs fast):
    /// such a row is still kept after its message has left `now − retention`. So the
    /// replay starts at `offsetsForTimes(now − retention − the store's tolerance for rows
    /// ahead of the clock)`; rows read before the horizon are counted expired, not stored.
    fn horizon_offset(
        &self,
        consumer: &BaseConsumer<Self>,
        reader: &PartitionReader,
        n: i32,
        low: i64,
        high: i64,
    ) -> Result<i64, KafkaError> {
        let Some(retention) = self.cfg.retention else { return Ok(low) };
        let now = crate::clock::Clock::new(self.cfg.now.or(self.cfg.ingest.now)).now();
        let ahead = crate::store::generations::Generations::ahead_limit(Some(0), Some(retention)).unwrap_or(0);
        let horizon_ms = (now - retention - ahead).max(0) / (TICKS_PER_SEC / 1000);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.cfg.topic, n, Offset::Offset(horizon_ms))
            .map_err(KafkaError::kafka("cannot ask for the horizon's offset"))?;
        let found = consumer
            .offsets_for_times(tpl, CALL_TIMEOUT)
            .map_err(KafkaError::kafka(format!("cannot ask {} for the offset of the horizon", self.cfg.topic)))?;
        let answer = found.find_partition(&self.cfg.topic, n).map(|e| e.offset());
        if answer == Some(Offset::End) && high > low {
            // "No message at or after the horizon" — or a broker that cannot look up by
            // time and says the same (librdkafka's mock cluster does, for every time).
            // Starting at the end on its word could skip every retained row: the last
            // message's own timestamp decides.
            let last = reader.timestamp_at(&self.cfg.topic, n, high - 1)?;
            if last.is_none_or(|t| t >= horizon_ms) {
                tracing::warn!(
                    partition = n,
                    last_message_ms = ?last,
                    horizon_ms,
                    "the broker found no message after the retention horizon, but the last one is not older: reading from the first kept offset"
                );
                return Ok(low);
            }
        }
        Ok(horizon_start(answer, low, high))
    }
}

/// Loads a partition's detectors before it stores anything: their indexes are then kept
/// as the backlog is stored, instead of built at the first pass by reading it back (a
/// replay's first pass spent 10–30 ms a partition building them).
fn load_detectors(p: &mut Partition) -> Result<(), KafkaError> {
    p.detectors_due = false;
    // Declared whether or not the set changed: one loaded ahead (`spare_detectors`) finds
    // the folder as it was, and has never declared its indexes in this store (declaring
    // those a store has is a look-up).
    p.plugins.refresh()?;
    crate::detect::declare_indexes(&mut p.store, &p.plugins.plugins)?;
    Ok(())
}

/// Where a partition with nothing stored starts, from the broker's answer to
/// `offsetsForTimes(horizon)`: that offset; the partition's end `high` (as read before
/// asking) when the answer is the end (no message at or after the horizon: all of them
/// are older than retention keeps, and replaying them would store nothing); its first
/// kept offset `low` when there is no answer.
fn horizon_start(answer: Option<Offset>, low: i64, high: i64) -> i64 {
    match answer {
        Some(Offset::Offset(o)) if o >= 0 => o.max(low),
        Some(Offset::End) => high,
        _ => low,
    }
}

/// What the endpoint shows: refreshed by the work loop after every round.
#[derive(Default)]
struct NodeView {
    readers: Vec<(PathBuf, StoreReader)>,
    partitions: Vec<PartitionStatus>,
    /// Detector sets loaded ahead, ready for partitions taken over.
    spare_sets: usize,
}

struct NodeObserve {
    cfg: NodeConfig,
    view: Mutex<NodeView>,
}

impl Observe for NodeObserve {
    fn counters(&self) -> Option<Counters> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = Counters::default();
        for (_, r) in &view.readers {
            add_counters(&mut total, &r.counters().ok()?);
        }
        Some(total)
    }

    fn status(&self) -> Result<Status, (u16, String)> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let mut status = Status::empty(&self.cfg.data);
        for (dir, r) in &view.readers {
            let s = crate::status::status_of(r, dir).map_err(|e| (500, format!("status failed: {}\n", Chain(&e))))?;
            status.add(s);
        }
        status.kafka = Some(KafkaStatus {
            topic: self.cfg.topic.clone(),
            group: self.cfg.group.clone(),
            partitions: view.partitions.clone(),
        });
        Ok(status)
    }

    fn kafka(&self) -> Option<KafkaStatus> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        Some(KafkaStatus {
            topic: self.cfg.topic.clone(),
            group: self.cfg.group.clone(),
            partitions: view.partitions.clone(),
        })
    }

    fn extra_metrics(&self) -> String {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let gauges: [Gauge; 5] = [
            ("lookout_kafka_partition_lag", "Messages of an owned partition not yet stored.", |p| p.lag),
            ("lookout_kafka_partition_next_offset", "The next offset to store, committed with the rows.", |p| {
                p.next_offset.unwrap_or(0)
            }),
            ("lookout_kafka_partition_high_watermark", "The partition's end as last seen.", |p| p.high_watermark),
            ("lookout_kafka_partition_replaying", "1 while catching up with the partition's end at assignment.", |p| {
                i64::from(p.replaying)
            }),
            ("lookout_kafka_partition_rows_stored", "Rows stored since the partition was assigned.", |p| {
                p.rows_stored as i64
            }),
        ];
        for (name, help, value) in gauges {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for p in &view.partitions {
                out.push_str(&format!(
                    "{name}{{topic=\"{}\",partition=\"{}\"}} {}\n",
                    self.cfg.topic,
                    p.partition,
                    value(p)
                ));
            }
        }
        let name = "lookout_kafka_spare_detector_sets";
        out.push_str(&format!(
            "# HELP {name} Detector sets loaded ahead, ready for partitions taken over.\n# TYPE {name} gauge\n{name} {}\n",
            view.spare_sets
        ));
        out
    }
}

/// A per-partition gauge: its name, its help text and its value.
type Gauge = (&'static str, &'static str, fn(&PartitionStatus) -> i64);

fn add_counters(total: &mut Counters, c: &Counters) {
    for (t, n) in &c.rows {
        *total.rows.entry(t.clone()).or_insert(0) += n;
    }
    total.duplicates += c.duplicates;
    for (k, n) in &c.rejected {
        *total.rejected.entry(k.clone()).or_insert(0) += n;
    }
    total.expired += c.expired;
    total.removed += c.removed;
}

/// Runs the node until `stop` is set. A failure of the work loop (a broker unreachable
/// for longer than librdkafka retries, a full disk) leaves the group, closes every
/// store and starts again after a back-off: everything stored is kept, and each
/// partition continues at the offset committed with its rows.
pub fn run_node(mut cfg: NodeConfig, stop: Arc<AtomicBool>) -> Result<(), KafkaError> {
    std::fs::create_dir_all(&cfg.data).map_err(|source| KafkaError::Io {
        what: "create",
        path: cfg.data.clone(),
        source,
    })?;
    cfg.retention = super::node_retention::resolve(&cfg.data, cfg.retention_given, cfg.retention)?;
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    let observe = Arc::new(NodeObserve { cfg: cfg.clone(), view: Mutex::new(NodeView::default()) });
    let endpoint = Endpoint::start_with(&cfg.listen, &cfg.data, observe.clone(), metrics.clone())?;
    // Names a detector whose call runs long: one stuck in its own code holds up the work
    // loop with nothing else to say which.
    let _call_watch = crate::plugin::running::watch(crate::plugin::running::WatchTimes::default())
        .map_err(|e| tracing::warn!(error = %e, "cannot start the watch over detector calls; carrying on without it"))
        .ok();
    let addr_file = crate::daemon::http::addr_file(&cfg.data);
    std::fs::write(&addr_file, endpoint.addr.to_string()).map_err(|source| KafkaError::Io {
        what: "write",
        path: addr_file.clone(),
        source,
    })?;
    let result = serve(&cfg, &stop, &observe, &metrics, &endpoint);
    // Also after a failure at the start: no address of a node that is gone is left behind.
    let _ = std::fs::remove_file(&addr_file);
    endpoint.stop();
    result
}

/// The node's checks at the start, then its work loop, restarted after a failure, until
/// `stop`.
fn serve(
    cfg: &NodeConfig,
    stop: &Arc<AtomicBool>,
    observe: &NodeObserve,
    metrics: &Mutex<Metrics>,
    endpoint: &Endpoint,
) -> Result<(), KafkaError> {
    check_findings_topic(cfg)?;
    // Before any partition writes: a line the last run left torn may be of a partition
    // that another node owns now.
    super::partition::cut_torn_findings_line(&cfg.data, &cfg.findings)?;
    // Recorded once the start is sure to go on: a mistaken flag on a start that fails
    // does not become the next start's retention.
    super::node_retention::record(&cfg.data, cfg.retention)?;
    tracing::info!(
        topic = %cfg.topic,
        group = %cfg.group,
        listen = %endpoint.addr,
        retention = %crate::daemon::retention_text(cfg.retention),
        "lookout node running"
    );
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let result = loop {
        let started = Instant::now();
        match work(cfg, stop, observe, metrics) {
            Ok(()) => break Ok(()),
            Err(e @ KafkaError::StoppedWithUnwritten { .. }) => break Err(e),
            Err(e) => {
                let wait = backoff.after_failure(started.elapsed());
                tracing::error!(error = %Chain(&e), retry_in = ?wait, "node work loop failed; rejoining the group");
                metrics.lock().unwrap_or_else(|p| p.into_inner()).restarts += 1;
                let mut view = observe.view.lock().unwrap_or_else(|p| p.into_inner());
                // Out of the group until it rejoins: nothing owned, nothing to report.
                view.readers.clear();
                view.partitions.clear();
                view.spare_sets = 0;
                drop(view);
                let until = Instant::now() + wait;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if stop.load(Ordering::Relaxed) {
                    break Err(e);
                }
            }
        }
    };
    result
}

/// The findings topic is partitioned as the input is (the same key, the same partition
/// count): a partition's findings are where its next owner reads them at take-over. One
/// with another count is a set-up error, said once at the start, not a take-over failing
/// again and again. (Topics that cannot be looked up yet are left to the work loop, which
/// retries.)
fn check_findings_topic(cfg: &NodeConfig) -> Result<(), KafkaError> {
    let producer = producer(&cfg.kafka, Deliveries::default())?;
    let count = |topic: &str| super::partitions_of(producer.client(), topic).ok().filter(|n| *n > 0);
    match (count(&cfg.topic), count(&cfg.findings_topic)) {
        (Some(rows), Some(findings)) if rows > 0 && findings != rows => Err(KafkaError::Topics(format!(
            "the findings topic {} has {findings} partition(s) and {} has {rows}: a node writes a partition's \
             findings to the findings topic's partition of the same number; create {} with {rows} partitions \
             (or name another with --findings-topic)",
            cfg.findings_topic, cfg.topic, cfg.findings_topic
        ))),
        _ => Ok(()),
    }
}

fn consumer(cfg: &NodeConfig, stop: &Arc<AtomicBool>) -> Result<BaseConsumer<NodeContext>, KafkaError> {
    let mut c = cfg.kafka.client(super::GROUP_MEMBER);
    c.set("group.id", &cfg.group);
    // The rebalance callback assigns and unassigns whole assignments (the eager protocol):
    // a cooperative strategy set in [kafka.properties] would leave partitions unread.
    if c.get("partition.assignment.strategy").is_some_and(|s| s.contains("cooperative")) {
        tracing::warn!(
            "partition.assignment.strategy: a node uses range,roundrobin (eager); the cooperative setting is ignored"
        );
    }
    c.set("partition.assignment.strategy", "range,roundrobin");
    let owned = Owned { spares: SpareDetectors::new(&cfg.data, &cfg.plugins), ..Owned::default() };
    let context =
        NodeContext { cfg: cfg.clone(), stop: stop.clone(), owned: Mutex::new(owned), reader: Mutex::new(None) };
    c.create_with_context(context).map_err(|source| KafkaError::Client {
        what: "consumer",
        brokers: cfg.kafka.brokers.clone(),
        source,
    })
}

fn work(
    cfg: &NodeConfig,
    stop: &Arc<AtomicBool>,
    observe: &NodeObserve,
    metrics: &Mutex<Metrics>,
) -> Result<(), KafkaError> {
    let consumer = consumer(cfg, stop)?;
    // The findings reader connects before the first assignment, not inside its callback.
    match PartitionReader::new(&cfg.kafka) {
        Ok(reader) => {
            reader.connect(&cfg.findings_topic);
            *consumer.context().reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
        }
        Err(e) => tracing::debug!(error = %e, "cannot set up the findings reader yet; the first assignment does"),
    }
    let producer = producer(&cfg.kafka, Deliveries::default())?;
    consumer.subscribe(&[&cfg.topic]).map_err(KafkaError::kafka(format!("cannot subscribe to {}", cfg.topic)))?;
    let watermarks = Watermarks::start(&cfg.kafka, &cfg.topic);
    let mut detect_opts = DetectOptions {
        now: cfg.now,
        params: cfg.params.clone(),
        threads: cfg.detect_threads,
        ..DetectOptions::default()
    };
    // A stop ends a pass after the chunk in hand (its cursor stays, the pass is made
    // again at the next start) instead of waiting for every partition's whole pass.
    detect_opts.stop = Some(stop.clone());
    let mut last_rescan = Instant::now() - cfg.rescan;
    let mut pending = Pending::default();
    let mut findings_out = FindingsOut::default();
    let result = (|| -> Result<(), KafkaError> {
        while !stop.load(Ordering::Relaxed) {
            let round_started = Instant::now();
            let first_message = read_messages(cfg, &consumer, &mut pending)?;
            let rescan = last_rescan.elapsed() >= cfg.rescan;
            if rescan {
                last_rescan = Instant::now();
            }
            let mut owned = consumer.context().owned.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = owned.failure.take() {
                return Err(e);
            }
            pending.forget_if_rebalanced(&owned);
            let mut commit = TopicPartitionList::new();
            // Each partition has its own store: what was read is stored side by side, one
            // thread per core; the detectors then run one partition after another.
            let read_took = round_started.elapsed();
            let reports = store_all(cfg, &mut owned, &mut pending)?;
            pending.stored_since_rebalance |= !reports.is_empty();
            let store_took = round_started.elapsed() - read_took;
            // Every partition's pass first, then what they found goes out: a partition's
            // emitting (two fsyncs, a commit and a produce, each waited for) does not hold
            // back the next partition's findings being decided.
            let mut passed = Vec::new();
            // A partition whose pass fails holds back none of the others' findings: they
            // go out, then the failure ends the round (and the work loop starts again).
            let mut failed = None;
            let mut failed_partitions = Vec::new();
            for p in owned.partitions.values_mut() {
                if stop.load(Ordering::Relaxed) {
                    // Stopping: no more passes (nor a detector's init over its state);
                    // what the passed partitions found still goes out below.
                    break;
                }
                match pass_round(cfg, p, &detect_opts, rescan) {
                    Ok(Some(passes)) => passed.push((p.partition, passes)),
                    Ok(None) => {}
                    Err(e) => {
                        failed.get_or_insert(e);
                        failed_partitions.push(p.partition);
                        continue;
                    }
                }
                if let Some(next) = p.next_offset {
                    commit
                        .add_partition_offset(&cfg.topic, p.partition, Offset::Offset(next))
                        .map_err(KafkaError::kafka("cannot list the offsets to commit"))?;
                }
            }
            for (n, passes) in passed {
                let Some(p) = owned.partitions.get_mut(&n) else { continue };
                let stored = reports.get(&n).is_some_and(|r| r.changed());
                emit_round(cfg, p, &producer, passes, metrics, round_started, stored, &consumer, &mut findings_out)?;
            }
            // A failing partition's own detectors that finished committed their findings:
            // they go out too, or a failure that persists (one detector's damaged state)
            // would hold them back for good.
            for n in failed_partitions {
                let Some(p) = owned.partitions.get_mut(&n) else { continue };
                if crate::disk::low(&p.dir) {
                    // Emitting commits a cursor: not on a nearly full disk (the failure
                    // may be that).
                    continue;
                }
                if let Err(e) = emit_round(
                    cfg,
                    p,
                    &producer,
                    Vec::new(),
                    metrics,
                    round_started,
                    false,
                    &consumer,
                    &mut findings_out,
                ) {
                    tracing::warn!(partition = n, error = %Chain(&e), "cannot emit the findings of a partition whose pass failed");
                }
            }
            // (While the JSONL fails, every partition with findings waiting has a round to
            // emit them, as they are not in the topic either: that is where it is tried
            // again once the wait is over.)
            if findings_out.failing() {
                // Each store's count, summed (a write sets the gauge to its own store's).
                let unwritten = owned
                    .partitions
                    .values()
                    .map(|p| crate::findings::unwritten(&p.store, &cfg.findings).unwrap_or(0))
                    .sum();
                metrics.lock().unwrap_or_else(|p| p.into_inner()).findings_unwritten = unwritten;
            }
            if let Some(e) = failed {
                return Err(e);
            }
            let detect_took = round_started.elapsed() - read_took - store_took;
            // While no partition replays and detectors run, a detector set is loaded ahead
            // for the next take-over (one a round: about 5 ms).
            if owned.partitions.values().all(|p| p.replay_detected)
                && owned.partitions.values().any(|p| !p.plugins.plugins.is_empty())
            {
                let want = owned.partitions.len();
                owned.spares.top_up(want);
            }
            update_view(&mut owned, &watermarks, observe);
            // Every owned partition loads the same folder: the most any of them runs.
            let loaded = owned.partitions.values().map(|p| p.plugins.plugins.len() as u64).max().unwrap_or(0);
            drop(owned);
            metrics.lock().unwrap_or_else(|p| p.into_inner()).detectors_loaded = loaded;
            let rows: u64 = reports.values().map(|r| r.total_new()).sum();
            if rows > 0 {
                let first_message = first_message.map(|at| at - round_started);
                tracing::debug!(rows, ?first_message, ?read_took, ?store_took, ?detect_took, round = ?round_started.elapsed(), "round");
            }
            // For lag monitoring only: the store holds the offsets that matter.
            if commit.count() > 0 {
                if let Err(e) = consumer.commit(&commit, CommitMode::Async) {
                    tracing::debug!(error = %e, "cannot commit the group's offsets now; they follow the store");
                }
            }
            {
                let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
                m.polls += 1;
                for r in reports.values() {
                    m.observe_stored(&r.new_rows);
                }
            }
        }
        Ok(())
    })();
    // An index build a stop cut short is done again at the next start: the stop is a
    // clean one (the findings' last try and count below still apply).
    let result = match result {
        Err(e) if e.is_interrupted() && stop.load(Ordering::Relaxed) => {
            tracing::info!(reason = %Chain(&e), "stopping: long work on a partition store was left for the next start");
            Ok(())
        }
        other => other,
    };
    let mut owned = consumer.context().owned.lock().unwrap_or_else(|p| p.into_inner());
    if result.is_ok() && findings_out.failing() {
        // A stop's last try at the JSONL, whatever the wait (the file may be back since
        // the last one): as any round emits, so what it writes goes to the topic too.
        findings_out.retry_now();
        let now = Instant::now();
        for p in owned.partitions.values_mut() {
            if let Err(e) = emit_round(cfg, p, &producer, Vec::new(), metrics, now, false, &consumer, &mut findings_out)
            {
                tracing::warn!(partition = p.partition, error = %Chain(&e), "cannot emit the partition's findings");
            }
        }
    }
    // Leaving: everything stored is committed with its offsets; close the stores.
    for p in owned.partitions.values().chain(owned.revoked.values()) {
        if let Err(e) = p.store.flush_and_save_key_filter() {
            tracing::warn!(partition = p.partition, error = %Chain(&e), "cannot flush the partition's store");
        }
    }
    // A stop with findings the JSONL could not be given does not end as a clean one (as
    // `lookout run`'s): they are kept, and go out at the next start.
    let result = match result {
        Ok(()) if findings_out.failing() => {
            let count = owned
                .partitions
                .values()
                .map(|p| crate::findings::unwritten(&p.store, &cfg.findings).unwrap_or(0))
                .sum();
            if count > 0 {
                Err(KafkaError::StoppedWithUnwritten { count, file: cfg.findings.clone() })
            } else {
                Ok(())
            }
        }
        other => other,
    };
    owned.partitions.clear();
    owned.revoked.clear();
    owned.opening.clear();
    drop(owned);
    result
}

/// Messages read and not yet stored, by partition, borrowed from librdkafka's fetch
/// buffers until they are (copying each payload out was a twentieth of a replay, most of
/// it page faults on fresh memory), with the count of rebalances they were read after.
#[derive(Default)]
struct Pending<'c> {
    rebalances: u64,
    /// Whether a round has been stored since the last rebalance (an assignment's first
    /// round reads for a shorter window).
    stored_since_rebalance: bool,
    messages: BTreeMap<i32, Vec<(i64, BorrowedMessage<'c>)>>,
    consumer_errors: RepeatedError,
}

/// Says a consumer error at once, and the same one again at most once a minute with how
/// many times it came meanwhile: one that does not clear (a topic deleted, access taken
/// away) comes back at every poll, and would fill the log.
#[derive(Default)]
struct RepeatedError {
    last: Option<(String, Instant)>,
    /// Times the last error said came since, unsaid.
    repeated: u64,
}

/// What [`RepeatedError::say`] says to log.
#[derive(Debug, PartialEq, Eq)]
struct Said {
    /// The error came this many times unsaid since it was last said.
    repeated: u64,
    /// Another error that came unsaid since it was last said, and how many times.
    before: Option<(String, u64)>,
}

impl RepeatedError {
    /// Whether to say `error` now (`None`: it was said less than a minute ago).
    fn say(&mut self, error: &str, now: Instant) -> Option<Said> {
        match &self.last {
            Some((said, at)) if said == error => {
                if now.duration_since(*at) < Duration::from_secs(60) {
                    self.repeated += 1;
                    return None;
                }
                let repeated = std::mem::take(&mut self.repeated);
                self.last = Some((error.to_string(), now));
                Some(Said { repeated, before: None })
            }
            _ => {
                let repeated = std::mem::take(&mut self.repeated);
                let before = self.last.take().filter(|_| repeated > 0).map(|(said, _)| (said, repeated));
                self.last = Some((error.to_string(), now));
                Some(Said { repeated: 0, before })
            }
        }
    }
}

impl Pending<'_> {
    /// Drops what was read before the rebalance callback last ran: read, not stored, for
    /// an assignment that is over (whoever owns each partition now reads it again).
    fn forget_if_rebalanced(&mut self, owned: &Owned) {
        if owned.rebalances != self.rebalances {
            self.messages.clear();
            self.rebalances = owned.rebalances;
            self.stored_since_rebalance = false;
        }
    }

    /// How long a round reads after its first message. The first round of an assignment
    /// (partitions taken over, read from their start) stores what the first fetches
    /// brought at once: librdkafka fetches the rest meanwhile, and waiting the whole window
    /// left the storing idle for it while the fetch threads had a core of their own.
    fn window(&self) -> Duration {
        if self.stored_since_rebalance {
            ROUND_WINDOW
        } else {
            FIRST_ROUND_WINDOW
        }
    }
}

/// How long a round reads after its first message (see [`read_messages`]).
const ROUND_WINDOW: Duration = Duration::from_millis(50);
/// The same for the first round of an assignment ([`Pending::window`]).
const FIRST_ROUND_WINDOW: Duration = Duration::from_millis(5);

/// Reads messages for up to 250 ms, and for at most 50 ms from the first one (5 ms in an
/// assignment's first round; or a batch's messages or bytes, or until none comes for
/// 5 ms — none at all while a partition replays), into `pending`; returns when the first
/// one came. The 50 ms:
/// librdkafka goes on fetching while the round is stored, so a round that waited for a
/// whole batch to arrive (a partition just taken over, read from its start) would leave
/// the storing idle while it waited.
fn read_messages<'c>(
    cfg: &NodeConfig,
    consumer: &'c BaseConsumer<NodeContext>,
    pending: &mut Pending<'c>,
) -> Result<Option<Instant>, KafkaError> {
    let mut deadline = Instant::now() + Duration::from_millis(250);
    let mut first = None;
    let mut taken = 0;
    let mut bytes = 0;
    let mut catching_up = false;
    while taken < cfg.batch_messages && bytes < cfg.batch_bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // The rebalance callback runs inside poll and takes the `owned` lock: not held here.
        // Once something is read, a short wait: a quiet moment ends the read (the rows go
        // to the store and the detectors now), a steady flow fills the batch.
        // A partition catching up with its end (a replay) does not wait for a quiet moment:
        // what librdkafka has fetched so far is stored while it fetches the rest, instead
        // of the storing core idling 5 ms at the end of each round.
        let wait = match taken {
            0 => left,
            _ if catching_up => Duration::ZERO,
            _ => left.min(Duration::from_millis(5)),
        };
        let message = match consumer.poll(wait) {
            None if taken > 0 => break,
            None => continue,
            Some(Err(e)) => {
                let text = e.to_string();
                if let Some(said) = pending.consumer_errors.say(&text, Instant::now()) {
                    if let Some((before, repeated)) = said.before {
                        tracing::warn!(error = %before, topic = %cfg.topic, repeated, "consumer error, again since said");
                    }
                    tracing::warn!(error = %text, topic = %cfg.topic, repeated = said.repeated, "consumer error; carrying on");
                }
                continue;
            }
            Some(Ok(m)) => m,
        };
        let mut owned = consumer.context().owned.lock().unwrap_or_else(|p| p.into_inner());
        pending.forget_if_rebalanced(&owned);
        let window = pending.window();
        let Some(p) = owned.partitions.get_mut(&message.partition()) else { continue };
        let expected = p.next_offset.unwrap_or(0);
        let read = pending.messages.entry(p.partition).or_default();
        let last_pending = read.last().map(|(o, _)| *o);
        if message.offset() < expected || last_pending.is_some_and(|o| message.offset() <= o) {
            // Already stored (a fetch from before the assignment's start took effect).
            continue;
        }
        if taken == 0 {
            let now = Instant::now();
            first = Some(now);
            deadline = deadline.min(now + window);
        }
        bytes += message.payload_len();
        catching_up = p.replay_done.is_none();
        p.last_message_at = Instant::now();
        read.push((message.offset(), message));
        taken += 1;
    }
    Ok(first)
}

/// A partition and its messages read ((offset, payload) in offset order), to store.
type StoreWork<'a> = (&'a mut Partition, Vec<(i64, &'a [u8])>);

/// Stores what was read for every partition, side by side: returns each partition's report.
fn store_all(
    cfg: &NodeConfig,
    owned: &mut Owned,
    pending: &mut Pending<'_>,
) -> Result<BTreeMap<i32, IngestReport>, KafkaError> {
    let read = std::mem::take(&mut pending.messages);
    let busy: Vec<StoreWork> = owned
        .partitions
        .values_mut()
        .filter_map(|p| {
            let messages = read.get(&p.partition).filter(|m| !m.is_empty())?;
            Some((p, messages.iter().map(|(o, m)| (*o, m.payload().unwrap_or_default())).collect()))
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(busy.len()).max(1);
    let mut groups: Vec<Vec<StoreWork>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, work) in busy.into_iter().enumerate() {
        groups[i % threads].push(work);
    }
    let store_group = |group: Vec<StoreWork>| {
        group
            .into_iter()
            .map(|(p, messages)| store_round(cfg, p, &messages).map(|r| (p.partition, r)))
            .collect::<Result<Vec<_>, KafkaError>>()
    };
    let panicked = || KafkaError::Io {
        what: "store (a storing thread panicked) for",
        path: cfg.data.clone(),
        source: std::io::Error::other("storing thread panicked"),
    };
    // One group is stored on this thread, the others on threads of their own for the
    // round: this thread's allocator heap and parse layouts (the direct path reads a row
    // against its thread's last layout) stay warm from round to round, where a thread
    // spawned for the round starts with neither. A one-core node spawns none.
    let here = groups.remove(0);
    let results: Vec<Result<Vec<(i32, IngestReport)>, KafkaError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups.into_iter().map(|group| scope.spawn(move || store_group(group))).collect();
        let mut results = vec![std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store_group(here)))
            .unwrap_or_else(|_| Err(panicked()))];
        results.extend(handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(panicked()))));
        results
    });
    let mut out = BTreeMap::new();
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// Stores what was read for one partition, with its offset, and moves its clock.
fn store_round(cfg: &NodeConfig, p: &mut Partition, messages: &[(i64, &[u8])]) -> Result<IngestReport, KafkaError> {
    if p.detectors_due {
        // Nothing is stored before the partition's detectors have declared their indexes.
        load_detectors(p)?;
    }
    let now = crate::clock::Clock::new(cfg.now.or(cfg.ingest.now)).now();
    let ingest_now = crate::clock::Clock::new(cfg.ingest.now).now();
    // Rows that arrive below the horizon are counted, not stored (expired blocks go in
    // `pass_round`, for every partition).
    p.store.advance_clock(now)?;
    let report = p.store_messages(&cfg.ingest, ingest_now, messages)?;
    if report.total_rejected() > 0 {
        tracing::warn!(
            partition = p.partition,
            rejected = report.total_rejected(),
            "bad records kept aside (lookout status --rejects)"
        );
    }
    if p.replay_done.is_none() && p.next_offset.is_some_and(|o| o >= p.replay_target) {
        let took = p.replay_started.elapsed();
        tracing::info!(partition = p.partition, rows = p.stored, seconds = took.as_secs_f64(), "partition replayed");
        p.replay_done = Some(Instant::now());
    }
    Ok(report)
}

/// One round of detection for one partition: reads the file feed and runs the detectors
/// if anything changed (or a wake-up is due). Returns the passes' reports when there are
/// findings to emit ([`emit_round`]): a pass ran, or an earlier one's are still pending.
fn pass_round(
    cfg: &NodeConfig,
    p: &mut Partition,
    detect_opts: &DetectOptions,
    rescan: bool,
) -> Result<Option<Vec<crate::detect::DetectorReport>>, KafkaError> {
    // Every owned partition's horizon follows the clock, rows arriving or not.
    let now = crate::clock::Clock::new(cfg.now.or(cfg.ingest.now)).now();
    p.store.advance_clock(now)?;
    p.store.expire_step(crate::store::retention::BLOCKS_PER_STEP)?;
    if p.replay_done.is_none() && p.next_offset.unwrap_or(0) >= p.replay_target {
        // Nothing to replay (an empty partition, or one taken back at its end).
        p.replay_done = Some(Instant::now());
    }
    if rescan || p.needs_pass {
        // A detector dropped in or changed runs over what is stored, whenever the pass is.
        if p.plugins.refresh()? {
            p.needs_pass = true;
            // Its indexes are kept from now on, not from its first pass: a partition taken
            // over stores its backlog before that pass, and rows stored with the indexes
            // declared are indexed as they arrive instead of read back to build them.
            crate::detect::declare_indexes(&mut p.store, &p.plugins.plugins)?;
        }
        if let Some(tailer) = p.tailer.as_mut() {
            let never = AtomicBool::new(false);
            let fed = tailer.poll(&mut p.store, &never)?;
            p.needs_pass |= fed.changed();
        }
    }
    let eval_now = crate::clock::Clock::new(cfg.now).now();
    let due = crate::detect::next_wake(&p.store, &p.plugins.plugins)?.is_some_and(|at| at <= eval_now);
    let reports = if (p.needs_pass || due) && p.pass_due(cfg.quiet_before_pass) {
        let reports = run_pass(&mut p.store, &mut p.plugins.plugins, detect_opts)?;
        // A pass a stop cut short is not done.
        p.needs_pass = detect_opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
        p.last_pass_at = Some(Instant::now());
        reports
    } else if p.store.outbox_has_from(p.topic_cursor()?)? {
        // Findings of an earlier pass not yet in the topic (a lost assignment then).
        Vec::new()
    } else {
        note_replay_detected(p);
        return Ok(None);
    };
    note_replay_detected(p);
    Ok(Some(reports))
}

/// Writes the partition's new findings to the node's JSONL and produces them to the
/// findings topic, unless the group no longer counts this node as their owner.
#[allow(clippy::too_many_arguments)]
fn emit_round(
    cfg: &NodeConfig,
    p: &mut Partition,
    producer: &BaseProducer<Deliveries>,
    reports: Vec<crate::detect::DetectorReport>,
    metrics: &Mutex<Metrics>,
    round_started: Instant,
    stored: bool,
    consumer: &BaseConsumer<NodeContext>,
    findings_out: &mut FindingsOut,
) -> Result<(), KafkaError> {
    if findings_out.waiting() {
        // The JSONL failed and its wait is not over: nothing goes out (nor is the
        // ownership asked, a commit to the group each time).
        observe_passes(metrics, reports, stored, round_started);
        return Ok(());
    }
    if consumer.assignment_lost() {
        // The group has given this node's partitions to others: the next owner finds,
        // writes and produces these; if they come back here, they go out then.
        return Ok(());
    }
    if !still_owned(cfg, p, consumer)? {
        return Ok(());
    }
    let written = write_jsonl(cfg, p, findings_out, metrics)?;
    // Writing the JSONL (an fsync) is time in which the group can drop this node: once it
    // knows, the findings stay out of the topic (the next owner produces them).
    if consumer.assignment_lost() {
        return Ok(());
    }
    // The topic holds no finding the JSONL does not: what a take-over finds in the topic
    // it passes over in the JSONL too (this node's, after a restart, included). So while
    // the JSONL cannot be written, the findings wait for it, in the store.
    let produced = if findings_out.failing() { 0 } else { produce_new(producer, &cfg.findings_topic, p)? };
    if written > 0 || produced > 0 {
        tracing::info!(partition = p.partition, findings = written, produced, "new findings");
    }
    observe_passes(metrics, reports, stored, round_started);
    Ok(())
}

/// The round's passes of one partition, on `/metrics`.
fn observe_passes(
    metrics: &Mutex<Metrics>,
    reports: Vec<crate::detect::DetectorReport>,
    stored: bool,
    round_started: Instant,
) {
    let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
    for r in reports {
        let labels =
            crate::daemon::metrics::DetectorLabels { detector: r.detector.clone(), version: r.version.clone() };
        m.observe_pass(&labels, r.elapsed, r.rows, r.new_findings, r.error.is_some());
        if stored {
            m.observe_findings(&labels, r.new_findings, round_started.elapsed());
        }
    }
}

/// Writes the partition's new findings to the node's JSONL, unless it failed and the time
/// to try it again has not come: a JSONL that cannot be written (its folder gone, its own
/// disk full) does not cost the node its place in the group, nor hold back its storing.
fn write_jsonl(
    cfg: &NodeConfig,
    p: &mut Partition,
    findings_out: &mut FindingsOut,
    metrics: &Mutex<Metrics>,
) -> Result<u64, KafkaError> {
    // What a previous owner found is in its JSONL and in the topic already.
    let before = &p.emitted_before;
    let path = &cfg.findings;
    let written = findings_out
        .write(
            path,
            metrics,
            &mut p.store,
            |store| {
                flush_outbox_except(store, path, &|json| {
                    serde_json::from_slice::<serde_json::Value>(json)
                        .ok()
                        .and_then(|v| v.get("finding_id").and_then(|id| id.as_str()).map(|id| before.contains(id)))
                        .unwrap_or(false)
                })
            },
            |store| crate::findings::unwritten(store, path).unwrap_or(0),
        )
        .map_err(KafkaError::Store)?;
    p.findings_written += written;
    Ok(written)
}

/// Logs, once per replay (a take-over, or a partition given back before it stored
/// anything), that the replayed rows are stored and the detectors have run over them, with
/// the time since the replay started (a partition given back mid-replay counts its time
/// away): benches/kafka reads the replay's time from this line instead of polling
/// `/status`, which took a share of the node's core.
fn note_replay_detected(p: &mut Partition) {
    if !p.replay_detected && p.replay_done.is_some() && !p.needs_pass {
        p.replay_detected = true;
        let seconds = p.replay_started.elapsed().as_secs_f64();
        tracing::info!(partition = p.partition, rows = p.stored, seconds, "partition replayed and detected");
    }
}

/// Whether this node may emit the partition's pending findings. A node the group dropped
/// without it knowing yet (starved of CPU past the session timeout, say) still sees its
/// assignment as its own, while the next owner reads the findings topic to know what not
/// to emit again: findings produced after that read would go out twice. A synchronous
/// commit of the partition's offset succeeds only for a member of the group's current
/// generation, so it is made before emitting; one that fails holds the findings back
/// (they are emitted on a later round, by this node or the partition's next owner).
fn still_owned(cfg: &NodeConfig, p: &mut Partition, consumer: &BaseConsumer<NodeContext>) -> Result<bool, KafkaError> {
    let (Some(next), true) = (p.next_offset, p.store.outbox_has_from(p.topic_cursor()?)?) else { return Ok(true) };
    crate::failpoint::pause("kafka-before-emit");
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(&cfg.topic, p.partition, Offset::Offset(next))
        .map_err(KafkaError::kafka("cannot list the offset to commit"))?;
    match consumer.commit(&offsets, CommitMode::Sync) {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::info!(partition = p.partition, error = %e, "the group did not take this node's offset; its findings wait for a later round");
            Ok(false)
        }
    }
}

fn update_view(owned: &mut Owned, watermarks: &Watermarks, observe: &NodeObserve) {
    let mut view = observe.view.lock().unwrap_or_else(|p| p.into_inner());
    view.readers = owned.partitions.values().map(|p| (p.dir.clone(), p.store.reader())).collect();
    view.spare_sets = owned.spares.ready();
    watermarks.track(owned.partitions.keys().copied());
    for p in owned.partitions.values_mut() {
        if let Some(high) = watermarks.end(p.partition) {
            p.high_watermark = high;
        }
    }
    view.partitions = owned
        .partitions
        .values()
        .map(|p| {
            let high = p.high_watermark.max(p.replay_target);
            let next = p.next_offset.unwrap_or(0);
            PartitionStatus {
                partition: p.partition,
                next_offset: p.next_offset,
                high_watermark: high,
                lag: (high - next).max(0),
                replaying: p.replaying(),
                rows_stored: p.stored,
                detection_pending: p.needs_pass,
                findings_written: p.findings_written,
            }
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_error_that_repeats_is_said_once_a_minute_with_its_count() {
        let mut e = RepeatedError::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let now = |repeated| Some(Said { repeated, before: None });
        assert_eq!(e.say("gone", t0), now(0));
        assert_eq!(e.say("gone", at(1)), None);
        assert_eq!(e.say("gone", at(2)), None);
        assert_eq!(e.say("gone", at(61)), now(2), "a minute on, with the count");
        assert_eq!(e.say("other", at(62)), now(0), "another error at once");
        assert_eq!(e.say("gone", at(63)), now(0));
        assert_eq!(e.say("gone", at(64)), None);
        assert_eq!(e.say("gone", at(65)), None);
        // Another error: said at once, with the count of the one before it, not its own.
        assert_eq!(e.say("other", at(66)), Some(Said { repeated: 0, before: Some(("gone".into(), 2)) }));
    }
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseRecord, Producer};
    use std::collections::HashSet;

    /// A one-broker mock cluster whose `rows` and `findings` topics have `partitions`
    /// partitions each, and a node's configuration against it with its data in a fresh
    /// folder (kept while the returned `TempDir` lives).
    fn cluster(
        partitions: i32,
    ) -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, tempfile::TempDir, NodeConfig) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("rows", partitions, 1).unwrap();
        cluster.create_topic("findings", partitions, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&cluster.bootstrap_servers(), dir.path());
        (cluster, dir, cfg)
    }

    /// A node's configuration against `brokers`, with its data in `dir`.
    fn config(brokers: &str, dir: &std::path::Path) -> NodeConfig {
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        NodeConfig {
            data: dir.join("data"),
            kafka: KafkaSettings { brokers: brokers.to_string(), properties: Vec::new() },
            topic: "rows".into(),
            group: "nodes".into(),
            findings_topic: "findings".into(),
            plugins,
            findings: dir.join("findings.jsonl"),
            logs: None,
            listen: "127.0.0.1:0".into(),
            params: Vec::new(),
            ingest: IngestOptions::default(),
            now: None,
            retention: None,
            retention_given: false,
            detect_threads: 0,
            rescan: Duration::from_secs(1),
            batch_messages: 100,
            batch_bytes: 16 << 20,
            quiet_before_pass: Duration::ZERO,
        }
    }

    fn emit(producer: &BaseProducer<Deliveries>, ids: &[&str]) {
        for id in ids {
            let json = format!(r#"{{"finding_id":"{id}","device_id":"d"}}"#);
            let record = BaseRecord::to("findings").partition(0).key("d").payload(json.as_bytes());
            super::super::split::send(producer, record).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn an_assignments_first_round_reads_for_the_short_window_and_later_rounds_for_the_long_one() {
        let mut owned = Owned::default();
        let mut pending = Pending::default();
        assert_eq!(pending.window(), FIRST_ROUND_WINDOW);
        pending.stored_since_rebalance = true;
        assert_eq!(pending.window(), ROUND_WINDOW);
        // No rebalance since: still the long window.
        pending.forget_if_rebalanced(&owned);
        assert_eq!(pending.window(), ROUND_WINDOW);
        // A new assignment's first round is short again.
        owned.rebalances += 1;
        pending.forget_if_rebalanced(&owned);
        assert_eq!(pending.window(), FIRST_ROUND_WINDOW);
        pending.stored_since_rebalance = true;
        assert_eq!(pending.window(), ROUND_WINDOW);
    }

    /// The findings partitions of an assignment read together are what each read on its
    /// own gives: every id from each one's own offset on, and where each ends — an empty
    /// partition, one read to its end already, and ones with ids from the start and from
    /// part way.
    #[test]
    fn findings_partitions_read_together_are_each_as_read_alone() {
        let (_cluster, _dir, cfg) = cluster(4);
        let producer = producer(&cfg.kafka, Deliveries::default()).unwrap();
        for (partition, n) in [(0, 5), (1, 3), (3, 40)] {
            for i in 0..n {
                let json = format!(r#"{{"finding_id":"p{partition}-{i}","device_id":"d"}}"#);
                let record = BaseRecord::to("findings").partition(partition).key("d").payload(json.as_bytes());
                super::super::split::send(&producer, record).unwrap();
            }
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let reader = PartitionReader::new(&cfg.kafka).unwrap();
        let from = [(0, 0), (1, 3), (2, 0), (3, 25)];
        let together = reader.finding_ids_of("findings", &from).unwrap();
        for (partition, offset) in from {
            let alone = reader.finding_ids("findings", partition, offset).unwrap();
            assert_eq!(together.get(&partition), Some(&alone), "partition {partition}");
        }
        assert_eq!(together[&0].0.len(), 5);
        assert_eq!(together[&1], (HashSet::new(), 3), "read to its end already");
        assert_eq!(together[&2], (HashSet::new(), 0), "empty");
        assert_eq!((together[&3].0.len(), together[&3].1), (15, 40));
        assert!(together[&3].0.contains("p3-25") && !together[&3].0.contains("p3-24"));
    }

    /// Messages into "rows" partition 0, each with the given timestamp (ms).
    fn rows_at(producer: &BaseProducer<Deliveries>, timestamps: &[i64]) {
        for &t in timestamps {
            let record = BaseRecord::to("rows").partition(0).key("d").payload(&b"{}"[..]).timestamp(t);
            super::super::split::send(producer, record).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// With a retention, a partition with nothing stored starts at the horizon. The mock
    /// broker answers "none after it" (-1) to every time, as a broker that cannot look up
    /// by time might: the node starts at the end only when the last message is older than
    /// the horizon, and otherwise reads everything kept rather than skip a row.
    #[test]
    fn a_partition_starts_at_its_end_only_when_its_last_message_is_older_than_the_horizon() {
        let day_ms = 86_400_000;
        let now_ms = 1_746_662_400_000; // 2025-05-08T00:00:00Z
        let start_with = |timestamps: &[i64]| {
            let (_cluster, _dir, mut cfg) = cluster(1);
            cfg.now = Some(now_ms * (TICKS_PER_SEC / 1000));
            cfg.retention = Some(7 * day_ms * (TICKS_PER_SEC / 1000));
            let producer = producer(&cfg.kafka, Deliveries::default()).unwrap();
            rows_at(&producer, timestamps);
            let consumer = consumer(&cfg, &Arc::new(AtomicBool::new(false))).unwrap();
            let reader = PartitionReader::new(&cfg.kafka).unwrap();
            let mut owned = Owned::default();
            let start = consumer.context().open_assigned(&consumer, &reader, &mut owned, 0, None).unwrap();
            consumer.context().open_planned_all(&mut owned);
            assert!(owned.failure.is_none());
            let p = owned.partitions.remove(&0).unwrap();
            (start, p.next_offset, p.replay_done.is_some())
        };
        // Every message ten days old: nothing within retention, nothing to replay.
        let old = now_ms - 10 * day_ms;
        assert_eq!(start_with(&[old, old + 1, old + 2]), (Offset::Offset(3), Some(3), true));
        // The last message a day old: from the first kept offset, replaying.
        assert_eq!(start_with(&[old, old + 1, now_ms - day_ms]), (Offset::Offset(0), Some(0), false));
        // Messages an hour older than retention may hold rows whose own (event) time is
        // ahead of theirs, still kept: replayed too.
        let just_out = now_ms - 7 * day_ms - 3_600_000;
        assert_eq!(start_with(&[just_out, just_out + 1, just_out + 2]), (Offset::Offset(0), Some(0), false));
    }

    /// A partition planned as new to the node (no folder) opens its store once the
    /// assignment is taken, its detectors due; one whose store turns out to hold rows is
    /// refused rather than read from the horizon over them, and is then taken over from
    /// the offset stored with them.
    #[test]
    fn a_partition_new_here_is_opened_after_the_assignment_and_never_over_stored_rows() {
        let (_cluster, _dir, cfg) = cluster(1);
        let producer = producer(&cfg.kafka, Deliveries::default()).unwrap();
        rows_at(&producer, &[1; 50]);
        let consumer = consumer(&cfg, &Arc::new(AtomicBool::new(false))).unwrap();
        let node = consumer.context();
        let reader = PartitionReader::new(&cfg.kafka).unwrap();

        let mut owned = Owned::default();
        assert_eq!(node.open_assigned(&consumer, &reader, &mut owned, 0, None).unwrap(), Offset::Offset(0));
        assert!(owned.partitions.is_empty() && owned.opening.contains_key(&0));
        assert!(!partition_dir(&cfg.data, "rows", 0).exists(), "no store opened before the assignment is taken");
        node.open_planned_all(&mut owned);
        assert!(owned.failure.is_none() && owned.opening.is_empty());
        let p = owned.partitions.remove(&0).unwrap();
        assert!(p.detectors_due, "its detectors are loaded before it stores anything");
        assert_eq!((p.next_offset, p.replay_target, p.replay_done.is_some()), (Some(0), 50, false));
        p.drop_files().unwrap();

        // Planned as new; meanwhile a store with rows up to offset 41 appears in its folder.
        node.open_assigned(&consumer, &reader, &mut owned, 0, None).unwrap();
        let mut other = Partition::open(&cfg.data, "rows", 0, &cfg.plugins).unwrap();
        other.store_messages(&cfg.ingest, 0, &[(41, &b"{}"[..])]).unwrap();
        drop(other);
        node.open_planned_all(&mut owned);
        let refused = owned.failure.take().expect("a store with rows is not opened as new");
        assert!(format!("{refused}").contains("nothing stored"), "{refused}");
        assert!(owned.partitions.is_empty());
        // Assigned again, it continues from the offset stored with its rows.
        assert_eq!(node.open_assigned(&consumer, &reader, &mut owned, 0, None).unwrap(), Offset::Offset(42));
        assert!(owned.partitions.contains_key(&0) && owned.opening.is_empty());
    }

    /// The stores of the partitions a node opens, taken over (a store here before) or new,
    /// end a long index build once the node is stopping, as the daemon's store does: a
    /// stop does not wait for a detector's index to be built over a large partition.
    #[test]
    fn a_partition_s_index_build_ends_early_once_the_node_is_stopping() {
        let (_cluster, _dir, cfg) = cluster(2);
        let producer = producer(&cfg.kafka, Deliveries::default()).unwrap();
        let load = |i: i64| {
            format!(
                r#"{{"Type":"DeviceImageLoadEvents","Timestamp":"2025-05-07T16:55:49Z","DeviceId":"d","SHA1":"s{i}","ReportId":{i},"InitiatingProcessFileName":"p{}.exe"}}"#,
                i % 2
            )
        };
        // Seventy batches: an index build writes its entries 64 at a time, and looks at
        // the stop between.
        let fill = |p: &mut Partition| {
            for i in 0..70 {
                p.store_messages(&cfg.ingest, 0, &[(i, load(i).as_bytes())]).unwrap();
            }
        };
        let index = lookout_plugin_sdk::IndexDecl {
            table: "DeviceImageLoadEvents".into(),
            columns: vec!["InitiatingProcessFileName".into()],
            covers: Vec::new(),
        };
        // Partition 0 was stored here before (its messages are in the topic).
        rows_at(&producer, &[1; 70]);
        let mut before = Partition::open(&cfg.data, "rows", 0, &cfg.plugins).unwrap();
        fill(&mut before);
        drop(before);
        let stop = Arc::new(AtomicBool::new(true));
        let consumer = consumer(&cfg, &stop).unwrap();
        let node = consumer.context();
        let reader = PartitionReader::new(&cfg.kafka).unwrap();
        let mut owned = Owned::default();
        assert_eq!(node.open_assigned(&consumer, &reader, &mut owned, 0, None).unwrap(), Offset::Offset(70));
        assert_eq!(node.open_assigned(&consumer, &reader, &mut owned, 1, None).unwrap(), Offset::Offset(0));
        node.open_planned_all(&mut owned);
        assert!(owned.failure.is_none());
        let mut taken = owned.partitions.remove(&0).unwrap();
        let mut fresh = owned.partitions.remove(&1).unwrap();
        fill(&mut fresh);
        for p in [&mut taken, &mut fresh] {
            let e = p.store.declare_indexes(std::slice::from_ref(&index)).unwrap_err();
            assert!(KafkaError::from(e).is_interrupted(), "partition {}", p.partition);
            assert!(p.store.indexes().is_empty(), "not recorded as built");
        }
        // Started again (no stop), it is built whole.
        stop.store(false, Ordering::Relaxed);
        for p in [&mut taken, &mut fresh] {
            p.store.declare_indexes(std::slice::from_ref(&index)).unwrap();
            assert_eq!(p.store.indexes().len(), 1);
        }
    }

    /// The case an orderly revocation used to skip: the partition given back after
    /// another node emitted findings of it meanwhile, and after the findings log was cut
    /// back below where this node had read it.
    #[test]
    fn a_partition_given_back_learns_what_was_emitted_while_it_was_away() {
        let (_cluster, _dir, cfg) = cluster(1);
        let consumer = consumer(&cfg, &Arc::new(AtomicBool::new(false))).unwrap();
        let node = consumer.context();
        let producer = producer(&cfg.kafka, Deliveries::default()).unwrap();
        let reader = PartitionReader::new(&cfg.kafka).unwrap();
        emit(&producer, &["a", "b"]);

        let mut owned = Owned::default();
        let start = node.open_assigned(&consumer, &reader, &mut owned, 0, None).unwrap();
        assert_eq!(start, Offset::Offset(0), "an empty partition with nothing stored starts at its start");
        assert!(owned.partitions.is_empty(), "a partition new here is opened once the assignment is taken");
        node.open_planned_all(&mut owned);
        assert!(owned.failure.is_none());
        let mut p = owned.partitions.remove(&0).unwrap();
        assert_eq!(p.emitted, HashSet::from(["a".to_string(), "b".to_string()]));
        assert_eq!(p.findings_read_to, 2);
        assert_eq!(p.next_offset, Some(0));
        assert!(p.replay_done.is_some(), "nothing to replay in an empty partition");
        p.needs_pass = false; // as after its first pass
        note_replay_detected(&mut p);
        assert!(p.replay_detected, "an empty partition is replayed and detected at its first pass");

        // Revoked in order; another node owns it for a while and emits "c", and rows
        // arrive. ("mine": an id this node knew of as emitted before it gave it up.)
        p.emitted.insert("mine".into());
        owned.revoked.insert(0, p);
        emit(&producer, &["c"]);
        rows_at(&producer, &[1, 2]);
        node.open_assigned(&consumer, &reader, &mut owned, 0, None).unwrap();
        let mut p = owned.partitions.remove(&0).unwrap();
        // It had stored nothing: started afresh, with the partition's end as it is now.
        assert_eq!((p.next_offset, p.replay_target, p.replay_done.is_some()), (Some(0), 2, false));
        assert!(!p.replay_detected, "a new replay is logged when it is stored and detected");
        assert!(p.emitted.contains("c"), "what another owner emitted meanwhile: {:?}", p.emitted);
        assert!(p.emitted_before.contains("c"), "not written to this node's JSONL either");
        assert!(!p.emitted_before.contains("mine"), "what this node emitted stays its own");
        assert_eq!(p.findings_read_to, 3);

        // A findings log that ends before where this node last read: read from its start.
        p.findings_read_to = 10;
        p.emitted.remove("a");
        owned.revoked.insert(0, p);
        node.open_assigned(&consumer, &reader, &mut owned, 0, None).unwrap();
        let p = owned.partitions.remove(&0).unwrap();
        assert!(p.emitted.contains("a"), "{:?}", p.emitted);
        assert_eq!(p.findings_read_to, 3);
    }

    #[test]
    fn a_partition_with_nothing_stored_starts_where_the_broker_puts_the_horizon() {
        assert_eq!(horizon_start(Some(Offset::Offset(42)), 7, 100), 42);
        // Every message older than the horizon: from the end, nothing to replay.
        assert_eq!(horizon_start(Some(Offset::End), 7, 100), 100);
        // No answer for the partition, or one the broker could not give: its first kept
        // offset (never an offset retention has already deleted).
        assert_eq!(horizon_start(None, 7, 100), 7);
        assert_eq!(horizon_start(Some(Offset::Invalid), 7, 100), 7);
        assert_eq!(horizon_start(Some(Offset::Offset(3)), 7, 100), 7);
    }
    /// `/metrics` has each owned partition's gauges and the detector sets ready for a
    /// take-over.
    #[test]
    fn metrics_show_each_partition_and_the_sets_loaded_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let status = |partition, next: i64, high: i64| PartitionStatus {
            partition,
            next_offset: Some(next),
            high_watermark: high,
            lag: high - next,
            replaying: next < high,
            rows_stored: 7,
            detection_pending: false,
            findings_written: 0,
        };
        let view = NodeView { readers: Vec::new(), partitions: vec![status(0, 5, 9), status(3, 4, 4)], spare_sets: 2 };
        let observe = NodeObserve { cfg: config("127.0.0.1:1", dir.path()), view: Mutex::new(view) };
        let text = observe.extra_metrics();
        for line in [
            "lookout_kafka_partition_lag{topic=\"rows\",partition=\"0\"} 4",
            "lookout_kafka_partition_replaying{topic=\"rows\",partition=\"0\"} 1",
            "lookout_kafka_partition_replaying{topic=\"rows\",partition=\"3\"} 0",
            "lookout_kafka_partition_next_offset{topic=\"rows\",partition=\"3\"} 4",
            "# TYPE lookout_kafka_spare_detector_sets gauge",
            "lookout_kafka_spare_detector_sets 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }
}
