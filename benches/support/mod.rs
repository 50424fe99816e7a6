//! The raw sled baseline the benches measure beside the store: the same
//! encoded envelopes, one sled key per event, `apply_batch` of 256 with a
//! flush per batch (or none).

#![allow(dead_code, reason = "each bench uses a part")]

use std::time::{Duration, Instant};

use behest_stream::RuntimeEventEnvelope;
use behest_stream::codec;

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
