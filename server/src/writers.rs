//! A stream's writer state: its idempotent producers, the last `Stream-Seq`,
//! whether it is closed. It is rebuilt from the stream's own appends, so it
//! is exactly what the store holds.

use std::collections::HashMap;

use crate::message::{Append, Stamp};

/// The largest epoch or seq a producer may send (JavaScript's safe integers).
pub(crate) const MAX_PRODUCER_NUMBER: u64 = (1 << 53) - 1;

/// What the protocol says of a producer's append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// New data: store it.
    Accept,
    /// Already stored: answer 204 with the highest seq accepted.
    Duplicate { epoch: u64, highest: u64 },
    /// An epoch older than the producer's: 403.
    StaleEpoch { current: u64 },
    /// A seq past the next one: 409.
    Gap { expected: u64, received: u64 },
    /// A new epoch must start at seq 0: 400.
    NewEpochNotAtZero,
}

/// The writer state of one stream.
#[derive(Debug, Default, Clone)]
pub(crate) struct Writers {
    producers: HashMap<String, (u64, u64)>,
    stream_seq: Option<String>,
    closed: bool,
}

impl Writers {
    /// Takes an append the store holds, in stream order.
    pub(crate) fn record(&mut self, append: &Append) {
        if let Some(stamp) = &append.producer {
            self.producers
                .insert(stamp.id.clone(), (stamp.epoch, stamp.seq));
        }
        if let Some(seq) = &append.stream_seq {
            self.stream_seq = Some(seq.clone());
        }
        self.closed |= append.close;
    }

    /// How many producers it keeps state for.
    pub(crate) fn producers(&self) -> usize {
        self.producers.len()
    }

    /// Whether it keeps state for producer `id`.
    pub(crate) fn knows(&self, id: &str) -> bool {
        self.producers.contains_key(id)
    }

    /// Whether an append closed the stream.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// The protocol's check of a producer's append.
    pub(crate) fn check(&self, stamp: &Stamp) -> Verdict {
        let Some(&(epoch, last)) = self.producers.get(&stamp.id) else {
            return if stamp.seq == 0 {
                Verdict::Accept
            } else if stamp.epoch == 0 {
                Verdict::Gap {
                    expected: 0,
                    received: stamp.seq,
                }
            } else {
                Verdict::NewEpochNotAtZero
            };
        };
        if stamp.epoch < epoch {
            return Verdict::StaleEpoch { current: epoch };
        }
        if stamp.epoch > epoch {
            return if stamp.seq == 0 {
                Verdict::Accept
            } else {
                Verdict::NewEpochNotAtZero
            };
        }
        if stamp.seq <= last {
            Verdict::Duplicate {
                epoch,
                highest: last,
            }
        } else if stamp.seq == last + 1 {
            Verdict::Accept
        } else {
            Verdict::Gap {
                expected: last + 1,
                received: stamp.seq,
            }
        }
    }

    /// Whether `seq` may follow the last `Stream-Seq` (byte-wise greater).
    pub(crate) fn seq_follows(&self, seq: &str) -> bool {
        self.stream_seq
            .as_deref()
            .is_none_or(|last| seq.as_bytes() > last.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(id: &str, epoch: u64, seq: u64) -> Stamp {
        Stamp {
            id: id.into(),
            epoch,
            seq,
        }
    }

    fn accepted(writers: &mut Writers, s: Stamp) {
        assert_eq!(writers.check(&s), Verdict::Accept, "{s:?}");
        writers.record(&Append {
            producer: Some(s),
            ..Append::default()
        });
    }

    #[test]
    fn a_producer_goes_through_the_protocols_cases() {
        let mut w = Writers::default();
        assert_eq!(
            w.check(&stamp("a", 0, 1)),
            Verdict::Gap {
                expected: 0,
                received: 1
            }
        );
        accepted(&mut w, stamp("a", 0, 0));
        accepted(&mut w, stamp("a", 0, 1));
        assert_eq!(
            w.check(&stamp("a", 0, 0)),
            Verdict::Duplicate {
                epoch: 0,
                highest: 1
            }
        );
        assert_eq!(
            w.check(&stamp("a", 0, 3)),
            Verdict::Gap {
                expected: 2,
                received: 3
            }
        );
        assert_eq!(w.check(&stamp("a", 1, 1)), Verdict::NewEpochNotAtZero);
        accepted(&mut w, stamp("a", 1, 0));
        assert_eq!(
            w.check(&stamp("a", 0, 2)),
            Verdict::StaleEpoch { current: 1 }
        );
        // Producers are independent.
        accepted(&mut w, stamp("b", 0, 0));
    }

    #[test]
    fn stream_seq_compares_bytewise() {
        let mut w = Writers::default();
        assert!(w.seq_follows("2"));
        w.record(&Append {
            stream_seq: Some("2".into()),
            ..Append::default()
        });
        assert!(!w.seq_follows("10"));
        assert!(!w.seq_follows("2"));
        assert!(w.seq_follows("3"));
        w.record(&Append {
            stream_seq: Some("09".into()),
            ..Append::default()
        });
        assert!(w.seq_follows("10"));
        assert!(w.seq_follows("1"));
    }
}
