//! Group commit: many appenders, many runs, one store; nothing acknowledged
//! is lost and every run stays gapless.

mod common;

use std::collections::HashMap;

use behest_stream::{Config, Durability, RunId, RuntimeEventEnvelope, Store};
use common::envelope;

/// Many tasks append to many runs at once, under both durabilities; every
/// run's seqs come back gapless and every acknowledged event is readable,
/// unchanged, after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_lose_nothing_across_reopen() {
    const RUNS: usize = 48;
    const EVENTS: u64 = 120;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..RUNS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let run = RunId::new();
            let durability = if i % 2 == 0 {
                Durability::Flushed
            } else {
                Durability::Buffered
            };
            let mut acked: Vec<RuntimeEventEnvelope> = Vec::new();
            let mut seq = 1;
            while seq <= EVENTS {
                // Calls of 1, 2 or 3 events, varying by run and position.
                let n = 1 + (seq + i as u64) % 3;
                let batch: Vec<_> = (seq..(seq + n).min(EVENTS + 1))
                    .map(|s| envelope(run, None, s))
                    .collect();
                seq += batch.len() as u64;
                store.append_with(batch.clone(), durability).await.unwrap();
                acked.extend(batch);
            }
            (run, acked)
        }));
    }
    let mut acked: HashMap<RunId, Vec<RuntimeEventEnvelope>> = HashMap::new();
    for task in tasks {
        let (run, log) = task.await.unwrap();
        acked.insert(run, log);
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.events_committed, RUNS as u64 * EVENTS);
    assert!(stats.commits >= 1 && stats.commits <= stats.appends_committed);
    store.close().await.unwrap();

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    for (run, log) in &acked {
        let back = store.list_after(*run, 0, usize::MAX).await.unwrap();
        let seqs: Vec<u64> = back.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=EVENTS).collect::<Vec<_>>(),
            "run {run} is gapless"
        );
        assert_eq!(&back, log, "run {run} holds exactly what was acknowledged");
        assert_eq!(
            store.run_info(*run).await.unwrap().unwrap().last_seq,
            EVENTS
        );
    }
    store.close().await.unwrap();
}

/// Appends that arrive while commits are held gather into one batch: one
/// sled batch and one flush serve all of them. (The hold is a test hook, so
/// this does not depend on timing.)
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_arriving_during_a_commit_share_the_next_batch() {
    use std::time::Duration;

    const APPENDERS: usize = 20;
    let store = Store::open(Config::temporary()).await.unwrap();
    store.hold_commits(true).unwrap();
    let runs: Vec<RunId> = (0..APPENDERS).map(|_| RunId::new()).collect();
    let mut tasks = Vec::new();
    for (i, run) in runs.iter().copied().enumerate() {
        let store = store.clone();
        let durability = if i % 4 == 0 {
            Durability::Buffered
        } else {
            Durability::Flushed
        };
        tasks.push(tokio::spawn(async move {
            store
                .append_with(
                    vec![envelope(run, None, 1), envelope(run, None, 2)],
                    durability,
                )
                .await
        }));
    }
    common::wait_for(
        "all appends to be pending",
        Duration::from_secs(30),
        async || {
            let stats = store.stats().await.unwrap();
            (stats.pending_appends == APPENDERS).then_some(())
        },
    )
    .await;
    assert_eq!(
        store.stats().await.unwrap().commits,
        0,
        "nothing commits while held"
    );
    store.hold_commits(false).unwrap();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.commits, 1, "one batch for every append that waited");
    assert_eq!(
        stats.flushes, 1,
        "one flush serves every Flushed append in it"
    );
    assert_eq!(stats.largest_batch, APPENDERS);
    assert_eq!(stats.events_committed, 2 * APPENDERS as u64);
    for run in runs {
        assert_eq!(store.list_after(run, 0, 10).await.unwrap().len(), 2);
    }
    store.close().await.unwrap();
}

/// A `Buffered` append is acknowledged once written, before the flush that
/// follows in the same commit: every commit is flushed (so nothing a reader
/// or subscriber sees can be taken back by a crash), and a `Buffered`
/// appender does not wait for it (its `Ok` stands even when that flush
/// fails, where a `Flushed` one hears the failure).
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_appends_are_acknowledged_before_the_flush_every_commit_does() {
    let store = Store::open(Config::temporary().flush_every_ms(None))
        .await
        .unwrap();
    let run = RunId::new();
    store
        .append_with(vec![envelope(run, None, 1)], Durability::Buffered)
        .await
        .unwrap();
    store
        .append_with(vec![envelope(run, None, 2)], Durability::Buffered)
        .await
        .unwrap();
    // The flush may still be running when the appender hears `Ok`.
    common::wait_for(
        "both commits flushed",
        std::time::Duration::from_secs(10),
        async || {
            let stats = store.stats().await.unwrap();
            (stats.commits, stats.flushes).eq(&(2, 2)).then_some(())
        },
    )
    .await;
    store.inject_flush_failure(1).unwrap();
    store
        .append_with(vec![envelope(run, None, 3)], Durability::Buffered)
        .await
        .expect("acknowledged once written, before the failed flush");
    store.inject_flush_failure(1).unwrap();
    let flushed = store
        .append_with(vec![envelope(run, None, 4)], Durability::Flushed)
        .await;
    assert!(
        matches!(flushed, Err(behest_stream::StoreError::FlushFailed { .. })),
        "{flushed:?}"
    );
    store.close().await.unwrap();
}
