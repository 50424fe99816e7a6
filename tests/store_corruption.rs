//! Damaged bytes on disk give errors that name what is damaged; nothing
//! panics and undamaged runs keep working.
//!
//! These tests write the store's directory with sled directly, as damage
//! would. The key layout they use is the one documented in ARCHITECTURE.md.

mod common;

use std::path::Path;

use behest_stream::codec::{CodecError, FORMAT_VERSION, STORE_FORMAT_VERSION};
use behest_stream::{Config, OpenError, RunId, Store, StoreError};
use common::envelope;

fn segment_key(run: RunId, first_seq: u64) -> Vec<u8> {
    let mut key = vec![b'e'];
    key.extend_from_slice(run.as_uuid().as_bytes());
    key.extend_from_slice(&first_seq.to_be_bytes());
    key
}

fn run_key(run: RunId) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(run.as_uuid().as_bytes());
    key
}

/// Writes `runs` with events 1..=9 each in segments of three (starting at
/// seqs 1, 4 and 7), and closes the store.
async fn store_with_runs(dir: &Path, runs: &[RunId]) {
    let store = Store::open(Config::new(dir).segment_limits(3, 1 << 20))
        .await
        .unwrap();
    for run in runs {
        for first in [1, 4, 7] {
            let batch = (first..first + 3)
                .map(|seq| envelope(*run, None, seq))
                .collect();
            store.append(batch).await.unwrap();
        }
    }
    store.close().await.unwrap();
}

fn plant(dir: &Path, key: &[u8], value: &[u8]) {
    let db = common::open_sled(dir);
    assert!(
        db.get(key).unwrap().is_some(),
        "the planted key must replace a real record"
    );
    db.insert(key, value).unwrap();
    common::close_sled(db, dir);
}

/// A corrupt segment yields `Corrupt` naming the run and the first seq it
/// cannot read; events before it still read; another run is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_segment_names_run_and_seq_and_spares_other_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (damaged, healthy) = (RunId::new(), RunId::new());
    store_with_runs(dir.path(), &[damaged, healthy]).await;
    plant(
        dir.path(),
        &segment_key(damaged, 4),
        &[FORMAT_VERSION, 0x93, 0xc1, 0xc1, 0xc1],
    );

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let error = store.list_after(damaged, 0, 100).await.unwrap_err();
    assert!(
        matches!(error, StoreError::Corrupt { run_id, seq: 4, .. } if run_id == damaged),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&damaged.to_string()) && message.contains("seq 4"),
        "{message}"
    );
    // What precedes the damage reads; what follows it cannot be skipped to.
    let before: Vec<u64> = store
        .list_after(damaged, 0, 3)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(before, vec![1, 2, 3]);
    assert!(store.list_after(damaged, 7, 100).await.is_ok());
    let healthy_seqs: Vec<u64> = store
        .list_after(healthy, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(healthy_seqs, (1..=9).collect::<Vec<_>>());
    store
        .append(vec![envelope(healthy, None, 10)])
        .await
        .unwrap();
    store.close().await.unwrap();
}

/// A segment of an unknown format version is named as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_of_unknown_version_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    store_with_runs(dir.path(), &[run]).await;
    plant(
        dir.path(),
        &segment_key(run, 7),
        &[FORMAT_VERSION + 41, 0x90],
    );

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let error = store.list_after(run, 6, 100).await.unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::Corrupt { seq: 7, source: CodecError::UnknownVersion { found }, .. }
                if found == FORMAT_VERSION + 41
        ),
        "{error:?}"
    );
    store.close().await.unwrap();
}

/// A segment whose envelopes are not the seqs its key promises (a record
/// moved or duplicated on disk) is caught, not served as a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misplaced_segment_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    store_with_runs(dir.path(), &[run]).await;
    let db = common::open_sled(dir.path());
    let first = db.get(segment_key(run, 1)).unwrap().unwrap();
    db.insert(segment_key(run, 4), first).unwrap();
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let error = store.list_after(run, 0, 100).await.unwrap_err();
    assert!(
        matches!(error, StoreError::Corrupt { seq: 4, .. }),
        "{error:?}"
    );
    store.close().await.unwrap();
}

/// A corrupt run record fails reads of and appends to that run with
/// `CorruptRunRecord`, storing nothing; other runs keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_run_record_fails_only_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let (damaged, healthy) = (RunId::new(), RunId::new());
    store_with_runs(dir.path(), &[damaged, healthy]).await;
    plant(dir.path(), &run_key(damaged), &[FORMAT_VERSION, 0xff, 0x00]);

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let info = store.run_info(damaged).await.unwrap_err();
    assert!(
        matches!(info, StoreError::CorruptRunRecord { run_id, .. } if run_id == damaged),
        "{info:?}"
    );
    let append = store
        .append(vec![envelope(damaged, None, 10)])
        .await
        .unwrap_err();
    assert!(
        matches!(append, StoreError::CorruptRunRecord { .. }),
        "{append:?}"
    );
    // The events themselves are intact and still readable.
    assert_eq!(store.list_after(damaged, 0, 100).await.unwrap().len(), 9);
    store
        .append(vec![envelope(healthy, None, 10)])
        .await
        .unwrap();
    assert_eq!(store.run_info(healthy).await.unwrap().unwrap().last_seq, 10);
    store.close().await.unwrap();
}

/// The run record is written when a run starts and when its metadata
/// changes, not at every commit; reads take the last seq from where the
/// segments end. An ended run's record holds its final seq, so a lost tail
/// segment is reported as damage instead of read as a shorter run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_tail_of_an_ended_run_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (ended, live) = (RunId::new(), RunId::new());
    store_with_runs(dir.path(), &[live]).await;
    let store = Store::open(Config::new(dir.path()).segment_limits(3, 1 << 20))
        .await
        .unwrap();
    store
        .append((1..=3).map(|seq| envelope(ended, None, seq)).collect())
        .await
        .unwrap();
    store
        .append(vec![
            envelope(ended, None, 4),
            common::terminal(ended, None, 5),
        ])
        .await
        .unwrap();
    store.close().await.unwrap();

    let db = common::open_sled(dir.path());
    // Three commits of the live run, one record write: the record still
    // counts the first commit's three events.
    let record = db.get(run_key(live)).unwrap().unwrap();
    let record: serde_json::Value = rmp_serde::from_slice(&record[1..]).unwrap();
    assert_eq!(record["last_seq"], 3, "{record}");
    // Lose the ended run's last segment, as damage would.
    assert!(db.remove(segment_key(ended, 4)).unwrap().is_some());
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    assert_eq!(store.run_info(live).await.unwrap().unwrap().last_seq, 9);
    let error = store.run_info(ended).await.unwrap_err();
    assert!(
        matches!(error, StoreError::Corrupt { run_id, seq: 4, .. } if run_id == ended),
        "{error:?}"
    );
    // Appending to it fails the same way, storing nothing.
    let append = store
        .append(vec![envelope(ended, None, 4)])
        .await
        .unwrap_err();
    assert!(matches!(append, StoreError::Corrupt { .. }), "{append:?}");
    store.close().await.unwrap();
}

/// A store whose metadata carries another format version refuses to open,
/// naming the path and both versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_store_format_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    store_with_runs(dir.path(), &[RunId::new()]).await;
    let db = common::open_sled(dir.path());
    let mut meta = db.get(b"mstore").unwrap().unwrap().to_vec();
    meta[0] = 9;
    db.insert(b"mstore", meta).unwrap();
    common::close_sled(db, dir.path());

    let error = Store::open(Config::new(dir.path())).await.unwrap_err();
    assert!(
        matches!(error, OpenError::UnsupportedFormat { found: 9, supported, .. } if supported == FORMAT_VERSION),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains(&dir.path().display().to_string())
    );
}

/// A sled database that is not a behest-stream store is refused, unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_database_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::open_sled(dir.path());
    db.insert(b"someone else's", b"data").unwrap();
    common::close_sled(db, dir.path());

    let error = Store::open(Config::new(dir.path())).await.unwrap_err();
    assert!(matches!(error, OpenError::NotAStore { .. }), "{error:?}");
    let db = common::open_sled(dir.path());
    assert_eq!(db.len(), 1, "a refused open changes nothing");
}

/// `verify_run` reads a run whole: a healthy run reports its events and
/// segments; a damaged segment and a missing one are each named by seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_run_reads_every_segment_and_names_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (healthy, garbled, holed) = (RunId::new(), RunId::new(), RunId::new());
    store_with_runs(dir.path(), &[healthy, garbled, holed]).await;
    plant(
        dir.path(),
        &segment_key(garbled, 4),
        &[FORMAT_VERSION, 0x93, 0xc1, 0xc1, 0xc1],
    );
    let db = common::open_sled(dir.path());
    assert!(db.remove(segment_key(holed, 4)).unwrap().is_some());
    common::close_sled(db, dir.path());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let check = store.verify_run(healthy).await.unwrap();
    assert_eq!((check.events, check.segments), (9, 3));
    assert!(check.bytes > 0);
    let error = store.verify_run(garbled).await.unwrap_err();
    assert!(
        matches!(error, StoreError::Corrupt { run_id, seq: 4, .. } if run_id == garbled),
        "{error:?}"
    );
    let error = store.verify_run(holed).await.unwrap_err();
    assert!(
        matches!(error, StoreError::Corrupt { run_id, seq: 4, .. } if run_id == holed),
        "{error:?}"
    );
    store.close().await.unwrap();
}

/// `runs_after` pages through every run in run id order, each with its
/// last seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_page_in_run_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs: Vec<RunId> = (0..5).map(|_| RunId::new()).collect();
    store_with_runs(dir.path(), &runs).await;
    runs.sort_by_key(|r| r.as_uuid());

    let store = Store::open(Config::new(dir.path())).await.unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.runs_after(after, 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.run_id);
        for info in &page {
            assert_eq!(info.last_seq, 9);
            seen.push(info.run_id);
        }
    }
    assert_eq!(seen, runs);
    store.close().await.unwrap();
}

/// The store's metadata, as the store writes it (named MessagePack fields
/// after the version byte).
#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    epoch: uuid::Uuid,
    format_version: u8,
    created_at: chrono::DateTime<chrono::Utc>,
}

fn read_meta(dir: &Path) -> Meta {
    let db = common::open_sled(dir);
    let bytes = db.get(b"mstore").unwrap().unwrap();
    common::close_sled(db, dir);
    assert_eq!(bytes[0], FORMAT_VERSION);
    rmp_serde::from_slice(&bytes[1..]).unwrap()
}

fn write_meta(dir: &Path, meta: &Meta) {
    let mut bytes = vec![FORMAT_VERSION];
    bytes.extend(rmp_serde::to_vec_named(meta).unwrap());
    plant(dir, b"mstore", &bytes);
}

/// A store at an older layout version (from before retention) opens, keeps
/// its epoch and runs, and is upgraded, so that a build reading only the
/// older version refuses it rather than reading a tombstone as damage. A
/// store at a newer version than this build's is refused, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_store_format_is_upgraded_and_a_newer_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    store_with_runs(dir.path(), &[run]).await;
    let mut meta = read_meta(dir.path());
    assert_eq!(meta.format_version, STORE_FORMAT_VERSION);
    let epoch = meta.epoch;

    meta.format_version = 1;
    write_meta(dir.path(), &meta);
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    assert_eq!(store.epoch(), epoch);
    assert_eq!(store.list_after(run, 0, 100).await.unwrap().len(), 9);
    store.close().await.unwrap();
    drop(store);
    assert_eq!(read_meta(dir.path()).format_version, STORE_FORMAT_VERSION);

    meta.format_version = STORE_FORMAT_VERSION + 1;
    write_meta(dir.path(), &meta);
    let error = Store::open(Config::new(dir.path())).await.unwrap_err();
    assert!(
        matches!(
            error,
            OpenError::UnsupportedFormat { found, supported, .. }
                if found == STORE_FORMAT_VERSION + 1 && supported == STORE_FORMAT_VERSION
        ),
        "{error:?}"
    );
}

/// A segment of envelopes `first_seq`, `first_seq + 1`, … of `run` (all
/// claiming seq `first_seq`, which is all a key near `u64::MAX` leaves room
/// for): `count` valid envelopes.
fn segment_at(run: RunId, first_seq: u64, count: usize) -> Vec<u8> {
    let encoded: Vec<Vec<u8>> = (0..count)
        .map(|_| behest_stream::codec::encode_envelope(&envelope(run, None, first_seq)).unwrap())
        .collect();
    behest_stream::codec::encode_segment(encoded.iter().map(Vec::as_slice))
}

/// No panic on any bytes from disk: a segment whose key puts its envelopes
/// past `u64::MAX` (no run gets there; only damage does) is `Corrupt`
/// naming the run from every read (`list_after` from the start and from
/// right below it, `verify_run`, `run_info`), also for a run that has
/// nothing but that segment; a publish to the run is refused with it; the
/// other runs keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_reaching_past_the_last_seq_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (damaged, healthy, orphan) = (RunId::new(), RunId::new(), RunId::new());
    store_with_runs(dir.path(), &[damaged, healthy]).await;
    let db = common::open_sled(dir.path());
    for run in [damaged, orphan] {
        db.insert(segment_key(run, u64::MAX), segment_at(run, u64::MAX, 2))
            .unwrap();
    }
    common::close_sled(db, dir.path());

    fn corrupt<T>(result: &Result<T, StoreError>, run: RunId) -> bool {
        matches!(result, Err(StoreError::Corrupt { run_id, .. }) if *run_id == run)
    }
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    for run in [damaged, orphan] {
        for after in [0, u64::MAX - 1] {
            let page = store.list_after(run, after, 100).await;
            assert!(corrupt(&page, run), "list_after {after}: {page:?}");
            let message = page.unwrap_err().to_string();
            assert!(message.contains(&run.to_string()), "{message}");
        }
    }
    let check = store.verify_run(damaged).await;
    assert!(corrupt(&check, damaged), "{check:?}");
    let info = store.run_info(damaged).await;
    assert!(corrupt(&info, damaged), "{info:?}");
    assert_eq!(store.list_after(healthy, 0, 100).await.unwrap().len(), 9);
    assert_eq!(store.verify_run(healthy).await.unwrap().events, 9);
    store.close().await.unwrap();

    let hub = behest_stream::EventHub::open(Config::new(dir.path()))
        .await
        .unwrap();
    let refused = hub.publish(common::delta(damaged, "more")).await;
    assert!(
        matches!(
            &refused,
            Err(behest_stream::HubError::Store(StoreError::Corrupt { run_id, .. })) if *run_id == damaged
        ),
        "{refused:?}"
    );
    assert_eq!(
        hub.publish(common::delta(healthy, "more"))
            .await
            .unwrap()
            .seq,
        10
    );
    hub.shutdown().await.unwrap();
}
