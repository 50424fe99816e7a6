//! `EventHub::subscribe_shared` yields what `EventHub::subscribe` yields,
//! in the same order with the same resumes, as envelopes shared with the
//! room instead of copies.

mod common;

use std::sync::Arc;
use std::time::Duration;

use behest_stream::{Config, Cursor, EventHub, Resume, RunId, RuntimeEventEnvelope, RuntimeRoom};
use common::{completed, delta, next_within, started};
use futures_util::StreamExt;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

async fn drain_owned(
    mut stream: behest_stream::BoxRuntimeEventStream,
    n: usize,
) -> Vec<RuntimeEventEnvelope> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(next_within(&mut stream, DEADLINE).await.unwrap().unwrap());
    }
    out
}

async fn drain_shared(
    mut stream: behest_stream::SharedEventStream,
    n: usize,
) -> Vec<Arc<RuntimeEventEnvelope>> {
    let mut out = Vec::new();
    while out.len() < n {
        let item = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("an envelope within the deadline")
            .expect("the stream goes on");
        out.push(item.unwrap());
    }
    out
}

/// Run and session subscriptions from the start, and a session one from a
/// cursor, read the same envelopes shared as owned; a live subscriber gets
/// the very envelope the publisher got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_yield_what_owned_ones_do() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let session = Uuid::now_v7();
    let run = RunId::new();
    hub.publish(started(run, Some(session))).await.unwrap();
    for i in 0..5 {
        hub.publish(delta(run, &i.to_string())).await.unwrap();
    }
    let run_room = RuntimeRoom::Run(run);
    let session_room = RuntimeRoom::Session(session);

    let live = hub
        .subscribe_shared(run_room.clone(), Resume::Live)
        .await
        .unwrap();
    let last = hub
        .submit(completed(run))
        .await
        .unwrap()
        .shared()
        .await
        .unwrap();
    let got = drain_shared(live, 1).await;
    assert!(
        Arc::ptr_eq(&got[0], &last),
        "the live subscriber shares the publisher's envelope"
    );

    let owned = drain_owned(
        hub.subscribe(run_room.clone(), Resume::FromStart)
            .await
            .unwrap(),
        7,
    )
    .await;
    let shared = drain_shared(
        hub.subscribe_shared(run_room, Resume::FromStart)
            .await
            .unwrap(),
        7,
    )
    .await;
    assert_eq!(
        owned.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    for (o, s) in owned.iter().zip(&shared) {
        assert_eq!((o.event_id, o.seq, &o.event), (s.event_id, s.seq, &s.event));
    }

    let mut cursor = Cursor::new(hub.epoch());
    for envelope in &owned[..3] {
        cursor.advance(envelope);
    }
    let owned = drain_owned(
        hub.subscribe(session_room.clone(), Resume::After(cursor.clone()))
            .await
            .unwrap(),
        4,
    )
    .await;
    let shared = drain_shared(
        hub.subscribe_shared(session_room, Resume::After(cursor))
            .await
            .unwrap(),
        4,
    )
    .await;
    assert_eq!(
        owned.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    for (o, s) in owned.iter().zip(&shared) {
        assert_eq!((o.event_id, o.seq, &o.event), (s.event_id, s.seq, &s.event));
    }
    hub.shutdown().await.unwrap();
}

/// A shared subscription behind the room's ring catches up from the store
/// in pages, and ends after the terminal event, as an owned one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_catches_up_from_the_store_and_ends_after_the_terminal_event() {
    let hub = EventHub::open(Config::temporary().ring_capacity(2).catch_up_page(3))
        .await
        .unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();
    for i in 0..20 {
        hub.publish(delta(run, &i.to_string())).await.unwrap();
    }
    hub.publish(completed(run)).await.unwrap();
    let before = hub.stats().await.unwrap().catch_ups_from_store;
    let mut stream = hub
        .subscribe_shared(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let mut seqs = Vec::new();
    while let Some(item) = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("the stream ends within the deadline")
    {
        seqs.push(item.unwrap().seq);
    }
    assert_eq!(seqs, (1..=22).collect::<Vec<_>>());
    assert!(
        hub.stats().await.unwrap().catch_ups_from_store > before,
        "the ring held 2 envelopes: the rest came from the store"
    );
    hub.shutdown().await.unwrap();
}
