//! The workload behind `bench/src/main.rs` and `bench/benches/rooms.rs`, and the
//! baselines they are read against, all measured by this one module.
//!
//! ```text
//! cargo run --release -p behest-stream-bench -- --help
//! cargo bench --bench rooms
//! ```
//!
//! [`run_hub`] drives an open [`EventHub`]: `rooms` fresh runs, each with
//! `subscribers` subscriptions made with [`Resume::FromStart`] before the
//! clock starts (so every room actor is spawned outside the timed part), and
//! one publisher task per room submitting `events` events (`events - 1` of
//! the chosen [`Size`], then a terminal `RunCompleted`), pipelined with up to
//! `in_flight` publishes outstanding per room and, optionally, paced to a
//! total rate. Each subscriber reads its stream to the end and checks the
//! seqs (lost, duplicated or out of order) and the publish-to-delivery
//! latency of every envelope. What is timed runs from the first submit to
//! the last delivery.
//!
//! The publishers build each event inside the timed part, as a producer
//! would. For a text delta that is nothing; for `tool4k` it is a deep clone
//! of a 64-row JSON value, about as costly as the owned envelope each
//! subscriber's stream yields (the broadcast baseline, which clones one
//! envelope per receive, shows what one clone costs). The raw sled baseline
//! writes bytes encoded beforehand and pays neither the building nor the
//! encoding.
//!
//! Heap figures count bytes allocated and not yet freed, not resident
//! memory: sled reserves large buffers it has not touched yet, so the live
//! heap can be above the RSS.
//!
//! The baselines: [`raw_sled_append`] (the same encoded envelopes straight
//! into sled, one key per event, `apply_batch` of 256, a flush per batch or
//! none), [`broadcast_baseline`] (tokio broadcast channels with the same
//! fan-out, each receive cloning an envelope, as the hub's streams yield
//! owned envelopes) and [`flush_latency`] (what one sled flush costs).
//!
//! Every wait has a deadline: a run that does not finish within
//! [`Workload::timeout`] is an error, never a hang.

#![allow(dead_code, reason = "the example and the bench each use a part")]

use std::borrow::Borrow;
use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use behest_stream::codec;
use behest_stream::{
    AgentEvent, BoxRuntimeEventStream, Config, Durability, EventHub, ProviderId, Resume,
    RunCompleted, RunId, RunStarted, RuntimeEventEnvelope, RuntimeEventId, RuntimeRoom,
    RuntimeStreamError, SharedEventStream, TextDelta, ToolCallStarted, ToolExecutionFinished,
    ToolResult,
};
use chrono::Utc;
use futures_util::{Stream, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Notify, broadcast};
use tokio::task::{JoinHandle, JoinSet};

/// Errors of a workload: anything that went wrong, as a message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Largest latency the histograms hold, in microseconds (10 minutes); larger
/// values are clamped to it.
const MAX_LATENCY_US: u64 = 600_000_000;

/// Histograms the subscribers record into: each subscriber uses one shard
/// (by its index), so a thousand subscribers neither contend on one lock nor
/// carry a histogram each.
const HISTOGRAM_SHARDS: usize = 16;

/// Latencies a subscriber gathers before it takes its shard's lock.
const LATENCY_BATCH: usize = 64;

/// Events the raw sled and broadcast baselines hold at most, by size (the
/// baselines pre-build or pre-encode every event, so this bounds memory).
const BASELINE_CAP_DELTA: u64 = 200_000;
/// As [`BASELINE_CAP_DELTA`], for the 4 KiB tool result.
const BASELINE_CAP_TOOL4K: u64 = 8_192;

/// Writes per `apply_batch` in the raw sled baseline.
const SLED_BATCH: usize = 256;

/// The size of the events published (the terminal event aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Size {
    /// A short text delta (`"Hello, wor"`), the common event of a run.
    #[serde(rename = "delta")]
    #[value(name = "delta")]
    Delta,
    /// A `ToolExecutionFinished` whose result is 64 JSON rows, about 4 KiB
    /// encoded (the shape of `benches/codec.rs`).
    #[serde(rename = "tool4k")]
    #[value(name = "tool4k")]
    Tool4k,
}

impl Size {
    /// The name used on the command line, in tables and in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Size::Delta => "delta",
            Size::Tool4k => "tool4k",
        }
    }

    /// Most events the baselines build for this size.
    pub fn baseline_cap(self) -> u64 {
        match self {
            Size::Delta => BASELINE_CAP_DELTA,
            Size::Tool4k => BASELINE_CAP_TOOL4K,
        }
    }
}

/// The tool call whose results a run of large events carries.
pub const CALL_ID: &str = "call_0123456789";

/// Builds the events of one [`Size`]; the tool result's JSON is built once
/// and cloned per event.
#[derive(Debug, Clone)]
pub struct EventMaker {
    size: Size,
    output: Option<serde_json::Value>,
}

impl EventMaker {
    /// A maker of `size` events.
    pub fn new(size: Size) -> Self {
        let output = (size == Size::Tool4k).then(|| {
            let rows: Vec<_> = (0..64)
                .map(|i| {
                    serde_json::json!({
                        "id": i,
                        "title": format!("result number {i}"),
                        "score": 0.5 + f64::from(i),
                        "tags": ["a", "b"],
                    })
                })
                .collect();
            serde_json::json!({ "rows": rows })
        });
        Self { size, output }
    }

    /// The size it makes.
    pub fn size(&self) -> Size {
        self.size
    }

    /// One event of `run_id` (not terminal): a text delta, or the result of
    /// call [`CALL_ID`].
    pub fn event(&self, run_id: RunId) -> AgentEvent {
        match &self.output {
            None => AgentEvent::TextDelta(TextDelta {
                run_id,
                timestamp: Utc::now(),
                delta: "Hello, wor".into(),
            }),
            Some(output) => AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
                run_id,
                timestamp: Utc::now(),
                call_id: CALL_ID.into(),
                tool_name: "search".into(),
                result: ToolResult::Success {
                    output: output.clone(),
                },
                duration_ms: 42,
            }),
        }
    }

    /// The terminal event of `run_id`.
    pub fn terminal(run_id: RunId) -> AgentEvent {
        AgentEvent::RunCompleted(RunCompleted {
            run_id,
            timestamp: Utc::now(),
            finish_reason: "stop".into(),
            iterations: 1,
        })
    }

    /// Event number `seq` of a run of `events`, in an order the hub's order
    /// check accepts: the first is `RunStarted`, the second (for tool
    /// results) starts the call they refer to, and the last (of a run of
    /// two or more) is terminal.
    pub fn nth(&self, run_id: RunId, seq: u64, events: u64) -> AgentEvent {
        match seq {
            1 => AgentEvent::RunStarted(RunStarted {
                run_id,
                timestamp: Utc::now(),
                session_id: None,
                provider: ProviderId::new("bench"),
                model: "bench".into(),
            }),
            _ if seq == events => Self::terminal(run_id),
            2 if self.output.is_some() => AgentEvent::ToolCallStarted(ToolCallStarted {
                run_id,
                timestamp: Utc::now(),
                call_id: CALL_ID.into(),
                tool_name: "search".into(),
            }),
            _ => self.event(run_id),
        }
    }

    /// [`EventMaker::event`] as the envelope the hub would store at `seq`.
    pub fn envelope(&self, run_id: RunId, seq: u64) -> RuntimeEventEnvelope {
        RuntimeEventEnvelope {
            event_id: RuntimeEventId::new(),
            seq,
            run_id,
            session_id: None,
            event: self.event(run_id),
            emitted_at: Utc::now(),
        }
    }

    /// Bytes of one envelope as stored.
    pub fn encoded_len(&self) -> usize {
        codec::encode_envelope(&self.envelope(RunId::new(), 1)).map_or(0, |bytes| bytes.len())
    }
}

/// What [`run_hub`] drives.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Rooms (runs), each fresh.
    pub rooms: usize,
    /// Subscribers per room.
    pub subscribers: usize,
    /// Events per room, the terminal one included (at least 1).
    pub events: u64,
    /// Size of the events.
    pub size: Size,
    /// Durability of every publish.
    pub durability: Durability,
    /// Publishes in flight per room.
    pub in_flight: usize,
    /// Total events per second across rooms; 0 for as fast as it goes.
    pub rate: f64,
    /// Deadline of the whole run (subscribing, publishing, delivering, and
    /// waiting for eviction).
    pub timeout: Duration,
    /// After the run, wait this long at most for every room of the run to be
    /// evicted (the hub needs a short `idle_timeout`), and read the heap.
    pub evict_within: Option<Duration>,
    /// Subscribe with `EventHub::subscribe_shared` (envelopes shared, not
    /// copied per subscriber) instead of `EventHub::subscribe`.
    pub shared_envelopes: bool,
    /// The runs' ids (`rooms` of them), when another process must know
    /// them before the run; fresh ones otherwise.
    pub run_ids: Option<Arc<[RunId]>>,
}

impl Workload {
    /// `rooms` × `subscribers`, `events` per room: text deltas, `Flushed`,
    /// 256 in flight per room, no rate limit, 5 minutes to finish.
    pub fn new(rooms: usize, subscribers: usize, events: u64) -> Self {
        Self {
            rooms,
            subscribers,
            events,
            size: Size::Delta,
            durability: Durability::Flushed,
            in_flight: 256,
            rate: 0.0,
            timeout: Duration::from_secs(300),
            evict_within: None,
            shared_envelopes: false,
            run_ids: None,
        }
    }

    /// With events of `size`.
    pub fn size(mut self, size: Size) -> Self {
        self.size = size;
        self
    }

    /// With `durability`.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// `base` with room for this workload: enough rooms (four runs' worth)
    /// and enough publishes in flight that every room can have its own
    /// `in_flight` outstanding (at least the default 4096, at most 1 Mi).
    pub fn config(&self, base: Config) -> Config {
        base.durability(self.durability)
            .max_rooms(self.rooms.saturating_mul(4).max(100_000))
            .max_in_flight_publishes(self.default_hub_in_flight())
    }

    /// Enough publishes in flight hub-wide for every room to have its own
    /// `in_flight` outstanding: at least the hub's default 4096, at most
    /// 1 Mi.
    pub fn default_hub_in_flight(&self) -> usize {
        let per_room = self
            .in_flight
            .max(1)
            .min(usize::try_from(self.events).unwrap_or(usize::MAX));
        self.rooms.saturating_mul(per_room).clamp(4096, 1 << 20)
    }

    /// Events published in all.
    pub fn total_events(&self) -> u64 {
        self.rooms as u64 * self.events
    }

    /// Deliveries a lossless run makes.
    pub fn expected_deliveries(&self) -> u64 {
        self.total_events() * self.subscribers as u64
    }
}

/// The `count` runs of a load: the ids given (another process knows them),
/// or fresh ones.
///
/// # Errors
///
/// Ids given for another number of runs.
pub fn run_ids(given: Option<&[RunId]>, count: usize) -> Result<Vec<RunId>, Error> {
    match given {
        Some(ids) if ids.len() == count => Ok(ids.to_vec()),
        Some(ids) => Err(format!("{} run ids for {count} runs", ids.len()).into()),
        None => Ok((0..count).map(|_| RunId::new()).collect()),
    }
}

/// Reads the process's heap, for the example's counting allocator.
#[derive(Debug, Clone, Copy)]
pub struct HeapProbe {
    /// Bytes allocated and not yet freed.
    pub live: fn() -> usize,
    /// Highest `live` since the last `reset_peak`.
    pub peak: fn() -> usize,
    /// Starts a new peak from the current live bytes.
    pub reset_peak: fn(),
}

/// Optional instruments of a run; the default has none (the criterion bench).
#[derive(Debug, Clone, Copy, Default)]
pub struct Probes {
    /// Heap readings, with a counting allocator.
    pub heap: Option<HeapProbe>,
    /// A progress line on stderr every 500 ms.
    pub progress: bool,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// How many latencies were recorded.
    pub samples: u64,
}

impl Latency {
    /// Percentiles of `histogram`, recorded in microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
            samples: histogram.len(),
        }
    }
}

/// Heap readings of a run (with a [`HeapProbe`]), in bytes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HeapReadings {
    /// Live heap before any room of the run started (the run's own
    /// bookkeeping, histograms and timestamps, already allocated).
    pub before_rooms: usize,
    /// Live heap once every room is started and every subscription made.
    pub subscribed: usize,
    /// (`subscribed` − `before_rooms`) ÷ rooms: one active room with its
    /// subscribers.
    pub per_room: f64,
    /// Highest live heap while publishing and delivering.
    pub peak_while_running: usize,
    /// Live heap once every subscriber finished and dropped its stream.
    pub end_of_run: usize,
}

/// What waiting for eviction after a run saw. A room is idle once its
/// subscribers are gone, so with a short idle timeout some rooms of a long
/// run are evicted before the run ends.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Eviction {
    /// Rooms of the run still live when it ended.
    pub rooms_live_before: usize,
    /// Rooms of the run live after the wait (0).
    pub rooms_live_after: usize,
    /// Rooms of any kind live after the wait.
    pub hub_rooms_live_after: usize,
    /// Rooms the hub evicted from the run's start to its end.
    pub evicted_during_run: u64,
    /// Rooms the hub evicted from the run's start to the end of the wait.
    pub evicted_total: u64,
    /// How long the wait took.
    pub waited_s: f64,
    /// Live heap after eviction, with a [`HeapProbe`].
    pub heap_after: Option<usize>,
}

/// The outcome of [`run_hub`].
#[derive(Debug, Clone, Serialize)]
pub struct HubRun {
    /// Rooms.
    pub rooms: usize,
    /// Subscribers per room.
    pub subscribers: usize,
    /// Events published, in all.
    pub events: u64,
    /// Envelopes delivered to subscribers, in all.
    pub deliveries: u64,
    /// Deliveries a lossless run makes.
    pub expected_deliveries: u64,
    /// The total rate the publishers were paced to, if any.
    pub target_rate: Option<f64>,
    /// First submit to last delivery.
    #[serde(skip)]
    pub elapsed: Duration,
    /// `elapsed` in seconds.
    pub elapsed_s: f64,
    /// Events per second, all rooms.
    pub events_per_s: f64,
    /// Events per second, per room.
    pub events_per_s_per_room: f64,
    /// Deliveries per second, all subscribers.
    pub deliveries_per_s: f64,
    /// Seqs a subscriber never got (a gap, or a stream that ended early).
    pub lost: u64,
    /// Deliveries of a seq at or below one already delivered.
    pub duplicated: u64,
    /// Acknowledgements whose seq was not the submit's place in order.
    pub seq_mismatches: u64,
    /// Errors the streams yielded.
    pub stream_errors: u64,
    /// The first of them, for the report.
    pub first_stream_error: Option<String>,
    /// Publish-to-delivery latency: from just before `submit` to the
    /// subscriber holding the envelope.
    pub latency: Latency,
    /// Time to subscribe every subscriber (starting every room); not timed.
    pub subscribe_s: f64,
    /// Heap readings, with a [`HeapProbe`].
    pub heap: Option<HeapReadings>,
    /// Eviction after the run, with [`Workload::evict_within`].
    pub eviction: Option<Eviction>,
}

impl HubRun {
    /// True if every subscriber got every seq exactly once, in order, and
    /// every acknowledgement had its expected seq.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.seq_mismatches == 0
            && self.stream_errors == 0
            && self.deliveries == self.expected_deliveries
    }
}

/// Counters shared by the tasks of one run.
#[derive(Debug, Default)]
struct Shared {
    acknowledged: AtomicU64,
    delivered: AtomicU64,
    /// Nanoseconds from the run's origin to the last delivery.
    last_delivery_ns: AtomicU64,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct SubReport {
    delivered: u64,
    lost: u64,
    duplicated: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Aborts a task when dropped (the progress line on an early return).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Nanoseconds since `origin`, at least 1 (0 means "not yet").
fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Runs `workload` on `hub`; see the module docs for what is timed.
///
/// # Errors
///
/// A subscribe or publish that failed, or the run's deadline passing
/// (with how far it got). Lost or duplicated deliveries are not errors: they
/// are counted in the result ([`HubRun::is_clean`]).
pub async fn run_hub(
    hub: &EventHub,
    workload: &Workload,
    probes: &Probes,
) -> Result<HubRun, Error> {
    let rooms = workload.rooms;
    let subscribers = workload.subscribers;
    let events = workload.events;
    if rooms == 0 || subscribers == 0 || events == 0 {
        return Err(
            "a workload needs at least one room, one subscriber and one event per room".into(),
        );
    }
    let deadline = tokio::time::Instant::now() + workload.timeout;
    let maker = Arc::new(EventMaker::new(workload.size));
    let runs = run_ids(workload.run_ids.as_deref(), rooms)?;
    let event_slots = usize::try_from(events)?;

    // The run's own bookkeeping, allocated before the first heap reading so
    // that the per-room figure is the hub's alone.
    let submitted: Vec<Arc<[AtomicU64]>> = runs
        .iter()
        .map(|_| (0..event_slots).map(|_| AtomicU64::new(0)).collect())
        .collect();
    let histogram = || Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3);
    let shards: Arc<[Mutex<Histogram<u64>>]> = (0..HISTOGRAM_SHARDS)
        .map(|_| histogram().map(Mutex::new))
        .collect::<Result<_, _>>()?;
    let mut merged = histogram()?;
    let mut reports: Vec<SubReport> = Vec::with_capacity(rooms * subscribers);
    let shared = Arc::new(Shared::default());
    let ours: HashSet<RuntimeRoom> = runs.iter().map(|&run| RuntimeRoom::Run(run)).collect();
    let evicted_at_start = match workload.evict_within {
        Some(_) => hub.stats().await?.rooms_evicted,
        None => 0,
    };
    let heap_before = probes.heap.map(|heap| (heap.live)());

    // Every subscription first: this starts every room.
    let subscribing = Instant::now();
    let streams =
        subscribe_all(hub, &runs, subscribers, workload.shared_envelopes, deadline).await?;
    let subscribe_s = subscribing.elapsed().as_secs_f64();
    let heap_subscribed = probes.heap.map(|heap| (heap.live)());

    let origin = Instant::now();
    let mut subscriber_tasks = JoinSet::new();
    for (index, (room, stream)) in streams.into_iter().enumerate() {
        let tally = Tally {
            submitted: Arc::clone(&submitted[room]),
            origin,
            events,
            shards: Arc::clone(&shards),
            shard: index % HISTOGRAM_SHARDS,
            shared: Arc::clone(&shared),
        };
        match stream {
            SubStream::Owned(stream) => subscriber_tasks.spawn(subscriber(stream, tally)),
            SubStream::Shared(stream) => subscriber_tasks.spawn(subscriber(stream, tally)),
        };
    }
    if let Some(heap) = probes.heap {
        (heap.reset_peak)();
    }

    let pace_origin = tokio::time::Instant::now();
    let mut publisher_tasks = JoinSet::new();
    for (room, &run_id) in runs.iter().enumerate() {
        // Event i of the whole run (round robin over rooms) is due at
        // i / rate: deadlines from one origin, so pacing never drifts.
        let pace = (workload.rate > 0.0).then(|| Pace {
            origin: pace_origin,
            first: Duration::from_secs_f64(room as f64 / workload.rate),
            every: Duration::from_secs_f64(rooms as f64 / workload.rate),
        });
        publisher_tasks.spawn(publisher(Publisher {
            hub: hub.clone(),
            run_id,
            events,
            maker: Arc::clone(&maker),
            durability: workload.durability,
            in_flight: workload.in_flight.max(1),
            submitted: Arc::clone(&submitted[room]),
            origin,
            pace,
            shared: Arc::clone(&shared),
        }));
    }

    let expected = workload.expected_deliveries();
    let total_events = workload.total_events();
    let done = Arc::new(Notify::new());
    let progress = probes.progress.then(|| {
        AbortOnDrop(tokio::spawn(progress_line(
            Arc::clone(&shared),
            Arc::clone(&done),
            origin,
            expected,
            subscribers as u64,
        )))
    });
    let timed_out = |what: &str| -> Error {
        format!(
            "timed out after {:?} waiting for {what}: {}/{expected} delivered, {}/{total_events} acknowledged",
            workload.timeout,
            shared.delivered.load(Ordering::Relaxed),
            shared.acknowledged.load(Ordering::Relaxed),
        )
        .into()
    };

    let mut seq_mismatches = 0;
    while let Some(joined) = tokio::time::timeout_at(deadline, publisher_tasks.join_next())
        .await
        .map_err(|_| timed_out("the publishers"))?
    {
        seq_mismatches += joined??;
    }
    while let Some(joined) = tokio::time::timeout_at(deadline, subscriber_tasks.join_next())
        .await
        .map_err(|_| timed_out("the subscribers"))?
    {
        reports.push(joined?);
    }
    done.notify_one();
    if let Some(mut progress) = progress {
        // It prints its last line and ends at once.
        let _ = tokio::time::timeout_at(deadline, &mut progress.0).await;
    }

    let first_submit_ns = submitted
        .iter()
        .map(|times| times[0].load(Ordering::Acquire))
        .min()
        .unwrap_or(0);
    let last_delivery_ns = shared.last_delivery_ns.load(Ordering::Acquire);
    let elapsed = Duration::from_nanos(last_delivery_ns.saturating_sub(first_submit_ns));
    let heap_peak = probes.heap.map(|heap| (heap.peak)());
    let heap_end = probes.heap.map(|heap| (heap.live)());

    for shard in shards.iter() {
        merged.add(&*shard.lock().unwrap_or_else(PoisonError::into_inner))?;
    }
    let mut run = HubRun {
        rooms,
        subscribers,
        events: total_events,
        deliveries: reports.iter().map(|r| r.delivered).sum(),
        expected_deliveries: expected,
        target_rate: (workload.rate > 0.0).then_some(workload.rate),
        elapsed,
        elapsed_s: elapsed.as_secs_f64(),
        events_per_s: 0.0,
        events_per_s_per_room: 0.0,
        deliveries_per_s: 0.0,
        lost: reports.iter().map(|r| r.lost).sum(),
        duplicated: reports.iter().map(|r| r.duplicated).sum(),
        seq_mismatches,
        stream_errors: reports.iter().map(|r| r.errors).sum(),
        first_stream_error: reports.iter().find_map(|r| r.first_error.clone()),
        latency: Latency::of(&merged),
        subscribe_s,
        heap: None,
        eviction: None,
    };
    let seconds = run.elapsed_s.max(1e-9);
    run.events_per_s = run.events as f64 / seconds;
    run.events_per_s_per_room = run.events_per_s / rooms as f64;
    run.deliveries_per_s = run.deliveries as f64 / seconds;
    if let (Some(before), Some(subscribed), Some(peak), Some(end)) =
        (heap_before, heap_subscribed, heap_peak, heap_end)
    {
        run.heap = Some(HeapReadings {
            before_rooms: before,
            subscribed,
            per_room: (subscribed as f64 - before as f64) / rooms as f64,
            peak_while_running: peak,
            end_of_run: end,
        });
    }
    if let Some(within) = workload.evict_within {
        let eviction_deadline = deadline.min(tokio::time::Instant::now() + within);
        run.eviction =
            Some(await_eviction(hub, &ours, evicted_at_start, probes, eviction_deadline).await?);
    }
    // The bookkeeping lives until here, so that the heap after eviction is
    // read with the same allocations as the heap before the rooms.
    drop((submitted, shards, ours));
    Ok(run)
}

/// Subscribes `subscribers` times to each run, from the start, a few at a
/// time; returns each stream with its room's index.
async fn subscribe_all(
    hub: &EventHub,
    runs: &[RunId],
    subscribers: usize,
    shared_envelopes: bool,
    deadline: tokio::time::Instant,
) -> Result<Vec<(usize, SubStream)>, Error> {
    let count = runs.len() * subscribers;
    let attach = futures_util::stream::iter(0..count)
        .map(|i| {
            let room = i / subscribers.max(1);
            let target = RuntimeRoom::Run(runs[room]);
            async move {
                let stream = if shared_envelopes {
                    SubStream::Shared(hub.subscribe_shared(target, Resume::FromStart).await?)
                } else {
                    SubStream::Owned(hub.subscribe(target, Resume::FromStart).await?)
                };
                Ok::<_, behest_stream::HubError>((room, stream))
            }
        })
        .buffered(32)
        .collect::<Vec<_>>();
    let attached = tokio::time::timeout_at(deadline, attach)
        .await
        .map_err(|_| format!("timed out subscribing {count} subscribers"))?;
    let mut streams = Vec::with_capacity(count);
    for result in attached {
        streams.push(result?);
    }
    Ok(streams)
}

/// When a paced publisher submits: its event `seq` at
/// `origin + first + (seq - 1) × every`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    origin: tokio::time::Instant,
    first: Duration,
    every: Duration,
}

/// One room's publisher.
struct Publisher {
    hub: EventHub,
    run_id: RunId,
    events: u64,
    maker: Arc<EventMaker>,
    durability: Durability,
    in_flight: usize,
    submitted: Arc<[AtomicU64]>,
    origin: Instant,
    pace: Option<Pace>,
    shared: Arc<Shared>,
}

/// Submits the room's events in order, up to `in_flight` outstanding;
/// returns how many acknowledgements had another seq than their place.
async fn publisher(p: Publisher) -> Result<u64, Error> {
    let mut pending = VecDeque::with_capacity(p.in_flight);
    let mut mismatches = 0;
    let mut settle = |expected: u64, envelope: Arc<RuntimeEventEnvelope>| {
        p.shared.acknowledged.fetch_add(1, Ordering::Relaxed);
        if envelope.seq != expected {
            mismatches += 1;
        }
    };
    for seq in 1..=p.events {
        if let Some(pace) = p.pace {
            let due = pace.every.mul_f64((seq - 1) as f64) + pace.first;
            tokio::time::sleep_until(pace.origin + due).await;
        }
        let event = p.maker.nth(p.run_id, seq, p.events);
        // `seq` ≥ 1 and ≤ events, the length of `submitted`.
        p.submitted[(seq - 1) as usize].store(nanos_since(p.origin), Ordering::Release);
        pending.push_back((seq, p.hub.submit_with(event, p.durability).await?));
        while pending.len() >= p.in_flight {
            let Some((expected, publish)) = pending.pop_front() else {
                break;
            };
            settle(expected, publish.shared().await?);
        }
    }
    for (expected, publish) in pending {
        settle(expected, publish.shared().await?);
    }
    Ok(mismatches)
}

/// A subscription of either kind.
enum SubStream {
    Owned(BoxRuntimeEventStream),
    Shared(SharedEventStream),
}

/// Where a subscriber checks and records what it receives.
struct Tally {
    submitted: Arc<[AtomicU64]>,
    origin: Instant,
    events: u64,
    shards: Arc<[Mutex<Histogram<u64>>]>,
    shard: usize,
    shared: Arc<Shared>,
}

/// Reads `stream` to its end, checking seqs and recording latencies.
async fn subscriber<E: Borrow<RuntimeEventEnvelope>>(
    mut stream: impl Stream<Item = Result<E, RuntimeStreamError>> + Unpin,
    tally: Tally,
) -> SubReport {
    let Tally {
        submitted,
        origin,
        events,
        shards,
        shard,
        shared,
    } = tally;
    let mut report = SubReport::default();
    let mut next = 1u64;
    let mut batch = [0u64; LATENCY_BATCH];
    let mut batched = 0;
    let flush = |batch: &[u64]| {
        let mut histogram = shards[shard].lock().unwrap_or_else(PoisonError::into_inner);
        for &us in batch {
            histogram.saturating_record(us);
        }
        shared
            .delivered
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
    };
    let mut last_ns = 0;
    while let Some(item) = stream.next().await {
        let envelope = match item {
            Ok(envelope) => envelope,
            Err(error) => {
                report.errors += 1;
                report.first_error.get_or_insert_with(|| error.to_string());
                continue;
            }
        };
        let now = nanos_since(origin);
        last_ns = now;
        report.delivered += 1;
        let seq = envelope.borrow().seq;
        match seq.cmp(&next) {
            std::cmp::Ordering::Equal => next += 1,
            std::cmp::Ordering::Greater => {
                report.lost += seq - next;
                next = seq + 1;
            }
            std::cmp::Ordering::Less => report.duplicated += 1,
        }
        let sent = usize::try_from(seq.wrapping_sub(1))
            .ok()
            .and_then(|i| submitted.get(i))
            .map_or(0, |slot| slot.load(Ordering::Acquire));
        if sent != 0 {
            batch[batched] = now.saturating_sub(sent) / 1000;
            batched += 1;
            if batched == LATENCY_BATCH {
                flush(&batch);
                batched = 0;
            }
        }
    }
    flush(&batch[..batched]);
    if next <= events {
        report.lost += events + 1 - next;
    }
    shared.last_delivery_ns.fetch_max(last_ns, Ordering::AcqRel);
    report
}

/// Prints `delivered/expected, events/s so far` on stderr every 500 ms,
/// overwriting itself, until `done` is notified; then its last line and a
/// newline. Events/s counts deliveries ÷ subscribers per room (a pipelined
/// publisher collects its acknowledgements late).
async fn progress_line(
    shared: Arc<Shared>,
    done: Arc<Notify>,
    origin: Instant,
    expected: u64,
    subscribers: u64,
) {
    use std::io::Write as _;
    let mut ticks = tokio::time::interval(Duration::from_millis(500));
    ticks.tick().await;
    loop {
        let finished = tokio::select! {
            _ = ticks.tick() => false,
            () = done.notified() => true,
        };
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let seconds = origin.elapsed().as_secs_f64().max(1e-9);
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "\r  {delivered}/{expected} delivered, {:.0} events/s so far   ",
            delivered as f64 / subscribers.max(1) as f64 / seconds
        );
        if finished {
            let _ = writeln!(stderr);
            return;
        }
        let _ = stderr.flush();
    }
}

/// Waits, polling the hub's stats, until no room of `ours` is live.
async fn await_eviction(
    hub: &EventHub,
    ours: &HashSet<RuntimeRoom>,
    evicted_at_start: u64,
    probes: &Probes,
    deadline: tokio::time::Instant,
) -> Result<Eviction, Error> {
    let started = Instant::now();
    let live_of_ours = |stats: &behest_stream::HubStats| {
        stats
            .rooms
            .iter()
            .filter(|room| ours.contains(&room.room))
            .count()
    };
    let first = hub.stats().await?;
    let rooms_live_before = live_of_ours(&first);
    loop {
        let stats = hub.stats().await?;
        let left = live_of_ours(&stats);
        if left == 0 {
            return Ok(Eviction {
                rooms_live_before,
                rooms_live_after: left,
                hub_rooms_live_after: stats.rooms.len(),
                evicted_during_run: first.rooms_evicted - evicted_at_start,
                evicted_total: stats.rooms_evicted - evicted_at_start,
                waited_s: started.elapsed().as_secs_f64(),
                heap_after: probes.heap.map(|heap| (heap.live)()),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{left} of {} rooms still live {:.1} s after the run (is the idle timeout short?)",
                ours.len(),
                started.elapsed().as_secs_f64()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keys and encoded values for sled, in write order.
pub type Keyed = Vec<(Vec<u8>, Vec<u8>)>;

/// The raw sled baseline's outcome.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RawSled {
    /// Events written.
    pub events: u64,
    /// Whether each batch was flushed.
    pub flushed: bool,
    /// Time to write them all.
    #[serde(skip)]
    pub elapsed: Duration,
    /// Events per second.
    pub events_per_s: f64,
    /// The `flush` call after each batch of 256 (the same envelopes), when
    /// flushed: what one flush of a group commit's worth of events costs.
    pub batch_flush: Option<FlushTimes>,
}

/// `count` envelopes of `maker`'s size spread round robin over `rooms`
/// fresh runs, as the hub's publishers interleave them: keys (run uuid, seq
/// big-endian) and values (encoded as stored), prepared before any timing.
///
/// # Errors
///
/// An envelope that does not encode.
pub fn raw_sled_keyed(maker: &EventMaker, rooms: usize, count: u64) -> Result<Keyed, Error> {
    let runs: Vec<RunId> = (0..rooms.max(1)).map(|_| RunId::new()).collect();
    (0..count)
        .map(|i| {
            let run_id = runs[(i % runs.len() as u64) as usize];
            let seq = i / runs.len() as u64 + 1;
            let mut key = run_id.as_uuid().as_bytes().to_vec();
            key.extend_from_slice(&seq.to_be_bytes());
            Ok((key, codec::encode_envelope(&maker.envelope(run_id, seq))?))
        })
        .collect()
}

/// Writes `keyed` in `apply_batch`es of 256, flushing after each if `flush`.
///
/// # Errors
///
/// A sled error.
pub fn raw_sled_append(
    db: &sled::Db,
    keyed: &[(Vec<u8>, Vec<u8>)],
    flush: bool,
) -> Result<RawSled, Error> {
    let mut flushes = Vec::with_capacity(keyed.len() / SLED_BATCH + 1);
    let start = Instant::now();
    for chunk in keyed.chunks(SLED_BATCH) {
        let mut batch = sled::Batch::default();
        for (key, value) in chunk {
            batch.insert(key.as_slice(), value.as_slice());
        }
        db.apply_batch(batch)?;
        if flush {
            let flush_start = Instant::now();
            db.flush()?;
            flushes.push(flush_start.elapsed());
        }
    }
    let elapsed = start.elapsed();
    Ok(RawSled {
        events: keyed.len() as u64,
        flushed: flush,
        elapsed,
        events_per_s: keyed.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        batch_flush: (!flushes.is_empty()).then(|| FlushTimes::of(flushes)),
    })
}

/// Opens a fresh sled database in `dir`, or in memory-backed temporary
/// storage (sled uses `/dev/shm` on Linux) for `None`, as the hub's
/// `Config::temporary` does.
///
/// # Errors
///
/// A sled error.
pub fn open_sled(dir: Option<&Path>) -> Result<sled::Db, Error> {
    let config = match dir {
        Some(dir) => sled::Config::new().path(dir),
        None => sled::Config::new().temporary(true),
    };
    Ok(config.open()?)
}

/// The cost of one flush: `samples` × (insert one small key, flush), the
/// flushes timed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FlushTimes {
    /// Flushes timed.
    pub samples: usize,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
    /// Largest, in milliseconds.
    pub max_ms: f64,
}

/// Times `samples` flushes of `db`, each after inserting one small key.
///
/// # Errors
///
/// A sled error.
pub fn flush_latency(db: &sled::Db, samples: usize) -> Result<FlushTimes, Error> {
    db.flush()?;
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples.max(1) as u64 {
        db.insert(b"flush-probe".as_slice(), i.to_be_bytes().as_slice())?;
        let start = Instant::now();
        db.flush()?;
        times.push(start.elapsed());
    }
    Ok(FlushTimes::of(times))
}

impl FlushTimes {
    /// Percentiles of `times` (at least one).
    fn of(mut times: Vec<Duration>) -> Self {
        times.sort_unstable();
        let at = |q: f64| {
            let index = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
            times[index].as_secs_f64() * 1000.0
        };
        Self {
            samples: times.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// The tokio broadcast baseline's outcome.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Broadcast {
    /// Channels (one per room).
    pub rooms: usize,
    /// Receivers per channel.
    pub subscribers: usize,
    /// Envelopes sent per channel.
    pub events_per_room: u64,
    /// Envelopes received, in all.
    pub deliveries: u64,
    /// Envelopes receivers skipped because they lagged (capacity is enough
    /// that this stays 0).
    pub lagged: u64,
    /// Receives out of seq order.
    pub out_of_order: u64,
    /// First send to last receive.
    #[serde(skip)]
    pub elapsed: Duration,
    /// Deliveries per second.
    pub deliveries_per_s: f64,
}

/// Envelopes per channel the broadcast baseline sends for `rooms` rooms of
/// `events`: all of them, unless that would pre-build more than the
/// size's cap across rooms.
pub fn broadcast_events_per_room(size: Size, rooms: usize, events: u64) -> u64 {
    events.min((size.baseline_cap() / rooms.max(1) as u64).max(1))
}

/// Tokio broadcast with the hub's fan-out: `rooms` channels with capacity
/// for every envelope (no lag), `subscribers` receiver tasks on each, and
/// one sender task per channel sending `events_per_room` pre-built
/// envelopes. Timed from the first send to the last receive.
///
/// # Errors
///
/// The deadline `timeout` passing, or a task that panicked.
pub async fn broadcast_baseline(
    maker: &EventMaker,
    rooms: usize,
    subscribers: usize,
    events_per_room: u64,
    timeout: Duration,
) -> Result<Broadcast, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let capacity = usize::try_from(events_per_room)?.max(1);
    let mut senders = Vec::with_capacity(rooms);
    let mut receivers = Vec::with_capacity(rooms * subscribers);
    for _ in 0..rooms {
        let run_id = RunId::new();
        let (tx, _) = broadcast::channel::<RuntimeEventEnvelope>(capacity);
        for _ in 0..subscribers {
            receivers.push(tx.subscribe());
        }
        let log: Vec<_> = (1..=events_per_room)
            .map(|seq| maker.envelope(run_id, seq))
            .collect();
        senders.push((tx, log));
    }
    let origin = Instant::now();
    let first_send = Arc::new(AtomicU64::new(u64::MAX));
    let last_receive = Arc::new(AtomicU64::new(0));
    let mut receiving = JoinSet::new();
    for mut rx in receivers {
        let last_receive = Arc::clone(&last_receive);
        receiving.spawn(async move {
            let (mut delivered, mut lagged, mut out_of_order, mut next, mut last) = (0, 0, 0, 1, 0);
            loop {
                match rx.recv().await {
                    Ok(envelope) => {
                        last = nanos_since(origin);
                        delivered += 1;
                        if envelope.seq != next {
                            out_of_order += 1;
                        }
                        next = envelope.seq + 1;
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => lagged += skipped,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
            last_receive.fetch_max(last, Ordering::AcqRel);
            (delivered, lagged, out_of_order)
        });
    }
    let mut sending = JoinSet::new();
    for (tx, log) in senders {
        let first_send = Arc::clone(&first_send);
        sending.spawn(async move {
            first_send.fetch_min(nanos_since(origin), Ordering::AcqRel);
            for envelope in log {
                // Every receiver exists already; an error would mean none.
                let _ = tx.send(envelope);
            }
        });
    }
    let timed_out =
        || -> Error { format!("broadcast baseline timed out after {timeout:?}").into() };
    while let Some(joined) = tokio::time::timeout_at(deadline, sending.join_next())
        .await
        .map_err(|_| timed_out())?
    {
        joined?;
    }
    let (mut deliveries, mut lagged, mut out_of_order) = (0, 0, 0);
    while let Some(joined) = tokio::time::timeout_at(deadline, receiving.join_next())
        .await
        .map_err(|_| timed_out())?
    {
        let (d, l, o) = joined?;
        deliveries += d;
        lagged += l;
        out_of_order += o;
    }
    let elapsed = Duration::from_nanos(
        last_receive
            .load(Ordering::Acquire)
            .saturating_sub(first_send.load(Ordering::Acquire)),
    );
    Ok(Broadcast {
        rooms,
        subscribers,
        events_per_room,
        deliveries,
        lagged,
        out_of_order,
        elapsed,
        deliveries_per_s: deliveries as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}
