//! A room's outgoing side, shared by run and fanout rooms: the live feed
//! subscribers read (a queue of batches with a position per subscriber, so
//! a subscriber's queue is bounded by its capacity and a slow one only falls
//! behind), the ring of recent envelopes, and the idle clock.
//!
//! Both the live feed and the ring start empty and grow with what the room
//! fans out, so a room that has sent nothing yet costs neither.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::live::LiveSender;
use super::{Delivery, LiveFeed, RoomStats, Shared};
use crate::stream::{RuntimeEventEnvelope, RuntimeRoom};

pub(crate) struct Feed {
    live: LiveSender,
    ring: VecDeque<Arc<RuntimeEventEnvelope>>,
    shared: Arc<Shared>,
    last_active: Instant,
    fanned_out: u64,
}

impl Feed {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            live: LiveSender::new(shared.live_capacity),
            ring: VecDeque::new(),
            shared,
            last_active: Instant::now(),
            fanned_out: 0,
        }
    }

    /// Fans out persisted envelopes, in seq order, in as few deliveries as
    /// the bound on a delivery allows, and keeps them in the ring.
    pub(crate) fn push(&mut self, envelopes: Vec<Arc<RuntimeEventEnvelope>>) {
        for envelope in &envelopes {
            if self.ring.len() == self.shared.ring_capacity {
                self.ring.pop_front();
            }
            self.ring.push_back(Arc::clone(envelope));
        }
        // A delivery holds at most ring_capacity / live_capacity envelopes,
        // so that the live channel never keeps more than about a ring's
        // worth of envelopes alive for a subscriber that stopped reading.
        let per_delivery = self
            .shared
            .ring_capacity
            .div_ceil(self.shared.live_capacity)
            .max(1);
        for chunk in envelopes.chunks(per_delivery) {
            self.send(chunk.into(), true);
        }
    }

    fn send(&mut self, envelopes: Arc<[Arc<RuntimeEventEnvelope>]>, persisted: bool) {
        let first = self.fanned_out;
        self.fanned_out += envelopes.len() as u64;
        self.live.send(Delivery {
            first,
            envelopes,
            persisted,
        });
    }

    /// Fans out an envelope published through the adapter, unless the room
    /// already fanned it out (a host that appends, then publishes the same
    /// envelope, in the seed's style, delivers it once).
    pub(crate) fn live_publish(&mut self, envelope: Box<RuntimeEventEnvelope>) {
        self.touch();
        if !self.ring.iter().any(|e| e.event_id == envelope.event_id) {
            self.send(Arc::new([Arc::from(envelope)]), false);
        }
    }

    /// A new receiver of everything fanned out from now on.
    pub(crate) fn subscribe(&mut self) -> LiveFeed {
        self.touch();
        LiveFeed {
            receiver: self.live.subscribe(),
            next: self.fanned_out,
        }
    }

    pub(crate) fn touch(&mut self) {
        self.last_active = Instant::now();
    }

    /// The recent envelopes, oldest first.
    pub(crate) fn ring(&self) -> &VecDeque<Arc<RuntimeEventEnvelope>> {
        &self.ring
    }

    /// Whether anyone holds the live feed.
    pub(crate) fn has_subscribers(&self) -> bool {
        self.live.receiver_count() > 0
    }

    /// No subscriber, and no activity for the idle timeout. (A run room also
    /// requires nothing in flight.)
    pub(crate) fn is_idle(&self) -> bool {
        self.live.receiver_count() == 0 && self.last_active.elapsed() >= self.shared.idle_timeout
    }

    pub(crate) fn stats(
        &self,
        room: RuntimeRoom,
        in_flight: usize,
        last_seq: Option<u64>,
    ) -> RoomStats {
        RoomStats {
            room,
            subscribers: self.live.receiver_count(),
            ring_len: self.ring.len(),
            ring_capacity: self.shared.ring_capacity,
            in_flight,
            last_seq,
            fanned_out: self.fanned_out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::event::{AgentEvent, TextDelta};
    use crate::hub::live::RecvError;
    use crate::ids::RunId;
    use crate::stream::RuntimeEventId;

    fn envelopes(
        run_id: RunId,
        seqs: std::ops::RangeInclusive<u64>,
    ) -> Vec<Arc<RuntimeEventEnvelope>> {
        seqs.map(|seq| {
            Arc::new(RuntimeEventEnvelope {
                event_id: RuntimeEventId::new(),
                seq,
                run_id,
                session_id: None,
                event: AgentEvent::TextDelta(TextDelta {
                    run_id,
                    timestamp: chrono::Utc::now(),
                    delta: "x".into(),
                }),
                emitted_at: chrono::Utc::now(),
            })
        })
        .collect()
    }

    /// A room that has fanned out nothing holds no slot for it, with or
    /// without a subscriber: the live feed and the ring grow with what is
    /// fanned out, and the live feed gives back what every subscriber read.
    #[test]
    fn a_room_allocates_its_feed_and_ring_on_demand() {
        let shared = Arc::new(Shared::new(&Config::temporary()));
        let mut feed = Feed::new(shared);
        let mut subscriber = feed.subscribe();
        assert_eq!((feed.live.allocated(), feed.ring().capacity()), (0, 0));
        feed.push(envelopes(RunId::new(), 1..=3));
        assert_eq!(feed.live.queued(), 1, "one delivery, unread");
        assert!(feed.ring().capacity() < 64, "{}", feed.ring().capacity());
        let delivery = subscriber.receiver.try_recv().unwrap().unwrap();
        assert_eq!(delivery.envelopes.len(), 3);
        assert_eq!(feed.live.queued(), 0, "read by its only subscriber");
    }

    /// A big fan-out is split into deliveries of at most
    /// ring_capacity / live_capacity envelopes, so a subscriber that stopped
    /// reading keeps at most about a ring's worth alive, and the indices let
    /// it count exactly what it skipped.
    #[test]
    fn deliveries_are_bounded_so_the_live_queue_holds_about_a_ring() {
        let shared = Arc::new(Shared::new(
            &Config::temporary().ring_capacity(16).live_capacity(4),
        ));
        let mut feed = Feed::new(shared);
        let mut stalled = feed.subscribe();
        assert_eq!(stalled.next, 0);
        feed.push(envelopes(RunId::new(), 1..=100));
        assert_eq!(feed.ring().len(), 16);

        // 100 envelopes in deliveries of 4: the feed kept the last 4.
        let mut kept = Vec::new();
        loop {
            match stalled.receiver.try_recv() {
                Ok(Some(delivery)) => {
                    assert!(
                        delivery.envelopes.len() <= 4,
                        "{}",
                        delivery.envelopes.len()
                    );
                    assert_eq!(delivery.first + 1, delivery.envelopes[0].seq);
                    kept.extend(delivery.envelopes.iter().map(|e| e.seq));
                }
                Err(RecvError::Lagged(_)) => {}
                Ok(None) | Err(RecvError::Closed) => break,
            }
        }
        assert_eq!(kept, (85..=100).collect::<Vec<_>>());
    }
}
