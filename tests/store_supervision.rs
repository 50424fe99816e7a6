//! The store actor is supervised: if it panics it is restarted on the same
//! database; appends it had not written are answered `Interrupted` (nothing
//! stored), and everything acknowledged before survives.
#![cfg(feature = "fault-injection")]

mod common;

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use behest_stream::{
    AgentEvent, Config, EventHub, HubError, PendingPublish, Resume, RunId, RuntimeRoom, Store,
    StoreError,
};
use common::{completed, delta, envelope, next_within, started, wait_for};

/// Appends waiting for a commit when the store actor panics are answered
/// `Interrupted` and not stored; the restarted actor takes appends at once,
/// and what was acknowledged before is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_appends_are_interrupted_and_the_store_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let kept = RunId::new();
    store
        .append(vec![envelope(kept, None, 1), envelope(kept, None, 2)])
        .await
        .unwrap();

    store.hold_commits(true).unwrap();
    let runs: Vec<RunId> = (0..5).map(|_| RunId::new()).collect();
    let mut waiting = Vec::new();
    for run in &runs {
        let store = store.clone();
        let run = *run;
        waiting.push(tokio::spawn(async move {
            store.append(vec![envelope(run, None, 1)]).await
        }));
    }
    wait_for(
        "the appends to be pending",
        Duration::from_secs(30),
        async || (store.stats().await.unwrap().pending_appends == runs.len()).then_some(()),
    )
    .await;
    store.inject_actor_panic().unwrap();
    for w in waiting {
        let result = w.await.unwrap();
        assert!(
            matches!(result, Err(StoreError::Interrupted { .. })),
            "{result:?}"
        );
        assert!(result.unwrap_err().is_retryable());
    }
    for run in &runs {
        assert!(
            store.list_after(*run, 0, 10).await.unwrap().is_empty(),
            "nothing stored"
        );
        store.append(vec![envelope(*run, None, 1)]).await.unwrap();
    }
    assert_eq!(store.list_after(kept, 0, 10).await.unwrap().len(), 2);
    store.append(vec![envelope(kept, None, 3)]).await.unwrap();
    store.close().await.unwrap();

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    assert_eq!(store.run_info(kept).await.unwrap().unwrap().last_seq, 3);
    for run in &runs {
        assert_eq!(store.run_info(*run).await.unwrap().unwrap().last_seq, 1);
    }
    store.close().await.unwrap();
}

/// Through the hub: the store actor panics twice under a pipelined
/// publisher with a subscriber. Publishers hear a retryable error or the
/// store's acknowledgement; retried, every event is stored once, seqs stay
/// gapless, and the subscriber receives every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_panics_under_load_lose_and_repeat_nothing() {
    const EVENTS: usize = 600;
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let run = RunId::new();
    let mut stream = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while let Some(item) = next_within(&mut stream, Duration::from_secs(30)).await {
            seqs.push(item.unwrap().seq);
        }
        seqs
    });
    hub.publish(started(run, None)).await.unwrap();
    let mut work: VecDeque<usize> = (0..EVENTS).collect();
    let mut in_flight: VecDeque<(usize, PendingPublish)> = VecDeque::new();
    let mut failures = 0;
    let mut submitted = 0;
    while !work.is_empty() || !in_flight.is_empty() {
        if in_flight.len() < 32
            && let Some(i) = work.pop_front()
        {
            submitted += 1;
            if submitted == 200 || submitted == 400 {
                hub.store().inject_actor_panic().unwrap();
            }
            in_flight.push_back((i, hub.submit(delta(run, &i.to_string())).await.unwrap()));
            continue;
        }
        let (i, pending) = in_flight.pop_front().unwrap();
        match pending.await {
            Ok(_) => {}
            Err(error) if error.is_retryable() => {
                failures += 1;
                work.push_back(i);
            }
            // A write that was in progress when the actor died is in doubt;
            // these tests never kill mid-write, so none is expected.
            Err(other @ HubError::Store(StoreError::FlushFailed { .. })) => panic!("{other:?}"),
            Err(other) => panic!("{other:?}"),
        }
    }
    hub.publish(completed(run)).await.unwrap();
    assert!(failures > 0, "the panics must have interrupted publishes");
    let total = EVENTS as u64 + 2;
    let stored = hub.replay(run, 0, 10_000).await.unwrap();
    assert_eq!(
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let texts: HashSet<String> = stored
        .iter()
        .filter_map(|e| match &e.event {
            AgentEvent::TextDelta(d) => Some(d.delta.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(texts.len(), EVENTS);
    assert_eq!(reader.await.unwrap(), (1..=total).collect::<Vec<_>>());
    hub.shutdown().await.unwrap();
}
