//! The paths that matter report through `tracing` with the fields an
//! operator filters on: the run room sequences (`run_id`, `seq`), the store
//! commits in a `commit` span and stores each run's part (`run_id`, `seq`), and a
//! subscriber's deliveries happen inside a `subscription` span naming its
//! `room`. A recording subscriber, installed for this test binary, sees them.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use behest_stream::{Config, EventHub, Resume, RunId, RuntimeRoom};
use common::{completed, delta, next_within, started};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const DEADLINE: Duration = Duration::from_secs(30);

/// A span or an event as recorded: its name (a span's) or message (an
/// event's), its fields, and the span it happened in.
#[derive(Debug, Clone, Default)]
struct Seen {
    name: String,
    fields: HashMap<String, String>,
    parent: Option<u64>,
}

#[derive(Default)]
struct Recorded {
    spans: HashMap<u64, Seen>,
    events: Vec<Seen>,
}

/// Records every span and event at any level; tracks the entered span per
/// thread, as instrumented futures enter theirs on the polling thread.
#[derive(Clone, Default)]
struct Recorder {
    recorded: Arc<Mutex<Recorded>>,
    next_id: Arc<AtomicU64>,
}

thread_local! {
    static ENTERED: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Fields<'a>(&'a mut HashMap<String, String>, Option<&'a mut String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match (&mut self.1, field.name()) {
            (Some(message), "message") => **message = text,
            _ => {
                self.0.insert(field.name().to_owned(), text);
            }
        }
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("behest_stream")
    }

    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut seen = Seen {
            name: attributes.metadata().name().to_owned(),
            parent: ENTERED.with(|e| e.borrow().last().copied()),
            ..Seen::default()
        };
        attributes.record(&mut Fields(&mut seen.fields, None));
        self.recorded.lock().unwrap().spans.insert(id, seen);
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some(seen) = self
            .recorded
            .lock()
            .unwrap()
            .spans
            .get_mut(&span.into_u64())
        {
            values.record(&mut Fields(&mut seen.fields, None));
        }
    }

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut seen = Seen {
            parent: ENTERED.with(|e| e.borrow().last().copied()),
            ..Seen::default()
        };
        let mut message = String::new();
        event.record(&mut Fields(&mut seen.fields, Some(&mut message)));
        seen.name = message;
        self.recorded.lock().unwrap().events.push(seen);
    }

    fn enter(&self, span: &Id) {
        ENTERED.with(|e| e.borrow_mut().push(span.into_u64()));
    }

    fn exit(&self, span: &Id) {
        ENTERED.with(|e| {
            let mut entered = e.borrow_mut();
            if let Some(at) = entered.iter().rposition(|id| *id == span.into_u64()) {
                entered.remove(at);
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_commit_and_delivery_report_room_run_and_seq() {
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(recorder.clone()).unwrap();

    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let run = RunId::new();
    let mut stream = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();
    hub.publish(started(run, None)).await.unwrap();
    hub.publish(delta(run, "hello")).await.unwrap();
    hub.publish(completed(run)).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(item) = next_within(&mut stream, DEADLINE).await {
        seqs.push(item.unwrap().seq);
    }
    assert_eq!(seqs, vec![1, 2, 3]);
    hub.shutdown().await.unwrap();

    let recorded = recorder.recorded.lock().unwrap();
    let run_text = run.to_string();
    let events_named = |name: &str| -> Vec<&Seen> {
        recorded
            .events
            .iter()
            .filter(|e| e.name == name && e.fields.get("run_id") == Some(&run_text))
            .collect()
    };
    let seq_of = |e: &Seen| e.fields.get("seq").cloned().unwrap_or_default();

    let sequenced: Vec<String> = events_named("sequenced").into_iter().map(seq_of).collect();
    assert_eq!(
        sequenced,
        vec!["1", "2", "3"],
        "the run room sequenced each"
    );

    let segments = events_named("stored");
    assert!(!segments.is_empty(), "the store reported each run's part");
    for segment in &segments {
        let parent = segment.parent.and_then(|id| recorded.spans.get(&id));
        let parent = parent.expect("a run's part is stored inside a commit span");
        assert_eq!(parent.name, "commit");
        assert!(parent.fields.contains_key("appends"));
        assert!(parent.fields.contains_key("events"), "{parent:?}");
    }
    let last_segment_seq = segments
        .iter()
        .filter_map(|s| seq_of(s).parse::<u64>().ok())
        .max();
    assert_eq!(last_segment_seq, Some(3));

    let delivered = events_named("delivered");
    let delivered_seqs: Vec<String> = delivered.iter().map(|e| seq_of(e)).collect();
    assert_eq!(delivered_seqs, vec!["1", "2", "3"]);
    let room = format!("run:{run}");
    for event in delivered {
        let span = event
            .parent
            .and_then(|id| recorded.spans.get(&id))
            .expect("a delivery happens inside its subscription's span");
        assert_eq!(span.name, "subscription");
        assert_eq!(span.fields.get("room"), Some(&room));
    }
}
