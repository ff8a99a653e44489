//! `lookout-kafka-mock`: librdkafka's mock cluster for Lookout's Kafka tests (test-only;
//! no real Kafka can be installed where they run).
//!
//! - `serve --brokers N --topic NAME:PARTITIONS …`: starts N brokers on 127.0.0.1,
//!   creates the topics, prints the bootstrap servers on one line, then obeys lines on
//!   stdin: `down <broker id>`, `up <broker id>`; it stops at end of input.
//! - `produce --brokers B --topic T [--per-message N] [--compression lz4|gzip|none]
//!   FILE…`: sends each JSONL file's rows as Streaming-API records (`category` from the
//!   file's name), N per `{"records":[…]}` message, unkeyed, as Defender's export does.
//! - `produce-raw --brokers B --topic T FILE`: each line of the file as one message,
//!   as it is (bad input for the split).
//! - `consume --brokers B --topic T`: prints every message of every partition, from the
//!   beginning to the end, one per line as `<partition>\t<payload>`.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("produce") => produce(&args[1..]),
        Some("produce-raw") => produce_raw(&args[1..]),
        Some("consume") => consume(&args[1..]),
        _ => Err("usage: lookout-kafka-mock serve|produce|consume … (see the source's header)".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lookout-kafka-mock: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` pairs and the remaining words.
fn options(args: &[String]) -> (Vec<(String, String)>, Vec<String>) {
    let (mut opts, mut rest) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.strip_prefix("--") {
            Some(name) => opts.push((name.to_string(), it.next().cloned().unwrap_or_default())),
            None => rest.push(a.clone()),
        }
    }
    (opts, rest)
}

fn one(opts: &[(String, String)], name: &str) -> Result<String> {
    opts.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).ok_or_else(|| format!("--{name} is required"))
}

fn serve(args: &[String]) -> Result<()> {
    let (opts, _) = options(args);
    let brokers: i32 = one(&opts, "brokers")?.parse().map_err(|e| format!("--brokers: {e}"))?;
    let cluster = MockCluster::new(brokers).map_err(|e| format!("cannot start the mock cluster: {e}"))?;
    for (_, spec) in opts.iter().filter(|(n, _)| n == "topic") {
        let (name, partitions) =
            spec.split_once(':').ok_or_else(|| format!("--topic {spec}: expected NAME:PARTITIONS"))?;
        let partitions: i32 = partitions.parse().map_err(|e| format!("--topic {spec}: {e}"))?;
        cluster.create_topic(name, partitions, 1).map_err(|e| format!("cannot create {name}: {e}"))?;
    }
    let mut out = std::io::stdout();
    writeln!(out, "{}", cluster.bootstrap_servers()).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let r = match words.as_slice() {
            ["down", id] => {
                id.parse().map_err(|e| format!("{e}")).and_then(|id| cluster.broker_down(id).map_err(|e| e.to_string()))
            }
            ["up", id] => {
                id.parse().map_err(|e| format!("{e}")).and_then(|id| cluster.broker_up(id).map_err(|e| e.to_string()))
            }
            [] => Ok(()),
            _ => Err(format!("unknown command {line:?}")),
        };
        match r {
            Ok(()) => writeln!(out, "ok").map_err(|e| e.to_string())?,
            Err(e) => writeln!(out, "error {e}").map_err(|e| e.to_string())?,
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn produce(args: &[String]) -> Result<()> {
    let (opts, files) = options(args);
    let topic = one(&opts, "topic")?;
    let per: usize = one(&opts, "per-message").unwrap_or_else(|_| "20".into()).parse().map_err(|e| format!("{e}"))?;
    // The mock keeps only the newest ~5 MB of a partition: compressed, more rows fit
    // (gzip about twice as many as lz4, for more CPU on both sides).
    let compression = one(&opts, "compression").unwrap_or_else(|_| "lz4".into());
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", one(&opts, "brokers")?)
        .set("enable.idempotence", "true")
        .set("compression.type", &compression)
        .create()
        .map_err(|e| format!("producer: {e}"))?;
    let mut sent = 0u64;
    for file in &files {
        let table = std::path::Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .ok_or_else(|| format!("{file}: no table in the file name"))?
            .to_string();
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        let records: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let row: Value = serde_json::from_str(l).map_err(|e| format!("{file}: {e}"))?;
                let time = row.get("Timestamp").cloned().unwrap_or(Value::Null);
                Ok(json!({"time": time, "tenantId": "t", "operationName": "Publish",
                          "category": format!("AdvancedHunting-{table}"), "properties": row}))
            })
            .collect::<Result<_>>()?;
        for chunk in records.chunks(per.max(1)) {
            let payload = serde_json::to_vec(&json!({ "records": chunk })).map_err(|e| e.to_string())?;
            let mut record = BaseRecord::<(), [u8]>::to(&topic).payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        producer.poll(Duration::from_millis(20));
                        record = back;
                    }
                }
            }
            sent += 1;
        }
    }
    producer.flush(Duration::from_secs(60)).map_err(|e| format!("flush: {e}"))?;
    println!("{sent}");
    Ok(())
}

fn produce_raw(args: &[String]) -> Result<()> {
    let (opts, files) = options(args);
    let topic = one(&opts, "topic")?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", one(&opts, "brokers")?)
        .create()
        .map_err(|e| format!("producer: {e}"))?;
    for file in &files {
        let text = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            producer.send(BaseRecord::<(), [u8]>::to(&topic).payload(line)).map_err(|(e, _)| format!("send: {e}"))?;
        }
    }
    producer.flush(Duration::from_secs(60)).map_err(|e| format!("flush: {e}"))?;
    Ok(())
}

fn consume(args: &[String]) -> Result<()> {
    let (opts, _) = options(args);
    let topic = one(&opts, "topic")?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", one(&opts, "brokers")?)
        .set("group.id", "lookout-kafka-mock-reader")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let meta = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).map_err(|e| format!("metadata: {e}"))?;
    let partitions: Vec<i32> = meta.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut out = std::io::stdout().lock();
    for p in partitions {
        let (low, high) =
            consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).map_err(|e| format!("watermarks: {e}"))?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, p, Offset::Offset(low)).map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut reached = low;
        while reached < high {
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!("partition {p}: read to {reached} of {high} in 60 s"));
            }
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.map_err(|e| e.to_string())?;
                reached = m.offset() + 1;
                let payload = String::from_utf8_lossy(m.payload().unwrap_or_default());
                writeln!(out, "{p}\t{payload}").map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}
