//! Acknowledged means delivered: a live session or provider subscriber gets
//! every event whose publisher heard `Ok`, also when the run room died while
//! the event's append was at the store, and also when the room gave up on an
//! append in doubt that the store did keep. Run subscribers re-read the
//! store by themselves; session and provider subscribers see only what run
//! rooms fan out, and after a terminal event nothing more comes to reveal a
//! gap.
#![cfg(feature = "fault-injection")]

mod common;

use std::time::Duration;

use behest_stream::{
    Config, EventHub, ProviderId, Resume, RunId, RuntimeEventEnvelope, RuntimeRoom,
};
use common::{completed, delta, next_within, quiet_injected_panics, started, wait_for};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(20);

/// A hub, a run of a session, and live subscribers of that session and of
/// the run's provider that have received the run's first event.
struct Watched {
    hub: EventHub,
    run: RunId,
    session: behest_stream::BoxRuntimeEventStream,
    provider: behest_stream::BoxRuntimeEventStream,
}

async fn watched() -> Watched {
    watched_with(Config::temporary()).await
}

async fn watched_with(config: Config) -> Watched {
    let hub = EventHub::open(config).await.unwrap();
    let (run, session_id) = (RunId::new(), Uuid::now_v7());
    let mut session = hub
        .subscribe(RuntimeRoom::Session(session_id), Resume::Live)
        .await
        .unwrap();
    let mut provider = hub
        .subscribe(RuntimeRoom::Provider(ProviderId::new("acme")), Resume::Live)
        .await
        .unwrap();
    hub.publish(started(run, Some(session_id))).await.unwrap();
    for stream in [&mut session, &mut provider] {
        let first = next_within(stream, DEADLINE).await.unwrap().unwrap();
        assert_eq!((first.run_id, first.seq), (run, 1));
    }
    Watched {
        hub,
        run,
        session,
        provider,
    }
}

/// Both live subscribers get `expected` next: the event itself, not a
/// `Lagged`, and not nothing.
async fn both_get(watched: &mut Watched, expected: &RuntimeEventEnvelope) {
    for (name, stream) in [
        ("session", &mut watched.session),
        ("provider", &mut watched.provider),
    ] {
        let item = tokio::time::timeout(DEADLINE, futures_util::StreamExt::next(stream))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the live {name} subscriber never got seq {} (acknowledged)",
                    expected.seq
                )
            });
        let got = item
            .expect("the stream ended")
            .expect("an error, not the event");
        assert_eq!(
            (got.seq, got.event_id),
            (expected.seq, expected.event_id),
            "the live {name} subscriber"
        );
    }
}

/// Publishes the run's terminal event and kills its room (a panic) while
/// that event's append is held at the store; then lets the store commit
/// it. Returns the terminal envelope, which the store kept and
/// acknowledged although the room that sequenced it is dead.
async fn terminal_acknowledged_after_its_room_died(
    hub: &EventHub,
    run: RunId,
) -> RuntimeEventEnvelope {
    hub.store().hold_commits(true).unwrap();
    let terminal = hub.submit(completed(run)).await.unwrap();
    wait_for("the append at the store", DEADLINE, async || {
        let stats = hub.stats().await.unwrap();
        (stats.store.pending_appends == 1).then_some(())
    })
    .await;
    // The room dies taking its next message; that publish is refused.
    hub.inject_room_panic(RuntimeRoom::Run(run), 1);
    let refused = hub.submit(delta(run, "never taken")).await.unwrap().await;
    assert!(refused.is_err(), "{refused:?}");
    hub.store().hold_commits(false).unwrap();
    terminal.await.expect("the store kept it: Ok")
}

/// The run room dies (a panic) while the terminal event's append is at the
/// store; the store keeps it and its publisher hears `Ok`. The live session
/// and provider subscribers get that event, though nothing is published
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_and_provider_subscriber_gets_an_event_acknowledged_after_its_room_died() {
    quiet_injected_panics();
    let mut watched = watched().await;
    let (hub, run) = (watched.hub.clone(), watched.run);
    let terminal = terminal_acknowledged_after_its_room_died(&hub, run).await;
    assert_eq!(terminal.seq, 2);
    both_get(&mut watched, &terminal).await;
    assert_eq!(hub.replay(run, 0, 10).await.unwrap().len(), 2);
    hub.shutdown().await.unwrap();
}

/// As above, with a restart intensity that forbids restarting the room
/// when it dies: what it owes is fanned out once its failure ages out of
/// the restart window, without waiting for another publish (after a
/// terminal event none comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_cannot_restart_at_once_fans_out_what_it_owes_after_the_restart_window() {
    quiet_injected_panics();
    let config = Config::temporary().restart_intensity(0, Duration::from_millis(300));
    let mut watched = watched_with(config).await;
    let (hub, run) = (watched.hub.clone(), watched.run);
    let terminal = terminal_acknowledged_after_its_room_died(&hub, run).await;
    both_get(&mut watched, &terminal).await;
    hub.shutdown().await.unwrap();
}

/// A room that owes fan-out it can no longer read gives the debt up
/// instead of failing on every start: here retention removes the run while
/// the dead room cannot be restarted (restart intensity), so its successor
/// finds the events gone, logs it, and serves the run as a removed run
/// (`RunClosed` to a publish), not `RoomFailed` forever. (Should the
/// successor start before the removal, it pays the debt instead; the run
/// answers the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debt_that_can_no_longer_be_read_is_given_up_not_retried_forever() {
    quiet_injected_panics();
    let config = Config::temporary().restart_intensity(0, Duration::from_secs(2));
    let watched = watched_with(config).await;
    let (hub, run) = (watched.hub.clone(), watched.run);
    terminal_acknowledged_after_its_room_died(&hub, run).await;
    let cutoff = chrono::Utc::now() + chrono::Duration::seconds(60);
    let removal = hub.store().remove_ended_before(cutoff, 10).await.unwrap();
    assert_eq!(removal.runs, vec![run]);
    wait_for("the run to answer as removed", DEADLINE, async || match hub
        .publish(delta(run, "late"))
        .await
    {
        Err(behest_stream::HubError::RunClosed { .. }) => Some(()),
        _ => None,
    })
    .await;
    hub.shutdown().await.unwrap();
}

/// A commit is written but its flush fails: the publisher hears
/// `FlushFailed` (in doubt) and the room stops, not knowing its last seq.
/// The store kept the event, so it is part of the run: the live session
/// and provider subscribers get it, and the run goes on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_in_doubt_that_the_store_kept_reaches_live_session_and_provider_subscribers() {
    let mut watched = watched().await;
    let (hub, run) = (watched.hub.clone(), watched.run);
    hub.store().inject_flush_failure(1).unwrap();
    let in_doubt = hub.publish(delta(run, "in doubt")).await;
    assert!(
        matches!(
            in_doubt,
            Err(behest_stream::HubError::Store(
                behest_stream::StoreError::FlushFailed { .. }
            ))
        ),
        "{in_doubt:?}"
    );
    let kept = hub.replay(run, 1, 1).await.unwrap().remove(0);
    assert_eq!(kept.seq, 2);
    both_get(&mut watched, &kept).await;
    let next = hub.publish(completed(run)).await.unwrap();
    assert_eq!(next.seq, 3);
    both_get(&mut watched, &next).await;
    hub.shutdown().await.unwrap();
}
