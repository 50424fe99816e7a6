//! Durable Streams on the hub: each stream is a run of the hub, its appends
//! are `Custom` events of that run, and a catalog run records which streams
//! exist. The run's room orders the appends, the store writes them through
//! (group commit), and the hub fans them out; this module adds what the
//! protocol asks on top: paths, configuration, producers, closing, forks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use behest_stream::{
    AgentEvent, Cursor, CustomEvent, EventHub, HubError, ProviderId, Resume, RunCancelled,
    RunCompleted, RunId, RunInfo, RunStarted, RuntimeEventEnvelope, RuntimeRoom,
};
use chrono::Utc;
use futures_util::StreamExt;
use serde_json::Value;
use uuid::Uuid;

use crate::catalog::{self, Catalog, Entry, ForkPoint, Lookup, Record, StreamConfig};
use crate::message::{self, Append, Stamp};
use crate::problem::Problem;
use crate::writers::{Verdict, Writers};

/// Most envelopes read per store request; reads start with fewer and grow
/// while envelopes are small, so that a page of large ones stays small.
const PAGE: usize = 512;

/// Envelopes of a read's first store request.
const FIRST_PAGE: usize = 8;

/// Envelopes per store request while a stream's writer state is read.
const LOAD_PAGE: usize = 32;

/// Distinct producers one stream keeps state for.
pub(crate) const MAX_PRODUCERS: usize = 4096;

/// The provider named in the `RunStarted` of stream runs.
const PROVIDER: &str = crate::STREAMS_PROVIDER;

/// What a stream holds, which decides how its messages are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Bytes, concatenated.
    Bytes,
    /// JSON messages, returned as one array.
    Json,
}

/// A part of a stream's history: one run, from `base`, up to `limit`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    run: RunId,
    /// Position of the run's seq 1.
    base: u64,
    /// Last position of this run the stream includes (a fork point).
    limit: Option<u64>,
}

impl Segment {
    fn position(&self, seq: u64) -> u64 {
        self.base + seq - 1
    }
}

/// What a read needs of a stream: its segments, oldest first, and how its
/// messages are framed.
#[derive(Debug, Clone)]
pub(crate) struct View {
    pub(crate) content_type: String,
    pub(crate) framing: Framing,
    /// A run read as its envelopes, not a stream of appends.
    envelopes: bool,
    segments: Vec<Segment>,
    pub(crate) config: Option<StreamConfig>,
}

impl View {
    fn own(&self) -> Segment {
        *self.segments.last().expect("a view has its own segment")
    }

    /// The run whose events are this stream's own.
    pub(crate) fn run(&self) -> RunId {
        self.own().run
    }
}

/// What a read returned.
#[derive(Debug, Default)]
pub(crate) struct Chunk {
    pub(crate) bytes: Vec<u8>,
    pub(crate) json: Vec<Value>,
    /// Position after the last event read.
    pub(crate) next: u64,
    /// The read reached the stream's tail.
    pub(crate) up_to_date: bool,
    /// The read reached the tail of a closed stream.
    pub(crate) closed: bool,
    /// The own run's last seq when the read looked.
    pub(crate) tail_seq: u64,
    /// The run ended (closed, or a deleted stream's run cancelled).
    pub(crate) ended: bool,
}

impl Chunk {
    /// Whether the read returned any message.
    pub(crate) fn has_data(&self) -> bool {
        !self.bytes.is_empty() || !self.json.is_empty()
    }
}

/// A `PUT`.
#[derive(Debug, Clone)]
pub(crate) struct CreateRequest {
    pub(crate) config: StreamConfig,
    /// `Content-Type` was sent (a fork inherits its source's otherwise).
    pub(crate) explicit_type: bool,
    pub(crate) body: bytes::Bytes,
    pub(crate) close: bool,
    pub(crate) fork: Option<ForkRequest>,
}

/// `Stream-Forked-From` and its companions.
#[derive(Debug, Clone)]
pub(crate) struct ForkRequest {
    pub(crate) from: String,
    pub(crate) at: Option<u64>,
    pub(crate) sub_offset: Option<u64>,
}

/// What a `PUT` did.
#[derive(Debug)]
pub(crate) struct Created {
    pub(crate) status: StatusCode,
    pub(crate) content_type: String,
    pub(crate) next: u64,
    pub(crate) closed: bool,
}

/// A `POST`.
#[derive(Debug, Clone)]
pub(crate) struct AppendRequest {
    pub(crate) content_type: Option<String>,
    pub(crate) body: bytes::Bytes,
    pub(crate) close: bool,
    pub(crate) stamp: Option<Stamp>,
    pub(crate) stream_seq: Option<String>,
}

/// What a `POST` did.
#[derive(Debug)]
pub(crate) struct Appended {
    /// 200 for a producer's new data, 204 otherwise.
    pub(crate) status: StatusCode,
    pub(crate) next: u64,
    pub(crate) closed: bool,
    /// `(epoch, highest seq)` to echo to a producer.
    pub(crate) producer: Option<(u64, u64)>,
}

/// A stream's writer state once read from its run, and its run's last seq.
#[derive(Debug, Default)]
struct Loaded {
    writers: Writers,
    last_seq: u64,
}

type WriterSlot = Arc<tokio::sync::Mutex<Option<Loaded>>>;

/// The streams of one server.
pub(crate) struct Streams {
    hub: EventHub,
    catalog_run: RunId,
    catalog: RwLock<Catalog>,
    /// Serializes changes of the catalog: each is stored, then applied.
    changes: tokio::sync::Mutex<()>,
    writers: Mutex<HashMap<RunId, WriterSlot>>,
    /// Stream runs `repair_once` has seen.
    checked: Mutex<std::collections::HashSet<RunId>>,
    /// Largest body of one append.
    pub(crate) max_append_bytes: usize,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("catalog_run", &self.catalog_run)
            .finish_non_exhaustive()
    }
}

impl Streams {
    /// Opens the streams of `hub`: reads the catalog run `catalog_run`,
    /// starting it if it is new.
    pub(crate) async fn open(hub: EventHub, catalog_run: RunId) -> Result<Self, HubError> {
        let mut catalog = Catalog::default();
        let last = replay_whole(&hub, catalog_run, PAGE, |envelope| {
            if let AgentEvent::Custom(custom) = &envelope.event
                && custom.kind == catalog::KIND
                && let Ok(record) = serde_json::from_value::<Record>(custom.payload.clone())
            {
                catalog.apply(&record);
            }
        })
        .await?;
        if last == 0 {
            hub.publish(started(catalog_run)).await?;
        }
        // An append body is base64 and JSON once stored: about 3/4 of an
        // event's bytes are left for it.
        let max_append_bytes = hub.store().max_event_bytes().saturating_sub(4096) / 4 * 3;
        Ok(Self {
            hub,
            catalog_run,
            catalog: RwLock::new(catalog),
            changes: tokio::sync::Mutex::new(()),
            writers: Mutex::new(HashMap::new()),
            checked: Mutex::new(std::collections::HashSet::new()),
            max_append_bytes,
        })
    }

    /// The hub the streams live on.
    pub(crate) fn hub(&self) -> &EventHub {
        &self.hub
    }

    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn catalog_mut(&self) -> std::sync::RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `record` in the catalog run, then applies it. The caller
    /// holds `changes`.
    async fn change(&self, record: Record) -> Result<(), Problem> {
        let payload = serde_json::to_value(&record)
            .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        self.hub
            .publish(custom(self.catalog_run, catalog::KIND, payload))
            .await?;
        let removed = self.catalog_mut().apply(&record);
        for run in &removed {
            self.writers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(run);
            self.checked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(run);
            self.end_run(*run).await;
        }
        Ok(())
    }

    /// The live stream at `path`: 404 when there is none (or it expired),
    /// 410 when it was deleted while forks still read it.
    ///
    /// With `touch` (every read and write but `HEAD`), a sliding TTL starts
    /// again under the same lock that checked it, so that `sweep` cannot
    /// delete the stream while the request is at work.
    async fn live(&self, path: &str, touch: bool) -> Result<Entry, Problem> {
        let entry = {
            let mut catalog = self.catalog_mut();
            let entry = match catalog.lookup(path) {
                Lookup::Missing => return Err(Problem::not_found()),
                Lookup::Deleted => return Err(Problem::gone()),
                Lookup::Live => catalog.get(path).cloned().ok_or_else(Problem::not_found)?,
            };
            if entry.is_expired(Instant::now(), Utc::now()) {
                // `sweep` deletes it; until then it is as good as gone.
                return Err(Problem::not_found());
            }
            if touch {
                catalog.touch(path);
            }
            entry
        };
        self.repair_once(entry.run).await?;
        Ok(entry)
    }

    /// The first time this process meets a stream run: a close whose
    /// terminal event a crash kept from the store is finished, so that
    /// readers see the stream closed as its writers do.
    async fn repair_once(&self, run: RunId) -> Result<(), Problem> {
        if self
            .checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&run)
        {
            return Ok(());
        }
        let (last, ended) = self.run_tail(run).await?;
        if !ended && last > 1 {
            let tail = self.hub.replay(run, last - 1, 1).await?;
            if tail
                .first()
                .and_then(decode_append)
                .is_some_and(|a| a.close)
            {
                self.hub.publish(completed(run)).await?;
            }
        }
        self.checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(run);
        Ok(())
    }

    /// Ends a stream run that is gone, so that retention may remove it.
    async fn end_run(&self, run: RunId) {
        let cancelled = AgentEvent::RunCancelled(RunCancelled {
            run_id: run,
            timestamp: Utc::now(),
        });
        // Already ended (closed) is fine: the run is ended either way.
        let _ = self.hub.publish(cancelled).await;
    }

    /// A read view of the stream at `path`, or of the run `runs/{id}`.
    /// `touch`: see [`Streams::live`].
    pub(crate) async fn view(&self, path: &str, touch: bool) -> Result<View, Problem> {
        if let Some(run) = run_view_id(path)? {
            return self.run_view(run).await;
        }
        let entry = self.live(path, touch).await?;
        let catalog = self.catalog();
        let mut segments = Vec::new();
        let mut limit = None;
        let mut current = Some(&entry);
        while let Some(e) = current {
            let base = e.fork.map_or(0, |f| f.at);
            segments.push(Segment {
                run: e.run,
                base,
                limit,
            });
            // An ancestor is read up to the nearest fork point below it.
            limit = e.fork.map(|f| f.at.min(limit.unwrap_or(u64::MAX)));
            current = e.fork.and_then(|f| catalog.by_run(f.parent));
        }
        segments.reverse();
        Ok(View {
            content_type: entry.config.content_type.clone(),
            framing: if entry.config.is_json() {
                Framing::Json
            } else {
                Framing::Bytes
            },
            envelopes: false,
            segments,
            config: Some(entry.config),
        })
    }

    /// 404 unless `run` is an agent run of the hub (not the catalog, not a
    /// stream's run), 410 when retention removed it.
    pub(crate) async fn agent_run(&self, run: RunId) -> Result<RunInfo, Problem> {
        let info = self
            .hub
            .store()
            .run_info(run)
            .await
            .map_err(HubError::from)?
            .ok_or_else(Problem::not_found)?;
        if info.is_removed() {
            return Err(Problem::gone());
        }
        // Agent runs only: the catalog and the streams' own runs are read
        // through their paths, where their grants apply.
        let stream_run = run == self.catalog_run
            || self.catalog().by_run(run).is_some()
            || self.hub.replay(run, 0, 1).await?.first().is_some_and(|e| {
                matches!(&e.event, AgentEvent::RunStarted(s) if s.provider.as_str() == PROVIDER)
            });
        if stream_run {
            return Err(Problem::not_found());
        }
        Ok(info)
    }

    async fn run_view(&self, run: RunId) -> Result<View, Problem> {
        self.agent_run(run).await?;
        Ok(View {
            content_type: "application/json".into(),
            framing: Framing::Json,
            envelopes: true,
            segments: vec![Segment {
                run,
                base: 1,
                limit: None,
            }],
            config: None,
        })
    }

    /// The own run's last seq, and whether it ended.
    async fn run_tail(&self, run: RunId) -> Result<(u64, bool), Problem> {
        let info = self
            .hub
            .store()
            .run_info(run)
            .await
            .map_err(HubError::from)?;
        Ok(info.map_or((0, false), |i| (i.last_seq, i.is_ended())))
    }

    /// The stream's tail position and whether it is closed.
    pub(crate) async fn tail(&self, view: &View) -> Result<(u64, bool), Problem> {
        let own = view.own();
        let (last, ended) = self.run_tail(own.run).await?;
        Ok((own.position(last.max(1)), ended))
    }

    /// Reads from position `from`, up to about `budget` bytes of messages.
    pub(crate) async fn read(
        &self,
        view: &View,
        from: u64,
        budget: usize,
    ) -> Result<Chunk, Problem> {
        let own = view.own();
        let (tail_seq, ended) = self.run_tail(own.run).await?;
        let tail = own.position(tail_seq.max(1));
        let mut chunk = Chunk {
            next: from,
            tail_seq,
            ..Chunk::default()
        };
        let mut size = 0;
        'segments: for segment in &view.segments {
            let end = match segment.limit {
                Some(limit) => limit,
                None => tail,
            };
            if chunk.next >= end {
                continue;
            }
            let mut after_seq = (chunk.next + 1).saturating_sub(segment.base);
            let mut page_len = FIRST_PAGE;
            loop {
                let page = self.hub.replay(segment.run, after_seq, page_len).await?;
                let mut reached_end = page.len() < page_len;
                let before = size;
                for envelope in &page {
                    let position = segment.position(envelope.seq);
                    if position > end {
                        reached_end = true;
                        break;
                    }
                    if size >= budget && (chunk.has_data()) {
                        break 'segments;
                    }
                    size += take(view, envelope, &mut chunk);
                    chunk.next = position;
                    after_seq = envelope.seq;
                }
                if reached_end || chunk.next >= end {
                    break;
                }
                if (size - before) * 4 < budget {
                    page_len = (page_len * 2).min(PAGE);
                }
            }
            if segment.limit.is_some() {
                // The rest of the parent up to the fork point held no event
                // of ours: go on in the next segment.
                chunk.next = chunk.next.max(end);
            }
        }
        chunk.up_to_date = chunk.next >= tail;
        chunk.closed = chunk.up_to_date && ended;
        Ok(chunk)
    }

    /// The own run's events after `tail_seq`, live: what an SSE response
    /// sends once it has caught up, without reading the store again.
    pub(crate) async fn follow(
        &self,
        view: &View,
        tail_seq: u64,
    ) -> Result<behest_stream::BoxRuntimeEventStream, Problem> {
        let run = view.run();
        let resume = Resume::After(Cursor::at(self.hub.epoch(), run, tail_seq));
        Ok(self.hub.subscribe(RuntimeRoom::Run(run), resume).await?)
    }

    /// Waits until the own run grows past `tail_seq` (true) or `timeout`
    /// passes (false).
    pub(crate) async fn wait(
        &self,
        view: &View,
        tail_seq: u64,
        timeout: Duration,
    ) -> Result<bool, Problem> {
        let run = view.run();
        let resume = Resume::After(Cursor::at(self.hub.epoch(), run, tail_seq));
        let mut events = match self.hub.subscribe(RuntimeRoom::Run(run), resume).await {
            Ok(events) => events,
            // It grew (or ended) between the read and the subscription.
            Err(HubError::CursorAhead { .. }) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        match tokio::time::timeout(timeout, events.next()).await {
            Ok(Some(_)) => Ok(true),
            Ok(None) => Ok(true),
            Err(_) => Ok(false),
        }
    }

    /// `PUT`.
    pub(crate) async fn create(
        &self,
        path: &str,
        request: CreateRequest,
    ) -> Result<Created, Problem> {
        writable(path)?;
        let _changing = self.changes.lock().await;
        let existing = self.catalog().get(path).cloned();
        if let Some(entry) = existing {
            if entry.deleted {
                return Err(Problem::conflict(
                    "a stream deleted while forks read it cannot be created again yet",
                ));
            }
            if !entry.is_expired(Instant::now(), Utc::now()) {
                return self.confirm(&entry, &request).await;
            }
            self.change(Record::Delete { run: entry.run }).await?;
            if self.catalog().lookup(path) == Lookup::Deleted {
                return Err(Problem::conflict(
                    "a stream deleted while forks read it cannot be created again yet",
                ));
            }
        }
        let mut config = request.config.clone();
        let mut fork = None;
        let mut prefix = None;
        if let Some(fork_request) = &request.fork {
            let (point, source, sub) = self.fork_point(fork_request).await?;
            if !request.explicit_type {
                config.content_type = source.config.content_type.clone();
            } else if catalog::essence(&config.content_type) != source.config.essence() {
                return Err(Problem::conflict(
                    "a fork's content type must be its source's",
                ));
            }
            if config.ttl_secs.is_none() && config.expires_at.is_none() {
                config.ttl_secs = source.config.ttl_secs;
                config.expires_at = source.config.expires_at;
            }
            fork = Some(point);
            prefix = sub;
        }
        let is_json = config.is_json();
        let initial = if request.body.is_empty() {
            None
        } else {
            Some(framed(is_json, &request.body, true)?).filter(Append::has_data)
        };
        let run = RunId::new();
        self.hub.publish(started(run)).await?;
        let mut last_seq = 1;
        if let Some(prefix) = prefix {
            last_seq = self.hub.publish(append_event(run, &prefix)?).await?.seq;
        }
        let mut writers = Writers::default();
        match initial {
            Some(mut append) => {
                append.close = request.close;
                last_seq = self.publish_append(run, &append).await?;
                writers.record(&append);
            }
            None if request.close => {
                let append = Append {
                    close: true,
                    ..Append::default()
                };
                last_seq = self.publish_append(run, &append).await?;
                writers.record(&append);
            }
            None => {}
        }
        self.change(Record::Create {
            path: path.to_owned(),
            run,
            config: config.clone(),
            fork,
        })
        .await?;
        self.slot(run)
            .lock()
            .await
            .replace(Loaded { writers, last_seq });
        let base = fork.map_or(0, |f| f.at);
        Ok(Created {
            status: StatusCode::CREATED,
            content_type: config.content_type,
            next: base + last_seq - 1,
            closed: request.close,
        })
    }

    /// A `PUT` of a stream that exists: 200 when it asks for what is there.
    async fn confirm(&self, entry: &Entry, request: &CreateRequest) -> Result<Created, Problem> {
        let mut same = entry.config.ttl_secs == request.config.ttl_secs
            && entry.config.expires_at == request.config.expires_at;
        let inherits_type = request.fork.is_some() && !request.explicit_type;
        if !inherits_type {
            same &= catalog::essence(&entry.config.content_type)
                .eq_ignore_ascii_case(catalog::essence(&request.config.content_type));
        }
        if let Some(fork) = &request.fork {
            let source = self.catalog().get(strip_mount(&fork.from)).map(|e| e.run);
            same &= entry.fork.map(|f| f.parent) == source;
            if let (Some(at), Some(point)) = (fork.at, entry.fork) {
                same &= point.at == at;
            }
            let sub = fork.sub_offset.unwrap_or(0);
            same &= sub == entry.fork.map_or(0, |f| f.sub_offset);
        } else {
            same &= entry.fork.is_none();
        }
        if !same {
            return Err(Problem::conflict(
                "a stream exists at this path with another configuration",
            ));
        }
        let view = self.view(&entry.path, false).await?;
        let (next, closed) = self.tail(&view).await?;
        Ok(Created {
            status: StatusCode::OK,
            content_type: entry.config.content_type.clone(),
            next,
            closed,
        })
    }

    /// Where a fork starts, its source, and the materialized prefix of the
    /// append a sub-offset cuts into.
    async fn fork_point(
        &self,
        request: &ForkRequest,
    ) -> Result<(ForkPoint, Entry, Option<Append>), Problem> {
        let source_path = strip_mount(&request.from);
        let source = match self.live(source_path, true).await {
            Ok(entry) => entry,
            Err(p) if p.status() == StatusCode::GONE => {
                return Err(Problem::conflict("the fork's source was deleted"));
            }
            Err(p) => return Err(p),
        };
        let view = self.view(source_path, false).await?;
        let (tail, _) = self.tail(&view).await?;
        let at = request.at.unwrap_or(tail);
        if at > tail {
            return Err(Problem::bad_request("fork offset past the source's tail"));
        }
        let sub = request.sub_offset.unwrap_or(0);
        let mut prefix = None;
        if sub > 0 {
            let Some(append) = next_append(self, &view, at).await? else {
                return Err(Problem::bad_request(
                    "no append after the fork offset to cut",
                ));
            };
            let cut = if source.config.is_json() {
                if sub as usize > append.json.len() {
                    return Err(Problem::bad_request(
                        "sub-offset past the append's messages",
                    ));
                }
                Append {
                    json: append.json[..sub as usize].to_vec(),
                    ..Append::default()
                }
            } else {
                let data = append.data();
                if sub as usize > data.len() {
                    return Err(Problem::bad_request("sub-offset past the append's bytes"));
                }
                Append::default().with_bytes(&data[..sub as usize])
            };
            prefix = Some(cut);
        }
        Ok((
            ForkPoint {
                parent: source.run,
                at,
                sub_offset: sub,
            },
            source,
            prefix,
        ))
    }

    async fn publish_append(&self, run: RunId, append: &Append) -> Result<u64, Problem> {
        let stored = self.hub.submit(append_event(run, append)?).await?;
        let closing = if append.close {
            Some(self.hub.submit(completed(run)).await?)
        } else {
            None
        };
        let mut last = stored.await?.seq;
        if let Some(closing) = closing {
            last = closing.await?.seq;
        }
        Ok(last)
    }

    fn slot(&self, run: RunId) -> WriterSlot {
        Arc::clone(
            self.writers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(run)
                .or_default(),
        )
    }

    /// Reads a stream run's appends into its writer state; finishes a close
    /// whose terminal event is missing (`repair_once` does this when a
    /// process first meets the run; this covers a close whose terminal
    /// publish failed since).
    async fn load(&self, run: RunId) -> Result<Loaded, Problem> {
        let mut writers = Writers::default();
        let mut ended = false;
        let mut last_seq = replay_whole(&self.hub, run, LOAD_PAGE, |envelope| {
            ended |= envelope.is_terminal();
            if let Some(append) = decode_append(envelope) {
                writers.record(&append);
            }
        })
        .await?;
        if writers.is_closed() && !ended {
            last_seq = self.hub.publish(completed(run)).await?.seq;
        }
        Ok(Loaded { writers, last_seq })
    }

    /// `POST`.
    pub(crate) async fn append(
        &self,
        path: &str,
        request: AppendRequest,
    ) -> Result<Appended, Problem> {
        writable(path)?;
        let entry = self.live(path, true).await?;
        let has_body = !request.body.is_empty();
        if !has_body && !request.close {
            return Err(Problem::bad_request("an append needs a body"));
        }
        if has_body {
            let Some(content_type) = &request.content_type else {
                return Err(Problem::bad_request("an append needs a Content-Type"));
            };
            if !catalog::essence(content_type).eq_ignore_ascii_case(entry.config.essence()) {
                return Err(Problem::conflict(format!(
                    "content type {content_type} does not match the stream's {}",
                    entry.config.content_type
                )));
            }
        }
        let mut append = if has_body {
            framed(entry.config.is_json(), &request.body, false)?
        } else {
            Append::default()
        };
        append.close = request.close;
        append.producer = request.stamp.clone();
        append.stream_seq = request.stream_seq.clone();

        let base = entry.fork.map_or(0, |f| f.at);
        let slot = self.slot(entry.run);
        let mut guard = slot.lock().await;
        if guard.is_none() {
            *guard = Some(self.load(entry.run).await?);
        }
        let loaded = guard.as_mut().expect("loaded above");
        let next = base + loaded.last_seq - 1;
        let closed_conflict = || {
            Problem::conflict("stream closed")
                .with("stream-closed", "true")
                .with("stream-next-offset", crate::offset::format(next))
        };
        if let Some(stamp) = &request.stamp {
            match loaded.writers.check(stamp) {
                Verdict::Accept => {}
                Verdict::Duplicate { epoch, highest } => {
                    return Ok(Appended {
                        status: StatusCode::NO_CONTENT,
                        next,
                        closed: loaded.writers.is_closed(),
                        producer: Some((epoch, highest)),
                    });
                }
                Verdict::StaleEpoch { current } => {
                    return Err(Problem::new(StatusCode::FORBIDDEN, "stale producer epoch")
                        .with("producer-epoch", current.to_string()));
                }
                Verdict::Gap { expected, received } => {
                    if loaded.writers.is_closed() {
                        return Err(closed_conflict());
                    }
                    return Err(Problem::conflict("producer sequence gap")
                        .with("producer-expected-seq", expected.to_string())
                        .with("producer-received-seq", received.to_string()));
                }
                Verdict::NewEpochNotAtZero => {
                    return Err(Problem::bad_request("a new producer epoch starts at seq 0"));
                }
            }
        }
        if loaded.writers.is_closed() {
            if request.close && !has_body && request.stamp.is_none() {
                return Ok(Appended {
                    status: StatusCode::NO_CONTENT,
                    next,
                    closed: true,
                    producer: None,
                });
            }
            return Err(closed_conflict());
        }
        if let Some(seq) = &request.stream_seq
            && !loaded.writers.seq_follows(seq)
        {
            return Err(Problem::conflict(format!(
                "Stream-Seq {seq:?} does not follow the last one"
            )));
        }
        if loaded.writers.producers() >= MAX_PRODUCERS
            && request
                .stamp
                .as_ref()
                .is_some_and(|s| !loaded.writers.knows(&s.id))
        {
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("a stream keeps at most {MAX_PRODUCERS} producers"),
            ));
        }
        let last_seq = match self.publish_append(entry.run, &append).await {
            Ok(seq) => seq,
            Err(p) => {
                // Whatever failed, the append may be stored (a store error
                // can leave it in doubt): read the run again next time.
                *guard = None;
                drop(guard);
                let still = self
                    .catalog()
                    .get(path)
                    .is_some_and(|e| e.run == entry.run && !e.deleted);
                if !still {
                    // Deleted (or expired) while this append was at work.
                    return Err(Problem::not_found());
                }
                return Err(p);
            }
        };
        loaded.writers.record(&append);
        loaded.last_seq = last_seq;
        drop(guard);
        self.catalog_mut().touch(path);
        let producer = request.stamp.as_ref().map(|s| (s.epoch, s.seq));
        Ok(Appended {
            status: if producer.is_some() && has_body {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            },
            next: base + last_seq - 1,
            closed: request.close,
            producer,
        })
    }

    /// `DELETE`.
    pub(crate) async fn delete(&self, path: &str) -> Result<(), Problem> {
        writable(path)?;
        let entry = self.live(path, false).await?;
        let _changing = self.changes.lock().await;
        if self.catalog().get(path).map(|e| e.run) != Some(entry.run) {
            return Err(Problem::not_found());
        }
        self.change(Record::Delete { run: entry.run }).await?;
        Ok(())
    }

    /// Deletes the streams whose TTL or expiry time has passed; returns how
    /// many.
    pub(crate) async fn sweep(&self) -> Result<usize, Problem> {
        let (now, wall) = (Instant::now(), Utc::now());
        let expired: Vec<(String, RunId)> = self
            .catalog()
            .expired(now, wall)
            .map(|e| (e.path.clone(), e.run))
            .collect();
        let mut swept = 0;
        for (path, run) in expired {
            let _changing = self.changes.lock().await;
            let still = self.catalog().get(&path).is_some_and(|e| {
                e.run == run && !e.deleted && e.is_expired(Instant::now(), Utc::now())
            });
            if still {
                self.change(Record::Delete { run }).await?;
                swept += 1;
            }
        }
        Ok(swept)
    }

    /// The stream's metadata for `HEAD`: the entry, tail and closedness.
    pub(crate) async fn head(&self, path: &str) -> Result<(View, u64, bool), Problem> {
        let view = self.view(path, false).await?;
        let (tail, closed) = self.tail(&view).await?;
        Ok((view, tail, closed))
    }
}

/// 405 for the read-only `runs/{id}` paths.
fn writable(path: &str) -> Result<(), Problem> {
    match run_view_id(path)? {
        Some(_) => Err(Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "runs/ streams are read-only",
        )),
        None => Ok(()),
    }
}

/// The run of `runs/{id}`, when `path` names one.
fn run_view_id(path: &str) -> Result<Option<RunId>, Problem> {
    let Some(id) = path.strip_prefix("runs/") else {
        return Ok(None);
    };
    Uuid::parse_str(id)
        .map(|u| Some(RunId::from_uuid(u)))
        .map_err(|_| Problem::not_found())
}

/// The stream path of a `Stream-Forked-From` value (a URL path or a path).
pub(crate) fn strip_mount(from: &str) -> &str {
    let path = from
        .split_once("://")
        .map_or(from, |(_, rest)| rest.find('/').map_or("", |i| &rest[i..]));
    path.strip_prefix("/v1/stream/")
        .unwrap_or_else(|| path.trim_start_matches('/'))
}

/// Hands every envelope of `run` to `each`, in pages of `page`; returns the
/// run's last seq (0 for a run with none).
async fn replay_whole(
    hub: &EventHub,
    run: RunId,
    page: usize,
    mut each: impl FnMut(&RuntimeEventEnvelope),
) -> Result<u64, HubError> {
    let mut last = 0;
    loop {
        let envelopes = hub.replay(run, last, page).await?;
        for envelope in &envelopes {
            last = envelope.seq;
            each(envelope);
        }
        if envelopes.len() < page {
            return Ok(last);
        }
    }
}

/// A chunk of live envelopes of the own run, in seq order.
pub(crate) fn live_chunk(view: &View, envelopes: &[RuntimeEventEnvelope]) -> Chunk {
    let own = view.own();
    let mut chunk = Chunk::default();
    for envelope in envelopes {
        take(view, envelope, &mut chunk);
        chunk.next = own.position(envelope.seq);
        chunk.tail_seq = envelope.seq;
        chunk.ended |= envelope.is_terminal();
        // A stream closes with `RunCompleted`; its run is cancelled when it
        // is deleted, which is no close. An agent run closes however it ends.
        chunk.closed |= if view.envelopes {
            envelope.is_terminal()
        } else {
            matches!(envelope.event, AgentEvent::RunCompleted(_))
        };
    }
    chunk.up_to_date = true;
    chunk
}

/// Adds an envelope's messages to a chunk; returns their size.
fn take(view: &View, envelope: &RuntimeEventEnvelope, chunk: &mut Chunk) -> usize {
    if view.envelopes {
        return match serde_json::to_value(envelope) {
            Ok(value) => {
                let size = value.to_string().len();
                chunk.json.push(value);
                size
            }
            Err(_) => 0,
        };
    }
    let Some(append) = decode_append(envelope) else {
        return 0;
    };
    match view.framing {
        Framing::Bytes => {
            let data = append.data();
            chunk.bytes.extend_from_slice(&data);
            data.len()
        }
        Framing::Json => {
            let size: usize = append.json.iter().map(|v| v.to_string().len()).sum();
            chunk.json.extend(append.json);
            size
        }
    }
}

/// The append a stream run's envelope carries, if it is one.
fn decode_append(envelope: &RuntimeEventEnvelope) -> Option<Append> {
    match &envelope.event {
        AgentEvent::Custom(custom) if custom.kind == message::KIND => {
            serde_json::from_value(custom.payload.clone()).ok()
        }
        _ => None,
    }
}

/// The first append after position `at` of a stream.
async fn next_append(streams: &Streams, view: &View, at: u64) -> Result<Option<Append>, Problem> {
    for segment in &view.segments {
        let end = segment.limit.unwrap_or(u64::MAX);
        if at >= end {
            continue;
        }
        let mut after_seq = (at + 1).saturating_sub(segment.base);
        loop {
            let page = streams
                .hub
                .replay(segment.run, after_seq, FIRST_PAGE)
                .await?;
            for envelope in &page {
                if segment.position(envelope.seq) > end {
                    return Ok(None);
                }
                after_seq = envelope.seq;
                if let Some(append) = decode_append(envelope)
                    && append.has_data()
                {
                    return Ok(Some(append));
                }
            }
            if page.len() < FIRST_PAGE {
                break;
            }
        }
    }
    Ok(None)
}

/// An append of `body` to a stream of the given framing. JSON bodies are
/// validated and one level of array flattened; `[]` is refused on `POST`
/// and means "no messages" on `PUT`.
fn framed(is_json: bool, body: &[u8], creating: bool) -> Result<Append, Problem> {
    if !is_json {
        return Ok(Append::default().with_bytes(body));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Problem::bad_request(format!("invalid JSON: {e}")))?;
    let json = match value {
        Value::Array(items) => {
            if items.is_empty() && !creating {
                return Err(Problem::bad_request("an empty JSON array appends nothing"));
            }
            items
        }
        other => vec![other],
    };
    Ok(Append {
        json,
        ..Append::default()
    })
}

fn started(run: RunId) -> AgentEvent {
    AgentEvent::RunStarted(RunStarted {
        run_id: run,
        timestamp: Utc::now(),
        session_id: None,
        provider: ProviderId::new(PROVIDER),
        model: String::new(),
    })
}

fn completed(run: RunId) -> AgentEvent {
    AgentEvent::RunCompleted(RunCompleted {
        run_id: run,
        timestamp: Utc::now(),
        finish_reason: "closed".into(),
        iterations: 0,
    })
}

fn custom(run: RunId, kind: &str, payload: Value) -> AgentEvent {
    AgentEvent::Custom(CustomEvent {
        run_id: run,
        timestamp: Utc::now(),
        kind: kind.into(),
        payload,
    })
}

fn append_event(run: RunId, append: &Append) -> Result<AgentEvent, Problem> {
    let payload = serde_json::to_value(append)
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(custom(run, message::KIND, payload))
}
