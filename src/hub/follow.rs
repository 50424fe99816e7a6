//! Subscription streams: they stitch store, ring and live fanout into one
//! ordered stream per subscriber, on the subscriber's own task.
//!
//! A follower knows the next seq it owes its subscriber. Whatever the room
//! sends that is below it is a duplicate and is skipped; anything above it is
//! a gap, which the follower fills from the store before going on. When the
//! live feed overflows (the subscriber read too slowly) or closes (the room
//! stopped), the follower attaches again and catches up from the ring, or
//! from the store when the ring has moved on. The room never waits for a
//! subscriber.

use std::collections::{HashSet, VecDeque};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, stream};
use ractor::{ActorRef, RpcReplyPort};
use tokio::sync::oneshot;
use tracing::Instrument;
use uuid::Uuid;

use super::cursor::Cursor;
use super::live::{LiveReceiver, RecvError};
use super::router::RouterMsg;
use super::run_room::RunAttach;
use super::{Delivery, LiveFeed, Shared};
use crate::error::{HubError, StoreError};
use crate::ids::RunId;
use crate::store::Store;
use crate::stream::{RuntimeEventEnvelope, RuntimeRoom, RuntimeStreamError};

/// How often a follower tries to attach to a room that dies before it
/// answers.
const ATTACH_TRIES: usize = 100;

/// What a follower needs of the hub.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) router: ActorRef<RouterMsg>,
    pub(crate) store: Store,
    pub(crate) shared: Arc<Shared>,
}

impl Link {
    async fn call<T: Send + 'static>(
        &self,
        message: impl FnOnce(RpcReplyPort<T>) -> RouterMsg,
    ) -> Result<T, HubError> {
        // `RoomUnavailable` below means the reply port was dropped unanswered:
        // the room it was forwarded to died first.
        let (tx, rx) = oneshot::channel();
        self.router
            .send_message(message(tx.into()))
            .map_err(|_| HubError::Closed)?;
        rx.await.map_err(|_| HubError::RoomUnavailable {
            room: "router".into(),
            reason: "no answer".into(),
        })
    }

    /// Attaches through the router, trying again when the room dies before it
    /// answers (it restarts from the store on the next try). A room that
    /// keeps dying is given up on by the router (`RoomFailed`), which ends
    /// the tries; so does a closed hub.
    async fn attach<T: Send + 'static>(
        &self,
        message: impl Fn(RpcReplyPort<Result<T, HubError>>) -> RouterMsg,
    ) -> Result<T, HubError> {
        for _ in 0..ATTACH_TRIES {
            match self.call(&message).await {
                Err(HubError::RoomUnavailable { .. }) => tokio::task::yield_now().await,
                Ok(answer) => return answer,
                Err(other) => return Err(other),
            }
        }
        Err(HubError::RoomUnavailable {
            room: "attach".into(),
            reason: format!("the room died before answering {ATTACH_TRIES} times"),
        })
    }

    /// Attaches to `room`'s live feed (see [`Link::attach`]).
    async fn attach_live(&self, room: &RuntimeRoom) -> Result<LiveFeed, HubError> {
        self.attach(|reply| RouterMsg::AttachLive {
            room: room.clone(),
            reply,
        })
        .await
    }

    /// A page of `run_id` after `after_seq`; an empty page where the room
    /// said there was more is a broken promise, reported, not skipped.
    async fn page(
        &self,
        run_id: RunId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RuntimeEventEnvelope>, RuntimeStreamError> {
        let page = self
            .store
            .list_after(run_id, after_seq, limit)
            .await
            .map_err(|e| subscribe_error(&HubError::from(e)))?;
        if page.is_empty() {
            return Err(broken_promise(run_id, after_seq));
        }
        Ok(page)
    }
}

/// The store has nothing where a fanned-out envelope said there was more.
fn broken_promise(run_id: RunId, after_seq: u64) -> RuntimeStreamError {
    RuntimeStreamError::Subscribe {
        message: format!(
            "store has no events of run {run_id} after seq {after_seq}, but they were fanned out"
        ),
    }
}

pub(crate) fn subscribe_error(error: &HubError) -> RuntimeStreamError {
    match error {
        HubError::Closed => RuntimeStreamError::Closed,
        other => RuntimeStreamError::Subscribe {
            message: other.to_string(),
        },
    }
}

/// A subscription's stream of `T`: [`crate::BoxRuntimeEventStream`] for
/// owned envelopes, [`crate::SharedEventStream`] for shared ones.
pub(crate) type FollowStream<T> =
    Pin<Box<dyn Stream<Item = Result<T, RuntimeStreamError>> + Send + 'static>>;

/// What a subscription yields: an owned envelope (the seed's stream type),
/// or the envelope the room, its ring and every other subscriber share,
/// which costs no copy of the event.
pub(crate) trait Yielded: Send + 'static {
    /// From an envelope others hold too (a live batch).
    fn from_shared(envelope: &Arc<RuntimeEventEnvelope>) -> Self;
    /// From an envelope this follower may hold alone (its backlog).
    fn from_arc(envelope: Arc<RuntimeEventEnvelope>) -> Self;
    /// From an envelope read from the store.
    fn from_owned(envelope: RuntimeEventEnvelope) -> Self;
    fn envelope(&self) -> &RuntimeEventEnvelope;
}

impl Yielded for RuntimeEventEnvelope {
    fn from_shared(envelope: &Arc<RuntimeEventEnvelope>) -> Self {
        // Copied out of the batch without touching its reference count,
        // which every subscriber of the room would otherwise contend on.
        RuntimeEventEnvelope::clone(envelope)
    }
    fn from_arc(envelope: Arc<RuntimeEventEnvelope>) -> Self {
        Arc::unwrap_or_clone(envelope)
    }
    fn from_owned(envelope: RuntimeEventEnvelope) -> Self {
        envelope
    }
    fn envelope(&self) -> &RuntimeEventEnvelope {
        self
    }
}

impl Yielded for Arc<RuntimeEventEnvelope> {
    fn from_shared(envelope: &Arc<RuntimeEventEnvelope>) -> Self {
        Arc::clone(envelope)
    }
    fn from_arc(envelope: Arc<RuntimeEventEnvelope>) -> Self {
        envelope
    }
    fn from_owned(envelope: RuntimeEventEnvelope) -> Self {
        Arc::new(envelope)
    }
    fn envelope(&self) -> &RuntimeEventEnvelope {
        self
    }
}

/// Turns a follower into a stream. An error ends the stream after it is
/// yielded, except `Lagged`, which reports a gap and goes on.
fn into_stream<T: Yielded, F: Follower<T>>(follower: F, span: tracing::Span) -> FollowStream<T> {
    Box::pin(stream::unfold(Some(follower), move |follower| {
        next_item(follower).instrument(span.clone())
    }))
}

async fn next_item<T: Yielded, F: Follower<T>>(
    follower: Option<F>,
) -> Option<(Result<T, RuntimeStreamError>, Option<F>)> {
    let mut follower = follower?;
    match follower.next().await {
        Ok(Some(envelope)) => Some((Ok(envelope), Some(follower))),
        Ok(None) => None,
        Err(lagged @ RuntimeStreamError::Lagged { .. }) => Some((Err(lagged), Some(follower))),
        Err(error) => {
            tracing::debug!(%error, "subscription ends with an error");
            Some((Err(error), None))
        }
    }
}

/// The span a subscription's reads run in: its room, for every event
/// below it.
fn subscription_span(room: &RuntimeRoom) -> tracing::Span {
    tracing::debug_span!("subscription", room = %room)
}

/// `behest_events_delivered_total`, registered once per subscription.
fn delivered_counter() -> ::metrics::Counter {
    ::metrics::counter!(crate::metrics::DELIVERED)
}

/// What is left of the last live delivery, read in place: a follower takes
/// each envelope out of the shared batch as [`Yielded::from_shared`].
#[derive(Default)]
struct Unread {
    envelopes: Option<Arc<[Arc<RuntimeEventEnvelope>]>>,
    next: usize,
}

impl Unread {
    fn set(&mut self, envelopes: Arc<[Arc<RuntimeEventEnvelope>]>) {
        self.envelopes = Some(envelopes);
        self.next = 0;
    }

    fn peek(&self) -> Option<&Arc<RuntimeEventEnvelope>> {
        self.envelopes.as_ref()?.get(self.next)
    }

    fn advance(&mut self) {
        self.next += 1;
    }

    fn clear(&mut self) {
        self.envelopes = None;
        self.next = 0;
    }
}

/// A subscription's state machine. Its `next` future lives as long as the
/// subscription (inside the boxed stream), so the store reads and re-attaches
/// it awaits are boxed where they are awaited: they are rare (a page per
/// `catch_up_page` envelopes, an attach per lag) and far larger than the
/// wait for the live feed, and inline they would make every subscription as
/// large as them for its whole life.
trait Follower<T>: Send + 'static {
    /// The next envelope, `None` at the end, or the error that ends it.
    fn next(&mut self) -> impl Future<Output = Result<Option<T>, RuntimeStreamError>> + Send;
}

/// A run room's stream: gapless and duplicate-free in seq order, from
/// `start` (or from the live edge), ending after the terminal event. Attaches
/// before it returns, so the live edge is the moment of the call.
pub(crate) async fn follow_run<T: Yielded>(
    link: Link,
    run_id: RunId,
    start: Option<u64>,
) -> Result<FollowStream<T>, HubError> {
    let mut follower = RunFollower {
        link,
        run_id,
        next_seq: start.unwrap_or(1),
        from_live_edge: start.is_none(),
        catch_up_to: 0,
        backlog: VecDeque::new(),
        live: None,
        unread: Unread::default(),
        done: false,
        delivered: delivered_counter(),
        yields: PhantomData,
    };
    let span = subscription_span(&RuntimeRoom::Run(run_id));
    follower.attach().instrument(span.clone()).await?;
    Ok(into_stream(follower, span))
}

struct RunFollower<T> {
    link: Link,
    run_id: RunId,
    next_seq: u64,
    /// `Resume::Live`: the first attach sets `next_seq` past what is stored.
    from_live_edge: bool,
    /// The store holds everything up to here that the follower still owes.
    catch_up_to: u64,
    /// Envelopes owed next, shared with the room's ring until delivered.
    backlog: VecDeque<Arc<RuntimeEventEnvelope>>,
    live: Option<LiveReceiver>,
    /// Live envelopes received and not yet gone through.
    unread: Unread,
    done: bool,
    delivered: ::metrics::Counter,
    yields: PhantomData<fn() -> T>,
}

impl<T: Yielded> RunFollower<T> {
    fn deliver(&mut self, yielded: T) -> Result<Option<T>, RuntimeStreamError> {
        let envelope = yielded.envelope();
        self.next_seq = envelope.seq.saturating_add(1);
        self.done = envelope.is_terminal();
        self.delivered.increment(1);
        tracing::trace!(run_id = %envelope.run_id, seq = envelope.seq, "delivered");
        Ok(Some(yielded))
    }

    async fn attach(&mut self) -> Result<(), HubError> {
        let (run_id, from_seq) = (self.run_id, self.next_seq);
        let attach: RunAttach = self
            .link
            .attach(|reply| RouterMsg::AttachRun {
                run_id,
                from_seq,
                reply,
            })
            .await?;
        if self.from_live_edge {
            self.from_live_edge = false;
            self.next_seq = attach.persisted_seq.saturating_add(1);
        }
        // Nothing more will come of an ended run this subscriber has seen
        // to the end (a live subscription to an ended run ends at once).
        if attach.ended && self.next_seq > attach.persisted_seq {
            self.done = true;
            return Ok(());
        }
        self.live = Some(attach.live);
        self.unread.clear();
        match attach.backlog {
            Some(backlog) => {
                if !backlog.is_empty() {
                    self.link.shared.counters.record_ring_catch_up();
                    tracing::debug!(
                        %run_id,
                        from_seq,
                        to_seq = attach.persisted_seq,
                        "catching up from the ring"
                    );
                }
                self.backlog = backlog.into();
            }
            None => {
                self.link.shared.counters.record_store_catch_up();
                self.catch_up_to = attach.persisted_seq;
                tracing::debug!(
                    %run_id,
                    from_seq,
                    to_seq = attach.persisted_seq,
                    "catching up from the store"
                );
            }
        }
        Ok(())
    }
}

impl<T: Yielded> Follower<T> for RunFollower<T> {
    async fn next(&mut self) -> Result<Option<T>, RuntimeStreamError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(envelope) = self.backlog.pop_front() {
                match envelope.seq.cmp(&self.next_seq) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => {
                        return self.deliver(T::from_arc(envelope));
                    }
                    // The backlog is contiguous; this cannot follow. Start
                    // over from a fresh attach rather than skip.
                    std::cmp::Ordering::Greater => {
                        self.backlog.clear();
                        self.live = None;
                        continue;
                    }
                }
            }
            if self.next_seq <= self.catch_up_to {
                let page = self.link.shared.catch_up_page;
                match Box::pin(self.link.page(self.run_id, self.next_seq - 1, page)).await {
                    Ok(page) => self.backlog.extend(page.into_iter().map(Arc::new)),
                    Err(error) => return Err(error),
                }
                continue;
            }
            if let Some(envelope) = self.unread.peek() {
                match envelope.seq.cmp(&self.next_seq) {
                    // A terminal event already behind the cursor: the run
                    // has ended and nothing more will come.
                    std::cmp::Ordering::Less => {
                        self.done = envelope.is_terminal();
                        self.unread.advance();
                    }
                    std::cmp::Ordering::Equal => {
                        let envelope = T::from_shared(envelope);
                        self.unread.advance();
                        return self.deliver(envelope);
                    }
                    // A gap: attach again and catch up.
                    std::cmp::Ordering::Greater => {
                        self.unread.clear();
                        self.live = None;
                    }
                }
                continue;
            }
            let Some(live) = self.live.as_mut() else {
                Box::pin(self.attach())
                    .await
                    .map_err(|e| subscribe_error(&e))?;
                continue;
            };
            match live.recv().await {
                Ok(Delivery {
                    persisted: true,
                    envelopes,
                    ..
                }) => self.unread.set(envelopes),
                Ok(_) => {}
                Err(RecvError::Lagged(_) | RecvError::Closed) => self.live = None,
            }
        }
    }
}

/// A session room's stream: every run of the session, each in seq order,
/// resumable by the per-run positions of `cursor`. Attaches before it
/// returns.
pub(crate) async fn follow_session<T: Yielded>(
    link: Link,
    session_id: Uuid,
    cursor: Cursor,
    from_live_edge: bool,
) -> Result<FollowStream<T>, HubError> {
    let mut follower = SessionFollower {
        link,
        session_id,
        cursor,
        from_live_edge,
        first_sweep: true,
        backlog: VecDeque::new(),
        pending: None,
        sweep: VecDeque::new(),
        live: None,
        unread: Unread::default(),
        delivered: delivered_counter(),
        yields: PhantomData,
    };
    let span = subscription_span(&RuntimeRoom::Session(session_id));
    follower.attach().instrument(span.clone()).await?;
    Ok(into_stream(follower, span))
}

struct SessionFollower<T> {
    link: Link,
    session_id: Uuid,
    /// The last seq delivered of each run.
    cursor: Cursor,
    /// `Resume::Live`: the first attach starts every known run at its end.
    from_live_edge: bool,
    /// The first sweep checks the cursor it was given against the session.
    first_sweep: bool,
    backlog: VecDeque<RuntimeEventEnvelope>,
    /// A live envelope waiting for the gap before it to be filled.
    pending: Option<Arc<RuntimeEventEnvelope>>,
    /// Runs still to be read from the store up to their end.
    sweep: VecDeque<RunId>,
    live: Option<LiveReceiver>,
    /// Live envelopes received and not yet gone through.
    unread: Unread,
    delivered: ::metrics::Counter,
    yields: PhantomData<fn() -> T>,
}

impl<T: Yielded> SessionFollower<T> {
    fn deliver(&mut self, yielded: T) -> Result<Option<T>, RuntimeStreamError> {
        let envelope = yielded.envelope();
        self.cursor.advance(envelope);
        self.delivered.increment(1);
        tracing::trace!(run_id = %envelope.run_id, seq = envelope.seq, "delivered");
        Ok(Some(yielded))
    }

    async fn attach(&mut self) -> Result<(), HubError> {
        let live = self
            .link
            .attach_live(&RuntimeRoom::Session(self.session_id))
            .await?;
        self.live = Some(live.receiver);
        self.unread.clear();
        self.sweep_all().await
    }

    /// Queues every run of the session that may have more for this
    /// subscriber for a read up to its end; on the first attach of a live
    /// subscription, instead marks each as seen. One store read, whatever
    /// the cursor holds: the session's runs are iterated and each looked up
    /// in the cursor, never the other way round.
    async fn sweep_all(&mut self) -> Result<(), HubError> {
        let runs = self.link.store.session_state(self.session_id).await?;
        let first = std::mem::take(&mut self.first_sweep);
        if first {
            // Positions of runs outside the session say nothing the
            // subscriber may learn about: dropped unread, they cost nothing
            // and no answer depends on them.
            let session_runs: HashSet<RunId> = runs.iter().map(|run| run.run_id).collect();
            self.cursor.retain(|run_id| session_runs.contains(&run_id));
        }
        for run in &runs {
            let seen = self.cursor.seq(run.run_id);
            // A run this subscriber is partway through that retention
            // removed: its rest is gone, which must end the stream with an
            // error, not shorten it unnoticed. (Never seen, or seen to its
            // end: it is simply no longer in the session's history.)
            if let Some(removed_at) = run.removed_at
                && seen > 0
                && seen < run.last_seq
            {
                return Err(HubError::RunRemoved {
                    run_id: run.run_id,
                    removed_at,
                });
            }
            // Only a cursor from outside can be ahead; later sweeps read
            // what the store acknowledged after what was delivered.
            if first && seen > run.last_seq {
                return Err(HubError::CursorAhead {
                    run_id: run.run_id,
                    seq: seen,
                    last_seq: run.last_seq,
                });
            }
        }
        if self.from_live_edge {
            self.from_live_edge = false;
            for run in runs.iter().filter(|run| run.removed_at.is_none()) {
                self.cursor.observe(run.run_id, run.last_seq);
            }
            return Ok(());
        }
        self.link.shared.counters.record_store_catch_up();
        // An ended run seen to its end has nothing more to give; one that
        // has not ended is read even if seen to its last seq, as cheap
        // insurance against an event committed but not (yet) fanned out.
        let sweep: VecDeque<RunId> = runs
            .iter()
            .filter(|run| {
                run.removed_at.is_none()
                    && (!run.ended || self.cursor.seq(run.run_id) < run.last_seq)
            })
            .map(|run| run.run_id)
            .collect();
        tracing::debug!(
            runs = runs.len(),
            to_read = sweep.len(),
            "catching up the session's runs from the store"
        );
        self.sweep = sweep;
        Ok(())
    }

    /// A page of `run_id` after `seen`, or `None` when retention removed
    /// the run and this subscriber never saw any of it: it is no longer in
    /// the session's history, which is not an error. Removed after being
    /// seen partway, it is (`RunRemoved`).
    async fn page_of(
        &self,
        run_id: RunId,
        seen: u64,
        limit: usize,
    ) -> Result<Option<Vec<RuntimeEventEnvelope>>, RuntimeStreamError> {
        match self.link.store.list_after(run_id, seen, limit).await {
            Ok(page) => Ok(Some(page)),
            Err(StoreError::RunRemoved { .. }) if seen == 0 => Ok(None),
            Err(error) => Err(subscribe_error(&error.into())),
        }
    }
}

impl<T: Yielded> Follower<T> for SessionFollower<T> {
    async fn next(&mut self) -> Result<Option<T>, RuntimeStreamError> {
        let page = self.link.shared.catch_up_page;
        loop {
            if let Some(envelope) = self.backlog.pop_front() {
                if envelope.seq == self.cursor.seq(envelope.run_id) + 1 {
                    return self.deliver(T::from_owned(envelope));
                }
                continue;
            }
            if let Some(envelope) = self.pending.take() {
                let seen = self.cursor.seq(envelope.run_id);
                if envelope.seq <= seen {
                    continue;
                }
                if envelope.seq == seen + 1 {
                    return self.deliver(T::from_arc(envelope));
                }
                // A gap before this envelope: fill it from the store first.
                let missing = usize::try_from(envelope.seq - 1 - seen).unwrap_or(usize::MAX);
                match Box::pin(self.page_of(envelope.run_id, seen, missing.min(page))).await? {
                    // Gone unseen: so is this envelope's place in history.
                    None => continue,
                    Some(fill) if fill.is_empty() => {
                        return Err(broken_promise(envelope.run_id, seen));
                    }
                    Some(fill) => self.backlog.extend(fill),
                }
                self.pending = Some(envelope);
                continue;
            }
            if let Some(run_id) = self.sweep.front().copied() {
                let seen = self.cursor.seq(run_id);
                match Box::pin(self.page_of(run_id, seen, page)).await? {
                    Some(fill) => {
                        if fill.len() < page {
                            self.sweep.pop_front();
                        }
                        self.backlog.extend(fill);
                    }
                    // Removed since it was queued, never seen: skipped.
                    None => {
                        self.sweep.pop_front();
                    }
                }
                continue;
            }
            if let Some(envelope) = self.unread.peek() {
                self.pending = Some(Arc::clone(envelope));
                self.unread.advance();
                continue;
            }
            let Some(live) = self.live.as_mut() else {
                Box::pin(self.attach())
                    .await
                    .map_err(|e| subscribe_error(&e))?;
                continue;
            };
            match live.recv().await {
                Ok(Delivery {
                    persisted: true,
                    envelopes,
                    ..
                }) => self.unread.set(envelopes),
                Ok(_) => {}
                // Runs that ended while this subscriber lagged send nothing
                // more to reveal their gap: sweep them all.
                Err(RecvError::Lagged(_)) => {
                    Box::pin(self.sweep_all())
                        .await
                        .map_err(|e| subscribe_error(&e))?;
                }
                Err(RecvError::Closed) => self.live = None,
            }
        }
    }
}

/// A live-only stream of a room: what is fanned out from the call on,
/// including envelopes published through the adapter. A subscriber that
/// falls out of the ring gets `Lagged { skipped }` and goes on.
pub(crate) async fn follow_live<T: Yielded>(
    link: Link,
    room: RuntimeRoom,
) -> Result<FollowStream<T>, HubError> {
    let mut follower = LiveFollower {
        link,
        room,
        live: None,
        next_index: 0,
        unread: Unread::default(),
        delivered: delivered_counter(),
        yields: PhantomData,
    };
    let span = subscription_span(&follower.room);
    follower.attach().instrument(span.clone()).await?;
    Ok(into_stream(follower, span))
}

struct LiveFollower<T> {
    link: Link,
    room: RuntimeRoom,
    live: Option<LiveReceiver>,
    /// The feed index of the next envelope owed; a delivery that starts
    /// past it says how many were skipped.
    next_index: u64,
    /// Envelopes received and not yet yielded.
    unread: Unread,
    delivered: ::metrics::Counter,
    yields: PhantomData<fn() -> T>,
}

impl<T> LiveFollower<T> {
    async fn attach(&mut self) -> Result<(), HubError> {
        let feed = self.link.attach_live(&self.room).await?;
        self.live = Some(feed.receiver);
        self.next_index = feed.next;
        self.unread.clear();
        Ok(())
    }
}

impl<T: Yielded> Follower<T> for LiveFollower<T> {
    async fn next(&mut self) -> Result<Option<T>, RuntimeStreamError> {
        loop {
            if let Some(envelope) = self.unread.peek() {
                let envelope = T::from_shared(envelope);
                self.unread.advance();
                self.next_index += 1;
                self.delivered.increment(1);
                return Ok(Some(envelope));
            }
            let Some(live) = self.live.as_mut() else {
                Box::pin(self.attach())
                    .await
                    .map_err(|e| subscribe_error(&e))?;
                continue;
            };
            match live.recv().await {
                Ok(delivery) => {
                    let skipped = delivery.first.saturating_sub(self.next_index);
                    self.next_index = delivery.first;
                    self.unread.set(delivery.envelopes);
                    // Reported, and the stream goes on (see `into_stream`).
                    if skipped > 0 {
                        tracing::debug!(skipped, "live subscriber lagged");
                        return Err(RuntimeStreamError::Lagged { skipped });
                    }
                }
                // The next delivery (the oldest the channel kept) tells how
                // many envelopes were skipped.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => self.live = None,
            }
        }
    }
}
