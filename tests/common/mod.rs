//! Helpers shared by the integration tests: event builders and a
//! condition-with-deadline wait.

#![allow(dead_code, unreachable_pub, reason = "each test binary uses a subset")]

use std::time::Duration;

#[cfg(feature = "nats")]
pub mod nats;

use behest_stream::{
    AgentEvent, CustomEvent, ProviderId, RunCompleted, RunId, RunStarted, RuntimeEventEnvelope,
    RuntimeEventId, TextDelta, ToolCall, ToolCallCompleted, ToolExecutionFinished, ToolResult,
};
use chrono::Utc;
use uuid::Uuid;

/// The envelope of event number `seq` of `run_id`: `RunStarted` for seq 1,
/// a text delta otherwise.
pub fn envelope(run_id: RunId, session_id: Option<Uuid>, seq: u64) -> RuntimeEventEnvelope {
    let timestamp = Utc::now();
    let event = if seq == 1 {
        AgentEvent::RunStarted(RunStarted {
            run_id,
            timestamp,
            session_id,
            provider: ProviderId::new("acme"),
            model: "acme-large".into(),
        })
    } else {
        AgentEvent::TextDelta(TextDelta {
            run_id,
            timestamp,
            delta: format!("token {seq} "),
        })
    };
    wrap(run_id, session_id, seq, event)
}

/// A terminal `RunCompleted` envelope at `seq`.
pub fn terminal(run_id: RunId, session_id: Option<Uuid>, seq: u64) -> RuntimeEventEnvelope {
    let event = AgentEvent::RunCompleted(RunCompleted {
        run_id,
        timestamp: Utc::now(),
        finish_reason: "stop".into(),
        iterations: 1,
    });
    wrap(run_id, session_id, seq, event)
}

/// Wraps `event` as the envelope at `seq`.
pub fn wrap(
    run_id: RunId,
    session_id: Option<Uuid>,
    seq: u64,
    event: AgentEvent,
) -> RuntimeEventEnvelope {
    RuntimeEventEnvelope {
        event_id: RuntimeEventId::new(),
        seq,
        run_id,
        session_id,
        event,
        emitted_at: Utc::now(),
    }
}

/// JSON nested `depth` arrays and objects deep (`depth` >= 1): arrays
/// around an empty one, or objects around a scalar, which is no level.
pub fn nested_json(depth: usize, objects: bool) -> serde_json::Value {
    use serde_json::Value;
    let mut value = if objects {
        serde_json::json!({ "leaf": 1 })
    } else {
        Value::Array(Vec::new())
    };
    for _ in 1..depth {
        value = if objects {
            serde_json::json!({ "k": value })
        } else {
            Value::Array(vec![value])
        };
    }
    value
}

/// Every event of `run_id` that carries JSON, carrying `payload`: a custom
/// event, a tool call's arguments, a tool's output.
pub fn json_carriers(run_id: RunId, payload: &serde_json::Value) -> [AgentEvent; 3] {
    let timestamp = Utc::now();
    [
        AgentEvent::Custom(CustomEvent {
            run_id,
            timestamp,
            kind: "deep".into(),
            payload: payload.clone(),
        }),
        AgentEvent::ToolCallCompleted(ToolCallCompleted {
            run_id,
            timestamp,
            call: ToolCall {
                id: "call-1".into(),
                name: "search".into(),
                arguments: payload.clone(),
            },
        }),
        AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
            run_id,
            timestamp,
            call_id: "call-1".into(),
            tool_name: "search".into(),
            result: ToolResult::Success {
                output: payload.clone(),
            },
            duration_ms: 3,
        }),
    ]
}

/// Polls `check` until it returns `Some`, failing the test after `deadline`.
pub async fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Events for the hub (which assigns seqs): `RunStarted` in `session`.
pub fn started(run_id: RunId, session_id: Option<Uuid>) -> AgentEvent {
    AgentEvent::RunStarted(RunStarted {
        run_id,
        timestamp: Utc::now(),
        session_id,
        provider: ProviderId::new("acme"),
        model: "acme-large".into(),
    })
}

/// A text delta of `run_id`.
pub fn delta(run_id: RunId, text: &str) -> AgentEvent {
    AgentEvent::TextDelta(TextDelta {
        run_id,
        timestamp: Utc::now(),
        delta: text.into(),
    })
}

/// The terminal `RunCompleted` of `run_id`.
pub fn completed(run_id: RunId) -> AgentEvent {
    AgentEvent::RunCompleted(RunCompleted {
        run_id,
        timestamp: Utc::now(),
        finish_reason: "stop".into(),
        iterations: 1,
    })
}

/// Reads the next item of `stream`, failing the test if none comes within
/// `deadline` (a hang is a failure, not a wait).
pub async fn next_within(
    stream: &mut behest_stream::BoxRuntimeEventStream,
    deadline: Duration,
) -> Option<Result<RuntimeEventEnvelope, behest_stream::RuntimeStreamError>> {
    use futures_util::StreamExt;
    tokio::time::timeout(deadline, stream.next())
        .await
        .expect("a subscription stalled: no item within the deadline")
}

/// How long a test waits for sled to let go of a directory.
const SLED_LOCK_DEADLINE: Duration = Duration::from_secs(10);

/// Opens a store directory with sled directly (as damage would write it),
/// waiting up to a deadline for whoever closed it last to let go of its
/// lock: sled's background threads hold it a moment after the last handle
/// is dropped.
pub fn open_sled(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + SLED_LOCK_DEADLINE;
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(error)
                if std::time::Instant::now() < deadline && error.to_string().contains("lock") =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(error) => panic!("cannot open {} with sled: {error}", dir.display()),
        }
    }
}

/// Drops `db` and waits, up to a deadline, until sled has let go of `dir`,
/// so that the store can open it next.
pub fn close_sled(db: sled::Db, dir: &std::path::Path) {
    use fs2::FileExt;
    db.flush().unwrap();
    drop(db);
    let deadline = std::time::Instant::now() + SLED_LOCK_DEADLINE;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
        .unwrap();
    while file.try_lock_exclusive().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "sled kept {} locked",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    FileExt::unlock(&file).unwrap();
}

/// Asserts that `refused` is `RunMismatch` naming `envelope_run` (the
/// envelope's) and `event_run` (its event's), in the variant and the text.
pub fn assert_run_mismatch(
    refused: Result<(), behest_stream::StoreError>,
    envelope_run: RunId,
    event_run: RunId,
) {
    let error = refused.expect_err("a stray envelope was stored");
    assert!(
        matches!(
            error,
            behest_stream::StoreError::RunMismatch { envelope_run: e, event_run: v }
                if e == envelope_run && v == event_run
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&envelope_run.to_string()) && message.contains(&event_run.to_string()),
        "{message}"
    );
}

/// Keeps injected panics (`"injected panic …"`) out of a test's output;
/// any other panic is reported as usual.
pub fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or_default();
            if !message.starts_with("injected panic") {
                default(info);
            }
        }));
    });
}
