//! The hub's metrics, read through a recorder installed for this test
//! binary alone (`metrics_util`'s debugging recorder).

mod common;

use std::time::Duration;

use behest_stream::{Config, EventHub, Resume, RunId, RuntimeRoom};
use common::{completed, delta, next_within, started};
use futures_util::StreamExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use uuid::Uuid;

/// One reading of every metric (the debugging recorder resets counters
/// and drains histograms as it reads them).
struct Reading(Vec<(String, DebugValue)>);

impl Reading {
    fn take(snapshotter: &Snapshotter) -> Self {
        Self(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| (key.key().name().to_owned(), value))
                .collect(),
        )
    }

    fn counter(&self, name: &str) -> u64 {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    fn histogram(&self, name: &str) -> Vec<f64> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, value)| match value {
                DebugValue::Histogram(values) => {
                    values.iter().map(|v| v.into_inner()).collect::<Vec<_>>()
                }
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .collect()
    }
}

/// Ten events of one run, two run subscribers and one session subscriber:
/// published and persisted count ten each, delivered thirty, and the
/// commits' sizes add up to the ten events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_persisted_and_delivered_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let (run, session) = (RunId::new(), Uuid::now_v7());
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(
            hub.subscribe(RuntimeRoom::Run(run), Resume::FromStart)
                .await
                .unwrap(),
        );
    }
    let mut session_stream = hub
        .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
        .await
        .unwrap();
    hub.publish(started(run, Some(session))).await.unwrap();
    for i in 0..8 {
        hub.publish(delta(run, &i.to_string())).await.unwrap();
    }
    hub.publish(completed(run)).await.unwrap();
    for stream in &mut streams {
        let seqs: Vec<u64> = stream.by_ref().map(|e| e.unwrap().seq).collect().await;
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    }
    for _ in 0..10 {
        next_within(&mut session_stream, Duration::from_secs(30)).await;
    }

    let reading = Reading::take(&snapshotter);
    assert_eq!(reading.counter("behest_events_published_total"), 10);
    assert_eq!(reading.counter("behest_events_persisted_total"), 10);
    assert_eq!(reading.counter("behest_events_delivered_total"), 30);
    assert!(reading.counter("behest_rooms_started_total") >= 2);
    let sizes = reading.histogram("behest_commit_events");
    assert_eq!(sizes.iter().sum::<f64>(), 10.0, "{sizes:?}");
    assert_eq!(
        reading.histogram("behest_commit_seconds").len(),
        sizes.len()
    );
    hub.shutdown().await.unwrap();
}
