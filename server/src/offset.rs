//! Offsets as the protocol's clients see them: fixed-width decimal, so that
//! comparing two of them as strings orders them as positions.
//!
//! Position `n` of a stream is "after its n-th stored event". A stream's own
//! run numbers its events from 1 (its `RunStarted`), so position 0 is the
//! empty stream; a fork starts at its fork point, and its run's event `seq`
//! sits at `base + seq - 1`.

use std::fmt;

/// Digits in an offset: `u64::MAX` has 20.
const WIDTH: usize = 20;

/// Where a read starts, as the `offset` query parameter says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFrom {
    /// `-1`, or no offset: the stream's beginning.
    Start,
    /// `now`: the stream's tail when the request arrives.
    Now,
    /// An offset this server handed out.
    After(u64),
}

/// An offset that is not `-1`, `now` or one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadOffset(pub(crate) String);

impl fmt::Display for BadOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.0.chars().take(64).collect();
        write!(f, "malformed offset {shown:?}: expected -1, now, or {WIDTH} digits")
    }
}

/// Reads an `offset` query value.
pub(crate) fn parse(raw: &str) -> Result<ReadFrom, BadOffset> {
    match raw {
        "-1" => Ok(ReadFrom::Start),
        "now" => Ok(ReadFrom::Now),
        _ => parse_position(raw)
            .map(ReadFrom::After)
            .ok_or_else(|| BadOffset(raw.to_owned())),
    }
}

/// A position in our own format, or `None`.
pub(crate) fn parse_position(raw: &str) -> Option<u64> {
    if raw.len() != WIDTH || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

/// The offset of position `n`.
pub(crate) fn format(n: u64) -> String {
    format!("{n:0WIDTH$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sort_as_their_positions() {
        let positions = [0, 1, 9, 10, 99, 100, 12_345, u64::MAX];
        let texts: Vec<String> = positions.iter().map(|&n| format(n)).collect();
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(texts, sorted);
        for (&n, text) in positions.iter().zip(&texts) {
            assert_eq!(parse(text), Ok(ReadFrom::After(n)));
        }
    }

    #[test]
    fn sentinels_and_hostile_values() {
        assert_eq!(parse("-1"), Ok(ReadFrom::Start));
        assert_eq!(parse("now"), Ok(ReadFrom::Now));
        for bad in ["", "0,1", "0 1", "1", "-2", "abc", "99999999999999999999"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let long = "7".repeat(10_000);
        assert!(parse(&long).unwrap_err().to_string().len() < 200);
    }
}
