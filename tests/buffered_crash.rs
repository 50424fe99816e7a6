//! Under `Durability::Buffered`, what a subscriber received survives a
//! crash: a child process publishes under `Buffered` (with sled's background
//! flush off, so only the store's own flushes reach the disk) while a run
//! subscriber and a session subscriber in the same process print every
//! envelope they receive; the parent kills it with SIGKILL once both have
//! received every event, reopens the store, and checks that each received
//! seq holds the very event received, and that publishing goes on after
//! it (no seq a subscriber saw is given to another event).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use behest_stream::{Config, Durability, EventHub, Resume, RunId, RuntimeRoom};
use common::{delta, next_within, started};
use uuid::Uuid;

const CHILD_ENV: &str = "BEHEST_STREAM_BUFFERED_CHILD_DIR";
const RUN_ENV: &str = "BEHEST_STREAM_BUFFERED_CHILD_RUN";
const SESSION_ENV: &str = "BEHEST_STREAM_BUFFERED_CHILD_SESSION";
/// Events the child publishes before it waits to be killed.
const EVENTS: u64 = 60;

/// Not a test of its own: the child. Publishes `EVENTS` events under
/// `Buffered`, prints `SAW room seq event_id` for each envelope its two
/// subscribers receive, then waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_crash_child() {
    let (Ok(dir), Ok(run), Ok(session)) = (
        std::env::var(CHILD_ENV),
        std::env::var(RUN_ENV),
        std::env::var(SESSION_ENV),
    ) else {
        return;
    };
    let run = RunId::from_uuid(Uuid::parse_str(&run).unwrap());
    let session = Uuid::parse_str(&session).unwrap();
    let config = Config::new(&dir)
        .durability(Durability::Buffered)
        .flush_every_ms(None);
    let hub = EventHub::open(config).await.unwrap();
    let (lines, printed) = std::sync::mpsc::channel::<String>();
    for (name, room) in [
        ("run", RuntimeRoom::Run(run)),
        ("session", RuntimeRoom::Session(session)),
    ] {
        let mut stream = hub.subscribe(room, Resume::FromStart).await.unwrap();
        let lines = lines.clone();
        tokio::spawn(async move {
            while let Some(item) = next_within(&mut stream, Duration::from_secs(3600)).await {
                let envelope = item.unwrap();
                let _ = lines.send(format!("SAW {name} {} {}", envelope.seq, envelope.event_id));
            }
        });
    }
    drop(lines);
    std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in printed {
            writeln!(out, "{line}").unwrap();
            out.flush().unwrap();
        }
    });
    hub.publish(started(run, Some(session))).await.unwrap();
    for i in 2..=EVENTS {
        hub.publish(delta(run, &i.to_string())).await.unwrap();
    }
    std::future::pending::<()>().await;
}

/// Every envelope a subscriber received under `Buffered` is in the store,
/// the same event at the same seq, after a `kill -9`; the next publish
/// takes the seq after the last one received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_buffered_no_seq_a_subscriber_received_is_reused_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (run, session) = (RunId::new(), Uuid::now_v7());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "buffered_crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .env(RUN_ENV, run.to_string())
        .env(SESSION_ENV, session.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (seen_tx, seen) = mpsc::channel::<(String, u64, String)>();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            let Some(at) = line.find("SAW ") else {
                continue;
            };
            let parts: Vec<&str> = line[at + 4..].split(' ').collect();
            let _ = seen_tx.send((
                parts[0].to_string(),
                parts[1].parse().unwrap(),
                parts[2].to_string(),
            ));
        }
    });
    // Wait (with a deadline) until both subscribers received every event.
    let mut received = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while received.len() < 2 * EVENTS as usize {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(saw) => received.push(saw),
            Err(_) => panic!(
                "the child's subscribers received {} of {} envelopes",
                received.len(),
                2 * EVENTS
            ),
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    let stored = hub.replay(run, 0, usize::MAX).await.unwrap();
    for (room, seq, event_id) in &received {
        let at = stored.iter().find(|e| e.seq == *seq);
        assert_eq!(
            at.map(|e| e.event_id.to_string()).as_deref(),
            Some(event_id.as_str()),
            "the {room} subscriber received seq {seq} ({event_id}), which the crash took back"
        );
    }
    let next = hub.publish(delta(run, "after the crash")).await.unwrap();
    assert_eq!(
        next.seq,
        EVENTS + 1,
        "a received seq was given to a new event"
    );
    hub.shutdown().await.unwrap();
}
