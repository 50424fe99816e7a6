//! Following a subject of the log without a consumer on the server.
//!
//! The stream republishes every message it stores to a live subject
//! ([`live_subject`]), with the stream sequence it was stored at
//! (`Nats-Sequence`) and the sequence of the subject's message before it
//! (`Nats-Last-Sequence`). A follower takes that subject's messages from
//! the host's one core subscription to the whole republish (see
//! `dispatch.rs`), which costs the server a subscription per host, not a
//! consumer per follower, and reads what came before from the stream with
//! direct gets:
//!
//! 1. register first, so that nothing stored from then on is missed;
//! 2. read the subject's messages from the start sequence on with direct
//!    gets, to the subject's end;
//! 3. then take the live messages: one already read is skipped, and one whose
//!    `Nats-Last-Sequence` is past the last delivered shows a gap (core NATS
//!    drops messages for a slow subscriber or across a reconnect, and the
//!    host's dispatch for a follower that does not take them), which is
//!    read from the stream before going on;
//! 4. when nothing arrives for [`POLL`], look at the subject's last message
//!    and read from the stream if it is past what was delivered, in case
//!    the subject's last message was the one dropped.
//!
//! Only what the stream stored is republished, so a refused append (a fenced
//! second writer, a duplicate) never reaches a follower.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{NATS_LAST_SEQUENCE, NATS_SEQUENCE};
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::dispatch::{Dispatch, Registration};
use crate::error::StoreError;

/// How long a follower waits for a live message before it reads from the
/// stream once: the longest a message dropped by core NATS, with nothing
/// after it, stays undelivered.
pub(crate) const POLL: Duration = Duration::from_secs(5);

/// A message of the log as a follower delivers it.
pub(crate) struct LogMessage {
    /// Its stream sequence.
    pub(crate) sequence: u64,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: bytes::Bytes,
}

/// The subject the stream republishes `subject`'s stored messages to:
/// `{prefix}.run.X` → `{prefix}-live.run.X`, outside the stream's subjects.
pub(crate) fn live_subject(prefix: &str, subject: &str) -> String {
    let rest = subject.strip_prefix(prefix).unwrap_or(subject);
    format!("{prefix}-live{rest}")
}

/// The messages of `subject` from stream sequence `start` on (0: from its
/// first), then every one stored later, in order, each once. Ends after an
/// error (a direct get the server refused, the subscription closed), so the
/// caller follows again from what it has.
///
/// # Errors
///
/// [`StoreError::ReadFailed`] if the subscription cannot be made.
pub(crate) async fn follow(
    dispatch: &Dispatch,
    stream: stream::Stream<()>,
    subject: String,
    live: String,
    start: u64,
) -> Result<BoxStream<'static, Result<LogMessage, StoreError>>, StoreError> {
    let live = dispatch.register(live).await?;
    let follower = Follower {
        stream,
        subject,
        live,
        next: start.max(1),
        catching_up: true,
    };
    Ok(
        futures_util::stream::unfold(Some(follower), |follower| async move {
            let mut follower = follower?;
            let item = follower.next().await;
            let go_on = item.is_ok();
            Some((item, go_on.then_some(follower)))
        })
        .boxed(),
    )
}

struct Follower {
    stream: stream::Stream<()>,
    subject: String,
    /// Its live messages.
    live: Registration,
    /// The stream sequence to deliver from: everything before it, of this
    /// subject, is delivered.
    next: u64,
    /// Reading from the stream (at the start, after a gap, after a quiet
    /// `POLL`) rather than from the subscription.
    catching_up: bool,
}

impl Follower {
    async fn next(&mut self) -> Result<LogMessage, StoreError> {
        loop {
            if self.catching_up {
                // Boxed, as are the quiet look below: a follower spends its
                // life waiting for a live message, and its state (held by
                // every follower) would otherwise be as large as a read's.
                match Box::pin(
                    self.stream
                        .direct_get_next_for_subject(self.subject.as_str(), Some(self.next)),
                )
                .await
                {
                    Ok(message) => {
                        self.next = message.sequence + 1;
                        return Ok(LogMessage {
                            sequence: message.sequence,
                            headers: message.headers,
                            payload: message.payload,
                        });
                    }
                    Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                        self.catching_up = false;
                    }
                    Err(e) => {
                        return Err(StoreError::ReadFailed {
                            message: format!("NATS: reading {}: {e}", self.subject),
                        });
                    }
                }
                continue;
            }
            let message = match tokio::time::timeout(POLL, self.live.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    return Err(StoreError::ReadFailed {
                        message: format!("NATS: the live subscription to {} ended", self.subject),
                    });
                }
                Err(_quiet) => {
                    self.catching_up = Box::pin(self.behind()).await?;
                    continue;
                }
            };
            let headers = message.headers.unwrap_or_default();
            let (Some(sequence), Some(previous)) = (
                number(headers.get_last(NATS_SEQUENCE)),
                number(headers.get_last(NATS_LAST_SEQUENCE)),
            ) else {
                return Err(StoreError::ReadFailed {
                    message: format!(
                        "NATS: a live message of {} has no republish sequence headers",
                        self.subject
                    ),
                });
            };
            match classify(sequence, previous, self.next) {
                Live::Skip => {}
                Live::Gap => self.catching_up = true,
                Live::Deliver => {
                    self.next = sequence
                        .checked_add(1)
                        .ok_or_else(|| StoreError::ReadFailed {
                            message: format!(
                                "NATS: a live message of {} claims stream sequence {sequence}",
                                self.subject
                            ),
                        })?;
                    return Ok(LogMessage {
                        sequence,
                        headers,
                        payload: message.payload,
                    });
                }
            }
        }
    }
}

impl Follower {
    /// Whether the subject has a message the follower has not delivered:
    /// one look at its last message (which the server finds at once, where
    /// a direct get from `next` may scan the stream on nats-server 2.9).
    async fn behind(&self) -> Result<bool, StoreError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .stream
            .get_last_raw_message_by_subject(self.subject.as_str())
            .await
        {
            Ok(last) => Ok(last.sequence >= self.next),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(false),
            Err(e) => Err(StoreError::ReadFailed {
                message: format!("NATS: reading {}'s last message: {e}", self.subject),
            }),
        }
    }
}

/// What a follower does with a live message.
#[derive(Debug, PartialEq, Eq)]
enum Live {
    /// Already delivered (read from the stream before it arrived).
    Skip,
    /// Something of the subject stored before it was not delivered: read
    /// from the stream (which holds this one too).
    Gap,
    /// The next message.
    Deliver,
}

/// A live message stored at `sequence`, after the subject's message at
/// `previous`, for a follower that has delivered everything before `next`.
fn classify(sequence: u64, previous: u64, next: u64) -> Live {
    if sequence < next {
        Live::Skip
    } else if previous >= next {
        Live::Gap
    } else {
        Live::Deliver
    }
}

fn number(value: Option<&async_nats::HeaderValue>) -> Option<u64> {
    value?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_messages_are_delivered_once_and_gaps_are_read_from_the_stream() {
        // Delivered up to 9: 10 after 7 (another subject between) is next.
        assert_eq!(classify(10, 7, 10), Live::Deliver);
        assert_eq!(classify(12, 9, 10), Live::Deliver);
        // Read from the stream already.
        assert_eq!(classify(9, 5, 10), Live::Skip);
        // The subject's message at 11 never arrived.
        assert_eq!(classify(14, 11, 10), Live::Gap);
        assert_eq!(classify(14, 10, 10), Live::Gap);
        // A subject's first message, for a follower from its start.
        assert_eq!(classify(3, 0, 1), Live::Deliver);
    }

    #[test]
    fn live_subjects_sit_outside_the_stream() {
        assert_eq!(live_subject("behest", "behest.run.x"), "behest-live.run.x");
        assert_eq!(
            live_subject("behest", "behest.session.y"),
            "behest-live.session.y"
        );
    }
}
