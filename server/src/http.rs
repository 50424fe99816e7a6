//! The Durable Streams HTTP face: one handler per method on
//! `/v1/stream/{path}`, headers in and out as the protocol names them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::{FutureExt, StreamExt};
use serde_json::{Value, json};

use crate::auth::{Access, Authorize, Denied};
use crate::catalog::StreamConfig;
use crate::message::Stamp;
use crate::offset::{self, ReadFrom};
use crate::problem::Problem;
use crate::sse;
use crate::streams::{AppendRequest, Chunk, CreateRequest, ForkRequest, Framing, Streams, View};
use crate::writers::MAX_PRODUCER_NUMBER;

/// The protocol's response headers a browser script may read.
const EXPOSED: &str = "stream-next-offset, stream-up-to-date, stream-cursor, stream-closed, \
    stream-ttl, stream-expires-at, stream-sse-data-encoding, producer-epoch, producer-seq, \
    producer-expected-seq, producer-received-seq, etag, location, content-type, \
    x-vercel-ai-ui-message-stream";

/// The request headers a browser script may send.
const ALLOWED: &str = "content-type, authorization, if-none-match, stream-seq, stream-ttl, \
    stream-expires-at, stream-closed, stream-forked-from, stream-fork-offset, \
    stream-fork-sub-offset, producer-id, producer-epoch, producer-seq, last-event-id";

/// Longest `Producer-Id` or `Stream-Seq`: they are kept per stream and
/// stored with every append.
const MAX_TOKEN_BYTES: usize = 256;

/// Start of the protocol's cursor intervals: 2024-10-09T00:00:00Z.
const CURSOR_EPOCH: i64 = 1_728_432_000;
/// Length of one cursor interval.
const CURSOR_INTERVAL: i64 = 20;

/// How the server reads and waits.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a long-poll waits for data before answering 204.
    pub long_poll_timeout: Duration,
    /// How long one SSE response stays open before the server ends it (the
    /// client reconnects from its last offset).
    pub sse_max_duration: Duration,
    /// About how many bytes of messages one catch-up response carries.
    pub read_chunk_bytes: usize,
    /// How often the server deletes streams whose TTL or expiry passed.
    pub sweep_every: Duration,
    /// How long an agent-run view may be idle before the server sends a
    /// comment line.
    pub sse_keep_alive: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            long_poll_timeout: Duration::from_secs(20),
            sse_max_duration: Duration::from_secs(60),
            read_chunk_bytes: 1024 * 1024,
            sweep_every: Duration::from_secs(1),
            sse_keep_alive: Duration::from_secs(15),
        }
    }
}

/// What every handler shares.
pub(crate) struct Shared {
    pub(crate) streams: Streams,
    pub(crate) auth: Box<dyn Authorize>,
    pub(crate) options: Options,
}

pub(crate) type AppState = Arc<Shared>;

/// Every request to `/v1/stream/{path}`. The body is read only once the
/// request is authorized, and only up to the largest append.
pub(crate) async fn stream(
    State(state): State<AppState>,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    match handle(
        &state,
        &parts.method,
        &path,
        query.as_deref(),
        &parts.headers,
        body,
    )
    .await
    {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

pub(crate) fn authorize(
    state: &Shared,
    token: Option<&str>,
    path: &str,
    access: Access,
) -> Result<(), Problem> {
    match state.auth.authorize(token, path, access) {
        Ok(()) => Ok(()),
        Err(Denied::Unauthenticated) => Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required",
        )
        .with("www-authenticate", "Bearer")),
        Err(Denied::Forbidden) => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "this token may not do that here",
        )),
    }
}

async fn handle(
    state: &AppState,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    if *method == Method::OPTIONS {
        return Ok(preflight().await);
    }
    check_path(path)?;
    let access = if *method == Method::GET || *method == Method::HEAD {
        Access::Read
    } else {
        Access::Write
    };
    let token = bearer(headers);
    authorize(state, token, path, access)?;
    if *method == Method::PUT
        && let Some(from) = text(headers, "stream-forked-from")?
    {
        // A fork reads its source: the token must be allowed to.
        authorize(
            state,
            token,
            crate::streams::strip_mount(from),
            Access::Read,
        )?;
    }
    let body = match *method {
        Method::PUT | Method::POST => read_body(body, state.streams.max_append_bytes).await?,
        _ => Bytes::new(),
    };
    match *method {
        Method::PUT => put(state, path, headers, body).await,
        Method::POST => post(state, path, headers, body).await,
        Method::DELETE => {
            state.streams.delete(path).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Method::HEAD => head(state, path).await,
        Method::GET => get(state, path, query, headers, token.is_some()).await,
        _ => Err(Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        )),
    }
}

/// Bytes of an oversized body the server reads and drops before it answers
/// 413, so that a client still sending it reads the answer instead of a
/// broken pipe; past this the connection is closed.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// A request body of at most `limit` bytes; 413 past it.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Problem> {
    let mut data = body.into_data_stream();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| Problem::bad_request(format!("reading the body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            kept.extend_from_slice(&chunk);
        } else if seen > DRAIN_BYTES {
            break;
        }
    }
    if seen > limit {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a body of at most {limit} bytes"),
        ));
    }
    Ok(Bytes::from(kept))
}

/// Stream paths are bounded and hold no empty, `.` or `..` segment.
fn check_path(path: &str) -> Result<(), Problem> {
    if path.is_empty() || path.len() > 1024 {
        return Err(Problem::bad_request("a stream path has 1 to 1024 bytes"));
    }
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
        || path.chars().any(char::is_control)
    {
        return Err(Problem::bad_request("malformed stream path"));
    }
    Ok(())
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

pub(crate) async fn preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, PUT, POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOWED),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

/// Adds the browser security and CORS headers to every response.
pub(crate) async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("cross-origin"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED),
    );
    response
}

/// One header's value as text; `None` when absent.
fn text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Problem> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Problem::bad_request(format!("{name} given twice")));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| Problem::bad_request(format!("{name} is not visible ASCII")))
}

/// `Stream-Closed: true`.
fn closing(headers: &HeaderMap) -> Result<bool, Problem> {
    match text(headers, "stream-closed")? {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(Problem::bad_request(format!(
            "Stream-Closed must be true, not {v:?}"
        ))),
    }
}

/// A decimal integer as the protocol writes them: no sign, no leading
/// zero, no fraction or exponent.
fn strict_integer(raw: &str) -> Option<u64> {
    let canonical =
        raw == "0" || (!raw.starts_with('0') && raw.bytes().all(|b| b.is_ascii_digit()));
    if raw.is_empty() || !canonical {
        return None;
    }
    raw.parse().ok()
}

async fn put(
    state: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let content_type = text(headers, "content-type")?;
    let ttl = text(headers, "stream-ttl")?;
    let expires = text(headers, "stream-expires-at")?;
    if ttl.is_some() && expires.is_some() {
        return Err(Problem::bad_request(
            "Stream-TTL and Stream-Expires-At exclude each other",
        ));
    }
    let ttl_secs = ttl
        .map(|t| {
            strict_integer(t).ok_or_else(|| {
                Problem::bad_request(format!("Stream-TTL {t:?} is not a whole number of seconds"))
            })
        })
        .transpose()?;
    let expires_at = expires
        .map(|e| {
            DateTime::parse_from_rfc3339(e)
                .map(|d| d.with_timezone(&Utc))
                .map_err(|_| {
                    Problem::bad_request(format!("Stream-Expires-At {e:?} is not an RFC 3339 time"))
                })
        })
        .transpose()?;
    let fork_from = text(headers, "stream-forked-from")?;
    let fork_at = text(headers, "stream-fork-offset")?;
    let sub_offset = text(headers, "stream-fork-sub-offset")?;
    let fork = match fork_from {
        None => {
            if fork_at.is_some() || sub_offset.is_some() {
                return Err(Problem::bad_request("fork headers need Stream-Forked-From"));
            }
            None
        }
        Some(from) => {
            let at = fork_at
                .map(|o| {
                    offset::parse_position(o).ok_or_else(|| {
                        Problem::bad_request(format!("malformed Stream-Fork-Offset {o:?}"))
                    })
                })
                .transpose()?;
            let sub = sub_offset
                .map(|s| {
                    strict_integer(s).ok_or_else(|| {
                        Problem::bad_request(format!("malformed Stream-Fork-Sub-Offset {s:?}"))
                    })
                })
                .transpose()?;
            if sub.is_some_and(|s| s > 0) && at.is_none() {
                return Err(Problem::bad_request(
                    "Stream-Fork-Sub-Offset needs Stream-Fork-Offset",
                ));
            }
            Some(ForkRequest {
                from: from.to_owned(),
                at,
                sub_offset: sub.filter(|&s| s > 0),
            })
        }
    };
    let request = CreateRequest {
        config: StreamConfig {
            content_type: content_type
                .unwrap_or("application/octet-stream")
                .trim()
                .to_ascii_lowercase(),
            ttl_secs,
            expires_at,
        },
        explicit_type: content_type.is_some(),
        close: closing(headers)?,
        body,
        fork,
    };
    let location = format!("{}/v1/stream/{path}", origin(headers));
    let created = state.streams.create(path, request).await?;
    let mut response = created.status.into_response();
    let h = response.headers_mut();
    put_header(h, "content-type", &created.content_type);
    put_header(h, "stream-next-offset", &offset::format(created.next));
    if created.status == StatusCode::CREATED {
        put_header(h, "location", &location);
    }
    if created.closed {
        put_header(h, "stream-closed", "true");
    }
    Ok(response)
}

/// `scheme://host` of the request, as a proxy in front reports it.
fn origin(headers: &HeaderMap) -> String {
    let value = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()))
    };
    let scheme = match value("x-forwarded-proto") {
        Some("https") => "https",
        _ => "http",
    };
    let host = value("x-forwarded-host")
        .or_else(|| value("host"))
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

fn producer_stamp(headers: &HeaderMap) -> Result<Option<Stamp>, Problem> {
    let id = text(headers, "producer-id")?;
    let epoch = text(headers, "producer-epoch")?;
    let seq = text(headers, "producer-seq")?;
    let (id, epoch, seq) = match (id, epoch, seq) {
        (None, None, None) => return Ok(None),
        (Some(id), Some(epoch), Some(seq)) => (id, epoch, seq),
        _ => {
            return Err(Problem::bad_request(
                "Producer-Id, Producer-Epoch and Producer-Seq go together",
            ));
        }
    };
    if id.is_empty() || id.len() > MAX_TOKEN_BYTES {
        return Err(Problem::bad_request(format!(
            "Producer-Id must have 1 to {MAX_TOKEN_BYTES} bytes"
        )));
    }
    let number = |raw: &str, name: &str| {
        strict_integer(raw)
            .filter(|&n| n <= MAX_PRODUCER_NUMBER)
            .ok_or_else(|| {
                Problem::bad_request(format!("{name} {raw:?} is not an integer in 0..=2^53-1"))
            })
    };
    Ok(Some(Stamp {
        id: id.to_owned(),
        epoch: number(epoch, "Producer-Epoch")?,
        seq: number(seq, "Producer-Seq")?,
    }))
}

async fn post(
    state: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let stamp = producer_stamp(headers)?;
    let request = AppendRequest {
        content_type: text(headers, "content-type")?.map(str::to_owned),
        close: closing(headers)?,
        stream_seq: match text(headers, "stream-seq")? {
            Some(seq) if seq.is_empty() || seq.len() > MAX_TOKEN_BYTES => {
                return Err(Problem::bad_request(format!(
                    "Stream-Seq must have 1 to {MAX_TOKEN_BYTES} bytes"
                )));
            }
            seq => seq.map(str::to_owned),
        },
        stamp,
        body,
    };
    let appended = state.streams.append(path, request).await?;
    let mut response = appended.status.into_response();
    let h = response.headers_mut();
    put_header(h, "stream-next-offset", &offset::format(appended.next));
    if appended.closed {
        put_header(h, "stream-closed", "true");
    }
    if let Some((epoch, seq)) = appended.producer {
        put_header(h, "producer-epoch", &epoch.to_string());
        put_header(h, "producer-seq", &seq.to_string());
    }
    Ok(response)
}

async fn head(state: &Shared, path: &str) -> Result<Response, Problem> {
    let (view, tail, closed) = state.streams.head(path).await?;
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    put_header(h, "content-type", &view.content_type);
    put_header(h, "stream-next-offset", &offset::format(tail));
    put_header(h, "cache-control", "no-store");
    if closed {
        put_header(h, "stream-closed", "true");
    }
    if let Some(config) = &view.config {
        if let Some(ttl) = config.ttl_secs {
            put_header(h, "stream-ttl", &ttl.to_string());
        }
        if let Some(at) = config.expires_at {
            put_header(
                h,
                "stream-expires-at",
                &at.to_rfc3339_opts(SecondsFormat::Millis, true),
            );
        }
    }
    Ok(response)
}

/// The query of a read.
#[derive(Debug, Default)]
struct ReadQuery {
    offset: Option<String>,
    live: Option<String>,
    cursor: Option<String>,
}

fn read_query(raw: Option<&str>) -> Result<ReadQuery, Problem> {
    let mut query = ReadQuery::default();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "offset" => &mut query.offset,
            "live" => &mut query.live,
            "cursor" => &mut query.cursor,
            _ => continue,
        };
        if slot.is_some() {
            return Err(Problem::bad_request(format!("{key} given twice")));
        }
        *slot = Some(percent_decode(value)?);
    }
    Ok(query)
}

fn percent_decode(raw: &str) -> Result<String, Problem> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = raw
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| Problem::bad_request("malformed percent-encoding"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| Problem::bad_request("query is not UTF-8"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Live {
    No,
    LongPoll,
    Sse,
}

async fn get(
    state: &AppState,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    private: bool,
) -> Result<Response, Problem> {
    let query = read_query(query)?;
    let live = match query.live.as_deref() {
        None => Live::No,
        Some("long-poll") => Live::LongPoll,
        Some("sse") => Live::Sse,
        Some(other) => return Err(Problem::bad_request(format!("unknown live mode {other:?}"))),
    };
    let from = match query.offset.as_deref() {
        None if live != Live::No => {
            return Err(Problem::bad_request("live reads need an offset"));
        }
        None => ReadFrom::Start,
        Some(raw) => offset::parse(raw).map_err(|e| Problem::bad_request(e.to_string()))?,
    };
    let view = state.streams.view(path, true).await?;
    let (tail, _) = state.streams.tail(&view).await?;
    let start = match from {
        ReadFrom::Start => 0,
        ReadFrom::Now => tail,
        ReadFrom::After(n) if n > tail => {
            return Err(Problem::bad_request("offset past the stream's tail"));
        }
        ReadFrom::After(n) => n,
    };
    let mut response = match live {
        Live::No if from == ReadFrom::Now => now_response(state, &view).await,
        Live::No => catch_up(state, &view, start, headers).await,
        Live::LongPoll => long_poll(state, &view, start, query.cursor.as_deref()).await,
        Live::Sse => Ok(sse_response(state, view, start, query.cursor)),
    }?;
    if private {
        // What a token read is no shared cache's to keep.
        let h = response.headers_mut();
        if h.get("cache-control")
            .is_some_and(|v| v.as_bytes().starts_with(b"public"))
        {
            put_header(
                h,
                "cache-control",
                "private, max-age=60, stale-while-revalidate=300",
            );
        }
        h.insert(header::VARY, HeaderValue::from_static("authorization"));
    }
    Ok(response)
}

/// `offset=now` without `live`: no data, the tail.
async fn now_response(state: &Shared, view: &View) -> Result<Response, Problem> {
    let (tail, closed) = state.streams.tail(view).await?;
    let body = match view.framing {
        Framing::Json => "[]",
        Framing::Bytes => "",
    };
    let mut response = body.into_response();
    let h = response.headers_mut();
    put_header(h, "content-type", &view.content_type);
    put_header(h, "stream-next-offset", &offset::format(tail));
    put_header(h, "stream-up-to-date", "true");
    put_header(h, "cache-control", "no-store");
    if closed {
        put_header(h, "stream-closed", "true");
    }
    Ok(response)
}

fn chunk_body(framing: Framing, chunk: &Chunk) -> Vec<u8> {
    match framing {
        Framing::Bytes => chunk.bytes.clone(),
        Framing::Json => serde_json::to_vec(&chunk.json).unwrap_or_else(|_| b"[]".to_vec()),
    }
}

fn etag(view: &View, start: u64, chunk: &Chunk) -> String {
    let closed = if chunk.closed { ":c" } else { "" };
    format!("\"{}:{}:{}{closed}\"", view.run(), start, chunk.next)
}

fn chunk_response(view: &View, start: u64, chunk: &Chunk, status: StatusCode) -> Response {
    let mut response = (status, chunk_body(view.framing, chunk)).into_response();
    let h = response.headers_mut();
    put_header(h, "content-type", &view.content_type);
    put_header(h, "stream-next-offset", &offset::format(chunk.next));
    put_header(h, "etag", &etag(view, start, chunk));
    if chunk.up_to_date {
        put_header(h, "stream-up-to-date", "true");
        put_header(h, "cache-control", "no-store");
    } else {
        put_header(
            h,
            "cache-control",
            "public, max-age=60, stale-while-revalidate=300",
        );
    }
    if chunk.closed {
        put_header(h, "stream-closed", "true");
    }
    response
}

async fn catch_up(
    state: &Shared,
    view: &View,
    start: u64,
    headers: &HeaderMap,
) -> Result<Response, Problem> {
    let chunk = state
        .streams
        .read(view, start, state.options.read_chunk_bytes)
        .await?;
    let tag = etag(view, start, &chunk);
    if text(headers, "if-none-match")?.is_some_and(|v| v.split(',').any(|t| t.trim() == tag)) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        put_header(response.headers_mut(), "etag", &tag);
        return Ok(response);
    }
    Ok(chunk_response(view, start, &chunk, StatusCode::OK))
}

/// The protocol's cursor: the current interval, or past the client's.
fn next_cursor(client: Option<&str>) -> String {
    let now = ((Utc::now().timestamp() - CURSOR_EPOCH) / CURSOR_INTERVAL).max(0) as u64;
    match client.and_then(|c| c.parse::<u64>().ok()) {
        Some(c) if c >= now => {
            // 1 to 3600 seconds of jitter, in whole intervals.
            let jitter = (uuid::Uuid::new_v4().as_u128() % 180) as u64 + 1;
            c.saturating_add(jitter).to_string()
        }
        _ => now.to_string(),
    }
}

async fn long_poll(
    state: &Shared,
    view: &View,
    start: u64,
    cursor: Option<&str>,
) -> Result<Response, Problem> {
    let deadline = tokio::time::Instant::now() + state.options.long_poll_timeout;
    loop {
        let chunk = state
            .streams
            .read(view, start, state.options.read_chunk_bytes)
            .await?;
        if chunk.has_data() {
            let mut response = chunk_response(view, start, &chunk, StatusCode::OK);
            put_header(
                response.headers_mut(),
                "stream-cursor",
                &next_cursor(cursor),
            );
            return Ok(response);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if chunk.closed || left.is_zero() || !state.streams.wait(view, chunk.tail_seq, left).await?
        {
            let mut response = StatusCode::NO_CONTENT.into_response();
            let h = response.headers_mut();
            put_header(h, "stream-next-offset", &offset::format(chunk.next));
            put_header(h, "stream-up-to-date", "true");
            put_header(h, "stream-cursor", &next_cursor(cursor));
            put_header(h, "cache-control", "no-store");
            if chunk.closed {
                put_header(h, "stream-closed", "true");
            }
            return Ok(response);
        }
    }
}

/// The data event of a chunk, framed for the stream's content type.
fn data_event(view: &View, chunk: &Chunk, base64: bool) -> String {
    let payload = match view.framing {
        Framing::Json => serde_json::to_string(&chunk.json).unwrap_or_else(|_| "[]".into()),
        Framing::Bytes if base64 => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&chunk.bytes)
        }
        Framing::Bytes => String::from_utf8_lossy(&chunk.bytes).into_owned(),
    };
    sse::event("data", &payload)
}

fn control_event(chunk: &Chunk, cursor: &mut Option<String>) -> String {
    let mut control = json!({ "streamNextOffset": offset::format(chunk.next) });
    if chunk.closed {
        control["streamClosed"] = Value::Bool(true);
    } else {
        let next = next_cursor(cursor.as_deref());
        control["streamCursor"] = Value::String(next.clone());
        *cursor = Some(next);
        if chunk.up_to_date {
            control["upToDate"] = Value::Bool(true);
        }
    }
    sse::event("control", &control.to_string())
}

/// Whether SSE data of this stream goes base64 (anything but text and JSON).
fn sse_base64(view: &View) -> bool {
    let essence = crate::catalog::essence(&view.content_type);
    !(essence.starts_with("text/") || view.framing == Framing::Json)
}

fn sse_response(state: &AppState, view: View, start: u64, cursor: Option<String>) -> Response {
    let base64 = sse_base64(&view);
    let reader = SseReader {
        deadline: tokio::time::Instant::now() + state.options.sse_max_duration,
        state: Arc::clone(state),
        view,
        position: start,
        cursor,
        base64,
        first: true,
        done: false,
        live: None,
    };
    let events = futures_util::stream::unfold(reader, |mut reader| async move {
        let bytes = reader.next().await?;
        Some((Ok::<_, Infallible>(bytes), reader))
    });
    let mut response = Body::from_stream(events).into_response();
    let h = response.headers_mut();
    put_header(h, "content-type", "text/event-stream");
    put_header(h, "cache-control", "no-cache");
    put_header(h, "x-accel-buffering", "no");
    if base64 {
        put_header(h, "stream-sse-data-encoding", "base64");
    }
    response
}

/// Live envelopes one SSE write carries at most.
const LIVE_BATCH: usize = 256;

/// One SSE response's reading: catch up from the store in chunks, then
/// follow the stream's run live (its envelopes, not the store), until the
/// stream closes or the response has lived its time.
struct SseReader {
    state: AppState,
    view: View,
    position: u64,
    cursor: Option<String>,
    base64: bool,
    first: bool,
    done: bool,
    deadline: tokio::time::Instant,
    live: Option<behest_stream::BoxRuntimeEventStream>,
}

impl SseReader {
    /// The next bytes to send; `None` ends the response.
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let chunk = match self.live.as_mut() {
            None => {
                let chunk = self
                    .state
                    .streams
                    .read(
                        &self.view,
                        self.position,
                        self.state.options.read_chunk_bytes,
                    )
                    .await
                    .ok()?;
                if chunk.up_to_date && !chunk.closed {
                    self.live = Some(
                        self.state
                            .streams
                            .follow(&self.view, chunk.tail_seq)
                            .await
                            .ok()?,
                    );
                }
                chunk
            }
            Some(live) => {
                let left = self
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return None;
                }
                let wait = left.min(Duration::from_secs(15));
                let first = match tokio::time::timeout(wait, live.next()).await {
                    Err(_) => return Some(Bytes::from_static(sse::KEEP_ALIVE.as_bytes())),
                    Ok(None | Some(Err(_))) => return None,
                    Ok(Some(Ok(envelope))) => envelope,
                };
                let mut envelopes = vec![first];
                while envelopes.len() < LIVE_BATCH {
                    match live.next().now_or_never() {
                        Some(Some(Ok(envelope))) => envelopes.push(envelope),
                        _ => break,
                    }
                }
                crate::streams::live_chunk(&self.view, &envelopes)
            }
        };
        self.position = chunk.next;
        let mut out = String::new();
        if chunk.has_data() {
            out.push_str(&data_event(&self.view, &chunk, self.base64));
        }
        if chunk.has_data() || self.first || chunk.closed || self.live.is_none() {
            out.push_str(&control_event(&chunk, &mut self.cursor));
        }
        self.first = false;
        self.done = chunk.closed || chunk.ended;
        Some(Bytes::from(out))
    }
}

fn put_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_strict() {
        assert_eq!(strict_integer("0"), Some(0));
        assert_eq!(strict_integer("3600"), Some(3600));
        for bad in ["", "03600", "+3600", "3600.0", "3.6e3", "-1", " 1"] {
            assert_eq!(strict_integer(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_repeated_offset_is_refused_and_unknown_keys_ignored() {
        assert!(read_query(Some("offset=-1&offset=now")).is_err());
        let q = read_query(Some("foo=bar&offset=now&live=sse")).unwrap();
        assert_eq!(q.offset.as_deref(), Some("now"));
        assert_eq!(q.live.as_deref(), Some("sse"));
        assert_eq!(
            read_query(Some("offset=0%201")).unwrap().offset.as_deref(),
            Some("0 1")
        );
    }
}
