//! A run room that panics mid-stream loses nothing and repeats nothing.
#![cfg(feature = "fault-injection")]

mod common;

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use behest_stream::{
    AgentEvent, Config, EventHub, HubError, PendingPublish, Resume, RunId, RuntimeRoom,
};
use common::{completed, delta, next_within, quiet_injected_panics, started};

const EVENTS: usize = 400;

const SUBSCRIBERS: usize = 10;

/// A pipelined publisher (64 in flight) and ten subscribers; the room
/// panics at its 150th and again at its 300th publish. Publishes the room
/// never took fail with `RoomUnavailable` and are retried; every other one
/// is answered with the store's outcome. Afterwards every event is stored
/// exactly once (no duplicate from a retry), seqs are 1..=N, and every
/// subscriber received 1..=N exactly once, in order, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_panic_mid_stream_loses_and_repeats_nothing() {
    quiet_injected_panics();
    let hub = EventHub::open(Config::temporary().ring_capacity(64))
        .await
        .unwrap();
    let run = RunId::new();
    let room = RuntimeRoom::Run(run);
    let mut readers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut stream = hub
            .subscribe(room.clone(), Resume::FromStart)
            .await
            .unwrap();
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while let Some(item) = next_within(&mut stream, Duration::from_secs(30)).await {
                seqs.push(item.unwrap().seq);
            }
            seqs
        }));
    }
    hub.publish(started(run, None)).await.unwrap();
    hub.inject_room_panic(room.clone(), 150);

    // Each event carries its number, so duplicates are visible in the store.
    let event = |i: usize| -> AgentEvent { delta(run, &i.to_string()) };
    let mut retries: VecDeque<usize> = VecDeque::new();
    let mut in_flight: VecDeque<(usize, PendingPublish)> = VecDeque::new();
    let mut next = 0;
    let mut failures = 0;
    let mut second_panic_armed = false;
    while next < EVENTS || !retries.is_empty() || !in_flight.is_empty() {
        if in_flight.len() < 64 && (next < EVENTS || !retries.is_empty()) {
            let i = retries.pop_front().unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            if i == 250 && !second_panic_armed {
                second_panic_armed = true;
                hub.inject_room_panic(room.clone(), 50);
            }
            in_flight.push_back((i, hub.submit(event(i)).await.unwrap()));
            continue;
        }
        let (i, pending) = in_flight.pop_front().unwrap();
        match pending.await {
            Ok(_) => {}
            Err(HubError::RoomUnavailable { .. }) => {
                failures += 1;
                retries.push_back(i);
            }
            Err(other) => panic!("publish {i}: {other:?}"),
        }
    }
    hub.publish(completed(run)).await.unwrap();
    assert!(failures > 0, "the injected panics must have hit publishes");
    let total = EVENTS as u64 + 2;

    let stored = hub.replay(run, 0, 10_000).await.unwrap();
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    let texts: HashSet<String> = stored
        .iter()
        .filter_map(|e| match &e.event {
            AgentEvent::TextDelta(d) => Some(d.delta.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(texts.len(), EVENTS, "each event stored once");
    for reader in readers {
        assert_eq!(reader.await.unwrap(), (1..=total).collect::<Vec<_>>());
    }
    let stats = hub.stats().await.unwrap();
    assert_eq!(stats.rooms_failed, 2, "{stats:?}");
    hub.shutdown().await.unwrap();
}

/// A room that keeps failing is given up on once it exceeds the restart
/// intensity: its callers get `RoomFailed` naming it, nothing of theirs is
/// stored, and other rooms keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_intensity_exceeded_fails_callers_and_spares_other_rooms() {
    quiet_injected_panics();
    let hub = EventHub::open(Config::temporary().restart_intensity(2, Duration::from_secs(600)))
        .await
        .unwrap();
    let (doomed, healthy) = (RunId::new(), RunId::new());
    hub.publish(started(doomed, None)).await.unwrap();
    hub.publish(started(healthy, None)).await.unwrap();
    let mut given_up = None;
    // Each attempt makes the room panic at the publish; the router sees the
    // failures (asynchronously) and gives up after the third.
    for _ in 0..50 {
        hub.inject_room_panic(RuntimeRoom::Run(doomed), 1);
        match hub.publish(delta(doomed, "doomed")).await {
            Err(HubError::RoomUnavailable { .. }) => continue,
            Err(error @ HubError::RoomFailed { .. }) => {
                given_up = Some(error);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let error = given_up.expect("the room must be given up on");
    assert!(
        error.to_string().contains(&format!("run:{doomed}")),
        "{error}"
    );
    assert!(
        matches!(error, HubError::RoomFailed { failures: 3, .. }),
        "{error:?}"
    );
    // Still refused, without a panic armed; nothing of the failures stored.
    assert!(matches!(
        hub.publish(delta(doomed, "again")).await,
        Err(HubError::RoomFailed { .. })
    ));
    assert_eq!(hub.replay(doomed, 0, 100).await.unwrap().len(), 1);
    assert_eq!(hub.publish(delta(healthy, "fine")).await.unwrap().seq, 2);
    hub.shutdown().await.unwrap();
}

/// 1% of run-room publishes panic while 50 runs publish 100,000 events in
/// all (pipelined, retrying what a dead room never took), each run followed
/// by a subscriber. Afterwards the store holds every acknowledged event,
/// each run's seqs are 1..=N with every event once, and no subscriber saw a
/// duplicate or a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_percent_of_room_messages_panic_and_nothing_is_lost() {
    quiet_injected_panics();
    const RUNS: usize = 50;
    const PER_RUN: usize = 2_000;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("random panic seed {seed}");
    let hub = EventHub::open(
        Config::temporary()
            .durability(behest_stream::Durability::Buffered)
            .restart_intensity(usize::MAX, Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let runs: Vec<RunId> = (0..RUNS).map(|_| RunId::new()).collect();
    let mut readers = Vec::new();
    for run in &runs {
        let mut stream = hub
            .subscribe(RuntimeRoom::Run(*run), Resume::FromStart)
            .await
            .unwrap();
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while let Some(item) = next_within(&mut stream, Duration::from_secs(60)).await {
                seqs.push(item.unwrap().seq);
            }
            seqs
        }));
    }
    hub.inject_random_room_panics(10_000, seed);
    let mut publishers = Vec::new();
    for run in runs.clone() {
        let hub = hub.clone();
        publishers.push(tokio::spawn(async move {
            let mut work: VecDeque<usize> = (0..=PER_RUN).collect();
            let mut in_flight: VecDeque<(usize, PendingPublish)> = VecDeque::new();
            let mut acked = Vec::new();
            let mut retries = 0;
            while !work.is_empty() || !in_flight.is_empty() {
                if in_flight.len() < 16
                    && let Some(i) = work.pop_front()
                {
                    let event = if i == 0 {
                        started(run, None)
                    } else {
                        delta(run, &i.to_string())
                    };
                    in_flight.push_back((i, hub.submit(event).await.unwrap()));
                    continue;
                }
                let (i, pending) = in_flight.pop_front().unwrap();
                match pending.await {
                    Ok(envelope) => acked.push(envelope),
                    Err(HubError::RoomUnavailable { .. }) => {
                        retries += 1;
                        // RunStarted must stay first: retry it before anything else.
                        work.push_front(i);
                        if i == 0 {
                            for (later, p) in in_flight.drain(..) {
                                let _ = p.await;
                                work.push_back(later);
                            }
                        }
                    }
                    Err(other) => panic!("run {run} publish {i}: {other:?}"),
                }
            }
            (acked, retries)
        }));
    }
    let mut total_retries = 0;
    let mut acked = Vec::new();
    for p in publishers {
        let (a, r) = p.await.unwrap();
        acked.extend(a);
        total_retries += r;
    }
    hub.inject_random_room_panics(0, 0);
    for run in &runs {
        hub.publish(completed(*run)).await.unwrap();
    }
    let stats = hub.stats().await.unwrap();
    println!(
        "room failures {}, retried publishes {total_retries}",
        stats.rooms_failed
    );
    assert!(stats.rooms_failed > 100, "{stats:?}");

    let total = PER_RUN as u64 + 2;
    for run in &runs {
        let stored = hub.replay(*run, 0, 10_000).await.unwrap();
        let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "run {run}");
        let texts: HashSet<String> = stored
            .iter()
            .filter_map(|e| match &e.event {
                AgentEvent::TextDelta(d) => Some(d.delta.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(texts.len(), PER_RUN, "run {run}: each event once");
    }
    let mut stored_ids = HashSet::new();
    for run in &runs {
        stored_ids.extend(
            hub.replay(*run, 0, 10_000)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.event_id),
        );
    }
    assert!(
        acked.iter().all(|e| stored_ids.contains(&e.event_id)),
        "every acknowledged event stored"
    );
    for reader in readers {
        assert_eq!(reader.await.unwrap(), (1..=total).collect::<Vec<_>>());
    }
    hub.shutdown().await.unwrap();
}
