//! Codec: encoded size and encode+decode time per envelope, MessagePack (the
//! on-disk format) against JSON, for a text delta and a 4 KiB tool result.
//!
//! `cargo bench --bench codec`; the sizes are printed before the timings.

use behest_stream::codec;
use behest_stream::{
    AgentEvent, RunId, RuntimeEventEnvelope, RuntimeEventId, TextDelta, ToolExecutionFinished,
    ToolResult,
};
use chrono::Utc;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

fn envelopes() -> Vec<(&'static str, RuntimeEventEnvelope)> {
    let run_id = RunId::new();
    let wrap = |event| RuntimeEventEnvelope {
        event_id: RuntimeEventId::new(),
        seq: 1234,
        run_id,
        session_id: Some(uuid::Uuid::now_v7()),
        event,
        emitted_at: Utc::now(),
    };
    let delta = wrap(AgentEvent::TextDelta(TextDelta {
        run_id,
        timestamp: Utc::now(),
        delta: "Hello, wor".into(),
    }));
    let rows: Vec<_> = (0..64)
        .map(|i| serde_json::json!({"id": i, "title": format!("result number {i}"), "score": 0.5 + i as f64, "tags": ["a", "b"]}))
        .collect();
    let tool = wrap(AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
        run_id,
        timestamp: Utc::now(),
        call_id: "call_0123456789".into(),
        tool_name: "search".into(),
        result: ToolResult::Success {
            output: serde_json::json!({ "rows": rows }),
        },
        duration_ms: 42,
    }));
    vec![("text_delta", delta), ("tool_result_4k", tool)]
}

fn codec_round_trip(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_round_trip");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for (name, envelope) in envelopes() {
        let msgpack = codec::encode_envelope(&envelope).unwrap();
        let json = serde_json::to_vec(&envelope).unwrap();
        eprintln!(
            "codec size {name}: msgpack {} bytes, json {} bytes ({:.2}x)",
            msgpack.len(),
            json.len(),
            json.len() as f64 / msgpack.len() as f64
        );
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("msgpack", name), &envelope, |b, e| {
            b.iter(|| {
                let bytes = codec::encode_envelope(black_box(e)).unwrap();
                codec::decode_envelope(&bytes).unwrap()
            })
        });
        group.bench_with_input(BenchmarkId::new("json", name), &envelope, |b, e| {
            b.iter(|| {
                let bytes = serde_json::to_vec(black_box(e)).unwrap();
                serde_json::from_slice::<RuntimeEventEnvelope>(&bytes).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec_round_trip);
criterion_main!(benches);
