//! A tail: a task that reads a stream from the shared log (NATS backend)
//! and hands it to a room in batches, one batch in the room's mailbox at a
//! time. Run rooms tail their run; session rooms tail their session's index
//! and each of its runs that has not ended.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use ractor::{ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use crate::error::StoreError;

/// The most items a tail hands over in one message.
const BATCH: usize = 256;

/// How often a tail with nothing to read checks that its room still runs,
/// so that it does not outlive a room that died without dropping it.
const LIVENESS: Duration = Duration::from_secs(5);

/// How soon a room tries again to follow the log after it could not (the
/// server was unreachable), while subscribers wait.
pub(crate) const RETRY: Duration = Duration::from_millis(500);

/// Numbers tails, process-wide.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A running tail; dropping it stops the task.
pub(crate) struct Tail {
    task: tokio::task::AbortHandle,
    id: u64,
}

impl Tail {
    /// What its end message carries, so that a room can tell the end of
    /// the tail it has from that of one it replaced.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a tail of `items` for `room`. Each batch goes as the message
/// `batch` makes, answered by the room once handled; when the stream ends,
/// the room gets `ended(id)`, the tail's [`Tail::id`]. A failed item is logged (`what` names the
/// stream) and skipped; a stream from the log ends after a failure it
/// cannot go on from, and its room follows again from what it has.
pub(crate) fn spawn<M, T>(
    items: BoxStream<'static, Result<T, StoreError>>,
    room: ActorRef<M>,
    what: String,
    batch: impl Fn(Vec<T>, RpcReplyPort<()>) -> M + Send + 'static,
    ended: impl FnOnce(u64) -> M + Send + 'static,
) -> Tail
where
    M: ractor::Message,
    T: Send + 'static,
{
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let task = tokio::spawn(async move {
        let mut batches = items.ready_chunks(BATCH);
        loop {
            let next = match tokio::time::timeout(LIVENESS, batches.next()).await {
                Ok(Some(next)) => next,
                Ok(None) => {
                    let _ = room.send_message(ended(id));
                    return;
                }
                Err(_) if room.get_status() == ractor::ActorStatus::Running => continue,
                Err(_) => return,
            };
            let mut items = Vec::with_capacity(next.len());
            for item in next {
                match item {
                    Ok(item) => items.push(item),
                    Err(error) => tracing::warn!(%error, "following {what}: an error"),
                }
            }
            if items.is_empty() {
                continue;
            }
            let (done, handled) = oneshot::channel();
            if room.send_message(batch(items, done.into())).is_err() || handled.await.is_err() {
                return;
            }
        }
    });
    Tail {
        task: task.abort_handle(),
        id,
    }
}
