//! The store actor's supervisor: restarts the store actor if it fails, with
//! the same database, and gives up (closing the store) if it keeps failing.
//!
//! An append the failed actor had not yet handed to sled is answered
//! `Interrupted` (nothing stored); one it was writing is answered in doubt
//! (`FlushFailed`); a batch is applied whole or not at all, never half.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::Counters;
use super::actor::{StoreActor, StoreArgs, StoreMsg};
use super::engine::{self, RunCache, SegmentLimits};

/// Where the current store actor is, for every handle: `None` once the
/// store is closed (or given up on).
pub(crate) type ActorSlot = Arc<RwLock<Option<ActorRef<StoreMsg>>>>;

/// At most this many restarts within `RESTART_WINDOW`; beyond, the store
/// closes (every call then returns `Closed`).
const MAX_RESTARTS: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(10);

pub(crate) struct StoreSupervisor;

pub(crate) struct SupervisorArgs {
    pub(crate) db: sled::Db,
    pub(crate) next_ordinal: u64,
    pub(crate) limits: SegmentLimits,
    pub(crate) counters: Arc<Counters>,
    pub(crate) slot: ActorSlot,
}

pub(crate) struct SupervisorState {
    /// `None` once released (dropped on the blocking pool: sled's drop
    /// flushes).
    db: Option<sled::Db>,
    limits: SegmentLimits,
    counters: Arc<Counters>,
    gate: Arc<RwLock<RunCache>>,
    slot: ActorSlot,
    failures: VecDeque<Instant>,
}

impl SupervisorState {
    async fn start_actor(
        &self,
        myself: &ActorRef<()>,
        next_ordinal: u64,
    ) -> Result<(), ActorProcessingErr> {
        let db = self.db.clone().ok_or("store database already released")?;
        let args = StoreArgs {
            db,
            next_ordinal,
            limits: self.limits,
            counters: Arc::clone(&self.counters),
            gate: Arc::clone(&self.gate),
        };
        let (actor, _) = Actor::spawn_linked(None, StoreActor, args, myself.get_cell()).await?;
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = Some(actor);
        Ok(())
    }

    fn clear_slot(&self) {
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Actor for StoreSupervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let state = SupervisorState {
            db: Some(args.db),
            limits: args.limits,
            counters: args.counters,
            gate: Arc::default(),
            slot: args.slot,
            failures: VecDeque::new(),
        };
        state.start_actor(&myself, args.next_ordinal).await?;
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(_, error) => {
                // The dead actor stays in the slot until its successor
                // replaces it: handles then see `Interrupted` (retry), not
                // `Closed`.
                state.failures.retain(|t| t.elapsed() < RESTART_WINDOW);
                state.failures.push_back(Instant::now());
                if state.failures.len() > MAX_RESTARTS {
                    state.clear_slot();
                    tracing::error!(%error, failures = state.failures.len(), "store actor keeps failing; the store closes");
                    myself.stop(Some("store actor exceeded its restart intensity".into()));
                    return Ok(());
                }
                tracing::warn!(%error, "store actor failed; restarting it on the same database");
                let Some(db) = state.db.clone() else {
                    myself.stop(None);
                    return Ok(());
                };
                let next_ordinal = tokio::task::spawn_blocking(move || engine::read_ordinal(&db))
                    .await
                    .map_err(|e| e.to_string())??;
                state.start_actor(&myself, next_ordinal).await?;
            }
            SupervisionEvent::ActorTerminated(..) => {
                // A clean stop (close, or every handle dropped): done.
                state.clear_slot();
                myself.stop(None);
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.clear_slot();
        if let Some(db) = state.db.take() {
            let _ = engine::release(db, Arc::clone(&state.gate), state.limits).await;
        }
        Ok(())
    }
}
