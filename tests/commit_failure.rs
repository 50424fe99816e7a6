//! A failed store commit: its publishers get an error, nothing acknowledged
//! is lost, no seq is skipped, and publishing goes on.
#![cfg(feature = "fault-injection")]

mod common;

use std::collections::{HashSet, VecDeque};

use behest_stream::{AgentEvent, Config, EventHub, HubError, PendingPublish, RunId};
use common::{delta, started};

/// Three runs publish pipelined while two commits fail. Every failed publish
/// is a retryable "nothing stored" error; retried, it is stored once. Each
/// run's seqs stay 1..=N with every event exactly once, and everything
/// acknowledged is in the store after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_fail_their_publishers_and_lose_nothing() {
    const PER_RUN: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    let runs: Vec<RunId> = (0..3).map(|_| RunId::new()).collect();
    for run in &runs {
        hub.publish(started(*run, None)).await.unwrap();
    }
    hub.store().inject_commit_failure(3).unwrap();

    let mut work: VecDeque<(usize, usize)> = (0..PER_RUN)
        .flat_map(|i| (0..runs.len()).map(move |r| (r, i)))
        .collect();
    let mut in_flight: VecDeque<((usize, usize), PendingPublish)> = VecDeque::new();
    let (mut failures, mut acked) = (0, Vec::new());
    let mut injected_again = false;
    while !work.is_empty() || !in_flight.is_empty() {
        if in_flight.len() < 48
            && let Some((r, i)) = work.pop_front()
        {
            if i == PER_RUN / 2 && !injected_again {
                injected_again = true;
                hub.store().inject_commit_failure(2).unwrap();
            }
            let event = delta(runs[r], &i.to_string());
            in_flight.push_back(((r, i), hub.submit(event).await.unwrap()));
            continue;
        }
        let (item, pending) = in_flight.pop_front().unwrap();
        match pending.await {
            Ok(envelope) => acked.push(envelope),
            Err(error @ HubError::Store(_)) => {
                assert!(error.is_retryable(), "{error:?}");
                failures += 1;
                work.push_back(item);
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(
        failures > 0,
        "the injected failures must have hit publishes"
    );
    hub.shutdown().await.unwrap();

    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    for run in &runs {
        let stored = hub.replay(*run, 0, 10_000).await.unwrap();
        let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=PER_RUN as u64 + 1).collect::<Vec<_>>());
        let texts: HashSet<String> = stored
            .iter()
            .filter_map(|e| match &e.event {
                AgentEvent::TextDelta(d) => Some(d.delta.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(texts.len(), PER_RUN, "each event of run {run} stored once");
        for envelope in acked.iter().filter(|e| e.run_id == *run) {
            assert_eq!(
                &stored[envelope.seq as usize - 1],
                envelope,
                "acknowledged event kept"
            );
        }
    }
    assert_eq!(
        hub.publish(delta(runs[0], "after")).await.unwrap().seq,
        PER_RUN as u64 + 2
    );
    hub.shutdown().await.unwrap();
}
