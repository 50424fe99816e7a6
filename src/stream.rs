//! Transport-neutral runtime stream primitives: the envelope, the routing key
//! and the stream type (the seed's public contract, kept exactly).
//!
//! - [`RuntimeStreamAdapter`](crate::RuntimeStreamAdapter) performs best-effort
//!   live fanout only.
//! - [`RuntimeEventStore`](crate::RuntimeEventStore) is the authoritative
//!   replay source.
//! - Delivery through those traits is at-least-once; consumers deduplicate via
//!   [`RuntimeEventId`] or [`RuntimeEventEnvelope::seq`].
//! - Authorization is **not** modeled here; rooms express fanout routing only
//!   and must be gated by the transport/service layer before subscription.

use std::fmt;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use crate::event::AgentEvent;
use crate::ids::{ProviderId, RunId};

/// Globally unique identifier for a single runtime event.
///
/// [`RuntimeEventId::new`] mints a fresh, time-ordered id (UUIDv7). A newtype so
/// that an arbitrary [`Uuid`] cannot be passed where an event identity is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuntimeEventId(Uuid);

impl RuntimeEventId {
    /// Mints a new time-ordered event id.
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing [`Uuid`] as a [`RuntimeEventId`].
    #[must_use]
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// Views the underlying [`Uuid`].
    #[must_use]
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for RuntimeEventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RuntimeEventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<RuntimeEventId> for Uuid {
    fn from(value: RuntimeEventId) -> Self {
        value.0
    }
}

/// Envelope wrapping an [`AgentEvent`] with routing and ordering metadata.
///
/// `seq` is monotonic per `run_id` (1, 2, 3, … with no gap); it is the unit
/// clients use to resume a stream after a disconnect (`run_id + seq`).
/// `event_id` is globally unique and is the canonical deduplication key when
/// the same envelope is delivered more than once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeEventEnvelope {
    /// Globally unique event identity.
    pub event_id: RuntimeEventId,
    /// Per-run monotonic sequence number.
    pub seq: u64,
    /// Run this event belongs to.
    pub run_id: RunId,
    /// Session this event belongs to, when known from `RunStarted`.
    pub session_id: Option<Uuid>,
    /// The wrapped runtime event.
    pub event: AgentEvent,
    /// When the envelope was emitted by the runtime.
    pub emitted_at: DateTime<Utc>,
}

impl RuntimeEventEnvelope {
    /// Returns the run identifier carried by the wrapped event.
    #[must_use]
    pub fn run_id(&self) -> RunId {
        self.event.run_id()
    }

    /// Delegates to [`AgentEvent::is_terminal`]: true for `RunCompleted`,
    /// `RunFailed` and `RunCancelled`.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        self.event.is_terminal()
    }
}

/// Fanout routing key, inspired by a Socket.IO room but transport-neutral.
///
/// A room expresses **where** an event is fanned out; it carries no
/// authorization. A transport or service layer must authorize subscriptions
/// before they reach a [`RuntimeRoom`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuntimeRoom {
    /// All events of one run.
    Run(RunId),
    /// All events of one session.
    Session(Uuid),
    /// All events of one provider.
    Provider(ProviderId),
}

impl fmt::Display for RuntimeRoom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeRoom::Run(run_id) => write!(f, "run:{run_id}"),
            RuntimeRoom::Session(session_id) => write!(f, "session:{session_id}"),
            RuntimeRoom::Provider(provider_id) => write!(f, "provider:{provider_id}"),
        }
    }
}

/// Owned, type-erased stream of runtime event envelopes.
///
/// Subscriptions return this; it yields `Err` on lag or closure and
/// `Ok(envelope)` for delivered events.
pub type BoxRuntimeEventStream =
    Pin<Box<dyn Stream<Item = Result<RuntimeEventEnvelope, RuntimeStreamError>> + Send + 'static>>;

/// Errors raised by a [`RuntimeStreamAdapter`](crate::RuntimeStreamAdapter)
/// and by subscription streams.
///
/// Live fanout is best-effort, so these are recoverable: callers fall back to
/// the event store for replay and deduplicate by `event_id` or `seq`.
#[derive(Debug, Error)]
pub enum RuntimeStreamError {
    /// A live publish could not be delivered to any live consumer.
    #[error("runtime stream publish failed: {message}")]
    Publish {
        /// Human-readable diagnostic.
        message: String,
    },
    /// A subscriber lagged behind the live stream and skipped events.
    ///
    /// Surfaced as an error so the consumer decides whether to tolerate the
    /// gap or reconcile from the event store.
    #[error("runtime stream subscriber lagged, skipped {skipped} events")]
    Lagged {
        /// Number of events the receiver skipped.
        skipped: u64,
    },
    /// A subscription could not be established.
    #[error("runtime stream subscribe failed: {message}")]
    Subscribe {
        /// Human-readable diagnostic.
        message: String,
    },
    /// The live stream has been closed and will yield no further events.
    #[error("runtime stream closed")]
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_room_display_is_stable() {
        let id = RunId::from_uuid(Uuid::nil());
        assert_eq!(RuntimeRoom::Run(id).to_string(), format!("run:{id}"));
        assert_eq!(
            RuntimeRoom::Run(id).to_string(),
            "run:00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn session_room_display_is_stable() {
        let id = Uuid::nil();
        assert_eq!(
            RuntimeRoom::Session(id).to_string(),
            format!("session:{id}")
        );
    }

    #[test]
    fn provider_room_display_is_stable() {
        let id = ProviderId::new("acme");
        let expected = format!("provider:{id}");
        assert_eq!(RuntimeRoom::Provider(id).to_string(), expected);
        assert_eq!(expected, "provider:acme");
    }

    #[test]
    fn stream_error_messages_are_the_seeds() {
        let publish = RuntimeStreamError::Publish {
            message: "no route".into(),
        };
        let subscribe = RuntimeStreamError::Subscribe {
            message: "denied".into(),
        };
        assert_eq!(
            publish.to_string(),
            "runtime stream publish failed: no route"
        );
        assert_eq!(
            RuntimeStreamError::Lagged { skipped: 7 }.to_string(),
            "runtime stream subscriber lagged, skipped 7 events"
        );
        assert_eq!(
            subscribe.to_string(),
            "runtime stream subscribe failed: denied"
        );
        assert_eq!(
            RuntimeStreamError::Closed.to_string(),
            "runtime stream closed"
        );
    }

    #[test]
    fn event_ids_are_v7_and_round_trip_through_uuid() {
        let id = RuntimeEventId::new();
        assert_eq!(id.as_uuid().get_version_num(), 7);
        let uuid: Uuid = id.into();
        assert_eq!(RuntimeEventId::from_uuid(uuid), id);
        assert_eq!(id.to_string(), uuid.to_string());
    }
}
