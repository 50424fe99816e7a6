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

/// Whether the server CI names in `BEHEST_STREAM_NATS_VERSION` takes atomic
/// batches (nats-server 2.12 and later); `None` when none is named.
fn named_server_takes_batches() -> Option<bool> {
    let version = std::env::var("BEHEST_STREAM_NATS_VERSION")
        .ok()
        .filter(|version| !version.is_empty())?;
    let mut parts = version
        .trim_start_matches('v')
        .split('.')
        .map(|part| part.parse::<u64>().unwrap());
    Some((parts.next().unwrap(), parts.next().unwrap()) >= (2, 12))
}

/// A log in a fresh stream on a server that takes atomic batches; `None`
/// (reason printed) without a server, or on an older one (CI's 2.9, whose
/// run of a batch test has nothing to check; the newer one's must not come
/// this way).
async fn open_batch_log() -> Option<(NatsLog, NatsConfig)> {
    let (log, config) = open_log(None).await?;
    if log.appends_in_batches() {
        return Some((log, config));
    }
    assert_ne!(named_server_takes_batches(), Some(true));
    eprintln!("skipping: the server takes no atomic batches (nats-server before 2.12)");
    common::nats::delete_stream(&config).await;
    None
}

/// The `Nats-Batch-Id` of each of the run's stored messages, in order.
async fn stored_batch_ids(config: &NatsConfig, log: &NatsLog, run: RunId) -> Vec<Option<String>> {
    let stream = context(config)
        .await
        .get_stream(&config.stream)
        .await
        .unwrap();
    let mut ids = Vec::new();
    let mut from = 1;
    while let Ok(message) = stream
        .direct_get_next_for_subject(log.subject(run), Some(from))
        .await
    {
        ids.push(
            message
                .headers
                .get("Nats-Batch-Id")
                .map(|id| id.as_str().to_owned()),
        );
        from = message.sequence + 1;
    }
    ids
}

/// A writer appends what it is given as atomic batches exactly where the
/// server takes them (CI names each server's version), and not when
/// configured off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_version_decides_whether_appends_go_in_batches() {
    let Some((log, config)) = open_log(None).await else {
        return;
    };
    if let Some(expected) = named_server_takes_batches() {
        assert_eq!(log.appends_in_batches(), expected);
    }
    let mut off = config.clone();
    off.atomic_batches = false;
    assert!(!NatsLog::open(&off).await.unwrap().appends_in_batches());
    common::nats::delete_stream(&config).await;
}

/// A batch is stored in order, as one batch where the server takes them; a
/// second writer's batch for the same seqs (other events) is fenced off and
/// stores nothing of its; the run goes on in a second batch, to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_in_order_and_a_stale_writers_batch_stores_nothing() {
    let Some((log, config)) = open_log(None).await else {
        return;
    };
    let run = RunId::new();
    let envelopes = run_of(12, run);
    let theirs = run_of(12, run);
    let mut ours = log.writer(run).await.unwrap();
    let mut stale = log.writer(run).await.unwrap();
    ours.append_batch(&envelopes[..5]).await.unwrap();
    match stale.append_batch(&theirs[..3]).await {
        Err(StoreError::RunFenced { run_id, last_seq }) => assert_eq!((run_id, last_seq), (run, 5)),
        other => panic!("expected RunFenced, got {other:?}"),
    }
    assert_eq!(log.list_after(run, 0, 100).await.unwrap(), envelopes[..5]);
    ours.append_batch(&envelopes[5..]).await.unwrap();
    assert!(matches!(
        ours.append_batch(&run_of(14, run)[12..]).await,
        Err(StoreError::RunClosed { .. })
    ));
    assert_eq!(log.list_after(run, 0, 100).await.unwrap(), envelopes);
    let batches = stored_batch_ids(&config, &log, run).await;
    assert_eq!(batches.len(), 12);
    if log.appends_in_batches() {
        let first = batches[0].clone().expect("stored as a batch");
        let second = batches[5].clone().expect("stored as a batch");
        assert_ne!(first, second);
        assert!(batches[..5].iter().all(|id| id.as_deref() == Some(&first)));
        assert!(batches[5..].iter().all(|id| id.as_deref() == Some(&second)));
    } else {
        assert!(batches.iter().all(Option::is_none));
    }
    common::nats::delete_stream(&config).await;
}

/// A batch the server stored but whose acknowledgement the writer never got
/// (published here with a raw client, with the headers the writer sends),
/// while other runs moved the stream on: appending the same batch again
/// succeeds, stores it once, and the writer goes on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_lost_acknowledgement_is_stored_once() {
    let Some((log, config)) = open_batch_log().await else {
        return;
    };
    let run = RunId::new();
    let envelopes = run_of(9, run);
    let mut writer = log.writer(run).await.unwrap();
    writer.append_batch(&envelopes[..3]).await.unwrap();
    let client = async_nats::connect(config.url.as_str()).await.unwrap();
    let expected = log.tail(run).await.unwrap().unwrap().stream_seq;
    let lost = &envelopes[3..6];
    for (i, envelope) in lost.iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.event_id.to_string().as_str());
        headers.insert("Behest-Seq", envelope.seq.to_string().as_str());
        headers.insert("Nats-Batch-Id", "lost-ack");
        headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        if i == 0 {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                expected.to_string().as_str(),
            );
        }
        let payload = behest_stream::codec::encode_envelope(envelope).unwrap();
        if i + 1 == lost.len() {
            headers.insert("Nats-Batch-Commit", "1");
            let reply = client
                .request_with_headers(log.subject(run), headers, payload.into())
                .await
                .unwrap();
            let reply = String::from_utf8_lossy(&reply.payload).into_owned();
            assert!(reply.contains("\"count\":3"), "{reply}");
        } else {
            client
                .publish_with_headers(log.subject(run), headers, payload.into())
                .await
                .unwrap();
        }
    }
    context(&config)
        .await
        .publish(log.subject(RunId::new()), "noise".into())
        .await
        .unwrap()
        .await
        .unwrap();

    writer.append_batch(lost).await.unwrap();
    writer.append_batch(&envelopes[6..]).await.unwrap();
    assert_eq!(log.list_after(run, 0, 100).await.unwrap(), envelopes);
    common::nats::delete_stream(&config).await;
}

/// A stream whose batches were turned off after the log opened refuses the
/// writer's batch whole; the writer then appends the same envelopes one at
/// a time, and all of them are stored, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_server_refuses_goes_one_envelope_at_a_time() {
    let Some((log, config)) = open_batch_log().await else {
        return;
    };
    let js = context(&config).await;
    let mut stream = js.get_stream(&config.stream).await.unwrap();
    let mut settings = stream.info().await.unwrap().config.clone();
    settings.allow_atomic_publish = false;
    js.update_stream(settings).await.unwrap();

    let run = RunId::new();
    let envelopes = run_of(8, run);
    let mut writer = log.writer(run).await.unwrap();
    writer.append_batch(&envelopes).await.unwrap();
    assert_eq!(log.list_after(run, 0, 100).await.unwrap(), envelopes);
    assert!(
        stored_batch_ids(&config, &log, run)
            .await
            .iter()
            .all(Option::is_none)
    );
    common::nats::delete_stream(&config).await;
}

/// A call whose appends all landed but whose outcome the writer did not
/// learn (in doubt): appending the same envelopes again succeeds, stores
/// nothing twice, and the writer goes on. The call spans more than one
/// batch (1,000 messages at most) or, on servers without batches, more
/// than one message: what the attempt in doubt stored is learned for all
/// of the call, not for its first batch only.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_retried_in_doubt_learns_everything_it_stored() {
    let Some((log, config)) = open_log(None).await else {
        return;
    };
    let run = RunId::new();
    let envelopes = run_of(1_300, run);
    let mut writer = log.writer(run).await.unwrap();
    writer.append_batch(&envelopes[..1_200]).await.unwrap();
    writer.assume_in_doubt();
    writer.append_batch(&envelopes[..1_200]).await.unwrap();
    writer.append_batch(&envelopes[1_200..]).await.unwrap();
    let stored = log.list_after(run, 0, 2_000).await.unwrap();
    assert_eq!(seqs(&stored), (1..=1_300).collect::<Vec<_>>());
    assert_eq!(stored, envelopes);

    // In doubt, but what is stored at those seqs is another writer's:
    // fenced, and nothing of the retry is stored.
    let second = RunId::new();
    let theirs = run_of(3, second);
    log.writer(second)
        .await
        .unwrap()
        .append_batch(&theirs)
        .await
        .unwrap();
    let mut stale = log.writer(second).await.unwrap();
    stale.assume_in_doubt();
    match stale.append_batch(&run_of(3, second)).await {
        Err(StoreError::RunFenced { last_seq: 3, .. }) => {}
        other => panic!("expected RunFenced, got {other:?}"),
    }
    assert_eq!(log.list_after(second, 0, 10).await.unwrap(), theirs);
    common::nats::delete_stream(&config).await;
}
