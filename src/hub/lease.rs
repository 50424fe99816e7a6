//! Run leases (see [`Config::run_lease`](crate::Config::run_lease)): which
//! open runs this hub watches, and when each lapses.
//!
//! The table is a plain struct, renewed by run rooms (coarsely: at most
//! once per eighth of the lease per run, so that a publish rarely takes its
//! lock), by `EventHub::renew_lease`, and, on sled, by the scan of open runs
//! at open. The sweeper task pops what lapsed and asks each run's room to
//! end it; the room ends it only if nothing renewed it since (it knows its
//! last publish exactly, the table only roughly), so a coarse table never
//! ends a live run.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, oneshot};

use super::follow::Link;
use super::run_room::PublishRequest;
use crate::config::Durability;
use crate::error::HubError;
use crate::event::{AgentEvent, RunFailed};
use crate::ids::{ProviderId, RunId};

/// Most lapsed runs the sweeper ends per wake; the rest wait for the next.
const ENDS_PER_WAKE: usize = 1024;

/// The longest lease: ten years.
const MAX_LEASE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Runs read per page by the scan of open runs at open (sled).
const SCAN_PAGE: usize = 1024;

/// One watched run.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When its lease was last renewed, as far as the table knows.
    renewed: Instant,
    /// The same moment on the wall clock, for the `RunFailed` message.
    since: DateTime<Utc>,
    /// The run's last seq as the renewer knew it (`None`: not known, an
    /// explicit renewal of a run the table did not have).
    seen: Option<u64>,
}

/// A run whose lease lapsed, popped from the table: what the room checks
/// before it ends the run ([`Lapse`]), and the message's wall-clock time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lapsed {
    pub(crate) run_id: RunId,
    pub(crate) lapse: Lapse,
    pub(crate) since: DateTime<Utc>,
}

/// What the sweeper knew of a run when its lease lapsed: the room ends the
/// run only if nothing happened to it since (see `RunState::has_lapsed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lapse {
    /// When the lease was last renewed.
    pub(crate) renewed: Instant,
    /// The run's last seq then, if known: a room that finds the run
    /// further on (another host wrote it since, or this room published
    /// between the table's rough renewals) renews instead of ending it.
    pub(crate) seen: Option<u64>,
}

/// The watched runs, by run and by deadline.
#[derive(Debug, Default)]
struct Table {
    by_run: HashMap<RunId, Entry>,
    by_deadline: BTreeSet<(Instant, RunId)>,
}

impl Table {
    fn renew(
        &mut self,
        lease: Duration,
        run_id: RunId,
        at: Instant,
        since: DateTime<Utc>,
        seen: Option<u64>,
    ) {
        let mut seen = seen;
        if let Some(old) = self.by_run.get(&run_id) {
            if old.renewed >= at {
                return;
            }
            // A renewal that does not know the seq keeps the one known.
            seen = seen.or(old.seen);
            self.by_deadline.remove(&(old.renewed + lease, run_id));
        }
        self.by_run.insert(
            run_id,
            Entry {
                renewed: at,
                since,
                seen,
            },
        );
        self.by_deadline.insert((at + lease, run_id));
    }

    fn release(&mut self, lease: Duration, run_id: RunId) {
        if let Some(old) = self.by_run.remove(&run_id) {
            self.by_deadline.remove(&(old.renewed + lease, run_id));
        }
    }

    fn pop_lapsed(&mut self, now: Instant, max: usize) -> Vec<Lapsed> {
        let mut lapsed = Vec::new();
        while lapsed.len() < max {
            let Some(&(deadline, run_id)) = self.by_deadline.first() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.by_deadline.pop_first();
            if let Some(entry) = self.by_run.remove(&run_id) {
                lapsed.push(Lapsed {
                    run_id,
                    lapse: Lapse {
                        renewed: entry.renewed,
                        seen: entry.seen,
                    },
                    since: entry.since,
                });
            }
        }
        lapsed
    }
}

/// The hub's leases: its length, the providers exempt, and the table.
#[derive(Debug)]
pub(crate) struct Leases {
    lease: Duration,
    exempt: Vec<ProviderId>,
    table: Mutex<Table>,
}

impl Leases {
    pub(crate) fn new(lease: Duration, exempt: Vec<ProviderId>) -> Self {
        Self {
            // Far enough for any use, near enough that no deadline overflows.
            lease: lease.min(MAX_LEASE),
            exempt,
            table: Mutex::default(),
        }
    }

    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether runs of `provider` have no lease.
    pub(crate) fn is_exempt(&self, provider: Option<&ProviderId>) -> bool {
        provider.is_some_and(|p| self.exempt.contains(p))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews `run_id`'s lease as of `at`, when its last seq was `seen` (a
    /// later renewal already in the table stands).
    pub(crate) fn renew(&self, run_id: RunId, at: Instant, seen: Option<u64>) {
        let since = Utc::now() - (Instant::now().saturating_duration_since(at));
        self.table().renew(self.lease, run_id, at, since, seen);
    }

    /// Stops watching `run_id` (it ended).
    pub(crate) fn release(&self, run_id: RunId) {
        self.table().release(self.lease, run_id);
    }

    /// Pops up to `max` runs whose lease lapsed by `now`.
    pub(crate) fn pop_lapsed(&self, now: Instant, max: usize) -> Vec<Lapsed> {
        self.table().pop_lapsed(now, max)
    }

    /// Runs watched right now.
    pub(crate) fn watched(&self) -> usize {
        self.table().by_run.len()
    }
}

/// The `RunFailed` that ends a lapsed run.
pub(crate) fn abandoned(lapsed: &Lapsed, lease: Duration) -> AgentEvent {
    AgentEvent::RunFailed(RunFailed {
        run_id: lapsed.run_id,
        timestamp: Utc::now(),
        error: format!(
            "abandoned: no event and no lease renewal since {} (lease {} ms); ended by the hub",
            lapsed
                .since
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            lease.as_millis()
        ),
    })
}

/// Starts the sweeper: every quarter lease it ends the runs that lapsed,
/// each through its room (sequenced, stored and fanned out like any
/// publish). It ends with the hub (its permits closed, or its router gone).
pub(crate) fn spawn_sweeper(
    link: Link,
    leases: Arc<Leases>,
    permits: Arc<Semaphore>,
) -> tokio::task::JoinHandle<()> {
    let every = (leases.lease() / 4).clamp(Duration::from_millis(5), Duration::from_secs(5));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let lapsed = leases.pop_lapsed(Instant::now(), ENDS_PER_WAKE);
            let mut answers = Vec::with_capacity(lapsed.len());
            for run in lapsed {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return;
                };
                let (reply, answer) = oneshot::channel();
                let request = PublishRequest {
                    event: abandoned(&run, leases.lease()),
                    durability: Durability::Flushed,
                    permit,
                    reply,
                    lapsed: Some(run.lapse),
                };
                if link
                    .shared
                    .run_rooms
                    .publish(&link.router, request)
                    .is_err()
                {
                    return;
                }
                answers.push((run.run_id, answer));
            }
            // Awaited together: one group commit can carry them all.
            for (run_id, answer) in answers {
                match answer.await {
                    Ok(Ok(envelope)) => {
                        tracing::warn!(%run_id, seq = envelope.seq, "run lease lapsed; run ended as abandoned");
                    }
                    // Ended already, or gone: nothing to watch.
                    Ok(Err(HubError::RunClosed { .. } | HubError::RunRemoved { .. })) => {}
                    // The room could not end it (its store failed, it was
                    // fenced, too many rooms): try again a lease from now.
                    Ok(Err(error)) => {
                        tracing::warn!(%run_id, %error, "lapsed run not ended; trying again a lease from now");
                        leases.renew(run_id, Instant::now(), None);
                    }
                    // The room found the lease renewed (or no run).
                    Err(_) => {}
                }
            }
        }
    })
}

/// On sled: watches every run open in the store, its lease counted from
/// now (the store was just opened; whoever produced them may be gone).
pub(crate) fn spawn_open_run_scan(link: Link, leases: Arc<Leases>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let now = Instant::now();
        let mut after = None;
        loop {
            let runs = match link.store.runs_after(after, SCAN_PAGE).await {
                Ok(runs) => runs,
                Err(error) => {
                    tracing::error!(%error, "cannot list open runs to give them leases");
                    return;
                }
            };
            let Some(last) = runs.last().map(|r| r.run_id) else {
                return;
            };
            for run in &runs {
                if !run.is_ended() && run.last_seq > 0 && !leases.is_exempt(run.provider.as_ref()) {
                    leases.renew(run.run_id, now, Some(run.last_seq));
                }
            }
            if runs.len() < SCAN_PAGE {
                return;
            }
            after = Some(last);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn runs(lapsed: &[Lapsed]) -> Vec<RunId> {
        lapsed.iter().map(|l| l.run_id).collect()
    }

    #[test]
    fn a_run_lapses_a_lease_after_its_last_renewal() {
        let leases = Leases::new(LEASE, Vec::new());
        let (a, b) = (RunId::new(), RunId::new());
        let t0 = Instant::now();
        leases.renew(a, t0, Some(1));
        leases.renew(b, t0, Some(1));
        leases.renew(a, t0 + Duration::from_secs(5), None);
        // An older renewal does not move a lease back.
        leases.renew(a, t0 + Duration::from_secs(1), Some(9));
        assert!(
            leases
                .pop_lapsed(t0 + Duration::from_secs(9), 10)
                .is_empty()
        );
        assert_eq!(runs(&leases.pop_lapsed(t0 + LEASE, 10)), vec![b]);
        let lapsed = leases.pop_lapsed(t0 + Duration::from_secs(15), 10);
        assert_eq!(runs(&lapsed), vec![a]);
        // A renewal that does not know the seq keeps the one known.
        assert_eq!(
            lapsed[0].lapse,
            Lapse {
                renewed: t0 + Duration::from_secs(5),
                seen: Some(1)
            }
        );
        assert_eq!(leases.watched(), 0);
    }

    #[test]
    fn the_longest_lease_does_not_overflow() {
        let leases = Leases::new(Duration::MAX, Vec::new());
        let run = RunId::new();
        leases.renew(run, Instant::now(), Some(1));
        assert!(leases.pop_lapsed(Instant::now(), 1).is_empty());
        assert_eq!(leases.watched(), 1);
    }

    #[test]
    fn a_released_run_never_lapses_and_pops_are_bounded() {
        let leases = Leases::new(LEASE, Vec::new());
        let t0 = Instant::now();
        let ended = RunId::new();
        leases.renew(ended, t0, Some(1));
        leases.release(ended);
        let many: Vec<RunId> = (0..5).map(|_| RunId::new()).collect();
        for run in &many {
            leases.renew(*run, t0, Some(1));
        }
        let later = t0 + LEASE * 2;
        assert_eq!(leases.pop_lapsed(later, 3).len(), 3);
        let rest = runs(&leases.pop_lapsed(later, 3));
        assert_eq!(rest.len(), 2);
        assert!(!rest.contains(&ended));
    }

    #[test]
    fn exempt_providers_and_the_abandoned_message() {
        let leases = Leases::new(LEASE, vec![ProviderId::new("streams")]);
        assert!(leases.is_exempt(Some(&ProviderId::new("streams"))));
        assert!(!leases.is_exempt(Some(&ProviderId::new("acme"))));
        assert!(!leases.is_exempt(None));
        let lapsed = Lapsed {
            run_id: RunId::new(),
            lapse: Lapse {
                renewed: Instant::now(),
                seen: None,
            },
            since: "2026-11-30T12:00:00Z".parse().unwrap(),
        };
        let AgentEvent::RunFailed(failed) = abandoned(&lapsed, LEASE) else {
            panic!("not RunFailed");
        };
        assert_eq!(failed.run_id, lapsed.run_id);
        assert!(
            failed.error.starts_with(
                "abandoned: no event and no lease renewal since 2026-11-30T12:00:00.000Z"
            ),
            "{}",
            failed.error
        );
    }
}
