//! A store directory held by another process cannot be opened twice.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use behest_stream::{Config, OpenError, Store};

const HOLDER_ENV: &str = "BEHEST_STREAM_TEST_HOLD_STORE";
/// Printed by the child once it holds the store. The harness may print
/// `test lock_holder_child ... ` on the same line, so the parent looks for
/// this token at the end of a line.
const READY: &str = "behest-stream-store-held";

/// Not a test of its own: when re-executed by
/// `open_fails_while_another_process_holds_the_store` with the holder
/// variable set, opens the store, prints `READY`, and holds it until its stdin
/// closes.
#[tokio::test]
async fn lock_holder_child() {
    let Ok(dir) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let store = Store::open(Config::new(&dir)).await.unwrap();
    println!("{READY}");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    store.close().await.unwrap();
}

/// `open` on a directory another process holds fails with `Locked`, naming
/// the path; once the holder exits, the same directory opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_fails_while_another_process_holds_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "lock_holder_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The harness prints its own lines first; wait for the child's token,
    // with a deadline so that a child stuck in `open` fails the test.
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("child exited or stalled before holding the store");
        if line.trim_end().ends_with(READY) {
            break;
        }
    }

    let error = Store::open(Config::new(dir.path())).await.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, OpenError::Locked { ref path, .. } if path == dir.path()),
        "{error:?}"
    );
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("locked"), "{message}");

    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let store = Store::open(Config::new(dir.path())).await.unwrap();
    store.close().await.unwrap();
}

/// A path that cannot hold a store (here: a regular file) fails with an
/// error naming it, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_on_a_file_names_the_path() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let error = Store::open(Config::new(file.path())).await.unwrap_err();
    assert!(matches!(error, OpenError::Io { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains(&file.path().display().to_string())
    );
}
