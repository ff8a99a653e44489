//! Reading a partition by hand, outside the node's consumer group: the finding ids a
//! findings partition holds (so a node taking a partition over emits none of them again),
//! and a message's timestamp (to check what the broker says of the retention horizon).

use super::{KafkaError, KafkaSettings, CALL_TIMEOUT, READER};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use std::collections::HashSet;
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
        let (low, high) = self.consumer.fetch_watermarks(topic, partition, CALL_TIMEOUT).map_err(KafkaError::kafka(
            format!("cannot read the end of findings topic {topic} partition {partition}"),
        ))?;
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
        let mut ids = HashSet::new();
        if high <= from {
            return Ok((ids, high));
        }
        self.assign(topic, partition, from)?;
        let started = Instant::now();
        let mut reached = from;
        while reached < high {
            if started.elapsed() > READ_LIMIT {
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
                    if let Some(low) = self.first_kept(topic, partition).filter(|&low| low > reached) {
                        self.assign(topic, partition, low)?;
                        reached = low;
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, topic, partition, "reading the findings topic; retrying"),
                // Only the partition asked for (nothing of an earlier read's is kept).
                Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                    reached = m.offset() + 1;
                    if let Some(id) = m.payload().and_then(finding_id) {
                        ids.insert(id);
                    }
                }
                Some(Ok(_)) => {}
            }
        }
        Ok((ids, high))
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
