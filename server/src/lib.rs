//! # behest-stream-server
//!
//! behest-stream over HTTP. [`router`] gives an `axum::Router` that an agent
//! host mounts in its own app; the `behest-stream-server` binary serves one
//! on its own.
//!
//! It speaks the [Durable Streams] protocol at `/v1/stream/{path}`: create,
//! append (with idempotent producers), close, fork, delete, and reads from
//! any offset as catch-up, long-poll or SSE. Every stream is a run of the
//! hub, so the hub's room orders its appends, its store writes them through
//! (group commit, `Flushed` by default), and its fan-out serves live
//! readers; on the NATS backend streams are shared by hosts like runs are.
//! Agent runs published in Rust read as JSON streams of envelopes at
//! `/v1/stream/runs/{run_id}`.
//!
//! [Durable Streams]: https://github.com/durable-streams/durable-streams

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::unwrap_used
)]

mod agui;
mod aisdk;
mod auth;
mod catalog;
mod http;
mod message;
pub mod native;
mod offset;
mod problem;
mod session_view;
mod sse;
mod streams;
mod views;
mod writers;

use std::sync::Arc;

use axum::Router;
use axum::routing::any;
use behest_stream::{EventHub, HubError, RunId};
use uuid::Uuid;

pub use auth::{Access, Authorize, BearerTokens, Denied, Grant, Open};
pub use http::Options;
pub use problem::Problem;

/// The provider named by the `RunStarted` of every stream's run. A hub
/// with run leases (`Config::run_lease`) must exempt it
/// (`Config::exempt_from_lease`), or a stream nobody appends to for a lease
/// would be ended as abandoned.
pub const STREAMS_PROVIDER: &str = "durable-streams";

/// The run that holds the catalog of streams, unless
/// [`router_with`] is given another.
pub const CATALOG_RUN: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_d5d5_d5d5_d5d5);

/// The Durable Streams routes over `hub`, with default [`Options`].
///
/// Reads the catalog of streams from the hub's store first (every stream a
/// previous server created on this store is there again).
pub async fn router(hub: EventHub, auth: impl Authorize) -> Result<Router, HubError> {
    router_with(hub, auth, Options::default(), RunId::from_uuid(CATALOG_RUN)).await
}

/// [`router`] with `options`, and the catalog in the run `catalog_run`
/// (servers sharing a store each need their own).
pub async fn router_with(
    hub: EventHub,
    auth: impl Authorize,
    options: Options,
    catalog_run: RunId,
) -> Result<Router, HubError> {
    let streams = streams::Streams::open(hub, catalog_run).await?;
    let shared = Arc::new(http::Shared {
        streams,
        auth: Box::new(auth),
        options,
    });
    spawn_sweeper(Arc::downgrade(&shared));
    Ok(Router::new()
        .route("/v1/stream/{*path}", any(http::stream))
        .route(
            "/v1/agui/runs/{run_id}",
            axum::routing::get(views::agui_run).options(http::preflight),
        )
        .route(
            "/v1/aisdk/runs/{run_id}",
            axum::routing::get(views::aisdk_run).options(http::preflight),
        )
        .route(
            "/v1/agui/sessions/{session_id}",
            axum::routing::get(session_view::agui_session).options(http::preflight),
        )
        .layer(axum::middleware::map_response(http::security_headers))
        .with_state(shared))
}

/// Deletes expired streams now and then, for as long as the router lives.
fn spawn_sweeper(shared: std::sync::Weak<http::Shared>) {
    tokio::spawn(async move {
        loop {
            let every = match shared.upgrade() {
                Some(s) => s.options.sweep_every,
                None => return,
            };
            tokio::time::sleep(every).await;
            let Some(s) = shared.upgrade() else { return };
            if let Err(e) = s.streams.sweep().await {
                tracing::warn!(error = ?e, "deleting expired streams failed");
            }
        }
    });
}
