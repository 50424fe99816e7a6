//! Watch a run room crash and recover while its subscribers keep receiving.
//!
//! ```text
//! cargo run --example supervise --features fault-injection
//! ```
//!
//! A publisher streams 60 text deltas into one run with 16 publishes in
//! flight; two subscribers follow the run. The room is made to panic at its
//! 20th and 40th publish. Publishes the dead room never took come back as
//! `RoomUnavailable` and are retried; the router restarts the room from the
//! store on next use; the subscribers re-attach by themselves and go on with
//! no gap and no duplicate.

use std::collections::VecDeque;
use std::error::Error;

use behest_stream::{
    AgentEvent, Config, EventHub, HubError, PendingPublish, ProviderId, Resume, RunCompleted,
    RunId, RunStarted, RuntimeRoom, TextDelta,
};
use chrono::Utc;
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // The injected panics are the point of the demo; keep their backtraces
    // out of the way. Any other panic is reported as usual.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload().downcast_ref::<String>().map(String::as_str);
        if !message.unwrap_or_default().starts_with("injected panic") {
            default_hook(info);
        }
    }));
    let hub = EventHub::open(Config::temporary()).await?;
    let run = RunId::new();
    let room = RuntimeRoom::Run(run);
    println!("run {run}");

    let mut subscribers = Vec::new();
    for name in ["alice", "bob"] {
        let mut stream = hub.subscribe(room.clone(), Resume::FromStart).await?;
        subscribers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while let Some(item) = stream.next().await {
                let envelope = item.map_err(|e| e.to_string())?;
                if envelope.seq % 10 == 0 || envelope.is_terminal() {
                    println!(
                        "  {name:>5} received seq {:>2} ({})",
                        envelope.seq,
                        envelope.event.kind()
                    );
                }
                seqs.push(envelope.seq);
            }
            Ok::<_, String>((name, seqs))
        }));
    }

    hub.publish(AgentEvent::RunStarted(RunStarted {
        run_id: run,
        timestamp: Utc::now(),
        session_id: None,
        provider: ProviderId::new("acme"),
        model: "acme-large".into(),
    }))
    .await?;
    hub.inject_room_panic(room.clone(), 20);
    let delta = |i: usize| {
        AgentEvent::TextDelta(TextDelta {
            run_id: run,
            timestamp: Utc::now(),
            delta: format!("token {i} "),
        })
    };
    let mut work: VecDeque<usize> = (0..60).collect();
    let mut in_flight: VecDeque<(usize, PendingPublish)> = VecDeque::new();
    let mut streak: Vec<usize> = Vec::new();
    let mut second_crash_armed = false;
    while !work.is_empty() || !in_flight.is_empty() {
        if in_flight.len() < 16
            && let Some(i) = work.pop_front()
        {
            if i == 40 && !second_crash_armed {
                second_crash_armed = true;
                hub.inject_room_panic(room.clone(), 10);
            }
            in_flight.push_back((i, hub.submit(delta(i)).await?));
            continue;
        }
        let Some((i, pending)) = in_flight.pop_front() else {
            break;
        };
        match pending.await {
            Ok(envelope) => {
                if !streak.is_empty() {
                    println!(
                        "room restarted from the store; {} publishes it never took ({:?}..) retried; token {i} stored as seq {}",
                        streak.len(),
                        streak[0],
                        envelope.seq
                    );
                    streak.clear();
                }
            }
            Err(error @ HubError::RoomUnavailable { .. }) => {
                if streak.is_empty() {
                    println!("room crashed: {error}");
                }
                streak.push(i);
                work.push_back(i);
            }
            Err(other) => return Err(other.into()),
        }
    }
    hub.publish(AgentEvent::RunCompleted(RunCompleted {
        run_id: run,
        timestamp: Utc::now(),
        finish_reason: "stop".into(),
        iterations: 1,
    }))
    .await?;

    for subscriber in subscribers {
        let (name, seqs) = subscriber.await??;
        let gapless = seqs.iter().copied().eq(1..=seqs.len() as u64);
        println!(
            "{name} received {} events, gapless and once each: {gapless}",
            seqs.len()
        );
    }
    let stats = hub.stats().await?;
    println!(
        "room failures: {}, rooms started: {}, events stored: {}",
        stats.rooms_failed,
        stats.rooms_started,
        hub.replay(run, 0, 1000).await?.len()
    );
    hub.shutdown().await?;
    Ok(())
}
