//! Throughput through one run room with one subscriber, pipelined publisher
//! (up to 256 publishes in flight), under `Flushed` and `Buffered`, beside
//! the store's own append of the same number of events (256 per call, the
//! store's best case) and raw sled (one key per event, batches of 256, a
//! flush per batch), all in the same run.
//!
//! `cargo bench --bench hub`

use std::collections::VecDeque;
use std::time::{Duration, Instant};

mod support;

use support::{delta, envelope, started};

use behest_stream::{Config, Durability, EventHub, Resume, RunId, RuntimeRoom, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;

const EVENTS: u64 = 1024;
const IN_FLIGHT: usize = 256;

/// Publishes `EVENTS` to a fresh run, pipelined, while one subscriber reads
/// them all; returns the time until the subscriber has the last one.
async fn one_room(hub: &EventHub, durability: Durability) -> Duration {
    let run = RunId::new();
    let mut stream = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        for _ in 0..EVENTS {
            stream.next().await.unwrap().unwrap();
        }
    });
    let mut pending = VecDeque::with_capacity(IN_FLIGHT);
    for i in 0..EVENTS {
        // A run starts with RunStarted (the hub checks the order).
        let event = if i == 0 { started(run) } else { delta(run) };
        pending.push_back(hub.submit_with(event, durability).await.unwrap());
        if pending.len() == IN_FLIGHT {
            pending.pop_front().unwrap().await.unwrap();
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    reader.await.unwrap();
    start.elapsed()
}

fn room_throughput(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("one_room_one_subscriber");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(EVENTS));

    for durability in [Durability::Flushed, Durability::Buffered] {
        let dir = tempfile::tempdir().unwrap();
        let hub = runtime
            .block_on(EventHub::open(Config::new(dir.path())))
            .unwrap();
        group.bench_function(BenchmarkId::new("hub", format!("{durability:?}")), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| runtime.block_on(one_room(&hub, durability)))
                    .sum()
            })
        });
        runtime.block_on(hub.shutdown()).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let store = runtime
            .block_on(Store::open(Config::new(dir.path())))
            .unwrap();
        group.bench_function(
            BenchmarkId::new("store_256_per_append", format!("{durability:?}")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let run = RunId::new();
                        let log: Vec<_> = (1..=EVENTS).map(|seq| envelope(run, seq)).collect();
                        let start = Instant::now();
                        runtime.block_on(async {
                            for chunk in log.chunks(256) {
                                store.append_with(chunk.to_vec(), durability).await.unwrap();
                            }
                        });
                        total += start.elapsed();
                    }
                    total
                })
            },
        );
        runtime.block_on(store.close()).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    group.bench_function(BenchmarkId::new("sled_raw", "batch_256_flush"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let run = RunId::new();
                let log: Vec<_> = (1..=EVENTS).map(|seq| envelope(run, seq)).collect();
                total += support::raw_sled_append(&db, &support::keyed(&log), true);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, room_throughput);
criterion_main!(benches);
