//! A plain HTTP/1.1 client for the tests (hyper's connection API, one
//! connection per request) and a server on a loopback port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Longest any request may take in a test.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).expect("a UTF-8 body")
    }
}

/// A server on a loopback port; dropping it stops it (and drops its
/// router, with the hub handle inside).
pub struct Served {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on a free loopback port.
pub async fn serve(app: Router) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Served { addr, task }
}

/// One request on a connection of its own; the whole body is read.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    try_send(addr, method, path, headers, body)
        .await
        .expect("the server answers")
}

/// [`send`], with `None` when the server is gone (connection refused or
/// closed before a whole response).
pub async fn try_send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Option<Reply> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body.into())).unwrap();
    let reply = timeout(DEADLINE, async {
        let response = sender.send_request(request).await.ok()?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        Some(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    })
    .await
    .expect("a whole response in time");
    driver.abort();
    reply
}

/// A GET whose body is read as it arrives: [`Streaming::until`] reads on
/// until the body so far holds a text, [`Streaming::rest`] to its end.
pub struct Streaming {
    pub status: StatusCode,
    body: hyper::body::Incoming,
    read: Vec<u8>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Streaming {
    /// Reads until the body read so far contains `text`.
    pub async fn until(&mut self, text: &str) {
        timeout(DEADLINE, async {
            while !String::from_utf8_lossy(&self.read).contains(text) {
                let frame = self.body.frame().await.expect("the body goes on").unwrap();
                if let Ok(data) = frame.into_data() {
                    self.read.extend_from_slice(&data);
                }
            }
        })
        .await
        .expect("the text in time");
    }

    /// Reads to the end; the whole body as text.
    pub async fn rest(mut self) -> String {
        timeout(DEADLINE, async {
            while let Some(frame) = self.body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    self.read.extend_from_slice(&data);
                }
            }
        })
        .await
        .expect("the whole body in time");
        String::from_utf8(std::mem::take(&mut self.read)).expect("a UTF-8 body")
    }
}

/// Opens a GET of `path` and returns once its head arrived.
pub async fn stream(addr: SocketAddr, path: &str) -> Streaming {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = timeout(DEADLINE, sender.send_request(request))
        .await
        .expect("a head in time")
        .unwrap();
    let (parts, body) = response.into_parts();
    Streaming {
        status: parts.status,
        body,
        read: Vec::new(),
        driver,
    }
}
