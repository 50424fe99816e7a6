//! The SSE server under test: real HTTP/1.1 over a loopback port (hyper's
//! client, one connection per request, so dropping a reply disconnects),
//! a real `EventHub` on a temporary directory, and a real browser
//! (headless Chromium) for the page. No mocks; no sleep makes a test pass:
//! every wait is for a condition, under a deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use behest_stream::{
    AgentEvent, Config, Cursor, EventHub, RunId, RuntimeEventEnvelope, RuntimeRoom,
};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use uuid::Uuid;

use super::demo;
use super::{AppState, Settings, app};

/// The longest any single wait of these tests may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// Where Debian's chromium package puts the browser; `BEHEST_STREAM_CHROMIUM`
/// names another.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Settings for tests: frequent keep-alives (so the server notices a gone
/// client quickly) and demo runs at full speed.
fn settings() -> Settings {
    Settings {
        keep_alive: Duration::from_millis(250),
        demo_pace: Duration::from_millis(1),
    }
}

/// The server on a loopback port, over a hub on a temporary directory.
struct Server {
    addr: SocketAddr,
    state: AppState,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(settings: Settings) -> Self {
        Self::start_with(settings, |config| config).await
    }

    async fn start_with(settings: Settings, configure: impl FnOnce(Config) -> Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hub = EventHub::open(configure(Config::new(dir.path())))
            .await
            .unwrap();
        let state = AppState::new(hub, settings);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = app(state.clone());
        let task = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self {
            addr,
            state,
            task,
            _dir: dir,
        }
    }

    fn hub(&self) -> &EventHub {
        &self.state.hub
    }

    /// A fresh session and a token that grants it.
    fn session(&self) -> (Uuid, String) {
        let session = Uuid::now_v7();
        let token = self.state.tokens.issue(vec![RuntimeRoom::Session(session)]);
        (session, token)
    }

    /// A new run of `session`, granted to the session's tokens.
    fn run_in(&self, session: Uuid) -> RunId {
        let run_id = RunId::new();
        self.state.tokens.grant_run(session, run_id);
        run_id
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        self.state.hub.shutdown().await.unwrap();
    }
}

/// Publishes `events` one after another; returns the last seq.
async fn publish(hub: &EventHub, events: impl IntoIterator<Item = AgentEvent>) -> u64 {
    let mut last = 0;
    for event in events {
        last = hub.publish(event).await.unwrap().seq;
    }
    last
}

/// Publishes `events` on a task of its own, so that a test can read while
/// they go out; the task returns the last seq.
fn publish_in_background(hub: &EventHub, events: Vec<AgentEvent>) -> tokio::task::JoinHandle<u64> {
    let hub = hub.clone();
    tokio::spawn(async move { publish(&hub, events).await })
}

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Live subscribers of `room` on the hub (0 when the room is not running).
async fn subscribers(hub: &EventHub, room: &RuntimeRoom) -> usize {
    let stats = hub.stats().await.unwrap();
    stats
        .rooms
        .iter()
        .find(|r| &r.room == room)
        .map_or(0, |r| r.subscribers)
}

fn bearer(token: &str) -> (&'static str, HeaderValue) {
    (
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    )
}

fn last_event_id(id: &str) -> (&'static str, HeaderValue) {
    ("last-event-id", HeaderValue::from_str(id).unwrap())
}

/// A response being read. Dropping it closes its connection.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    /// Bytes received and not yet parsed into a frame.
    unparsed: Vec<u8>,
    _connection: AbortOnDrop,
}

/// The task driving a client connection; aborting it drops the socket.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, HeaderValue)]) -> Reply {
    request(addr, Method::GET, path, headers).await
}

/// One request on a connection of its own.
async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, HeaderValue)],
) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, value.clone());
    }
    let request = builder.body(Empty::<Bytes>::new()).unwrap();
    let response = timeout(DEADLINE, sender.send_request(request))
        .await
        .expect("no response head in time")
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
        unparsed: Vec::new(),
        _connection: connection,
    }
}

/// One SSE frame: an event, or a comment (a keep-alive).
#[derive(Debug)]
enum Frame {
    Event(SseEvent),
    Comment(String),
}

/// An SSE event's fields.
#[derive(Debug, Clone)]
struct SseEvent {
    id: Option<String>,
    kind: Option<String>,
    data: String,
}

impl SseEvent {
    /// The envelope in `data`, checked against the other fields: `event`
    /// is its type, `id` a cursor that has seen it.
    fn envelope(&self) -> RuntimeEventEnvelope {
        let envelope: RuntimeEventEnvelope = serde_json::from_str(&self.data).unwrap();
        assert_eq!(self.kind.as_deref(), Some(envelope.event.kind()));
        let cursor: Cursor = self.id.as_deref().expect("an id").parse().unwrap();
        assert_eq!(cursor.seq(envelope.run_id), envelope.seq, "{self:?}");
        envelope
    }

    fn id(&self) -> String {
        self.id.clone().expect("an id")
    }
}

/// Parses one frame (the text before its blank line) as the SSE spec
/// reads it: `field: value` lines, `:` comments, a space after the colon
/// dropped, `data` lines joined with newlines.
fn parse_frame(text: &str) -> Frame {
    let (mut id, mut kind, mut data, mut comment) = (None, None, None::<String>, String::new());
    for line in text.split('\n') {
        if let Some(text) = line.strip_prefix(':') {
            comment.push_str(text);
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.to_owned()),
            "event" => kind = Some(value.to_owned()),
            "data" => match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            other => panic!("unexpected SSE field {other:?} in {text:?}"),
        }
    }
    match (id, kind, data) {
        (None, None, None) => Frame::Comment(comment),
        (id, kind, data) => Frame::Event(SseEvent {
            id,
            kind,
            data: data.unwrap_or_default(),
        }),
    }
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The next frame, or `None` once the server ended the response.
    async fn next_frame(&mut self) -> Option<Frame> {
        self.next_frame_by(Instant::now() + DEADLINE).await
    }

    /// The next frame, which must come by `deadline`.
    async fn next_frame_by(&mut self, deadline: Instant) -> Option<Frame> {
        loop {
            if let Some(end) = self.unparsed.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.unparsed.drain(..end + 2).collect();
                return Some(parse_frame(std::str::from_utf8(&frame[..end]).unwrap()));
            }
            match timeout_at(deadline, self.body.frame())
                .await
                .expect("no SSE frame in time")
            {
                None => {
                    assert!(
                        self.unparsed.is_empty(),
                        "the response ended inside a frame: {:?}",
                        String::from_utf8_lossy(&self.unparsed)
                    );
                    return None;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.unparsed.extend_from_slice(&data);
                    }
                }
                Some(Err(error)) => panic!("response body failed: {error}"),
            }
        }
    }

    /// The next event, skipping keep-alives; `None` at the end. Keep-alives
    /// do not extend the deadline.
    async fn next_event(&mut self) -> Option<SseEvent> {
        self.next_event_by(Instant::now() + DEADLINE).await
    }

    async fn next_event_by(&mut self, deadline: Instant) -> Option<SseEvent> {
        loop {
            match self.next_frame_by(deadline).await? {
                Frame::Event(event) => return Some(event),
                Frame::Comment(_) => {}
            }
        }
    }

    /// Every event up to the end of the response, which must come within
    /// [`DEADLINE`]: a stream that does not close fails here, keep-alives
    /// or not.
    async fn events_to_end(&mut self) -> Vec<SseEvent> {
        let deadline = Instant::now() + DEADLINE;
        let mut events = Vec::new();
        while let Some(event) = self.next_event_by(deadline).await {
            events.push(event);
        }
        events
    }

    /// The whole body as text.
    async fn text(self) -> String {
        let body = timeout(DEADLINE, self.body.collect())
            .await
            .expect("no body in time")
            .unwrap()
            .to_bytes();
        let mut text = String::from_utf8(self.unparsed).unwrap();
        text.push_str(std::str::from_utf8(&body).unwrap());
        text
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_resumed_with_last_event_id_is_whole_exactly_once_and_closes() {
    let server = Server::start(settings()).await;
    let hub = server.hub().clone();
    let (session, token) = server.session();
    let run = server.run_in(session);
    let n = demo::run_len();
    let mut events = demo::events(run, session);
    let path = format!("/runs/{run}/events");

    // Stored before the first connection: it starts with a catch-up.
    publish(&hub, events.by_ref().take(5)).await;
    let mut first = get(server.addr, &path, &[bearer(&token)]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("content-type"), "text/event-stream");
    // Published while connected (the subscription exists once the head
    // has arrived): these come live.
    let live: Vec<AgentEvent> = events.by_ref().take(7).collect();
    let publisher = publish_in_background(&hub, live);
    let mut received = Vec::new();
    let mut last_id = String::new();
    while received.len() < 8 {
        let event = first.next_event().await.expect("the stream ended early");
        received.push(event.envelope());
        last_id = event.id();
    }
    drop(first);
    assert_eq!(publisher.await.unwrap(), 12);
    let cursor: Cursor = last_id.parse().unwrap();
    assert_eq!((cursor.epoch(), cursor.seq(run)), (hub.epoch(), 8));
    // The server notices the client left (a write fails) and drops its
    // subscription: nothing is held for a gone client.
    wait_until("the first connection's subscription to end", async || {
        subscribers(&hub, &RuntimeRoom::Run(run)).await == 0
    })
    .await;

    // Published while disconnected, all but the last three.
    publish(&hub, events.by_ref().take(n as usize - 3 - 12)).await;
    let mut second = get(
        server.addr,
        &path,
        &[bearer(&token), last_event_id(&last_id)],
    )
    .await;
    assert_eq!(second.status, StatusCode::OK);
    let rest: Vec<AgentEvent> = events.by_ref().collect();
    assert_eq!(rest.len(), 3);
    let publisher = publish_in_background(&hub, rest);
    // Read to the end: the response must close after the terminal event.
    let tail = second.events_to_end().await;
    assert_eq!(publisher.await.unwrap(), n);
    let final_id = tail.last().expect("events after the resume").id();
    received.extend(tail.iter().map(SseEvent::envelope));

    let seqs: Vec<u64> = received.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
    assert!(received.last().unwrap().is_terminal());
    // Exactly the stored log, envelope for envelope (event ids included).
    assert_eq!(received, hub.replay(run, 0, 1000).await.unwrap());

    // Coming back with the terminal event's id: 204, which stops an
    // EventSource from reconnecting.
    let after_end = get(
        server.addr,
        &path,
        &[bearer(&token), last_event_id(&final_id)],
    )
    .await;
    assert_eq!(after_end.status, StatusCode::NO_CONTENT);
    assert_eq!(after_end.text().await, "");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_with_last_event_id_has_every_run_exactly_once() {
    let server = Server::start(settings()).await;
    let hub = server.hub().clone();
    let (session, token) = server.session();
    let runs = [
        server.run_in(session),
        server.run_in(session),
        server.run_in(session),
    ];
    let n = demo::run_len() as usize;
    let [mut a, mut b, mut c] = runs.map(|run| demo::events(run, session));
    let path = format!("/sessions/{session}/events");

    // Before the first connection: all of run a, the start of run b.
    publish(&hub, a.by_ref()).await;
    publish(&hub, b.by_ref().take(4)).await;
    let mut first = get(server.addr, &path, &[bearer(&token)]).await;
    assert_eq!(first.status, StatusCode::OK);
    // While connected: runs b and c interleaved.
    let mut live = Vec::new();
    for i in 0..6 {
        live.extend(b.next());
        if i % 2 == 0 {
            live.extend(c.next());
        }
    }
    let publisher = publish_in_background(&hub, live);
    let mut received = Vec::new();
    let mut last_id = String::new();
    while received.len() < n + 6 {
        let event = first.next_event().await.expect("the stream ended");
        received.push(event.envelope());
        last_id = event.id();
    }
    drop(first);
    publisher.await.unwrap();

    // While disconnected: the rest of b, most of c.
    publish(&hub, b.by_ref()).await;
    publish(&hub, c.by_ref().take(n - 3 - 2)).await;
    let mut second = get(
        server.addr,
        &path,
        &[bearer(&token), last_event_id(&last_id)],
    )
    .await;
    assert_eq!(second.status, StatusCode::OK);
    let rest: Vec<AgentEvent> = c.by_ref().collect();
    assert_eq!(rest.len(), 2);
    let publisher = publish_in_background(&hub, rest);
    // A session stream stays open: read until every run is whole.
    while received.len() < 3 * n {
        let event = second.next_event().await.expect("the stream ended");
        received.push(event.envelope());
        last_id = event.id();
    }
    publisher.await.unwrap();
    drop(second);

    for run in runs {
        let of_run: Vec<RuntimeEventEnvelope> = received
            .iter()
            .filter(|e| e.run_id == run)
            .cloned()
            .collect();
        let seqs: Vec<u64> = of_run.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>(), "run {run}");
        assert_eq!(of_run, hub.replay(run, 0, 1000).await.unwrap());
        assert_eq!(last_id.parse::<Cursor>().unwrap().seq(run), n as u64);
    }
    assert_eq!(received.len(), 3 * n);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_grant_get_401_or_403_and_no_event() {
    let server = Server::start(settings()).await;
    let hub = server.hub().clone();
    let (session, token) = server.session();
    let run = server.run_in(session);
    // A whole run in the store: something a leak would show.
    publish(&hub, demo::events(run, session)).await;
    let (other_session, other_token) = server.session();
    let other_run = server.run_in(other_session);
    let run_path = format!("/runs/{run}/events");
    let session_path = format!("/sessions/{session}/events");
    let header = |value: &str| ("authorization", HeaderValue::from_str(value).unwrap());

    let unauthenticated = [
        (run_path.clone(), vec![]),
        (run_path.clone(), vec![bearer("not-a-token")]),
        (format!("{run_path}?token=not-a-token"), vec![]),
        (format!("{run_path}?token="), vec![]),
        (run_path.clone(), vec![header("Bearer ")]),
        // Credentials of another scheme, even holding a good token.
        (run_path.clone(), vec![header(&format!("Basic {token}"))]),
        (session_path.clone(), vec![]),
        (session_path.clone(), vec![bearer("not-a-token")]),
    ];
    for (path, headers) in unauthenticated {
        let reply = get(server.addr, &path, &headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path} {headers:?}");
        assert!(reply.header("www-authenticate").starts_with("Bearer"));
        assert!(reply.header("content-type").starts_with("text/plain"));
        let body = reply.text().await;
        assert!(!body.contains("data:") && !body.contains("id:"), "{body}");
    }

    let forbidden = [
        (run_path.clone(), vec![bearer(&other_token)]),
        (format!("{run_path}?token={other_token}"), vec![]),
        (session_path.clone(), vec![bearer(&other_token)]),
        (format!("/runs/{other_run}/events"), vec![bearer(&token)]),
        (
            format!("/sessions/{other_session}/events"),
            vec![bearer(&token)],
        ),
    ];
    for (path, headers) in forbidden {
        let reply = get(server.addr, &path, &headers).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path} {headers:?}");
        let body = reply.text().await;
        assert!(body.starts_with("this token does not grant"), "{body}");
        assert!(!body.contains("data:") && !body.contains("id:"), "{body}");
    }

    // The right token, through the query as an EventSource sends it, reads
    // the run: the refusals above were about the grant.
    let mut granted = get(server.addr, &format!("{run_path}?token={token}"), &[]).await;
    assert_eq!(granted.status, StatusCode::OK);
    assert_eq!(granted.events_to_end().await.len() as u64, demo::run_len());
    let demo = request(server.addr, Method::POST, "/demo/runs", &[]).await;
    assert_eq!(demo.status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_foreign_cursors_are_refused_and_the_server_keeps_serving() {
    let server = Server::start(settings()).await;
    let hub = server.hub().clone();
    let (session, token) = server.session();
    let run = server.run_in(session);
    let n = publish(&hub, demo::events(run, session)).await;
    let epoch = hub.epoch();
    let path = format!("/runs/{run}/events");

    let malformed = [
        HeaderValue::from_static("garbage"),
        HeaderValue::from_static("x/"),
        HeaderValue::from_str(&format!("{epoch}/{run}:many")).unwrap(),
        HeaderValue::from_str(&format!("{epoch}/{run}:1,{run}:2")).unwrap(),
        HeaderValue::from_str(&format!("{epoch}/{run}")).unwrap(),
        // Not even text: bytes a header may carry but a cursor never does.
        HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
    ];
    for value in malformed {
        let reply = get(
            server.addr,
            &path,
            &[bearer(&token), ("last-event-id", value.clone())],
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{value:?}");
        assert!(reply.header("content-type").starts_with("text/plain"));
        let body = reply.text().await;
        assert!(body.starts_with("Last-Event-ID is not"), "{body}");
        // The server is still serving, and whole.
        let mut good = get(server.addr, &path, &[bearer(&token)]).await;
        assert_eq!(good.status, StatusCode::OK);
        assert_eq!(good.events_to_end().await.len() as u64, n);
    }
    let reply = get(
        server.addr,
        &format!("{path}?after=garbage"),
        &[bearer(&token)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.text().await.starts_with("after is not a cursor"));

    // Well-formed, but not history this store has: 409.
    let foreign = Cursor::at(Uuid::now_v7(), run, 3).to_string();
    let reply = get(
        server.addr,
        &path,
        &[bearer(&token), last_event_id(&foreign)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.text().await.contains("epoch"));
    let ahead = Cursor::at(epoch, run, n + 5).to_string();
    let reply = get(server.addr, &path, &[bearer(&token), last_event_id(&ahead)]).await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.text().await.contains(&format!("only up to seq {n}")));

    // `?after=` resumes a first request; `Last-Event-ID` wins over it, as
    // on an EventSource's reconnect to the same URL.
    let at = |seq| Cursor::at(epoch, run, seq).to_string();
    let mut after = get(
        server.addr,
        &format!("{path}?after={}", at(10)),
        &[bearer(&token)],
    )
    .await;
    let seqs: Vec<u64> = after
        .events_to_end()
        .await
        .iter()
        .map(|e| e.envelope().seq)
        .collect();
    assert_eq!(seqs, (11..=n).collect::<Vec<_>>());
    let mut both = get(
        server.addr,
        &format!("{path}?after={}", at(10)),
        &[bearer(&token), last_event_id(&at(20))],
    )
    .await;
    let seqs: Vec<u64> = both
        .events_to_end()
        .await
        .iter()
        .map(|e| e.envelope().seq)
        .collect();
    assert_eq!(seqs, (21..=n).collect::<Vec<_>>());
    server.stop().await;
}

/// A session stream resumed with a cursor that also names runs of other
/// sessions (one it claims to be ahead of, one retention removed, one that
/// never existed) tells the client nothing about them: 200 and exactly the
/// session's events, never a 409 or 410 carrying another room's facts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cursor_naming_other_sessions_runs_reveals_nothing_over_http() {
    let server = Server::start(settings()).await;
    let hub = server.hub().clone();
    let (session, token) = server.session();
    let mine = server.run_in(session);
    let mut events = demo::events(mine, session);
    let mut last = publish(&hub, events.by_ref().take(5)).await;
    let (other, _) = server.session();
    let (existing, removed) = (server.run_in(other), server.run_in(other));
    publish(&hub, demo::events(existing, other).take(4)).await;
    publish(&hub, demo::events(removed, other)).await;
    let far = chrono::Utc::now() + chrono::Duration::days(1);
    let gone = hub.store().remove_ended_before(far, 100).await.unwrap();
    assert_eq!(gone.runs, vec![removed]);
    let epoch = hub.epoch();
    let path = format!("/sessions/{session}/events");
    let never = RunId::new();

    for (what, foreign) in [
        ("a run it is ahead of", format!("{existing}:99")),
        ("a removed run, partway", format!("{removed}:2")),
        ("a run that never existed", format!("{never}:7")),
    ] {
        let id = format!("{epoch}/{mine}:2,{foreign}");
        let mut reply = get(server.addr, &path, &[bearer(&token), last_event_id(&id)]).await;
        if reply.status != StatusCode::OK {
            let status = reply.status;
            panic!("{what}: {status} {:?}", reply.text().await);
        }
        let check = |event: SseEvent| {
            assert_ne!(
                event.kind.as_deref(),
                Some("stream_error"),
                "{what}: {event:?}"
            );
            let envelope = event.envelope();
            assert_eq!(envelope.run_id, mine, "{what}");
            envelope.seq
        };
        for seq in 3..=last {
            assert_eq!(check(reply.next_event().await.unwrap()), seq, "{what}");
        }
        // Nothing else was owed: the next event is the one published now.
        last = publish(&hub, events.next()).await;
        assert_eq!(check(reply.next_event().await.unwrap()), last, "{what}");
    }
    server.stop().await;
}

/// A `Last-Event-ID` longer than a cursor may be is a 400 that says why,
/// before any store read; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_event_id_beyond_the_cursor_bound_is_400() {
    let server = Server::start(settings()).await;
    let (session, token) = server.session();
    let path = format!("/sessions/{session}/events");
    let mut id = format!("{}/", server.hub().epoch());
    for i in 0..=Cursor::MAX_POSITIONS {
        if i > 0 {
            id.push(',');
        }
        id.push_str(&format!("{}:1", RunId::new()));
    }
    let reply = get(server.addr, &path, &[bearer(&token), last_event_id(&id)]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = reply.text().await;
    assert!(
        body.starts_with("Last-Event-ID is not a cursor"),
        "{body:.300}"
    );
    assert!(body.contains("positions"), "{body:.300}");
    assert!(
        body.len() < 1000,
        "the body repeats the header: {}",
        body.len()
    );
    let fine = get(server.addr, &path, &[bearer(&token)]).await;
    assert_eq!(fine.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_gets_keep_alive_comments() {
    let server = Server::start(Settings {
        keep_alive: Duration::from_millis(100),
        ..settings()
    })
    .await;
    let (session, token) = server.session();
    let run = server.run_in(session);
    let mut reply = get(
        server.addr,
        &format!("/runs/{run}/events"),
        &[bearer(&token)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // Nothing is published: the first frame can only be a keep-alive.
    match reply.next_frame().await {
        Some(Frame::Comment(text)) => assert_eq!(text, ""),
        other => panic!("expected a keep-alive comment, got {other:?}"),
    }
    // The stream is alive after it: an event still arrives, and the
    // keep-alives go on.
    let mut events = demo::events(run, session);
    publish(&server.state.hub, events.next()).await;
    assert_eq!(reply.next_event().await.unwrap().envelope().seq, 1);
    assert!(matches!(reply.next_frame().await, Some(Frame::Comment(_))));
    drop(reply);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shut_down_hub_ends_open_streams_and_answers_503() {
    let server = Server::start(settings()).await;
    let (session, token) = server.session();
    let run = server.run_in(session);
    let mut open = get(
        server.addr,
        &format!("/sessions/{session}/events"),
        &[bearer(&token)],
    )
    .await;
    assert_eq!(open.status, StatusCode::OK);
    server.hub().shutdown().await.unwrap();
    // The open stream gets the reason, then ends.
    let last = open.next_event().await.expect("a stream_error event");
    assert_eq!(last.kind.as_deref(), Some("stream_error"));
    assert_eq!(last.id, None);
    assert_eq!(last.data, "runtime stream closed");
    assert!(open.next_event().await.is_none());

    let reply = get(
        server.addr,
        &format!("/runs/{run}/events"),
        &[bearer(&token)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text().await, "event hub is shut down");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_removed_by_retention_is_410_gone() {
    let server = Server::start_with(settings(), |config| {
        config
            .retain_ended_runs(Duration::from_millis(1))
            .retention_sweep_every(Duration::from_millis(10))
    })
    .await;
    let (session, token) = server.session();
    let run = server.run_in(session);
    publish(server.hub(), demo::events(run, session)).await;
    let path = format!("/runs/{run}/events");
    let addr = server.addr;
    wait_until("the run to be removed", async || {
        let reply = get(addr, &path, &[bearer(&token)]).await;
        match reply.status {
            StatusCode::GONE => {
                assert!(reply.text().await.contains("removed by retention"));
                true
            }
            // Still there: the whole run, then the end.
            StatusCode::OK => false,
            other => panic!("unexpected {other}"),
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_run_started_over_http_streams_to_its_end() {
    let server = Server::start(settings()).await;
    let (session, token) = server.session();
    let reply = request(server.addr, Method::POST, "/demo/runs", &[bearer(&token)]).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let created: serde_json::Value = serde_json::from_str(&reply.text().await).unwrap();
    let run: RunId = serde_json::from_value(created["run_id"].clone()).unwrap();
    assert_eq!(created["session_id"], session.to_string());
    let events_url = created["events_url"].as_str().unwrap();
    let page_url = created["page_url"].as_str().unwrap();
    assert_eq!(page_url, format!("/runs/{run}?token={token}"));

    let mut stream = get(server.addr, events_url, &[bearer(&token)]).await;
    assert_eq!(stream.status, StatusCode::OK);
    let envelopes: Vec<RuntimeEventEnvelope> = stream
        .events_to_end()
        .await
        .iter()
        .map(SseEvent::envelope)
        .collect();
    let seqs: Vec<u64> = envelopes.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=demo::run_len()).collect::<Vec<_>>());
    assert!(envelopes.iter().all(|e| e.run_id == run));
    assert_eq!(envelopes.last().unwrap().event.kind(), "run_completed");

    let page = get(server.addr, page_url, &[]).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.header("content-type").starts_with("text/html"));
    assert!(page.text().await.contains("new EventSource("));
    let index = get(server.addr, "/", &[]).await;
    assert_eq!(index.status, StatusCode::OK);
    let bad_page = get(server.addr, "/runs/not-a-run", &[]).await;
    assert_eq!(bad_page.status, StatusCode::BAD_REQUEST);
    server.stop().await;
}

/// Chromium's path, or `None` (and a printed reason) to skip; a failure
/// instead when `BEHEST_STREAM_REQUIRE_CHROMIUM=1`, as in CI.
fn chromium_or_skip() -> Option<String> {
    let chromium = std::env::var("BEHEST_STREAM_CHROMIUM").unwrap_or_else(|_| CHROMIUM.into());
    if Path::new(&chromium).exists() {
        return Some(chromium);
    }
    let required = std::env::var("BEHEST_STREAM_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{chromium} is missing and BEHEST_STREAM_REQUIRE_CHROMIUM=1 (apt-get install chromium)"
    );
    eprintln!(
        "skipped: {chromium} is missing (apt-get install chromium; \
         BEHEST_STREAM_REQUIRE_CHROMIUM=1 makes this a failure)"
    );
    None
}

/// Loads `url` in a fresh headless Chromium (its own profile directory)
/// and returns the DOM it dumps once the page settles: Chromium holds the
/// dump while the page's network requests (the event stream) are open, up
/// to the virtual time budget. `extra` adds flags (a screenshot).
async fn chromium_dump(chromium: &str, url: &str, extra: &[String]) -> Result<String, String> {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            "--virtual-time-budget=30000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so that a hung browser is ended with
        // every helper process it started.
        .process_group(0);
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {chromium}: {e}"))?;
    let pid = child.id();
    match timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(Ok(output)) if output.status.success() => {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            Err(format!("chromium exited with {}: {tail:?}", output.status))
        }
        Ok(Err(error)) => Err(format!("waiting for chromium: {error}")),
        Err(_) => {
            if let Some(pid) = pid {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
            Err("chromium gave no DOM within 60 s".into())
        }
    }
}

/// True once the page marked the run finished.
fn page_finished(dom: &Result<String, String>) -> bool {
    dom.as_ref()
        .is_ok_and(|dom| dom.contains(r#"<span id="status" class="finished">finished</span>"#))
}

/// The page's visible text, roughly: the body without tags or script.
fn visible_text(dom: &str) -> String {
    let body = dom.split("<body>").nth(1).unwrap_or(dom);
    let body = body.split("<script>").next().unwrap_or(body);
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text
        .replace("&amp;", "&")
        .replace("&gt;", ">")
        .replace("&lt;", "<");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_shows_every_event_of_a_live_run() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let server = Server::start(settings()).await;
    let hub = server.hub().clone();
    let (session, token) = server.session();
    let run = server.run_in(session);
    let n = demo::run_len();
    let mut events = demo::events(run, session);
    // The page catches up on these from the store ...
    publish(&hub, events.by_ref().take(3)).await;
    let url = format!("http://{}/runs/{run}?token={token}", server.addr);
    let browser = tokio::spawn({
        let (chromium, url) = (chromium.clone(), url.clone());
        async move { chromium_dump(&chromium, &url, &[]).await }
    });
    // ... and gets the rest live, published once its EventSource is
    // connected (Chromium takes a few seconds to start on a busy machine).
    let deadline = Instant::now() + Duration::from_secs(60);
    while subscribers(&hub, &RuntimeRoom::Run(run)).await == 0 && !browser.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the page did not connect within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connected = !browser.is_finished();
    for event in events {
        publish(&hub, [event]).await;
        // Token pace, so that the page takes the events one by one.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut dom = browser.await.unwrap();
    // A dump that came before the end (or a browser that failed) is tried
    // again: the run is whole in the store now, and the page replays it.
    let overall = Instant::now() + Duration::from_secs(180);
    let mut attempts = 1;
    while !page_finished(&dom) {
        eprintln!("page not finished after attempt {attempts}: {dom:?}");
        assert!(Instant::now() < overall, "the page never finished");
        attempts += 1;
        dom = chromium_dump(&chromium, &url, &[]).await;
    }
    let dom = dom.unwrap();

    for seq in 1..=n {
        let item = format!(r#"<li data-seq="{seq}""#);
        assert_eq!(dom.matches(&item).count(), 1, "seq {seq} not exactly once");
    }
    assert!(!dom.contains(&format!(r#"data-seq="{}""#, n + 1)));
    assert_eq!(dom.matches("<li ").count() as u64, n);
    assert!(dom.contains(&format!(r#"<span id="count">{n}</span>"#)));
    assert!(dom.contains("<title>run · finished</title>"));
    assert!(dom.contains(r#"<span id="outcome">(run_completed)</span>"#));
    assert!(dom.contains("Let me look up the weather in Lisbon. It is sunny in Lisbon today"));
    assert!(dom.contains(r#"<li data-seq="1" data-type="run_started""#));
    println!(
        "page in headless Chromium (attempt {attempts}, connected while live: {connected}):\n{}",
        visible_text(&dom)
    );

    // A picture of the page, for a person to look at (the run is finished,
    // so the page replays it whole).
    if let Ok(path) = std::env::var("BEHEST_STREAM_SCREENSHOT") {
        let flags = [
            format!("--screenshot={path}"),
            "--window-size=1000,800".into(),
        ];
        chromium_dump(&chromium, &url, &flags).await.unwrap();
        println!("screenshot in {path}");
    }
    server.stop().await;
}
