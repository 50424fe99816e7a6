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

#[path = "support/script.rs"]
mod support;

use behest_stream::codec;
use behest_stream::{
    AgentEvent, Config, RunId, RuntimeEventEnvelope, RuntimeEventId, Store, ToolResult,
};
use chrono::Utc;
use support::script;
use uuid::Uuid;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "./data".into());
    let session = Uuid::now_v7();
    let runs: Vec<RunId> = (0..3).map(|_| RunId::new()).collect();

    let store = Store::open(Config::new(&dir)).await?;
    println!("opened store {dir} (epoch {})", store.epoch());
    for (i, run) in runs.iter().enumerate() {
        let log = envelopes(*run, session, i == 2);
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

/// The script's events as envelopes with seqs 1, 2, 3, …
fn envelopes(run_id: RunId, session: Uuid, fail: bool) -> Vec<RuntimeEventEnvelope> {
    script(run_id, session, fail)
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
