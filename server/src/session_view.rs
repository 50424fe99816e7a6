//! A session as AG-UI events: `GET /v1/agui/sessions/{session_id}`, SSE of
//! every run of the session, one after another in the order they started,
//! each from `RUN_STARTED` to `RUN_FINISHED` or `RUN_ERROR` (AG-UI allows a
//! new run in a stream once the last one finished), with `threadId` = the
//! session. The response then waits for the session's next run, sending
//! keep-alives, until the server's SSE time limit; the client reconnects.
//!
//! Each event's `id:` is `RUN_ID.SEQ.K`: its run, then its position in that
//! run's view. A client that reconnects with `Last-Event-ID` (or `?after=`)
//! continues from there with no gap and no duplicate, inside a text message
//! too, then with the runs that started after that run.
//!
//! Runs are served whole and in turn, so a run that started while an
//! earlier one of the session is still open is shown once that one ends
//! (which a lease guarantees even if its producer died: see
//! `Config::run_lease`). A chat session's runs (one per turn) rarely
//! overlap.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use behest_stream::{Resume, RunId, RuntimeRoom, SharedEventStream};
use futures_util::StreamExt;
use uuid::Uuid;

use crate::agui::ViewPosition;
use crate::auth::Access;
use crate::http::{AppState, authorize, bearer};
use crate::problem::Problem;
use crate::sse;
use crate::views::{Format, View, resume_text};

/// Where a session view resumes: a run of the session and a position in
/// its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SessionPosition {
    run: RunId,
    at: ViewPosition,
}

impl SessionPosition {
    /// `RUN_ID.SEQ.K`.
    fn parse(text: &str) -> Option<Self> {
        let (run, at) = text.split_once('.')?;
        Some(Self {
            run: RunId::from_uuid(Uuid::parse_str(run).ok()?),
            at: ViewPosition::parse(at)?,
        })
    }
}

/// `GET /v1/agui/sessions/{session_id}`.
pub(crate) async fn agui_session(
    State(state): State<AppState>,
    Path(session): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match session_view(state, &session, query.as_deref(), &headers).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

async fn session_view(
    state: AppState,
    session: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, Problem> {
    let session = Uuid::parse_str(session).map_err(|_| Problem::not_found())?;
    authorize(
        &state,
        bearer(headers),
        &format!("sessions/{session}"),
        Access::Read,
    )?;
    let after = resume_text(query, headers)?
        .map(|text| {
            SessionPosition::parse(&text).ok_or_else(|| {
                Problem::bad_request("a session view position is RUN_ID.SEQ.K (the id of an event)")
            })
        })
        .transpose()?;
    let runs = state
        .streams
        .hub()
        .store()
        .session_runs(session)
        .await
        .map_err(behest_stream::HubError::from)?;
    let next = match after {
        None => 0,
        Some(position) => runs
            .iter()
            .position(|run| *run == position.run)
            .ok_or_else(|| Problem::bad_request("the position names no run of this session"))?,
    };
    let deadline = tokio::time::Instant::now() + state.options.sse_max_duration;
    let view = SessionView {
        state,
        session,
        runs,
        next,
        after,
        current: None,
        served: None,
        waking: None,
        last_write: tokio::time::Instant::now(),
        deadline,
    };
    let body = futures_util::stream::unfold(view, |mut view| async move {
        let bytes = view.next().await?;
        Some((Ok::<_, Infallible>(bytes), view))
    });
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
    Ok(response)
}

/// One session view response.
struct SessionView {
    state: AppState,
    session: Uuid,
    /// The session's runs in start order, as last read.
    runs: Vec<RunId>,
    /// Index in `runs` of the next run to serve.
    next: usize,
    /// The resume position, for the first run served.
    after: Option<SessionPosition>,
    current: Option<View>,
    /// The run served last, to find the next one in a fresh read of the
    /// session's runs.
    served: Option<RunId>,
    /// A live subscription to the session, open while the view waits for
    /// its next run: any envelope it yields belongs to a run not served yet.
    waking: Option<SharedEventStream>,
    last_write: tokio::time::Instant,
    deadline: tokio::time::Instant,
}

impl SessionView {
    async fn next(&mut self) -> Option<Bytes> {
        let bytes = self.produce().await?;
        self.last_write = tokio::time::Instant::now();
        Some(bytes)
    }

    async fn produce(&mut self) -> Option<Bytes> {
        loop {
            if let Some(view) = &mut self.current {
                if let Some(bytes) = view.next().await {
                    return Some(bytes);
                }
                if !view.is_run_ended() {
                    // The deadline, or the hub stopped: the client resumes.
                    return None;
                }
                self.current = None;
            }
            if let Some(&run) = self.runs.get(self.next) {
                self.next += 1;
                self.served = Some(run);
                let after = self.after.take().filter(|a| a.run == run).map(|a| a.at);
                let view = View::open(
                    &self.state,
                    Format::AgUi,
                    run,
                    after,
                    format!("{run}."),
                    self.deadline,
                )
                .await
                .ok()?;
                self.current = Some(view);
                continue;
            }
            // Every run served: wait for the session's next. Subscribe
            // before reading the runs again, so that none starts unseen
            // in between.
            let hub = self.state.streams.hub();
            if self.waking.is_none() {
                let live = hub
                    .subscribe_shared(RuntimeRoom::Session(self.session), Resume::Live)
                    .await
                    .ok()?;
                self.waking = Some(live);
                if self.reread_runs().await? {
                    self.waking = None;
                    continue;
                }
            }
            let now = tokio::time::Instant::now();
            if now >= self.deadline {
                return None;
            }
            let idle_until =
                (self.last_write + self.state.options.sse_keep_alive).min(self.deadline);
            let waking = self.waking.as_mut()?;
            match tokio::time::timeout_at(idle_until, waking.next()).await {
                Err(_) if idle_until >= self.deadline => return None,
                Err(_) => return Some(Bytes::from_static(sse::KEEP_ALIVE.as_bytes())),
                // A run of the session not served yet: read the runs again.
                Ok(Some(Ok(_))) => self.waking = None,
                Ok(_) => return None,
            }
            self.reread_runs().await?;
        }
    }

    /// Reads the session's runs again and points `next` after the run
    /// served last; says whether a run is left to serve.
    async fn reread_runs(&mut self) -> Option<bool> {
        let hub = self.state.streams.hub();
        self.runs = hub.store().session_runs(self.session).await.ok()?;
        self.next = match self.served {
            None => 0,
            Some(served) => self
                .runs
                .iter()
                .position(|run| *run == served)
                .map_or(self.runs.len(), |i| i + 1),
        };
        Some(self.next < self.runs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_position_names_a_run_and_a_position_in_it() {
        let run = RunId::new();
        let position = SessionPosition::parse(&format!("{run}.12.1")).unwrap();
        assert_eq!(position.run, run);
        assert_eq!(position.at, ViewPosition { seq: 12, index: 1 });
        for bad in ["", "12.1", &format!("{run}"), &format!("{run}.12"), "x.1.2"] {
            assert_eq!(SessionPosition::parse(bad), None, "{bad:?}");
        }
    }
}
