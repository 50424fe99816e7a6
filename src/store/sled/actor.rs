//! The store actor: the single owner of the sled database.
//!
//! It gathers appends while a commit is in flight and writes them as the next
//! batch (group commit), so one flush serves every append that arrived during
//! the previous one. Commits and reads run on tokio's blocking pool; the actor
//! itself only moves requests around and never blocks.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

use std::sync::{Arc, RwLock};

use super::Counters;
use super::commit_log::CommitLog;
use super::engine::{self, AppendRequest, RemovalStep, RunCache, SegmentLimits};
use crate::error::StoreError;
use crate::ids::RunId;
use crate::store::{RunCheck, RunInfo, SessionRun, StoreStats};
use crate::stream::RuntimeEventEnvelope;

/// Every message the store actor takes.
pub(crate) enum StoreMsg {
    /// Store these envelopes (all or none) and answer once durable as asked.
    Append(AppendRequest),
    /// Read a page of a run's events.
    ListAfter {
        run_id: RunId,
        after_seq: u64,
        limit: usize,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<Vec<RuntimeEventEnvelope>, StoreError>>,
    },
    /// Read what the store knows of a run; with `barrier`, only once every
    /// append received before it is committed.
    RunInfo {
        run_id: RunId,
        barrier: bool,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<Option<RunInfo>, StoreError>>,
    },
    /// Read a page of the store's runs, in run id order.
    RunsAfter {
        after: Option<RunId>,
        limit: usize,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<Vec<RunInfo>, StoreError>>,
    },
    /// Read a run whole and check it.
    VerifyRun {
        run_id: RunId,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<RunCheck, StoreError>>,
    },
    /// Read the runs of a session in start order.
    SessionRuns {
        session_id: Uuid,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<Vec<RunId>, StoreError>>,
    },
    /// Read every run of a session with its state, in one job.
    SessionState {
        session_id: Uuid,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<Vec<SessionRun>, StoreError>>,
    },
    /// Remove up to `max_runs` runs that ended before `cutoff`.
    RemoveEnded {
        cutoff: chrono::DateTime<chrono::Utc>,
        max_runs: usize,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<RemovalStep, StoreError>>,
    },
    /// Report counters.
    Stats(RpcReplyPort<StoreStats>),
    /// Commit what is pending, flush, release the database and stop.
    Close(RpcReplyPort<Result<(), StoreError>>),
    /// A commit finished on the blocking pool (sent by the actor to itself).
    CommitDone(Result<u64, String>),
    /// Test hook: while held, appends wait in `pending` and no commit starts.
    #[cfg(feature = "fault-injection")]
    HoldCommits(bool),
    /// Test hook: the `n`-th commit from now fails before it writes anything.
    #[cfg(feature = "fault-injection")]
    FailCommit(u64),
    /// Test hook: the `n`-th commit from now is written, then its flush
    /// fails.
    #[cfg(feature = "fault-injection")]
    FailFlush(u64),
    /// Test hook: the actor panics (its supervisor restarts it).
    #[cfg(feature = "fault-injection")]
    Panic,
}

pub(crate) struct StoreActor;

pub(crate) struct StoreArgs {
    pub(crate) db: sled::Db,
    pub(crate) next_ordinal: u64,
    pub(crate) limits: SegmentLimits,
    pub(crate) counters: Arc<Counters>,
    /// Shared across restarts, so that an old actor's last commit and its
    /// successor's never overlap.
    pub(crate) gate: Arc<RwLock<RunCache>>,
}

pub(crate) struct StoreState {
    /// `None` once closed: the database has been handed to the blocking pool
    /// to be flushed and dropped there (sled's drop blocks).
    db: Option<sled::Db>,
    next_ordinal: u64,
    limits: SegmentLimits,
    /// Appends that arrived while a commit was in flight: the next batch.
    /// Bounded by the handle's in-flight byte budget.
    pending: Vec<AppendRequest>,
    committing: bool,
    closing: Option<RpcReplyPort<Result<(), StoreError>>>,
    counters: Arc<Counters>,
    /// Held for writing while a batch is applied and flushed, for reading by
    /// every read: a reader never sees a `Flushed` batch before its flush, so
    /// nothing is served that a crash could still take back.
    gate: Arc<RwLock<RunCache>>,
    /// Appends received, and appends whose commit has finished (in order).
    received: u64,
    committed: u64,
    /// `received` when the commit in flight took its batch.
    batch_end: u64,
    /// Reads waiting for the appends received before them to be committed.
    /// Bounded by the read permits each holds.
    waiting: Vec<(u64, ReadJob)>,
    #[cfg(feature = "fault-injection")]
    held: bool,
    #[cfg(feature = "fault-injection")]
    fail_commit: Option<u64>,
    #[cfg(feature = "fault-injection")]
    fail_flush: Option<u64>,
}

impl Actor for StoreActor {
    type Msg = StoreMsg;
    type State = StoreState;
    type Arguments = StoreArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: StoreArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(StoreState {
            db: Some(args.db),
            next_ordinal: args.next_ordinal,
            limits: args.limits,
            pending: Vec::new(),
            committing: false,
            closing: None,
            counters: args.counters,
            gate: args.gate,
            received: 0,
            committed: 0,
            batch_end: 0,
            waiting: Vec::new(),
            #[cfg(feature = "fault-injection")]
            held: false,
            #[cfg(feature = "fault-injection")]
            fail_commit: None,
            #[cfg(feature = "fault-injection")]
            fail_flush: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            StoreMsg::Append(mut request) => {
                if state.closing.is_some() || state.db.is_none() {
                    request.answer(Err(StoreError::Closed));
                    return Ok(());
                }
                state.received += 1;
                state.pending.push(request);
                state.start_commit(&myself);
            }
            StoreMsg::ListAfter {
                run_id,
                after_seq,
                limit,
                permit,
                reply,
            } => state.read(permit, reply, move |db, log| {
                engine::list_after(db, log, run_id, after_seq, limit)
            }),
            StoreMsg::RunInfo {
                run_id,
                barrier,
                permit,
                reply,
            } => {
                // Recovery must see every append handed over before it (a
                // room that restarts while its predecessor's appends are
                // still pending would otherwise read a stale last seq).
                let barrier = if barrier { state.received } else { 0 };
                state.read_after(barrier, permit, reply, move |db, log| {
                    engine::run_info(db, log, run_id)
                });
            }
            StoreMsg::SessionRuns {
                session_id,
                permit,
                reply,
            } => state.read(permit, reply, move |db, _| {
                engine::session_runs(db, session_id)
            }),
            StoreMsg::SessionState {
                session_id,
                permit,
                reply,
            } => state.read(permit, reply, move |db, log| {
                engine::session_state(db, log, session_id)
            }),
            StoreMsg::RunsAfter {
                after,
                limit,
                permit,
                reply,
            } => state.read(permit, reply, move |db, log| {
                engine::runs_after(db, log, after, limit)
            }),
            StoreMsg::VerifyRun {
                run_id,
                permit,
                reply,
            } => state.read(permit, reply, move |db, log| {
                engine::verify_run(db, log, run_id)
            }),
            StoreMsg::RemoveEnded {
                cutoff,
                max_runs,
                permit,
                reply,
            } => {
                let Some(db) = state.db.clone() else {
                    let _ = reply.send(Err(StoreError::Closed));
                    return Ok(());
                };
                let gate = Arc::clone(&state.gate);
                let limits = state.limits;
                // Like a read, it holds a read permit until it has dropped
                // its database handle, so `close` waits for it.
                tokio::task::spawn_blocking(move || {
                    let result = engine::remove_ended_before(&db, &gate, cutoff, max_runs, limits);
                    drop(db);
                    drop(permit);
                    let _ = reply.send(result);
                });
            }
            StoreMsg::Stats(reply) => {
                let _ = reply.send(
                    state
                        .counters
                        .snapshot(state.pending.len(), state.committing),
                );
            }
            StoreMsg::Close(reply) => {
                state.closing = Some(reply);
                state.finish_if_drained(&myself).await;
            }
            StoreMsg::CommitDone(outcome) => {
                state.committing = false;
                state.committed = state.batch_end;
                state.run_waiting_reads();
                state.next_ordinal = outcome.map_err(|panic| {
                    // The batch may or may not have been applied; the actor
                    // cannot know its ordinal counter any more. Stop, and let
                    // the callers see the store as closed.
                    format!("store commit panicked: {panic}")
                })?;
                state.start_commit(&myself);
                state.finish_if_drained(&myself).await;
            }
            #[cfg(feature = "fault-injection")]
            StoreMsg::FailCommit(nth) => state.fail_commit = Some(nth.max(1)),
            #[cfg(feature = "fault-injection")]
            StoreMsg::FailFlush(nth) => state.fail_flush = Some(nth.max(1)),
            #[cfg(feature = "fault-injection")]
            StoreMsg::Panic => panic!("injected panic in the store actor"),
            #[cfg(feature = "fault-injection")]
            StoreMsg::HoldCommits(held) => {
                state.held = held;
                state.start_commit(&myself);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Stopped without a Close (every handle dropped): still release the
        // database off the async workers.
        if let Some(db) = state.db.take() {
            let _ = engine::release(db, Arc::clone(&state.gate), state.limits).await;
        }
        Ok(())
    }
}

/// Counts a commit down to an injected fault: true at the armed one.
#[cfg(feature = "fault-injection")]
fn countdown(armed: &mut Option<u64>) -> bool {
    match *armed {
        Some(1) => {
            *armed = None;
            true
        }
        Some(n) => {
            *armed = Some(n - 1);
            false
        }
        None => false,
    }
}

/// A read, ready to start on the blocking pool given the database (or
/// `None` once closed) and the gate.
type ReadJob = Box<dyn FnOnce(Option<sled::Db>, Arc<RwLock<RunCache>>) + Send>;

fn read_job<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    reply: RpcReplyPort<Result<T, StoreError>>,
    read: impl FnOnce(&sled::Db, &CommitLog) -> Result<T, StoreError> + Send + 'static,
) -> ReadJob {
    Box::new(move |db, gate| {
        let Some(db) = db else {
            let _ = reply.send(Err(StoreError::Closed));
            return;
        };
        tokio::task::spawn_blocking(move || {
            let result = engine::read_flushed(&db, &gate, read);
            drop(db);
            drop(permit);
            let _ = reply.send(result);
        });
    })
}

impl StoreState {
    /// Starts a commit of everything pending, unless one is in flight.
    fn start_commit(&mut self, myself: &ActorRef<StoreMsg>) {
        #[cfg(feature = "fault-injection")]
        if self.held {
            return;
        }
        let Some(db) = self.db.clone() else { return };
        if self.committing || self.pending.is_empty() {
            return;
        }
        self.committing = true;
        self.batch_end = self.received;
        let requests = std::mem::take(&mut self.pending);
        let gate = Arc::clone(&self.gate);
        #[cfg(feature = "fault-injection")]
        let (fail, flush_fails) = (
            countdown(&mut self.fail_commit),
            countdown(&mut self.fail_flush),
        );
        #[cfg(not(feature = "fault-injection"))]
        let (fail, flush_fails) = (false, false);
        let mut next_ordinal = self.next_ordinal;
        let limits = self.limits;
        let counters = Arc::clone(&self.counters);
        let myself = myself.clone();
        tokio::spawn(async move {
            let outcome = tokio::task::spawn_blocking(move || {
                if fail {
                    engine::fail_injected(requests);
                } else {
                    engine::commit(
                        &db,
                        &gate,
                        requests,
                        &mut next_ordinal,
                        limits,
                        &counters,
                        flush_fails,
                    );
                }
                drop(db);
                next_ordinal
            })
            .await
            .map_err(|e| e.to_string());
            // The actor may have stopped meanwhile; then nobody is waiting.
            let _ = myself.send_message(StoreMsg::CommitDone(outcome));
        });
    }

    /// Runs a read on the blocking pool. The permit is released only after the
    /// read has dropped its database handle, so that `Store::close`, which
    /// waits for every permit, knows no read still holds the database.
    fn read<T: Send + 'static>(
        &self,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<T, StoreError>>,
        read: impl FnOnce(&sled::Db, &CommitLog) -> Result<T, StoreError> + Send + 'static,
    ) {
        let job = read_job(permit, reply, read);
        job(self.db.clone(), Arc::clone(&self.gate));
    }

    /// As `read`, once every append received before `barrier` is committed.
    fn read_after<T: Send + 'static>(
        &mut self,
        barrier: u64,
        permit: OwnedSemaphorePermit,
        reply: RpcReplyPort<Result<T, StoreError>>,
        read: impl FnOnce(&sled::Db, &CommitLog) -> Result<T, StoreError> + Send + 'static,
    ) {
        let job = read_job(permit, reply, read);
        if self.committed >= barrier {
            job(self.db.clone(), Arc::clone(&self.gate));
        } else {
            self.waiting.push((barrier, job));
        }
    }

    fn run_waiting_reads(&mut self) {
        let committed = self.committed;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(barrier, _)| *barrier <= committed);
        self.waiting = waiting;
        for (_, job) in ready {
            job(self.db.clone(), Arc::clone(&self.gate));
        }
    }

    /// Once closing and nothing is pending or in flight: flush, release the
    /// database, answer the closer and stop.
    async fn finish_if_drained(&mut self, myself: &ActorRef<StoreMsg>) {
        if self.committing || !self.pending.is_empty() || self.closing.is_none() {
            return;
        }
        let result = match self.db.take() {
            Some(db) => engine::release(db, Arc::clone(&self.gate), self.limits).await,
            None => Ok(()),
        };
        if let Some(reply) = self.closing.take() {
            let _ = reply.send(result);
        }
        myself.stop(Some("closed".into()));
    }
}
