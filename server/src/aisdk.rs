//! A run as a Vercel AI SDK UI message stream (`x-vercel-ai-ui-message-stream:
//! v1`): a plain state machine fed the run's envelopes in seq order, like
//! [`crate::agui`], and as deterministic.
//!
//! | behest-stream | UI message chunk |
//! |---|---|
//! | `RunStarted` (or whatever comes first) | `start` (`messageId` = the run) |
//! | `TextDelta` | `text-start` once per assistant message, then `text-delta` |
//! | `AssistantMessageCommitted`, `ModelStarted`, `ToolCallStarted` | `text-end` of the open part |
//! | `ToolCallStarted`, `ToolCallDelta` | `tool-input-start`, `tool-input-delta` |
//! | `ToolCallCompleted` | `tool-input-available` (`input` = the arguments) |
//! | `ToolExecutionFinished` | `tool-output-available`, or `tool-output-error` (after `tool-input-available` with `input: null` for a call the run never gave) |
//! | `UsageRecorded` | summed into `finish.messageMetadata.usage` |
//! | `RunCompleted` | `finish` (`finishReason`: the run's when the SDK knows it, else `other`) |
//! | `RunCancelled` | `abort` |
//! | `RunFailed` | `error`, then `finish` with `finishReason: "error"` |
//! | `Custom` | `data-{kind}` |
//!
//! A delta for a call not streaming, a second completion and a second
//! result are dropped: each would make the SDK's reader throw or lose the
//! output. The stream then ends with `data: [DONE]`.

use std::collections::BTreeMap;

use behest_stream::{AgentEvent, RuntimeEventEnvelope, ToolResult};
use serde_json::{Value, json};

use crate::agui::{TextParts, add_count};

/// The finish reasons the AI SDK accepts.
const FINISH_REASONS: [&str; 6] = [
    "stop",
    "length",
    "content-filter",
    "tool-calls",
    "error",
    "other",
];

/// How far a tool call has gone in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `tool-input-start` sent: deltas may follow.
    Streaming,
    /// `tool-input-available` sent.
    Available,
    /// Its output (or error) sent.
    Done,
}

/// The UI message chunks of one run, envelope by envelope.
#[derive(Debug, Default)]
pub(crate) struct AiSdkRun {
    started: bool,
    text: TextParts,
    calls: BTreeMap<String, Call>,
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    ended: bool,
}

impl AiSdkRun {
    /// Whether the run's last event was mapped.
    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// The chunks of `envelope`, in order.
    pub(crate) fn map(&mut self, envelope: &RuntimeEventEnvelope) -> Vec<Value> {
        let run_id = envelope.run_id.to_string();
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        if !self.started {
            // One `start` opens the message, whatever the run's first event.
            self.started = true;
            out.push(json!({"type": "start", "messageId": run_id}));
        }
        match &envelope.event {
            AgentEvent::TextDelta(delta) if !delta.delta.is_empty() => {
                let (id, opened) = self.text.delta(&run_id);
                if opened {
                    out.push(json!({"type": "text-start", "id": id}));
                }
                out.push(json!({"type": "text-delta", "id": id, "delta": delta.delta}));
            }
            AgentEvent::AssistantMessageCommitted(_) | AgentEvent::ModelStarted(_) => {
                self.end_text(&mut out);
            }
            AgentEvent::ToolCallStarted(call) if !self.calls.contains_key(&call.call_id) => {
                self.end_text(&mut out);
                self.calls.insert(call.call_id.clone(), Call::Streaming);
                out.push(json!({"type": "tool-input-start", "toolCallId": call.call_id, "toolName": call.tool_name}));
            }
            AgentEvent::ToolCallDelta(delta)
                if !delta.delta.is_empty()
                    && self.calls.get(&delta.call_id) == Some(&Call::Streaming) =>
            {
                out.push(json!({"type": "tool-input-delta", "toolCallId": delta.call_id, "inputTextDelta": delta.delta}));
            }
            AgentEvent::ToolCallCompleted(done)
                if matches!(self.calls.get(&done.call.id), None | Some(Call::Streaming)) =>
            {
                self.end_text(&mut out);
                self.calls.insert(done.call.id.clone(), Call::Available);
                out.push(json!({
                    "type": "tool-input-available",
                    "toolCallId": done.call.id,
                    "toolName": done.call.name,
                    "input": done.call.arguments,
                }));
            }
            AgentEvent::ToolExecutionFinished(finished)
                if self.calls.get(&finished.call_id) != Some(&Call::Done) =>
            {
                if self.calls.get(&finished.call_id) != Some(&Call::Available) {
                    // A result for a call whose input this run never gave.
                    self.end_text(&mut out);
                    out.push(json!({
                        "type": "tool-input-available",
                        "toolCallId": finished.call_id,
                        "toolName": finished.tool_name,
                        "input": Value::Null,
                    }));
                }
                self.calls.insert(finished.call_id.clone(), Call::Done);
                out.push(match &finished.result {
                    ToolResult::Success { output } => {
                        json!({"type": "tool-output-available", "toolCallId": finished.call_id, "output": output})
                    }
                    ToolResult::Failure { error } => {
                        json!({"type": "tool-output-error", "toolCallId": finished.call_id, "errorText": error})
                    }
                });
            }
            AgentEvent::UsageRecorded(usage) => {
                add_count(&mut self.input_tokens, usage.usage.input_tokens);
                add_count(&mut self.output_tokens, usage.usage.output_tokens);
                add_count(&mut self.total_tokens, usage.usage.total_tokens);
            }
            AgentEvent::RunCompleted(done) => {
                self.end_text(&mut out);
                let reason = if FINISH_REASONS.contains(&done.finish_reason.as_str()) {
                    done.finish_reason.as_str()
                } else {
                    "other"
                };
                out.push(self.finish(reason));
                self.ended = true;
            }
            AgentEvent::RunCancelled(_) => {
                self.end_text(&mut out);
                out.push(json!({"type": "abort", "reason": "run cancelled"}));
                self.ended = true;
            }
            AgentEvent::RunFailed(failed) => {
                self.end_text(&mut out);
                out.push(json!({"type": "error", "errorText": failed.error}));
                out.push(self.finish("error"));
                self.ended = true;
            }
            AgentEvent::Custom(custom) => {
                let kind: String = custom
                    .kind
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect();
                out.push(json!({"type": format!("data-{kind}"), "data": custom.payload}));
            }
            _ => {}
        }
        out
    }

    fn end_text(&mut self, out: &mut Vec<Value>) {
        if let Some(id) = self.text.close() {
            out.push(json!({"type": "text-end", "id": id}));
        }
    }

    fn finish(&self, reason: &str) -> Value {
        let mut finish = json!({"type": "finish", "finishReason": reason});
        if self.total_tokens > 0 {
            finish["messageMetadata"] = json!({"usage": {
                "inputTokens": self.input_tokens,
                "outputTokens": self.output_tokens,
                "totalTokens": self.total_tokens,
            }});
        }
        finish
    }
}
