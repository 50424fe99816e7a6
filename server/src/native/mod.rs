//! The native SSE endpoints: runs and sessions as resumable SSE streams of
//! envelopes (`id:` the resume cursor, `Last-Event-ID` to resume), gated by
//! bearer tokens, and a page that shows a run live with the browser's
//! `EventSource`. `examples/sse_server.rs` serves them.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | a page with a button that starts a demo run |
//! | `GET /runs/{run_id}` | a page that shows the run's events live (`EventSource`) |
//! | `GET /runs/{run_id}/events` | the run as SSE; closes after the terminal event |
//! | `GET /sessions/{session_id}/events` | every run of the session as SSE; never closes by itself |
//! | `POST /demo/runs` | starts a simulated run in the token's session: 201 and JSON |
//!
//! The event streams answer, before any event:
//!
//! - 401 (with `WWW-Authenticate: Bearer`) without a token or with one
//!   nobody issued, 403 with a token that does not grant the room;
//! - 400 for a `Last-Event-ID` (or `?after=`) that is not a cursor;
//! - 409 for a cursor the store cannot honour: minted by another store
//!   (`HubError::CursorEpoch`: the store was replaced) or past what it holds
//!   of the room's runs (`HubError::CursorAhead`: its history is gone). The
//!   text is well-formed, so it is not a 400; the resource's state
//!   conflicts with it. A client should start over without `Last-Event-ID`;
//! - 410 for a run that retention removed (`HubError::RunRemoved`), or a
//!   session cursor partway through a removed run of that session;
//! - 204 for a run whose terminal event the cursor has already seen: the
//!   status that tells an `EventSource` to stop reconnecting;
//! - 503 while the hub is shut down or a room cannot be had right now
//!   (with `Retry-After` when a retry may succeed), 500 for anything else,
//!   with the error's text.
//!
//! An `EventSource` treats every status but 200 (and 204) as final: it
//! fires `error` and does not reconnect.
//!
//! No answer tells a client anything about a room its token does not
//! grant. A session stream's cursor may name runs of other sessions (a
//! client may send anything); the hub ignores those positions, so the
//! statuses and texts above only ever concern the session's own runs. A
//! `Last-Event-ID` longer than a cursor may be (`Cursor::MAX_POSITIONS`,
//! `Cursor::MAX_TEXT_LEN`) is a 400 before anything is read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header::{HeaderName, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use behest_stream::{
    BoxRuntimeEventStream, Cursor, EventHub, HubError, Resume, RunId, RuntimeRoom,
};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::Semaphore;
use uuid::Uuid;

pub mod auth;
pub mod demo;
#[cfg(test)]
mod tests;

use self::auth::{Denied, Tokens, token_from};

/// The page that shows one run live.
const RUN_PAGE: &str = include_str!("page.html");
/// The page at `/`.
const INDEX_PAGE: &str = include_str!("index.html");

/// Most demo runs publishing at once; `POST /demo/runs` beyond it gets 429,
/// so a client cannot pile up publishing tasks.
const MAX_DEMO_RUNS: usize = 16;

/// What the server can be tuned with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a stream may be quiet before the server sends a comment
    /// line (`:`). It keeps proxies from closing an idle stream, and makes
    /// the server write, which is how it notices a client that went away
    /// (and drops its subscription).
    pub keep_alive: Duration,
    /// Time between two text deltas of a demo run.
    pub demo_pace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            demo_pace: Duration::from_millis(80),
        }
    }
}

/// What every handler shares. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The hub the streams read.
    pub hub: EventHub,
    /// Who may read what.
    pub tokens: Arc<Tokens>,
    /// The settings.
    pub settings: Arc<Settings>,
    /// Permits for demo runs in progress (see [`MAX_DEMO_RUNS`]).
    demo_runs: Arc<Semaphore>,
}

impl AppState {
    /// State for a server over `hub`, with no tokens issued yet.
    pub fn new(hub: EventHub, settings: Settings) -> Self {
        Self {
            hub,
            tokens: Arc::default(),
            settings: Arc::new(settings),
            demo_runs: Arc::new(Semaphore::new(MAX_DEMO_RUNS)),
        }
    }

    /// Starts a simulated run in `session` on a task of its own and returns
    /// its id; `None` when `MAX_DEMO_RUNS` (16) are already running. The run is
    /// granted to the session's tokens before its first event, so a client
    /// may subscribe at once.
    pub fn start_demo_run(&self, session: Uuid) -> Option<RunId> {
        let permit = Arc::clone(&self.demo_runs).try_acquire_owned().ok()?;
        let run_id = RunId::new();
        self.tokens.grant_run(session, run_id);
        let (hub, pace) = (self.hub.clone(), self.settings.demo_pace);
        tokio::spawn(async move {
            let _permit = permit;
            match demo::run(hub, run_id, session, pace).await {
                Ok(last) => println!("demo run {run_id} completed with seq {last}"),
                Err(error) => eprintln!("demo run {run_id} stopped: {error}"),
            }
        });
        Some(run_id)
    }
}

/// The whole server, ready for `axum::serve`.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_PAGE) }))
        .route("/runs/{run_id}", get(run_page))
        .route("/runs/{run_id}/events", get(run_events))
        .route("/sessions/{session_id}/events", get(session_events))
        .route("/demo/runs", post(create_demo_run))
        .with_state(state)
}

/// The query parameters of the streams and of `POST /demo/runs`.
#[derive(Debug, Default, Deserialize)]
struct StreamQuery {
    /// A bearer token, for clients that cannot set `Authorization`.
    token: Option<String>,
    /// Where to resume from when there is no `Last-Event-ID`: an
    /// `EventSource`'s first request cannot carry that header.
    after: Option<String>,
}

/// The page is the same for every run (it reads the run from its URL); the
/// id is parsed only to answer 400 for a URL that cannot name a run. It
/// holds no data, so it needs no token: the events do.
async fn run_page(Path(_run_id): Path<Uuid>) -> Html<&'static str> {
    Html(RUN_PAGE)
}

async fn run_events(
    State(state): State<AppState>,
    Path(run_id): Path<Uuid>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    stream_room(
        state,
        RuntimeRoom::Run(RunId::from_uuid(run_id)),
        query,
        headers,
    )
    .await
}

async fn session_events(
    State(state): State<AppState>,
    Path(session_id): Path<Uuid>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    stream_room(state, RuntimeRoom::Session(session_id), query, headers).await
}

/// Authorizes, parses the resume position, subscribes, and answers with the
/// SSE stream, or with the status of the first thing that failed. Nothing
/// is subscribed before the caller is authorized, so a refused caller
/// learns nothing of the room, not even whether its cursor would parse.
async fn stream_room(
    state: AppState,
    room: RuntimeRoom,
    query: StreamQuery,
    headers: HeaderMap,
) -> Response {
    let token = token_from(&headers, query.token.as_deref());
    if let Err(denied) = state.tokens.check(token, &room) {
        return refuse(denied, &room);
    }
    let cursor = match resume_cursor(&headers, query.after.as_deref()) {
        Ok(cursor) => cursor,
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    let resume = cursor.clone().map_or(Resume::FromStart, Resume::After);
    let stream = match state.hub.subscribe(room.clone(), resume).await {
        Ok(stream) => stream,
        Err(error) => return hub_error(error),
    };
    if let (RuntimeRoom::Run(run_id), Some(cursor)) = (&room, &cursor) {
        // The stream would end at once: tell the client not to come back.
        // An `EventSource` whose page did not close it reconnects after a
        // stream ends, with the last id, and would do so forever.
        match state.hub.store().run_info(*run_id).await {
            Ok(Some(info)) if info.is_ended() && cursor.seq(*run_id) >= info.last_seq => {
                return StatusCode::NO_CONTENT.into_response();
            }
            Ok(_) => {}
            Err(error) => return hub_error(error.into()),
        }
    }
    let cursor = cursor.unwrap_or_else(|| Cursor::new(state.hub.epoch()));
    let keep_alive = KeepAlive::new().interval(state.settings.keep_alive);
    (
        // Proxies such as nginx buffer responses by default, which would
        // hold events back; this asks them not to.
        [(HeaderName::from_static("x-accel-buffering"), "no")],
        Sse::new(sse_events(stream, cursor)).keep_alive(keep_alive),
    )
        .into_response()
}

/// The resume position: `Last-Event-ID` (what a reconnecting
/// `EventSource` sends) wins over `?after=` (which its first request may
/// carry, and every reconnect repeats). Absent or empty: from the start.
fn resume_cursor(headers: &HeaderMap, after: Option<&str>) -> Result<Option<Cursor>, String> {
    let (source, text) = match headers.get("last-event-id") {
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| "Last-Event-ID is not visible ASCII".to_owned())?;
            ("Last-Event-ID", text)
        }
        None => ("after", after.unwrap_or_default()),
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<Cursor>()
        .map(Some)
        .map_err(|error| format!("{source} is not a cursor: {error}"))
}

/// The envelopes as SSE events: `id` the cursor after the envelope (the
/// resume token), `event` its type, `data` the envelope as JSON. Ends when
/// the subscription ends (after a run's terminal event), or after one
/// `stream_error` event carrying the reason when the subscription fails
/// (the hub shut down, the store failed); a client reconnects with its last
/// id and loses nothing. No buffer here: one envelope at a time from the
/// hub's bounded subscription, pulled only as fast as the client reads.
fn sse_events(
    stream: BoxRuntimeEventStream,
    cursor: Cursor,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    futures_util::stream::unfold(Some((stream, cursor)), |state| async move {
        let (mut stream, mut cursor) = state?;
        let item = match stream.next().await? {
            Ok(envelope) => match serde_json::to_string(&envelope) {
                Ok(json) => {
                    cursor.advance(&envelope);
                    Event::default()
                        .id(cursor.to_string())
                        .event(envelope.event.kind())
                        .data(json)
                }
                // Ends the stream before the envelope: a reconnect asks
                // for it again rather than skipping it.
                Err(error) => return Some((Ok(stream_error(&error)), None)),
            },
            Err(error) => return Some((Ok(stream_error(&error)), None)),
        };
        Some((Ok(item), Some((stream, cursor))))
    })
}

/// The event that ends a failed stream. It has no `id`, so the client's
/// last event id stays that of the last envelope it got.
fn stream_error(error: &dyn std::fmt::Display) -> Event {
    Event::default()
        .event("stream_error")
        .data(error.to_string())
}

/// 401 or 403, with no event; `what` names what a known token lacks.
fn refuse(denied: Denied, what: &dyn std::fmt::Display) -> Response {
    match denied {
        Denied::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            [(WWW_AUTHENTICATE, r#"Bearer realm="behest-stream""#)],
            "a bearer token is required (Authorization: Bearer <token>, or ?token=<token>)",
        )
            .into_response(),
        Denied::Forbidden => (
            StatusCode::FORBIDDEN,
            format!("this token does not grant {what}"),
        )
            .into_response(),
    }
}

/// The status of a hub error, with its text. `HubError` is non-exhaustive
/// and gains variants: anything not named here is a 500 with its text,
/// which is honest about an error this server did not plan for.
fn hub_error(error: HubError) -> Response {
    let status = match &error {
        HubError::CursorEpoch { .. } | HubError::CursorAhead { .. } => StatusCode::CONFLICT,
        HubError::RunRemoved { .. } => StatusCode::GONE,
        HubError::LiveOnly { .. } => StatusCode::BAD_REQUEST,
        HubError::Closed
        | HubError::RoomUnavailable { .. }
        | HubError::TooManyRooms { .. }
        | HubError::RoomFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        HubError::Store(store) if store.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let text = error.to_string();
    if error.is_retryable() {
        (status, [(RETRY_AFTER, "1")], text).into_response()
    } else {
        (status, text).into_response()
    }
}

/// `POST /demo/runs`: starts a demo run in the first session the caller's
/// token grants; 201 with the run's id and URLs.
async fn create_demo_run(
    State(state): State<AppState>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    let token = token_from(&headers, query.token.as_deref());
    let (token, session) = match state.tokens.session_of(token) {
        Ok(found) => found,
        Err(denied) => return refuse(denied, &"a session to start a run in"),
    };
    let Some(run_id) = state.start_demo_run(session) else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_DEMO_RUNS} demo runs are in progress; try again when one ends"),
        )
            .into_response();
    };
    let body = serde_json::json!({
        "run_id": run_id,
        "session_id": session,
        "page_url": format!("/runs/{run_id}?token={token}"),
        "events_url": format!("/runs/{run_id}/events"),
        "session_events_url": format!("/sessions/{session}/events"),
    });
    (StatusCode::CREATED, axum::Json(body)).into_response()
}
