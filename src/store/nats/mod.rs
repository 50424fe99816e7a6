//! The store over NATS JetStream (feature `nats`): what a [`super::Store`]
//! opened with `Config::nats` does instead of talking to sled. The run log
//! itself is [`crate::nats`]; this adds what the hub needs of a store on
//! top of it: one writer per run on this host, the session index, and run
//! records derived from a run's first and last envelopes.
//!
//! Durability is JetStream's: an append is acknowledged once the server
//! stored it (see README, "JetStream settings"), for `Flushed` and
//! `Buffered` alike.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Mutex;
use uuid::Uuid;

mod consumer;
mod dispatch;
mod live;
pub mod log;

use self::log::{Encoded, NatsLog, RunWriter};
use super::{FollowFrom, Following, IndexedRun, RunInfo, SessionRun, StoredEnvelope};
use crate::config::NatsConfig;
use crate::error::{OpenError, StoreError};
use crate::ids::RunId;
use crate::stream::RuntimeEventEnvelope;

/// Runs whose writers one host keeps (two generations of half each); a
/// run not kept reads its tail again when it next appends.
const WRITERS_KEPT: usize = 32 * 1024;

/// A run's writer on this host, created on first use. Locked for the whole
/// of an append, and by recovery reads, which so see every append handed
/// over before them.
type WriterSlot = Arc<Mutex<RunSlot>>;

/// A run's writer slot, held for an append from the moment it is handed
/// over (see [`NatsStore::hold`]).
pub(crate) struct HeldSlot {
    run_id: RunId,
    guard: tokio::sync::OwnedMutexGuard<RunSlot>,
}

#[derive(Default)]
pub(crate) struct RunSlot {
    writer: Option<RunWriter>,
    /// Whether this host has indexed the run in its session.
    indexed: bool,
}

#[derive(Default)]
struct Writers {
    hot: HashMap<RunId, WriterSlot>,
    cold: HashMap<RunId, WriterSlot>,
}

impl Writers {
    fn slot(&mut self, run_id: RunId) -> WriterSlot {
        if let Some(slot) = self.hot.get(&run_id) {
            return Arc::clone(slot);
        }
        let slot = self.cold.remove(&run_id).unwrap_or_default();
        if self.hot.len() >= WRITERS_KEPT / 2 {
            let forgotten = std::mem::replace(&mut self.cold, std::mem::take(&mut self.hot));
            // A slot in use (an append or a recovery read holds it) is
            // kept: a second writer for the run on this host would only be
            // fenced by the first.
            for (run, in_use) in forgotten {
                if Arc::strong_count(&in_use) > 1 {
                    self.hot.insert(run, in_use);
                }
            }
        }
        self.hot.insert(run_id, Arc::clone(&slot));
        slot
    }
}

/// The NATS backend of one store handle.
pub(crate) struct NatsStore {
    log: NatsLog,
    writers: std::sync::Mutex<Writers>,
    closed: AtomicBool,
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl NatsStore {
    pub(crate) async fn open(config: &NatsConfig) -> Result<Self, OpenError> {
        let log = NatsLog::open(config)
            .await
            .map_err(|e| OpenError::Storage {
                path: config.url.clone().into(),
                message: e.to_string(),
            })?;
        Ok(Self {
            log,
            writers: std::sync::Mutex::default(),
            closed: AtomicBool::new(false),
        })
    }

    pub(crate) fn epoch(&self) -> Uuid {
        self.log.epoch()
    }

    pub(crate) fn max_event_bytes(&self) -> usize {
        self.log.max_event_bytes()
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn slot(&self, run_id: RunId) -> WriterSlot {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .slot(run_id)
    }

    /// Appends `items` (each run's in seq order): each run's as atomic
    /// batches where the stream takes them (nats-server 2.12 and later),
    /// one envelope at a time otherwise. Not atomic across batches or
    /// single envelopes: when a later one fails after earlier ones were
    /// stored, the append is answered in doubt (`FlushFailed`), and a room
    /// recovers from what the log holds.
    pub(crate) async fn append(&self, items: Vec<StoredEnvelope>) -> Result<(), StoreError> {
        self.append_held(items, None).await
    }

    /// Takes, without waiting, the writer slot of the one run `items` are
    /// of, if it is free: an append that holds it from the moment it is
    /// handed over is seen by every recovery read that starts after (a
    /// recovery read waits for the slot), also before its task first runs.
    pub(crate) fn hold(&self, items: &[StoredEnvelope]) -> Option<HeldSlot> {
        let run_id = items.first()?.run_id;
        if items.iter().any(|item| item.run_id != run_id) {
            return None;
        }
        let guard = self.slot(run_id).try_lock_owned().ok()?;
        Some(HeldSlot { run_id, guard })
    }

    /// As [`NatsStore::append`], with the slot of its run already held.
    pub(crate) async fn append_held(
        &self,
        items: Vec<StoredEnvelope>,
        mut held: Option<HeldSlot>,
    ) -> Result<(), StoreError> {
        self.check_open()?;
        let mut stored = 0usize;
        let total = items.len();
        // An error after something was stored leaves the append in doubt.
        let failed = |error: StoreError, stored: usize| {
            if stored == 0 {
                error
            } else {
                StoreError::FlushFailed {
                    message: format!("{stored} of {total} envelopes were stored before: {error}"),
                }
            }
        };
        let mut index = 0;
        while index < items.len() {
            let run_id = items[index].run_id;
            let end = items[index..]
                .iter()
                .position(|i| i.run_id != run_id)
                .map_or(items.len(), |n| index + n);
            let mut slot = match held.take() {
                Some(held) if held.run_id == run_id => held.guard,
                _ => self.slot(run_id).lock_owned().await,
            };
            if slot.writer.is_none() {
                slot.writer = Some(
                    self.log
                        .writer(run_id)
                        .await
                        .map_err(|e| failed(e, stored))?,
                );
            }
            // The session index is written before the run's first
            // envelope that names the session, so an index entry may point
            // at a run with no events yet, never the reverse. (Idempotent:
            // the server drops a repeat within its duplicate window,
            // readers after it.)
            let group = &items[index..end];
            if let Some(session) = group.iter().find_map(|item| item.session_id)
                && !slot.indexed
            {
                self.log
                    .index_session(session, run_id)
                    .await
                    .map_err(|e| failed(e, stored))?;
                slot.indexed = true;
            }
            let encoded: Vec<Encoded<'_>> = group
                .iter()
                .map(|item| Encoded {
                    run_id: item.run_id,
                    seq: item.seq,
                    event_id: item.event_id.to_string(),
                    terminal: item.terminal,
                    bytes: &item.bytes,
                })
                .collect();
            let Some(writer) = slot.writer.as_mut() else {
                unreachable!("the writer was just created")
            };
            let mut appended = 0;
            let outcome = writer.append_all(&encoded, &mut appended).await;
            stored += appended;
            outcome.map_err(|error| failed(error, stored))?;
            index = end;
        }
        ::metrics::counter!(crate::metrics::PERSISTED).increment(stored as u64);
        Ok(())
    }

    /// What the log holds of `run_id`: its last envelope, and its first for
    /// the provider and start. With `barrier`, waits for this host's append
    /// in flight for the run, so a recovering room sees it.
    pub(crate) async fn run_info(
        &self,
        run_id: RunId,
        barrier: bool,
    ) -> Result<Option<RunInfo>, StoreError> {
        self.check_open()?;
        let _in_flight = if barrier {
            Some(self.slot(run_id).lock_owned().await)
        } else {
            None
        };
        let Some((last, _)) = self.log.last(run_id).await? else {
            return Ok(None);
        };
        let first: RuntimeEventEnvelope = match last.seq {
            1 => last.clone(),
            _ => self
                .log
                .first(run_id)
                .await?
                .unwrap_or_else(|| last.clone()),
        };
        Ok(Some(RunInfo {
            run_id,
            last_seq: last.seq,
            session_id: last.session_id.or(first.session_id),
            provider: first
                .event
                .provider()
                .or_else(|| last.event.provider())
                .cloned(),
            started_at: first.emitted_at,
            ended_at: last.is_terminal().then_some(last.emitted_at),
            removed_at: None,
        }))
    }

    pub(crate) async fn list_after(
        &self,
        run_id: RunId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, StoreError> {
        self.check_open()?;
        self.log.list_after(run_id, after_seq, limit).await
    }

    pub(crate) async fn follow(
        &self,
        run_id: RunId,
        from: FollowFrom,
    ) -> Result<Option<Following<RuntimeEventEnvelope>>, StoreError> {
        self.check_open()?;
        self.log.follow(run_id, from).await
    }

    pub(crate) async fn follow_session(
        &self,
        session: Uuid,
        start: Option<u64>,
    ) -> Result<(Vec<RunId>, Following<IndexedRun>), StoreError> {
        self.check_open()?;
        self.log.follow_session(session, start).await
    }

    pub(crate) async fn session_runs(&self, session: Uuid) -> Result<Vec<RunId>, StoreError> {
        self.check_open()?;
        self.log.session_runs(session).await
    }

    /// The session's runs with their state: the index, then each run's
    /// last envelope (the log has no run records to read them from).
    pub(crate) async fn session_state(&self, session: Uuid) -> Result<Vec<SessionRun>, StoreError> {
        self.check_open()?;
        let mut out = Vec::new();
        for run_id in self.log.session_runs(session).await? {
            let last = self.log.last(run_id).await?;
            out.push(SessionRun {
                run_id,
                last_seq: last.as_ref().map_or(0, |(last, _)| last.seq),
                ended: last.is_some_and(|(last, _)| last.is_terminal()),
                removed_at: None,
            });
        }
        Ok(out)
    }

    /// Waits for appends in flight, then refuses everything after.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let slots: Vec<WriterSlot> = {
            let writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
            writers
                .hot
                .values()
                .chain(writers.cold.values())
                .cloned()
                .collect()
        };
        for slot in slots {
            drop(slot.lock().await);
        }
    }
}
