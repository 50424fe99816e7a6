//! Agent runs in the event formats agent UIs are written against, as SSE
//! with exact resume: `GET /v1/agui/runs/{run_id}` (AG-UI) and
//! `GET /v1/aisdk/runs/{run_id}` (the AI SDK's UI message stream, which
//! ends with `data: [DONE]`; with `?resume=1`, what `useChat({ resume:
//! true })` is pointed at, a run that has ended answers 204: it has no
//! active stream).
//!
//! Each SSE event's `id:` is its position in the view, `SEQ.K`: the `K`-th
//! event mapped from the envelope at `SEQ`. A client that reconnects with
//! `Last-Event-ID` (or `?after=`) gets the events after it, no gap and no
//! duplicate: the view maps the run again from seq 1 (the mapping depends
//! on the envelopes alone) and sends only what lies after the position, so
//! a cut inside a text message continues with its next `CONTENT`, never a
//! second `START`. The response ends after the run's last event; a resume
//! past it gets 204, which tells an `EventSource` to stop.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use behest_stream::{Resume, RunId, RuntimeRoom, SharedEventStream};
use futures_util::StreamExt;

use crate::agui::{AgUiRun, ViewPosition};
use crate::aisdk::AiSdkRun;
use crate::auth::Access;
use crate::http::{AppState, authorize, bearer};
use crate::problem::Problem;
use crate::sse;

/// The format a view speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    AgUi,
    AiSdk,
}

/// A format's mapper.
#[derive(Debug)]
enum Mapper {
    AgUi(AgUiRun),
    AiSdk(AiSdkRun),
}

impl Mapper {
    fn new(format: Format) -> Self {
        match format {
            Format::AgUi => Self::AgUi(AgUiRun::default()),
            Format::AiSdk => Self::AiSdk(AiSdkRun::default()),
        }
    }

    fn map(&mut self, envelope: &behest_stream::RuntimeEventEnvelope) -> Vec<serde_json::Value> {
        match self {
            Self::AgUi(run) => run.map(envelope),
            Self::AiSdk(run) => run.map(envelope),
        }
    }

    fn is_ended(&self) -> bool {
        match self {
            Self::AgUi(run) => run.is_ended(),
            Self::AiSdk(run) => run.is_ended(),
        }
    }

    /// What follows the last event.
    fn trailer(&self) -> Option<&'static str> {
        match self {
            Self::AgUi(_) => None,
            Self::AiSdk(_) => Some("data: [DONE]\n\n"),
        }
    }
}

/// `GET /v1/agui/runs/{run_id}`.
pub(crate) async fn agui_run(
    State(state): State<AppState>,
    Path(run): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match view(&state, Format::AgUi, &run, query.as_deref(), &headers).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

/// `GET /v1/aisdk/runs/{run_id}`.
pub(crate) async fn aisdk_run(
    State(state): State<AppState>,
    Path(run): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match view(&state, Format::AiSdk, &run, query.as_deref(), &headers).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

/// Where a view resumes: `Last-Event-ID`, else `?after=`. An empty value is
/// no position, as the SSE spec has it.
pub(crate) fn resume_text(
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<String>, Problem> {
    let text = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| Problem::bad_request("Last-Event-ID is not text"))?
                .to_owned(),
        ),
        None => query
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("after="))
            .map(str::to_owned),
    };
    Ok(text.filter(|t| !t.is_empty()))
}

/// Where a run view resumes, parsed from [`resume_text`].
fn resume_position(
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<ViewPosition>, Problem> {
    resume_text(query, headers)?
        .map(|t| {
            ViewPosition::parse(&t).ok_or_else(|| {
                Problem::bad_request("a view position is SEQ.K (the id of an event)")
            })
        })
        .transpose()
}

async fn view(
    state: &AppState,
    format: Format,
    run: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, Problem> {
    let run_id = uuid::Uuid::parse_str(run)
        .map(RunId::from_uuid)
        .map_err(|_| Problem::not_found())?;
    authorize(
        state,
        bearer(headers),
        &format!("runs/{run_id}"),
        Access::Read,
    )?;
    let resuming = format == Format::AiSdk
        && query
            .unwrap_or("")
            .split('&')
            .any(|pair| pair == "resume=1" || pair == "resume=true");
    let info = match state.streams.agent_run(run_id).await {
        // A chat whose run retention removed has no active stream either.
        Err(p) if resuming && p.status() == StatusCode::GONE => {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        other => other?,
    };
    let after = resume_position(query, headers)?;
    let ended = info.is_ended();
    if resuming && ended {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if after.is_some_and(|a| a.seq > info.last_seq) {
        return Err(Problem::bad_request("the position is past the run"));
    }
    let deadline = tokio::time::Instant::now() + state.options.sse_max_duration;
    let mut view = View::open(state, format, run_id, after, String::new(), deadline).await?;
    if after.is_some() && ended {
        // Everything is stored: find whether anything follows the position
        // (the last envelope may map to several events). Nothing does: 204,
        // which tells an EventSource to stop.
        match view.next().await {
            None => return Ok(StatusCode::NO_CONTENT.into_response()),
            Some(_) if view.trailer_sent => return Ok(StatusCode::NO_CONTENT.into_response()),
            Some(bytes) => view.pending.push_front(bytes),
        }
    }
    let mut response = sse_response(futures_util::stream::unfold(view, |mut view| async move {
        let bytes = view.next().await?;
        Some((Ok::<_, Infallible>(bytes), view))
    }));
    if format == Format::AiSdk {
        response.headers_mut().insert(
            "x-vercel-ai-ui-message-stream",
            "v1".parse().expect("a header value"),
        );
    }
    Ok(response)
}

/// An SSE response of `body`.
pub(crate) fn sse_response(
    body: impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    let mut response = Body::from_stream(body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        "text/event-stream".parse().expect("a header value"),
    );
    h.insert(
        header::CACHE_CONTROL,
        "no-cache".parse().expect("a header value"),
    );
    response
}

/// One view response: the run's envelopes from seq 1, mapped, the events
/// at or before `after` left out.
pub(crate) struct View {
    events: SharedEventStream,
    run: Mapper,
    after: Option<ViewPosition>,
    /// Put before each event's position in its `id:` (a session view's
    /// run, `RUN_ID.`).
    id_prefix: String,
    pending: std::collections::VecDeque<Bytes>,
    keep_alive: Duration,
    /// When bytes last went out: the keep-alive counts from there.
    last_write: tokio::time::Instant,
    /// When the response ends (the client resumes from its last id), so
    /// that a run whose producer died holds no subscription forever.
    deadline: tokio::time::Instant,
    trailer_sent: bool,
}

impl View {
    /// A view of `run_id` in `format` that leaves out what is at or before
    /// `after` and ends at `deadline` at the latest.
    pub(crate) async fn open(
        state: &AppState,
        format: Format,
        run_id: RunId,
        after: Option<ViewPosition>,
        id_prefix: String,
        deadline: tokio::time::Instant,
    ) -> Result<Self, Problem> {
        let events = state
            .streams
            .hub()
            .subscribe_shared(RuntimeRoom::Run(run_id), Resume::FromStart)
            .await?;
        Ok(View {
            events,
            run: Mapper::new(format),
            after,
            id_prefix,
            pending: std::collections::VecDeque::new(),
            keep_alive: state.options.sse_keep_alive,
            last_write: tokio::time::Instant::now(),
            deadline,
            trailer_sent: false,
        })
    }

    /// Whether the run's last event was mapped (what follows is only the
    /// format's trailer).
    pub(crate) fn is_run_ended(&self) -> bool {
        self.run.is_ended()
    }

    /// The next bytes of the response: events, a keep-alive, the trailer;
    /// `None` once the run ended, the deadline passed or the hub stopped.
    pub(crate) async fn next(&mut self) -> Option<Bytes> {
        let bytes = self.produce().await?;
        self.last_write = tokio::time::Instant::now();
        Some(bytes)
    }

    async fn produce(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            if self.run.is_ended() {
                if self.trailer_sent {
                    return None;
                }
                self.trailer_sent = true;
                return self.run.trailer().map(|t| Bytes::from_static(t.as_bytes()));
            }
            let now = tokio::time::Instant::now();
            if now >= self.deadline {
                return None;
            }
            let idle_until = (self.last_write + self.keep_alive).min(self.deadline);
            let envelope: Arc<_> =
                match tokio::time::timeout_at(idle_until, self.events.next()).await {
                    Err(_) if idle_until >= self.deadline => return None,
                    Err(_) => return Some(Bytes::from_static(sse::KEEP_ALIVE.as_bytes())),
                    Ok(Some(Ok(envelope))) => envelope,
                    // The hub is shutting down, or the subscription failed: the
                    // client resumes from its last id.
                    Ok(_) => return None,
                };
            for (index, event) in self.run.map(&envelope).into_iter().enumerate() {
                let position = ViewPosition {
                    seq: envelope.seq,
                    index,
                };
                if self.after.is_some_and(|after| position <= after) {
                    continue;
                }
                let prefix = &self.id_prefix;
                self.pending.push_back(Bytes::from(format!(
                    "id: {prefix}{position}\ndata: {event}\n\n"
                )));
            }
        }
    }
}
