//! Retention: runs whose terminal event is older than a cutoff are removed
//! (events, session index entry), leaving a tombstone that keeps the run
//! ended and makes any read of its history an explicit `RunRemoved`.

mod common;

use std::time::Duration;

use behest_stream::{
    Config, Cursor, EventHub, HubError, Resume, RunId, RuntimeRoom, Store, StoreError,
};
use chrono::{DateTime, Utc};
use common::{completed, delta, envelope, next_within, started, terminal, wait_for};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

/// Stores run `run_id` with `events` envelopes, the last one terminal and
/// emitted at `ended_at` if given (else the run stays live).
async fn store_run(
    store: &Store,
    run_id: RunId,
    session: Option<Uuid>,
    events: u64,
    ended_at: Option<DateTime<Utc>>,
) {
    let mut envelopes: Vec<_> = (1..events)
        .map(|seq| envelope(run_id, session, seq))
        .collect();
    match ended_at {
        Some(at) => {
            let mut last = terminal(run_id, session, events);
            last.emitted_at = at;
            envelopes.push(last);
        }
        None => envelopes.push(envelope(run_id, session, events)),
    }
    store.append(envelopes).await.unwrap();
}

/// Only ended runs whose end is before the cutoff go; a removed run keeps
/// its final seq and stays ended, its reads fail explicitly, and the other
/// runs are untouched. All of it survives a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_takes_only_runs_ended_before_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let session = Uuid::now_v7();
    let t0 = Utc::now() - chrono::Duration::hours(2);
    let (old, recent, live) = (RunId::new(), RunId::new(), RunId::new());
    store_run(&store, old, Some(session), 5, Some(t0)).await;
    store_run(
        &store,
        recent,
        Some(session),
        3,
        Some(t0 + chrono::Duration::hours(1)),
    )
    .await;
    store_run(&store, live, Some(session), 4, None).await;

    let removed = store
        .remove_ended_before(t0 + chrono::Duration::minutes(30), 100)
        .await
        .unwrap();
    assert_eq!((removed.runs, removed.more), (vec![old], false));

    let info = store.run_info(old).await.unwrap().unwrap();
    assert!(info.is_removed() && info.is_ended());
    assert_eq!(info.last_seq, 5, "the tombstone keeps the final seq");
    match store.list_after(old, 0, 10).await {
        Err(StoreError::RunRemoved { run_id, .. }) => assert_eq!(run_id, old),
        other => panic!("expected RunRemoved, got {other:?}"),
    }
    assert!(matches!(
        store.list_after(old, 4, 10).await,
        Err(StoreError::RunRemoved { .. })
    ));
    // A reader that has seen the whole run is missing nothing.
    assert!(store.list_after(old, 5, 10).await.unwrap().is_empty());
    // Nothing can be stored under the removed run's id again.
    let again = store.append(vec![envelope(old, Some(session), 6)]).await;
    assert!(
        matches!(again, Err(StoreError::RunClosed { .. })),
        "{again:?}"
    );
    assert_eq!(
        store.session_runs(session).await.unwrap(),
        vec![recent, live]
    );
    let check = store.verify_run(old).await.unwrap();
    assert_eq!((check.events, check.segments), (0, 0));
    assert!(check.removed_at.is_some());
    assert_eq!(store.list_after(recent, 0, 10).await.unwrap().len(), 3);
    assert_eq!(store.list_after(live, 0, 10).await.unwrap().len(), 4);

    store.close().await.unwrap();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    assert!(store.run_info(old).await.unwrap().unwrap().is_removed());
    // A cutoff far ahead takes the other ended run, never the live one.
    let far = Utc::now() + chrono::Duration::days(1);
    assert_eq!(
        store.remove_ended_before(far, 100).await.unwrap().runs,
        vec![recent]
    );
    let again = store.remove_ended_before(far, 100).await.unwrap();
    assert!(again.runs.is_empty() && !again.more);
    assert_eq!(store.list_after(live, 0, 10).await.unwrap().len(), 4);
    assert_eq!(store.session_runs(session).await.unwrap(), vec![live]);
    store.close().await.unwrap();
}

/// Pages: `max_runs` bounds each call, oldest first, and repeated calls
/// take the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_goes_a_page_at_a_time_oldest_first() {
    let store = Store::open(Config::temporary()).await.unwrap();
    let t0 = Utc::now() - chrono::Duration::hours(1);
    let runs: Vec<RunId> = (0..7).map(|_| RunId::new()).collect();
    // Stored newest first, so id order and end order disagree.
    for (i, run) in runs.iter().enumerate().rev() {
        store_run(
            &store,
            *run,
            None,
            2,
            Some(t0 + chrono::Duration::seconds(i as i64)),
        )
        .await;
    }
    let now = Utc::now();
    let mut removed = Vec::new();
    loop {
        let step = store.remove_ended_before(now, 3).await.unwrap();
        assert!(step.runs.len() <= 3);
        removed.extend(step.runs);
        if !step.more {
            break;
        }
    }
    assert_eq!(removed, runs, "removed in the order they ended");
    store.close().await.unwrap();
}

/// Through the hub: a removed run cannot be subscribed to or replayed, and a
/// session cursor that has not seen all of it is refused; a session cursor
/// that saw it whole resumes as before; publishing to it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_refuses_history_of_removed_runs() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let session = Uuid::now_v7();
    let (done, running) = (RunId::new(), RunId::new());
    hub.publish(started(done, Some(session))).await.unwrap();
    hub.publish(delta(done, "a")).await.unwrap();
    hub.publish(delta(done, "b")).await.unwrap();
    hub.publish(completed(done)).await.unwrap();
    hub.publish(started(running, Some(session))).await.unwrap();

    // A session subscriber that has seen everything so far.
    let mut cursor = Cursor::new(hub.epoch());
    {
        let mut stream = hub
            .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
            .await
            .unwrap();
        for _ in 0..5 {
            cursor.advance(&next_within(&mut stream, DEADLINE).await.unwrap().unwrap());
        }
    }
    let partial = Cursor::at(hub.epoch(), done, 2);

    let removed = hub
        .store()
        .remove_ended_before(Utc::now() + chrono::Duration::seconds(1), 100)
        .await
        .unwrap();
    assert_eq!(removed.runs, vec![done], "the running run is never removed");

    for resume in [
        Resume::Live,
        Resume::FromStart,
        Resume::After(partial.clone()),
    ] {
        match hub.subscribe(RuntimeRoom::Run(done), resume.clone()).await {
            Err(HubError::RunRemoved { run_id, .. }) => assert_eq!(run_id, done),
            Err(other) => panic!("{resume:?}: expected RunRemoved, got {other}"),
            Ok(_) => panic!("{resume:?}: subscribed to a removed run"),
        }
    }
    assert!(matches!(
        hub.replay(done, 0, 10).await,
        Err(HubError::RunRemoved { .. })
    ));
    assert!(matches!(
        hub.subscribe(RuntimeRoom::Session(session), Resume::After(partial))
            .await
            .err(),
        Some(HubError::RunRemoved { .. })
    ));
    assert!(matches!(
        hub.publish(delta(done, "late")).await,
        Err(HubError::RunClosed { .. })
    ));

    // The cursor that saw the removed run whole resumes with the next event.
    let mut stream = hub
        .subscribe(RuntimeRoom::Session(session), Resume::After(cursor))
        .await
        .unwrap();
    let next = hub.publish(delta(running, "c")).await.unwrap();
    let got = next_within(&mut stream, DEADLINE).await.unwrap().unwrap();
    assert_eq!((got.run_id, got.seq), (running, next.seq));
    hub.shutdown().await.unwrap();
}

/// `replay` of a removed run is `RunRemoved` for every limit, 0 included
/// (an empty page would pass the run off as one with nothing more to
/// read), as are the store's `list_after` and the `RuntimeEventStore`
/// trait's; a reader that saw the whole run is missing nothing, whatever
/// its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_removed_run_is_run_removed_for_every_limit() {
    use behest_stream::{RuntimeEventStore, RuntimeEventStoreError};

    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();
    hub.publish(delta(run, "a")).await.unwrap();
    hub.publish(completed(run)).await.unwrap();
    let removed = hub
        .store()
        .remove_ended_before(Utc::now() + chrono::Duration::seconds(1), 100)
        .await
        .unwrap();
    assert_eq!(removed.runs, vec![run]);

    let store: &dyn RuntimeEventStore = &hub;
    for limit in [0, 1, 2, 10, usize::MAX] {
        for after in [0, 2] {
            match hub.replay(run, after, limit).await {
                Err(HubError::RunRemoved { run_id, .. }) => assert_eq!(run_id, run),
                other => panic!("replay after {after} limit {limit}: {other:?}"),
            }
            match hub.store().list_after(run, after, limit).await {
                Err(StoreError::RunRemoved { run_id, .. }) => assert_eq!(run_id, run),
                other => panic!("list_after {after} limit {limit}: {other:?}"),
            }
        }
        for after in [None, Some(0), Some(2)] {
            match store.list_after(run, after, limit).await {
                Err(RuntimeEventStoreError::RunRemoved { run_id, .. }) => assert_eq!(run_id, run),
                other => panic!("trait list_after {after:?} limit {limit}: {other:?}"),
            }
        }
        assert!(hub.replay(run, 3, limit).await.unwrap().is_empty());
        assert!(
            store
                .list_after(run, Some(3), limit)
                .await
                .unwrap()
                .is_empty()
        );
    }
    hub.shutdown().await.unwrap();
}

/// The background sweeper (TTL zero, sweeping often) removes runs as they
/// end while a live run goes on publishing; the live run loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_removes_ended_runs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::new(dir.path())
        .retain_ended_runs(Duration::ZERO)
        .retention_sweep_every(Duration::from_millis(5));
    let hub = EventHub::open(config).await.unwrap();
    let live = RunId::new();
    hub.publish(started(live, None)).await.unwrap();
    let mut ended = Vec::new();
    for i in 0..20 {
        let run = RunId::new();
        hub.publish(started(run, None)).await.unwrap();
        hub.publish(delta(run, "x")).await.unwrap();
        hub.publish(completed(run)).await.unwrap();
        ended.push(run);
        hub.publish(delta(live, &format!("tick {i}")))
            .await
            .unwrap();
    }
    let store = hub.store().clone();
    wait_for(
        "the sweeper to remove every ended run",
        DEADLINE,
        async || {
            for run in &ended {
                if !store.run_info(*run).await.unwrap().unwrap().is_removed() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let live_info = store.run_info(live).await.unwrap().unwrap();
    assert!(!live_info.is_removed());
    let events = hub.replay(live, 0, 100).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=21).collect::<Vec<_>>());
    hub.shutdown().await.unwrap();
}

/// A store written before the ended-run index existed (no marker, no index
/// entries) gets its index on open, so its old runs can be removed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_without_the_ended_index_get_it_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let (ended, live) = (RunId::new(), RunId::new());
    store_run(&store, ended, None, 3, Some(Utc::now())).await;
    store_run(&store, live, None, 2, None).await;
    store.close().await.unwrap();

    // Take the index away, as an older build would have left the store.
    let db = common::open_sled(dir.path());
    db.remove(b"mended-index").unwrap();
    let index: Vec<_> = db.scan_prefix(b"t").keys().map(Result::unwrap).collect();
    assert_eq!(index.len(), 1, "one ended run, one index entry");
    for key in index {
        db.remove(key).unwrap();
    }
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let far = Utc::now() + chrono::Duration::days(1);
    assert_eq!(
        store.remove_ended_before(far, 100).await.unwrap().runs,
        vec![ended]
    );
    store.close().await.unwrap();
}

/// A tombstone that still has segments (a removal that did not complete
/// whole, which one batch should make impossible) is reported by verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_segments_left_behind_a_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let run = RunId::new();
    store_run(&store, run, None, 3, Some(Utc::now())).await;
    store.close().await.unwrap();

    let db = common::open_sled(dir.path());
    let mut prefix = vec![b'e'];
    prefix.extend_from_slice(run.as_uuid().as_bytes());
    let segments: Vec<_> = db.scan_prefix(&prefix).map(Result::unwrap).collect();
    assert!(!segments.is_empty());
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let far = Utc::now() + chrono::Duration::days(1);
    assert_eq!(
        store.remove_ended_before(far, 10).await.unwrap().runs,
        vec![run]
    );
    store.close().await.unwrap();

    let db = common::open_sled(dir.path());
    for (key, value) in segments {
        db.insert(key, value).unwrap();
    }
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    match store.verify_run(run).await {
        Err(StoreError::Corrupt { run_id, .. }) => assert_eq!(run_id, run),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    store.close().await.unwrap();
}

/// A session subscriber partway through a run when retention removes it
/// gets an error naming the removal, not a run that silently stops short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reader_partway_through_a_removed_run_is_told() {
    let hub = EventHub::open(Config::temporary().catch_up_page(2))
        .await
        .unwrap();
    let session = Uuid::now_v7();
    let run = RunId::new();
    hub.publish(started(run, Some(session))).await.unwrap();
    for i in 0..6 {
        hub.publish(delta(run, &i.to_string())).await.unwrap();
    }
    hub.publish(completed(run)).await.unwrap();
    let mut stream = hub
        .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
        .await
        .unwrap();
    // The first page of two.
    for seq in 1..=2 {
        let got = next_within(&mut stream, DEADLINE).await.unwrap().unwrap();
        assert_eq!(got.seq, seq);
    }
    let far = Utc::now() + chrono::Duration::days(1);
    assert_eq!(
        hub.store().remove_ended_before(far, 10).await.unwrap().runs,
        vec![run]
    );
    match next_within(&mut stream, DEADLINE).await {
        Some(Err(error)) => assert!(
            error.to_string().contains("removed by retention"),
            "{error}"
        ),
        other => panic!("expected the removal as an error, got {other:?}"),
    }
    hub.shutdown().await.unwrap();
}

/// A run whose record is damaged does not stop retention: it is skipped
/// (and left for `verify` to report), the runs after it are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_does_not_stop_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let t0 = Utc::now() - chrono::Duration::hours(1);
    let (damaged, healthy) = (RunId::new(), RunId::new());
    store_run(&store, damaged, None, 2, Some(t0)).await;
    store_run(
        &store,
        healthy,
        None,
        2,
        Some(t0 + chrono::Duration::seconds(1)),
    )
    .await;
    store.close().await.unwrap();

    let db = common::open_sled(dir.path());
    let mut key = vec![b'r'];
    key.extend_from_slice(damaged.as_uuid().as_bytes());
    db.insert(key, vec![1u8, 0xc1]).unwrap(); // version byte, then a reserved MessagePack byte
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let removal = store.remove_ended_before(Utc::now(), 10).await.unwrap();
    assert_eq!((removal.runs, removal.more), (vec![healthy], false));
    assert!(matches!(
        store.run_info(damaged).await,
        Err(StoreError::CorruptRunRecord { .. })
    ));
    store.close().await.unwrap();
}
