//! The running session and provider rooms, readable by every run room, so
//! that a run room fans out to them directly instead of through the router
//! (which would otherwise carry every fanned-out batch of every run).
//!
//! Only the router writes it: it adds a room when it starts one and removes
//! it when it forgets it, so it holds exactly the rooms in the router's map
//! (at most `Config::max_rooms`). A run room that finds no room here drops
//! the batch, as the router did: nobody listens there, and a subscriber to
//! come reads the store.

use std::collections::HashMap;
use std::sync::RwLock;

use ractor::{ActorId, ActorRef};

use super::fanout_room::FanoutMsg;
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
