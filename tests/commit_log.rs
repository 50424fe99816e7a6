//! The commit log: commits write commit records, compaction turns them into
//! segments, and an open compacts what a crash left. Driven through the
//! public store and the real sled files.

mod common;

use behest_stream::codec::{self, FORMAT_VERSION};
use behest_stream::{Config, OpenError, RunId, Store};
use common::envelope;

/// A commit record as the store writes it (see `src/store/sled/commit_log.rs`):
/// the version byte, then per run its id, first seq, count, and each
/// envelope's length and bytes.
fn record(run: RunId, seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(run.as_uuid().as_bytes());
    out.extend_from_slice(&seqs.start().to_be_bytes());
    out.extend_from_slice(&((seqs.end() - seqs.start() + 1) as u32).to_be_bytes());
    for seq in seqs {
        let bytes = codec::encode_envelope(&envelope(run, None, seq)).unwrap();
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

fn record_key(number: u64) -> Vec<u8> {
    let mut key = vec![b'w'];
    key.extend_from_slice(&number.to_be_bytes());
    key
}

/// More commits than the log keeps: reads see the compacted segments and
/// the records after them as one gapless run, and a reopen sees the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_span_compacted_segments_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    // One commit each: past the 512 records that force a compaction.
    for seq in 1..=600 {
        store.append(vec![envelope(run, None, seq)]).await.unwrap();
    }
    let check = |got: Vec<behest_stream::RuntimeEventEnvelope>, from: u64| {
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (from..=600).collect::<Vec<_>>());
    };
    check(store.list_after(run, 0, usize::MAX).await.unwrap(), 1);
    // From inside the segments, and from inside the log.
    check(store.list_after(run, 500, usize::MAX).await.unwrap(), 501);
    check(store.list_after(run, 580, usize::MAX).await.unwrap(), 581);
    assert_eq!(store.list_after(run, 510, 3).await.unwrap()[2].seq, 513);
    assert_eq!(store.run_info(run).await.unwrap().unwrap().last_seq, 600);
    let verified = store.verify_run(run).await.unwrap();
    assert_eq!(verified.events, 600);
    // The next append must follow the log's last seq, not the segments'.
    let stale = store.append(vec![envelope(run, None, 513)]).await;
    assert!(stale.is_err(), "{stale:?}");
    store.close().await.unwrap();

    // Closing compacted everything: no record is left.
    let db = common::open_sled(dir.path());
    assert!(db.scan_prefix(b"w").next().is_none());
    common::close_sled(db, dir.path());
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    check(store.list_after(run, 0, usize::MAX).await.unwrap(), 1);
    store.close().await.unwrap();
}

/// Records a crash left (planted here as a crash leaves them) are compacted
/// at open: their events are readable, in order after the run's segments,
/// and the next append follows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_compacts_the_records_a_crash_left() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (RunId::new(), RunId::new());
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    store
        .append((1..=3).map(|seq| envelope(old, None, seq)).collect())
        .await
        .unwrap();
    store.close().await.unwrap();

    let db = common::open_sled(dir.path());
    db.insert(record_key(7), record(old, 4..=5)).unwrap();
    let mut two_runs = record(new, 1..=2);
    two_runs.extend_from_slice(&record(old, 6..=6)[1..]);
    db.insert(record_key(8), two_runs).unwrap();
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let seqs = |envelopes: Vec<behest_stream::RuntimeEventEnvelope>| -> Vec<u64> {
        envelopes.iter().map(|e| e.seq).collect()
    };
    assert_eq!(
        seqs(store.list_after(old, 0, usize::MAX).await.unwrap()),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        seqs(store.list_after(new, 0, usize::MAX).await.unwrap()),
        vec![1, 2]
    );
    store.append(vec![envelope(old, None, 7)]).await.unwrap();
    assert_eq!(store.verify_run(old).await.unwrap().events, 7);
    store.close().await.unwrap();

    let db = common::open_sled(dir.path());
    assert!(db.scan_prefix(b"w").next().is_none(), "records compacted");
    common::close_sled(db, dir.path());
}

/// A damaged record holds acknowledged events the store cannot read: it
/// does not open, and says which record and why; nothing is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_refuses_the_open_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    store.append(vec![envelope(run, None, 1)]).await.unwrap();
    store.close().await.unwrap();

    let mut damaged = record(run, 2..=3);
    damaged.truncate(damaged.len() - 5);
    let db = common::open_sled(dir.path());
    db.insert(record_key(3), damaged.clone()).unwrap();
    common::close_sled(db, dir.path());

    let error = Store::open(Config::new(dir.path())).await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, OpenError::NotAStore { .. }), "{error:?}");
    assert!(text.contains("commit record 3"), "{text}");
    assert!(text.contains("truncated"), "{text}");

    let db = common::open_sled(dir.path());
    assert_eq!(
        db.get(record_key(3)).unwrap().as_deref(),
        Some(damaged.as_slice())
    );
    common::close_sled(db, dir.path());
}

/// A large part of a commit is written as segments at once, a small one
/// goes to the log, and a large one while the log holds the run goes to the
/// log too: whichever way each went, the run reads back whole and in order,
/// before and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_small_appends_interleave_into_one_gapless_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let batch = |seqs: std::ops::RangeInclusive<u64>| -> Vec<_> {
        seqs.map(|seq| envelope(run, None, seq)).collect()
    };
    store.append(batch(1..=40)).await.unwrap();
    for seq in 41..=43 {
        store.append(batch(seq..=seq)).await.unwrap();
    }
    store.append(batch(44..=83)).await.unwrap();
    let all: Vec<u64> = (1..=83).collect();
    let read = |got: Vec<behest_stream::RuntimeEventEnvelope>| -> Vec<u64> {
        got.iter().map(|e| e.seq).collect()
    };
    assert_eq!(
        read(store.list_after(run, 0, usize::MAX).await.unwrap()),
        all
    );
    assert_eq!(
        read(store.list_after(run, 39, 3).await.unwrap()),
        vec![40, 41, 42]
    );
    assert_eq!(store.verify_run(run).await.unwrap().events, 83);
    store.close().await.unwrap();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    assert_eq!(
        read(store.list_after(run, 0, usize::MAX).await.unwrap()),
        all
    );
    store.append(batch(84..=84)).await.unwrap();
    store.close().await.unwrap();
}

/// A commit that wrote a run's logged envelopes as segments leaves their
/// records until compaction; after a crash, the open skips what the
/// segments already hold and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_skips_what_the_segments_already_hold() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    store
        .append((1..=40).map(|seq| envelope(run, None, seq)).collect())
        .await
        .unwrap();
    store.close().await.unwrap();

    // As a crash leaves them: seqs 1..=2 were logged, then went into the
    // segment with a large append (their record stays until compaction),
    // then 41..=42 were logged after it.
    let db = common::open_sled(dir.path());
    db.insert(record_key(0), record(run, 1..=2)).unwrap();
    db.insert(record_key(1), record(run, 41..=42)).unwrap();
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let seqs: Vec<u64> = store
        .list_after(run, 0, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=42).collect::<Vec<_>>());
    assert_eq!(store.verify_run(run).await.unwrap().events, 42);
    store.close().await.unwrap();
}
