//! The event store: a handle ([`Store`]) over one of two backends, sled in
//! this process (`sled/`, a supervised store actor) or a NATS JetStream
//! stream shared by hosts (`nats/`, feature `nats`). What follows describes
//! sled; the NATS log keeps the same ordering with its own durability (see
//! `nats/log.rs`).
//!
//! ## Ordering
//!
//! The store keeps, per run, a log of envelopes with seqs 1, 2, 3, … and
//! refuses any append whose seq is not the run's next one
//! ([`StoreError::SeqConflict`]) or that follows the run's terminal event
//! ([`StoreError::RunClosed`]). So what it holds of a run is always a gapless
//! prefix, whatever the writers do.
//!
//! ## Group commit
//!
//! Appends that arrive while a commit is in flight are gathered into the next
//! sled batch: one `apply_batch` and at most one flush serve every append of
//! every run that arrived meanwhile. What one commit gathers for a run is
//! stored as one value (a *segment* keyed by run and first seq).
//!
//! ## Durability
//!
//! See [`Durability`]. An append is acknowledged only after its batch is
//! applied (and flushed, for [`Durability::Flushed`]). One append is atomic:
//! all its envelopes are stored, or none.
//!
//! ## Bounds
//!
//! Appends waiting for the store hold a share of an in-flight byte budget
//! ([`Config::max_in_flight_bytes`]); a caller beyond it waits. Reads hold one
//! of [`Config::max_concurrent_reads`] permits. Nothing else queues.
//!
//! ## Shutdown
//!
//! [`Store::close`] waits for running reads, commits what is pending, flushes,
//! and releases the directory's lock before it returns, so the same directory
//! can be reopened at once.

#[cfg(feature = "nats")]
pub(crate) mod nats;
mod sled;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use uuid::Uuid;

use self::sled::SledBackend;
use crate::codec;
use crate::config::{Config, Durability};
use crate::error::{OpenError, StoreError};
use crate::ids::{ProviderId, RunId};
use crate::stream::RuntimeEventEnvelope;

/// What the store knows of a run besides its events: what a room needs to
/// recover.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunInfo {
    /// The run.
    pub run_id: RunId,
    /// Its last stored seq; the next append must carry `last_seq + 1`.
    pub last_seq: u64,
    /// Its session, once an envelope named one.
    pub session_id: Option<Uuid>,
    /// Its provider, once an event named one (`RunStarted`, `ModelStarted`).
    pub provider: Option<ProviderId>,
    /// `emitted_at` of its first envelope.
    pub started_at: DateTime<Utc>,
    /// `emitted_at` of its terminal envelope, once it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// When retention removed its events (see `Config::retain_ended_runs`);
    /// `last_seq` is then its final seq, and its events are gone.
    pub removed_at: Option<DateTime<Utc>>,
}

impl RunInfo {
    /// True once the run's terminal event is stored.
    #[must_use]
    pub fn is_ended(&self) -> bool {
        self.ended_at.is_some()
    }

    /// True once retention removed the run's events.
    #[must_use]
    pub fn is_removed(&self) -> bool {
        self.removed_at.is_some()
    }
}

/// A run of a session as one read of [`Store::session_state`] found it:
/// what a session subscriber needs to resume, without a read per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionRun {
    pub(crate) run_id: RunId,
    /// Its last stored seq (its final one, once removed).
    pub(crate) last_seq: u64,
    pub(crate) ended: bool,
    /// When retention removed it: its events are gone.
    pub(crate) removed_at: Option<DateTime<Utc>>,
}

/// One run read whole by [`Store::verify_run`]: every envelope decoded,
/// its seqs gapless from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunCheck {
    /// The run.
    pub run_id: RunId,
    /// Envelopes stored, seqs 1..=events.
    pub events: u64,
    /// Segments they are stored in.
    pub segments: u64,
    /// Bytes of those segments, as encoded.
    pub bytes: u64,
    /// When retention removed the run (then it has no events left, and
    /// that is not damage).
    pub removed_at: Option<DateTime<Utc>>,
}

/// What one call of [`Store::remove_ended_before`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removal {
    /// The runs removed, in the order they ended.
    pub runs: Vec<RunId>,
    /// Whether runs that ended before the cutoff remain: call again.
    pub more: bool,
}

/// Counters of the store actor, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Batches written.
    pub commits: u64,
    /// Flushes done for `Flushed` appends.
    pub flushes: u64,
    /// Envelopes stored.
    pub events_committed: u64,
    /// Append calls stored.
    pub appends_committed: u64,
    /// Most append calls one batch carried.
    pub largest_batch: usize,
    /// Append calls waiting for the next batch right now.
    pub pending_appends: usize,
    /// Whether a batch is being written right now.
    pub commit_in_flight: bool,
    /// Reads started through this store's handles since it opened (each
    /// holds one of `Config::max_concurrent_reads` permits while it runs):
    /// what subscribers and rooms cost the store.
    pub reads: u64,
}

/// An envelope encoded once, on the caller's task, with what the store needs
/// to validate and index it without decoding.
pub(crate) struct StoredEnvelope {
    pub(crate) run_id: RunId,
    /// The NATS log's message id; sled keeps it inside `bytes` only.
    #[cfg_attr(
        not(feature = "nats"),
        allow(dead_code, reason = "read by the NATS backend")
    )]
    pub(crate) event_id: crate::stream::RuntimeEventId,
    pub(crate) seq: u64,
    pub(crate) session_id: Option<Uuid>,
    pub(crate) provider: Option<ProviderId>,
    pub(crate) terminal: bool,
    pub(crate) emitted_at: DateTime<Utc>,
    pub(crate) bytes: Vec<u8>,
}

/// Where following a run on a shared log starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FollowFrom {
    /// After the run's envelope with this seq.
    AfterSeq(u64),
    /// After the run's last envelope; nothing for a run that has ended.
    End,
    /// At this position of the shared log (see [`IndexedRun`]).
    Position(u64),
}

/// A stream followed in a shared log, and the log position it starts at.
pub(crate) struct Following<T> {
    pub(crate) start: u64,
    pub(crate) items: futures_util::stream::BoxStream<'static, Result<T, StoreError>>,
}

/// A run a session's index names on a shared log, with the log position of
/// the index entry: the run's envelopes appended since lie after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexedRun {
    pub(crate) run_id: RunId,
    pub(crate) position: u64,
}

/// Told what became of an append handed to the store ([`Store::enqueue`]):
/// the code that commits the append tells its waiter directly, on whatever
/// thread it runs, so no task has to wait for it. Both methods must return
/// at once (send a message, answer a channel).
pub(crate) trait AppendWaiter: Send + 'static {
    /// A `Buffered` append is written, before its flush.
    fn written(&mut self) {}
    /// The append is durable (written and flushed), or failed.
    fn done(self: Box<Self>, result: Result<(), StoreError>);
}

/// Where a caller that waits on a channel hears of its append.
pub(crate) struct AppendAck {
    /// `Buffered` appends only: fires once the append is written, before
    /// its flush (dropped unfired if it never is).
    pub(crate) written: Option<oneshot::Receiver<()>>,
    /// The append's outcome once it is durable, or its failure.
    pub(crate) durable: oneshot::Receiver<Result<(), StoreError>>,
}

/// The [`AppendWaiter`] behind an [`AppendAck`].
struct ChannelWaiter {
    written: Option<oneshot::Sender<()>>,
    durable: oneshot::Sender<Result<(), StoreError>>,
}

impl AppendAck {
    fn channel(durability: Durability) -> (Box<dyn AppendWaiter>, Self) {
        let (durable_tx, durable) = oneshot::channel();
        let (written_tx, written) = match durability {
            Durability::Buffered => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            Durability::Flushed => (None, None),
        };
        let waiter = ChannelWaiter {
            written: written_tx,
            durable: durable_tx,
        };
        (Box::new(waiter), Self { written, durable })
    }
}

impl AppendWaiter for ChannelWaiter {
    fn written(&mut self) {
        if let Some(written) = self.written.take() {
            let _ = written.send(());
        }
    }

    fn done(self: Box<Self>, result: Result<(), StoreError>) {
        let _ = self.durable.send(result);
    }
}

/// Total encoded bytes of `items`.
pub(crate) fn encoded_len(items: &[StoredEnvelope]) -> usize {
    items.iter().map(|i| i.bytes.len()).sum()
}

/// Refuses an envelope whose `run_id` is not its event's: stored, it would
/// sit in one run's log while its event (and every JSON reader) names
/// another.
pub(crate) fn check_run(envelope: &RuntimeEventEnvelope) -> Result<(), StoreError> {
    let event_run = envelope.event.run_id();
    if envelope.run_id == event_run {
        Ok(())
    } else {
        Err(StoreError::RunMismatch {
            envelope_run: envelope.run_id,
            event_run,
        })
    }
}

impl StoredEnvelope {
    /// Encodes `envelope`, refusing it if its run is not its event's or the
    /// encoding exceeds `max_bytes`.
    pub(crate) fn encode(
        envelope: &RuntimeEventEnvelope,
        max_bytes: usize,
    ) -> Result<Self, StoreError> {
        check_run(envelope)?;
        let run_id = envelope.run_id;
        let bytes = codec::encode_envelope(envelope)
            .map_err(|source| StoreError::Encode { run_id, source })?;
        if bytes.len() > max_bytes {
            return Err(StoreError::TooLarge {
                run_id,
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        Ok(Self {
            run_id,
            event_id: envelope.event_id,
            seq: envelope.seq,
            session_id: envelope.session_id,
            provider: envelope.event.provider().cloned(),
            terminal: envelope.is_terminal(),
            emitted_at: envelope.emitted_at,
            bytes,
        })
    }
}

/// A handle to an open store. Cheap to clone; every clone talks to the same
/// store actor, the only code that touches sled.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use behest_stream::{AgentEvent, Config, RunId, RuntimeEventEnvelope, RuntimeEventId, Store, TextDelta};
///
/// let store = Store::open(Config::temporary()).await?;
/// let run_id = RunId::new();
/// let envelope = RuntimeEventEnvelope {
///     event_id: RuntimeEventId::new(),
///     seq: 1,
///     run_id,
///     session_id: None,
///     event: AgentEvent::TextDelta(TextDelta { run_id, timestamp: chrono::Utc::now(), delta: "hi".into() }),
///     emitted_at: chrono::Utc::now(),
/// };
/// store.append(vec![envelope.clone()]).await?;
/// assert_eq!(store.list_after(run_id, 0, 10).await?, vec![envelope]);
/// // Seq 1 again is refused: the log has no duplicates.
/// # let envelope = store.list_after(run_id, 0, 1).await?.remove(0);
/// assert!(store.append(vec![envelope]).await.is_err());
/// store.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    epoch: Uuid,
    durability: Durability,
    max_event_bytes: usize,
    append_budget: Arc<Semaphore>,
    append_budget_total: u32,
    reads: Arc<Semaphore>,
    reads_total: u32,
    /// Read permits handed out so far (`StoreStats::reads`).
    reads_started: AtomicU64,
    /// The retention sweeper, if a policy is set; stopped on close and drop.
    sweeper: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

/// Where a store keeps its runs: one `match` per operation that differs.
/// The budgets, read permits and encoding around it are the same for both.
#[derive(Debug)]
enum Backend {
    /// sled, in this process ([`Config::new`], [`Config::temporary`]).
    Sled(SledBackend),
    /// A NATS JetStream stream shared by hosts (`Config::nats`).
    #[cfg(feature = "nats")]
    Nats(Arc<nats::NatsStore>),
}

impl Inner {
    fn stop_sweeper(&self) {
        let sweeper = self
            .sweeper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone; the backend, dropped next, stops the
        // store actor (which releases sled).
        self.stop_sweeper();
    }
}

impl Store {
    /// Opens the store described by `config`, creating it if the directory
    /// is empty or missing.
    ///
    /// # Errors
    ///
    /// An [`OpenError`] naming the path: [`OpenError::Locked`] if another
    /// process holds it, [`OpenError::UnsupportedFormat`] for a store of
    /// another format version, [`OpenError::Io`] if it cannot be read.
    ///
    /// # Panics
    ///
    /// Never. Must be called inside a tokio runtime.
    ///
    /// # Cancel safety
    ///
    /// Cancelling may leave sled opening on the blocking pool; the directory
    /// is released when that finishes.
    pub async fn open(config: Config) -> Result<Self, OpenError> {
        #[cfg(feature = "nats")]
        if let Some(nats) = &config.nats {
            let backend = nats::NatsStore::open(nats).await?;
            tracing::debug!(epoch = %backend.epoch(), url = %nats.url, "store open on NATS");
            let epoch = backend.epoch();
            let max_event_bytes = config
                .effective_max_event_bytes()
                .min(backend.max_event_bytes());
            let backend = Backend::Nats(Arc::new(backend));
            return Ok(Self::with_backend(backend, epoch, max_event_bytes, &config));
        }
        let (backend, epoch) = SledBackend::open(&config).await?;
        let backend = Backend::Sled(backend);
        let store = Self::with_backend(backend, epoch, config.effective_max_event_bytes(), &config);
        if let Some(retention) = config.retention {
            let sweeper = tokio::spawn(sweep(Arc::downgrade(&store.inner), retention));
            *store
                .inner
                .sweeper
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(sweeper.abort_handle());
        }
        Ok(store)
    }

    fn with_backend(
        backend: Backend,
        epoch: Uuid,
        max_event_bytes: usize,
        config: &Config,
    ) -> Self {
        let append_budget_total = u32::try_from(config.max_in_flight_bytes).unwrap_or(u32::MAX);
        let reads_total = u32::try_from(config.max_concurrent_reads).unwrap_or(u32::MAX);
        Self {
            inner: Arc::new(Inner {
                backend,
                epoch,
                durability: config.durability,
                max_event_bytes,
                append_budget: Arc::new(Semaphore::new(append_budget_total as usize)),
                append_budget_total,
                reads: Arc::new(Semaphore::new(reads_total as usize)),
                reads_total,
                reads_started: AtomicU64::new(0),
                sweeper: std::sync::Mutex::new(None),
            }),
        }
    }

    /// The sled backend, or `Unsupported` naming `operation` on NATS.
    fn sled_only(&self, operation: &'static str) -> Result<&SledBackend, StoreError> {
        let _ = operation;
        match &self.inner.backend {
            Backend::Sled(sled) => Ok(sled),
            #[cfg(feature = "nats")]
            Backend::Nats(_) => Err(StoreError::Unsupported {
                backend: "NATS",
                operation,
            }),
        }
    }

    /// The store's epoch: a UUID minted when the store was created. A cursor
    /// from another epoch names history this store does not have.
    #[must_use]
    pub fn epoch(&self) -> Uuid {
        self.inner.epoch
    }

    /// The store's directory, or `None` for a temporary store.
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        match &self.inner.backend {
            Backend::Sled(sled) => sled.path(),
            #[cfg(feature = "nats")]
            Backend::Nats(_) => None,
        }
    }

    /// The largest encoded envelope this store accepts.
    #[must_use]
    pub fn max_event_bytes(&self) -> usize {
        self.inner.max_event_bytes
    }

    /// Stores `envelopes` with the configured default [`Durability`].
    ///
    /// # Errors
    ///
    /// As [`Store::append_with`].
    ///
    /// # Cancel safety
    ///
    /// As [`Store::append_with`].
    pub async fn append(&self, envelopes: Vec<RuntimeEventEnvelope>) -> Result<(), StoreError> {
        self.append_with(envelopes, self.inner.durability).await
    }

    /// Stores `envelopes` (of one run or several, each run's in seq order)
    /// atomically, and returns once they are durable as `durability` says.
    ///
    /// # Errors
    ///
    /// Nothing is stored when any envelope is refused:
    /// [`StoreError::RunMismatch`] (an envelope's `run_id` is not its
    /// event's), [`StoreError::TooLarge`] or [`StoreError::Encode`] before
    /// anything is sent; [`StoreError::SeqConflict`] if a seq is not its run's next;
    /// [`StoreError::RunClosed`] after a run's terminal event;
    /// [`StoreError::WriteFailed`] if sled failed; [`StoreError::Closed`]
    /// after [`Store::close`]. [`StoreError::FlushFailed`] means the batch
    /// was written but its flush failed.
    ///
    /// # Panics
    ///
    /// Never.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: once the envelopes are handed to the store actor,
    /// dropping the future does not withdraw them; they may be stored.
    pub async fn append_with(
        &self,
        envelopes: Vec<RuntimeEventEnvelope>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let items = envelopes
            .iter()
            .map(|e| StoredEnvelope::encode(e, self.inner.max_event_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        self.append_encoded(items, durability).await
    }

    /// Stores envelopes already encoded (see [`Store::append_with`]).
    pub(crate) async fn append_encoded(
        &self,
        items: Vec<StoredEnvelope>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let permit = self.reserve(encoded_len(&items)).await?;
        match &self.inner.backend {
            Backend::Sled(sled) => sled.append(items, durability, permit).await,
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                let result = nats.append(items).await;
                drop(permit);
                result
            }
        }
    }

    /// Waits for `bytes` of the in-flight budget (clamped to the whole
    /// budget, so one oversized append can still go alone).
    pub(crate) async fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, StoreError> {
        Arc::clone(&self.inner.append_budget)
            .acquire_many_owned(self.budget_share(bytes))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// As [`Store::reserve`] without waiting: `None` while the budget is
    /// spent. Lets a caller await (and hold the larger future of) `reserve`
    /// only when it has to.
    pub(crate) fn try_reserve(
        &self,
        bytes: usize,
    ) -> Result<Option<OwnedSemaphorePermit>, StoreError> {
        match Arc::clone(&self.inner.append_budget).try_acquire_many_owned(self.budget_share(bytes))
        {
            Ok(permit) => Ok(Some(permit)),
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(None),
            Err(tokio::sync::TryAcquireError::Closed) => Err(StoreError::Closed),
        }
    }

    fn budget_share(&self, bytes: usize) -> u32 {
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.inner.append_budget_total)
    }

    /// Hands an append to the store actor without waiting: appends enqueued
    /// by one task reach the store in the order they were enqueued. The
    /// code that commits it tells `waiter` when it is written (`Buffered`)
    /// and when it is durable, or that it failed; `waiter` is told in every
    /// case, also when the store is closed or restarting.
    pub(crate) fn enqueue(
        &self,
        items: Vec<StoredEnvelope>,
        durability: Durability,
        permit: OwnedSemaphorePermit,
        waiter: Box<dyn AppendWaiter>,
    ) {
        match &self.inner.backend {
            Backend::Sled(sled) => sled.enqueue(items, durability, permit, waiter),
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                // A run room has one append in flight, so its appends still
                // reach the log in order; the run's writer lock orders the
                // rest.
                let held = nats.hold(&items);
                let nats = Arc::clone(nats);
                tokio::spawn(async move {
                    let result = nats.append_held(items, held).await;
                    drop(permit);
                    waiter.done(result);
                });
            }
        }
    }

    /// Whether other processes may write this store's runs (NATS).
    pub(crate) fn is_shared_log(&self) -> bool {
        match &self.inner.backend {
            Backend::Sled(_) => false,
            #[cfg(feature = "nats")]
            Backend::Nats(_) => true,
        }
    }

    /// On a shared log (NATS): the run's envelopes from `from` on, then
    /// every one appended later, by any host. `None` on sled, where this
    /// process's room is the run's only writer, and from the end of a run
    /// that has ended.
    pub(crate) async fn follow_run(
        &self,
        run_id: RunId,
        from: FollowFrom,
    ) -> Result<Option<Following<RuntimeEventEnvelope>>, StoreError> {
        match &self.inner.backend {
            Backend::Sled(_) => {
                let _ = (run_id, from);
                Ok(None)
            }
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => nats.follow(run_id, from).await,
        }
    }

    /// On a shared log (NATS): the runs indexed in `session_id` from
    /// position `start` on, by any host; with no `start`, the runs indexed
    /// so far and those indexed after them. `None` on sled, where every run
    /// of the session is written by this process's rooms.
    pub(crate) async fn follow_session(
        &self,
        session_id: Uuid,
        start: Option<u64>,
    ) -> Result<Option<(Vec<RunId>, Following<IndexedRun>)>, StoreError> {
        match &self.inner.backend {
            Backend::Sled(_) => {
                let _ = (session_id, start);
                Ok(None)
            }
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => nats.follow_session(session_id, start).await.map(Some),
        }
    }

    /// Up to `limit` envelopes of `run_id` with `seq > after_seq`, in seq
    /// order. Fewer than `limit` means the run has no more (for now).
    ///
    /// # Errors
    ///
    /// [`StoreError::RunRemoved`] if retention removed the run and it had
    /// events after `after_seq`, whatever `limit` (0 included);
    /// [`StoreError::Corrupt`] naming the run and the first seq that cannot
    /// be decoded (other runs are unaffected); [`StoreError::ReadFailed`];
    /// [`StoreError::Closed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a read changes nothing.
    pub async fn list_after(
        &self,
        run_id: RunId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, StoreError> {
        let permit = self.read_permit().await?;
        match &self.inner.backend {
            Backend::Sled(sled) => sled.list_after(run_id, after_seq, limit, permit).await,
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                let page = nats.list_after(run_id, after_seq, limit).await;
                drop(permit);
                page
            }
        }
    }

    /// What the store knows of `run_id`: its last seq, session, provider and
    /// whether it ended. `None` if it has no event of that run.
    ///
    /// # Errors
    ///
    /// [`StoreError::CorruptRunRecord`], [`StoreError::ReadFailed`],
    /// [`StoreError::Closed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn run_info(&self, run_id: RunId) -> Result<Option<RunInfo>, StoreError> {
        self.read_run_info(run_id, true).await
    }

    /// As [`Store::run_info`], without waiting for appends in flight to be
    /// committed: what is committed now. For checks about what has been
    /// acknowledged already (a cursor, a removal), which no pending append
    /// can change.
    pub(crate) async fn run_info_committed(
        &self,
        run_id: RunId,
    ) -> Result<Option<RunInfo>, StoreError> {
        self.read_run_info(run_id, false).await
    }

    async fn read_run_info(
        &self,
        run_id: RunId,
        barrier: bool,
    ) -> Result<Option<RunInfo>, StoreError> {
        let permit = self.read_permit().await?;
        match &self.inner.backend {
            Backend::Sled(sled) => sled.run_info(run_id, barrier, permit).await,
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                let info = nats.run_info(run_id, barrier).await;
                drop(permit);
                info
            }
        }
    }

    /// The runs of `session_id`, in the order they started; runs retention
    /// removed are no longer listed.
    ///
    /// # Errors
    ///
    /// [`StoreError::ReadFailed`], [`StoreError::Closed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn session_runs(&self, session_id: Uuid) -> Result<Vec<RunId>, StoreError> {
        let permit = self.read_permit().await?;
        match &self.inner.backend {
            Backend::Sled(sled) => sled.session_runs(session_id, permit).await,
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                let runs = nats.session_runs(session_id).await;
                drop(permit);
                runs
            }
        }
    }

    /// Every run of `session_id` with its last seq, whether it ended, and
    /// whether retention removed it (runs removed before this build kept
    /// removed runs in the session's index are not listed), as committed
    /// now: one read, holding one read permit, whatever the number of
    /// runs. On NATS (no retention) it reads each run's last envelope.
    pub(crate) async fn session_state(
        &self,
        session_id: Uuid,
    ) -> Result<Vec<SessionRun>, StoreError> {
        let permit = self.read_permit().await?;
        match &self.inner.backend {
            Backend::Sled(sled) => sled.session_state(session_id, permit).await,
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                let runs = nats.session_state(session_id).await;
                drop(permit);
                runs
            }
        }
    }

    /// Up to `limit` of the store's runs after `after` (from the first for
    /// `None`), in run id order (which is start order for the time-ordered
    /// ids [`RunId::new`] mints): a page; pass the last run of a page to get
    /// the next.
    ///
    /// # Errors
    ///
    /// [`StoreError::CorruptRunRecord`] or [`StoreError::Corrupt`] for a
    /// run whose record or last segment is damaged,
    /// [`StoreError::ReadFailed`], [`StoreError::Closed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn runs_after(
        &self,
        after: Option<RunId>,
        limit: usize,
    ) -> Result<Vec<RunInfo>, StoreError> {
        let sled = self.sled_only("listing runs")?;
        let permit = self.read_permit().await?;
        sled.runs_after(after, limit, permit).await
    }

    /// Reads every envelope of `run_id`, decoding each, and checks that
    /// they are seqs 1, 2, 3, … with no gap and agree with the run's record.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] naming the first seq that is missing or
    /// cannot be read, [`StoreError::CorruptRunRecord`],
    /// [`StoreError::ReadFailed`], [`StoreError::Closed`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn verify_run(&self, run_id: RunId) -> Result<RunCheck, StoreError> {
        let sled = self.sled_only("verifying runs")?;
        let permit = self.read_permit().await?;
        sled.verify_run(run_id, permit).await
    }

    /// Removes up to `max_runs` runs whose terminal event was emitted before
    /// `cutoff` (millisecond granularity), oldest first, and says which, and
    /// whether more remain (then call again). Fewer than `max_runs` go in
    /// one call if their events span more than 64k sled keys. Each leaves a
    /// tombstone (see `Config::retain_ended_runs`, which calls this in the
    /// background); the removal is flushed before this returns. Runs that
    /// have not ended are never removed.
    ///
    /// # Errors
    ///
    /// [`StoreError::WriteFailed`] (nothing of this page was removed),
    /// [`StoreError::CorruptRunRecord`], [`StoreError::ReadFailed`],
    /// [`StoreError::Closed`].
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: once handed to the store actor, the page is removed
    /// whether or not the caller waits.
    pub async fn remove_ended_before(
        &self,
        cutoff: DateTime<Utc>,
        max_runs: usize,
    ) -> Result<Removal, StoreError> {
        let sled = self.sled_only("removing runs")?;
        let permit = self.read_permit().await?;
        let step = sled.remove_ended_before(cutoff, max_runs, permit).await?;
        if !step.removed.is_empty() {
            ::metrics::counter!(crate::metrics::RUNS_REMOVED).increment(step.removed.len() as u64);
            tracing::debug!(runs = step.removed.len(), %cutoff, "retention removed runs");
        }
        Ok(Removal {
            runs: step.removed,
            more: step.more,
        })
    }

    /// A snapshot of the store actor's counters.
    ///
    /// # Errors
    ///
    /// [`StoreError::Closed`].
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        let reads = self.inner.reads_started.load(Ordering::Relaxed);
        let stats = match &self.inner.backend {
            Backend::Sled(sled) => sled.stats().await?,
            // No group commit to count: every append is its own.
            #[cfg(feature = "nats")]
            Backend::Nats(_) => StoreStats::default(),
        };
        Ok(StoreStats { reads, ..stats })
    }

    /// Waits for running reads, commits every pending append, flushes, and
    /// releases the directory. Every clone of this handle is closed: later
    /// calls return [`StoreError::Closed`]. Closing twice is fine.
    ///
    /// # Errors
    ///
    /// [`StoreError::FlushFailed`] if the final flush failed.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a cancelled close may leave the store closed to
    /// reads but still open.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.inner.stop_sweeper();
        let result = match &self.inner.backend {
            Backend::Sled(sled) => {
                sled.close(&self.inner.reads, self.inner.reads_total, self.inner.epoch)
                    .await
            }
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                nats.close().await;
                Ok(())
            }
        };
        self.inner.append_budget.close();
        result
    }

    /// Test hook: while held, appends gather in the next batch and no commit
    /// starts, so a test can see group commit without relying on timing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Closed`]; [`StoreError::Unsupported`] on NATS.
    #[cfg(feature = "fault-injection")]
    pub fn hold_commits(&self, held: bool) -> Result<(), StoreError> {
        self.sled_only("test hooks")?.hold_commits(held)
    }

    /// Test hook: the store actor panics at this message; its supervisor
    /// restarts it on the same database.
    ///
    /// # Errors
    ///
    /// [`StoreError::Closed`]; [`StoreError::Unsupported`] on NATS.
    #[cfg(feature = "fault-injection")]
    pub fn inject_actor_panic(&self) -> Result<(), StoreError> {
        self.sled_only("test hooks")?.inject_actor_panic()
    }

    /// Test hook: the `nth` commit from now (1 = the next) is written but
    /// its flush fails: each of its appends is answered
    /// [`StoreError::FlushFailed`] (in doubt), though sled holds it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Closed`]; [`StoreError::Unsupported`] on NATS.
    #[cfg(feature = "fault-injection")]
    pub fn inject_flush_failure(&self, nth: u64) -> Result<(), StoreError> {
        self.sled_only("test hooks")?.inject_flush_failure(nth)
    }

    /// Test hook: the `nth` commit from now (1 = the next) fails before it
    /// writes anything, answering each of its appends with
    /// [`StoreError::WriteFailed`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Closed`]; [`StoreError::Unsupported`] on NATS.
    #[cfg(feature = "fault-injection")]
    pub fn inject_commit_failure(&self, nth: u64) -> Result<(), StoreError> {
        self.sled_only("test hooks")?.inject_commit_failure(nth)
    }

    async fn read_permit(&self) -> Result<OwnedSemaphorePermit, StoreError> {
        self.inner.reads_started.fetch_add(1, Ordering::Relaxed);
        Arc::clone(&self.inner.reads)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)
    }
}

/// The retention sweeper: every `sweep_every`, removes the runs that ended
/// more than `ttl` ago, a step at a time. It holds the store only for one
/// step at a time, so a store whose last handle is dropped closes after at
/// most one more step; it ends when the store closes.
async fn sweep(store: std::sync::Weak<Inner>, retention: crate::config::Retention) {
    let ttl = chrono::Duration::from_std(retention.ttl).unwrap_or(chrono::Duration::MAX);
    let page = retention.runs_per_step.max(1);
    loop {
        tokio::time::sleep(retention.sweep_every).await;
        let cutoff = Utc::now()
            .checked_sub_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut removed = 0usize;
        loop {
            let Some(inner) = store.upgrade() else { return };
            let step = Store { inner }.remove_ended_before(cutoff, page).await;
            match step {
                Ok(step) => {
                    removed += step.runs.len();
                    if !step.more {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(StoreError::Closed) => return,
                Err(error) => {
                    // Left for the next sweep; retention is never urgent.
                    tracing::warn!(%error, "retention sweep failed");
                    break;
                }
            }
        }
        if removed > 0 {
            tracing::info!(runs = removed, %cutoff, "retention removed runs");
        }
    }
}
