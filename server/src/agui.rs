//! A run as AG-UI events (the CopilotKit protocol): a plain state machine
//! fed the run's envelopes in seq order.
//!
//! | behest-stream | AG-UI |
//! |---|---|
//! | `RunStarted` | `RUN_STARTED` (`threadId` = session, else the run) |
//! | `TextDelta` | `TEXT_MESSAGE_START` once per assistant message, then `TEXT_MESSAGE_CONTENT` |
//! | `AssistantMessageCommitted`, `ModelStarted`, `ToolCallStarted` | `TEXT_MESSAGE_END` of the open message |
//! | `ToolCallStarted`, `ToolCallDelta`, `ToolCallCompleted` | `TOOL_CALL_START`, `TOOL_CALL_ARGS`, `TOOL_CALL_END` |
//! | `ToolExecutionFinished` | `TOOL_CALL_RESULT` (`content`: the output as JSON, or the error) |
//! | `UsageRecorded` | summed into `RUN_FINISHED.usage` |
//! | `RunCompleted` | `RUN_FINISHED`, outcome `success` |
//! | `RunCancelled` | `RUN_FINISHED`, outcome `cancelled` |
//! | `RunFailed` | `RUN_ERROR` |
//! | `Custom` | `CUSTOM` (`name` = kind, `value` = payload) |
//!
//! `ContextBuilt`, `ToolExecutionStarted` and `ToolMessageCommitted` have
//! no AG-UI event. A run whose first event is not `RunStarted` still opens
//! with `RUN_STARTED` (thread = the run), and a later `RunStarted` maps to
//! nothing. A text message or tool call still open when the run ends is
//! closed before its last event, as AG-UI requires; a tool call completed
//! with no argument streamed gets its arguments whole; a call completed
//! twice ends once. The mapping is a function of the envelopes alone, so replaying
//! a run from seq 1 gives the same events with the same positions: that is
//! what lets a view resume inside a text message without a second START.

use std::collections::{BTreeMap, BTreeSet};

use behest_stream::{AgentEvent, RuntimeEventEnvelope, ToolResult};
use serde_json::{Value, json};

/// The largest count AG-UI's schema takes (JavaScript's safe integers).
const MAX_COUNT: u64 = (1 << 53) - 1;

/// Adds a producer's count, saturating at what AG-UI accepts.
pub(crate) fn add_count(total: &mut u64, count: u64) {
    *total = total.saturating_add(count).min(MAX_COUNT);
}

/// A run's assistant text, cut into messages (AG-UI) or parts (AI SDK):
/// which one is open, and how many were opened, which names the next.
#[derive(Debug, Default)]
pub(crate) struct TextParts {
    open: Option<String>,
    opened: u64,
}

impl TextParts {
    /// The id of the open one, and whether this call opened it.
    pub(crate) fn delta(&mut self, run_id: &str) -> (String, bool) {
        if let Some(id) = &self.open {
            return (id.clone(), false);
        }
        self.opened += 1;
        let id = format!("{run_id}-m{}", self.opened);
        self.open = Some(id.clone());
        (id, true)
    }

    /// Closes the open one; its id, if one was open.
    pub(crate) fn close(&mut self) -> Option<String> {
        self.open.take()
    }
}

/// The AG-UI events of one run, envelope by envelope.
#[derive(Debug, Default)]
pub(crate) struct AgUiRun {
    started: bool,
    thread_id: Option<String>,
    /// The assistant messages, and the last one opened.
    text: TextParts,
    last_text: Option<String>,
    /// Tool calls started and not yet ended: whether their arguments were
    /// streamed.
    open_calls: BTreeMap<String, bool>,
    /// Tool calls ended: a repeated start or completion is ignored.
    done_calls: BTreeSet<String>,
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    ended: bool,
}

impl AgUiRun {
    /// Whether the run's last event was mapped.
    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// The AG-UI events of `envelope`, in order.
    pub(crate) fn map(&mut self, envelope: &RuntimeEventEnvelope) -> Vec<Value> {
        let run_id = envelope.run_id.to_string();
        let at = envelope.emitted_at.timestamp_millis();
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        if let AgentEvent::RunStarted(started) = &envelope.event {
            if !self.started {
                let thread = started
                    .session_id
                    .map_or_else(|| run_id.clone(), |s| s.to_string());
                self.start(thread, &run_id, at, &mut out);
            }
            return out;
        }
        if !self.started {
            // AG-UI opens with RUN_STARTED whatever the run's first event.
            self.start(run_id.clone(), &run_id, at, &mut out);
        }
        match &envelope.event {
            AgentEvent::TextDelta(delta) if !delta.delta.is_empty() => {
                let (id, opened) = self.text.delta(&run_id);
                if opened {
                    out.push(json!({"type": "TEXT_MESSAGE_START", "messageId": id, "role": "assistant", "timestamp": at}));
                    self.last_text = Some(id.clone());
                }
                out.push(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": id, "delta": delta.delta, "timestamp": at}));
            }
            // A new model call, or a tool call, ends the text before it: the
            // text after it is another message.
            AgentEvent::AssistantMessageCommitted(_) | AgentEvent::ModelStarted(_) => {
                self.end_text(at, &mut out);
            }
            AgentEvent::ToolCallStarted(call) => {
                self.end_text(at, &mut out);
                self.start_call(&call.call_id, &call.tool_name, at, &mut out);
            }
            AgentEvent::ToolCallDelta(delta)
                if !delta.delta.is_empty() && self.open_calls.contains_key(&delta.call_id) =>
            {
                self.open_calls.insert(delta.call_id.clone(), true);
                out.push(json!({"type": "TOOL_CALL_ARGS", "toolCallId": delta.call_id, "delta": delta.delta, "timestamp": at}));
            }
            AgentEvent::ToolCallCompleted(done) if !self.done_calls.contains(&done.call.id) => {
                if !self.open_calls.contains_key(&done.call.id) {
                    // Completed without its start streamed: the whole call.
                    self.end_text(at, &mut out);
                    self.start_call(&done.call.id, &done.call.name, at, &mut out);
                }
                if self.open_calls.remove(&done.call.id) == Some(false) {
                    // No argument was streamed: send them whole.
                    out.push(json!({"type": "TOOL_CALL_ARGS", "toolCallId": done.call.id, "delta": done.call.arguments.to_string(), "timestamp": at}));
                }
                self.done_calls.insert(done.call.id.clone());
                out.push(
                    json!({"type": "TOOL_CALL_END", "toolCallId": done.call.id, "timestamp": at}),
                );
            }
            AgentEvent::ToolExecutionFinished(finished) => {
                let content = match &finished.result {
                    ToolResult::Success { output } => match output {
                        Value::String(text) => text.clone(),
                        other => other.to_string(),
                    },
                    ToolResult::Failure { error } => format!("error: {error}"),
                };
                out.push(json!({
                    "type": "TOOL_CALL_RESULT",
                    "messageId": format!("{run_id}-r{}", envelope.seq),
                    "toolCallId": finished.call_id,
                    "content": content,
                    "role": "tool",
                    "timestamp": at,
                }));
            }
            AgentEvent::UsageRecorded(usage) => {
                add_count(&mut self.input_tokens, usage.usage.input_tokens);
                add_count(&mut self.output_tokens, usage.usage.output_tokens);
                add_count(&mut self.total_tokens, usage.usage.total_tokens);
            }
            AgentEvent::RunCompleted(done) => {
                self.close_all(at, &mut out);
                let mut finished = self.finished(&run_id, at, "success");
                finished["result"] =
                    json!({"finishReason": done.finish_reason, "iterations": done.iterations});
                out.push(finished);
                self.ended = true;
            }
            AgentEvent::RunCancelled(_) => {
                self.close_all(at, &mut out);
                out.push(self.finished(&run_id, at, "cancelled"));
                self.ended = true;
            }
            AgentEvent::RunFailed(failed) => {
                self.close_all(at, &mut out);
                out.push(json!({"type": "RUN_ERROR", "message": failed.error, "code": "run_failed", "timestamp": at}));
                self.ended = true;
            }
            AgentEvent::Custom(custom) => {
                out.push(json!({"type": "CUSTOM", "name": custom.kind, "value": custom.payload, "timestamp": at}));
            }
            _ => {}
        }
        out
    }

    fn start(&mut self, thread: String, run_id: &str, at: i64, out: &mut Vec<Value>) {
        self.started = true;
        out.push(
            json!({"type": "RUN_STARTED", "threadId": thread, "runId": run_id, "timestamp": at}),
        );
        self.thread_id = Some(thread);
    }

    fn start_call(&mut self, id: &str, name: &str, at: i64, out: &mut Vec<Value>) {
        if self.open_calls.contains_key(id) || self.done_calls.contains(id) {
            return;
        }
        self.open_calls.insert(id.to_owned(), false);
        let mut start = json!({"type": "TOOL_CALL_START", "toolCallId": id, "toolCallName": name, "timestamp": at});
        if let Some(parent) = &self.last_text {
            start["parentMessageId"] = Value::String(parent.clone());
        }
        out.push(start);
    }

    fn end_text(&mut self, at: i64, out: &mut Vec<Value>) {
        if let Some(id) = self.text.close() {
            out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": id, "timestamp": at}));
        }
    }

    fn close_all(&mut self, at: i64, out: &mut Vec<Value>) {
        self.end_text(at, out);
        for id in std::mem::take(&mut self.open_calls).into_keys() {
            out.push(json!({"type": "TOOL_CALL_END", "toolCallId": id, "timestamp": at}));
        }
    }

    fn finished(&self, run_id: &str, at: i64, outcome: &str) -> Value {
        let thread = self.thread_id.clone().unwrap_or_else(|| run_id.to_owned());
        let mut finished = json!({"type": "RUN_FINISHED", "threadId": thread, "runId": run_id, "outcome": {"type": outcome}, "timestamp": at});
        if self.total_tokens > 0 {
            finished["usage"] = json!([{
                "inputTokens": self.input_tokens,
                "outputTokens": self.output_tokens,
                "totalTokens": self.total_tokens,
            }]);
        }
        finished
    }
}

/// A position in an AG-UI view: the `k`-th event (from 0) mapped from the
/// envelope at `seq`. Its text, `SEQ.K`, is each SSE event's `id:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ViewPosition {
    pub(crate) seq: u64,
    pub(crate) index: usize,
}

impl ViewPosition {
    /// Reads a `Last-Event-ID`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (seq, index) = text.split_once('.')?;
        let canonical =
            |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if !canonical(seq) || !canonical(index) {
            return None;
        }
        Some(Self {
            seq: seq.parse().ok()?,
            index: index.parse().ok()?,
        })
    }
}

impl std::fmt::Display for ViewPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.seq, self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use behest_stream::{
        CustomEvent, MessageCommitted, ProviderId, RunCompleted, RunId, RunStarted, RuntimeEventId,
        TextDelta, TokenUsage, ToolCall, ToolCallCompleted, ToolCallDelta, ToolCallStarted,
        ToolExecutionFinished, UsageRecorded,
    };
    use chrono::Utc;

    /// A run with text around a tool call, usage and a custom event.
    fn script(run_id: RunId, session: uuid::Uuid) -> Vec<AgentEvent> {
        let t = Utc::now();
        let text = |d: &str| {
            AgentEvent::TextDelta(TextDelta {
                run_id,
                timestamp: t,
                delta: d.into(),
            })
        };
        vec![
            AgentEvent::RunStarted(RunStarted {
                run_id,
                timestamp: t,
                session_id: Some(session),
                provider: ProviderId::new("p"),
                model: "m".into(),
            }),
            text("Hel"),
            text("lo"),
            AgentEvent::ToolCallStarted(ToolCallStarted {
                run_id,
                timestamp: t,
                call_id: "c1".into(),
                tool_name: "search".into(),
            }),
            AgentEvent::ToolCallDelta(ToolCallDelta {
                run_id,
                timestamp: t,
                call_id: "c1".into(),
                delta: "{\"q\":".into(),
            }),
            AgentEvent::ToolCallDelta(ToolCallDelta {
                run_id,
                timestamp: t,
                call_id: "c1".into(),
                delta: "1}".into(),
            }),
            AgentEvent::ToolCallCompleted(ToolCallCompleted {
                run_id,
                timestamp: t,
                call: ToolCall {
                    id: "c1".into(),
                    name: "search".into(),
                    arguments: json!({"q": 1}),
                },
            }),
            AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
                run_id,
                timestamp: t,
                call_id: "c1".into(),
                tool_name: "search".into(),
                result: ToolResult::Success {
                    output: json!({"n": 1}),
                },
                duration_ms: 3,
            }),
            text(" done"),
            AgentEvent::AssistantMessageCommitted(MessageCommitted {
                run_id,
                timestamp: t,
                message_id: uuid::Uuid::now_v7(),
            }),
            AgentEvent::Custom(CustomEvent {
                run_id,
                timestamp: t,
                kind: "note".into(),
                payload: json!({"k": "v"}),
            }),
            text("Second"),
            AgentEvent::UsageRecorded(UsageRecorded {
                run_id,
                timestamp: t,
                usage: TokenUsage {
                    input_tokens: 10,
                    output_tokens: 5,
                    total_tokens: 15,
                },
            }),
            AgentEvent::RunCompleted(RunCompleted {
                run_id,
                timestamp: t,
                finish_reason: "stop".into(),
                iterations: 2,
            }),
        ]
    }

    fn envelopes(events: Vec<AgentEvent>) -> Vec<RuntimeEventEnvelope> {
        events
            .into_iter()
            .enumerate()
            .map(|(i, event)| RuntimeEventEnvelope {
                event_id: RuntimeEventId::new(),
                seq: i as u64 + 1,
                run_id: event.run_id(),
                session_id: None,
                event,
                emitted_at: Utc::now(),
            })
            .collect()
    }

    #[test]
    fn a_run_maps_to_paired_ag_ui_events() {
        let run = RunId::new();
        let mut view = AgUiRun::default();
        let out: Vec<Value> = envelopes(script(run, uuid::Uuid::now_v7()))
            .iter()
            .flat_map(|e| view.map(e))
            .collect();
        let types: Vec<&str> = out.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "RUN_STARTED",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "TOOL_CALL_START",
                "TOOL_CALL_ARGS",
                "TOOL_CALL_ARGS",
                "TOOL_CALL_END",
                "TOOL_CALL_RESULT",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "CUSTOM",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "RUN_FINISHED",
            ]
        );
        assert!(view.is_ended());
        assert_eq!(out[5]["parentMessageId"], out[1]["messageId"]);
        assert_ne!(out[10]["messageId"], out[1]["messageId"]);
        assert_eq!(out[9]["content"], "{\"n\":1}");
        let finished = out.last().unwrap();
        assert_eq!(finished["outcome"]["type"], "success");
        assert_eq!(finished["usage"][0]["totalTokens"], 15);
    }

    #[test]
    fn runs_the_hub_accepts_in_any_order_still_map_to_valid_ag_ui() {
        let run = RunId::new();
        let t = Utc::now();
        let completed = |id: &str| {
            AgentEvent::ToolCallCompleted(ToolCallCompleted {
                run_id: run,
                timestamp: t,
                call: ToolCall {
                    id: id.into(),
                    name: "f".into(),
                    arguments: json!({"a": 1}),
                },
            })
        };
        let events = vec![
            // No RunStarted first; a delta for a call never started.
            AgentEvent::ToolCallDelta(ToolCallDelta {
                run_id: run,
                timestamp: t,
                call_id: "x".into(),
                delta: "{".into(),
            }),
            AgentEvent::ToolCallStarted(ToolCallStarted {
                run_id: run,
                timestamp: t,
                call_id: "c".into(),
                tool_name: "f".into(),
            }),
            completed("c"),
            completed("c"),
            AgentEvent::UsageRecorded(UsageRecorded {
                run_id: run,
                timestamp: t,
                usage: TokenUsage {
                    input_tokens: u64::MAX,
                    output_tokens: 1,
                    total_tokens: u64::MAX,
                },
            }),
            AgentEvent::RunStarted(RunStarted {
                run_id: run,
                timestamp: t,
                session_id: None,
                provider: ProviderId::new("p"),
                model: "m".into(),
            }),
            AgentEvent::TextDelta(TextDelta {
                run_id: run,
                timestamp: t,
                delta: "open at the end".into(),
            }),
            AgentEvent::RunCompleted(RunCompleted {
                run_id: run,
                timestamp: t,
                finish_reason: "stop".into(),
                iterations: 1,
            }),
        ];
        let mut view = AgUiRun::default();
        let out: Vec<Value> = envelopes(events).iter().flat_map(|e| view.map(e)).collect();
        let types: Vec<&str> = out.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "RUN_STARTED",
                "TOOL_CALL_START",
                "TOOL_CALL_ARGS",
                "TOOL_CALL_END",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "RUN_FINISHED",
            ]
        );
        // Arguments never streamed go whole; counts stay JavaScript-safe.
        assert_eq!(out[2]["delta"], "{\"a\":1}");
        assert_eq!(out[7]["usage"][0]["totalTokens"], MAX_COUNT);
    }

    #[test]
    fn view_positions_parse_strictly() {
        let p = ViewPosition { seq: 12, index: 3 };
        assert_eq!(ViewPosition::parse(&p.to_string()), Some(p));
        for bad in [
            "",
            "12",
            "12.",
            ".3",
            "1.2.3",
            "a.1",
            "-1.0",
            "123456789012345678901.0",
        ] {
            assert_eq!(ViewPosition::parse(bad), None, "{bad:?}");
        }
    }
}
