//! The blocking half of the store: every sled call lives here, and each runs
//! on tokio's blocking pool, never on an async worker.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use chrono::Utc;
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

use super::Counters;
use super::commit_log::{self, CommitLog, Generation, Logged};
use super::layout::{self, RunRecord, StoreMeta};
use crate::codec::{self, CodecError, FORMAT_VERSION, STORE_FORMAT_VERSION};
use crate::config::{Config, Durability};
use crate::error::{OpenError, StoreError};
use crate::ids::RunId;
use crate::store::{AppendWaiter, RunCheck, RunInfo, SessionRun, StoredEnvelope};
use crate::stream::RuntimeEventEnvelope;

/// One caller's append: all its envelopes are stored in one batch, or none.
///
/// It is always answered: a request dropped unanswered (its store actor
/// panicked) answers on its own, with `Interrupted` if it never reached sled
/// and `FlushFailed` (in doubt) if it was being written.
pub(crate) struct AppendRequest {
    pub(crate) items: Vec<StoredEnvelope>,
    /// Told what became of the append; `None` once told.
    waiter: Option<Box<dyn AppendWaiter>>,
    /// `Buffered`: the waiter is also told once the batch is written.
    buffered: bool,
    /// Set once the request's batch is handed to sled.
    pub(crate) written: bool,
    /// Returned to the in-flight budget when the request is dropped, which
    /// happens after it has been answered.
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl AppendRequest {
    /// A request whose outcome `waiter` is told.
    pub(crate) fn new(
        items: Vec<StoredEnvelope>,
        durability: Durability,
        permit: OwnedSemaphorePermit,
        waiter: Box<dyn AppendWaiter>,
    ) -> Self {
        Self {
            items,
            waiter: Some(waiter),
            buffered: durability == Durability::Buffered,
            written: false,
            _permit: permit,
        }
    }

    pub(crate) fn answer(&mut self, result: Result<(), StoreError>) {
        if let Some(waiter) = self.waiter.take() {
            waiter.done(result);
        }
    }

    /// Tells a `Buffered` appender its batch is written.
    fn tell_written(&mut self) {
        if self.buffered
            && let Some(waiter) = self.waiter.as_mut()
        {
            waiter.written();
        }
    }
}

impl Drop for AppendRequest {
    fn drop(&mut self) {
        let error = if self.written {
            StoreError::FlushFailed {
                message: "the store actor stopped while writing this append; it is in doubt".into(),
            }
        } else {
            StoreError::Interrupted {
                message: "the store actor stopped before writing this append".into(),
            }
        };
        self.answer(Err(error));
    }
}

/// What [`open`] found.
pub(crate) struct Opened {
    pub(crate) db: sled::Db,
    pub(crate) epoch: Uuid,
    pub(crate) next_ordinal: u64,
}

/// Opens (or creates) the sled database and checks that it is a store this
/// build reads.
pub(crate) fn open(config: &Config) -> Result<Opened, OpenError> {
    let display_path = config
        .path
        .clone()
        .unwrap_or_else(|| Path::new("<temporary>").to_path_buf());
    let mut sled_config = sled::Config::new()
        .cache_capacity(config.cache_capacity)
        .flush_every_ms(config.flush_every_ms);
    sled_config = match &config.path {
        Some(path) => sled_config.path(path),
        None => sled_config.temporary(true),
    };
    let db = sled_config
        .open()
        .map_err(|e| open_error(&display_path, e))?;
    let path = display_path.as_path();
    let storage = |e: sled::Error| open_error(path, e);

    let epoch = match db.get(layout::META_STORE).map_err(storage)? {
        Some(bytes) => {
            let meta: StoreMeta = codec::decode_value(&bytes).map_err(|e| match e {
                CodecError::UnknownVersion { found } => OpenError::UnsupportedFormat {
                    path: path.to_path_buf(),
                    found,
                    supported: FORMAT_VERSION,
                },
                other => OpenError::NotAStore {
                    path: path.to_path_buf(),
                    reason: format!("store metadata: {other}"),
                },
            })?;
            if !(1..=STORE_FORMAT_VERSION).contains(&meta.format_version) {
                return Err(OpenError::UnsupportedFormat {
                    path: path.to_path_buf(),
                    found: meta.format_version,
                    supported: STORE_FORMAT_VERSION,
                });
            }
            if meta.format_version < STORE_FORMAT_VERSION {
                // From here on this build may write what older builds
                // cannot read; they must refuse the store, not misread it.
                let upgraded = StoreMeta {
                    format_version: STORE_FORMAT_VERSION,
                    ..meta.clone()
                };
                write_meta(&db, &upgraded, path)?;
                tracing::info!(
                    path = %path.display(),
                    from = meta.format_version,
                    to = STORE_FORMAT_VERSION,
                    "upgraded the store's format"
                );
            }
            meta.epoch
        }
        None if db.is_empty() => {
            let meta = StoreMeta {
                epoch: Uuid::now_v7(),
                format_version: STORE_FORMAT_VERSION,
                created_at: Utc::now(),
            };
            write_meta(&db, &meta, path)?;
            tracing::info!(path = %path.display(), epoch = %meta.epoch, "created store");
            meta.epoch
        }
        None => {
            return Err(OpenError::NotAStore {
                path: path.to_path_buf(),
                reason: "the database holds data but no behest-stream metadata".into(),
            });
        }
    };
    let next_ordinal = read_ordinal(&db).map_err(|e| OpenError::NotAStore {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let limits = SegmentLimits {
        max_events: config.segment_max_events,
        max_bytes: config.segment_max_bytes,
    };
    recover_commit_log(&db, limits).map_err(|reason| OpenError::NotAStore {
        path: path.to_path_buf(),
        reason: format!(
            "{reason}; it holds events acknowledged before a crash, so the store does not \
             open without them"
        ),
    })?;
    if let Err(error) = ensure_ended_index(&db) {
        // The store still opens (verify must be able to report damage);
        // retention just does not see the runs that ended before the index
        // existed until an open builds it.
        tracing::warn!(path = %path.display(), %error, "could not build the ended-run index");
    }
    Ok(Opened {
        db,
        epoch,
        next_ordinal,
    })
}

fn open_error(path: &Path, error: sled::Error) -> OpenError {
    match error {
        // sled reports a held lock as an Io error of its own wording.
        sled::Error::Io(source) if source.to_string().contains("could not acquire lock") => {
            OpenError::Locked {
                path: path.to_path_buf(),
                source,
            }
        }
        sled::Error::Io(source) => OpenError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => OpenError::Storage {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    }
}

/// A run's part of a commit with at least this many events, or
/// [`DIRECT_BYTES`] bytes, is written as segments at once (with what the
/// commit log holds of the run) rather than into the log: its own key costs
/// less than writing it twice.
const DIRECT_EVENTS: usize = 32;

/// See [`DIRECT_EVENTS`].
const DIRECT_BYTES: usize = 16 * 1024;

/// Segment size limits, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentLimits {
    pub(crate) max_events: usize,
    pub(crate) max_bytes: usize,
}

/// Writes every acceptable request in one sled batch, flushes it, and
/// answers every request (`Buffered` ones are also told when the batch is
/// written, before the flush). Requests that fail validation are
/// answered at once and leave no trace in the batch. Counters are updated
/// before the answers go out, so a caller that has its answer sees them.
pub(crate) fn commit(
    db: &sled::Db,
    gate: &Arc<RwLock<RunCache>>,
    requests: Vec<AppendRequest>,
    next_ordinal: &mut u64,
    limits: SegmentLimits,
    counters: &Counters,
    flush_fails: bool,
) {
    // Exclusive for the whole commit: readers see a batch whole and durable
    // or not at all, and two commits (an old actor's, finishing after it
    // died, and its successor's) never validate against the same state.
    let started = std::time::Instant::now();
    let span = tracing::debug_span!(
        "commit",
        appends = requests.len(),
        events = tracing::field::Empty
    );
    let _entered = span.enter();
    let mut exclusive = gate
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache: &mut RunCache = &mut exclusive;
    let mut runs: HashMap<RunId, TouchedRun> = HashMap::new();
    let mut accepted: Vec<AppendRequest> = Vec::with_capacity(requests.len());
    let ordinal_before = *next_ordinal;

    for mut request in requests {
        match stage(db, cache, &runs, &request.items, next_ordinal) {
            Ok(staged) => {
                for (run_id, staged) in staged {
                    match runs.entry(run_id) {
                        Entry::Occupied(mut e) => e.get_mut().record = staged.record,
                        Entry::Vacant(e) => {
                            e.insert(TouchedRun {
                                before: staged.before,
                                record: staged.record,
                                items: Vec::new(),
                            });
                        }
                    }
                }
                for item in std::mem::take(&mut request.items) {
                    if let Some(run) = runs.get_mut(&item.run_id) {
                        run.items.push(item);
                    }
                }
                accepted.push(request);
            }
            Err(error) => {
                tracing::debug!(%error, "append refused");
                request.answer(Err(error));
            }
        }
    }
    if accepted.is_empty() {
        return;
    }
    let events: usize = runs.values().map(|r| r.items.len()).sum();
    span.record("events", events);

    let mut batch = sled::Batch::default();
    // A run's part of the commit goes into commit records (a few keys
    // however many runs the commit carries; compaction writes segments
    // later), unless it is large enough to pay for a key of its own: then
    // it is written as segments at once, not twice, with what the log
    // holds of the run (a run's segments must end where the log begins),
    // unless a compaction under way holds some of it.
    let mut direct: HashSet<RunId> = HashSet::new();
    let mut parts: Vec<(RunId, u64, Vec<&[u8]>)> = Vec::new();
    for (run_id, run) in &runs {
        let (Some(first), Some(last)) = (run.items.first(), run.items.last()) else {
            continue;
        };
        let bytes: usize = run.items.iter().map(|i| i.bytes.len()).sum();
        let large = run.items.len() >= DIRECT_EVENTS || bytes >= DIRECT_BYTES;
        let direct_now = large && !cache.log.compacting_holds(*run_id);
        tracing::trace!(
            %run_id,
            first_seq = first.seq,
            seq = last.seq,
            into = if direct_now { "segments" } else { "commit log" },
            "stored"
        );
        if direct_now {
            // What the log holds of the run goes with it, so that its
            // segments still end where the log begins.
            let logged = cache.log.run(*run_id).map(|l| l.bytes.as_slice());
            let all: Vec<&[u8]> = logged
                .chain(run.items.iter().map(|i| i.bytes.as_slice()))
                .collect();
            let first_seq = cache.log.run(*run_id).next().map_or(first.seq, |l| l.seq);
            let mut seq = first_seq;
            for segment in segments(&all, limits, |b| b.len()) {
                let value = codec::encode_segment(segment.iter().copied());
                batch.insert(&layout::segment_key(*run_id, seq), value);
                seq += segment.len() as u64;
            }
            direct.insert(*run_id);
        } else {
            let bytes = run.items.iter().map(|i| i.bytes.as_slice()).collect();
            parts.push((*run_id, first.seq, bytes));
        }
    }
    let records = if parts.is_empty() {
        Vec::new()
    } else {
        commit_log::encode_records(
            parts
                .iter()
                .map(|(run_id, first_seq, bytes)| (*run_id, *first_seq, bytes.as_slice())),
        )
    };
    drop(parts);
    let record_count = records.len() as u64;
    for (index, record) in records.into_iter().enumerate() {
        batch.insert(cache.log.next_key(index).as_slice(), record);
    }
    for (run_id, run) in &runs {
        if run.record_changed() {
            match codec::encode_value(&run.record) {
                Ok(value) => batch.insert(&layout::run_key(*run_id), value),
                Err(e) => {
                    fail_all(accepted, || StoreError::WriteFailed {
                        message: format!("run record of {run_id}: {e}"),
                    });
                    return;
                }
            }
        }
        if let Some(ended_at) = run.ends() {
            batch.insert(
                layout::ended_key(ended_at, *run_id).as_slice(),
                vec![FORMAT_VERSION],
            );
        }
        if let Some(session) = run.learns_session() {
            batch.insert(
                layout::session_key(session, run.record.ordinal, *run_id).as_slice(),
                vec![FORMAT_VERSION],
            );
        }
    }
    if *next_ordinal != ordinal_before {
        match codec::encode_value(next_ordinal) {
            Ok(value) => batch.insert(layout::META_ORDINAL, value),
            Err(e) => {
                fail_all(accepted, || StoreError::WriteFailed {
                    message: format!("run ordinal: {e}"),
                });
                return;
            }
        }
    }

    for request in &mut accepted {
        request.written = true;
    }
    if let Err(e) = db.apply_batch(batch) {
        *next_ordinal = ordinal_before;
        let message = e.to_string();
        tracing::error!(error = %message, "store batch failed; nothing of it was stored");
        fail_all(accepted, || StoreError::WriteFailed {
            message: message.clone(),
        });
        return;
    }
    counters.record_commit(accepted.len(), events);
    let mut logged = Vec::with_capacity(runs.len());
    for (run_id, run) in runs {
        cache.put(run_id, run.record);
        if direct.contains(&run_id) {
            cache.log.take_run(run_id);
            continue;
        }
        let items = run.items.into_iter().map(|item| Logged {
            seq: item.seq,
            bytes: item.bytes,
        });
        logged.push((run_id, items.collect()));
    }
    cache.log.committed(logged, record_count);

    // Every commit is flushed before the gate opens and before anyone
    // hears that it is durable: no reader, and so no subscriber, ever sees
    // an event a crash could take back (its seq could then be reused).
    // `Buffered` appenders are told as soon as the batch is written.
    for request in &mut accepted {
        request.tell_written();
    }
    let flush = if flush_fails {
        Err("injected flush failure".to_string())
    } else {
        db.flush().map(|_| ()).map_err(|e| e.to_string())
    };
    // A failed flush leaves writes in sled that may not be on disk: readers
    // wait for a flush that succeeds (a successful one covers them).
    exclusive.unflushed = flush.is_err();
    drop(exclusive);
    record_commit_time(started);
    match flush {
        Ok(()) => {
            counters.record_flush();
            for mut request in accepted {
                request.answer(Ok(()));
            }
        }
        Err(message) => {
            tracing::error!(error = %message, "store flush failed; batch durability in doubt");
            fail_all(accepted, || StoreError::FlushFailed {
                message: message.clone(),
            });
        }
    }
    // Off the commit path: the next commit goes on while it writes. Unless
    // the log outgrew what compactions take (one under way is slow, or they
    // keep failing): then this commit compacts everything before the next
    // one starts, so the log's memory stays bounded.
    let (generation, overfull) = {
        let mut exclusive = gate
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (exclusive.log.start_compaction(), exclusive.log.overfull())
    };
    if overfull && let Err(error) = compact_now(db, gate, limits) {
        tracing::error!(%error, "compaction failed; the commit log keeps its records");
    }
    if let Some(generation) = generation {
        let (db, gate) = (db.clone(), Arc::clone(gate));
        tokio::task::spawn_blocking(move || compact_in_background(&db, &gate, &generation, limits));
    }
}

/// Writes `generation` as segments and deletes its records, in one batch,
/// without holding the commit gate (readers skip the seqs they then find
/// twice), then forgets it. Not flushed: until a flush covers the batch, a
/// crash leaves the records (the batch is atomic), and the next open
/// compacts them again.
fn compact_in_background(
    db: &sled::Db,
    gate: &RwLock<RunCache>,
    generation: &Arc<Generation>,
    limits: SegmentLimits,
) {
    let compactor = read_gate(gate).log.compactor();
    let written = {
        let _writing = compactor.lock().unwrap_or_else(|p| p.into_inner());
        if !read_gate(gate).log.is_compacting(generation) {
            // A compaction that had to finish at once (close, retention)
            // wrote it before this one got the lock; writing it again
            // could bring back segments retention has since removed.
            return;
        }
        write_compaction(db, [generation.as_ref()], limits)
    };
    if let Err(error) = &written {
        tracing::error!(%error, "compaction failed; the commit log keeps its records and tries again");
    }
    gate.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .log
        .compaction_ended(generation, written.is_ok());
}

/// Compacts everything the commit log holds before it returns (waiting for
/// a compaction under way): for close, and for a commit whose log outgrew
/// what compactions take.
pub(crate) fn compact_now(
    db: &sled::Db,
    gate: &RwLock<RunCache>,
    limits: SegmentLimits,
) -> Result<(), StoreError> {
    let compactor = read_gate(gate).log.compactor();
    let _writing = compactor.lock().unwrap_or_else(|p| p.into_inner());
    let mut exclusive = gate
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    compact_all(db, &mut exclusive, limits)
}

/// Writes every generation of the commit log as segments and deletes their
/// records, in one batch, under the commit gate.
fn compact_all(
    db: &sled::Db,
    cache: &mut RunCache,
    limits: SegmentLimits,
) -> Result<(), StoreError> {
    if cache.log.is_empty() {
        return Ok(());
    }
    write_compaction(db, cache.log.generations(), limits)?;
    cache.log.compacted();
    Ok(())
}

/// One batch: a segment per run (within the limits) of each generation,
/// and the removal of the records they came from.
fn write_compaction<'a>(
    db: &sled::Db,
    generations: impl IntoIterator<Item = &'a Generation>,
    limits: SegmentLimits,
) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let mut batch = sled::Batch::default();
    let mut keys = 0usize;
    for generation in generations {
        for (run_id, logged) in generation.runs() {
            for segment in segments(logged, limits, |l| l.bytes.len()) {
                let value = codec::encode_segment(segment.iter().map(|l| l.bytes.as_slice()));
                batch.insert(&layout::segment_key(*run_id, segment[0].seq), value);
                keys += 1;
            }
        }
        let records = generation.record_keys();
        for key in db.range(records.start..records.end).keys() {
            batch.remove(key.map_err(read_failed)?);
        }
    }
    db.apply_batch(batch).map_err(|e| StoreError::WriteFailed {
        message: format!("compaction: {e}"),
    })?;
    tracing::debug!(segments = keys, elapsed = ?started.elapsed(), "compacted the commit log");
    Ok(())
}

fn read_gate(gate: &RwLock<RunCache>) -> std::sync::RwLockReadGuard<'_, RunCache> {
    gate.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Compacts the commit records a crash left (see [`commit_log`]), flushed,
/// so that the store opens with every acknowledged event in its segments.
fn recover_commit_log(db: &sled::Db, limits: SegmentLimits) -> Result<(), String> {
    let mut records = Vec::new();
    for entry in db.scan_prefix(layout::COMMIT_PREFIX) {
        let (key, value) = entry.map_err(|e| e.to_string())?;
        let number = layout::commit_number(&key)
            .ok_or_else(|| format!("malformed commit record key of {} bytes", key.len()))?;
        records.push((number, value.to_vec()));
    }
    if records.is_empty() {
        return Ok(());
    }
    let count = records.len();
    let log = CommitLog::recover(records, |run_id| {
        last_stored_seq(db, run_id).map_err(|e| e.to_string())
    })?;
    let mut cache = RunCache {
        log,
        ..RunCache::default()
    };
    compact_all(db, &mut cache, limits).map_err(|e| e.to_string())?;
    flush(db).map_err(|e| e.to_string())?;
    tracing::info!(records = count, "compacted the commit records a crash left");
    Ok(())
}

/// The run records as the last commits left them in sled, so that a commit
/// does not read back what an earlier one wrote: with many runs each
/// appending a little, that read would cost as much as the write. Kept in
/// the commit gate, so that only a commit (holding it exclusively) changes
/// it, and only after its batch is applied. Bounded: two generations of at
/// most half of [`RUN_CACHE_RUNS`] each; a run in neither is read from sled.
#[derive(Debug, Default)]
pub(crate) struct RunCache {
    hot: HashMap<RunId, RunRecord>,
    cold: HashMap<RunId, RunRecord>,
    /// A commit's flush failed: sled holds writes that may not be on disk.
    /// Nothing is read until a flush succeeds (see [`read_flushed`]).
    unflushed: bool,
    /// Envelopes committed and not yet compacted into segments: readers
    /// read them after a run's segments.
    pub(crate) log: CommitLog,
}

/// Runs `read` under the commit gate, so that it sees commits whole; if a
/// commit's flush failed, flushes first (and clears the mark), so that no
/// reader ever sees a write a crash could take back, or fails the read
/// with `ReadFailed` (retry) while the disk refuses.
pub(crate) fn read_flushed<T>(
    db: &sled::Db,
    gate: &RwLock<RunCache>,
    read: impl FnOnce(&sled::Db, &CommitLog) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    {
        let shared = gate.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !shared.unflushed {
            return read(db, &shared.log);
        }
    }
    let mut exclusive = gate
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if exclusive.unflushed {
        db.flush().map_err(|e| StoreError::ReadFailed {
            message: format!("a commit's flush failed and the store cannot flush now: {e}"),
        })?;
        exclusive.unflushed = false;
    }
    read(db, &exclusive.log)
}

/// Runs whose records the commit gate keeps.
const RUN_CACHE_RUNS: usize = 32 * 1024;

impl RunCache {
    fn get(&self, run_id: RunId) -> Option<&RunRecord> {
        self.hot.get(&run_id).or_else(|| self.cold.get(&run_id))
    }

    fn put(&mut self, run_id: RunId, record: RunRecord) {
        if self.hot.len() >= RUN_CACHE_RUNS / 2 {
            self.cold = std::mem::take(&mut self.hot);
        }
        self.hot.insert(run_id, record);
    }
}

fn record_commit_time(started: std::time::Instant) {
    ::metrics::histogram!(crate::metrics::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
}

struct TouchedRun {
    /// The record as sled holds it before this commit (its last seq aside),
    /// `None` for a new run: the record is written only if it changed, and
    /// the session index entry only when the run first learns its session.
    before: Option<RunRecord>,
    record: RunRecord,
    items: Vec<StoredEnvelope>,
}

impl TouchedRun {
    /// Whether the commit must write the run's record: a new run, or one
    /// whose session, provider or end changed. Its last seq alone is not
    /// worth a write; reads take it from the segments.
    fn record_changed(&self) -> bool {
        self.before.as_ref().is_none_or(|before| {
            before.session_id != self.record.session_id
                || before.provider != self.record.provider
                || before.ended_at != self.record.ended_at
        })
    }

    /// When the run ended, if this commit ends it.
    fn ends(&self) -> Option<chrono::DateTime<Utc>> {
        let had = self.before.as_ref().and_then(|b| b.ended_at);
        self.record.ended_at.filter(|_| had.is_none())
    }

    /// Whether this commit gives the run its session.
    fn learns_session(&self) -> Option<Uuid> {
        let had = self.before.as_ref().and_then(|b| b.session_id);
        self.record.session_id.filter(|_| had.is_none())
    }
}

/// One run as a request leaves it, and as sled holds it before.
struct Staged {
    record: RunRecord,
    before: Option<RunRecord>,
}

/// Validates one request against the runs as they will be after the requests
/// staged before it, returning each touched run's record as it will be after
/// this request, and the stored record. Assigns ordinals to runs it creates.
fn stage(
    db: &sled::Db,
    cache: &RunCache,
    runs: &HashMap<RunId, TouchedRun>,
    items: &[StoredEnvelope],
    next_ordinal: &mut u64,
) -> Result<HashMap<RunId, Staged>, StoreError> {
    let mut staged: HashMap<RunId, Staged> = HashMap::new();
    for item in items {
        let Staged { record, .. } = match staged.entry(item.run_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let (current, before) = match runs.get(&item.run_id) {
                    Some(run) => (Some(run.record.clone()), run.before.clone()),
                    None => {
                        let stored = match cache.get(item.run_id) {
                            Some(record) => Some(record.clone()),
                            None => load_record(db, &cache.log, item.run_id)?,
                        };
                        (stored.clone(), stored)
                    }
                };
                let record = current.unwrap_or_else(|| {
                    let ordinal = *next_ordinal;
                    // The counter is read from disk. Saturating keeps a
                    // damaged one from stopping appends: the ordinal only
                    // orders a session's runs, and its index keys stay
                    // unique by their run id.
                    *next_ordinal = next_ordinal.saturating_add(1);
                    RunRecord {
                        last_seq: 0,
                        session_id: None,
                        provider: None,
                        ordinal,
                        started_at: item.emitted_at,
                        ended_at: None,
                        removed_at: None,
                    }
                });
                e.insert(Staged { record, before })
            }
        };
        if record.ended_at.is_some() {
            return Err(StoreError::RunClosed {
                run_id: item.run_id,
            });
        }
        let Some(expected) = record.last_seq.checked_add(1) else {
            // Only a damaged record says a run got there; saturating would
            // accept seq u64::MAX a second time, over the first.
            return Err(StoreError::Corrupt {
                run_id: item.run_id,
                seq: record.last_seq,
                source: CodecError::Malformed(format!(
                    "the run's record says its last seq is {}, which no seq can follow",
                    record.last_seq
                )),
            });
        };
        if item.seq != expected {
            return Err(StoreError::SeqConflict {
                run_id: item.run_id,
                expected,
                got: item.seq,
            });
        }
        record.last_seq = item.seq;
        if record.session_id.is_none() {
            record.session_id = item.session_id;
        }
        if record.provider.is_none() {
            record.provider.clone_from(&item.provider);
        }
        if item.terminal {
            record.ended_at = Some(item.emitted_at);
        }
    }
    Ok(staged)
}

/// Splits one run's consecutive items into segments within the limits.
fn segments<T>(items: &[T], limits: SegmentLimits, len: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, item) in items.iter().enumerate() {
        let full =
            i - start >= limits.max_events || (i > start && bytes + len(item) > limits.max_bytes);
        if full {
            out.push(&items[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += len(item);
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Test hook: fails a whole batch as a sled write failure would, before
/// anything is written.
pub(crate) fn fail_injected(requests: Vec<AppendRequest>) {
    // (Answered as written-and-failed would be: WriteFailed, nothing stored.)
    tracing::warn!(appends = requests.len(), "injected commit failure");
    fail_all(requests, || StoreError::WriteFailed {
        message: "injected commit failure".into(),
    });
}

fn fail_all(requests: Vec<AppendRequest>, error: impl Fn() -> StoreError) {
    for mut request in requests {
        request.answer(Err(error()));
    }
}

/// The run's record, with its last seq read from where its segments end:
/// the record itself is written only when the run's metadata changes (its
/// first commit, its session or provider learned, its end), not at every
/// commit, so that a commit of one event writes one sled key, not two.
fn load_record(
    db: &sled::Db,
    log: &CommitLog,
    run_id: RunId,
) -> Result<Option<RunRecord>, StoreError> {
    let Some(bytes) = db.get(layout::run_key(run_id)).map_err(read_failed)? else {
        return Ok(None);
    };
    let mut record: RunRecord = codec::decode_value(&bytes)
        .map_err(|source| StoreError::CorruptRunRecord { run_id, source })?;
    if record.removed_at.is_some() {
        // A tombstone: its segments are gone, and its last seq is the
        // run's final one (the record is always written when a run ends).
        return Ok(Some(record));
    }
    let stored = match log.last_seq(run_id) {
        Some(seq) => seq,
        None => last_stored_seq(db, run_id)?,
    };
    // A record is written with the segments it describes, never ahead of
    // them: a record that counts more events than the segments hold means
    // segments were lost.
    if record.last_seq > stored {
        return Err(StoreError::Corrupt {
            run_id,
            seq: stored.saturating_add(1),
            source: CodecError::Malformed(format!(
                "the run record counts {} events but the run's segments end at seq {stored}",
                record.last_seq
            )),
        });
    }
    record.last_seq = stored;
    Ok(Some(record))
}

/// Where the run's last segment ends (0 if it has none), from that
/// segment's key and header.
fn last_stored_seq(db: &sled::Db, run_id: RunId) -> Result<u64, StoreError> {
    let last = db
        .range(layout::segment_key(run_id, 0)..=layout::segment_key(run_id, u64::MAX))
        .next_back()
        .transpose()
        .map_err(read_failed)?;
    let Some((key, value)) = last else {
        return Ok(0);
    };
    let Some(first_seq) = layout::segment_first_seq(run_id, &key) else {
        return Ok(0);
    };
    let corrupt = |source| StoreError::Corrupt {
        run_id,
        seq: first_seq,
        source,
    };
    match codec::segment_len(&value).map_err(corrupt)? {
        0 => Err(corrupt(CodecError::Malformed("empty segment".into()))),
        count => {
            seq_at(first_seq, count - 1).ok_or_else(|| past_the_last_seq(run_id, first_seq, count))
        }
    }
}

fn read_failed(e: sled::Error) -> StoreError {
    StoreError::ReadFailed {
        message: e.to_string(),
    }
}

/// Up to `limit` envelopes of `run_id` with `seq > after_seq`, in seq order.
pub(crate) fn list_after(
    db: &sled::Db,
    log: &CommitLog,
    run_id: RunId,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<RuntimeEventEnvelope>, StoreError> {
    let mut out = Vec::new();
    if limit == 0 {
        // An empty page must not pass a removed run off as readable.
        removed_error(db, run_id, after_seq)?;
        return Ok(out);
    }
    // Nothing follows the last seq there is (saturating would serve it as
    // its own successor).
    let Some(wanted) = after_seq.checked_add(1) else {
        return Ok(out);
    };
    // The segment holding `wanted` starts at or before it: the last key at
    // or below `segment_key(run, wanted)`.
    let start = db
        .range(layout::segment_key(run_id, 0)..=layout::segment_key(run_id, wanted))
        .next_back()
        .transpose()
        .map_err(read_failed)?
        .map_or_else(
            || layout::segment_key(run_id, 0).to_vec(),
            |(k, _)| k.to_vec(),
        );
    let mut expected = None;
    for entry in db.range(start..=layout::segment_key(run_id, u64::MAX).to_vec()) {
        let (key, value) = entry.map_err(read_failed)?;
        let Some(first_seq) = layout::segment_first_seq(run_id, &key) else {
            break;
        };
        // Segments must tile the run's seqs with no gap between them; a gap
        // is the first damage, whatever the segment after it holds.
        if let Some(expected) = expected
            && first_seq != expected
        {
            return Err(StoreError::Corrupt {
                run_id,
                seq: expected,
                source: CodecError::Malformed(format!(
                    "segment gap: expected seq {expected}, next segment starts at {first_seq}"
                )),
            });
        }
        let envelopes = decode_checked(run_id, first_seq, &value)?;
        expected = Some(first_seq.saturating_add(envelopes.len() as u64));
        for envelope in envelopes {
            if envelope.seq >= wanted {
                // The first event served must be the one asked for: a
                // missing segment below it is damage, not a shorter log.
                if out.is_empty() && envelope.seq != wanted {
                    return Err(StoreError::missing(run_id, wanted, envelope.seq));
                }
                out.push(envelope);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
    }
    // Then what the commit log holds, which continues the segments.
    for logged in log.run(run_id) {
        if let Some(expected) = expected
            && logged.seq < expected
        {
            continue;
        }
        if let Some(expected) = expected
            && logged.seq != expected
        {
            return Err(StoreError::missing(run_id, expected, logged.seq));
        }
        expected = Some(logged.seq.saturating_add(1));
        if logged.seq < wanted {
            continue;
        }
        if out.is_empty() && logged.seq != wanted {
            return Err(StoreError::missing(run_id, wanted, logged.seq));
        }
        out.push(decode_logged(run_id, logged)?);
        if out.len() == limit {
            return Ok(out);
        }
    }
    if out.is_empty() {
        // Nothing to serve: say so explicitly if that is because retention
        // removed events the caller has not seen, rather than passing it off
        // as a run with no more events. (Only here, so the common read costs
        // no record lookup.)
        removed_error(db, run_id, after_seq)?;
    }
    Ok(out)
}

/// `RunRemoved` if retention removed `run_id` and it had events after
/// `after_seq`.
fn removed_error(db: &sled::Db, run_id: RunId, after_seq: u64) -> Result<(), StoreError> {
    match raw_record(db, run_id)? {
        Some(RunRecord {
            removed_at: Some(removed_at),
            last_seq,
            ..
        }) if after_seq < last_seq => Err(StoreError::RunRemoved { run_id, removed_at }),
        _ => Ok(()),
    }
}

/// Decodes a segment and checks it is what its key says: envelopes of `run_id`
/// with consecutive seqs from `first_seq`.
fn decode_checked(
    run_id: RunId,
    first_seq: u64,
    value: &[u8],
) -> Result<Vec<RuntimeEventEnvelope>, StoreError> {
    let envelopes =
        codec::decode_segment(value).map_err(|(index, source)| StoreError::Corrupt {
            run_id,
            seq: seq_at(first_seq, index).unwrap_or(u64::MAX),
            source,
        })?;
    for (index, envelope) in envelopes.iter().enumerate() {
        let Some(seq) = seq_at(first_seq, index) else {
            return Err(past_the_last_seq(run_id, first_seq, envelopes.len()));
        };
        if envelope.seq != seq || envelope.run_id != run_id {
            return Err(StoreError::Corrupt {
                run_id,
                seq,
                source: CodecError::Malformed(format!(
                    "segment holds run {} seq {} where run {run_id} seq {seq} belongs",
                    envelope.run_id, envelope.seq
                )),
            });
        }
    }
    Ok(envelopes)
}

/// Decodes an envelope the commit log holds and checks it is the one its
/// place says.
fn decode_logged(run_id: RunId, logged: &Logged) -> Result<RuntimeEventEnvelope, StoreError> {
    let corrupt = |source| StoreError::Corrupt {
        run_id,
        seq: logged.seq,
        source,
    };
    let envelope = codec::decode_envelope(&logged.bytes).map_err(corrupt)?;
    if envelope.seq != logged.seq || envelope.run_id != run_id {
        return Err(corrupt(CodecError::Malformed(format!(
            "the commit log holds run {} seq {} where run {run_id} seq {} belongs",
            envelope.run_id, envelope.seq, logged.seq
        ))));
    }
    Ok(envelope)
}

/// The seq of the envelope at `index` of a segment that starts at
/// `first_seq`; `None` past `u64::MAX`, where only a damaged key puts one.
fn seq_at(first_seq: u64, index: usize) -> Option<u64> {
    first_seq.checked_add(u64::try_from(index).ok()?)
}

/// A segment whose key puts its envelopes past `u64::MAX`: no run gets
/// there, so its key is damaged.
fn past_the_last_seq(run_id: RunId, first_seq: u64, count: usize) -> StoreError {
    StoreError::Corrupt {
        run_id,
        seq: first_seq,
        source: CodecError::Malformed(format!(
            "a segment of {count} envelopes keyed at seq {first_seq} runs past the last seq \
             there is ({})",
            u64::MAX
        )),
    }
}

/// Up to `limit` runs after `after` (from the first, for `None`), in run id
/// order, with what the store knows of each.
pub(crate) fn runs_after(
    db: &sled::Db,
    log: &CommitLog,
    after: Option<RunId>,
    limit: usize,
) -> Result<Vec<RunInfo>, StoreError> {
    let start = match after {
        // Strictly after: the key followed by a zero byte sorts right after it.
        Some(run) => {
            let mut key = layout::run_key(run).to_vec();
            key.push(0);
            key
        }
        None => layout::run_key(RunId::from_uuid(Uuid::nil())).to_vec(),
    };
    let mut out = Vec::new();
    for entry in db.range(start..layout::RUN_KEYS_END.to_vec()) {
        if out.len() == limit {
            break;
        }
        let (key, _) = entry.map_err(read_failed)?;
        let Some(run_id) = layout::run_key_run(&key) else {
            return Err(StoreError::ReadFailed {
                message: format!("malformed run key of {} bytes", key.len()),
            });
        };
        if let Some(info) = run_info(db, log, run_id)? {
            out.push(info);
        }
    }
    Ok(out)
}

/// Reads every segment of `run_id`, decoding every envelope, and checks
/// that they tile seqs 1..=last with no gap and agree with the run record.
pub(crate) fn verify_run(
    db: &sled::Db,
    log: &CommitLog,
    run_id: RunId,
) -> Result<RunCheck, StoreError> {
    let info = run_info(db, log, run_id)?;
    let mut check = RunCheck {
        run_id,
        events: 0,
        segments: 0,
        bytes: 0,
        removed_at: info.as_ref().and_then(|info| info.removed_at),
    };
    let mut expected = 1u64;
    for entry in db.range(layout::segment_key(run_id, 0)..=layout::segment_key(run_id, u64::MAX)) {
        let (key, value) = entry.map_err(read_failed)?;
        let Some(first_seq) = layout::segment_first_seq(run_id, &key) else {
            break;
        };
        if first_seq != expected {
            return Err(StoreError::Corrupt {
                run_id,
                seq: expected,
                source: CodecError::Malformed(format!(
                    "seq {expected} is missing; the next segment starts at seq {first_seq}"
                )),
            });
        }
        let envelopes = decode_checked(run_id, first_seq, &value)?;
        expected = first_seq.saturating_add(envelopes.len() as u64);
        check.events = check.events.saturating_add(envelopes.len() as u64);
        check.segments += 1;
        check.bytes = check.bytes.saturating_add(value.len() as u64);
    }
    for logged in log.run(run_id) {
        if logged.seq < expected {
            // Compacted meanwhile: the segments above hold it.
            continue;
        }
        if logged.seq != expected {
            return Err(StoreError::missing(run_id, expected, logged.seq));
        }
        decode_logged(run_id, logged)?;
        expected = logged.seq.saturating_add(1);
        check.events = check.events.saturating_add(1);
        check.bytes = check.bytes.saturating_add(logged.bytes.len() as u64);
    }
    if check.removed_at.is_some() {
        // Removal deletes a run's segments and writes its tombstone in one
        // batch: a tombstone with segments left means that batch was torn.
        if check.segments > 0 {
            return Err(StoreError::Corrupt {
                run_id,
                seq: 1,
                source: CodecError::Malformed(format!(
                    "the run was removed by retention but {} of its segments remain",
                    check.segments
                )),
            });
        }
        return Ok(check);
    }
    let last_seq = info.map_or(0, |info| info.last_seq);
    if check.events != last_seq {
        return Err(StoreError::Corrupt {
            run_id,
            seq: check.events.saturating_add(1),
            source: CodecError::Malformed(format!(
                "the run's segments hold {} events, its record says {last_seq}",
                check.events
            )),
        });
    }
    Ok(check)
}

/// What the store knows of a run, or `None` if it has never seen it.
pub(crate) fn run_info(
    db: &sled::Db,
    log: &CommitLog,
    run_id: RunId,
) -> Result<Option<RunInfo>, StoreError> {
    Ok(load_record(db, log, run_id)?.map(|record| RunInfo {
        run_id,
        last_seq: record.last_seq,
        session_id: record.session_id,
        provider: record.provider,
        started_at: record.started_at,
        ended_at: record.ended_at,
        removed_at: record.removed_at,
    }))
}

/// The runs of a session, in the order they started.
pub(crate) fn session_runs(db: &sled::Db, session: Uuid) -> Result<Vec<RunId>, StoreError> {
    indexed_runs(db, layout::session_prefix(session)).collect()
}

/// The runs of a session index (`s`, or `x` for the removed ones) under
/// `prefix`, in key order.
fn indexed_runs(
    db: &sled::Db,
    prefix: impl AsRef<[u8]>,
) -> impl Iterator<Item = Result<RunId, StoreError>> {
    db.scan_prefix(prefix).map(|entry| {
        let (key, _) = entry.map_err(read_failed)?;
        layout::session_key_run(&key).ok_or_else(|| StoreError::ReadFailed {
            message: format!("malformed session index key of {} bytes", key.len()),
        })
    })
}

/// Every run of a session, with what a subscriber needs to know of each,
/// in one read: the runs in its index in start order, then those retention
/// removed. Costs a record read per run of the session, nothing more.
pub(crate) fn session_state(
    db: &sled::Db,
    log: &CommitLog,
    session: Uuid,
) -> Result<Vec<SessionRun>, StoreError> {
    indexed_runs(db, layout::session_prefix(session))
        .chain(indexed_runs(db, layout::removed_session_prefix(session)))
        .map(|run_id| {
            let run_id = run_id?;
            // An index entry is written with the run's first segment, so a
            // run with no record yet has nothing to read.
            Ok(match load_record(db, log, run_id)? {
                Some(record) => SessionRun {
                    run_id,
                    last_seq: record.last_seq,
                    ended: record.ended_at.is_some(),
                    removed_at: record.removed_at,
                },
                None => SessionRun {
                    run_id,
                    last_seq: 0,
                    ended: false,
                    removed_at: None,
                },
            })
        })
        .collect()
}

/// What one removal step did.
#[derive(Debug, Default)]
pub(crate) struct RemovalStep {
    /// The runs it removed, oldest end first.
    pub(crate) removed: Vec<RunId>,
    /// Whether runs that ended before the cutoff remain for another step.
    pub(crate) more: bool,
}

/// Most keys one removal step deletes; a run with more segments than this
/// goes alone in its step.
const REMOVAL_KEYS_PER_STEP: usize = 64 * 1024;

/// A run one removal step found to remove: its ended-index entry, and (if
/// its record is intact and not yet removed) the run with its segment keys.
struct Doomed {
    index_key: sled::IVec,
    run: Option<(RunId, Vec<sled::IVec>)>,
}

/// Removes up to `max_runs` runs that ended before `cutoff`, oldest first
/// (fewer if their segments exceed [`REMOVAL_KEYS_PER_STEP`] keys): deletes
/// their segments and their ended-index entry, moves their session index
/// entry to the session's removed runs (`x`), and leaves their record as a tombstone marked `removed_at = now`, all in
/// one batch, flushed before it returns (a run reported removed stays
/// removed after a crash).
///
/// What to delete is read before the commit gate is taken: an ended run
/// takes no appends, so only another removal can change it meanwhile, which
/// the step checks for under the gate. The gate is held exclusively only to
/// apply and flush the batch.
pub(crate) fn remove_ended_before(
    db: &sled::Db,
    gate: &RwLock<RunCache>,
    cutoff: chrono::DateTime<Utc>,
    max_runs: usize,
    limits: SegmentLimits,
) -> Result<RemovalStep, StoreError> {
    // An ended run's last envelopes may still be in the commit log;
    // removal deletes segments, so they must be segments first. The
    // compactor is held to the end of the step, so that no background
    // compaction writes a segment the step has not listed.
    let compactor = read_gate(gate).log.compactor();
    let _writing = compactor.lock().unwrap_or_else(|p| p.into_inner());
    compact_all(
        db,
        &mut gate.write().unwrap_or_else(|p| p.into_inner()),
        limits,
    )?;
    let mut doomed: Vec<Doomed> = Vec::new();
    let mut keys = 0usize;
    let mut more = false;
    let range = layout::ENDED_KEYS_START.to_vec()..layout::ended_keys_before(cutoff).to_vec();
    for entry in db.range(range) {
        if doomed.len() >= max_runs.max(1) || keys >= REMOVAL_KEYS_PER_STEP {
            more = true;
            break;
        }
        let (index_key, _) = entry.map_err(read_failed)?;
        keys += 1;
        let run = match layout::ended_key_run(&index_key) {
            Some(run_id) => doomed_run(db, run_id)?,
            None => None,
        };
        if let Some((_, segments)) = &run {
            keys += segments.len() + 2;
        }
        doomed.push(Doomed { index_key, run });
    }
    if doomed.is_empty() {
        return Ok(RemovalStep::default());
    }

    let mut exclusive = gate
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = Utc::now();
    let mut batch = sled::Batch::default();
    let mut removed: Vec<(RunId, RunRecord)> = Vec::new();
    for Doomed { index_key, run } in doomed {
        if let Some((run_id, _)) = &run
            && exclusive.log.last_seq(*run_id).is_some()
        {
            // It ended after the compaction above: its last events are in
            // the commit log, not in the segments read. The next step
            // (which compacts first) takes it.
            more = true;
            continue;
        }
        batch.remove(index_key);
        let Some((run_id, segments)) = run else {
            continue;
        };
        // Read again under the gate: another removal may have taken it.
        let Some(mut record) = raw_record(db, run_id)? else {
            continue;
        };
        if record.removed_at.is_some() {
            continue;
        }
        for key in segments {
            batch.remove(key);
        }
        if let Some(session) = record.session_id {
            batch.remove(layout::session_key(session, record.ordinal, run_id).as_slice());
            batch.insert(
                layout::removed_session_key(session, record.ordinal, run_id).as_slice(),
                vec![FORMAT_VERSION],
            );
        }
        record.removed_at = Some(now);
        let value = codec::encode_value(&record).map_err(|e| StoreError::WriteFailed {
            message: format!("tombstone of run {run_id}: {e}"),
        })?;
        batch.insert(&layout::run_key(run_id), value);
        removed.push((run_id, record));
    }
    db.apply_batch(batch).map_err(|e| StoreError::WriteFailed {
        message: e.to_string(),
    })?;
    flush(db)?;
    let cache: &mut RunCache = &mut exclusive;
    let removed = removed
        .into_iter()
        .map(|(run_id, record)| {
            cache.put(run_id, record);
            run_id
        })
        .collect();
    Ok(RemovalStep { removed, more })
}

/// The segment keys of `run_id` if it is an ended run not yet removed;
/// `None` if there is nothing to remove. A record that cannot be decoded is
/// logged and skipped (its index entry goes; `verify` reports the damage),
/// so that one damaged run does not stop retention for every run after it.
fn doomed_run(
    db: &sled::Db,
    run_id: RunId,
) -> Result<Option<(RunId, Vec<sled::IVec>)>, StoreError> {
    let record = match raw_record(db, run_id) {
        Ok(Some(record)) => record,
        Ok(None) => return Ok(None),
        Err(error @ StoreError::CorruptRunRecord { .. }) => {
            tracing::warn!(%run_id, %error, "retention skips a run whose record is damaged");
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    if record.removed_at.is_some() || record.ended_at.is_none() {
        return Ok(None);
    }
    let segments = db
        .range(layout::segment_key(run_id, 0)..=layout::segment_key(run_id, u64::MAX))
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_failed)?;
    Ok(Some((run_id, segments)))
}

/// The run's record as stored (its `last_seq` as of its last write).
fn raw_record(db: &sled::Db, run_id: RunId) -> Result<Option<RunRecord>, StoreError> {
    let Some(bytes) = db.get(layout::run_key(run_id)).map_err(read_failed)? else {
        return Ok(None);
    };
    codec::decode_value(&bytes)
        .map(Some)
        .map_err(|source| StoreError::CorruptRunRecord { run_id, source })
}

/// Gives every ended run of a store made before the ended index existed its
/// index entry, once.
fn ensure_ended_index(db: &sled::Db) -> Result<(), StoreError> {
    if db
        .get(layout::META_ENDED_INDEX)
        .map_err(read_failed)?
        .is_some()
    {
        return Ok(());
    }
    // In chunks, so that a large store is not indexed in one batch; the
    // entries are idempotent and the marker goes last, so an open that dies
    // halfway is simply redone.
    let apply = |batch: sled::Batch| {
        db.apply_batch(batch).map_err(|e| StoreError::WriteFailed {
            message: e.to_string(),
        })
    };
    let mut batch = sled::Batch::default();
    let mut in_batch = 0usize;
    let start = layout::run_key(RunId::from_uuid(Uuid::nil())).to_vec();
    for entry in db.range(start..layout::RUN_KEYS_END.to_vec()) {
        if in_batch == 4096 {
            apply(std::mem::take(&mut batch))?;
            in_batch = 0;
        }
        let (key, value) = entry.map_err(read_failed)?;
        let Some(run_id) = layout::run_key_run(&key) else {
            continue;
        };
        // A record that cannot be read is left to `verify` to report; the
        // run is then simply never removed.
        let Ok(record) = codec::decode_value::<RunRecord>(&value) else {
            continue;
        };
        if let (Some(ended_at), None) = (record.ended_at, record.removed_at) {
            batch.insert(
                layout::ended_key(ended_at, run_id).as_slice(),
                vec![FORMAT_VERSION],
            );
            in_batch += 1;
        }
    }
    apply(batch)?;
    db.insert(layout::META_ENDED_INDEX, vec![FORMAT_VERSION])
        .map_err(|e| StoreError::WriteFailed {
            message: e.to_string(),
        })?;
    Ok(())
}

/// Writes the store's metadata, flushed.
fn write_meta(db: &sled::Db, meta: &StoreMeta, path: &Path) -> Result<(), OpenError> {
    let bytes = codec::encode_value(meta).map_err(|e| OpenError::NotAStore {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    db.insert(layout::META_STORE, bytes)
        .and_then(|_| db.flush())
        .map_err(|e| open_error(path, e))?;
    Ok(())
}

/// The next run ordinal, as stored (for a restarted store actor).
pub(crate) fn read_ordinal(db: &sled::Db) -> Result<u64, StoreError> {
    match db.get(layout::META_ORDINAL).map_err(read_failed)? {
        Some(bytes) => codec::decode_value(&bytes).map_err(|e| StoreError::ReadFailed {
            message: format!("run ordinal: {e}"),
        }),
        None => Ok(1),
    }
}

/// Flushes and drops the database (sled's drop blocks, so this runs on the
/// blocking pool, never on an async worker).
pub(crate) async fn release(
    db: sled::Db,
    gate: std::sync::Arc<RwLock<RunCache>>,
    limits: SegmentLimits,
) -> Result<(), StoreError> {
    tokio::task::spawn_blocking(move || {
        // A store closed cleanly keeps no commit records: an open after it
        // has nothing to compact.
        let compacted = compact_now(&db, &gate, limits);
        if let Err(error) = &compacted {
            tracing::warn!(%error, "could not compact at close; the next open will");
        }
        let result = flush(&db);
        drop(db);
        result
    })
    .await
    .unwrap_or_else(|e| {
        Err(StoreError::FlushFailed {
            message: e.to_string(),
        })
    })
}

/// How long `close` waits for sled to let go of the directory's lock.
const UNLOCK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until the lock sled holds on `dir` is free. Dropping the last
/// handle is not enough: sled's background threads hold the lock until
/// they notice and exit, so a store reopened at once (or a CLI run on the
/// directory) could otherwise find it `Locked`.
pub(crate) async fn wait_unlocked(dir: std::path::PathBuf) {
    let waited = tokio::task::spawn_blocking(move || {
        use fs2::FileExt;
        let deadline = std::time::Instant::now() + UNLOCK_DEADLINE;
        let lock_file = dir.join("db");
        loop {
            let Ok(file) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&lock_file)
            else {
                return true;
            };
            if file.try_lock_exclusive().is_ok() {
                let _ = FileExt::unlock(&file);
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    })
    .await;
    if !matches!(waited, Ok(true)) {
        tracing::warn!(
            ?UNLOCK_DEADLINE,
            "sled still held the store's lock after close"
        );
    }
}

/// Flushes whatever sled still buffers.
pub(crate) fn flush(db: &sled::Db) -> Result<(), StoreError> {
    db.flush().map(|_| ()).map_err(|e| StoreError::FlushFailed {
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(bytes: usize) -> Logged {
        Logged {
            seq: 1,
            bytes: vec![0; bytes],
        }
    }

    #[test]
    fn segments_respect_both_limits() {
        let items: Vec<_> = (0..10).map(|_| item(10)).collect();
        let limits = SegmentLimits {
            max_events: 4,
            max_bytes: 1000,
        };
        let sizes: Vec<_> = segments(&items, limits, |l| l.bytes.len())
            .iter()
            .map(|s| s.len())
            .collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        let limits = SegmentLimits {
            max_events: 100,
            max_bytes: 25,
        };
        let sizes: Vec<_> = segments(&items, limits, |l| l.bytes.len())
            .iter()
            .map(|s| s.len())
            .collect();
        assert_eq!(sizes, vec![2, 2, 2, 2, 2]);
        // An item larger than the byte limit still gets a segment of its own.
        let big = vec![item(100), item(100)];
        assert_eq!(segments(&big, limits, |l| l.bytes.len()).len(), 2);
    }
}
