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

use std::collections::HashSet;
use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use behest_stream::{Resume, RunId, RuntimeRoom, SharedEventStream};
use futures_util::StreamExt;
use uuid::Uuid;

use crate::agui::ViewPosition;
use crate::auth::Access;
use crate::http::{AppState, authorize, bearer};
use crate::problem::Problem;
use crate::sse;
use crate::views::{Format, View, resume_text, sse_response};

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
    // Under `runs/`, which no stream path may take, so that a stream's
    // grant never reads a session, nor the other way round.
    authorize(
        &state,
        bearer(headers),
        &format!("runs/sessions/{session}"),
        Access::Read,
    )?;
    let after = resume_text(query, headers)?
        .map(|text| {
            SessionPosition::parse(&text).ok_or_else(|| {
                Problem::bad_request("a session view position is RUN_ID.SEQ.K (the id of an event)")
            })
        })
        .transpose()?;
    let store = state.streams.hub().store();
    let runs = store
        .session_runs(session)
        .await
        .map_err(behest_stream::HubError::from)?;
    let mut served = HashSet::new();
    if let Some(position) = after {
        match runs.iter().position(|run| *run == position.run) {
            // The client has the runs before its position's.
            Some(index) => served.extend(runs[..index].iter().copied()),
            // Retention removed the position's run since: the client has
            // it and every run that started before it.
            None => {
                let gone = store
                    .run_info(position.run)
                    .await
                    .map_err(behest_stream::HubError::from)?
                    .filter(|info| info.is_removed() && info.session_id == Some(session))
                    .ok_or_else(|| {
                        Problem::bad_request("the position names no run of this session")
                    })?;
                served.insert(position.run);
                for run in &runs {
                    let info = store
                        .run_info(*run)
                        .await
                        .map_err(behest_stream::HubError::from)?;
                    if info.is_some_and(|info| info.started_at <= gone.started_at) {
                        served.insert(*run);
                    }
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + state.options.sse_max_duration;
    let view = SessionView {
        state,
        session,
        runs,
        next: 0,
        after,
        current: None,
        served,
        waking: None,
        last_write: tokio::time::Instant::now(),
        deadline,
    };
    Ok(sse_response(futures_util::stream::unfold(
        view,
        |mut view| async move {
            let bytes = view.next().await?;
            Some((Ok::<_, Infallible>(bytes), view))
        },
    )))
}

/// One session view response.
struct SessionView {
    state: AppState,
    session: Uuid,
    /// The session's runs in start order, as last read.
    runs: Vec<RunId>,
    /// Index in `runs` of the next run to look at.
    next: usize,
    /// The resume position, for the first run served.
    after: Option<SessionPosition>,
    current: Option<View>,
    /// The runs served (or that the client had before its position): a
    /// fresh read of the session's runs serves the others, in order, so
    /// that a run retention removed meanwhile shifts nothing. At most the
    /// session's runs.
    served: HashSet<RunId>,
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
                if !self.served.insert(run) {
                    continue;
                }
                let after = self.after.filter(|a| a.run == run).map(|a| a.at);
                match View::open(
                    &self.state,
                    Format::AgUi,
                    run,
                    after,
                    format!("{run}."),
                    self.deadline,
                )
                .await
                {
                    Ok(view) => self.current = Some(view),
                    // Retention removed it: nothing of it to serve.
                    Err(problem) if problem.status() == axum::http::StatusCode::GONE => {}
                    Err(problem) => {
                        tracing::warn!(session = %self.session, %run, status = %problem.status(), "session view cannot read a run; the client resumes");
                        return None;
                    }
                }
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

    /// Reads the session's runs again; says whether one is left to serve.
    async fn reread_runs(&mut self) -> Option<bool> {
        let hub = self.state.streams.hub();
        self.runs = hub.store().session_runs(self.session).await.ok()?;
        self.next = 0;
        Some(self.runs.iter().any(|run| !self.served.contains(run)))
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
