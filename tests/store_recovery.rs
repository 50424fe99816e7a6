//! Reopening a store returns exactly what was acknowledged before.

mod common;

use behest_stream::{Config, Durability, RunId, Store, StoreError};
use common::{envelope, terminal};
use uuid::Uuid;

/// Every event of several runs comes back after a reopen, in seq order, with
/// the same event ids, and the run records (last seq, session, provider,
/// end) and session index survive too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopened_store_lists_every_event_in_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let session = Uuid::now_v7();
    let runs: Vec<RunId> = (0..5).map(|_| RunId::new()).collect();
    let mut written = Vec::new();
    let epoch;
    {
        let store = Store::open(Config::new(dir.path())).await.unwrap();
        epoch = store.epoch();
        for (i, run) in runs.iter().enumerate() {
            let count = 10 + i as u64 * 7;
            let mut log: Vec<_> = (1..count)
                .map(|seq| envelope(*run, Some(session), seq))
                .collect();
            if i % 2 == 0 {
                log.push(terminal(*run, Some(session), count));
            }
            // Append in chunks of uneven size so runs span several segments.
            for chunk in log.chunks(3 + i) {
                store.append(chunk.to_vec()).await.unwrap();
            }
            written.push(log);
        }
        store.close().await.unwrap();
    }

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    assert_eq!(
        store.epoch(),
        epoch,
        "the epoch is minted once, at creation"
    );
    for (i, (run, log)) in runs.iter().zip(&written).enumerate() {
        let back = store.list_after(*run, 0, 10_000).await.unwrap();
        assert_eq!(&back, log, "run {i} replays exactly what was written");
        // A page from the middle, crossing segment boundaries.
        let page = store.list_after(*run, 4, 5).await.unwrap();
        assert_eq!(page, log[4..9].to_vec());
        let info = store.run_info(*run).await.unwrap().unwrap();
        assert_eq!(info.last_seq, log.len() as u64);
        assert_eq!(info.session_id, Some(session));
        assert_eq!(info.provider.as_ref().map(|p| p.as_str()), Some("acme"));
        assert_eq!(info.is_ended(), i % 2 == 0);
    }
    assert_eq!(
        store.session_runs(session).await.unwrap(),
        runs,
        "runs in start order"
    );
    assert_eq!(store.run_info(RunId::new()).await.unwrap(), None);
    assert!(
        store
            .list_after(RunId::new(), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The recovered log continues where it left off: the next seq is
    // accepted, a reused one is refused, and ended runs stay closed.
    let open_run = runs[1];
    let next = written[1].len() as u64 + 1;
    let reused = store
        .append(vec![envelope(open_run, Some(session), next - 1)])
        .await;
    assert!(
        matches!(reused, Err(StoreError::SeqConflict { expected, got, .. }) if expected == next && got == next - 1)
    );
    store
        .append(vec![envelope(open_run, Some(session), next)])
        .await
        .unwrap();
    let ended = store
        .append(vec![envelope(
            runs[0],
            Some(session),
            written[0].len() as u64 + 1,
        )])
        .await;
    assert!(matches!(ended, Err(StoreError::RunClosed { run_id }) if run_id == runs[0]));
    store.close().await.unwrap();
}

/// A gap, a duplicate, or an event after the terminal one is refused and
/// leaves nothing behind; an append is all-or-nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_appends_store_nothing() {
    let store = Store::open(Config::temporary()).await.unwrap();
    let run = RunId::new();
    store
        .append(vec![envelope(run, None, 1), envelope(run, None, 2)])
        .await
        .unwrap();

    let gap = store.append(vec![envelope(run, None, 4)]).await;
    assert!(matches!(
        gap,
        Err(StoreError::SeqConflict {
            expected: 3,
            got: 4,
            ..
        })
    ));
    // Seq 3 is fine, seq 5 is a gap: neither is stored.
    let half = store
        .append(vec![envelope(run, None, 3), envelope(run, None, 5)])
        .await;
    assert!(matches!(
        half,
        Err(StoreError::SeqConflict {
            expected: 4,
            got: 5,
            ..
        })
    ));
    assert_eq!(store.list_after(run, 0, 100).await.unwrap().len(), 2);

    store
        .append_with(
            vec![envelope(run, None, 3), terminal(run, None, 4)],
            Durability::Buffered,
        )
        .await
        .unwrap();
    let after_end = store.append(vec![envelope(run, None, 5)]).await;
    assert!(matches!(after_end, Err(StoreError::RunClosed { .. })));
    let seqs: Vec<u64> = store
        .list_after(run, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    store.close().await.unwrap();
    assert!(matches!(
        store.list_after(run, 0, 1).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.append(vec![envelope(run, None, 5)]).await,
        Err(StoreError::Closed)
    ));
}

/// An event whose encoding exceeds the configured limit is refused before
/// anything is stored, and the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_is_refused_before_storing() {
    let store = Store::open(Config::temporary().max_event_bytes(512))
        .await
        .unwrap();
    let run = RunId::new();
    store.append(vec![envelope(run, None, 1)]).await.unwrap();
    let mut big = envelope(run, None, 2);
    if let behest_stream::AgentEvent::TextDelta(delta) = &mut big.event {
        delta.delta = "x".repeat(1000);
    }
    let refused = store.append(vec![big]).await;
    assert!(matches!(refused, Err(StoreError::TooLarge { size, limit: 512, .. }) if size > 1000));
    store.append(vec![envelope(run, None, 2)]).await.unwrap();
    assert_eq!(store.run_info(run).await.unwrap().unwrap().last_seq, 2);
    store.close().await.unwrap();
}

/// An envelope whose event names another run (`envelope.run_id` is not
/// `envelope.event.run_id()`) is refused by `append` and `append_with`,
/// with an error naming both runs; nothing of its append is stored under
/// either run, and the run takes its first event afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_whose_event_names_another_run_is_refused() {
    let store = Store::open(Config::temporary()).await.unwrap();
    let (run, other) = (RunId::new(), RunId::new());
    let stray = || {
        let mut stray = envelope(other, None, 1);
        stray.run_id = run;
        stray
    };
    let alone = store.append(vec![stray()]).await;
    let beside_a_good_one = store
        .append_with(vec![envelope(run, None, 1), stray()], Durability::Buffered)
        .await;
    for refused in [alone, beside_a_good_one] {
        common::assert_run_mismatch(refused, run, other);
    }
    for id in [run, other] {
        assert!(store.list_after(id, 0, 10).await.unwrap().is_empty());
        assert_eq!(store.run_info(id).await.unwrap(), None);
    }
    store.append(vec![envelope(run, None, 1)]).await.unwrap();
    store.close().await.unwrap();
}
