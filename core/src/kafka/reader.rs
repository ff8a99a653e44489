//! Reading a partition by hand, outside the node's consumer group: the finding ids a
//! findings partition holds (so a node taking a partition over emits none of them again),
//! and a message's timestamp (to check what the broker says of the retention horizon).

use super::{KafkaError, KafkaSettings, CALL_TIMEOUT, READER};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Finding ids read from partitions of the findings topic, and where each was read to.
pub type FindingIds = HashMap<i32, (HashSet<String>, i64)>;
use std::time::{Duration, Instant};

/// How long reading a findings partition to its end may take before the node gives up
/// on this assignment (and is assigned it again).
const READ_LIMIT: Duration = Duration::from_secs(120);

/// Reads partitions by hand, outside the node's group: one client for the node's life (a
/// new one connects anew, inside the rebalance callback: ~50 ms of every take-over).
pub struct PartitionReader {
    consumer: BaseConsumer,
}

impl PartitionReader {
    pub fn new(kafka: &KafkaSettings) -> Result<PartitionReader, KafkaError> {
        let consumer = kafka.client(READER).create().map_err(|source| KafkaError::Client {
            what: "findings reader",
            brokers: kafka.brokers.clone(),
            source,
        })?;
        Ok(PartitionReader { consumer })
    }

    /// Connects now: the first request's bootstrap and metadata (~50 ms) are then not paid
    /// by the first take-over, inside the rebalance callback. Best effort: a cluster not
    /// reachable yet is connected to on the first read.
    pub fn connect(&self, topic: &str) {
        if let Err(e) = self.consumer.fetch_metadata(Some(topic), CALL_TIMEOUT) {
            tracing::debug!(error = %e, topic, "the findings reader cannot reach the cluster yet; it connects on its first read");
        }
    }

    /// The finding ids in partition `partition` of `topic` from offset `from` (or its first
    /// kept offset, if later) to its end; and that end, to read on from next time. A
    /// partition that ends before `from` (the topic created again, or its log cut back) is
    /// read from its start.
    pub fn finding_ids(&self, topic: &str, partition: i32, from: i64) -> Result<(HashSet<String>, i64), KafkaError> {
        let mut read = self.finding_ids_of(topic, &[(partition, from)])?;
        read.remove(&partition).ok_or_else(|| KafkaError::Kafka {
            what: format!("findings topic {topic} partition {partition}: not read"),
            source: rdkafka::error::KafkaError::NoMessageReceived,
        })
    }

    /// [`PartitionReader::finding_ids`] of several partitions of `topic`, each from its own
    /// offset, read together: one assignment and one stream of fetches for all of them. A
    /// take-over of three partitions read them one after another, waiting for each one's
    /// first fetch in turn (5–20 ms each, inside the rebalance callback).
    pub fn finding_ids_of(&self, topic: &str, from: &[(i32, i64)]) -> Result<FindingIds, KafkaError> {
        let mut out: FindingIds = HashMap::new();
        // Each partition still to read: where it is read to, and its end.
        let mut reading: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for &(partition, from) in from {
            let (low, high) = self.consumer.fetch_watermarks(topic, partition, CALL_TIMEOUT).map_err(
                KafkaError::kafka(format!("cannot read the end of findings topic {topic} partition {partition}")),
            )?;
            let from = if from > high {
                tracing::warn!(
                    topic,
                    partition,
                    read_to = from,
                    end = high,
                    "the findings partition ends before where this node last read it; reading it again from its start"
                );
                low
            } else {
                from.max(low)
            };
            out.insert(partition, (HashSet::new(), high));
            if high > from {
                reading.insert(partition, (from, high));
            }
        }
        if reading.is_empty() {
            return Ok(out);
        }
        self.assign_all(topic, &reading)?;
        let started = Instant::now();
        while !reading.is_empty() {
            if started.elapsed() > READ_LIMIT {
                let (partition, (reached, high)) = reading.iter().next().map(|(p, r)| (*p, *r)).unwrap_or_default();
                return Err(KafkaError::Kafka {
                    what: format!(
                        "findings topic {topic} partition {partition}: read to offset {reached} of {high} in {READ_LIMIT:?}"
                    ),
                    source: rdkafka::error::KafkaError::NoMessageReceived,
                });
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                None => {
                    // Deleted by the topic's retention since the read began (the reader
                    // would wait at the partition's end for them): on from what is kept.
                    let mut moved = false;
                    for (partition, (reached, _)) in reading.iter_mut() {
                        if let Some(low) = self.first_kept(topic, *partition).filter(|&low| low > *reached) {
                            *reached = low;
                            moved = true;
                        }
                    }
                    reading.retain(|_, (reached, high)| reached < high);
                    if moved && !reading.is_empty() {
                        self.assign_all(topic, &reading)?;
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, topic, "reading the findings topic; retrying"),
                // Only the partitions asked for (nothing of an earlier read's is kept).
                Some(Ok(m)) if m.topic() == topic => {
                    let partition = m.partition();
                    let Some((reached, high)) = reading.get_mut(&partition) else { continue };
                    *reached = m.offset() + 1;
                    let done = *reached >= *high;
                    if let (Some(id), Some((ids, _))) = (m.payload().and_then(finding_id), out.get_mut(&partition)) {
                        ids.insert(id);
                    }
                    if done {
                        reading.remove(&partition);
                    }
                }
                Some(Ok(_)) => {}
            }
        }
        Ok(out)
    }

    /// The timestamp (milliseconds since the epoch) of the message at `offset` of
    /// `topic`'s partition `partition`; `None` if it has none or does not come in time.
    pub fn timestamp_at(&self, topic: &str, partition: i32, offset: i64) -> Result<Option<i64>, KafkaError> {
        self.assign(topic, partition, offset)?;
        let started = Instant::now();
        while started.elapsed() < CALL_TIMEOUT {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.topic() == topic && m.partition() == partition && m.offset() >= offset => {
                    return Ok(m.timestamp().to_millis());
                }
                Some(Err(e)) => tracing::warn!(error = %e, topic, partition, "reading a message's timestamp; retrying"),
                // Deleted by the topic's retention meanwhile: it has no timestamp to give.
                None if self.first_kept(topic, partition).is_some_and(|low| low > offset) => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Stops reading until the next read: a reader kept between assignments would
    /// otherwise go on fetching its last partition into its queue.
    pub fn release(&self) {
        if let Err(e) = self.consumer.unassign() {
            tracing::debug!(error = %e, "cannot unassign the findings reader");
        }
    }

    /// Reads each partition of `reading` on from where it is read to.
    fn assign_all(&self, topic: &str, reading: &BTreeMap<i32, (i64, i64)>) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (partition, (reached, _)) in reading {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*reached))
                .map_err(KafkaError::kafka("cannot list the partition"))?;
        }
        self.consumer.assign(&tpl).map_err(KafkaError::kafka(format!("cannot read {topic}")))
    }

    fn assign(&self, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(KafkaError::kafka("cannot list the partition"))?;
        self.consumer.assign(&tpl).map_err(KafkaError::kafka(format!("cannot read {topic} partition {partition}")))
    }

    /// The partition's first kept offset now (`None` if the broker does not answer).
    fn first_kept(&self, topic: &str, partition: i32) -> Option<i64> {
        self.consumer.fetch_watermarks(topic, partition, CALL_TIMEOUT).ok().map(|(low, _)| low)
    }
}

fn finding_id(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    v.get("finding_id").and_then(Value::as_str).map(str::to_string)
}
