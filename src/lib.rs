//! # behest-stream
//!
//! Carries the events of AI-agent runs (run started, text deltas, tool calls,
//! usage, run finished) from the code that produces them to everyone
//! watching: live, after a disconnect, after a crash.
//!
//! This crate is built in layers. The foundation, here now:
//!
//! - the stream contract: [`RuntimeEventEnvelope`], [`RuntimeRoom`],
//!   [`RuntimeEventId`], [`BoxRuntimeEventStream`], [`RuntimeStreamError`],
//!   and the two traits [`RuntimeStreamAdapter`] and [`RuntimeEventStore`];
//! - the domain: [`RunId`], [`ProviderId`], [`AgentEvent`] and its payloads;
//! - the codec ([`codec`]): MessagePack with a format-version byte on disk,
//!   JSON for people and wires;
//! - the [`Store`]: a sled database owned by one actor, with group commit,
//!   per-run gapless seqs, and the recovery reads room actors need.
//!
//! See `ARCHITECTURE.md` for the map and the invariants.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::unwrap_used
)]

pub mod codec;
mod config;
mod error;
mod event;
mod hub;
mod ids;
pub mod metrics;
#[cfg(feature = "nats")]
pub use store::nats::log as nats;
mod store;
mod stream;
mod traits;

pub use config::{Config, DEFAULT_MAX_EVENT_BYTES, Durability, EventOrder, Retention};
pub use error::{HubError, OpenError, StoreError};
pub use event::{
    AgentEvent, ContextBuilt, CustomEvent, MessageCommitted, ModelStarted, RunCancelled,
    RunCompleted, RunFailed, RunStarted, TextDelta, TokenUsage, ToolCall, ToolCallCompleted,
    ToolCallDelta, ToolCallStarted, ToolExecutionFinished, ToolExecutionStarted, ToolResult,
    UsageRecorded,
};
pub use hub::{
    Cursor, CursorParseError, EventHub, HubStats, MAX_TOOL_CALLS_PER_RUN, OrderRule,
    PendingPublish, Resume, RoomStats, SharedEventStream,
};
pub use ids::{ProviderId, RunId};
pub use store::{Removal, RunCheck, RunInfo, Store, StoreStats};
pub use stream::{
    BoxRuntimeEventStream, RuntimeEventEnvelope, RuntimeEventId, RuntimeRoom, RuntimeStreamError,
};
pub use traits::{RuntimeEventStore, RuntimeEventStoreError, RuntimeStreamAdapter};
