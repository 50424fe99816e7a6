//! Where things live in sled: one tree, keys prefixed by kind.
//!
//! | key                                        | value                          |
//! |--------------------------------------------|--------------------------------|
//! | `m` `store`                                | [`StoreMeta`]                  |
//! | `m` `ordinal`                              | next run ordinal (u64)         |
//! | `r` run_id(16)                             | [`RunRecord`]                  |
//! | `e` run_id(16) first_seq(8, big-endian)    | segment: envelopes first_seq.. |
//! | `s` session(16) ordinal(8, BE) run_id(16)  | version byte only              |
//!
//! One tree, so that one `apply_batch` covers a commit's segments, run records
//! and index entries atomically. Big-endian seqs make sled's byte order the
//! seq order. Every value starts with the format-version byte
//! ([`crate::codec::FORMAT_VERSION`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{ProviderId, RunId};

pub(crate) const META_STORE: &[u8] = b"mstore";
pub(crate) const META_ORDINAL: &[u8] = b"mordinal";
const RUN: u8 = b'r';
const SEGMENT: u8 = b'e';
const SESSION: u8 = b's';

/// The store's identity, written once at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoreMeta {
    pub(crate) epoch: Uuid,
    pub(crate) format_version: u8,
    pub(crate) created_at: DateTime<Utc>,
}

/// What the store knows of a run besides its events: enough for a room to
/// recover without reading the log. Written when the run starts and when its
/// session, provider or end changes, so `last_seq` is the run's last seq as
/// of that write; the run's last seq now is where its last segment ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    pub(crate) last_seq: u64,
    pub(crate) session_id: Option<Uuid>,
    pub(crate) provider: Option<ProviderId>,
    /// Store-wide start order of runs; orders a session's runs.
    pub(crate) ordinal: u64,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) ended_at: Option<DateTime<Utc>>,
}

pub(crate) fn run_key(run: RunId) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = RUN;
    key[1..].copy_from_slice(run.as_uuid().as_bytes());
    key
}

/// The run named by a run-record key.
pub(crate) fn run_key_run(key: &[u8]) -> Option<RunId> {
    let (&kind, id) = key.split_first()?;
    if kind != RUN {
        return None;
    }
    let bytes: [u8; 16] = id.try_into().ok()?;
    Some(RunId::from_uuid(Uuid::from_bytes(bytes)))
}

/// The smallest key above every run record.
pub(crate) const RUN_KEYS_END: [u8; 1] = [RUN + 1];

pub(crate) fn segment_key(run: RunId, first_seq: u64) -> [u8; 25] {
    let mut key = [0u8; 25];
    key[0] = SEGMENT;
    key[1..17].copy_from_slice(run.as_uuid().as_bytes());
    key[17..].copy_from_slice(&first_seq.to_be_bytes());
    key
}

/// The first seq of a segment key, if `key` is one of `run`'s.
pub(crate) fn segment_first_seq(run: RunId, key: &[u8]) -> Option<u64> {
    let (prefix, seq) = key.split_at_checked(17)?;
    if prefix[0] != SEGMENT || &prefix[1..] != run.as_uuid().as_bytes() {
        return None;
    }
    Some(u64::from_be_bytes(seq.try_into().ok()?))
}

pub(crate) fn session_key(session: Uuid, ordinal: u64, run: RunId) -> [u8; 41] {
    let mut key = [0u8; 41];
    key[0] = SESSION;
    key[1..17].copy_from_slice(session.as_bytes());
    key[17..25].copy_from_slice(&ordinal.to_be_bytes());
    key[25..].copy_from_slice(run.as_uuid().as_bytes());
    key
}

pub(crate) fn session_prefix(session: Uuid) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = SESSION;
    key[1..].copy_from_slice(session.as_bytes());
    key
}

/// The run named by a session index key.
pub(crate) fn session_key_run(key: &[u8]) -> Option<RunId> {
    let bytes: [u8; 16] = key.get(25..41)?.try_into().ok()?;
    Some(RunId::from_uuid(Uuid::from_bytes(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_keys_sort_by_seq() {
        let run = RunId::new();
        assert!(segment_key(run, 255) < segment_key(run, 256));
        assert_eq!(segment_first_seq(run, &segment_key(run, 42)), Some(42));
        assert_eq!(segment_first_seq(RunId::new(), &segment_key(run, 42)), None);
    }

    #[test]
    fn session_keys_sort_by_ordinal_and_name_their_run() {
        let session = Uuid::now_v7();
        let (a, b) = (RunId::new(), RunId::new());
        assert!(session_key(session, 2, a) < session_key(session, 10, b));
        assert!(session_key(session, 2, a).starts_with(&session_prefix(session)));
        assert_eq!(session_key_run(&session_key(session, 2, a)), Some(a));
    }
}
