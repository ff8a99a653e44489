//! The ends (high watermarks) of the partitions a node owns, asked of the brokers once a
//! second on a thread of their own: a `ListOffsets` round trip per partition on the work
//! loop held each round up by hundreds of milliseconds (measured against the mock
//! cluster). The work loop reads the last answers; they are for lag and for telling a
//! partition that is behind its end, never for what is stored.

use super::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Shared {
    wanted: BTreeSet<i32>,
    ends: BTreeMap<i32, i64>,
}

pub(crate) struct Watermarks {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watermarks {
    pub(crate) fn start(kafka: &KafkaSettings, topic: &str) -> Watermarks {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, kafka, topic) = (shared.clone(), stop.clone(), kafka.clone(), topic.to_string());
        let thread = std::thread::Builder::new()
            .name("lookout-watermarks".into())
            .spawn(move || ask(&kafka, &topic, &s, &st))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the watermarks thread; lag is not reported"))
            .ok();
        Watermarks { shared, stop, thread }
    }

    /// The partitions to ask about from now on.
    pub(crate) fn track(&self, partitions: impl Iterator<Item = i32>) {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.wanted = partitions.collect();
        let wanted = s.wanted.clone();
        s.ends.retain(|p, _| wanted.contains(p));
    }

    /// The partition's end as last answered.
    pub(crate) fn end(&self, partition: i32) -> Option<i64> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).ends.get(&partition).copied()
    }
}

impl Drop for Watermarks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ask(kafka: &KafkaSettings, topic: &str, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let consumer: BaseConsumer = {
        match kafka.client(super::READER).create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the watermarks client; lag is not reported");
                return;
            }
        }
    };
    let mut last = Instant::now() - EVERY;
    while !stop.load(Ordering::Relaxed) {
        if last.elapsed() < EVERY {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        last = Instant::now();
        let wanted = shared.lock().unwrap_or_else(|p| p.into_inner()).wanted.clone();
        for p in wanted {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                Ok((_, high)) => {
                    shared.lock().unwrap_or_else(|p| p.into_inner()).ends.insert(p, high);
                }
                Err(e) => tracing::debug!(partition = p, error = %e, "cannot read the partition's end now"),
            }
        }
    }
}
