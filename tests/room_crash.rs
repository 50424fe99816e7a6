//! A run room that panics mid-stream loses nothing and repeats nothing.
#![cfg(feature = "fault-injection")]

mod common;

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use behest_stream::{
    AgentEvent, Config, EventHub, HubError, PendingPublish, Resume, RunId, RuntimeRoom,
};
use common::{completed, delta, next_within, started};

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
    while next < EVENTS || !retries.is_empty() || !in_flight.is_empty() {
        if in_flight.len() < 64 && (next < EVENTS || !retries.is_empty()) {
            let i = retries.pop_front().unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            if i == 250 {
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
