//! `lookout split`: the repartition step (as Kafka Streams does before a keyed join).
//!
//! Reads Streaming-API messages (`{"records":[…]}` or one record per message, as Event
//! Hubs delivers them) from one topic and produces their records to another, keyed by
//! `DeviceId`, with the idempotent producer and the Java-compatible murmur2 partitioner —
//! so the same device lands in the same partition whichever client wrote it. A batch's
//! records of one device go out together, in their order, as Streaming-API messages of up
//! to `message_bytes` (`{"records":[…]}`): a consumer pays Kafka's per-message cost once
//! for tens of rows, not once a row. Records with no DeviceId go to the unkeyed topic and
//! records that are not JSON objects to the rejected topic, one a message, counted;
//! neither stops the split. Nor does a record or message too big for the producer
//! (`message.max.bytes`): it is set aside, counted, and the rejected topic gets, in its
//! place, a small JSON object naming where it lies in the input (see [`SetAside`]).
//!
//! Its progress is its consumer group's committed offsets, and an input offset is
//! committed only after every record produced from the messages before it is
//! acknowledged. A crash between the two produces those records again on restart; the
//! store downstream keeps a record sent twice once (same key, same content).

use super::{device_of, records_of, KafkaError, KafkaSettings};
use crate::failpoint;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SplitConfig {
    pub kafka: KafkaSettings,
    pub from: String,
    pub to: String,
    pub group: String,
    /// Where records with no DeviceId go.
    pub unkeyed_topic: String,
    /// Where messages and records that are not JSON objects go, as they came.
    pub rejected_topic: String,
    /// Tables whose records go to every partition (keyed by DeviceId all the same): a
    /// rule joins them by SHA1 across devices (scm-remote-process's certificate
    /// anti-join), so every partition needs all of them. Default: DeviceFileCertificateInfo.
    pub broadcast: Vec<String>,
    /// Input messages per produced-and-committed batch.
    pub batch_messages: usize,
    /// Most bytes of one produced message (a record bigger than this goes alone): below
    /// the brokers' `message.max.bytes` and the nodes' line limit.
    pub message_bytes: usize,
    /// Stop after this long with nothing to read (a one-shot backfill); `None`: run until
    /// stopped.
    pub idle_exit: Option<Duration>,
}

/// What a split did, as it reports on exit and in its progress lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SplitStats {
    pub messages: u64,
    pub records: u64,
    /// Records produced keyed by DeviceId.
    pub produced: u64,
    /// Messages those records (and the broadcast ones) went out in.
    pub produced_messages: u64,
    /// Records of broadcast tables, each produced to every partition.
    pub broadcast: u64,
    /// Records with no DeviceId, sent to the unkeyed topic.
    pub unkeyed: u64,
    /// Messages or records that are not JSON objects, sent to the rejected topic.
    pub rejected: u64,
    /// Records (or messages) too big for the producer: each is in the rejected topic as
    /// a [`SetAside`] naming where it lies in the input.
    pub set_aside: u64,
    /// Batches whose input offsets were committed.
    pub batches: u64,
}

/// Counts the records the brokers did not acknowledge.
#[derive(Default)]
pub(crate) struct Deliveries {
    failed: AtomicU64,
    /// Of them, refused by a broker as too large (over the topic's `max.message.bytes`).
    too_large: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Deliveries {
    /// The first delivery failure since the last call, if any.
    pub(crate) fn take_failures(&self) -> Option<String> {
        let failed = self.failed.swap(0, Ordering::Relaxed);
        let too_large = self.too_large.swap(0, Ordering::Relaxed);
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Produced again, the same records are refused again: only a change of settings
        // moves on.
        let hint = if too_large > 0 {
            format!(
                "; {too_large} refused by the brokers as too large: the topic's max.message.bytes is below the \
                 producer's message.max.bytes; set message.max.bytes in [kafka.properties] to the topic's limit \
                 (a split then sets aside what is over it, named in its rejected topic; a node sends such a \
                 finding without its row), or raise the topic's"
            )
        } else {
            String::new()
        };
        (failed > 0).then(|| format!("{failed} failed, the first: {}{hint}", first.unwrap_or_default()))
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, message)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
                self.too_large.fetch_add(1, Ordering::Relaxed);
            }
            let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| format!("to {} partition {}: {e}", message.topic(), message.partition()));
        }
    }
}

/// The idempotent producer every Lookout Kafka job uses: acks from all in-sync replicas,
/// no reordering or duplicates on retry, murmur2 on the key as the Java client does.
pub(crate) fn producer<C: ProducerContext>(kafka: &KafkaSettings, context: C) -> Result<BaseProducer<C>, KafkaError> {
    let defaults = [("enable.idempotence", "true"), ("partitioner", "murmur2_random"), ("linger.ms", "5")];
    kafka.client(&defaults).create_with_context(context).map_err(|source| KafkaError::Client {
        what: "producer",
        brokers: kafka.brokers.clone(),
        source,
    })
}

/// What became of a record handed to the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    Queued,
    /// Over the producer's `message.max.bytes`: never sent (this many bytes of payload).
    TooLarge(usize),
}

/// Sends one record, waiting for room in the producer's queue when it is full.
pub(crate) fn try_send<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, str, [u8]>,
) -> Result<Sent, KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(Sent::Queued),
            Err((rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                producer.poll(Duration::from_millis(50));
                record = back;
            }
            Err((rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), back)) => {
                return Ok(Sent::TooLarge(back.payload.map_or(0, <[u8]>::len)));
            }
            Err((e, back)) => {
                let partition = back.partition.map(|p| format!(" partition {p}")).unwrap_or_default();
                return Err(KafkaError::kafka(format!("cannot produce to {}{partition}", back.topic))(e));
            }
        }
    }
}

/// Sends one record; one too big for the producer is an error.
pub(crate) fn send<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &BaseProducer<C>,
    record: BaseRecord<'_, str, [u8]>,
) -> Result<(), KafkaError> {
    let topic = record.topic.to_string();
    match try_send(producer, record)? {
        Sent::Queued => Ok(()),
        Sent::TooLarge(bytes) => Err(KafkaError::Kafka {
            what: format!(
                "cannot produce a message of {bytes} bytes to {topic}: over the producer's message.max.bytes \
                 (raise it in [kafka.properties], and the brokers' and topic's limits with it)"
            ),
            source: rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        }),
    }
}

/// Where an input message lies: what a record set aside is found again by.
#[derive(Debug, Clone, Copy)]
struct Origin<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
}

/// What the rejected topic holds in place of a record (or a whole message) too big for
/// the producer: where it lies in the input (there until the input topic's retention
/// drops it), its size, the DeviceId it was for, if known, and its first bytes.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct SetAside {
    /// Always `"too large to produce"`: tells these apart from rejected records.
    pub lookout_set_aside: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub bytes: usize,
    pub device_id: Option<String>,
    /// The first [`SET_ASIDE_HEAD`] bytes, as text (invalid UTF-8 replaced).
    pub head: String,
}

/// How much of a record set aside its marker shows.
pub const SET_ASIDE_HEAD: usize = 1024;

/// A record on its way out: its topic, key and partition (the partitioner's choice by key
/// if `None`), and payload.
struct Outgoing<'a> {
    topic: &'a str,
    key: Option<&'a str>,
    partition: Option<i32>,
    payload: &'a [u8],
}

impl<'a> Outgoing<'a> {
    /// A record with no key, to the partitioner's choice.
    fn unkeyed(topic: &'a str, payload: &'a [u8]) -> Outgoing<'a> {
        Outgoing { topic, key: None, partition: None, payload }
    }
}

/// Sends a record; if it is too big for the producer, sends a [`SetAside`] marker to the
/// rejected topic in its place, logged and counted.
fn send_or_set_aside<C: ProducerContext<DeliveryOpaque = ()>>(
    cfg: &SplitConfig,
    producer: &BaseProducer<C>,
    out: Outgoing<'_>,
    origin: Origin<'_>,
    stats: &mut SplitStats,
) -> Result<(), KafkaError> {
    let mut record = BaseRecord::to(out.topic).payload(out.payload);
    if let Some(key) = out.key {
        record = record.key(key);
    }
    if let Some(p) = out.partition {
        record = record.partition(p);
    }
    let Sent::TooLarge(bytes) = try_send(producer, record)? else { return Ok(()) };
    stats.set_aside += 1;
    tracing::warn!(
        topic = origin.topic,
        partition = origin.partition,
        offset = origin.offset,
        bytes,
        to = out.topic,
        rejected_topic = %cfg.rejected_topic,
        "a record is over the producer's message.max.bytes: set aside, the rejected topic names where it is"
    );
    let head = &out.payload[..out.payload.len().min(SET_ASIDE_HEAD)];
    let marker = SetAside {
        lookout_set_aside: SET_ASIDE.to_string(),
        topic: origin.topic.to_string(),
        partition: origin.partition,
        offset: origin.offset,
        bytes,
        device_id: out.key.map(str::to_string),
        head: String::from_utf8_lossy(head).into_owned(),
    };
    // Strings and numbers only: writing it cannot fail.
    let marker = serde_json::to_vec(&marker).unwrap_or_default();
    send(producer, BaseRecord::to(&cfg.rejected_topic).payload(&marker[..]))
}

/// [`SetAside::lookout_set_aside`].
pub const SET_ASIDE: &str = "too large to produce";

/// Runs the split until `stop` is set (or it has been idle for `idle_exit`).
pub fn run_split(
    cfg: &SplitConfig,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&SplitStats),
) -> Result<SplitStats, KafkaError> {
    let consumer: BaseConsumer = {
        let mut c = cfg.kafka.client(super::GROUP_MEMBER);
        c.set("group.id", &cfg.group);
        c.create().map_err(|source| KafkaError::Client {
            what: "consumer",
            brokers: cfg.kafka.brokers.clone(),
            source,
        })?
    };
    consumer.subscribe(&[&cfg.from]).map_err(KafkaError::kafka(format!("cannot subscribe to {}", cfg.from)))?;
    let producer = producer(&cfg.kafka, Deliveries::default())?;
    let partitions = partition_count(&producer, &cfg.to)?;
    // Where records that cannot be keyed or read go must exist too: a record that cannot
    // be delivered stops the split (its input is not committed), here at every restart.
    for side in [&cfg.unkeyed_topic, &cfg.rejected_topic] {
        partition_count(&producer, side)?;
    }
    let mut stats = SplitStats::default();
    let mut idle_since = Instant::now();
    tracing::info!(from = %cfg.from, to = %cfg.to, group = %cfg.group, "split running");
    while !stop.load(Ordering::Relaxed) {
        // Input offsets reached in this batch, per partition: committed once it is acked.
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let mut groups = Groups::default();
        let deadline = Instant::now() + Duration::from_millis(250);
        let mut taken = 0usize;
        while taken < cfg.batch_messages {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stop.load(Ordering::Relaxed) {
                break;
            }
            let message = match consumer.poll(left.min(Duration::from_millis(50))) {
                None => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, from = %cfg.from, "consumer error; carrying on");
                    continue;
                }
                Some(Ok(m)) => m,
            };
            stats.messages += 1;
            let origin = Origin { topic: &cfg.from, partition: message.partition(), offset: message.offset() };
            split_message(cfg, &producer, partitions, message.payload(), origin, &mut groups, &mut stats)?;
            let reached = next.entry(message.partition()).or_insert(0);
            *reached = (*reached).max(message.offset() + 1);
            taken += 1;
        }
        if next.is_empty() {
            producer.poll(Duration::ZERO);
            // Idle counts only once the group has given this split its partitions.
            if consumer.assignment().map_or(true, |a| a.count() == 0) {
                idle_since = Instant::now();
            }
            if cfg.idle_exit.is_some_and(|idle| idle_since.elapsed() >= idle) {
                break;
            }
            continue;
        }
        idle_since = Instant::now();
        groups.send_all(cfg, &producer, &mut stats)?;
        // Every record of the batch acknowledged, or nothing committed.
        let flushed = producer.flush(Duration::from_secs(120));
        let failed = producer.context().take_failures();
        if flushed.is_err() || failed.is_some() {
            let first = failed.or_else(|| flushed.err().map(|e| e.to_string())).unwrap_or_default();
            return Err(KafkaError::NotAcknowledged { produced: stats.produced, first });
        }
        failpoint::hit("split-after-produce");
        // Only partitions this split still owns: one revoked during the batch is another
        // split's now, and its records of this batch are produced again there (the store
        // keeps a record sent twice once).
        let owned = consumer.assignment().unwrap_or_default();
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in &next {
            if owned.find_partition(&cfg.from, *partition).is_some() {
                offsets
                    .add_partition_offset(&cfg.from, *partition, Offset::Offset(*offset))
                    .map_err(KafkaError::kafka("cannot list the offsets to commit"))?;
            }
        }
        if offsets.count() > 0 {
            if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                // Produced and acknowledged but not committed: produced again after a
                // restart or rebalance, never lost.
                tracing::warn!(error = %e, from = %cfg.from, group = %cfg.group, "cannot commit the input offsets of this batch; its records will be produced again");
            }
        }
        stats.batches += 1;
        progress(&stats);
    }
    producer.flush(Duration::from_secs(30)).map_err(KafkaError::kafka("cannot flush the producer"))?;
    Ok(stats)
}

/// How many partitions `topic` has (it must exist: Lookout never creates topics).
fn partition_count<C: ProducerContext>(producer: &BaseProducer<C>, topic: &str) -> Result<i32, KafkaError> {
    let n = super::partitions_of(producer.client(), topic)
        .map_err(KafkaError::kafka(format!("cannot read the metadata of {topic}")))?;
    if n == 0 {
        return Err(KafkaError::Kafka {
            what: format!("topic {topic} has no partitions: create it first (Lookout never creates topics)"),
            source: rdkafka::error::KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
        });
    }
    Ok(n as i32)
}

/// Where a group of records goes: its key (the DeviceId) and, for a broadcast table, the
/// partition (otherwise the partitioner's choice by key).
type Destination = (String, Option<i32>);

/// A batch's keyed records, gathered per destination into Streaming-API messages
/// (`{"records":[…]}`), each sent once it would outgrow `message_bytes` and the rest at
/// the end of the batch, before its input offsets are committed.
#[derive(Default)]
struct Groups {
    open: std::collections::HashMap<Destination, Vec<u8>>,
}

const OPEN: &[u8] = br#"{"records":["#;
const CLOSE: &[u8] = b"]}";

impl Groups {
    /// Adds one record to its destination's message, sending that message first when
    /// the record would take it over `message_bytes`. A record that alone is over it goes
    /// out at once, in a message of its own: while it is known which input message it
    /// came from, so that one too big for the producer is set aside naming it.
    fn add<C: ProducerContext<DeliveryOpaque = ()>>(
        &mut self,
        cfg: &SplitConfig,
        producer: &BaseProducer<C>,
        to: Destination,
        record: &[u8],
        origin: Origin<'_>,
        stats: &mut SplitStats,
    ) -> Result<(), KafkaError> {
        let alone = OPEN.len() + record.len() + CLOSE.len() > cfg.message_bytes;
        if let Some(open) = self.open.get_mut(&to) {
            if !open.is_empty() && (alone || open.len() + 1 + record.len() + CLOSE.len() > cfg.message_bytes) {
                let full = std::mem::take(open);
                send_group(cfg, producer, &to, full, stats)?;
            }
        }
        if alone {
            let message = [OPEN, record, CLOSE].concat();
            stats.produced_messages += 1;
            let (device, partition) = &to;
            let out = Outgoing { topic: &cfg.to, key: Some(device), partition: *partition, payload: &message };
            return send_or_set_aside(cfg, producer, out, origin, stats);
        }
        let message = self.open.entry(to).or_default();
        if message.is_empty() {
            message.extend_from_slice(OPEN);
        } else {
            message.push(b',');
        }
        message.extend_from_slice(record);
        Ok(())
    }

    /// Sends every open message (the end of a batch).
    fn send_all<C: ProducerContext<DeliveryOpaque = ()>>(
        &mut self,
        cfg: &SplitConfig,
        producer: &BaseProducer<C>,
        stats: &mut SplitStats,
    ) -> Result<(), KafkaError> {
        for (to, message) in self.open.drain() {
            send_group(cfg, producer, &to, message, stats)?;
        }
        Ok(())
    }
}

/// Closes one gathered message and produces it to its destination.
fn send_group<C: ProducerContext<DeliveryOpaque = ()>>(
    cfg: &SplitConfig,
    producer: &BaseProducer<C>,
    (device, partition): &Destination,
    mut message: Vec<u8>,
    stats: &mut SplitStats,
) -> Result<(), KafkaError> {
    if message.is_empty() {
        return Ok(());
    }
    message.extend_from_slice(CLOSE);
    let mut record = BaseRecord::to(&cfg.to).key(device.as_str()).payload(message.as_slice());
    if let Some(p) = partition {
        record = record.partition(*p);
    }
    stats.produced_messages += 1;
    match try_send(producer, record)? {
        Sent::Queued => Ok(()),
        // Records gathered up to `message_bytes` (one over it went alone): only a
        // `message_bytes` above the producer's limit gets here.
        Sent::TooLarge(bytes) => Err(KafkaError::Kafka {
            what: format!(
                "cannot produce a message of {bytes} bytes gathered for {} (DeviceId {device}): over the \
                 producer's message.max.bytes; give a --message-bytes below it",
                cfg.to
            ),
            source: rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        }),
    }
}

/// The table a Streaming-API record names in its `category`.
fn table_of(record: &Value) -> Option<&str> {
    record.get("category")?.as_str()?.strip_prefix("AdvancedHunting-")
}

/// Produces the records of one input message.
fn split_message<C: ProducerContext<DeliveryOpaque = ()>>(
    cfg: &SplitConfig,
    producer: &BaseProducer<C>,
    partitions: i32,
    payload: Option<&[u8]>,
    origin: Origin<'_>,
    groups: &mut Groups,
    stats: &mut SplitStats,
) -> Result<(), KafkaError> {
    let payload = payload.unwrap_or_default();
    // Each record, or the text of one that cannot be read.
    let records: Vec<Result<Value, &[u8]>> = match serde_json::from_slice(payload) {
        Ok(message) => records_of(message).into_iter().map(Ok).collect(),
        // A `{"records":[…]}` batch one record of which cannot be read (a number out of
        // range, a lone surrogate, nesting too deep), as the node's own reading takes it:
        // the others go on, that one is rejected.
        Err(e) => match std::str::from_utf8(payload).ok().and_then(crate::parse::record::batch_record_texts) {
            Some(texts) => {
                texts.into_iter().map(|t| serde_json::from_str::<Value>(t).map_err(|_| t.as_bytes())).collect()
            }
            None => {
                tracing::debug!(error = %e, "message is not JSON; sent to the rejected topic");
                stats.rejected += 1;
                return send_or_set_aside(
                    cfg,
                    producer,
                    Outgoing::unkeyed(&cfg.rejected_topic, payload),
                    origin,
                    stats,
                );
            }
        },
    };
    for record in records {
        stats.records += 1;
        let record = match record {
            Ok(record) => record,
            Err(text) => {
                stats.rejected += 1;
                send_or_set_aside(cfg, producer, Outgoing::unkeyed(&cfg.rejected_topic, text), origin, stats)?;
                continue;
            }
        };
        let bytes = serde_json::to_vec(&record).unwrap_or_default();
        if !record.is_object() {
            stats.rejected += 1;
            send_or_set_aside(cfg, producer, Outgoing::unkeyed(&cfg.rejected_topic, &bytes), origin, stats)?;
            continue;
        }
        match device_of(&record) {
            Some(device) if table_of(&record).is_some_and(|t| cfg.broadcast.iter().any(|b| b == t)) => {
                stats.broadcast += 1;
                for partition in 0..partitions {
                    groups.add(cfg, producer, (device.to_string(), Some(partition)), &bytes, origin, stats)?;
                }
            }
            Some(device) => {
                stats.produced += 1;
                groups.add(cfg, producer, (device.to_string(), None), &bytes, origin, stats)?;
            }
            None => {
                stats.unkeyed += 1;
                send_or_set_aside(cfg, producer, Outgoing::unkeyed(&cfg.unkeyed_topic, &bytes), origin, stats)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    /// Every message of `topic` (partitions 0..n): (partition, key, payload as JSON).
    fn read_all(brokers: &str, topic: &str, partitions: i32, want: usize) -> Vec<(i32, String, Value)> {
        let consumer: BaseConsumer = KafkaSettings { brokers: brokers.into(), properties: Vec::new() }
            .client(&[("group.id", "test-reader"), ("enable.auto.commit", "false")])
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&list).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < want && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                got.push((m.partition(), key, serde_json::from_slice(m.payload().unwrap_or_default()).unwrap()));
            }
        }
        got
    }

    fn record(table: &str, device: &str, report: i64) -> Value {
        serde_json::json!({
            "category": format!("AdvancedHunting-{table}"),
            "properties": {"DeviceId": device, "ReportId": report, "FileName": "x".repeat(100)},
        })
    }

    /// A split from `in` to `rows` (side topics `rows.unkeyed`, `rows.rejected`), no
    /// broadcast table, messages of up to 1 MiB, done after a second with nothing to read.
    fn config(kafka: KafkaSettings) -> SplitConfig {
        SplitConfig {
            kafka,
            from: "in".into(),
            to: "rows".into(),
            group: "split".into(),
            unkeyed_topic: "rows.unkeyed".into(),
            rejected_topic: "rows.rejected".into(),
            broadcast: Vec::new(),
            batch_messages: 100,
            message_bytes: 1 << 20,
            idle_exit: Some(Duration::from_secs(1)),
        }
    }

    /// A batch's records of one device go out together and in their order, in messages
    /// no bigger than `message_bytes`; a broadcast record goes to every partition.
    #[test]
    fn a_devices_records_go_out_together_in_order_within_the_message_size() {
        let cluster = MockCluster::new(1).unwrap();
        for (topic, partitions) in [("in", 1), ("rows", 2), ("rows.unkeyed", 1), ("rows.rejected", 1)] {
            cluster.create_topic(topic, partitions, 1).unwrap();
        }
        let kafka = KafkaSettings { brokers: cluster.bootstrap_servers(), properties: Vec::new() };
        let one = serde_json::to_vec(&record("DeviceFileEvents", "d1", 1)).unwrap().len();
        let input = serde_json::json!({"records": [
            record("DeviceFileEvents", "d1", 1),
            record("DeviceFileEvents", "d2", 2),
            record("DeviceFileEvents", "d1", 3),
            record("DeviceFileCertificateInfo", "d3", 4),
            record("DeviceFileEvents", "d1", 5),
        ]});
        let producer = producer(&kafka, Deliveries::default()).unwrap();
        send(&producer, BaseRecord::to("in").key("x").payload(&serde_json::to_vec(&input).unwrap()[..])).unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();

        let cfg = SplitConfig {
            kafka: kafka.clone(),
            from: "in".into(),
            to: "rows".into(),
            group: "split".into(),
            unkeyed_topic: "rows.unkeyed".into(),
            rejected_topic: "rows.rejected".into(),
            broadcast: vec!["DeviceFileCertificateInfo".into()],
            batch_messages: 100,
            // Room for two records a message, not three.
            message_bytes: OPEN.len() + 2 * one + 1 + CLOSE.len() + 10,
            idle_exit: Some(Duration::from_secs(1)),
        };
        let stats = run_split(&cfg, &AtomicBool::new(false), &mut |_| {}).unwrap();
        assert_eq!((stats.records, stats.produced, stats.broadcast), (5, 4, 1), "{stats:?}");
        // d1: two messages (1, 3 | 5); d2: one; the certificate: one in each partition.
        assert_eq!(stats.produced_messages, 5, "{stats:?}");

        let messages = read_all(&cluster.bootstrap_servers(), "rows", 2, 5);
        assert_eq!(messages.len(), 5, "{messages:?}");
        let reports = |device: &str| -> Vec<Vec<i64>> {
            messages
                .iter()
                .filter(|(_, key, _)| key == device)
                .map(|(_, _, m)| {
                    let records = m["records"].as_array().expect("a Streaming-API message");
                    records.iter().map(|r| r["properties"]["ReportId"].as_i64().unwrap()).collect()
                })
                .collect()
        };
        assert_eq!(reports("d1"), vec![vec![1, 3], vec![5]]);
        assert_eq!(reports("d2"), vec![vec![2]]);
        assert_eq!(reports("d3"), vec![vec![4], vec![4]]);
        let cert_partitions: std::collections::BTreeSet<i32> =
            messages.iter().filter(|(_, key, _)| key == "d3").map(|(p, _, _)| *p).collect();
        assert_eq!(cert_partitions, [0, 1].into());
        assert!(messages.iter().all(|(_, _, m)| serde_json::to_vec(m).unwrap().len() <= cfg.message_bytes));
    }

    /// A record too big for the producer (over `message.max.bytes`) is set aside: the
    /// split goes on with the records after it, the rejected topic names where it lies in
    /// the input, and the input offsets past it are committed.
    #[test]
    fn a_record_too_big_to_produce_is_set_aside_and_the_split_goes_on() {
        let cluster = MockCluster::new(1).unwrap();
        for topic in ["in", "rows", "rows.unkeyed", "rows.rejected"] {
            cluster.create_topic(topic, 1, 1).unwrap();
        }
        let brokers = cluster.bootstrap_servers();
        let kafka = KafkaSettings { brokers: brokers.clone(), properties: Vec::new() };
        // What wrote the input may send bigger messages than the split's producer.
        let writer = KafkaSettings {
            brokers: brokers.clone(),
            properties: vec![("message.max.bytes".into(), "4000000".into())],
        };
        let mut big = record("DeviceFileEvents", "d1", 1);
        big["properties"]["FileName"] = Value::String("x".repeat(1_100_000));
        let input = producer(&writer, Deliveries::default()).unwrap();
        for r in [big, record("DeviceFileEvents", "d2", 2)] {
            send(&input, BaseRecord::to("in").key("x").payload(&serde_json::to_vec(&r).unwrap()[..])).unwrap();
        }
        input.flush(Duration::from_secs(10)).unwrap();
        assert_eq!(input.context().take_failures(), None);

        let cfg = SplitConfig { message_bytes: 64 << 10, ..config(kafka) };
        let stats = run_split(&cfg, &AtomicBool::new(false), &mut |_| {}).unwrap();
        assert_eq!((stats.messages, stats.produced, stats.set_aside, stats.rejected), (2, 2, 1, 0), "{stats:?}");

        let rows = read_all(&brokers, "rows", 1, 1);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].1, "d2");
        let rejected = read_all(&brokers, "rows.rejected", 1, 1);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        let marker: SetAside = serde_json::from_value(rejected[0].2.clone()).unwrap();
        assert_eq!(
            (marker.lookout_set_aside.as_str(), marker.topic.as_str(), marker.partition, marker.offset),
            (SET_ASIDE, "in", 0, 0)
        );
        assert_eq!(marker.device_id.as_deref(), Some("d1"));
        assert!(marker.bytes > 1_100_000, "{}", marker.bytes);
        assert!(marker.head.starts_with(r#"{"records":[{"#) && marker.head.len() == SET_ASIDE_HEAD, "{}", marker.head);

        let group: BaseConsumer =
            KafkaSettings { brokers, properties: Vec::new() }.client(&[("group.id", "split")]).create().unwrap();
        let mut list = TopicPartitionList::new();
        list.add_partition("in", 0);
        let committed = group.committed_offsets(list, Duration::from_secs(10)).unwrap();
        assert_eq!(committed.find_partition("in", 0).unwrap().offset(), Offset::Offset(2));
    }

    /// A record the brokers do not take is reported with the topic and partition it was
    /// for (a split writes to three topics, a node to its findings topic).
    #[test]
    fn a_failed_delivery_names_its_topic_and_partition() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("findings", 1, 1).unwrap();
        let kafka = KafkaSettings {
            brokers: cluster.bootstrap_servers(),
            properties: vec![("message.timeout.ms".into(), "2000".into())],
        };
        let producer = producer(&kafka, Deliveries::default()).unwrap();
        let queued = send(&producer, BaseRecord::to("findings").partition(5).key("d1").payload(&b"{}"[..]));
        let _ = producer.flush(Duration::from_secs(10));
        let failure = match queued {
            Err(e) => format!("{e}"),
            Ok(()) => producer.context().take_failures().expect("a record for a partition that does not exist"),
        };
        assert!(failure.contains("findings partition 5"), "{failure}");
    }

    /// A record the producer sends but a broker refuses as too large (the topic's limit
    /// below the producer's) is refused again at every restart: the failure says which
    /// setting to change.
    #[test]
    fn a_record_the_brokers_refuse_as_too_large_names_the_setting_to_change() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("rows", 1, 1).unwrap();
        let kafka = KafkaSettings {
            brokers: cluster.bootstrap_servers(),
            properties: vec![("message.timeout.ms".into(), "5000".into())],
        };
        let producer = producer(&kafka, Deliveries::default()).unwrap();
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
        send(&producer, BaseRecord::to("rows").key("d1").payload(&b"{}"[..])).unwrap();
        let _ = producer.flush(Duration::from_secs(10));
        let failure = producer.context().take_failures().expect("the record is refused");
        assert!(failure.contains("max.message.bytes") && failure.contains("[kafka.properties]"), "{failure}");
        assert!(!failure.contains("  "), "{failure}");
    }

    /// The side topics must exist when the split starts (Lookout never creates topics):
    /// one that does not is named, with what to do, instead of a record that cannot be
    /// delivered stopping the split at every restart.
    #[test]
    fn a_side_topic_that_does_not_exist_is_named_at_the_start() {
        let cluster = MockCluster::new(1).unwrap();
        for topic in ["in", "rows", "rows.unkeyed"] {
            cluster.create_topic(topic, 1, 1).unwrap();
        }
        let kafka = KafkaSettings {
            brokers: cluster.bootstrap_servers(),
            properties: vec![("allow.auto.create.topics".into(), "false".into())],
        };
        let cfg = config(kafka);
        let e = run_split(&cfg, &AtomicBool::new(false), &mut |_| {}).expect_err("rows.rejected does not exist");
        let text = crate::error::Chain(&e).to_string();
        assert!(text.contains("rows.rejected") && text.contains("create it"), "{text}");
    }
}
