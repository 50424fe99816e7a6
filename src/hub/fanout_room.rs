//! Session and provider rooms: they receive the envelopes their run rooms
//! have persisted and fan them out to their live subscribers.
//!
//! They keep no order of their own: each run's envelopes arrive in seq order
//! from its run room (one sender, FIFO), and a session subscriber restores
//! anything it missed from the store, per run. A provider subscriber that
//! falls out of the ring is told how much it skipped.
//!
//! On a shared log (NATS) a session room with subscribers also follows the
//! log for the runs other hosts write (see [`SessionLog`]).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::feed::Feed;
use super::router::RouterMsg;
use super::session_log::SessionLog;
use super::{LiveFeed, RoomStats, Shared};
use crate::error::HubError;
use crate::ids::RunId;
use crate::store::{IndexedRun, Store};
use crate::stream::{RuntimeEventEnvelope, RuntimeRoom};

/// Every message a session or provider room takes.
pub(crate) enum FanoutMsg {
    /// Persisted envelopes of one run, sent by its run room directly,
    /// in seq order.
    Fanout(Vec<Arc<RuntimeEventEnvelope>>),
    /// Attach a live subscriber.
    Attach(RpcReplyPort<Result<LiveFeed, HubError>>),
    /// Fan out an envelope published through `RuntimeStreamAdapter`.
    /// (Boxed: the largest variant sizes every message and the room's
    /// `handle` future.)
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
    /// Runs that joined the session, from its index in the shared log.
    /// Answered once handled, as is `Remote`, so a tail keeps at most one
    /// batch in the mailbox.
    RunsJoined {
        runs: Vec<IndexedRun>,
        done: RpcReplyPort<()>,
    },
    /// Envelopes of one of the session's runs, from the shared log, in seq
    /// order.
    Remote {
        envelopes: Vec<RuntimeEventEnvelope>,
        done: RpcReplyPort<()>,
    },
    /// A tail of the shared log stopped: the index's (`run_id` `None`) or a
    /// run's, with its id, so that the end of a replaced tail is ignored.
    TailEnded { run_id: Option<RunId>, tail: u64 },
    /// Time to follow the shared log again after a failure.
    Refollow,
}

pub(crate) struct FanoutRoom;

pub(crate) struct FanoutRoomArgs {
    pub(crate) room: RuntimeRoom,
    pub(crate) router: ActorRef<RouterMsg>,
    pub(crate) store: Store,
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct FanoutState {
    room: RuntimeRoom,
    router: ActorRef<RouterMsg>,
    feed: Feed,
    /// A session room's following of the shared log; `None` for a provider
    /// room.
    log: Option<SessionLog>,
}

impl FanoutState {
    /// Fans out what of `envelopes` this room has not yet.
    fn push(&mut self, envelopes: Vec<Arc<RuntimeEventEnvelope>>) {
        let envelopes = match self.log.as_mut() {
            Some(log) => log.fresh(envelopes),
            None => envelopes,
        };
        if !envelopes.is_empty() {
            self.feed.push(envelopes);
        }
    }
}

impl Actor for FanoutRoom {
    type Msg = FanoutMsg;
    type State = FanoutState;
    type Arguments = FanoutRoomArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: FanoutRoomArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let log = match &args.room {
            RuntimeRoom::Session(session_id) => Some(SessionLog::new(
                *session_id,
                args.store,
                Arc::clone(&args.shared),
            )),
            _ => None,
        };
        Ok(FanoutState {
            room: args.room,
            router: args.router,
            feed: Feed::new(args.shared),
            log,
        })
    }

    /// As a run room's (see `RunRoom::handle`), this future lives as long
    /// as the room, as large as its largest arm: the shared log's awaits,
    /// which only session rooms on NATS make, are boxed.
    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            FanoutMsg::Fanout(envelopes) => state.push(envelopes),
            FanoutMsg::Attach(reply) => {
                // Following before answering: whatever another host appends
                // after the subscriber's catch-up reaches it live.
                if let Some(log) = state.log.as_mut()
                    && let Err(error) = Box::pin(log.attach(&myself)).await
                {
                    let _ = reply.send(Err(error.into()));
                    return Ok(());
                }
                let _ = reply.send(Ok(state.feed.subscribe()));
            }
            FanoutMsg::RunsJoined { runs, done } => {
                if let Some(log) = state.log.as_mut() {
                    Box::pin(log.joined(&myself, runs)).await;
                }
                let _ = done.send(());
            }
            FanoutMsg::Remote { envelopes, done } => {
                state.push(envelopes.into_iter().map(Arc::new).collect());
                let _ = done.send(());
            }
            FanoutMsg::TailEnded { run_id, tail } => {
                if let Some(log) = state.log.as_mut() {
                    log.tail_ended(&myself, run_id, tail);
                }
            }
            FanoutMsg::Refollow => {
                let subscribed = state.feed.has_subscribers();
                if let Some(log) = state.log.as_mut() {
                    Box::pin(log.retry(&myself, subscribed)).await;
                }
            }
            FanoutMsg::LivePublish { envelope, reply } => {
                state.feed.live_publish(envelope);
                let _ = reply.send(Ok(()));
            }
            FanoutMsg::Tick => {
                if state.feed.is_idle() {
                    let _ = state.router.send_message(RouterMsg::Idle {
                        room: state.room.clone(),
                        id: myself.get_id(),
                    });
                }
            }
            FanoutMsg::StopIfIdle(reply) => {
                let idle = state.feed.is_idle();
                // Stops only if the router heard the answer: one that gave up
                // waiting has put the room back in use (see `RouterMsg::Idle`).
                if reply.send(idle).is_ok() && idle {
                    myself.stop(Some("idle".into()));
                }
            }
            FanoutMsg::Stats(reply) => {
                let _ = reply.send(state.feed.stats(state.room.clone(), 0, None));
            }
        }
        Ok(())
    }
}
