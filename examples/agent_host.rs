//! The main job: an agent host embedding an `EventHub` on `./data`.
//!
//! Six simulated agent runs in two sessions run at once, each streaming text
//! deltas at token pace, calling a tool with JSON arguments and getting a
//! JSON result, recording usage, and ending: four complete, one fails, one
//! is cancelled. A subscriber follows each session and prints a live view;
//! another follows one run, disconnects halfway and resumes by cursor. A
//! summary follows, then the hub shuts down. It takes a few seconds.
//!
//! ```text
//! cargo run --example agent_host            # store in ./data
//! cargo run --example agent_host -- DIR     # store in DIR
//! ```

use std::collections::BTreeMap;
use std::error::Error;
use std::time::{Duration, Instant};

use behest_stream::{
    AgentEvent, Config, Cursor, EventHub, ModelStarted, ProviderId, Resume, RunCancelled,
    RunCompleted, RunFailed, RunId, RunStarted, RuntimeEventEnvelope, RuntimeRoom, TextDelta,
    TokenUsage, ToolCall, ToolCallCompleted, ToolCallStarted, ToolExecutionFinished,
    ToolExecutionStarted, ToolResult, UsageRecorded,
};
use chrono::Utc;
use futures_util::StreamExt;
use uuid::Uuid;

type BoxError = Box<dyn Error + Send + Sync>;

/// How each simulated run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Completed,
    Failed,
    Cancelled,
}

/// One simulated run: who it is, what it says, how it ends.
#[derive(Debug, Clone)]
struct Agent {
    run_id: RunId,
    session: Uuid,
    name: &'static str,
    question: &'static str,
    answer: &'static str,
    ending: Ending,
}

/// Time between two tokens, as a model streams them.
const TOKEN_PACE: Duration = Duration::from_millis(15);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let started = Instant::now();
    let dir = std::env::args().nth(1).unwrap_or_else(|| "./data".into());
    let hub = EventHub::open(Config::new(&dir)).await?;
    println!("agent host: hub on {dir} (store epoch {})", hub.epoch());

    let sessions = [Uuid::now_v7(), Uuid::now_v7()];
    let agents = agents(sessions);

    // One subscriber per session: a live view of every run in it.
    let mut watchers = Vec::new();
    for (index, session) in sessions.into_iter().enumerate() {
        let stream = hub
            .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
            .await?;
        let runs = agents.iter().filter(|a| a.session == session).count();
        watchers.push(tokio::spawn(watch_session(index + 1, stream, runs)));
    }

    // One run subscriber that disconnects after a few events and resumes
    // from its cursor.
    let followed = agents[0].run_id;
    let resumer = tokio::spawn(follow_with_reconnect(hub.clone(), followed));

    // The runs themselves, all at once.
    let mut producers = Vec::new();
    for agent in agents.clone() {
        producers.push(tokio::spawn(run_agent(hub.clone(), agent)));
    }
    let mut published = BTreeMap::new();
    for (agent, producer) in agents.iter().zip(producers) {
        published.insert(agent.name, producer.await??);
    }

    let mut views = Vec::new();
    for watcher in watchers {
        views.push(watcher.await??);
    }
    let (seqs, cursor) = resumer.await??;
    let followed_len = published[agents[0].name];

    println!("\nsummary");
    for agent in &agents {
        let stored = hub.replay(agent.run_id, 0, 1000).await?;
        let last = stored.last().map_or("nothing", |e| e.event.kind());
        println!(
            "  {:<10} session {}  {:>3} events stored, ended with {last}",
            agent.name,
            1 + sessions
                .iter()
                .position(|s| *s == agent.session)
                .unwrap_or(0),
            stored.len(),
        );
    }
    let total: u64 = published.values().sum();
    let seen: u64 = views.iter().sum();
    println!(
        "  {} runs published {total} events; session subscribers saw {seen}",
        agents.len()
    );
    let exactly_once = seqs == (1..=followed_len).collect::<Vec<_>>();
    println!(
        "  resumed subscriber of {} saw seqs 1..={followed_len} {} (resumed at cursor {cursor})",
        agents[0].name,
        if exactly_once {
            "exactly once, in order"
        } else {
            "NOT exactly once"
        },
    );
    hub.shutdown().await?;
    println!("  done in {:.1} s", started.elapsed().as_secs_f64());
    if seen != total || !exactly_once {
        return Err("a subscriber missed or repeated an event".into());
    }
    Ok(())
}

fn agents(sessions: [Uuid; 2]) -> Vec<Agent> {
    let agent = |session, name, question, answer, ending| Agent {
        run_id: RunId::new(),
        session,
        name,
        question,
        answer,
        ending,
    };
    let [a, b] = sessions;
    vec![
        agent(
            a,
            "weather",
            "weather in Lisbon",
            "Lisbon is sunny today, with a high of 24 degrees and a light breeze from the north.",
            Ending::Completed,
        ),
        agent(
            a,
            "flights",
            "flights LIS to OSL",
            "There are three direct flights tomorrow; the earliest leaves at 07:40.",
            Ending::Completed,
        ),
        agent(
            a,
            "hotels",
            "hotels near Aker Brygge",
            "I could not reach the booking service.",
            Ending::Failed,
        ),
        agent(
            b,
            "summary",
            "summarise the design doc",
            "The design keeps one writer per run and stores before it fans out.",
            Ending::Completed,
        ),
        agent(
            b,
            "translate",
            "translate the summary",
            "O desenho mantém um escritor por execução.",
            Ending::Completed,
        ),
        agent(
            b,
            "research",
            "survey of log-structured stores",
            "Log-structured stores batch writes into segments and",
            Ending::Cancelled,
        ),
    ]
}

/// Publishes one run's events as an agent loop would: each as it happens,
/// text deltas at token pace, pipelined (it does not wait for one event to
/// be stored before it produces the next). Returns the run's last seq.
async fn run_agent(hub: EventHub, agent: Agent) -> Result<u64, BoxError> {
    let run_id = agent.run_id;
    let now = Utc::now;
    let provider = ProviderId::new("acme");
    let mut pending = Vec::new();
    let mut publish = async |event: AgentEvent| -> Result<(), BoxError> {
        pending.push(hub.submit(event).await?);
        Ok(())
    };
    publish(AgentEvent::RunStarted(RunStarted {
        run_id,
        timestamp: now(),
        session_id: Some(agent.session),
        provider: provider.clone(),
        model: "acme-large".into(),
    }))
    .await?;
    publish(AgentEvent::ModelStarted(ModelStarted {
        run_id,
        timestamp: now(),
        provider: provider.clone(),
        model: "acme-large".into(),
        iteration: 1,
    }))
    .await?;
    for token in ["Let me ", "check ", "that."] {
        tokio::time::sleep(TOKEN_PACE).await;
        publish(delta(run_id, token)).await?;
    }
    let call_id = format!("call_{}", agent.name);
    publish(AgentEvent::ToolCallStarted(ToolCallStarted {
        run_id,
        timestamp: now(),
        call_id: call_id.clone(),
        tool_name: "search".into(),
    }))
    .await?;
    publish(AgentEvent::ToolCallCompleted(ToolCallCompleted {
        run_id,
        timestamp: now(),
        call: ToolCall {
            id: call_id.clone(),
            name: "search".into(),
            arguments: serde_json::json!({ "query": agent.question, "limit": 3 }),
        },
    }))
    .await?;
    publish(AgentEvent::ToolExecutionStarted(ToolExecutionStarted {
        run_id,
        timestamp: now(),
        call_id: call_id.clone(),
        tool_name: "search".into(),
    }))
    .await?;
    tokio::time::sleep(TOKEN_PACE * 4).await;
    let result = if agent.ending == Ending::Failed {
        ToolResult::Failure {
            error: "booking service unavailable (503)".into(),
        }
    } else {
        ToolResult::Success {
            output: serde_json::json!({
                "hits": [
                    { "title": format!("{} (1)", agent.question), "score": 0.92 },
                    { "title": format!("{} (2)", agent.question), "score": 0.81 },
                ]
            }),
        }
    };
    publish(AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
        run_id,
        timestamp: now(),
        call_id,
        tool_name: "search".into(),
        result,
        duration_ms: 60,
    }))
    .await?;
    for word in agent.answer.split_inclusive(' ') {
        tokio::time::sleep(TOKEN_PACE).await;
        publish(delta(run_id, word)).await?;
    }
    let words = agent.answer.split(' ').count() as u64;
    publish(AgentEvent::UsageRecorded(UsageRecorded {
        run_id,
        timestamp: now(),
        usage: TokenUsage {
            input_tokens: 900,
            output_tokens: 3 + words,
            total_tokens: 903 + words,
        },
    }))
    .await?;
    publish(match agent.ending {
        Ending::Completed => AgentEvent::RunCompleted(RunCompleted {
            run_id,
            timestamp: now(),
            finish_reason: "stop".into(),
            iterations: 1,
        }),
        Ending::Failed => AgentEvent::RunFailed(RunFailed {
            run_id,
            timestamp: now(),
            error: "tool failed: booking service unavailable".into(),
        }),
        Ending::Cancelled => AgentEvent::RunCancelled(RunCancelled {
            run_id,
            timestamp: now(),
        }),
    })
    .await?;
    let mut last = 0;
    for publish in pending {
        last = publish.await?.seq;
    }
    Ok(last)
}

fn delta(run_id: RunId, text: &str) -> AgentEvent {
    AgentEvent::TextDelta(TextDelta {
        run_id,
        timestamp: Utc::now(),
        delta: text.into(),
    })
}

/// A session's live view: text gathered per run and printed when the run
/// moves on, tool calls, results and endings as they happen. Returns how
/// many envelopes it saw, once `runs` runs have ended.
async fn watch_session(
    number: usize,
    mut stream: behest_stream::BoxRuntimeEventStream,
    runs: usize,
) -> Result<u64, BoxError> {
    let mut text: BTreeMap<RunId, String> = BTreeMap::new();
    let (mut seen, mut ended) = (0u64, 0usize);
    while ended < runs {
        let envelope = stream.next().await.ok_or("session stream ended")??;
        seen += 1;
        let tag = format!("[session {number}] run …{}", short(&envelope));
        match &envelope.event {
            AgentEvent::TextDelta(d) => text.entry(envelope.run_id).or_default().push_str(&d.delta),
            AgentEvent::RunStarted(s) => println!("{tag} started on {}", s.model),
            AgentEvent::ToolCallCompleted(c) => {
                flush_text(&tag, &mut text, envelope.run_id);
                println!("{tag} calls {}({})", c.call.name, c.call.arguments);
            }
            AgentEvent::ToolExecutionFinished(f) => match &f.result {
                ToolResult::Success { output } => {
                    println!("{tag} {} returned {output}", f.tool_name)
                }
                ToolResult::Failure { error } => println!("{tag} {} failed: {error}", f.tool_name),
            },
            event if envelope.is_terminal() => {
                flush_text(&tag, &mut text, envelope.run_id);
                println!("{tag} {} (seq {})", event.kind(), envelope.seq);
                ended += 1;
            }
            _ => {}
        }
    }
    Ok(seen)
}

fn flush_text(tag: &str, text: &mut BTreeMap<RunId, String>, run_id: RunId) {
    if let Some(said) = text.remove(&run_id) {
        println!("{tag} says \"{said}\"");
    }
}

fn short(envelope: &RuntimeEventEnvelope) -> String {
    envelope.run_id.to_string()[30..].to_owned()
}

/// Follows `run_id` from the start, drops the connection after five
/// events, and resumes from its cursor. Returns every seq it received and
/// the cursor it resumed from.
async fn follow_with_reconnect(
    hub: EventHub,
    run_id: RunId,
) -> Result<(Vec<u64>, String), BoxError> {
    let mut cursor = Cursor::new(hub.epoch());
    let mut seqs = Vec::new();
    let mut first = hub
        .subscribe(RuntimeRoom::Run(run_id), Resume::FromStart)
        .await?;
    while seqs.len() < 5 {
        let envelope = first.next().await.ok_or("run stream ended early")??;
        cursor.advance(&envelope);
        seqs.push(envelope.seq);
    }
    drop(first);
    let resumed_at = cursor.to_string();
    println!(
        "[run …{}] subscriber disconnected at cursor {resumed_at}",
        &run_id.to_string()[30..]
    );
    let mut resumed = hub
        .subscribe(RuntimeRoom::Run(run_id), Resume::After(cursor))
        .await?;
    while let Some(item) = resumed.next().await {
        seqs.push(item?.seq);
    }
    Ok((seqs, resumed_at))
}
