//! The router: owns the map from room to room actor, starts a room on first
//! use (as its linked supervisor), forwards requests to it, and stops rooms
//! that have been idle.
//!
//! Session and provider rooms are started only by a subscriber, and no
//! room is started by a live publish (the adapter's): an envelope for a
//! room that does not exist has nobody to reach, and its subscribers to
//! come read it from the store.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::fanout_room::{FanoutMsg, FanoutRoom, FanoutRoomArgs};
use super::progress::Progress;
use super::run_room::{PublishRequest, RunAttach, RunMsg, RunRoom, RunRoomArgs};
use super::{LiveFeed, RoomStats, Shared};
use crate::error::HubError;
use crate::ids::RunId;
use crate::store::Store;
use crate::stream::{RuntimeEventEnvelope, RuntimeRoom};

/// How long the router waits for a room's answer to a stop-if-idle or
/// stats question before giving up on it.
const ROOM_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Every message the router takes.
pub(crate) enum RouterMsg {
    /// Route a publish to its run's room.
    Publish(PublishRequest),
    /// Attach a subscriber to a run room.
    AttachRun {
        run_id: RunId,
        from_seq: u64,
        reply: RpcReplyPort<Result<RunAttach, HubError>>,
    },
    /// Attach a live subscriber to any room (session, provider, or a run
    /// room's live feed).
    AttachLive {
        room: RuntimeRoom,
        reply: RpcReplyPort<Result<LiveFeed, HubError>>,
    },
    /// Live-only fanout of an envelope (the adapter's publish), to the
    /// room if it is running; answered `Ok` at once if it is not.
    LivePublish {
        room: RuntimeRoom,
        envelope: Box<RuntimeEventEnvelope>,
        reply: RpcReplyPort<Result<(), HubError>>,
    },
    /// A room reports it has been idle.
    Idle { room: RuntimeRoom, id: ActorId },
    /// Collect every room's counters.
    Stats(RpcReplyPort<Vec<RoomStats>>),
    /// Stop every room, then the router.
    Shutdown(RpcReplyPort<()>),
    /// Try again to start a run room that died owing fan-out.
    RestartOwing(RunId),
    /// Every half idle timeout: ask every room whether it is idle.
    Tick,
}

#[derive(Clone)]
enum RoomRef {
    /// A run room, with how far it got (read when it dies).
    Run(ActorRef<RunMsg>, Arc<Progress>),
    Fanout(ActorRef<FanoutMsg>),
}

impl RoomRef {
    fn id(&self) -> ActorId {
        match self {
            RoomRef::Run(r, _) => r.get_id(),
            RoomRef::Fanout(r) => r.get_id(),
        }
    }
}

pub(crate) struct Router;

pub(crate) struct RouterArgs {
    pub(crate) store: Store,
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct RouterState {
    store: Store,
    shared: Arc<Shared>,
    rooms: HashMap<RuntimeRoom, RoomRef>,
    by_id: HashMap<ActorId, RuntimeRoom>,
    /// Recent failures of rooms, for the restart intensity. Entries older
    /// than the window are pruned whenever a failure is recorded, so the map
    /// holds only rooms that failed within the window.
    failures: HashMap<RuntimeRoom, VecDeque<Instant>>,
    /// Run rooms that died with events stored and not fanned out, and could
    /// not be started again at once (restart intensity, room bound): where
    /// their fan-out stopped, for their next start. At most `max_rooms`.
    unfanned: HashMap<RunId, u64>,
    /// Run rooms forgotten while owing fan-out, to start again once the
    /// message at hand is handled (at most one per room forgotten in it).
    owing: Vec<RunId>,
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RouterArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // One timer for all rooms: a timer per room costs each a task and a
        // timer entry (about 0.4 KiB) for its whole life.
        myself.send_interval(args.shared.idle_timeout / 2, || RouterMsg::Tick);
        Ok(RouterState {
            store: args.store,
            shared: args.shared,
            rooms: HashMap::new(),
            by_id: HashMap::new(),
            failures: HashMap::new(),
            unfanned: HashMap::new(),
            owing: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RouterMsg::Publish(request) => {
                let run_id = request.event.run_id();
                state.route_publish(&myself, request).await;
                state.shared.run_rooms.routed_done(run_id);
            }
            RouterMsg::AttachRun {
                run_id,
                from_seq,
                reply,
            } => {
                let room = RuntimeRoom::Run(run_id);
                match state.run_room(&myself, &room).await {
                    Ok(room_ref) => {
                        if room_ref
                            .send_message(RunMsg::Attach { from_seq, reply })
                            .is_err()
                        {
                            // The reply port went with the message; the
                            // subscriber sees its call fail and retries.
                            state.forget(&room);
                        }
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            RouterMsg::AttachLive { room, reply } => match state.room(&myself, &room).await {
                // The room answers the caller itself: the router never waits
                // on a room here, and never forgets a room that is merely slow.
                Ok(RoomRef::Run(r, _)) => {
                    if r.send_message(RunMsg::AttachLive(reply)).is_err() {
                        state.forget(&room);
                    }
                }
                Ok(RoomRef::Fanout(r)) => {
                    if r.send_message(FanoutMsg::Attach(reply)).is_err() {
                        state.forget(&room);
                    }
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            RouterMsg::LivePublish {
                room,
                envelope,
                reply,
            } => match state.rooms.get(&room).cloned() {
                // Live only: a room that is not running has no subscriber to
                // reach, and starting one would hold a room for nobody.
                None => {
                    let _ = reply.send(Ok(()));
                }
                Some(RoomRef::Run(r, _)) => {
                    if r.send_message(RunMsg::LivePublish { envelope, reply })
                        .is_err()
                    {
                        state.forget(&room);
                    }
                }
                Some(RoomRef::Fanout(r)) => {
                    if r.send_message(FanoutMsg::LivePublish { envelope, reply })
                        .is_err()
                    {
                        state.forget(&room);
                    }
                }
            },
            RouterMsg::Idle { room, id } => {
                let Some(room_ref) = state.rooms.get(&room).cloned() else {
                    return Ok(());
                };
                if room_ref.id() != id {
                    return Ok(());
                }
                // The room decides, having handled everything sent to it
                // before this question: publishers are withdrawn from a run
                // room first, so what they sent it directly is ahead of the
                // question, and what they send next waits at the router,
                // which sends the room nothing more until it has the answer.
                // A room whose answer comes too late finds the reply port
                // closed and does not stop: the router put it back in use.
                let stopped = match &room_ref {
                    RoomRef::Run(r, _) => {
                        if let RuntimeRoom::Run(run_id) = &room {
                            state.shared.run_rooms.withdraw(*run_id, id);
                        }
                        let stopped = ask(r, RunMsg::StopIfIdle).await;
                        if stopped != Some(true)
                            && let RuntimeRoom::Run(run_id) = &room
                        {
                            state.shared.run_rooms.insert(*run_id, r.clone());
                        }
                        stopped
                    }
                    RoomRef::Fanout(r) => ask(r, FanoutMsg::StopIfIdle).await,
                };
                if stopped == Some(true) {
                    state.forget(&room);
                    state.shared.counters.record_eviction();
                    tracing::debug!(%room, "idle room stopped");
                }
            }
            RouterMsg::Stats(reply) => {
                // Asked concurrently, off the router's own loop.
                let rooms: Vec<RoomRef> = state.rooms.values().cloned().collect();
                tokio::spawn(async move {
                    let answers = rooms.iter().map(|room_ref| async move {
                        match room_ref {
                            RoomRef::Run(r, _) => ask(r, RunMsg::Stats).await,
                            RoomRef::Fanout(r) => ask(r, FanoutMsg::Stats).await,
                        }
                    });
                    let all = futures_util::future::join_all(answers).await;
                    let _ = reply.send(all.into_iter().flatten().collect());
                });
            }
            RouterMsg::Tick => {
                // A room that stopped meanwhile refuses it; the router hears
                // of its end from supervision.
                for room_ref in state.rooms.values() {
                    match room_ref {
                        RoomRef::Run(r, _) => {
                            let _ = r.send_message(RunMsg::Tick);
                        }
                        RoomRef::Fanout(r) => {
                            let _ = r.send_message(FanoutMsg::Tick);
                        }
                    }
                }
            }
            RouterMsg::RestartOwing(run_id) => {
                if state.unfanned.contains_key(&run_id)
                    && !state.rooms.contains_key(&RuntimeRoom::Run(run_id))
                {
                    state.restart_owing(&myself, run_id).await;
                }
            }
            RouterMsg::Shutdown(reply) => {
                state.rooms.clear();
                state.shared.fanout_rooms.clear();
                state.shared.run_rooms.clear();
                state.by_id.clear();
                myself
                    .stop_children_and_wait(Some("hub shutdown".into()), Some(ROOM_ANSWER_TIMEOUT))
                    .await;
                let _ = reply.send(());
                myself.stop(Some("hub shutdown".into()));
            }
        }
        state.restart_owing_rooms(&myself).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                // Every child is a room; the map may have forgotten this one
                // already (a send to it failed first).
                state.shared.counters.record_failure();
                if let Some(room) = state.by_id.get(&cell.get_id()).cloned() {
                    tracing::warn!(%room, %error, "room failed; it restarts from the store on next use (at once if it owes fan-out)");
                    state.forget(&room);
                    state.record_failure(room);
                } else {
                    tracing::warn!(%error, "a room failed after it was replaced");
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(room) = state.by_id.get(&cell.get_id()).cloned() {
                    tracing::debug!(%room, ?reason, "room stopped");
                    state.forget(&room);
                }
            }
            _ => {}
        }
        state.restart_owing_rooms(&myself).await;
        Ok(())
    }
}

impl RouterState {
    fn record_failure(&mut self, room: RuntimeRoom) {
        let window = self.shared.restart_window;
        self.failures.retain(|_, times| {
            times.retain(|t| t.elapsed() < window);
            !times.is_empty()
        });
        let times = self.failures.entry(room.clone()).or_default();
        times.push_back(Instant::now());
        if times.len() > self.shared.max_restarts {
            tracing::error!(%room, failures = times.len(), ?window, "room exceeded its restart intensity");
        }
    }

    /// Starts a run room that died owing fan-out; where the restart
    /// intensity (or the room bound) forbids it now, tries again after the
    /// restart window, so that what it owes does not wait for a publish
    /// that may never come (after a terminal event none does).
    async fn restart_owing(&mut self, myself: &ActorRef<RouterMsg>, run_id: RunId) {
        let room = RuntimeRoom::Run(run_id);
        if let Err(error) = self.room(myself, &room).await {
            tracing::warn!(%room, %error, "room owes fan-out and cannot restart yet; trying again later");
            myself.send_after(self.shared.restart_window, move || {
                RouterMsg::RestartOwing(run_id)
            });
        }
    }

    /// Remembers where a dead run room's fan-out stopped. Bounded: past
    /// `max_rooms` entries an arbitrary one is dropped, with an error log
    /// (its events stay in the store, and session subscribers that resume
    /// read them; only live session and provider subscribers miss them).
    fn unfanned_insert(&mut self, run_id: RunId, fanned: u64) {
        if self.unfanned.len() >= self.shared.max_rooms
            && !self.unfanned.contains_key(&run_id)
            && let Some(dropped) = self.unfanned.keys().next().copied()
        {
            tracing::error!(run_id = %dropped, "too many failed run rooms owe fan-out; forgetting one");
            self.unfanned.remove(&dropped);
        }
        let entry = self.unfanned.entry(run_id).or_insert(fanned);
        *entry = (*entry).min(fanned);
    }

    /// Drops a room from the map. A run room that stopped owing fan-out
    /// (see [`Progress`]) leaves its debt behind, and is started again as
    /// soon as the router has handled the message at hand, whichever way
    /// the router learnt it stopped (a failed send, or the failure notice).
    fn forget(&mut self, room: &RuntimeRoom) {
        if let Some(room_ref) = self.rooms.remove(room) {
            self.by_id.remove(&room_ref.id());
            match (room, &room_ref) {
                (RuntimeRoom::Run(run_id), RoomRef::Run(..)) => {
                    self.shared.run_rooms.withdraw(*run_id, room_ref.id());
                }
                _ => self.shared.fanout_rooms.remove(room, room_ref.id()),
            }
            if let (RuntimeRoom::Run(run_id), RoomRef::Run(_, progress)) = (room, &room_ref)
                && let Some(fanned) = progress.unfanned_from()
            {
                tracing::warn!(%room, fanned, "room stopped with stored events not fanned out; restarting it");
                self.unfanned_insert(*run_id, fanned);
                self.owing.push(*run_id);
            }
        }
    }

    /// Starts the run rooms [`RouterState::forget`] found owing fan-out.
    async fn restart_owing_rooms(&mut self, myself: &ActorRef<RouterMsg>) {
        for run_id in std::mem::take(&mut self.owing) {
            if self.unfanned.contains_key(&run_id)
                && !self.rooms.contains_key(&RuntimeRoom::Run(run_id))
            {
                self.restart_owing(myself, run_id).await;
            }
        }
    }

    /// Hands a publish that came through the router to its run room,
    /// starting the room if need be.
    async fn route_publish(&mut self, myself: &ActorRef<RouterMsg>, request: PublishRequest) {
        let room = RuntimeRoom::Run(request.event.run_id());
        let mut message = RunMsg::Publish(request);
        // A room that stopped since the map last heard of it hands the
        // message back; start a fresh one (it recovers from the store).
        for _ in 0..2 {
            match self.run_room(myself, &room).await {
                Ok(room_ref) => match room_ref.send_message(message) {
                    Ok(()) => return,
                    Err(ractor::MessagingErr::SendErr(back)) => {
                        self.forget(&room);
                        message = back;
                    }
                    Err(_) => return,
                },
                Err(error) => {
                    if let RunMsg::Publish(request) = message {
                        let _ = request.reply.send(Err(error));
                    }
                    return;
                }
            }
        }
        if let RunMsg::Publish(request) = message {
            let _ = request
                .reply
                .send(Err(unavailable(&room, "room keeps stopping")));
        }
    }

    async fn run_room(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        room: &RuntimeRoom,
    ) -> Result<ActorRef<RunMsg>, HubError> {
        match self.room(myself, room).await? {
            RoomRef::Run(r, _) => Ok(r),
            RoomRef::Fanout(_) => Err(unavailable(room, "not a run room")),
        }
    }

    /// The room's actor, started if it is not running.
    async fn room(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        room: &RuntimeRoom,
    ) -> Result<RoomRef, HubError> {
        if let Some(room_ref) = self.rooms.get(room) {
            return Ok(room_ref.clone());
        }
        if let Some(failures) = self.failures.get(room) {
            let window = self.shared.restart_window;
            let recent = failures.iter().filter(|t| t.elapsed() < window).count();
            if recent > self.shared.max_restarts {
                return Err(HubError::RoomFailed {
                    room: room.to_string(),
                    failures: recent,
                    window,
                });
            }
        }
        if self.rooms.len() >= self.shared.max_rooms {
            return Err(HubError::TooManyRooms {
                room: room.to_string(),
                limit: self.shared.max_rooms,
            });
        }
        let room_ref = match room {
            RuntimeRoom::Run(run_id) => {
                let progress = Arc::new(Progress::default());
                let args = RunRoomArgs {
                    run_id: *run_id,
                    store: self.store.clone(),
                    router: myself.clone(),
                    shared: Arc::clone(&self.shared),
                    progress: Arc::clone(&progress),
                    unfanned_from: self.unfanned.get(run_id).copied(),
                };
                let (r, _) = Actor::spawn_linked(None, RunRoom, args, myself.get_cell())
                    .await
                    .map_err(|e| unavailable(room, &e.to_string()))?;
                // The new room owns what its predecessor owed from now on.
                self.unfanned.remove(run_id);
                RoomRef::Run(r, progress)
            }
            RuntimeRoom::Session(_) | RuntimeRoom::Provider(_) => {
                let args = FanoutRoomArgs {
                    room: room.clone(),
                    router: myself.clone(),
                    store: self.store.clone(),
                    shared: Arc::clone(&self.shared),
                };
                let (r, _) = Actor::spawn_linked(None, FanoutRoom, args, myself.get_cell())
                    .await
                    .map_err(|e| unavailable(room, &e.to_string()))?;
                RoomRef::Fanout(r)
            }
        };
        self.shared.counters.record_start();
        self.by_id.insert(room_ref.id(), room.clone());
        match (room, &room_ref) {
            (RuntimeRoom::Run(run_id), RoomRef::Run(actor, _)) => {
                self.shared.run_rooms.insert(*run_id, actor.clone());
            }
            (_, RoomRef::Fanout(actor)) => {
                self.shared.fanout_rooms.insert(room.clone(), actor.clone());
            }
            _ => {}
        }
        self.rooms.insert(room.clone(), room_ref.clone());
        Ok(room_ref)
    }
}

fn unavailable(room: &RuntimeRoom, reason: &str) -> HubError {
    HubError::RoomUnavailable {
        room: room.to_string(),
        reason: reason.to_string(),
    }
}

/// Asks a room a question, giving up (with `None`) if it does not answer in
/// time or has stopped.
async fn ask<M: ractor::Message, T: Send + 'static>(
    room: &ActorRef<M>,
    message: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Option<T> {
    match room.call(message, Some(ROOM_ANSWER_TIMEOUT)).await {
        Ok(ractor::rpc::CallResult::Success(answer)) => Some(answer),
        _ => None,
    }
}
