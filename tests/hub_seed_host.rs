//! A host written against the seed's traits, as `Arc<dyn …>`, works with
//! `EventHub` unchanged.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use behest_stream::{
    AgentEvent, BoxRuntimeEventStream, Config, EventHub, ProviderId, RunId, RuntimeEventEnvelope,
    RuntimeEventStore, RuntimeEventStoreError, RuntimeRoom, RuntimeStreamAdapter,
    RuntimeStreamError,
};
use common::{completed, delta, next_within, started};
use uuid::Uuid;

/// The seed's host: it appends each event to the store, then publishes the
/// envelope to the run room and the session room.
struct SeedHost {
    store: Arc<dyn RuntimeEventStore>,
    stream: Arc<dyn RuntimeStreamAdapter>,
}

impl SeedHost {
    async fn emit(&self, event: AgentEvent) -> RuntimeEventEnvelope {
        let envelope = self.store.append(event).await.unwrap();
        self.stream
            .publish(RuntimeRoom::Run(envelope.run_id), envelope.clone())
            .await
            .unwrap();
        if let Some(session) = envelope.session_id {
            self.stream
                .publish(RuntimeRoom::Session(session), envelope.clone())
                .await
                .unwrap();
        }
        envelope
    }
}

async fn drain(stream: &mut BoxRuntimeEventStream, count: usize) -> Vec<RuntimeEventEnvelope> {
    let mut got = Vec::new();
    while got.len() < count {
        got.push(
            next_within(stream, Duration::from_secs(30))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    got
}

/// Subscribers through the adapter see each event of the seed-style host
/// (the hub's own fanout of an append and the host's re-publish of it are
/// one delivery, recognised by event id); `list_after` replays the run; an
/// append after the terminal event is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_style_host_works_through_dyn_traits() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let host = SeedHost {
        store: Arc::new(hub.clone()),
        stream: Arc::new(hub.clone()),
    };
    let run = RunId::new();
    let session = Uuid::now_v7();
    let mut run_live = host.stream.subscribe(RuntimeRoom::Run(run)).await.unwrap();
    let mut session_live = host
        .stream
        .subscribe(RuntimeRoom::Session(session))
        .await
        .unwrap();

    let mut emitted = vec![host.emit(started(run, Some(session))).await];
    for text in ["a", "b", "c"] {
        emitted.push(host.emit(delta(run, text)).await);
    }
    emitted.push(host.emit(completed(run)).await);
    let seqs: Vec<u64> = emitted.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    for stream in [&mut run_live, &mut session_live] {
        let got = drain(stream, emitted.len()).await;
        assert_eq!(got, emitted, "each event once, in order");
    }
    // A marker published live-only arrives next: nothing else was pending.
    let marker = RuntimeEventEnvelope {
        event_id: behest_stream::RuntimeEventId::new(),
        ..emitted[1].clone()
    };
    host.stream
        .publish(RuntimeRoom::Run(run), marker.clone())
        .await
        .unwrap();
    assert_eq!(drain(&mut run_live, 1).await, vec![marker]);

    let replayed = host.store.list_after(run, None, 100).await.unwrap();
    assert_eq!(replayed, emitted);
    let ids: HashSet<_> = replayed.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), emitted.len());
    let late = host.store.append(delta(run, "late")).await;
    assert!(
        matches!(late, Err(RuntimeEventStoreError::Append { .. })),
        "{late:?}"
    );
    hub.shutdown().await.unwrap();
}

/// The seed's call shapes, exactly: `publish(room, event)` and
/// `subscribe(room)` take the room by value, `list_after` takes
/// `Option<u64>` (`None` = from the start, `Some(k)` = after seq `k`), and
/// the errors carry the seed's variant names (`Append`, `NotFound`), so a
/// host written against behest 0.3.3's traits changes only its imports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traits_take_the_seeds_call_shapes() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let store: Arc<dyn RuntimeEventStore> = Arc::new(hub.clone());
    let stream: Arc<dyn RuntimeStreamAdapter> = Arc::new(hub.clone());
    let run = RunId::new();
    let room = RuntimeRoom::Run(run);
    let mut live: BoxRuntimeEventStream = stream.subscribe(room.clone()).await.unwrap();

    let mut appended = Vec::new();
    for event in [started(run, None), delta(run, "a"), delta(run, "b")] {
        let envelope = store.append(event).await.unwrap();
        stream
            .publish(room.clone(), envelope.clone())
            .await
            .unwrap();
        appended.push(envelope);
    }
    assert_eq!(drain(&mut live, 3).await, appended);

    assert_eq!(store.list_after(run, None, 10).await.unwrap(), appended);
    assert_eq!(store.list_after(run, None, 2).await.unwrap(), appended[..2]);
    assert_eq!(store.list_after(run, Some(0), 10).await.unwrap(), appended);
    assert_eq!(
        store.list_after(run, Some(1), 10).await.unwrap(),
        appended[1..]
    );
    assert!(store.list_after(run, Some(3), 10).await.unwrap().is_empty());
    assert!(store.list_after(run, None, 0).await.unwrap().is_empty());
    // A run the store never saw lists as empty, as the seed's in-memory
    // store answers.
    assert!(
        store
            .list_after(RunId::new(), None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The seed's error variants, as a host's own implementation of the
    // trait would build them.
    let refused = RuntimeEventStoreError::Append {
        message: "refused".into(),
    };
    let missing = RuntimeEventStoreError::NotFound { run_id: run };
    assert_eq!(
        refused.to_string(),
        "runtime event store append failed: refused"
    );
    assert_eq!(
        missing.to_string(),
        format!("runtime event store has no events for run {run}")
    );
    store.append(completed(run)).await.unwrap();
    match store.append(delta(run, "late")).await {
        Err(RuntimeEventStoreError::Append { message }) => {
            assert!(message.contains(&run.to_string()), "{message}");
        }
        other => panic!("expected Append, got {other:?}"),
    }
    hub.shutdown().await.unwrap();
}

/// A live publish to a room nobody listens to is a no-op returning `Ok`:
/// it starts no room, run, session or provider ("session and provider
/// rooms exist only while someone listens"); a room with a live subscriber
/// still gets what is published to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_publish_to_a_room_nobody_listens_to_starts_no_room() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let stream: Arc<dyn RuntimeStreamAdapter> = Arc::new(hub.clone());
    let (run, session) = (RunId::new(), Uuid::now_v7());
    let published = common::envelope(run, Some(session), 1);
    let rooms = [
        RuntimeRoom::Run(run),
        RuntimeRoom::Session(session),
        RuntimeRoom::Provider(ProviderId::new("acme")),
    ];
    for room in &rooms {
        stream
            .publish(room.clone(), published.clone())
            .await
            .unwrap();
    }
    let stats = hub.stats().await.unwrap();
    assert!(stats.rooms.is_empty(), "{:?}", stats.rooms);
    assert_eq!(stats.rooms_started, 0);

    for room in &rooms {
        let mut live = stream.subscribe(room.clone()).await.unwrap();
        stream
            .publish(room.clone(), published.clone())
            .await
            .unwrap();
        assert_eq!(drain(&mut live, 1).await, vec![published.clone()], "{room}");
    }
    assert_eq!(hub.stats().await.unwrap().rooms_started, 3);
    hub.shutdown().await.unwrap();
}

/// A live publish of an envelope whose event names another run
/// (`envelope.run_id` is not `envelope.event.run_id()`) is refused with an
/// error naming both runs, and fanned out to nobody: the subscribers of
/// either run's room get the next envelope published instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_publish_whose_event_names_another_run_is_refused() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let stream: Arc<dyn RuntimeStreamAdapter> = Arc::new(hub.clone());
    let (run, other) = (RunId::new(), RunId::new());
    let mut run_live = stream.subscribe(RuntimeRoom::Run(run)).await.unwrap();
    let mut other_live = stream.subscribe(RuntimeRoom::Run(other)).await.unwrap();
    let mut stray = common::envelope(other, None, 1);
    stray.run_id = run;
    for room in [RuntimeRoom::Run(run), RuntimeRoom::Run(other)] {
        match stream.publish(room, stray.clone()).await {
            Err(RuntimeStreamError::Publish { message }) => assert!(
                message.contains(&run.to_string()) && message.contains(&other.to_string()),
                "{message}"
            ),
            other => panic!("expected Publish naming both runs, got {other:?}"),
        }
    }
    for (id, live) in [(run, &mut run_live), (other, &mut other_live)] {
        let marker = common::envelope(id, None, 1);
        stream
            .publish(RuntimeRoom::Run(id), marker.clone())
            .await
            .unwrap();
        assert_eq!(drain(live, 1).await, vec![marker]);
    }
    hub.shutdown().await.unwrap();
}

/// The adapter's live publish holds envelopes to the same JSON bound as the
/// hub's own: one whose payload nests deeper than `codec::MAX_JSON_DEPTH`
/// (its JSON would not parse back in a subscriber's reader) is refused
/// with `Publish` naming the bound and reaches nobody; at the bound it is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_publish_too_deep_to_parse_back_is_refused() {
    use behest_stream::codec::MAX_JSON_DEPTH;

    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let stream: Arc<dyn RuntimeStreamAdapter> = Arc::new(hub.clone());
    let run = RunId::new();
    let mut live = stream.subscribe(RuntimeRoom::Run(run)).await.unwrap();
    let wrap = |event| common::wrap(run, None, 1, event);
    for objects in [false, true] {
        let deeper = common::nested_json(MAX_JSON_DEPTH + 1, objects);
        for event in common::json_carriers(run, &deeper) {
            match stream.publish(RuntimeRoom::Run(run), wrap(event)).await {
                Err(RuntimeStreamError::Publish { message }) => {
                    assert!(message.contains(&MAX_JSON_DEPTH.to_string()), "{message}");
                }
                other => panic!("expected Publish naming the bound, got {other:?}"),
            }
        }
    }
    let deepest = common::nested_json(MAX_JSON_DEPTH, true);
    let [fine, ..] = common::json_carriers(run, &deepest);
    let fine = wrap(fine);
    stream
        .publish(RuntimeRoom::Run(run), fine.clone())
        .await
        .unwrap();
    assert_eq!(drain(&mut live, 1).await, vec![fine]);
    hub.shutdown().await.unwrap();
}
