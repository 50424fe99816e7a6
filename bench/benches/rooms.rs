//! The hub with many rooms and subscribers, each group beside its raw
//! baseline measured in the same run, so results read as ratios:
//!
//! - `durability`: 1 room, 1 subscriber, text deltas: the hub `Flushed`,
//!   `Buffered`, and on `Config::temporary()` (sled in `/dev/shm`,
//!   `Flushed`), beside raw sled with and without a flush per batch of 256.
//! - `subscribers`: 1 room, `Buffered`, 1, 10, 100 and 1000 subscribers,
//!   beside tokio broadcast with the same fan-out; throughput in deliveries.
//! - `rooms`: 1, 100 and 10,000 rooms of one subscriber, `Buffered`, 300k
//!   events per iteration in all (30 per room at 10,000 rooms), beside raw sled (no flush) writing the
//!   same events interleaved over as many runs; throughput in events.
//! - `size`: a text delta against a 4 KiB tool result, 1 room, 1 subscriber,
//!   `Flushed`, beside raw sled (flushed) of the same envelopes.
//!
//! ```text
//! cargo bench --bench rooms
//! cargo bench --bench rooms -- subscribers     # one group
//! cargo bench --bench rooms -- --quick         # a quick pass
//! ```
//!
//! The workload is `bench/src/workload.rs`, shared with
//! `bench/src/main.rs`. Each iteration opens a fresh hub (or sled database),
//! subscribes (which starts the rooms), then times only first submit to last
//! delivery; opening, subscribing and shutting down are not timed. Iterations
//! assert that nothing was lost or duplicated. About 8 minutes on 2 cores.

use std::time::Duration;

use behest_stream::{Config, Durability, EventHub};
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main, measurement::WallTime,
};
use tokio::runtime::Runtime;

#[path = "../../benches/support/mod.rs"]
mod support;

#[path = "../src/workload.rs"]
mod workload;

use workload::{EventMaker, Probes, Size, Workload};

/// Events per room in the `durability` group.
const DURABILITY_EVENTS: u64 = 50_000;
/// Events per iteration, all rooms together, in the `rooms` group.
const ROOMS_TOTAL_EVENTS: u64 = 300_000;
/// Events per room in the `size` group.
const SIZE_EVENTS: u64 = 5_000;
/// The deadline of one iteration's workload.
const TIMEOUT: Duration = Duration::from_secs(300);

/// Where an iteration's hub keeps its store.
#[derive(Debug, Clone, Copy)]
enum Storage {
    /// A fresh temporary directory.
    Dir,
    /// `Config::temporary()`: sled's own temporary storage (`/dev/shm`).
    Temporary,
}

/// Settings every group shares: few samples of equal iterations (each
/// iteration is long), short warm-up and measurement.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

/// Runs `work` `iters` times, each on a fresh hub; returns the timed parts.
fn hub_iters(runtime: &Runtime, iters: u64, storage: Storage, work: &Workload) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let dir = tempfile::tempdir().expect("temporary directory");
        let base = match storage {
            Storage::Dir => Config::new(dir.path()),
            Storage::Temporary => Config::temporary(),
        };
        let run = runtime.block_on(async {
            let hub = EventHub::open(work.config(base)).await.expect("hub opens");
            let run = workload::run_hub(&hub, work, &Probes::default())
                .await
                .expect("workload runs");
            hub.shutdown().await.expect("hub shuts down");
            run
        });
        assert!(
            run.is_clean(),
            "{} lost, {} duplicated, {} seq mismatches, {} stream errors ({:?}), {}/{} delivered",
            run.lost,
            run.duplicated,
            run.seq_mismatches,
            run.stream_errors,
            run.first_stream_error,
            run.deliveries,
            run.expected_deliveries
        );
        total += run.elapsed;
    }
    total
}

/// Writes `count` envelopes of `size`, interleaved over `rooms` runs, into a
/// fresh sled database `iters` times; returns the timed writes.
fn raw_sled_iters(iters: u64, size: Size, rooms: usize, count: u64, flush: bool) -> Duration {
    let maker = EventMaker::new(size);
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let keyed = workload::raw_sled_keyed(&maker, rooms, count).expect("envelopes encode");
        let dir = tempfile::tempdir().expect("temporary directory");
        let db = workload::open_sled(Some(dir.path())).expect("sled opens");
        total += workload::raw_sled_append(&db, &keyed, flush)
            .expect("sled writes")
            .elapsed;
    }
    total
}

/// Tokio broadcast with the fan-out of `rooms` × `subscribers`, `iters`
/// times; returns the timed parts.
fn broadcast_iters(
    runtime: &Runtime,
    iters: u64,
    rooms: usize,
    subscribers: usize,
    events: u64,
) -> Duration {
    let maker = EventMaker::new(Size::Delta);
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let run = runtime
            .block_on(workload::broadcast_baseline(
                &maker,
                rooms,
                subscribers,
                events,
                TIMEOUT,
            ))
            .expect("broadcast runs");
        assert_eq!(run.lagged, 0, "broadcast receivers lagged");
        total += run.elapsed;
    }
    total
}

/// A workload of `rooms` × `subscribers` × `events`, its size and
/// durability, with the bench's deadline.
fn work(rooms: usize, subscribers: usize, events: u64, size: Size, d: Durability) -> Workload {
    let mut work = Workload::new(rooms, subscribers, events)
        .size(size)
        .durability(d);
    work.timeout = TIMEOUT;
    work
}

/// One room, one subscriber: what durability and the disk cost.
fn durability(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("durability");
    configure(&mut group);
    group.throughput(Throughput::Elements(DURABILITY_EVENTS));
    for (name, storage, d) in [
        ("flushed", Storage::Dir, Durability::Flushed),
        ("buffered", Storage::Dir, Durability::Buffered),
        ("temporary_flushed", Storage::Temporary, Durability::Flushed),
    ] {
        let w = work(1, 1, DURABILITY_EVENTS, Size::Delta, d);
        group.bench_function(BenchmarkId::new("hub", name), |b| {
            b.iter_custom(|iters| hub_iters(&runtime, iters, storage, &w));
        });
    }
    for (name, flush) in [("flush", true), ("no_flush", false)] {
        group.bench_function(BenchmarkId::new("raw_sled", name), |b| {
            b.iter_custom(|iters| raw_sled_iters(iters, Size::Delta, 1, DURABILITY_EVENTS, flush));
        });
    }
    group.finish();
}

/// One room, many subscribers: the hub's fan-out beside tokio broadcast.
fn subscribers(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("subscribers");
    configure(&mut group);
    for subscribers in [1usize, 10, 100, 1000] {
        // About 1M deliveries per iteration (20k at one subscriber), so
        // that both sides run long enough to reach their steady state.
        let events = (1_000_000 / subscribers as u64).clamp(1_000, 20_000);
        group.throughput(Throughput::Elements(events * subscribers as u64));
        let w = work(1, subscribers, events, Size::Delta, Durability::Buffered);
        group.bench_function(BenchmarkId::new("hub", subscribers), |b| {
            b.iter_custom(|iters| hub_iters(&runtime, iters, Storage::Dir, &w));
        });
        group.bench_function(BenchmarkId::new("broadcast", subscribers), |b| {
            b.iter_custom(|iters| broadcast_iters(&runtime, iters, 1, subscribers, events));
        });
    }
    group.finish();
}

/// Many rooms of one subscriber, the same events in all.
fn rooms(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("rooms");
    configure(&mut group);
    group.throughput(Throughput::Elements(ROOMS_TOTAL_EVENTS));
    for rooms in [1usize, 100, 10_000] {
        let events = ROOMS_TOTAL_EVENTS / rooms as u64;
        let w = work(rooms, 1, events, Size::Delta, Durability::Buffered);
        group.bench_function(BenchmarkId::new("hub", rooms), |b| {
            b.iter_custom(|iters| hub_iters(&runtime, iters, Storage::Dir, &w));
        });
        group.bench_function(BenchmarkId::new("raw_sled_no_flush", rooms), |b| {
            b.iter_custom(|iters| {
                raw_sled_iters(iters, Size::Delta, rooms, ROOMS_TOTAL_EVENTS, false)
            });
        });
    }
    group.finish();
}

/// A text delta against a 4 KiB tool result.
fn size(c: &mut Criterion) {
    let runtime = support::runtime();
    let mut group = c.benchmark_group("size");
    configure(&mut group);
    group.throughput(Throughput::Elements(SIZE_EVENTS));
    for size in [Size::Delta, Size::Tool4k] {
        let w = work(1, 1, SIZE_EVENTS, size, Durability::Flushed);
        group.bench_function(BenchmarkId::new("hub_flushed", size.name()), |b| {
            b.iter_custom(|iters| hub_iters(&runtime, iters, Storage::Dir, &w));
        });
        group.bench_function(BenchmarkId::new("raw_sled_flush", size.name()), |b| {
            b.iter_custom(|iters| raw_sled_iters(iters, size, 1, SIZE_EVENTS, true));
        });
    }
    group.finish();
}

criterion_group!(benches, durability, subscribers, rooms, size);
criterion_main!(benches);
