//! `behest-stream-server`: a Durable Streams server on a behest-stream hub.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use behest_stream::{Config, EventHub};
use behest_stream_server::{BearerTokens, Open, Options};
use clap::Parser;

/// Serve a behest-stream hub over HTTP: Durable Streams at /v1/stream/.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Store directory (created if missing).
    #[arg(long, conflicts_with = "temporary")]
    data: Option<PathBuf>,
    /// A store in a temporary directory, removed at exit.
    #[arg(long)]
    temporary: bool,
    /// Address to listen on (port 0: any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:4437")]
    listen: SocketAddr,
    /// Bearer tokens, one `TOKEN PREFIX read|write` per line. Without it the
    /// server is open, which it allows only on a loopback address.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Long-poll timeout in milliseconds.
    #[arg(long, default_value_t = 20_000)]
    long_poll_ms: u64,
    /// The run that holds this server's catalog of streams. Servers that
    /// share a NATS stream each need their own (streams are not yet shared
    /// between servers).
    #[arg(long)]
    catalog_run: Option<uuid::Uuid>,
    /// Give agent runs a lease of this many milliseconds: a run nobody
    /// publishes to (or renews) for that long is ended with `RunFailed`, so
    /// that its views end. Streams never lapse. Off without it.
    #[arg(long)]
    run_lease_ms: Option<u64>,
    /// Largest stored event in bytes (an append body may be about 3/4 of it).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    max_event_bytes: usize,
    /// Keep streams in NATS JetStream at this URL instead of a local store.
    #[cfg(feature = "nats")]
    #[arg(long, conflicts_with_all = ["data", "temporary"])]
    nats: Option<String>,
    /// The JetStream stream name (with --nats).
    #[cfg(feature = "nats")]
    #[arg(long, default_value = "BEHEST")]
    nats_stream: String,
    /// Subject prefix (with --nats).
    #[cfg(feature = "nats")]
    #[arg(long, default_value = "behest")]
    nats_prefix: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let config = config(&args);
    let config = config
        .max_event_bytes(args.max_event_bytes)
        .run_lease(args.run_lease_ms.map(Duration::from_millis))
        .exempt_from_lease(behest_stream::ProviderId::new(
            behest_stream_server::STREAMS_PROVIDER,
        ));
    let hub = EventHub::open(config).await?;
    let options = Options {
        long_poll_timeout: Duration::from_millis(args.long_poll_ms),
        ..Options::default()
    };
    let catalog = behest_stream::RunId::from_uuid(
        args.catalog_run
            .unwrap_or(behest_stream_server::CATALOG_RUN),
    );
    let app = match &args.tokens {
        Some(path) => {
            let tokens = BearerTokens::parse(&std::fs::read_to_string(path)?)?;
            behest_stream_server::router_with(hub.clone(), tokens, options, catalog).await?
        }
        None if args.listen.ip().is_loopback() => {
            behest_stream_server::router_with(hub.clone(), Open, options, catalog).await?
        }
        None => {
            return Err(format!(
                "{} is not a loopback address: give --tokens, or listen on 127.0.0.1",
                args.listen
            )
            .into());
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    hub.shutdown().await?;
    Ok(())
}

fn config(args: &Args) -> Config {
    #[cfg(feature = "nats")]
    if let Some(url) = &args.nats {
        let mut nats = behest_stream::nats::NatsConfig::new(url.clone());
        nats.stream = args.nats_stream.clone();
        nats.prefix = args.nats_prefix.clone();
        nats.max_event_bytes = args.max_event_bytes;
        return Config::nats(nats);
    }
    if args.temporary {
        return Config::temporary();
    }
    Config::new(args.data.clone().unwrap_or_else(|| PathBuf::from("./data")))
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return interrupt.await.unwrap_or(()),
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
