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
//! log). So the index is followed from the moment the room starts
//! following, the runs already indexed from their ends, and a run that
//! joins later from its index entry, before which none of its envelopes
//! since lie.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ractor::ActorRef;
use uuid::Uuid;

use super::fanout_room::FanoutMsg;
use super::tail::{self, Tail};
use crate::error::StoreError;
use crate::ids::RunId;
use crate::store::{FollowFrom, IndexedRun, Store};
use crate::stream::RuntimeEventEnvelope;

/// The most runs of one session a room follows at once, and the most ended
/// runs it remembers. A run past the first bound is followed only by the
/// room on the host that writes it (logged); its envelopes reach other
/// hosts' session subscribers when they next catch up from the log. An
/// ended run forgotten past the second may have a late copy fanned out
/// again, which subscribers skip by their cursor.
pub(crate) const MAX_FOLLOWED_RUNS: usize = 1024;

pub(crate) struct SessionLog {
    session_id: Uuid,
    store: Store,
    /// The tail of the session's index; `None` when not following.
    index: Option<Tail>,
    /// Where the index is read from next: after the last entry delivered,
    /// so following it again misses none.
    index_next: Option<u64>,
    /// The followed runs that have not ended.
    runs: HashMap<RunId, FollowedRun>,
    fanned: Fanned,
    /// A `TailEnded(None)` is on its way to try following again.
    retry_pending: bool,
}

struct FollowedRun {
    /// Where its tail started in the log, to start again from there when
    /// nothing of it has been fanned out.
    start: u64,
    /// `None` while stopped (following failed or was stopped).
    tail: Option<Tail>,
}

impl SessionLog {
    pub(crate) fn new(session_id: Uuid, store: Store) -> Self {
        Self {
            session_id,
            store,
            index: None,
            index_next: None,
            runs: HashMap::new(),
            fanned: Fanned::new(MAX_FOLLOWED_RUNS),
            retry_pending: false,
        }
    }

    /// Starts following, unless it is already or the store is not a shared
    /// log: the index first (from now, or from where it was left), then
    /// every run already indexed (from its end, or from where it was left),
    /// so no run falls between the two. A failure stops every tail and
    /// tries again shortly.
    pub(crate) async fn follow(&mut self, room: &ActorRef<FanoutMsg>) {
        if self.index.is_some() || !self.store.is_shared_log() {
            return;
        }
        if let Err(error) = self.try_follow(room).await {
            tracing::warn!(session_id = %self.session_id, %error, "cannot follow the session in the shared log");
            self.stop_and_retry(room);
        }
    }

    async fn try_follow(&mut self, room: &ActorRef<FanoutMsg>) -> Result<(), StoreError> {
        let Some(index) = self
            .store
            .follow_session(self.session_id, self.index_next)
            .await?
        else {
            return Ok(());
        };
        self.index_next = Some(index.start);
        self.index = Some(tail::spawn(
            index.items,
            room.clone(),
            format!("session {}", self.session_id),
            |runs, done| FanoutMsg::RunsJoined { runs, done },
            || FanoutMsg::TailEnded(None),
        ));
        let stopped: Vec<(RunId, u64)> = self
            .runs
            .iter()
            .filter(|(_, run)| run.tail.is_none())
            .map(|(run_id, run)| (*run_id, run.start))
            .collect();
        for (run_id, start) in stopped {
            self.follow_run(room, run_id, FollowFrom::Position(start))
                .await?;
        }
        for run_id in self.store.session_runs(self.session_id).await? {
            self.follow_run(room, run_id, FollowFrom::End).await?;
        }
        Ok(())
    }

    /// Stops every tail, remembering where each was, and tries again
    /// shortly.
    fn stop_and_retry(&mut self, room: &ActorRef<FanoutMsg>) {
        self.stop();
        if !self.retry_pending {
            self.retry_pending = true;
            room.send_after(tail::RETRY, || FanoutMsg::TailEnded(None));
        }
    }

    fn stop(&mut self) {
        self.index = None;
        for run in self.runs.values_mut() {
            run.tail = None;
        }
    }

    /// Follows runs that joined the session, each from its index entry.
    pub(crate) async fn joined(&mut self, room: &ActorRef<FanoutMsg>, runs: Vec<IndexedRun>) {
        for run in runs {
            self.index_next = Some(self.index_next.unwrap_or(0).max(run.position + 1));
            let from = FollowFrom::Position(run.position);
            if let Err(error) = self.follow_run(room, run.run_id, from).await {
                tracing::warn!(run_id = %run.run_id, %error, "cannot follow a session's run in the shared log");
                self.stop_and_retry(room);
                return;
            }
        }
    }

    /// A tail's stream ended (`None`: the index's, or a retry is due):
    /// start it again while the room has `subscribers`, else stop following
    /// until one attaches.
    pub(crate) async fn tail_ended(
        &mut self,
        room: &ActorRef<FanoutMsg>,
        run_id: Option<RunId>,
        subscribers: bool,
    ) {
        if run_id.is_none() {
            self.retry_pending = false;
        }
        if !subscribers {
            self.stop();
            return;
        }
        match run_id {
            None => {
                self.index = None;
                self.follow(room).await;
            }
            Some(run_id) => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                run.tail = None;
                let from = FollowFrom::Position(run.start);
                if let Err(error) = self.follow_run(room, run_id, from).await {
                    tracing::warn!(%run_id, %error, "cannot follow a session's run in the shared log");
                    self.stop_and_retry(room);
                }
            }
        }
    }

    /// Starts a tail of `run_id` unless one runs or the run has ended: after
    /// what was fanned out of it if anything was, else from `from`.
    async fn follow_run(
        &mut self,
        room: &ActorRef<FanoutMsg>,
        run_id: RunId,
        from: FollowFrom,
    ) -> Result<(), StoreError> {
        let from = match (self.runs.get(&run_id), self.fanned.get(run_id)) {
            (Some(FollowedRun { tail: Some(_), .. }), _) => return Ok(()),
            (_, Some(Seen { ended: true, .. })) => {
                self.runs.remove(&run_id);
                return Ok(());
            }
            (_, Some(Seen { seq, .. })) => FollowFrom::AfterSeq(seq),
            (Some(run), None) => FollowFrom::Position(run.start),
            (None, None) => from,
        };
        if !self.runs.contains_key(&run_id) && self.runs.len() >= MAX_FOLLOWED_RUNS {
            tracing::warn!(
                session_id = %self.session_id,
                %run_id,
                limit = MAX_FOLLOWED_RUNS,
                "too many live runs in one session to follow them all in the shared log"
            );
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
            move || FanoutMsg::TailEnded(Some(run_id)),
        );
        let start = match from {
            // Where nothing was fanned out yet, keep the first start.
            FollowFrom::AfterSeq(_) => self.runs.get(&run_id).map_or(following.start, |r| r.start),
            _ => following.start,
        };
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
        if self.index.is_none() && self.runs.is_empty() && self.fanned.is_empty() {
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

/// What a session room fanned out of each run it has seen, so that an
/// envelope that reaches it twice (from this host's run room and from the
/// log) goes out once. Bounded: ended runs are forgotten oldest first past
/// the limit, and so are live runs past it (a late copy of an envelope of a
/// forgotten run goes out again; subscribers skip it by their cursor).
struct Fanned {
    runs: HashMap<RunId, Seen>,
    /// Runs in the order they were first seen.
    order: VecDeque<RunId>,
    limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// The last seq fanned out.
    seq: u64,
    ended: bool,
}

impl Fanned {
    fn new(limit: usize) -> Self {
        Self {
            runs: HashMap::new(),
            order: VecDeque::new(),
            limit,
        }
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn get(&self, run_id: RunId) -> Option<Seen> {
        self.runs.get(&run_id).copied()
    }

    fn fresh(
        &mut self,
        envelopes: Vec<Arc<RuntimeEventEnvelope>>,
    ) -> Vec<Arc<RuntimeEventEnvelope>> {
        envelopes
            .into_iter()
            .filter(|envelope| {
                let seen = Seen {
                    seq: envelope.seq,
                    ended: envelope.is_terminal(),
                };
                match self.runs.get_mut(&envelope.run_id) {
                    Some(run) if envelope.seq <= run.seq => false,
                    Some(run) => {
                        *run = seen;
                        true
                    }
                    None => {
                        self.remember(envelope.run_id, seen);
                        true
                    }
                }
            })
            .collect()
    }

    /// Remembers a run first seen, forgetting the oldest ended run (or,
    /// failing one, the oldest) past the limit.
    fn remember(&mut self, run_id: RunId, seen: Seen) {
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
        self.runs.insert(run_id, seen);
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
        assert_eq!(
            fanned.get(id),
            Some(Seen {
                seq: 6,
                ended: true
            })
        );
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
        assert_eq!(fanned.get(ended), None);
        assert_eq!(
            fanned.get(live),
            Some(Seen {
                seq: 2,
                ended: false
            })
        );
        assert!(fanned.fresh(run(live, 1..=2, 10)).is_empty());
        // No ended run left to forget: the oldest goes.
        fanned.fresh(run(ended, 3..=3, 10));
        assert_eq!(fanned.get(live), None);
        assert_eq!(fanned.runs.len(), 3);
        assert_eq!(fanned.order.len(), 3);
    }
}
