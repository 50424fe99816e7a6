//! Properties of the on-disk codec: every event round-trips, and no input,
//! however hostile, makes a decoder panic.

mod common;

use behest_stream::codec::{self, CodecError, FORMAT_VERSION, MAX_JSON_DEPTH};
use behest_stream::{
    AgentEvent, ContextBuilt, CustomEvent, MessageCommitted, ModelStarted, ProviderId,
    RunCancelled, RunCompleted, RunFailed, RunId, RunStarted, RuntimeEventEnvelope, RuntimeEventId,
    TextDelta, TokenUsage, ToolCall, ToolCallCompleted, ToolCallDelta, ToolCallStarted,
    ToolExecutionFinished, ToolExecutionStarted, ToolResult, UsageRecorded,
};
use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::Value;
use uuid::Uuid;

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".*".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".*", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn timestamp() -> impl Strategy<Value = DateTime<Utc>> + Clone {
    (0i64..4_102_444_800, 0u32..1_000_000_000)
        .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).unwrap())
}

fn uuid() -> impl Strategy<Value = Uuid> + Clone {
    any::<u128>().prop_map(Uuid::from_u128)
}

/// Every variant of `AgentEvent`, with arbitrary strings, numbers and JSON.
fn event() -> impl Strategy<Value = AgentEvent> {
    let head = (uuid().prop_map(RunId::from_uuid), timestamp());
    prop_oneof![
        (head.clone(), proptest::option::of(uuid()), ".*", ".*").prop_map(
            |((run_id, timestamp), session_id, provider, model)| {
                AgentEvent::RunStarted(RunStarted {
                    run_id,
                    timestamp,
                    session_id,
                    provider: ProviderId::new(provider),
                    model,
                })
            }
        ),
        (head.clone(), any::<u64>()).prop_map(|((run_id, timestamp), message_count)| {
            AgentEvent::ContextBuilt(ContextBuilt {
                run_id,
                timestamp,
                message_count,
            })
        }),
        (head.clone(), ".*", ".*", any::<u32>()).prop_map(
            |((run_id, timestamp), provider, model, iteration)| {
                AgentEvent::ModelStarted(ModelStarted {
                    run_id,
                    timestamp,
                    provider: ProviderId::new(provider),
                    model,
                    iteration,
                })
            }
        ),
        (head.clone(), ".*").prop_map(|((run_id, timestamp), delta)| {
            AgentEvent::TextDelta(TextDelta {
                run_id,
                timestamp,
                delta,
            })
        }),
        (head.clone(), ".*", ".*").prop_map(|((run_id, timestamp), call_id, tool_name)| {
            AgentEvent::ToolCallStarted(ToolCallStarted {
                run_id,
                timestamp,
                call_id,
                tool_name,
            })
        }),
        (head.clone(), ".*", ".*").prop_map(|((run_id, timestamp), call_id, delta)| {
            AgentEvent::ToolCallDelta(ToolCallDelta {
                run_id,
                timestamp,
                call_id,
                delta,
            })
        }),
        (head.clone(), ".*", ".*", json()).prop_map(
            |((run_id, timestamp), id, name, arguments)| {
                AgentEvent::ToolCallCompleted(ToolCallCompleted {
                    run_id,
                    timestamp,
                    call: ToolCall {
                        id,
                        name,
                        arguments,
                    },
                })
            }
        ),
        (head.clone(), ".*", ".*").prop_map(|((run_id, timestamp), call_id, tool_name)| {
            AgentEvent::ToolExecutionStarted(ToolExecutionStarted {
                run_id,
                timestamp,
                call_id,
                tool_name,
            })
        }),
        (
            head.clone(),
            ".*",
            ".*",
            prop_oneof![
                json().prop_map(|output| ToolResult::Success { output }),
                ".*".prop_map(|error| ToolResult::Failure { error }),
            ],
            any::<u64>()
        )
            .prop_map(
                |((run_id, timestamp), call_id, tool_name, result, duration_ms)| {
                    AgentEvent::ToolExecutionFinished(ToolExecutionFinished {
                        run_id,
                        timestamp,
                        call_id,
                        tool_name,
                        result,
                        duration_ms,
                    })
                }
            ),
        (head.clone(), uuid(), any::<bool>()).prop_map(
            |((run_id, timestamp), message_id, tool)| {
                let payload = MessageCommitted {
                    run_id,
                    timestamp,
                    message_id,
                };
                if tool {
                    AgentEvent::ToolMessageCommitted(payload)
                } else {
                    AgentEvent::AssistantMessageCommitted(payload)
                }
            }
        ),
        (head.clone(), any::<(u64, u64, u64)>()).prop_map(|((run_id, timestamp), (i, o, t))| {
            AgentEvent::UsageRecorded(UsageRecorded {
                run_id,
                timestamp,
                usage: TokenUsage {
                    input_tokens: i,
                    output_tokens: o,
                    total_tokens: t,
                },
            })
        }),
        (head.clone(), ".*", any::<u32>()).prop_map(
            |((run_id, timestamp), finish_reason, iterations)| {
                AgentEvent::RunCompleted(RunCompleted {
                    run_id,
                    timestamp,
                    finish_reason,
                    iterations,
                })
            }
        ),
        (head.clone(), ".*").prop_map(|((run_id, timestamp), error)| {
            AgentEvent::RunFailed(RunFailed {
                run_id,
                timestamp,
                error,
            })
        }),
        head.clone().prop_map(
            |(run_id, timestamp)| AgentEvent::RunCancelled(RunCancelled { run_id, timestamp })
        ),
        (head, ".*", json()).prop_map(|((run_id, timestamp), kind, payload)| {
            AgentEvent::Custom(CustomEvent {
                run_id,
                timestamp,
                kind,
                payload,
            })
        }),
    ]
}

fn envelope() -> impl Strategy<Value = RuntimeEventEnvelope> {
    (
        event(),
        uuid(),
        1u64..,
        proptest::option::of(uuid()),
        timestamp(),
    )
        .prop_map(
            |(event, id, seq, session_id, emitted_at)| RuntimeEventEnvelope {
                event_id: RuntimeEventId::from_uuid(id),
                seq,
                run_id: event.run_id(),
                session_id,
                event,
                emitted_at,
            },
        )
}

proptest! {
    // 512 cases unless PROPTEST_CASES asks for more (or fewer).
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    ))]

    /// Every variant, with arbitrary strings and JSON payloads, survives the
    /// binary codec, a segment, and JSON unchanged.
    #[test]
    fn every_envelope_round_trips(envelopes in prop::collection::vec(envelope(), 1..8)) {
        for envelope in &envelopes {
            let bytes = codec::encode_envelope(envelope).unwrap();
            prop_assert_eq!(&codec::decode_envelope(&bytes).unwrap(), envelope);
            let json = codec::envelope_to_json(envelope).unwrap();
            let back: RuntimeEventEnvelope = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, envelope);
        }
        let encoded: Vec<Vec<u8>> = envelopes.iter().map(|e| codec::encode_envelope(e).unwrap()).collect();
        let segment = codec::encode_segment(encoded.iter().map(Vec::as_slice));
        prop_assert_eq!(segment[0], FORMAT_VERSION);
        prop_assert_eq!(codec::decode_segment(&segment).unwrap(), envelopes);
    }

    /// Arbitrary bytes never make a decoder panic; they decode or err.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode_segment(&bytes);
        let _ = codec::decode_envelope(&bytes);
        let _ = codec::decode_value::<RuntimeEventEnvelope>(&bytes);
        let mut versioned = vec![FORMAT_VERSION];
        versioned.extend_from_slice(&bytes);
        let _ = codec::decode_segment(&versioned);
    }

    /// A valid segment with bytes flipped, cut or appended decodes to an
    /// error or to envelopes, never a panic; cutting it always errs.
    #[test]
    fn damaged_segments_never_panic(
        envelopes in prop::collection::vec(envelope(), 1..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let encoded: Vec<Vec<u8>> = envelopes.iter().map(|e| codec::encode_envelope(e).unwrap()).collect();
        let segment = codec::encode_segment(encoded.iter().map(Vec::as_slice));
        let mut damaged = segment.clone();
        for (at, byte) in flips {
            let i = at.index(damaged.len());
            damaged[i] ^= byte;
        }
        let _ = codec::decode_segment(&damaged);
        let cut_at = cut.index(segment.len());
        prop_assert!(codec::decode_segment(&segment[..cut_at]).is_err());
        let mut longer = segment.clone();
        longer.push(0xc0);
        prop_assert!(matches!(codec::decode_segment(&longer), Err((_, CodecError::TrailingBytes(1)))));
    }
}

/// JSON nested beyond the limit is refused at encode time, so nothing is
/// stored that could not be decoded again; deep hostile bytes are refused
/// at decode time without overflowing the stack.
#[test]
fn deep_json_is_refused_both_ways() {
    let run_id = RunId::new();
    let mut deep = Value::Null;
    for _ in 0..200 {
        deep = Value::Array(vec![deep]);
    }
    let envelope = RuntimeEventEnvelope {
        event_id: RuntimeEventId::new(),
        seq: 1,
        run_id,
        session_id: None,
        event: AgentEvent::Custom(CustomEvent {
            run_id,
            timestamp: Utc::now(),
            kind: "deep".into(),
            payload: deep,
        }),
        emitted_at: Utc::now(),
    };
    assert_eq!(codec::encode_envelope(&envelope), Err(CodecError::TooDeep));
    // 100,000 nested one-element arrays: 0x91 repeated.
    let mut hostile = vec![FORMAT_VERSION, 0x91];
    hostile.extend(std::iter::repeat_n(0x91, 100_000));
    assert!(codec::decode_segment(&hostile).is_err());
}

/// Every envelope the encoder accepts has a JSON form that `serde_json`
/// parses back, its default recursion limit (128) included: at every
/// payload depth up to [`MAX_JSON_DEPTH`], in every event that carries
/// JSON, arrays or objects; deeper is refused as `TooDeep`.
#[test]
fn every_encodable_envelope_has_json_that_parses_back() {
    let run_id = RunId::new();
    for depth in 1..=MAX_JSON_DEPTH + 3 {
        for objects in [false, true] {
            let payload = common::nested_json(depth, objects);
            for event in common::json_carriers(run_id, &payload) {
                let kind = event.kind();
                let envelope = common::wrap(run_id, None, 1, event);
                match codec::encode_envelope(&envelope) {
                    Ok(_) => {
                        assert!(depth <= MAX_JSON_DEPTH, "{kind} at depth {depth} accepted");
                        let json = codec::envelope_to_json(&envelope).unwrap();
                        let back: RuntimeEventEnvelope = serde_json::from_str(&json)
                            .unwrap_or_else(|e| panic!("{kind} at depth {depth}: {e}"));
                        assert_eq!(back, envelope);
                    }
                    Err(CodecError::TooDeep) => {
                        assert!(depth > MAX_JSON_DEPTH, "{kind} at depth {depth} refused");
                    }
                    Err(other) => panic!("{kind} at depth {depth}: {other}"),
                }
            }
        }
    }
}
