//! The server binary killed with SIGKILL while writers append: every append
//! it acknowledged is there after a restart, once, in order, and each
//! producer's state is exactly what was stored with its data.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use support::{send, try_send};

/// Starts the binary on a free port over `dir`; returns it and its address.
fn start(dir: &std::path::Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_behest-stream-server"))
        .args(["--data", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

const WRITERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, a) = start(dir.path());
    let text = [("content-type", "text/plain")];
    for w in 0..WRITERS {
        let r = send(a, Method::PUT, &format!("/v1/stream/w{w}"), &text, "").await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    // Writers append until the server dies under them; each remembers the
    // seqs it got an answer for.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for seq in 0u64.. {
                let seq_text = seq.to_string();
                let headers = [
                    ("content-type", "text/plain"),
                    ("producer-id", "p"),
                    ("producer-epoch", "0"),
                    ("producer-seq", seq_text.as_str()),
                ];
                let body = format!("{seq},");
                let path = format!("/v1/stream/w{w}");
                match try_send(a, Method::POST, &path, &headers, body).await {
                    Some(r) if r.status == StatusCode::OK => acked.push(seq),
                    Some(r) => panic!("writer {w} seq {seq}: {} {}", r.status, r.text()),
                    None => break,
                }
            }
            acked
        }));
    }
    // Kill once every writer has had some appends answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = true;
        for w in 0..WRITERS {
            let r = send(a, Method::GET, &format!("/v1/stream/w{w}"), &[], "").await;
            all &= r.body.iter().filter(|&&b| b == b',').count() >= 20;
        }
        if all {
            break;
        }
        assert!(Instant::now() < deadline, "writers made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut acked = Vec::new();
    for writer in writers {
        acked.push(writer.await.unwrap());
    }

    let (mut child, a) = start(dir.path());
    for (w, acked) in acked.iter().enumerate() {
        let r = send(a, Method::GET, &format!("/v1/stream/w{w}"), &[], "").await;
        let stored: Vec<u64> = r
            .text()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        // In order, no gap, no duplicate; everything acknowledged is there
        // (and perhaps one more that was stored but not answered).
        assert_eq!(
            stored,
            (0..stored.len() as u64).collect::<Vec<_>>(),
            "writer {w}"
        );
        assert!(
            stored.len() >= acked.len() && stored.len() <= acked.len() + 1,
            "writer {w}: stored {} acked {}",
            stored.len(),
            acked.len()
        );
        // The producer's state is the stored data's: re-sending the last
        // stored seq is a duplicate; the next one is new.
        let last = (stored.len() - 1).to_string();
        let next = stored.len().to_string();
        let dup = [
            ("content-type", "text/plain"),
            ("producer-id", "p"),
            ("producer-epoch", "0"),
            ("producer-seq", last.as_str()),
        ];
        let path = format!("/v1/stream/w{w}");
        assert_eq!(
            send(a, Method::POST, &path, &dup, "x").await.status,
            StatusCode::NO_CONTENT
        );
        let new = [
            ("content-type", "text/plain"),
            ("producer-id", "p"),
            ("producer-epoch", "0"),
            ("producer-seq", next.as_str()),
        ];
        assert_eq!(
            send(a, Method::POST, &path, &new, "y").await.status,
            StatusCode::OK
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
