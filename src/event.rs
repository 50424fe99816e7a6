//! The events of an agent run's life.
//!
//! [`AgentEvent`] is a closed enum: every variant wraps a payload struct that
//! carries the `run_id` it belongs to and the `timestamp` at which the producer
//! observed it. Three variants end a run ([`AgentEvent::is_terminal`]):
//! [`RunCompleted`], [`RunFailed`] and [`RunCancelled`]. [`AgentEvent::Custom`]
//! is the escape hatch for host-specific events.
//!
//! On the wire (JSON) an event is an object with its variant's name in `type`
//! and its payload in `data` (adjacent tagging: a decoder reads the tag first
//! and the payload straight into its struct, which measured a third faster
//! than internal tagging on a 4 KiB tool result; see `benches/codec.rs`):
//!
//! ```
//! use behest_stream::{AgentEvent, RunId, TextDelta};
//!
//! let run_id = RunId::new();
//! let event = AgentEvent::TextDelta(TextDelta {
//!     run_id,
//!     timestamp: chrono::Utc::now(),
//!     delta: "Hel".into(),
//! });
//! let json = serde_json::to_value(&event).unwrap();
//! assert_eq!(json["type"], "text_delta");
//! assert_eq!(json["data"]["delta"], "Hel");
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{ProviderId, RunId};

/// One event of an agent run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The run began; names its session, provider and model.
    RunStarted(RunStarted),
    /// The context window for the next model call was assembled.
    ContextBuilt(ContextBuilt),
    /// A model call (one iteration of the agent loop) started.
    ModelStarted(ModelStarted),
    /// A fragment of assistant text streamed from the model.
    TextDelta(TextDelta),
    /// The model began emitting a tool call.
    ToolCallStarted(ToolCallStarted),
    /// A fragment of a tool call's arguments streamed from the model.
    ToolCallDelta(ToolCallDelta),
    /// The model finished emitting a tool call.
    ToolCallCompleted(ToolCallCompleted),
    /// The host began executing a tool.
    ToolExecutionStarted(ToolExecutionStarted),
    /// The host finished executing a tool.
    ToolExecutionFinished(ToolExecutionFinished),
    /// An assistant message was committed to the conversation.
    AssistantMessageCommitted(MessageCommitted),
    /// A tool message was committed to the conversation.
    ToolMessageCommitted(MessageCommitted),
    /// Token usage of a model call.
    UsageRecorded(UsageRecorded),
    /// The run finished normally. Terminal.
    RunCompleted(RunCompleted),
    /// The run failed. Terminal.
    RunFailed(RunFailed),
    /// The run was cancelled. Terminal.
    RunCancelled(RunCancelled),
    /// A host-specific event: a kind and a JSON payload.
    Custom(CustomEvent),
}

/// Payload of [`AgentEvent::RunStarted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStarted {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Session the run belongs to, if any. Every envelope of the run carries it.
    pub session_id: Option<Uuid>,
    /// Provider serving the run.
    pub provider: ProviderId,
    /// Model serving the run.
    pub model: String,
}

/// Payload of [`AgentEvent::ContextBuilt`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextBuilt {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Number of messages in the assembled context.
    pub message_count: u64,
}

/// Payload of [`AgentEvent::ModelStarted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStarted {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Provider called.
    pub provider: ProviderId,
    /// Model called.
    pub model: String,
    /// Iteration of the agent loop, from 1.
    pub iteration: u32,
}

/// Payload of [`AgentEvent::TextDelta`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextDelta {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// The text fragment.
    pub delta: String,
}

/// Payload of [`AgentEvent::ToolCallStarted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallStarted {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Provider-assigned id of the tool call.
    pub call_id: String,
    /// Name of the tool being called.
    pub tool_name: String,
}

/// Payload of [`AgentEvent::ToolCallDelta`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Provider-assigned id of the tool call.
    pub call_id: String,
    /// A fragment of the call's JSON arguments, as text.
    pub delta: String,
}

/// A complete tool call as the model emitted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Provider-assigned id of the tool call.
    pub id: String,
    /// Name of the tool.
    pub name: String,
    /// Arguments, as JSON.
    pub arguments: serde_json::Value,
}

/// Payload of [`AgentEvent::ToolCallCompleted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallCompleted {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// The complete call.
    pub call: ToolCall,
}

/// Payload of [`AgentEvent::ToolExecutionStarted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolExecutionStarted {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Id of the tool call being executed.
    pub call_id: String,
    /// Name of the tool being executed.
    pub tool_name: String,
}

/// Outcome of one tool execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", content = "value", rename_all = "snake_case")]
pub enum ToolResult {
    /// The tool returned output.
    Success {
        /// The tool's output, as JSON.
        output: serde_json::Value,
    },
    /// The tool failed.
    Failure {
        /// What went wrong, for a person.
        error: String,
    },
}

/// Payload of [`AgentEvent::ToolExecutionFinished`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolExecutionFinished {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Id of the tool call that was executed.
    pub call_id: String,
    /// Name of the tool that was executed.
    pub tool_name: String,
    /// What the tool returned.
    pub result: ToolResult,
    /// Wall-clock duration of the execution.
    pub duration_ms: u64,
}

/// Payload of [`AgentEvent::AssistantMessageCommitted`] and
/// [`AgentEvent::ToolMessageCommitted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageCommitted {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Id of the committed message.
    pub message_id: Uuid,
}

/// Token counts of one model call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Tokens sent to the model.
    pub input_tokens: u64,
    /// Tokens produced by the model.
    pub output_tokens: u64,
    /// Input plus output, as the provider reported it.
    pub total_tokens: u64,
}

/// Payload of [`AgentEvent::UsageRecorded`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecorded {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// The usage.
    pub usage: TokenUsage,
}

/// Payload of [`AgentEvent::RunCompleted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCompleted {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// Why the model stopped (`"stop"`, `"length"`, a provider's own reason).
    pub finish_reason: String,
    /// How many iterations of the agent loop ran.
    pub iterations: u32,
}

/// Payload of [`AgentEvent::RunFailed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFailed {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// What went wrong, for a person.
    pub error: String,
}

/// Payload of [`AgentEvent::RunCancelled`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCancelled {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
}

/// Payload of [`AgentEvent::Custom`]: a host-specific event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomEvent {
    /// Run this event belongs to.
    pub run_id: RunId,
    /// When the producer observed the event.
    pub timestamp: DateTime<Utc>,
    /// The host's name for the kind of event.
    pub kind: String,
    /// The event's data, as JSON.
    pub payload: serde_json::Value,
}

/// Applies `$body` to the payload of whichever variant `$event` is; every
/// payload has `run_id` and `timestamp`, so accessors need no per-variant arm.
macro_rules! with_payload {
    ($event:expr, $p:ident => $body:expr) => {
        match $event {
            AgentEvent::RunStarted($p) => $body,
            AgentEvent::ContextBuilt($p) => $body,
            AgentEvent::ModelStarted($p) => $body,
            AgentEvent::TextDelta($p) => $body,
            AgentEvent::ToolCallStarted($p) => $body,
            AgentEvent::ToolCallDelta($p) => $body,
            AgentEvent::ToolCallCompleted($p) => $body,
            AgentEvent::ToolExecutionStarted($p) => $body,
            AgentEvent::ToolExecutionFinished($p) => $body,
            AgentEvent::AssistantMessageCommitted($p) => $body,
            AgentEvent::ToolMessageCommitted($p) => $body,
            AgentEvent::UsageRecorded($p) => $body,
            AgentEvent::RunCompleted($p) => $body,
            AgentEvent::RunFailed($p) => $body,
            AgentEvent::RunCancelled($p) => $body,
            AgentEvent::Custom($p) => $body,
        }
    };
}

impl AgentEvent {
    /// The run this event belongs to.
    #[must_use]
    pub fn run_id(&self) -> RunId {
        with_payload!(self, p => p.run_id)
    }

    /// When the producer observed the event.
    #[must_use]
    pub fn timestamp(&self) -> DateTime<Utc> {
        with_payload!(self, p => p.timestamp)
    }

    /// True for the events that end a run: `RunCompleted`, `RunFailed` and
    /// `RunCancelled`. Nothing may follow a terminal event in its run.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            AgentEvent::RunCompleted(_) | AgentEvent::RunFailed(_) | AgentEvent::RunCancelled(_)
        )
    }

    /// The session this event names, which only `RunStarted` does.
    #[must_use]
    pub fn session_id(&self) -> Option<Uuid> {
        match self {
            AgentEvent::RunStarted(p) => p.session_id,
            _ => None,
        }
    }

    /// The provider this event names (`RunStarted`, `ModelStarted`).
    #[must_use]
    pub fn provider(&self) -> Option<&ProviderId> {
        match self {
            AgentEvent::RunStarted(p) => Some(&p.provider),
            AgentEvent::ModelStarted(p) => Some(&p.provider),
            _ => None,
        }
    }

    /// A short, stable, snake_case name of the variant (`"text_delta"`), the
    /// same string as the JSON `type` tag.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            AgentEvent::RunStarted(_) => "run_started",
            AgentEvent::ContextBuilt(_) => "context_built",
            AgentEvent::ModelStarted(_) => "model_started",
            AgentEvent::TextDelta(_) => "text_delta",
            AgentEvent::ToolCallStarted(_) => "tool_call_started",
            AgentEvent::ToolCallDelta(_) => "tool_call_delta",
            AgentEvent::ToolCallCompleted(_) => "tool_call_completed",
            AgentEvent::ToolExecutionStarted(_) => "tool_execution_started",
            AgentEvent::ToolExecutionFinished(_) => "tool_execution_finished",
            AgentEvent::AssistantMessageCommitted(_) => "assistant_message_committed",
            AgentEvent::ToolMessageCommitted(_) => "tool_message_committed",
            AgentEvent::UsageRecorded(_) => "usage_recorded",
            AgentEvent::RunCompleted(_) => "run_completed",
            AgentEvent::RunFailed(_) => "run_failed",
            AgentEvent::RunCancelled(_) => "run_cancelled",
            AgentEvent::Custom(_) => "custom",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    #[test]
    fn only_the_three_run_endings_are_terminal() {
        let run_id = RunId::new();
        let timestamp = now();
        let completed = AgentEvent::RunCompleted(RunCompleted {
            run_id,
            timestamp,
            finish_reason: "stop".into(),
            iterations: 1,
        });
        let failed = AgentEvent::RunFailed(RunFailed {
            run_id,
            timestamp,
            error: "boom".into(),
        });
        let cancelled = AgentEvent::RunCancelled(RunCancelled { run_id, timestamp });
        let delta = AgentEvent::TextDelta(TextDelta {
            run_id,
            timestamp,
            delta: "x".into(),
        });
        assert!(completed.is_terminal() && failed.is_terminal() && cancelled.is_terminal());
        assert!(!delta.is_terminal());
        assert_eq!(delta.run_id(), run_id);
    }

    #[test]
    fn json_type_tag_matches_kind() {
        let event = AgentEvent::ToolMessageCommitted(MessageCommitted {
            run_id: RunId::new(),
            timestamp: now(),
            message_id: Uuid::now_v7(),
        });
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], event.kind());
    }
}
