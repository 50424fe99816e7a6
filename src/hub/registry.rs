//! The running rooms, readable without the router, so that the router only
//! starts and supervises rooms and is not on the path of every event:
//! - [`RunRooms`]: run rooms, which publishers send to directly;
//! - [`FanoutRooms`]: session and provider rooms, which run rooms fan out
//!   to directly.
//!
//! Only the router adds rooms; a publisher whose send to a run room fails
//! (it stopped) removes that room, and the router withdraws a room it asks
//! to stop.
//!
//! [`FanoutRooms`] holds the session and provider rooms in the router's map
//! (at most `Config::max_rooms`). A run room that finds no room there drops
//! the batch, as the router did: nobody listens there, and a subscriber to
//! come reads the store.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, RwLock};

use ractor::{ActorId, ActorRef};

use super::fanout_room::FanoutMsg;
use super::router::RouterMsg;
use super::run_room::{PublishRequest, RunMsg};
use crate::error::HubError;
use crate::ids::RunId;
use crate::stream::RuntimeRoom;

/// Session and provider rooms by room.
#[derive(Debug, Default)]
pub(crate) struct FanoutRooms {
    rooms: RwLock<HashMap<RuntimeRoom, ActorRef<FanoutMsg>>>,
}

impl FanoutRooms {
    /// The router started `room`.
    pub(crate) fn insert(&self, room: RuntimeRoom, actor: ActorRef<FanoutMsg>) {
        self.write().insert(room, actor);
    }

    /// The router forgot `room`'s actor `id` (a newer actor of the same
    /// room is left alone).
    pub(crate) fn remove(&self, room: &RuntimeRoom, id: ActorId) {
        let mut rooms = self.write();
        if rooms.get(room).is_some_and(|actor| actor.get_id() == id) {
            rooms.remove(room);
        }
    }

    /// The router stopped every room.
    pub(crate) fn clear(&self) {
        self.write().clear();
    }

    /// Hands `message` to `room` if it is running; a room that stopped
    /// meanwhile refuses it, which is the same as not running.
    pub(crate) fn send(&self, room: &RuntimeRoom, message: FanoutMsg) {
        let actor = self
            .rooms
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(room)
            .cloned();
        if let Some(actor) = actor {
            let _ = actor.send_message(message);
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<RuntimeRoom, ActorRef<FanoutMsg>>> {
        self.rooms
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Shards of [`RunRooms`]: publishers of different runs rarely wait on one
/// another's lock.
const RUN_ROOM_SHARDS: usize = 16;

/// The running run rooms, which publishers send to directly, so that a
/// publish does not pass through the router (which would otherwise handle
/// every event of every run).
///
/// A publish takes the router's path (which starts the room if need be)
/// when the room is not here, when a send to it fails (it stopped), and
/// while publishes of the run are still with the router: `routed` counts
/// those, and a direct send waits until it is back to 0, so that it never
/// overtakes an earlier publish still queued at the router ("publishes
/// submitted in order get seqs in that order").
///
/// Bounded: an entry is either a room in the router's map (at most
/// `Config::max_rooms`) or counts publishes in flight (at most
/// `Config::max_in_flight_publishes`).
#[derive(Debug)]
pub(crate) struct RunRooms {
    shards: Box<[Mutex<HashMap<RunId, RunEntry>>]>,
}

#[derive(Debug, Default)]
struct RunEntry {
    room: Option<ActorRef<RunMsg>>,
    /// Publishes of this run handed to the router and not yet on to a room.
    routed: usize,
}

impl RunEntry {
    /// Neither a room to send to nor publishes at the router: nothing to
    /// keep the entry for.
    fn is_unused(&self) -> bool {
        self.room.is_none() && self.routed == 0
    }
}

impl Default for RunRooms {
    fn default() -> Self {
        Self {
            shards: (0..RUN_ROOM_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl RunRooms {
    fn shard(&self, run_id: RunId) -> MutexGuard<'_, HashMap<RunId, RunEntry>> {
        let index = (run_id.as_uuid().as_u128() % RUN_ROOM_SHARDS as u128) as usize;
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands `request` to its run room directly if it may, or else to the
    /// router. The send happens under the shard's lock, so that the router,
    /// once [`RunRooms::withdraw`] returns, knows that no direct send to the
    /// room is still to come.
    ///
    /// # Errors
    ///
    /// [`HubError::Closed`] if the router has stopped (the hub shut down);
    /// the request is dropped unanswered.
    pub(crate) fn publish(
        &self,
        router: &ActorRef<RouterMsg>,
        request: PublishRequest,
    ) -> Result<(), HubError> {
        let run_id = request.event.run_id();
        let mut shard = self.shard(run_id);
        let entry = shard.entry(run_id).or_default();
        let mut request = request;
        if entry.routed == 0
            && let Some(room) = &entry.room
        {
            match room.send_message(RunMsg::Publish(request)) {
                Ok(()) => return Ok(()),
                Err(ractor::MessagingErr::SendErr(RunMsg::Publish(back))) => {
                    // Stopped: the router learns of it and starts another.
                    entry.room = None;
                    request = back;
                }
                Err(_) => return Ok(()),
            }
        }
        match router.send_message(RouterMsg::Publish(request)) {
            Ok(()) => {
                entry.routed += 1;
                Ok(())
            }
            Err(_) => {
                if entry.is_unused() {
                    shard.remove(&run_id);
                }
                Err(HubError::Closed)
            }
        }
    }

    /// The router has handed on (or answered) a publish of `run_id` that
    /// came through it.
    pub(crate) fn routed_done(&self, run_id: RunId) {
        let mut shard = self.shard(run_id);
        if let Some(entry) = shard.get_mut(&run_id) {
            entry.routed = entry.routed.saturating_sub(1);
            if entry.is_unused() {
                shard.remove(&run_id);
            }
        }
    }

    /// The router started `room` for `run_id` (or kept it after asking it
    /// to stop): publishers may send to it directly.
    pub(crate) fn insert(&self, run_id: RunId, room: ActorRef<RunMsg>) {
        self.shard(run_id).entry(run_id).or_default().room = Some(room);
    }

    /// Publishers stop sending to `run_id`'s room `id` (a newer room of the
    /// run is left alone): every direct send to it has happened when this
    /// returns, so a message the router sends it next comes after them.
    pub(crate) fn withdraw(&self, run_id: RunId, id: ActorId) {
        let mut shard = self.shard(run_id);
        if let Some(entry) = shard.get_mut(&run_id)
            && entry.room.as_ref().is_some_and(|room| room.get_id() == id)
        {
            entry.room = None;
            if entry.is_unused() {
                shard.remove(&run_id);
            }
        }
    }

    /// The router stops every room, and then itself: publishes still at
    /// the router are dropped with it (their publishers hear the room
    /// stopped), so nothing is left to count.
    pub(crate) fn clear(&self) {
        for shard in &*self.shards {
            shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clear();
        }
    }
}
