//! Shutdown with publishes in flight loses nothing acknowledged.

mod common;

use std::time::Duration;

use behest_stream::{Config, EventHub, HubError, Resume, RunId, RuntimeRoom};
use common::{delta, started};

/// Publishes are submitted (pipelined) on several runs and not awaited; the
/// hub is shut down; every publish is then acknowledged, and after a reopen
/// every acknowledged event is in the store with its seq and event id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    let runs: Vec<RunId> = (0..8).map(|_| RunId::new()).collect();
    let mut pending = Vec::new();
    for i in 0..50 {
        for run in &runs {
            let event = if i == 0 {
                started(*run, None)
            } else {
                delta(*run, "x")
            };
            pending.push(hub.submit(event).await.unwrap());
        }
    }
    let mut subscription = hub
        .subscribe(RuntimeRoom::Run(runs[0]), Resume::FromStart)
        .await
        .unwrap();
    hub.shutdown().await.unwrap();

    let mut acked = Vec::new();
    for p in pending {
        acked.push(p.await.expect("shutdown answers every publish it accepted"));
    }
    assert!(matches!(
        hub.publish(delta(runs[0], "late")).await,
        Err(HubError::Closed)
    ));
    // The open subscription ends: it may yield what it had, then Closed.
    loop {
        match common::next_within(&mut subscription, Duration::from_secs(30)).await {
            Some(Ok(_)) => continue,
            Some(Err(behest_stream::RuntimeStreamError::Closed)) | None => break,
            Some(Err(other)) => panic!("unexpected {other:?}"),
        }
    }
    drop(hub);

    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    for run in &runs {
        let stored = hub.replay(*run, 0, 1000).await.unwrap();
        let mine: Vec<_> = acked.iter().filter(|e| e.run_id == *run).cloned().collect();
        assert_eq!(stored, mine, "run {run}: exactly the acknowledged events");
        assert_eq!(stored.len(), 50);
    }
    hub.shutdown().await.unwrap();
}
