//! What one run of the agents profile publishes, and when: its token clock
//! ([`Clock`]: slots `1 / token_rate` apart, ± jitter, from a start
//! staggered over the first second) and its events ([`Script`]: one per
//! slot, from `RunStarted` to a terminal event, with a tool call every few
//! seconds). Both are drawn from generators seeded by the run's index, so a
//! run's schedule is known before it starts (the load computes when the
//! last event is due from it). Driven by `bench/src/agents.rs`.

use std::sync::Arc;

use behest_stream::{
    AgentEvent, ModelStarted, ProviderId, RunCancelled, RunCompleted, RunFailed, RunId, RunStarted,
    TextDelta, TokenUsage, ToolCall, ToolCallCompleted, ToolCallDelta, ToolCallStarted,
    ToolExecutionStarted, UsageRecorded,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::agents::AgentsLoad;
use super::workload::EventMaker;

/// Fewest events a run holds: `RunStarted`, `ModelStarted`, one text
/// delta, `UsageRecorded` and the terminal event.
pub const MIN_EVENTS_PER_RUN: u64 = 5;

/// Events of one tool call, the `ModelStarted` of the next iteration
/// included.
const TOOL_CALL_EVENTS: u64 = 8;

/// Fragments the text deltas cycle through.
const TOKENS: [&str; 8] = [
    "The", " answer", " depends", " on", " the", " data", " you", " have",
];

/// A small deterministic generator (SplitMix64): each run draws its slots
/// from its own, so the schedule is known before the run starts.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn new(run: usize, stream: u64) -> Self {
        Self(
            (run as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03),
        )
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `1 ± jitter`, uniform.
    fn spread(&mut self, jitter: f64) -> f64 {
        1.0 + jitter * (2.0 * self.unit() - 1.0)
    }
}

/// When a run's slots are due, from the origin of the whole load.
#[derive(Debug, Clone)]
pub struct Clock {
    rng: SplitMix,
    /// Due time of the next slot, in seconds since the origin.
    next: f64,
    every: f64,
    jitter: f64,
}

impl Clock {
    pub fn new(run: usize, load: &AgentsLoad) -> Self {
        Self {
            rng: SplitMix::new(run, 1),
            // Staggered over the first second.
            next: run as f64 / load.runs as f64,
            every: 1.0 / load.token_rate,
            jitter: load.jitter,
        }
    }

    /// The due time of the next slot, in seconds since the origin.
    pub fn next_due(&self) -> f64 {
        self.next
    }

    /// The due time of the next slot; moves on to the one after.
    pub fn tick(&mut self) -> f64 {
        let due = self.next;
        self.next += self.every * self.rng.spread(self.jitter);
        due
    }

    /// The due time of the last of `slots` slots (a copy runs the clock).
    pub fn last_due(&self, slots: u64) -> f64 {
        let mut clock = self.clone();
        let mut due = 0.0;
        for _ in 0..slots {
            due = clock.tick();
        }
        due
    }
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Completed,
    Failed,
    Cancelled,
}

impl Ending {
    /// Eight runs in ten complete, one fails, one is cancelled.
    fn of(run: usize) -> Self {
        match run % 10 {
            8 => Ending::Failed,
            9 => Ending::Cancelled,
            _ => Ending::Completed,
        }
    }
}

/// Builds a run's events in order, one per slot.
pub struct Script {
    /// The run.
    pub run_id: RunId,
    session: Uuid,
    ending: Ending,
    /// Events in all, the terminal one included.
    pub events: u64,
    /// Slot of the next event, from 0.
    slot: u64,
    /// Step of the tool call under way (0 = none).
    tool_step: u64,
    tool_calls: u64,
    iteration: u32,
    /// Schedule time (seconds since the run's start) of the next tool call.
    next_tool: f64,
    tool_every: f64,
    jitter: f64,
    rng: SplitMix,
    tool_result: Arc<EventMaker>,
    provider: ProviderId,
}

impl Script {
    pub fn new(
        run: usize,
        run_id: RunId,
        session: Uuid,
        load: &AgentsLoad,
        tool_result: Arc<EventMaker>,
    ) -> Self {
        let mut rng = SplitMix::new(run, 2);
        let tool_every = load.tool_every.as_secs_f64();
        // The first call somewhere in the first interval, so runs do not
        // call their tools together.
        let next_tool = tool_every * (0.5 + rng.unit());
        Self {
            run_id,
            session,
            ending: Ending::of(run),
            events: load.events_per_run(),
            slot: 0,
            tool_step: 0,
            tool_calls: 0,
            iteration: 1,
            next_tool,
            tool_every,
            jitter: load.jitter,
            rng,
            tool_result,
            provider: ProviderId::new("bench-provider"),
        }
    }

    /// The next event, `since_start` seconds into the run's schedule,
    /// stamped `now`.
    pub fn next(&mut self, since_start: f64, now: DateTime<Utc>) -> AgentEvent {
        let run_id = self.run_id;
        let slot = self.slot;
        self.slot += 1;
        if slot == 0 {
            return AgentEvent::RunStarted(RunStarted {
                run_id,
                timestamp: now,
                session_id: Some(self.session),
                provider: self.provider.clone(),
                model: "bench-model".into(),
            });
        }
        if slot == 1 {
            return self.model_started(now);
        }
        if slot + 1 == self.events {
            return match self.ending {
                Ending::Completed => AgentEvent::RunCompleted(RunCompleted {
                    run_id,
                    timestamp: now,
                    finish_reason: "stop".into(),
                    iterations: self.iteration,
                }),
                Ending::Failed => AgentEvent::RunFailed(RunFailed {
                    run_id,
                    timestamp: now,
                    error: "the provider returned 529 overloaded".into(),
                }),
                Ending::Cancelled => AgentEvent::RunCancelled(RunCancelled {
                    run_id,
                    timestamp: now,
                }),
            };
        }
        if slot + 2 == self.events {
            return AgentEvent::UsageRecorded(UsageRecorded {
                run_id,
                timestamp: now,
                usage: TokenUsage {
                    input_tokens: 1200,
                    output_tokens: self.events,
                    total_tokens: 1200 + self.events,
                },
            });
        }
        let room_left = self.events - 2 - slot;
        if self.tool_step == 0 && since_start >= self.next_tool && room_left >= TOOL_CALL_EVENTS {
            self.tool_step = 1;
            self.tool_calls += 1;
            self.next_tool += self.tool_every * self.rng.spread(self.jitter);
        }
        if self.tool_step == 0 {
            return AgentEvent::TextDelta(TextDelta {
                run_id,
                timestamp: now,
                delta: TOKENS[(slot % TOKENS.len() as u64) as usize].into(),
            });
        }
        let step = self.tool_step;
        self.tool_step = if step == TOOL_CALL_EVENTS {
            0
        } else {
            step + 1
        };
        let call_id = format!("call_{}", self.tool_calls);
        match step {
            1 => AgentEvent::ToolCallStarted(ToolCallStarted {
                run_id,
                timestamp: now,
                call_id,
                tool_name: "search".into(),
            }),
            2..=4 => AgentEvent::ToolCallDelta(ToolCallDelta {
                run_id,
                timestamp: now,
                call_id,
                delta: ["{\"query\": ", "\"agent event ", "streams\"}"][(step - 2) as usize].into(),
            }),
            5 => AgentEvent::ToolCallCompleted(ToolCallCompleted {
                run_id,
                timestamp: now,
                call: ToolCall {
                    id: call_id,
                    name: "search".into(),
                    arguments: serde_json::json!({ "query": "agent event streams" }),
                },
            }),
            6 => AgentEvent::ToolExecutionStarted(ToolExecutionStarted {
                run_id,
                timestamp: now,
                call_id,
                tool_name: "search".into(),
            }),
            7 => match self.tool_result.event(run_id) {
                AgentEvent::ToolExecutionFinished(mut finished) => {
                    finished.call_id = call_id;
                    // Stamped after the copy of the 4 KiB result, which is
                    // the producer's work, not the hub's.
                    finished.timestamp = Utc::now();
                    AgentEvent::ToolExecutionFinished(finished)
                }
                other => other,
            },
            _ => {
                self.iteration += 1;
                self.model_started(now)
            }
        }
    }

    fn model_started(&self, now: DateTime<Utc>) -> AgentEvent {
        AgentEvent::ModelStarted(ModelStarted {
            run_id: self.run_id,
            timestamp: now,
            provider: self.provider.clone(),
            model: "bench-model".into(),
            iteration: self.iteration,
        })
    }
}
