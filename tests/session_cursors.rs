//! Session cursors and what a subscribe costs: a session subscriber's
//! cursor reveals nothing about runs outside the session, costs nothing for
//! them, is bounded in size, and a run retention removes while the stream
//! sweeps the session ends nothing unless the cursor had seen part of it.

mod common;

use std::time::Duration;

use behest_stream::{
    Config, Cursor, EventHub, Resume, RunId, RuntimeEventEnvelope, RuntimeRoom, Store,
};
use chrono::{DateTime, Utc};
use common::{delta, envelope, next_within, started, terminal, wait_for};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

/// Publishes `events` of `run_id` in `session` through the hub (`RunStarted`
/// first); returns the last seq.
async fn publish_run(hub: &EventHub, run_id: RunId, session: Uuid, events: u64) -> u64 {
    hub.publish(started(run_id, Some(session))).await.unwrap();
    for i in 1..events {
        hub.publish(delta(run_id, &i.to_string())).await.unwrap();
    }
    events
}

/// Appends run `run_id` of `session` straight to the store: `events`
/// envelopes, the last terminal and emitted at `ended_at`.
async fn store_ended_run(
    store: &Store,
    run_id: RunId,
    session: Uuid,
    events: u64,
    ended_at: DateTime<Utc>,
) {
    let mut envelopes: Vec<_> = (1..events)
        .map(|seq| envelope(run_id, Some(session), seq))
        .collect();
    let mut last = terminal(run_id, Some(session), events);
    last.emitted_at = ended_at;
    envelopes.push(last);
    store.append(envelopes).await.unwrap();
}

/// The next item, which must be an envelope.
async fn next_envelope(stream: &mut behest_stream::BoxRuntimeEventStream) -> RuntimeEventEnvelope {
    match next_within(stream, DEADLINE).await {
        Some(Ok(envelope)) => envelope,
        other => panic!("expected an envelope, got {other:?}"),
    }
}

/// A session cursor that names runs outside the session (one that exists,
/// one it claims to be ahead of, one retention removed, one that never
/// existed) tells its holder nothing about them: the subscribe ignores
/// those positions and delivers exactly the session's events, or fails
/// with an error that names none of their facts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cursor_reveals_nothing_about_runs_outside_its_session() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let (session, other) = (Uuid::now_v7(), Uuid::now_v7());
    let mine = RunId::new();
    let mut last_mine = publish_run(&hub, mine, session, 3).await;
    // Another session's runs: one going on with five events, one removed.
    let (existing, removed, never) = (RunId::new(), RunId::new(), RunId::new());
    publish_run(&hub, existing, other, 5).await;
    publish_run(&hub, removed, other, 2).await;
    hub.publish(common::completed(removed)).await.unwrap();
    let far = Utc::now() + chrono::Duration::days(1);
    let gone = hub.store().remove_ended_before(far, 100).await.unwrap();
    assert_eq!(gone.runs, vec![removed]);
    let removed_at = hub
        .store()
        .run_info(removed)
        .await
        .unwrap()
        .unwrap()
        .removed_at
        .unwrap();

    let epoch = hub.epoch();
    let foreign: Vec<(&str, Vec<(RunId, u64)>)> = vec![
        ("an existing run, partway", vec![(existing, 2)]),
        ("an existing run, ahead of it", vec![(existing, 99)]),
        ("a removed run, partway", vec![(removed, 1)]),
        ("a run that never existed", vec![(never, 7)]),
        (
            "all of them",
            vec![(existing, 99), (removed, 1), (never, 7)],
        ),
    ];
    // Facts about the foreign runs that no answer may carry.
    let secrets = [
        existing.to_string(),
        removed.to_string(),
        never.to_string(),
        removed_at.to_string(),
        "holds only up to".to_owned(),
        "removed by retention".to_owned(),
    ];
    for (what, positions) in foreign {
        let mut text = format!("{epoch}/{mine}:1");
        for (run, seq) in &positions {
            text.push_str(&format!(",{run}:{seq}"));
        }
        let cursor: Cursor = text.parse().unwrap();
        match hub
            .subscribe(RuntimeRoom::Session(session), Resume::After(cursor))
            .await
        {
            Ok(mut stream) => {
                for seq in 2..=last_mine {
                    let got = next_envelope(&mut stream).await;
                    assert_eq!((got.run_id, got.seq), (mine, seq), "{what}");
                }
                // Nothing else is owed: the next item is the next event.
                last_mine = hub.publish(delta(mine, what)).await.unwrap().seq;
                let got = next_envelope(&mut stream).await;
                assert_eq!((got.run_id, got.seq), (mine, last_mine), "{what}");
            }
            Err(error) => {
                let text = error.to_string();
                for secret in &secrets {
                    assert!(!text.contains(secret.as_str()), "{what}: {text}");
                }
            }
        }
    }
    hub.shutdown().await.unwrap();
}

/// A subscribe costs store reads bounded by the session's runs, not by the
/// cursor: thousands of positions outside the session cost none, at the
/// subscribe and at the re-sweep after the subscriber lagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_subscribe_reads_nothing_for_cursor_positions_outside_the_session() {
    let hub = EventHub::open(Config::temporary().live_capacity(2))
        .await
        .unwrap();
    let session = Uuid::now_v7();
    let mine = RunId::new();
    publish_run(&hub, mine, session, 2).await;
    // Another session's runs, one event each, all named by the cursor.
    let other = Uuid::now_v7();
    let foreign: Vec<RunId> = (0..2000).map(|_| RunId::new()).collect();
    let firsts = foreign.iter().map(|run| envelope(*run, Some(other), 1));
    hub.store().append(firsts.collect()).await.unwrap();
    let mut text = format!("{}/{mine}:2", hub.epoch());
    for run in &foreign {
        text.push_str(&format!(",{run}:1"));
    }
    let cursor: Cursor = text.parse().unwrap();
    let reads = async || hub.stats().await.unwrap().store.reads;

    let before = reads().await;
    let mut stream = hub
        .subscribe(RuntimeRoom::Session(session), Resume::After(cursor))
        .await
        .unwrap();
    let subscribe_reads = reads().await - before;
    assert!(
        subscribe_reads <= 3,
        "the subscribe read the store {subscribe_reads} times"
    );

    // The subscribe's own sweep first, then the live feed.
    hub.publish(delta(mine, "3")).await.unwrap();
    let got = next_envelope(&mut stream).await;
    assert_eq!((got.run_id, got.seq), (mine, 3));
    // Overflow the subscriber's live queue (two deliveries) so that it
    // sweeps the session again when it reads on.
    for i in 4..=13 {
        hub.publish(delta(mine, &i.to_string())).await.unwrap();
    }
    let room = RuntimeRoom::Session(session);
    wait_for(
        "the session room to fan out all eleven",
        DEADLINE,
        async || {
            let stats = hub.stats().await.unwrap();
            stats
                .rooms
                .iter()
                .any(|r| r.room == room && r.fanned_out == 11)
                .then_some(())
        },
    )
    .await;
    let (before, sweeps) = {
        let stats = hub.stats().await.unwrap();
        (stats.store.reads, stats.catch_ups_from_store)
    };
    for seq in 4..=13 {
        let got = next_envelope(&mut stream).await;
        assert_eq!((got.run_id, got.seq), (mine, seq));
    }
    let stats = hub.stats().await.unwrap();
    assert!(
        stats.catch_ups_from_store > sweeps,
        "the subscriber did not lag, so did not sweep again"
    );
    let lag_reads = stats.store.reads - before;
    assert!(
        lag_reads <= 3,
        "catching up after the lag read the store {lag_reads} times"
    );
    hub.shutdown().await.unwrap();
}

/// A run that retention removes while the session stream sweeps, and that
/// the cursor never saw, is simply no longer in the session's history: the
/// stream goes on, and ends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_removed_during_a_sweep_that_the_cursor_never_saw_does_not_end_the_stream() {
    // Pages of one envelope: the sweep takes many steps.
    let hub = EventHub::open(Config::temporary().catch_up_page(1))
        .await
        .unwrap();
    let session = Uuid::now_v7();
    let t0 = Utc::now() - chrono::Duration::hours(2);
    // Started first (swept first), ended last; the other ended earlier.
    let (first, other) = (RunId::new(), RunId::new());
    store_ended_run(
        hub.store(),
        first,
        session,
        3,
        t0 + chrono::Duration::hours(1),
    )
    .await;
    store_ended_run(hub.store(), other, session, 3, t0).await;
    let mut stream = hub
        .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
        .await
        .unwrap();
    let got = next_envelope(&mut stream).await;
    assert_eq!((got.run_id, got.seq), (first, 1));

    let cutoff = t0 + chrono::Duration::minutes(30);
    let gone = hub.store().remove_ended_before(cutoff, 10).await.unwrap();
    assert_eq!(gone.runs, vec![other]);

    for seq in 2..=3 {
        let got = next_envelope(&mut stream).await;
        assert_eq!((got.run_id, got.seq), (first, seq));
    }
    // The stream goes on: a run that starts now arrives next.
    let later = RunId::new();
    hub.publish(started(later, Some(session))).await.unwrap();
    let got = next_envelope(&mut stream).await;
    assert_eq!((got.run_id, got.seq), (later, 1));
    hub.shutdown().await.unwrap();
}

/// A cursor's text is bounded: more than `Cursor::MAX_POSITIONS` positions,
/// or more than `Cursor::MAX_TEXT_LEN` characters, is refused with an error
/// that says which bound; a cursor at the bounds parses.
#[test]
fn a_cursor_beyond_its_size_bound_is_refused() {
    let epoch = Uuid::now_v7();
    let mut at_bound = Cursor::new(epoch);
    for _ in 0..Cursor::MAX_POSITIONS {
        at_bound.advance(&envelope(RunId::new(), None, u64::MAX));
    }
    let text = at_bound.to_string();
    assert!(text.len() <= Cursor::MAX_TEXT_LEN, "{}", text.len());
    assert_eq!(text.parse::<Cursor>().unwrap(), at_bound);

    let mut too_many = format!("{epoch}/");
    for i in 0..=Cursor::MAX_POSITIONS {
        if i > 0 {
            too_many.push(',');
        }
        too_many.push_str(&format!("{}:1", RunId::new()));
    }
    let Err(error) = too_many.parse::<Cursor>() else {
        panic!("a cursor of {} positions parsed", Cursor::MAX_POSITIONS + 1);
    };
    let error = error.to_string();
    assert!(error.contains("positions"), "{error}");
    assert!(error.len() < 1000, "the error repeats the input: {error}");

    // Few positions, but seqs padded with zeros past the length bound.
    let padding = "0".repeat(Cursor::MAX_TEXT_LEN);
    let too_long = format!("{epoch}/{}:{padding}1", RunId::new());
    let Err(error) = too_long.parse::<Cursor>() else {
        panic!("a cursor of {} characters parsed", too_long.len());
    };
    let error = error.to_string();
    assert!(error.contains("characters"), "{error}");
    assert!(error.len() < 1000, "the error repeats the input: {error}");
}
