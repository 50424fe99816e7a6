//! Crash recovery under `kill -9`, in the style of sled's
//! `test_crash_recovery`: a child process publishes to several runs under
//! `Durability::Flushed` with a pipelined publisher and prints every
//! acknowledged `(run, seq, event_id)`; the parent kills it with SIGKILL at
//! a random instant (sometimes while it is still opening the store),
//! reopens the store, and checks that every acknowledged event is there with
//! its seq and event id, that each run is a gapless prefix, and that no seq
//! is ever reused as publishing continues across cycles.
//!
//! `BEHEST_STREAM_CRASH_CYCLES` sets the number of cycles (default 50).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use behest_stream::{Config, EventHub, RunId, Store};
use common::delta;
use uuid::Uuid;

const CHILD_ENV: &str = "BEHEST_STREAM_CRASH_CHILD_DIR";
const RUNS_ENV: &str = "BEHEST_STREAM_CRASH_CHILD_RUNS";

/// Not a test of its own: the child. Publishes until killed (or until it
/// has published 20,000 events), printing `ACK run seq event_id` for each
/// acknowledged publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let (Ok(dir), Ok(runs)) = (std::env::var(CHILD_ENV), std::env::var(RUNS_ENV)) else {
        return;
    };
    let runs: Vec<RunId> = runs
        .split(',')
        .map(|r| RunId::from_uuid(Uuid::parse_str(r).unwrap()))
        .collect();
    let hub = EventHub::open(Config::new(&dir)).await.unwrap();
    // A run starts with RunStarted (the order check): in the first cycle
    // that reaches it, before its deltas.
    for run in &runs {
        if hub.store().run_info(*run).await.unwrap().is_none() {
            hub.publish(common::started(*run, None)).await.unwrap();
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "OPEN").unwrap();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..20_000usize {
        let run = runs[i % runs.len()];
        pending.push_back(hub.submit(delta(run, &i.to_string())).await.unwrap());
        if pending.len() >= 32 {
            let envelope = pending.pop_front().unwrap().await.unwrap();
            writeln!(
                out,
                "ACK {} {} {}",
                envelope.run_id, envelope.seq, envelope.event_id
            )
            .unwrap();
            out.flush().unwrap();
        }
    }
}

/// A small xorshift generator: the instants are random, and the seed is
/// printed so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_instants_loses_no_acknowledged_event() {
    let cycles: usize = std::env::var("BEHEST_STREAM_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("crash test seed {seed}, {cycles} cycles");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<RunId> = (0..4).map(|_| RunId::new()).collect();
    let runs_arg = runs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // Every (run, seq) ever acknowledged, with its event id: a later cycle
    // must find the same event there.
    let mut acknowledged: HashMap<String, HashMap<u64, String>> = HashMap::new();
    let mut killed_during_open = 0;
    let mut left_records = 0;

    for cycle in 0..cycles {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env(RUNS_ENV, &runs_arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let reader = std::thread::spawn(move || {
            let mut opened = false;
            let mut acks = Vec::new();
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                // The harness may prefix the first line with "test crash_child ... ".
                if line.ends_with("OPEN") {
                    opened = true;
                } else if let Some(ack) = line.strip_prefix("ACK ") {
                    let parts: Vec<&str> = ack.split(' ').collect();
                    acks.push((
                        parts[0].to_string(),
                        parts[1].parse::<u64>().unwrap(),
                        parts[2].to_string(),
                    ));
                }
            }
            (opened, acks)
        });
        // A random instant: a quarter of the cycles within the first few
        // milliseconds (usually still opening), the rest up to 300 ms in.
        let delay = if rng.below(4) == 0 {
            rng.below(15)
        } else {
            15 + rng.below(285)
        };
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (opened, acks) = reader.join().unwrap();
        killed_during_open += usize::from(!opened);

        // Commits the child made since its last compaction are still
        // commit records: the open below must compact them.
        let db = common::open_sled(dir.path());
        left_records += usize::from(db.scan_prefix(b"w").next().is_some());
        common::close_sled(db, dir.path());
        let store = Store::open(Config::new(dir.path()))
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle} (seed {seed}): store does not open: {e}"));
        for (run, seq, event_id) in acks {
            let run_acks = acknowledged.entry(run.clone()).or_default();
            if let Some(previous) = run_acks.insert(seq, event_id.clone()) {
                panic!(
                    "cycle {cycle} (seed {seed}): run {run} seq {seq} acknowledged twice ({previous}, {event_id})"
                );
            }
        }
        for run in &runs {
            let stored = store.list_after(*run, 0, usize::MAX).await.unwrap();
            for (i, envelope) in stored.iter().enumerate() {
                assert_eq!(
                    envelope.seq,
                    i as u64 + 1,
                    "cycle {cycle} (seed {seed}): run {run} is not a gapless prefix"
                );
            }
            let by_seq: HashMap<u64, String> = stored
                .iter()
                .map(|e| (e.seq, e.event_id.to_string()))
                .collect();
            for (seq, event_id) in acknowledged.get(&run.to_string()).into_iter().flatten() {
                assert_eq!(
                    by_seq.get(seq),
                    Some(event_id),
                    "cycle {cycle} (seed {seed}): acknowledged run {run} seq {seq} lost or replaced"
                );
            }
        }
        store.close().await.unwrap();
    }
    println!(
        "{cycles} kill -9 cycles, {} acknowledged events checked, {killed_during_open} kills before the store was open, {left_records} left commit records to recover",
        acknowledged.values().map(HashMap::len).sum::<usize>()
    );
    assert!(
        left_records > 0,
        "some kill must land with commit records not yet compacted"
    );
    assert!(
        !acknowledged.is_empty(),
        "the children must have acknowledged something"
    );
}
