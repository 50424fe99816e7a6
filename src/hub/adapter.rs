//! `EventHub` as the seed's two traits, so a host written against behest
//! 0.3.3's `Arc<dyn RuntimeEventStore>` and `Arc<dyn RuntimeStreamAdapter>`
//! uses it with only its imports changed (the traits' signatures and the
//! error variants the seed has are the seed's).

use async_trait::async_trait;

use super::EventHub;
use crate::error::{HubError, StoreError};
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
        self.publish(event)
            .await
            .map_err(|error| RuntimeEventStoreError::Append {
                message: error.to_string(),
            })
    }

    async fn list_after(
        &self,
        run_id: RunId,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, RuntimeEventStoreError> {
        // Seqs start at 1, so "after 0" is "from the start".
        self.replay(run_id, after_seq.unwrap_or(0), limit)
            .await
            .map_err(read_error)
    }
}

/// Live-only, as the seed defines it: `publish` fans an envelope out to the
/// room's current subscribers without storing it (an envelope the hub has
/// already fanned out, recognised by its event id among the room's recent
/// ones, is not delivered twice); a room nobody listens to is not started,
/// and the publish is `Ok`. An envelope whose `run_id` is not its event's
/// is refused ([`RuntimeStreamError::Publish`] naming both runs) and
/// reaches nobody. `subscribe` yields what is fanned out from now
/// on, reporting lag as [`RuntimeStreamError::Lagged`].
#[async_trait]
impl RuntimeStreamAdapter for EventHub {
    async fn publish(
        &self,
        room: RuntimeRoom,
        event: RuntimeEventEnvelope,
    ) -> Result<(), RuntimeStreamError> {
        self.live_publish(room, event).await
    }

    async fn subscribe(
        &self,
        room: RuntimeRoom,
    ) -> Result<BoxRuntimeEventStream, RuntimeStreamError> {
        self.live(room)
            .await
            .map_err(|e| super::follow::subscribe_error(&e))
    }
}

fn read_error(error: HubError) -> RuntimeEventStoreError {
    let message = error.to_string();
    match error {
        HubError::RunRemoved { run_id, removed_at } => {
            RuntimeEventStoreError::RunRemoved { run_id, removed_at }
        }
        HubError::Store(StoreError::Corrupt { .. } | StoreError::CorruptRunRecord { .. }) => {
            RuntimeEventStoreError::Corrupt { message }
        }
        _ => RuntimeEventStoreError::Storage { message },
    }
}
