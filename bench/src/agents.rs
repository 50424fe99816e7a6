//! The agent-shaped workload of `bench/src/main.rs` (`--profile agents`):
//! many concurrent runs, each publishing one event at a time at token pace,
//! the way an agent host's loops do.
//!
//! ```text
//! cargo run --release -p behest-stream-bench -- --profile agents --runs 1000
//! cargo run --release -p behest-stream-bench -- --profile agents --find-capacity --p99-ms 25
//! ```
//!
//! [`run_agents`] drives an open [`EventHub`] with `runs` runs spread over
//! `sessions` sessions. Every run is one task publishing a realistic run:
//! `RunStarted` (naming its session), `ModelStarted`, text deltas, every
//! `tool_every` seconds or so a tool call (`ToolCallStarted`, three
//! `ToolCallDelta`s, `ToolCallCompleted`, `ToolExecutionStarted`,
//! `ToolExecutionFinished` with a 4 KiB JSON result, then `ModelStarted` for
//! the next iteration), `UsageRecorded`, and a terminal event (eight runs in
//! ten complete, one fails, one is cancelled). Each publish is awaited
//! before the next, as an agent loop awaits its token.
//!
//! Pacing is open loop: every event of a run (not only the text deltas)
//! takes one slot of the run's token clock, `1 / token_rate` seconds apart
//! with `± jitter` of that drawn per slot, from the run's start, which is
//! staggered over the first second so runs do not tick in lockstep. A run
//! whose publishes take longer than its slots falls behind and stays behind
//! (it never skips an event); how far behind each run ended is reported.
//! A run holds `round(token_rate × duration)` events (at least 5), so the
//! offered load is `runs × token_rate` events per second. What a run
//! publishes, and when, is `bench/src/agent_script.rs`.
//!
//! One subscriber per run ([`Resume::FromStart`], made before the clock
//! starts) checks that it gets seqs 1..=last exactly once, in order, and
//! that the stream ends after the terminal event. One subscriber per session
//! checks each of the session's runs the same way, and that every envelope
//! carries its session. Publish-to-delivery latency is measured at the run
//! subscribers (and, separately, at the session subscribers) from the
//! event's own `timestamp`, taken just before the publish.
//!
//! The bench's own tasks (publishers, subscribers) run on the same runtime
//! and cores as the hub, as an embedding agent host's would.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use behest_stream::{
    BoxRuntimeEventStream, Durability, EventHub, Resume, RunId, RuntimeEventEnvelope, RuntimeRoom,
};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::agent_script::{Clock, MIN_EVENTS_PER_RUN, Script};
use super::workload::{self, Error, EventMaker, HeapProbe, Latency, Size};

/// Share of the offered events the subscribers must have received by the
/// time the last one was due, for the hub to have kept up.
pub const KEPT_UP_SHARE: f64 = 0.95;

/// Most events still undelivered when the last one was due, in seconds of
/// the offered load, for the hub to have kept up.
pub const KEPT_UP_BACKLOG_S: f64 = 1.0;

/// How long past its schedule a run may still be publishing before the run
/// is abandoned as overloaded: at least this, and at least the duration.
const PUBLISH_GRACE_MIN: Duration = Duration::from_secs(30);

/// How long the subscribers have, after the last publish, to receive
/// everything; what they have not received by then counts as lost.
const DRAIN: Duration = Duration::from_secs(30);

/// From spawning the tasks to the schedule's start.
const START_LEAD: Duration = Duration::from_millis(250);

/// Largest latency the histograms hold, in microseconds (10 minutes).
const MAX_LATENCY_US: u64 = 600_000_000;

/// Histogram shards; each subscriber and publisher records into one (by
/// its index), so thousands of them neither contend on one lock nor carry a
/// histogram each.
const SHARDS: usize = 16;

/// Latencies a task gathers before it takes its shard's lock.
const BATCH: usize = 32;

/// The error of a load whose runs were still publishing long after their
/// schedule ended: the hub could not take the load at all. A capacity
/// search counts it as a step that did not hold, not as a failure.
#[derive(Debug)]
pub struct Overloaded(pub String);

impl std::fmt::Display for Overloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Overloaded {}

/// What [`run_agents`] drives.
#[derive(Debug, Clone)]
pub struct AgentsLoad {
    /// Concurrent runs.
    pub runs: usize,
    /// Sessions the runs are spread over (round robin), at most `runs`.
    pub sessions: usize,
    /// Events per second each run offers.
    pub token_rate: f64,
    /// How long each run's schedule lasts.
    pub duration: Duration,
    /// Each slot's length varies by up to this share of `1 / token_rate`,
    /// either way (0 ≤ jitter < 1).
    pub jitter: f64,
    /// A run makes a tool call about this often.
    pub tool_every: Duration,
    /// Durability of every publish.
    pub durability: Durability,
    /// The runs' ids (`runs` of them), when another process must know them
    /// before the load; fresh ones otherwise.
    pub run_ids: Option<Arc<[RunId]>>,
}

impl AgentsLoad {
    /// A clear message for a load that cannot run, naming what was wrong.
    ///
    /// # Errors
    ///
    /// Zero runs or sessions, more sessions than runs, a token rate, a
    /// duration or a tool interval that is not positive, or a jitter outside
    /// `0 ≤ jitter < 1`.
    pub fn validate(&self) -> Result<(), Error> {
        if self.runs == 0 {
            return Err("--runs must be at least 1".into());
        }
        if self.sessions == 0 || self.sessions > self.runs {
            return Err(format!(
                "--sessions must be between 1 and --runs ({}), not {}",
                self.runs, self.sessions
            )
            .into());
        }
        if !(self.token_rate.is_finite() && self.token_rate > 0.0) {
            return Err(format!(
                "--token-rate must be a positive number of tokens per second, not {}",
                self.token_rate
            )
            .into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be more than 0 seconds".into());
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(format!(
                "--jitter must be at least 0 and below 1, not {}",
                self.jitter
            )
            .into());
        }
        if self.tool_every.is_zero() {
            return Err("--tool-every must be more than 0 seconds".into());
        }
        Ok(())
    }

    /// Events each run publishes, the terminal one included.
    pub fn events_per_run(&self) -> u64 {
        ((self.token_rate * self.duration.as_secs_f64()).round() as u64).max(MIN_EVENTS_PER_RUN)
    }

    /// Events offered per second with every run going: `runs × token_rate`.
    pub fn nominal_events_per_s(&self) -> f64 {
        self.runs as f64 * self.token_rate
    }

    /// Publishes in flight at most: one per run.
    pub fn hub_in_flight(&self) -> usize {
        self.runs.max(4096)
    }
}

/// Sharded latency histograms, in microseconds.
#[derive(Debug, Clone)]
struct Shards(Arc<[Mutex<Histogram<u64>>]>);

impl Shards {
    fn new() -> Result<Self, Error> {
        let shards: Arc<[Mutex<Histogram<u64>>]> = (0..SHARDS)
            .map(|_| Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(Self(shards))
    }

    /// A recorder for task number `index`.
    fn recorder(&self, index: usize) -> Recorder {
        Recorder {
            shards: self.clone(),
            shard: index % SHARDS,
            batch: [0; BATCH],
            batched: 0,
        }
    }

    fn merged(&self) -> Result<Histogram<u64>, Error> {
        let mut merged = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?;
        for shard in self.0.iter() {
            merged.add(&*shard.lock().unwrap_or_else(PoisonError::into_inner))?;
        }
        Ok(merged)
    }
}

/// One task's latencies, batched into its shard.
struct Recorder {
    shards: Shards,
    shard: usize,
    batch: [u64; BATCH],
    batched: usize,
}

impl Recorder {
    fn record(&mut self, us: u64) {
        self.batch[self.batched] = us;
        self.batched += 1;
        if self.batched == BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let mut histogram = self.shards.0[self.shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for &us in &self.batch[..self.batched] {
            histogram.saturating_record(us.max(1));
        }
        self.batched = 0;
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Microseconds from `stamp` (taken just before the publish) to now.
fn since_us(stamp: DateTime<Utc>) -> u64 {
    (Utc::now() - stamp)
        .num_microseconds()
        .and_then(|us| u64::try_from(us).ok())
        .unwrap_or(0)
}

/// One run's seqs as a subscriber saw them.
#[derive(Debug, Clone, Default)]
struct SeqCheck {
    /// The seq after the highest one seen.
    next: u64,
    /// Seqs below `next` not seen (yet).
    missing: BTreeSet<u64>,
    delivered: u64,
    duplicated: u64,
    /// Seqs that arrived after a higher one.
    reordered: u64,
    /// The terminal event's seq, once seen.
    terminal: Option<u64>,
    /// Envelopes after the terminal event.
    after_end: u64,
}

impl SeqCheck {
    fn new() -> Self {
        Self {
            next: 1,
            ..Self::default()
        }
    }

    fn see(&mut self, envelope: &RuntimeEventEnvelope) {
        let seq = envelope.seq;
        self.delivered += 1;
        if self.terminal.is_some_and(|end| seq > end) {
            self.after_end += 1;
        }
        if envelope.is_terminal() {
            self.terminal = Some(seq);
        }
        if seq >= self.next {
            self.missing.extend(self.next..seq);
            self.next = seq + 1;
        } else if self.missing.remove(&seq) {
            self.reordered += 1;
        } else {
            self.duplicated += 1;
        }
    }

    /// Seqs of 1..=`last` never seen.
    fn lost(&self, last: u64) -> u64 {
        let below = self.missing.range(..=last).count() as u64;
        below + (last + 1).saturating_sub(self.next)
    }
}

/// The faults the subscribers found, over all of them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Faults {
    /// Acknowledged seqs a subscriber never got.
    pub lost: u64,
    /// Deliveries of a seq already delivered.
    pub duplicated: u64,
    /// Deliveries of a seq after a higher one of the same run.
    pub reordered: u64,
    /// Envelopes delivered after their run's terminal event, or of a seq
    /// never acknowledged, or (session subscribers) of another session.
    pub stray: u64,
    /// Run subscriptions that did not end after the terminal event.
    pub not_ended: u64,
    /// Acknowledgements whose seq was not the publish's place in its run.
    pub seq_mismatches: u64,
    /// Errors the streams yielded.
    pub stream_errors: u64,
    /// The first of them.
    pub first_stream_error: Option<String>,
}

impl Faults {
    /// Every kind of fault, summed (0 for a clean run).
    pub fn total(&self) -> u64 {
        self.lost
            + self.duplicated
            + self.reordered
            + self.stray
            + self.not_ended
            + self.seq_mismatches
            + self.stream_errors
    }

    fn add(&mut self, check: &SeqCheck, last: u64) {
        self.lost += check.lost(last);
        self.duplicated += check.duplicated;
        self.reordered += check.reordered;
        self.stray += check.after_end + check.next.saturating_sub(last + 1);
    }
}

/// What a subscriber returns.
#[derive(Debug, Default)]
struct SubOutcome {
    runs: HashMap<RunId, SeqCheck>,
    ended: bool,
    stray: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Counters shared by the tasks of one load.
#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    delivered_runs: AtomicU64,
    delivered_sessions: AtomicU64,
    /// Nanoseconds from the origin to the last delivery.
    last_delivery_ns: AtomicU64,
}

fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Reads a subscription, checking each delivery, until it ends (a run's),
/// every run it follows has delivered its terminal event (a session's), or
/// `stop` is raised. `runs` is what it should see: one run, or a
/// session's.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each a different part"
)]
async fn subscriber(
    mut stream: BoxRuntimeEventStream,
    runs: Vec<RunId>,
    session: Option<Uuid>,
    mut recorder: Recorder,
    counters: Arc<Counters>,
    delivered: fn(&Counters) -> &AtomicU64,
    origin: Instant,
    mut stop: watch::Receiver<bool>,
) -> SubOutcome {
    let mut outcome = SubOutcome {
        runs: runs.iter().map(|&run| (run, SeqCheck::new())).collect(),
        ..SubOutcome::default()
    };
    let mut unfinished = runs.len();
    loop {
        // A session stream never ends: it is done once every run of its
        // session has delivered its terminal event.
        if session.is_some() && unfinished == 0 {
            break;
        }
        let item = tokio::select! {
            biased;
            item = stream.next() => item,
            _ = stop.changed() => break,
        };
        let Some(item) = item else {
            outcome.ended = true;
            break;
        };
        let envelope = match item {
            Ok(envelope) => envelope,
            Err(error) => {
                outcome.errors += 1;
                outcome.first_error.get_or_insert_with(|| error.to_string());
                continue;
            }
        };
        recorder.record(since_us(envelope.event.timestamp()));
        // Counted one by one: the count at the schedule's end decides
        // whether the hub kept up.
        delivered(&counters).fetch_add(1, Ordering::Relaxed);
        counters
            .last_delivery_ns
            .fetch_max(nanos_since(origin), Ordering::Relaxed);
        if session.is_some() && envelope.session_id != session {
            outcome.stray += 1;
        }
        match outcome.runs.get_mut(&envelope.run_id) {
            Some(check) => {
                let was_open = check.terminal.is_none();
                check.see(&envelope);
                if was_open && check.terminal.is_some() {
                    unfinished -= 1;
                }
            }
            None => outcome.stray += 1,
        }
    }
    outcome
}

/// One run's publisher.
struct Publisher {
    hub: EventHub,
    script: Script,
    clock: Clock,
    durability: Durability,
    /// Where the load's schedule starts.
    origin: tokio::time::Instant,
    /// Past this, the publisher gives up (overload).
    give_up: tokio::time::Instant,
    recorder: Recorder,
    counters: Arc<Counters>,
}

/// What a publisher returns.
#[derive(Debug, Clone, Copy)]
struct Published {
    run_id: RunId,
    /// Seq of the terminal event, as acknowledged.
    last_seq: u64,
    /// Acknowledgements whose seq was not the slot's.
    mismatches: u64,
    /// From the last event's due time to its acknowledgement, seconds.
    behind_s: f64,
}

async fn publisher(mut p: Publisher) -> Result<Published, Error> {
    let start = p.clock.next_due();
    let mut mismatches = 0;
    let mut last_seq = 0;
    let mut last_due = p.origin;
    for slot in 1..=p.script.events {
        let due_s = p.clock.tick();
        let due = p.origin + Duration::from_secs_f64(due_s);
        tokio::time::sleep_until(due).await;
        if tokio::time::Instant::now() > p.give_up {
            return Err(Overloaded(format!(
                "overloaded: a run was still publishing (event {slot} of {}) {:.0} s after the schedule began",
                p.script.events,
                (p.give_up - p.origin).as_secs_f64()
            ))
            .into());
        }
        last_due = due;
        let event = p.script.next(due_s - start, Utc::now());
        let stamp = event.timestamp();
        let envelope = p
            .hub
            .submit_with(event, p.durability)
            .await?
            .shared()
            .await?;
        p.recorder.record(since_us(stamp));
        p.counters.published.fetch_add(1, Ordering::Relaxed);
        if envelope.seq != slot {
            mismatches += 1;
        }
        last_seq = envelope.seq;
    }
    Ok(Published {
        run_id: p.script.run_id,
        last_seq,
        mismatches,
        behind_s: tokio::time::Instant::now()
            .saturating_duration_since(last_due)
            .as_secs_f64(),
    })
}

/// Heap readings of an agents load, with a [`HeapProbe`], in bytes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AgentsHeap {
    /// Live heap before any room of the load started.
    pub before: usize,
    /// Live heap with every room started and every subscription made.
    pub subscribed: usize,
    /// (`subscribed` − `before`) ÷ runs: a run's room and subscriber and
    /// its share of a session room and subscriber, before publishing.
    pub per_run_subscribed: f64,
    /// Live heap halfway through the schedule, every run going.
    pub middle: usize,
    /// (`middle` − `before`) ÷ runs.
    pub per_run_middle: f64,
    /// Highest live heap while publishing, over `before`.
    pub peak_over_before: usize,
    /// `peak_over_before` ÷ runs: one active run (its rooms and
    /// subscribers, and the bench's publisher and subscriber tasks), plus
    /// a share of what the store holds for all of them (sled's cache and
    /// write buffers, publishes in flight), which grows with the events
    /// written, not with the runs.
    pub per_active_run: f64,
}

/// Percentiles across runs, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Spread {
    fn of(mut seconds: Vec<f64>) -> Self {
        if seconds.is_empty() {
            return Self::default();
        }
        seconds.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let index = ((seconds.len() as f64 * q).ceil() as usize).clamp(1, seconds.len()) - 1;
            seconds[index] * 1000.0
        };
        Self {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// The outcome of [`run_agents`].
#[derive(Debug, Clone, Serialize)]
pub struct AgentsRun {
    /// Concurrent runs.
    pub runs: usize,
    /// Sessions.
    pub sessions: usize,
    /// Events per second per run.
    pub token_rate: f64,
    /// Seconds of each run's schedule.
    pub duration_s: f64,
    /// Slot jitter.
    pub jitter: f64,
    /// Seconds between a run's tool calls, about.
    pub tool_every_s: f64,
    /// Events per run.
    pub events_per_run: u64,
    /// `runs × token_rate`.
    pub nominal_events_per_s: f64,
    /// Events the runs offered, in all.
    pub offered_events: u64,
    /// From the first event's due time to the last's, seconds (the
    /// duration plus the one-second stagger).
    pub schedule_s: f64,
    /// `offered_events ÷ schedule_s`.
    pub offered_events_per_s: f64,
    /// Events acknowledged by the end of the schedule.
    pub published_by_end: u64,
    /// Events run subscribers had received by the end of the schedule.
    pub delivered_runs_by_end: u64,
    /// Envelopes session subscribers had received by then.
    pub delivered_sessions_by_end: u64,
    /// `delivered_runs_by_end ÷ schedule_s`.
    pub delivered_runs_per_s: f64,
    /// `delivered_sessions_by_end ÷ schedule_s`.
    pub delivered_sessions_per_s: f64,
    /// Offered events not yet at their run subscriber (or, if more, at
    /// their session subscriber) at the end of the schedule.
    pub backlog_at_end: u64,
    /// Delivered ≥ 95% of offered at both kinds of subscriber by the end
    /// of the schedule, and the backlog then at most one second of the
    /// nominal load.
    pub kept_up: bool,
    /// How far behind its schedule each run acknowledged its last event.
    pub behind_at_end: Spread,
    /// From the end of the schedule to the last delivery, seconds.
    pub drain_s: f64,
    /// Publish (just before the submit) to delivery at the run subscriber.
    pub latency: Latency,
    /// Publish to delivery at the session subscriber.
    pub session_latency: Latency,
    /// Publish to acknowledgement, at the publisher.
    pub publish_latency: Latency,
    /// Time to subscribe every subscriber (starting every room); untimed.
    pub subscribe_s: f64,
    /// Deliveries to run subscribers, in all.
    pub deliveries_runs: u64,
    /// Deliveries to session subscribers, in all.
    pub deliveries_sessions: u64,
    /// What the run subscribers found.
    pub run_faults: Faults,
    /// What the session subscribers found.
    pub session_faults: Faults,
    /// Heap readings, with a [`HeapProbe`].
    pub heap: Option<AgentsHeap>,
}

impl AgentsRun {
    /// Lost deliveries, at either kind of subscriber.
    pub fn lost(&self) -> u64 {
        self.run_faults.lost + self.session_faults.lost
    }

    /// Duplicated deliveries, at either kind of subscriber.
    pub fn duplicated(&self) -> u64 {
        self.run_faults.duplicated + self.session_faults.duplicated
    }

    /// Every fault, at either kind of subscriber and the publishers.
    pub fn faults(&self) -> u64 {
        self.run_faults.total() + self.session_faults.total()
    }
}

/// Runs `load` on `hub`; see the module docs.
///
/// # Errors
///
/// An invalid load, a subscribe or publish that failed, or a run still
/// publishing long after its schedule ended (an overloaded hub). Lost,
/// duplicated or reordered deliveries are not errors: they are counted in
/// the result.
pub async fn run_agents(
    hub: &EventHub,
    load: &AgentsLoad,
    heap: Option<HeapProbe>,
) -> Result<AgentsRun, Error> {
    load.validate()?;
    let events = load.events_per_run();
    let run_ids = workload::run_ids(load.run_ids.as_deref(), load.runs)?;
    let session_ids: Vec<Uuid> = (0..load.sessions).map(|_| Uuid::now_v7()).collect();
    let clocks: Vec<Clock> = (0..load.runs).map(|run| Clock::new(run, load)).collect();
    let schedule_s = clocks
        .iter()
        .map(|clock| clock.last_due(events))
        .fold(0.0, f64::max);
    let grace = load.duration.max(PUBLISH_GRACE_MIN);
    let tool_result = Arc::new(EventMaker::new(Size::Tool4k));
    let run_latency = Shards::new()?;
    let session_latency = Shards::new()?;
    let publish_latency = Shards::new()?;
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let before = heap.map(|heap| (heap.live)());

    // Every subscription first (session ones before any run exists): this
    // starts every room outside the timed part.
    let subscribing = Instant::now();
    let mut session_streams = Vec::with_capacity(load.sessions);
    for &session in &session_ids {
        session_streams.push(
            hub.subscribe(RuntimeRoom::Session(session), Resume::FromStart)
                .await?,
        );
    }
    let run_streams: Vec<BoxRuntimeEventStream> = futures_util::stream::iter(&run_ids)
        .map(|&run_id| hub.subscribe(RuntimeRoom::Run(run_id), Resume::FromStart))
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let subscribe_s = subscribing.elapsed().as_secs_f64();
    let subscribed = heap.map(|heap| (heap.live)());
    if let Some(heap) = heap {
        (heap.reset_peak)();
    }

    // The schedule starts a moment from now, so that every task is spawned
    // before its first slot is due.
    let origin = Instant::now() + START_LEAD;
    let pace_origin = tokio::time::Instant::now() + START_LEAD;
    let mut run_subscribers = JoinSet::new();
    for (index, (stream, &run_id)) in run_streams.into_iter().zip(&run_ids).enumerate() {
        run_subscribers.spawn(subscriber(
            stream,
            vec![run_id],
            None,
            run_latency.recorder(index),
            Arc::clone(&counters),
            |c| &c.delivered_runs,
            origin,
            stop_rx.clone(),
        ));
    }
    let mut session_subscribers = JoinSet::new();
    for (index, (stream, &session)) in session_streams.into_iter().zip(&session_ids).enumerate() {
        let runs = run_ids
            .iter()
            .enumerate()
            .filter(|(run, _)| run % load.sessions == index)
            .map(|(_, &run_id)| run_id)
            .collect();
        session_subscribers.spawn(subscriber(
            stream,
            runs,
            Some(session),
            session_latency.recorder(index),
            Arc::clone(&counters),
            |c| &c.delivered_sessions,
            origin,
            stop_rx.clone(),
        ));
    }
    let mut publishers = JoinSet::new();
    let give_up = pace_origin + Duration::from_secs_f64(schedule_s) + grace;
    for (run, clock) in clocks.into_iter().enumerate() {
        let run_id = run_ids[run];
        let session = session_ids[run % load.sessions];
        publishers.spawn(publisher(Publisher {
            hub: hub.clone(),
            script: Script::new(run, run_id, session, load, Arc::clone(&tool_result)),
            clock,
            durability: load.durability,
            origin: pace_origin,
            give_up,
            recorder: publish_latency.recorder(run),
            counters: Arc::clone(&counters),
        }));
    }
    // The live heap halfway through, every run going; what had arrived
    // when the last event was due.
    let readings = {
        let counters = Arc::clone(&counters);
        let middle = pace_origin + Duration::from_secs_f64(schedule_s / 2.0);
        let end = pace_origin + Duration::from_secs_f64(schedule_s);
        tokio::spawn(async move {
            tokio::time::sleep_until(middle).await;
            let middle = heap.map(|heap| (heap.live)());
            tokio::time::sleep_until(end).await;
            let at_end = (
                counters.published.load(Ordering::Relaxed),
                counters.delivered_runs.load(Ordering::Relaxed),
                counters.delivered_sessions.load(Ordering::Relaxed),
            );
            (middle, at_end)
        })
    };
    let progress = tokio::spawn(progress_line(
        Arc::clone(&counters),
        origin,
        load.runs as u64 * events,
    ));

    // A failed publisher fails the load (dropping the sets aborts the
    // rest).
    let mut last_seqs: HashMap<RunId, u64> = HashMap::with_capacity(load.runs);
    let mut behind = Vec::with_capacity(load.runs);
    let mut seq_mismatches = 0;
    let joined: Result<(), Error> = async {
        while let Some(joined) = publishers.join_next().await {
            let published = joined??;
            last_seqs.insert(published.run_id, published.last_seq);
            behind.push(published.behind_s);
            seq_mismatches += published.mismatches;
        }
        Ok(())
    }
    .await;
    if let Err(error) = joined {
        progress.abort();
        eprintln!();
        return Err(error);
    }
    let (middle, (published_by_end, delivered_runs_by_end, delivered_sessions_by_end)) =
        readings.await?;
    let peak = heap.map(|heap| (heap.peak)());

    // The subscribers have until the drain's end to receive everything.
    let drain_end = tokio::time::Instant::now() + DRAIN;
    let stopper = tokio::spawn(async move {
        tokio::time::sleep_until(drain_end).await;
        let _ = stop_tx.send(true);
    });
    let mut run_faults = Faults {
        seq_mismatches,
        ..Faults::default()
    };
    let mut deliveries_runs = 0;
    while let Some(joined) = run_subscribers.join_next().await {
        let outcome = joined?;
        run_faults.not_ended += u64::from(!outcome.ended);
        tally(&mut run_faults, &outcome, &last_seqs, &mut deliveries_runs);
    }
    let mut session_faults = Faults::default();
    let mut deliveries_sessions = 0;
    while let Some(joined) = session_subscribers.join_next().await {
        let outcome = joined?;
        tally(
            &mut session_faults,
            &outcome,
            &last_seqs,
            &mut deliveries_sessions,
        );
    }
    stopper.abort();
    progress.abort();
    eprintln!();

    let offered_events = load.runs as u64 * events;
    let schedule = schedule_s.max(1e-9);
    let backlog_at_end =
        offered_events.saturating_sub(delivered_runs_by_end.min(delivered_sessions_by_end));
    let share = |delivered: u64| delivered as f64 / offered_events as f64;
    let kept_up = share(delivered_runs_by_end) >= KEPT_UP_SHARE
        && share(delivered_sessions_by_end) >= KEPT_UP_SHARE
        && backlog_at_end as f64 <= load.nominal_events_per_s() * KEPT_UP_BACKLOG_S;
    let last_delivery_ns = counters.last_delivery_ns.load(Ordering::Relaxed);
    let schedule_end_ns = (schedule_s * 1e9) as u64;
    let heap = match (before, subscribed, middle, peak) {
        (Some(before), Some(subscribed), Some(middle), Some(peak)) => {
            let per_run = |bytes: usize| (bytes as f64 - before as f64) / load.runs as f64;
            Some(AgentsHeap {
                before,
                subscribed,
                per_run_subscribed: per_run(subscribed),
                middle,
                per_run_middle: per_run(middle),
                peak_over_before: peak.saturating_sub(before),
                per_active_run: per_run(peak),
            })
        }
        _ => None,
    };
    Ok(AgentsRun {
        runs: load.runs,
        sessions: load.sessions,
        token_rate: load.token_rate,
        duration_s: load.duration.as_secs_f64(),
        jitter: load.jitter,
        tool_every_s: load.tool_every.as_secs_f64(),
        events_per_run: events,
        nominal_events_per_s: load.nominal_events_per_s(),
        offered_events,
        schedule_s,
        offered_events_per_s: offered_events as f64 / schedule,
        published_by_end,
        delivered_runs_by_end,
        delivered_sessions_by_end,
        delivered_runs_per_s: delivered_runs_by_end as f64 / schedule,
        delivered_sessions_per_s: delivered_sessions_by_end as f64 / schedule,
        backlog_at_end,
        kept_up,
        behind_at_end: Spread::of(behind),
        drain_s: last_delivery_ns.saturating_sub(schedule_end_ns) as f64 / 1e9,
        latency: Latency::of(&run_latency.merged()?),
        session_latency: Latency::of(&session_latency.merged()?),
        publish_latency: Latency::of(&publish_latency.merged()?),
        subscribe_s,
        deliveries_runs,
        deliveries_sessions,
        run_faults,
        session_faults,
        heap,
    })
}

/// Adds one subscriber's outcome to `faults`, each run against the seq its
/// publisher's terminal event was acknowledged with.
fn tally(
    faults: &mut Faults,
    outcome: &SubOutcome,
    last_seqs: &HashMap<RunId, u64>,
    deliveries: &mut u64,
) {
    for (run_id, check) in &outcome.runs {
        faults.add(check, last_seqs.get(run_id).copied().unwrap_or(0));
        *deliveries += check.delivered;
    }
    faults.stray += outcome.stray;
    faults.stream_errors += outcome.errors;
    if faults.first_stream_error.is_none() {
        faults.first_stream_error.clone_from(&outcome.first_error);
    }
}

/// Prints `published/offered, delivered` on stderr every second,
/// overwriting itself, until aborted.
async fn progress_line(counters: Arc<Counters>, origin: Instant, offered: u64) {
    use std::io::Write as _;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "\r  {:.0} s: {}/{offered} published, {} delivered to run subscribers, {} to session subscribers   ",
            origin.elapsed().as_secs_f64(),
            counters.published.load(Ordering::Relaxed),
            counters.delivered_runs.load(Ordering::Relaxed),
            counters.delivered_sessions.load(Ordering::Relaxed),
        );
        let _ = stderr.flush();
    }
}
