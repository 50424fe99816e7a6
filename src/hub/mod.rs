//! The event hub: rooms that order, store and fan out the events of agent
//! runs.
//!
//! ```text
//!  publish ──▶ Router ──▶ Room(run r) ──append──▶ Store actor ──▶ sled
//!                            │ ◀──acknowledged──┘
//!                            ├─▶ live subscribers of run:r
//!                            └─▶ Room(session s), Room(provider p) ─▶ their subscribers
//! ```
//!
//! ## Ordering
//!
//! A run room is the only writer of its run's order: it assigns seqs 1, 2, 3,
//! … with no gap and no reuse, also across restarts (it recovers the last seq
//! from the store before it takes a message). Publishes submitted in order
//! ([`EventHub::submit`] awaited one after another) get seqs in that order,
//! even while many are in flight. A subscription to a run room yields the
//! run's envelopes in seq order, each exactly once, and ends after the
//! terminal event:
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use behest_stream::{AgentEvent, Config, EventHub, ProviderId, Resume, RunCompleted, RunId, RunStarted, RuntimeRoom, TextDelta};
//! use futures_util::StreamExt;
//!
//! let hub = EventHub::open(Config::temporary()).await?;
//! let run_id = RunId::new();
//! let now = chrono::Utc::now;
//! let mut stream = hub.subscribe(RuntimeRoom::Run(run_id), Resume::FromStart).await?;
//! hub.publish(AgentEvent::RunStarted(RunStarted {
//!     run_id, timestamp: now(), session_id: None, provider: ProviderId::new("acme"), model: "m".into(),
//! })).await?;
//! for delta in ["a", "b"] {
//!     hub.publish(AgentEvent::TextDelta(TextDelta { run_id, timestamp: now(), delta: delta.into() })).await?;
//! }
//! hub.publish(AgentEvent::RunCompleted(RunCompleted {
//!     run_id, timestamp: now(), finish_reason: "stop".into(), iterations: 1,
//! })).await?;
//! let seqs: Vec<u64> = stream.map(|e| e.unwrap().seq).collect().await;
//! assert_eq!(seqs, vec![1, 2, 3, 4]); // and the stream ended after the terminal event
//! hub.shutdown().await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Lagging subscribers
//!
//! A room never waits for a subscriber. Each subscriber's live queue holds
//! [`Config::live_capacity`] deliveries (batches of what the room fanned out
//! at once), and each room keeps a ring of its last [`Config::ring_capacity`]
//! envelopes; a run or session subscriber that overflows its queue is not
//! dropped: its stream catches up from the ring, or from the store when the
//! ring has moved on, and rejoins the live feed, with no gap and no
//! duplicate. A provider room is live-only: a subscriber that overflows its
//! queue gets [`RuntimeStreamError::Lagged`] with the count of envelopes it
//! skipped, and reads on:
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use behest_stream::{AgentEvent, Config, EventHub, ProviderId, Resume, RunId, RunStarted, RuntimeRoom, RuntimeStreamError, TextDelta};
//! use futures_util::StreamExt;
//!
//! let hub = EventHub::open(Config::temporary().live_capacity(2)).await?;
//! let (run_id, now) = (RunId::new(), chrono::Utc::now);
//! let provider = ProviderId::new("acme");
//! let mut stream = hub.subscribe(RuntimeRoom::Provider(provider.clone()), Resume::Live).await?;
//! hub.publish(AgentEvent::RunStarted(RunStarted {
//!     run_id, timestamp: now(), session_id: None, provider, model: "m".into(),
//! })).await?;
//! for _ in 0..4 {
//!     hub.publish(AgentEvent::TextDelta(TextDelta { run_id, timestamp: now(), delta: "x".into() })).await?;
//! }
//! // Fanout to the provider room is asynchronous: wait until it has all five.
//! let room = RuntimeRoom::Provider(ProviderId::new("acme"));
//! tokio::time::timeout(std::time::Duration::from_secs(30), async {
//!     while !hub.stats().await.unwrap().rooms.iter().any(|r| r.room == room && r.fanned_out == 5) {
//!         tokio::task::yield_now().await;
//!     }
//! })
//! .await?;
//! assert!(matches!(stream.next().await, Some(Err(RuntimeStreamError::Lagged { skipped: 3 }))));
//! assert_eq!(stream.next().await.unwrap()?.seq, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Crash recovery
//!
//! The router supervises every room. A room that fails (a panic, or a store
//! answer it cannot reconcile) is restarted on its next use and recovers its
//! run from the store (last seq, session, provider, whether it ended) before
//! it takes a message; the store serves that recovery read only after every
//! append handed to it before. A publish the dead room never took fails with
//! [`HubError::RoomUnavailable`]: nothing was stored, retry. A publish it did
//! take is answered with the store's own outcome even after the room died,
//! so `Ok` means stored and a retry never stores an event twice. A room that
//! dies having handed the store events it has not fanned out is started
//! again at once and fans them out from the store before anything else, so
//! the live subscribers of the run's session and provider get every event
//! whose publisher heard `Ok`.
//! Subscriptions re-attach by themselves and continue with no gap and no
//! duplicate. A room that fails more than [`Config::restart_intensity`]
//! allows is not restarted until its failures age out; its callers get
//! [`HubError::RoomFailed`] naming it. The store actor has a supervisor of
//! its own that restarts it on the same database; appends it had not written
//! are answered [`StoreError::Interrupted`](crate::StoreError::Interrupted)
//! (nothing stored, retry).
//!
//! ## Durability
//!
//! A publish is acknowledged once the store has it as its [`Durability`]
//! asks: flushed under [`Durability::Flushed`] (the default), written under
//! [`Durability::Buffered`]. It is fanned out, and readable from the store,
//! only once it is flushed (every group commit is), whatever the
//! durability: no subscriber ever sees an event that has no replay source,
//! or one a crash could take back. Under `Flushed` an acknowledged event
//! survives a crash; under `Buffered` a crash can lose one its publisher
//! heard `Ok` for, never one a subscriber received.
//!
//! ## Shutdown
//!
//! [`EventHub::shutdown`] stops taking publishes, waits for those in flight to
//! be acknowledged, stops every room, and closes the store (flushing it).
//! Open subscriptions then end with [`RuntimeStreamError::Closed`].

mod adapter;
mod cursor;
mod fanout_room;
mod feed;
mod follow;
mod lease;
mod live;
mod order;
mod progress;
mod registry;
mod router;
mod run_room;
mod session_log;
mod tail;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ractor::Actor;
use tokio::sync::{Mutex, Semaphore, oneshot};
use uuid::Uuid;

pub use self::cursor::{Cursor, CursorParseError, Resume};
use self::follow::Link;
pub use self::order::{MAX_TOOL_CALLS_PER_RUN, OrderRule};
use self::router::{Router, RouterArgs, RouterMsg};
use self::run_room::{PublishAnswer, PublishRequest};
use crate::config::{Config, Durability};
use crate::error::{HubError, OpenError};
use crate::event::AgentEvent;
use crate::ids::RunId;
use crate::metrics;
use crate::store::{Store, StoreStats};
use crate::stream::{BoxRuntimeEventStream, RuntimeEventEnvelope, RuntimeRoom, RuntimeStreamError};

/// A subscription of [`EventHub::subscribe_shared`]: as
/// [`BoxRuntimeEventStream`], yielding the envelopes the room and every
/// subscriber share instead of copies.
pub type SharedEventStream = Pin<
    Box<
        dyn futures_util::Stream<Item = Result<Arc<RuntimeEventEnvelope>, RuntimeStreamError>>
            + Send
            + 'static,
    >,
>;

/// One item of a room's live feed: what the room fanned out at once (a run
/// room fans out every event an append acknowledged in one go), so that
/// subscribers pay one channel receive per batch, not per envelope.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// The feed's index of the first envelope: how many envelopes the feed
    /// sent before it. A live-only subscriber counts what it skipped by it.
    pub(crate) first: u64,
    pub(crate) envelopes: Arc<[Arc<RuntimeEventEnvelope>]>,
    /// False for envelopes published through `RuntimeStreamAdapter`, which
    /// are not sequenced by the hub; ordered subscriptions ignore them.
    pub(crate) persisted: bool,
}

/// A subscriber's end of a room's live feed.
#[derive(Debug)]
pub(crate) struct LiveFeed {
    pub(crate) receiver: live::LiveReceiver,
    /// The feed index of the next envelope the room will send.
    pub(crate) next: u64,
}

/// Settings and counters every actor of one hub shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) ring_capacity: usize,
    pub(crate) live_capacity: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) catch_up_page: usize,
    pub(crate) max_rooms: usize,
    pub(crate) max_followed_runs_per_session: usize,
    pub(crate) max_restarts: usize,
    pub(crate) restart_window: Duration,
    pub(crate) event_order: crate::config::EventOrder,
    /// Run leases, if `Config::run_lease` set one.
    pub(crate) leases: Option<Arc<lease::Leases>>,
    pub(crate) counters: Counters,
    /// The running session and provider rooms, which run rooms fan out to
    /// directly (the router writes it).
    pub(crate) fanout_rooms: registry::FanoutRooms,
    /// The running run rooms, which publishers send to directly (the
    /// router writes it).
    pub(crate) run_rooms: registry::RunRooms,
    /// Test hook: rooms told to panic at their n-th publish from now.
    #[cfg(feature = "fault-injection")]
    pub(crate) panics: std::sync::Mutex<std::collections::HashMap<RuntimeRoom, u64>>,
    /// Test hook: every run room panics at a publish with this probability,
    /// in parts per million, drawn from a seeded generator.
    #[cfg(feature = "fault-injection")]
    pub(crate) random_panics: std::sync::Mutex<(u32, u64)>,
}

impl Shared {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            ring_capacity: config.ring_capacity,
            live_capacity: config.live_capacity,
            idle_timeout: config.idle_timeout,
            catch_up_page: config.catch_up_page,
            max_rooms: config.max_rooms,
            max_followed_runs_per_session: config.max_followed_runs_per_session,
            max_restarts: config.max_restarts,
            restart_window: config.restart_window,
            event_order: config.event_order,
            leases: config
                .run_lease
                .map(|l| Arc::new(lease::Leases::new(l, config.lease_exempt.clone()))),
            counters: Counters::default(),
            fanout_rooms: registry::FanoutRooms::default(),
            run_rooms: registry::RunRooms::default(),
            #[cfg(feature = "fault-injection")]
            panics: std::sync::Mutex::default(),
            #[cfg(feature = "fault-injection")]
            random_panics: std::sync::Mutex::new((0, 1)),
        }
    }
}

#[cfg(feature = "fault-injection")]
impl Shared {
    /// Counts a publish for `room`; true when the room must panic now.
    pub(crate) fn should_panic(&self, room: &RuntimeRoom) -> bool {
        {
            let mut random = self.random_panics.lock().unwrap_or_else(|p| p.into_inner());
            let (per_million, state) = &mut *random;
            if *per_million > 0 {
                // xorshift64: cheap, seeded, good enough to spread faults.
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                if *state % 1_000_000 < u64::from(*per_million) {
                    return true;
                }
            }
        }
        let mut panics = self.panics.lock().unwrap_or_else(|p| p.into_inner());
        match panics.get_mut(room) {
            Some(1) => {
                panics.remove(room);
                true
            }
            Some(left) => {
                *left -= 1;
                false
            }
            None => false,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    ring_catch_ups: AtomicU64,
    store_catch_ups: AtomicU64,
    rooms_started: AtomicU64,
    rooms_evicted: AtomicU64,
    rooms_failed: AtomicU64,
    session_runs_unfollowed: AtomicU64,
}

impl Counters {
    pub(crate) fn record_ring_catch_up(&self) {
        self.ring_catch_ups.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::CATCH_UPS, "from" => "ring").increment(1);
    }
    pub(crate) fn record_store_catch_up(&self) {
        self.store_catch_ups.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::CATCH_UPS, "from" => "store").increment(1);
    }
    pub(crate) fn record_start(&self) {
        self.rooms_started.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::ROOMS_STARTED).increment(1);
    }
    pub(crate) fn record_eviction(&self) {
        self.rooms_evicted.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::ROOMS_EVICTED).increment(1);
    }
    pub(crate) fn record_failure(&self) {
        self.rooms_failed.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::ROOM_FAILURES).increment(1);
    }
    pub(crate) fn record_unfollowed_run(&self) {
        self.session_runs_unfollowed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of one live room.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomStats {
    /// The room.
    pub room: RuntimeRoom,
    /// Live subscribers attached right now.
    pub subscribers: usize,
    /// Envelopes in the room's ring (at most `ring_capacity`).
    pub ring_len: usize,
    /// The ring's capacity (`Config::ring_capacity`).
    pub ring_capacity: usize,
    /// Publishes handed to the store and not yet acknowledged (run rooms).
    pub in_flight: usize,
    /// The last seq fanned out (run rooms).
    pub last_seq: Option<u64>,
    /// Envelopes fanned out since the room started.
    pub fanned_out: u64,
}

/// A snapshot of a hub: its rooms, queues and counters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubStats {
    /// Every room running right now.
    pub rooms: Vec<RoomStats>,
    /// Publishes accepted and not yet answered, hub-wide.
    pub publishes_in_flight: usize,
    /// The bound on `publishes_in_flight` (`Config::max_in_flight_publishes`).
    pub max_in_flight_publishes: usize,
    /// Times a subscriber caught up from a room's ring.
    pub catch_ups_from_ring: u64,
    /// Times a subscriber caught up from the store.
    pub catch_ups_from_store: u64,
    /// Rooms started since the hub opened.
    pub rooms_started: u64,
    /// Rooms stopped for being idle.
    pub rooms_evicted: u64,
    /// Rooms that failed.
    pub rooms_failed: u64,
    /// Times a session room left a run of its session unfollowed,
    /// past `Config::max_followed_runs_per_session` (shared log only; a
    /// run is counted again if the room starts following again).
    pub session_runs_unfollowed: u64,
    /// Open runs whose lease this hub watches (0 with leases off): those
    /// published through it, found open at open (sled), or followed by its
    /// subscribers (NATS). Each leaves when this hub sees its terminal
    /// event (a run another host ended: when its lease next lapses here).
    pub runs_leased: usize,
    /// The store's counters.
    pub store: StoreStats,
}

/// The embedding API: publish events, subscribe to rooms, replay runs.
///
/// Cheap to clone; every clone is the same hub.
#[derive(Debug, Clone)]
pub struct EventHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    link: Link,
    durability: Durability,
    publish_permits: Arc<Semaphore>,
    max_in_flight: u32,
    router_join: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The lease sweeper and the scan of open runs, if leases are on;
    /// stopped with the hub.
    lease_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for HubInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub")
            .field("epoch", &self.link.store.epoch())
            .field("path", &self.link.store.path())
            .finish_non_exhaustive()
    }
}

impl Drop for HubInner {
    fn drop(&mut self) {
        // The last handle is gone without a shutdown: stop the rooms.
        for task in &self.lease_tasks {
            task.abort();
        }
        self.link.router.stop(None);
    }
}

/// A publish that has its place in its run's order and is on its way to the
/// store. Await it for the envelope, once stored (its fan-out is already
/// on its way to the room: anything the publisher does through the room
/// afterwards, such as subscribing, sees it fanned out).
///
/// Dropping it does not withdraw the event.
#[derive(Debug)]
#[must_use = "the envelope, or the error, arrives through this future"]
pub struct PendingPublish {
    reply: oneshot::Receiver<PublishAnswer>,
    run_id: RunId,
}

impl PendingPublish {
    /// Waits for the envelope as [`PendingPublish`] does, but shares it
    /// (with the room's ring and its subscribers) instead of copying it: for
    /// a publisher that only reads the envelope, say its `seq`, this saves a
    /// copy of every event, which for a large JSON payload costs more than
    /// storing it.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use behest_stream::{AgentEvent, Config, EventHub, ProviderId, RunId, RunStarted};
    ///
    /// let hub = EventHub::open(Config::temporary()).await?;
    /// let run_id = RunId::new();
    /// let event = AgentEvent::RunStarted(RunStarted {
    ///     run_id, timestamp: chrono::Utc::now(), session_id: None, provider: ProviderId::new("acme"), model: "m".into(),
    /// });
    /// let envelope = hub.submit(event).await?.shared().await?;
    /// assert_eq!((envelope.run_id, envelope.seq), (run_id, 1));
    /// # hub.shutdown().await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As awaiting the [`PendingPublish`].
    pub async fn shared(self) -> Result<Arc<RuntimeEventEnvelope>, HubError> {
        let run_id = self.run_id;
        self.reply
            .await
            .unwrap_or_else(|_| Err(stopped_before_taking(run_id)))
    }
}

/// The answer to a publish whose room stopped before it took the event.
fn stopped_before_taking(run_id: RunId) -> HubError {
    HubError::RoomUnavailable {
        room: RuntimeRoom::Run(run_id).to_string(),
        reason: "the room stopped before it took the event; nothing was stored".into(),
    }
}

impl Future for PendingPublish {
    type Output = Result<RuntimeEventEnvelope, HubError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let run_id = self.run_id;
        std::pin::Pin::new(&mut self.reply).poll(cx).map(|answer| {
            answer
                .unwrap_or_else(|_| Err(stopped_before_taking(run_id)))
                // The copy is made here, on the publisher's task, not by
                // the room.
                .map(Arc::unwrap_or_clone)
        })
    }
}

impl EventHub {
    /// Opens the store described by `config` and starts the router.
    ///
    /// # Errors
    ///
    /// As [`Store::open`].
    ///
    /// # Panics
    ///
    /// Never. Must be called inside a tokio runtime.
    pub async fn open(config: Config) -> Result<Self, OpenError> {
        let store = Store::open(config.clone()).await?;
        let shared = Arc::new(Shared::new(&config));
        let args = RouterArgs {
            store: store.clone(),
            shared: Arc::clone(&shared),
        };
        let (router, join) =
            Actor::spawn(None, Router, args)
                .await
                .map_err(|e| OpenError::Storage {
                    path: config.path.clone().unwrap_or_default(),
                    message: format!("router failed to start: {e}"),
                })?;
        let max_in_flight = u32::try_from(config.max_in_flight_publishes).unwrap_or(u32::MAX);
        let link = Link {
            router,
            store,
            shared,
        };
        let publish_permits = Arc::new(Semaphore::new(max_in_flight as usize));
        let mut lease_tasks = Vec::new();
        if let Some(leases) = &link.shared.leases {
            if !link.store.is_shared_log() {
                lease_tasks.push(lease::spawn_open_run_scan(link.clone(), Arc::clone(leases)));
            }
            lease_tasks.push(lease::spawn_sweeper(
                link.clone(),
                Arc::clone(leases),
                Arc::clone(&publish_permits),
            ));
        }
        Ok(Self {
            inner: Arc::new(HubInner {
                link,
                durability: config.durability,
                publish_permits,
                max_in_flight,
                router_join: Mutex::new(Some(join)),
                lease_tasks,
            }),
        })
    }

    /// The store's epoch; cursors carry it (see [`Cursor::new`]).
    #[must_use]
    pub fn epoch(&self) -> Uuid {
        self.inner.link.store.epoch()
    }

    /// The store underneath, for the reads it offers (run info, session
    /// runs). Appending to it directly bypasses the rooms.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.inner.link.store
    }

    /// Sequences, stores and fans out `event` with the configured durability,
    /// returning its envelope once stored; the room fans it out next, before
    /// anything the publisher asks of the room afterwards.
    ///
    /// # Errors
    ///
    /// [`HubError::RunClosed`] after the run's terminal event,
    /// [`HubError::TooLarge`] for an oversized event (nothing stored in
    /// either case), [`HubError::Store`] if the store failed,
    /// [`HubError::RoomUnavailable`] if the room stopped before answering
    /// (retryable), [`HubError::Closed`] after shutdown.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: once submitted, the event is stored even if the
    /// future is dropped.
    pub async fn publish(&self, event: AgentEvent) -> Result<RuntimeEventEnvelope, HubError> {
        self.submit(event).await?.await
    }

    /// As [`EventHub::publish`], with the given durability.
    ///
    /// # Errors
    ///
    /// As [`EventHub::publish`].
    pub async fn publish_with(
        &self,
        event: AgentEvent,
        durability: Durability,
    ) -> Result<RuntimeEventEnvelope, HubError> {
        self.submit_with(event, durability).await?.await
    }

    /// Hands `event` to its run room and returns as soon as its place in the
    /// run's order is fixed, without waiting for the store: await the
    /// returned [`PendingPublish`] for the envelope. Awaiting `submit` calls
    /// one after another keeps many events in flight (pipelining) while
    /// their seqs follow the order of the calls.
    ///
    /// Waits only while [`Config::max_in_flight_publishes`] publishes are
    /// already in flight, hub-wide: a publisher that outruns the store waits
    /// here, so memory stays bounded.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use behest_stream::{AgentEvent, Config, EventHub, ProviderId, RunId, RunStarted, TextDelta};
    ///
    /// let hub = EventHub::open(Config::temporary()).await?;
    /// let run_id = RunId::new();
    /// let now = chrono::Utc::now;
    /// let mut pending = vec![hub.submit(AgentEvent::RunStarted(RunStarted {
    ///     run_id, timestamp: now(), session_id: None, provider: ProviderId::new("acme"), model: "m".into(),
    /// })).await?];
    /// for i in 1..100 {
    ///     let event = AgentEvent::TextDelta(TextDelta { run_id, timestamp: now(), delta: i.to_string() });
    ///     pending.push(hub.submit(event).await?);
    /// }
    /// for (i, publish) in pending.into_iter().enumerate() {
    ///     let envelope = publish.await?;
    ///     assert_eq!(envelope.seq, i as u64 + 1);
    /// }
    /// # hub.shutdown().await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// [`HubError::Closed`] after shutdown; the rest arrive through the
    /// [`PendingPublish`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe while waiting for capacity (nothing was handed over yet).
    pub async fn submit(&self, event: AgentEvent) -> Result<PendingPublish, HubError> {
        self.submit_with(event, self.inner.durability).await
    }

    /// As [`EventHub::submit`], with the given durability.
    ///
    /// # Errors
    ///
    /// As [`EventHub::submit`].
    pub async fn submit_with(
        &self,
        event: AgentEvent,
        durability: Durability,
    ) -> Result<PendingPublish, HubError> {
        let permit = Arc::clone(&self.inner.publish_permits)
            .acquire_owned()
            .await
            .map_err(|_| HubError::Closed)?;
        let (tx, rx) = oneshot::channel();
        let run_id = event.run_id();
        let link = &self.inner.link;
        link.shared.run_rooms.publish(
            &link.router,
            PublishRequest {
                event,
                durability,
                permit,
                reply: tx,
                lapsed: None,
            },
        )?;
        Ok(PendingPublish { reply: rx, run_id })
    }

    /// Renews `run_id`'s lease (see [`Config::run_lease`]) without
    /// publishing: for a producer that is alive and quiet (a long tool call,
    /// a wait for a person). Call it more often than the lease. Does
    /// nothing when leases are off, or for a run whose provider is exempt
    /// or that has no events yet or has ended (its room finds so when the
    /// lease would lapse).
    ///
    /// On NATS the renewal is this host's: another host that watches the
    /// run (one whose subscribers follow it) counts its lease from the last
    /// event it saw, so a producer quiet for longer than the lease there
    /// should publish an event (a `Custom` heartbeat, say) rather than only
    /// renew.
    pub fn renew_lease(&self, run_id: RunId) {
        if let Some(leases) = &self.inner.link.shared.leases {
            leases.renew(run_id, std::time::Instant::now(), None);
        }
    }

    /// Subscribes to `room` from `resume`.
    ///
    /// - Run room: the run's envelopes, gapless and duplicate-free in seq
    ///   order, ending after the terminal event (at once, for
    ///   [`Resume::Live`] on a run that has ended).
    /// - Session room: every run of the session, each in seq order, never
    ///   ending; keep a [`Cursor`] advanced with each envelope to resume.
    /// - Provider room: [`Resume::Live`] only; lag surfaces as
    ///   [`RuntimeStreamError::Lagged`].
    ///
    /// # Errors
    ///
    /// [`HubError::CursorEpoch`] for a cursor of another store,
    /// [`HubError::CursorAhead`] for a cursor past what the store holds of
    /// the room's runs,
    /// [`HubError::RunRemoved`] for a run room whose run retention removed,
    /// or a session cursor that names such a run of the session without
    /// having seen all of it (a session's runs the cursor never saw and
    /// retention removed are simply not in its history any more). A session
    /// cursor's positions of runs outside the session are ignored: they
    /// fail nothing and cost no store read. A session subscribe reads the
    /// session's runs in one store read, then only the runs the cursor has
    /// not seen to their end,
    /// [`HubError::LiveOnly`] for a provider room resumed from history,
    /// [`HubError::Closed`] after shutdown. Errors after the stream started
    /// arrive as its items.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn subscribe(
        &self,
        room: RuntimeRoom,
        resume: Resume,
    ) -> Result<BoxRuntimeEventStream, HubError> {
        self.follow(room, resume).await
    }

    /// As [`EventHub::subscribe`], yielding each envelope as the
    /// `Arc<RuntimeEventEnvelope>` that the room, its ring and every other
    /// subscriber share, instead of a copy of it. For a subscriber that only
    /// reads envelopes (an HTTP writer encoding them, say), this saves a
    /// copy of every event per subscriber, which for a large JSON payload
    /// costs more than storing it.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use behest_stream::{AgentEvent, Config, EventHub, ProviderId, Resume, RunId, RunStarted, RuntimeRoom};
    /// use futures_util::StreamExt;
    ///
    /// let hub = EventHub::open(Config::temporary()).await?;
    /// let run_id = RunId::new();
    /// let mut stream = hub.subscribe_shared(RuntimeRoom::Run(run_id), Resume::FromStart).await?;
    /// let event = AgentEvent::RunStarted(RunStarted {
    ///     run_id, timestamp: chrono::Utc::now(), session_id: None, provider: ProviderId::new("acme"), model: "m".into(),
    /// });
    /// let published = hub.submit(event).await?.shared().await?;
    /// let received = stream.next().await.unwrap()?;
    /// assert!(std::sync::Arc::ptr_eq(&published, &received), "one envelope, shared");
    /// # hub.shutdown().await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// As [`EventHub::subscribe`].
    pub async fn subscribe_shared(
        &self,
        room: RuntimeRoom,
        resume: Resume,
    ) -> Result<SharedEventStream, HubError> {
        self.follow(room, resume).await
    }

    async fn follow<T: follow::Yielded>(
        &self,
        room: RuntimeRoom,
        resume: Resume,
    ) -> Result<follow::FollowStream<T>, HubError> {
        let link = self.inner.link.clone();
        self.check_history(&room, &resume).await?;
        match (room, resume) {
            (RuntimeRoom::Run(run_id), Resume::Live) => {
                follow::follow_run(link, run_id, None).await
            }
            (RuntimeRoom::Run(run_id), Resume::FromStart) => {
                follow::follow_run(link, run_id, Some(1)).await
            }
            (RuntimeRoom::Run(run_id), Resume::After(cursor)) => {
                follow::follow_run(link, run_id, Some(cursor.seq(run_id).saturating_add(1))).await
            }
            (RuntimeRoom::Session(session), Resume::Live) => {
                follow::follow_session(link, session, Cursor::new(self.epoch()), true).await
            }
            (RuntimeRoom::Session(session), Resume::FromStart) => {
                follow::follow_session(link, session, Cursor::new(self.epoch()), false).await
            }
            (RuntimeRoom::Session(session), Resume::After(cursor)) => {
                follow::follow_session(link, session, cursor, false).await
            }
            (room @ RuntimeRoom::Provider(_), Resume::Live) => {
                follow::follow_live(link, room).await
            }
            (room @ RuntimeRoom::Provider(_), _) => Err(HubError::LiveOnly {
                room: room.to_string(),
            }),
        }
    }

    /// A subscription is honoured only if it names history this store has:
    /// a cursor of this epoch, not ahead of the store, and not into events
    /// retention removed. A run room of a removed run is refused whatever
    /// the resume (it has nothing left to serve). A session cursor is
    /// checked by its follower, against the session's runs only (see
    /// `follow::follow_session`): a position of a run outside the session
    /// is not the subscriber's to learn anything about, so it can neither
    /// fail the subscribe nor cost a read.
    async fn check_history(&self, room: &RuntimeRoom, resume: &Resume) -> Result<(), HubError> {
        if let Resume::After(cursor) = resume
            && cursor.epoch() != self.epoch()
        {
            return Err(HubError::CursorEpoch {
                expected: self.epoch(),
                found: cursor.epoch(),
            });
        }
        let RuntimeRoom::Run(run_id) = room else {
            return Ok(());
        };
        let seq = match resume {
            Resume::After(cursor) => cursor.seq(*run_id),
            Resume::Live | Resume::FromStart => 0,
        };
        // What is committed is enough: a cursor names only acknowledged
        // seqs, and a removed run takes no appends.
        let info = self.inner.link.store.run_info_committed(*run_id).await?;
        let last_seq = info.as_ref().map_or(0, |info| info.last_seq);
        if let Some(removed_at) = info.and_then(|info| info.removed_at) {
            return Err(HubError::RunRemoved {
                run_id: *run_id,
                removed_at,
            });
        }
        if seq > last_seq {
            return Err(HubError::CursorAhead {
                run_id: *run_id,
                seq,
                last_seq,
            });
        }
        Ok(())
    }

    /// Up to `limit` stored envelopes of `run_id` after `after_seq`.
    ///
    /// # Errors
    ///
    /// [`HubError::Store`] (a corrupt record names its run and seq),
    /// [`HubError::RunRemoved`] if retention removed the run and it had
    /// events after `after_seq`, for every `limit` (0 included),
    /// [`HubError::Closed`].
    pub async fn replay(
        &self,
        run_id: RunId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, HubError> {
        Ok(self
            .inner
            .link
            .store
            .list_after(run_id, after_seq, limit)
            .await?)
    }

    /// A snapshot of rooms, queue depths and counters.
    ///
    /// # Errors
    ///
    /// [`HubError::Closed`] after shutdown.
    pub async fn stats(&self) -> Result<HubStats, HubError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .link
            .router
            .send_message(RouterMsg::Stats(tx.into()))
            .map_err(|_| HubError::Closed)?;
        let rooms = rx.await.map_err(|_| HubError::Closed)?;
        let store = self.inner.link.store.stats().await?;
        let counters = &self.inner.link.shared.counters;
        let max = self.inner.max_in_flight as usize;
        Ok(HubStats {
            rooms,
            publishes_in_flight: max - self.inner.publish_permits.available_permits(),
            max_in_flight_publishes: max,
            catch_ups_from_ring: counters.ring_catch_ups.load(Ordering::Relaxed),
            catch_ups_from_store: counters.store_catch_ups.load(Ordering::Relaxed),
            rooms_started: counters.rooms_started.load(Ordering::Relaxed),
            rooms_evicted: counters.rooms_evicted.load(Ordering::Relaxed),
            rooms_failed: counters.rooms_failed.load(Ordering::Relaxed),
            session_runs_unfollowed: counters.session_runs_unfollowed.load(Ordering::Relaxed),
            runs_leased: self
                .inner
                .link
                .shared
                .leases
                .as_ref()
                .map_or(0, |l| l.watched()),
            store,
        })
    }

    /// Stops taking publishes, waits for those in flight to be acknowledged,
    /// stops every room and closes the store. Nothing acknowledged is lost.
    /// Shutting down twice is fine.
    ///
    /// # Errors
    ///
    /// [`HubError::Store`] if the store's final flush failed.
    pub async fn shutdown(&self) -> Result<(), HubError> {
        let Some(join) = self.inner.router_join.lock().await.take() else {
            return Ok(());
        };
        for task in &self.inner.lease_tasks {
            task.abort();
        }
        if let Ok(all) = Arc::clone(&self.inner.publish_permits)
            .acquire_many_owned(self.inner.max_in_flight)
            .await
        {
            all.forget();
        }
        self.inner.publish_permits.close();
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .link
            .router
            .send_message(RouterMsg::Shutdown(tx.into()))
            .is_ok()
        {
            let _ = rx.await;
        }
        let _ = join.await;
        self.inner.link.store.close().await?;
        Ok(())
    }

    /// Test hook: the run room `room` panics when it takes its `nth`
    /// publish from now on (1 = the next). The router restarts it from the
    /// store on next use.
    #[cfg(feature = "fault-injection")]
    pub fn inject_room_panic(&self, room: RuntimeRoom, nth: u64) {
        let mut panics = self
            .inner
            .link
            .shared
            .panics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        panics.insert(room, nth.max(1));
    }

    /// Test hook: from now on every run room panics at a publish with
    /// probability `per_million` / 1,000,000, drawn from a generator seeded
    /// with `seed` (0 turns it off).
    #[cfg(feature = "fault-injection")]
    pub fn inject_random_room_panics(&self, per_million: u32, seed: u64) {
        let mut random = self
            .inner
            .link
            .shared
            .random_panics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *random = (per_million, seed | 1);
    }

    /// The live-only stream of a room, as the seed's adapter subscribes.
    pub(crate) async fn live(&self, room: RuntimeRoom) -> Result<BoxRuntimeEventStream, HubError> {
        follow::follow_live(self.inner.link.clone(), room).await
    }

    /// Live-only fanout of an envelope, as the seed's adapter publishes. An
    /// envelope whose run is not its event's reaches nobody.
    pub(crate) async fn live_publish(
        &self,
        room: RuntimeRoom,
        envelope: RuntimeEventEnvelope,
    ) -> Result<(), RuntimeStreamError> {
        let event_run = envelope.event.run_id();
        if envelope.run_id != event_run {
            return Err(RuntimeStreamError::Publish {
                message: format!(
                    "envelope names run {} but its event belongs to run {event_run}; \
                     not fanned out",
                    envelope.run_id
                ),
            });
        }
        // What the hub fans out, its subscribers' JSON readers must parse.
        if let Err(error) = crate::codec::check_json_depth(&envelope.event) {
            return Err(RuntimeStreamError::Publish {
                message: format!("{error}; not fanned out"),
            });
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .link
            .router
            .send_message(RouterMsg::LivePublish {
                room,
                envelope: Box::new(envelope),
                reply: tx.into(),
            })
            .map_err(|_| RuntimeStreamError::Closed)?;
        rx.await
            .map_err(|_| RuntimeStreamError::Closed)?
            .map_err(|e| RuntimeStreamError::Publish {
                message: e.to_string(),
            })
    }
}
