//! The findings topic: partitioned like the input (a partition's findings go to the same
//! partition number, keyed by their DeviceId), each finding once.
//!
//! Finding ids are deterministic (a hash of the detector, its version and the input
//! rows), so a node that takes a partition over — after a crash, a rebalance, or its own
//! restart between producing and recording that it did — first reads the ids that
//! partition of the findings topic already holds ([`super::reader`]), and produces only the others. A node
//! given back a partition it held before reads on from where it stopped reading: another
//! node may have owned it in between, even across what looked like an orderly rebalance
//! (a member busy through a rebalance is given partitions in its absence).

use super::partition::Partition;
use super::split::{try_send, Deliveries, Sent};
use super::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;
use std::time::Duration;

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
        // Emitted by an earlier owner. (What this node produces is not remembered: the
        // results tree holds each id once, and the topic cursor moves past it, so the
        // set stays the size of what was read from the topic, not of everything found.)
        if p.emitted.contains(id) {
            continue;
        }
        let device = v.get("device_id").and_then(Value::as_str).unwrap_or_default();
        let partition = p.partition;
        let record = BaseRecord::to(topic).partition(partition).key(device).payload(json.as_slice());
        if let Sent::TooLarge(bytes) = try_send(producer, record)? {
            // Over the producer's message.max.bytes (a result row with huge cells): the
            // finding goes out without its row, marked, so the topic still says it was
            // emitted and what it is; the whole of it is in the node's JSONL.
            tracing::warn!(finding = id, partition = p.partition, bytes, "a finding is over the producer's message.max.bytes; produced without its row (the JSONL has all of it)");
            let mut slim = v.clone();
            if let Some(o) = slim.as_object_mut() {
                o.insert("row".into(), serde_json::json!({ "lookout_too_large": bytes }));
            }
            let slim = slim.to_string();
            let record = BaseRecord::to(topic).partition(partition).key(device).payload(slim.as_bytes());
            if let Sent::TooLarge(bytes) = try_send(producer, record)? {
                return Err(KafkaError::Kafka {
                    what: format!(
                        "cannot produce finding {id} to {topic} partition {partition}: {bytes} bytes without its \
                         row, over the producer's message.max.bytes (raise it in [kafka.properties])"
                    ),
                    source: rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::error::RDKafkaErrorCode::MessageSizeTooLarge,
                    ),
                });
            }
        }
        produced += 1;
    }
    if next == from {
        return Ok(0);
    }
    if produced > 0 {
        let flushed = producer.flush(Duration::from_secs(120));
        let failed = producer.context().take_failures();
        if flushed.is_err() || failed.is_some() {
            // Not in the topic for sure: produced again next round (the cursor stays).
            let first = failed.or_else(|| flushed.err().map(|e| e.to_string())).unwrap_or_default();
            return Err(KafkaError::FindingsNotAcknowledged { first });
        }
    }
    p.set_topic_cursor(next)?;
    Ok(produced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::split::producer;
    use crate::kafka::KafkaSettings;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{Message, Offset, TopicPartitionList};

    /// A finding too big for the producer (a result row with huge cells) goes out without
    /// its row, marked: the topic still says it was emitted, and the next ones follow.
    #[test]
    fn a_finding_too_big_to_produce_goes_out_without_its_row() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("findings", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let plugins = tempfile::tempdir().unwrap();
        let mut p = Partition::open(dir.path(), "rows", 0, plugins.path()).unwrap();
        let mut pass = p.store.pass_batch();
        let big =
            serde_json::json!({"finding_id": "f1", "device_id": "d1", "row": {"CommandLine": "x".repeat(1_200_000)}});
        pass.put_finding("f1", big.to_string().into_bytes());
        pass.put_finding("f2", br#"{"finding_id":"f2","device_id":"d1","row":{}}"#.to_vec());
        pass.commit().unwrap();
        let kafka = KafkaSettings { brokers: cluster.bootstrap_servers(), properties: Vec::new() };
        let out = producer(&kafka, Deliveries::default()).unwrap();
        assert_eq!(produce_new(&out, "findings", &mut p).unwrap(), 2);

        let consumer: BaseConsumer = kafka.client(&[("group.id", "reader")]).create().unwrap();
        let mut list = TopicPartitionList::new();
        list.add_partition_offset("findings", 0, Offset::Beginning).unwrap();
        consumer.assign(&list).unwrap();
        let mut got: Vec<Value> = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while got.len() < 2 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                got.push(serde_json::from_slice(m.payload().unwrap_or_default()).unwrap());
            }
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["finding_id"], "f1");
        assert!(got[0]["row"]["lookout_too_large"].as_u64().is_some_and(|b| b > 1_200_000), "{}", got[0]["row"]);
        assert_eq!(got[1]["finding_id"], "f2");
        assert_eq!(produce_new(&out, "findings", &mut p).unwrap(), 0, "each once");
        // What the node produces itself is not held in memory: only what an earlier owner
        // emitted is, and that is passed over.
        assert!(p.emitted.is_empty(), "{:?}", p.emitted);
        let mut pass = p.store.pass_batch();
        pass.put_finding("f3", br#"{"finding_id":"f3","device_id":"d1","row":{}}"#.to_vec());
        pass.put_finding("f4", br#"{"finding_id":"f4","device_id":"d1","row":{}}"#.to_vec());
        pass.commit().unwrap();
        p.emitted.insert("f3".into());
        assert_eq!(produce_new(&out, "findings", &mut p).unwrap(), 1, "f4 only");
        assert_eq!(p.emitted.len(), 1);
    }
}
