//! Who may read which room: bearer tokens mapped to the rooms they grant.
//!
//! behest-stream's rooms carry no authorization (see `RuntimeRoom`): they
//! say where events go, not who may see them. A transport must decide
//! before it subscribes, and this is the place in this example. A real
//! service would check a session cookie or a signed token against its own
//! user model; the shape stays the same: resolve the caller, then check the
//! room, and only then call `EventHub::subscribe`.

use std::collections::HashMap;
use std::sync::RwLock;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use behest_stream::{RunId, RuntimeRoom};
use uuid::Uuid;

/// Why a request may not read a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one nobody issued: 401.
    Unauthenticated,
    /// A known token that does not grant this room: 403.
    Forbidden,
}

/// Tokens and the rooms each may read.
///
/// A grant of a session room also covers the session's runs, but only the
/// runs registered with [`Tokens::grant_run`]: the host knows a run's
/// session when it creates the run, before any event exists, so a client
/// may subscribe to a run that has not started yet. (Reading the session
/// from the store instead would deny such a client until `RunStarted` is
/// stored.)
#[derive(Debug, Default)]
pub struct Tokens {
    /// Token -> rooms, in the order granted. A few rooms per token, so a
    /// vector; the lock is never held across an await.
    grants: RwLock<HashMap<String, Vec<RuntimeRoom>>>,
}

impl Tokens {
    /// Issues a fresh random token that grants `rooms`.
    pub fn issue(&self, rooms: Vec<RuntimeRoom>) -> String {
        // 122 random bits from a v4 UUID, without dashes to be easy to copy.
        let token = Uuid::new_v4().simple().to_string();
        self.write().insert(token.clone(), rooms);
        token
    }

    /// Registers `run_id` as a run of `session`: every token granting the
    /// session now also grants the run.
    pub fn grant_run(&self, session: Uuid, run_id: RunId) {
        let session = RuntimeRoom::Session(session);
        for rooms in self.write().values_mut() {
            if rooms.contains(&session) {
                rooms.push(RuntimeRoom::Run(run_id));
            }
        }
    }

    /// The caller's token with the first session it grants, where the demo
    /// creates its runs.
    pub fn session_of<'t>(&self, token: Option<&'t str>) -> Result<(&'t str, Uuid), Denied> {
        let grants = self.read();
        let token = token.ok_or(Denied::Unauthenticated)?;
        let rooms = grants.get(token).ok_or(Denied::Unauthenticated)?;
        let session = rooms.iter().find_map(|room| match room {
            RuntimeRoom::Session(session) => Some(*session),
            _ => None,
        });
        session
            .map(|session| (token, session))
            .ok_or(Denied::Forbidden)
    }

    /// Whether `token` may read `room`. (A lookup by hash is not a
    /// constant-time comparison; a service would look tokens up by a keyed
    /// hash of them, or verify a signature, rather than compare secrets.)
    pub fn check(&self, token: Option<&str>, room: &RuntimeRoom) -> Result<(), Denied> {
        let grants = self.read();
        let rooms = token
            .and_then(|token| grants.get(token))
            .ok_or(Denied::Unauthenticated)?;
        if rooms.contains(room) {
            Ok(())
        } else {
            Err(Denied::Forbidden)
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<RuntimeRoom>>> {
        // A panic while holding the lock cannot leave the map half-written
        // (every write is one insert or push), so a poisoned lock is usable.
        self.grants.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Vec<RuntimeRoom>>> {
        self.grants.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The caller's token: `Authorization: Bearer <token>`, or else the
/// `token` query parameter, because a browser's `EventSource` cannot set
/// headers. A token in a URL ends up in logs and history; a deployment
/// would rather use a cookie (which `EventSource` sends) or a short-lived
/// token minted for this one stream.
///
/// An `Authorization` header that is not a bearer token yields `None`
/// (401), not a fall-back to the query: a client that sent credentials of
/// another scheme should hear that they were not accepted.
pub fn token_from<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    match headers.get(AUTHORIZATION) {
        Some(value) => {
            let value = value.to_str().ok()?;
            let (scheme, token) = value.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim())
                .filter(|token| !token.is_empty())
        }
        None => query_token.filter(|token| !token.is_empty()),
    }
}
