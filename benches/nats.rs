//! Per-run append throughput over the NATS JetStream run log beside the sled
//! store, measured in the same run with the same envelopes and the same
//! shape: each run appends one event at a time (the log's fence allows one
//! append in flight per run), with 1 and with 64 runs appending at once.
//!
//! `cargo bench --features nats --bench nats` with a JetStream server at
//! 127.0.0.1:4222 (or `BEHEST_STREAM_NATS_URL`); without one it says so
//! and measures only sled. Its stream (`BEHEST_BENCH_…`) is deleted after.

use std::time::{Duration, Instant};

mod support;

use behest_stream::nats::{NatsConfig, NatsLog};
use behest_stream::{Config, Durability, RuntimeEventEnvelope, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Events appended per timed iteration.
const EVENTS: u64 = 256;

fn workload(runs: usize) -> Vec<Vec<RuntimeEventEnvelope>> {
    support::runs_of(EVENTS, runs)
}

/// One backend: appends each run's envelopes in order, runs concurrently.
#[derive(Clone)]
enum Backend {
    Sled(Store),
    Nats(Box<NatsLog>),
}

impl Backend {
    async fn append_runs(&self, runs: Vec<Vec<RuntimeEventEnvelope>>) -> Duration {
        let start = Instant::now();
        let tasks: Vec<_> = runs
            .into_iter()
            .map(|log| {
                let backend = self.clone();
                tokio::spawn(async move {
                    match backend {
                        Backend::Sled(store) => {
                            for e in log {
                                store.append(vec![e]).await.unwrap();
                            }
                        }
                        Backend::Nats(nats) => {
                            let mut writer = nats.writer(log[0].run_id).await.unwrap();
                            for e in &log {
                                writer.append(e).await.unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        start.elapsed()
    }
}

fn per_run_append(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("per_run_append");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(EVENTS));

    let dir = tempfile::tempdir().unwrap();
    let store = runtime
        .block_on(Store::open(
            Config::new(dir.path()).durability(Durability::Flushed),
        ))
        .unwrap();
    let mut backends = vec![("sled_flushed", Backend::Sled(store.clone()))];
    let url = std::env::var("BEHEST_STREAM_NATS_URL")
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let mut config = NatsConfig::new(url);
    let unique = uuid::Uuid::now_v7().simple().to_string();
    config.stream = format!("BEHEST_BENCH_{unique}");
    config.prefix = format!("bb{unique}");
    match runtime.block_on(NatsLog::open(&config)) {
        Ok(log) => backends.push(("nats", Backend::Nats(Box::new(log)))),
        Err(error) => eprintln!("no NATS JetStream server, measuring sled only: {error}"),
    }

    for (name, backend) in &backends {
        for runs in [1usize, 64] {
            let id = BenchmarkId::new(*name, format!("{runs}_runs"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| runtime.block_on(backend.append_runs(workload(runs))))
                        .sum()
                })
            });
        }
    }
    group.finish();
    runtime.block_on(store.close()).unwrap();
    if backends.len() > 1 {
        runtime.block_on(async {
            let client = async_nats::connect(config.url.as_str()).await.unwrap();
            async_nats::jetstream::new(client)
                .delete_stream(&config.stream)
                .await
                .unwrap();
        });
    }
}

criterion_group!(benches, per_run_append);
criterion_main!(benches);
