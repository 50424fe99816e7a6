//! A session room's view of a shared log (NATS backend).
//!
//! On a shared log other hosts write runs of the session, and a run room
//! fans out only to its own host's session room. So a session room with
//! subscribers follows the log itself: the session's index, for the runs
//! that join it, and each of its runs that has not ended, for their
//! envelopes. Runs this host writes then arrive twice, from their rooms and
//! from the log; the session room fans each envelope out once.
//!
//! What a session subscriber needs of its room is every envelope appended
//! after it attached, each run's in seq order (a gap it fills from the
//! log). So the first attach lists the runs indexed so far and follows the
//! index from the entry after the last one listed, each listed run from its
//! end, and a run that joins later from its index entry, before which none
//! of its envelopes lie. Where following stops (the server restarted, a
//! read failed), it starts again from where each tail was, never from "now",
//! so nothing appended in between is missed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use ractor::ActorRef;
use uuid::Uuid;

use super::Shared;
use super::fanout_room::FanoutMsg;
use super::tail::{self, Tail};
use crate::error::StoreError;
use crate::ids::RunId;
use crate::store::{FollowFrom, IndexedRun, Store};
use crate::stream::RuntimeEventEnvelope;

pub(crate) struct SessionLog {
    session_id: Uuid,
    store: Store,
    /// The hub's settings and counters: the most runs of the session this
    /// room follows at once (`Config::max_followed_runs_per_session`), also
    /// the most runs it remembers what it fanned out of. A run whose
    /// writer died before its end holds its place until the room stops.
    shared: Arc<Shared>,
    /// The tail of the session's index; `None` when not following.
    index: Option<Tail>,
    /// Where the index is read from next: after the last entry handled.
    /// `None` until a first attach has followed the session, and again
    /// after the room stopped following with no one subscribed.
    index_next: Option<u64>,
    /// The followed runs that have not ended.
    runs: HashMap<RunId, FollowedRun>,
    fanned: Fanned,
    /// A `Refollow` is on its way.
    retry_pending: bool,
}

struct FollowedRun {
    /// Where its tail started in the log, to start again from there when
    /// nothing of it has been fanned out.
    start: u64,
    /// `None` while stopped.
    tail: Option<Tail>,
}

impl SessionLog {
    pub(crate) fn new(session_id: Uuid, store: Store, shared: Arc<Shared>) -> Self {
        let limit = shared.max_followed_runs_per_session;
        Self {
            session_id,
            store,
            shared,
            index: None,
            index_next: None,
            runs: HashMap::new(),
            fanned: Fanned::new(limit),
            retry_pending: false,
        }
    }

    /// Before a subscriber attaches: starts following unless it is already
    /// (or the store is not a shared log). The first time, a failure is the
    /// attach's: the subscriber would otherwise miss what the room does not
    /// follow. After that, following goes on from where it was, and a
    /// failure is retried shortly.
    pub(crate) async fn attach(&mut self, room: &ActorRef<FanoutMsg>) -> Result<(), StoreError> {
        if self.index.is_some() || !self.store.is_shared_log() {
            return Ok(());
        }
        if self.index_next.is_some() {
            self.refollow(room).await;
            return Ok(());
        }
        let followed = self.first_follow(room).await;
        if followed.is_err() {
            self.reset();
        }
        followed
    }

    /// Lists the session's runs, follows the index after them and each of
    /// them from its end.
    async fn first_follow(&mut self, room: &ActorRef<FanoutMsg>) -> Result<(), StoreError> {
        let Some((listed, index)) = self.store.follow_session(self.session_id, None).await? else {
            return Ok(());
        };
        self.index_next = Some(index.start);
        self.start_index(room, index.items);
        for run_id in listed {
            self.follow_run(room, run_id, FollowFrom::End).await?;
        }
        Ok(())
    }

    fn start_index(
        &mut self,
        room: &ActorRef<FanoutMsg>,
        items: futures_util::stream::BoxStream<'static, Result<IndexedRun, StoreError>>,
    ) {
        self.index = Some(tail::spawn(
            items,
            room.clone(),
            format!("session {}", self.session_id),
            |runs, done| FanoutMsg::RunsJoined { runs, done },
            |tail| FanoutMsg::TailEnded { run_id: None, tail },
        ));
    }

    /// Follows again whatever stopped, from where it was: the index, and
    /// every followed run without a tail. A failure is retried shortly.
    pub(crate) async fn refollow(&mut self, room: &ActorRef<FanoutMsg>) {
        let Some(index_next) = self.index_next else {
            return;
        };
        if self.index.is_none() {
            match self
                .store
                .follow_session(self.session_id, Some(index_next))
                .await
            {
                Ok(Some((_, index))) => self.start_index(room, index.items),
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(session_id = %self.session_id, %error, "cannot follow the session's index in the shared log");
                    self.retry_later(room);
                    return;
                }
            }
        }
        let stopped: Vec<(RunId, u64)> = self
            .runs
            .iter()
            .filter(|(_, run)| run.tail.is_none())
            .map(|(run_id, run)| (*run_id, run.start))
            .collect();
        for (run_id, start) in stopped {
            let followed = self
                .follow_run(room, run_id, FollowFrom::Position(start))
                .await;
            self.failed_run(room, run_id, start, followed);
        }
    }

    /// What a failure to follow a run leaves: a failure a retry may fix
    /// keeps the run, stopped, and retries shortly; another gives it up.
    fn failed_run(
        &mut self,
        room: &ActorRef<FanoutMsg>,
        run_id: RunId,
        start: u64,
        followed: Result<(), StoreError>,
    ) {
        let Err(error) = followed else {
            return;
        };
        if error.is_retryable() {
            tracing::warn!(%run_id, %error, "cannot follow a session's run in the shared log; trying again");
            self.runs
                .entry(run_id)
                .or_insert(FollowedRun { start, tail: None });
            self.retry_later(room);
        } else {
            tracing::error!(%run_id, %error, "cannot follow a session's run in the shared log; giving it up");
            self.runs.remove(&run_id);
        }
    }

    fn retry_later(&mut self, room: &ActorRef<FanoutMsg>) {
        if !self.retry_pending {
            self.retry_pending = true;
            room.send_after(tail::RETRY, || FanoutMsg::Refollow);
        }
    }

    /// The retry is due: follow again what stopped while the room has
    /// `subscribers`, else forget it all (the next subscriber catches up
    /// from the log, and following starts afresh).
    pub(crate) async fn retry(&mut self, room: &ActorRef<FanoutMsg>, subscribers: bool) {
        self.retry_pending = false;
        if subscribers {
            self.refollow(room).await;
        } else {
            self.reset();
        }
    }

    fn reset(&mut self) {
        self.index = None;
        self.index_next = None;
        self.runs.clear();
        self.fanned = Fanned::new(self.shared.max_followed_runs_per_session);
    }

    /// Follows runs that joined the session, each from its index entry.
    /// A batch from an index tail that has since stopped is ignored: the
    /// next one reads it again.
    pub(crate) async fn joined(&mut self, room: &ActorRef<FanoutMsg>, runs: Vec<IndexedRun>) {
        if self.index.is_none() {
            return;
        }
        for run in runs {
            let from = FollowFrom::Position(run.position);
            let followed = self.follow_run(room, run.run_id, from).await;
            self.failed_run(room, run.run_id, run.position, followed);
            self.index_next = Some(self.index_next.unwrap_or(0).max(run.position + 1));
        }
    }

    /// The stream of the tail with id `tail` ended (`run_id` `None`: the
    /// index's): unless it was replaced meanwhile, follow again shortly (a
    /// stream that ends at once again does not spin).
    pub(crate) fn tail_ended(
        &mut self,
        room: &ActorRef<FanoutMsg>,
        run_id: Option<RunId>,
        tail: u64,
    ) {
        let current = match run_id {
            None => self.index.as_ref(),
            Some(run_id) => self.runs.get(&run_id).and_then(|run| run.tail.as_ref()),
        };
        if current.map(Tail::id) != Some(tail) {
            return;
        }
        match run_id {
            None => self.index = None,
            Some(run_id) => {
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.tail = None;
                }
            }
        }
        self.retry_later(room);
    }

    /// Starts a tail of `run_id` unless one runs, the run has ended, or the
    /// room follows `Config::max_followed_runs_per_session` already: after what was fanned out
    /// of it if anything was, else from `from`.
    async fn follow_run(
        &mut self,
        room: &ActorRef<FanoutMsg>,
        run_id: RunId,
        from: FollowFrom,
    ) -> Result<(), StoreError> {
        if self.runs.get(&run_id).is_some_and(|run| run.tail.is_some()) {
            return Ok(());
        }
        let from = match self.fanned.get(run_id) {
            Some(seen) if seen.ended => {
                self.runs.remove(&run_id);
                return Ok(());
            }
            Some(seen) => FollowFrom::AfterSeq(seen.high()),
            None => from,
        };
        let limit = self.shared.max_followed_runs_per_session;
        if self.runs.len() >= limit && !self.runs.contains_key(&run_id) {
            tracing::warn!(
                session_id = %self.session_id,
                %run_id,
                limit,
                "too many live runs in one session to follow them all in the shared log (Config::max_followed_runs_per_session); this run reaches the session's subscribers on this host when they next catch up from the log"
            );
            self.shared.counters.record_unfollowed_run();
            return Ok(());
        }
        let Some(following) = self.store.follow_run(run_id, from).await? else {
            self.runs.remove(&run_id);
            return Ok(());
        };
        let tail = tail::spawn(
            following.items,
            room.clone(),
            format!("run {run_id} of session {}", self.session_id),
            |envelopes, done| FanoutMsg::Remote { envelopes, done },
            move |tail| FanoutMsg::TailEnded {
                run_id: Some(run_id),
                tail,
            },
        );
        let start = self.runs.get(&run_id).map_or(following.start, |r| r.start);
        self.runs.insert(
            run_id,
            FollowedRun {
                start,
                tail: Some(tail),
            },
        );
        Ok(())
    }

    /// Of `envelopes` (each run's in seq order), those not fanned out yet;
    /// a run's tail stops with its terminal event.
    pub(crate) fn fresh(
        &mut self,
        envelopes: Vec<Arc<RuntimeEventEnvelope>>,
    ) -> Vec<Arc<RuntimeEventEnvelope>> {
        if self.index_next.is_none() && self.runs.is_empty() && self.fanned.is_empty() {
            return envelopes;
        }
        let fresh = self.fanned.fresh(envelopes);
        for envelope in &fresh {
            if envelope.is_terminal() {
                self.runs.remove(&envelope.run_id);
            }
        }
        fresh
    }
}

/// The most seqs of one run a room remembers fanning out beyond the first
/// gap in what it fanned out.
const AHEAD: usize = 64;

/// What a session room fanned out of each run it has seen, so that an
/// envelope that reaches it twice (from this host's run room and from the
/// log) goes out once, and one that reaches it late (after a later one of
/// its run) still goes out. Bounded: past the limit, ended runs are
/// forgotten oldest first, then live ones; a late copy of an envelope of a
/// forgotten run goes out again (session subscribers skip it by cursor).
struct Fanned {
    runs: HashMap<RunId, Seen>,
    /// Runs in the order they were first seen.
    order: std::collections::VecDeque<RunId>,
    limit: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Seen {
    /// Every seq up to this one went out, or was given up on (see
    /// [`AHEAD`]).
    prefix: u64,
    /// Seqs beyond `prefix + 1` that went out, at most [`AHEAD`].
    ahead: BTreeSet<u64>,
    ended: bool,
}

impl Seen {
    /// The highest seq that went out.
    fn high(&self) -> u64 {
        self.ahead.last().copied().unwrap_or(self.prefix)
    }

    /// Records `seq` going out, unless it already has.
    fn take(&mut self, seq: u64) -> bool {
        if seq <= self.prefix || self.ahead.contains(&seq) {
            return false;
        }
        if seq == self.prefix + 1 {
            self.prefix = seq;
            while self.ahead.remove(&(self.prefix + 1)) {
                self.prefix += 1;
            }
        } else {
            if self.ahead.len() == AHEAD {
                // Give up on the gap: what fills it later is dropped (a
                // session subscriber fills it from the log).
                self.prefix = self.high();
                self.ahead.clear();
            }
            if seq > self.prefix {
                self.ahead.insert(seq);
            }
        }
        true
    }
}

impl Fanned {
    fn new(limit: usize) -> Self {
        Self {
            runs: HashMap::new(),
            order: std::collections::VecDeque::new(),
            limit,
        }
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn get(&self, run_id: RunId) -> Option<&Seen> {
        self.runs.get(&run_id)
    }

    fn fresh(
        &mut self,
        envelopes: Vec<Arc<RuntimeEventEnvelope>>,
    ) -> Vec<Arc<RuntimeEventEnvelope>> {
        envelopes
            .into_iter()
            .filter(|envelope| {
                if !self.runs.contains_key(&envelope.run_id) {
                    self.remember(envelope.run_id);
                }
                let Some(seen) = self.runs.get_mut(&envelope.run_id) else {
                    return true;
                };
                let fresh = seen.take(envelope.seq);
                seen.ended |= fresh && envelope.is_terminal();
                fresh
            })
            .collect()
    }

    /// Remembers a run first seen, forgetting the oldest ended run (or,
    /// failing one, the oldest) past the limit.
    fn remember(&mut self, run_id: RunId) {
        if self.runs.len() >= self.limit {
            let oldest = self
                .order
                .iter()
                .position(|run| self.runs.get(run).is_some_and(|r| r.ended))
                .unwrap_or(0);
            if let Some(forgotten) = self.order.remove(oldest) {
                self.runs.remove(&forgotten);
            }
        }
        self.runs.insert(run_id, Seen::default());
        self.order.push_back(run_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AgentEvent, RunCompleted, TextDelta};
    use crate::stream::RuntimeEventId;

    fn envelope(run_id: RunId, seq: u64, terminal: bool) -> Arc<RuntimeEventEnvelope> {
        let timestamp = chrono::Utc::now();
        let event = if terminal {
            AgentEvent::RunCompleted(RunCompleted {
                run_id,
                timestamp,
                finish_reason: "stop".into(),
                iterations: 1,
            })
        } else {
            AgentEvent::TextDelta(TextDelta {
                run_id,
                timestamp,
                delta: "x".into(),
            })
        };
        Arc::new(RuntimeEventEnvelope {
            event_id: RuntimeEventId::new(),
            seq,
            run_id,
            session_id: None,
            event,
            emitted_at: timestamp,
        })
    }

    /// A run of `len` envelopes, the last terminal.
    fn run(
        run_id: RunId,
        seqs: std::ops::RangeInclusive<u64>,
        len: u64,
    ) -> Vec<Arc<RuntimeEventEnvelope>> {
        seqs.map(|seq| envelope(run_id, seq, seq == len)).collect()
    }

    fn seqs(envelopes: &[Arc<RuntimeEventEnvelope>]) -> Vec<u64> {
        envelopes.iter().map(|e| e.seq).collect()
    }

    /// A run's envelopes from its room, then the log's copies of them, some
    /// of which arrive after its terminal event: each goes out once, and
    /// the copies interleaved with the room's do not hold anything back.
    #[test]
    fn an_envelope_that_arrives_twice_goes_out_once() {
        let mut fanned = Fanned::new(8);
        let id = RunId::new();
        assert_eq!(seqs(&fanned.fresh(run(id, 1..=3, 6))), [1, 2, 3]);
        assert_eq!(seqs(&fanned.fresh(run(id, 1..=4, 6))), [4]);
        assert_eq!(seqs(&fanned.fresh(run(id, 5..=6, 6))), [5, 6]);
        assert!(fanned.fresh(run(id, 4..=6, 6)).is_empty());
        let seen = fanned.get(id).unwrap();
        assert_eq!((seen.prefix, seen.high(), seen.ended), (6, 6, true));
    }

    /// An envelope that reaches the room after a later one of its run (the
    /// log's copy overtook the run room's) still goes out, once.
    #[test]
    fn an_envelope_that_arrives_late_still_goes_out() {
        let mut fanned = Fanned::new(8);
        let id = RunId::new();
        assert_eq!(seqs(&fanned.fresh(run(id, 5..=6, 10))), [5, 6]);
        assert_eq!(seqs(&fanned.fresh(run(id, 3..=7, 10))), [3, 4, 7]);
        assert_eq!(seqs(&fanned.fresh(run(id, 1..=8, 10))), [1, 2, 8]);
        let seen = fanned.get(id).unwrap();
        assert_eq!((seen.prefix, seen.ahead.len()), (8, 0));
    }

    /// Past [`AHEAD`] seqs beyond a gap, the gap is given up: memory stays
    /// bounded, and what fills it later is dropped.
    #[test]
    fn a_gap_is_given_up_past_the_bound() {
        let mut fanned = Fanned::new(8);
        let id = RunId::new();
        let far = AHEAD as u64 + 10;
        assert_eq!(fanned.fresh(run(id, 10..=far, 1000)).len(), AHEAD + 1);
        let seen = fanned.get(id).unwrap();
        assert!(seen.ahead.len() <= AHEAD);
        assert_eq!(seen.high(), far);
        assert!(fanned.fresh(run(id, 1..=far, 1000)).is_empty());
    }

    /// Past the limit, ended runs are forgotten before live ones, oldest
    /// first, so a live run's late copies stay deduplicated.
    #[test]
    fn ended_runs_are_forgotten_first_past_the_limit() {
        let mut fanned = Fanned::new(3);
        let (live, ended, other, new) = (RunId::new(), RunId::new(), RunId::new(), RunId::new());
        fanned.fresh(run(live, 1..=2, 10));
        fanned.fresh(run(ended, 1..=2, 2));
        fanned.fresh(run(other, 1..=1, 10));
        fanned.fresh(run(new, 1..=1, 10));
        assert!(fanned.get(ended).is_none());
        assert_eq!(fanned.get(live).map(Seen::high), Some(2));
        assert!(fanned.fresh(run(live, 1..=2, 10)).is_empty());
        // No ended run left to forget: the oldest goes.
        fanned.fresh(run(ended, 3..=3, 10));
        assert!(fanned.get(live).is_none());
        assert_eq!(fanned.runs.len(), 3);
        assert_eq!(fanned.order.len(), 3);
    }
}
