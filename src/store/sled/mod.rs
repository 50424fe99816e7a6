//! The embedded backend: one sled database owned by a supervised store
//! actor, which gathers appends into group commits and serves reads on the
//! blocking pool.
//!
//! - `actor.rs`: the store actor (group commit; commits and reads on the
//!   blocking pool);
//! - `supervisor.rs`: restarts the store actor on the same database;
//! - `engine.rs`: every sled call;
//! - `commit_log.rs`: the commit records a commit writes and the envelopes
//!   they hold until compaction;
//! - `layout.rs`: keys and values on disk.

mod actor;
mod commit_log;
mod engine;
mod layout;
mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorRef, RpcReplyPort};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, oneshot};
use uuid::Uuid;

use self::actor::StoreMsg;
use self::engine::{AppendRequest, RemovalStep, SegmentLimits};
use self::supervisor::{ActorSlot, StoreSupervisor, SupervisorArgs};
use super::{AppendAck, AppendWaiter, RunCheck, RunInfo, SessionRun, StoreStats, StoredEnvelope};
use crate::config::{Config, Durability};
use crate::error::{OpenError, StoreError};
use crate::ids::RunId;
use crate::stream::RuntimeEventEnvelope;

/// The sled backend of a [`super::Store`]: the current store actor and
/// the task of its supervisor.
#[derive(Debug)]
pub(crate) struct SledBackend {
    /// The current store actor (replaced when its supervisor restarts it).
    slot: ActorSlot,
    join: Mutex<Option<tokio::task::JoinHandle<()>>>,
    path: Option<PathBuf>,
}

impl Drop for SledBackend {
    fn drop(&mut self) {
        // The last handle is gone: stop the actor (its supervisor follows),
        // which releases sled.
        if let Some(actor) = self.actor() {
            actor.stop(None);
        }
    }
}

impl SledBackend {
    /// Opens (or creates) the database `config` names and starts its
    /// supervised store actor; returns it with the store's epoch.
    pub(crate) async fn open(config: &Config) -> Result<(Self, Uuid), OpenError> {
        let path_for_errors = config.path.clone().unwrap_or_else(|| "<temporary>".into());
        let opened = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || engine::open(&config))
                .await
                .map_err(|e| OpenError::Storage {
                    path: path_for_errors.clone(),
                    message: format!("open task failed: {e}"),
                })??
        };
        let epoch = opened.epoch;
        let slot = ActorSlot::default();
        let args = SupervisorArgs {
            db: opened.db,
            next_ordinal: opened.next_ordinal,
            limits: SegmentLimits {
                max_events: config.segment_max_events,
                max_bytes: config.segment_max_bytes,
            },
            counters: Arc::default(),
            slot: Arc::clone(&slot),
        };
        let (_, join) = Actor::spawn(None, StoreSupervisor, args)
            .await
            .map_err(|e| OpenError::Storage {
                path: path_for_errors.clone(),
                message: format!("store actor failed to start: {e}"),
            })?;
        tracing::debug!(epoch = %epoch, path = ?config.path, "store open");
        let backend = Self {
            slot,
            join: Mutex::new(Some(join)),
            path: config.path.clone(),
        };
        Ok((backend, epoch))
    }

    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn actor(&self) -> Option<ActorRef<StoreMsg>> {
        self.slot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends to the current store actor (the test hooks' messages). A dead
    /// actor still in the slot is being restarted by its supervisor:
    /// `Interrupted`, retry.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn send(&self, message: StoreMsg) -> Result<(), StoreError> {
        self.actor()
            .ok_or(StoreError::Closed)?
            .send_message(message)
            .map_err(|_| StoreError::Interrupted {
                message: "the store actor is restarting".into(),
            })
    }

    /// As `send`, but waits (up to 2 s) for a restarting store actor to be
    /// replaced, so that async callers do not see the restart at all.
    async fn send_when_ready(&self, mut message: StoreMsg) -> Result<(), StoreError> {
        for _ in 0..2000 {
            let actor = self.actor().ok_or(StoreError::Closed)?;
            match actor.send_message(message) {
                Ok(()) => return Ok(()),
                Err(ractor::MessagingErr::SendErr(back)) => {
                    message = back;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err(_) => break,
            }
        }
        Err(StoreError::Interrupted {
            message: "the store actor did not come back within 2 s".into(),
        })
    }

    async fn call<T: Send + 'static>(
        &self,
        message: impl FnOnce(RpcReplyPort<T>) -> StoreMsg,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send_when_ready(message(tx.into())).await?;
        rx.await.map_err(|_| StoreError::Interrupted {
            message: "the store actor stopped before answering".into(),
        })
    }

    /// Hands an append to the store actor and waits until it is durable as
    /// `durability` says (written, for `Buffered`).
    pub(crate) async fn append(
        &self,
        items: Vec<StoredEnvelope>,
        durability: Durability,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), StoreError> {
        let (waiter, ack) = AppendAck::channel(durability);
        let request = AppendRequest::new(items, durability, permit, waiter);
        self.send_when_ready(StoreMsg::Append(request)).await?;
        if let Some(written) = ack.written
            && written.await.is_ok()
        {
            return Ok(());
        }
        ack.durable.await.map_err(|_| StoreError::Closed)?
    }

    /// See [`super::Store::enqueue`].
    pub(crate) fn enqueue(
        &self,
        items: Vec<StoredEnvelope>,
        durability: Durability,
        permit: OwnedSemaphorePermit,
        waiter: Box<dyn AppendWaiter>,
    ) {
        let mut request = AppendRequest::new(items, durability, permit, waiter);
        let Some(actor) = self.actor() else {
            request.answer(Err(StoreError::Closed));
            return;
        };
        // A message the actor cannot take is handed back, or dropped (and
        // a dropped request answers `Interrupted` by itself).
        if let Err(ractor::MessagingErr::SendErr(StoreMsg::Append(mut request))) =
            actor.send_message(StoreMsg::Append(request))
        {
            request.answer(Err(StoreError::Interrupted {
                message: "the store actor is restarting".into(),
            }));
        }
    }

    pub(crate) async fn list_after(
        &self,
        run_id: RunId,
        after_seq: u64,
        limit: usize,
        permit: OwnedSemaphorePermit,
    ) -> Result<Vec<RuntimeEventEnvelope>, StoreError> {
        self.call(|reply| StoreMsg::ListAfter {
            run_id,
            after_seq,
            limit,
            permit,
            reply,
        })
        .await?
    }

    pub(crate) async fn run_info(
        &self,
        run_id: RunId,
        barrier: bool,
        permit: OwnedSemaphorePermit,
    ) -> Result<Option<RunInfo>, StoreError> {
        self.call(|reply| StoreMsg::RunInfo {
            run_id,
            barrier,
            permit,
            reply,
        })
        .await?
    }

    pub(crate) async fn session_runs(
        &self,
        session_id: Uuid,
        permit: OwnedSemaphorePermit,
    ) -> Result<Vec<RunId>, StoreError> {
        self.call(|reply| StoreMsg::SessionRuns {
            session_id,
            permit,
            reply,
        })
        .await?
    }

    pub(crate) async fn session_state(
        &self,
        session_id: Uuid,
        permit: OwnedSemaphorePermit,
    ) -> Result<Vec<SessionRun>, StoreError> {
        self.call(|reply| StoreMsg::SessionState {
            session_id,
            permit,
            reply,
        })
        .await?
    }

    pub(crate) async fn runs_after(
        &self,
        after: Option<RunId>,
        limit: usize,
        permit: OwnedSemaphorePermit,
    ) -> Result<Vec<RunInfo>, StoreError> {
        self.call(|reply| StoreMsg::RunsAfter {
            after,
            limit,
            permit,
            reply,
        })
        .await?
    }

    pub(crate) async fn verify_run(
        &self,
        run_id: RunId,
        permit: OwnedSemaphorePermit,
    ) -> Result<RunCheck, StoreError> {
        self.call(|reply| StoreMsg::VerifyRun {
            run_id,
            permit,
            reply,
        })
        .await?
    }

    pub(crate) async fn remove_ended_before(
        &self,
        cutoff: DateTime<Utc>,
        max_runs: usize,
        permit: OwnedSemaphorePermit,
    ) -> Result<RemovalStep, StoreError> {
        self.call(|reply| StoreMsg::RemoveEnded {
            cutoff,
            max_runs,
            permit,
            reply,
        })
        .await?
    }

    pub(crate) async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.call(StoreMsg::Stats).await
    }

    /// See [`super::Store::close`]: `reads` is the store's read permits,
    /// all `reads_total` of which it takes first, so that no read still
    /// holds the database.
    pub(crate) async fn close(
        &self,
        reads: &Arc<Semaphore>,
        reads_total: u32,
        epoch: Uuid,
    ) -> Result<(), StoreError> {
        let Some(join) = self.join.lock().await.take() else {
            return Ok(());
        };
        if let Ok(all) = Arc::clone(reads).acquire_many_owned(reads_total).await {
            all.forget();
        }
        reads.close();
        let result = match self.call(StoreMsg::Close).await {
            Ok(result) => result,
            Err(StoreError::Closed) => Ok(()),
            Err(other) => Err(other),
        };
        // The actor's task ends after it released the database.
        let _ = join.await;
        if let Some(path) = self.path() {
            engine::wait_unlocked(path.to_path_buf()).await;
        }
        tracing::debug!(%epoch, "store closed");
        result
    }
}

/// Test hooks (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
impl SledBackend {
    pub(crate) fn hold_commits(&self, held: bool) -> Result<(), StoreError> {
        self.send(StoreMsg::HoldCommits(held))
    }

    pub(crate) fn inject_actor_panic(&self) -> Result<(), StoreError> {
        self.send(StoreMsg::Panic)
    }

    pub(crate) fn inject_flush_failure(&self, nth: u64) -> Result<(), StoreError> {
        self.send(StoreMsg::FailFlush(nth))
    }

    pub(crate) fn inject_commit_failure(&self, nth: u64) -> Result<(), StoreError> {
        self.send(StoreMsg::FailCommit(nth))
    }
}

/// The store's counters, shared between the actor and its commits on the
/// blocking pool, which update them before acknowledging.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    commits: AtomicU64,
    flushes: AtomicU64,
    events: AtomicU64,
    appends: AtomicU64,
    largest_batch: AtomicUsize,
}

impl Counters {
    pub(crate) fn record_commit(&self, appends: usize, events: usize) {
        ::metrics::counter!(crate::metrics::PERSISTED).increment(events as u64);
        ::metrics::histogram!(crate::metrics::COMMIT_EVENTS).record(events as f64);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.appends.fetch_add(appends as u64, Ordering::Relaxed);
        self.events.fetch_add(events as u64, Ordering::Relaxed);
        self.largest_batch.fetch_max(appends, Ordering::Relaxed);
    }

    pub(crate) fn record_flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, pending_appends: usize, commit_in_flight: bool) -> StoreStats {
        StoreStats {
            commits: self.commits.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            events_committed: self.events.load(Ordering::Relaxed),
            appends_committed: self.appends.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
            pending_appends,
            commit_in_flight,
            // Counted by the handle, which fills it in.
            reads: 0,
        }
    }
}
