//! Server-Sent Events over an `EventHub`, with axum: runs and sessions as
//! resumable SSE streams, gated by bearer tokens, and a page that shows a
//! run live with the browser's `EventSource`.
//!
//! ```text
//! cargo run -p behest-stream-server --example sse_server                         # store in ./data, port 3000
//! cargo run -p behest-stream-server --example sse_server -- DIR --port 0         # store in DIR, a free port
//! cargo run -p behest-stream-server --example sse_server -- --temporary --keep-alive-secs 5 --pace-ms 150
//! ```
//!
//! At launch it issues a token for a fresh session, starts a simulated run
//! in it, and prints the address, the token and the run's page:
//!
//! ```text
//! listening on http://127.0.0.1:3000
//! token 6f1c…  (grants session 0193…)
//! run page: http://127.0.0.1:3000/runs/0193…?token=6f1c…
//! ```
//!
//! Each SSE event is one envelope: `id:` the resume cursor after it (the
//! text of `Cursor`), `event:` its type (`text_delta`, …), `data:` the
//! envelope as JSON. A client that reconnects with `Last-Event-ID` (as
//! `EventSource` does by itself) continues with no gap and no duplicate;
//! `?after=CURSOR` does the same for a first request. A run's stream closes
//! after its terminal event; a session's stays open. See `server/src/native/mod.rs` for the
//! routes and the status of every refusal, `native/auth.rs` for where the rooms
//! are gated.
//!
//! ```text
//! curl -N -H "Authorization: Bearer $TOKEN" http://127.0.0.1:3000/runs/$RUN/events
//! curl -N -H "Authorization: Bearer $TOKEN" -H "Last-Event-ID: $ID" http://127.0.0.1:3000/runs/$RUN/events
//! curl -X POST -H "Authorization: Bearer $TOKEN" http://127.0.0.1:3000/demo/runs
//! ```
//!
//! Ctrl-C (or SIGTERM) shuts the hub down, which ends every open stream
//! with a `stream_error` event, and then the server.

use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use behest_stream::{Config, EventHub, RuntimeRoom};
use clap::Parser;
use uuid::Uuid;

use behest_stream_server::native::{AppState, Settings, app};

/// The example's command line.
#[derive(Debug, Parser)]
#[command(about = "Server-Sent Events over a behest-stream EventHub")]
struct Args {
    /// Store directory.
    #[arg(default_value = "./data")]
    dir: PathBuf,
    /// Keep the store in a temporary directory, removed on exit, instead of DIR.
    #[arg(long)]
    temporary: bool,
    /// Port on 127.0.0.1; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Seconds a stream may be idle before the server sends a comment line.
    #[arg(long, default_value_t = 15)]
    keep_alive_secs: u64,
    /// Milliseconds between two text deltas of a demo run.
    #[arg(long, default_value_t = 80)]
    pace_ms: u64,
    /// Start no demo run at launch (POST /demo/runs starts one).
    #[arg(long)]
    no_demo: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let args = Args::parse();
    let (config, place) = if args.temporary {
        (Config::temporary(), "a temporary directory".to_owned())
    } else {
        (Config::new(&args.dir), args.dir.display().to_string())
    };
    let hub = EventHub::open(config).await?;
    println!("store in {place} (epoch {})", hub.epoch());
    let settings = Settings {
        keep_alive: Duration::from_secs(args.keep_alive_secs.max(1)),
        demo_pace: Duration::from_millis(args.pace_ms),
    };
    let state = AppState::new(hub.clone(), settings);

    // Loopback only: this is an example, not a service to expose.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("listening on {base}");

    let session = Uuid::now_v7();
    let token = state.tokens.issue(vec![RuntimeRoom::Session(session)]);
    println!("token {token}  (grants session {session} and its runs)");
    println!("start page: {base}/?token={token}");
    println!("session stream: {base}/sessions/{session}/events?token={token}");
    if !args.no_demo
        && let Some(run_id) = state.start_demo_run(session)
    {
        println!("run page: {base}/runs/{run_id}?token={token}");
    }
    println!("start another run: curl -X POST -H 'Authorization: Bearer {token}' {base}/demo/runs");

    // The hub shuts down first: that ends the open streams (a session's
    // never ends by itself), which lets the server's graceful shutdown,
    // which waits for every response to finish, complete.
    let stopping = hub.clone();
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            stop_signal().await;
            println!("shutting down");
            if let Err(error) = stopping.shutdown().await {
                eprintln!("hub shutdown: {error}");
            }
        })
        .await?;
    hub.shutdown().await?;
    Ok(())
}

/// Ctrl-C, or SIGTERM (what a service manager or `kill` sends).
#[cfg(unix)]
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            eprintln!("no SIGTERM handler ({error}); Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Ctrl-C.
#[cfg(not(unix))]
async fn stop_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
