//! How far a run room got: what it handed to the store and what it fanned
//! out. The router holds it beside the room, so that it outlives a room that
//! dies.
//!
//! A publish is acknowledged by the store's word, even when its room dies
//! before fanning it out. Run subscribers would find such an event by
//! themselves (they catch up from the store when they re-attach), but
//! session and provider subscribers only see what a run room fans out, and
//! nothing may come after the event to reveal the gap (a terminal event).
//! So a room that dies having handed the store more than it fanned out is
//! started again at once, told where its predecessor's fan-out stopped, and
//! fans out the rest from the store before it takes anything else.

use std::sync::atomic::{AtomicU64, Ordering};

/// The last seq a run room handed to the store and the last it fanned out.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    handed: AtomicU64,
    fanned: AtomicU64,
}

impl Progress {
    /// Where a room stands when it starts (or settles what it owed).
    pub(crate) fn start_at(&self, handed: u64, fanned: u64) {
        self.handed.store(handed, Ordering::Release);
        self.fanned.store(fanned, Ordering::Release);
    }

    /// The room handed the store everything up to `seq`.
    pub(crate) fn handed(&self, seq: u64) {
        self.handed.fetch_max(seq, Ordering::AcqRel);
    }

    /// An append failed with nothing stored, and every later one of the
    /// room's pipeline with it: nothing past `seq` will be stored.
    pub(crate) fn rewound(&self, seq: u64) {
        self.handed.store(seq, Ordering::Release);
    }

    /// The room fanned out everything up to `seq`.
    pub(crate) fn fanned(&self, seq: u64) {
        self.fanned.fetch_max(seq, Ordering::AcqRel);
    }

    /// Where fan-out stopped, if the room handed the store more than that:
    /// its successor must fan out the store's events after it.
    pub(crate) fn unfanned_from(&self) -> Option<u64> {
        let fanned = self.fanned.load(Ordering::Acquire);
        (self.handed.load(Ordering::Acquire) > fanned).then_some(fanned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_that_fanned_out_all_it_handed_leaves_nothing_behind() {
        let progress = Progress::default();
        progress.start_at(4, 4);
        assert_eq!(progress.unfanned_from(), None);
        progress.handed(6);
        assert_eq!(progress.unfanned_from(), Some(4));
        progress.fanned(5);
        assert_eq!(progress.unfanned_from(), Some(5));
        progress.fanned(6);
        assert_eq!(progress.unfanned_from(), None);
        // Never backwards: a late, lower report changes nothing.
        progress.handed(3);
        progress.fanned(2);
        assert_eq!(progress.unfanned_from(), None);
    }
}
