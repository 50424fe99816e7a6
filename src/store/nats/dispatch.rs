//! One live subscription per host: every follower of the log on this host
//! reads its live messages from a queue that one task fills from a single
//! core subscription to the stream's whole republish (`{prefix}-live.>`),
//! by subject.
//!
//! A subscription per followed subject would cost the host the client's
//! channel for each (a first block of 32 messages, about 6 KiB, whether or
//! not anything arrives); a follower here costs a queue that holds nothing
//! while nothing arrives. The price is that a host that follows anything
//! receives the live messages of every run in the stream and drops those no
//! follower of it wants; it subscribes only while it has followers.
//!
//! A queue holds at most [`BUFFER`] messages: a follower that does not take
//! them loses the rest, which it sees as a gap by their sequences and reads
//! from the stream (see `live.rs`), as it would after core NATS dropped
//! them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use tokio::sync::Notify;

use crate::error::StoreError;

/// Live messages one follower's queue holds at most.
pub(crate) const BUFFER: usize = 1024;

/// The live messages of a host's followers, by subject. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Dispatch {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch")
            .field("wildcard", &self.inner.wildcard)
            .finish_non_exhaustive()
    }
}

struct Inner {
    client: async_nats::Client,
    /// `{prefix}-live.>`.
    wildcard: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The queues of the followers of each live subject.
    queues: HashMap<String, Vec<(u64, Arc<Queue>)>>,
    /// The task that fills them, while there are followers.
    task: Option<tokio::task::AbortHandle>,
    next_id: u64,
}

/// One follower's live messages.
#[derive(Default)]
struct Queue {
    messages: Mutex<VecDeque<async_nats::Message>>,
    arrived: Notify,
    /// The subscription ended: nothing more arrives.
    closed: AtomicBool,
}

impl Queue {
    fn push(&self, message: async_nats::Message) {
        let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        if messages.len() < BUFFER {
            messages.push_back(message);
        }
        drop(messages);
        self.arrived.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.arrived.notify_one();
    }
}

/// A follower's place in the dispatch: its live messages, until dropped.
pub(crate) struct Registration {
    inner: Arc<Inner>,
    subject: String,
    id: u64,
    queue: Arc<Queue>,
}

impl Registration {
    /// The next live message of the subject; `None` once the host's
    /// subscription has ended (follow again).
    pub(crate) async fn next(&self) -> Option<async_nats::Message> {
        loop {
            let arrived = self.queue.arrived.notified();
            if let Some(message) = self
                .queue
                .messages
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front()
            {
                return Some(message);
            }
            if self.queue.closed.load(Ordering::Acquire) {
                return None;
            }
            arrived.await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(queues) = state.queues.get_mut(&self.subject) {
            queues.retain(|(id, _)| *id != self.id);
            if queues.is_empty() {
                state.queues.remove(&self.subject);
            }
        }
        if state.queues.is_empty()
            && let Some(task) = state.task.take()
        {
            // Unsubscribes: a host that follows nothing receives nothing.
            task.abort();
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Dispatch {
    /// The dispatch of the live messages under `wildcard` on `client`.
    pub(crate) fn new(client: async_nats::Client, wildcard: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                wildcard,
                state: Mutex::default(),
            }),
        }
    }

    /// Registers a follower of the live subject `subject`. Returns once the
    /// host's subscription is in place (the server has answered a request
    /// made after it on its connection, when this registration started it),
    /// so that what is republished from then on reaches the follower.
    ///
    /// # Errors
    ///
    /// [`StoreError::ReadFailed`] if the subscription cannot be made.
    pub(crate) async fn register(&self, subject: String) -> Result<Registration, StoreError> {
        let queue = Arc::new(Queue::default());
        let id = {
            let mut state = self.inner.lock();
            state.next_id += 1;
            let id = state.next_id;
            state
                .queues
                .entry(subject.clone())
                .or_default()
                .push((id, Arc::clone(&queue)));
            id
        };
        let registration = Registration {
            inner: Arc::clone(&self.inner),
            subject,
            id,
            queue,
        };
        self.subscribe().await?;
        Ok(registration)
    }

    /// Starts the task that fills the queues, unless it runs.
    async fn subscribe(&self) -> Result<(), StoreError> {
        if self.inner.lock().task.is_some() {
            return Ok(());
        }
        let mut subscription = self
            .inner
            .client
            .subscribe(self.inner.wildcard.clone())
            .await
            .map_err(|e| StoreError::ReadFailed {
                message: format!("NATS: subscribing to {}: {e}", self.inner.wildcard),
            })?;
        // The subscribe only queues the SUB: one request answered on the
        // same connection after it means the server has it, so that what is
        // stored from then on reaches the followers. (Whatever its answer:
        // a follower's gap check and quiet poll still cover a miss.)
        let _ = self
            .inner
            .client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await;
        let mut state = self.inner.lock();
        if state.task.is_some() || state.queues.is_empty() {
            // Another follower started it meanwhile, or this one is gone.
            return Ok(());
        }
        let inner = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let state = inner.lock();
                if let Some(queues) = state.queues.get(message.subject.as_str()) {
                    if let [(_, only)] = queues.as_slice() {
                        only.push(message);
                    } else {
                        for (_, queue) in queues {
                            queue.push(message.clone());
                        }
                    }
                }
            }
            // The subscription ended (the connection closed for good):
            // every follower follows again.
            if let Some(inner) = inner.upgrade() {
                let mut state = inner.lock();
                // Only if it is still this task's: an aborted one that ran
                // on to here must not end a newer subscription's followers.
                if state
                    .task
                    .as_ref()
                    .is_some_and(|task| task.id() == tokio::task::id())
                {
                    state.task = None;
                    for (_, queue) in state.queues.values().flatten() {
                        queue.close();
                    }
                }
            }
        });
        state.task = Some(task.abort_handle());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn message(n: usize) -> async_nats::Message {
        async_nats::Message {
            subject: "behest-live.run.x".into(),
            reply: None,
            payload: n.to_string().into(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn a_queue_keeps_the_first_buffer_messages_a_follower_has_not_taken() {
        let queue = Queue::default();
        for n in 0..BUFFER + 10 {
            queue.push(message(n));
        }
        let messages = queue.messages.lock().unwrap();
        assert_eq!(messages.len(), BUFFER);
        assert_eq!(messages.front().unwrap().payload, "0");
        assert_eq!(
            messages.back().unwrap().payload,
            (BUFFER - 1).to_string().as_str()
        );
    }

    /// A client of the tests' NATS server (`BEHEST_STREAM_NATS_URL`, or the
    /// local one); `None`, with the reason printed, without one, unless
    /// `BEHEST_STREAM_REQUIRE_NATS=1` (CI), when the test fails.
    async fn client() -> Option<async_nats::Client> {
        let url = std::env::var("BEHEST_STREAM_NATS_URL")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
        match async_nats::connect(url.as_str()).await {
            Ok(client) => Some(client),
            Err(error) => {
                assert!(
                    std::env::var("BEHEST_STREAM_REQUIRE_NATS").as_deref() != Ok("1"),
                    "BEHEST_STREAM_REQUIRE_NATS=1 but no NATS server at {url}: {error}"
                );
                eprintln!("skipping: no NATS server at {url} ({error})");
                None
            }
        }
    }

    async fn next(registration: &Registration) -> String {
        let message = tokio::time::timeout(Duration::from_secs(30), registration.next())
            .await
            .expect("a live message within the deadline")
            .expect("the subscription is open");
        String::from_utf8(message.payload.to_vec()).unwrap()
    }

    /// Followers of one subject each get its messages, and nothing of
    /// another subject's; the last follower leaving unsubscribes the host,
    /// and the next one to come subscribes it again.
    #[tokio::test]
    async fn each_follower_gets_its_subjects_messages_and_the_last_to_leave_unsubscribes() {
        let Some(client) = client().await else {
            return;
        };
        let prefix = format!("bt{}-live", uuid::Uuid::now_v7().simple());
        let dispatch = Dispatch::new(client.clone(), format!("{prefix}.>"));
        let (a, b) = (format!("{prefix}.run.a"), format!("{prefix}.run.b"));
        let first_a = dispatch.register(a.clone()).await.unwrap();
        let second_a = dispatch.register(a.clone()).await.unwrap();
        let only_b = dispatch.register(b.clone()).await.unwrap();
        client.publish(a.clone(), "a1".into()).await.unwrap();
        client.publish(b.clone(), "b1".into()).await.unwrap();
        client.publish(a.clone(), "a2".into()).await.unwrap();
        for follower in [&first_a, &second_a] {
            assert_eq!(next(follower).await, "a1");
            assert_eq!(next(follower).await, "a2");
        }
        assert_eq!(next(&only_b).await, "b1");
        assert!(only_b.queue.messages.lock().unwrap().is_empty());

        drop((first_a, second_a, only_b));
        {
            let state = dispatch.inner.lock();
            assert!(state.task.is_none() && state.queues.is_empty());
        }
        let again = dispatch.register(b.clone()).await.unwrap();
        assert!(dispatch.inner.lock().task.is_some());
        client.publish(b, "b2".into()).await.unwrap();
        assert_eq!(next(&again).await, "b2");
    }
}
