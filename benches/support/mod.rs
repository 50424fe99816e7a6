//! The raw sled baseline the benches measure beside the store: the same
//! encoded envelopes, one sled key per event, `apply_batch` of 256 with a
//! flush per batch (or none).

#![allow(dead_code, reason = "each bench uses a part")]

use std::time::{Duration, Instant};

use behest_stream::codec;
use behest_stream::{
    AgentEvent, ProviderId, RunId, RunStarted, RuntimeEventEnvelope, RuntimeEventId, TextDelta,
};
use chrono::Utc;

/// The runtime every bench drives the actors on: two workers, like the
/// machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The `RunStarted` a run's first event must be.
pub fn started(run_id: RunId) -> AgentEvent {
    AgentEvent::RunStarted(RunStarted {
        run_id,
        timestamp: Utc::now(),
        session_id: None,
        provider: ProviderId::new("bench"),
        model: "bench".into(),
    })
}

/// A short text delta of `run_id`, the benches' common event.
pub fn delta(run_id: RunId) -> AgentEvent {
    AgentEvent::TextDelta(TextDelta {
        run_id,
        timestamp: Utc::now(),
        delta: "Hello, wor".into(),
    })
}

/// [`delta`] as the envelope at `seq`.
pub fn envelope(run_id: RunId, seq: u64) -> RuntimeEventEnvelope {
    RuntimeEventEnvelope {
        event_id: RuntimeEventId::new(),
        seq,
        run_id,
        session_id: None,
        event: delta(run_id),
        emitted_at: Utc::now(),
    }
}

/// Keys (run, seq big-endian) and encoded values, prepared outside the timing.
pub fn keyed(log: &[RuntimeEventEnvelope]) -> Vec<(Vec<u8>, Vec<u8>)> {
    log.iter()
        .map(|e| {
            let mut key = e.run_id.as_uuid().as_bytes().to_vec();
            key.extend_from_slice(&e.seq.to_be_bytes());
            (key, codec::encode_envelope(e).unwrap())
        })
        .collect()
}

/// Writes `encoded` in batches of 256, flushing after each if `flush`;
/// returns the time it took.
pub fn raw_sled_append(db: &sled::Db, encoded: &[(Vec<u8>, Vec<u8>)], flush: bool) -> Duration {
    let start = Instant::now();
    for chunk in encoded.chunks(256) {
        let mut batch = sled::Batch::default();
        for (key, value) in chunk {
            batch.insert(key.as_slice(), value.as_slice());
        }
        db.apply_batch(batch).unwrap();
        if flush {
            db.flush().unwrap();
        }
    }
    start.elapsed()
}

/// `events` envelopes split evenly over `runs` fresh runs, each run's in
/// seq order from 1.
pub fn runs_of(events: u64, runs: usize) -> Vec<Vec<RuntimeEventEnvelope>> {
    let per_run = events / runs as u64;
    (0..runs)
        .map(|_| {
            let run = RunId::new();
            (1..=per_run).map(|seq| envelope(run, seq)).collect()
        })
        .collect()
}
