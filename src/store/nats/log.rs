//! The JetStream run log (feature `nats`): what a hub opened with
//! `Config::nats` stores its runs in, shared by every host opened on the
//! same stream (DESIGN §6).
//!
//! ## Layout
//!
//! One JetStream stream (`NatsConfig::stream`, default `BEHEST`) holds
//! every run, one subject per run room: `{prefix}.run.{run_id}`. Each
//! envelope is one message, encoded as the sled store encodes it (format
//! byte, MessagePack), with headers:
//!
//! - `Nats-Msg-Id` = the envelope's event id: a retry of an append whose
//!   acknowledgement was lost is recognised, not stored twice;
//! - `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the
//!   run's last message as the writer knows it: a second writer of the same
//!   run (another host) is refused instead of forking the run's order;
//! - `Behest-Seq` = the envelope's seq, so a read from seq `k` finds its
//!   message by binary search over stream sequences without decoding.
//!
//! ## Why one message in flight per run
//!
//! The expected-sequence check needs the stream sequence of the run's
//! previous message, known only from its acknowledgement once other runs
//! share the stream. Guessing it to pipeline is not safe: a refused guess
//! leaves a hole that later, luckier guesses write past (seen against
//! nats-server 2.9.10). So a [`RunWriter`] has one append in flight, and
//! throughput comes from many runs appending at once.
//!
//! ## Retries
//!
//! The server's order of checks differs between versions: 2.9 answers a
//! retried message id as a duplicate before checking the expected
//! sequence; newer servers refuse it as a wrong last sequence. Either way
//! the writer then looks at the message that follows its expected
//! sequence: if that is its own event id, its earlier attempt landed.
//!
//! ## Durability
//!
//! An append is acknowledged once JetStream has stored it. Whether that
//! survives a power loss is the server's setting, not this crate's: see
//! README ("NATS JetStream settings").

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID,
};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind, StorageType};
use async_nats::jetstream::{self, ErrorCode, stream};
use futures_util::stream::BoxStream;
use thiserror::Error;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::dispatch::Dispatch;
use super::live::{self, LogMessage};
use crate::codec::{self, CodecError};
pub use crate::config::NatsConfig;
use crate::error::StoreError;
use crate::ids::RunId;
use crate::store::{FollowFrom, Following, IndexedRun};
use crate::stream::RuntimeEventEnvelope;

/// The header carrying an envelope's seq.
const SEQ_HEADER: &str = "Behest-Seq";

/// Room left under the server's `max_payload` for the headers.
const HEADER_ROOM: usize = 1024;

/// Why the run log could not be opened.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NatsOpenError {
    /// No server answered at the URL.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// The URL.
        url: String,
        /// What the client said.
        message: String,
    },
    /// The server has no JetStream, or refused to create the stream.
    #[error("cannot open JetStream stream {stream}: {message}")]
    Stream {
        /// The stream.
        stream: String,
        /// What the server said.
        message: String,
    },
    /// The stream exists with subjects that do not cover the runs.
    #[error("JetStream stream {stream} exists with subjects {found:?}; it needs {wanted:?}")]
    Mismatch {
        /// The stream.
        stream: String,
        /// Its subjects.
        found: Vec<String>,
        /// The subject the run log writes.
        wanted: String,
    },
}

/// A run's last message, as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunTail {
    /// The run's last seq.
    pub last_seq: u64,
    /// Whether that envelope is the run's terminal event.
    pub ended: bool,
    /// Its stream sequence (what the next append must expect).
    pub stream_seq: u64,
}

/// A connection to the run log. Cheap to clone.
#[derive(Clone, Debug)]
pub struct NatsLog {
    js: jetstream::Context,
    /// The stream by name, without its info: every writer and follower
    /// holds a clone, and the info (the whole configuration and state) is
    /// read once, at open.
    stream: stream::Stream<()>,
    prefix: String,
    max_event_bytes: usize,
    epoch: Uuid,
    /// The host's one subscription to what the stream republishes, which
    /// its followers take their live messages from (see `dispatch.rs` and
    /// `live.rs`); `None` where the stream does not republish, and they
    /// follow through consumers (`consumer.rs`).
    followers: Option<Dispatch>,
    /// Where the stream takes atomic batches: the batches this host may
    /// have open on it at once.
    batches: Option<Arc<Semaphore>>,
}

/// A connection to the server `config` names.
async fn connect(config: &NatsConfig) -> Result<async_nats::Client, NatsOpenError> {
    async_nats::ConnectOptions::new()
        .request_timeout(Some(config.request_timeout))
        // The client retries forever; capping its backoff makes a host
        // notice a restarted server within a second, not within the
        // client's default of up to four.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64).saturating_mul(50).min(1000))
        })
        .connect(&config.url)
        .await
        .map_err(|e| NatsOpenError::Connect {
            url: config.url.clone(),
            message: e.to_string(),
        })
}

/// What the stream does for this log once [`upgrade`] asked for it.
struct Upgraded {
    /// It republishes what it stores where followers subscribe.
    live: bool,
    /// It takes atomic batches.
    batches: bool,
}

/// Asks of the stream whose configuration is `current` what the log would
/// use: the live republish `wanted` (followers then follow without
/// consumers), and, with `atomic`, atomic batch publish. One update asks
/// for both. An existing stream with no republish gets it on servers that
/// allow the change (2.10 and later; 2.9 refuses it), and one with another
/// republish (the operator's) keeps it; both of those follow through
/// consumers instead.
async fn upgrade(
    js: &jetstream::Context,
    current: &stream::Config,
    wanted: stream::Republish,
    atomic: bool,
) -> Upgraded {
    let mut republished = current.clone();
    match &current.republish {
        Some(republish) if *republish == wanted => {}
        Some(other) => {
            tracing::warn!(stream = %current.name, ?other, "the stream republishes elsewhere already; following it with a consumer per followed run");
        }
        None => republished.republish = Some(wanted.clone()),
    }
    let mut both = republished.clone();
    both.allow_atomic_publish |= atomic;
    // Both changes in one update; where the server refuses that, the
    // republish alone (a server that will not allow batches on this
    // stream); where it refuses that too, nothing (nats-server 2.9 changes
    // no republish of an existing stream).
    let mut config = None;
    let attempts = if both == republished {
        vec![both]
    } else {
        vec![both, republished]
    };
    for attempt in attempts {
        if attempt == *current {
            config = Some(attempt);
            break;
        }
        match js.update_stream(attempt.clone()).await {
            Ok(info) => {
                config = Some(info.config);
                break;
            }
            Err(error) => {
                tracing::warn!(stream = %current.name, %error, asked = ?(attempt.republish.is_some(), attempt.allow_atomic_publish), "the server would not change this existing stream so");
            }
        }
    }
    let config = config.unwrap_or_else(|| current.clone());
    let live = config.republish.as_ref() == Some(&wanted);
    if !live && current.republish.is_none() {
        tracing::warn!(stream = %current.name, "the stream has no live republish (nats-server 2.9 refuses to add one to an existing stream); following it with a consumer per followed run");
    }
    let batches = atomic && config.allow_atomic_publish;
    if atomic && !batches {
        tracing::warn!(stream = %current.name, "the stream does not allow atomic batches; appending one message at a time");
    }
    Upgraded { live, batches }
}

/// Whether a server of `version` (as its INFO gives it, e.g. `2.15.1`)
/// takes atomic batch publish (ADR-50): 2.12 and later.
fn takes_atomic_batches(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let mut number = || parts.next().and_then(|p| p.parse::<u64>().ok());
    match (number(), number()) {
        (Some(major), Some(minor)) => (major, minor) >= (2, 12),
        _ => false,
    }
}

impl NatsLog {
    /// Connects and opens (creating it if missing) the stream.
    ///
    /// # Errors
    ///
    /// [`NatsOpenError`] naming the URL or the stream.
    pub async fn open(config: &NatsConfig) -> Result<Self, NatsOpenError> {
        let client = connect(config).await?;
        let max_payload = client.server_info().max_payload;
        let atomic = config.atomic_batches && takes_atomic_batches(&client.server_info().version);
        // An acknowledgement not back within the request timeout is an
        // append in doubt, answered as such, not awaited indefinitely.
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client);
        let wanted = format!("{}.run.*", config.prefix);
        let subjects = vec![
            wanted.clone(),
            format!("{}.session.*", config.prefix),
            format!("{}.meta", config.prefix),
        ];
        let stream_error = |message: String| NatsOpenError::Stream {
            stream: config.stream.clone(),
            message,
        };
        // Followers read live messages from here (see `live.rs`).
        let republish = stream::Republish {
            source: format!("{}.>", config.prefix),
            destination: live::live_subject(&config.prefix, &format!("{}.>", config.prefix)),
            headers_only: false,
        };
        let mut stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: subjects.clone(),
                storage: StorageType::File,
                duplicate_window: config.duplicate_window,
                num_replicas: config.replicas,
                allow_direct: true,
                republish: Some(republish.clone()),
                allow_atomic_publish: atomic,
                ..Default::default()
            })
            .await
            .map_err(|e| stream_error(e.to_string()))?;
        // An existing stream is returned as it is, whatever was asked.
        let info = stream
            .info()
            .await
            .map_err(|e| stream_error(e.to_string()))?
            .clone();
        if info.config.max_age != Duration::ZERO
            || info.config.max_messages_per_subject > 0
            || info.config.max_messages > 0
            || info.config.max_bytes > 0
        {
            // Limits would delete a run's events (or the epoch) under the
            // hub, which would then restart a run at seq 1 or serve a
            // shortened one: not until removal leaves a tombstone.
            return Err(NatsOpenError::Stream {
                stream: config.stream.clone(),
                message: "the stream has limits (max_age, max_msgs, max_bytes or max_msgs_per_subject); the run log needs a stream without them".into(),
            });
        }
        if !subjects.iter().all(|s| info.config.subjects.contains(s)) || !info.config.allow_direct {
            return Err(NatsOpenError::Mismatch {
                stream: config.stream.clone(),
                found: info.config.subjects.clone(),
                wanted,
            });
        }
        let Upgraded { live, batches } = upgrade(&js, &info.config, republish, atomic).await;
        // The live subscription is on a connection of its own, so that a
        // burst of live messages waits in its buffer, not ahead of this
        // connection's replies. Past that buffer (the client's default,
        // 65,536 messages) core NATS drops them, and each follower reads
        // what it lost from the stream (a gap).
        let followers = if live {
            let client = connect(config).await?;
            let wildcard = live::live_subject(&config.prefix, &format!("{}.>", config.prefix));
            Some(Dispatch::new(client, wildcard))
        } else {
            None
        };
        let max_event_bytes = config
            .max_event_bytes
            .min(max_payload.saturating_sub(HEADER_ROOM));
        // Same stream, by name: what the log keeps, and clones per writer
        // and follower, is not the info read above.
        let stream = js
            .get_stream_no_info(&config.stream)
            .await
            .map_err(|e| stream_error(e.to_string()))?;
        let mut log = Self {
            js,
            stream,
            followers,
            batches: batches.then(|| Arc::new(Semaphore::new(BATCHES_IN_FLIGHT))),
            prefix: config.prefix.clone(),
            max_event_bytes,
            epoch: Uuid::nil(),
        };
        log.epoch = log
            .load_epoch()
            .await
            .map_err(|e| stream_error(e.to_string()))?;
        Ok(log)
    }

    /// The stream's epoch: minted by the first host that opened it, read by
    /// every later one (the expected-sequence check on the meta subject
    /// makes the first writer win), so cursors are valid on every host.
    async fn load_epoch(&self) -> Result<Uuid, StoreError> {
        let subject = format!("{}.meta", self.prefix);
        for _ in 0..3 {
            match self
                .stream
                .direct_get_last_for_subject(subject.as_str())
                .await
            {
                Ok(message) => {
                    let text = std::str::from_utf8(&message.payload).unwrap_or_default();
                    return Uuid::parse_str(text).map_err(|e| StoreError::ReadFailed {
                        message: format!("NATS: the stream's epoch {text:?} is not a UUID: {e}"),
                    });
                }
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(read_failed(&e)),
            }
            let epoch = Uuid::now_v7().to_string();
            let message = PublishMessage::build()
                .payload(epoch.into_bytes().into())
                .expected_last_subject_sequence(0);
            match self.js.send_publish(subject.clone(), message).await {
                Ok(ack) => match ack.await {
                    // Stored, or another host's won: either way, read it.
                    Ok(_) => {}
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
                    Err(e) => return Err(read_failed(&e)),
                },
                Err(e) => return Err(read_failed(&e)),
            }
        }
        Err(StoreError::ReadFailed {
            message: "NATS: the stream's epoch could not be read or written".into(),
        })
    }

    /// The stream's epoch (see [`crate::Cursor`]).
    #[must_use]
    pub fn epoch(&self) -> Uuid {
        self.epoch
    }

    /// The run's last envelope and its stream sequence.
    ///
    /// Read from the stream's leader, not a replica (direct gets may be
    /// served stale by a replica): writers fence on it and rooms recover
    /// from it.
    pub(crate) async fn last(
        &self,
        run_id: RunId,
    ) -> Result<Option<(RuntimeEventEnvelope, u64)>, StoreError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(run_id))
            .await
        {
            Ok(message) => Ok(Some((decode(run_id, None, &message)?, message.sequence))),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(read_failed(&e)),
        }
    }

    /// The run's first envelope.
    pub(crate) async fn first(
        &self,
        run_id: RunId,
    ) -> Result<Option<RuntimeEventEnvelope>, StoreError> {
        match self
            .stream
            .direct_get_next_for_subject(self.subject(run_id), Some(1))
            .await
        {
            Ok(message) => Ok(Some(decode(run_id, Some(1), &message)?)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_failed(&e)),
        }
    }

    /// The run's envelopes from `from` on, then every one appended later,
    /// in order and once (see [`NatsLog::ordered`]; the stream ends after
    /// a failure it does not recover from). How a host learns of a run
    /// another host writes. `None` when asked to follow from the end of a
    /// run that has ended: nothing will come.
    ///
    /// # Errors
    ///
    /// [`StoreError::ReadFailed`] if following cannot start; the stream's
    /// items carry later failures.
    pub(crate) async fn follow(
        &self,
        run_id: RunId,
        from: FollowFrom,
    ) -> Result<Option<Following<RuntimeEventEnvelope>>, StoreError> {
        use futures_util::StreamExt;

        // Where following starts, as a stream sequence (0: the subject's
        // first message).
        let start = match from {
            FollowFrom::Position(position) => position,
            FollowFrom::AfterSeq(after_seq) => match self.last(run_id).await? {
                None => 0,
                Some((last, last_stream_seq)) if after_seq < last.seq => {
                    self.locate(run_id, after_seq + 1, last_stream_seq).await?
                }
                Some((_, last_stream_seq)) => last_stream_seq + 1,
            },
            FollowFrom::End => match self.last(run_id).await? {
                None => 0,
                Some((last, _)) if last.is_terminal() => return Ok(None),
                Some((_, last_stream_seq)) => last_stream_seq + 1,
            },
        };
        let messages = self.ordered(self.subject(run_id), start).await?;
        let envelopes = messages
            .map(move |message| {
                let message = message?;
                let envelope = codec::decode_envelope(&message.payload).map_err(|source| {
                    StoreError::Corrupt {
                        run_id,
                        seq: seq_from(&message.headers).unwrap_or(0),
                        source,
                    }
                })?;
                if envelope.run_id != run_id {
                    return Err(StoreError::Corrupt {
                        run_id,
                        seq: envelope.seq,
                        source: CodecError::Malformed(format!(
                            "the run's subject holds an envelope of run {}",
                            envelope.run_id
                        )),
                    });
                }
                Ok(envelope)
            })
            .boxed();
        Ok(Some(Following {
            start,
            items: envelopes,
        }))
    }

    /// The messages of `subject` from stream sequence `start` on (0: from
    /// its first), then every one stored later, in order and once, ending
    /// after an error so that the caller follows again from what it has:
    /// without a consumer on the server where the stream republishes (see
    /// [`super::live`]), else through an ordered consumer.
    async fn ordered(
        &self,
        subject: String,
        start: u64,
    ) -> Result<BoxStream<'static, Result<LogMessage, StoreError>>, StoreError> {
        let Some(dispatch) = &self.followers else {
            return super::consumer::follow(&self.stream, subject, start).await;
        };
        let live = live::live_subject(&self.prefix, &subject);
        live::follow(dispatch, self.stream.clone(), subject, live, start).await
    }

    /// Whether a writer appends several envelopes as one atomic batch:
    /// the server is nats-server 2.12 or later, the stream allows batches,
    /// and [`NatsConfig::atomic_batches`] is on.
    #[must_use]
    pub fn appends_in_batches(&self) -> bool {
        self.batches.is_some()
    }

    /// Whether followers of this stream need no consumer on the server (it
    /// republishes what it stores); false for a stream nats-server 2.9 made
    /// before this build, which it will not change.
    #[must_use]
    pub fn follows_without_consumers(&self) -> bool {
        self.followers.is_some()
    }

    fn session_subject(&self, session: Uuid) -> String {
        format!("{}.session.{session}", self.prefix)
    }

    /// Records that `run_id` belongs to `session` (idempotent within the
    /// duplicate window; readers drop repeats after it).
    pub(crate) async fn index_session(
        &self,
        session: Uuid,
        run_id: RunId,
    ) -> Result<(), StoreError> {
        let message = PublishMessage::build()
            .payload(run_id.to_string().into_bytes().into())
            .message_id(format!("{run_id}/session").as_str());
        let acked = match self
            .js
            .send_publish(self.session_subject(session), message)
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        acked.map(|_| ()).map_err(|e| StoreError::WriteFailed {
            message: format!("NATS: indexing run {run_id} in session {session}: {e}"),
        })
    }

    /// The runs of `session`, in the order they were indexed.
    pub(crate) async fn session_runs(&self, session: Uuid) -> Result<Vec<RunId>, StoreError> {
        Ok(self.session_runs_until(session).await?.0)
    }

    /// The runs of `session`, in the order they were indexed, and the log
    /// position after the last entry read.
    async fn session_runs_until(&self, session: Uuid) -> Result<(Vec<RunId>, u64), StoreError> {
        let subject = self.session_subject(session);
        let mut runs: Vec<RunId> = Vec::new();
        // A run may be indexed more than once; a set keeps the listing
        // linear in the entries.
        let mut listed = std::collections::HashSet::new();
        let mut next = 1;
        loop {
            let message = match self
                .stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok((runs, next)),
                Err(e) => return Err(read_failed(&e)),
            };
            next = message.sequence + 1;
            let run = indexed_run(session, &message.payload)?;
            if listed.insert(run) {
                runs.push(run);
            }
        }
    }

    /// The runs indexed in `session` from position `start` on, as the log
    /// delivers their index entries (see [`NatsLog::ordered`]), each with the
    /// entry's position in the log: every envelope of the run appended since
    /// the entry was written lies after it (a run may come more than once,
    /// when a writer indexed it again after the duplicate window). How a
    /// host learns of a session's runs that other hosts start.
    ///
    /// With no `start`, first lists the runs indexed so far (returned) and
    /// follows from the entry after the last one listed, so that every run
    /// is either listed or delivered, even where the listing was served by a
    /// replica a little behind.
    ///
    /// # Errors
    ///
    /// [`StoreError::ReadFailed`] if the listing fails or following cannot
    /// start; the stream's items carry later failures.
    pub(crate) async fn follow_session(
        &self,
        session: Uuid,
        start: Option<u64>,
    ) -> Result<(Vec<RunId>, Following<IndexedRun>), StoreError> {
        use futures_util::StreamExt;

        let (listed, start) = match start {
            Some(start) => (Vec::new(), start),
            None => self.session_runs_until(session).await?,
        };
        let subject = self.session_subject(session);
        let messages = self.ordered(subject, start).await?;
        let runs = messages
            .map(move |message| {
                let message = message?;
                let position = message.sequence;
                Ok(IndexedRun {
                    run_id: indexed_run(session, &message.payload)?,
                    position,
                })
            })
            .boxed();
        Ok((listed, Following { start, items: runs }))
    }

    /// The subject of `run_id`'s messages.
    #[must_use]
    pub fn subject(&self, run_id: RunId) -> String {
        format!("{}.run.{run_id}", self.prefix)
    }

    /// The largest encoded envelope this log accepts.
    #[must_use]
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// The run's last message, or `None` for a run with none.
    ///
    /// # Errors
    ///
    /// [`StoreError::ReadFailed`] if the server did not answer,
    /// [`StoreError::Corrupt`] if the message cannot be decoded.
    pub async fn tail(&self, run_id: RunId) -> Result<Option<RunTail>, StoreError> {
        Ok(self
            .last(run_id)
            .await?
            .map(|(envelope, stream_seq)| RunTail {
                last_seq: envelope.seq,
                ended: envelope.is_terminal(),
                stream_seq,
            }))
    }

    /// A writer for `run_id`, starting where the log's copy of the run ends.
    ///
    /// # Errors
    ///
    /// As [`NatsLog::tail`].
    pub async fn writer(&self, run_id: RunId) -> Result<RunWriter, StoreError> {
        let tail = self.tail(run_id).await?;
        Ok(RunWriter {
            log: self.clone(),
            run_id,
            tail,
            in_doubt: false,
        })
    }

    /// Up to `limit` envelopes of `run_id` with `seq > after_seq`, in seq
    /// order.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] naming the first seq that is missing or
    /// cannot be decoded; [`StoreError::ReadFailed`].
    pub async fn list_after(
        &self,
        run_id: RunId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, StoreError> {
        let mut out = Vec::new();
        let Some(tail) = self.tail(run_id).await? else {
            return Ok(out);
        };
        if limit == 0 || after_seq >= tail.last_seq {
            return Ok(out);
        }
        let wanted = after_seq + 1;
        let mut next = self.locate(run_id, wanted, tail.stream_seq).await?;
        while out.len() < limit {
            let expected = wanted + out.len() as u64;
            let message = match self
                .stream
                .direct_get_next_for_subject(self.subject(run_id), Some(next))
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(read_failed(&e)),
            };
            let envelope = decode(run_id, Some(expected), &message)?;
            if envelope.seq != expected {
                return Err(StoreError::missing(run_id, expected, envelope.seq));
            }
            next = message.sequence + 1;
            out.push(envelope);
            if expected == tail.last_seq {
                break;
            }
        }
        Ok(out)
    }

    /// The stream sequence of `run_id`'s message with seq `wanted` (which
    /// the tail at `last_stream_seq` is at or past): the first message of
    /// the run whose seq is at least `wanted`, by binary search over stream
    /// sequences. Seqs rise with stream sequences within a run, as the
    /// expected-sequence check keeps a run to one writer.
    async fn locate(
        &self,
        run_id: RunId,
        wanted: u64,
        last_stream_seq: u64,
    ) -> Result<u64, StoreError> {
        let subject = self.subject(run_id);
        let (mut low, mut high, mut found) = (1u64, last_stream_seq, last_stream_seq);
        while low <= high {
            let middle = low + (high - low) / 2;
            let message = self
                .stream
                .direct_get_next_for_subject(subject.as_str(), Some(middle))
                .await
                .map_err(|e| read_failed(&e))?;
            let seq = header_seq(run_id, &message)?;
            if seq >= wanted {
                found = message.sequence;
                high = middle - 1;
            } else {
                low = message.sequence + 1;
            }
        }
        Ok(found)
    }
}

/// The run a session index entry names.
fn indexed_run(session: Uuid, payload: &[u8]) -> Result<RunId, StoreError> {
    let text = std::str::from_utf8(payload).unwrap_or_default();
    Uuid::parse_str(text)
        .map(RunId::from_uuid)
        .map_err(|e| StoreError::ReadFailed {
            message: format!("NATS: session {session} index holds {text:?}: {e}"),
        })
}

/// An envelope encoded for the log, with what the writer needs of it.
pub(crate) struct Encoded<'a> {
    pub(crate) run_id: RunId,
    pub(crate) seq: u64,
    pub(crate) event_id: String,
    pub(crate) terminal: bool,
    pub(crate) bytes: &'a [u8],
}

/// The one writer of a run on this host: appends one envelope at a time,
/// each fenced by the stream sequence of the one before.
#[derive(Debug)]
pub struct RunWriter {
    log: NatsLog,
    run_id: RunId,
    tail: Option<RunTail>,
    /// An append's outcome was not learned: read the tail before the next.
    in_doubt: bool,
}

impl RunWriter {
    /// The run's last seq as this writer knows it (0 for a new run).
    #[must_use]
    pub fn last_seq(&self) -> u64 {
        self.tail.as_ref().map_or(0, |t| t.last_seq)
    }

    /// Stores `envelope`, which must carry the run's next seq, and returns
    /// once JetStream acknowledged it. Appending again an envelope that is
    /// already stored (a retry after a lost acknowledgement or an error in
    /// doubt) succeeds without storing it twice.
    ///
    /// # Errors
    ///
    /// Nothing is stored when any of these is returned:
    /// [`StoreError::RunMismatch`] if the envelope's `run_id` is not its
    /// event's,
    /// [`StoreError::SeqConflict`] if the seq is not the run's next,
    /// [`StoreError::RunClosed`] after the run's terminal event,
    /// [`StoreError::TooLarge`], [`StoreError::Encode`],
    /// [`StoreError::RunFenced`] if another writer appended to the run
    /// since this one last looked (open a new writer to continue).
    /// [`StoreError::FlushFailed`] means the outcome is in doubt (the server
    /// did not answer in time): append the same envelope again to learn it.
    pub async fn append(&mut self, envelope: &RuntimeEventEnvelope) -> Result<(), StoreError> {
        self.append_batch(std::slice::from_ref(envelope)).await
    }

    /// Stores `envelopes`, the run's next ones in seq order, as atomic
    /// batches of up to 1,000 where the stream takes them
    /// ([`NatsLog::appends_in_batches`]), one at a time otherwise. A batch
    /// costs one round trip, is fenced by its first message as
    /// [`RunWriter::append`] is, and is stored whole or not at all;
    /// appending it again after an error in doubt stores it once.
    ///
    /// # Errors
    ///
    /// As [`RunWriter::append`]. After [`StoreError::FlushFailed`], some
    /// of the envelopes may be stored (a whole batch of them, or single
    /// envelopes): append the same envelopes again to learn it.
    pub async fn append_batch(
        &mut self,
        envelopes: &[RuntimeEventEnvelope],
    ) -> Result<(), StoreError> {
        let mut encoded = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            crate::store::check_run(envelope)?;
            encoded.push(codec::encode_envelope(envelope).map_err(|source| {
                StoreError::Encode {
                    run_id: envelope.run_id,
                    source,
                }
            })?);
        }
        let items: Vec<Encoded<'_>> = envelopes
            .iter()
            .zip(&encoded)
            .map(|(envelope, bytes)| Encoded {
                run_id: envelope.run_id,
                seq: envelope.seq,
                event_id: envelope.event_id.to_string(),
                terminal: envelope.is_terminal(),
                bytes,
            })
            .collect();
        self.append_all(&items, &mut 0).await
    }

    /// Test hook (feature `fault-injection`): takes the writer's last
    /// append as in doubt, as after a lost acknowledgement, so that the
    /// next append first learns from the log what is stored.
    #[cfg(feature = "fault-injection")]
    pub fn assume_in_doubt(&mut self) {
        self.in_doubt = true;
    }

    /// Stores `envelopes`, the run's next ones in seq order: as atomic
    /// batches where the stream takes them, one at a time otherwise.
    /// `stored` counts those known stored, so that a caller can tell an
    /// error after some were stored (in doubt) from one before any.
    pub(crate) async fn append_all(
        &mut self,
        envelopes: &[Encoded<'_>],
        stored: &mut usize,
    ) -> Result<(), StoreError> {
        self.check_chain(envelopes)?;
        let mut index = 0;
        // Envelopes of a batch the server refused whole go one at a time.
        let mut singles_until = 0;
        while index < envelopes.len() {
            let rest = &envelopes[index..];
            let take = if index < singles_until || self.log.batches.is_none() {
                1
            } else {
                batch_len(rest)
            };
            let chunk = &rest[..take];
            let expected_stream_seq = match self.prepare(rest).await? {
                Next::Stored(n) => {
                    index += n;
                    *stored += n;
                    continue;
                }
                Next::Append(expected) => expected,
            };
            if take == 1 {
                self.publish_one(&chunk[0], expected_stream_seq).await?;
            } else if !self.publish_batch(chunk, expected_stream_seq).await? {
                singles_until = index + take;
                continue;
            }
            index += take;
            *stored += take;
        }
        Ok(())
    }

    /// Checks that `envelopes` are of this writer's run, with consecutive
    /// seqs, and that nothing follows a terminal event among them.
    fn check_chain(&self, envelopes: &[Encoded<'_>]) -> Result<(), StoreError> {
        let run_id = self.run_id;
        let Some(first) = envelopes.first() else {
            return Ok(());
        };
        for (i, envelope) in envelopes.iter().enumerate() {
            let seq = first.seq + i as u64;
            if envelope.run_id != run_id || (i > 0 && envelope.seq != seq) {
                return Err(StoreError::SeqConflict {
                    run_id: envelope.run_id,
                    expected: if i == 0 { 1 } else { seq },
                    got: envelope.seq,
                });
            }
            if envelope.terminal && i + 1 < envelopes.len() {
                return Err(StoreError::RunClosed { run_id });
            }
        }
        Ok(())
    }

    /// With `rest` (all the envelopes of the call not yet stored, checked by
    /// [`RunWriter::check_chain`]): learns the outcome of an append in
    /// doubt first, then how many of `rest` are stored already (an attempt
    /// in doubt may have stored more than the chunk it was), or the stream
    /// sequence the next message must expect.
    async fn prepare(&mut self, rest: &[Encoded<'_>]) -> Result<Next, StoreError> {
        let run_id = self.run_id;
        let Some(first) = rest.first() else {
            return Ok(Next::Stored(0));
        };
        if self.in_doubt {
            // Stays in doubt until the log has answered.
            self.tail = self.log.tail(run_id).await?;
            let last_stored = self.last_seq();
            if last_stored >= first.seq {
                // Stored: by the attempt in doubt (a batch lands whole or
                // not at all), or by another writer.
                let overlap = usize::try_from(last_stored - first.seq + 1)
                    .map_or(rest.len(), |n| n.min(rest.len()));
                let ours = self.stored_id(first.seq).await?.as_deref() == Some(&first.event_id)
                    && (overlap == 1
                        || self.stored_id(rest[overlap - 1].seq).await?.as_deref()
                            == Some(&rest[overlap - 1].event_id));
                self.in_doubt = false;
                if ours {
                    return Ok(Next::Stored(overlap));
                }
                return Err(StoreError::RunFenced {
                    run_id,
                    last_seq: self.last_seq(),
                });
            }
            self.in_doubt = false;
        }
        if first.seq != self.last_seq() + 1 {
            // The run may have moved on without this writer (another host
            // appended, and this host's room learned of it): look again
            // before calling it a conflict.
            self.tail = self.log.tail(run_id).await?;
        }
        if self.tail.as_ref().is_some_and(|t| t.ended) {
            return Err(StoreError::RunClosed { run_id });
        }
        let expected = self.last_seq() + 1;
        if first.seq != expected {
            return Err(StoreError::SeqConflict {
                run_id,
                expected,
                got: first.seq,
            });
        }
        if let Some(large) = rest
            .iter()
            .find(|e| e.bytes.len() > self.log.max_event_bytes)
        {
            return Err(StoreError::TooLarge {
                run_id,
                size: large.bytes.len(),
                limit: self.log.max_event_bytes,
            });
        }
        Ok(Next::Append(self.tail.as_ref().map_or(0, |t| t.stream_seq)))
    }

    /// Publishes one envelope, fenced by `expected_stream_seq`.
    async fn publish_one(
        &mut self,
        envelope: &Encoded<'_>,
        expected_stream_seq: u64,
    ) -> Result<(), StoreError> {
        let run_id = self.run_id;
        let message = PublishMessage::build()
            .payload(envelope.bytes.to_vec().into())
            .message_id(envelope.event_id.as_str())
            .header(SEQ_HEADER, envelope.seq.to_string().as_str())
            .expected_last_subject_sequence(expected_stream_seq);
        let subject = self.log.subject(run_id);
        let acked = match self.log.js.send_publish(subject, message).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        let stream_seq = match acked {
            Ok(ack) => ack.sequence,
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                // Either an earlier attempt of this very envelope landed
                // (its acknowledgement was lost), or another writer got
                // there first.
                match self
                    .earlier_attempt(expected_stream_seq, envelope, envelope.seq)
                    .await?
                {
                    Some(sequence) => {
                        self.in_doubt = false;
                        sequence
                    }
                    None => return Err(self.fenced().await),
                }
            }
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                return Err(StoreError::TooLarge {
                    run_id,
                    size: envelope.bytes.len(),
                    limit: self.log.max_event_bytes,
                });
            }
            Err(e) => {
                self.in_doubt = true;
                return Err(StoreError::FlushFailed {
                    message: format!(
                        "NATS did not acknowledge run {run_id} seq {}: {e}",
                        envelope.seq
                    ),
                });
            }
        };
        self.tail = Some(RunTail {
            last_seq: envelope.seq,
            ended: envelope.terminal,
            stream_seq,
        });
        Ok(())
    }

    /// Publishes `chunk` (two envelopes or more) as one atomic batch
    /// (ADR-50), its first message fenced by `expected_stream_seq`: the
    /// messages before the last without a reply, the last committing the
    /// batch and answering for all of it. `Ok(false)`: the server refused
    /// the batch whole (too many batches open on the stream, or batches
    /// since disallowed), and nothing of it is stored.
    async fn publish_batch(
        &mut self,
        chunk: &[Encoded<'_>],
        expected_stream_seq: u64,
    ) -> Result<bool, StoreError> {
        let run_id = self.run_id;
        let (Some(permits), Some((last, body))) = (self.log.batches.clone(), chunk.split_last())
        else {
            return Ok(false);
        };
        // The server holds at most 50 open batches per stream; each host
        // keeps to its share.
        let _open = permits
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let batch = Uuid::now_v7().simple().to_string();
        let subject = self.log.subject(run_id);
        let client = self.log.js.client();
        for (i, envelope) in body.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, envelope.event_id.as_str());
            headers.insert(SEQ_HEADER, envelope.seq.to_string().as_str());
            headers.insert(NATS_BATCH_ID, batch.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
            if i == 0 {
                headers.insert(
                    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    expected_stream_seq.to_string().as_str(),
                );
            }
            let payload = bytes::Bytes::copy_from_slice(envelope.bytes);
            if let Err(e) = client
                .publish_with_headers(subject.clone(), headers, payload)
                .await
            {
                // The commit was not sent: the server abandons the batch.
                return Err(StoreError::FlushFailed {
                    message: format!("NATS: run {run_id}'s batch was not sent: {e}"),
                });
            }
        }
        let message = PublishMessage::build()
            .payload(last.bytes.to_vec().into())
            .message_id(last.event_id.as_str())
            .header(SEQ_HEADER, last.seq.to_string().as_str())
            .header(NATS_BATCH_ID, batch.as_str())
            .header(NATS_BATCH_SEQUENCE, chunk.len().to_string().as_str())
            .header(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
        let acked = match self.log.js.send_publish(subject, message).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        let stream_seq = match acked {
            Ok(ack) => ack.sequence,
            Err(e)
                if e.kind() == PublishErrorKind::WrongLastSequence
                    || publish_error_code(&e)
                        == Some(ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE) =>
            {
                // Another writer got there first, or an earlier attempt of
                // this very batch landed (whole).
                let first = &chunk[0];
                if self
                    .earlier_attempt(expected_stream_seq, first, last.seq)
                    .await?
                    .is_some()
                {
                    self.tail = self
                        .log
                        .tail(run_id)
                        .await
                        .map_err(|e| in_doubt(run_id, first.seq, last.seq, &e))?;
                    self.in_doubt = false;
                    if self.last_seq() >= last.seq {
                        return Ok(true);
                    }
                }
                return Err(self.fenced().await);
            }
            Err(e) if refused_batch(&e) => {
                tracing::debug!(%run_id, error = %e, "the server refused an atomic batch; appending its envelopes one at a time");
                return Ok(false);
            }
            Err(e) => {
                self.in_doubt = true;
                return Err(StoreError::FlushFailed {
                    message: format!(
                        "NATS did not acknowledge run {run_id}'s batch of seqs {} to {}: {e}",
                        chunk[0].seq, last.seq
                    ),
                });
            }
        };
        self.tail = Some(RunTail {
            last_seq: last.seq,
            ended: last.terminal,
            stream_seq,
        });
        Ok(true)
    }

    /// After the server refused an append that starts with `first` (and
    /// ends at seq `last_seq`) as stale: whether the message after stream
    /// sequence `expected` is `first`'s, that is, an earlier attempt of it
    /// landed; its stream sequence if so. The writer is in doubt from here
    /// until the caller has learned the rest (a failed read leaves it so,
    /// answered as `FlushFailed`); not if another writer's message is
    /// there.
    async fn earlier_attempt(
        &mut self,
        expected: u64,
        first: &Encoded<'_>,
        last_seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.in_doubt = true;
        let after = self
            .message_after(expected)
            .await
            .map_err(|e| in_doubt(self.run_id, first.seq, last_seq, &e))?;
        match after {
            Some((sequence, id)) if id == first.event_id => Ok(Some(sequence)),
            _ => {
                self.in_doubt = false;
                Ok(None)
            }
        }
    }

    /// The error for a run another writer appended to: the tail read again
    /// (for the room's recovery), then `RunFenced`.
    async fn fenced(&mut self) -> StoreError {
        match self.log.tail(self.run_id).await {
            Ok(tail) => {
                self.tail = tail;
                StoreError::RunFenced {
                    run_id: self.run_id,
                    last_seq: self.last_seq(),
                }
            }
            Err(error) => error,
        }
    }

    /// The run's first message after stream sequence `after`: its stream
    /// sequence and message id.
    async fn message_after(&self, after: u64) -> Result<Option<(u64, String)>, StoreError> {
        match self
            .log
            .stream
            .direct_get_next_for_subject(self.log.subject(self.run_id), Some(after + 1))
            .await
        {
            Ok(message) => {
                let id = message
                    .headers
                    .get(NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                Ok(Some((message.sequence, id)))
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(read_failed(&e)),
        }
    }

    /// The message id stored for `seq` of this run, if any.
    async fn stored_id(&self, seq: u64) -> Result<Option<String>, StoreError> {
        let tail_stream_seq = self.tail.as_ref().map_or(0, |t| t.stream_seq);
        let at = self.log.locate(self.run_id, seq, tail_stream_seq).await?;
        Ok(self
            .message_after(at.saturating_sub(1))
            .await?
            .map(|(_, id)| id))
    }
}

/// The error for an append whose outcome a failed read left unknown: the
/// writer learns it before its next append.
fn in_doubt(run_id: RunId, first: u64, last: u64, error: &StoreError) -> StoreError {
    StoreError::FlushFailed {
        message: format!(
            "NATS: whether run {run_id}'s seqs {first} to {last} were stored is not known: {error}"
        ),
    }
}

/// What [`RunWriter::prepare`] found.
enum Next {
    /// This many of the envelopes are stored already (an append in doubt
    /// had landed).
    Stored(usize),
    /// Append them, expecting the run's last message at this stream
    /// sequence.
    Append(u64),
}

/// Messages in one atomic batch at most: the server's limit.
const BATCH_MESSAGES: usize = 1000;

/// Payload bytes in one atomic batch at most, so that one append holds the
/// server's memory (and a refused batch's retry) to a bound.
const BATCH_BYTES: usize = 4 << 20;

/// Atomic batches one host keeps open on the stream at once: the server
/// allows 50 per stream, so two hosts fit; beyond, a refused batch is
/// appended one message at a time.
const BATCHES_IN_FLIGHT: usize = 24;

/// How many of `envelopes` (at least one) go in the next batch.
fn batch_len(envelopes: &[Encoded<'_>]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for envelope in envelopes.iter().take(BATCH_MESSAGES) {
        bytes += envelope.bytes.len();
        if n > 0 && bytes > BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n.max(1)
}

/// The JetStream error code behind a publish error, if the server sent one.
fn publish_error_code(error: &async_nats::jetstream::context::PublishError) -> Option<ErrorCode> {
    std::error::Error::source(error)?
        .downcast_ref::<jetstream::Error>()
        .map(jetstream::Error::error_code)
}

/// Whether the server refused an atomic batch whole, for a reason that a
/// batch has and single messages do not: nothing of it was stored.
fn refused_batch(error: &async_nats::jetstream::context::PublishError) -> bool {
    publish_error_code(error).is_some_and(|code| {
        [
            ErrorCode::ATOMIC_PUBLISH_DISABLED,
            ErrorCode::ATOMIC_PUBLISH_MISSING_SEQ,
            ErrorCode::ATOMIC_PUBLISH_INCOMPLETE_BATCH,
            ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER,
            ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH,
            ErrorCode::ATOMIC_PUBLISH_TOO_MANY_INFLIGHT,
        ]
        .contains(&code)
    })
}

fn header_seq(run_id: RunId, message: &StreamMessage) -> Result<u64, StoreError> {
    seq_from(&message.headers).ok_or_else(|| StoreError::Corrupt {
        run_id,
        seq: 0,
        source: CodecError::Malformed(format!(
            "message at stream sequence {} has no readable {SEQ_HEADER} header",
            message.sequence
        )),
    })
}

fn seq_from(headers: &HeaderMap) -> Option<u64> {
    headers.get(SEQ_HEADER)?.as_str().parse().ok()
}

/// Decodes a run's message, checking it is an envelope of `run_id` (and of
/// `seq`, if given).
fn decode(
    run_id: RunId,
    seq: Option<u64>,
    message: &StreamMessage,
) -> Result<RuntimeEventEnvelope, StoreError> {
    let at = seq.or_else(|| seq_from(&message.headers)).unwrap_or(0);
    let envelope =
        codec::decode_envelope(&message.payload).map_err(|source| StoreError::Corrupt {
            run_id,
            seq: at,
            source,
        })?;
    if envelope.run_id != run_id {
        return Err(StoreError::Corrupt {
            run_id,
            seq: at,
            source: CodecError::Malformed(format!(
                "message at stream sequence {} holds run {}",
                message.sequence, envelope.run_id
            )),
        });
    }
    Ok(envelope)
}

pub(super) fn read_failed(error: &impl std::fmt::Display) -> StoreError {
    StoreError::ReadFailed {
        message: format!("NATS: {error}"),
    }
}
