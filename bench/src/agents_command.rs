//! `bench --profile agents`: one agent-shaped load (`bench/src/agents.rs`)
//! on a fresh hub, or, with `--find-capacity`, a search for the most
//! concurrent runs the host serves within a p99 bound; and their reports.
//!
//! The capacity search runs the load for more and more runs, each step on a
//! fresh hub in a fresh temporary directory: doubling from the first step
//! while steps hold, then bisecting between the largest that held and the
//! smallest that did not, for a bounded number of steps and a bounded time.
//! A step holds if the hub kept up (see [`agents::KEPT_UP_SHARE`]), the
//! run subscribers' p99 was within the bound, and nothing was lost,
//! duplicated or otherwise wrong.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use behest_stream::{Config, EventHub};
use serde::Serialize;

use super::agents::{self, AgentsLoad, AgentsRun, Overloaded};
use super::workload::{Error, HeapProbe};
use super::{
    HostB, bytes, cpu_model, host_b_faults, host_b_line, host_b_not_held, per_s, proc_status_bytes,
};

/// What the command was asked to do.
#[derive(Debug, Clone)]
pub struct AgentsOptions {
    /// The load (for a capacity search, its first step's).
    pub load: AgentsLoad,
    /// `--sessions` was given: keep its ratio to the runs in every step.
    pub sessions_given: bool,
    /// Open the hub with `Config::temporary()` instead of a temporary
    /// directory.
    pub temporary: bool,
    /// The hub-wide bound on publishes in flight, if not one per run.
    pub hub_in_flight: Option<usize>,
    /// One JSON object on stdout instead of the table.
    pub json: bool,
    /// Search for the capacity instead of running one load.
    pub capacity: Option<CapacityOptions>,
    /// Run the hub over NATS JetStream (a fresh stream per load) instead
    /// of sled; with two hosts, the run subscribers that count are on
    /// host B, another process.
    pub nats: Option<NatsTarget>,
}

/// `--nats URL [--hosts 2] [--nats-one-at-a-time]` for the agents profile.
#[derive(Debug, Clone)]
// Read only by the `nats` build; the other one refuses `--nats`.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub struct NatsTarget {
    /// The server.
    pub url: String,
    /// 1, or 2: host B follows every run from another process.
    pub hosts: u8,
    /// `NatsConfig::atomic_batches`.
    pub atomic_batches: bool,
}

/// The bounds of a capacity search.
#[derive(Debug, Clone, Copy)]
pub struct CapacityOptions {
    /// A step holds only if the run subscribers' p99 is at most this.
    pub p99_ms: f64,
    /// Most runs a step has.
    pub max_runs: usize,
    /// No step starts once the search has taken this long, or would take
    /// it by the step's likely end.
    pub budget: Duration,
    /// Most bisecting steps after the first step that did not hold.
    pub bisect_steps: usize,
}

/// The configuration of the hub, as reported.
#[derive(Debug, Clone, Serialize)]
struct HubSetup {
    durability: &'static str,
    storage: &'static str,
    hub_in_flight: usize,
}

/// The machine, as reported.
#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    cpu: Option<String>,
    /// `/proc/loadavg`'s 1, 5 and 15 minute averages before the load.
    load_average_before: Option<String>,
    /// The same after it.
    load_average_after: Option<String>,
}

/// Memory of the process after a load.
#[derive(Debug, Clone, Copy, Serialize)]
struct Rss {
    /// `VmRSS` after the load.
    rss_bytes: Option<u64>,
    /// `VmHWM` after the load: the process's peak so far.
    peak_rss_bytes: Option<u64>,
}

impl Rss {
    fn now() -> Self {
        Self {
            rss_bytes: proc_status_bytes("VmRSS"),
            peak_rss_bytes: proc_status_bytes("VmHWM"),
        }
    }
}

/// The report of one load.
#[derive(Debug, Serialize)]
struct LoadReport {
    /// Lost deliveries at either kind of subscriber (must be 0).
    lost: u64,
    /// Duplicated deliveries at either kind of subscriber (must be 0).
    duplicated: u64,
    /// Every fault, those two included (must be 0).
    faults: u64,
    hub: HubSetup,
    machine: Machine,
    agents: AgentsRun,
    /// What host B received (`--nats URL --hosts 2`).
    host_b: HostB,
    memory: Rss,
}

/// One step of a capacity search.
#[derive(Debug, Serialize)]
struct Step {
    runs: usize,
    held: bool,
    /// Why it did not hold.
    reason: Option<String>,
    /// The load's report, unless it failed outright.
    agents: Option<AgentsRun>,
    /// What host B received (`--nats URL --hosts 2`).
    host_b: HostB,
    memory: Rss,
    /// Wall time of the step, opening and closing the hub included.
    took_s: f64,
}

/// The report of a capacity search.
#[derive(Debug, Serialize)]
struct CapacityReport {
    /// Lost deliveries over every step (must be 0).
    lost: u64,
    /// Duplicated deliveries over every step (must be 0).
    duplicated: u64,
    /// Every fault over every step (must be 0).
    faults: u64,
    hub: HubSetup,
    machine: Machine,
    p99_bound_ms: f64,
    token_rate: f64,
    duration_s: f64,
    max_runs: usize,
    /// The largest number of runs that held (0 if none did).
    capacity: usize,
    /// The smallest that did not, if one was tried.
    first_not_held: Option<usize>,
    /// Why the search stopped.
    stopped: String,
    /// The one-line answer.
    summary: String,
    took_s: f64,
    steps: Vec<Step>,
}

/// Runs the command; the exit status is 1 for any fault a subscriber or
/// publisher found, 2 for a load or search that could not run.
pub fn run(
    options: &AgentsOptions,
    runtime: &tokio::runtime::Runtime,
    heap: HeapProbe,
    cores: usize,
) -> ExitCode {
    if let Err(error) = options.load.validate() {
        eprintln!("bench: {error}");
        return ExitCode::from(2);
    }
    let load_average_before = load_average();
    let hub = HubSetup {
        durability: match options.load.durability {
            behest_stream::Durability::Buffered => "buffered",
            _ => "flushed",
        },
        storage: if options.temporary {
            "temporary (/dev/shm)"
        } else {
            "tempdir"
        },
        hub_in_flight: hub_in_flight(options, &options.load),
    };
    let machine = |after| Machine {
        cores,
        cpu: cpu_model(),
        load_average_before: load_average_before.clone(),
        load_average_after: after,
    };
    let (faults, printed) = match options.capacity {
        None => {
            let (agents, host_b) = match runtime.block_on(one_load(options, &options.load, heap)) {
                Ok(outcome) => outcome,
                Err(error) => {
                    eprintln!("bench failed: {error}");
                    return ExitCode::from(2);
                }
            };
            let (b_lost, b_duplicated, b_faults) = host_b_faults(&host_b);
            let report = LoadReport {
                lost: agents.lost() + b_lost,
                duplicated: agents.duplicated() + b_duplicated,
                faults: agents.faults() + b_faults,
                hub,
                machine: machine(load_average()),
                memory: Rss::now(),
                agents,
                host_b,
            };
            let faults = (report.lost, report.duplicated, report.faults);
            let printed = if options.json {
                print_json(&report)
            } else {
                print_load(&report);
                true
            };
            (faults, printed)
        }
        Some(capacity) => {
            let search = match search(options, capacity, runtime, heap) {
                Ok(search) => search,
                Err(error) => {
                    eprintln!("bench failed: {error}");
                    return ExitCode::from(2);
                }
            };
            let sum = |f: fn(&AgentsRun) -> u64| -> u64 {
                search
                    .steps
                    .iter()
                    .filter_map(|s| s.agents.as_ref())
                    .map(f)
                    .sum()
            };
            let on_b = |pick: fn((u64, u64, u64)) -> u64| -> u64 {
                search
                    .steps
                    .iter()
                    .map(|s| pick(host_b_faults(&s.host_b)))
                    .sum()
            };
            let report = CapacityReport {
                lost: sum(AgentsRun::lost) + on_b(|f| f.0),
                duplicated: sum(AgentsRun::duplicated) + on_b(|f| f.1),
                faults: sum(AgentsRun::faults) + on_b(|f| f.2),
                hub,
                machine: machine(load_average()),
                p99_bound_ms: capacity.p99_ms,
                token_rate: options.load.token_rate,
                duration_s: options.load.duration.as_secs_f64(),
                max_runs: capacity.max_runs,
                capacity: search.capacity,
                first_not_held: search.first_not_held,
                stopped: search.stopped,
                summary: format!(
                    "{} {} concurrent runs at {} tokens/s with p99 <= {} ms",
                    match &options.nats {
                        Some(target) if target.hosts == 2 => {
                            "host A writes and host B (another process, over NATS) follows"
                        }
                        Some(_) => "this host, over NATS, serves",
                        None => "this host serves",
                    },
                    search.capacity,
                    trim(options.load.token_rate),
                    trim(capacity.p99_ms)
                ),
                took_s: search.took_s,
                steps: search.steps,
            };
            let faults = (report.lost, report.duplicated, report.faults);
            let printed = if options.json {
                print_json(&report)
            } else {
                print_capacity(&report);
                true
            };
            (faults, printed)
        }
    };
    if !printed {
        return ExitCode::from(2);
    }
    let (lost, duplicated, all) = faults;
    if all != 0 {
        eprintln!(
            "bench: FAILED: {lost} lost, {duplicated} duplicated, {} other faults (see the report)",
            all - lost - duplicated
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn print_json<T: Serialize>(report: &T) -> bool {
    match serde_json::to_string(report) {
        Ok(json) => {
            println!("{json}");
            true
        }
        Err(error) => {
            eprintln!("bench: cannot write JSON: {error}");
            false
        }
    }
}

/// Publishes in flight hub-wide: as given, else one per run (at least the
/// hub's default 4096), so that the bound never makes a run wait.
fn hub_in_flight(options: &AgentsOptions, load: &AgentsLoad) -> usize {
    options
        .hub_in_flight
        .unwrap_or_else(|| load.hub_in_flight())
}

/// `load` on a fresh hub in a fresh temporary directory.
async fn one_load(
    options: &AgentsOptions,
    load: &AgentsLoad,
    heap: HeapProbe,
) -> Result<(AgentsRun, HostB), Error> {
    let rooms = (load.runs + load.sessions).saturating_mul(2).max(100_000);
    let in_flight = hub_in_flight(options, load);
    eprintln!(
        "bench: agents, {} runs over {} sessions at {} tokens/s for {} s",
        load.runs,
        load.sessions,
        load.token_rate,
        load.duration.as_secs_f64()
    );
    if let Some(target) = &options.nats {
        return super::agents_over_nats(target, load, rooms, in_flight, heap).await;
    }
    let dir = tempfile::tempdir()?;
    let base = if options.temporary {
        Config::temporary()
    } else {
        Config::new(dir.path().join("hub"))
    };
    let config = base
        .durability(load.durability)
        .max_rooms(rooms)
        .max_in_flight_publishes(in_flight);
    let hub = EventHub::open(config).await?;
    let run = agents::run_agents(&hub, load, Some(heap)).await;
    hub.shutdown().await?;
    Ok((run?, None))
}

/// What a capacity search found.
struct Search {
    capacity: usize,
    first_not_held: Option<usize>,
    stopped: String,
    took_s: f64,
    steps: Vec<Step>,
}

/// The capacity search (see the module docs).
fn search(
    options: &AgentsOptions,
    capacity: CapacityOptions,
    runtime: &tokio::runtime::Runtime,
    heap: HeapProbe,
) -> Result<Search, Error> {
    let first = &options.load;
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let (mut held_most, mut failed_least) = (0usize, None::<usize>);
    let mut runs = first.runs.min(capacity.max_runs).max(1);
    let mut bisected = 0;
    let mut last_took = first.duration + Duration::from_secs(10);
    let stopped = loop {
        if started.elapsed() + last_took > capacity.budget {
            break format!(
                "the time budget ({} s) would be passed by the next step",
                capacity.budget.as_secs()
            );
        }
        let mut load = first.clone();
        load.runs = runs;
        load.sessions = if options.sessions_given {
            (runs * first.sessions).div_ceil(first.runs).clamp(1, runs)
        } else {
            runs
        };
        let step_started = Instant::now();
        let outcome = runtime.block_on(one_load(options, &load, heap));
        let memory = Rss::now();
        let (held, reason, agents, host_b) = match outcome {
            Ok((agents, host_b)) => {
                let reason = not_held(&agents, &host_b, capacity.p99_ms);
                (reason.is_none(), reason, Some(agents), host_b)
            }
            Err(error) if error.downcast_ref::<Overloaded>().is_some() => {
                (false, Some(error.to_string()), None, None)
            }
            Err(error) => return Err(error),
        };
        last_took = step_started.elapsed();
        eprintln!(
            "bench: {runs} runs {}",
            match &reason {
                None => "held".to_owned(),
                Some(reason) => format!("did not hold: {reason}"),
            }
        );
        steps.push(Step {
            runs,
            held,
            reason,
            agents,
            host_b,
            memory,
            took_s: last_took.as_secs_f64(),
        });
        if held {
            held_most = held_most.max(runs);
        } else {
            failed_least = Some(failed_least.map_or(runs, |least| least.min(runs)));
        }
        match failed_least {
            None if runs >= capacity.max_runs => {
                break format!("every step held, up to --max-runs ({})", capacity.max_runs);
            }
            None => runs = (runs * 2).min(capacity.max_runs),
            Some(least) => {
                // Closer than 5% (or one run) is as good as it gets here:
                // steps vary more than that from run to run.
                if least - held_most <= (held_most / 20).max(1) {
                    break format!("bisected to within {} runs", least - held_most);
                }
                if bisected == capacity.bisect_steps {
                    break format!("after {bisected} bisecting steps");
                }
                bisected += 1;
                runs = held_most + (least - held_most) / 2;
            }
        }
    };
    Ok(Search {
        capacity: held_most,
        first_not_held: failed_least,
        stopped,
        took_s: started.elapsed().as_secs_f64(),
        steps,
    })
}

/// Why a step did not hold, or `None` if it held.
fn not_held(agents: &AgentsRun, host_b: &HostB, p99_ms: f64) -> Option<String> {
    let mut reasons = host_b_not_held(host_b, p99_ms);
    if agents.faults() != 0 {
        reasons.push(format!("{} faults", agents.faults()));
    }
    if !agents.kept_up {
        reasons.push(format!(
            "did not keep up ({:.1}% delivered by the end, backlog {})",
            100.0
                * agents
                    .delivered_runs_by_end
                    .min(agents.delivered_sessions_by_end) as f64
                / agents.offered_events.max(1) as f64,
            agents.backlog_at_end
        ));
    }
    if agents.latency.p99_ms > p99_ms {
        reasons.push(format!(
            "p99 {:.2} ms > {} ms",
            agents.latency.p99_ms,
            trim(p99_ms)
        ));
    }
    (!reasons.is_empty()).then(|| reasons.join(", "))
}

/// A number without trailing zeros: 30, 2.5.
fn trim(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// `/proc/loadavg`'s three averages, where there is one.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn ms(latency: &super::workload::Latency) -> String {
    format!(
        "p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        latency.p50_ms, latency.p99_ms, latency.max_ms
    )
}

fn maybe_bytes(value: Option<u64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| bytes(v as f64))
}

fn faults_line(faults: &agents::Faults) -> String {
    format!(
        "lost {}   duplicated {}   reordered {}   stray {}   not ended {}   seq mismatches {}   stream errors {}{}",
        faults.lost,
        faults.duplicated,
        faults.reordered,
        faults.stray,
        faults.not_ended,
        faults.seq_mismatches,
        faults.stream_errors,
        faults
            .first_stream_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    )
}

fn print_load(report: &LoadReport) {
    let a = &report.agents;
    let h = &report.hub;
    let m = &report.machine;
    println!("behest-stream hub bench, agents profile");
    println!(
        "config     {} runs over {} sessions, {} tokens/s per run (jitter ±{}%), {} events per run over {} s, a tool call every ~{} s (4 KiB result); {}, {}, {} publishes in flight hub-wide",
        a.runs,
        a.sessions,
        trim(a.token_rate),
        trim(a.jitter * 100.0),
        a.events_per_run,
        trim(a.duration_s),
        trim(a.tool_every_s),
        h.durability,
        h.storage,
        h.hub_in_flight
    );
    println!(
        "machine    {} cores, {}; load average {} before, {} after",
        m.cores,
        m.cpu.as_deref().unwrap_or("CPU model unknown"),
        m.load_average_before.as_deref().unwrap_or("n/a"),
        m.load_average_after.as_deref().unwrap_or("n/a"),
    );
    println!();
    println!(
        "offered    {} events/s nominal ({} runs x {} tokens/s); {} events over a {:.2} s schedule = {} events/s",
        per_s(a.nominal_events_per_s),
        a.runs,
        trim(a.token_rate),
        a.offered_events,
        a.schedule_s,
        per_s(a.offered_events_per_s)
    );
    println!(
        "delivered  by the schedule's end: {} events/s to run subscribers, {} to session subscribers; backlog then {} events; last delivery {:.2} s after the end",
        per_s(a.delivered_runs_per_s),
        per_s(a.delivered_sessions_per_s),
        a.backlog_at_end,
        a.drain_s
    );
    println!(
        "kept up    {} (rule: both >= {}% of offered by the schedule's end, backlog then <= {} s of the nominal load)",
        if a.kept_up { "yes" } else { "NO" },
        trim(agents::KEPT_UP_SHARE * 100.0),
        trim(agents::KEPT_UP_BACKLOG_S)
    );
    println!(
        "behind     runs acknowledged their last event p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms after it was due",
        a.behind_at_end.p50_ms, a.behind_at_end.p99_ms, a.behind_at_end.max_ms
    );
    println!(
        "latency    publish -> run subscriber      {}   ({} samples)",
        ms(&a.latency),
        a.latency.samples
    );
    println!(
        "           publish -> session subscriber  {}",
        ms(&a.session_latency)
    );
    println!(
        "           publish -> acknowledged        {}",
        ms(&a.publish_latency)
    );
    if let Some(line) = host_b_line(&report.host_b) {
        println!("{line}");
    }
    match &a.heap {
        Some(heap) => println!(
            "memory     heap before {}   per run: once subscribed {}, halfway {}, at the peak {} (+{} in all)   RSS {}   peak RSS {}",
            bytes(heap.before as f64),
            bytes(heap.per_run_subscribed),
            bytes(heap.per_run_middle),
            bytes(heap.per_active_run),
            bytes(heap.peak_over_before as f64),
            maybe_bytes(report.memory.rss_bytes),
            maybe_bytes(report.memory.peak_rss_bytes),
        ),
        None => println!(
            "memory     RSS {}   peak RSS {}",
            maybe_bytes(report.memory.rss_bytes),
            maybe_bytes(report.memory.peak_rss_bytes),
        ),
    }
    println!(
        "           (subscribing {} subscribers took {:.2} s, untimed)",
        a.runs + a.sessions,
        a.subscribe_s
    );
    println!(
        "checks     run subscribers:     {}",
        faults_line(&a.run_faults)
    );
    println!(
        "           session subscribers: {}",
        faults_line(&a.session_faults)
    );
}

fn print_capacity(report: &CapacityReport) {
    let h = &report.hub;
    let m = &report.machine;
    println!("behest-stream hub bench, agents profile, capacity search");
    println!(
        "config     {} tokens/s per run for {} s per step, p99 bound {} ms, at most {} runs; {}, {}; load average {} before, {} after; {} cores, {}",
        trim(report.token_rate),
        trim(report.duration_s),
        trim(report.p99_bound_ms),
        report.max_runs,
        h.durability,
        h.storage,
        m.load_average_before.as_deref().unwrap_or("n/a"),
        m.load_average_after.as_deref().unwrap_or("n/a"),
        m.cores,
        m.cpu.as_deref().unwrap_or("CPU model unknown"),
    );
    println!();
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9} {:>10} {:>9} {:>6} {:>6}  held",
        "runs",
        "offered/s",
        "runs/s",
        "session/s",
        "kept up",
        "p50 ms",
        "p99 ms",
        "max ms",
        "heap/run",
        "RSS",
        "lost",
        "dup"
    );
    for step in &report.steps {
        let verdict = match &step.reason {
            None => "yes".to_owned(),
            Some(reason) => format!("no: {reason}"),
        };
        match &step.agents {
            Some(a) => println!(
                "{:>6} {:>10} {:>10} {:>10} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>9} {:>6} {:>6}  {verdict}",
                step.runs,
                per_s(a.offered_events_per_s),
                per_s(a.delivered_runs_per_s),
                per_s(a.delivered_sessions_per_s),
                if a.kept_up { "yes" } else { "no" },
                a.latency.p50_ms,
                a.latency.p99_ms,
                a.latency.max_ms,
                a.heap
                    .map_or_else(|| "n/a".to_owned(), |h| bytes(h.per_active_run)),
                maybe_bytes(step.memory.rss_bytes),
                a.lost(),
                a.duplicated(),
            ),
            None => println!("{:>6} {:>10}  {verdict}", step.runs, "-"),
        }
    }
    println!();
    println!(
        "search stopped: {} ({:.0} s in all)",
        report.stopped, report.took_s
    );
    println!("{}", report.summary);
}
