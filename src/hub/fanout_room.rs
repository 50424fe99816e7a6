//! Session and provider rooms: they receive the envelopes their run rooms
//! have persisted and fan them out to their live subscribers.
//!
//! They keep no order of their own: each run's envelopes arrive in seq order
//! from its run room (one sender, FIFO), and a session subscriber restores
//! anything it missed from the store, per run. A provider subscriber that
//! falls out of the ring is told how much it skipped.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::feed::Feed;
use super::router::RouterMsg;
use super::{LiveFeed, RoomStats, Shared};
use crate::error::HubError;
use crate::stream::{RuntimeEventEnvelope, RuntimeRoom};

/// Every message a session or provider room takes.
pub(crate) enum FanoutMsg {
    /// Persisted envelopes of one run from its room (through the router),
    /// in seq order.
    Fanout(Vec<Arc<RuntimeEventEnvelope>>),
    /// Attach a live subscriber.
    Attach(RpcReplyPort<Result<LiveFeed, HubError>>),
    /// Fan out an envelope published through `RuntimeStreamAdapter`.
    LivePublish {
        envelope: RuntimeEventEnvelope,
        reply: RpcReplyPort<Result<(), HubError>>,
    },
    /// Periodic check for idleness.
    Tick,
    /// From the router: stop if still idle, and say whether it did.
    StopIfIdle(RpcReplyPort<bool>),
    /// Report counters.
    Stats(RpcReplyPort<RoomStats>),
}

pub(crate) struct FanoutRoom;

pub(crate) struct FanoutRoomArgs {
    pub(crate) room: RuntimeRoom,
    pub(crate) router: ActorRef<RouterMsg>,
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct FanoutState {
    room: RuntimeRoom,
    router: ActorRef<RouterMsg>,
    feed: Feed,
}

impl Actor for FanoutRoom {
    type Msg = FanoutMsg;
    type State = FanoutState;
    type Arguments = FanoutRoomArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FanoutRoomArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(args.shared.idle_timeout / 2, || FanoutMsg::Tick);
        Ok(FanoutState {
            room: args.room,
            router: args.router,
            feed: Feed::new(args.shared),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            FanoutMsg::Fanout(envelopes) => state.feed.push(envelopes),
            FanoutMsg::Attach(reply) => {
                let _ = reply.send(Ok(state.feed.subscribe()));
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
                let _ = reply.send(idle);
                if idle {
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
