//! A stalled subscriber slows nobody, holds bounded memory, and still gets
//! every event in order once it reads.

mod common;

use std::time::Duration;

use behest_stream::{Config, EventHub, Resume, RunId, RuntimeRoom};
use common::{completed, delta, next_within, started};
use uuid::Uuid;

const RING: usize = 16;
const EVENTS: u64 = 100 * RING as u64;
const DEADLINE: Duration = Duration::from_secs(30);

/// While 100× the ring capacity is published, a subscriber that reads
/// nothing does not hold up the publisher or a reading subscriber; the
/// room's queues stay within their bounds; and the stalled subscriber, once
/// it reads, gets seqs 1..=N exactly once, in order, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_catches_up_from_the_store_without_slowing_the_room() {
    let hub = EventHub::open(
        Config::temporary()
            .ring_capacity(RING)
            .live_capacity(RING / 4)
            .catch_up_page(64),
    )
    .await
    .unwrap();
    let run = RunId::new();
    let session = Uuid::now_v7();
    let room = RuntimeRoom::Run(run);
    let mut stalled = hub
        .subscribe(room.clone(), Resume::FromStart)
        .await
        .unwrap();
    let mut stalled_session = hub
        .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
        .await
        .unwrap();
    let mut reader = hub
        .subscribe(room.clone(), Resume::FromStart)
        .await
        .unwrap();
    let reading = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while let Some(item) = next_within(&mut reader, DEADLINE).await {
            seqs.push(item.unwrap().seq);
        }
        seqs
    });

    // The publisher never waits for the stalled subscribers; every publish
    // is acknowledged. Pipelined, 64 in flight at a time.
    let mut pending = std::collections::VecDeque::new();
    for seq in 1..=EVENTS {
        let event = match seq {
            1 => started(run, Some(session)),
            s if s == EVENTS => completed(run),
            _ => delta(run, "x"),
        };
        pending.push_back(hub.submit(event).await.unwrap());
        if pending.len() == 64 {
            pending.pop_front().unwrap().await.unwrap();
        }
        if seq % 400 == 0 {
            let stats = hub.stats().await.unwrap();
            assert!(stats.publishes_in_flight <= stats.max_in_flight_publishes);
            for r in &stats.rooms {
                assert!(r.ring_len <= r.ring_capacity, "{r:?}");
                assert!(r.in_flight <= stats.max_in_flight_publishes, "{r:?}");
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    // The reading subscriber kept up and saw everything.
    assert_eq!(reading.await.unwrap(), (1..=EVENTS).collect::<Vec<_>>());
    let stats = hub.stats().await.unwrap();
    let run_room = stats.rooms.iter().find(|r| r.room == room).unwrap();
    assert_eq!(run_room.last_seq, Some(EVENTS));
    assert_eq!(
        run_room.ring_len, RING,
        "the ring holds only the last {RING}"
    );
    assert_eq!(
        run_room.subscribers, 1,
        "the stalled subscriber is still attached"
    );

    // The stalled ones now read: every event, in order, once.
    let mut seqs = Vec::new();
    while let Some(item) = next_within(&mut stalled, DEADLINE).await {
        seqs.push(item.unwrap().seq);
    }
    assert_eq!(seqs, (1..=EVENTS).collect::<Vec<_>>());
    let mut session_seqs = Vec::new();
    while session_seqs.len() < EVENTS as usize {
        let envelope = next_within(&mut stalled_session, DEADLINE)
            .await
            .unwrap()
            .unwrap();
        session_seqs.push(envelope.seq);
    }
    assert_eq!(session_seqs, (1..=EVENTS).collect::<Vec<_>>());
    let stats = hub.stats().await.unwrap();
    assert!(stats.catch_ups_from_store >= 1, "{stats:?}");
    hub.shutdown().await.unwrap();
}
