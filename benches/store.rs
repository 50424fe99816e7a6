//! Store append throughput by durability and number of concurrent appenders,
//! beside a raw sled baseline measured in the same run: the same encoded
//! envelopes written one key per event, `apply_batch` of 256 plus a flush
//! per batch (or no flush, for the buffered baseline).
//!
//! `cargo bench --bench store`. Read the store's figures as ratios to
//! `sled_raw` on the same machine, in the same run.

use std::time::{Duration, Instant};

mod support;

use behest_stream::{Config, Durability, RuntimeEventEnvelope, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Events appended per timed iteration.
const EVENTS: u64 = 256;

fn workload(appenders: usize) -> Vec<Vec<RuntimeEventEnvelope>> {
    support::runs_of(EVENTS, appenders)
}

fn store_append(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("store_append");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(EVENTS));

    for durability in [Durability::Flushed, Durability::Buffered] {
        let dir = tempfile::tempdir().unwrap();
        let store = runtime
            .block_on(Store::open(Config::new(dir.path()).durability(durability)))
            .unwrap();
        for appenders in [1usize, 64] {
            let id = BenchmarkId::new(format!("{durability:?}"), format!("{appenders}_appenders"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let runs = workload(appenders);
                        total += runtime.block_on(async {
                            let start = Instant::now();
                            let tasks: Vec<_> = runs
                                .into_iter()
                                .map(|log| {
                                    let store = store.clone();
                                    tokio::spawn(async move {
                                        for envelope in log {
                                            store.append(vec![envelope]).await.unwrap();
                                        }
                                    })
                                })
                                .collect();
                            for task in tasks {
                                task.await.unwrap();
                            }
                            start.elapsed()
                        });
                    }
                    total
                })
            });
        }
        runtime.block_on(store.close()).unwrap();
    }

    // Raw baseline: the same encoded envelopes, one key per event.
    for flush in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let name = if flush { "flush_per_batch" } else { "no_flush" };
        group.bench_function(BenchmarkId::new("sled_raw", name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let encoded = support::keyed(&workload(1).concat());
                    total += support::raw_sled_append(&db, &encoded, flush);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, store_append);
criterion_main!(benches);
