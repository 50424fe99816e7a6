//! The order of a run's events, checked at publish on a real hub: each rule
//! refuses the event that breaks it with `OutOfOrder` naming the rule, and
//! stores nothing (the run's last seq and its subscribers' stream are as
//! if it had not been published); a room started again for the run, after
//! the hub reopened its store, still knows the run's tool calls; and
//! `EventOrder::Unchecked` stores what it is given.

mod common;

use std::time::Duration;

use behest_stream::{
    AgentEvent, Config, EventHub, EventOrder, HubError, OrderRule, Resume, RunId, RuntimeRoom,
    ToolCall, ToolCallCompleted, ToolCallDelta, ToolCallStarted, ToolExecutionFinished, ToolResult,
};
use chrono::Utc;
use common::{completed, delta, next_within, started};

const DEADLINE: Duration = Duration::from_secs(30);

fn call_started(run_id: RunId, id: &str) -> AgentEvent {
    AgentEvent::ToolCallStarted(ToolCallStarted {
        run_id,
        timestamp: Utc::now(),
        call_id: id.into(),
        tool_name: "search".into(),
    })
}

fn call_delta(run_id: RunId, id: &str) -> AgentEvent {
    AgentEvent::ToolCallDelta(ToolCallDelta {
        run_id,
        timestamp: Utc::now(),
        call_id: id.into(),
        delta: "{}".into(),
    })
}

fn call_completed(run_id: RunId, id: &str) -> AgentEvent {
    AgentEvent::ToolCallCompleted(ToolCallCompleted {
        run_id,
        timestamp: Utc::now(),
        call: ToolCall {
            id: id.into(),
            name: "search".into(),
            arguments: serde_json::json!({}),
        },
    })
}

fn executed(run_id: RunId, id: &str) -> AgentEvent {
    AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
        run_id,
        timestamp: Utc::now(),
        call_id: id.into(),
        tool_name: "search".into(),
        result: ToolResult::Success {
            output: serde_json::json!("found"),
        },
        duration_ms: 1,
    })
}

/// Publishes `event`, expecting it refused for `rule`; returns the message.
async fn refused(hub: &EventHub, event: AgentEvent, rule: OrderRule) -> String {
    let kind = event.kind();
    match hub.publish(event).await {
        Err(error @ HubError::OutOfOrder { .. }) => {
            let HubError::OutOfOrder {
                rule: broken,
                kind: refused_kind,
                ..
            } = &error
            else {
                unreachable!()
            };
            assert_eq!((*broken, *refused_kind), (rule, kind));
            error.to_string()
        }
        other => panic!("expected OutOfOrder({rule:?}), got {other:?}"),
    }
}

async fn last_seq(hub: &EventHub, run: RunId) -> u64 {
    hub.store()
        .run_info(run)
        .await
        .unwrap()
        .map_or(0, |info| info.last_seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_refuses_its_event_and_stores_nothing() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let run = RunId::new();
    let mut stream = hub
        .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
        .await
        .unwrap();

    let message = refused(&hub, delta(run, "hi"), OrderRule::StartsWithRunStarted).await;
    assert!(message.contains("RunStarted"), "{message}");
    assert!(message.contains("nothing stored"), "{message}");
    assert_eq!(last_seq(&hub, run).await, 0);

    hub.publish(started(run, None)).await.unwrap();
    refused(&hub, started(run, None), OrderRule::StartsWithRunStarted).await;
    refused(&hub, call_delta(run, "a"), OrderRule::ToolCallStartedFirst).await;
    refused(
        &hub,
        call_completed(run, "a"),
        OrderRule::ToolCallStartedFirst,
    )
    .await;
    refused(&hub, executed(run, "a"), OrderRule::KnownToolCall).await;
    hub.publish(call_started(run, "a")).await.unwrap();
    refused(
        &hub,
        call_started(run, "a"),
        OrderRule::ToolCallStartedFirst,
    )
    .await;
    hub.publish(call_delta(run, "a")).await.unwrap();
    hub.publish(call_completed(run, "a")).await.unwrap();
    refused(&hub, call_delta(run, "a"), OrderRule::ToolCallStartedFirst).await;
    hub.publish(executed(run, "a")).await.unwrap();
    refused(&hub, executed(run, "b"), OrderRule::KnownToolCall).await;
    hub.publish(completed(run)).await.unwrap();
    assert!(matches!(
        hub.publish(delta(run, "late")).await,
        Err(HubError::RunClosed { .. })
    ));

    // Only what was accepted is stored, at seqs 1..=6 with no gap.
    let mut kinds = Vec::new();
    while let Some(item) = next_within(&mut stream, DEADLINE).await {
        let envelope = item.unwrap();
        assert_eq!(envelope.seq, kinds.len() as u64 + 1);
        kinds.push(envelope.event.kind());
    }
    assert_eq!(
        kinds,
        [
            "run_started",
            "tool_call_started",
            "tool_call_delta",
            "tool_call_completed",
            "tool_execution_finished",
            "run_completed"
        ]
    );
    hub.shutdown().await.unwrap();
}

/// A room that starts again for a run with events (here: the hub reopened
/// its store) reads the run's history at its first tool event, so it knows
/// which calls are open, completed, or unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_started_again_knows_the_runs_tool_calls() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunId::new();
    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    hub.publish(started(run, None)).await.unwrap();
    hub.publish(call_started(run, "open")).await.unwrap();
    hub.publish(call_started(run, "done")).await.unwrap();
    hub.publish(call_completed(run, "done")).await.unwrap();
    hub.shutdown().await.unwrap();
    drop(hub);

    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    refused(
        &hub,
        call_delta(run, "done"),
        OrderRule::ToolCallStartedFirst,
    )
    .await;
    refused(&hub, executed(run, "never"), OrderRule::KnownToolCall).await;
    refused(
        &hub,
        call_started(run, "open"),
        OrderRule::ToolCallStartedFirst,
    )
    .await;
    refused(&hub, started(run, None), OrderRule::StartsWithRunStarted).await;
    hub.publish(call_delta(run, "open")).await.unwrap();
    hub.publish(executed(run, "done")).await.unwrap();
    assert_eq!(last_seq(&hub, run).await, 6);
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchecked_stores_any_order_but_nothing_after_the_end() {
    let hub = EventHub::open(Config::temporary().event_order(EventOrder::Unchecked))
        .await
        .unwrap();
    let run = RunId::new();
    hub.publish(call_delta(run, "never started")).await.unwrap();
    hub.publish(executed(run, "unknown")).await.unwrap();
    hub.publish(started(run, None)).await.unwrap();
    hub.publish(completed(run)).await.unwrap();
    assert!(matches!(
        hub.publish(delta(run, "late")).await,
        Err(HubError::RunClosed { .. })
    ));
    assert_eq!(last_seq(&hub, run).await, 4);
    hub.shutdown().await.unwrap();
}
