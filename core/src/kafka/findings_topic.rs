//! The findings topic: partitioned like the input (a partition's findings go to the same
//! partition number, keyed by their DeviceId), each finding once.
//!
//! Finding ids are deterministic (a hash of the detector, its version and the input
//! rows), so a node that takes a partition over — after a crash, a rebalance, or its own
//! restart between producing and recording that it did — first reads the ids that
//! partition of the findings topic already holds, and produces only the others. A node
//! given back a partition it held before reads on from where it stopped reading: another
//! node may have owned it in between, even across what looked like an orderly rebalance
//! (a member busy through a rebalance is given partitions in its absence).

use super::partition::Partition;
use super::split::{send, Deliveries};
use super::{KafkaError, KafkaSettings, CALL_TIMEOUT, READER};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How long reading a findings partition to its end may take before the node gives up
/// on this assignment (and is assigned it again).
const READ_LIMIT: Duration = Duration::from_secs(120);

/// Reads finding ids back from the findings topic: one client for every partition an
/// assignment gives this node (a client per partition would each connect anew, inside the
/// rebalance callback).
pub struct FindingsReader {
    consumer: BaseConsumer,
}

impl FindingsReader {
    pub fn new(kafka: &KafkaSettings) -> Result<FindingsReader, KafkaError> {
        let consumer = kafka.client(READER).create().map_err(|source| KafkaError::Client {
            what: "findings reader",
            brokers: kafka.brokers.clone(),
            source,
        })?;
        Ok(FindingsReader { consumer })
    }

    /// The finding ids in partition `partition` of `topic` from offset `from` (or its first
    /// kept offset, if later) to its end; and that end, to read on from next time. A
    /// partition that ends before `from` (the topic created again, or its log cut back) is
    /// read from its start.
    pub fn read(&self, topic: &str, partition: i32, from: i64) -> Result<(HashSet<String>, i64), KafkaError> {
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
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(KafkaError::kafka("cannot list the findings partition"))?;
        self.consumer.assign(&tpl).map_err(KafkaError::kafka(format!("cannot read findings topic {topic}")))?;
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
                None => {}
                Some(Err(e)) => tracing::warn!(error = %e, topic, partition, "reading the findings topic; retrying"),
                // Only the partition asked for (nothing of an earlier read's is kept).
                Some(Ok(m)) if m.partition() == partition => {
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
}

fn finding_id(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    v.get("finding_id").and_then(Value::as_str).map(str::to_string)
}

/// Produces the partition's findings not yet in the topic, waits until every one is
/// acknowledged, and moves the partition's topic cursor past them. Returns how many.
pub(crate) fn produce_new(
    producer: &BaseProducer<Deliveries>,
    topic: &str,
    p: &mut Partition,
) -> Result<u64, KafkaError> {
    let from = p.topic_cursor()?;
    let mut next = from;
    let mut produced = 0;
    let mut sent: Vec<String> = Vec::new();
    for item in p.store.outbox_from(from) {
        let (seq, json) = item?;
        next = seq + 1;
        let v: Value = match serde_json::from_slice(&json) {
            Ok(v) => v,
            Err(e) => {
                return Err(KafkaError::Store(crate::error::StoreError::Corrupt(format!(
                    "finding at outbox sequence {seq} of {} is not JSON: {e}",
                    p.dir.display()
                ))))
            }
        };
        let Some(id) = v.get("finding_id").and_then(Value::as_str) else { continue };
        if !p.emitted.insert(id.to_string()) {
            continue;
        }
        sent.push(id.to_string());
        let device = v.get("device_id").and_then(Value::as_str).unwrap_or_default();
        send(producer, BaseRecord::to(topic).partition(p.partition).key(device).payload(&json))?;
        produced += 1;
    }
    if next == from {
        return Ok(0);
    }
    if produced > 0 {
        let flushed = producer.flush(Duration::from_secs(120));
        let failed = producer.context().take_failures();
        if flushed.is_err() || failed.is_some() {
            // Not in the topic for sure: produced again next round.
            for id in &sent {
                p.emitted.remove(id);
            }
            let first = failed.or_else(|| flushed.err().map(|e| e.to_string())).unwrap_or_default();
            return Err(KafkaError::FindingsNotAcknowledged { first });
        }
    }
    p.set_topic_cursor(next)?;
    Ok(produced)
}
