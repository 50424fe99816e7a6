//! The agent views of a run over real HTTP (AG-UI, and the AI SDK's UI
//! message stream): the whole run, resumed from every cut (inside a text
//! message too) with no gap and no duplicate, live while the run goes on,
//! and checked by the real client packages when they are installed
//! (`server/clients`: `npm ci` there).

mod support;

use std::path::Path;
use std::process::Command;

use behest_stream::{
    AgentEvent, Config, CustomEvent, EventHub, ProviderId, RunCompleted, RunId, RunStarted,
    TextDelta, ToolCall, ToolCallCompleted, ToolCallDelta, ToolCallStarted, ToolExecutionFinished,
    ToolResult,
};
use behest_stream_server::{Open, router};
use chrono::Utc;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::send;

/// A run with text around a tool call and a custom event.
fn script(run_id: RunId) -> Vec<AgentEvent> {
    script_in(run_id, uuid::Uuid::now_v7())
}

/// [`script`] in `session`.
fn script_in(run_id: RunId, session: uuid::Uuid) -> Vec<AgentEvent> {
    let t = Utc::now();
    let text = |d: &str| {
        AgentEvent::TextDelta(TextDelta {
            run_id,
            timestamp: t,
            delta: d.into(),
        })
    };
    vec![
        AgentEvent::RunStarted(RunStarted {
            run_id,
            timestamp: t,
            session_id: Some(session),
            provider: ProviderId::new("p"),
            model: "m".into(),
        }),
        text("Hel"),
        text("lo"),
        text(", "),
        AgentEvent::ToolCallStarted(ToolCallStarted {
            run_id,
            timestamp: t,
            call_id: "c1".into(),
            tool_name: "search".into(),
        }),
        AgentEvent::ToolCallDelta(ToolCallDelta {
            run_id,
            timestamp: t,
            call_id: "c1".into(),
            delta: "{\"q\":".into(),
        }),
        AgentEvent::ToolCallDelta(ToolCallDelta {
            run_id,
            timestamp: t,
            call_id: "c1".into(),
            delta: "1}".into(),
        }),
        AgentEvent::ToolCallCompleted(ToolCallCompleted {
            run_id,
            timestamp: t,
            call: ToolCall {
                id: "c1".into(),
                name: "search".into(),
                arguments: json!({"q": 1}),
            },
        }),
        AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
            run_id,
            timestamp: t,
            call_id: "c1".into(),
            tool_name: "search".into(),
            result: ToolResult::Success {
                output: json!({"n": 1}),
            },
            duration_ms: 3,
        }),
        text("world"),
        // The text stays open: the last envelope maps to its end and the
        // run's, so a cut falls between them too.
        AgentEvent::Custom(CustomEvent {
            run_id,
            timestamp: t,
            kind: "note".into(),
            payload: json!({"k": "v"}),
        }),
        AgentEvent::RunCompleted(RunCompleted {
            run_id,
            timestamp: t,
            finish_reason: "stop".into(),
            iterations: 1,
        }),
    ]
}

/// Serves `hub` open, with SSE responses that send keep-alives every
/// 100 ms and end after `ms` milliseconds.
async fn serve_with_time_limit(hub: &EventHub, ms: u64) -> support::Served {
    let options = behest_stream_server::Options {
        sse_keep_alive: std::time::Duration::from_millis(100),
        sse_max_duration: std::time::Duration::from_millis(ms),
        ..behest_stream_server::Options::default()
    };
    let catalog = RunId::from_uuid(behest_stream_server::CATALOG_RUN);
    let app = behest_stream_server::router_with(hub.clone(), Open, options, catalog)
        .await
        .unwrap();
    support::serve(app).await
}

/// The `(id, event)` pairs of an SSE body.
fn parse(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let id = block.lines().find_map(|l| l.strip_prefix("id: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((id.to_owned(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_resumes_exactly_from_every_cut() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let server = support::serve(router(hub.clone(), Open).await.unwrap()).await;
    let a = server.addr;
    let run = RunId::new();
    // Half the run before the view opens, half while it is open.
    let events = script(run);
    let (before, after) = events.split_at(6);
    for event in before {
        hub.publish(event.clone()).await.unwrap();
    }
    let path = format!("/v1/agui/runs/{run}");
    let live = {
        let path = path.clone();
        tokio::spawn(async move { send(a, Method::GET, &path, &[], "").await })
    };
    for event in after {
        hub.publish(event.clone()).await.unwrap();
    }
    let whole = live.await.unwrap();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.header("content-type"), Some("text/event-stream"));
    let whole = parse(&whole.text());
    let types: Vec<&str> = whole
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"RUN_STARTED"));
    assert_eq!(types.last(), Some(&"RUN_FINISHED"));
    // Text before and after the tool call are two messages, each started once.
    let started: Vec<&Value> = whole
        .iter()
        .filter(|(_, e)| e["type"] == "TEXT_MESSAGE_START")
        .map(|(_, e)| &e["messageId"])
        .collect();
    assert_eq!(started.len(), 2);
    assert_ne!(started[0], started[1]);
    assert_eq!(
        &types[types.len() - 2..],
        ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    );

    // Resuming after any event gives exactly the rest; after the last, 204.
    for (cut, (id, _)) in whole.iter().enumerate() {
        let resumed = send(a, Method::GET, &path, &[("last-event-id", id)], "").await;
        if cut + 1 == whole.len() {
            assert_eq!(resumed.status, StatusCode::NO_CONTENT);
            continue;
        }
        assert_eq!(resumed.status, StatusCode::OK, "cut after {id}");
        assert_eq!(parse(&resumed.text()), whole[cut + 1..], "cut after {id}");
    }
    for bad in ["x", "1", "1.x", "999.0"] {
        let r = send(a, Method::GET, &path, &[("last-event-id", bad)], "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let unknown = format!("/v1/agui/runs/{}", RunId::new());
    assert_eq!(
        send(a, Method::GET, &unknown, &[], "").await.status,
        StatusCode::NOT_FOUND
    );

    // The real client packages: every event parses with @ag-ui/core's
    // schemas, and the whole run and the run cut and resumed twice (inside
    // a text message) pass @ag-ui/client's verifyEvents.
    client_check(
        "agui_check.mjs",
        &format!("http://{a}{path}"),
        "verifyEvents passed",
    )
    .await;
    drop(server);
    hub.shutdown().await.unwrap();
}

/// Runs `server/clients/SCRIPT URL` with node, when the packages are
/// installed; a failure of the packages' checks fails the test.
async fn client_check(script: &str, url: &str, expected: &str) {
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
    if !clients.join("node_modules").exists() {
        let required = std::env::var("BEHEST_STREAM_REQUIRE_CLIENTS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "server/clients has no node_modules (npm ci there) and BEHEST_STREAM_REQUIRE_CLIENTS=1"
        );
        eprintln!("skipped the {script} client check: run `npm ci` in server/clients");
        return;
    }
    let (script, url) = (clients.join(script), url.to_owned());
    let output =
        tokio::task::spawn_blocking(move || Command::new("node").arg(script).arg(url).output())
            .await
            .unwrap()
            .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(expected), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ai_sdk_stream_resumes_exactly_and_gives_the_same_message() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let server = support::serve(router(hub.clone(), Open).await.unwrap()).await;
    let a = server.addr;
    let run = RunId::new();
    let events = script(run);
    let (before, after) = events.split_at(3);
    for event in before {
        hub.publish(event.clone()).await.unwrap();
    }
    let path = format!("/v1/aisdk/runs/{run}");
    // While the run goes on, a resume request gets the stream.
    let live = {
        let path = format!("{path}?resume=1");
        tokio::spawn(async move { send(a, Method::GET, &path, &[], "").await })
    };
    for event in after {
        hub.publish(event.clone()).await.unwrap();
    }
    let whole = live.await.unwrap();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.header("x-vercel-ai-ui-message-stream"), Some("v1"));
    assert!(whole.text().ends_with("data: [DONE]\n\n"));
    let whole = parse(&whole.text());
    let types: Vec<&str> = whole
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"start"));
    assert_eq!(&types[types.len() - 2..], ["text-end", "finish"]);
    assert!(types.contains(&"tool-output-available") && types.contains(&"data-note"));
    for (cut, (id, _)) in whole.iter().enumerate() {
        let resumed = send(a, Method::GET, &path, &[("last-event-id", id)], "").await;
        if cut + 1 == whole.len() {
            assert_eq!(resumed.status, StatusCode::NO_CONTENT);
            continue;
        }
        assert_eq!(parse(&resumed.text()), whole[cut + 1..], "cut after {id}");
    }
    // The run has ended: a resume request finds no active stream.
    let resume = send(a, Method::GET, &format!("{path}?resume=1"), &[], "").await;
    assert_eq!(resume.status, StatusCode::NO_CONTENT);
    client_check(
        "aisdk_check.mjs",
        &format!("http://{a}{path}"),
        "readUIMessageStream passed",
    )
    .await;
    drop(server);
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_of_a_run_that_never_ends_keeps_alive_then_ends_and_answers_preflight() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let server = serve_with_time_limit(&hub, 800).await;
    let a = server.addr;
    let run = RunId::new();
    // Its producer is gone: the run never ends.
    for event in script(run).into_iter().take(3) {
        hub.publish(event).await.unwrap();
    }
    for view in ["agui", "aisdk"] {
        let path = format!("/v1/{view}/runs/{run}");
        // The response ends by itself (send would fail its deadline
        // otherwise), after keep-alive comments, and holds what was published.
        let reply = send(a, Method::GET, &path, &[], "").await;
        assert_eq!(reply.status, StatusCode::OK);
        let text = reply.text();
        assert!(text.contains(":\n\n"), "{view}: no keep-alive in {text:?}");
        // RUN_STARTED or start, a text start and two deltas.
        assert_eq!(parse(&text).len(), 4, "{view}: {text}");
        let preflight = send(
            a,
            Method::OPTIONS,
            &path,
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "GET"),
                (
                    "access-control-request-headers",
                    "last-event-id, authorization",
                ),
            ],
            "",
        )
        .await;
        assert_eq!(preflight.status, StatusCode::NO_CONTENT, "{view}");
        let allowed = preflight.header("access-control-allow-headers").unwrap();
        assert!(allowed.contains("last-event-id") && allowed.contains("authorization"));
        assert_eq!(preflight.header("access-control-allow-origin"), Some("*"));
    }
    drop(server);
    hub.shutdown().await.unwrap();
}

/// With a lease, a run whose producer went quiet ends in both views: the
/// open AG-UI view gets `RUN_ERROR` naming the abandonment and ends, and
/// the AI SDK view `error`, `finish` and `[DONE]`. A stream of the same
/// server, quiet as long, is exempt and stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_producer_went_quiet_ends_in_both_views() {
    let hub = EventHub::open(
        Config::temporary()
            .run_lease(Some(std::time::Duration::from_millis(300)))
            .exempt_from_lease(behest_stream::ProviderId::new(
                behest_stream_server::STREAMS_PROVIDER,
            )),
    )
    .await
    .unwrap();
    let server = support::serve(router(hub.clone(), Open).await.unwrap()).await;
    let a = server.addr;
    let stream = "/v1/stream/quiet";
    let created = send(
        a,
        Method::PUT,
        stream,
        &[("content-type", "text/plain")],
        "",
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let run = RunId::new();
    for event in script(run).into_iter().take(3) {
        hub.publish(event).await.unwrap();
    }
    // Opened before the lease lapses; ends with the hub's RunFailed.
    let agui = send(a, Method::GET, &format!("/v1/agui/runs/{run}"), &[], "").await;
    let events = parse(&agui.text());
    let last = &events.last().unwrap().1;
    assert_eq!(last["type"], "RUN_ERROR", "{events:?}");
    assert!(
        last["message"].as_str().unwrap().starts_with("abandoned"),
        "{last}"
    );
    let aisdk = send(a, Method::GET, &format!("/v1/aisdk/runs/{run}"), &[], "").await;
    let text = aisdk.text();
    assert!(text.contains(r#""type":"error""#), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // The stream, quiet for longer than the lease, is still open.
    let head = send(a, Method::HEAD, stream, &[], "").await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("stream-closed"), None, "the stream was ended");
    drop(server);
    hub.shutdown().await.unwrap();
}

/// A session as AG-UI events: its runs in turn, each from `RUN_STARTED`
/// (thread = the session) to `RUN_FINISHED`, including a run that starts
/// while the view waits; resumed after any event's id it continues with
/// exactly the rest, across the runs' boundary too; the real client's
/// `verifyEvents` accepts it whole and cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_view_serves_its_runs_in_turn_and_resumes_exactly() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let server = serve_with_time_limit(&hub, 3000).await;
    let a = server.addr;
    let session = uuid::Uuid::now_v7();
    let (first, second) = (RunId::new(), RunId::new());
    for event in script_in(first, session) {
        hub.publish(event).await.unwrap();
    }
    let path = format!("/v1/agui/sessions/{session}");
    // The view serves the first run, then waits for the next: publish it
    // once the first run's end is on the wire.
    let mut live = support::stream(a, &path).await;
    assert_eq!(live.status, StatusCode::OK);
    live.until("RUN_FINISHED").await;
    for event in script_in(second, session) {
        hub.publish(event).await.unwrap();
    }
    let whole = parse(&live.rest().await);
    let starts: Vec<usize> = whole
        .iter()
        .enumerate()
        .filter(|(_, (_, e))| e["type"] == "RUN_STARTED")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(starts.len(), 2, "{whole:?}");
    for (start, run) in starts.iter().zip([first, second]) {
        let (id, event) = &whole[*start];
        assert_eq!(event["threadId"], session.to_string());
        assert_eq!(event["runId"], run.to_string());
        assert!(id.starts_with(&format!("{run}.")), "{id}");
    }
    assert_eq!(whole[starts[1] - 1].1["type"], "RUN_FINISHED");
    assert_eq!(whole.last().unwrap().1["type"], "RUN_FINISHED");

    // Every cut, resumed at once (each response lasts the time limit).
    let resumed = futures_util::future::join_all(whole.iter().map(|(id, _)| {
        let (path, id) = (path.clone(), id.clone());
        async move { send(a, Method::GET, &path, &[("last-event-id", &id)], "").await }
    }))
    .await;
    for (cut, reply) in resumed.iter().enumerate() {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(parse(&reply.text()), whole[cut + 1..], "cut after {cut}");
    }
    let stranger = format!("{}.1.0", RunId::new());
    for bad in ["1.0", stranger.as_str()] {
        let reply = send(a, Method::GET, &path, &[("last-event-id", bad)], "").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    client_check(
        "agui_check.mjs",
        &format!("http://{a}{path}"),
        "verifyEvents passed",
    )
    .await;
    drop(server);
    hub.shutdown().await.unwrap();
}
