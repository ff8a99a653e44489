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
use super::split::{send, Deliveries};
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
