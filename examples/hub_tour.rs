//! The main job: an `EventHub` on `./data` carrying three agent runs of one
//! session, with live subscribers: one follows the session, one follows a
//! run and disconnects halfway, then resumes by cursor. Then the hub shuts
//! down, reopens, and replays what it stored.
//!
//! ```text
//! cargo run --example hub_tour            # store in ./data
//! cargo run --example hub_tour -- DIR     # store in DIR
//! ```

use std::error::Error;

#[path = "support/script.rs"]
mod support;

use behest_stream::{Config, Cursor, EventHub, Resume, RunId, RuntimeRoom};
use futures_util::StreamExt;
use support::{SCRIPT_LEN, script};
use uuid::Uuid;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "./data".into());
    let hub = EventHub::open(Config::new(&dir)).await?;
    println!("hub open on {dir} (store epoch {})", hub.epoch());
    let session = Uuid::now_v7();
    let runs: Vec<RunId> = (0..3).map(|_| RunId::new()).collect();

    // A session subscriber: every run of the session, each in seq order.
    let mut session_stream = hub
        .subscribe(RuntimeRoom::Session(session), Resume::FromStart)
        .await?;
    let session_watcher = tokio::spawn(async move {
        let mut seen = 0u64;
        while let Some(item) = session_stream.next().await {
            let envelope = item?;
            seen += 1;
            println!(
                "  [session] run …{} seq {:>2} {}",
                &envelope.run_id.to_string()[30..],
                envelope.seq,
                envelope.event.kind()
            );
            if envelope.is_terminal() && seen >= 3 * SCRIPT_LEN {
                break;
            }
        }
        Ok::<u64, behest_stream::RuntimeStreamError>(seen)
    });

    // A run subscriber that drops its connection after four events and
    // resumes from its cursor.
    let followed = runs[0];
    let epoch = hub.epoch();
    let mut first = hub
        .subscribe(RuntimeRoom::Run(followed), Resume::FromStart)
        .await?;
    let resumer = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut cursor = Cursor::new(epoch);
            let mut seqs = Vec::new();
            while seqs.len() < 4 {
                let envelope = first.next().await.ok_or("ended early")??;
                cursor.advance(&envelope);
                seqs.push(envelope.seq);
            }
            drop(first);
            println!("  [run] disconnected at cursor {cursor}");
            let mut resumed = hub
                .subscribe(RuntimeRoom::Run(followed), Resume::After(cursor))
                .await?;
            while let Some(item) = resumed.next().await {
                seqs.push(item?.seq);
            }
            Ok::<Vec<u64>, Box<dyn Error + Send + Sync>>(seqs)
        })
    };

    // Three runs publish at once, each pipelined (submit, then await).
    let mut producers = Vec::new();
    for (i, run) in runs.iter().copied().enumerate() {
        let hub = hub.clone();
        producers.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for event in script(run, session, i == 2) {
                pending.push(hub.submit(event).await?);
            }
            let mut last = 0;
            for p in pending {
                last = p.await?.seq;
            }
            Ok::<u64, behest_stream::HubError>(last)
        }));
    }
    for (run, producer) in runs.iter().zip(producers) {
        println!("run {run}: published {} events", producer.await??);
    }
    let seen = session_watcher.await??;
    let seqs = resumer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    println!("session subscriber saw {seen} events");
    println!("run subscriber saw seqs {seqs:?} across its reconnect");
    hub.shutdown().await?;

    let hub = EventHub::open(Config::new(&dir)).await?;
    println!("\nreopened (epoch {})", hub.epoch());
    for run in &runs {
        let stored = hub.replay(*run, 0, 100).await?;
        let kinds: Vec<&str> = stored.iter().map(|e| e.event.kind()).collect();
        println!("run {run}: {} events: {}", stored.len(), kinds.join(" "));
    }
    hub.shutdown().await?;
    Ok(())
}
