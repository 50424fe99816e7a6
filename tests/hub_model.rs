//! Model-based test of ordering and resume: random interleavings of
//! publishes, subscriptions with each `Resume`, reads, and drop-and-resume,
//! over several runs and sessions. Every run stream must be exactly the
//! suffix of its run's log; every session stream must hold each run's
//! events in order; nothing twice, nothing skipped.

mod common;

use std::time::Duration;

use behest_stream::{
    BoxRuntimeEventStream, Config, Cursor, EventHub, HubError, Resume, RunId, RuntimeEventEnvelope,
    RuntimeRoom,
};
use common::{completed, delta, next_within, started};
use proptest::prelude::*;
use uuid::Uuid;

const RUNS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
enum Target {
    Run(usize),
    Session(usize),
}

#[derive(Debug, Clone)]
enum From {
    Live,
    Beginning,
    /// A cursor at this fraction (0..=8 eighths) of each run's log.
    After(u8),
}

#[derive(Debug, Clone)]
enum Op {
    Publish(usize),
    /// `n` events submitted back to back, then all awaited.
    Pipeline(usize, u8),
    End(usize),
    Subscribe(Target, From),
    Read(usize, u8),
    DropAndResume(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let target = prop_oneof![
        (0..RUNS).prop_map(Target::Run),
        (0..2usize).prop_map(Target::Session)
    ];
    let start = prop_oneof![
        Just(From::Live),
        Just(From::Beginning),
        (0u8..=8).prop_map(From::After)
    ];
    prop_oneof![
        8 => (0..RUNS).prop_map(Op::Publish),
        3 => (0..RUNS, 2u8..20).prop_map(|(r, n)| Op::Pipeline(r, n)),
        1 => (0..RUNS).prop_map(Op::End),
        3 => (target, start).prop_map(|(t, s)| Op::Subscribe(t, s)),
        4 => (0..8usize, 1u8..12).prop_map(|(s, n)| Op::Read(s, n)),
        2 => (0..8usize).prop_map(Op::DropAndResume),
    ]
}

/// The model: each run's log as acknowledged by the hub.
struct Model {
    runs: Vec<RunId>,
    sessions: Vec<Uuid>,
    logs: Vec<Vec<RuntimeEventEnvelope>>,
    ended: Vec<bool>,
}

impl Model {
    /// Runs 0 and 1 belong to session 0, run 2 to session 1.
    fn session_of(run: usize) -> usize {
        usize::from(run == 2)
    }

    fn relevant(&self, target: &Target) -> Vec<usize> {
        match target {
            Target::Run(r) => vec![*r],
            Target::Session(s) => (0..RUNS).filter(|r| Self::session_of(*r) == *s).collect(),
        }
    }

    fn room(&self, target: &Target) -> RuntimeRoom {
        match target {
            Target::Run(r) => RuntimeRoom::Run(self.runs[*r]),
            Target::Session(s) => RuntimeRoom::Session(self.sessions[*s]),
        }
    }
}

struct Sub {
    target: Target,
    stream: BoxRuntimeEventStream,
    /// What the subscriber has been delivered, per run.
    cursor: Cursor,
    finished: bool,
}

impl Sub {
    fn available(&self, model: &Model) -> usize {
        model
            .relevant(&self.target)
            .into_iter()
            .map(|r| model.logs[r].len() - self.cursor.seq(model.runs[r]) as usize)
            .sum()
    }

    /// Reads `n` items (no more than are available) and checks each is the
    /// next of its run.
    async fn read(&mut self, model: &Model, n: usize) {
        for _ in 0..n.min(self.available(model)) {
            let envelope = next_within(&mut self.stream, DEADLINE)
                .await
                .expect("stream ended with events still owed")
                .expect("stream error");
            let r = model
                .relevant(&self.target)
                .into_iter()
                .find(|r| model.runs[*r] == envelope.run_id)
                .expect("an event of a run this room does not carry");
            let seen = self.cursor.seq(envelope.run_id) as usize;
            assert_eq!(
                envelope, model.logs[r][seen],
                "{:?} got seq {} of run {r} after seq {seen}",
                self.target, envelope.seq
            );
            self.cursor.advance(&envelope);
        }
        // A run stream that has delivered its run's terminal event ends.
        if let Target::Run(r) = self.target
            && model.ended[r]
            && self.available(model) == 0
            && !self.finished
        {
            assert!(
                next_within(&mut self.stream, DEADLINE).await.is_none(),
                "run stream must end after its terminal event"
            );
            self.finished = true;
        }
    }
}

async fn run_case(ops: Vec<Op>) {
    let hub = EventHub::open(
        Config::temporary()
            .ring_capacity(4)
            .live_capacity(2)
            .catch_up_page(3),
    )
    .await
    .unwrap();
    let mut model = Model {
        runs: (0..RUNS).map(|_| RunId::new()).collect(),
        sessions: vec![Uuid::now_v7(), Uuid::now_v7()],
        logs: vec![Vec::new(); RUNS],
        ended: vec![false; RUNS],
    };
    let mut subs: Vec<Sub> = Vec::new();
    for op in ops {
        match op {
            Op::Publish(r) | Op::End(r) => {
                let run = model.runs[r];
                let event = if model.logs[r].is_empty() {
                    started(run, Some(model.sessions[Model::session_of(r)]))
                } else if matches!(op, Op::End(_)) {
                    completed(run)
                } else {
                    delta(run, "x")
                };
                match hub.publish(event).await {
                    Ok(envelope) => {
                        assert!(!model.ended[r], "published after the terminal event");
                        assert_eq!(envelope.seq, model.logs[r].len() as u64 + 1);
                        model.ended[r] = envelope.is_terminal();
                        model.logs[r].push(envelope);
                    }
                    Err(HubError::RunClosed { .. }) => assert!(model.ended[r]),
                    Err(other) => panic!("publish failed: {other:?}"),
                }
            }
            Op::Pipeline(r, n) => {
                let run = model.runs[r];
                let mut pending = Vec::new();
                for i in 0..n {
                    let event = if model.logs[r].is_empty() && i == 0 {
                        started(run, Some(model.sessions[Model::session_of(r)]))
                    } else {
                        delta(run, "p")
                    };
                    pending.push(hub.submit(event).await.unwrap());
                }
                for p in pending {
                    match p.await {
                        Ok(envelope) => {
                            assert!(!model.ended[r], "published after the terminal event");
                            assert_eq!(
                                envelope.seq,
                                model.logs[r].len() as u64 + 1,
                                "pipelined order"
                            );
                            model.logs[r].push(envelope);
                        }
                        Err(HubError::RunClosed { .. }) => assert!(model.ended[r]),
                        Err(other) => panic!("publish failed: {other:?}"),
                    }
                }
            }
            Op::Subscribe(target, start) => {
                let mut cursor = Cursor::new(hub.epoch());
                let resume = match start {
                    From::Live => {
                        for r in model.relevant(&target) {
                            if let Some(last) = model.logs[r].last() {
                                cursor.advance(last);
                            }
                        }
                        Resume::Live
                    }
                    From::Beginning => Resume::FromStart,
                    From::After(eighths) => {
                        for r in model.relevant(&target) {
                            let at = model.logs[r].len() * usize::from(eighths) / 8;
                            if at > 0 {
                                cursor.advance(&model.logs[r][at - 1]);
                            }
                        }
                        Resume::After(cursor.clone())
                    }
                };
                let stream = hub.subscribe(model.room(&target), resume).await.unwrap();
                subs.push(Sub {
                    target,
                    stream,
                    cursor,
                    finished: false,
                });
            }
            Op::Read(s, n) => {
                let count = subs.len().max(1);
                if let Some(sub) = subs.get_mut(s % count) {
                    sub.read(&model, usize::from(n)).await;
                }
            }
            Op::DropAndResume(s) => {
                if subs.is_empty() {
                    continue;
                }
                let old = subs.remove(s % subs.len());
                let stream = hub
                    .subscribe(model.room(&old.target), Resume::After(old.cursor.clone()))
                    .await
                    .unwrap();
                subs.push(Sub { stream, ..old });
            }
        }
    }
    for sub in &mut subs {
        sub.read(&model, usize::MAX).await;
    }
    hub.shutdown().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    /// Every subscription is exactly the suffix of its runs' logs after its
    /// start, in order, with nothing twice and nothing skipped.
    #[test]
    fn subscriptions_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_case(ops));
    }
}
