//! The JetStream run log when things die: the writing host killed with
//! SIGKILL mid-run (every acknowledged event readable, gapless, and a new
//! writer continues the run), and the NATS server itself killed and
//! restarted mid-run (nothing acknowledged lost; the append in doubt is
//! learned on retry and stored once).
//!
//! The first uses the server at 127.0.0.1:4222 (or
//! `BEHEST_STREAM_NATS_URL`); the second starts its own `nats-server` (from
//! `BEHEST_STREAM_NATS_SERVER`, default `/usr/sbin/nats-server`) on a free
//! port with a temporary store. Each skips with a printed reason when what
//! it needs is missing, unless `BEHEST_STREAM_REQUIRE_NATS=1`.

#![cfg(feature = "nats")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use behest_stream::nats::{NatsConfig, NatsLog};
use behest_stream::{RunId, RuntimeEventEnvelope, StoreError};
use common::nats::skip;
use common::{envelope, terminal, wait_for};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);
const CHILD_ENV: &str = "BEHEST_STREAM_NATS_CHILD";

fn config(url: &str, unique: &str) -> NatsConfig {
    let mut config = common::nats::config_named(url, unique);
    config.request_timeout = Duration::from_secs(1);
    config
}

fn shared_url() -> String {
    common::nats::url()
}

/// Not a test of its own: the writing host. Appends to the run named by
/// `BEHEST_STREAM_NATS_CHILD` (`unique run`) until killed, printing
/// `ACK seq event_id` for every acknowledged append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_writer_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (unique, run) = spec.split_once(' ').unwrap();
    let run = RunId::from_uuid(Uuid::parse_str(run).unwrap());
    let log = NatsLog::open(&config(&shared_url(), unique)).await.unwrap();
    let mut writer = log.writer(run).await.unwrap();
    let mut out = std::io::stdout().lock();
    for seq in 1..=1_000_000 {
        let e = envelope(run, None, seq);
        writer.append(&e).await.unwrap();
        writeln!(out, "ACK {seq} {}", e.event_id).unwrap();
        out.flush().unwrap();
    }
}

/// Host A writes a run and is killed with SIGKILL after some hundred
/// acknowledgements; host B (this process) then finds every acknowledged
/// event with its event id, gapless from 1, and takes the run over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writer_loses_no_acknowledged_event_and_another_host_takes_over() {
    let unique = Uuid::now_v7().simple().to_string();
    let config = config(&shared_url(), &unique);
    let log = match NatsLog::open(&config).await {
        Ok(log) => log,
        Err(error) => return skip(&format!("no NATS JetStream server ({error})")),
    };
    let run = RunId::new();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "nats_writer_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{unique} {run}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: Vec<(u64, String)> = Vec::new();
    // Kill it mid-run: after 300 acknowledgements, whatever it is doing.
    while acked.len() < 300 {
        let line = lines.next().expect("the writer exited early").unwrap();
        if let Some(ack) = line.split("ACK ").nth(1) {
            let (seq, id) = ack.split_once(' ').unwrap();
            acked.push((seq.parse().unwrap(), id.to_owned()));
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Acknowledgements it printed before it died.
    for line in lines {
        let Ok(line) = line else { break };
        if let Some(ack) = line.split("ACK ").nth(1) {
            let (seq, id) = ack.split_once(' ').unwrap();
            acked.push((seq.parse().unwrap(), id.to_owned()));
        }
    }

    let stored = read_all(&log, run).await;
    assert!(
        stored.len() >= acked.len(),
        "{} stored, {} acknowledged",
        stored.len(),
        acked.len()
    );
    for (seq, id) in &acked {
        let envelope = &stored[*seq as usize - 1];
        assert_eq!(
            (envelope.seq, envelope.event_id.to_string()),
            (*seq, id.clone())
        );
    }
    // Host B takes the run over where the log ends.
    let mut writer = log.writer(run).await.unwrap();
    let next = writer.last_seq() + 1;
    writer.append(&terminal(run, None, next)).await.unwrap();
    assert_eq!(read_all(&log, run).await.len() as u64, next);
    common::nats::delete_stream(&config).await;
}

/// Every envelope of `run`, checking they are seqs 1, 2, 3, … (the log's
/// reads refuse a gap).
async fn read_all(log: &NatsLog, run: RunId) -> Vec<RuntimeEventEnvelope> {
    let mut all: Vec<RuntimeEventEnvelope> = Vec::new();
    loop {
        let page = log.list_after(run, all.len() as u64, 256).await.unwrap();
        if page.is_empty() {
            break;
        }
        all.extend(page);
    }
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    all
}

/// A `nats-server` of the test's own, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(binary: &str, port: u16, store: &std::path::Path) -> std::io::Result<Self> {
        let child = Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { child, port })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `nats-server` binary, a store directory and a port of the test's own,
/// to start (and, after a kill, start again) a server on.
struct OwnServer {
    binary: String,
    store: tempfile::TempDir,
    port: u16,
}

impl OwnServer {
    /// `None` (reason printed, or a failure under
    /// `BEHEST_STREAM_REQUIRE_NATS=1`) without the binary.
    fn start() -> Option<Self> {
        let binary = std::env::var("BEHEST_STREAM_NATS_SERVER")
            .unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned());
        if !std::path::Path::new(&binary).exists() {
            skip(&format!("no nats-server binary at {binary}"));
            return None;
        }
        Some(Self {
            binary,
            store: tempfile::tempdir().unwrap(),
            port: free_port(),
        })
    }

    /// Starts the server on the same port and store.
    fn run(&self) -> Server {
        Server::start(&self.binary, self.port, self.store.path()).unwrap()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server is killed with SIGKILL mid-run and restarted on the same
/// store: the append made while it is down fails as in doubt (not as
/// "nothing stored", which would invite a duplicate under a new id); retried
/// after the restart it is stored once; everything acknowledged before the
/// crash is there, and the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_run_loses_nothing_acknowledged() {
    let Some(own) = OwnServer::start() else {
        return;
    };
    let server = own.run();
    let unique = Uuid::now_v7().simple().to_string();
    let config = config(&server.url(), &unique);
    let log = wait_for(
        "our nats-server to take connections",
        DEADLINE,
        async || NatsLog::open(&config).await.ok(),
    )
    .await;

    let run = RunId::new();
    let envelopes: Vec<_> = (1..20)
        .map(|seq| envelope(run, None, seq))
        .chain([terminal(run, None, 20)])
        .collect();
    let mut writer = log.writer(run).await.unwrap();
    for e in &envelopes[..10] {
        writer.append(e).await.unwrap();
    }

    server.kill();
    match writer.append(&envelopes[10]).await {
        Err(StoreError::FlushFailed { .. }) => {}
        other => panic!("an append while the server is down must be in doubt, got {other:?}"),
    }

    let server = own.run();
    // Retry the append in doubt until the server is back and answers.
    wait_for(
        "the append in doubt to be learned",
        DEADLINE,
        async || match writer.append(&envelopes[10]).await {
            Ok(()) => Some(()),
            Err(StoreError::FlushFailed { .. } | StoreError::ReadFailed { .. }) => None,
            Err(other) => panic!("retry after the restart: {other:?}"),
        },
    )
    .await;
    for e in &envelopes[11..] {
        writer.append(e).await.unwrap();
    }
    assert_eq!(log.list_after(run, 0, 100).await.unwrap(), envelopes);
    drop(server);
}

/// The same through a hub: its NATS server is killed mid-run and
/// restarted. Publishes while it is down fail (in doubt, or unavailable);
/// once it is back the run goes on; the run's log holds every publish that
/// was acknowledged, once, gapless; a subscriber attached before the
/// outage (and read after it: one reading during it would see the outage
/// as an error and resume by cursor) ends with exactly that log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_survives_its_server_restarting_mid_run() {
    use behest_stream::{Config, EventHub, Resume, RuntimeRoom};
    use common::{completed, delta, next_within, started};

    let Some(own) = OwnServer::start() else {
        return;
    };
    let server = own.run();
    let unique = Uuid::now_v7().simple().to_string();
    let config = config(&server.url(), &unique);
    let hub = wait_for(
        "our nats-server to take connections",
        DEADLINE,
        async || EventHub::open(Config::nats(config.clone())).await.ok(),
    )
    .await;
    let run = RunId::new();
    let mut live = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    let mut acknowledged = vec![hub.publish(started(run, None)).await.unwrap()];
    for i in 0..9 {
        acknowledged.push(hub.publish(delta(run, &i.to_string())).await.unwrap());
    }

    server.kill();
    let down = hub.publish(delta(run, "while down")).await;
    assert!(
        down.is_err(),
        "a publish with the server down must not be acknowledged"
    );

    let server = own.run();
    let back = wait_for("publishing to work again", DEADLINE, async || {
        hub.publish(delta(run, "after the restart")).await.ok()
    })
    .await;
    acknowledged.push(back);
    for i in 0..5 {
        acknowledged.push(hub.publish(delta(run, &format!("more {i}"))).await.unwrap());
    }
    acknowledged.push(hub.publish(completed(run)).await.unwrap());

    let log = hub.replay(run, 0, 1000).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=log.len() as u64).collect::<Vec<_>>()
    );
    for envelope in &acknowledged {
        assert_eq!(
            &log[envelope.seq as usize - 1],
            envelope,
            "acknowledged, so stored"
        );
    }
    // Anything else in the log is a publish that was not acknowledged (made
    // while the server was down or coming back, so in doubt): it may have
    // landed, once.
    let acknowledged_ids: Vec<_> = acknowledged.iter().map(|e| e.event_id).collect();
    for envelope in &log {
        if acknowledged_ids.contains(&envelope.event_id) {
            continue;
        }
        match &envelope.event {
            behest_stream::AgentEvent::TextDelta(d) => assert!(
                d.delta == "while down" || d.delta == "after the restart",
                "an unexpected event in the log: {envelope:?}"
            ),
            other => panic!("an unexpected event in the log: {other:?}"),
        }
    }

    let mut streamed = Vec::new();
    while let Some(item) = next_within(&mut live, DEADLINE).await {
        match item {
            Ok(envelope) => streamed.push(envelope),
            Err(error) => panic!("the subscriber saw an error through the outage: {error}"),
        }
    }
    assert_eq!(streamed, log);
    hub.shutdown().await.unwrap();
    drop(server);
}

/// A session subscriber on host B while the server restarts: B's session
/// room follows the session's index and runs on the log through consumers
/// that the client recreates after the restart, which, for a consumer that
/// had delivered nothing yet, starts over from the subject's first message.
/// The subscriber gets the run A writes after the restart, once, and B's
/// room fans out nothing of the run that ended before it attached (what it
/// fanned out is counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_followed_across_hosts_goes_on_after_a_server_restart_without_replays() {
    use behest_stream::{Config, EventHub, Resume, RuntimeRoom};
    use common::{completed, delta, next_within, started};

    let Some(own) = OwnServer::start() else {
        return;
    };
    let server = own.run();
    let unique = Uuid::now_v7().simple().to_string();
    let config = config(&server.url(), &unique);
    let open = async || {
        wait_for(
            "our nats-server to take connections",
            DEADLINE,
            async || EventHub::open(Config::nats(config.clone())).await.ok(),
        )
        .await
    };
    let (host_a, host_b) = (open().await, open().await);
    let session = Uuid::now_v7();
    let (before, after, probe) = (RunId::new(), RunId::new(), RunId::new());
    host_a
        .publish(started(before, Some(session)))
        .await
        .unwrap();
    for i in 0..3 {
        host_a.publish(delta(before, &i.to_string())).await.unwrap();
    }
    host_a.publish(completed(before)).await.unwrap();

    let room = RuntimeRoom::Session(session);
    let mut on_b = host_b
        .subscribe(room.clone(), Resume::FromStart)
        .await
        .unwrap();
    for seq in 1..=5 {
        let envelope = next_within(&mut on_b, DEADLINE).await.unwrap().unwrap();
        assert_eq!((envelope.run_id, envelope.seq), (before, seq));
    }

    server.kill();
    let server = own.run();
    wait_for("publishing to work again", DEADLINE, async || {
        host_a.publish(started(probe, None)).await.ok()
    })
    .await;
    let mut written = vec![host_a.publish(started(after, Some(session))).await.unwrap()];
    for i in 0..4 {
        written.push(host_a.publish(delta(after, &i.to_string())).await.unwrap());
    }
    written.push(host_a.publish(completed(after)).await.unwrap());

    let mut streamed = Vec::new();
    while streamed.len() < written.len() {
        match next_within(&mut on_b, DEADLINE).await {
            Some(Ok(envelope)) => streamed.push(envelope),
            Some(Err(error)) => panic!("the session subscriber saw an error: {error}"),
            None => panic!("the session stream ended"),
        }
    }
    assert_eq!(streamed, written);
    let stats = host_b.stats().await.unwrap();
    let session_room = stats.rooms.iter().find(|r| r.room == room).unwrap();
    assert_eq!(
        session_room.fanned_out,
        written.len() as u64,
        "B's session room fanned out only the run written after the restart"
    );
    host_a.shutdown().await.unwrap();
    host_b.shutdown().await.unwrap();
    drop(server);
}
