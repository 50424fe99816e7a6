//! Session and provider rooms: they receive the envelopes their run rooms
//! have persisted and fan them out to their live subscribers.
//!
//! They keep no order of their own: each run's envelopes arrive in seq order
//! from its run room (one sender, FIFO), and a session subscriber restores
//! anything it missed from the store, per run. A provider subscriber that
//! falls out of the ring is told how much it skipped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::broadcast;

use super::router::RouterMsg;
use super::{Delivery, RoomStats, Shared};
use crate::stream::{RuntimeEventEnvelope, RuntimeRoom};

/// Every message a session or provider room takes.
pub(crate) enum FanoutMsg {
    /// A persisted envelope from a run room (through the router).
    Fanout(Arc<RuntimeEventEnvelope>),
    /// Attach a live subscriber.
    Attach(RpcReplyPort<broadcast::Receiver<Delivery>>),
    /// Fan out an envelope published through `RuntimeStreamAdapter`.
    LivePublish {
        envelope: RuntimeEventEnvelope,
        reply: RpcReplyPort<()>,
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
    shared: Arc<Shared>,
    live: broadcast::Sender<Delivery>,
    /// Recent envelopes, to recognise one a host publishes again through the
    /// adapter after the hub already fanned it out.
    ring: VecDeque<Arc<RuntimeEventEnvelope>>,
    last_active: Instant,
    fanned_out: u64,
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
        let (live, _) = broadcast::channel(args.shared.ring_capacity);
        myself.send_interval(args.shared.idle_timeout / 2, || FanoutMsg::Tick);
        Ok(FanoutState {
            room: args.room,
            router: args.router,
            ring: VecDeque::with_capacity(args.shared.ring_capacity.min(64)),
            shared: args.shared,
            live,
            last_active: Instant::now(),
            fanned_out: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            FanoutMsg::Fanout(envelope) => {
                if state.ring.len() == state.shared.ring_capacity {
                    state.ring.pop_front();
                }
                state.ring.push_back(Arc::clone(&envelope));
                state.fanned_out += 1;
                let _ = state.live.send(Delivery {
                    envelope,
                    persisted: true,
                });
            }
            FanoutMsg::Attach(reply) => {
                state.last_active = Instant::now();
                let _ = reply.send(state.live.subscribe());
            }
            FanoutMsg::LivePublish { envelope, reply } => {
                state.last_active = Instant::now();
                if !state.ring.iter().any(|e| e.event_id == envelope.event_id) {
                    let _ = state.live.send(Delivery {
                        envelope: Arc::new(envelope),
                        persisted: false,
                    });
                }
                let _ = reply.send(());
            }
            FanoutMsg::Tick => {
                if state.is_idle() {
                    let _ = state.router.send_message(RouterMsg::Idle {
                        room: state.room.clone(),
                        id: myself.get_id(),
                    });
                }
            }
            FanoutMsg::StopIfIdle(reply) => {
                let idle = state.is_idle();
                let _ = reply.send(idle);
                if idle {
                    myself.stop(Some("idle".into()));
                }
            }
            FanoutMsg::Stats(reply) => {
                let _ = reply.send(RoomStats {
                    room: state.room.clone(),
                    subscribers: state.live.receiver_count(),
                    ring_len: state.ring.len(),
                    ring_capacity: state.shared.ring_capacity,
                    in_flight: 0,
                    last_seq: None,
                    fanned_out: state.fanned_out,
                });
            }
        }
        Ok(())
    }
}

impl FanoutState {
    fn is_idle(&self) -> bool {
        self.live.receiver_count() == 0 && self.last_active.elapsed() >= self.shared.idle_timeout
    }
}
