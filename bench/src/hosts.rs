//! `--hosts 2`: a second process, host B, follows over NATS the runs that
//! host A (the bench process) writes, on the same stream, and reports what
//! it received and how long after host A's room stamped each envelope
//! (`emitted_at`, the same machine's clock) it got it.
//!
//! Host A starts host B as `bench --follow-host …` with the run ids on its
//! stdin, waits for its `ready` line (every run subscribed, from the start),
//! then publishes; host B prints one JSON line when every run has reached
//! its last event, or its deadline passed.

use std::process::Stdio;
use std::time::Duration;

use behest_stream::{Config, EventHub, Resume, RunId, RuntimeRoom};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::workload::{Error, HeapProbe};

/// Largest latency recorded: one minute, in microseconds.
const MAX_LATENCY_US: u64 = 60_000_000;

/// What host B saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FollowerReport {
    /// Runs followed.
    pub runs: usize,
    /// Envelopes received, in order.
    pub delivered: u64,
    /// Envelopes expected and not received: skipped over, or not there by
    /// the deadline.
    pub lost: u64,
    /// Envelopes received twice.
    pub duplicated: u64,
    /// Envelopes received after a gap (a later seq than the next).
    pub out_of_order: u64,
    /// Stream errors.
    pub errors: u64,
    /// Received envelopes per second, from the first envelope's stamp to
    /// the last delivery.
    pub events_per_s: f64,
    /// Host A's room stamping an envelope to host B's subscriber getting
    /// it: median, in milliseconds.
    pub p50_ms: f64,
    /// … 99th percentile.
    pub p99_ms: f64,
    /// … worst.
    pub max_ms: f64,
    /// Consumers in the server's account (JetStream account info) once
    /// host B had subscribed to every run (filled in by host A).
    #[serde(default)]
    pub account_consumers: Option<usize>,
    /// Host B's heap per followed run: the heap after subscribing to every
    /// run, less the heap before, over the runs.
    pub heap_per_run: f64,
}

/// Host B, running: started, subscribed, not yet done.
pub struct Follower {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Follower {
    /// Starts host B on `stream`/`prefix` at `url`, following `runs` (each
    /// `events` long), and returns once it has subscribed to every run.
    pub async fn start(
        url: &str,
        stream: &str,
        prefix: &str,
        runs: &[RunId],
        events: u64,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--follow-host", "--nats", url, "--nats-stream", stream])
            .args(["--nats-prefix", prefix, "--events", &events.to_string()])
            .args(["--timeout", &timeout.as_secs().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().ok_or("host B has no stdin")?;
        let ids: String = runs.iter().map(|run| format!("{run}\n")).collect();
        stdin.write_all(ids.as_bytes()).await?;
        drop(stdin);
        let mut stdout = BufReader::new(child.stdout.take().ok_or("host B has no stdout")?);
        let mut line = String::new();
        tokio::time::timeout(timeout, stdout.read_line(&mut line))
            .await
            .map_err(|_| "host B did not subscribe in time")??;
        if line.trim() != "ready" {
            return Err(format!("host B did not start: {line:?}").into());
        }
        Ok(Self { child, stdout })
    }

    /// Host B's report, once it has received every run to its end.
    pub async fn finish(mut self, timeout: Duration) -> Result<FollowerReport, Error> {
        let mut out = String::new();
        tokio::time::timeout(timeout, self.stdout.read_to_string(&mut out))
            .await
            .map_err(|_| "host B did not finish in time")??;
        let status = self.child.wait().await?;
        if !status.success() {
            return Err(format!("host B failed ({status})").into());
        }
        Ok(serde_json::from_str(out.trim())?)
    }
}

/// Host B's side: reads the run ids from stdin, follows each from the
/// start on a hub of its own over the stream, prints `ready`, then the
/// report as one JSON line.
pub async fn follow(
    url: &str,
    stream: &str,
    prefix: &str,
    events: u64,
    timeout: Duration,
    heap: HeapProbe,
) -> Result<FollowerReport, Error> {
    let mut ids = String::new();
    tokio::io::stdin().read_to_string(&mut ids).await?;
    let runs = ids
        .lines()
        .map(|line| line.trim().parse::<uuid::Uuid>().map(RunId::from_uuid))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("host B: a run id does not parse: {e}"))?;
    let mut nats = behest_stream::nats::NatsConfig::new(url);
    nats.stream = stream.to_owned();
    nats.prefix = prefix.to_owned();
    let hub =
        EventHub::open(Config::nats(nats).max_rooms(runs.len().saturating_mul(4).max(100_000)))
            .await?;
    let heap_before = (heap.live)();
    let streams = futures_util::stream::iter(runs.iter().copied())
        .map(|run| {
            let hub = hub.clone();
            async move {
                hub.subscribe(RuntimeRoom::Run(run), Resume::FromStart)
                    .await
            }
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let heap_per_run = ((heap.live)() as f64 - heap_before as f64) / runs.len().max(1) as f64;
    println!("ready");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        tasks.spawn(async move {
            let mut tally = Tally::new()?;
            while tally.next <= events {
                let Ok(item) = tokio::time::timeout_at(deadline, stream.next()).await else {
                    break;
                };
                match item {
                    Some(Ok(envelope)) => tally.record(&envelope),
                    Some(Err(_)) => tally.errors += 1,
                    None => break,
                }
            }
            tally.lost += (events + 1).saturating_sub(tally.next);
            Ok::<_, Error>(tally)
        });
    }
    let mut all = Tally::new()?;
    while let Some(joined) = tasks.join_next().await {
        all.merge(joined??)?;
    }
    hub.shutdown().await?;
    let seconds = match (all.first_stamp, all.last_delivery) {
        (Some(first), Some(last)) => (last - first).num_microseconds().unwrap_or(0) as f64 / 1e6,
        _ => 0.0,
    };
    let ms = |quantile: f64| all.latency.value_at_quantile(quantile) as f64 / 1000.0;
    Ok(FollowerReport {
        runs: runs.len(),
        delivered: all.delivered,
        lost: all.lost,
        duplicated: all.duplicated,
        out_of_order: all.out_of_order,
        errors: all.errors,
        events_per_s: all.delivered as f64 / seconds.max(1e-9),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: all.latency.max() as f64 / 1000.0,
        account_consumers: None,
        heap_per_run,
    })
}

/// One run's deliveries on host B, then all of them.
struct Tally {
    next: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    errors: u64,
    latency: Histogram<u64>,
    first_stamp: Option<chrono::DateTime<chrono::Utc>>,
    last_delivery: Option<chrono::DateTime<chrono::Utc>>,
}

impl Tally {
    fn new() -> Result<Self, Error> {
        Ok(Self {
            next: 1,
            delivered: 0,
            lost: 0,
            duplicated: 0,
            out_of_order: 0,
            errors: 0,
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
            first_stamp: None,
            last_delivery: None,
        })
    }

    fn record(&mut self, envelope: &behest_stream::RuntimeEventEnvelope) {
        let now = chrono::Utc::now();
        if envelope.seq < self.next {
            self.duplicated += 1;
            return;
        }
        if envelope.seq > self.next {
            self.out_of_order += 1;
            self.lost += envelope.seq - self.next;
        }
        self.next = envelope.seq + 1;
        self.delivered += 1;
        let us = (now - envelope.emitted_at).num_microseconds().unwrap_or(0);
        self.latency
            .saturating_record(u64::try_from(us).unwrap_or(0).max(1));
        self.first_stamp = Some(
            self.first_stamp
                .map_or(envelope.emitted_at, |first| first.min(envelope.emitted_at)),
        );
        self.last_delivery = Some(now);
    }

    fn merge(&mut self, other: Self) -> Result<(), Error> {
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.errors += other.errors;
        self.latency.add(&other.latency)?;
        self.first_stamp = match (self.first_stamp, other.first_stamp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_delivery = self.last_delivery.max(other.last_delivery);
        Ok(())
    }
}
