//! Run leases on sled: a run whose producer went quiet (or died) is ended
//! by the hub with `RunFailed`, sequenced and stored like any event; a
//! publish or a renewal keeps it open; runs found open when the store is
//! opened get a lease from then; a producer process killed mid-run leaves
//! its run to be ended for the subscriber in another process.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use behest_stream::{
    AgentEvent, Config, EventHub, HubError, ProviderId, Resume, RunId, RunStarted,
    RuntimeEventEnvelope, RuntimeRoom,
};
use common::{delta, next_within, started};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);
const CHILD_ENV: &str = "BEHEST_STREAM_LEASE_CHILD";

/// Reads `run` from the start to its end (within the deadline).
async fn whole_run(hub: &EventHub, run: RunId) -> Vec<RuntimeEventEnvelope> {
    let mut stream = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(item) = next_within(&mut stream, DEADLINE).await {
        seen.push(item.unwrap());
    }
    seen
}

fn assert_abandoned(envelope: &RuntimeEventEnvelope) {
    let AgentEvent::RunFailed(failed) = &envelope.event else {
        panic!("expected RunFailed, got {:?}", envelope.event);
    };
    assert!(
        failed
            .error
            .starts_with("abandoned: no event and no lease renewal since "),
        "{}",
        failed.error
    );
}

async fn is_open(hub: &EventHub, run: RunId) -> bool {
    !hub.store().run_info(run).await.unwrap().unwrap().is_ended()
}

/// Of four runs on a hub with a 3 s lease: the one nobody touches ends
/// first, with `RunFailed` after its events, and a late publish to it gets
/// `RunClosed`; the one its producer keeps publishing to and the one it
/// keeps renewing stay open past the lease, and end a lease after their
/// producer stops; the one of an exempt provider never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_run_ends_and_publishes_and_renewals_keep_one_open() {
    const LEASE: Duration = Duration::from_secs(3);
    let exempt = ProviderId::new("streams");
    let hub = EventHub::open(
        Config::temporary()
            .run_lease(Some(LEASE))
            .exempt_from_lease(exempt.clone()),
    )
    .await
    .unwrap();
    let [quiet, busy, renewed, kept] = [(); 4].map(|()| RunId::new());
    for run in [quiet, busy, renewed] {
        hub.publish(started(run, None)).await.unwrap();
        hub.publish(delta(run, "hi")).await.unwrap();
    }
    hub.publish(AgentEvent::RunStarted(RunStarted {
        run_id: kept,
        timestamp: chrono::Utc::now(),
        session_id: None,
        provider: exempt,
        model: "m".into(),
    }))
    .await
    .unwrap();
    let mut quiet_stream = hub
        .subscribe(RuntimeRoom::Run(quiet), Resume::FromStart)
        .await
        .unwrap();

    // Keep two runs alive (one by publishing, one by renewing) until the
    // quiet one has ended, and for a lease more.
    let start = tokio::time::Instant::now();
    let mut ended_at = None;
    while ended_at.is_none_or(|at: tokio::time::Instant| at.elapsed() < LEASE + LEASE / 2) {
        assert!(start.elapsed() < DEADLINE, "the quiet run never ended");
        hub.publish(delta(busy, ".")).await.unwrap();
        hub.renew_lease(renewed);
        // Renewing an exempt run does not give it a lease.
        hub.renew_lease(kept);
        if ended_at.is_none() && !is_open(&hub, quiet).await {
            ended_at = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(is_open(&hub, busy).await, "a run published to ended");
    assert!(is_open(&hub, renewed).await, "a renewed run ended");

    let mut seen = Vec::new();
    while let Some(item) = next_within(&mut quiet_stream, DEADLINE).await {
        seen.push(item.unwrap());
    }
    assert_eq!(seen.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_abandoned(&seen[2]);
    assert!(matches!(
        hub.publish(delta(quiet, "late")).await,
        Err(HubError::RunClosed { run_id }) if run_id == quiet
    ));

    // Once their producer stops, both end too; the exempt run never does.
    for run in [busy, renewed] {
        let events = whole_run(&hub, run).await;
        assert_abandoned(events.last().unwrap());
    }
    assert!(is_open(&hub, kept).await, "an exempt run ended");
    assert_eq!(hub.stats().await.unwrap().runs_leased, 0);
    hub.shutdown().await.unwrap();
}

/// A run left open by a hub that stopped (no terminal event) is ended a
/// lease after the store is opened again; a run that had ended is left as
/// it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_open_at_reopen_get_a_lease_from_the_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (open, done) = (RunId::new(), RunId::new());
    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    for run in [open, done] {
        hub.publish(started(run, None)).await.unwrap();
        hub.publish(delta(run, "hi")).await.unwrap();
    }
    hub.publish(common::completed(done)).await.unwrap();
    hub.shutdown().await.unwrap();
    drop(hub);

    let hub = EventHub::open(Config::new(dir.path()).run_lease(Some(Duration::from_millis(300))))
        .await
        .unwrap();
    let events = whole_run(&hub, open).await;
    assert_eq!(events.len(), 3);
    assert_abandoned(&events[2]);
    let events = whole_run(&hub, done).await;
    assert_eq!(events.len(), 3);
    assert!(matches!(events[2].event, AgentEvent::RunCompleted(_)));
    hub.shutdown().await.unwrap();
}

/// Not a test of its own: the producer process. Opens the store its
/// environment names, starts the run, and publishes deltas until killed,
/// printing `ACK seq` for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_producer_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (dir, run) = spec.split_once(' ').unwrap();
    let run = RunId::from_uuid(Uuid::parse_str(run).unwrap());
    let hub = EventHub::open(Config::new(dir)).await.unwrap();
    let mut out = std::io::stdout().lock();
    let mut ack = |e: RuntimeEventEnvelope| {
        writeln!(out, "ACK {}", e.seq).unwrap();
        out.flush().unwrap();
    };
    ack(hub.publish(started(run, None)).await.unwrap());
    for i in 0.. {
        ack(hub
            .publish(delta(run, &format!("token {i} ")))
            .await
            .unwrap());
    }
}

/// A producer process is killed mid-run (SIGKILL); this process opens the
/// store with a lease, and its subscriber reads every event the producer
/// had acknowledged, then the hub's `RunFailed`, and the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_producers_run_ends_for_the_subscriber_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "lease_producer_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{} {run}", dir.path().display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = 0;
    while acked < 20 {
        let line = lines.next().expect("the producer stopped").unwrap();
        if let Some(seq) = line.strip_prefix("ACK ") {
            acked = seq.parse().unwrap();
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Whatever it acknowledged after the 20th is in the pipe still.
    for line in lines.map_while(Result::ok) {
        if let Some(seq) = line.strip_prefix("ACK ") {
            acked = seq.parse().unwrap();
        }
    }

    let config = Config::new(dir.path()).run_lease(Some(Duration::from_millis(500)));
    let hub = common::wait_for("the killed producer's store lock", DEADLINE, async || {
        EventHub::open(config.clone()).await.ok()
    })
    .await;
    let events = whole_run(&hub, run).await;
    let last = events.last().unwrap();
    assert_abandoned(last);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=last.seq).collect::<Vec<_>>(), "gapless");
    assert!(
        last.seq > acked,
        "every acknowledged event ({acked}) precedes the end ({})",
        last.seq
    );
    assert!(matches!(
        hub.publish(delta(run, "late")).await,
        Err(HubError::RunClosed { .. })
    ));
    hub.shutdown().await.unwrap();
}
