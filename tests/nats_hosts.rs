//! Two hosts in two processes sharing runs through NATS JetStream: this
//! test binary is host B, and re-executes itself as host A (the
//! `nats_host_a` "test", which does nothing unless its environment says
//! so). Against 127.0.0.1:4222 (or `BEHEST_STREAM_NATS_URL`); skipped with a
//! printed reason without a server, unless `BEHEST_STREAM_REQUIRE_NATS=1`.

#![cfg(feature = "nats")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use behest_stream::nats::NatsConfig;
use behest_stream::{
    AgentEvent, Config, Cursor, EventHub, Resume, RunId, RuntimeEventEnvelope, RuntimeRoom,
};
use common::{completed, delta, next_within, started};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);
/// `unique run events pace_ms`: what host A publishes (`events` deltas,
/// each after `pace_ms`, then the terminal event; 0 events means deltas
/// until killed).
const HOST_A_ENV: &str = "BEHEST_STREAM_NATS_HOST_A";

fn nats_config(unique: &str) -> NatsConfig {
    common::nats::config_named(&common::nats::url(), unique)
}

/// Not a test of its own: host A. Publishes the run its environment names,
/// printing `ACK seq event_id` for each acknowledged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_host_a() {
    let Ok(spec) = std::env::var(HOST_A_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let run = RunId::from_uuid(Uuid::parse_str(parts[1]).unwrap());
    let events: u64 = parts[2].parse().unwrap();
    let pace = Duration::from_millis(parts.get(3).map_or(0, |p| p.parse().unwrap()));
    let hub = EventHub::open(Config::nats(nats_config(parts[0])))
        .await
        .unwrap();
    let mut out = std::io::stdout().lock();
    let mut ack = |e: RuntimeEventEnvelope| {
        writeln!(out, "ACK {} {}", e.seq, e.event_id).unwrap();
        out.flush().unwrap();
    };
    ack(hub.publish(started(run, None)).await.unwrap());
    let mut i = 0;
    while events == 0 || i < events {
        tokio::time::sleep(pace).await;
        ack(hub
            .publish(delta(run, &format!("token {i} ")))
            .await
            .unwrap());
        i += 1;
    }
    ack(hub.publish(completed(run)).await.unwrap());
    hub.shutdown().await.unwrap();
}

fn spawn_host_a(unique: &str, run: RunId, events: u64) -> (Child, ChildStdout) {
    spawn_paced_host_a(unique, run, events, Duration::ZERO)
}

/// As [`spawn_host_a`], host A waiting `pace` before each delta.
fn spawn_paced_host_a(
    unique: &str,
    run: RunId,
    events: u64,
    pace: Duration,
) -> (Child, ChildStdout) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["nats_host_a", "--exact", "--nocapture", "--test-threads=1"])
        .env(
            HOST_A_ENV,
            format!("{unique} {run} {events} {}", pace.as_millis()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    (child, stdout)
}

/// `(seq, event id)` of an `ACK` line.
fn parse_ack(line: &str) -> Option<(u64, String)> {
    let (seq, id) = line.split("ACK ").nth(1)?.split_once(' ')?;
    Some((seq.parse().ok()?, id.to_owned()))
}

/// Host B, or `None` (reason printed) without a server.
async fn host_b(config: &NatsConfig) -> Option<EventHub> {
    common::nats::or_skip(EventHub::open(Config::nats(config.clone())).await)
}

fn seqs(envelopes: &[RuntimeEventEnvelope]) -> Vec<u64> {
    envelopes.iter().map(|e| e.seq).collect()
}

/// Host A (another process) writes a run while host B's subscribers follow
/// it live: one reads it whole, gapless and once; another disconnects
/// partway and resumes on B by cursor, and the two halves are the run
/// exactly once. Both equal what A acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_written_in_one_process_is_followed_and_resumed_in_another() {
    let unique = Uuid::now_v7().simple().to_string();
    let config = nats_config(&unique);
    let Some(hub) = host_b(&config).await else {
        return;
    };
    let run = RunId::new();
    let mut whole = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let mut partial = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let (mut child, stdout) = spawn_host_a(&unique, run, 200);

    let mut cursor = Cursor::new(hub.epoch());
    let mut halves = Vec::new();
    for _ in 0..60 {
        let envelope = next_within(&mut partial, DEADLINE).await.unwrap().unwrap();
        cursor.advance(&envelope);
        halves.push(envelope);
    }
    drop(partial);
    let mut seen = Vec::new();
    while let Some(item) = next_within(&mut whole, DEADLINE).await {
        seen.push(item.unwrap());
    }
    assert!(child.wait().unwrap().success(), "host A failed");
    let acked: Vec<(u64, String)> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| parse_ack(&l))
        .collect();

    assert_eq!(seqs(&seen), (1..=202).collect::<Vec<_>>());
    let ids: Vec<(u64, String)> = seen
        .iter()
        .map(|e| (e.seq, e.event_id.to_string()))
        .collect();
    assert_eq!(ids, acked, "B saw exactly what A acknowledged");

    let mut resumed = hub
        .subscribe(RuntimeRoom::Run(run), Resume::After(cursor))
        .await
        .unwrap();
    while let Some(item) = next_within(&mut resumed, DEADLINE).await {
        halves.push(item.unwrap());
    }
    assert_eq!(halves, seen, "the two halves are the run, once");
    hub.shutdown().await.unwrap();
    common::nats::delete_stream(&config).await;
}

/// Host A is killed with SIGKILL mid-run: every event it acknowledged is
/// readable on host B, and B's live subscriber got them in order; B then
/// takes the run over and ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_run_leaves_every_acknowledged_event_on_the_other() {
    let unique = Uuid::now_v7().simple().to_string();
    let config = nats_config(&unique);
    let Some(hub) = host_b(&config).await else {
        return;
    };
    let run = RunId::new();
    let mut live = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let (mut child, stdout) = spawn_host_a(&unique, run, 0);
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = Vec::new();
    while acked.len() < 150 {
        let line = lines.next().expect("host A exited early").unwrap();
        acked.extend(parse_ack(&line));
    }
    child.kill().unwrap(); // SIGKILL, mid-run
    child.wait().unwrap();
    acked.extend(lines.map_while(Result::ok).filter_map(|l| parse_ack(&l)));

    let stored = hub.replay(run, 0, 100_000).await.unwrap();
    assert!(stored.len() >= acked.len());
    assert_eq!(seqs(&stored), (1..=stored.len() as u64).collect::<Vec<_>>());
    for (seq, id) in &acked {
        assert_eq!(stored[*seq as usize - 1].event_id.to_string(), *id);
    }
    // B's live subscriber got everything the log holds, in order.
    for expected in &stored {
        let got = next_within(&mut live, DEADLINE).await.unwrap().unwrap();
        assert_eq!(&got, expected);
    }
    // B takes the run over where A stopped, and ends it. (A publish of A's
    // that the server took just before A died may still land first; B's
    // room then follows it, and B's event comes after.)
    // (If that late publish lands between B's seq and B's append, B is
    // fenced once and its room recovers: retry.)
    let last = common::wait_for("B to take the run over", DEADLINE, async || {
        hub.publish(completed(run)).await.ok()
    })
    .await;
    let mut seen = stored.clone();
    loop {
        let got = next_within(&mut live, DEADLINE).await.unwrap().unwrap();
        seen.push(got.clone());
        if got == last {
            break;
        }
    }
    assert!(
        next_within(&mut live, DEADLINE).await.is_none(),
        "the stream ends"
    );
    assert_eq!(seen, hub.replay(run, 0, 100_000).await.unwrap());
    assert_eq!(seqs(&seen), (1..=seen.len() as u64).collect::<Vec<_>>());
    hub.shutdown().await.unwrap();
    common::nats::delete_stream(&config).await;
}

/// Host A is killed with SIGKILL mid-run while two hosts with a lease,
/// B1 and B2, follow its run: once the lease lapses, exactly one of them
/// ends the run with `RunFailed` (the ending append is fenced like any
/// other, so the second finds the run written and ends nothing), and both
/// hosts' subscribers read every event A acknowledged, then that one
/// terminal event. A late publish to the run gets `RunClosed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hosts_run_is_ended_once_by_the_hosts_watching_it() {
    let unique = Uuid::now_v7().simple().to_string();
    let config = nats_config(&unique);
    let leased = || Config::nats(config.clone()).run_lease(Some(Duration::from_millis(500)));
    let Some(b1) = common::nats::or_skip(EventHub::open(leased()).await) else {
        return;
    };
    let b2 = EventHub::open(leased()).await.unwrap();
    let run = RunId::new();
    let mut streams = Vec::new();
    for hub in [&b1, &b2] {
        streams.push(
            hub.subscribe(RuntimeRoom::Run(run), Resume::FromStart)
                .await
                .unwrap(),
        );
    }
    let (mut child, stdout) = spawn_host_a(&unique, run, 0);
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = Vec::new();
    while acked.len() < 50 {
        let line = lines.next().expect("host A exited early").unwrap();
        acked.extend(parse_ack(&line));
    }
    child.kill().unwrap(); // SIGKILL, mid-run
    child.wait().unwrap();
    acked.extend(lines.map_while(Result::ok).filter_map(|l| parse_ack(&l)));

    let mut seen = Vec::new();
    for mut stream in streams {
        let mut events = Vec::new();
        while let Some(item) = next_within(&mut stream, DEADLINE).await {
            events.push(item.unwrap());
        }
        seen.push(events);
    }
    assert_eq!(seen[0], seen[1], "both hosts read the same run");
    let events = &seen[0];
    assert_eq!(seqs(events), (1..=events.len() as u64).collect::<Vec<_>>());
    for (seq, id) in &acked {
        assert_eq!(events[*seq as usize - 1].event_id.to_string(), *id);
    }
    // The log itself holds one end, its last event (a subscription stops
    // at the first, so read what is stored).
    let stored = b1.replay(run, 0, 100_000).await.unwrap();
    assert_eq!(&stored, events, "the subscribers read the whole log");
    let terminals: Vec<_> = stored.iter().filter(|e| e.is_terminal()).collect();
    assert_eq!(terminals.len(), 1, "one end");
    let AgentEvent::RunFailed(failed) = &terminals[0].event else {
        panic!("expected RunFailed, got {:?}", terminals[0].event);
    };
    assert!(failed.error.starts_with("abandoned"), "{}", failed.error);
    for hub in [&b1, &b2] {
        assert!(matches!(
            hub.publish(delta(run, "late")).await,
            Err(behest_stream::HubError::RunClosed { .. })
        ));
    }
    b1.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
    common::nats::delete_stream(&config).await;
}

/// A host that followed a run and stopped (its subscriber left, its room
/// was stopped for being idle) never ends the run while its producer, on
/// another host, goes on publishing: when the lease it watched lapses, the
/// run has moved past the seq it saw, so it renews instead. Once the
/// producer is killed, it ends the run a lease later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stopped_watching_never_ends_a_live_run() {
    let unique = Uuid::now_v7().simple().to_string();
    let config = nats_config(&unique);
    // A lease ten times A's pace: only a stall of a second in A ends it.
    const LEASE: Duration = Duration::from_secs(1);
    let opened = EventHub::open(
        Config::nats(config.clone())
            .run_lease(Some(LEASE))
            .idle_timeout(Duration::from_millis(50)),
    )
    .await;
    let Some(b) = common::nats::or_skip(opened) else {
        return;
    };
    let run = RunId::new();
    let mut watching = b
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    // A publishes every 100 ms: slowly enough that B's ending append, were
    // B to try one, would not be fenced by A's next one.
    let (mut child, stdout) = spawn_paced_host_a(&unique, run, 0, Duration::from_millis(100));
    for _ in 0..5 {
        next_within(&mut watching, DEADLINE).await.unwrap().unwrap();
    }
    drop(watching);
    // Leases pass while A publishes; B's stopped watch must not end it.
    let mut lines = BufReader::new(stdout).lines();
    let start = std::time::Instant::now();
    while start.elapsed() < LEASE * 4 {
        // A exits (its publish fails) if its run was ended.
        lines.next().expect("host A exited early").unwrap();
        let info = b.store().run_info(run).await.unwrap().unwrap();
        assert!(!info.is_ended(), "B ended a run A is still writing");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    common::wait_for("B to end the abandoned run", DEADLINE, async || {
        let info = b.store().run_info(run).await.unwrap().unwrap();
        info.is_ended().then_some(())
    })
    .await;
    let stored = b.replay(run, 0, 100_000).await.unwrap();
    assert!(matches!(
        stored.last().unwrap().event,
        AgentEvent::RunFailed(_)
    ));
    assert_eq!(seqs(&stored), (1..=stored.len() as u64).collect::<Vec<_>>());
    b.shutdown().await.unwrap();
    common::nats::delete_stream(&config).await;
}
