//! The seed's two abstractions, object-safe so hosts can hold
//! `Arc<dyn RuntimeStreamAdapter>` and `Arc<dyn RuntimeEventStore>`.

use async_trait::async_trait;
use thiserror::Error;

use crate::event::AgentEvent;
use crate::ids::RunId;
use crate::stream::{BoxRuntimeEventStream, RuntimeEventEnvelope, RuntimeRoom, RuntimeStreamError};

/// Best-effort live fanout of envelopes to the subscribers of a room.
///
/// No replay, no persistence: a subscriber sees what is published after it
/// subscribed. The authoritative history is a [`RuntimeEventStore`]. The
/// signatures are behest 0.3.3's, parameter for parameter.
#[async_trait]
pub trait RuntimeStreamAdapter: Send + Sync {
    /// Fans `event` out to the live subscribers of `room`. A room nobody
    /// listens to is not an error: nothing happens.
    ///
    /// # Errors
    ///
    /// [`RuntimeStreamError::Publish`] when the envelope could not be handed
    /// to the fanout (or is malformed); [`RuntimeStreamError::Closed`] once
    /// the fanout is shut down.
    async fn publish(
        &self,
        room: RuntimeRoom,
        event: RuntimeEventEnvelope,
    ) -> Result<(), RuntimeStreamError>;

    /// Opens a live subscription to `room`.
    ///
    /// # Errors
    ///
    /// [`RuntimeStreamError::Subscribe`] when the subscription could not be
    /// established.
    async fn subscribe(
        &self,
        room: RuntimeRoom,
    ) -> Result<BoxRuntimeEventStream, RuntimeStreamError>;
}

/// The authoritative, replayable log of run events. The signatures are
/// behest 0.3.3's, parameter for parameter.
#[async_trait]
pub trait RuntimeEventStore: Send + Sync {
    /// Sequences and persists `event`, returning its envelope (with `seq` and
    /// `event_id` assigned). On error the event must not be considered
    /// persisted.
    ///
    /// # Errors
    ///
    /// [`RuntimeEventStoreError::Append`].
    async fn append(
        &self,
        event: AgentEvent,
    ) -> Result<RuntimeEventEnvelope, RuntimeEventStoreError>;

    /// Lists up to `limit` envelopes of `run_id` with `seq > after_seq`, in
    /// `seq` order; `after_seq = None` lists from the run's first envelope.
    ///
    /// # Errors
    ///
    /// See [`RuntimeEventStoreError`].
    async fn list_after(
        &self,
        run_id: RunId,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, RuntimeEventStoreError>;
}

/// Errors raised by a [`RuntimeEventStore`]. `Append` and `NotFound` are
/// the seed's variants, with its fields and messages, so a host's own
/// implementations and matches of them carry over; the others say more of
/// what a read can meet.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RuntimeEventStoreError {
    /// The event was not persisted: refused (the run has ended, the event
    /// is too large or malformed, the store is closed) or the store failed.
    /// The message names the cause. Retrying the same event fails the same
    /// way unless the message says the store failed; if it says the outcome
    /// is in doubt, read the run with `list_after` before retrying.
    #[error("runtime event store append failed: {message}")]
    Append {
        /// Human-readable diagnostic.
        message: String,
    },
    /// The requested run has no recorded events. [`crate::EventHub`] never
    /// returns it: as the seed's in-memory store does, it lists a run it has
    /// never seen as empty. For hosts' own implementations.
    #[error("runtime event store has no events for run {run_id}")]
    NotFound {
        /// Run that was queried.
        run_id: RunId,
    },
    /// Retention removed the run's events after `after_seq`: they cannot be
    /// listed again. Not retryable; a reader that needs them has lost them.
    #[error("run {run_id} was removed by retention at {removed_at}; its events are gone")]
    RunRemoved {
        /// The run.
        run_id: RunId,
        /// When retention removed it.
        removed_at: chrono::DateTime<chrono::Utc>,
    },
    /// The store failed to read; what was acknowledged before is intact.
    /// Retrying may succeed.
    #[error("runtime event store failed: {message}")]
    Storage {
        /// Human-readable diagnostic.
        message: String,
    },
    /// A stored record could not be decoded. Other runs are unaffected; this
    /// run cannot be listed past the damage.
    #[error("runtime event store holds a corrupt record: {message}")]
    Corrupt {
        /// Human-readable diagnostic naming the run and seq.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Compiles only if both traits are dyn-compatible.
    #[allow(dead_code, reason = "a compile-time check, never called")]
    fn traits_are_object_safe(
        adapter: Arc<dyn RuntimeStreamAdapter>,
        store: Arc<dyn RuntimeEventStore>,
    ) -> (Arc<dyn RuntimeStreamAdapter>, Arc<dyn RuntimeEventStore>) {
        (adapter, store)
    }
}
