//! A room's live feed: the deliveries it fanned out that some subscriber has
//! not read yet, with a read position per subscriber.
//!
//! It does what a tokio broadcast channel of `capacity` did, but a broadcast
//! channel allocates all its slots when it is made (about 7 KiB a room at the
//! default 128 deliveries), for every room, busy or not. This queue holds
//! only the deliveries some receiver still has to read, so it grows as they
//! come and shrinks as they are read: a room whose subscribers keep up holds
//! none. A receiver that falls `capacity` deliveries behind loses the oldest
//! and is told how many (`Lagged`), as with the broadcast channel; the room
//! never waits for a receiver.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::Delivery;

/// A buffer left this large by a backlog that has since been read is
/// released, so that a room pays for a lagging subscriber only while it
/// lags.
const KEEP_SLOTS: usize = 16;

/// Why a receiver got no delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecvError {
    /// The receiver fell more than the queue's capacity behind: this many
    /// deliveries were dropped before it read them. The next receive gets
    /// the oldest one kept.
    Lagged(u64),
    /// The room is gone and the receiver has read everything it sent.
    Closed,
}

struct Inner {
    state: Mutex<State>,
    /// Woken when a delivery is queued and when the sender is dropped.
    ready: Notify,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock except an allocation
        // failure; the state is consistent between statements regardless.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct State {
    /// Deliveries some receiver has not read, oldest first; at most
    /// `capacity`.
    slots: VecDeque<Slot>,
    /// The position of `slots[0]`: how many deliveries were queued before it.
    head: u64,
    capacity: usize,
    receivers: usize,
    closed: bool,
}

struct Slot {
    delivery: Delivery,
    /// Receivers that have yet to read it. A receiver counts for every slot
    /// queued after it subscribed that it has not read, so the counts never
    /// decrease from front to back, and slots everyone read are at the front.
    unread: usize,
}

impl State {
    fn tail(&self) -> u64 {
        self.head + self.slots.len() as u64
    }

    /// Frees the slots every receiver has read.
    fn release_read(&mut self) {
        while self.slots.front().is_some_and(|slot| slot.unread == 0) {
            self.slots.pop_front();
            self.head += 1;
        }
        if self.slots.is_empty() && self.slots.capacity() > KEEP_SLOTS {
            self.slots = VecDeque::new();
        }
    }
}

/// The room's end: queues deliveries. Dropping it closes the feed; receivers
/// still read what was queued before they hear `Closed`.
pub(crate) struct LiveSender {
    inner: Arc<Inner>,
}

impl LiveSender {
    /// A feed that keeps at most `capacity` (at least 1) unread deliveries
    /// per receiver. Allocates no slot until a delivery has a receiver.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    slots: VecDeque::new(),
                    head: 0,
                    capacity: capacity.max(1),
                    receivers: 0,
                    closed: false,
                }),
                ready: Notify::new(),
            }),
        }
    }

    /// Queues `delivery` for every receiver, dropping the oldest one if the
    /// queue is full (the receivers that had not read it lag). With no
    /// receiver it is dropped at once: a receiver only ever reads what was
    /// sent after it subscribed.
    pub(crate) fn send(&self, delivery: Delivery) {
        let evicted = {
            let mut state = self.inner.lock();
            if state.receivers == 0 {
                return;
            }
            let evicted = if state.slots.len() >= state.capacity {
                state.head += 1;
                state.slots.pop_front()
            } else {
                None
            };
            let unread = state.receivers;
            state.slots.push_back(Slot { delivery, unread });
            evicted
        };
        // Outside the lock: it may free the batch and its envelopes.
        drop(evicted);
        self.inner.ready.notify_waiters();
    }

    /// A receiver of every delivery sent from now on.
    pub(crate) fn subscribe(&self) -> LiveReceiver {
        let mut state = self.inner.lock();
        state.receivers += 1;
        LiveReceiver {
            inner: Arc::clone(&self.inner),
            next: state.tail(),
        }
    }

    /// Receivers alive right now.
    pub(crate) fn receiver_count(&self) -> usize {
        self.inner.lock().receivers
    }

    /// Deliveries held for receivers that have not read them.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.inner.lock().slots.len()
    }

    /// Slots allocated, filled or not.
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.inner.lock().slots.capacity()
    }
}

impl Drop for LiveSender {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.ready.notify_waiters();
    }
}

/// A subscriber's end: its position in the room's feed.
pub(crate) struct LiveReceiver {
    inner: Arc<Inner>,
    /// The position of the next delivery this receiver reads.
    next: u64,
}

impl std::fmt::Debug for LiveReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveReceiver")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl LiveReceiver {
    /// The next delivery, waiting for one if there is none yet.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a delivery is taken only when the future completes.
    pub(crate) async fn recv(&mut self) -> Result<Delivery, RecvError> {
        loop {
            // Looked at first without registering for a wakeup: registering
            // (and unregistering) locks the list of waiters every receiver
            // of the room shares, which a receiver that is behind need not.
            if let Some(delivery) = take(&self.inner, &mut self.next)? {
                return Ok(delivery);
            }
            let notified = self.inner.ready.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before looking, so a delivery sent between the look
            // and the wait still wakes this receiver.
            notified.as_mut().enable();
            if let Some(delivery) = take(&self.inner, &mut self.next)? {
                return Ok(delivery);
            }
            notified.await;
        }
    }

    /// The next delivery if there is one now.
    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Result<Option<Delivery>, RecvError> {
        take(&self.inner, &mut self.next)
    }
}

/// Takes the delivery at `next` for one receiver.
fn take(inner: &Inner, next: &mut u64) -> Result<Option<Delivery>, RecvError> {
    let mut state = inner.lock();
    if *next < state.head {
        let skipped = state.head - *next;
        *next = state.head;
        return Err(RecvError::Lagged(skipped));
    }
    let index = usize::try_from(*next - state.head).unwrap_or(usize::MAX);
    let Some(slot) = state.slots.get_mut(index) else {
        return if state.closed {
            Err(RecvError::Closed)
        } else {
            Ok(None)
        };
    };
    let delivery = slot.delivery.clone();
    slot.unread -= 1;
    *next += 1;
    state.release_read();
    Ok(Some(delivery))
}

impl Drop for LiveReceiver {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        state.receivers -= 1;
        // This receiver counts as unread in every slot from its position on
        // (all of them, if it lagged past the front).
        let from = usize::try_from(self.next.saturating_sub(state.head)).unwrap_or(usize::MAX);
        let from = from.min(state.slots.len());
        for slot in state.slots.range_mut(from..) {
            slot.unread -= 1;
        }
        state.release_read();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A delivery of no envelopes whose feed index is `first`, to tell them
    /// apart.
    fn delivery(first: u64) -> Delivery {
        Delivery {
            first,
            envelopes: Arc::new([]),
            persisted: true,
        }
    }

    fn read_all(receiver: &mut LiveReceiver) -> Vec<Result<u64, RecvError>> {
        let mut read = Vec::new();
        loop {
            match receiver.try_recv() {
                Ok(Some(d)) => read.push(Ok(d.first)),
                Ok(None) => return read,
                Err(RecvError::Closed) => {
                    read.push(Err(RecvError::Closed));
                    return read;
                }
                Err(lagged) => read.push(Err(lagged)),
            }
        }
    }

    #[test]
    fn nothing_is_allocated_or_kept_until_a_receiver_needs_it() {
        let sender = LiveSender::new(128);
        assert_eq!(sender.allocated(), 0);
        sender.send(delivery(0));
        assert_eq!((sender.queued(), sender.allocated()), (0, 0), "no receiver");
        let mut receiver = sender.subscribe();
        assert_eq!(sender.allocated(), 0);
        sender.send(delivery(1));
        assert_eq!(sender.queued(), 1);
        assert!(sender.allocated() < 128, "grown on demand");
        assert_eq!(read_all(&mut receiver), vec![Ok(1)]);
        assert_eq!(sender.queued(), 0, "read by every receiver: freed");
    }

    #[test]
    fn every_receiver_reads_every_delivery_from_its_subscribe_on_in_order() {
        let sender = LiveSender::new(8);
        let mut early = sender.subscribe();
        sender.send(delivery(0));
        sender.send(delivery(1));
        let mut late = sender.subscribe();
        sender.send(delivery(2));
        assert_eq!(read_all(&mut late), vec![Ok(2)]);
        assert_eq!(sender.queued(), 3, "the early receiver has read none");
        assert_eq!(read_all(&mut early), vec![Ok(0), Ok(1), Ok(2)]);
        assert_eq!(sender.queued(), 0);
        assert_eq!(sender.receiver_count(), 2);
    }

    #[test]
    fn a_receiver_that_falls_behind_loses_the_oldest_and_is_told_how_many() {
        let sender = LiveSender::new(4);
        let mut stalled = sender.subscribe();
        let mut reading = sender.subscribe();
        for i in 0..10 {
            sender.send(delivery(i));
            assert_eq!(reading.try_recv().map(|d| d.map(|d| d.first)), Ok(Some(i)));
            assert!(sender.queued() <= 4, "bounded: {}", sender.queued());
        }
        assert_eq!(
            read_all(&mut stalled),
            vec![Err(RecvError::Lagged(6)), Ok(6), Ok(7), Ok(8), Ok(9)]
        );
        assert_eq!(sender.queued(), 0);
        assert!(sender.allocated() <= 4, "{}", sender.allocated());
    }

    #[test]
    fn a_dropped_receiver_releases_what_it_had_not_read() {
        let sender = LiveSender::new(64);
        let mut reading = sender.subscribe();
        let stalled = sender.subscribe();
        for i in 0..40 {
            sender.send(delivery(i));
        }
        assert_eq!(read_all(&mut reading).len(), 40);
        assert_eq!(sender.queued(), 40, "held for the stalled receiver");
        drop(stalled);
        assert_eq!(sender.receiver_count(), 1);
        assert_eq!(sender.queued(), 0);
        assert_eq!(sender.allocated(), 0, "a read backlog leaves no buffer");
    }

    #[test]
    fn a_closed_feed_still_yields_what_was_queued_then_closed() {
        let sender = LiveSender::new(4);
        let mut receiver = sender.subscribe();
        sender.send(delivery(0));
        drop(sender);
        assert_eq!(read_all(&mut receiver), vec![Ok(0), Err(RecvError::Closed)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_receiver_wakes_for_each_delivery_and_for_the_close() {
        let sender = LiveSender::new(2);
        let mut receiver = sender.subscribe();
        let reader = tokio::spawn(async move {
            let mut read = Vec::new();
            loop {
                match receiver.recv().await {
                    Ok(d) => read.push(Ok(d.first)),
                    Err(error) => {
                        read.push(Err(error));
                        if error == RecvError::Closed {
                            return read;
                        }
                    }
                }
            }
        });
        // Each send waits until the one before was read, so none is lost to
        // the small capacity and the reader is waiting at every send.
        for i in 0..100 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while sender.queued() > 0 {
                assert!(tokio::time::Instant::now() < deadline, "not read");
                tokio::task::yield_now().await;
            }
            sender.send(delivery(i));
        }
        drop(sender);
        let read = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("the reader never woke")
            .unwrap();
        let mut expected: Vec<_> = (0..100).map(Ok).collect();
        expected.push(Err(RecvError::Closed));
        assert_eq!(read, expected);
    }
}
