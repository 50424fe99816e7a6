//! The Durable Streams server over real HTTP, on a real hub and sled store:
//! what the protocol's conformance suite cannot see (restarts, agent runs,
//! tokens, limits).

mod support;

use std::time::Duration;

use behest_stream::{
    AgentEvent, Config, CustomEvent, EventHub, ProviderId, RunCompleted, RunId, RunStarted,
};
use behest_stream_server::{BearerTokens, Open, router};
use chrono::Utc;
use hyper::{Method, StatusCode};
use serde_json::Value;
use support::{Served, send};

async fn start(hub: &EventHub) -> Served {
    support::serve(router(hub.clone(), Open).await.unwrap()).await
}

fn producer<'a>(id: &'a str, epoch: &'a str, seq: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("content-type", "text/plain"),
        ("producer-id", id),
        ("producer-epoch", epoch),
        ("producer-seq", seq),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_producers_forks_and_deletes_come_back_when_the_store_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    let server = start(&hub).await;
    let a = server.addr;
    let text = [("content-type", "text/plain")];
    assert_eq!(
        send(a, Method::PUT, "/v1/stream/chat/1", &text, "a")
            .await
            .status,
        StatusCode::CREATED
    );
    let r = send(
        a,
        Method::POST,
        "/v1/stream/chat/1",
        &producer("p", "0", "0"),
        "b",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let json = [("content-type", "application/json")];
    send(a, Method::PUT, "/v1/stream/chat/2", &json, "[1, 2]").await;
    let fork = [
        ("content-type", "text/plain"),
        ("stream-forked-from", "/v1/stream/chat/1"),
    ];
    assert_eq!(
        send(a, Method::PUT, "/v1/stream/chat/3", &fork, "")
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        send(a, Method::DELETE, "/v1/stream/chat/2", &[], "")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let closing = [("stream-closed", "true")];
    assert_eq!(
        send(a, Method::POST, "/v1/stream/chat/3", &closing, "")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    drop(server);
    hub.shutdown().await.unwrap();
    drop(hub);

    let hub = EventHub::open(Config::new(dir.path())).await.unwrap();
    let server = start(&hub).await;
    let a = server.addr;
    assert_eq!(
        send(a, Method::GET, "/v1/stream/chat/1", &[], "")
            .await
            .text(),
        "ab"
    );
    assert_eq!(
        send(a, Method::HEAD, "/v1/stream/chat/2", &[], "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let forked = send(a, Method::GET, "/v1/stream/chat/3", &[], "").await;
    assert_eq!(forked.text(), "ab");
    assert_eq!(forked.header("stream-closed"), Some("true"));
    // The producer's state came back with the data it was stored with: the
    // same seq again is a duplicate, the next is new.
    let again = send(
        a,
        Method::POST,
        "/v1/stream/chat/1",
        &producer("p", "0", "0"),
        "b",
    )
    .await;
    assert_eq!(again.status, StatusCode::NO_CONTENT);
    assert_eq!(again.header("producer-seq"), Some("0"));
    let next = send(
        a,
        Method::POST,
        "/v1/stream/chat/1",
        &producer("p", "0", "1"),
        "c",
    )
    .await;
    assert_eq!(next.status, StatusCode::OK);
    assert_eq!(
        send(a, Method::GET, "/v1/stream/chat/1", &[], "")
            .await
            .text(),
        "abc"
    );
    // A path deleted whole can be created again, empty.
    assert_eq!(
        send(a, Method::PUT, "/v1/stream/chat/2", &json, "")
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        send(a, Method::GET, "/v1/stream/chat/2", &[], "")
            .await
            .text(),
        "[]"
    );
    drop(server);
    hub.shutdown().await.unwrap();
}

fn custom(run: RunId, n: u64) -> AgentEvent {
    AgentEvent::Custom(CustomEvent {
        run_id: run,
        timestamp: Utc::now(),
        kind: "tick".into(),
        payload: serde_json::json!({ "n": n }),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_run_reads_as_a_json_stream_of_its_envelopes_and_closes_with_it() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let server = start(&hub).await;
    let a = server.addr;
    let run = RunId::new();
    hub.publish(AgentEvent::RunStarted(RunStarted {
        run_id: run,
        timestamp: Utc::now(),
        session_id: None,
        provider: ProviderId::new("test"),
        model: "m".into(),
    }))
    .await
    .unwrap();
    for n in 0..3 {
        hub.publish(custom(run, n)).await.unwrap();
    }
    let path = format!("/v1/stream/runs/{run}");
    let whole = send(a, Method::GET, &path, &[], "").await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.header("content-type"), Some("application/json"));
    let envelopes: Vec<Value> = serde_json::from_slice(&whole.body).unwrap();
    let seqs: Vec<u64> = envelopes
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(whole.header("stream-up-to-date"), Some("true"));
    assert_eq!(whole.header("stream-closed"), None);
    let tail = whole.header("stream-next-offset").unwrap().to_owned();

    // A long-poll at the tail gets the terminal event when it is published.
    let waiting = tokio::spawn(async move {
        send(
            a,
            Method::GET,
            &format!("{path}?offset={tail}&live=long-poll"),
            &[],
            "",
        )
        .await
    });
    hub.publish(AgentEvent::RunCompleted(RunCompleted {
        run_id: run,
        timestamp: Utc::now(),
        finish_reason: "stop".into(),
        iterations: 1,
    }))
    .await
    .unwrap();
    let polled = waiting.await.unwrap();
    assert_eq!(polled.status, StatusCode::OK);
    let last: Vec<Value> = serde_json::from_slice(&polled.body).unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["seq"], 5);
    assert_eq!(polled.header("stream-closed"), Some("true"));

    let path = format!("/v1/stream/runs/{run}");
    for method in [Method::PUT, Method::POST, Method::DELETE] {
        let r = send(
            a,
            method.clone(),
            &path,
            &[("content-type", "application/json")],
            "[1]",
        )
        .await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
    }
    let unknown = format!("/v1/stream/runs/{}", RunId::new());
    assert_eq!(
        send(a, Method::GET, &unknown, &[], "").await.status,
        StatusCode::NOT_FOUND
    );
    drop(server);
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_before_anything_is_done() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let tokens = BearerTokens::new()
        .grant("writer", "chat/", true)
        .grant("reader", "chat/", false);
    let server = support::serve(router(hub.clone(), tokens).await.unwrap()).await;
    let a = server.addr;
    let text = ("content-type", "text/plain");
    let no_token = send(a, Method::PUT, "/v1/stream/chat/1", &[text], "x").await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
    let unknown = send(
        a,
        Method::PUT,
        "/v1/stream/chat/1",
        &[text, ("authorization", "Bearer nope")],
        "x",
    )
    .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let read_only = send(
        a,
        Method::PUT,
        "/v1/stream/chat/1",
        &[text, ("authorization", "Bearer reader")],
        "x",
    )
    .await;
    assert_eq!(read_only.status, StatusCode::FORBIDDEN);
    let reader = [("authorization", "Bearer reader")];
    // None of that created the stream.
    assert_eq!(
        send(a, Method::HEAD, "/v1/stream/chat/1", &reader, "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let writer = [text, ("authorization", "Bearer writer")];
    assert_eq!(
        send(a, Method::PUT, "/v1/stream/chat/1", &writer, "x")
            .await
            .status,
        StatusCode::CREATED
    );
    assert_eq!(
        send(a, Method::GET, "/v1/stream/chat/1", &reader, "")
            .await
            .text(),
        "x"
    );
    let elsewhere = send(a, Method::PUT, "/v1/stream/other/1", &writer, "x").await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN);
    drop(server);
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_changes_nothing() {
    let hub = EventHub::open(Config::temporary().max_event_bytes(64 * 1024))
        .await
        .unwrap();
    let server = start(&hub).await;
    let a = server.addr;
    let text = [("content-type", "text/plain")];
    send(a, Method::PUT, "/v1/stream/s", &text, "kept").await;
    let tail = send(a, Method::HEAD, "/v1/stream/s", &[], "").await;
    // Far past the limit: the client still gets to send it all and reads 413.
    let big = vec![b'x'; 4 * 1024 * 1024];
    let refused = send(a, Method::POST, "/v1/stream/s", &text, big).await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    for (headers, what) in [
        (
            vec![("content-type", "text/plain"), ("producer-id", "p")],
            "a lone producer header",
        ),
        (
            vec![
                ("content-type", "text/plain"),
                ("producer-id", "p"),
                ("producer-epoch", "01"),
                ("producer-seq", "0"),
            ],
            "a padded epoch",
        ),
        (
            vec![("content-type", "text/plain"), ("stream-closed", "maybe")],
            "Stream-Closed: maybe",
        ),
    ] {
        let r = send(a, Method::POST, "/v1/stream/s", &headers, "x").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}");
    }
    for query in [
        "offset=0,1",
        "offset=",
        "offset=-1&offset=now",
        "offset=abc",
        "live=long-poll",
        "offset=-1&live=forever",
    ] {
        let r = send(a, Method::GET, &format!("/v1/stream/s?{query}"), &[], "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}");
    }
    for path in ["/v1/stream/a//b", "/v1/stream/a/../b"] {
        let r = send(a, Method::PUT, path, &text, "").await;
        assert!(r.status.is_client_error(), "{path}: {}", r.status);
    }
    let after = send(a, Method::HEAD, "/v1/stream/s", &[], "").await;
    assert_eq!(
        after.header("stream-next-offset"),
        tail.header("stream-next-offset")
    );
    assert_eq!(
        send(a, Method::GET, "/v1/stream/s", &[], "").await.text(),
        "kept"
    );
    // Stale readers: an offset past the tail is refused, not waited on.
    let ahead = "/v1/stream/s?offset=0000000000000000_0000000000009999&live=long-poll";
    let r = tokio::time::timeout(Duration::from_secs(5), send(a, Method::GET, ahead, &[], ""))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    drop(server);
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_of_a_fork_reads_up_to_the_nearest_fork_point() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let server = start(&hub).await;
    let a = server.addr;
    let text = [("content-type", "text/plain")];
    send(a, Method::PUT, "/v1/stream/a", &text, "abc").await;
    let after_abc = send(a, Method::HEAD, "/v1/stream/a", &[], "").await;
    let after_abc = after_abc.header("stream-next-offset").unwrap().to_owned();
    send(a, Method::POST, "/v1/stream/a", &text, "d").await;
    let fork_a = [
        ("content-type", "text/plain"),
        ("stream-forked-from", "/v1/stream/a"),
    ];
    assert_eq!(
        send(a, Method::PUT, "/v1/stream/b", &fork_a, "")
            .await
            .status,
        StatusCode::CREATED
    );
    send(a, Method::POST, "/v1/stream/b", &text, "e").await;
    // c forks b at a point inside what b inherited from a.
    let fork_b = [
        ("content-type", "text/plain"),
        ("stream-forked-from", "/v1/stream/b"),
        ("stream-fork-offset", after_abc.as_str()),
    ];
    assert_eq!(
        send(a, Method::PUT, "/v1/stream/c", &fork_b, "")
            .await
            .status,
        StatusCode::CREATED
    );
    send(a, Method::POST, "/v1/stream/c", &text, "X").await;
    assert_eq!(
        send(a, Method::GET, "/v1/stream/b", &[], "").await.text(),
        "abcde"
    );
    assert_eq!(
        send(a, Method::GET, "/v1/stream/c", &[], "").await.text(),
        "abcX"
    );
    let from_fork_point = format!("/v1/stream/c?offset={after_abc}");
    assert_eq!(
        send(a, Method::GET, &from_fork_point, &[], "").await.text(),
        "X"
    );
    drop(server);
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_hold_for_fork_sources_and_stream_runs() {
    let hub = EventHub::open(Config::temporary()).await.unwrap();
    let tokens = BearerTokens::new()
        .grant("admin", "", true)
        .grant("mine", "mine/", true)
        .grant("mine", "runs/", false);
    let server = support::serve(router(hub.clone(), tokens).await.unwrap()).await;
    let a = server.addr;
    let admin = [
        ("content-type", "text/plain"),
        ("authorization", "Bearer admin"),
    ];
    send(a, Method::PUT, "/v1/stream/secret/y", &admin, "secret").await;
    let mine = [
        ("content-type", "text/plain"),
        ("authorization", "Bearer mine"),
        ("stream-forked-from", "/v1/stream/secret/y"),
    ];
    let fork = send(a, Method::PUT, "/v1/stream/mine/x", &mine, "").await;
    assert_eq!(fork.status, StatusCode::FORBIDDEN);
    let reader = [("authorization", "Bearer mine")];
    assert_eq!(
        send(a, Method::HEAD, "/v1/stream/mine/x", &reader, "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // `runs/` serves agent runs, not the catalog or a stream's own run.
    let catalog = format!("/v1/stream/runs/{}", behest_stream_server::CATALOG_RUN);
    assert_eq!(
        send(a, Method::GET, &catalog, &reader, "").await.status,
        StatusCode::NOT_FOUND
    );
    let runs: Vec<RunId> = hub
        .replay(RunId::from_uuid(behest_stream_server::CATALOG_RUN), 0, 100)
        .await
        .unwrap()
        .iter()
        .filter_map(|e| match &e.event {
            AgentEvent::Custom(c) => c.payload["run"]
                .as_str()
                .map(|r| RunId::from_uuid(r.parse().unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(runs.len(), 1, "the catalog names secret/y's run");
    let stream_run = format!("/v1/stream/runs/{}", runs[0]);
    assert_eq!(
        send(a, Method::GET, &stream_run, &reader, "").await.status,
        StatusCode::NOT_FOUND
    );
    drop(server);
    hub.shutdown().await.unwrap();
}
