//! `EventHub` as the seed's two traits, so a host written against
//! `Arc<dyn RuntimeEventStore>` and `Arc<dyn RuntimeStreamAdapter>` uses it
//! unchanged.

use async_trait::async_trait;

use super::EventHub;
use crate::error::HubError;
use crate::event::AgentEvent;
use crate::ids::RunId;
use crate::stream::{BoxRuntimeEventStream, RuntimeEventEnvelope, RuntimeRoom, RuntimeStreamError};
use crate::traits::{RuntimeEventStore, RuntimeEventStoreError, RuntimeStreamAdapter};

/// `append` sequences, stores and fans out (it is [`EventHub::publish`]);
/// `list_after` reads the store.
#[async_trait]
impl RuntimeEventStore for EventHub {
    async fn append(
        &self,
        event: AgentEvent,
    ) -> Result<RuntimeEventEnvelope, RuntimeEventStoreError> {
        self.publish(event).await.map_err(store_error)
    }

    async fn list_after(
        &self,
        run_id: RunId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, RuntimeEventStoreError> {
        self.replay(run_id, after_seq, limit)
            .await
            .map_err(store_error)
    }
}

/// Live-only, as the seed defines it: `publish` fans an envelope out to the
/// room's current subscribers without storing it (an envelope the hub has
/// already fanned out, recognised by its event id among the room's recent
/// ones, is not delivered twice); `subscribe` yields what is fanned out from
/// now on, reporting lag as [`RuntimeStreamError::Lagged`].
#[async_trait]
impl RuntimeStreamAdapter for EventHub {
    async fn publish(
        &self,
        room: &RuntimeRoom,
        envelope: RuntimeEventEnvelope,
    ) -> Result<(), RuntimeStreamError> {
        self.live_publish(room.clone(), envelope).await
    }

    async fn subscribe(
        &self,
        room: &RuntimeRoom,
    ) -> Result<BoxRuntimeEventStream, RuntimeStreamError> {
        self.live(room.clone())
            .await
            .map_err(|e| super::follow::subscribe_error(&e))
    }
}

fn store_error(error: HubError) -> RuntimeEventStoreError {
    let message = error.to_string();
    match error {
        HubError::RunClosed { .. } | HubError::TooLarge { .. } | HubError::Closed => {
            RuntimeEventStoreError::Rejected { message }
        }
        HubError::RunRemoved { .. } => RuntimeEventStoreError::Rejected { message },
        HubError::Store(crate::error::StoreError::Corrupt { .. })
        | HubError::Store(crate::error::StoreError::CorruptRunRecord { .. }) => {
            RuntimeEventStoreError::Corrupt { message }
        }
        _ => RuntimeEventStoreError::Storage { message },
    }
}
