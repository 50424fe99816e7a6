//! Where things live in sled: one tree, keys prefixed by kind.
//!
//! | key                                        | value                          |
//! |--------------------------------------------|--------------------------------|
//! | `m` `store`                                | [`StoreMeta`]                  |
//! | `m` `ordinal`                              | next run ordinal (u64)         |
//! | `r` run_id(16)                             | [`RunRecord`]                  |
//! | `e` run_id(16) first_seq(8, big-endian)    | segment: envelopes first_seq.. |
//! | `w` record(8, BE)                          | commit record (commit_log.rs)  |
//! | `s` session(16) ordinal(8, BE) run_id(16)  | version byte only              |
//! | `x` session(16) ordinal(8, BE) run_id(16)  | version byte only              |
//! | `t` ended_at(8, BE ms) run_id(16)          | version byte only              |
//! | `m` `ended-index`                          | version byte: `t` is complete  |
//!
//! One tree, so that one `apply_batch` covers a commit's segments, run records
//! and index entries atomically. Big-endian seqs make sled's byte order the
//! seq order. The `t` index orders ended runs by when they ended, so that
//! retention reads only the runs it removes. Retention moves a removed run's
//! `s` entry to `x`: the session's live index stays what it was, while the
//! session's readers can still tell "a removed run of this session" (whose
//! partly read history must be reported gone) from "a run of another
//! session" without reading a record per run a cursor names. Every value starts with the format-version byte
//! ([`crate::codec::FORMAT_VERSION`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{ProviderId, RunId};

pub(crate) const META_STORE: &[u8] = b"mstore";
pub(crate) const META_ORDINAL: &[u8] = b"mordinal";
/// Present once every ended run has its `t` entry (stores made before the
/// index existed get theirs when first opened by a build that has it).
pub(crate) const META_ENDED_INDEX: &[u8] = b"mended-index";
const RUN: u8 = b'r';
const SEGMENT: u8 = b'e';
const SESSION: u8 = b's';
const ENDED: u8 = b't';
const REMOVED_FROM_SESSION: u8 = b'x';
const COMMIT: u8 = b'w';

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
    /// When retention removed the run's events. The record stays, as a
    /// tombstone: it keeps the run ended (no event may be stored under its
    /// id again) and lets a resume into it fail with an explicit error. Its
    /// `last_seq` is then the run's final seq (the record is always written
    /// when a run ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) removed_at: Option<DateTime<Utc>>,
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

/// The key of commit record `number`: records sort in commit order.
pub(crate) fn commit_key(number: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = COMMIT;
    key[1..].copy_from_slice(&number.to_be_bytes());
    key
}

/// The number of a commit-record key.
pub(crate) fn commit_number(key: &[u8]) -> Option<u64> {
    let (&kind, number) = key.split_first()?;
    if kind != COMMIT {
        return None;
    }
    Some(u64::from_be_bytes(number.try_into().ok()?))
}

/// The prefix of every commit-record key.
pub(crate) const COMMIT_PREFIX: [u8; 1] = [COMMIT];

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

/// A run of `session` that retention removed: its `s` entry, moved.
pub(crate) fn removed_session_key(session: Uuid, ordinal: u64, run: RunId) -> [u8; 41] {
    let mut key = session_key(session, ordinal, run);
    key[0] = REMOVED_FROM_SESSION;
    key
}

pub(crate) fn removed_session_prefix(session: Uuid) -> [u8; 17] {
    let mut key = session_prefix(session);
    key[0] = REMOVED_FROM_SESSION;
    key
}

/// The run named by a session index key (of either kind).
pub(crate) fn session_key_run(key: &[u8]) -> Option<RunId> {
    let bytes: [u8; 16] = key.get(25..41)?.try_into().ok()?;
    Some(RunId::from_uuid(Uuid::from_bytes(bytes)))
}

/// Milliseconds since the epoch as a key part that sorts by time, times
/// before 1970 included (the sign bit flipped maps i64 order onto u64
/// order). Millisecond granularity: a run that ended in the cutoff's own
/// millisecond is kept.
fn millis_be(at: DateTime<Utc>) -> [u8; 8] {
    (at.timestamp_millis().cast_unsigned() ^ (1 << 63)).to_be_bytes()
}

pub(crate) fn ended_key(ended_at: DateTime<Utc>, run: RunId) -> [u8; 25] {
    let mut key = [0u8; 25];
    key[0] = ENDED;
    key[1..9].copy_from_slice(&millis_be(ended_at));
    key[9..].copy_from_slice(run.as_uuid().as_bytes());
    key
}

/// The smallest `t` key.
pub(crate) const ENDED_KEYS_START: [u8; 1] = [ENDED];

/// The first `t` key of runs that ended at or after `at`: the end of the
/// range of runs that ended before it.
pub(crate) fn ended_keys_before(at: DateTime<Utc>) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = ENDED;
    key[1..].copy_from_slice(&millis_be(at));
    key
}

/// The run named by an ended-index key.
pub(crate) fn ended_key_run(key: &[u8]) -> Option<RunId> {
    if key.first() != Some(&ENDED) {
        return None;
    }
    let bytes: [u8; 16] = key.get(9..25)?.try_into().ok()?;
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
    fn commit_keys_sort_by_number() {
        assert!(commit_key(255) < commit_key(256));
        assert_eq!(commit_number(&commit_key(42)), Some(42));
        assert!(commit_key(7).starts_with(&COMMIT_PREFIX));
        assert_eq!(commit_number(&segment_key(RunId::new(), 1)), None);
    }

    #[test]
    fn session_keys_sort_by_ordinal_and_name_their_run() {
        let session = Uuid::now_v7();
        let (a, b) = (RunId::new(), RunId::new());
        assert!(session_key(session, 2, a) < session_key(session, 10, b));
        assert!(session_key(session, 2, a).starts_with(&session_prefix(session)));
        assert_eq!(session_key_run(&session_key(session, 2, a)), Some(a));
        let removed = removed_session_key(session, 2, a);
        assert!(removed.starts_with(&removed_session_prefix(session)));
        assert!(!removed.starts_with(&session_prefix(session)));
        assert_eq!(session_key_run(&removed), Some(a));
    }

    #[test]
    fn ended_keys_sort_by_time_and_bound_by_cutoff() {
        let run = RunId::new();
        let early = DateTime::from_timestamp_millis(1_000).unwrap();
        let late = DateTime::from_timestamp_millis(2_000).unwrap();
        assert!(ended_key(early, run) < ended_key(late, RunId::new()));
        assert!(ended_key(early, run).as_slice() < ended_keys_before(late).as_slice());
        assert!(ended_key(late, run).as_slice() >= ended_keys_before(late).as_slice());
        assert!(ENDED_KEYS_START.as_slice() <= ended_key(early, run).as_slice());
        assert_eq!(ended_key_run(&ended_key(late, run)), Some(run));
        assert_eq!(ended_key_run(&session_key(Uuid::nil(), 1, run)), None);
        // Before 1970 still sorts by time, below later ends and cutoffs.
        let ancient = DateTime::from_timestamp_millis(-5_000).unwrap();
        let older = DateTime::from_timestamp_millis(-9_000).unwrap();
        assert!(ended_key(older, run) < ended_key(ancient, run));
        assert!(ended_key(ancient, run) < ended_key(early, run));
        assert!(ended_key(older, run).as_slice() < ended_keys_before(ancient).as_slice());
        assert!(ended_key(ancient, run).as_slice() >= ended_keys_before(ancient).as_slice());
    }
}
