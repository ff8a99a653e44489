//! Lookout over Kafka (or Azure Event Hubs' Kafka endpoint), behind the `kafka` feature.
//!
//! - [`split`]: `lookout split`, the repartition step: Streaming-API messages in, records
//!   out keyed by `DeviceId` so that a device's rows all land in one partition (a batch's
//!   records of one device together, in messages of up to 64 KiB). Its progress is its consumer group's committed offsets.
//! - [`node`]: `lookout run --kafka`, one node of a consumer group. Each partition it owns
//!   has its own store ([`partition`]), with the partition's next offset committed in the
//!   same batch as the rows, so the store is exactly-once without Kafka transactions.
//! - [`findings_topic`]: findings produced to the findings topic, partitioned like the
//!   input; [`reader`] reads back the ids a partition's findings topic already holds (a
//!   node taking over a partition emits only what the previous owner did not).
//!
//! Every rule groups or joins within one device, so partitioning by DeviceId splits the
//! work with no state shared between nodes (ARCHITECTURE.md, "Kafka").

pub mod findings_topic;
pub mod node;
mod node_retention;
pub mod partition;
pub mod reader;
mod spare_detectors;
pub mod split;
mod watermarks;

use rdkafka::ClientConfig;
use serde_json::Value;
use std::time::Duration;

/// How to reach the cluster: the bootstrap servers and any librdkafka properties
/// (security for Event Hubs, timeouts).
#[derive(Debug, Clone, Default)]
pub struct KafkaSettings {
    pub brokers: String,
    /// librdkafka properties, set in order after Lookout's own (so they win).
    pub properties: Vec<(String, String)>,
}

impl KafkaSettings {
    /// The properties for Event Hubs' Kafka endpoint: SASL_SSL with PLAIN, the user name
    /// `$ConnectionString` and the namespace's connection string as the password.
    pub fn event_hubs(connection_string: &str) -> Vec<(String, String)> {
        vec![
            ("security.protocol".into(), "SASL_SSL".into()),
            ("sasl.mechanism".into(), "PLAIN".into()),
            ("sasl.username".into(), "$ConnectionString".into()),
            ("sasl.password".into(), connection_string.into()),
        ]
    }

    /// A client's configuration: the brokers, then Lookout's `defaults` for this kind of
    /// client, then the operator's properties (which win).
    pub(crate) fn client(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// A member of a consumer group that commits by hand. A member that dies is noticed (and
/// its partitions handed on) in seconds.
pub(crate) const GROUP_MEMBER: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
    // A node reads a round of messages, then stores them while librdkafka fetches ahead
    // into its queue (`queued.max.messages.kbytes`, 64 MiB of decompressed messages). When
    // that queue fills, librdkafka waits this long before it fetches that partition again:
    // at its default (1 s) a node that had drained the queue sat idle for up to a second,
    // and consumed half as fast as it stores.
    ("fetch.queue.backoff.ms", "10"),
    // A fetch for partitions with nothing new waits this long at the broker for data. A
    // partition assigned meanwhile (a take-over) is fetched only once that fetch is back:
    // at librdkafka's default (500 ms) that wait was most of a failover's replay time, and
    // at 50 ms a partition's first messages still came 70-120 ms after its assignment
    // (0-20 ms at 20). The cost: an idle member asks each broker ~50 times a second.
    ("fetch.wait.max.ms", "20"),
];

/// A reader assigned partitions by hand: it never joins its group and commits nothing
/// (librdkafka wants a group id for an assignment all the same).
pub(crate) const READER: &[(&str, &str)] = &[
    ("group.id", "lookout-reader"),
    ("enable.auto.commit", "false"),
    ("enable.partition.eof", "false"),
    // As for a group member: a reader reads to a partition's end, and a full fetch queue
    // must not stop it for a second.
    ("fetch.queue.backoff.ms", "10"),
    // A take-over reads each partition of the findings topic in turn: the next one is
    // fetched only once the fetch in flight for the last (at its end, so waiting for data)
    // is back. It reads only during a take-over.
    ("fetch.wait.max.ms", "20"),
];

/// Why a Kafka job stopped.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("cannot create the Kafka {what} for {brokers} (check --brokers and the [kafka] properties)")]
    Client {
        what: &'static str,
        brokers: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("Kafka: {what}")]
    Kafka {
        what: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("records were not acknowledged by the brokers ({first}; {produced} produced so far); the input offsets of the batch are not committed, so it is produced again on restart")]
    NotAcknowledged { produced: u64, first: String },
    #[error("findings were not acknowledged by the brokers ({first}); the partition's findings topic cursor did not move, so they are produced again (once) on the next round")]
    FindingsNotAcknowledged { first: String },
    #[error("{topic} partition {partition} ends at offset {end}, but this node's store holds its rows up to offset {stored}: was the topic deleted and created again? Remove {} to read the partition afresh", dir.display())]
    PastTheEnd { topic: String, partition: i32, end: i64, stored: i64, dir: std::path::PathBuf },
    /// Stopped with findings the JSONL could not be given.
    #[error("stopped with {count} findings not written to {} (the findings file could not be written; they are kept in the partitions' stores, out of the findings topic too, and go out at the next start)", file.display())]
    StoppedWithUnwritten { count: u64, file: std::path::PathBuf },
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
    #[error(transparent)]
    Plugins(#[from] crate::plugin::FolderError),
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    #[error(transparent)]
    Detect(#[from] crate::detect::PassError),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    /// Topics not set up as a node needs them; the message says what to do.
    #[error("{0}")]
    Topics(String),
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl KafkaError {
    pub(crate) fn kafka(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError {
        let what = what.into();
        move |source| KafkaError::Kafka { what, source }
    }

    /// Whether a store's long work (building a declared index) ended early because the
    /// node is stopping: not a failure.
    pub fn is_interrupted(&self) -> bool {
        match self {
            KafkaError::Store(e) | KafkaError::Detect(crate::detect::PassError::Store(e)) => e.is_interrupted(),
            _ => false,
        }
    }
}

/// How long a blocking metadata or offsets call may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The DeviceId a record is keyed by: `properties.DeviceId` of a Streaming-API record, or
/// `DeviceId` of a flat row. `None` when absent, empty or not a string.
pub fn device_of(record: &Value) -> Option<&str> {
    let props = record.get("properties").filter(|p| p.is_object()).unwrap_or(record);
    props.get("DeviceId").and_then(Value::as_str).filter(|d| !d.is_empty())
}

/// How many partitions `topic` has, as the brokers say (0: they know no such topic).
pub(crate) fn partitions_of<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<usize, rdkafka::error::KafkaError> {
    let meta = client.fetch_metadata(Some(topic), CALL_TIMEOUT)?;
    Ok(meta.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len()))
}

/// The records of one message: the elements of `{"records":[…]}`, or the message itself.
pub fn records_of(message: Value) -> Vec<Value> {
    match message {
        Value::Object(mut m) if m.get("records").is_some_and(Value::is_array) => match m.remove("records") {
            Some(Value::Array(records)) => records,
            _ => Vec::new(),
        },
        other => vec![other],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_record_is_keyed_by_its_properties_device_id_or_its_own() {
        let envelope = json!({"category": "AdvancedHunting-DeviceFileEvents", "properties": {"DeviceId": "d1"}});
        assert_eq!(device_of(&envelope), Some("d1"));
        assert_eq!(device_of(&json!({"DeviceId": "d2", "Timestamp": "x"})), Some("d2"));
        assert_eq!(device_of(&json!({"properties": {"DeviceId": ""}})), None);
        assert_eq!(device_of(&json!({"properties": {"DeviceId": 5}})), None);
        assert_eq!(device_of(&json!({"properties": {"SHA1": "a"}})), None);
    }

    #[test]
    fn a_batch_message_gives_its_records_and_any_other_message_itself() {
        let batch = json!({"records": [{"a": 1}, {"b": 2}]});
        assert_eq!(records_of(batch), vec![json!({"a": 1}), json!({"b": 2})]);
        assert_eq!(records_of(json!({"a": 1})), vec![json!({"a": 1})]);
        assert_eq!(records_of(json!({"records": "x"})), vec![json!({"records": "x"})]);
        assert_eq!(records_of(json!([1])), vec![json!([1])]);
    }
}
