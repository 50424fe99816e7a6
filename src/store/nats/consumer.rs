//! Following a subject of the log through an ordered consumer: the way for
//! a stream the server would not give the live republish (nats-server 2.9
//! refuses to add one to an existing stream), which costs the server a
//! consumer per followed subject. See `live.rs` for the way without one.

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::jetstream::stream;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::live::LogMessage;
use super::log::read_failed;
use crate::error::StoreError;

/// The messages of `subject` from stream sequence `start` on (0: from its
/// first), then every one appended later, through an ordered consumer,
/// ending after an error it does not recover from. The consumer recreates
/// itself after a missed heartbeat from the message after the last it
/// delivered, or, before it delivered any, from the subject's first
/// message: that ends the stream too, so a reconnect replays nothing.
///
/// # Errors
///
/// [`StoreError::ReadFailed`] if the consumer cannot be created.
pub(crate) async fn follow(
    stream: &stream::Stream<()>,
    subject: String,
    start: u64,
) -> Result<BoxStream<'static, Result<LogMessage, StoreError>>, StoreError> {
    let deliver_policy = match start {
        0 => DeliverPolicy::All,
        start_sequence => DeliverPolicy::ByStartSequence { start_sequence },
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| read_failed(&e))?;
    let messages = consumer.messages().await.map_err(|e| read_failed(&e))?;
    // The stream ends right after an error: one the consumer hands over is
    // one it does not recover from by itself (a pull refused because the
    // server lost the consumer in a restart, after which it would wait for
    // missed heartbeats), and a message before `start` means it recreated
    // itself from the subject's first message, which would stream the whole
    // subject to drop it. The room then follows again from what it has.
    Ok(
        futures_util::stream::unfold(Some(messages), move |messages| async move {
            let mut messages = messages?;
            let message = match messages.next().await? {
                Ok(message) => match message.info().map(|info| info.stream_sequence) {
                    Ok(sequence) if sequence < start => Err(StoreError::ReadFailed {
                        message: format!(
                            "NATS: the consumer started over at {sequence}, before {start}"
                        ),
                    }),
                    Ok(sequence) => Ok(LogMessage {
                        sequence,
                        headers: message.headers.clone().unwrap_or_default(),
                        payload: message.payload.clone(),
                    }),
                    Err(error) => Err(read_failed(&error)),
                },
                Err(error) => Err(read_failed(&error)),
            };
            let go_on = message.is_ok();
            Some((message, go_on.then_some(messages)))
        })
        .boxed(),
    )
}
