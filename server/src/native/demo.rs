//! The simulated agent run the demo (and the tests) publish: run started, a
//! model call streaming text at token pace, a tool call with JSON arguments
//! and its JSON result, more text, usage, run completed.

use std::time::Duration;

use behest_stream::{
    AgentEvent, EventHub, HubError, MessageCommitted, ModelStarted, ProviderId, RunCompleted,
    RunId, RunStarted, TextDelta, TokenUsage, ToolCall, ToolCallCompleted, ToolCallStarted,
    ToolExecutionFinished, ToolExecutionStarted, ToolResult, UsageRecorded,
};
use chrono::Utc;
use uuid::Uuid;

/// What the model says before it calls the tool, token by token.
const PREAMBLE: &[&str] = &[
    "Let me ", "look ", "up ", "the ", "weather ", "in ", "Lisbon. ",
];

/// What the model says with the tool's result, token by token.
const ANSWER: &[&str] = &[
    "It ", "is ", "sunny ", "in ", "Lisbon ", "today, ", "24 ", "°C ", "with ", "a ", "light ",
    "breeze ", "from ", "the ", "north.",
];

/// One step of the run; turned into an event only when it is published, so
/// that each event's timestamp is the moment it happened.
#[derive(Debug, Clone, Copy)]
enum Step {
    Started,
    Model,
    Text(&'static str),
    ToolCallStarted,
    ToolCall,
    ToolRunning,
    ToolDone,
    Committed,
    Usage,
    Completed,
}

/// The steps of one run, in order.
fn steps() -> impl Iterator<Item = Step> {
    [Step::Started, Step::Model]
        .into_iter()
        .chain(PREAMBLE.iter().map(|t| Step::Text(t)))
        .chain([
            Step::ToolCallStarted,
            Step::ToolCall,
            Step::ToolRunning,
            Step::ToolDone,
        ])
        .chain(ANSWER.iter().map(|t| Step::Text(t)))
        .chain([Step::Committed, Step::Usage, Step::Completed])
}

/// How many events a demo run publishes (its terminal event's seq).
#[cfg(test)]
pub fn run_len() -> u64 {
    steps().count() as u64
}

/// The events of one demo run of `session`, each built (and timestamped)
/// when the iterator yields it. The last is the terminal `RunCompleted`.
/// The tests publish these themselves, step by step.
#[cfg(test)]
pub fn events(run_id: RunId, session: Uuid) -> impl Iterator<Item = AgentEvent> {
    steps().map(move |step| event(step, run_id, session))
}

fn event(step: Step, run_id: RunId, session: Uuid) -> AgentEvent {
    let timestamp = Utc::now();
    let provider = ProviderId::new("acme");
    let call_id = "call_weather_1".to_owned();
    match step {
        Step::Started => AgentEvent::RunStarted(RunStarted {
            run_id,
            timestamp,
            session_id: Some(session),
            provider,
            model: "acme-large".into(),
        }),
        Step::Model => AgentEvent::ModelStarted(ModelStarted {
            run_id,
            timestamp,
            provider,
            model: "acme-large".into(),
            iteration: 1,
        }),
        Step::Text(delta) => AgentEvent::TextDelta(TextDelta {
            run_id,
            timestamp,
            delta: delta.into(),
        }),
        Step::ToolCallStarted => AgentEvent::ToolCallStarted(ToolCallStarted {
            run_id,
            timestamp,
            call_id,
            tool_name: "weather".into(),
        }),
        Step::ToolCall => AgentEvent::ToolCallCompleted(ToolCallCompleted {
            run_id,
            timestamp,
            call: ToolCall {
                id: call_id,
                name: "weather".into(),
                arguments: serde_json::json!({ "city": "Lisbon", "units": "metric" }),
            },
        }),
        Step::ToolRunning => AgentEvent::ToolExecutionStarted(ToolExecutionStarted {
            run_id,
            timestamp,
            call_id,
            tool_name: "weather".into(),
        }),
        Step::ToolDone => AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
            run_id,
            timestamp,
            call_id,
            tool_name: "weather".into(),
            result: ToolResult::Success {
                output: serde_json::json!({ "sky": "sunny", "high_c": 24, "wind": "N 12 km/h" }),
            },
            duration_ms: 42,
        }),
        Step::Committed => AgentEvent::AssistantMessageCommitted(MessageCommitted {
            run_id,
            timestamp,
            message_id: Uuid::now_v7(),
        }),
        Step::Usage => AgentEvent::UsageRecorded(UsageRecorded {
            run_id,
            timestamp,
            usage: TokenUsage {
                input_tokens: 412,
                output_tokens: (PREAMBLE.len() + ANSWER.len()) as u64,
                total_tokens: 412 + (PREAMBLE.len() + ANSWER.len()) as u64,
            },
        }),
        Step::Completed => AgentEvent::RunCompleted(RunCompleted {
            run_id,
            timestamp,
            finish_reason: "stop".into(),
            iterations: 1,
        }),
    }
}

/// Publishes a whole demo run as an agent loop would: text deltas `pace`
/// apart (a model streaming tokens), the tool taking a few paces. Returns
/// the last seq.
pub async fn run(
    hub: EventHub,
    run_id: RunId,
    session: Uuid,
    pace: Duration,
) -> Result<u64, HubError> {
    let mut last = 0;
    for step in steps() {
        let pause = match step {
            Step::Text(_) => pace,
            Step::ToolDone => pace * 5,
            _ => Duration::ZERO,
        };
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        // One at a time: a demo at token pace gains nothing from pipelining
        // (see examples/agent_host.rs for `submit`).
        last = hub.publish(event(step, run_id, session)).await?.seq;
    }
    Ok(last)
}
