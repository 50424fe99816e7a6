//! Bytes on disk: MessagePack with a leading format-version byte.
//!
//! Every value the store writes starts with [`FORMAT_VERSION`]. Envelopes are
//! MessagePack maps with field names (`rmp_serde::to_vec_named`), so the
//! encoding is self-describing: a reader can tell a field from its name, and a
//! field added later does not shift the others. JSON
//! ([`envelope_to_json`]) is for what a person or a wire reads.
//!
//! A *segment* is what one group commit stores for one run: the version byte,
//! a MessagePack array header, and the encoded envelopes of consecutive seqs
//! back to back. Envelopes are encoded once, by the publisher's task, and the
//! store only concatenates them.
//!
//! Decoding never panics on any input: a wrong version, a truncated value,
//! trailing bytes or a malformed envelope each come back as a [`CodecError`].

use std::io::Write as _;

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::event::AgentEvent;
use crate::stream::RuntimeEventEnvelope;

/// The format version this build writes and the only one it reads.
pub const FORMAT_VERSION: u8 = 1;

/// The store layout version this build writes in a store's metadata. It
/// opens stores from version 1 up to this one, and upgrades an older one on
/// open; a build whose version is older refuses a store at this one.
///
/// - 1: runs, segments and the session index.
/// - 2: retention: tombstones of removed runs and the index of ended runs.
///   A build at 1 would read a tombstone (a run record without segments) as
///   damage.
/// - 3: commit records (`w` keys): a commit's envelopes wait there until
///   they are compacted into segments. A build at 2 would not see them, and
///   would reuse the seqs of acknowledged events.
pub const STORE_FORMAT_VERSION: u8 = 3;

/// Deepest nesting of arrays and objects accepted in an event's JSON
/// payload (a scalar is no level: `[]` and `[1]` are 1 deep). Deeper
/// payloads are refused when encoded, so that every envelope stored has a
/// JSON form ([`envelope_to_json`], what SSE clients and the CLI's `--json`
/// read) that `serde_json` parses back with its default recursion limit:
/// that limit less the levels the envelope's JSON puts around the payload.
pub const MAX_JSON_DEPTH: usize = SERDE_JSON_MAX_NESTING - ENVELOPE_JSON_LEVELS;

/// Arrays and objects one JSON document may nest with `serde_json`'s
/// default recursion limit (128): it refuses the 128th.
const SERDE_JSON_MAX_NESTING: usize = 127;

/// Levels an envelope's JSON puts around a payload, at most: the envelope,
/// its event (`{"type", "data"}`), the event's data, and for a tool's
/// output the result (`{"status", "value"}`) and its value.
const ENVELOPE_JSON_LEVELS: usize = 5;

/// Initial buffer for one encoded envelope: a text delta takes about 250
/// bytes.
const ENCODE_CAPACITY_HINT: usize = 384;

/// Nesting depth the decoder allows: what earlier builds let into a payload
/// (128) plus the envelope's own structure, so that everything they stored
/// still decodes. Bounds recursion (and so stack use) on hostile input.
const MAX_DECODE_DEPTH: usize = 128 + 16;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The value was empty: not even a version byte.
    #[error("empty value (no format-version byte)")]
    Empty,
    /// The value was written by a format this build does not read.
    #[error("unknown format version {found} (this build reads version {FORMAT_VERSION})")]
    UnknownVersion {
        /// The version byte found.
        found: u8,
    },
    /// The bytes are not a valid encoding.
    #[error("malformed value: {0}")]
    Malformed(String),
    /// The value decoded but bytes were left over.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    /// An event's JSON payload nests arrays and objects deeper than
    /// [`MAX_JSON_DEPTH`]; flatten it.
    #[error(
        "JSON payload nests arrays and objects deeper than {MAX_JSON_DEPTH} levels, the most \
         whose envelope JSON parses back"
    )]
    TooDeep,
    /// The value could not be encoded.
    #[error("could not encode: {0}")]
    Encode(String),
}

/// Encodes one envelope (without a version byte: it becomes part of a
/// segment). Refuses JSON payloads nested deeper than [`MAX_JSON_DEPTH`],
/// whose envelope JSON `serde_json` would not parse back.
///
/// # Errors
///
/// [`CodecError::TooDeep`] or [`CodecError::Encode`].
pub fn encode_envelope(envelope: &RuntimeEventEnvelope) -> Result<Vec<u8>, CodecError> {
    check_json_depth(&envelope.event)?;
    // Sized for a typical small event, so the common case never regrows.
    let mut out = Vec::with_capacity(ENCODE_CAPACITY_HINT);
    rmp_serde::encode::write_named(&mut out, envelope)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes one envelope encoded by [`encode_envelope`].
///
/// # Errors
///
/// [`CodecError::Malformed`] or [`CodecError::TrailingBytes`].
pub fn decode_envelope(bytes: &[u8]) -> Result<RuntimeEventEnvelope, CodecError> {
    decode_one(bytes)
}

/// Builds a segment value from envelopes already encoded by
/// [`encode_envelope`], in seq order.
#[must_use]
pub fn encode_segment<'a>(encoded: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let parts: Vec<&[u8]> = encoded.collect();
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(1 + 5 + body);
    out.push(FORMAT_VERSION);
    // Writing into a Vec cannot fail; the array header is at most 5 bytes.
    let len = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    let _ = rmp::encode::write_array_len(&mut out, len);
    for part in parts {
        let _ = out.write_all(part);
    }
    out
}

/// Decodes a segment value into its envelopes. On failure returns the index of
/// the envelope that failed (0 when the header itself is bad), so the caller
/// can name the seq.
///
/// # Errors
///
/// `(index, error)` for the first envelope that could not be decoded.
pub fn decode_segment(bytes: &[u8]) -> Result<Vec<RuntimeEventEnvelope>, (usize, CodecError)> {
    let (count, cursor) = segment_header(bytes).map_err(|e| (0, e))?;
    let mut decoder = Decoder::new(cursor);
    // Sized by the claim only up to a point: the claim is unverified.
    let mut out = Vec::with_capacity(count.min(1024));
    for index in 0..count {
        out.push(decoder.next().map_err(|e| (index, e))?);
    }
    decoder.finish().map_err(|e| (count, e))?;
    Ok(out)
}

/// How many envelopes a segment holds, read from its header alone (the
/// envelopes are not decoded).
///
/// # Errors
///
/// A wrong version, or a malformed or lying header.
pub fn segment_len(bytes: &[u8]) -> Result<usize, CodecError> {
    segment_header(bytes).map(|(count, _)| count)
}

/// A segment's envelope count and the bytes after its header.
fn segment_header(bytes: &[u8]) -> Result<(usize, &[u8]), CodecError> {
    let mut cursor = strip_version(bytes)?;
    let count = rmp::decode::read_array_len(&mut cursor)
        .map_err(|e| CodecError::Malformed(format!("segment header: {e}")))?;
    let count = count as usize;
    // Every envelope takes more than one byte, so a count beyond the bytes
    // left is a lie; refuse it before it sizes an allocation.
    if count > cursor.len() {
        return Err(CodecError::Malformed(format!(
            "segment claims {count} envelopes in {} bytes",
            cursor.len()
        )));
    }
    Ok((count, cursor))
}

/// Encodes a metadata value: version byte, then a MessagePack map.
///
/// # Errors
///
/// [`CodecError::Encode`].
pub fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![FORMAT_VERSION];
    rmp_serde::encode::write_named(&mut out, value)
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes a value written by [`encode_value`].
///
/// # Errors
///
/// Any [`CodecError`] but `Encode` and `TooDeep`.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_one(strip_version(bytes)?)
}

/// Exactly one MessagePack value, nothing left over.
fn decode_one<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let mut decoder = Decoder::new(bytes);
    let value = decoder.next()?;
    decoder.finish()?;
    Ok(value)
}

/// Renders an envelope as JSON, for people and wires.
///
/// # Errors
///
/// [`CodecError::Encode`] (cannot happen for envelopes built by this crate).
pub fn envelope_to_json(envelope: &RuntimeEventEnvelope) -> Result<String, CodecError> {
    serde_json::to_string(envelope).map_err(|e| CodecError::Encode(e.to_string()))
}

fn strip_version(bytes: &[u8]) -> Result<&[u8], CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&FORMAT_VERSION, rest)) => Ok(rest),
        Some((&found, _)) => Err(CodecError::UnknownVersion { found }),
    }
}

/// Sequential MessagePack reader over a slice, with a depth limit.
struct Decoder<'a> {
    inner: rmp_serde::Deserializer<rmp_serde::decode::ReadReader<std::io::Cursor<&'a [u8]>>>,
    len: usize,
}

impl<'a> Decoder<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let mut inner = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
        inner.set_max_depth(MAX_DECODE_DEPTH);
        Self {
            inner,
            len: bytes.len(),
        }
    }

    fn next<T: DeserializeOwned>(&mut self) -> Result<T, CodecError> {
        T::deserialize(&mut self.inner).map_err(|e| CodecError::Malformed(e.to_string()))
    }

    fn finish(self) -> Result<(), CodecError> {
        let read = usize::try_from(self.inner.position()).unwrap_or(usize::MAX);
        match self.len.saturating_sub(read) {
            0 => Ok(()),
            n => Err(CodecError::TrailingBytes(n)),
        }
    }
}

/// Refuses an event whose JSON payload nests deeper than
/// [`MAX_JSON_DEPTH`]: its envelope's JSON would not parse back.
pub(crate) fn check_json_depth(event: &AgentEvent) -> Result<(), CodecError> {
    use crate::event::ToolResult;
    let payload = match event {
        AgentEvent::ToolCallCompleted(p) => &p.call.arguments,
        AgentEvent::ToolExecutionFinished(p) => match &p.result {
            ToolResult::Success { output } => output,
            ToolResult::Failure { .. } => return Ok(()),
        },
        AgentEvent::Custom(p) => &p.payload,
        _ => return Ok(()),
    };
    if nests_deeper_than(payload, MAX_JSON_DEPTH) {
        return Err(CodecError::TooDeep);
    }
    Ok(())
}

/// Whether arrays and objects nest in `value` more than `limit` deep (a
/// scalar is 0 deep, `[]` 1), as `serde_json`'s recursion limit counts
/// them. It recurses at most `limit + 1` calls deep, as it descends no
/// further once past the limit, so a pathologically deep value cannot
/// overflow the stack; and it allocates nothing, unlike a walk with a
/// stack of its own (which cost 11% of a 4 KiB tool result's publish).
fn nests_deeper_than(value: &serde_json::Value, limit: usize) -> bool {
    use serde_json::Value;
    match value {
        Value::Array(items) => limit == 0 || items.iter().any(|v| nests_deeper_than(v, limit - 1)),
        Value::Object(map) => limit == 0 || map.values().any(|v| nests_deeper_than(v, limit - 1)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_version_is_named() {
        assert_eq!(
            decode_value::<u64>(&[9, 1]),
            Err(CodecError::UnknownVersion { found: 9 })
        );
        assert_eq!(decode_value::<u64>(&[]), Err(CodecError::Empty));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode_value(&7u64).unwrap();
        bytes.push(0);
        assert_eq!(
            decode_value::<u64>(&bytes),
            Err(CodecError::TrailingBytes(1))
        );
    }

    /// The deepest `limit` a value does not exceed is its depth.
    fn json_depth(value: &serde_json::Value) -> usize {
        (0..)
            .find(|&limit| !nests_deeper_than(value, limit))
            .unwrap()
    }

    #[test]
    fn json_depth_counts_arrays_and_objects() {
        assert_eq!(json_depth(&serde_json::json!(1)), 0);
        assert_eq!(json_depth(&serde_json::json!([])), 1);
        assert_eq!(json_depth(&serde_json::json!({"a": [1, {"b": 2}]})), 3);
        assert_eq!(json_depth(&serde_json::json!([[], [[{}]]])), 4);
        assert_eq!(json_depth(&serde_json::json!([1, [2, [3]], {"a": {}}])), 3);
    }

    #[test]
    fn a_value_far_deeper_than_the_limit_is_refused_without_deep_recursion() {
        let mut value = serde_json::json!(0);
        for _ in 0..100_000 {
            value = serde_json::Value::Array(vec![value]);
        }
        let refused = nests_deeper_than(&value, MAX_JSON_DEPTH);
        // Dropping it recursively would overflow the test's stack (before
        // any assertion, so that a failure reports rather than aborts).
        std::mem::forget(value);
        assert!(refused);
        assert!(!nests_deeper_than(&serde_json::json!([[1]]), 2));
    }

    #[test]
    fn a_lying_segment_count_is_refused_without_allocating() {
        let mut bytes = vec![FORMAT_VERSION];
        rmp::encode::write_array_len(&mut bytes, u32::MAX).unwrap();
        assert!(matches!(
            decode_segment(&bytes),
            Err((0, CodecError::Malformed(_)))
        ));
    }
}
