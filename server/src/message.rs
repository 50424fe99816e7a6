//! What one append stores: the payload of the `Custom` event that carries
//! it in the stream's run.
//!
//! The producer stamp and the writer's `Stream-Seq` travel in the same
//! event as the data, so the store commits them together: a producer's
//! state is never ahead of, or behind, the data it accepted.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `CustomEvent::kind` of an append.
pub(crate) const KIND: &str = "durable_streams.append";

/// The producer headers of an accepted append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    pub(crate) id: String,
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
}

/// One append.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Append {
    /// The bytes of a byte stream, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bytes: Option<String>,
    /// The messages of a JSON stream, one level of the body's array
    /// flattened.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) json: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) producer: Option<Stamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stream_seq: Option<String>,
    /// This append closes the stream (with its data, if any).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) close: bool,
}

impl Append {
    /// The stored bytes of a byte stream (empty for a JSON append or a
    /// close without data).
    pub(crate) fn data(&self) -> Vec<u8> {
        self.bytes
            .as_deref()
            .and_then(|b| STANDARD.decode(b).ok())
            .unwrap_or_default()
    }

    /// Sets the bytes of a byte stream.
    pub(crate) fn with_bytes(mut self, bytes: &[u8]) -> Self {
        if !bytes.is_empty() {
            self.bytes = Some(STANDARD.encode(bytes));
        }
        self
    }

    /// True when the append carries data (not a bare close).
    pub(crate) fn has_data(&self) -> bool {
        self.bytes.is_some() || !self.json.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_round_trips_through_its_json() {
        let append = Append {
            producer: Some(Stamp {
                id: "p".into(),
                epoch: 2,
                seq: 7,
            }),
            stream_seq: Some("009".into()),
            close: true,
            ..Append::default()
        }
        .with_bytes(&[0, 255, 10, 13]);
        let value = serde_json::to_value(&append).unwrap();
        let back: Append = serde_json::from_value(value).unwrap();
        assert_eq!(back, append);
        assert_eq!(back.data(), vec![0, 255, 10, 13]);
        assert!(Append::default().with_bytes(&[]).bytes.is_none());
    }
}
