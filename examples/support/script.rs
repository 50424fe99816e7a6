//! The events of a plausible agent run, shared by the examples.

#![allow(dead_code, reason = "each example uses a part")]

use behest_stream::{
    AgentEvent, ModelStarted, ProviderId, RunCompleted, RunFailed, RunId, RunStarted, TextDelta,
    TokenUsage, ToolCall, ToolCallCompleted, ToolCallStarted, ToolExecutionFinished, ToolResult,
    UsageRecorded,
};
use chrono::Utc;
use uuid::Uuid;

/// How many events [`script`] produces.
pub const SCRIPT_LEN: u64 = 10;

/// A plausible run: start, a model call streaming text, a tool call and its
/// result, usage, and the end (a failure for `fail`).
pub fn script(run_id: RunId, session: Uuid, fail: bool) -> Vec<AgentEvent> {
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
    events.push(AgentEvent::ToolCallStarted(ToolCallStarted {
        run_id,
        timestamp: now(),
        call_id: "call_1".into(),
        tool_name: "search".into(),
    }));
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
}
