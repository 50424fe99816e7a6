//! `EventHub` on NATS JetStream (`Config::nats`): the same API over the
//! shared log, and two hubs on one stream as two hosts: one epoch, a cursor
//! from one resumes on the other, and a second host writing a run that the
//! first is writing is refused (`RunFenced`) instead of forking its order.
//! Against 127.0.0.1:4222 (or `BEHEST_STREAM_NATS_URL`); skipped with a
//! printed reason without a server, unless `BEHEST_STREAM_REQUIRE_NATS=1`.

#![cfg(feature = "nats")]

mod common;

use std::time::Duration;

use behest_stream::nats::NatsConfig;
use behest_stream::{
    Config, Cursor, EventHub, HubError, Resume, RunId, RuntimeEventEnvelope, RuntimeRoom,
    StoreError,
};
use common::{completed, delta, next_within, started};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

fn nats_config() -> NatsConfig {
    common::nats::fresh_config()
}

/// A hub on the stream, or `None` (reason printed) without a server.
async fn open_hub(config: &NatsConfig) -> Option<EventHub> {
    common::nats::or_skip(EventHub::open(Config::nats(config.clone())).await)
}

/// Two hubs on a fresh stream, as two hosts, or `None` (reason printed)
/// without a server.
async fn two_hosts() -> Option<(NatsConfig, EventHub, EventHub)> {
    let config = nats_config();
    let host_a = open_hub(&config).await?;
    let host_b = open_hub(&config).await.unwrap();
    Some((config, host_a, host_b))
}

/// Shuts `hosts` down and deletes their stream.
async fn close(config: &NatsConfig, hosts: [EventHub; 2]) {
    for host in hosts {
        host.shutdown().await.unwrap();
    }
    common::nats::delete_stream(config).await;
}

/// Reads `stream` to its end.
async fn read_to_end(
    stream: &mut behest_stream::BoxRuntimeEventStream,
) -> Vec<RuntimeEventEnvelope> {
    let mut out = Vec::new();
    while let Some(item) = next_within(stream, DEADLINE).await {
        out.push(item.unwrap());
    }
    out
}

fn seqs(envelopes: &[RuntimeEventEnvelope]) -> Vec<u64> {
    envelopes.iter().map(|e| e.seq).collect()
}

/// One hub on NATS: publish a run in a session, and read it back as a run
/// stream, a session stream and a replay, all the same log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_on_nats_publishes_subscribes_and_replays() {
    let config = nats_config();
    let Some(hub) = open_hub(&config).await else {
        return;
    };
    let (run, session) = (RunId::new(), Uuid::now_v7());
    let mut live = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    hub.publish(started(run, Some(session))).await.unwrap();
    for i in 0..5 {
        hub.publish(delta(run, &format!("token {i}")))
            .await
            .unwrap();
    }
    hub.publish(completed(run)).await.unwrap();

    let streamed = read_to_end(&mut live).await;
    assert_eq!(seqs(&streamed), (1..=7).collect::<Vec<_>>());
    assert_eq!(hub.replay(run, 0, 100).await.unwrap(), streamed);
    let mut by_session = hub
        .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
        .await
        .unwrap();
    for expected in &streamed {
        let got = next_within(&mut by_session, DEADLINE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, expected);
    }
    hub.shutdown().await.unwrap();
    common::nats::delete_stream(&config).await;
}

/// Two hubs on one stream, as two hosts: the same epoch; a subscriber that
/// read part of a run on host A resumes with its cursor on host B and gets
/// the rest, gapless and once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_one_host_resumes_on_another() {
    let Some((config, host_a, host_b)) = two_hosts().await else {
        return;
    };
    assert_eq!(host_a.epoch(), host_b.epoch(), "one stream, one epoch");

    let run = RunId::new();
    host_a.publish(started(run, None)).await.unwrap();
    for i in 0..8 {
        host_a.publish(delta(run, &i.to_string())).await.unwrap();
    }
    host_a.publish(completed(run)).await.unwrap();

    let mut on_a = host_a
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let mut cursor = Cursor::new(host_a.epoch());
    let mut seen = Vec::new();
    for _ in 0..4 {
        let envelope = next_within(&mut on_a, DEADLINE).await.unwrap().unwrap();
        cursor.advance(&envelope);
        seen.push(envelope);
    }
    drop(on_a);
    let mut on_b = host_b
        .subscribe(RuntimeRoom::Run(run), Resume::After(cursor))
        .await
        .unwrap();
    seen.extend(read_to_end(&mut on_b).await);
    assert_eq!(seqs(&seen), (1..=10).collect::<Vec<_>>());
    assert_eq!(seen, host_a.replay(run, 0, 100).await.unwrap());
    close(&config, [host_a, host_b]).await;
}

/// Host A writes a run; host B then appends to it too (its room recovers
/// the run's end from the log). A's next publish, made with A's stale view,
/// is refused with `RunFenced`, and the log is not forked: B's event holds
/// its seq. A's room then recovers from the log and goes on after B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_writing_a_run_is_fenced_off() {
    let Some((config, host_a, host_b)) = two_hosts().await else {
        return;
    };
    let run = RunId::new();
    host_a.publish(started(run, None)).await.unwrap();
    host_a.publish(delta(run, "a")).await.unwrap();
    let from_b = host_b.publish(delta(run, "b")).await.unwrap();
    assert_eq!(from_b.seq, 3, "B's room recovered the run's end");

    match host_a.publish(delta(run, "a, stale")).await {
        Err(HubError::Store(StoreError::RunFenced { run_id, last_seq })) => {
            assert_eq!((run_id, last_seq), (run, 3));
        }
        other => panic!("expected RunFenced, got {other:?}"),
    }
    let log = host_b.replay(run, 0, 100).await.unwrap();
    assert_eq!(seqs(&log), vec![1, 2, 3]);
    assert_eq!(log[2].event_id, from_b.event_id, "B's event holds seq 3");

    // A's room restarted from the log: its retry lands after B's event.
    let retried = common::wait_for("A's room to recover", DEADLINE, async || {
        host_a.publish(delta(run, "a, again")).await.ok()
    })
    .await;
    assert_eq!(retried.seq, 4);
    // The run handed back and forth. A host that has not followed the other's
    // writes is fenced once, then its room (recovered from the log) and its
    // writer (which last saw its own append) go on after the other's.
    for (host, seq) in [(&host_b, 5), (&host_a, 6)] {
        assert!(matches!(
            host.publish(delta(run, "stale")).await,
            Err(HubError::Store(StoreError::RunFenced { .. }))
        ));
        let next = common::wait_for("the room to recover", DEADLINE, async || {
            host.publish(delta(run, "again")).await.ok()
        })
        .await;
        assert_eq!(next.seq, seq);
    }
    assert_eq!(
        seqs(&host_b.replay(run, 0, 100).await.unwrap()),
        vec![1, 2, 3, 4, 5, 6]
    );
    close(&config, [host_a, host_b]).await;
}

/// A subscriber on host B follows, live, a run that host A writes: B's run
/// room follows the shared log, so B's subscriber gets every event once, in
/// order, and its stream ends after the terminal event. A second subscriber
/// on B that drops partway resumes on B by cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_host_follows_a_run_written_on_another_live() {
    let Some((config, host_a, host_b)) = two_hosts().await else {
        return;
    };
    let run = RunId::new();
    // Subscribed on B before the run has any event.
    let mut whole = host_b
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let mut partial = host_b
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    host_a.publish(started(run, None)).await.unwrap();
    let mut cursor = Cursor::new(host_b.epoch());
    for i in 0..30 {
        host_a.publish(delta(run, &i.to_string())).await.unwrap();
        if i == 10 {
            // Read live on B, then drop partway.
            for _ in 0..5 {
                let envelope = next_within(&mut partial, DEADLINE).await.unwrap().unwrap();
                cursor.advance(&envelope);
            }
        }
    }
    drop(partial);
    host_a.publish(completed(run)).await.unwrap();

    let streamed = read_to_end(&mut whole).await;
    assert_eq!(seqs(&streamed), (1..=32).collect::<Vec<_>>());
    assert_eq!(streamed, host_a.replay(run, 0, 100).await.unwrap());
    let mut resumed = host_b
        .subscribe(RuntimeRoom::Run(run), Resume::After(cursor))
        .await
        .unwrap();
    assert_eq!(
        seqs(&read_to_end(&mut resumed).await),
        (6..=32).collect::<Vec<_>>()
    );
    close(&config, [host_a, host_b]).await;
}

/// A host that follows the run (it has a subscriber) learns of the other
/// host's events as they land, so it can take the run back without being
/// fenced: its room is up to date, and its writer, which last saw its own
/// append, looks at the log again instead of calling the next seq a
/// conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_host_takes_a_run_back_without_a_fence() {
    let Some((config, host_a, host_b)) = two_hosts().await else {
        return;
    };
    let run = RunId::new();
    let mut on_b = host_b
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    assert_eq!(host_b.publish(started(run, None)).await.unwrap().seq, 1);
    assert_eq!(host_a.publish(delta(run, "a1")).await.unwrap().seq, 2);
    assert_eq!(host_a.publish(delta(run, "a2")).await.unwrap().seq, 3);
    for seq in 1..=3 {
        assert_eq!(
            next_within(&mut on_b, DEADLINE).await.unwrap().unwrap().seq,
            seq
        );
    }
    let back = host_b.publish(delta(run, "b again")).await.unwrap();
    assert_eq!(back.seq, 4);
    assert_eq!(
        next_within(&mut on_b, DEADLINE).await.unwrap().unwrap(),
        back
    );
    close(&config, [host_a, host_b]).await;
}

/// Reads `stream` until it has delivered the terminal event of every run in
/// `runs` but those `already_ended`, advancing `cursor`, and returns what
/// it delivered, grouped by run in `runs`' order.
async fn read_runs_to_end(
    stream: &mut behest_stream::BoxRuntimeEventStream,
    runs: &[RunId],
    already_ended: usize,
    cursor: &mut Cursor,
) -> Vec<Vec<RuntimeEventEnvelope>> {
    let mut by_run = vec![Vec::new(); runs.len()];
    let mut ended = already_ended;
    while ended < runs.len() {
        let envelope = next_within(stream, DEADLINE)
            .await
            .expect("the session stream stalled before every run ended")
            .unwrap();
        cursor.advance(&envelope);
        ended += usize::from(envelope.is_terminal());
        let index = runs.iter().position(|r| *r == envelope.run_id).unwrap();
        by_run[index].push(envelope);
    }
    by_run
}

/// A session subscriber on host B follows, live, the runs host A writes in
/// the session: one A started before B subscribed and one A starts after.
/// B's session room follows the session's index and each of its runs on
/// the shared log, so B gets every event of both, once and in order. A
/// subscriber that drops partway resumes on B by its cursor while A writes
/// a third run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_subscriber_on_one_host_follows_runs_written_on_another() {
    let Some((config, host_a, host_b)) = two_hosts().await else {
        return;
    };
    let session = Uuid::now_v7();
    let (first, second, third) = (RunId::new(), RunId::new(), RunId::new());
    host_a.publish(started(first, Some(session))).await.unwrap();
    host_a.publish(delta(first, "before")).await.unwrap();

    let room = RuntimeRoom::Session(session);
    let mut whole = host_b
        .subscribe(room.clone(), Resume::FromStart)
        .await
        .unwrap();
    let mut partial = host_b
        .subscribe(room.clone(), Resume::FromStart)
        .await
        .unwrap();
    for i in 0..10 {
        host_a.publish(delta(first, &i.to_string())).await.unwrap();
    }
    host_a
        .publish(started(second, Some(session)))
        .await
        .unwrap();
    for i in 0..10 {
        host_a.publish(delta(second, &i.to_string())).await.unwrap();
        host_a.publish(delta(first, &i.to_string())).await.unwrap();
    }
    host_a.publish(completed(first)).await.unwrap();
    host_a.publish(completed(second)).await.unwrap();

    let mut cursor = Cursor::new(host_b.epoch());
    let by_run = read_runs_to_end(&mut whole, &[first, second], 0, &mut cursor).await;
    assert_eq!(seqs(&by_run[0]), (1..=23).collect::<Vec<_>>());
    assert_eq!(seqs(&by_run[1]), (1..=12).collect::<Vec<_>>());
    assert_eq!(by_run[0], host_a.replay(first, 0, 100).await.unwrap());
    assert_eq!(by_run[1], host_a.replay(second, 0, 100).await.unwrap());

    // Part of the session, then a resume on B while A writes a third run.
    let mut partial_cursor = Cursor::new(host_b.epoch());
    let mut ended_before = 0;
    for _ in 0..15 {
        let envelope = next_within(&mut partial, DEADLINE).await.unwrap().unwrap();
        partial_cursor.advance(&envelope);
        ended_before += usize::from(envelope.is_terminal());
    }
    drop(partial);
    let mut resumed = host_b
        .subscribe(room.clone(), Resume::After(partial_cursor.clone()))
        .await
        .unwrap();
    host_a.publish(started(third, Some(session))).await.unwrap();
    for i in 0..5 {
        host_a.publish(delta(third, &i.to_string())).await.unwrap();
    }
    host_a.publish(completed(third)).await.unwrap();
    let rest = read_runs_to_end(
        &mut resumed,
        &[first, second, third],
        ended_before,
        &mut partial_cursor,
    )
    .await;
    for (run, rest) in [first, second, third].iter().zip(&rest) {
        let all = host_a.replay(*run, 0, 100).await.unwrap();
        assert_eq!(
            partial_cursor.seq(*run),
            all.last().unwrap().seq,
            "run {run}"
        );
        // What the resumed stream delivered is exactly the tail of the run
        // the first part had not.
        assert_eq!(rest[..], all[all.len() - rest.len()..], "run {run}");
    }
    assert_eq!(seqs(&rest[2]), (1..=7).collect::<Vec<_>>());
    // The first stream goes on live with the third run too.
    let third_whole = read_runs_to_end(&mut whole, &[third], 0, &mut cursor).await;
    assert_eq!(third_whole[0], rest[2]);
    close(&config, [host_a, host_b]).await;
}

/// Following costs the server no consumer: a session room on host B
/// follows the session's index, and a run room on B follows a run A
/// writes, with core subscriptions to what the stream republishes and
/// direct gets. B's session room fans out exactly the runs A writes after
/// it attached (a run that ended before is not replayed into it), its
/// subscriber gets each once, and B's run subscriber gets A's next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_across_hosts_costs_no_consumer_and_replays_nothing() {
    use futures_util::StreamExt;

    let Some((config, host_a, host_b)) = two_hosts().await else {
        return;
    };
    let session = Uuid::now_v7();
    let (before, after, open) = (RunId::new(), RunId::new(), RunId::new());
    host_a
        .publish(started(before, Some(session)))
        .await
        .unwrap();
    host_a.publish(delta(before, "x")).await.unwrap();
    host_a.publish(completed(before)).await.unwrap();
    host_a.publish(started(open, None)).await.unwrap();

    let room = RuntimeRoom::Session(session);
    let mut on_b = host_b.subscribe(room.clone(), Resume::Live).await.unwrap();
    let mut open_on_b = host_b
        .subscribe(RuntimeRoom::Run(open), Resume::FromStart)
        .await
        .unwrap();
    assert_eq!(
        next_within(&mut open_on_b, DEADLINE)
            .await
            .unwrap()
            .unwrap()
            .seq,
        1
    );
    let client = async_nats::connect(config.url.as_str()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream(&config.stream)
        .await
        .unwrap();
    let names: Vec<String> = stream
        .consumer_names()
        .map(|name| name.unwrap())
        .collect()
        .await;
    assert!(
        names.is_empty(),
        "B follows a session and a run with no consumer on the server, found {names:?}"
    );
    let second = host_a.publish(delta(open, "live")).await.unwrap();
    assert_eq!(
        next_within(&mut open_on_b, DEADLINE)
            .await
            .unwrap()
            .unwrap(),
        second
    );

    let mut written = vec![host_a.publish(started(after, Some(session))).await.unwrap()];
    for i in 0..3 {
        written.push(host_a.publish(delta(after, &i.to_string())).await.unwrap());
    }
    written.push(host_a.publish(completed(after)).await.unwrap());
    let mut streamed = Vec::new();
    while streamed.len() < written.len() {
        streamed.push(next_within(&mut on_b, DEADLINE).await.unwrap().unwrap());
    }
    assert_eq!(streamed, written);
    // Another run after it, so that a replay had time to show.
    let last = RunId::new();
    written.push(host_a.publish(started(last, Some(session))).await.unwrap());
    written.push(host_a.publish(completed(last)).await.unwrap());
    for _ in 0..2 {
        streamed.push(next_within(&mut on_b, DEADLINE).await.unwrap().unwrap());
    }
    assert_eq!(streamed, written);
    let stats = host_b.stats().await.unwrap();
    let session_room = stats.rooms.iter().find(|r| r.room == room).unwrap();
    assert_eq!(session_room.fanned_out, written.len() as u64);
    close(&config, [host_a, host_b]).await;
}

/// A stream an earlier build made has no live republish. A server that
/// allows the change (2.10 and later) gets it added at open; nats-server
/// 2.9 refuses it, and the hosts then follow through consumers. Either
/// way the hosts open, and host B follows the run host A writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_without_the_live_republish_opens_and_is_followed() {
    use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
    use behest_stream::nats::NatsLog;

    let config = nats_config();
    let Some(client) = common::nats::or_skip(async_nats::connect(config.url.as_str()).await) else {
        return;
    };
    let version = client.server_info().version.clone();
    let js = async_nats::jetstream::new(client);
    // As builds before the live republish created it.
    js.create_stream(StreamConfig {
        name: config.stream.clone(),
        subjects: vec![
            format!("{}.run.*", config.prefix),
            format!("{}.session.*", config.prefix),
            format!("{}.meta", config.prefix),
        ],
        storage: StorageType::File,
        duplicate_window: config.duplicate_window,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let log = NatsLog::open(&config).await.unwrap();
    let older = version.starts_with("2.9.") || version.starts_with("2.8.");
    assert_eq!(
        log.follows_without_consumers(),
        !older,
        "nats-server {version}: 2.9 refuses to add a republish, later servers take it"
    );
    let (host_a, host_b) = (
        open_hub(&config).await.unwrap(),
        open_hub(&config).await.unwrap(),
    );
    let run = RunId::new();
    host_a.publish(started(run, None)).await.unwrap();
    let mut on_b = host_b
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    assert_eq!(
        next_within(&mut on_b, DEADLINE).await.unwrap().unwrap().seq,
        1
    );
    let second = host_a.publish(delta(run, "live")).await.unwrap();
    assert_eq!(
        next_within(&mut on_b, DEADLINE).await.unwrap().unwrap(),
        second
    );
    close(&config, [host_a, host_b]).await;
}

/// A session room follows at most `Config::max_followed_runs_per_session`
/// live runs: with a bound of 1 on host B, the second run host A writes in
/// the session is not followed live and is counted; B's session subscriber
/// still gets the first run whole, in order, and a subscriber that catches
/// up from the log gets both runs whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_room_follows_at_most_the_configured_runs_and_counts_the_rest() {
    let config = nats_config();
    let Some(host_a) = open_hub(&config).await else {
        return;
    };
    let host_b = EventHub::open(Config::nats(config.clone()).max_followed_runs_per_session(1))
        .await
        .unwrap();
    let session = Uuid::now_v7();
    let room = RuntimeRoom::Session(session);
    let mut live = host_b
        .subscribe(room.clone(), Resume::FromStart)
        .await
        .unwrap();
    let (first, second) = (RunId::new(), RunId::new());
    host_a.publish(started(first, Some(session))).await.unwrap();
    // The first run is followed before the second joins.
    let opening = next_within(&mut live, DEADLINE).await.unwrap().unwrap();
    assert_eq!((opening.run_id, opening.seq), (first, 1));
    host_a
        .publish(started(second, Some(session)))
        .await
        .unwrap();
    for i in 0..5 {
        host_a.publish(delta(first, &i.to_string())).await.unwrap();
        host_a.publish(delta(second, &i.to_string())).await.unwrap();
    }
    // The first run is still live (and followed) when B's room learns of
    // the second: the bound leaves it unfollowed.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while host_b.stats().await.unwrap().session_runs_unfollowed < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "host B never counted the run past its bound"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host_a.publish(completed(first)).await.unwrap();
    host_a.publish(completed(second)).await.unwrap();
    let mut from_first = vec![opening];
    while !from_first.last().unwrap().is_terminal() {
        let envelope = next_within(&mut live, DEADLINE).await.unwrap().unwrap();
        if envelope.run_id == first {
            from_first.push(envelope);
        }
    }
    assert_eq!(from_first, host_a.replay(first, 0, 100).await.unwrap());

    let mut caught_up = host_a
        .subscribe(room.clone(), Resume::FromStart)
        .await
        .unwrap();
    let mut cursor = Cursor::new(host_a.epoch());
    let by_run = read_runs_to_end(&mut caught_up, &[first, second], 0, &mut cursor).await;
    assert_eq!(by_run[0], host_a.replay(first, 0, 100).await.unwrap());
    assert_eq!(by_run[1], host_a.replay(second, 0, 100).await.unwrap());
    close(&config, [host_a, host_b]).await;
}
