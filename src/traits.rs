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
/// subscribed. The authoritative history is a [`RuntimeEventStore`].
#[async_trait]
pub trait RuntimeStreamAdapter: Send + Sync {
    /// Fans `envelope` out to the live subscribers of `room`.
    ///
    /// # Errors
    ///
    /// [`RuntimeStreamError::Publish`] when the envelope could not be handed
    /// to the fanout.
    async fn publish(
        &self,
        room: &RuntimeRoom,
        envelope: RuntimeEventEnvelope,
    ) -> Result<(), RuntimeStreamError>;

    /// Opens a live subscription to `room`.
    ///
    /// # Errors
    ///
    /// [`RuntimeStreamError::Subscribe`] when the subscription could not be
    /// established.
    async fn subscribe(
        &self,
        room: &RuntimeRoom,
    ) -> Result<BoxRuntimeEventStream, RuntimeStreamError>;
}

/// The authoritative, replayable log of run events.
#[async_trait]
pub trait RuntimeEventStore: Send + Sync {
    /// Sequences and persists `event`, returning its envelope (with `seq` and
    /// `event_id` assigned).
    ///
    /// # Errors
    ///
    /// See [`RuntimeEventStoreError`].
    async fn append(
        &self,
        event: AgentEvent,
    ) -> Result<RuntimeEventEnvelope, RuntimeEventStoreError>;

    /// Lists up to `limit` envelopes of `run_id` with `seq > after_seq`, in
    /// `seq` order.
    ///
    /// # Errors
    ///
    /// See [`RuntimeEventStoreError`].
    async fn list_after(
        &self,
        run_id: RunId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, RuntimeEventStoreError>;
}

/// Errors raised by a [`RuntimeEventStore`].
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RuntimeEventStoreError {
    /// The event was refused and nothing was stored (the run has ended, the
    /// event is too large, the store is overloaded or closed). Retrying the
    /// same event will fail the same way unless the message says otherwise.
    #[error("runtime event store rejected append: {message}")]
    Rejected {
        /// Human-readable diagnostic.
        message: String,
    },
    /// The store failed to read or write; what was acknowledged before is
    /// intact. Retrying may succeed.
    #[error("runtime event store failed: {message}")]
    Storage {
        /// Human-readable diagnostic.
        message: String,
    },
    /// A stored record could not be decoded. Other runs are unaffected.
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
