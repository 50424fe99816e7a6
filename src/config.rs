//! How a store is opened: where, how durable, and the bounds it keeps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ids::ProviderId;

/// When an append is acknowledged.
///
/// ## Durability
///
/// - [`Durability::Flushed`] (the default): acknowledged after sled has
///   flushed the group commit that holds the event to disk. An acknowledged
///   event survives `kill -9` and power loss (to the extent the disk honours
///   `fsync`).
/// - [`Durability::Buffered`]: acknowledged once the event is written to
///   sled, before the flush that follows in the same group commit. Nobody
///   else sees it before that flush: readers of the store wait for it, and
///   subscribers get it only after it (so no subscriber ever receives an
///   event, or a seq, that a crash could take back). A crash in between can
///   lose an event its publisher heard `Ok` for, and its seq is then given
///   to the run's next event; what survives of a run is always a gapless
///   prefix of its seqs. What it saves the publisher is the wait for the
///   flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Flush to disk before acknowledging.
    #[default]
    Flushed,
    /// Acknowledge once written, before the flush; fan out after it.
    Buffered,
}

/// Configuration of a store (and, later, of the hub around it).
///
/// ```
/// use behest_stream::{Config, Durability};
///
/// let config = Config::new("./data")
///     .durability(Durability::Buffered)
///     .max_event_bytes(256 * 1024);
/// assert_eq!(config.path().unwrap().to_str(), Some("./data"));
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) path: Option<PathBuf>,
    pub(crate) durability: Durability,
    pub(crate) max_event_bytes: usize,
    pub(crate) max_in_flight_bytes: usize,
    pub(crate) max_concurrent_reads: usize,
    pub(crate) cache_capacity: u64,
    pub(crate) flush_every_ms: Option<u64>,
    pub(crate) segment_max_events: usize,
    pub(crate) segment_max_bytes: usize,
    pub(crate) ring_capacity: usize,
    pub(crate) live_capacity: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_in_flight_publishes: usize,
    pub(crate) catch_up_page: usize,
    pub(crate) max_rooms: usize,
    pub(crate) max_followed_runs_per_session: usize,
    pub(crate) max_restarts: usize,
    pub(crate) restart_window: Duration,
    pub(crate) retention: Option<Retention>,
    pub(crate) event_order: EventOrder,
    pub(crate) run_lease: Option<Duration>,
    pub(crate) lease_exempt: Vec<ProviderId>,
    #[cfg(feature = "nats")]
    pub(crate) nats: Option<NatsConfig>,
}

/// Whether the hub checks the order of each run's events at publish (see
/// [`Config::event_order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EventOrder {
    /// Refuse an event that breaks a rule of [`OrderRule`](crate::OrderRule),
    /// with [`HubError::OutOfOrder`](crate::HubError::OutOfOrder); nothing
    /// of it is stored. The default.
    #[default]
    Strict,
    /// Store events in whatever order they are published. Only the
    /// terminal rule holds (nothing follows a terminal event).
    Unchecked,
}

/// A retention policy: runs whose terminal event is older than `ttl` are
/// removed in the background (see [`Config::retain_ended_runs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// How long a run is kept after its terminal event.
    pub ttl: Duration,
    /// How often the sweeper looks for runs to remove.
    pub sweep_every: Duration,
    /// Most runs one sweep step removes while holding the commit gate;
    /// commits go on between steps.
    pub runs_per_step: usize,
}

/// Default largest encoded envelope: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

impl Config {
    /// A store kept in the directory `path` (created if missing).
    #[must_use]
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: Some(path.as_ref().to_path_buf()),
            ..Self::temporary()
        }
    }

    /// A store in a fresh temporary directory, removed when the store is
    /// dropped. For tests and benchmarks.
    #[must_use]
    pub fn temporary() -> Self {
        Self {
            path: None,
            durability: Durability::Flushed,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_concurrent_reads: 32,
            cache_capacity: 64 * 1024 * 1024,
            flush_every_ms: Some(500),
            segment_max_events: 256,
            segment_max_bytes: 256 * 1024,
            ring_capacity: 1024,
            live_capacity: 128,
            idle_timeout: Duration::from_secs(30),
            max_in_flight_publishes: 4096,
            catch_up_page: 256,
            max_rooms: 100_000,
            max_followed_runs_per_session: 1024,
            max_restarts: 5,
            restart_window: Duration::from_secs(10),
            retention: None,
            event_order: EventOrder::Strict,
            run_lease: None,
            lease_exempt: Vec::new(),
            #[cfg(feature = "nats")]
            nats: None,
        }
    }

    /// A store on NATS JetStream (feature `nats`) instead of sled: hubs on
    /// several hosts opened on the same stream share its runs (see
    /// [`crate::nats`]). The other settings apply as for sled, except those
    /// of sled itself (path, cache, flush interval, segments) and
    /// retention, which the NATS backend does not do yet (and the stream
    /// must have no limits of its own).
    #[cfg(feature = "nats")]
    #[must_use]
    pub fn nats(nats: NatsConfig) -> Self {
        Self {
            max_event_bytes: nats.max_event_bytes,
            nats: Some(nats),
            ..Self::temporary()
        }
    }

    /// The directory, or `None` for a temporary store.
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Default durability of appends that do not name one.
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Largest encoded envelope accepted (default 1 MiB). Larger events are
    /// refused before anything is stored. Clamped to the in-flight budget.
    #[must_use]
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes.max(1);
        self
    }

    /// Most encoded bytes of appends that may wait for the store at once
    /// (default 64 MiB). A publisher beyond it waits for earlier appends to be
    /// committed; this is what bounds the store actor's mailbox.
    #[must_use]
    pub fn max_in_flight_bytes(mut self, bytes: usize) -> Self {
        self.max_in_flight_bytes = bytes.max(1);
        self
    }

    /// Most reads (replay pages, recovery reads) running at once on the
    /// blocking pool (default 32). Further reads wait.
    #[must_use]
    pub fn max_concurrent_reads(mut self, reads: usize) -> Self {
        self.max_concurrent_reads = reads.max(1);
        self
    }

    /// sled's page cache size in bytes (default 64 MiB).
    #[must_use]
    pub fn cache_capacity(mut self, bytes: u64) -> Self {
        self.cache_capacity = bytes;
        self
    }

    /// How often sled also flushes in the background (default 500 ms; `None`
    /// turns it off). Every group commit is flushed anyway; this bounds what
    /// a crash can lose of writes outside them (the store's metadata).
    #[must_use]
    pub fn flush_every_ms(mut self, every: Option<u64>) -> Self {
        self.flush_every_ms = every;
        self
    }

    /// Largest segment (the value holding consecutive events of one run,
    /// written when the commit log is compacted), by events and by bytes
    /// (defaults 256 and 256 KiB).
    #[must_use]
    pub fn segment_limits(mut self, max_events: usize, max_bytes: usize) -> Self {
        self.segment_max_events = max_events.max(1);
        self.segment_max_bytes = max_bytes.max(1);
        self
    }

    /// How many recent envelopes each room keeps for subscribers that fall
    /// behind (default 1024). A subscriber further behind than this catches
    /// up from the store instead.
    #[must_use]
    pub fn ring_capacity(mut self, envelopes: usize) -> Self {
        self.ring_capacity = envelopes.max(1);
        self
    }

    /// How many deliveries each subscriber's live queue holds (default 128):
    /// a delivery is what a room fans out at once (for a run room, the
    /// events one append acknowledged), at most
    /// `ring_capacity / live_capacity` envelopes (8 by default), so the queue
    /// holds at least `live_capacity` and at most about `ring_capacity`
    /// envelopes. A subscriber that falls further behind catches up from the
    /// ring or the store (run and session rooms) or gets
    /// [`RuntimeStreamError::Lagged`](crate::RuntimeStreamError::Lagged)
    /// (live subscriptions). The queue holds only what some subscriber has
    /// not read yet, so a room pays for it (about 40 bytes a delivery) only
    /// while a subscriber lags.
    #[must_use]
    pub fn live_capacity(mut self, deliveries: usize) -> Self {
        self.live_capacity = deliveries.max(1);
        self
    }

    /// How long a room with no subscribers and nothing in flight lives before
    /// it is stopped (default 30 s). A stopped room costs nothing and is
    /// started again, from the store, on its next use.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Most publishes accepted but not yet acknowledged, across the hub
    /// (default 4096). A publisher beyond it waits in `EventHub::submit`.
    #[must_use]
    pub fn max_in_flight_publishes(mut self, publishes: usize) -> Self {
        self.max_in_flight_publishes = publishes.clamp(1, u32::MAX as usize);
        self
    }

    /// Most rooms running at once (default 100,000). A publish or subscribe
    /// that needs another room beyond it fails with `HubError::TooManyRooms`
    /// until idle rooms are stopped. Each room holds at most `ring_capacity`
    /// envelopes, so this with the ring bounds the hub's memory.
    #[must_use]
    pub fn max_rooms(mut self, rooms: usize) -> Self {
        self.max_rooms = rooms.max(1);
        self
    }

    /// On a shared log (NATS): the most live runs of one session that a
    /// session room on this host follows at once (default 1,024). Each
    /// costs a queue on the host's live subscription and a task. A run
    /// that joins the session past the bound is logged (a warning naming
    /// this setting) and counted in `HubStats::session_runs_unfollowed`;
    /// its envelopes reach this host's session subscribers only when they
    /// next catch up from the log (on resuming, or after lagging), not
    /// live.
    #[must_use]
    pub fn max_followed_runs_per_session(mut self, runs: usize) -> Self {
        self.max_followed_runs_per_session = runs.max(1);
        self
    }

    /// Restart intensity: a room that fails more than `max_restarts` times
    /// within `window` is not started again until its failures age out of
    /// the window; meanwhile its callers get `HubError::RoomFailed` naming
    /// it. Other rooms are untouched. (Default: 5 within 10 s.)
    #[must_use]
    pub fn restart_intensity(mut self, max_restarts: usize, window: Duration) -> Self {
        self.max_restarts = max_restarts;
        self.restart_window = window;
        self
    }

    /// Envelopes read from the store per page when a subscriber catches up
    /// (default 256).
    #[must_use]
    pub fn catch_up_page(mut self, envelopes: usize) -> Self {
        self.catch_up_page = envelopes.max(1);
        self
    }

    /// Removes runs whose terminal event is older than `ttl`, in the
    /// background: a sweeper wakes every `ttl / 10` (at least every 100 ms,
    /// at most every 10 minutes; see [`Config::retention_sweep_every`]) and
    /// deletes such runs' events and index entries a step at a time (at most
    /// 256 runs or about 64k sled keys). A step finds what to delete before
    /// it takes the commit gate, and holds the gate only to apply and flush
    /// one batch, so commits wait at most for that. Runs that have not ended
    /// are never removed. The age is measured against each terminal event's
    /// `emitted_at` (the hub's clock when it published it), at millisecond
    /// granularity.
    ///
    /// A removed run leaves a tombstone of a few dozen bytes: its id stays
    /// ended (nothing can be stored under it again), and subscribing to it,
    /// replaying it, or resuming a session into events of it the cursor has
    /// not seen fails with `RunRemoved` instead of serving a shortened
    /// history. Off by default: nothing is ever removed.
    #[must_use]
    pub fn retain_ended_runs(mut self, ttl: Duration) -> Self {
        let sweep_every = (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(600));
        self.retention = Some(Retention {
            ttl,
            sweep_every,
            runs_per_step: 256,
        });
        self
    }

    /// How often the retention sweeper runs. Call it after
    /// [`Config::retain_ended_runs`] (which sets the default); without a
    /// policy it does nothing. At least 1 ms.
    #[must_use]
    pub fn retention_sweep_every(mut self, every: Duration) -> Self {
        if let Some(retention) = &mut self.retention {
            retention.sweep_every = every.max(Duration::from_millis(1));
        }
        self
    }

    /// Whether each run's events are checked for order at publish (default
    /// [`EventOrder::Strict`]): a run starts with `RunStarted`; a tool
    /// call's deltas and completion follow its `ToolCallStarted`; a tool
    /// execution refers to a call the run started; nothing follows a
    /// terminal event. An event that breaks a rule is refused with
    /// [`HubError::OutOfOrder`](crate::HubError::OutOfOrder) naming it, and
    /// nothing of it is stored. A run's tool-call ids are remembered by its
    /// room while it runs (at most
    /// [`MAX_TOOL_CALLS_PER_RUN`](crate::MAX_TOOL_CALLS_PER_RUN)); a room
    /// started for a run that has events reads the run's history once, at
    /// its first tool event.
    #[must_use]
    pub fn event_order(mut self, order: EventOrder) -> Self {
        self.event_order = order;
        self
    }

    /// Gives every open run a lease of `lease` (default: none, runs stay
    /// open until their producer ends them). Each publish renews its run's
    /// lease, and so does [`EventHub::renew_lease`](crate::EventHub::renew_lease)
    /// (for a producer that is alive and quiet: a long tool call, a wait for
    /// a person). A run whose lease lapses is ended by the hub with
    /// `RunFailed` ("abandoned: no event and no lease renewal since …"),
    /// sequenced, stored and fanned out like any event, so that its
    /// subscribers see it end; a late publish from its old producer gets
    /// `RunClosed`.
    ///
    /// Which runs a hub watches: those published through it; on sled, every
    /// run found open when the store is opened (its lease counts from the
    /// open); on NATS, every open run a subscriber of this hub follows (its
    /// lease counts from the attach, and from each event another host
    /// appends). A run's room ends it only if the run is still at the seq
    /// the lease last saw: a run that moved on (another host writes it)
    /// gets a new lease instead. On NATS the ending append is fenced like
    /// any other, so of several hosts watching one run exactly one ends it.
    /// A lapse is noticed within about a quarter of `lease` after it. At
    /// least 10 ms, at most ten years.
    #[must_use]
    pub fn run_lease(mut self, lease: Option<Duration>) -> Self {
        self.run_lease = lease.map(|l| l.max(Duration::from_millis(10)));
        self
    }

    /// Runs whose provider is `provider` (named by their `RunStarted`) have
    /// no lease: they stay open however long they are quiet (the Durable
    /// Streams server exempts its streams' runs so). May be called more
    /// than once.
    #[must_use]
    pub fn exempt_from_lease(mut self, provider: ProviderId) -> Self {
        self.lease_exempt.push(provider);
        self
    }

    /// The retention policy, if one is set.
    #[must_use]
    pub fn retention(&self) -> Option<Retention> {
        self.retention
    }

    /// The event limit actually enforced: never above the in-flight budget, so
    /// that one event can always be admitted.
    pub(crate) fn effective_max_event_bytes(&self) -> usize {
        self.max_event_bytes.min(self.max_in_flight_bytes)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new("./data")
    }
}

/// Where and how the run log lives in NATS (feature `nats`): what
/// [`Config::nats`] opens a store on, and [`crate::nats::NatsLog::open`] opens.
#[cfg(feature = "nats")]
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// The server, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// The JetStream stream holding every run.
    pub stream: String,
    /// Subjects are `{prefix}.run.{run_id}`.
    pub prefix: String,
    /// How long the server remembers message ids: a retry later than this
    /// after a lost acknowledgement is refused as a conflict, not stored
    /// twice (the expected-sequence check still holds).
    pub duplicate_window: Duration,
    /// Stream replicas (1 for a single server; 3 for a cluster that keeps
    /// acknowledged events when a server is lost).
    pub replicas: usize,
    /// The largest encoded envelope accepted (also capped by the server's
    /// `max_payload`).
    pub max_event_bytes: usize,
    /// How long to wait for the server's answer to one request.
    pub request_timeout: Duration,
    /// Whether a run's envelopes gathered into one append go to the server
    /// as one atomic batch (ADR-50) where it takes them: nats-server 2.12
    /// and later, on a stream that allows them (the log allows them when it
    /// opens the stream). `false`, or an older server: one message, and one
    /// round trip, per envelope.
    pub atomic_batches: bool,
}

#[cfg(feature = "nats")]
impl NatsConfig {
    /// The defaults for a server at `url`: stream `BEHEST`, prefix
    /// `behest`, a two-minute duplicate window, one replica.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream: "BEHEST".into(),
            prefix: "behest".into(),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            request_timeout: Duration::from_secs(5),
            atomic_batches: true,
        }
    }
}
