//! The order a run's events keep, checked at publish (see
//! [`Config::event_order`](crate::Config::event_order)): a plain struct the
//! run room feeds every event it sequences, so that each rule is tested
//! without actors.
//!
//! Why check at all: a consumer that renders a run (the AG-UI and AI SDK
//! views, a UI that opens a tool-call card on `ToolCallStarted`) can only
//! be correct for runs whose events make sense in that order. Refusing a
//! misordered event at publish, with nothing stored, keeps every stored run
//! renderable, and tells the producer at once which rule it broke.

use std::collections::HashMap;

use crate::event::AgentEvent;

/// Most distinct tool calls one run may have while its order is checked:
/// the check remembers each call's id for the run's life (a result may
/// refer to any of them), so this bounds what a run room holds for it.
pub const MAX_TOOL_CALLS_PER_RUN: usize = 16_384;

/// A rule of a run's event order (see [`HubError::OutOfOrder`](crate::HubError::OutOfOrder)).
/// The fourth rule, nothing follows a terminal event, is checked always and
/// answered with [`HubError::RunClosed`](crate::HubError::RunClosed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OrderRule {
    /// A run's first event is `RunStarted`, and it is its only one.
    StartsWithRunStarted,
    /// A tool call's deltas and its completion follow its `ToolCallStarted`
    /// (same call id) and precede nothing of its own but each other: no
    /// delta or second completion after `ToolCallCompleted`, no second
    /// `ToolCallStarted` with the same id.
    ToolCallStartedFirst,
    /// A tool execution (`ToolExecutionStarted`, `ToolExecutionFinished`)
    /// refers to a call the run started.
    KnownToolCall,
    /// A run has at most [`MAX_TOOL_CALLS_PER_RUN`] tool calls.
    TooManyToolCalls,
}

impl std::fmt::Display for OrderRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OrderRule::StartsWithRunStarted => "a run starts with RunStarted, once",
            OrderRule::ToolCallStartedFirst => {
                "a tool call's deltas and completion follow its ToolCallStarted"
            }
            OrderRule::KnownToolCall => "a tool execution refers to a call the run started",
            OrderRule::TooManyToolCalls => "a run has at most 16384 tool calls",
        })
    }
}

/// Why an event was refused: the rule, and what about this event broke it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) rule: OrderRule,
    pub(crate) detail: String,
}

/// Where a tool call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// Started; deltas and its completion may follow.
    Open,
    /// Completed.
    Completed,
}

/// What the check knows of one run.
#[derive(Debug, Default)]
pub(crate) struct RunOrder {
    /// Events of the run taken so far (the seq of the last one).
    events: u64,
    calls: HashMap<String, Call>,
    /// False when `calls` may miss calls of events taken before this value
    /// was made (a room that recovered a run from the store): tool events
    /// then need the run's history first ([`RunOrder::needs_history`]).
    complete: bool,
}

impl RunOrder {
    /// A run with no events.
    pub(crate) fn new() -> Self {
        Self {
            complete: true,
            ..Self::default()
        }
    }

    /// A run that has `events` events this value has not seen.
    pub(crate) fn recovered(events: u64) -> Self {
        Self {
            events,
            calls: HashMap::new(),
            complete: events == 0,
        }
    }

    /// True when checking `event` needs the calls of events this value has
    /// not seen: feed it the run's history ([`RunOrder::replay`]) first.
    pub(crate) fn needs_history(&self, event: &AgentEvent) -> bool {
        !self.complete && call_of(event).is_some()
    }

    /// Forgets what it knew of calls (the room rewound past events it had
    /// taken): tool events need the history again.
    pub(crate) fn forget(&mut self, events: u64) {
        *self = Self::recovered(events);
    }

    /// Whether `event` may be the run's next event. Call
    /// [`RunOrder::take`] once it is taken.
    pub(crate) fn check(&self, event: &AgentEvent) -> Result<(), Violation> {
        let violation = |rule, detail: String| Err(Violation { rule, detail });
        let is_started = matches!(event, AgentEvent::RunStarted(_));
        if self.events == 0 && !is_started {
            return violation(
                OrderRule::StartsWithRunStarted,
                format!(
                    "the run has no events yet, and {} is not RunStarted",
                    event.kind()
                ),
            );
        }
        if self.events > 0 && is_started {
            return violation(
                OrderRule::StartsWithRunStarted,
                format!("the run started already ({} events)", self.events),
            );
        }
        let Some((id, use_)) = call_of(event) else {
            return Ok(());
        };
        let state = self.calls.get(id).copied();
        match (use_, state) {
            (Use::Start, None) if self.calls.len() >= MAX_TOOL_CALLS_PER_RUN => violation(
                OrderRule::TooManyToolCalls,
                format!("call {id:?} would be call {}", self.calls.len() + 1),
            ),
            (Use::Start, None) | (Use::Args, Some(Call::Open)) | (Use::Execute, Some(_)) => Ok(()),
            (Use::Start, Some(_)) => violation(
                OrderRule::ToolCallStartedFirst,
                format!("call {id:?} was started already"),
            ),
            (Use::Args, None) => violation(
                OrderRule::ToolCallStartedFirst,
                format!("{} for call {id:?}, which was never started", event.kind()),
            ),
            (Use::Args, Some(Call::Completed)) => violation(
                OrderRule::ToolCallStartedFirst,
                format!(
                    "{} for call {id:?}, which was completed already",
                    event.kind()
                ),
            ),
            (Use::Execute, None) => violation(
                OrderRule::KnownToolCall,
                format!(
                    "{} for call {id:?}, which the run never started",
                    event.kind()
                ),
            ),
        }
    }

    /// Takes `event` as the run's next (checked or not: another host's
    /// events are taken as the log holds them).
    pub(crate) fn take(&mut self, event: &AgentEvent) {
        self.events += 1;
        match event {
            AgentEvent::ToolCallStarted(started) if self.calls.len() < MAX_TOOL_CALLS_PER_RUN => {
                self.calls.insert(started.call_id.clone(), Call::Open);
            }
            AgentEvent::ToolCallCompleted(completed) => {
                if let Some(call) = self.calls.get_mut(&completed.call.id) {
                    *call = Call::Completed;
                }
            }
            _ => {}
        }
    }
}

/// How an event uses a tool call.
#[derive(Debug, Clone, Copy)]
enum Use {
    Start,
    /// A delta or the completion: the call must be open.
    Args,
    /// An execution: the call must be known.
    Execute,
}

fn call_of(event: &AgentEvent) -> Option<(&str, Use)> {
    Some(match event {
        AgentEvent::ToolCallStarted(e) => (e.call_id.as_str(), Use::Start),
        AgentEvent::ToolCallDelta(e) => (e.call_id.as_str(), Use::Args),
        AgentEvent::ToolCallCompleted(e) => (e.call.id.as_str(), Use::Args),
        AgentEvent::ToolExecutionStarted(e) => (e.call_id.as_str(), Use::Execute),
        AgentEvent::ToolExecutionFinished(e) => (e.call_id.as_str(), Use::Execute),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use crate::ids::{ProviderId, RunId};
    use chrono::Utc;

    fn run() -> RunId {
        RunId::from_uuid(uuid::Uuid::nil())
    }

    fn started() -> AgentEvent {
        AgentEvent::RunStarted(RunStarted {
            run_id: run(),
            timestamp: Utc::now(),
            session_id: None,
            provider: ProviderId::new("p"),
            model: "m".into(),
        })
    }

    fn text() -> AgentEvent {
        AgentEvent::TextDelta(TextDelta {
            run_id: run(),
            timestamp: Utc::now(),
            delta: "x".into(),
        })
    }

    fn call_started(id: &str) -> AgentEvent {
        AgentEvent::ToolCallStarted(ToolCallStarted {
            run_id: run(),
            timestamp: Utc::now(),
            call_id: id.into(),
            tool_name: "t".into(),
        })
    }

    fn call_delta(id: &str) -> AgentEvent {
        AgentEvent::ToolCallDelta(ToolCallDelta {
            run_id: run(),
            timestamp: Utc::now(),
            call_id: id.into(),
            delta: "{".into(),
        })
    }

    fn call_completed(id: &str) -> AgentEvent {
        AgentEvent::ToolCallCompleted(ToolCallCompleted {
            run_id: run(),
            timestamp: Utc::now(),
            call: ToolCall {
                id: id.into(),
                name: "t".into(),
                arguments: serde_json::json!({}),
            },
        })
    }

    fn executed(id: &str) -> AgentEvent {
        AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
            run_id: run(),
            timestamp: Utc::now(),
            call_id: id.into(),
            tool_name: "t".into(),
            result: ToolResult::Success {
                output: serde_json::json!(1),
            },
            duration_ms: 1,
        })
    }

    /// Takes every event, asserting each passes.
    fn taken(events: &[AgentEvent]) -> RunOrder {
        let mut order = RunOrder::new();
        for event in events {
            order.check(event).unwrap();
            order.take(event);
        }
        order
    }

    fn rule(order: &RunOrder, event: &AgentEvent) -> OrderRule {
        order.check(event).unwrap_err().rule
    }

    #[test]
    fn a_run_starts_with_run_started_once() {
        assert_eq!(
            rule(&RunOrder::new(), &text()),
            OrderRule::StartsWithRunStarted
        );
        let order = taken(&[started(), text()]);
        assert_eq!(rule(&order, &started()), OrderRule::StartsWithRunStarted);
    }

    #[test]
    fn a_calls_deltas_and_completion_follow_its_start() {
        let order = taken(&[started()]);
        assert_eq!(
            rule(&order, &call_delta("a")),
            OrderRule::ToolCallStartedFirst
        );
        assert_eq!(
            rule(&order, &call_completed("a")),
            OrderRule::ToolCallStartedFirst
        );
        let order = taken(&[
            started(),
            call_started("a"),
            call_delta("a"),
            call_completed("a"),
        ]);
        assert_eq!(
            rule(&order, &call_delta("a")),
            OrderRule::ToolCallStartedFirst
        );
        assert_eq!(
            rule(&order, &call_completed("a")),
            OrderRule::ToolCallStartedFirst
        );
        assert_eq!(
            rule(&order, &call_started("a")),
            OrderRule::ToolCallStartedFirst
        );
        // Another call's events are its own.
        assert_eq!(
            rule(&order, &call_delta("b")),
            OrderRule::ToolCallStartedFirst
        );
    }

    #[test]
    fn an_execution_refers_to_a_started_call() {
        let order = taken(&[started(), call_started("a")]);
        assert_eq!(rule(&order, &executed("b")), OrderRule::KnownToolCall);
        order.check(&executed("a")).unwrap();
        let order = taken(&[
            started(),
            call_started("a"),
            call_completed("a"),
            executed("a"),
        ]);
        order.check(&executed("a")).unwrap();
    }

    #[test]
    fn a_recovered_run_needs_its_history_for_tool_events_only() {
        let mut order = RunOrder::recovered(3);
        assert!(!order.needs_history(&text()));
        assert!(order.needs_history(&executed("a")));
        order.check(&text()).unwrap();
        assert_eq!(rule(&order, &started()), OrderRule::StartsWithRunStarted);
        order = RunOrder::new();
        for event in [started(), call_started("a"), text()] {
            order.take(&event);
        }
        assert!(!order.needs_history(&executed("a")));
        order.check(&executed("a")).unwrap();
        order.forget(3);
        assert!(order.needs_history(&executed("a")));
    }

    #[test]
    fn tool_calls_per_run_are_bounded() {
        let mut order = taken(&[started()]);
        for i in 0..MAX_TOOL_CALLS_PER_RUN {
            order.take(&call_started(&i.to_string()));
        }
        assert_eq!(
            rule(&order, &call_started("one more")),
            OrderRule::TooManyToolCalls
        );
        order.check(&call_delta("0")).unwrap();
    }
}
