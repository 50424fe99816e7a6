//! Where a subscriber is: cursors and how to resume.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use uuid::Uuid;

use crate::ids::RunId;
use crate::stream::RuntimeEventEnvelope;

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Only events persisted after the subscription is established.
    Live,
    /// Everything the store holds, then live.
    FromStart,
    /// Everything after the positions the cursor names, then live.
    After(Cursor),
}

/// A resume position: for each run, the last seq the subscriber has seen,
/// under the store epoch that minted those seqs.
///
/// A run room's cursor names one run; a session room's names each run of
/// the session seen so far (so it grows with the session's runs). Advance it
/// with every envelope received, keep it (its `Display` form is compact and
/// URL-safe), and pass it back in [`Resume::After`] to continue with no gap
/// and no duplicate.
///
/// A cursor's text is bounded, because it comes from clients: parsing
/// refuses more than [`Cursor::MAX_POSITIONS`] positions or more than
/// [`Cursor::MAX_TEXT_LEN`] characters. A session cursor therefore resumes
/// sessions of up to 4096 runs; [`Cursor::advance`] still grows past that in
/// process, but such a cursor's text no longer parses. Positions of runs
/// outside the subscribed room are ignored, and cost nothing.
///
/// ```
/// use behest_stream::{Cursor, RunId};
///
/// let epoch = uuid::Uuid::now_v7();
/// let run = RunId::new();
/// let cursor = Cursor::at(epoch, run, 42);
/// let text = cursor.to_string();
/// assert_eq!(text.parse::<Cursor>().unwrap(), cursor);
/// assert_eq!(cursor.seq(run), 42);
/// assert_eq!(cursor.seq(RunId::new()), 0);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    epoch: Uuid,
    positions: BTreeMap<RunId, u64>,
}

impl Cursor {
    /// The most run positions a cursor's text may carry: parsing a longer
    /// one is refused (see [`CursorParseError`]).
    pub const MAX_POSITIONS: usize = 4096;

    /// The longest cursor text that parses: what [`Cursor::MAX_POSITIONS`]
    /// positions take at most (`{epoch}/` is 37 characters, each
    /// `{run}:{seq},` at most 58).
    pub const MAX_TEXT_LEN: usize = 37 + Self::MAX_POSITIONS * 58;

    /// A cursor that has seen nothing, under `epoch` (see `EventHub::epoch`).
    #[must_use]
    pub fn new(epoch: Uuid) -> Self {
        Self {
            epoch,
            positions: BTreeMap::new(),
        }
    }

    /// A cursor that has seen `run_id` up to and including `seq`.
    #[must_use]
    pub fn at(epoch: Uuid, run_id: RunId, seq: u64) -> Self {
        let mut cursor = Self::new(epoch);
        cursor.positions.insert(run_id, seq);
        cursor
    }

    /// The store epoch this cursor's seqs belong to.
    #[must_use]
    pub fn epoch(&self) -> Uuid {
        self.epoch
    }

    /// The last seq seen of `run_id` (0: nothing seen).
    #[must_use]
    pub fn seq(&self, run_id: RunId) -> u64 {
        self.positions.get(&run_id).copied().unwrap_or(0)
    }

    /// Records that `envelope` was seen. Never moves a run backwards.
    pub fn advance(&mut self, envelope: &RuntimeEventEnvelope) {
        self.observe(envelope.run_id, envelope.seq);
    }

    /// Records that `run_id` was seen up to `seq`. Never moves backwards.
    pub(crate) fn observe(&mut self, run_id: RunId, seq: u64) {
        let seen = self.positions.entry(run_id).or_insert(0);
        *seen = (*seen).max(seq);
    }

    /// Every run this cursor has a position for, with its seq.
    pub fn positions(&self) -> impl Iterator<Item = (RunId, u64)> + '_ {
        self.positions.iter().map(|(run, seq)| (*run, *seq))
    }

    /// Keeps only the positions of the runs `keep` accepts.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(RunId) -> bool) {
        self.positions.retain(|run, _| keep(*run));
    }
}

// The parse errors name both bounds in words (their reasons are static).
const _: () = assert!(Cursor::MAX_POSITIONS == 4096 && Cursor::MAX_TEXT_LEN == 237_605);

/// `{epoch}/{run}:{seq},{run}:{seq}…`
impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.epoch)?;
        for (i, (run, seq)) in self.positions.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{run}:{seq}")?;
        }
        Ok(())
    }
}

/// Why a cursor string could not be parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("malformed cursor {input:?}: {reason}")]
pub struct CursorParseError {
    input: String,
    reason: &'static str,
}

impl FromStr for Cursor {
    type Err = CursorParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason| CursorParseError {
            input: input.chars().take(200).collect(),
            reason,
        };
        // Checked before anything is parsed, so that an oversized cursor
        // costs no more than its length to refuse.
        if input.len() > Cursor::MAX_TEXT_LEN {
            return Err(fail(
                "longer than Cursor::MAX_TEXT_LEN (237,605) characters",
            ));
        }
        let (epoch, rest) = input
            .split_once('/')
            .ok_or_else(|| fail("no '/' after the epoch"))?;
        let epoch = Uuid::parse_str(epoch).map_err(|_| fail("epoch is not a UUID"))?;
        let mut cursor = Cursor::new(epoch);
        if rest.is_empty() {
            return Ok(cursor);
        }
        for (index, position) in rest.split(',').enumerate() {
            if index == Cursor::MAX_POSITIONS {
                return Err(fail("more than Cursor::MAX_POSITIONS (4096) run positions"));
            }
            let (run, seq) = position
                .split_once(':')
                .ok_or_else(|| fail("position without ':'"))?;
            let run = Uuid::parse_str(run).map_err(|_| fail("run is not a UUID"))?;
            let seq = seq
                .parse::<u64>()
                .map_err(|_| fail("seq is not a number"))?;
            if cursor
                .positions
                .insert(RunId::from_uuid(run), seq)
                .is_some()
            {
                return Err(fail("a run appears twice"));
            }
        }
        Ok(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_text_round_trips_with_several_runs() {
        let mut cursor = Cursor::new(Uuid::now_v7());
        assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        cursor.positions.insert(RunId::new(), 3);
        cursor.positions.insert(RunId::new(), 9);
        assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
    }

    #[test]
    fn malformed_cursors_are_refused() {
        for bad in [
            "",
            "x/",
            "not-a-uuid/",
            "00000000-0000-0000-0000-000000000000/zz:1",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
        let epoch = Uuid::nil();
        let run = Uuid::nil();
        assert!(format!("{epoch}/{run}:x").parse::<Cursor>().is_err());
        assert!(
            format!("{epoch}/{run}:1,{run}:2")
                .parse::<Cursor>()
                .is_err()
        );
    }
}
