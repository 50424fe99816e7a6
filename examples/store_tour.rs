//! The main job, for now: open a store in `./data`, append the events of a
//! few agent runs of one session, close it, reopen it, and print what it
//! replays.
//!
//! ```text
//! cargo run --example store_tour            # store in ./data
//! cargo run --example store_tour -- DIR     # store in DIR
//! ```
//!
//! Run it twice: the second run reopens the same store (same epoch) and adds
//! new runs beside the old ones.

use std::error::Error;

use behest_stream::codec;
use behest_stream::{
    AgentEvent, Config, ModelStarted, ProviderId, RunCompleted, RunFailed, RunId, RunStarted,
    RuntimeEventEnvelope, RuntimeEventId, Store, TextDelta, TokenUsage, ToolCall,
    ToolCallCompleted, ToolExecutionFinished, ToolResult, UsageRecorded,
};
use chrono::Utc;
use uuid::Uuid;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "./data".into());
    let session = Uuid::now_v7();
    let runs: Vec<RunId> = (0..3).map(|_| RunId::new()).collect();

    let store = Store::open(Config::new(&dir)).await?;
    println!("opened store {dir} (epoch {})", store.epoch());
    for (i, run) in runs.iter().enumerate() {
        let log = script(*run, session, i == 2);
        // A run's events in two appends, as a producer would send them.
        let (head, tail) = log.split_at(log.len() / 2);
        store.append(head.to_vec()).await?;
        store.append(tail.to_vec()).await?;
        println!("appended {} events of run {run}", log.len());
    }
    store.close().await?;
    println!("closed; reopening\n");

    let store = Store::open(Config::new(&dir)).await?;
    println!("reopened store {dir} (epoch {})", store.epoch());
    println!(
        "session {session} has runs {:?}",
        store.session_runs(session).await?
    );
    for run in &runs {
        let info = store
            .run_info(*run)
            .await?
            .ok_or("run missing after reopen")?;
        println!(
            "\nrun {run}: {} events, provider {}, {}",
            info.last_seq,
            info.provider
                .as_ref()
                .map_or_else(|| "?".into(), ToString::to_string),
            if info.is_ended() { "ended" } else { "open" }
        );
        for envelope in store.list_after(*run, 0, 1000).await? {
            println!(
                "  {:>3} {:<24} {}",
                envelope.seq,
                envelope.event.kind(),
                summary(&envelope.event)
            );
        }
    }
    let last = store.list_after(runs[0], 0, 1).await?;
    if let Some(first) = last.first() {
        println!(
            "\nthe first envelope as JSON:\n{}",
            codec::envelope_to_json(first)?
        );
    }
    store.close().await?;
    Ok(())
}

/// A plausible run: start, a model call streaming text, a tool call and its
/// result, usage, and the end (a failure for `fail`).
fn script(run_id: RunId, session: Uuid, fail: bool) -> Vec<RuntimeEventEnvelope> {
    let now = Utc::now;
    let provider = ProviderId::new("acme");
    let mut events = vec![
        AgentEvent::RunStarted(RunStarted {
            run_id,
            timestamp: now(),
            session_id: Some(session),
            provider: provider.clone(),
            model: "acme-large".into(),
        }),
        AgentEvent::ModelStarted(ModelStarted {
            run_id,
            timestamp: now(),
            provider,
            model: "acme-large".into(),
            iteration: 1,
        }),
    ];
    for token in ["Let me ", "look that ", "up."] {
        events.push(AgentEvent::TextDelta(TextDelta {
            run_id,
            timestamp: now(),
            delta: token.into(),
        }));
    }
    events.push(AgentEvent::ToolCallCompleted(ToolCallCompleted {
        run_id,
        timestamp: now(),
        call: ToolCall {
            id: "call_1".into(),
            name: "search".into(),
            arguments: serde_json::json!({"query": "weather in Lisbon"}),
        },
    }));
    events.push(AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
        run_id,
        timestamp: now(),
        call_id: "call_1".into(),
        tool_name: "search".into(),
        result: ToolResult::Success {
            output: serde_json::json!({"forecast": "sunny", "high_c": 24}),
        },
        duration_ms: 120,
    }));
    events.push(AgentEvent::UsageRecorded(UsageRecorded {
        run_id,
        timestamp: now(),
        usage: TokenUsage {
            input_tokens: 812,
            output_tokens: 64,
            total_tokens: 876,
        },
    }));
    events.push(if fail {
        AgentEvent::RunFailed(RunFailed {
            run_id,
            timestamp: now(),
            error: "provider timed out".into(),
        })
    } else {
        AgentEvent::RunCompleted(RunCompleted {
            run_id,
            timestamp: now(),
            finish_reason: "stop".into(),
            iterations: 1,
        })
    });
    events
        .into_iter()
        .zip(1..)
        .map(|(event, seq)| RuntimeEventEnvelope {
            event_id: RuntimeEventId::new(),
            seq,
            run_id,
            session_id: Some(session),
            event,
            emitted_at: Utc::now(),
        })
        .collect()
}

fn summary(event: &AgentEvent) -> String {
    match event {
        AgentEvent::RunStarted(e) => format!("{} / {}", e.provider, e.model),
        AgentEvent::TextDelta(e) => format!("{:?}", e.delta),
        AgentEvent::ToolCallCompleted(e) => format!("{}({})", e.call.name, e.call.arguments),
        AgentEvent::ToolExecutionFinished(e) => match &e.result {
            ToolResult::Success { output } => format!("ok in {} ms: {output}", e.duration_ms),
            ToolResult::Failure { error } => format!("failed: {error}"),
        },
        AgentEvent::UsageRecorded(e) => format!("{} tokens", e.usage.total_tokens),
        AgentEvent::RunCompleted(e) => format!("finish_reason={}", e.finish_reason),
        AgentEvent::RunFailed(e) => e.error.clone(),
        AgentEvent::ModelStarted(e) => format!("iteration {}", e.iteration),
        _ => String::new(),
    }
}
