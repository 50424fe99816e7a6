//! The run room: the single writer of one run's order.
//!
//! It assigns each published event the run's next `seq`, mints its
//! `event_id`, carries the `session_id` learned from `RunStarted`, hands the
//! envelope to the store, and only once the store has it fans it out: to its
//! subscribers and to the run's session and provider rooms. The code that
//! commits an append answers its publishers itself (as their durability
//! asks) and tells the room once, so no task waits per append. Publishing is
//! pipelined: the room does not wait for the store before taking the next
//! publish; the publishes that arrive while one of its appends is at the
//! store gather into its next append, so one store request serves many
//! events. It fans out in seq order whatever order answers come back in.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use uuid::Uuid;

use super::fanout_room::FanoutMsg;
use super::feed::Feed;
use super::lease::Lapse;
use super::live::LiveReceiver;
use super::order::RunOrder;
use super::progress::Progress;
use super::router::RouterMsg;
use super::tail::{self, Tail};
use super::{LiveFeed, RoomStats, Shared};
use crate::config::{Durability, EventOrder};
use crate::error::{HubError, StoreError};
use crate::event::AgentEvent;
use crate::ids::{ProviderId, RunId};
use crate::store::{AppendWaiter, FollowFrom, Store, StoredEnvelope, encoded_len};
use crate::stream::{RuntimeEventEnvelope, RuntimeEventId, RuntimeRoom};

/// The answer to one publish: its envelope once stored. An `Arc`, so that
/// neither the room nor the store copies an envelope; the publisher's own
/// task makes the copy it returns.
pub(crate) type PublishAnswer = Result<Arc<RuntimeEventEnvelope>, HubError>;

/// A publish on its way to a run room.
pub(crate) struct PublishRequest {
    pub(crate) event: AgentEvent,
    pub(crate) durability: Durability,
    /// The publisher's share of the hub's in-flight bound, returned when the
    /// request is answered.
    pub(crate) permit: OwnedSemaphorePermit,
    pub(crate) reply: oneshot::Sender<PublishAnswer>,
    /// Set by the lease sweeper: end the run (the event is its
    /// `RunFailed`) only if nothing renewed its lease after this moment.
    /// A room that finds it renewed, or the run without events, drops the
    /// reply unanswered and renews the lease as it knows it.
    pub(crate) lapsed: Option<Lapse>,
}

/// What a subscriber gets when it attaches to a run room.
pub(crate) struct RunAttach {
    /// Live envelopes fanned out after the attach.
    pub(crate) live: LiveReceiver,
    /// The last seq the room has fanned out.
    pub(crate) persisted_seq: u64,
    /// Whether `persisted_seq` is the run's terminal event.
    pub(crate) ended: bool,
    /// Envelopes from the requested seq up to `persisted_seq`, if the ring
    /// still holds them all; `None` means read them from the store.
    pub(crate) backlog: Option<Vec<Arc<RuntimeEventEnvelope>>>,
}

/// Every message a run room takes.
pub(crate) enum RunMsg {
    /// Sequence, store and fan out an event.
    Publish(PublishRequest),
    /// The store answered the room's append `batch` (sent by the code that
    /// committed it, through the append's [`RoomAppend`]).
    Persisted {
        batch: u64,
        result: Result<(), StoreError>,
    },
    /// Attach a subscriber that wants everything from `from_seq` on.
    Attach {
        from_seq: u64,
        reply: RpcReplyPort<Result<RunAttach, HubError>>,
    },
    /// Attach a live-only subscriber (the adapter's subscribe).
    AttachLive(RpcReplyPort<Result<LiveFeed, HubError>>),
    /// Fan out an envelope published through `RuntimeStreamAdapter`: live
    /// only, not sequenced, not stored. (Boxed: the largest variant sizes
    /// every message and the room's `handle` future.)
    LivePublish {
        envelope: Box<RuntimeEventEnvelope>,
        reply: RpcReplyPort<Result<(), HubError>>,
    },
    /// From the router, every half idle timeout: report if idle.
    Tick,
    /// From the router: stop if still idle, and say whether it did.
    StopIfIdle(RpcReplyPort<bool>),
    /// Report counters.
    Stats(RpcReplyPort<RoomStats>),
    /// Envelopes of this run the shared log holds, as its tail delivers
    /// them (NATS backend): another host's appends, and echoes of this
    /// room's own. Answered once handled, so the tail keeps at most one
    /// batch in the mailbox.
    Remote {
        envelopes: Vec<RuntimeEventEnvelope>,
        done: RpcReplyPort<()>,
    },
    /// The tail with this id stopped (its stream ended): follow again
    /// shortly, unless it was replaced meanwhile.
    TailEnded(u64),
    /// Time to follow the shared log again, if subscribers remain.
    Refollow,
}

pub(crate) struct RunRoom;

pub(crate) struct RunRoomArgs {
    pub(crate) run_id: RunId,
    pub(crate) store: Store,
    pub(crate) router: ActorRef<RouterMsg>,
    pub(crate) shared: Arc<Shared>,
    /// Where the room reports how far it got; the router reads it if the
    /// room dies.
    pub(crate) progress: Arc<Progress>,
    /// Set when a predecessor died with events stored and not fanned out:
    /// the last seq it fanned out. The room fans out the rest from the
    /// store before it takes anything else.
    pub(crate) unfanned_from: Option<u64>,
}

/// A sequenced event the room has not yet fanned out (or given up on). Once
/// its append is at the store, the publisher's reply travels with the
/// append ([`RoomAppend`]), not with the room: if the room dies, the store
/// still answers with its own word, so a publisher hears `Ok` exactly when
/// its event is stored.
struct InFlight {
    envelope: Arc<RuntimeEventEnvelope>,
    generation: u64,
    /// The append that carries it; `None` while it is gathering.
    batch: Option<u64>,
    result: Option<Result<(), StoreError>>,
}

/// A publish with its envelope built and encoded, not yet given its seq.
struct Sequenced {
    gathered: Gathered,
    durability: Durability,
}

/// What a publish leaves the room to await.
enum AfterPublish {
    /// Nothing: it was refused (and answered), or it gathers behind an
    /// append of the room at the store.
    Nothing,
    /// Hand what gathered, this publish included, to the store.
    Send,
    /// It asks for another durability than what gathered: hand that to the
    /// store first. (Boxed: rare, and this value is held across the await
    /// of the common case.)
    SendFirst(Box<Sequenced>),
}

/// What gathered, as one append on its way to the store.
struct Append {
    items: Vec<StoredEnvelope>,
    waiter: Box<RoomAppend>,
    last_seq: u64,
    /// Its share of the store's in-flight budget.
    bytes: usize,
}

/// A sequenced, encoded event waiting for the room's next append.
struct Gathered {
    stored: StoredEnvelope,
    envelope: Arc<RuntimeEventEnvelope>,
    reply: oneshot::Sender<PublishAnswer>,
    permit: OwnedSemaphorePermit,
}

pub(crate) struct RunState {
    run_id: RunId,
    store: Store,
    router: ActorRef<RouterMsg>,
    shared: Arc<Shared>,
    /// Set when recovery from the store failed; every request gets it.
    broken: Option<StoreError>,
    /// Last seq handed to the store.
    assigned: u64,
    /// Last seq the store acknowledged and the room fanned out.
    persisted: u64,
    session_id: Option<Uuid>,
    provider: Option<ProviderId>,
    /// Session and provider as of the last fanned-out event, restored when a
    /// failed append rewinds the room.
    session_persisted: Option<Uuid>,
    provider_persisted: Option<ProviderId>,
    ended_assigned: bool,
    ended_persisted: bool,
    /// Bumped when a failed append rewinds `assigned`, so that the failures
    /// that follow from it (later appends of the same pipeline) do not rewind
    /// again.
    generation: u64,
    /// Events with a seq and not yet answered, in seq order: those in an
    /// append at the store, then those gathering for the next append.
    in_flight: VecDeque<InFlight>,
    /// Events gathering while an append of this room is at the store; they
    /// go as one append when it returns, so one store request serves many
    /// events.
    gathering: Vec<Gathered>,
    gathering_durability: Durability,
    /// Appends of this room at the store.
    outstanding: usize,
    /// Numbers the room's appends.
    next_batch: u64,
    feed: Feed,
    /// `behest_events_published_total`, registered once.
    published: ::metrics::Counter,
    /// The task following the run in a shared log (NATS backend), started
    /// when the first subscriber attaches, started again after it ends
    /// while subscribers remain; stopped with the room.
    tail: Option<Tail>,
    /// The tail delivered other hosts' envelopes while an append of this
    /// room was in flight: read them from the log once it is answered.
    remote_behind: bool,
    /// A `Refollow` is on its way.
    retry_pending: bool,
    progress: Arc<Progress>,
    /// See [`RunRoomArgs::unfanned_from`]; taken by the first recovery.
    unfanned_from: Option<u64>,
    /// The order check of what the room sequenced (`None`: unchecked).
    order: Option<RunOrder>,
    /// Why the run's history, which the order check needs, could not be
    /// read; the publish that needed it gets this.
    order_error: Option<StoreError>,
    /// When the room last sequenced an event of its own or took another
    /// host's: what a lapsed lease is checked against.
    last_activity: Option<Instant>,
    /// When the room last renewed its run's lease in the hub's table.
    lease_renewed: Option<Instant>,
}

impl Actor for RunRoom {
    type Msg = RunMsg;
    type State = RunState;
    type Arguments = RunRoomArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RunRoomArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // A debt inherited from a dead predecessor stands until this room
        // has fanned it out: should it fail first (its recovery read, say),
        // the router finds it here and starts it again.
        if let Some(fanned) = args.unfanned_from {
            args.progress.start_at(u64::MAX, fanned);
        }
        let order = (args.shared.event_order == EventOrder::Strict).then(RunOrder::new);
        Ok(RunState {
            run_id: args.run_id,
            store: args.store,
            router: args.router,
            feed: Feed::new(Arc::clone(&args.shared)),
            shared: args.shared,
            broken: None,
            assigned: 0,
            persisted: 0,
            session_id: None,
            provider: None,
            session_persisted: None,
            provider_persisted: None,
            ended_assigned: false,
            ended_persisted: false,
            generation: 0,
            in_flight: VecDeque::new(),
            gathering: Vec::new(),
            gathering_durability: Durability::Flushed,
            outstanding: 0,
            next_batch: 0,
            published: ::metrics::counter!(crate::metrics::PUBLISHED),
            tail: None,
            remote_behind: false,
            retry_pending: false,
            order,
            order_error: None,
            last_activity: None,
            lease_renewed: None,
            progress: args.progress,
            unfanned_from: args.unfanned_from,
        })
    }

    /// Recovery runs here, not in `pre_start`, so that the router, which
    /// awaits `pre_start`, is not held up by a store read.
    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.recover().await;
        state.fan_out_owed().await?;
        tracing::debug!(run_id = %state.run_id, last_seq = state.persisted, "run room started");
        Ok(())
    }

    /// Ractor keeps one future of this method inline in each room's message
    /// loop for the room's whole life, as large as its largest arm (twice:
    /// its loop holds it in two places). So the awaits that happen only now
    /// and then (recovery, a durability switch, the shared log's reads) are
    /// boxed where they are awaited, and the work between awaits is done by
    /// plain functions, so that the request and envelope it handles are not
    /// held in the future: a room pays for them only while it handles them.
    /// Not an `async fn`, which would hold the message twice (its argument
    /// and the local it copies it into).
    #[allow(clippy::manual_async_fn)]
    fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> impl Future<Output = Result<(), ActorProcessingErr>> + Send {
        async move {
            // Before anything is taken out of the message, so that none of
            // it is held across this await.
            if matches!(message, RunMsg::Publish(_) | RunMsg::Attach { .. }) {
                state.recover_if_broken().await;
            }
            if let RunMsg::Publish(request) = &message
                && state
                    .order
                    .as_ref()
                    .is_some_and(|order| order.needs_history(&request.event))
            {
                Box::pin(state.replay_order()).await;
            }
            // On a shared log the room may be behind the log (another host
            // wrote the run): an event that seems out of order may follow
            // what it has not read yet. Read it before refusing.
            if let RunMsg::Publish(request) = &message
                && state.store.is_shared_log()
                && state.broken.is_none()
                && !state.ended_assigned
                && state.in_flight.is_empty()
                && state.check_order(&request.event).is_err()
            {
                Box::pin(state.read_others_appends()).await;
            }
            match message {
                RunMsg::Publish(request) => {
                    #[cfg(feature = "fault-injection")]
                    if state.shared.should_panic(&RuntimeRoom::Run(state.run_id)) {
                        panic!("injected panic in room run:{}", state.run_id);
                    }
                    state.feed.touch();
                    match state.publish(request) {
                        AfterPublish::Nothing => {}
                        AfterPublish::Send => state.send_gathered(&myself).await,
                        AfterPublish::SendFirst(sequenced) => {
                            Box::pin(state.publish_after_switch(&myself, *sequenced)).await;
                        }
                    }
                }
                RunMsg::Persisted { batch, result } => {
                    let send_first = state.record_answer(batch, result);
                    state.after_answer(&myself, send_first).await?;
                }
                RunMsg::Attach { from_seq, reply } => {
                    state.follow_shared_log(&myself).await;
                    let _ = reply.send(state.attach(from_seq));
                }
                RunMsg::AttachLive(reply) => {
                    state.follow_shared_log(&myself).await;
                    let _ = reply.send(Ok(state.feed.subscribe()));
                }
                RunMsg::Remote { envelopes, done } => {
                    Box::pin(state.remote(envelopes)).await;
                    let _ = done.send(());
                }
                RunMsg::TailEnded(tail) => {
                    if state.tail.as_ref().is_some_and(|t| t.id() == tail) {
                        state.tail = None;
                        state.refollow_later(&myself);
                    }
                }
                RunMsg::Refollow => {
                    state.retry_pending = false;
                    if state.feed.has_subscribers() {
                        state.follow_shared_log(&myself).await;
                    }
                }
                RunMsg::LivePublish { envelope, reply } => {
                    state.feed.live_publish(envelope);
                    let _ = reply.send(Ok(()));
                }
                RunMsg::Tick => {
                    if state.is_idle() {
                        let room = RuntimeRoom::Run(state.run_id);
                        let _ = state.router.send_message(RouterMsg::Idle {
                            room,
                            id: myself.get_id(),
                        });
                    }
                }
                RunMsg::StopIfIdle(reply) => {
                    let idle = state.is_idle();
                    // Stops only if the router heard the answer: one that gave up
                    // waiting has put the room back in use (see `RouterMsg::Idle`).
                    if reply.send(idle).is_ok() && idle {
                        myself.stop(Some("idle".into()));
                    }
                }
                RunMsg::Stats(reply) => {
                    let room = RuntimeRoom::Run(state.run_id);
                    let stats =
                        state
                            .feed
                            .stats(room, state.in_flight.len(), Some(state.persisted));
                    let _ = reply.send(stats);
                }
            }
            Ok(())
        }
    }
}

impl RunState {
    /// Reads where the run stands from the store. A failure leaves the room
    /// broken: every request gets the error, and one that may pass on a
    /// retry (the store was unreachable) makes the next request try again.
    async fn recover(&mut self) {
        match self.store.run_info(self.run_id).await {
            Ok(Some(info)) => {
                self.broken = None;
                self.assigned = info.last_seq;
                self.persisted = info.last_seq;
                self.session_id = info.session_id;
                self.session_persisted = info.session_id;
                self.provider_persisted.clone_from(&info.provider);
                self.provider = info.provider;
                self.ended_assigned = info.ended_at.is_some();
                self.ended_persisted = self.ended_assigned;
                if let Some(order) = &mut self.order {
                    *order = RunOrder::recovered(info.last_seq);
                }
            }
            Ok(None) => self.broken = None,
            Err(error) => {
                tracing::error!(run_id = %self.run_id, %error, "run room cannot recover its run");
                self.broken = Some(error);
                return;
            }
        }
        let fanned = self.unfanned_from.unwrap_or(self.persisted);
        self.progress
            .start_at(self.persisted, fanned.min(self.persisted));
    }

    /// Fans out, from the store, what a predecessor that died had stored
    /// and not fanned out (see [`Progress`]): its publishers heard `Ok` from
    /// the store, so its session's and provider's live subscribers must get
    /// it too, before anything this room sequences. Failing here fails the
    /// room, and the router starts it again (within the restart intensity)
    /// still owing the same.
    async fn fan_out_owed(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(mut fanned) = self.unfanned_from else {
            return Ok(());
        };
        if let Some(error) = &self.broken {
            return self.settle_owed(error.clone());
        }
        let page = self.shared.catch_up_page.max(1);
        while fanned < self.persisted {
            let owed = usize::try_from(self.persisted - fanned).unwrap_or(usize::MAX);
            let envelopes = match self
                .store
                .list_after(self.run_id, fanned, owed.min(page))
                .await
            {
                Ok(envelopes) => envelopes,
                Err(error) => return self.settle_owed(error),
            };
            let Some(last) = envelopes.last().map(|e| e.seq) else {
                // The store contradicts itself; no retry will mend that.
                let persisted = self.persisted;
                self.give_up_owed(&format!(
                    "the store has no events after seq {fanned}, but its last seq is {persisted}"
                ));
                return Ok(());
            };
            tracing::debug!(run_id = %self.run_id, first_seq = fanned + 1, seq = last, "fanning out what a failed room left");
            let owed: Vec<_> = envelopes
                .into_iter()
                .take_while(|e| e.seq <= self.persisted)
                .map(Arc::new)
                .collect();
            self.fan_out(owed);
            fanned = last;
        }
        self.unfanned_from = None;
        Ok(())
    }

    /// The owed fan-out cannot be read. An error a retry may fix (the store
    /// unreachable) fails the room, which the router starts again (within
    /// the restart intensity, then after each restart window) still owing
    /// the same. Any other (the run removed by retention since, a corrupt
    /// record, a closed store) will not pass on a retry: the debt is given
    /// up, loudly, and the room serves its run (and that error) as usual.
    fn settle_owed(&mut self, error: StoreError) -> Result<(), ActorProcessingErr> {
        if error.is_retryable() {
            return Err(format!(
                "run {} owes fan-out and cannot read it: {error}",
                self.run_id
            )
            .into());
        }
        self.give_up_owed(&error);
        Ok(())
    }

    fn give_up_owed(&mut self, why: &dyn std::fmt::Display) {
        tracing::error!(run_id = %self.run_id, error = %why, "fan-out owed by a failed room given up; live session and provider subscribers miss it (resuming ones read it from the store)");
        self.unfanned_from = None;
        self.progress.start_at(self.persisted, self.persisted);
    }

    /// Feeds the order check the run's history (the room recovered the run,
    /// or rewound past events it had taken) and what of its own is in
    /// flight, so that it knows the run's tool calls. A failed read leaves
    /// the check without them, and the publish that needed them gets the
    /// error.
    async fn replay_order(&mut self) {
        let page = self.shared.catch_up_page.max(1);
        let mut rebuilt = RunOrder::new();
        let mut after = 0;
        while after < self.persisted {
            let envelopes = match self.store.list_after(self.run_id, after, page).await {
                Ok(envelopes) => envelopes,
                Err(error) => {
                    self.order_error = Some(error);
                    return;
                }
            };
            let Some(last) = envelopes.last().map(|e| e.seq) else {
                self.order_error =
                    Some(StoreError::missing(self.run_id, after + 1, self.persisted));
                return;
            };
            for envelope in envelopes.iter().take_while(|e| e.seq <= self.persisted) {
                rebuilt.take(&envelope.event);
            }
            after = last;
        }
        for in_flight in &self.in_flight {
            if in_flight.generation == self.generation {
                rebuilt.take(&in_flight.envelope.event);
            }
        }
        self.order_error = None;
        self.order = Some(rebuilt);
    }

    /// Tries recovery again if it failed in a way a retry may fix.
    async fn recover_if_broken(&mut self) {
        if self.broken.as_ref().is_some_and(StoreError::is_retryable) {
            // Boxed, as every store read `handle` awaits only now and then:
            // see `RunRoom::handle`.
            Box::pin(self.recover()).await;
        }
    }

    /// On a shared log (NATS), other hosts may write this run: follow the
    /// log from what the room has fanned out, so that this host's
    /// subscribers see their events too. Nothing to do on sled, or once the
    /// run has ended.
    async fn follow_shared_log(&mut self, myself: &ActorRef<RunMsg>) {
        if !self.store.is_shared_log()
            || self.tail.is_some()
            || self.ended_persisted
            || self.broken.is_some()
        {
            return;
        }
        // Another host's producer may die: watch the run's lease from now.
        if let Some(leases) = &self.shared.leases
            && self.persisted > 0
            && !leases.is_exempt(self.provider.as_ref())
        {
            leases.renew(self.run_id, Instant::now(), Some(self.persisted));
        }
        let from = FollowFrom::AfterSeq(self.persisted);
        let following = match Box::pin(self.store.follow_run(self.run_id, from)).await {
            Ok(Some(following)) => following,
            Ok(None) => return,
            Err(error) => {
                // Subscribers still catch up from the log on attach; what
                // other hosts append meanwhile waits for the retry.
                tracing::warn!(run_id = %self.run_id, %error, "cannot follow the shared log");
                self.refollow_later(myself);
                return;
            }
        };
        self.tail = Some(tail::spawn(
            following.items,
            myself.clone(),
            format!("run {}", self.run_id),
            |envelopes, done| RunMsg::Remote { envelopes, done },
            RunMsg::TailEnded,
        ));
    }

    /// Follows the log again shortly (a stream that ends at once again
    /// does not spin).
    fn refollow_later(&mut self, myself: &ActorRef<RunMsg>) {
        if !self.retry_pending {
            self.retry_pending = true;
            myself.send_after(tail::RETRY, || RunMsg::Refollow);
        }
    }

    /// Fans out, in seq order, the log's envelopes this room has not: those
    /// another host appended. Its own come back too and are skipped; while
    /// an append of its own is in flight, so are the others' (that append
    /// then fails as fenced, and the room recovers from the log).
    async fn remote(&mut self, envelopes: Vec<RuntimeEventEnvelope>) {
        let mut fanned = Vec::new();
        for envelope in envelopes {
            if envelope.seq <= self.persisted {
                continue;
            }
            if !self.in_flight.is_empty() {
                // The log's copy of an append of ours in flight (the same
                // event at that seq, so stored): its answer fans it out.
                if self.is_in_flight(&envelope) {
                    continue;
                }
                // Another host's, or ours beyond what is in flight; which,
                // the append's answer says: then read the log for what is
                // beyond it (`persisted`).
                self.remote_behind = true;
                continue;
            }
            if envelope.seq != self.persisted + 1 {
                // The tail skipped (it should not): fill from the log.
                let missing =
                    usize::try_from(envelope.seq - self.persisted - 1).unwrap_or(usize::MAX);
                match self
                    .store
                    .list_after(self.run_id, self.persisted, missing)
                    .await
                {
                    Ok(fill) if fill.len() == missing => {
                        for earlier in fill {
                            fanned.push(self.take_remote(earlier));
                        }
                    }
                    _ => {
                        tracing::warn!(run_id = %self.run_id, seq = envelope.seq, "gap in the shared log's tail");
                        break;
                    }
                }
            }
            fanned.push(self.take_remote(envelope));
        }
        if !fanned.is_empty() {
            tracing::trace!(run_id = %self.run_id, seq = self.persisted, "fanned out from the shared log");
        }
        self.fan_out(fanned);
        self.stop_tail_if_ended();
    }

    /// Whether `envelope` is one of this room's in flight: the same event at
    /// the same seq.
    fn is_in_flight(&self, envelope: &RuntimeEventEnvelope) -> bool {
        envelope
            .seq
            .checked_sub(self.persisted + 1)
            .and_then(|index| usize::try_from(index).ok())
            .and_then(|index| self.in_flight.get(index))
            .is_some_and(|ours| {
                ours.envelope.seq == envelope.seq && ours.envelope.event_id == envelope.event_id
            })
    }

    /// After the room's own appends are answered: what other hosts appended
    /// meanwhile, read from the log (the tail's copies were set aside).
    async fn catch_up_remote(&mut self) {
        if !self.remote_behind || !self.in_flight.is_empty() {
            return;
        }
        self.remote_behind = false;
        Box::pin(self.read_others_appends()).await;
    }

    /// The reading part of [`RunState::catch_up_remote`].
    async fn read_others_appends(&mut self) {
        let page = self.shared.catch_up_page;
        loop {
            let fill = match self
                .store
                .list_after(self.run_id, self.persisted, page)
                .await
            {
                Ok(fill) => fill,
                Err(error) => {
                    tracing::warn!(run_id = %self.run_id, %error, "cannot read other hosts' events");
                    return;
                }
            };
            let more = fill.len() == page;
            let fanned: Vec<_> = fill
                .into_iter()
                .map(|envelope| self.take_remote(envelope))
                .collect();
            self.fan_out(fanned);
            if !more {
                break;
            }
        }
        self.stop_tail_if_ended();
    }

    fn stop_tail_if_ended(&mut self) {
        if self.ended_persisted {
            self.tail = None;
        }
    }

    /// Takes another host's envelope as persisted.
    fn take_remote(&mut self, envelope: RuntimeEventEnvelope) -> Arc<RuntimeEventEnvelope> {
        self.assigned = self.assigned.max(envelope.seq);
        self.ended_assigned |= envelope.is_terminal();
        if self.session_id.is_none() {
            self.session_id = envelope.session_id;
        }
        if self.provider.is_none() {
            self.provider = envelope.event.provider().cloned();
        }
        if let Some(order) = &mut self.order {
            order.take(&envelope.event);
        }
        self.touch_lease();
        let envelope = Arc::new(envelope);
        self.mark_persisted(&envelope);
        envelope
    }

    fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && self.feed.is_idle()
    }

    /// Takes a publish: refuses it (answered), or gives it its seq and
    /// gathers it, saying what is left to await. Not async, so that the
    /// request and its envelope are not part of the room's `handle` future
    /// (see `RunRoom::handle`).
    fn publish(&mut self, request: PublishRequest) -> AfterPublish {
        if let Some(error) = &self.broken {
            let _ = request.reply.send(Err(HubError::Store(error.clone())));
            return AfterPublish::Nothing;
        }
        if self.ended_assigned {
            let _ = request.reply.send(Err(HubError::RunClosed {
                run_id: self.run_id,
            }));
            return AfterPublish::Nothing;
        }
        if let Some(renewed) = request.lapsed
            && !self.has_lapsed(renewed)
        {
            return AfterPublish::Nothing;
        }
        if let Err(error) = self.check_order(&request.event) {
            let _ = request.reply.send(Err(error));
            return AfterPublish::Nothing;
        }
        let seq = self.assigned.saturating_add(1);
        let session_id = self.session_id.or_else(|| request.event.session_id());
        let envelope = RuntimeEventEnvelope {
            event_id: RuntimeEventId::new(),
            seq,
            run_id: self.run_id,
            session_id,
            event: request.event,
            emitted_at: Utc::now(),
        };
        // Encode before taking the seq, so that a refused event leaves no gap.
        let stored = match StoredEnvelope::encode(&envelope, self.store.max_event_bytes()) {
            Ok(stored) => stored,
            Err(error) => {
                let _ = request.reply.send(Err(error.into()));
                return AfterPublish::Nothing;
            }
        };
        let sequenced = Sequenced {
            gathered: Gathered {
                stored,
                envelope: Arc::new(envelope),
                reply: request.reply,
                permit: request.permit,
            },
            durability: request.durability,
        };
        // A batch has one durability: a publish asking for another sends
        // what has gathered first.
        // (On a shared log durability is the server's, and a second append
        // in flight could reach it before the first.)
        if !self.gathering.is_empty()
            && self.gathering_durability != sequenced.durability
            && !self.store.is_shared_log()
        {
            return AfterPublish::SendFirst(Box::new(sequenced));
        }
        self.gather(sequenced)
    }

    /// For the lease sweeper's ending of a run: true if nothing happened to
    /// the run since `lapse` as this room knows it (exactly, unlike the
    /// sweeper's rough table): it published nothing after the renewal, and
    /// the run is still at the seq the table saw (a fresh room recovers the
    /// run's current seq, so another host's appends, or this room's own
    /// between rough renewals, show). If something did happen, the lease
    /// is renewed as of then. Exempt runs (an explicit renewal can name
    /// one) leave the table.
    fn has_lapsed(&mut self, lapse: Lapse) -> bool {
        let Some(leases) = self.shared.leases.clone() else {
            return false;
        };
        if self.assigned == 0 {
            return false;
        }
        if leases.is_exempt(self.provider.as_ref()) {
            leases.release(self.run_id);
            return false;
        }
        // A lease that never saw the run's seq (an explicit renewal of a
        // run the table did not have, a retried ending) only sets one now:
        // another host may be writing the run.
        let moved = lapse.seen.is_none_or(|seen| seen != self.assigned);
        let active = self.last_activity.is_some_and(|last| last > lapse.renewed);
        if !moved && !active {
            return true;
        }
        let at = self
            .last_activity
            .filter(|_| active)
            .unwrap_or_else(Instant::now);
        leases.renew(self.run_id, at, Some(self.assigned));
        self.lease_renewed = Some(at);
        false
    }

    /// Records activity on the run: its lease is renewed in the hub's
    /// table, at most every eighth of the lease (the table is rough; the
    /// room's `last_activity` is exact).
    fn touch_lease(&mut self) {
        let Some(leases) = &self.shared.leases else {
            return;
        };
        let now = Instant::now();
        self.last_activity = Some(now);
        if self
            .lease_renewed
            .is_some_and(|r| now.saturating_duration_since(r) < leases.lease() / 8)
            || leases.is_exempt(self.provider.as_ref())
        {
            return;
        }
        self.lease_renewed = Some(now);
        leases.renew(self.run_id, now, Some(self.assigned));
    }

    /// Whether `event` may be the run's next, as far as the order check
    /// goes (see `Config::event_order`).
    fn check_order(&self, event: &AgentEvent) -> Result<(), HubError> {
        let Some(order) = &self.order else {
            return Ok(());
        };
        if order.needs_history(event) {
            let error = self
                .order_error
                .clone()
                .unwrap_or_else(|| StoreError::ReadFailed {
                    message: "the run's history, which the order check needs, was not read".into(),
                });
            return Err(HubError::Store(error));
        }
        order
            .check(event)
            .map_err(|violation| HubError::OutOfOrder {
                run_id: self.run_id,
                kind: event.kind(),
                rule: violation.rule,
                detail: violation.detail,
            })
    }

    /// A publish of another durability than what gathered: sends that, then
    /// gathers the publish.
    async fn publish_after_switch(&mut self, myself: &ActorRef<RunMsg>, sequenced: Sequenced) {
        self.send_gathered(myself).await;
        if let AfterPublish::Send = self.gather(sequenced) {
            self.send_gathered(myself).await;
        }
    }

    /// Gives a sequenced event its seq and gathers it for the next append,
    /// which goes at once if none of the room's is at the store.
    fn gather(&mut self, sequenced: Sequenced) -> AfterPublish {
        let Sequenced {
            gathered,
            durability,
        } = sequenced;
        let envelope = &gathered.envelope;
        self.assigned = envelope.seq;
        self.published.increment(1);
        tracing::trace!(run_id = %self.run_id, seq = envelope.seq, kind = envelope.event.kind(), "sequenced");
        self.session_id = envelope.session_id;
        if self.provider.is_none() {
            self.provider = envelope.event.provider().cloned();
        }
        self.ended_assigned = envelope.is_terminal();
        if let Some(order) = &mut self.order {
            order.take(&envelope.event);
        }
        self.touch_lease();
        self.in_flight.push_back(InFlight {
            envelope: Arc::clone(envelope),
            generation: self.generation,
            batch: None,
            result: None,
        });
        self.gathering_durability = durability;
        self.gathering.push(gathered);
        if self.outstanding == 0 {
            AfterPublish::Send
        } else {
            AfterPublish::Nothing
        }
    }

    /// Hands everything gathered to the store as one append, with its
    /// publishers' replies: the store answers each with its own outcome,
    /// also if the room dies.
    async fn send_gathered(&mut self, myself: &ActorRef<RunMsg>) {
        let Some(append) = self.take_gathered(myself) else {
            return;
        };
        // Waits only when the store's in-flight budget is spent: the store,
        // not this room, is then the bottleneck, and waiting here is the
        // backpressure. Boxed, being the exception (see `RunRoom::handle`).
        if let Err(append) = self.hand_over_now(append) {
            Box::pin(self.hand_over_when_reserved(append)).await;
        }
    }

    /// Hands `append` to the store if its in-flight budget has room now;
    /// gives it back if it has to wait.
    fn hand_over_now(&mut self, append: Append) -> Result<(), Append> {
        match self.store.try_reserve(append.bytes) {
            Ok(Some(permit)) => self.hand_over(append, Ok(permit)),
            Ok(None) => return Err(append),
            Err(error) => self.hand_over(append, Err(error)),
        }
        Ok(())
    }

    async fn hand_over_when_reserved(&mut self, append: Append) {
        let permit = self.store.reserve(append.bytes).await;
        self.hand_over(append, permit);
    }

    fn hand_over(&mut self, append: Append, permit: Result<OwnedSemaphorePermit, StoreError>) {
        match permit {
            Ok(permit) => {
                self.store.enqueue(
                    append.items,
                    self.gathering_durability,
                    permit,
                    append.waiter,
                );
                self.progress.handed(append.last_seq);
            }
            // Not handed to the store: nothing stored.
            Err(error) => append.waiter.done(Err(error)),
        }
    }

    /// What gathered, as one append numbered and counted as outstanding.
    fn take_gathered(&mut self, myself: &ActorRef<RunMsg>) -> Option<Append> {
        let gathered = std::mem::take(&mut self.gathering);
        if gathered.is_empty() {
            return None;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        // What gathered is always the tail of `in_flight`.
        let first = self.in_flight.len() - gathered.len();
        for f in self.in_flight.range_mut(first..) {
            f.batch = Some(batch);
        }
        tracing::trace!(
            run_id = %self.run_id,
            first_seq = gathered[0].envelope.seq,
            events = gathered.len(),
            "append handed to the store"
        );
        let mut items = Vec::with_capacity(gathered.len());
        let mut publishers = Vec::with_capacity(gathered.len());
        for g in gathered {
            items.push(g.stored);
            publishers.push((g.envelope, Some(g.reply), g.permit));
        }
        let last_seq = items.last().map_or(0, |i| i.seq);
        let bytes = encoded_len(&items);
        let waiter = Box::new(RoomAppend {
            room: myself.clone(),
            run_id: self.run_id,
            batch,
            publishers,
        });
        self.outstanding += 1;
        Some(Append {
            items,
            waiter,
            last_seq,
            bytes,
        })
    }

    /// Once the store's answer for an append is recorded (see
    /// [`RunState::record_answer`]): answers and fans out, in seq order,
    /// every event at the front that has its answer, and sends what gathered
    /// meanwhile: first (`send_first`), when nothing has failed, so that the
    /// store writes the next append while the room fans out this one.
    async fn after_answer(
        &mut self,
        myself: &ActorRef<RunMsg>,
        send_first: bool,
    ) -> Result<(), ActorProcessingErr> {
        if send_first {
            self.send_gathered(myself).await;
        }
        self.fan_out_answered()?;
        self.catch_up_remote().await;
        if self.outstanding == 0 {
            self.send_gathered(myself).await;
        }
        Ok(())
    }

    /// Records the store's answer for the events of append `batch`; true if
    /// what gathered should go to the store now (no other append of the
    /// room is there and nothing has failed).
    fn record_answer(&mut self, batch: u64, result: Result<(), StoreError>) -> bool {
        self.outstanding = self.outstanding.saturating_sub(1);
        // An append's events are contiguous in `in_flight`.
        if let Some(first) = self.in_flight.iter().position(|f| f.batch == Some(batch)) {
            for slot in self.in_flight.range_mut(first..) {
                if slot.batch != Some(batch) {
                    break;
                }
                slot.result = Some(result.clone());
            }
        }
        self.outstanding == 0
            && self
                .in_flight
                .iter()
                .all(|f| f.result.as_ref().is_none_or(Result::is_ok))
    }

    /// Answers and fans out, in seq order, every event at the front of
    /// `in_flight` that has the store's answer. Fanned out as one delivery
    /// once the loop is done, even if a failure stops the room partway.
    fn fan_out_answered(&mut self) -> Result<(), ActorProcessingErr> {
        let mut fanned = Vec::new();
        let mut stop = Ok(());
        while self.in_flight.front().is_some_and(|f| f.result.is_some()) {
            let Some(mut done) = self.in_flight.pop_front() else {
                break;
            };
            match done.result.take() {
                Some(Ok(())) => {
                    self.mark_persisted(&done.envelope);
                    fanned.push(done.envelope);
                }
                Some(Err(error)) => {
                    if let Err(failure) = self.failed(done, error) {
                        stop = Err(failure);
                        break;
                    }
                }
                None => {}
            }
        }
        self.fan_out(fanned);
        stop
    }

    fn mark_persisted(&mut self, envelope: &RuntimeEventEnvelope) {
        self.persisted = envelope.seq;
        self.ended_persisted = envelope.is_terminal();
        if self.ended_persisted
            && let Some(leases) = &self.shared.leases
        {
            leases.release(self.run_id);
        }
        self.session_persisted = envelope.session_id;
        if self.provider_persisted.is_none() {
            self.provider_persisted = envelope.event.provider().cloned();
        }
    }

    /// Fans out persisted envelopes, in seq order: to this room's
    /// subscribers as one delivery, to the session and provider rooms as one
    /// message each.
    fn fan_out(&mut self, envelopes: Vec<Arc<RuntimeEventEnvelope>>) {
        if envelopes.is_empty() {
            return;
        }
        tracing::trace!(
            run_id = %self.run_id,
            first_seq = envelopes[0].seq,
            seq = self.persisted,
            "persisted; fanned out"
        );
        // A run's session is learned from its first event, so a batch holds
        // at most two spans of sessions (none, then one).
        for span in envelopes.chunk_by(|a, b| a.session_id == b.session_id) {
            if let Some(session) = span[0].session_id {
                self.shared.fanout_rooms.send(
                    &RuntimeRoom::Session(session),
                    FanoutMsg::Fanout(span.to_vec()),
                );
            }
        }
        if let Some(provider) = &self.provider {
            self.shared.fanout_rooms.send(
                &RuntimeRoom::Provider(provider.clone()),
                FanoutMsg::Fanout(envelopes.clone()),
            );
        }
        if let Some(last) = envelopes.last() {
            self.progress.fanned(last.seq);
        }
        self.feed.push(envelopes);
    }

    /// An append failed. If the store surely holds nothing of it, rewind so
    /// the next publish reuses its seq (later appends of the same pipeline
    /// fail at the store for the gap and are answered as they come). If the
    /// store may hold it (a failed flush, a lost store), the room cannot know
    /// its own last seq any more: it stops, and its next start recovers it
    /// from the store.
    fn failed(&mut self, done: InFlight, error: StoreError) -> Result<(), ActorProcessingErr> {
        let seq = done.envelope.seq;
        let current = done.generation == self.generation;
        // Failures that leave the store exactly as it was.
        let surely_not_stored = matches!(
            error,
            StoreError::WriteFailed { .. }
                | StoreError::Interrupted { .. }
                | StoreError::TooLarge { .. }
                | StoreError::Encode { .. }
                | StoreError::CorruptRunRecord { .. }
        );
        match (&error, current) {
            // A later append of a pipeline whose earlier append failed: the
            // store refused it for the gap.
            (StoreError::SeqConflict { .. }, false) => Ok(()),
            (_, true) if surely_not_stored => {
                tracing::warn!(run_id = %self.run_id, seq, %error, "append failed; nothing stored, seq reused");
                self.assigned = seq - 1;
                self.progress.rewound(seq - 1);
                self.ended_assigned = self.ended_persisted;
                self.session_id = self.session_persisted;
                self.provider.clone_from(&self.provider_persisted);
                if let Some(order) = &mut self.order {
                    order.forget(seq - 1);
                }
                self.generation += 1;
                // Events gathered after it took later seqs: withdraw them,
                // nothing of theirs was sent.
                let withdrawn = self.gathering.len();
                self.in_flight
                    .truncate(self.in_flight.len().saturating_sub(withdrawn));
                for gathered in self.gathering.drain(..) {
                    let _ = gathered.reply.send(Err(earlier_failed(self.run_id)));
                }
                Ok(())
            }
            (_, false) if surely_not_stored => Ok(()),
            // The outcome is in doubt, or the store disagrees with the room
            // about the run (a seq conflict of the room's own pipeline): the
            // room cannot know its last seq any more. It stops; its next
            // start recovers the run from the store and fans out what this
            // room owed (see `Progress`). Every publisher of an append handed
            // to the store hears the store's own answer from its waiter;
            // those still gathering hear that the room stopped before taking
            // their event (nothing stored).
            _ => {
                tracing::error!(run_id = %self.run_id, seq, %error, "append outcome in doubt; room restarts from the store");
                Err(format!("append of seq {seq} in doubt: {error}").into())
            }
        }
    }

    fn attach(&mut self, from_seq: u64) -> Result<RunAttach, HubError> {
        if let Some(error) = &self.broken {
            return Err(HubError::Store(error.clone()));
        }
        let ring = self.feed.ring();
        let covered =
            from_seq > self.persisted || ring.front().is_some_and(|first| first.seq <= from_seq);
        let backlog = covered.then(|| ring.iter().filter(|e| e.seq >= from_seq).cloned().collect());
        Ok(RunAttach {
            live: self.feed.subscribe().receiver,
            persisted_seq: self.persisted,
            ended: self.ended_persisted,
            backlog,
        })
    }
}

/// A publisher's envelope, its reply (`None` once answered), and its share
/// of the hub's in-flight bound, held until the append is durable or failed
/// (so the bound covers what the room still holds).
type Publisher = (
    Arc<RuntimeEventEnvelope>,
    Option<oneshot::Sender<PublishAnswer>>,
    OwnedSemaphorePermit,
);

/// One append of the room at the store. The code that commits it answers
/// its publishers with the store's own word and tells the room once, so
/// that a publisher hears `Ok` exactly when its event is stored, even if
/// the room dies meanwhile (its successor fans out what it owed; see
/// [`Progress`]), and no task waits for the store per append.
struct RoomAppend {
    room: ActorRef<RunMsg>,
    run_id: RunId,
    batch: u64,
    publishers: Vec<Publisher>,
}

impl AppendWaiter for RoomAppend {
    /// `Buffered`: the publishers hear `Ok` once the append is written. The
    /// room hears only once it is flushed, and only then fans it out, so
    /// that no subscriber ever sees what a crash could take back.
    fn written(&mut self) {
        for (envelope, reply, _) in &mut self.publishers {
            if let Some(reply) = reply.take() {
                let _ = reply.send(Ok(Arc::clone(envelope)));
            }
        }
    }

    fn done(self: Box<Self>, result: Result<(), StoreError>) {
        // The room first: a publisher that hears `Ok` and then attaches to
        // the room finds the event fanned out already (its attach reaches
        // the room's mailbox after this message).
        let _ = self.room.send_message(RunMsg::Persisted {
            batch: self.batch,
            result: result.clone(),
        });
        let answer = |envelope: Arc<RuntimeEventEnvelope>| match &result {
            Ok(()) => Ok(envelope),
            // Not the run's next seq: an earlier append of this room failed
            // (the room rewound) or the run was written elsewhere; either
            // way nothing of this one was stored, and a retry goes to a room
            // that knows the run.
            Err(StoreError::SeqConflict { .. }) => Err(earlier_failed(self.run_id)),
            Err(error) => Err(HubError::from(error.clone())),
        };
        for (envelope, reply, _permit) in self.publishers {
            if let Some(reply) = reply {
                let _ = reply.send(answer(envelope));
            }
        }
    }
}

/// The answer to an event that followed a failed one in the same run: the
/// store refused it, or the room withdrew it, so nothing of it was stored.
fn earlier_failed(run_id: RunId) -> HubError {
    HubError::Store(StoreError::WriteFailed {
        message: format!(
            "an earlier event of run {run_id} failed, or the run was written elsewhere; nothing stored"
        ),
    })
}
