//! The hub under load, beside what it is built from, in one run: how many
//! events per second `EventHub` sequences, stores and fans out across many
//! rooms and subscribers, the publish-to-delivery latency, the memory one
//! active room costs (and whether an evicted one costs nothing), and the
//! same work done by raw sled and by tokio broadcast, as ratios.
//!
//! ```text
//! cargo run --release -p behest-stream-bench -- [options]
//! cargo run --release -p behest-stream-bench -- --rooms 1 --subscribers 1 --events 20000
//! cargo run --release -p behest-stream-bench -- --rooms 1 --subscribers 100 --events 5000 --durability buffered
//! cargo run --release -p behest-stream-bench -- --rooms 10000 --subscribers 1 --events 10 --durability buffered --evict
//! cargo run --release -p behest-stream-bench -- --half-load --json
//! cargo run --release -p behest-stream-bench -- --profile agents --runs 1000 --token-rate 30
//! cargo run --release -p behest-stream-bench -- --profile agents --find-capacity --p99-ms 25
//! ```
//!
//! The workload and the baselines are `bench/src/workload.rs`, shared
//! with `bench/benches/rooms.rs`. Timed: first submit to last delivery; opening
//! the hub and starting its rooms (every subscriber subscribes from the
//! start first) are not. Memory comes from a counting global allocator (this
//! binary only; it adds two atomic operations per allocation) and from
//! `/proc/self/status`.
//!
//! `--profile agents` is another workload: thousands of concurrent runs, each
//! publishing one event at a time at token pace, with tool calls, one
//! subscriber per run and one per session (`bench/src/agents.rs`,
//! what each run publishes in `bench/src/agent_script.rs`);
//! with `--find-capacity`, the most runs the host serves within a p99 bound
//! (`bench/src/agents_command.rs`).
//!
//! Exits with status 1 if any subscriber lost or got a duplicate delivery,
//! and 2 if the run failed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use behest_stream::{Config, Durability, EventHub};
use clap::Parser;
use serde::Serialize;

mod http_load;
mod workload;

mod agents;

mod agent_script;

mod agents_command;

#[cfg(feature = "nats")]
mod hosts;

use workload::{
    Broadcast, EventMaker, FlushTimes, HeapProbe, HubRun, Probes, RawSled, Size, Workload,
};

/// Bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Highest [`LIVE`] since the last reset.
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes and their peak.
struct Counting;

impl Counting {
    fn added(bytes: usize) {
        let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if live > PEAK.load(Ordering::Relaxed) {
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
    }

    fn removed(bytes: usize) {
        LIVE.fetch_sub(bytes, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees are this allocator's; the counting
// around it only touches atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size),
        // which is `System.alloc`'s.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::added(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::added(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (so `System`)
        // allocated with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        Self::removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a block `System` allocated with
        // `layout` and a valid `new_size`, as `System.realloc` requires.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // On failure the old block stays allocated: count nothing.
            Self::removed(layout.size());
            Self::added(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The counting allocator, as the workload reads it.
const HEAP: HeapProbe = HeapProbe {
    live: || LIVE.load(Ordering::Relaxed),
    peak: || PEAK.load(Ordering::Relaxed),
    reset_peak: || PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed),
};

/// Durability of the publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DurabilityArg {
    /// Acknowledged after the flush.
    Flushed,
    /// Acknowledged once in sled's buffer.
    Buffered,
}

impl From<DurabilityArg> for Durability {
    fn from(value: DurabilityArg) -> Self {
        match value {
            DurabilityArg::Flushed => Durability::Flushed,
            DurabilityArg::Buffered => Durability::Buffered,
        }
    }
}

/// Which workload to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Profile {
    /// Rooms with pipelined publishers, beside raw sled and tokio broadcast.
    Rooms,
    /// Many concurrent runs at token pace, each awaiting every publish
    /// (the `agents` options below).
    Agents,
    /// The Durable Streams server over HTTP: fsynced appends with 1 and 64
    /// writers, and SSE fan-out (the `http` options below).
    Http,
}

/// Load the hub with rooms, subscribers and pipelined publishers, and
/// measure it beside raw sled and tokio broadcast; or, with `--profile
/// agents`, with many agent-shaped runs at token pace.
///
/// The agents profile reports whether the hub kept up: it did if, by the
/// time the last event was due, run subscribers and session subscribers
/// had each received at least 95% of the events offered, and no more than
/// one second of the nominal load (runs x token rate) was still
/// undelivered.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench", about, long_about)]
struct Args {
    /// The workload.
    #[arg(long, value_enum, default_value_t = Profile::Rooms)]
    profile: Profile,
    /// Rooms (fresh runs), each with its own publisher.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Subscribers per room, each from the start.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Events per room, the terminal `RunCompleted` included.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Size of the events.
    #[arg(long, value_enum, default_value_t = Size::Delta)]
    size: Size,
    /// Durability of every publish.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Flushed)]
    durability: DurabilityArg,
    /// Open the hub with `Config::temporary()` (sled in /dev/shm) instead of
    /// a fresh temporary directory.
    #[arg(long)]
    temporary: bool,
    /// Publishes in flight per room.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Total events per second across rooms; 0 for as fast as it goes.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Run at full speed, then again at half the events/s measured, and
    /// report that run's latency too.
    #[arg(long)]
    half_load: bool,
    /// Open the hub with a 1 s idle timeout and, after the run, wait until
    /// every room is evicted; report the heap then.
    #[arg(long)]
    evict: bool,
    /// Subscribe with `EventHub::subscribe_shared`: each subscriber gets
    /// the envelope the room shares instead of a copy.
    #[arg(long)]
    shared: bool,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// `--profile http`: writer counts, one append measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    http_writers: Vec<usize>,
    /// `--profile http`: appends per measurement, shared by its writers.
    #[arg(long, default_value_t = 20_000)]
    http_appends: usize,
    /// `--profile http`: SSE readers of the fan-out stream.
    #[arg(long, default_value_t = 100)]
    http_readers: usize,
    /// `--profile http`: messages the fan-out writer appends.
    #[arg(long, default_value_t = 2_000)]
    http_messages: usize,
    /// `--profile http`: bytes per message.
    #[arg(long, default_value_t = 64)]
    http_message_bytes: usize,
    /// The hub's ring per room (`Config::ring_capacity`); the hub's default
    /// (1024) if not given.
    #[arg(long)]
    ring_capacity: Option<usize>,
    /// The hub-wide bound on publishes in flight
    /// (`Config::max_in_flight_publishes`); if not given, enough for every
    /// room to have `--in-flight` outstanding (at least the hub's default,
    /// 4096). Publishers beyond the bound wait in `submit`.
    #[arg(long)]
    hub_in_flight: Option<usize>,
    /// Seconds a run may take before it counts as failed.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Also run the same workload on a hub over NATS JetStream at this URL
    /// (a fresh stream, deleted after), reported beside the sled hub (needs
    /// `--features nats`).
    #[arg(long)]
    nats: Option<String>,
    /// With --nats: append one envelope per message, as on a server before
    /// 2.12, instead of a run's gathered envelopes as one atomic batch
    /// (`NatsConfig::atomic_batches` off), for the comparison.
    #[arg(long)]
    nats_one_at_a_time: bool,
    /// With --nats: 2 starts a second process, host B, that follows every
    /// run over NATS from the start while this one (host A) writes them,
    /// and reports what host B received and the latency from host A's
    /// room stamping an envelope to host B delivering it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    hosts: u8,
    /// Host B's side of --hosts 2 (started by host A, run ids on stdin).
    #[arg(long, hide = true)]
    follow_host: bool,
    /// Host B's stream (started by host A).
    #[arg(long, hide = true)]
    nats_stream: Option<String>,
    /// Host B's subject prefix (started by host A).
    #[arg(long, hide = true)]
    nats_prefix: Option<String>,
    /// agents: concurrent runs (with --find-capacity, the first step's);
    /// 100, or 250 for a capacity search, if not given.
    #[arg(long, help_heading = "Agents profile")]
    runs: Option<usize>,
    /// agents: events per second each run publishes (every event takes one
    /// token slot: deltas, tool call events, the rest).
    #[arg(long, default_value_t = 30.0, help_heading = "Agents profile")]
    token_rate: f64,
    /// agents: seconds of each run's schedule (runs start staggered over
    /// the first second).
    #[arg(long, default_value_t = 10.0, help_heading = "Agents profile")]
    duration: f64,
    /// agents: sessions the runs are spread over; one per run if not given.
    #[arg(long, help_heading = "Agents profile")]
    sessions: Option<usize>,
    /// agents: each token slot varies by up to this share of its length,
    /// either way (0 <= jitter < 1).
    #[arg(long, default_value_t = 0.2, help_heading = "Agents profile")]
    jitter: f64,
    /// agents: seconds between a run's tool calls, about (each returns a
    /// 4 KiB JSON result).
    #[arg(long, default_value_t = 5.0, help_heading = "Agents profile")]
    tool_every: f64,
    /// agents: raise the runs (doubling, then bisecting, each step on a
    /// fresh hub) until a step does not hold, and print the largest that
    /// held. Held: kept up, p99 at the run subscribers <= --p99-ms, and
    /// nothing lost, duplicated or out of order.
    #[arg(long, help_heading = "Agents profile")]
    find_capacity: bool,
    /// agents, --find-capacity: the p99 bound, in milliseconds.
    #[arg(long, default_value_t = 25.0, help_heading = "Agents profile")]
    p99_ms: f64,
    /// agents, --find-capacity: most runs a step has.
    #[arg(long, default_value_t = 8000, help_heading = "Agents profile")]
    max_runs: usize,
    /// agents, --find-capacity: seconds the search may take; no step starts
    /// that would end past it.
    #[arg(long, default_value_t = 600, help_heading = "Agents profile")]
    search_budget: u64,
    /// agents, --find-capacity: most bisecting steps after the first step
    /// that did not hold.
    #[arg(long, default_value_t = 4, help_heading = "Agents profile")]
    bisect_steps: usize,
}

/// The configuration, as reported.
#[derive(Debug, Serialize)]
struct ConfigReport {
    rooms: usize,
    subscribers: usize,
    events_per_room: u64,
    size: Size,
    encoded_bytes: usize,
    durability: &'static str,
    storage: &'static str,
    in_flight: usize,
    hub_in_flight: usize,
    ring_capacity: Option<usize>,
    rate: f64,
    half_load: bool,
    evict: bool,
    shared_envelopes: bool,
}

/// The machine, as reported.
#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    cpu: Option<String>,
}

/// Memory readings of the full-speed run.
#[derive(Debug, Serialize)]
struct Memory {
    /// `VmHWM` after the full-speed run.
    peak_rss_bytes: Option<u64>,
    /// `VmRSS` after the full-speed run.
    rss_bytes: Option<u64>,
    /// Live heap before the rooms started.
    heap_before_rooms: Option<usize>,
    /// Live heap per room with every room active (room and subscribers).
    heap_per_room: Option<f64>,
    /// Highest live heap while running, over `heap_before_rooms`.
    heap_peak_over_before: Option<i64>,
}

/// Eviction after the full-speed run.
#[derive(Debug, Serialize)]
struct EvictionReport {
    /// Rooms of the run live when it ended (the rest were evicted already).
    rooms_live_before: usize,
    /// Rooms of the run live after the wait.
    rooms_live_after: usize,
    /// Rooms evicted from the run's start to its end.
    evicted_during_run: u64,
    /// Rooms evicted from the run's start to the end of the wait.
    evicted_total: u64,
    waited_s: f64,
    heap_before_rooms: Option<usize>,
    heap_end_of_run: Option<usize>,
    heap_after_eviction: Option<usize>,
    /// Heap after eviction minus heap before the rooms started.
    heap_after_minus_before: Option<i64>,
    /// (Heap at the end of the run − heap after eviction) ÷ the rooms the
    /// wait saw evicted.
    freed_per_room: Option<f64>,
}

/// The baselines, measured after the hub runs.
#[derive(Debug, Serialize)]
struct Baselines {
    raw_sled: RawSled,
    broadcast: Broadcast,
    sled_flush: FlushTimes,
}

/// The hub's figures over the baselines'.
#[derive(Debug, Serialize)]
struct Ratios {
    hub_events_over_raw_sled: f64,
    hub_deliveries_over_broadcast: f64,
    /// The NATS hub's events/s over the sled hub's (`--nats`).
    nats_hub_events_over_sled_hub: Option<f64>,
    /// The latency p99 of the half-load run if there was one, else of the
    /// full-speed run, over one small sled flush (p50).
    p99_over_flush_p50: f64,
    /// The same p99 over one flush of a batch of 256 of the same envelopes
    /// (the raw baseline's, p50), when the baseline flushed.
    p99_over_batch_flush_p50: Option<f64>,
}

/// Everything one invocation measured.
#[derive(Debug, Serialize)]
struct Report {
    /// Lost deliveries, over every hub run (must be 0).
    lost: u64,
    /// Duplicated deliveries, over every hub run (must be 0).
    duplicated: u64,
    /// Acknowledgements out of submit order, stream errors and missing
    /// deliveries, over every hub run (must be 0).
    other_faults: u64,
    config: ConfigReport,
    machine: Machine,
    hub: HubRun,
    half_load: Option<HubRun>,
    /// The same workload on a hub over NATS (`--nats`).
    nats: Option<HubRun>,
    /// What a second process received of the NATS run (`--hosts 2`).
    #[cfg(feature = "nats")]
    nats_host_b: Option<hosts::FollowerReport>,
    memory: Memory,
    eviction: Option<EvictionReport>,
    baselines: Baselines,
    ratios: Ratios,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench: cannot build the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    #[cfg(feature = "nats")]
    if args.follow_host {
        return follow_host(&args, &runtime);
    }
    if args.profile == Profile::Agents {
        return match agents_options(&args) {
            Ok(options) => agents_command::run(&options, &runtime, HEAP, cores),
            Err(error) => {
                eprintln!("bench: {error}");
                ExitCode::from(2)
            }
        };
    }
    if args.profile == Profile::Http {
        return http_command(&args, &runtime);
    }
    if args.find_capacity {
        eprintln!("bench: --find-capacity needs --profile agents");
        return ExitCode::from(2);
    }
    let report = match measure(&args, cores, &runtime) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("bench failed: {error}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        if let Err(code) = print_json(&report) {
            return code;
        }
    } else {
        print_table(&report);
    }
    if report.lost != 0 || report.duplicated != 0 || report.other_faults != 0 {
        eprintln!(
            "bench: FAILED: {} lost, {} duplicated, {} other faults (see the report)",
            report.lost, report.duplicated, report.other_faults
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The agents profile's options, from the command line.
fn agents_options(args: &Args) -> Result<agents_command::AgentsOptions, workload::Error> {
    let seconds = |value: f64, name: &str| {
        Duration::try_from_secs_f64(value)
            .map_err(|_| format!("{name} must be a positive number of seconds, not {value}"))
    };
    let runs = args
        .runs
        .unwrap_or(if args.find_capacity { 250 } else { 100 });
    let load = agents::AgentsLoad {
        runs,
        sessions: args.sessions.unwrap_or(runs),
        token_rate: args.token_rate,
        duration: seconds(args.duration, "--duration")?,
        jitter: args.jitter,
        tool_every: seconds(args.tool_every, "--tool-every")?,
        durability: args.durability.into(),
        run_ids: None,
    };
    load.validate()?;
    let capacity = if args.find_capacity {
        if !(args.p99_ms.is_finite() && args.p99_ms > 0.0) {
            return Err(format!("--p99-ms must be a positive number, not {}", args.p99_ms).into());
        }
        if args.max_runs == 0 {
            return Err("--max-runs must be at least 1".into());
        }
        Some(agents_command::CapacityOptions {
            p99_ms: args.p99_ms,
            max_runs: args.max_runs,
            budget: Duration::from_secs(args.search_budget),
            bisect_steps: args.bisect_steps,
        })
    } else {
        None
    };
    Ok(agents_command::AgentsOptions {
        load,
        sessions_given: args.sessions.is_some(),
        temporary: args.temporary,
        hub_in_flight: args.hub_in_flight,
        json: args.json,
        capacity,
        nats: args.nats.clone().map(|url| agents_command::NatsTarget {
            url,
            hosts: args.hosts,
            atomic_batches: !args.nats_one_at_a_time,
        }),
    })
}

/// Runs the hub (full speed, then half load if asked), then the baselines.
fn measure(
    args: &Args,
    cores: usize,
    runtime: &tokio::runtime::Runtime,
) -> Result<Report, workload::Error> {
    let timeout = Duration::from_secs(args.timeout);
    let mut work = Workload::new(args.rooms, args.subscribers, args.events)
        .size(args.size)
        .durability(args.durability.into());
    work.in_flight = args.in_flight;
    work.rate = args.rate;
    work.timeout = timeout;
    work.evict_within = args.evict.then_some(Duration::from_secs(60));
    work.shared_envelopes = args.shared;
    let hub_in_flight = args
        .hub_in_flight
        .unwrap_or_else(|| work.default_hub_in_flight());
    let maker = EventMaker::new(args.size);
    let config = ConfigReport {
        rooms: args.rooms,
        subscribers: args.subscribers,
        events_per_room: args.events,
        size: args.size,
        encoded_bytes: maker.encoded_len(),
        durability: match args.durability {
            DurabilityArg::Flushed => "flushed",
            DurabilityArg::Buffered => "buffered",
        },
        storage: if args.temporary {
            "temporary (/dev/shm)"
        } else {
            "tempdir"
        },
        in_flight: args.in_flight,
        hub_in_flight,
        ring_capacity: args.ring_capacity,
        rate: args.rate,
        half_load: args.half_load,
        evict: args.evict,
        shared_envelopes: args.shared,
    };

    // The hub runs.
    let dir = tempfile::tempdir()?;
    let base = if args.temporary {
        Config::temporary()
    } else {
        Config::new(dir.path().join("hub"))
    };
    let mut hub_config = work.config(base).max_in_flight_publishes(hub_in_flight);
    if args.evict {
        hub_config = hub_config.idle_timeout(Duration::from_secs(1));
    }
    if let Some(ring) = args.ring_capacity {
        hub_config = hub_config.ring_capacity(ring);
    }
    let probes = Probes {
        heap: Some(HEAP),
        progress: true,
    };
    let (hub, half_load, peak_rss, rss) = runtime.block_on(async {
        let hub_handle = EventHub::open(hub_config).await?;
        eprintln!("bench: full speed");
        let hub = workload::run_hub(&hub_handle, &work, &probes).await?;
        let (peak_rss, rss) = (proc_status_bytes("VmHWM"), proc_status_bytes("VmRSS"));
        let half_load = if args.half_load {
            let mut half = work.clone();
            half.rate = hub.events_per_s / 2.0;
            half.evict_within = None;
            eprintln!("bench: half load, {:.0} events/s", half.rate);
            Some(workload::run_hub(&hub_handle, &half, &probes).await?)
        } else {
            None
        };
        hub_handle.shutdown().await?;
        Ok::<_, workload::Error>((hub, half_load, peak_rss, rss))
    })?;

    let (nats, nats_host_b) = match &args.nats {
        Some(url) => {
            let (run, host_b) =
                runtime.block_on(nats_run(url, args, &work, hub_in_flight, &probes))?;
            (Some(run), host_b)
        }
        None => (None, None),
    };
    #[cfg(not(feature = "nats"))]
    let _: Option<()> = nats_host_b;

    // The baselines, with the same events and fan-out.
    eprintln!("bench: baselines");
    let count = work.total_events().min(args.size.baseline_cap());
    let keyed = workload::raw_sled_keyed(&maker, args.rooms, count)?;
    let sled_dir = dir.path().join("raw-sled");
    let db = workload::open_sled((!args.temporary).then_some(sled_dir.as_path()))?;
    let flush = work.durability == Durability::Flushed;
    let raw_sled = workload::raw_sled_append(&db, &keyed, flush)?;
    drop(keyed);
    let sled_flush = workload::flush_latency(&db, 200)?;
    drop(db);
    let per_room = workload::broadcast_events_per_room(args.size, args.rooms, args.events);
    let broadcast = runtime.block_on(workload::broadcast_baseline(
        &maker,
        args.rooms,
        args.subscribers,
        per_room,
        timeout,
    ))?;

    let heap = hub.heap;
    let memory = Memory {
        peak_rss_bytes: peak_rss,
        rss_bytes: rss,
        heap_before_rooms: heap.map(|h| h.before_rooms),
        heap_per_room: heap.map(|h| h.per_room),
        heap_peak_over_before: heap.map(|h| signed(h.peak_while_running) - signed(h.before_rooms)),
    };
    let eviction = hub.eviction.map(|e| EvictionReport {
        rooms_live_before: e.rooms_live_before,
        rooms_live_after: e.rooms_live_after,
        evicted_during_run: e.evicted_during_run,
        evicted_total: e.evicted_total,
        waited_s: e.waited_s,
        heap_before_rooms: heap.map(|h| h.before_rooms),
        heap_end_of_run: heap.map(|h| h.end_of_run),
        heap_after_eviction: e.heap_after,
        heap_after_minus_before: heap
            .zip(e.heap_after)
            .map(|(h, after)| signed(after) - signed(h.before_rooms)),
        freed_per_room: heap
            .zip(e.heap_after)
            .filter(|_| e.rooms_live_before > 0)
            .map(|(h, after)| (h.end_of_run as f64 - after as f64) / e.rooms_live_before as f64),
    });
    let latency_p99 = half_load
        .as_ref()
        .map_or(hub.latency.p99_ms, |h| h.latency.p99_ms);
    let ratios = Ratios {
        hub_events_over_raw_sled: hub.events_per_s / raw_sled.events_per_s,
        hub_deliveries_over_broadcast: hub.deliveries_per_s / broadcast.deliveries_per_s,
        nats_hub_events_over_sled_hub: nats.as_ref().map(|n| n.events_per_s / hub.events_per_s),
        p99_over_flush_p50: latency_p99 / sled_flush.p50_ms,
        p99_over_batch_flush_p50: raw_sled.batch_flush.map(|f| latency_p99 / f.p50_ms),
    };
    let runs = std::iter::once(&hub)
        .chain(half_load.as_ref())
        .chain(nats.as_ref());
    let (mut lost, mut duplicated, mut other_faults) = (0, 0, 0);
    #[cfg(feature = "nats")]
    if let Some(host_b) = &nats_host_b {
        lost += host_b.lost;
        duplicated += host_b.duplicated;
        other_faults += host_b.out_of_order + host_b.errors;
    }
    for run in runs {
        lost += run.lost;
        duplicated += run.duplicated;
        other_faults += run.seq_mismatches
            + run.stream_errors
            + run.expected_deliveries.abs_diff(run.deliveries);
    }
    Ok(Report {
        lost,
        duplicated,
        other_faults,
        config,
        machine: Machine {
            cores,
            cpu: cpu_model(),
        },
        hub,
        half_load,
        nats,
        #[cfg(feature = "nats")]
        nats_host_b,
        memory,
        eviction,
        baselines: Baselines {
            raw_sled,
            broadcast,
            sled_flush,
        },
        ratios,
    })
}

/// A fresh stream and prefix on the server at `url`, for one run.
#[cfg(feature = "nats")]
fn fresh_nats(url: &str, atomic_batches: bool) -> behest_stream::nats::NatsConfig {
    let mut nats = behest_stream::nats::NatsConfig::new(url);
    let unique = uuid::Uuid::now_v7().simple().to_string();
    nats.stream = format!("BEHEST_BENCH_{unique}");
    nats.prefix = format!("bench{unique}");
    nats.atomic_batches = atomic_batches;
    nats
}

/// Shuts `hub` down and deletes its stream, whatever `outcome` the run on
/// it had; then that outcome.
#[cfg(feature = "nats")]
async fn close_nats<T>(
    hub: EventHub,
    nats: &behest_stream::nats::NatsConfig,
    outcome: Result<T, workload::Error>,
) -> Result<T, workload::Error> {
    let shutdown = hub.shutdown().await;
    let client = async_nats::connect(nats.url.as_str())
        .await
        .map_err(|e| e.to_string())?;
    async_nats::jetstream::new(client)
        .delete_stream(&nats.stream)
        .await
        .map_err(|e| e.to_string())?;
    let outcome = outcome?;
    shutdown?;
    Ok(outcome)
}

/// What host B of a two-host NATS run received (`--hosts 2`).
#[cfg(feature = "nats")]
type HostB = Option<hosts::FollowerReport>;
#[cfg(not(feature = "nats"))]
type HostB = Option<()>;

/// The workload on a hub over NATS JetStream, in a fresh stream; with
/// `--hosts 2`, followed by host B too.
#[cfg(feature = "nats")]
async fn nats_run(
    url: &str,
    args: &Args,
    work: &Workload,
    hub_in_flight: usize,
    probes: &Probes,
) -> Result<(HubRun, HostB), workload::Error> {
    let nats = fresh_nats(url, !args.nats_one_at_a_time);
    let config = work
        .config(Config::nats(nats.clone()))
        .max_in_flight_publishes(hub_in_flight);
    let hub = EventHub::open(config).await?;
    let mut work = work.clone();
    work.evict_within = None;
    // The hub is shut down and the stream deleted however the run ends.
    let outcome = async {
        let host_b = if args.hosts == 2 {
            let runs: std::sync::Arc<[behest_stream::RunId]> = (0..work.rooms)
                .map(|_| behest_stream::RunId::new())
                .collect();
            work.run_ids = Some(std::sync::Arc::clone(&runs));
            eprintln!("bench: starting host B");
            let follower = hosts::Follower::start(
                url,
                &nats.stream,
                &nats.prefix,
                &runs,
                work.events,
                work.timeout,
            )
            .await?;
            let client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
            // The client reads the account info of nats-server 2.10 and
            // later only.
            let consumers = match async_nats::jetstream::new(client).query_account().await {
                Ok(account) => Some(account.consumers),
                Err(error) => {
                    eprintln!("bench: the server's account info is unreadable here ({error})");
                    None
                }
            };
            Some((follower, consumers))
        } else {
            None
        };
        eprintln!("bench: full speed over NATS at {url}");
        // Host B is dropped (and killed) if host A's run fails.
        let run = workload::run_hub(&hub, &work, probes).await?;
        let host_b = match host_b {
            Some((follower, consumers)) => {
                let mut report = follower.finish(work.timeout).await?;
                report.account_consumers = consumers;
                Some(report)
            }
            None => None,
        };
        Ok::<_, workload::Error>((run, host_b))
    }
    .await;
    close_nats(hub, &nats, outcome).await
}

#[cfg(not(feature = "nats"))]
async fn nats_run(
    _url: &str,
    _args: &Args,
    _work: &Workload,
    _hub_in_flight: usize,
    _probes: &Probes,
) -> Result<(HubRun, HostB), workload::Error> {
    Err(
        "--nats needs the nats feature: cargo run --release -p behest-stream-bench --features nats"
            .into(),
    )
}

/// The agents profile on a hub over NATS JetStream, in a fresh stream;
/// with two hosts, every run followed by host B too.
#[cfg(feature = "nats")]
async fn agents_over_nats(
    target: &agents_command::NatsTarget,
    load: &agents::AgentsLoad,
    rooms: usize,
    in_flight: usize,
    heap: HeapProbe,
) -> Result<(agents::AgentsRun, HostB), workload::Error> {
    let nats = fresh_nats(&target.url, target.atomic_batches);
    let config = Config::nats(nats.clone())
        .durability(load.durability)
        .max_rooms(rooms)
        .max_in_flight_publishes(in_flight);
    let hub = EventHub::open(config).await?;
    // Long enough for the schedule, the drain and starting host B.
    let timeout = load.duration + Duration::from_secs(120);
    let outcome = async {
        let mut load = load.clone();
        let follower = if target.hosts == 2 {
            let runs: std::sync::Arc<[behest_stream::RunId]> = (0..load.runs)
                .map(|_| behest_stream::RunId::new())
                .collect();
            load.run_ids = Some(std::sync::Arc::clone(&runs));
            eprintln!("bench: starting host B");
            Some(
                hosts::Follower::start(
                    &target.url,
                    &nats.stream,
                    &nats.prefix,
                    &runs,
                    load.events_per_run(),
                    timeout,
                )
                .await?,
            )
        } else {
            None
        };
        let run = agents::run_agents(&hub, &load, Some(heap)).await?;
        let host_b = match follower {
            Some(follower) => Some(follower.finish(timeout).await?),
            None => None,
        };
        Ok::<_, workload::Error>((run, host_b))
    }
    .await;
    close_nats(hub, &nats, outcome).await
}

#[cfg(not(feature = "nats"))]
async fn agents_over_nats(
    _target: &agents_command::NatsTarget,
    _load: &agents::AgentsLoad,
    _rooms: usize,
    _in_flight: usize,
    _heap: HeapProbe,
) -> Result<(agents::AgentsRun, HostB), workload::Error> {
    Err(
        "--nats needs the nats feature: cargo run --release -p behest-stream-bench --features nats"
            .into(),
    )
}

/// Host B's lost, duplicated and other faults (`--hosts 2`).
#[cfg(feature = "nats")]
fn host_b_faults(host_b: &HostB) -> (u64, u64, u64) {
    host_b.as_ref().map_or((0, 0, 0), |b| {
        (
            b.lost,
            b.duplicated,
            b.lost + b.duplicated + b.out_of_order + b.errors,
        )
    })
}

#[cfg(not(feature = "nats"))]
fn host_b_faults(_host_b: &HostB) -> (u64, u64, u64) {
    (0, 0, 0)
}

/// Host B's line of a report (`--hosts 2`).
#[cfg(feature = "nats")]
fn host_b_line(host_b: &HostB) -> Option<String> {
    host_b.as_ref().map(|b| {
        format!(
            "host B     {} runs followed over NATS in another process: {} events/s received; stamped on host A -> delivered on host B: p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms; lost {}   duplicated {}   out of order {}; heap per followed run {}",
            b.runs,
            per_s(b.events_per_s),
            b.p50_ms,
            b.p99_ms,
            b.max_ms,
            b.lost,
            b.duplicated,
            b.out_of_order,
            bytes(b.heap_per_run)
        )
    })
}

#[cfg(not(feature = "nats"))]
fn host_b_line(_host_b: &HostB) -> Option<String> {
    None
}

/// Why host B's side of a capacity step did not hold, if it did not.
#[cfg(feature = "nats")]
fn host_b_not_held(host_b: &HostB, p99_ms: f64) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Some(b) = host_b {
        let (_, _, faults) = host_b_faults(host_b);
        if faults != 0 {
            reasons.push(format!("{faults} faults on host B"));
        }
        if b.p99_ms > p99_ms {
            reasons.push(format!("host B p99 {:.2} ms > {p99_ms} ms", b.p99_ms));
        }
    }
    reasons
}

#[cfg(not(feature = "nats"))]
fn host_b_not_held(_host_b: &HostB, _p99_ms: f64) -> Vec<String> {
    Vec::new()
}

/// Host B of `--hosts 2`: follows the runs host A names on stdin and
/// prints its report.
#[cfg(feature = "nats")]
fn follow_host(args: &Args, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let (Some(url), Some(stream), Some(prefix)) =
        (&args.nats, &args.nats_stream, &args.nats_prefix)
    else {
        eprintln!("bench --follow-host needs --nats, --nats-stream and --nats-prefix");
        return ExitCode::from(2);
    };
    let timeout = Duration::from_secs(args.timeout);
    match runtime.block_on(hosts::follow(
        url,
        stream,
        prefix,
        args.events,
        timeout,
        HEAP,
    )) {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("bench host B: cannot write JSON: {error}");
                ExitCode::from(2)
            }
        },
        Err(error) => {
            eprintln!("bench host B failed: {error}");
            ExitCode::from(2)
        }
    }
}

/// `bytes` as a signed number, for differences.
fn signed(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A `/proc/self/status` field given in kB (`VmHWM`, `VmRSS`), in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| {
        line.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The CPU model from `/proc/cpuinfo`, where there is one.
fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

/// Bytes for people: B, KiB, MiB or GiB.
fn bytes(value: f64) -> String {
    let magnitude = value.abs();
    let sign = if value < 0.0 { "-" } else { "" };
    if magnitude >= 1024.0 * 1024.0 * 1024.0 {
        format!("{sign}{:.2} GiB", magnitude / (1024.0 * 1024.0 * 1024.0))
    } else if magnitude >= 1024.0 * 1024.0 {
        format!("{sign}{:.1} MiB", magnitude / (1024.0 * 1024.0))
    } else if magnitude >= 1024.0 {
        format!("{sign}{:.1} KiB", magnitude / 1024.0)
    } else {
        format!("{sign}{magnitude:.0} B")
    }
}

/// A rate for people, with thousands separators.
fn per_s(value: f64) -> String {
    let digits = (value.round() as u64).to_string();
    let mut groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .map(|group| std::str::from_utf8(group).unwrap_or("?"))
        .collect();
    groups.reverse();
    groups.join(",")
}

/// An optional byte count for the table.
fn maybe_bytes<T: Into<f64>>(value: Option<T>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| bytes(v.into()))
}

/// The latency line of a run.
fn latency_line(run: &HubRun) -> String {
    format!(
        "p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        run.latency.p50_ms, run.latency.p99_ms, run.latency.max_ms
    )
}

/// The report as a table on stdout.
fn print_table(report: &Report) {
    let c = &report.config;
    let hub = &report.hub;
    let rate = if c.rate > 0.0 {
        format!("{} events/s", per_s(c.rate))
    } else {
        "unlimited".to_owned()
    };
    println!("behest-stream hub bench");
    println!(
        "config     {} room(s) x {} subscriber(s), {} events/room, {} ({} B encoded), {}, {}, {} in flight/room ({} hub-wide), ring {}, rate {}{}",
        c.rooms,
        c.subscribers,
        c.events_per_room,
        c.size.name(),
        c.encoded_bytes,
        c.durability,
        c.storage,
        c.in_flight,
        c.hub_in_flight,
        c.ring_capacity
            .map_or_else(|| "default".to_owned(), |ring| ring.to_string()),
        rate,
        if c.shared_envelopes {
            ", shared envelopes"
        } else {
            ""
        }
    );
    println!(
        "machine    {} cores, {}",
        report.machine.cores,
        report.machine.cpu.as_deref().unwrap_or("CPU model unknown")
    );
    println!();
    println!(
        "hub        {:>12} events/s total   {:>12} events/s per room   {} events in {:.3} s (subscribing took {:.3} s, untimed)",
        per_s(hub.events_per_s),
        per_s(hub.events_per_s_per_room),
        hub.events,
        hub.elapsed_s,
        hub.subscribe_s
    );
    println!(
        "           {:>12} deliveries/s     {} deliveries",
        per_s(hub.deliveries_per_s),
        hub.deliveries
    );
    println!("latency    {}", latency_line(hub));
    if let Some(half) = &report.half_load {
        println!(
            "half load  {}   at {} events/s target, {} achieved",
            latency_line(half),
            per_s(half.target_rate.unwrap_or(0.0)),
            per_s(half.events_per_s)
        );
    }
    if let Some(nats) = &report.nats {
        println!(
            "over NATS  {:>12} events/s total   {:>12} events/s per room   {} deliveries/s   {}",
            per_s(nats.events_per_s),
            per_s(nats.events_per_s_per_room),
            per_s(nats.deliveries_per_s),
            latency_line(nats)
        );
    }
    #[cfg(feature = "nats")]
    if let Some(b) = &report.nats_host_b {
        println!(
            "host B     {:>12} events/s received ({} runs followed over NATS)   stamped on host A -> delivered on host B: p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   lost {}   duplicated {}   out of order {}   heap per followed run {}   consumers on the server {}",
            per_s(b.events_per_s),
            b.runs,
            b.p50_ms,
            b.p99_ms,
            b.max_ms,
            b.lost,
            b.duplicated,
            b.out_of_order,
            bytes(b.heap_per_run),
            b.account_consumers
                .map_or_else(|| "?".to_owned(), |n| n.to_string())
        );
    }
    let m = &report.memory;
    println!(
        "memory     peak RSS {}   RSS {}   heap before rooms {}   heap per active room {} (room + {} subscriber(s))   peak heap while running +{}",
        maybe_bytes(m.peak_rss_bytes.map(|v| v as f64)),
        maybe_bytes(m.rss_bytes.map(|v| v as f64)),
        maybe_bytes(m.heap_before_rooms.map(|v| v as f64)),
        maybe_bytes(m.heap_per_room),
        c.subscribers,
        maybe_bytes(m.heap_peak_over_before.map(|v| v as f64)),
    );
    println!(
        "checks     lost {}   duplicated {}   other faults {}{}",
        report.lost,
        report.duplicated,
        report.other_faults,
        hub.first_stream_error
            .as_deref()
            .map(|e| format!("   first stream error: {e}"))
            .unwrap_or_default()
    );
    println!();
    let b = &report.baselines;
    let r = &report.ratios;
    println!("baselines (same process, after the hub runs)");
    println!(
        "  raw sled, {} events, batches of 256, {:<9} {:>12} events/s       hub / raw sled   {:.2}",
        b.raw_sled.events,
        if b.raw_sled.flushed {
            "flushed"
        } else {
            "no flush"
        },
        per_s(b.raw_sled.events_per_s),
        r.hub_events_over_raw_sled
    );
    println!(
        "  tokio broadcast, {} x {} x {} events          {:>12} deliveries/s   hub / broadcast  {:.2}{}",
        b.broadcast.rooms,
        b.broadcast.subscribers,
        b.broadcast.events_per_room,
        per_s(b.broadcast.deliveries_per_s),
        r.hub_deliveries_over_broadcast,
        if b.broadcast.lagged > 0 || b.broadcast.out_of_order > 0 {
            format!(
                " ({} lagged, {} out of order)",
                b.broadcast.lagged, b.broadcast.out_of_order
            )
        } else {
            String::new()
        }
    );
    if let Some(ratio) = r.nats_hub_events_over_sled_hub {
        println!(
            "  the hub over NATS, same workload                                   NATS hub / sled hub  {ratio:.2}"
        );
    }
    let which = if report.half_load.is_some() {
        "half-load p99"
    } else {
        "hub p99"
    };
    println!(
        "  one sled flush (one small key), {} samples      p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   {which} / flush p50  {:.2}",
        b.sled_flush.samples,
        b.sled_flush.p50_ms,
        b.sled_flush.p99_ms,
        b.sled_flush.max_ms,
        r.p99_over_flush_p50
    );
    if let (Some(f), Some(ratio)) = (b.raw_sled.batch_flush, r.p99_over_batch_flush_p50) {
        println!(
            "  one sled flush (batch of 256), {} samples      p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   {which} / flush p50  {:.2}",
            f.samples, f.p50_ms, f.p99_ms, f.max_ms, ratio
        );
    }
    if let Some(e) = &report.eviction {
        println!();
        println!(
            "eviction   rooms live at the end of the run {} -> {} after {:.1} s ({} of {} rooms evicted during the run, {} in all)",
            e.rooms_live_before,
            e.rooms_live_after,
            e.waited_s,
            e.evicted_during_run,
            c.rooms,
            e.evicted_total
        );
        println!(
            "           heap before rooms {}   end of run {}   after eviction {} ({} vs before; the wait freed {} per evicted room)",
            maybe_bytes(e.heap_before_rooms.map(|v| v as f64)),
            maybe_bytes(e.heap_end_of_run.map(|v| v as f64)),
            maybe_bytes(e.heap_after_eviction.map(|v| v as f64)),
            e.heap_after_minus_before
                .map_or_else(|| "n/a".to_owned(), |v| format!("{:+}", Bytes(v))),
            maybe_bytes(e.freed_per_room),
        );
    }
}

/// A signed byte count that prints with its sign.
struct Bytes(i64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = bytes(self.0 as f64);
        if f.sign_plus() && self.0 >= 0 {
            write!(f, "+{text}")
        } else {
            f.write_str(&text)
        }
    }
}

/// `--profile http`: the report, as a table or JSON.
fn http_command(args: &Args, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let options = http_load::HttpOptions {
        writers: args.http_writers.clone(),
        appends: args.http_appends,
        readers: args.http_readers,
        messages: args.http_messages,
        message_bytes: args.http_message_bytes,
    };
    let report = match runtime.block_on(http_load::run(&options)) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("bench failed: {error}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        if let Err(code) = print_json(&report) {
            return code;
        }
    } else {
        println!("writers  appends/s  p50 ms  p99 ms  hub publishes/s  http/hub");
        for a in &report.appends {
            println!(
                "{:>7}  {:>9.0}  {:>6.2}  {:>6.2}  {:>15.0}  {:>8.2}",
                a.writers,
                a.appends_per_s,
                a.p50_ms,
                a.p99_ms,
                a.hub_publishes_per_s,
                a.http_over_hub
            );
        }
        let f = &report.fan_out;
        println!(
            "fan-out: {} SSE readers x {} messages: {:.0} deliveries/s (hub {:.0}/s, http/hub {:.2}); lost {}, duplicated {}",
            f.readers,
            f.messages,
            f.deliveries_per_s,
            f.hub_deliveries_per_s,
            f.http_over_hub,
            f.lost,
            f.duplicated
        );
    }
    if report.fan_out.lost + report.fan_out.duplicated > 0 {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// A report as one line of JSON on stdout; exit status 2 if it cannot be.
fn print_json(report: &impl Serialize) -> Result<(), ExitCode> {
    match serde_json::to_string(report) {
        Ok(json) => {
            println!("{json}");
            Ok(())
        }
        Err(error) => {
            eprintln!("bench: cannot write JSON: {error}");
            Err(ExitCode::from(2))
        }
    }
}
