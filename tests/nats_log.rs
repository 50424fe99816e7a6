//! The JetStream run log against a real NATS server (127.0.0.1:4222, or
//! `BEHEST_STREAM_NATS_URL`): reads by seq, idempotent retries, a second
//! writer fenced off. Each test works in a stream of its own and deletes it.
//! Without a server the tests print why and pass, unless
//! `BEHEST_STREAM_REQUIRE_NATS=1` (CI), when they fail.

#![cfg(feature = "nats")]

mod common;

use async_nats::jetstream::{self, message::PublishMessage};
use behest_stream::nats::{NatsConfig, NatsLog};
use behest_stream::{RunId, RuntimeEventEnvelope, StoreError};
use common::{envelope, terminal};

/// A log in a fresh stream, or `None` (reason printed) without a server.
async fn open_log(max_event_bytes: Option<usize>) -> Option<(NatsLog, NatsConfig)> {
    let mut config = common::nats::fresh_config();
    if let Some(bytes) = max_event_bytes {
        config.max_event_bytes = bytes;
    }
    let log = common::nats::or_skip(NatsLog::open(&config).await)?;
    Some((log, config))
}

async fn context(config: &NatsConfig) -> jetstream::Context {
    jetstream::new(async_nats::connect(config.url.as_str()).await.unwrap())
}

fn run_of(n: u64, run_id: RunId) -> Vec<RuntimeEventEnvelope> {
    (1..n)
        .map(|seq| envelope(run_id, None, seq))
        .chain([terminal(run_id, None, n)])
        .collect()
}

fn seqs(envelopes: &[RuntimeEventEnvelope]) -> Vec<u64> {
    envelopes.iter().map(|e| e.seq).collect()
}

/// Two runs written alternately (so stream sequences and seqs differ): each
/// reads back whole and from any seq, equal to what was appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_read_back_from_any_seq_with_runs_interleaved() {
    let Some((log, config)) = open_log(None).await else {
        return;
    };
    let (a, b) = (RunId::new(), RunId::new());
    let (run_a, run_b) = (run_of(40, a), run_of(40, b));
    let (mut writer_a, mut writer_b) = (log.writer(a).await.unwrap(), log.writer(b).await.unwrap());
    for (ea, eb) in run_a.iter().zip(&run_b) {
        writer_a.append(ea).await.unwrap();
        writer_b.append(eb).await.unwrap();
    }
    for (after, limit) in [
        (0, 100),
        (0, 7),
        (1, 5),
        (17, 100),
        (38, 100),
        (39, 1),
        (40, 10),
    ] {
        let page = log.list_after(a, after, limit).await.unwrap();
        let want: Vec<_> = run_a
            .iter()
            .skip(after as usize)
            .take(limit)
            .cloned()
            .collect();
        assert_eq!(page, want, "run a after {after} limit {limit}");
    }
    assert_eq!(log.list_after(b, 0, 100).await.unwrap(), run_b);
    let tail = log.tail(a).await.unwrap().unwrap();
    assert_eq!((tail.last_seq, tail.ended), (40, true));
    assert!(log.tail(RunId::new()).await.unwrap().is_none());
    assert!(
        log.list_after(RunId::new(), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    common::nats::delete_stream(&config).await;
}

/// The server stored an append whose acknowledgement the writer never got
/// (written here with a raw client, with the headers the writer sends), and
/// other runs moved the stream on meanwhile: appending the same envelope
/// again succeeds and it is stored once; the writer goes on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_acknowledgement_is_stored_once() {
    let Some((log, config)) = open_log(None).await else {
        return;
    };
    let run = RunId::new();
    let envelopes = run_of(6, run);
    let mut writer = log.writer(run).await.unwrap();
    for e in &envelopes[..3] {
        writer.append(e).await.unwrap();
    }
    let js = context(&config).await;
    let lost = &envelopes[3];
    let expected = log.tail(run).await.unwrap().unwrap().stream_seq;
    let message = PublishMessage::build()
        .payload(behest_stream::codec::encode_envelope(lost).unwrap().into())
        .message_id(lost.event_id.to_string().as_str())
        .header("Behest-Seq", "4")
        .expected_last_subject_sequence(expected);
    js.send_publish(log.subject(run), message)
        .await
        .unwrap()
        .await
        .unwrap();
    let other = log.subject(RunId::new());
    js.publish(other, "noise".into())
        .await
        .unwrap()
        .await
        .unwrap();

    writer.append(lost).await.unwrap();
    for e in &envelopes[4..] {
        writer.append(e).await.unwrap();
    }
    assert_eq!(log.list_after(run, 0, 100).await.unwrap(), envelopes);
    common::nats::delete_stream(&config).await;
}

/// Two writers of one run (two hosts): whoever appends second with a stale
/// view is refused with `RunFenced`, and nothing of its is stored; also when
/// both start on a run that has no events yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_fenced_off_and_stores_nothing() {
    let Some((log, config)) = open_log(None).await else {
        return;
    };
    let run = RunId::new();
    let mut first = log.writer(run).await.unwrap();
    let mut second = log.writer(run).await.unwrap();
    let ours = envelope(run, None, 1);
    first.append(&ours).await.unwrap();
    match second.append(&envelope(run, None, 1)).await {
        Err(StoreError::RunFenced { run_id, last_seq }) => assert_eq!((run_id, last_seq), (run, 1)),
        other => panic!("expected RunFenced, got {other:?}"),
    }
    first.append(&envelope(run, None, 2)).await.unwrap();
    // The fenced writer learned where the log ends, but still does not own
    // the run: its next append is refused too.
    match second.append(&envelope(run, None, 2)).await {
        Err(StoreError::SeqConflict { expected: 2, .. } | StoreError::RunFenced { .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    let stored = log.list_after(run, 0, 10).await.unwrap();
    assert_eq!(seqs(&stored), vec![1, 2]);
    assert_eq!(stored[0].event_id, ours.event_id);
    common::nats::delete_stream(&config).await;
}

/// Refusals store nothing: a gap, an event after the terminal one, an
/// oversized event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_store_nothing() {
    let Some((log, config)) = open_log(Some(4096)).await else {
        return;
    };
    let run = RunId::new();
    let mut writer = log.writer(run).await.unwrap();
    writer.append(&envelope(run, None, 1)).await.unwrap();
    assert!(matches!(
        writer.append(&envelope(run, None, 3)).await,
        Err(StoreError::SeqConflict {
            expected: 2,
            got: 3,
            ..
        })
    ));
    let mut big = envelope(run, None, 2);
    big.event = common::delta(run, &"x".repeat(10_000));
    assert!(matches!(
        writer.append(&big).await,
        Err(StoreError::TooLarge { limit: 4096, .. })
    ));
    writer.append(&terminal(run, None, 2)).await.unwrap();
    assert!(matches!(
        writer.append(&envelope(run, None, 3)).await,
        Err(StoreError::RunClosed { .. })
    ));
    // A writer opened later sees the run ended too.
    let mut later = log.writer(run).await.unwrap();
    assert!(matches!(
        later.append(&envelope(run, None, 3)).await,
        Err(StoreError::RunClosed { .. })
    ));
    assert_eq!(seqs(&log.list_after(run, 0, 10).await.unwrap()), vec![1, 2]);
    common::nats::delete_stream(&config).await;
}

/// An envelope whose event names another run (`envelope.run_id` is not
/// `envelope.event.run_id()`) is refused by the log's writer and by a
/// `Store` on the log, with an error naming both runs; nothing is stored
/// under either run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_whose_event_names_another_run_is_refused_by_the_log() {
    let Some((log, config)) = open_log(None).await else {
        return;
    };
    let (run, other) = (RunId::new(), RunId::new());
    let stray = || {
        let mut stray = envelope(other, None, 1);
        stray.run_id = run;
        stray
    };
    let mut writer = log.writer(run).await.unwrap();
    let by_writer = writer.append(&stray()).await;
    let store = behest_stream::Store::open(behest_stream::Config::nats(config.clone()))
        .await
        .unwrap();
    let by_store = store.append(vec![stray()]).await;
    for refused in [by_writer, by_store] {
        common::assert_run_mismatch(refused, run, other);
    }
    for id in [run, other] {
        assert!(log.list_after(id, 0, 10).await.unwrap().is_empty());
        assert!(log.tail(id).await.unwrap().is_none());
    }
    store.close().await.unwrap();
    common::nats::delete_stream(&config).await;
}

/// A stream that already exists with limits (which would delete a run's
/// events, or the epoch, without a tombstone) or without direct gets is
/// refused with an error naming it, not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsuitable_streams_are_refused() {
    let config = common::nats::fresh_config();
    let Some(js) =
        common::nats::or_skip(async_nats::connect(config.url.as_str()).await).map(jetstream::new)
    else {
        return;
    };
    let subjects = vec![
        format!("{}.run.*", config.prefix),
        format!("{}.session.*", config.prefix),
        format!("{}.meta", config.prefix),
    ];
    for (limited, direct) in [(true, true), (false, false)] {
        js.create_stream(jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: subjects.clone(),
            max_age: if limited {
                std::time::Duration::from_secs(3600)
            } else {
                std::time::Duration::ZERO
            },
            allow_direct: direct,
            ..Default::default()
        })
        .await
        .unwrap();
        let error = NatsLog::open(&config).await.unwrap_err().to_string();
        assert!(error.contains(&config.stream), "{error}");
        common::nats::delete_stream(&config).await;
    }
}

/// CI runs these tests against two servers, naming each one's version in
/// `BEHEST_STREAM_NATS_VERSION`: the server the tests reach must be the one
/// named, or the second run would quietly test the first server again.
#[tokio::test]
async fn the_server_is_the_version_ci_names() {
    let Some(expected) = std::env::var("BEHEST_STREAM_NATS_VERSION")
        .ok()
        .filter(|version| !version.is_empty())
    else {
        return;
    };
    let Some(client) = common::nats::or_skip(async_nats::connect(common::nats::url()).await) else {
        return;
    };
    assert_eq!(
        client.server_info().version,
        expected,
        "server at {}",
        common::nats::url()
    );
}
