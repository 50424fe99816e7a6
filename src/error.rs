//! Errors of the store boundary: opening a store, and using one.

use std::path::PathBuf;

use thiserror::Error;

use uuid::Uuid;

use crate::codec::CodecError;
use crate::ids::RunId;

/// Why a store could not be opened. Every variant names the path.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process (or another open store in this one) holds the
    /// directory's lock. Close the other holder, or open another directory.
    #[error("store at {path} is locked by another process: {source}")]
    Locked {
        /// The store directory.
        path: PathBuf,
        /// sled's lock error.
        source: std::io::Error,
    },
    /// The directory could not be read or written (missing permissions, not a
    /// directory, disk full). Fix the file system and retry.
    #[error("store at {path} could not be opened: {source}")]
    Io {
        /// The store directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store was written by a format this build does not read. Open it
    /// with the build that wrote it, or migrate it.
    #[error("store at {path} has format version {found}; this build reads version {supported}")]
    UnsupportedFormat {
        /// The store directory.
        path: PathBuf,
        /// The version found in the store's metadata.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// The directory holds a sled database that is not a behest-stream store,
    /// or whose metadata is damaged. Nothing was changed.
    #[error("store at {path} is not a readable behest-stream store: {reason}")]
    NotAStore {
        /// The store directory.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// sled reported corruption or an internal error while opening.
    #[error("store at {path} could not be opened by sled: {message}")]
    Storage {
        /// The store directory.
        path: PathBuf,
        /// sled's error.
        message: String,
    },
}

/// Why a store operation failed. Every variant says whether anything was
/// stored.
#[derive(Debug, Error, Clone)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is closed (or its actor stopped). Nothing was stored.
    /// Reopen the store.
    #[error("store is closed")]
    Closed,
    /// The run has ended (its terminal event is stored); nothing was stored.
    /// Not retryable.
    #[error("run {run_id} has ended; no event may follow its terminal event")]
    RunClosed {
        /// The run.
        run_id: RunId,
    },
    /// Retention removed the run's events (its terminal event was older than
    /// the configured TTL). Its history cannot be read or resumed; its id
    /// stays ended, so nothing can be stored under it again. Not retryable.
    #[error("run {run_id} was removed by retention at {removed_at}; its events are gone")]
    RunRemoved {
        /// The run.
        run_id: RunId,
        /// When retention removed it.
        removed_at: chrono::DateTime<chrono::Utc>,
    },
    /// The store's backend does not do this (the NATS backend keeps no
    /// run index to list, verify or remove runs by). Not retryable.
    #[error("the {backend} store backend does not support {operation}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// What was asked.
        operation: &'static str,
    },
    /// Another writer (another host) appended to the run since this writer
    /// last looked: a run has one writer, and the log refused to fork its
    /// order. Nothing was stored. Not retryable as is: the run's owner is
    /// elsewhere.
    #[error(
        "run {run_id} is written by another writer (its log ends at seq {last_seq}); nothing stored"
    )]
    RunFenced {
        /// The run.
        run_id: RunId,
        /// Where the run's log ends now.
        last_seq: u64,
    },
    /// The append's seq does not follow the run's last stored seq; nothing
    /// of this append was stored. Means two writers for one run, or a
    /// writer that lost track of its run: re-read the run's last seq.
    #[error("run {run_id}: expected seq {expected}, got {got}; nothing stored")]
    SeqConflict {
        /// The run.
        run_id: RunId,
        /// The seq the store would accept next.
        expected: u64,
        /// The seq offered.
        got: u64,
    },
    /// The envelope's `run_id` names another run than its event does
    /// (`envelope.event.run_id()`); nothing of its append was stored. Not
    /// retryable: build the envelope with `run_id: event.run_id()`.
    #[error(
        "envelope names run {envelope_run} but its event belongs to run {event_run}; nothing stored"
    )]
    RunMismatch {
        /// The envelope's `run_id`.
        envelope_run: RunId,
        /// The run its event names.
        event_run: RunId,
    },
    /// The encoded event exceeds the configured limit; nothing was stored.
    /// Not retryable: shrink the event or raise `Config::max_event_bytes`.
    #[error("run {run_id}: event of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The run.
        run_id: RunId,
        /// Encoded size of the event.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The event could not be encoded (for example a JSON payload nested too
    /// deeply); nothing was stored. Not retryable.
    #[error("run {run_id}: event cannot be encoded: {source}")]
    Encode {
        /// The run.
        run_id: RunId,
        /// The codec's reason.
        source: CodecError,
    },
    /// A stored record of this run could not be decoded. Other runs are
    /// unaffected; this run's events from `seq` on cannot be read.
    #[error("corrupt record: run {run_id} at seq {seq}: {source}")]
    Corrupt {
        /// The run.
        run_id: RunId,
        /// The first seq that could not be read.
        seq: u64,
        /// The codec's reason.
        source: CodecError,
    },
    /// The run's metadata record could not be decoded. Other runs are
    /// unaffected.
    #[error("corrupt run record for run {run_id}: {source}")]
    CorruptRunRecord {
        /// The run.
        run_id: RunId,
        /// The codec's reason.
        source: CodecError,
    },
    /// sled failed to write; nothing of the failed batch was stored.
    /// Retrying may succeed.
    #[error("store write failed, nothing stored: {message}")]
    WriteFailed {
        /// sled's error.
        message: String,
    },
    /// The batch was written but the flush that makes it durable failed: the
    /// events are visible and may or may not survive a crash. Check the disk;
    /// do not blindly retry (a retry would store the event again).
    #[error("store flush failed, durability of the batch is in doubt: {message}")]
    FlushFailed {
        /// sled's error.
        message: String,
    },
    /// The store actor stopped (it is restarted by its supervisor) before it
    /// wrote the append: nothing was stored. Retry.
    #[error("store interrupted, nothing stored: {message}")]
    Interrupted {
        /// What happened.
        message: String,
    },
    /// sled failed to read. Retrying may succeed.
    #[error("store read failed: {message}")]
    ReadFailed {
        /// sled's error.
        message: String,
    },
}

impl StoreError {
    /// True when the same call may succeed if tried again.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::WriteFailed { .. }
                | StoreError::ReadFailed { .. }
                | StoreError::Interrupted { .. }
        )
    }
}

/// Why an [`EventHub`](crate::EventHub) call failed.
#[derive(Debug, Error, Clone)]
#[non_exhaustive]
pub enum HubError {
    /// The hub has been shut down. Nothing was stored.
    #[error("event hub is shut down")]
    Closed,
    /// The run has ended; nothing may follow its terminal event. Nothing was
    /// stored. Not retryable.
    #[error("run {run_id} has ended; no event may follow its terminal event")]
    RunClosed {
        /// The run.
        run_id: RunId,
    },
    /// The event is larger than `Config::max_event_bytes` once encoded.
    /// Nothing was stored. Not retryable.
    #[error("run {run_id}: event of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The run.
        run_id: RunId,
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Retention removed the run (see `Config::retention`): subscribing to
    /// it, or resuming a session into events of it the cursor has not seen,
    /// is refused rather than served as an empty or shortened history.
    #[error("run {run_id} was removed by retention at {removed_at}; its events are gone")]
    RunRemoved {
        /// The run.
        run_id: RunId,
        /// When retention removed it.
        removed_at: chrono::DateTime<chrono::Utc>,
    },
    /// The store failed; see [`StoreError`] (and its `is_retryable`).
    #[error(transparent)]
    Store(StoreError),
    /// The room stopped (it crashed, or the hub is shutting down) before it
    /// took the request. For a publish: nothing was stored, and a retry is
    /// safe. (A publish the room took is always answered with the store's
    /// own outcome, even if the room dies afterwards.)
    #[error("room {room} stopped before answering: {reason}")]
    RoomUnavailable {
        /// The room, as displayed (`run:…`).
        room: String,
        /// What happened.
        reason: String,
    },
    /// The cursor was minted by another store (another epoch): the history
    /// it points into is not here.
    #[error("cursor is from store epoch {found}; this store's epoch is {expected}")]
    CursorEpoch {
        /// This store's epoch.
        expected: Uuid,
        /// The cursor's epoch.
        found: Uuid,
    },
    /// The cursor points past what this store holds of the run: the history
    /// it was minted from is gone.
    #[error(
        "cursor is at seq {seq} of run {run_id}, but the store holds only up to seq {last_seq}"
    )]
    CursorAhead {
        /// The run.
        run_id: RunId,
        /// The cursor's seq.
        seq: u64,
        /// The store's last seq of the run.
        last_seq: u64,
    },
    /// The hub runs `Config::max_rooms` rooms already; nothing was stored.
    /// Retry once idle rooms have stopped, or raise the limit.
    #[error("too many rooms running (limit {limit}); room {room} was not started")]
    TooManyRooms {
        /// The room that could not be started, as displayed.
        room: String,
        /// The limit.
        limit: usize,
    },
    /// The room failed more often than the restart intensity allows
    /// (`Config::restart_intensity`) and is not restarted until its failures
    /// age out. Nothing was stored. Other rooms are unaffected.
    #[error("room {room} failed {failures} times within {window:?}; not restarted for now")]
    RoomFailed {
        /// The room, as displayed.
        room: String,
        /// Failures within the window.
        failures: usize,
        /// The window.
        window: std::time::Duration,
    },
    /// The event breaks a rule of its run's order (see
    /// `Config::event_order`); nothing was stored, and the run is as it
    /// was. Not retryable as is: publish what the rule asks first.
    #[error("run {run_id}: {kind} refused, {detail} (rule: {rule}); nothing stored")]
    OutOfOrder {
        /// The run.
        run_id: RunId,
        /// The refused event's kind (`AgentEvent::kind`).
        kind: &'static str,
        /// The rule it breaks.
        rule: crate::hub::OrderRule,
        /// What about this event breaks it.
        detail: String,
    },
    /// Provider rooms are live-only: subscribe with `Resume::Live`.
    #[error("room {room} is live-only; subscribe with Resume::Live")]
    LiveOnly {
        /// The room, as displayed.
        room: String,
    },
}

impl HubError {
    /// True when the same call may succeed if tried again.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            HubError::Store(e) => e.is_retryable(),
            HubError::RoomUnavailable { .. } | HubError::TooManyRooms { .. } => true,
            _ => false,
        }
    }
}

impl From<StoreError> for HubError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Closed => HubError::Closed,
            StoreError::RunClosed { run_id } => HubError::RunClosed { run_id },
            StoreError::TooLarge {
                run_id,
                size,
                limit,
            } => HubError::TooLarge {
                run_id,
                size,
                limit,
            },
            StoreError::RunRemoved { run_id, removed_at } => {
                HubError::RunRemoved { run_id, removed_at }
            }
            other => HubError::Store(other),
        }
    }
}

impl StoreError {
    /// `wanted` is missing from `run_id`'s log (sled's segments and commit
    /// log, or the NATS stream), which goes on at `resumes_at`.
    pub(crate) fn missing(run_id: RunId, wanted: u64, resumes_at: u64) -> Self {
        Self::Corrupt {
            run_id,
            seq: wanted,
            source: CodecError::Malformed(format!(
                "seq {wanted} is missing; the run's log resumes at seq {resumes_at}"
            )),
        }
    }
}
