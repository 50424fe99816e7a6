//! `bench --profile http`: the Durable Streams server under load, over real
//! HTTP on a loopback port, with the hub beside it in the same run.
//!
//! - Appends: `W` writers, each on a keep-alive connection of its own and a
//!   stream of its own, each awaiting every `POST` before the next. Fsynced
//!   (`Durability::Flushed`, the server's default). Baseline: `W` tasks
//!   publishing the same events straight to the hub, each on its own run.
//! - Fan-out: `R` SSE readers of one stream while one writer appends `M`
//!   messages. Baseline: `R` hub subscribers of one run while one task
//!   publishes `M` events.
//!
//! The server, the hub and the load generator share the process (and the
//! machine's cores). Every reader must get every message once, in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use behest_stream::{
    AgentEvent, Config, CustomEvent, EventHub, ProviderId, Resume, RunId, RunStarted, RuntimeRoom,
};
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Barrier;

/// What one HTTP run is asked to do.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Writer counts, one append measurement each.
    pub writers: Vec<usize>,
    /// Appends per measurement, shared by its writers.
    pub appends: usize,
    /// SSE readers of the fan-out stream.
    pub readers: usize,
    /// Messages the fan-out writer appends.
    pub messages: usize,
    /// Bytes per appended message.
    pub message_bytes: usize,
}

/// One append measurement.
#[derive(Debug, Serialize)]
pub struct AppendFigures {
    pub writers: usize,
    pub appends: usize,
    pub appends_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The hub's publishes/s with the same writers and events.
    pub hub_publishes_per_s: f64,
    pub http_over_hub: f64,
}

/// The fan-out measurement.
#[derive(Debug, Serialize)]
pub struct FanOutFigures {
    pub readers: usize,
    pub messages: usize,
    pub deliveries_per_s: f64,
    pub lost: u64,
    pub duplicated: u64,
    /// The hub's deliveries/s to as many subscribers of one run.
    pub hub_deliveries_per_s: f64,
    pub http_over_hub: f64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct HttpReport {
    pub appends: Vec<AppendFigures>,
    pub fan_out: FanOutFigures,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Runs every measurement.
pub async fn run(options: &HttpOptions) -> Result<HttpReport, Failure> {
    let mut appends = Vec::new();
    for &writers in &options.writers {
        appends.push(measure_appends(options, writers).await?);
    }
    let fan_out = measure_fan_out(options).await?;
    Ok(HttpReport { appends, fan_out })
}

/// A hub on a fresh store directory (fsynced), and the server on it.
struct Server {
    hub: EventHub,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Result<Self, Failure> {
        let dir = tempfile::tempdir()?;
        let hub = EventHub::open(Config::new(dir.path())).await?;
        let app = behest_stream_server::router(hub.clone(), behest_stream_server::Open).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            hub,
            addr,
            task,
            _dir: dir,
        })
    }

    async fn stop(self) -> Result<(), Failure> {
        self.task.abort();
        self.hub.shutdown().await?;
        Ok(())
    }
}

/// A keep-alive HTTP/1.1 connection.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self, Failure> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { sender, addr })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Failure> {
        self.sender.ready().await?;
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        Ok(self
            .sender
            .send_request(builder.body(Full::new(body))?)
            .await?)
    }

    /// A request whose whole body is read; fails unless `expected`.
    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        expected: StatusCode,
    ) -> Result<(), Failure> {
        let response = self.send(method, path, headers, body).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if status != expected {
            return Err(format!("{path}: {status} {}", String::from_utf8_lossy(&body)).into());
        }
        Ok(())
    }
}

const TEXT: [(&str, &str); 1] = [("content-type", "text/plain")];

fn payload(bytes: usize, n: usize) -> Bytes {
    let mut text = format!("{n},");
    while text.len() < bytes {
        text.insert(0, '0');
    }
    Bytes::from(text)
}

async fn measure_appends(options: &HttpOptions, writers: usize) -> Result<AppendFigures, Failure> {
    let per_writer = (options.appends / writers).max(1);
    let server = Server::start().await?;
    let mut connections = Vec::new();
    for w in 0..writers {
        let mut connection = Connection::open(server.addr).await?;
        let path = format!("/v1/stream/bench/w{w}");
        connection
            .exchange(Method::PUT, &path, &TEXT, Bytes::new(), StatusCode::CREATED)
            .await?;
        connections.push((connection, path));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut connection, path) in connections {
        let bytes = options.message_bytes;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new(3)?;
            for n in 0..per_writer {
                let sent = Instant::now();
                connection
                    .exchange(
                        Method::POST,
                        &path,
                        &TEXT,
                        payload(bytes, n),
                        StatusCode::NO_CONTENT,
                    )
                    .await?;
                latencies.record(sent.elapsed().as_micros() as u64)?;
            }
            Ok::<_, Failure>(latencies)
        }));
    }
    let mut latencies = Histogram::<u64>::new(3)?;
    for task in tasks {
        latencies.add(task.await??)?;
    }
    let elapsed = started.elapsed();
    server.stop().await?;
    let total = per_writer * writers;
    let appends_per_s = total as f64 / elapsed.as_secs_f64();
    let hub_publishes_per_s = hub_appends(options, writers, per_writer).await?;
    Ok(AppendFigures {
        writers,
        appends: total,
        appends_per_s,
        p50_ms: latencies.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latencies.value_at_quantile(0.99) as f64 / 1000.0,
        hub_publishes_per_s,
        http_over_hub: appends_per_s / hub_publishes_per_s,
    })
}

fn started(run: RunId) -> AgentEvent {
    AgentEvent::RunStarted(RunStarted {
        run_id: run,
        timestamp: Utc::now(),
        session_id: None,
        provider: ProviderId::new("bench"),
        model: String::new(),
    })
}

/// What the server stores per append: a `Custom` event with the body.
fn event(run: RunId, bytes: usize, n: usize) -> AgentEvent {
    AgentEvent::Custom(CustomEvent {
        run_id: run,
        timestamp: Utc::now(),
        kind: "durable_streams.append".into(),
        payload: serde_json::json!({ "bytes": String::from_utf8_lossy(&payload(bytes, n)) }),
    })
}

/// The baseline: the same writers publishing straight to a hub.
async fn hub_appends(
    options: &HttpOptions,
    writers: usize,
    per_writer: usize,
) -> Result<f64, Failure> {
    let dir = tempfile::tempdir()?;
    let hub = EventHub::open(Config::new(dir.path())).await?;
    let runs: Vec<RunId> = (0..writers).map(|_| RunId::new()).collect();
    for &run in &runs {
        hub.publish(started(run)).await?;
    }
    let started_at = Instant::now();
    let mut tasks = Vec::new();
    for run in runs {
        let hub = hub.clone();
        let bytes = options.message_bytes;
        tasks.push(tokio::spawn(async move {
            for n in 0..per_writer {
                hub.publish(event(run, bytes, n)).await?;
            }
            Ok::<_, Failure>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = (writers * per_writer) as f64 / started_at.elapsed().as_secs_f64();
    hub.shutdown().await?;
    Ok(rate)
}

/// What one SSE reader saw.
#[derive(Debug, Default)]
struct ReaderCount {
    received: usize,
    lost: u64,
    duplicated: u64,
}

/// Reads one SSE response until it has `messages` messages; checks each
/// is the next one.
async fn read_sse(
    addr: SocketAddr,
    path: String,
    messages: usize,
    connected: Arc<Barrier>,
) -> Result<ReaderCount, Failure> {
    let mut connection = Connection::open(addr).await?;
    let response = connection
        .send(
            Method::GET,
            &format!("{path}?offset=-1&live=sse"),
            &[],
            Bytes::new(),
        )
        .await?;
    if response.status() != StatusCode::OK {
        return Err(format!("SSE: {}", response.status()).into());
    }
    let mut body = response.into_body();
    let mut buffer = String::new();
    let mut count = ReaderCount::default();
    let mut waiting = Some(connected);
    while count.received < messages {
        let Some(frame) = body.frame().await else {
            return Err("SSE response ended early".into());
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buffer.push_str(std::str::from_utf8(&data)?);
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if block.starts_with("event: control") {
                if let Some(barrier) = waiting.take() {
                    barrier.wait().await;
                }
                continue;
            }
            if !block.starts_with("event: data") {
                continue;
            }
            for line in block.lines().filter_map(|l| l.strip_prefix("data:")) {
                for token in line.split(',').filter(|t| !t.is_empty()) {
                    let n: usize = token.trim_start_matches('0').parse().unwrap_or(0);
                    match n.cmp(&count.received) {
                        std::cmp::Ordering::Equal => count.received += 1,
                        std::cmp::Ordering::Less => count.duplicated += 1,
                        std::cmp::Ordering::Greater => {
                            count.lost += (n - count.received) as u64;
                            count.received = n + 1;
                        }
                    }
                }
            }
        }
    }
    Ok(count)
}

async fn measure_fan_out(options: &HttpOptions) -> Result<FanOutFigures, Failure> {
    let server = Server::start().await?;
    let path = "/v1/stream/bench/fan".to_owned();
    let mut writer = Connection::open(server.addr).await?;
    writer
        .exchange(Method::PUT, &path, &TEXT, Bytes::new(), StatusCode::CREATED)
        .await?;
    let connected = Arc::new(Barrier::new(options.readers + 1));
    let mut readers = Vec::new();
    for _ in 0..options.readers {
        readers.push(tokio::spawn(read_sse(
            server.addr,
            path.clone(),
            options.messages,
            Arc::clone(&connected),
        )));
    }
    connected.wait().await;
    let started_at = Instant::now();
    for n in 0..options.messages {
        writer
            .exchange(
                Method::POST,
                &path,
                &TEXT,
                payload(options.message_bytes, n),
                StatusCode::NO_CONTENT,
            )
            .await?;
    }
    let (mut lost, mut duplicated) = (0, 0);
    for reader in readers {
        let count = tokio::time::timeout(Duration::from_secs(120), reader).await???;
        lost += count.lost;
        duplicated += count.duplicated;
    }
    let elapsed = started_at.elapsed();
    server.stop().await?;
    let deliveries_per_s = (options.readers * options.messages) as f64 / elapsed.as_secs_f64();
    let hub_deliveries_per_s = hub_fan_out(options).await?;
    Ok(FanOutFigures {
        readers: options.readers,
        messages: options.messages,
        deliveries_per_s,
        lost,
        duplicated,
        hub_deliveries_per_s,
        http_over_hub: deliveries_per_s / hub_deliveries_per_s,
    })
}

/// The baseline: as many hub subscribers of one run, one publisher.
async fn hub_fan_out(options: &HttpOptions) -> Result<f64, Failure> {
    let dir = tempfile::tempdir()?;
    let hub = EventHub::open(Config::new(dir.path())).await?;
    let run = RunId::new();
    hub.publish(started(run)).await?;
    let mut subscribers = Vec::new();
    for _ in 0..options.readers {
        let mut events = hub
            .subscribe(RuntimeRoom::Run(run), Resume::FromStart)
            .await?;
        let want = options.messages + 1;
        subscribers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < want {
                match events.next().await {
                    Some(Ok(_)) => seen += 1,
                    other => return Err(format!("hub subscriber: {other:?}")),
                }
            }
            Ok(())
        }));
    }
    let started_at = Instant::now();
    for n in 0..options.messages {
        hub.publish(event(run, options.message_bytes, n)).await?;
    }
    for subscriber in subscribers {
        subscriber.await??;
    }
    let rate = (options.readers * options.messages) as f64 / started_at.elapsed().as_secs_f64();
    hub.shutdown().await?;
    Ok(rate)
}
