//! The `behest-stream` store CLI, run as a process against stores these
//! tests make: a healthy one and a damaged one.

#![cfg(feature = "cli")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use behest_stream::codec::{FORMAT_VERSION, STORE_FORMAT_VERSION};
use behest_stream::{Config, RunId, Store};
use common::{envelope, terminal};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_behest-stream"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Two runs: `ended` with seqs 1..=5 (the last terminal), `live` with 1..=3.
async fn make_store(dir: &Path) -> (RunId, RunId) {
    let (ended, live) = (RunId::new(), RunId::new());
    // Segments of two events: the ended run's are seqs 1..=2, 3..=4 and 5.
    let store = Store::open(Config::new(dir).segment_limits(2, 1 << 20))
        .await
        .unwrap();
    store
        .append((1..=2).map(|seq| envelope(ended, None, seq)).collect())
        .await
        .unwrap();
    store
        .append(vec![
            envelope(ended, None, 3),
            envelope(ended, None, 4),
            terminal(ended, None, 5),
        ])
        .await
        .unwrap();
    store
        .append((1..=3).map(|seq| envelope(live, None, seq)).collect())
        .await
        .unwrap();
    store.close().await.unwrap();
    (ended, live)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_replay_and_verify_a_healthy_store() {
    let dir = tempfile::tempdir().unwrap();
    let (ended, live) = make_store(dir.path()).await;
    let path = dir.path().to_str().unwrap();

    let inspect = cli(&["inspect", path]);
    assert!(inspect.status.success(), "{inspect:?}");
    let text = stdout(&inspect);
    assert!(
        text.contains("runs       2 (1 ended, of which 0 removed by retention; 1 live)"),
        "{text}"
    );
    assert!(text.contains("events     8"), "{text}");
    assert!(
        text.contains(&format!(
            "format     store version {STORE_FORMAT_VERSION}, values version {FORMAT_VERSION}"
        )),
        "{text}"
    );

    let replay = cli(&["replay", path, "--run", &ended.to_string(), "--after", "2"]);
    assert!(replay.status.success(), "{replay:?}");
    let seqs: Vec<u64> = stdout(&replay)
        .lines()
        .map(|line| line.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);

    let json = cli(&["replay", path, "--run", &live.to_string(), "--json"]);
    assert!(json.status.success(), "{json:?}");
    let lines: Vec<serde_json::Value> = stdout(&json)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["seq"], 3);
    assert_eq!(lines[0]["run_id"], live.to_string());

    let verify = cli(&["verify", path]);
    assert!(verify.status.success(), "{verify:?}");
    assert!(
        stdout(&verify).contains("verified 2 runs (0 removed by retention), 8 events"),
        "{verify:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_damage_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (ended, live) = make_store(dir.path()).await;
    // Garble the ended run's second segment (seqs 3..=4).
    let db = common::open_sled(dir.path());
    let mut key = vec![b'e'];
    key.extend_from_slice(ended.as_uuid().as_bytes());
    key.extend_from_slice(&3u64.to_be_bytes());
    assert!(db.get(&key).unwrap().is_some());
    db.insert(key, vec![FORMAT_VERSION, 0x93, 0xc1, 0xc1, 0xc1])
        .unwrap();
    common::close_sled(db, dir.path());
    let path = dir.path().to_str().unwrap();

    let verify = cli(&["verify", path]);
    assert_eq!(verify.status.code(), Some(1), "{verify:?}");
    let text = stdout(&verify);
    assert!(text.contains(&format!("damaged  run {ended}")), "{text}");
    assert!(text.contains("seq 3"), "{text}");
    assert!(!text.contains(&format!("damaged  run {live}")), "{text}");
    assert!(text.contains("1 damaged"), "{text}");

    // Replay serves what precedes the damage, then fails naming it.
    let replay = cli(&["replay", path, "--run", &ended.to_string()]);
    assert_eq!(replay.status.code(), Some(2), "{replay:?}");
    assert_eq!(stdout(&replay).lines().count(), 2);
    assert!(
        String::from_utf8_lossy(&replay.stderr).contains("seq 3"),
        "{replay:?}"
    );
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    let missing = cli(&["inspect", "/nonexistent/behest-store"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("is not a directory"));
    let dir = tempfile::tempdir().unwrap();
    let bad_run = cli(&["replay", dir.path().to_str().unwrap(), "--run", "nope"]);
    assert_eq!(bad_run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_run.stderr).contains("is not a run id"));
}

/// A segment whose key puts its envelopes past `u64::MAX` (damage) makes
/// `inspect` and `verify` report the run, not panic on the seq arithmetic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_past_the_last_seq_is_reported_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (_, live) = make_store(dir.path()).await;
    let db = common::open_sled(dir.path());
    let mut key = vec![b'e'];
    key.extend_from_slice(live.as_uuid().as_bytes());
    key.extend_from_slice(&u64::MAX.to_be_bytes());
    let encoded: Vec<Vec<u8>> = (0..2)
        .map(|_| behest_stream::codec::encode_envelope(&envelope(live, None, u64::MAX)).unwrap())
        .collect();
    db.insert(
        key,
        behest_stream::codec::encode_segment(encoded.iter().map(Vec::as_slice)),
    )
    .unwrap();
    common::close_sled(db, dir.path());
    let path = dir.path().to_str().unwrap();

    for (command, code) in [("inspect", 2), ("verify", 1)] {
        let output = cli(&[command, path]);
        assert_eq!(output.status.code(), Some(code), "{command}: {output:?}");
        let text = format!(
            "{}{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(text.contains(&live.to_string()), "{command}: {text}");
        assert!(text.contains("corrupt"), "{command}: {text}");
    }
}
