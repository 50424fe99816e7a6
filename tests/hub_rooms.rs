//! Room lifecycle and refusals: idle rooms stop and come back where they
//! left off; nothing follows a terminal event; cursors of other histories
//! are refused.

mod common;

use std::time::Duration;

use behest_stream::{
    AgentEvent, Config, Cursor, EventHub, HubError, ProviderId, Resume, RunId, RuntimeRoom,
    TextDelta,
};
use common::{completed, delta, next_within, started, wait_for};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

/// A room with no subscribers and nothing in flight is stopped after the idle
/// timeout; a later publish starts it again from the store and continues the
/// seq; a later subscribe replays everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_rooms_stop_and_resume_their_seq() {
    let hub = EventHub::open(Config::temporary().idle_timeout(Duration::from_millis(40)))
        .await
        .unwrap();
    let run = RunId::new();
    let session = Uuid::now_v7();
    hub.publish(started(run, Some(session))).await.unwrap();
    hub.publish(delta(run, "a")).await.unwrap();
    {
        // A session subscriber keeps the session room alive while it reads.
        let mut s = hub
            .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
            .await
            .unwrap();
        assert_eq!(next_within(&mut s, DEADLINE).await.unwrap().unwrap().seq, 1);
    }
    wait_for("every room to be evicted", DEADLINE, async || {
        let stats = hub.stats().await.unwrap();
        (stats.rooms.is_empty() && stats.rooms_evicted >= 2).then_some(())
    })
    .await;

    let third = hub.publish(delta(run, "b")).await.unwrap();
    assert_eq!(third.seq, 3, "the restarted room recovered the last seq");
    assert_eq!(third.session_id, Some(session), "and the session");
    let mut stream = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    hub.publish(completed(run)).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(item) = next_within(&mut stream, DEADLINE).await {
        seqs.push(item.unwrap().seq);
    }
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    hub.shutdown().await.unwrap();
}

/// An event after the run's terminal event is refused with `RunClosed` and
/// not stored, also after the room restarted from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_after_the_terminal_event_are_refused_and_not_stored() {
    let hub = EventHub::open(Config::temporary().idle_timeout(Duration::from_millis(40)))
        .await
        .unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();
    hub.publish(completed(run)).await.unwrap();
    let refused = hub.publish(delta(run, "late")).await;
    assert!(
        matches!(refused, Err(HubError::RunClosed { run_id }) if run_id == run),
        "{refused:?}"
    );

    wait_for("the room to be evicted", DEADLINE, async || {
        hub.stats().await.unwrap().rooms.is_empty().then_some(())
    })
    .await;
    let refused = hub.publish(delta(run, "later")).await;
    assert!(
        matches!(refused, Err(HubError::RunClosed { .. })),
        "{refused:?}"
    );
    let stored = hub.replay(run, 0, 100).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored[1].is_terminal());
    hub.shutdown().await.unwrap();
}

/// Every envelope the hub accepts has a JSON form
/// (`codec::envelope_to_json`, what the CLI's `--json` and SSE clients
/// read) that `serde_json` parses back, its default recursion limit
/// included: the deepest JSON payload accepted, in every event that
/// carries JSON, round-trips; one level deeper is refused at publish,
/// naming the limit, and takes no seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_envelope_has_json_that_parses_back() {
    use behest_stream::codec::{self, CodecError, MAX_JSON_DEPTH};
    use behest_stream::{RuntimeEventEnvelope, StoreError};

    // Unchecked: the carriers complete one tool call twice (once per
    // depth), which the order check would refuse before the codec is asked.
    let hub = EventHub::open(Config::temporary().event_order(behest_stream::EventOrder::Unchecked))
        .await
        .unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();
    let mut accepted = vec![];
    for objects in [false, true] {
        let deepest = common::nested_json(MAX_JSON_DEPTH, objects);
        let deeper = common::nested_json(MAX_JSON_DEPTH + 1, objects);
        for (event, too_deep) in common::json_carriers(run, &deepest)
            .into_iter()
            .zip(common::json_carriers(run, &deeper))
        {
            let kind = event.kind();
            let envelope = hub.publish(event).await.unwrap();
            let json = codec::envelope_to_json(&envelope).unwrap();
            let back: RuntimeEventEnvelope = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("{kind} at depth {MAX_JSON_DEPTH}: {e}"));
            assert_eq!(back, envelope);
            accepted.push(envelope);

            match hub.publish(too_deep).await {
                Err(
                    error @ HubError::Store(StoreError::Encode {
                        source: CodecError::TooDeep,
                        ..
                    }),
                ) => {
                    let message = error.to_string();
                    assert!(
                        message.contains(&MAX_JSON_DEPTH.to_string())
                            && message.contains(&run.to_string()),
                        "{message}"
                    );
                }
                other => panic!("{kind} at depth {}: {other:?}", MAX_JSON_DEPTH + 1),
            }
        }
    }
    let seqs: Vec<u64> = accepted.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (2..=7).collect::<Vec<u64>>(), "refusals take no seq");
    assert_eq!(hub.replay(run, 1, 100).await.unwrap(), accepted);
    hub.shutdown().await.unwrap();
}

/// An oversized event is refused before it takes a seq: the next event gets
/// the seq it would have had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_takes_no_seq() {
    let hub = EventHub::open(Config::temporary().max_event_bytes(1024))
        .await
        .unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();
    let big = AgentEvent::TextDelta(TextDelta {
        run_id: run,
        timestamp: chrono::Utc::now(),
        delta: "x".repeat(4096),
    });
    assert!(matches!(
        hub.publish(big).await,
        Err(HubError::TooLarge { limit: 1024, .. })
    ));
    assert_eq!(hub.publish(delta(run, "ok")).await.unwrap().seq, 2);
    hub.shutdown().await.unwrap();
}

/// Resuming into history this store does not have is an explicit error:
/// another epoch, or a seq past the run's end. Provider rooms are live-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_into_history_that_is_gone_is_an_error() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();

    let foreign = Cursor::at(Uuid::now_v7(), run, 1);
    let error = hub
        .subscribe(RuntimeRoom::Run(run), Resume::After(foreign))
        .await
        .err()
        .unwrap();
    assert!(matches!(error, HubError::CursorEpoch { .. }), "{error:?}");

    let ahead = Cursor::at(hub.epoch(), run, 5);
    let error = hub
        .subscribe(RuntimeRoom::Run(run), Resume::After(ahead))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            error,
            HubError::CursorAhead {
                seq: 5,
                last_seq: 1,
                ..
            }
        ),
        "{error:?}"
    );

    let provider = RuntimeRoom::Provider(ProviderId::new("acme"));
    let error = hub
        .subscribe(provider, Resume::FromStart)
        .await
        .err()
        .unwrap();
    assert!(matches!(error, HubError::LiveOnly { .. }), "{error:?}");

    // A cursor at the run's end is fine: the stream resumes after it.
    let at_end = Cursor::at(hub.epoch(), run, 1);
    let mut stream = hub
        .subscribe(RuntimeRoom::Run(run), Resume::After(at_end))
        .await
        .unwrap();
    hub.publish(completed(run)).await.unwrap();
    assert_eq!(
        next_within(&mut stream, DEADLINE)
            .await
            .unwrap()
            .unwrap()
            .seq,
        2
    );
    assert!(next_within(&mut stream, DEADLINE).await.is_none());
    hub.shutdown().await.unwrap();
}

/// `Resume::Live` starts after what is already stored; on an ended run the
/// stream ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscriptions_start_at_the_live_edge() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();
    hub.publish(delta(run, "old")).await.unwrap();
    let mut live = hub
        .subscribe(RuntimeRoom::Run(run), Resume::Live)
        .await
        .unwrap();
    hub.publish(delta(run, "new")).await.unwrap();
    hub.publish(completed(run)).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(item) = next_within(&mut live, DEADLINE).await {
        seqs.push(item.unwrap().seq);
    }
    assert_eq!(seqs, vec![3, 4]);
    let mut ended = hub
        .subscribe(RuntimeRoom::Run(run), Resume::Live)
        .await
        .unwrap();
    assert!(next_within(&mut ended, DEADLINE).await.is_none());
    hub.shutdown().await.unwrap();
}

/// A room that is busy (here: waiting for store budget while commits are
/// held) is not mistaken for a dead one: a subscribe routed to it waits for
/// it, no second room is started for the run, and every publish gets the
/// next seq. (Before the fix, the router gave up on the room after 5 s,
/// started a second one, and the run was wedged with seq conflicts.)
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_room_is_not_replaced() {
    use behest_stream::RuntimeStreamAdapter;

    let hub = EventHub::open(Config::temporary().max_in_flight_bytes(2000))
        .await
        .unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();
    hub.store().hold_commits(true).unwrap();
    let mut pending = Vec::new();
    for _ in 0..30 {
        pending.push(hub.submit(delta(run, "x")).await.unwrap());
    }
    let adapter = hub.clone();
    let live = tokio::spawn(async move {
        RuntimeStreamAdapter::subscribe(&adapter, RuntimeRoom::Run(run))
            .await
            .map(|_| ())
    });
    let ordered = {
        let hub = hub.clone();
        tokio::spawn(async move {
            hub.subscribe(RuntimeRoom::Run(run), Resume::FromStart)
                .await
        })
    };
    // Longer than the old router's 5 s wait for a room's answer. This pause
    // makes the old bug show; the test passes however long it is.
    tokio::time::sleep(Duration::from_secs(6)).await;
    hub.store().hold_commits(false).unwrap();
    let mut stream = ordered.await.unwrap().unwrap();
    live.await.unwrap().unwrap();
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.await.unwrap().seq, i as u64 + 2);
    }
    assert_eq!(hub.publish(delta(run, "after")).await.unwrap().seq, 32);
    for seq in 1..=32 {
        assert_eq!(
            next_within(&mut stream, DEADLINE)
                .await
                .unwrap()
                .unwrap()
                .seq,
            seq
        );
    }
    assert_eq!(hub.stats().await.unwrap().rooms_started, 1);
    hub.shutdown().await.unwrap();
}

/// Publishes that switch durability while an append of their room is at
/// the store: the room sends what gathered under the old durability before
/// it gathers the new one, and every event is stored once, in the order it
/// was submitted, and delivered. Commits are held so that the switches
/// happen while appends are outstanding, whatever the timing.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_that_switch_durability_mid_pipeline_keep_their_order() {
    use behest_stream::Durability::{Buffered, Flushed};

    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let run = RunId::new();
    hub.publish(started(run, None)).await.unwrap();
    hub.store().hold_commits(true).unwrap();
    // The first goes to the store at once; the rest gather behind it, and
    // each change of durability sends what gathered before it.
    let durabilities = [
        Flushed, Flushed, Flushed, Buffered, Buffered, Flushed, Buffered, Flushed,
    ];
    let mut pending = Vec::new();
    for (i, durability) in durabilities.into_iter().enumerate() {
        let event = delta(run, &i.to_string());
        pending.push(hub.submit_with(event, durability).await.unwrap());
    }
    let last = hub.submit(completed(run)).await.unwrap();
    hub.store().hold_commits(false).unwrap();
    for (i, publish) in pending.into_iter().enumerate() {
        let envelope = publish.await.unwrap();
        assert_eq!(envelope.seq, i as u64 + 2);
        assert!(
            matches!(&envelope.event, AgentEvent::TextDelta(d) if d.delta == i.to_string()),
            "{envelope:?}"
        );
    }
    assert_eq!(last.await.unwrap().seq, 10);
    let stored: Vec<u64> = hub
        .replay(run, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(stored, (1..=10).collect::<Vec<_>>());
    let mut stream = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let mut seqs = Vec::new();
    while let Some(item) = next_within(&mut stream, DEADLINE).await {
        seqs.push(item.unwrap().seq);
    }
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    hub.shutdown().await.unwrap();
}

/// The number of running rooms is bounded: beyond `max_rooms` a publish that
/// needs a new room is refused (nothing stored) until idle rooms stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_beyond_the_limit_are_refused_until_idle_ones_stop() {
    let hub = EventHub::open(
        Config::temporary()
            .max_rooms(2)
            .idle_timeout(Duration::from_millis(40)),
    )
    .await
    .unwrap();
    let runs: Vec<RunId> = (0..3).map(|_| RunId::new()).collect();
    hub.publish(started(runs[0], None)).await.unwrap();
    hub.publish(started(runs[1], None)).await.unwrap();
    let refused = hub.publish(started(runs[2], None)).await;
    assert!(
        matches!(refused, Err(HubError::TooManyRooms { limit: 2, .. })),
        "{refused:?}"
    );
    assert!(hub.replay(runs[2], 0, 10).await.unwrap().is_empty());
    wait_for("idle rooms to stop", DEADLINE, async || {
        hub.stats().await.unwrap().rooms.is_empty().then_some(())
    })
    .await;
    assert_eq!(hub.publish(started(runs[2], None)).await.unwrap().seq, 1);
    hub.shutdown().await.unwrap();
}

/// Publishers send to a running run room directly, and through the router
/// only when the room is not running, stopped, or still has publishes at
/// the router. Pipelined publishers whose rooms keep stopping (a 2 ms idle
/// timeout), some of whose publishes therefore go through the router and
/// some straight to a room, must still get seqs in the order they
/// submitted: every envelope carries its submission index, and each run's
/// seqs must follow it with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_keep_their_order_while_rooms_stop_and_start() {
    const RUNS: usize = 32;
    const ROUNDS: usize = 80;
    const PER_ROUND: usize = 16;
    let hub = EventHub::open(Config::temporary().idle_timeout(Duration::from_millis(2)))
        .await
        .unwrap();
    let mut publishers = tokio::task::JoinSet::new();
    for r in 0..RUNS {
        let hub = hub.clone();
        publishers.spawn(async move {
            let run = RunId::new();
            hub.publish(started(run, None)).await.unwrap();
            let mut next = 2u64;
            for round in 0..ROUNDS {
                let mut pending = Vec::with_capacity(PER_ROUND);
                for i in 0..PER_ROUND {
                    let text = format!("{round}/{i}");
                    pending.push((text.clone(), hub.submit(delta(run, &text)).await.unwrap()));
                }
                for (text, publish) in pending {
                    let envelope = publish.await.unwrap();
                    assert_eq!(envelope.seq, next, "run {r}: seq of {text}");
                    assert!(
                        matches!(&envelope.event, AgentEvent::TextDelta(d) if d.delta == text),
                        "run {r}: seq {next} holds {envelope:?}, submitted as {text}"
                    );
                    next += 1;
                }
                // Every third round, after the room has stopped as idle,
                // so that the round starts at the router; the others find
                // it running, or stopping.
                if (round + r) % 3 == 0 {
                    let start = tokio::time::Instant::now();
                    while hub
                        .stats()
                        .await
                        .unwrap()
                        .rooms
                        .iter()
                        .any(|room| room.room == RuntimeRoom::Run(run))
                    {
                        assert!(
                            start.elapsed() < DEADLINE,
                            "run {r}: its room never stopped"
                        );
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            let stored: Vec<u64> = hub
                .replay(run, 0, 10_000)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect();
            assert_eq!(
                stored,
                (1..next).collect::<Vec<_>>(),
                "run {r}: stored seqs"
            );
        });
    }
    while let Some(done) = publishers.join_next().await {
        done.unwrap();
    }
    hub.shutdown().await.unwrap();
}
